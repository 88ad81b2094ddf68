//! The fusion pass on small graphs and on a hand-built one-layer Llama training step (LoRA on q/v, autodiff, AdamW):
//! the kernel groups partition the non-leaf nodes, sit where the policy says (residual adds in GEMM epilogues, RoPE
//! with its projection, swiglu with gate/up, the AdamW chain together), never form a cycle, and after `schedule`
//! the step computes bit-for-bit what it did before. Snapshots of the IR after `fuse` and after `schedule`.

use ir::interp::{Env, Precision, Tensor, Value};
use ir::{Builder, Graph, Init, Op, OutputKind, Role, Type, ValueId};
use passes::adamw::AdamW;
use passes::autodiff::{differentiate, Wrt};
use passes::fuse::{Fuse, FusePolicy};
use passes::schedule::Schedule;
use passes::Pass;

// ---- shared checks (independent of the passes' own checking code) ----------------------------------------------

/// The kernel of every node; panics unless every non-leaf node is in exactly one kernel and no leaf in any.
fn kernel_of(g: &Graph) -> Vec<Option<usize>> {
    let mut of = vec![None; g.nodes.len()];
    for (k, kernel) in g.kernels.iter().enumerate() {
        for v in &kernel.nodes {
            assert!(of[v.index()].replace(k).is_none(), "{v} is in two kernels");
        }
    }
    for (i, n) in g.nodes.iter().enumerate() {
        assert_eq!(of[i].is_some(), !n.op.is_leaf(), "%{i} ({}): kernel membership", n.op.mnemonic());
    }
    of
}

/// Panics if the kernel graph (kernel A → kernel B when B reads a value of A) has a cycle.
fn assert_kernel_graph_acyclic(g: &Graph) {
    let of = kernel_of(g);
    let k = g.kernels.len();
    let mut edges = std::collections::BTreeSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        for v in &n.inputs {
            if let (Some(a), Some(b)) = (of[v.index()], of[i]) {
                if a != b {
                    edges.insert((a, b));
                }
            }
        }
    }
    let mut indeg = vec![0; k];
    for &(_, b) in &edges {
        indeg[b] += 1;
    }
    let mut ready: Vec<usize> = (0..k).filter(|&x| indeg[x] == 0).collect();
    let mut done = 0;
    while let Some(x) = ready.pop() {
        done += 1;
        for &(_, b) in edges.range((x, 0)..(x + 1, 0)) {
            indeg[b] -= 1;
            if indeg[b] == 0 {
                ready.push(b);
            }
        }
    }
    assert_eq!(done, k, "the kernel graph has a cycle");
}

fn kernel_nodes(g: &Graph, v: ValueId) -> &[ValueId] {
    let k = g.kernels.iter().find(|k| k.nodes.contains(&v)).unwrap_or_else(|| panic!("{v} is in no kernel"));
    &k.nodes
}

fn ids(g: &Graph, pred: impl Fn(&ir::Node) -> bool) -> Vec<ValueId> {
    g.ids().filter(|&v| pred(g.node(v))).collect()
}

fn has_label(n: &ir::Node, suffix: &str) -> bool {
    n.label.as_deref().is_some_and(|l| l.ends_with(suffix))
}

fn non_leaf(g: &Graph) -> usize {
    g.nodes.iter().filter(|n| !n.op.is_leaf()).count()
}

fn run_pass(p: &dyn Pass, g: &mut Graph) -> String {
    let summary = p.run(g).unwrap_or_else(|e| panic!("{}: {e}", p.name()));
    ir::verify::verify(g).unwrap_or_else(|e| panic!("after {}: {e}", p.name()));
    summary
}

// ---- small graphs --------------------------------------------------------------------------------------------

fn frozen(b: &mut Builder, name: &str, shape: &[usize]) -> ValueId {
    b.param(name, Type::f32(shape.to_vec()), Role::Frozen, Init::Load).unwrap()
}

#[test]
fn scale_joins_its_matmul_and_constants_stay_out() {
    let mut b = Builder::new("epilogue");
    let x = frozen(&mut b, "x", &[3, 4]);
    let w = frozen(&mut b, "w", &[5, 4]);
    b.set_label(Some("proj".into()));
    let y = b.matmul(x, w, false, true).unwrap();
    let s = b.scale(y, 0.5).unwrap();
    let c = b.constant(2.0, Type::f32(vec![])).unwrap();
    let m = b.mul(s, c).unwrap();
    b.output(OutputKind::Metric("m".into()), m);
    let mut g = b.finish();
    let summary = run_pass(&FusePolicy, &mut g);
    assert_eq!(g.kernels.len(), 1, "{}", ir::text::print(&g));
    assert_eq!(g.kernels[0].name, "matmul:proj");
    assert_eq!(g.kernels[0].nodes, vec![y, s, m], "the constant {c} is an input, not a member");
    assert_eq!(summary, "1 kernels for 3 nodes; 2 nodes fused into another op's kernel");
}

#[test]
fn an_op_that_is_not_its_producers_first_reader_stays_apart() {
    // y = x·Wᵀ is read first by a transpose (an anchor of its own), then by neg: neg cannot be y's epilogue, and
    // its only reader is a graph output, so it forms its own elementwise kernel.
    let mut b = Builder::new("late_reader");
    let x = frozen(&mut b, "x", &[3, 4]);
    let w = frozen(&mut b, "w", &[5, 4]);
    let y = b.matmul(x, w, false, true).unwrap();
    let t = b.transpose(y, &[1, 0]).unwrap();
    b.set_label(Some("late".into()));
    let n = b.neg(y).unwrap();
    b.output(OutputKind::Metric("t".into()), t);
    b.output(OutputKind::Metric("n".into()), n);
    let mut g = b.finish();
    run_pass(&FusePolicy, &mut g);
    assert_eq!(kernel_nodes(&g, n), &[n]);
    assert!(g.kernels.iter().any(|k| k.name == "elementwise:late" && k.nodes == vec![n]));
    assert_eq!(kernel_nodes(&g, y), &[y]);
    assert_eq!(kernel_nodes(&g, t), &[t]);
}

#[test]
fn a_merge_that_would_close_a_cycle_is_refused() {
    // p = x·W and s = 2p form one kernel; t = transpose(transpose(s)) runs in two other kernels; y = p + t.
    // y is p's pure epilogue, but joining p's kernel would make it read t, which reads that kernel: refused, so y
    // joins the last transpose instead.
    let mut b = Builder::new("cycle");
    let x = frozen(&mut b, "x", &[4, 4]);
    let w = frozen(&mut b, "w", &[4, 4]);
    let p = b.matmul(x, w, false, false).unwrap();
    let s = b.scale(p, 2.0).unwrap();
    let t1 = b.transpose(s, &[1, 0]).unwrap();
    let t2 = b.transpose(t1, &[1, 0]).unwrap();
    let y = b.add(p, t2).unwrap();
    b.output(OutputKind::Metric("y".into()), y);
    let mut g = b.finish();
    run_pass(&FusePolicy, &mut g);
    assert_eq!(kernel_nodes(&g, p), &[p, s]);
    assert_eq!(kernel_nodes(&g, t2), &[t2, y]);
    assert_kernel_graph_acyclic(&g);
}

#[test]
fn an_elementwise_chain_becomes_its_readers_prologue() {
    // u = exp(−x) on a parameter has no producer kernel; u is read only by the matmul, so it is its prologue.
    let mut b = Builder::new("prologue");
    let x = frozen(&mut b, "x", &[3, 4]);
    let w = frozen(&mut b, "w", &[4, 2]);
    let n = b.neg(x).unwrap();
    let u = b.op(Op::Exp {}, &[n]).unwrap();
    b.set_label(Some("mm".into()));
    let y = b.matmul(u, w, false, false).unwrap();
    b.output(OutputKind::Metric("y".into()), y);
    let mut g = b.finish();
    run_pass(&FusePolicy, &mut g);
    assert_eq!(g.kernels.len(), 1);
    assert_eq!(g.kernels[0].name, "matmul:mm");
    assert_eq!(g.kernels[0].nodes, vec![n, u, y]);
}

#[test]
fn fuse_replaces_existing_kernels() {
    let mut b = Builder::new("again");
    let x = frozen(&mut b, "x", &[3, 4]);
    let y = b.neg(x).unwrap();
    let z = b.sqrt(y).unwrap();
    b.output(OutputKind::Metric("z".into()), z);
    let mut g = b.finish();
    run_pass(&FusePolicy, &mut g);
    let once = g.clone();
    run_pass(&FusePolicy, &mut g);
    assert_eq!(g, once);
    assert_eq!(g.kernels.len(), 1);
    assert_eq!(g.kernels[0].nodes, vec![y, z]);
}

// ---- the one-layer Llama training step ----------------------------------------------------------------------

const B: usize = 1;
const T: usize = 4;
const N: usize = B * T;
const D: usize = 8;
const H: usize = 2;
const KV: usize = 1;
const HD: usize = 4;
const F: usize = 16;
const V: usize = 16;
const R: usize = 2;

/// x·Wᵀ, plus the LoRA delta s·(x·Aᵀ)·Bᵀ when `lora` (as the frontend's PEFT insertion writes it).
fn linear(b: &mut Builder, x: ValueId, name: &str, out: usize, lora: bool) -> ValueId {
    let inp = b.ty(x).shape[1];
    b.set_label(Some(name.to_string()));
    let w = frozen(b, &format!("{name}.weight"), &[out, inp]);
    let base = b.matmul(x, w, false, true).unwrap();
    if !lora {
        return base;
    }
    let a = b.param(&format!("{name}.lora_A.weight"), Type::f32(vec![R, inp]), Role::Trainable, Init::Load).unwrap();
    let bw = b.param(&format!("{name}.lora_B.weight"), Type::f32(vec![out, R]), Role::Trainable, Init::Load).unwrap();
    let ax = b.matmul(x, a, false, true).unwrap();
    let bax = b.matmul(ax, bw, false, true).unwrap();
    let delta = b.scale(bax, 2.0).unwrap();
    b.add(base, delta).unwrap()
}

fn rms_norm(b: &mut Builder, x: ValueId, name: &str) -> ValueId {
    b.set_label(Some(name.to_string()));
    let w = frozen(b, &format!("{name}.weight"), &[D]);
    b.rms_norm(x, w, 1e-5).unwrap()
}

/// embedding → one Llama decoder layer (LoRA on q_proj, v_proj) → norm → lm_head → cross-entropy; then the
/// backward (trainable parameters only) and the AdamW step with clipping.
fn mini_block() -> Graph {
    let mut b = Builder::new("mini_block");
    let ids = b.input("input_ids", Type::i32(vec![B, T])).unwrap();
    let pos = b.input("position_ids", Type::i32(vec![B, T])).unwrap();
    let seg = b.input("segment_ids", Type::i32(vec![B, T])).unwrap();
    let labels = b.input("labels", Type::i32(vec![N])).unwrap();
    b.set_label(Some("model.embed_tokens".into()));
    let embed = frozen(&mut b, "model.embed_tokens.weight", &[V, D]);
    let e = b.embedding(embed, ids).unwrap();
    let x = b.reshape(e, &[N, D]).unwrap();

    let l = "model.layers.0";
    let n1 = rms_norm(&mut b, x, &format!("{l}.input_layernorm"));
    let q = linear(&mut b, n1, &format!("{l}.self_attn.q_proj"), H * HD, true);
    let k = linear(&mut b, n1, &format!("{l}.self_attn.k_proj"), KV * HD, false);
    let v = linear(&mut b, n1, &format!("{l}.self_attn.v_proj"), KV * HD, true);
    b.set_label(Some(format!("{l}.self_attn")));
    let q = b.reshape(q, &[B, T, H, HD]).unwrap();
    let q = b.rope(q, pos, 10000.0).unwrap();
    let k = b.reshape(k, &[B, T, KV, HD]).unwrap();
    let k = b.rope(k, pos, 10000.0).unwrap();
    let v = b.reshape(v, &[B, T, KV, HD]).unwrap();
    let o = b.attention(q, k, v, seg, 1.0 / (HD as f64).sqrt()).unwrap();
    let o = b.reshape(o, &[N, H * HD]).unwrap();
    let o = linear(&mut b, o, &format!("{l}.self_attn.o_proj"), D, false);
    b.set_label(Some(l.to_string()));
    let h = b.add(x, o).unwrap();

    let n2 = rms_norm(&mut b, h, &format!("{l}.post_attention_layernorm"));
    let gate = linear(&mut b, n2, &format!("{l}.mlp.gate_proj"), F, false);
    let up = linear(&mut b, n2, &format!("{l}.mlp.up_proj"), F, false);
    b.set_label(Some(format!("{l}.mlp")));
    let a = b.swiglu(gate, up).unwrap();
    let down = linear(&mut b, a, &format!("{l}.mlp.down_proj"), D, false);
    b.set_label(Some(l.to_string()));
    let h = b.add(h, down).unwrap();

    let hn = rms_norm(&mut b, h, "model.norm");
    let logits = linear(&mut b, hn, "lm_head", V, false);
    b.set_label(Some("loss".into()));
    let loss = b.cross_entropy(logits, labels, -100).unwrap();
    b.output(OutputKind::Loss, loss);
    let mut g = b.finish();
    differentiate(&mut g, Wrt::Trainable).unwrap();
    AdamW::default().run(&mut g).unwrap();
    ir::verify::verify(&g).unwrap();
    g
}

/// Deterministic values for every parameter and input of the mini block.
fn mini_env(g: &Graph) -> Env {
    let mut env = Env::default();
    for (k, (v, name, _)) in g.params().into_iter().enumerate() {
        let shape = g.ty(v).shape.clone();
        let n: usize = shape.iter().product();
        let data = (0..n).map(|i| ir::rng::uniform(40 + k as u64, 0, i as u64) as f64 * 0.6 - 0.3).collect();
        env.params.insert(name.to_string(), Value::F(Tensor::new(shape, data)));
    }
    let row = |f: &dyn Fn(usize) -> i32| Value::ints(vec![B, T], (0..N).map(f).collect());
    env.inputs.insert("input_ids".into(), row(&|i| ((i * 7 + 3) % V) as i32));
    env.inputs.insert("position_ids".into(), row(&|i| (i % T) as i32));
    env.inputs.insert("segment_ids".into(), row(&|_| 0));
    env.inputs.insert("labels".into(), Value::ints(vec![N], (0..N).map(|i| ((i * 5 + 1) % V) as i32).collect()));
    env.inputs.insert("lr".into(), Value::F(Tensor::scalar(1e-3)));
    env.inputs.insert("opt_step".into(), Value::ints(vec![], vec![1]));
    env
}

/// Graph outputs by kind, bit patterns of their values.
fn output_bits(g: &Graph, env: &Env, precision: Precision) -> Vec<(OutputKind, Vec<u64>)> {
    let vals = ir::interp::run(g, env, precision).unwrap();
    let mut out: Vec<_> = g
        .outputs
        .iter()
        .map(|o| {
            let bits = match &vals[o.value.index()] {
                Value::F(t) => t.data.iter().map(|x| x.to_bits()).collect(),
                Value::I { data, .. } => data.iter().map(|&x| x as u64).collect(),
                Value::Q(_) => panic!("no NF4 outputs here"),
            };
            (o.kind.clone(), bits)
        })
        .collect();
    out.sort_by_key(|(k, _)| format!("{k:?}"));
    out
}

/// The forward matmul of a projection (the one reading its frozen weight).
fn projection(g: &Graph, name: &str) -> ValueId {
    let w = g.param(&format!("{name}.weight")).unwrap();
    let found = ids(g, |n| matches!(n.op, Op::MatMul { .. }) && n.inputs[1] == w && has_label(n, name));
    assert_eq!(found.len(), 1, "{name}: {found:?}");
    found[0]
}

#[test]
fn mini_block_kernels_follow_the_policy() {
    let mut g = mini_block();
    let summary = run_pass(&FusePolicy, &mut g);
    kernel_of(&g);
    assert_kernel_graph_acyclic(&g);
    let l = "model.layers.0";

    // Residual adds sit in the epilogue of o_proj / down_proj.
    for proj in ["self_attn.o_proj", "mlp.down_proj"] {
        let mm = projection(&g, &format!("{l}.{proj}"));
        let add = ids(&g, |n| matches!(n.op, Op::Add {}) && n.inputs.contains(&mm));
        assert_eq!(add.len(), 1, "{proj}: one residual add reads the projection");
        assert!(kernel_nodes(&g, mm).contains(&add[0]), "{proj}: residual add {} not in {mm}'s kernel", add[0]);
    }

    // RoPE (forward) sits with its projection: q's with the q_proj kernel, k's with the k_proj matmul.
    let ropes = ids(&g, |n| matches!(n.op, Op::Rope { inverse: false, .. }));
    assert_eq!(ropes.len(), 2);
    for (rope, proj) in ropes.into_iter().zip(["q_proj", "k_proj"]) {
        let kernel = kernel_nodes(&g, rope);
        let with_proj = kernel.iter().any(|&v| matches!(g.node(v).op, Op::MatMul { .. }) && has_label(g.node(v), proj));
        assert!(with_proj, "rope {rope} is not with a {proj} matmul: {kernel:?}");
    }
    let q_kernel = g.kernels.iter().find(|k| k.nodes.contains(&ids(&g, |n| matches!(n.op, Op::Rope { .. }))[0]));
    assert_eq!(q_kernel.unwrap().name, format!("matmul:{l}.self_attn.q_proj"));

    // swiglu is fused with the gate/up projection that feeds it.
    let swiglu = ids(&g, |n| matches!(n.op, Op::Swiglu {}));
    assert_eq!(swiglu.len(), 1);
    let kernel = kernel_nodes(&g, swiglu[0]);
    let gate_up = [projection(&g, &format!("{l}.mlp.gate_proj")), projection(&g, &format!("{l}.mlp.up_proj"))];
    assert!(kernel.iter().any(|v| gate_up.contains(v)), "swiglu kernel {kernel:?}");

    // The backward of swiglu is the epilogue of down_proj's dX matmul.
    for bwd in ids(&g, |n| matches!(n.op, Op::SiluBwd {})) {
        let kernel = kernel_nodes(&g, bwd);
        assert!(kernel.iter().any(|&v| matches!(g.node(v).op, Op::MatMul { .. })), "silu_bwd kernel {kernel:?}");
    }

    // Each AdamW step is one kernel: clipping mul, both moments, the update.
    let updates = ids(&g, |n| matches!(n.op, Op::AdamWUpdate { .. }));
    assert_eq!(updates.len(), 4, "LoRA A and B of q_proj and v_proj");
    for u in updates {
        let (m, v) = (g.node(u).inputs[1], g.node(u).inputs[2]);
        let clip = g.node(m).inputs[1];
        assert!(matches!(g.node(clip).op, Op::Mul {}));
        let mut chain = vec![clip, m, v, u];
        chain.sort();
        assert_eq!(kernel_nodes(&g, u), chain.as_slice());
        let name = &g.kernels.iter().find(|k| k.nodes.contains(&u)).unwrap().name;
        assert!(name.starts_with("adamw_update:optimizer "), "{name}");
    }

    // Anchors never share a kernel; every kernel is named after its anchor.
    for k in &g.kernels {
        let anchors: Vec<_> = k
            .nodes
            .iter()
            .filter(|&&v| passes::fuse::fusion_class(&g.node(v).op) == passes::fuse::FusionClass::Anchor)
            .collect();
        assert!(anchors.len() <= 1, "kernel {} has anchors {anchors:?}", k.name);
        if let [&a] = anchors[..] {
            assert!(k.name.starts_with(&format!("{}:", g.node(a).op.mnemonic())), "{}", k.name);
        } else {
            assert!(k.name.starts_with("elementwise"), "{}", k.name);
        }
    }
    assert!(g.kernels.len() < non_leaf(&g));
    assert!(summary.starts_with(&format!("{} kernels for {} nodes; ", g.kernels.len(), non_leaf(&g))), "{summary}");
}

#[test]
fn fuse_splits_the_groups_no_template_covers() {
    let mut g = mini_block();
    let env = mini_env(&g);
    let before = output_bits(&g, &env, Precision::F32);
    run_pass(&FusePolicy, &mut g);
    let policy = g.kernels.clone();
    let summary = run_pass(&Fuse, &mut g);
    assert!(summary.contains("groups split"), "{summary}");
    assert!(g.kernels.len() > policy.len(), "the mini block has GEMMs with epilogues no template takes yet");
    for k in &g.kernels {
        assert!(kernels::template::Template::covers(&g, k), "kernel `{}` has no template", k.name);
        assert!(
            policy.iter().any(|p| k.nodes.iter().all(|v| p.nodes.contains(v))),
            "kernel `{}` is a piece of one policy group",
            k.name
        );
    }
    assert_kernel_graph_acyclic(&g);
    assert_eq!(output_bits(&g, &env, Precision::F32), before);
}

#[test]
fn mini_block_after_fuse_and_schedule() {
    let mut g = mini_block();
    let env = mini_env(&g);
    let before64 = output_bits(&g, &env, Precision::F64);
    let before32 = output_bits(&g, &env, Precision::F32);
    let nodes = non_leaf(&g);

    let fuse_summary = run_pass(&FusePolicy, &mut g);
    insta::assert_snapshot!("mini_block_after_fuse", ir::text::print(&g));
    let kernels = g.kernels.len();
    let schedule_summary = run_pass(&Schedule, &mut g);
    insta::assert_snapshot!("mini_block_after_schedule", ir::text::print(&g));
    eprintln!("mini block: {nodes} non-leaf nodes → {kernels} kernels\n  fuse: {fuse_summary}\n  schedule: {schedule_summary}");
    assert_eq!(g.kernels.len(), kernels);
    assert_eq!(non_leaf(&g), nodes);

    // Leaves first, then each kernel contiguous, kernels in execution order.
    let leaves = g.nodes.iter().take_while(|n| n.op.is_leaf()).count();
    assert!(g.nodes[leaves..].iter().all(|n| !n.op.is_leaf()));
    let flat: Vec<ValueId> = g.kernels.iter().flat_map(|k| k.nodes.iter().copied()).collect();
    let expect: Vec<ValueId> = (leaves as u32..g.nodes.len() as u32).map(ValueId).collect();
    assert_eq!(flat, expect);
    assert_kernel_graph_acyclic(&g);

    assert_eq!(output_bits(&g, &env, Precision::F64), before64);
    assert_eq!(output_bits(&g, &env, Precision::F32), before32);
}

// ---- cost: fusion work grows linearly with depth -----------------------------------------------------------------

/// An n-layer version of the mini block (LoRA on every projection), through autodiff and AdamW.
fn llama_step(layers: usize) -> Graph {
    let mut b = Builder::new("llama_step");
    let ids = b.input("input_ids", Type::i32(vec![B, T])).unwrap();
    let pos = b.input("position_ids", Type::i32(vec![B, T])).unwrap();
    let seg = b.input("segment_ids", Type::i32(vec![B, T])).unwrap();
    let labels = b.input("labels", Type::i32(vec![N])).unwrap();
    b.set_label(Some("model.embed_tokens".into()));
    let embed = frozen(&mut b, "model.embed_tokens.weight", &[V, D]);
    let e = b.embedding(embed, ids).unwrap();
    let mut h = b.reshape(e, &[N, D]).unwrap();
    for i in 0..layers {
        let l = format!("model.layers.{i}");
        let n1 = rms_norm(&mut b, h, &format!("{l}.input_layernorm"));
        let q = linear(&mut b, n1, &format!("{l}.self_attn.q_proj"), H * HD, true);
        let k = linear(&mut b, n1, &format!("{l}.self_attn.k_proj"), KV * HD, true);
        let v = linear(&mut b, n1, &format!("{l}.self_attn.v_proj"), KV * HD, true);
        b.set_label(Some(format!("{l}.self_attn")));
        let q = b.reshape(q, &[B, T, H, HD]).unwrap();
        let q = b.rope(q, pos, 10000.0).unwrap();
        let k = b.reshape(k, &[B, T, KV, HD]).unwrap();
        let k = b.rope(k, pos, 10000.0).unwrap();
        let v = b.reshape(v, &[B, T, KV, HD]).unwrap();
        let o = b.attention(q, k, v, seg, 1.0 / (HD as f64).sqrt()).unwrap();
        let o = b.reshape(o, &[N, H * HD]).unwrap();
        let o = linear(&mut b, o, &format!("{l}.self_attn.o_proj"), D, true);
        b.set_label(Some(l.clone()));
        h = b.add(h, o).unwrap();
        let n2 = rms_norm(&mut b, h, &format!("{l}.post_attention_layernorm"));
        let gate = linear(&mut b, n2, &format!("{l}.mlp.gate_proj"), F, true);
        let up = linear(&mut b, n2, &format!("{l}.mlp.up_proj"), F, true);
        b.set_label(Some(format!("{l}.mlp")));
        let a = b.swiglu(gate, up).unwrap();
        let down = linear(&mut b, a, &format!("{l}.mlp.down_proj"), D, true);
        b.set_label(Some(l.clone()));
        h = b.add(h, down).unwrap();
    }
    let hn = rms_norm(&mut b, h, "model.norm");
    let logits = linear(&mut b, hn, "lm_head", V, false);
    b.set_label(Some("loss".into()));
    let loss = b.cross_entropy(logits, labels, -100).unwrap();
    b.output(OutputKind::Loss, loss);
    let mut g = b.finish();
    differentiate(&mut g, Wrt::Trainable).unwrap();
    AdamW::default().run(&mut g).unwrap();
    g
}

/// The work of `fuse` on `g`: readers looked at by the partition's cycle checks and reader-group queries, and by
/// the templates deciding each group's outputs (which once scanned the rest of the graph per group: quadratic).
fn fuse_work(g: &mut Graph) -> u64 {
    let (kernels, partition_work) = passes::fuse::partition_counted(g);
    g.kernels = kernels;
    let uses = passes::fuse::Uses::of(g);
    passes::fuse::split_uncovered_with(g, &uses);
    passes::fuse::check_partition(g).unwrap();
    partition_work + uses.visits.get()
}

#[test]
fn fusion_work_grows_linearly_with_depth() {
    use passes::recompute::{Recompute, RecomputePolicy};
    // Without and with per-block recomputation (whose clones read checkpoints far back in the graph).
    for policy in [RecomputePolicy::Off, RecomputePolicy::PerBlock] {
        let step = |layers: usize| {
            let mut g = llama_step(layers);
            run_pass(&Recompute { policy }, &mut g);
            g
        };
        let (mut g8, mut g16, mut g32) = (step(8), step(16), step(32));
        let (w8, w16, w32) = (fuse_work(&mut g8), fuse_work(&mut g16), fuse_work(&mut g32));
        assert!(w8 > 0);
        // Twice the layers, at most 2.2× the work (a quadratic pass would take 4×).
        assert!(w16 as f64 <= 2.2 * w8 as f64, "{policy:?}: 8 layers: {w8}, 16 layers: {w16}");
        assert!(w32 as f64 <= 2.2 * w16 as f64, "{policy:?}: 16 layers: {w16}, 32 layers: {w32}");
        // And per edge of the graph, a small constant.
        let edges: usize = g32.nodes.iter().map(|n| n.inputs.len()).sum();
        assert!(w32 <= 8 * edges as u64, "{policy:?}: {w32} readers looked at for {edges} edges");
        // The same kernels as the pass itself forms.
        let mut again = step(8);
        run_pass(&Fuse, &mut again);
        assert_eq!(again.kernels, g8.kernels);
    }
}
