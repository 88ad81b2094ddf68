//! GEMM kernels (`kernels::gemm` → `codegen::gemm`) against the reference interpreter.
//!
//! Each test builds a one-node graph (`matmul`, `qmatmul` or `lora_linear`), runs the interpreter (f32 mode) on
//! random inputs, JIT-compiles the host kernel, runs it as 2 threads (tid 0 and 1) and compares every element within
//! `atol + rtol·|ref|` with `atol = rtol = 1e-5·sqrt(K)` (f32 accumulation in another order than the f64 oracle,
//! which rounds once; inputs are O(1)). NF4 dequantized values are checked bit for bit separately (an identity
//! activation makes the output the dequantized weight). Every kernel's PTX assembles with ptxas for sm_80 and
//! sm_90 (same missing-ptxas policy as `tests/lower.rs`).

use codegen::gemm::{emit_host, gemm_to_ptx};
use codegen::inkwell::context::Context;
use codegen::inkwell::OptimizationLevel;
use codegen::lower::optimize_host;
use codegen::ptxas;
use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::nf4::{self, Nf4Tensor};
use ir::{Builder, DType, Nf4Format, Op, OutputKind, Type, ValueId};
use kernels::gemm::{nf4_buffers, BufElem, Gemm, GemmPrecision};

mod common;
use common::{require_ptxas, Rng};

/// A one-GEMM graph plus its input values.
struct Case {
    b: Builder,
    env: Env,
    rng: Rng,
}

impl Case {
    fn new(name: &str, seed: u64) -> Case {
        Case { b: Builder::new(name), env: Env::default(), rng: Rng::new(seed) }
    }
    fn input(&mut self, name: &str, shape: &[usize]) -> ValueId {
        let data = self.rng.vec(shape.iter().product(), -1.0, 1.0);
        self.input_data(name, shape, data)
    }
    fn input_data(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> ValueId {
        self.env.inputs.insert(name.into(), Value::F(Tensor::from_f32(shape.to_vec(), &data)));
        self.b.input(name, Type::f32(shape.to_vec())).unwrap()
    }
    fn nf4(&mut self, name: &str, shape: &[usize], double: bool) -> ValueId {
        let data = self.rng.vec(shape.iter().product(), -0.5, 0.5);
        let q = nf4::quantize(&data, shape, 64, double.then_some(256));
        self.env.inputs.insert(name.into(), Value::Q(q));
        let fmt = Nf4Format { block: 64, double_quant: double.then_some(256) };
        self.b.input(name, Type::new(DType::Nf4(fmt), shape.to_vec())).unwrap()
    }
}

/// Host buffers in ABI order.
enum Buf {
    F(Vec<f32>),
    U(Vec<u8>),
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Runs the node `y` of the case as a host kernel (2 threads) and returns (kernel, kernel output, reference).
fn run_case(c: Case, y: ValueId, check_ptx: bool) -> (Gemm, Vec<f32>, Vec<f64>) {
    let (gemm, got, want, _) = run_case_with(c, y, check_ptx, GemmPrecision::F32);
    (gemm, got, want)
}

/// [`run_case`] at a given precision; also returns the node's inputs as f32 values (NF4 weights dequantized).
fn run_case_with(
    c: Case,
    y: ValueId,
    check_ptx: bool,
    precision: GemmPrecision,
) -> (Gemm, Vec<f32>, Vec<f64>, Vec<Vec<f32>>) {
    let mut b = c.b;
    b.output(OutputKind::Metric("y".into()), y);
    let g = b.finish();
    let vals = run(&g, &c.env, Precision::F32).expect("interpreter");
    let mut gemm = Gemm::from_node(&g, y, &format!("gemm:{}", g.name)).expect("a GEMM");
    gemm.precision = precision;
    let inputs: Vec<Vec<f32>> = g
        .node(y)
        .inputs
        .iter()
        .map(|&v| match &vals[v.index()] {
            Value::F(t) => t.to_f32(),
            Value::Q(q) => nf4::dequantize(q),
            other => panic!("unexpected input {other:?}"),
        })
        .collect();
    let specs = gemm.buffers();

    let mut bufs: Vec<Buf> = Vec::new();
    for &v in &g.node(y).inputs {
        match &vals[v.index()] {
            Value::F(t) => bufs.push(Buf::F(t.to_f32())),
            Value::Q(q) => {
                for raw in nf4_buffers(q) {
                    let spec = &specs[bufs.len()];
                    bufs.push(match spec.elem {
                        BufElem::U8 => Buf::U(raw),
                        BufElem::F32 => Buf::F(f32s(&raw)),
                    });
                }
            }
            other => panic!("unexpected input {other:?}"),
        }
    }
    bufs.push(Buf::F(vec![f32::NAN; specs.last().unwrap().len]));
    assert_eq!(bufs.len(), specs.len());
    for (buf, spec) in bufs.iter().zip(&specs) {
        let len = match buf {
            Buf::F(v) => v.len(),
            Buf::U(v) => v.len(),
        };
        assert_eq!(len, spec.len, "buffer {}", spec.name);
    }
    let mut ptrs: Vec<*mut u8> = bufs
        .iter_mut()
        .map(|b| match b {
            Buf::F(v) => v.as_mut_ptr() as *mut u8,
            Buf::U(v) => v.as_mut_ptr(),
        })
        .collect();

    let ctx = Context::create();
    let module = ctx.create_module(&gemm.symbol());
    emit_host(&ctx, &module, &gemm).expect("emit host");
    optimize_host(&module).unwrap_or_else(|e| panic!("{}: {e}\n{}", gemm.name, module.print_to_string()));
    let engine = module.create_jit_execution_engine(OptimizationLevel::Aggressive).expect("JIT");
    type HostKernel = unsafe extern "C" fn(*const *mut u8, i32, i32);
    // SAFETY: emit_host defines `void sym(ptr, i32, i32)`.
    let kernel = unsafe { engine.get_function::<HostKernel>(&gemm.symbol()) }.expect("kernel symbol");
    for tid in 0..2 {
        // SAFETY: one pointer per buffer, each with the buffer's element count (the kernel ABI).
        unsafe { kernel.call(ptrs.as_mut_ptr() as *const *mut u8, tid, 2) };
    }
    let Some(Buf::F(got)) = bufs.pop() else { unreachable!() };

    if check_ptx && require_ptxas() {
        for sm in [80, 90] {
            let ptx = gemm_to_ptx(&gemm, sm).unwrap_or_else(|e| panic!("{}: PTX for sm_{sm}: {e}", gemm.name));
            assert!(ptx.contains(&format!(".entry {}", gemm.symbol())), "{ptx}");
            assert!(ptx.contains(".shared") && ptx.contains("bar.sync"), "{ptx}");
            match precision {
                GemmPrecision::F32 => assert!(ptx.contains("fma.rn.f32"), "{ptx}"),
                GemmPrecision::Bf16 => {
                    assert!(ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"), "{ptx}")
                }
            }
            let report = ptxas::assemble(&ptx, sm).unwrap_or_else(|e| panic!("{} sm_{sm}: {e}\n{ptx}", gemm.name));
            let k = report.kernel(&gemm.symbol()).expect("kernel in the ptxas report");
            eprintln!(
                "ptxas sm_{sm} {}: {} registers, {} B shared, spill stores {} B, spill loads {} B, stack {} B",
                gemm.symbol(),
                k.registers,
                k.shared_bytes,
                k.spill_store_bytes,
                k.spill_load_bytes,
                k.stack_frame_bytes
            );
        }
    }
    let want = vals[y.index()].as_f().expect("float output").data.clone();
    (gemm, got, want, inputs)
}

fn assert_close(gemm: &Gemm, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    let tol = 1e-5 * (gemm.k as f64).sqrt().max(1.0);
    for (i, (&x, &w)) in got.iter().zip(want).enumerate() {
        let ok = (x as f64 - w).abs() <= tol + tol * w.abs();
        assert!(ok, "{} ({gemm:?}) element {i}: got {x}, want {w}", gemm.name);
    }
}

const MM_SHAPES: [(usize, usize, usize); 7] =
    [(3, 3, 3), (3, 50, 783), (50, 783, 3), (783, 3, 50), (50, 50, 50), (783, 50, 783), (50, 783, 783)];

#[test]
fn matmul_matches_reference() {
    for (ta, tb) in [(false, false), (false, true), (true, false)] {
        for (i, &(m, n, k)) in MM_SHAPES.iter().enumerate() {
            let mut c = Case::new("mm", (i * 4 + ta as usize * 2 + tb as usize) as u64);
            let a = c.input("a", &if ta { [k, m] } else { [m, k] });
            let b = c.input("b", &if tb { [n, k] } else { [k, n] });
            let y = c.b.matmul(a, b, ta, tb).unwrap();
            let (gemm, got, want) = run_case(c, y, i < 3);
            assert_close(&gemm, &got, &want);
        }
    }
}

#[test]
fn batched_matmul_matches_reference() {
    for (ta, tb) in [(false, false), (false, true), (true, false)] {
        for &(bt, m, n, k) in &[(2, 50, 3, 783), (3, 7, 50, 50)] {
            let mut c = Case::new("bmm", (bt * m + n) as u64);
            let a = c.input("a", &if ta { [bt, k, m] } else { [bt, m, k] });
            let b = c.input("b", &if tb { [bt, n, k] } else { [bt, k, n] });
            let y = c.b.matmul(a, b, ta, tb).unwrap();
            let (gemm, got, want) = run_case(c, y, true);
            assert_eq!(gemm.batch, bt);
            assert_close(&gemm, &got, &want);
        }
    }
}

/// K = 64·k + odd: the weight's last NF4 block is short (and blocks straddle rows).
const Q_SHAPES: [(usize, usize, usize); 4] = [(3, 50, 131), (50, 3, 783), (783, 50, 67), (50, 50, 50)];

#[test]
fn qmatmul_matches_reference() {
    for double in [true, false] {
        for tb in [true, false] {
            for (i, &(m, n, k)) in Q_SHAPES.iter().enumerate() {
                let mut c = Case::new("qmm", (i * 4 + double as usize * 2 + tb as usize) as u64);
                let x = c.input("x", &[m, k]);
                let q = c.nf4("q", &if tb { [n, k] } else { [k, n] }, double);
                let y = c.b.op(Op::QMatMul { tb }, &[x, q]).unwrap();
                let (gemm, got, want) = run_case(c, y, i == 0);
                assert_close(&gemm, &got, &want);
            }
        }
    }
}

/// With x = I, qmatmul's output is the dequantized weight (transposed for tb): it must be bit-exact.
#[test]
fn qmatmul_dequantizes_bit_exactly() {
    for double in [true, false] {
        for tb in [true, false] {
            let (k, n) = (131, 50);
            let mut c = Case::new("qid", 7 + double as u64 * 2 + tb as u64);
            let eye: Vec<f32> = (0..k * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
            let x = c.input_data("x", &[k, k], eye);
            let q = c.nf4("q", &if tb { [n, k] } else { [k, n] }, double);
            let Value::Q(qt) = c.env.inputs["q"].clone() else { unreachable!() };
            let y = c.b.op(Op::QMatMul { tb }, &[x, q]).unwrap();
            let (_, got, _) = run_case(c, y, false);
            let w = nf4::dequantize(&qt);
            for kk in 0..k {
                for nn in 0..n {
                    let want = if tb { w[nn * k + kk] } else { w[kk * n + nn] };
                    assert_eq!(got[kk * n + nn], want, "double {double} tb {tb} at ({kk}, {nn})");
                }
            }
            check_absmax_roundtrip(&qt);
        }
    }
}

fn check_absmax_roundtrip(q: &Nf4Tensor) {
    assert!(!q.packed.is_empty() && q.num_blocks() * q.block >= q.numel());
}

#[test]
fn lora_linear_matches_reference() {
    for nf4w in [false, true] {
        for tb in [true, false] {
            for (i, &(m, n, k, r)) in [(3, 50, 131, 8), (50, 783, 50, 3), (783, 3, 783, 16)].iter().enumerate() {
                let mut c = Case::new("lora", (i * 4 + nf4w as usize * 2 + tb as usize) as u64);
                let x = c.input("x", &[m, k]);
                let wshape = if tb { [n, k] } else { [k, n] };
                let w = if nf4w { c.nf4("w", &wshape, true) } else { c.input("w", &wshape) };
                let u = c.input("u", &[m, r]);
                let lb = c.input("b", &if tb { [n, r] } else { [r, n] });
                let y = c.b.op(Op::LoraLinear { s: 0.5, tb }, &[x, w, u, lb]).unwrap();
                let (gemm, got, want) = run_case(c, y, i == 0);
                assert_eq!(gemm.lora.map(|l| l.rank), Some(r));
                assert_close(&gemm, &got, &want);
            }
        }
    }
}

/// Runs kernel group `nodes` of the case's graph (a GEMM with an elementwise epilogue) as a host kernel (2 threads)
/// through `kernel_interface`, as the backends do, and compares every output with the interpreter within
/// `tol·(1 + |ref|)`, `tol = 1e-5·sqrt(K)`; the PTX assembles for sm_80 and sm_90. Returns the GEMM.
fn run_epilogue_case(c: Case, nodes: Vec<ValueId>, outputs: &[ValueId]) -> Gemm {
    use codegen::build::{emit_host_template, kernel_interface, Template};
    let mut b = c.b;
    for (i, &v) in outputs.iter().enumerate() {
        b.output(OutputKind::Metric(format!("y{i}")), v);
    }
    let g = b.finish();
    let vals = run(&g, &c.env, Precision::F32).expect("interpreter");
    let k = ir::Kernel { name: format!("gemm:{}", g.name), nodes };
    let t = Template::of(&g, &k).unwrap_or_else(|e| panic!("{}: {e}", g.name));
    let Template::Gemm(gemm) = &t else { panic!("{}: not a GEMM template: {t:?}", g.name) };
    assert!(gemm.epilogue.is_some(), "{}: no epilogue", g.name);
    let (args, _) = kernel_interface(&g, &k, &t);
    let n_in = args.len() - t.n_outputs();
    let mut bufs: Vec<Vec<u32>> = args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let v = ValueId(a.value);
            let bytes: Vec<u8> = if i >= n_in {
                (0..g.ty(v).numel()).flat_map(|_| f32::NAN.to_le_bytes()).collect()
            } else {
                match &vals[v.index()] {
                    Value::F(t) => t.to_f32().iter().flat_map(|x| x.to_le_bytes()).collect(),
                    Value::Q(q) => nf4_buffers(q)[a.part as usize].clone(),
                    other => panic!("unexpected input {other:?}"),
                }
            };
            let mut w = vec![0u32; bytes.len().div_ceil(4).max(1)];
            for (j, ch) in bytes.chunks(4).enumerate() {
                let mut x = [0u8; 4];
                x[..ch.len()].copy_from_slice(ch);
                w[j] = u32::from_le_bytes(x);
            }
            w
        })
        .collect();
    let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|w| w.as_mut_ptr() as *mut u8).collect();
    let ctx = Context::create();
    let module = ctx.create_module(&gemm.symbol());
    emit_host_template(&ctx, &module, &t).expect("emit host");
    optimize_host(&module).unwrap_or_else(|e| panic!("{}: {e}\n{}", gemm.name, module.print_to_string()));
    let engine = module.create_jit_execution_engine(OptimizationLevel::Aggressive).expect("JIT");
    type HostKernel = unsafe extern "C" fn(*const *mut u8, i32, i32);
    // SAFETY: every template defines `void sym(ptr, i32, i32)`.
    let kernel = unsafe { engine.get_function::<HostKernel>(&gemm.symbol()) }.expect("kernel symbol");
    for tid in 0..2 {
        // SAFETY: one pointer per argument with the argument's size (the kernel ABI).
        unsafe { kernel.call(ptrs.as_ptr(), tid, 2) };
    }
    let tol = 1e-5 * (gemm.k as f64).sqrt().max(1.0);
    for (i, a) in args.iter().enumerate().skip(n_in) {
        let want = &vals[a.value as usize].as_f().expect("float output").data;
        for (j, &w) in want.iter().enumerate() {
            let x = f32::from_bits(bufs[i][j]) as f64;
            assert!((x - w).abs() <= tol + tol * w.abs(), "{}: output %{}[{j}]: got {x}, want {w}", g.name, a.value);
        }
    }
    if require_ptxas() {
        for sm in [80, 90] {
            let ptx = gemm_to_ptx(gemm, sm).unwrap_or_else(|e| panic!("{}: PTX for sm_{sm}: {e}", gemm.name));
            ptxas::assemble(&ptx, sm).unwrap_or_else(|e| panic!("{} sm_{sm}: {e}\n{ptx}", gemm.name));
        }
    }
    gemm.clone()
}

/// The residual add after o_proj / down_proj: `r + lora_linear(x, W, U, B)` with an NF4 (double quant) or f32
/// weight; only the sum leaves the kernel, so the GEMM accumulates in the sum's buffer and the add runs in place.
#[test]
fn gemm_residual_epilogue_matches_reference() {
    for nf4w in [true, false] {
        for (i, &(m, n, k, r)) in [(3, 50, 131, 8), (783, 3, 50, 3), (50, 783, 783, 16)].iter().enumerate() {
            let mut c = Case::new("residual", (i * 2 + nf4w as usize) as u64 + 40);
            let x = c.input("x", &[m, k]);
            let w = if nf4w { c.nf4("w", &[n, k], true) } else { c.input("w", &[n, k]) };
            let u = c.input("u", &[m, r]);
            let lb = c.input("b", &[n, r]);
            let res = c.input("res", &[m, n]);
            let y = c.b.op(Op::LoraLinear { s: 2.0, tb: true }, &[x, w, u, lb]).unwrap();
            let z = c.b.add(res, y).unwrap();
            let gemm = run_epilogue_case(c, vec![y, z], &[z]);
            assert!(!gemm.epilogue.unwrap().store_acc);
        }
    }
}

/// `swiglu(gate, up)` after the up projection, read through a reshape, with the GEMM result also leaving the kernel
/// (saved for the backward): two outputs.
#[test]
fn gemm_swiglu_epilogue_keeps_the_gemm_result() {
    for (i, &(m, n, k)) in [(3, 50, 783), (50, 3, 50), (783, 50, 3)].iter().enumerate() {
        let mut c = Case::new("swiglu", i as u64 + 50);
        let x = c.input("x", &[m, k]);
        let w = c.input("w", &[n, k]);
        let gate = c.input("gate", &[1, m, n]);
        let y = c.b.matmul(x, w, false, true).unwrap();
        let yr = c.b.reshape(y, &[1, m, n]).unwrap();
        let s = c.b.op(Op::Swiglu {}, &[gate, yr]).unwrap();
        let gemm = run_epilogue_case(c, vec![y, yr, s], &[yr, s]);
        assert!(gemm.epilogue.unwrap().store_acc);
    }
}

/// A broadcast bias, an activation and a constant scale: `0.5·silu(x·W + bias)` on a batched matmul.
#[test]
fn gemm_bias_activation_epilogue_matches_reference() {
    for (i, &(bt, m, n, k)) in [(1, 50, 783, 3), (2, 3, 50, 50)].iter().enumerate() {
        let mut c = Case::new("bias", i as u64 + 60);
        let x = c.input("x", &[bt, m, k]);
        let w = c.input("w", &[bt, k, n]);
        let bias = c.input("bias", &[n]);
        let half = c.b.constant(0.5, Type::f32(Vec::<usize>::new())).unwrap();
        let y = c.b.matmul(x, w, false, false).unwrap();
        let z = c.b.add(y, bias).unwrap();
        let a = c.b.op(Op::Silu {}, &[z]).unwrap();
        let o = c.b.mul(a, half).unwrap();
        let gemm = run_epilogue_case(c, vec![y, z, a, o], &[o]);
        assert_eq!(gemm.batch, bt);
    }
}

/// The bf16 tensor-core precision: the host kernel computes `Σ bf16(a)·bf16(w)` (+ the f32 LoRA term), checked
/// against that sum in f64 with the f32 tolerance — so the rounding is exactly the tensor cores' (round to nearest
/// even on both operands, exact products); the PTX uses `mma.sync` bf16 and assembles for sm_80 and sm_90. (Whether
/// the GPU's fragments are right is for `gpu_check` on a GPU.)
#[test]
fn bf16_gemm_rounds_operands_like_tensor_cores() {
    let cases: [(&str, usize, usize, usize, bool); 5] = [
        ("mm_nt", 50, 783, 131, false),
        ("mm_tn", 3, 50, 783, false),
        ("qmm", 783, 50, 131, false),
        ("lora", 50, 50, 67, true),
        ("mm_nn", 131, 3, 50, false),
    ];
    for (i, &(kind, m, n, k, lora)) in cases.iter().enumerate() {
        let mut c = Case::new("bf16", 70 + i as u64);
        let (ta, tb) = match kind {
            "mm_tn" => (true, false),
            "mm_nn" => (false, false),
            _ => (false, true),
        };
        let x = c.input("x", &if ta { [k, m] } else { [m, k] });
        let wshape = if tb { [n, k] } else { [k, n] };
        let r = 8;
        let y = match kind {
            "qmm" => {
                let q = c.nf4("w", &wshape, true);
                c.b.op(Op::QMatMul { tb }, &[x, q]).unwrap()
            }
            _ if lora => {
                let w = c.nf4("w", &wshape, true);
                let u = c.input("u", &[m, r]);
                let lb = c.input("b", &[n, r]);
                c.b.op(Op::LoraLinear { s: 0.5, tb }, &[x, w, u, lb]).unwrap()
            }
            _ => {
                let w = c.input("w", &wshape);
                c.b.matmul(x, w, ta, tb).unwrap()
            }
        };
        let (gemm, got, want_f32, ins) = run_case_with(c, y, true, GemmPrecision::Bf16);
        let want = gemm.reference(&ins);
        assert_close(&gemm, &got, &want);
        // And it is not the f32 product: bf16 rounding moves the result by far more than the f32 tolerance.
        let moved =
            got.iter().zip(&want_f32).filter(|(g, w)| (**g as f64 - **w).abs() > 1e-3 * w.abs().max(1e-3)).count();
        assert!(moved > 0, "{kind}: the bf16 result equals the f32 one everywhere");
    }
}
