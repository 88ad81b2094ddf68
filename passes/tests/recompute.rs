//! Per-block recomputation on a hand-built two-layer LoRA model: the graph verifies, the backward reads only
//! checkpoints or clones, the reference interpreter gives bit-identical loss, gradient norm and updates (dropout
//! included), the planned peak drops for long sequences, and a snapshot shows the clones.

use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::{Builder, Graph, Init, Kernel, Op, OutputKind, Role, Type, ValueId};
use passes::adamw::AdamW;
use passes::autodiff::{differentiate, Wrt};
use passes::memory::plan;
use passes::recompute::{choose_policy, forward_block, Recompute, RecomputePolicy};
use passes::{Pass, PassManager};

/// Per layer: rms_norm → frozen up-projection + LoRA branch (dropout → A → B → scale) → silu → frozen
/// down-projection → residual add. Then final norm, LM head, cross-entropy, backward (trainable only), AdamW.
struct Mini {
    layers: usize,
    tokens: usize,
    hidden: usize,
    ffn: usize,
    vocab: usize,
    rank: usize,
    dropout: Option<f64>,
}

fn mini(m: &Mini) -> Graph {
    let (n, d, f, v, r) = (m.tokens, m.hidden, m.ffn, m.vocab, m.rank);
    let mut b = Builder::new("mini");
    let ids = b.input("input_ids", Type::i32([n])).unwrap();
    let labels = b.input("labels", Type::i32([n])).unwrap();
    let step = b.input("step", Type::i32(Vec::<usize>::new())).unwrap();
    let param = |b: &mut Builder, name: &str, shape: &[usize], role: Role| {
        b.param(name, Type::f32(shape.to_vec()), role, Init::Load).unwrap()
    };
    b.set_label(Some("model.embed_tokens".into()));
    let table = param(&mut b, "model.embed_tokens.weight", &[v, d], Role::Frozen);
    let mut h = b.embedding(table, ids).unwrap();
    for i in 0..m.layers {
        let l = format!("model.layers.{i}");
        b.set_label(Some(format!("{l}.post_attention_layernorm")));
        let nw = param(&mut b, &format!("{l}.post_attention_layernorm.weight"), &[d], Role::Frozen);
        let x = b.rms_norm(h, nw, 1e-5).unwrap();
        b.set_label(Some(format!("{l}.mlp.up_proj")));
        let w = param(&mut b, &format!("{l}.mlp.up_proj.weight"), &[f, d], Role::Frozen);
        let la = param(&mut b, &format!("{l}.mlp.up_proj.lora_A.weight"), &[r, d], Role::Trainable);
        let lb = param(&mut b, &format!("{l}.mlp.up_proj.lora_B.weight"), &[f, r], Role::Trainable);
        let base = b.matmul(x, w, false, true).unwrap();
        let xd = match m.dropout {
            Some(p) => b.dropout(x, step, p, 1000 + i as u64).unwrap(),
            None => x,
        };
        let a = b.matmul(xd, la, false, true).unwrap();
        let bb = b.matmul(a, lb, false, true).unwrap();
        let s = b.scale(bb, 2.0).unwrap();
        let y = b.add(base, s).unwrap();
        b.set_label(Some(format!("{l}.mlp")));
        let act = b.silu(y).unwrap();
        b.set_label(Some(format!("{l}.mlp.down_proj")));
        let wd = param(&mut b, &format!("{l}.mlp.down_proj.weight"), &[d, f], Role::Frozen);
        let o = b.matmul(act, wd, false, true).unwrap();
        b.set_label(Some(l));
        h = b.add(h, o).unwrap();
    }
    b.set_label(Some("model.norm".into()));
    let nw = param(&mut b, "model.norm.weight", &[d], Role::Frozen);
    let hn = b.rms_norm(h, nw, 1e-5).unwrap();
    b.set_label(Some("lm_head".into()));
    let head = param(&mut b, "lm_head.weight", &[v, d], Role::Frozen);
    let logits = b.matmul(hn, head, false, true).unwrap();
    b.set_label(Some("loss".into()));
    let loss = b.cross_entropy(logits, labels, -100).unwrap();
    b.output(OutputKind::Loss, loss);
    let mut g = b.finish();
    differentiate(&mut g, Wrt::Trainable).unwrap();
    AdamW::default().run(&mut g).unwrap();
    ir::verify::verify(&g).unwrap();
    g
}

const TINY: Mini = Mini { layers: 2, tokens: 4, hidden: 4, ffn: 8, vocab: 6, rank: 2, dropout: Some(0.1) };
const SMALL: Mini = Mini { layers: 2, tokens: 24, hidden: 16, ffn: 32, vocab: 20, rank: 4, dropout: None };
/// Long sequences: activations dwarf the weights.
const LONG: Mini = Mini { layers: 2, tokens: 4096, hidden: 64, ffn: 256, vocab: 64, rank: 8, dropout: Some(0.1) };

fn recompute(g: &Graph) -> Graph {
    let mut rc = g.clone();
    let mut pm = PassManager::new(vec![Box::new(Recompute { policy: RecomputePolicy::PerBlock })]);
    pm.run(&mut rc).unwrap(); // verifies the result
    rc
}

/// Seeded values for every parameter and state (moments too; the second moment non-negative) and the inputs.
fn env(g: &Graph, m: &Mini) -> Env {
    let mut env = Env::default();
    for (k, (v, name, role)) in g.params().into_iter().enumerate() {
        let shape = g.ty(v).shape.clone();
        let numel = g.ty(v).numel();
        let (lo, hi) = match role {
            Role::State if name.ends_with("exp_avg_sq") => (0.0, 1e-3),
            Role::State => (-1e-2, 1e-2),
            _ => (-0.5, 0.5),
        };
        let data = (0..numel).map(|i| lo + (hi - lo) * ir::rng::uniform(42 + k as u64, 0, i as u64) as f64).collect();
        env.params.insert(name.to_string(), Value::F(Tensor::new(shape, data)));
    }
    let ids: Vec<i32> = (0..m.tokens).map(|i| ((i * 7 + 3) % m.vocab) as i32).collect();
    let mut labels: Vec<i32> = (0..m.tokens).map(|i| ((i * 5 + 1) % m.vocab) as i32).collect();
    labels[0] = -100;
    env.inputs.insert("input_ids".into(), Value::ints(vec![m.tokens], ids));
    env.inputs.insert("labels".into(), Value::ints(vec![m.tokens], labels));
    env.inputs.insert("step".into(), Value::ints(vec![], vec![5]));
    env.inputs.insert("opt_step".into(), Value::ints(vec![], vec![3]));
    env.inputs.insert("lr".into(), Value::F(Tensor::scalar(1e-2)));
    env
}

/// The graph's outputs by kind, as the bits of their values.
fn outputs(g: &Graph, env: &Env) -> Vec<(OutputKind, Vec<u64>)> {
    let vals = run(g, env, Precision::F64).unwrap();
    let mut out: Vec<(OutputKind, Vec<u64>)> = g
        .outputs
        .iter()
        .map(|o| (o.kind.clone(), vals[o.value.index()].as_f().unwrap().data.iter().map(|x| x.to_bits()).collect()))
        .collect();
    out.sort_by_key(|(k, _)| format!("{k:?}"));
    out
}

fn block_of(g: &Graph, v: ValueId) -> Option<usize> {
    let n = g.node(v);
    if n.op.is_leaf() {
        None
    } else {
        n.label.as_deref().and_then(forward_block)
    }
}

fn is_bwd(g: &Graph, v: ValueId) -> bool {
    g.node(v).label.as_deref().is_some_and(|l| l.ends_with(" (bwd)"))
}

fn is_clone(g: &Graph, v: ValueId) -> bool {
    g.node(v).label.as_deref().is_some_and(|l| l.ends_with(" (recompute)"))
}

#[test]
fn recompute_is_bit_identical_with_and_without_dropout() {
    for dropout in [None, Some(0.1)] {
        let m = Mini { dropout, ..SMALL };
        let g = mini(&m);
        let rc = recompute(&g);
        assert!(rc.nodes.len() > g.nodes.len(), "nothing was cloned");
        let env = env(&g, &m);
        let (a, b) = (outputs(&g, &env), outputs(&rc, &env));
        assert!(a.iter().any(|(k, _)| *k == OutputKind::Loss));
        assert_eq!(a.iter().filter(|(k, _)| matches!(k, OutputKind::Update(_))).count(), 12);
        assert_eq!(a, b, "dropout {dropout:?}: outputs differ after recomputation");
        // The step really trains: the LoRA weights move.
        let vals = run(&g, &env, Precision::F64).unwrap();
        let name = "model.layers.0.mlp.up_proj.lora_A.weight";
        let upd = g.output(&OutputKind::Update(name.into())).unwrap();
        assert_ne!(vals[upd.index()], vals[g.param(name).unwrap().index()]);
    }
}

#[test]
fn dropout_changes_the_result_so_the_mask_really_is_shared() {
    // The equality above would be vacuous if dropout did nothing: with p = 0.1 the loss differs from no dropout.
    let (with, without) = (Mini { dropout: Some(0.1), ..SMALL }, SMALL);
    let loss = |m: &Mini| {
        let g = recompute(&mini(m));
        outputs(&g, &env(&g, m)).into_iter().find(|(k, _)| *k == OutputKind::Loss).unwrap().1
    };
    assert_ne!(loss(&with), loss(&without));
    // And each cloned dropout has its original's seed and reads the same step input.
    let g = recompute(&mini(&with));
    let step = g.input("step").unwrap();
    let originals: Vec<_> = g.ids().filter(|&v| matches!(g.node(v).op, Op::Dropout { .. }) && !is_bwd(&g, v)).collect();
    let clones: Vec<_> = originals.iter().copied().filter(|&v| is_clone(&g, v)).collect();
    assert_eq!(clones.len(), 2);
    for c in clones {
        let Op::Dropout { seed, .. } = g.node(c).op else { unreachable!() };
        let twin = originals.iter().find(|&&o| !is_clone(&g, o) && g.node(o).op == g.node(c).op);
        assert!(twin.is_some(), "no original dropout with seed {seed}");
        assert_eq!(g.node(c).inputs[1], step);
    }
}

#[test]
fn backward_reads_only_checkpoints_and_clones() {
    let g = mini(&SMALL);
    let rc = recompute(&g);
    // Checkpoints: block values that forward code outside the block reads.
    let mut checkpoint = vec![false; rc.nodes.len()];
    for r in rc.ids().filter(|&r| !is_bwd(&rc, r)) {
        for &x in &rc.node(r).inputs {
            if block_of(&rc, x).is_some() && block_of(&rc, x) != block_of(&rc, r) {
                checkpoint[x.index()] = true;
            }
        }
    }
    let mut redirected = 0;
    for r in rc.ids().filter(|&r| is_bwd(&rc, r)) {
        for &x in &rc.node(r).inputs {
            if block_of(&rc, x).is_some() {
                assert!(checkpoint[x.index()], "{r} ({}) reads the kept activation {x}", rc.node(r).op.mnemonic());
            }
            redirected += usize::from(is_clone(&rc, x));
        }
    }
    assert!(redirected > 0);
    // Clones sit right before their block's backward and read only checkpoints, leaves and other clones.
    for c in rc.ids().filter(|&c| is_clone(&rc, c)) {
        for &x in &rc.node(c).inputs {
            let outside = block_of(&rc, x).is_none() && !is_clone(&rc, x);
            assert!(outside || checkpoint[x.index()] || is_clone(&rc, x), "clone {c} reads {x}");
        }
        assert!(!matches!(rc.node(c).op, Op::Param { .. }));
    }
    // Block 1's backward runs before block 0's, and each block's clones come after the later block's backward.
    let first = |pred: &dyn Fn(ValueId) -> bool| rc.ids().find(|&v| pred(v)).unwrap();
    let clone0 = first(&|v| is_clone(&rc, v) && rc.node(v).label.as_deref().unwrap().starts_with("model.layers.0."));
    let bwd1 = first(&|v| is_bwd(&rc, v) && rc.node(v).label.as_deref().unwrap().starts_with("model.layers.1."));
    assert!(bwd1 < clone0);
}

#[test]
fn recompute_is_idempotent_and_refuses_kernels() {
    let rc = recompute(&mini(&TINY));
    assert_eq!(recompute(&rc), rc);
    let mut off = mini(&TINY);
    let before = off.clone();
    Recompute { policy: RecomputePolicy::Off }.run(&mut off).unwrap();
    assert_eq!(off, before);
    let mut fused = mini(&TINY);
    let last = ValueId(fused.nodes.len() as u32 - 1);
    fused.kernels.push(Kernel { name: "k".into(), nodes: vec![last] });
    let err = Recompute { policy: RecomputePolicy::PerBlock }.run(&mut fused).unwrap_err();
    assert!(err.contains("before fusion"), "{err}");
}

#[test]
fn per_block_lowers_the_peak_for_long_sequences() {
    let g = mini(&LONG);
    let rc = recompute(&g);
    let (off, per_block) = (plan(&g), plan(&rc));
    eprintln!("LONG  off:       {}", off.summary());
    eprintln!("LONG  per-block: {}", per_block.summary());
    assert_eq!(off.persistent_bytes, per_block.persistent_bytes);
    assert!(per_block.peak_bytes < off.peak_bytes, "{} vs {}", per_block.peak_bytes, off.peak_bytes);
    // choose_policy: Off when it fits, PerBlock when only that fits.
    let (policy, p_off, p_block) = choose_policy(&g, off.peak_bytes as f64);
    assert_eq!((policy, p_off, p_block), (RecomputePolicy::Off, off.peak_bytes as f64, per_block.peak_bytes as f64));
    let (policy, _, _) = choose_policy(&g, per_block.peak_bytes as f64);
    assert_eq!(policy, RecomputePolicy::PerBlock);
}

#[test]
fn report_numbers_for_the_small_model() {
    let g = mini(&SMALL);
    let (off, per_block) = (plan(&g), plan(&recompute(&g)));
    eprintln!("SMALL off:       {}", off.summary());
    eprintln!("SMALL per-block: {}", per_block.summary());
    assert!(off.arena_bytes < off.naive_bytes && per_block.arena_bytes < per_block.naive_bytes);
}

#[test]
fn snapshot_tiny_model_after_recompute() {
    let rc = recompute(&mini(&TINY));
    insta::assert_snapshot!("tiny_mini_model_after_recompute", ir::text::print(&rc));
}
