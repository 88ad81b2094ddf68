//! Host GEMM throughput: JIT-compiles the `codegen::gemm` host kernel for an f32 `matmul` (and an NF4 `qmatmul`,
//! both `tb = false` and `tb = true`), runs it with 2 threads and prints GFLOP/s (best of 5 runs).
//!
//! `cargo run --release -p codegen --example gemm_bench [size]` (default 1024; the kernel itself is compiled by
//! LLVM at O3 whatever the cargo profile).

use std::time::Instant;

use codegen::gemm::{emit_host, host_vector_width};
use codegen::inkwell::context::Context;
use codegen::inkwell::OptimizationLevel;
use codegen::lower::optimize_host;
use kernels::gemm::{nf4_buffers, BufElem, Gemm, WeightFormat};

type HostKernel = unsafe extern "C" fn(*const *mut u8, i32, i32);

struct Ptrs(Vec<*mut u8>);
// SAFETY: the threads write disjoint output rows (the kernel ABI) and only read the inputs.
unsafe impl Sync for Ptrs {}

fn bench(g: &Gemm, threads: i32) -> f64 {
    let specs = g.buffers();
    let mut f32s: Vec<Vec<f32>> = Vec::new();
    let mut u8s: Vec<Vec<u8>> = Vec::new();
    let mut ptrs = Vec::new();
    let mut seed = 1u32;
    let mut rnd = move || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    let nf4 = match g.weight {
        WeightFormat::Nf4 { block, double_quant } => {
            let w: Vec<f32> = (0..g.k * g.n).map(|_| rnd()).collect();
            let shape = if g.tb { [g.n, g.k] } else { [g.k, g.n] };
            Some(nf4_buffers(&ir::nf4::quantize(&w, &shape, block, double_quant)))
        }
        WeightFormat::F32 => None,
    };
    for (i, s) in specs.iter().enumerate() {
        let raw = nf4.as_ref().filter(|_| i >= 1 && i < 1 + nf4.as_ref().unwrap().len()).map(|b| b[i - 1].clone());
        match (s.elem, raw) {
            (BufElem::U8, Some(r)) => u8s.push(r),
            (BufElem::F32, Some(r)) => {
                f32s.push(r.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            (_, None) => f32s.push((0..s.len).map(|_| rnd()).collect()),
        }
        ptrs.push(match s.elem {
            BufElem::U8 => u8s.last_mut().unwrap().as_mut_ptr(),
            BufElem::F32 => f32s.last_mut().unwrap().as_mut_ptr() as *mut u8,
        });
    }
    let ctx = Context::create();
    let module = ctx.create_module("bench");
    emit_host(&ctx, &module, g).expect("emit");
    optimize_host(&module).expect("optimize");
    let engine = module.create_jit_execution_engine(OptimizationLevel::Aggressive).expect("JIT");
    // SAFETY: emit_host defines `void sym(ptr, i32, i32)`.
    let kernel = unsafe { engine.get_function::<HostKernel>(&g.symbol()) }.expect("symbol");
    let kernel = unsafe { kernel.into_raw() };
    let ptrs = Ptrs(ptrs);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for tid in 0..threads {
                let p = &ptrs;
                // SAFETY: one pointer per buffer of the right size; threads write disjoint rows.
                s.spawn(move || unsafe { kernel(p.0.as_ptr(), tid, threads) });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    g.flops() / best / 1e9
}

fn main() {
    let size: usize = std::env::args().nth(1).map_or(1024, |s| s.parse().expect("size"));
    println!("host vector width {} lanes, 2 threads, {size}x{size}x{size}", host_vector_width());
    let base = Gemm {
        name: "bench".into(),
        batch: 1,
        m: size,
        n: size,
        k: size,
        ta: false,
        tb: false,
        weight: WeightFormat::F32,
        lora: None,
        epilogue: None,
        precision: kernels::gemm::GemmPrecision::F32,
    };
    for (label, g) in [
        ("matmul f32 (nn)", base.clone()),
        ("matmul f32 (nt)", Gemm { tb: true, ..base.clone() }),
        ("matmul f32 (tn)", Gemm { ta: true, ..base.clone() }),
        (
            "qmatmul nf4 (nt, double quant)",
            Gemm { tb: true, weight: WeightFormat::Nf4 { block: 64, double_quant: Some(256) }, ..base.clone() },
        ),
    ] {
        println!("{label}: {:.1} GFLOP/s", bench(&g, 2));
    }
}
