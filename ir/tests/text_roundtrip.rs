//! The text format round-trips: parse(print(g)) == g for random well-typed graphs that use every op, with random
//! attribute values (any finite f64, odd strings) and labels.

use ir::{AttnArg, Builder, DType, Graph, Init, Nf4Format, Op, OpKind, OutputKind, Role, Type};
use proptest::prelude::*;
use std::collections::HashSet;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        ir::rng::mix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn dim(&mut self) -> usize {
        1 + self.below(5) as usize
    }
    fn f64(&mut self) -> f64 {
        loop {
            let x = f64::from_bits(self.next());
            if x.is_finite() {
                return x;
            }
        }
    }
    fn text(&mut self) -> String {
        let pieces = ["model.layers.0", "q_proj", "\"quoted\"", "back\\slash", "ünï", " sp ace", "new\nline", "#"];
        (0..1 + self.below(3)).map(|_| pieces[self.below(pieces.len() as u64) as usize]).collect()
    }
}

/// Builds a graph that uses every op of the table once per round, with random shapes and attributes.
fn random_graph(seed: u64, rounds: usize) -> Graph {
    let mut r = Rng(seed);
    let mut b = Builder::new(r.text());
    let mut used = HashSet::new();
    let f32t = |s: Vec<usize>| Type::f32(s);
    for round in 0..rounds {
        let (m, k, n) = (r.dim(), r.dim(), r.dim());
        let label = if r.below(2) == 0 { Some(r.text()) } else { None };
        b.set_label(label);
        let role = [Role::Frozen, Role::Trainable, Role::State][r.below(3) as usize];
        let inits = [
            Init::Load,
            Init::Zeros,
            Init::Ones,
            Init::KaimingUniform { a: r.f64() },
            Init::Normal { std: r.f64() },
            Init::RowNorm { of: r.text() },
        ];
        let init = inits[r.below(inits.len() as u64) as usize].clone();
        let x = b.param(&format!("{}.{round}.x", r.text()), f32t(vec![m, k]), role, init).unwrap();
        let w = b.param(&format!("p{round}.w"), f32t(vec![n, k]), Role::Frozen, Init::Load).unwrap();
        let ids = b.input(&format!("ids{round}"), Type::i32(vec![m])).unwrap();
        let c = b.constant(r.f64(), f32t(vec![k])).unwrap();
        let y = b.matmul(x, w, false, true).unwrap();
        let ops: Vec<(Op, Vec<_>)> = vec![
            (Op::Add {}, vec![x, c]),
            (Op::Sub {}, vec![x, c]),
            (Op::Mul {}, vec![x, c]),
            (Op::Div {}, vec![x, c]),
            (Op::Minimum {}, vec![x, c]),
            (Op::Maximum {}, vec![x, c]),
            (Op::Neg {}, vec![x]),
            (Op::Exp {}, vec![x]),
            (Op::Log {}, vec![x]),
            (Op::Sqrt {}, vec![x]),
            (Op::Rsqrt {}, vec![x]),
            (Op::Sigmoid {}, vec![x]),
            (Op::Silu {}, vec![x]),
            (Op::SiluBwd {}, vec![x, x]),
            (Op::Swiglu {}, vec![x, x]),
            (Op::Scale { c: r.f64() }, vec![x]),
            (Op::StopGradient {}, vec![x]),
            (Op::Softmax {}, vec![x]),
            (Op::SoftmaxBwd {}, vec![x, x]),
            (Op::Reshape { shape: vec![k, m] }, vec![x]),
            (Op::Transpose { perm: vec![1, 0] }, vec![x]),
            (Op::Concat { axis: 1 }, vec![x, x, x]),
            (Op::Slice { axis: 1, start: 0, end: k }, vec![x]),
            (Op::BroadcastTo { shape: vec![2, m, k] }, vec![x]),
            (Op::SumTo { shape: vec![1, k] }, vec![x]),
            (Op::Cast { to: [DType::BF16, DType::F16, DType::F32][r.below(3) as usize] }, vec![x]),
            (Op::Sum { axes: vec![r.below(2) as usize], keepdim: r.below(2) == 0 }, vec![x]),
            (Op::MatMul { ta: true, tb: false }, vec![x, x]),
            (Op::Embedding {}, vec![w, ids]),
            (Op::EmbeddingBwd { vocab: 1 + r.below(9) as usize }, vec![x, ids]),
            (Op::RmsNorm { eps: r.f64() }, vec![x, c]),
            (Op::RmsNormBwdX { eps: r.f64() }, vec![x, x, c]),
            (Op::RmsNormBwdW { eps: r.f64() }, vec![x, x]),
            (Op::CrossEntropy { ignore_index: r.next() as i64 }, vec![y, ids]),
            (Op::AdamWMoment { beta: r.f64(), square: r.below(2) == 0 }, vec![x, x]),
            (Op::Nf4Quantize { block: 2 * (1 + r.below(64) as usize), double_quant: r.below(300) as usize }, vec![x]),
        ];
        for (op, ins) in ops {
            used.insert(op.kind());
            b.op(op, &ins).unwrap();
        }
        // Ops that need 4-D shapes, scalars or NF4 inputs.
        let (bt, t, kv, hd) = (r.dim(), r.dim(), r.dim(), 2 * r.dim());
        let h = kv * (1 + r.below(3) as usize);
        let q = b.param(&format!("q{round}"), f32t(vec![bt, t, h, hd]), Role::Trainable, Init::Load).unwrap();
        let kk = b.param(&format!("k{round}"), f32t(vec![bt, t, kv, hd]), Role::Trainable, Init::Load).unwrap();
        let pos = b.input(&format!("pos{round}"), Type::i32(vec![bt, t])).unwrap();
        let step = b.input(&format!("step{round}"), Type::i32(vec![])).unwrap();
        let lr = b.input(&format!("lr{round}"), Type::f32(vec![])).unwrap();
        let (causal, scale) = (r.below(2) == 0, r.f64());
        let o = b.op(Op::Rope { theta: r.f64(), inverse: r.below(2) == 0 }, &[q, pos]).unwrap();
        let a = b.op(Op::Attention { causal, scale }, &[o, kk, kk, pos]).unwrap();
        let wrt = [AttnArg::Q, AttnArg::K, AttnArg::V][r.below(3) as usize];
        b.op(Op::AttentionBwd { causal, scale, wrt }, &[a, q, kk, kk, pos]).unwrap();
        b.op(Op::Dropout { p: r.f64(), seed: r.next() }, &[x, step]).unwrap();
        let loss = b.op(Op::CrossEntropy { ignore_index: -100 }, &[y, ids]).unwrap();
        b.op(Op::CrossEntropyBwd { ignore_index: -100 }, &[loss, y, ids]).unwrap();
        b.op(
            Op::AdamWUpdate { beta1: r.f64(), beta2: r.f64(), eps: r.f64(), weight_decay: r.f64() },
            &[x, x, x, lr, step],
        )
        .unwrap();
        let fmt = Nf4Format { block: 64, double_quant: if r.below(2) == 0 { None } else { Some(256) } };
        let qw =
            b.param(&format!("nf4.{round}"), Type::new(DType::Nf4(fmt), vec![n, k]), Role::Frozen, Init::Load).unwrap();
        let dq = b.op(Op::Nf4Dequantize {}, &[qw]).unwrap();
        b.op(Op::QMatMul { tb: true }, &[x, qw]).unwrap();
        let ut = b.param(&format!("u{round}"), f32t(vec![m, 2]), Role::Trainable, Init::Load).unwrap();
        let bt = b.param(&format!("b{round}"), f32t(vec![n, 2]), Role::Trainable, Init::Load).unwrap();
        b.op(Op::LoraLinear { s: r.f64(), tb: true }, &[x, if r.below(2) == 0 { w } else { qw }, ut, bt]).unwrap();
        let chunk = 1 + r.below(9) as usize;
        let lce = b.op(Op::LinearCrossEntropy { ignore_index: -100, chunk }, &[x, w, ids]).unwrap();
        b.op(Op::LinearCrossEntropyBwd { ignore_index: -100, chunk }, &[lce, x, dq, ids]).unwrap();
        used.extend([OpKind::QMatMul, OpKind::LoraLinear, OpKind::LinearCrossEntropy, OpKind::LinearCrossEntropyBwd]);
        for kind in [OpKind::Rope, OpKind::Attention, OpKind::AttentionBwd, OpKind::Dropout, OpKind::CrossEntropy] {
            used.insert(kind);
        }
        used.extend([OpKind::CrossEntropyBwd, OpKind::AdamWUpdate, OpKind::Nf4Dequantize, OpKind::MatMul]);
        used.extend([OpKind::Param, OpKind::Input, OpKind::Const]);
        b.output(OutputKind::Grad(format!("p{round}.w")), w);
        if round == 0 {
            b.output(OutputKind::Loss, loss);
            b.output(OutputKind::Logits, y);
            b.output(OutputKind::Metric(r.text()), loss);
        }
    }
    if rounds > 1 {
        let n = b.graph.nodes.len() as u32;
        b.graph.kernels.push(ir::Kernel { name: r.text(), nodes: vec![ir::ValueId(n / 2), ir::ValueId(n / 2 + 1)] });
        b.graph.kernels.push(ir::Kernel { name: "k1".into(), nodes: vec![ir::ValueId(n - 1)] });
    }
    let missing: Vec<_> = OpKind::ALL.iter().filter(|k| !used.contains(k)).collect();
    assert!(missing.is_empty(), "the generator does not cover {missing:?}");
    b.finish()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn print_then_parse_is_identity(seed in any::<u64>(), rounds in 1usize..3) {
        let g = random_graph(seed, rounds);
        ir::verify::verify(&g).unwrap();
        let text = ir::text::print(&g);
        let back = ir::text::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let again = ir::text::print(&back);
        prop_assert!(again == text, "printing the parsed graph differs:\n{}\n---\n{}", again, text);
        prop_assert!(back == g, "the parsed graph differs from the original");
    }
}

#[test]
fn parse_errors_say_where() {
    let bad = "graph \"g\" {\n  %0 = input {name=\"x\"} : f32[2]\n  %1 = frobnicate(%0) : f32[2]\n}\n";
    let e = ir::text::parse(bad).unwrap_err();
    assert_eq!((e.line, e.message.as_str()), (3, "unknown op `frobnicate`"));
    let bad = "graph \"g\" {\n  %0 = input {name=\"x\"} : f32[2]\n  %2 = neg(%0) : f32[2]\n}\n";
    let e = ir::text::parse(bad).unwrap_err();
    assert!(e.message.contains("expected %1"), "{e}");
    let bad = "graph \"g\" {\n  %0 = input {name=\"x\"} : f32[2]\n  %1 = neg(%0) : f32[3]\n}\n";
    let g = ir::text::parse(bad).unwrap();
    let e = ir::verify::verify(&g).unwrap_err();
    assert!(e.to_string().contains("declared type f32[3] but the inputs give f32[2]"), "{e}");
}
