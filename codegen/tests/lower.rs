//! Elementwise and row-reduction kernels (`kernels::loops` → `codegen::lower`) against the reference interpreter.
//!
//! Each test builds a tiny graph, forms kernel groups with the `fuse` pass, and for every group: JIT-compiles the host
//! function, runs it as 2 threads on the interpreter's own input values, compares every output with the interpreter
//! (f32 mode) within `atol + rtol·|ref|` (dropout exactly), and assembles the NVPTX kernel with ptxas for sm_80 and
//! sm_90. Sizes 3, 50 and 783 cover odd, even and vector-remainder lengths.

use codegen::inkwell::context::Context;
use codegen::inkwell::OptimizationLevel;
use codegen::lower::{emit_host, nest_to_ptx, optimize_host};
use codegen::ptxas;
use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::{Builder, DType, Graph, Kernel, Op, OutputKind, Type, ValueId};
use kernels::loops::{Elem, Iteration, LoopError, LoopNest};
use passes::fuse::Fuse;
use passes::Pass;

mod common;
use common::{require_ptxas, Rng};

const SIZES: [usize; 3] = [3, 50, 783];
const ATOL: f64 = 1e-6;
const RTOL: f64 = 1e-5;

/// A graph under construction plus the values of its inputs.
struct Case {
    b: Builder,
    env: Env,
    rng: Rng,
}

impl Case {
    fn new(name: &str, seed: u64) -> Case {
        Case { b: Builder::new(name), env: Env::default(), rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1) }
    }
    fn input(&mut self, name: &str, shape: &[usize], lo: f64, hi: f64) -> ValueId {
        let n = shape.iter().product();
        let data = self.rng.vec(n, lo, hi);
        self.env.inputs.insert(name.into(), Value::F(Tensor::from_f32(shape.to_vec(), &data)));
        self.b.input(name, Type::f32(shape.to_vec())).unwrap()
    }
    /// An NF4 input (blocks of 64; double quantization in blocks of 256 when `double`), quantized from uniform
    /// values in `[-0.5, 0.5)` as the interpreter's NF4 parameters are.
    fn nf4(&mut self, name: &str, shape: &[usize], double: bool) -> ValueId {
        let data = self.rng.vec(shape.iter().product(), -0.5, 0.5);
        let q = ir::nf4::quantize(&data, shape, 64, double.then_some(256));
        self.env.inputs.insert(name.into(), Value::Q(q));
        let fmt = ir::Nf4Format { block: 64, double_quant: double.then_some(256) };
        self.b.input(name, Type::new(DType::Nf4(fmt), shape.to_vec())).unwrap()
    }
    fn int_scalar(&mut self, name: &str, v: i32) -> ValueId {
        self.env.inputs.insert(name.into(), Value::ints(vec![], vec![v]));
        self.b.input(name, Type::new(DType::I32, Vec::<usize>::new())).unwrap()
    }
    fn op(&mut self, op: Op, ins: &[ValueId]) -> ValueId {
        self.b.op(op, ins).unwrap()
    }
    fn output(&mut self, name: &str, v: ValueId) {
        self.b.output(OutputKind::Metric(name.into()), v);
    }
    /// Fuses, then checks every kernel; returns how many kernels the graph had.
    fn check(self, exact: bool) -> usize {
        let mut g = self.b.finish();
        Fuse.run(&mut g).expect("fuse");
        let vals = run(&g, &self.env, Precision::F32).expect("interpreter");
        assert!(!g.kernels.is_empty(), "{}: no kernels", g.name);
        for k in &g.kernels {
            check_kernel(&g, k, &vals, exact);
        }
        g.kernels.len()
    }
}

/// Runs kernel `k` on the host (2 threads) with the interpreter's inputs and compares its outputs; assembles its PTX.
fn check_kernel(g: &Graph, k: &Kernel, vals: &[Value], exact: bool) {
    let nest = LoopNest::from_group(g, k).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    let ctx = Context::create();
    let module = ctx.create_module(&nest.symbol());
    emit_host(&ctx, &module, &nest).expect("emit host");
    optimize_host(&module).unwrap_or_else(|e| panic!("{}: {e}\n{}", k.name, module.print_to_string()));
    let engine = module.create_jit_execution_engine(OptimizationLevel::Aggressive).expect("JIT");
    type HostKernel = unsafe extern "C" fn(*const *mut u8, i32, i32);
    // SAFETY: emit_host defines `void sym(ptr, i32, i32)`.
    let kernel = unsafe { engine.get_function::<HostKernel>(&nest.symbol()) }.expect("kernel symbol");

    // Buffers: inputs from the interpreter, outputs filled with NaN so unwritten elements show.
    let mut f32s: Vec<Vec<f32>> = vec![];
    let mut i32s: Vec<Vec<i32>> = vec![];
    let mut parts: Vec<Vec<u32>> = vec![];
    let mut ptrs: Vec<*mut u8> = vec![];
    for (i, part) in nest.args() {
        let buf = &nest.buffers[i];
        let ptr = match (&vals[buf.value.index()], i < nest.n_inputs) {
            (Value::Q(q), true) => {
                // An NF4 storage part, in 4-byte-aligned storage (f32 parts are read as f32).
                let raw = &kernels::gemm::nf4_buffers(q)[part];
                let mut words = vec![0u32; raw.len().div_ceil(4).max(1)];
                for (w, c) in words.iter_mut().zip(raw.chunks(4)) {
                    let mut x = [0u8; 4];
                    x[..c.len()].copy_from_slice(c);
                    *w = u32::from_le_bytes(x);
                }
                parts.push(words);
                parts.last_mut().unwrap().as_mut_ptr() as *mut u8
            }
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
                f32s.push(vec![f32::NAN; buf.numel()]);
                f32s.last_mut().unwrap().as_mut_ptr() as *mut u8
            }
        };
        ptrs.push(ptr);
    }
    let mut seeds = nest.seeds.clone();
    if !seeds.is_empty() {
        ptrs.push(seeds.as_mut_ptr() as *mut u8);
    }
    for tid in 0..2 {
        // SAFETY: one pointer per argument, each with its buffer's (or storage part's) size (the kernel ABI).
        unsafe { kernel.call(ptrs.as_ptr(), tid, 2) };
    }
    let outputs = &f32s[f32s.len() - nest.outputs().len()..];
    for (buf, got) in nest.outputs().iter().zip(outputs) {
        let want = vals[buf.value.index()].as_f().expect("float output");
        for (i, (&w, &x)) in want.data.iter().zip(got).enumerate() {
            let ok = if exact {
                (w as f32).to_bits() == x.to_bits()
            } else {
                (w.is_nan() && x.is_nan()) || w == x as f64 || (x as f64 - w).abs() <= ATOL + RTOL * w.abs()
            };
            assert!(
                ok,
                "{} kernel `{}` output {}[{i}] of {:?}: got {x}, want {w}",
                g.name, k.name, buf.value, buf.shape
            );
        }
    }

    if require_ptxas() {
        for sm in [80, 90] {
            let ptx = nest_to_ptx(&nest, sm).unwrap_or_else(|e| panic!("{}: PTX for sm_{sm}: {e}", k.name));
            assert!(ptx.contains(&format!(".entry {}", nest.symbol())), "{ptx}");
            if let Iteration::Rows { .. } = nest.iteration {
                assert!(ptx.contains("shfl.sync.bfly") && ptx.contains("bar.sync") && ptx.contains(".shared"), "{ptx}");
            }
            if std::env::var("TUNEC_DUMP_PTX").is_ok() {
                eprintln!("{ptx}");
            }
            ptxas::assemble(&ptx, sm).unwrap_or_else(|e| panic!("{} sm_{sm}: {e}\n{ptx}", k.name));
        }
    }
}

#[test]
fn unary_ops_match_reference() {
    let ops: Vec<(&str, Op, f64, f64)> = vec![
        ("neg", Op::Neg {}, -3.0, 3.0),
        ("exp", Op::Exp {}, -20.0, 20.0),
        ("log", Op::Log {}, 1e-3, 50.0),
        ("sqrt", Op::Sqrt {}, 0.0, 10.0),
        ("rsqrt", Op::Rsqrt {}, 0.01, 10.0),
        ("sigmoid", Op::Sigmoid {}, -12.0, 12.0),
        ("silu", Op::Silu {}, -12.0, 12.0),
        ("scale", Op::Scale { c: 0.1 }, -3.0, 3.0),
        ("stop_gradient", Op::StopGradient {}, -3.0, 3.0),
        ("cast", Op::Cast { to: DType::F32 }, -3.0, 3.0),
    ];
    for (name, op, lo, hi) in ops {
        for n in SIZES {
            let mut c = Case::new(name, n as u64);
            let x = c.input("x", &[2, n], lo, hi);
            let y = c.op(op.clone(), &[x]);
            c.output("y", y);
            assert_eq!(c.check(false), 1, "{name}");
        }
    }
}

#[test]
fn binary_ops_with_broadcasting_match_reference() {
    let ops: Vec<(&str, Op)> = vec![
        ("add", Op::Add {}),
        ("sub", Op::Sub {}),
        ("mul", Op::Mul {}),
        ("div", Op::Div {}),
        ("minimum", Op::Minimum {}),
        ("maximum", Op::Maximum {}),
    ];
    for (name, op) in ops {
        for n in SIZES {
            // Same shape, a row vector, a column, a scalar, and a middle-axis broadcast.
            let cases: [(&[usize], Vec<usize>); 5] = [
                (&[3, n], vec![3, n]),
                (&[3, n], vec![n]),
                (&[3, n], vec![3, 1]),
                (&[3, n], vec![]),
                (&[2, 3, n], vec![2, 1, n]),
            ];
            for (a_shape, b_shape) in cases {
                let mut c = Case::new(name, n as u64 + b_shape.len() as u64);
                let a = c.input("a", a_shape, -3.0, 3.0);
                let b = c.input("b", &b_shape, 0.5, 3.0);
                let y = c.op(op.clone(), &[a, b]);
                c.output("y", y);
                assert_eq!(c.check(false), 1, "{name} {a_shape:?} {b_shape:?}");
                // And the broadcast operand first.
                let mut c = Case::new(name, n as u64 + 7);
                let a = c.input("a", a_shape, 0.5, 3.0);
                let b = c.input("b", &b_shape, -3.0, 3.0);
                let y = c.op(op.clone(), &[b, a]);
                c.output("y", y);
                c.check(false);
            }
        }
    }
}

#[test]
fn silu_bwd_and_swiglu_match_reference() {
    for n in SIZES {
        let mut c = Case::new("silu_bwd", n as u64);
        let dy = c.input("dy", &[4, n], -2.0, 2.0);
        let x = c.input("x", &[4, n], -8.0, 8.0);
        let y = c.op(Op::SiluBwd {}, &[dy, x]);
        c.output("dx", y);
        assert_eq!(c.check(false), 1);

        // Llama's MLP activation, then a scale (as the down projection's input would be).
        let mut c = Case::new("swiglu", n as u64);
        let gate = c.input("gate", &[4, n], -8.0, 8.0);
        let up = c.input("up", &[4, n], -2.0, 2.0);
        let h = c.b.swiglu(gate, up).unwrap();
        let y = c.b.scale(h, 0.5).unwrap();
        c.output("y", y);
        assert_eq!(c.check(false), 1);
    }
}

#[test]
fn constants_views_and_broadcast_to_match_reference() {
    for n in SIZES {
        let mut c = Case::new("views", n as u64);
        let x = c.input("x", &[n], -2.0, 2.0);
        let y = c.input("y", &[4 * n], -2.0, 2.0);
        let half = c.b.constant(0.5, Type::f32(Vec::<usize>::new())).unwrap();
        let xb = c.b.broadcast_to(x, &[4, n]).unwrap();
        let xr = c.b.reshape(xb, &[4 * n]).unwrap();
        let xs = c.b.stop_gradient(xr).unwrap();
        let xc = c.b.cast(xs, DType::F32).unwrap();
        let s = c.b.add(xc, y).unwrap();
        let z = c.b.mul(s, half).unwrap();
        let w = c.b.sub(z, half).unwrap();
        c.output("w", w);
        assert_eq!(c.check(false), 1);
    }
}

#[test]
fn dropout_and_scale_match_reference_exactly() {
    for n in SIZES {
        for p in [0.1, 0.5] {
            let mut c = Case::new("dropout", n as u64);
            let x = c.input("x", &[3, n], -2.0, 2.0);
            let step = c.int_scalar("step", 17);
            let d = c.b.dropout(x, step, p, 1234).unwrap();
            let y = c.b.scale(d, 0.125).unwrap();
            c.output("y", y);
            assert_eq!(c.check(true), 1);
        }
    }
}

#[test]
fn adamw_chain_matches_reference() {
    for n in SIZES {
        for square in [false, true] {
            let mut c = Case::new("adamw_moment", n as u64);
            let m = c.input("m", &[2, n], -1.0, 1.0);
            let g = c.input("g", &[2, n], -1.0, 1.0);
            let y = c.op(Op::AdamWMoment { beta: 0.9, square }, &[m, g]);
            c.output("m", y);
            assert_eq!(c.check(false), 1);
        }
        let mut c = Case::new("adamw", n as u64);
        let p = c.input("p", &[2, n], -1.0, 1.0);
        let m = c.input("m", &[2, n], -0.1, 0.1);
        let v = c.input("v", &[2, n], 0.0, 0.01);
        let g = c.input("g", &[2, n], -1.0, 1.0);
        let lr = c.input("lr", &[], 1e-3, 2e-3);
        let step = c.int_scalar("step", 3);
        let clip = c.input("clip", &[], 0.5, 1.0);
        let gc = c.b.mul(g, clip).unwrap();
        let m2 = c.op(Op::AdamWMoment { beta: 0.9, square: false }, &[m, gc]);
        let v2 = c.op(Op::AdamWMoment { beta: 0.999, square: true }, &[v, gc]);
        let p2 =
            c.op(Op::AdamWUpdate { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }, &[p, m2, v2, lr, step]);
        c.output("m", m2);
        c.output("v", v2);
        c.output("p", p2);
        assert_eq!(c.check(false), 1, "the AdamW chain is one kernel");
    }
}

#[test]
fn rms_norm_and_residual_add_match_reference() {
    for n in SIZES {
        let mut c = Case::new("rms_norm", n as u64);
        let x = c.input("x", &[5, n], -2.0, 2.0);
        let w = c.input("w", &[n], 0.5, 1.5);
        let y = c.b.rms_norm(x, w, 1e-5).unwrap();
        c.output("y", y);
        assert_eq!(c.check(false), 1);

        // The residual stream: h = x + attn_out is stored and normalized in one kernel.
        let mut c = Case::new("residual_rms_norm", n as u64 + 1);
        let x = c.input("x", &[2, 3, n], -2.0, 2.0);
        let r = c.input("r", &[2, 3, n], -2.0, 2.0);
        let w = c.input("w", &[n], 0.5, 1.5);
        let h = c.b.add(x, r).unwrap();
        let y = c.b.rms_norm(h, w, 1e-6).unwrap();
        let z = c.b.scale(y, 2.0).unwrap();
        c.output("h", h);
        c.output("z", z);
        assert_eq!(c.check(false), 1, "add + rms_norm + scale fuse");

        let mut c = Case::new("rms_norm_bwd_x", n as u64);
        let dy = c.input("dy", &[5, n], -1.0, 1.0);
        let x = c.input("x", &[5, n], -2.0, 2.0);
        let w = c.input("w", &[n], 0.5, 1.5);
        let dx = c.op(Op::RmsNormBwdX { eps: 1e-5 }, &[dy, x, w]);
        c.output("dx", dx);
        assert_eq!(c.check(false), 1);
    }
}

#[test]
fn softmax_and_row_sums_match_reference() {
    for n in SIZES {
        let mut c = Case::new("softmax", n as u64);
        let x = c.input("x", &[2, 3, n], -5.0, 5.0);
        let xs = c.b.scale(x, 0.5).unwrap();
        let y = c.b.softmax(xs).unwrap();
        c.output("y", y);
        assert_eq!(c.check(false), 1);

        for keepdim in [false, true] {
            let mut c = Case::new("sum", n as u64);
            let x = c.input("x", &[4, n], -2.0, 2.0);
            let s = c.b.sum(x, &[1], keepdim).unwrap();
            c.output("s", s);
            assert_eq!(c.check(false), 1);
        }

        // Normalize rows by their sum: the sum broadcasts back along the row in the same kernel.
        let mut c = Case::new("row_normalize", n as u64);
        let x = c.input("x", &[4, n], 0.5, 2.0);
        let e = c.op(Op::Exp {}, &[x]);
        let s = c.b.sum(e, &[1], true).unwrap();
        let y = c.b.div(e, s).unwrap();
        c.output("s", s);
        c.output("y", y);
        c.check(false);
    }
}

#[test]
fn host_loops_are_vectorized() {
    let mut b = Builder::new("vec");
    let x = b.input("x", Type::f32(vec![4, 783])).unwrap();
    let y = b.input("y", Type::f32(vec![4, 783])).unwrap();
    let s = b.add(x, y).unwrap();
    b.output(OutputKind::Logits, s);
    let g = b.finish();
    let nest = LoopNest::from_group(&g, &Kernel { name: "add".into(), nodes: vec![s] }).unwrap();
    let ctx = Context::create();
    let module = ctx.create_module("vec");
    emit_host(&ctx, &module, &nest).unwrap();
    optimize_host(&module).unwrap();
    let text = module.print_to_string().to_string();
    assert!(text.contains("vector.body") && text.contains("x float>"), "{text}");
}

#[test]
fn other_templates_ops_are_unsupported() {
    let mut b = Builder::new("mm");
    let x = b.input("x", Type::f32(vec![2, 3])).unwrap();
    let w = b.input("w", Type::f32(vec![4, 3])).unwrap();
    let y = b.matmul(x, w, false, true).unwrap();
    let z = b.scale(y, 2.0).unwrap();
    b.output(OutputKind::Logits, z);
    let mut g = b.finish();
    let groups = passes::fuse::partition(&g);
    assert_eq!(groups.len(), 1, "the scale is the matmul's epilogue");
    assert_eq!(LoopNest::from_group(&g, &groups[0]), Err(LoopError::Unsupported("matmul".into())));
    // The GEMM template takes the scale as its elementwise epilogue: one kernel.
    Fuse.run(&mut g).unwrap();
    assert_eq!(g.kernels.len(), 1);
    assert!(kernels::template::Template::covers(&g, &g.kernels[0]));

    // A group with a prologue (an op feeding the GEMM) is not a GEMM with an epilogue, even when the shapes would
    // allow one loop over both.
    let mut b = Builder::new("pro");
    let x = b.input("x", Type::f32(vec![4, 4])).unwrap();
    let w = b.input("w", Type::f32(vec![4, 4])).unwrap();
    let x2 = b.scale(x, 3.0).unwrap();
    let y = b.matmul(x2, w, false, true).unwrap();
    let z = b.scale(y, 2.0).unwrap();
    b.output(OutputKind::Logits, z);
    let g = b.finish();
    let k = ir::Kernel { name: "matmul:pro".into(), nodes: vec![x2, y, z] };
    let err = kernels::template::Template::of(&g, &k).unwrap_err();
    assert!(err.contains("feeds the GEMM"), "{err}");

    // An epilogue that reads the GEMM result at another element (a broadcast) is not covered: `fuse` splits the
    // group into covered kernels.
    let mut b = Builder::new("mm");
    let x = b.input("x", Type::f32(vec![2, 3])).unwrap();
    let w = b.input("w", Type::f32(vec![4, 3])).unwrap();
    let y = b.matmul(x, w, false, true).unwrap();
    let z = b.broadcast_to(y, &[5, 2, 4]).unwrap();
    let z = b.scale(z, 2.0).unwrap();
    b.output(OutputKind::Logits, z);
    let mut g = b.finish();
    assert_eq!(passes::fuse::partition(&g).len(), 1);
    Fuse.run(&mut g).unwrap();
    assert_eq!(g.kernels.len(), 2);
    assert!(g.kernels.iter().all(|k| kernels::template::Template::covers(&g, k)));
}

#[test]
fn slices_concat_transpose_and_reductions_match_reference() {
    for n in SIZES {
        let mut c = Case::new("move", n as u64);
        let x = c.input("x", &[3, n, 4], -2.0, 2.0);
        let e = c.op(Op::Exp {}, &[x]);
        // Slices of a computed value (the merged LoRA A's pieces), a concat, a transpose.
        let s0 = c.b.slice(e, 2, 0, 1).unwrap();
        let s1 = c.b.slice(e, 2, 1, 4).unwrap();
        let s2 = c.b.slice(x, 1, n / 2, n).unwrap();
        let cat = c.b.concat(&[s1, s0, s1], 2).unwrap();
        let t = c.b.transpose(x, &[2, 0, 1]).unwrap();
        let t2 = c.b.transpose(x, &[1, 0, 2]).unwrap();
        for (name, v) in [("s0", s0), ("s1", s1), ("s2", s2), ("cat", cat), ("t", t), ("t2", t2)] {
            c.output(name, v);
        }
        // Reductions over leading, middle, all and trailing axes; sum_to as the backward of a broadcast.
        let lead = c.b.sum(x, &[0, 1], false).unwrap();
        let mid = c.b.sum(x, &[1], true).unwrap();
        let all = c.b.sum(x, &[0, 1, 2], false).unwrap();
        let outer = c.b.sum(x, &[0, 2], false).unwrap();
        let st = c.b.sum_to(x, &[n, 4]).unwrap();
        let st1 = c.b.sum_to(x, &[3, 1, 4]).unwrap();
        let norm = c.b.sqrt(all).unwrap();
        for (name, v) in [("lead", lead), ("mid", mid), ("all", all), ("outer", outer), ("st", st), ("st1", st1)] {
            c.output(name, v);
        }
        c.output("norm", norm);
        assert!(c.check(false) >= 10);
    }
}

#[test]
fn nf4_dequantize_matches_reference() {
    for double in [false, true] {
        for n in SIZES {
            // Alone: bit-exact. Blocks of 64 straddle the rows; [24, 783] has more than 256 blocks (two absmax2).
            for rows in [3, 24] {
                let mut c = Case::new("nf4_dequantize", (n * 2 + double as usize) as u64);
                let q = c.nf4("q", &[rows, n], double);
                let w = c.b.nf4_dequantize(q).unwrap();
                c.output("w", w);
                assert_eq!(c.check(true), 1, "[{rows}, {n}] double {double}");
            }

            // DoRA's weight norm: ‖W + s·BA‖ per row (dequantize, add, square, row sum, sqrt) in one row kernel.
            let mut c = Case::new("nf4_norm", (n * 2 + double as usize) as u64);
            let c_check_fused = |mut g: Graph, env: &Env| {
                Fuse.run(&mut g).expect("fuse");
                let vals = run(&g, env, Precision::F32).expect("interpreter");
                for k in &g.kernels {
                    check_kernel(&g, k, &vals, false);
                }
            };
            let q = c.nf4("q", &[4, n], double);
            let d = c.input("d", &[4, n], -0.1, 0.1);
            let w = c.b.nf4_dequantize(q).unwrap();
            let s = c.b.add(w, d).unwrap();
            let sq = c.b.mul(s, s).unwrap();
            let r = c.b.sum(sq, &[1], true).unwrap();
            let norm = c.b.sqrt(r).unwrap();
            c.output("norm", norm);
            let g = c.b.finish();
            let k = Kernel { name: "nf4_norm".into(), nodes: vec![w, s, sq, r, norm] };
            let nest = LoopNest::from_group(&g, &k).expect("loop nest");
            assert_eq!(nest.args().len(), nest.buffers.len() + if double { 3 } else { 1 });
            assert!(matches!(nest.iteration, Iteration::Rows { rows: 4, cols } if cols == n));
            let vals = run(&g, &c.env, Precision::F32).expect("interpreter");
            check_kernel(&g, &k, &vals, false);
            // And as `fuse` groups it.
            c_check_fused(g, &c.env);
        }
    }
}
