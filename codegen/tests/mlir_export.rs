//! MLIR export: the tiny LoRA and QLoRA training steps and hand-built graphs covering every op are exported, parsed
//! back by MLIR (melior) and verified; the module's interface and its external calls are checked against the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use codegen::mlir::context_with_all_dialects;
use codegen::mlir_export::{export_mlir, external_symbol, lowering, symbol_name, Lowering};
use ir::{AttnArg, Builder, DType, Graph, Init, Nf4Format, Op, OpKind, OutputKind, Role, Type};
use melior::ir::block::BlockLike;
use melior::ir::operation::{OperationLike, WalkOrder, WalkResult};
use melior::ir::{Module, RegionLike};

/// The optimized training step of an example recipe, as `tunec compile` builds it.
fn training_step(recipe: &str) -> Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(recipe);
    let compiled = frontend::compile_file(&path, models::library()).unwrap_or_else(|d| panic!("{}", d.render()));
    let mut g = compiled.forward;
    passes::PassManager::new(passes::training_pipeline(&Default::default())).run(&mut g).expect("pipeline");
    g
}

/// What the parsed module says about itself.
#[derive(Debug, Default)]
struct ModuleFacts {
    /// Argument and result counts of the one function with a body.
    args: usize,
    results: usize,
    /// `func.call` sites per callee (`@tunec.rms_norm`).
    calls: BTreeMap<String, usize>,
    /// Private declarations (`tunec.rms_norm`).
    declarations: BTreeSet<String>,
    /// Number of ops per name, over the whole module.
    ops: BTreeMap<String, usize>,
}

/// Parses `text` with MLIR, verifies it, and collects [`ModuleFacts`].
fn parse_back(text: &str, function: &str) -> ModuleFacts {
    let context = context_with_all_dialects();
    let module = Module::parse(&context, text).expect("exported MLIR parses");
    assert!(module.as_operation().verify(), "exported MLIR verifies after parsing back");
    let mut facts = ModuleFacts::default();
    let mut functions = 0;
    let mut op = module.body().first_operation();
    while let Some(o) = op {
        assert_eq!(o.name().as_string_ref().as_str().unwrap(), "func.func");
        let sym = o.attribute("sym_name").unwrap().to_string().trim_matches('"').to_string();
        let body = o.region(0).unwrap().first_block();
        match body {
            Some(block) => {
                assert_eq!(sym, function);
                functions += 1;
                facts.args = block.argument_count();
                let ty = o.attribute("function_type").unwrap().to_string();
                let results = ty.split_once("->").unwrap().1.trim();
                facts.results = if results.starts_with('(') {
                    results.trim_matches(|c| c == '(' || c == ')').split("tensor<").count() - 1
                } else {
                    1
                };
            }
            None => {
                facts.declarations.insert(sym);
            }
        }
        op = o.next_in_block();
    }
    assert_eq!(functions, 1, "exactly one function with a body");
    module.as_operation().walk(WalkOrder::PreOrder, |o| {
        let name = o.name().as_string_ref().as_str().unwrap().to_string();
        if name == "func.call" {
            let callee = o.attribute("callee").unwrap().to_string();
            *facts.calls.entry(callee).or_default() += 1;
        }
        *facts.ops.entry(name).or_default() += 1;
        WalkResult::Advance
    });
    facts
}

/// `tunec.lora_linear.1` → `tunec.lora_linear`.
fn kind_symbol(symbol: &str) -> String {
    match symbol.rsplit_once('.') {
        Some((head, n)) if n.chars().all(|c| c.is_ascii_digit()) => head.to_string(),
        _ => symbol.to_string(),
    }
}

/// Exports `g`, parses it back, and checks the interface and the external calls against the graph.
fn export_and_check(g: &Graph) -> (String, ModuleFacts) {
    let text = export_mlir(g).unwrap_or_else(|e| panic!("export {}: {e}", g.name));
    codegen::mlir::parse_and_verify(&text).expect("exported MLIR parses and verifies");
    let facts = parse_back(&text, &symbol_name(&g.name));

    assert_eq!(facts.args, g.params().len() + g.inputs().len(), "one argument per param and input");
    assert_eq!(facts.results, g.outputs.len(), "one result per output");

    // One call per node of an external kind, to a declaration of that kind; one declaration per external kind and
    // element types (`@tunec.lora_linear` for an f32 weight, `@tunec.lora_linear.1` for an NF4 one).
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    let mut signatures: BTreeSet<(OpKind, Vec<String>)> = BTreeSet::new();
    let storage = |t: &Type| if matches!(t.dtype, DType::Nf4(_)) { "i8".to_string() } else { t.dtype.to_string() };
    for n in &g.nodes {
        if lowering(n.op.kind()) == Lowering::External {
            *expected.entry(external_symbol(n.op.kind())).or_default() += 1;
            let mut elems: Vec<String> = n.inputs.iter().map(|&v| storage(g.ty(v))).collect();
            elems.push(storage(&n.ty));
            signatures.insert((n.op.kind(), elems));
        }
    }
    let mut calls_per_kind: BTreeMap<String, usize> = BTreeMap::new();
    for (callee, count) in &facts.calls {
        *calls_per_kind.entry(kind_symbol(callee.trim_start_matches('@'))).or_default() += count;
    }
    assert_eq!(calls_per_kind, expected, "calls per external op kind");
    assert_eq!(facts.declarations.len(), signatures.len(), "one declaration per kind and element types");
    let declared: BTreeSet<String> = facts.declarations.iter().map(|d| kind_symbol(d)).collect();
    assert_eq!(declared, expected.keys().cloned().collect::<BTreeSet<_>>(), "declarations per external op kind");

    // Every param and input carries its name; every output is listed.
    for (_, name, _) in g.params() {
        assert!(text.contains(&format!("tunec.name = \"{name}\"")), "param {name} has no tunec.name");
    }
    for (_, name) in g.inputs() {
        assert!(text.contains(&format!("tunec.name = \"{name}\"")), "input {name} has no tunec.name");
    }
    let listed = text.split("tunec.outputs = [").nth(1).expect("tunec.outputs attribute");
    assert_eq!(listed.matches("kind = ").count(), g.outputs.len(), "tunec.outputs lists every output");
    (text, facts)
}

#[test]
fn tiny_qlora_step_exports_parses_back_and_verifies() {
    let g = training_step("tiny.qlora.rs");
    let (text, facts) = export_and_check(&g);
    // NF4 weights travel as their storage bytes, with their format beside them.
    let nf4 = g.params().into_iter().filter(|&(v, _, _)| matches!(g.ty(v).dtype, DType::Nf4(_))).count();
    assert!(nf4 > 0, "the QLoRA step has NF4 weights");
    assert_eq!(text.matches("tunec.nf4 = {").count(), nf4);
    assert!(facts.calls.keys().any(|k| k.contains("nf4") || k.contains("lora_linear") || k.contains("qmatmul")));
    assert!(facts.ops.contains_key("linalg.generic"));
    assert!(text.contains("func.func @tiny_qlora("), "function named after the graph");
}

#[test]
fn tiny_lora_step_exports_parses_back_and_verifies() {
    let g = training_step("tiny.lora.rs");
    let (text, _) = export_and_check(&g);
    assert!(!text.contains("tunec.nf4 = {"), "no NF4 in the LoRA step");
    assert!(text.contains("{kind = \"loss\"}"));
}

const NF4: DType = DType::Nf4(Nf4Format { block: 64, double_quant: Some(256) });

/// A small graph with every op that maps to upstream dialects.
fn standard_ops_graph() -> Graph {
    let mut b = Builder::new("standard ops");
    let ids = b.input("input_ids", Type::i32([2])).unwrap();
    let lr = b.input("lr", Type::f32([])).unwrap();
    let step = b.input("step", Type::i32([])).unwrap();
    let table = b.param("embed.weight", Type::f32([5, 3]), Role::Frozen, Init::Load).unwrap();
    let w = b.param("w", Type::f32([4, 3]), Role::Trainable, Init::KaimingUniform { a: 5f64.sqrt() }).unwrap();
    let m = b.param("w.exp_avg", Type::f32([4, 3]), Role::State, Init::Zeros).unwrap();
    let v = b.param("w.exp_avg_sq", Type::f32([4, 3]), Role::State, Init::Zeros).unwrap();
    let bias = b.param("bias", Type::f32([3]), Role::Frozen, Init::Ones).unwrap();
    let x = b.embedding(table, ids).unwrap(); // [2,3]
    let c = b.constant(0.5, Type::f32([1, 3])).unwrap();
    let x1 = b.add(x, c).unwrap(); // stretches the unit dim
    let x2 = b.sub(x1, bias).unwrap(); // adds a leading dim
    let x3 = b.mul(x2, x).unwrap();
    let x4 = b.div(x3, x1).unwrap();
    let x5 = b.op(Op::Minimum {}, &[x4, x]).unwrap();
    let x6 = b.op(Op::Maximum {}, &[x5, x2]).unwrap();
    let mut y = x6;
    for op in [Op::Neg {}, Op::Exp {}, Op::Log {}, Op::Sqrt {}, Op::Rsqrt {}, Op::Sigmoid {}, Op::Silu {}] {
        y = b.op(op, &[y]).unwrap();
    }
    let sb = b.op(Op::SiluBwd {}, &[y, x6]).unwrap();
    let sw = b.swiglu(sb, x6).unwrap();
    let sc = b.scale(sw, 0.25).unwrap();
    let sg = b.stop_gradient(sc).unwrap();
    let h = b.matmul(sg, w, false, true).unwrap(); // [2,4]
    let h2 = b.matmul(h, w, false, false).unwrap(); // [2,3]
    let grad = b.matmul(h, h2, true, false).unwrap(); // [4,3]
    let h3 = b.reshape(h, &[2, 2, 2]).unwrap();
    let bm = b.matmul(h3, h3, false, true).unwrap(); // batched
    let t = b.transpose(bm, &[0, 2, 1]).unwrap();
    let r = b.reshape(t, &[4, 2]).unwrap(); // collapse
    let r2 = b.reshape(r, &[2, 4]).unwrap(); // through 1-D
    let cat = b.concat(&[h, r2], 0).unwrap(); // [4,4]
    let sl = b.slice(cat, 1, 1, 3).unwrap(); // [4,2]
    let bc = b.broadcast_to(c, &[4, 2, 3]).unwrap();
    let st = b.sum_to(bc, &[1, 3]).unwrap();
    let s_keep = b.sum(x6, &[1], true).unwrap(); // [2,1]
    let loss = b.sum(x6, &[0, 1], false).unwrap(); // []
    let half = b.cast(x6, DType::BF16).unwrap();
    let back = b.cast(half, DType::F32).unwrap();
    let sm = b.softmax(back).unwrap();
    let smb = b.op(Op::SoftmaxBwd {}, &[x6, sm]).unwrap();
    let m1 = b.op(Op::AdamWMoment { beta: 0.9, square: false }, &[m, grad]).unwrap();
    let v1 = b.op(Op::AdamWMoment { beta: 0.999, square: true }, &[v, grad]).unwrap();
    let upd = Op::AdamWUpdate { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let w1 = b.op(upd, &[w, m1, v1, lr, step]).unwrap();
    b.output(OutputKind::Loss, loss);
    b.output(OutputKind::Update("w".into()), w1);
    b.output(OutputKind::Update("w.exp_avg".into()), m1);
    b.output(OutputKind::Update("w.exp_avg_sq".into()), v1);
    for (name, value) in [("slice", sl), ("sum_to", st), ("sum_keepdim", s_keep), ("softmax_bwd", smb), ("bmm", bm)] {
        b.output(OutputKind::Metric(name.into()), value);
    }
    b.finish()
}

/// A small graph with every op exported as an external call (some twice, with other shapes or ranks).
fn external_ops_graph() -> Graph {
    let mut b = Builder::new("external ops");
    let ids = b.input("input_ids", Type::i32([4])).unwrap();
    let labels = b.input("labels", Type::i32([4])).unwrap();
    let pos = b.input("position_ids", Type::i32([1, 4])).unwrap();
    let seg = b.input("segment_ids", Type::i32([1, 4])).unwrap();
    let step = b.input("step", Type::i32([])).unwrap();
    let x = b.param("x", Type::f32([4, 64]), Role::Trainable, Init::Zeros).unwrap();
    let wq = b.param("q.weight", Type::new(NF4, [8, 64]), Role::Frozen, Init::Load).unwrap();
    let wk = b.param("k.weight", Type::new(NF4, [4, 64]), Role::Frozen, Init::Load).unwrap();
    let w = b.param("w", Type::f32([8, 64]), Role::Frozen, Init::Load).unwrap();
    let norm = b.param("norm.weight", Type::f32([64]), Role::Frozen, Init::Ones).unwrap();
    let lora_a = b.param("lora_A", Type::f32([2, 64]), Role::Trainable, Init::Zeros).unwrap();
    let lora_b = b.param("lora_B", Type::f32([8, 2]), Role::Trainable, Init::Zeros).unwrap();
    let dq = b.nf4_dequantize(wq).unwrap(); // [8,64]
    let dk = b.nf4_dequantize(wk).unwrap(); // [4,64]: another shape, same declaration
    let requant = b.op(Op::Nf4Quantize { block: 64, double_quant: 256 }, &[w]).unwrap();
    let qm = b.op(Op::QMatMul { tb: true }, &[x, wq]).unwrap(); // [4,8]
    let u = b.matmul(x, lora_a, false, true).unwrap(); // [4,2]
    let ll = b.op(Op::LoraLinear { s: 8.0, tb: true }, &[x, dq, u, lora_b]).unwrap(); // [4,8]
    let ll_q = b.op(Op::LoraLinear { s: 8.0, tb: true }, &[x, wq, u, lora_b]).unwrap(); // NF4 weight
    let n = b.rms_norm(x, norm, 1e-5).unwrap();
    let n3 = b.reshape(n, &[1, 4, 64]).unwrap();
    let n3 = b.rms_norm(n3, norm, 1e-5).unwrap(); // rank 3: the declaration is unranked there
    let nx = b.op(Op::RmsNormBwdX { eps: 1e-5 }, &[n, x, norm]).unwrap();
    let nw = b.op(Op::RmsNormBwdW { eps: 1e-5 }, &[n, x]).unwrap();
    let q = b.reshape(qm, &[1, 4, 2, 4]).unwrap();
    let k = b.matmul(x, dk, false, true).unwrap(); // [4,4]
    let k = b.reshape(k, &[1, 4, 1, 4]).unwrap();
    let q = b.rope(q, pos, 10000.0).unwrap();
    let k = b.rope(k, pos, 10000.0).unwrap();
    let att = b.attention(q, k, k, seg, 0.5).unwrap();
    let dq_att = b.attention_bwd([att, q, k, k, seg], true, 0.5, AttnArg::Q).unwrap();
    let dk_att = b.attention_bwd([att, q, k, k, seg], true, 0.5, AttnArg::K).unwrap();
    let ce = b.cross_entropy(ll, labels, -100).unwrap();
    let one = b.constant(1.0, Type::f32([])).unwrap();
    let dlogits = b.op(Op::CrossEntropyBwd { ignore_index: -100 }, &[one, ll_q, labels]).unwrap();
    let lce = b.op(Op::LinearCrossEntropy { ignore_index: -100, chunk: 4 }, &[x, w, labels]).unwrap();
    let lce_q = b.op(Op::LinearCrossEntropy { ignore_index: -100, chunk: 4 }, &[x, wq, labels]).unwrap();
    let dh = b.op(Op::LinearCrossEntropyBwd { ignore_index: -100, chunk: 4 }, &[one, x, w, labels]).unwrap();
    let demb = b.op(Op::EmbeddingBwd { vocab: 10 }, &[dh, ids]).unwrap();
    let drop = b.dropout(x, step, 0.1, u64::MAX).unwrap();
    b.output(OutputKind::Loss, ce);
    let metrics = [
        ("requant", requant),
        ("n3", n3),
        ("nx", nx),
        ("nw", nw),
        ("dq", dq_att),
        ("dk", dk_att),
        ("dlogits", dlogits),
        ("lce", lce),
        ("lce_q", lce_q),
        ("demb", demb),
        ("drop", drop),
    ];
    for (name, value) in metrics {
        b.output(OutputKind::Metric(name.into()), value);
    }
    b.finish()
}

fn kinds(g: &Graph) -> BTreeSet<OpKind> {
    g.nodes.iter().map(|n| n.op.kind()).collect()
}

#[test]
fn every_standard_op_maps_to_upstream_dialects() {
    let g = standard_ops_graph();
    ir::verify::verify(&g).expect("the hand-built graph verifies");
    let missing: Vec<OpKind> = OpKind::ALL
        .iter()
        .copied()
        .filter(|&k| matches!(lowering(k), Lowering::Standard(_) | Lowering::Argument) && !kinds(&g).contains(&k))
        .collect();
    assert!(missing.is_empty(), "the standard-ops graph lacks {missing:?}");
    let (text, facts) = export_and_check(&g);
    assert!(facts.calls.is_empty() && facts.declarations.is_empty(), "no external calls: {:?}", facts.calls);
    for op in [
        "linalg.matmul",
        "linalg.batch_matmul",
        "linalg.transpose",
        "linalg.broadcast",
        "linalg.reduce",
        "linalg.softmax",
        "tensor.concat",
        "tensor.extract_slice",
        "tensor.collapse_shape",
        "tensor.expand_shape",
        "tensor.extract",
        "math.powf",
        "math.rsqrt",
        "arith.truncf",
        "arith.extf",
    ] {
        assert!(facts.ops.contains_key(op), "{op} missing from\n{text}");
    }
    insta::assert_snapshot!("standard_ops", text);
}

#[test]
fn every_external_op_is_one_call_to_its_declaration() {
    let g = external_ops_graph();
    ir::verify::verify(&g).expect("the hand-built graph verifies");
    let missing: Vec<OpKind> =
        OpKind::ALL.iter().copied().filter(|&k| lowering(k) == Lowering::External && !kinds(&g).contains(&k)).collect();
    assert!(missing.is_empty(), "the external-ops graph lacks {missing:?}");
    let (text, _) = export_and_check(&g);
    // Shapes the call sites disagree on become `?`; ranks that differ make the operand unranked.
    assert!(text.contains("func.func private @tunec.nf4_dequantize(tensor<?xi8>) -> tensor<?x64xf32>"), "{text}");
    assert!(
        text.contains("func.func private @tunec.rms_norm(tensor<*xf32>, tensor<64xf32>) -> tensor<*xf32>"),
        "{text}"
    );
    assert!(text.contains("tunec.attrs = {eps = 1.000000e-05 : f64}"), "{text}");
    assert!(text.contains("seed = 18446744073709551615 : ui64"), "{text}");
    insta::assert_snapshot!("external_ops", text);
}

#[test]
fn every_op_kind_is_covered_by_the_hand_built_graphs() {
    let all: BTreeSet<OpKind> = kinds(&standard_ops_graph()).union(&kinds(&external_ops_graph())).copied().collect();
    let missing: Vec<&OpKind> = OpKind::ALL.iter().filter(|k| !all.contains(k)).collect();
    assert!(missing.is_empty(), "no hand-built graph exports {missing:?}");
}
