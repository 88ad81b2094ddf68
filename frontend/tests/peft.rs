//! PEFT transformations on the tiny Llama: target matching, the parameters each method adds, and — run in the
//! reference interpreter in f64 — that the adapters leave the base model's logits unchanged at initialisation and
//! that QLoRA computes LoRA over the dequantized weights.

use frontend::peft::targets::{linear_modules, module_matches, select, TargetError, TargetSpec};
use frontend::peft::{apply_lora, apply_nf4, module_seed, LoraSpec, Nf4Spec};
use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::{DType, Graph, Init, Op, OutputKind, Role};

const B: usize = 2;
const T: usize = 8;
const VOCAB: usize = 128;

/// The tiny Llama of the golden tests, without adapters.
fn base(tied: bool) -> Graph {
    let src = format!(
        r#"use tunec::prelude::*;
        pub fn recipe() -> Recipe {{
            Recipe::new(llama(LlamaConfig {{ vocab: 128, hidden: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 128,
                                            rope_theta: 10000.0, norm_eps: 1e-5, tie_embeddings: {tied} }}))
                .train(Train {{ seq_len: 8, micro_batch: 2, ..Train::default() }})
        }}"#
    );
    frontend::compile_source("base.rs", &src, models::library()).unwrap_or_else(|d| panic!("{}", d.render())).forward
}

fn lora(rank: usize, alpha: f64, dropout: f64) -> LoraSpec {
    LoraSpec { rank, alpha, dropout, rslora: false, dora: false }
}

fn all_linear(g: &Graph) -> Vec<frontend::peft::LinearModule> {
    select(&linear_modules(g), &TargetSpec::AllLinear).expect("ALL_LINEAR matches")
}

// ---- target matching ---------------------------------------------------------------------------------------------

#[test]
fn names_match_the_full_name_or_a_dotted_suffix() {
    let m = "model.layers.0.self_attn.q_proj";
    assert!(module_matches(m, "q_proj"));
    assert!(module_matches(m, "self_attn.q_proj"));
    assert!(module_matches(m, m));
    assert!(!module_matches(m, "proj"));
    assert!(!module_matches(m, "_proj"));
    assert!(!module_matches(m, "attn.q_proj"));
    assert!(!module_matches(m, "model.layers.0.self_attn.q_proj.x"));
}

#[test]
fn all_linear_leaves_out_the_output_layer() {
    let untied = linear_modules(&base(false));
    assert_eq!(untied.len(), 2 * 7 + 1);
    assert!(untied.iter().any(|m| m.name == "lm_head" && m.is_output));
    let chosen = select(&untied, &TargetSpec::AllLinear).expect("matches");
    assert_eq!(chosen.len(), 14);
    assert!(chosen.iter().all(|m| m.name != "lm_head"));
    // Tied: the logits read the embedding table, which is not a linear module at all.
    let tied = linear_modules(&base(true));
    assert_eq!(tied.len(), 14);
    assert!(tied.iter().all(|m| !m.is_output && m.name.starts_with("model.layers.")));
    // An explicit name may still pick the untied head, as in PEFT.
    let head = select(&untied, &TargetSpec::Names(vec!["lm_head".into()])).expect("lm_head exists");
    assert_eq!(head.len(), 1);
}

#[test]
fn names_regex_and_misses() {
    let modules = linear_modules(&base(false));
    let qv = select(&modules, &TargetSpec::Names(vec!["q_proj".into(), "v_proj".into()])).expect("matches");
    let names: Vec<&str> = qv.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    let re = select(&modules, &TargetSpec::Regex(r".*\.(q|v)_proj".into())).expect("matches");
    assert_eq!(re, qv);
    let layer1 = select(&modules, &TargetSpec::Regex(r"model\.layers\.1\..*".into())).expect("matches");
    assert_eq!(layer1.len(), 7);
    // A regex must match the whole name (re.fullmatch).
    assert!(matches!(select(&modules, &TargetSpec::Regex("q_proj".into())), Err(TargetError::NoMatch { .. })));
    let miss = select(&modules, &TargetSpec::Names(vec!["q_proj".into(), "qkv_proj".into()]));
    assert_eq!(miss, Err(TargetError::NoMatch { index: 1, target: "\"qkv_proj\"".into() }));
}

// ---- what each method adds ---------------------------------------------------------------------------------------

fn param<'g>(g: &'g Graph, name: &str) -> (&'g ir::Type, Role, Init) {
    let v = g.param(name).unwrap_or_else(|| panic!("no parameter {name}"));
    match &g.node(v).op {
        Op::Param { role, init, .. } => (g.ty(v), *role, init.clone()),
        _ => unreachable!("param() returns params"),
    }
}

#[test]
fn lora_adds_a_and_b_per_module() {
    let g0 = base(false);
    let g = apply_lora(&g0, &all_linear(&g0), &lora(4, 8.0, 0.0)).expect("applies");
    assert!(ir::verify::verify(&g).is_ok());
    let (a, role, init) = param(&g, "model.layers.1.mlp.down_proj.lora_A.weight");
    assert_eq!((a.dtype, a.shape.as_slice(), role), (DType::F32, &[4, 128][..], Role::Trainable));
    assert_eq!(init, Init::KaimingUniform { a: 5f64.sqrt() });
    let (b, role, init) = param(&g, "model.layers.1.mlp.down_proj.lora_B.weight");
    assert_eq!((b.shape.as_slice(), role, init), (&[64, 4][..], Role::Trainable, Init::Zeros));
    let (kb, ..) = param(&g, "model.layers.0.self_attn.k_proj.lora_B.weight");
    assert_eq!(kb.shape, [32, 4]);
    let trainable = g.params().iter().filter(|(_, _, r)| *r == Role::Trainable).count();
    assert_eq!(trainable, 2 * 14);
    assert!(g.param("lm_head.lora_A.weight").is_none());
    // Scaling alpha / r; no dropout, no step input; B·A is never formed.
    assert!(g.nodes.iter().any(|n| n.op == Op::Scale { c: 2.0 }));
    assert!(g.input("step").is_none());
    assert!(!g.nodes.iter().any(|n| matches!(n.op, Op::MatMul { tb: false, .. })));
    // The base weights are unchanged.
    let (w, role, init) = param(&g, "model.layers.0.self_attn.q_proj.weight");
    assert_eq!((w.dtype, role, init), (DType::F32, Role::Frozen, Init::Load));
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_r() {
    let spec = LoraSpec { rank: 8, alpha: 16.0, dropout: 0.0, rslora: true, dora: false };
    assert_eq!(spec.scaling(), 16.0 / 8f64.sqrt());
    assert_eq!(LoraSpec { rslora: false, ..spec }.scaling(), 2.0);
    let g0 = base(false);
    let g = apply_lora(&g0, &all_linear(&g0), &spec).expect("applies");
    assert!(g.nodes.iter().any(|n| n.op == Op::Scale { c: 16.0 / 8f64.sqrt() }));
}

#[test]
fn dropout_adds_the_step_input_and_a_seed_per_module() {
    let g0 = base(false);
    let g = apply_lora(&g0, &all_linear(&g0), &lora(4, 8.0, 0.1)).expect("applies");
    let step = g.input("step").expect("a step input");
    assert_eq!(g.ty(step), &ir::Type::i32(Vec::<usize>::new()));
    let seeds: Vec<u64> = g
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::Dropout { p, seed } => Some((p, seed)),
            _ => None,
        })
        .map(|(p, seed)| {
            assert_eq!(p, 0.1);
            seed
        })
        .collect();
    assert_eq!(seeds.len(), 14);
    assert!(seeds.contains(&module_seed("model.layers.0.self_attn.q_proj")));
    let mut unique = seeds.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seeds.len());
    assert!(ir::verify::verify(&g).is_ok());
}

#[test]
fn dora_adds_a_magnitude_initialised_to_row_norms() {
    let g0 = base(false);
    let spec = LoraSpec { dora: true, ..lora(4, 8.0, 0.0) };
    let g = apply_lora(&g0, &all_linear(&g0), &spec).expect("applies");
    assert!(ir::verify::verify(&g).is_ok());
    let (m, role, init) = param(&g, "model.layers.0.mlp.up_proj.lora_magnitude_vector");
    assert_eq!((m.shape.as_slice(), role), (&[128][..], Role::Trainable));
    assert_eq!(init, Init::RowNorm { of: "model.layers.0.mlp.up_proj.weight".into() });
    // The weight norm is detached, and B·A is formed once per module.
    assert_eq!(g.nodes.iter().filter(|n| matches!(n.op, Op::StopGradient {})).count(), 14);
    assert_eq!(g.nodes.iter().filter(|n| n.op == Op::MatMul { ta: false, tb: false }).count(), 14);
}

#[test]
fn nf4_stores_targeted_weights_quantized() {
    let g0 = base(false);
    let spec = Nf4Spec { block: 64, double_quant: true };
    let g = apply_nf4(&g0, &all_linear(&g0), &spec).expect("applies");
    assert!(ir::verify::verify(&g).is_ok());
    let (w, role, init) = param(&g, "model.layers.0.self_attn.o_proj.weight");
    let nf4 = DType::Nf4(ir::Nf4Format { block: 64, double_quant: Some(256) });
    assert_eq!((w.dtype, w.shape.as_slice(), role, init), (nf4, &[64, 64][..], Role::Frozen, Init::Load));
    assert_eq!(param(&g, "lm_head.weight").0.dtype, DType::F32);
    assert_eq!(param(&g, "model.embed_tokens.weight").0.dtype, DType::F32);
    assert_eq!(g.nodes.iter().filter(|n| matches!(n.op, Op::Nf4Dequantize {})).count(), 14);
    // Modules are still found through the dequantize node.
    assert!(linear_modules(&g).iter().filter(|m| m.quantized).count() == 14);
    assert!(apply_nf4(&g, &all_linear(&g), &spec).is_err());
    assert!(apply_nf4(&g0, &all_linear(&g0), &Nf4Spec { block: 63, double_quant: false }).is_err());
}

#[test]
fn quantize_and_adapter_commute() {
    let g0 = base(false);
    let (q, l) = (Nf4Spec { block: 64, double_quant: true }, lora(4, 16.0, 0.0));
    let q_then_l = {
        let g = apply_nf4(&g0, &all_linear(&g0), &q).expect("nf4");
        apply_lora(&g, &all_linear(&g), &l).expect("lora")
    };
    let l_then_q = {
        let g = apply_lora(&g0, &all_linear(&g0), &l).expect("lora");
        apply_nf4(&g, &all_linear(&g), &q).expect("nf4")
    };
    assert_eq!(ir::text::print(&q_then_l), ir::text::print(&l_then_q));
}

// ---- numerics in the reference interpreter -------------------------------------------------------------------------

/// A deterministic value in [-1, 1).
fn noise(seed: u64, i: usize) -> f64 {
    f64::from(ir::rng::uniform(seed, 0, i as u64)) * 2.0 - 1.0
}

fn row_norms(w: &Tensor) -> Tensor {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let norms = (0..rows)
        .map(|r| {
            let mut s = 0.0;
            for j in 0..cols {
                let x = w.data[r * cols + j];
                s += x * x;
            }
            s.sqrt()
        })
        .collect();
    Tensor::new(vec![rows], norms)
}

/// Parameters and inputs for `g`: base weights from `base_seed`; adapter A random, B zeros unless `b_seed`;
/// DoRA magnitudes the row norms of their (dequantized) weight. NF4 parameters are quantized from the same values.
fn env(g: &Graph, base_seed: u64, b_seed: Option<u64>) -> Env {
    let mut env = Env::default();
    let mut weights = std::collections::HashMap::new();
    for (v, name, _) in g.params() {
        let ty = g.ty(v);
        let n = ty.numel();
        let seed = module_seed(name) ^ base_seed;
        let data: Vec<f64> = if name.ends_with("lora_B.weight") {
            match b_seed {
                Some(s) => (0..n).map(|i| 0.05 * noise(seed ^ s, i)).collect(),
                None => vec![0.0; n],
            }
        } else if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
            (0..n).map(|i| 1.0 + 0.1 * noise(seed, i)).collect()
        } else {
            (0..n).map(|i| 0.1 * noise(seed, i)).collect()
        };
        let value = match ty.dtype {
            DType::Nf4(f) => {
                let w: Vec<f32> = data.iter().map(|&x| x as f32).collect();
                let q = ir::nf4::quantize(&w, &ty.shape, f.block as usize, f.double_quant.map(|b| b as usize));
                weights.insert(name.to_string(), Tensor::from_f32(ty.shape.clone(), &ir::nf4::dequantize(&q)));
                Value::Q(q)
            }
            _ => {
                let t = Tensor::new(ty.shape.clone(), data);
                weights.insert(name.to_string(), t.clone());
                Value::F(t)
            }
        };
        env.params.insert(name.to_string(), value);
    }
    for (v, name, _) in g.params() {
        if let Some(module) = name.strip_suffix(".lora_magnitude_vector") {
            let w = &weights[&format!("{module}.weight")];
            assert_eq!(g.ty(v).shape, [w.shape[0]]);
            env.params.insert(name.to_string(), Value::F(row_norms(w)));
        }
    }
    let ids: Vec<i32> = (0..B * T).map(|i| ((noise(7, i) + 1.0) * 0.5 * VOCAB as f64) as i32 % VOCAB as i32).collect();
    let pos: Vec<i32> = (0..B * T).map(|i| (i % T) as i32).collect();
    // Two packed sequences in the second row.
    let seg: Vec<i32> = (0..B * T).map(|i| i32::from(i >= T + T / 2)).collect();
    let labels: Vec<i32> = (0..B * T).map(|i| if i % 5 == 4 { -100 } else { ids[(i + 1) % (B * T)] }).collect();
    env.inputs.insert("input_ids".into(), Value::ints(vec![B, T], ids));
    env.inputs.insert("position_ids".into(), Value::ints(vec![B, T], pos));
    env.inputs.insert("segment_ids".into(), Value::ints(vec![B, T], seg));
    env.inputs.insert("labels".into(), Value::ints(vec![B * T], labels));
    env.inputs.insert("step".into(), Value::ints(vec![], vec![3]));
    env
}

/// Runs `g` in f64 and returns (logits, loss).
fn logits_and_loss(g: &Graph, env: &Env) -> (Tensor, f64) {
    let vals = run(g, env, Precision::F64).unwrap_or_else(|e| panic!("interpreter: {e}"));
    let get = |k: &OutputKind| vals[g.output(k).expect("output").index()].as_f().expect("float").clone();
    (get(&OutputKind::Logits), get(&OutputKind::Loss).data[0])
}

#[test]
fn lora_with_zero_b_gives_exactly_the_base_logits() {
    for tied in [false, true] {
        let g0 = base(tied);
        let (base_logits, base_loss) = logits_and_loss(&g0, &env(&g0, 1, None));
        for spec in [lora(4, 8.0, 0.0), lora(4, 8.0, 0.1), LoraSpec { rslora: true, ..lora(8, 16.0, 0.0) }] {
            let g = apply_lora(&g0, &all_linear(&g0), &spec).expect("applies");
            let (logits, loss) = logits_and_loss(&g, &env(&g, 1, None));
            assert_eq!(logits, base_logits, "tied={tied} {spec:?}");
            assert_eq!(loss, base_loss);
            // With B ≠ 0 the adapter changes the output: it is wired in.
            let (moved, _) = logits_and_loss(&g, &env(&g, 1, Some(9)));
            assert_ne!(moved, base_logits);
        }
    }
}

#[test]
fn dora_at_init_gives_exactly_the_base_logits() {
    let g0 = base(false);
    let (base_logits, _) = logits_and_loss(&g0, &env(&g0, 2, None));
    for dropout in [0.0, 0.1] {
        let g = apply_lora(&g0, &all_linear(&g0), &LoraSpec { dora: true, ..lora(4, 8.0, dropout) }).expect("applies");
        let (logits, _) = logits_and_loss(&g, &env(&g, 2, None));
        assert_eq!(logits, base_logits, "dropout {dropout}");
        let (moved, _) = logits_and_loss(&g, &env(&g, 2, Some(5)));
        assert_ne!(moved, base_logits);
    }
}

/// One linear module `lin` (x: [n, i] → [n, o]) with DoRA, against the formulas written out by hand.
#[test]
fn dora_matches_the_formula_of_peft() {
    let (n, i, o, r) = (5, 6, 3, 2);
    let mut b = ir::Builder::new("one");
    let x = b.input("x", ir::Type::f32([n, i])).expect("input");
    let w = b.param("lin.weight", ir::Type::f32([o, i]), Role::Frozen, Init::Load).expect("param");
    let y = b.matmul(x, w, false, true).expect("matmul");
    b.output(OutputKind::Logits, y);
    let g0 = b.finish();
    let modules = select(&linear_modules(&g0), &TargetSpec::Names(vec!["lin".into()])).expect("lin");
    let data = |seed: u64, len: usize| -> Vec<f64> { (0..len).map(|k| noise(seed, k)).collect() };
    let (xs, ws, a_, b_, m_) = (data(1, n * i), data(2, o * i), data(3, r * i), data(4, o * r), data(5, o));
    for p in [0.0, 0.4] {
        let spec = LoraSpec { dora: true, ..lora(r, 3.0, p) };
        let s = spec.scaling();
        let g = apply_lora(&g0, &modules, &spec).expect("applies");
        let mut env = Env::default();
        let t = |shape: Vec<usize>, d: &Vec<f64>| Value::F(Tensor::new(shape, d.clone()));
        env.inputs.insert("x".into(), t(vec![n, i], &xs));
        env.inputs.insert("step".into(), Value::ints(vec![], vec![7]));
        env.params.insert("lin.weight".into(), t(vec![o, i], &ws));
        env.params.insert("lin.lora_A.weight".into(), t(vec![r, i], &a_));
        env.params.insert("lin.lora_B.weight".into(), t(vec![o, r], &b_));
        env.params.insert("lin.lora_magnitude_vector".into(), t(vec![o], &m_));
        let vals = run(&g, &env, Precision::F64).expect("runs");
        let got = vals[g.output(&OutputKind::Logits).expect("logits").index()].as_f().expect("float").clone();
        // By hand: ms = m / ‖W + s·B·A‖ (per row), xd = dropout(x).
        let ms: Vec<f64> = (0..o)
            .map(|oo| {
                let norm2: f64 = (0..i)
                    .map(|j| {
                        let ba: f64 = (0..r).map(|k| b_[oo * r + k] * a_[k * i + j]).sum();
                        (ws[oo * i + j] + s * ba).powi(2)
                    })
                    .sum();
                m_[oo] / norm2.sqrt()
            })
            .collect();
        let seed = module_seed("lin");
        let xd: Vec<f64> = (0..n * i)
            .map(|k| if p == 0.0 || ir::rng::dropout_keep(seed, 7, k as u64, p) { xs[k] / (1.0 - p) } else { 0.0 })
            .collect();
        for row in 0..n {
            for oo in 0..o {
                let lin = |v: &[f64]| -> f64 { (0..i).map(|j| v[row * i + j] * ws[oo * i + j]).sum() };
                let lora_of = |v: &[f64]| -> f64 {
                    (0..r).map(|k| (0..i).map(|j| v[row * i + j] * a_[k * i + j]).sum::<f64>() * b_[oo * r + k]).sum()
                };
                let want = if p == 0.0 {
                    ms[oo] * (lin(&xs) + s * lora_of(&xs))
                } else {
                    lin(&xs) + (ms[oo] - 1.0) * lin(&xd) + ms[oo] * s * lora_of(&xd)
                };
                let have = got.data[row * o + oo];
                assert!((have - want).abs() <= 1e-12 * (1.0 + want.abs()), "p={p} [{row},{oo}]: {have} vs {want}");
            }
        }
    }
}

#[test]
fn qlora_equals_lora_over_the_dequantized_weights() {
    let g0 = base(false);
    let l = lora(4, 16.0, 0.0);
    let plain = apply_lora(&g0, &all_linear(&g0), &l).expect("lora");
    let quant = {
        let g = apply_nf4(&g0, &all_linear(&g0), &Nf4Spec { block: 64, double_quant: true }).expect("nf4");
        apply_lora(&g, &all_linear(&g), &l).expect("lora")
    };
    let qenv = env(&quant, 4, Some(6));
    // The plain LoRA graph gets the dequantized values of the quantized weights, everything else the same.
    let mut penv = env(&plain, 4, Some(6));
    for (name, v) in &qenv.params {
        if let Value::Q(q) = v {
            penv.params.insert(name.clone(), Value::F(Tensor::from_f32(q.shape.clone(), &ir::nf4::dequantize(q))));
        }
    }
    let (ql, qloss) = logits_and_loss(&quant, &qenv);
    let (pl, ploss) = logits_and_loss(&plain, &penv);
    assert_eq!(ql, pl);
    assert_eq!(qloss, ploss);
    // And the quantization did change the weights (the test is not comparing a graph with itself).
    let (unquantized, _) = logits_and_loss(&plain, &env(&plain, 4, Some(6)));
    assert_ne!(unquantized, pl);
}
