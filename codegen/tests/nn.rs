//! Transformer-op kernels (`kernels::nn` → `codegen::nn`) against the reference interpreter.
//!
//! Each test builds a one-op graph on random inputs, runs the interpreter (f32 mode), JIT-compiles the host function,
//! runs it as 2 threads (tid 0 then 1) on the same inputs and compares the output within `atol + rtol·|ref|`; then
//! assembles the NVPTX kernel with ptxas for sm_80 and sm_90 and prints its registers and spills. Sizes cover odd and
//! even lengths (seq 3, 19, 37, 50, 131; vocab 50, 783; head dims 12, 16, 20 and 64; GQA 4 query heads over 2 kv heads
//! and 6 over 2), two packed examples per row of segment ids, and labels with ignored (-100) rows.

use codegen::inkwell::context::Context;
use codegen::inkwell::OptimizationLevel;
use codegen::lower::optimize_host;
use codegen::nn::{emit_host, kernel_to_ptx};
use codegen::ptxas;
use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::{AttnArg, Builder, DType, Op, OutputKind, Type, ValueId};
use kernels::loops::Elem;
use kernels::nn::NnKernel;

mod common;
use common::{require_ptxas, Rng};

/// Attention and cross-entropy (f32 accumulation vs the interpreter's f64).
const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-4;
/// Gathers, scatters of a few terms, and RoPE (the same f32 angles and a rotation rounded once).
const ATOL_TIGHT: f64 = 1e-6;
const RTOL_TIGHT: f64 = 1e-6;

/// A one-op graph under construction plus the values of its inputs.
struct Case {
    b: Builder,
    env: Env,
    rng: Rng,
}

impl Case {
    fn new(name: &str, seed: u64) -> Case {
        Case { b: Builder::new(name), env: Env::default(), rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1) }
    }
    fn floats(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> ValueId {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| (lo + (hi - lo) * self.rng.next()) as f32).collect();
        self.env.inputs.insert(name.into(), Value::F(Tensor::from_f32(shape.to_vec(), &data)));
        self.b.input(name, Type::f32(shape.to_vec())).unwrap()
    }
    fn ints(&mut self, name: &str, shape: &[usize], data: Vec<i32>) -> ValueId {
        self.env.inputs.insert(name.into(), Value::ints(shape.to_vec(), data));
        self.b.input(name, Type::new(DType::I32, shape.to_vec())).unwrap()
    }
    /// Segment ids [B,T]: two packed examples per row (the first ends at a random point).
    fn segments(&mut self, batch: usize, seq: usize, packed: bool) -> ValueId {
        let mut data = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let cut = if packed { 1 + self.rng.below(seq.max(2) - 1) as usize } else { seq };
            data.extend((0..seq).map(|t| i32::from(t >= cut)));
        }
        self.ints("seg", &[batch, seq], data)
    }
    /// Labels in `0..vocab`, with about a quarter `-100`.
    fn labels(&mut self, rows: usize, vocab: usize) -> ValueId {
        let data = (0..rows).map(|_| if self.rng.next() < 0.25 { -100 } else { self.rng.below(vocab) }).collect();
        self.ints("labels", &[rows], data)
    }

    /// Runs the op on the interpreter and as a host kernel (2 threads), compares, and assembles its PTX.
    fn check(mut self, op: Op, ins: &[ValueId], atol: f64, rtol: f64) {
        let y = self.b.op(op, ins).unwrap();
        self.b.output(OutputKind::Metric("y".into()), y);
        let g = self.b.finish();
        let vals = run(&g, &self.env, Precision::F32).expect("interpreter");
        let k = NnKernel::from_node(&g, y, &format!("{}:test", g.name)).unwrap_or_else(|e| panic!("{}: {e}", g.name));
        let launch = k.launch();

        let ctx = Context::create();
        let module = ctx.create_module(&k.symbol());
        emit_host(&ctx, &module, &k).expect("emit host");
        optimize_host(&module).unwrap_or_else(|e| panic!("{}: {e}\n{}", k.name, module.print_to_string()));
        let engine = module.create_jit_execution_engine(OptimizationLevel::Aggressive).expect("JIT");
        type HostKernel = unsafe extern "C" fn(*const *mut u8, i32, i32);
        // SAFETY: emit_host defines `void sym(ptr, i32, i32)`.
        let kernel = unsafe { engine.get_function::<HostKernel>(&k.symbol()) }.expect("kernel symbol");

        let mut f32s: Vec<Vec<f32>> = vec![];
        let mut i32s: Vec<Vec<i32>> = vec![];
        let mut ptrs: Vec<*mut u8> = vec![];
        for (i, buf) in k.buffers.iter().enumerate() {
            let ptr = match (&vals[buf.value.index()], i < k.n_inputs) {
                (Value::I { data, .. }, true) => {
                    i32s.push(data.clone());
                    i32s.last_mut().unwrap().as_mut_ptr() as *mut u8
                }
                (Value::F(t), true) => {
                    f32s.push(t.to_f32());
                    f32s.last_mut().unwrap().as_mut_ptr() as *mut u8
                }
                (_, false) => {
                    assert_eq!(buf.elem, Elem::F32);
                    // NaN shows unwritten elements; accumulating outputs start from 0 (the ABI).
                    let fill = if launch.zero_output_host { 0.0 } else { f32::NAN };
                    f32s.push(vec![fill; buf.numel()]);
                    f32s.last_mut().unwrap().as_mut_ptr() as *mut u8
                }
                (other, true) => panic!("unexpected input value {other:?}"),
            };
            ptrs.push(ptr);
        }
        for tid in 0..2 {
            // SAFETY: one pointer per buffer, each with the buffer's element count (the kernel ABI).
            unsafe { kernel.call(ptrs.as_ptr(), tid, 2) };
        }
        let got = f32s.last().unwrap();
        let want = vals[k.output().value.index()].as_f().expect("float output");
        let mut worst = 0.0f64;
        for (i, (&w, &x)) in want.data.iter().zip(got).enumerate() {
            let err = (x as f64 - w).abs();
            worst = worst.max(err / (atol + rtol * w.abs()));
            assert!(
                err <= atol + rtol * w.abs(),
                "{} output [{i}] of {:?}: got {x}, want {w}",
                k.name,
                k.output().shape
            );
        }
        eprintln!("{}: host ok (worst error {worst:.3} of tolerance)", g.name);

        if require_ptxas() {
            for sm in [80, 90] {
                let ptx = kernel_to_ptx(&k, sm).unwrap_or_else(|e| panic!("{}: PTX for sm_{sm}: {e}", k.name));
                assert!(ptx.contains(&format!(".entry {}", k.symbol())), "{ptx}");
                if std::env::var("TUNEC_DUMP_PTX").is_ok() {
                    eprintln!("{ptx}");
                }
                let report = ptxas::assemble(&ptx, sm).unwrap_or_else(|e| panic!("{} sm_{sm}: {e}\n{ptx}", k.name));
                let r = report.kernel(&k.symbol()).expect("ptxas reports the kernel");
                eprintln!(
                    "  sm_{sm}: {} registers, {} B shared, stack {} B, spills {}/{} B",
                    r.registers, r.shared_bytes, r.stack_frame_bytes, r.spill_store_bytes, r.spill_load_bytes
                );
            }
        }
    }
}

/// (batch, seq, heads, kv heads, head dim, causal, packed segments)
const ATTENTION_SHAPES: [(usize, usize, usize, usize, usize, bool, bool); 7] = [
    (1, 3, 4, 2, 16, true, false),
    (2, 50, 4, 2, 64, true, true),
    (1, 131, 4, 2, 16, true, true),
    (1, 50, 2, 2, 64, false, true),
    (2, 3, 2, 1, 16, false, false),
    // Head dims that are no multiple of a vector (host: 8 or 16 lanes), GQA 3 query heads per kv head.
    (1, 37, 6, 2, 20, true, true),
    (2, 19, 3, 1, 12, false, true),
];

#[test]
fn attention_matches_reference() {
    for (n, &(b, t, h, kv, hd, causal, packed)) in ATTENTION_SHAPES.iter().enumerate() {
        let scale = 1.0 / (hd as f64).sqrt();
        let mut c = Case::new(&format!("attention_{b}x{t}x{h}/{kv}x{hd}"), n as u64);
        let q = c.floats("q", &[b, t, h, hd], -1.0, 1.0);
        let k = c.floats("k", &[b, t, kv, hd], -1.0, 1.0);
        let v = c.floats("v", &[b, t, kv, hd], -1.0, 1.0);
        let seg = c.segments(b, t, packed);
        c.check(Op::Attention { causal, scale }, &[q, k, v, seg], ATOL, RTOL);
    }
}

#[test]
fn attention_bwd_matches_reference() {
    for wrt in [AttnArg::Q, AttnArg::K, AttnArg::V] {
        for (n, &(b, t, h, kv, hd, causal, packed)) in ATTENTION_SHAPES.iter().enumerate() {
            let scale = 1.0 / (hd as f64).sqrt();
            let mut c = Case::new(&format!("attention_bwd_{wrt:?}_{b}x{t}x{h}/{kv}x{hd}"), 100 + n as u64);
            let dout = c.floats("dout", &[b, t, h, hd], -1.0, 1.0);
            let q = c.floats("q", &[b, t, h, hd], -1.0, 1.0);
            let k = c.floats("k", &[b, t, kv, hd], -1.0, 1.0);
            let v = c.floats("v", &[b, t, kv, hd], -1.0, 1.0);
            let seg = c.segments(b, t, packed);
            c.check(Op::AttentionBwd { causal, scale, wrt }, &[dout, q, k, v, seg], ATOL, RTOL);
        }
    }
}

#[test]
fn rope_matches_reference() {
    let shapes = [(2, 3, 4, 16), (1, 50, 2, 64), (1, 131, 3, 16)];
    for (n, &(b, t, h, hd)) in shapes.iter().enumerate() {
        for (theta, inverse) in [(10_000.0, false), (10_000.0, true), (500_000.0, false)] {
            let mut c = Case::new(&format!("rope_{b}x{t}x{h}x{hd}_{theta}_{inverse}"), n as u64);
            let x = c.floats("x", &[b, t, h, hd], -2.0, 2.0);
            // Positions up to 8k (long-context angles need the full range reduction).
            let pos = (0..b * t).map(|_| c.rng.below(8192)).collect();
            let pos = c.ints("pos", &[b, t], pos);
            c.check(Op::Rope { theta, inverse }, &[x, pos], ATOL_TIGHT, RTOL_TIGHT);
        }
    }
}

#[test]
fn embedding_and_embedding_bwd_match_reference() {
    for (vocab, dim) in [(50, 16), (783, 64)] {
        for tokens in [3, 50, 131] {
            let mut c = Case::new(&format!("embedding_{vocab}x{dim}_{tokens}"), tokens as u64);
            let table = c.floats("table", &[vocab, dim], -1.0, 1.0);
            let ids = (0..tokens).map(|_| c.rng.below(vocab)).collect();
            let ids = c.ints("ids", &[tokens], ids);
            c.check(Op::Embedding {}, &[table, ids], 0.0, 0.0);

            // Few distinct ids, so rows collect several tokens each.
            let mut c = Case::new(&format!("embedding_bwd_{vocab}x{dim}_{tokens}"), tokens as u64);
            let dy = c.floats("dy", &[tokens, dim], -1.0, 1.0);
            let ids = (0..tokens).map(|_| c.rng.below(7) * (vocab as i32 / 7)).collect();
            let ids = c.ints("ids", &[tokens], ids);
            c.check(Op::EmbeddingBwd { vocab }, &[dy, ids], ATOL_TIGHT, RTOL_TIGHT);
        }
    }
}

#[test]
fn cross_entropy_and_bwd_match_reference() {
    for vocab in [50, 783] {
        for rows in [3, 50, 131] {
            let mut c = Case::new(&format!("cross_entropy_{rows}x{vocab}"), (rows + vocab) as u64);
            let logits = c.floats("logits", &[rows, vocab], -5.0, 5.0);
            let labels = c.labels(rows, vocab);
            c.check(Op::CrossEntropy { ignore_index: -100 }, &[logits, labels], ATOL, RTOL);

            let mut c = Case::new(&format!("cross_entropy_bwd_{rows}x{vocab}"), (rows + vocab) as u64);
            let dloss = c.floats("dloss", &[], 0.5, 2.0);
            let logits = c.floats("logits", &[rows, vocab], -5.0, 5.0);
            let labels = c.labels(rows, vocab);
            c.check(Op::CrossEntropyBwd { ignore_index: -100 }, &[dloss, logits, labels], ATOL, RTOL);
        }
    }
    // Every label ignored: the loss is 0 and so is the gradient.
    let mut c = Case::new("cross_entropy_all_ignored", 1);
    let logits = c.floats("logits", &[3, 50], -5.0, 5.0);
    let labels = c.ints("labels", &[3], vec![-100; 3]);
    c.check(Op::CrossEntropy { ignore_index: -100 }, &[logits, labels], 0.0, 0.0);
}

#[test]
fn linear_cross_entropy_and_bwd_match_reference() {
    for (vocab, dim) in [(50, 16), (783, 64)] {
        for rows in [3, 50] {
            let chunk = 128;
            let mut c = Case::new(&format!("linear_cross_entropy_{rows}x{dim}x{vocab}"), (rows + vocab) as u64);
            let h = c.floats("h", &[rows, dim], -1.0, 1.0);
            let w = c.floats("w", &[vocab, dim], -0.5, 0.5);
            let labels = c.labels(rows, vocab);
            c.check(Op::LinearCrossEntropy { ignore_index: -100, chunk }, &[h, w, labels], ATOL, RTOL);

            let mut c = Case::new(&format!("linear_cross_entropy_bwd_{rows}x{dim}x{vocab}"), (rows + vocab) as u64);
            let dloss = c.floats("dloss", &[], 0.5, 2.0);
            let h = c.floats("h", &[rows, dim], -1.0, 1.0);
            let w = c.floats("w", &[vocab, dim], -0.5, 0.5);
            let labels = c.labels(rows, vocab);
            c.check(Op::LinearCrossEntropyBwd { ignore_index: -100, chunk }, &[dloss, h, w, labels], ATOL, RTOL);
        }
    }
}
