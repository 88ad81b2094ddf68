//! Runs the kernel cases written by `codegen`'s `dump_gpu_cases` example on the GPU: for each case, loads its PTX
//! for the device's architecture, uploads the input buffers, launches (the case's own grid and block when it gives
//! them — GEMM and transformer-op templates; else elementwise kernels: 256-thread blocks, grid-stride; row kernels:
//! one 256-thread block per row), and compares every output with the reference
//! interpreter's within atol 1e-5 + rtol 1e-4·|ref| (the GPU contracts multiply-adds into FMAs), or the tolerance
//! the case gives (`tolerance ATOL RTOL`: bf16 tensor-core GEMMs, 1e-4 + 1e-3·|ref|). Prints a table.
//!
//! `cargo run --release -p runtime --example gpu_check -- target/gpucheck`
//! Exit status: 0 all matched, 1 a mismatch or driver error, 2 no CUDA here.

use std::path::Path;
use std::process::ExitCode;

use cudarc::driver::{CudaContext, CudaSlice, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use runtime::cuda_available;

enum Buf {
    F(CudaSlice<f32>),
    I(CudaSlice<i32>),
    U(CudaSlice<u8>),
    S(CudaSlice<u64>),
}

fn read_f32(p: &Path) -> Result<Vec<f32>, String> {
    let b = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn run_case(ctx: &std::sync::Arc<CudaContext>, dir: &Path, sm: u32) -> Result<(String, f64, usize), String> {
    let meta = std::fs::read_to_string(dir.join("meta.txt")).map_err(|e| e.to_string())?;
    let field = |k: &str| -> Vec<String> {
        meta.lines()
            .find(|l| l.starts_with(&format!("{k} ")))
            .map_or(vec![], |l| l.split_whitespace().skip(1).map(str::to_string).collect())
    };
    let symbol = field("symbol").first().cloned().ok_or("no symbol")?;
    let kernel = field("kernel").join(" ");
    let n_in: usize = field("inputs")[0].parse().map_err(|_| "bad inputs")?;
    let it = field("iteration");
    let arch = if sm >= 90 { 90 } else { 80 };
    let ptx = std::fs::read_to_string(dir.join(format!("sm{arch}.ptx"))).map_err(|e| e.to_string())?;
    let module = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| format!("{kernel}: load: {e}"))?;
    let f = module.load_function(&symbol).map_err(|e| format!("{kernel}: {symbol}: {e}"))?;
    let stream = ctx.default_stream();
    let mut bufs = vec![];
    let mut expected = vec![];
    for line in meta.lines().filter(|l| l.starts_with("buffer ")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (b, elem, n): (usize, &str, usize) = (w[1].parse().unwrap_or(0), w[2], w[3].parse().unwrap_or(0));
        let file = dir.join(format!("b{b}.bin"));
        let e = |e: cudarc::driver::DriverError| format!("{kernel}: buffer {b}: {e}");
        if b < n_in {
            bufs.push(match elem {
                "i32" => {
                    let bytes = std::fs::read(&file).map_err(|e| e.to_string())?;
                    let v: Vec<i32> =
                        bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                    Buf::I(stream.clone_htod(&v).map_err(e)?)
                }
                "u8" => Buf::U(stream.clone_htod(&std::fs::read(&file).map_err(|e| e.to_string())?).map_err(e)?),
                _ => Buf::F(stream.clone_htod(&read_f32(&file)?).map_err(e)?),
            });
        } else {
            expected.push(read_f32(&file)?);
            // Outputs the kernel accumulates into start at zero; the others at NaN, so unwritten elements show.
            let init = if field("zero").contains(&b.to_string()) { 0.0 } else { f32::NAN };
            bufs.push(Buf::F(stream.clone_htod(&vec![init; n]).map_err(e)?));
        }
    }
    // Run-time constants (dropout seeds) follow the buffers as one more pointer.
    let seeds: Vec<u64> = field("seeds").iter().filter_map(|s| s.parse().ok()).collect();
    if !seeds.is_empty() {
        bufs.push(Buf::S(stream.clone_htod(&seeds).map_err(|e| format!("{kernel}: seeds: {e}"))?));
    }
    let launch_field = field("launch");
    let cfg = match it.first().map(String::as_str) {
        _ if launch_field.len() == 3 => {
            let n = |i: usize| launch_field[i].parse::<u32>().map_err(|_| "bad launch");
            LaunchConfig { grid_dim: (n(0)?, n(1)?, 1), block_dim: (n(2)?, 1, 1), shared_mem_bytes: 0 }
        }
        Some("rows") => {
            let rows: u32 = it[1].parse().map_err(|_| "bad rows")?;
            LaunchConfig { grid_dim: (rows.clamp(1, 65535), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
        }
        _ => {
            let len: u32 = it[1].parse().map_err(|_| "bad len")?;
            LaunchConfig {
                grid_dim: (len.div_ceil(256).clamp(1, 65535), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            }
        }
    };
    let mut launch = stream.launch_builder(&f);
    for b in &mut bufs {
        match b {
            Buf::F(s) => launch.arg(s),
            Buf::I(s) => launch.arg(s),
            Buf::U(s) => launch.arg(s),
            Buf::S(s) => launch.arg(s),
        };
    }
    // SAFETY: the kernel takes one pointer per buffer, in this order, each with the element count written in meta.
    unsafe { launch.launch(cfg) }.map_err(|e| format!("{kernel}: launch: {e}"))?;
    // A case may give its own tolerance (`tolerance ATOL RTOL`: the bf16 tensor-core GEMMs).
    let tol_field = field("tolerance");
    let (atol, rtol) = match (tol_field.first(), tol_field.get(1)) {
        (Some(a), Some(r)) => {
            (a.parse::<f64>().map_err(|_| "bad tolerance")?, r.parse::<f64>().map_err(|_| "bad tolerance")?)
        }
        _ => (1e-5, 1e-4),
    };
    let (mut worst, mut bad) = (0.0f64, 0usize);
    for (b, want) in bufs[n_in..].iter().zip(&expected) {
        let Buf::F(s) = b else { continue };
        let got = stream.clone_dtoh(s).map_err(|e| format!("{kernel}: copy back: {e}"))?;
        for (&g, &w) in got.iter().zip(want) {
            let err = (g as f64 - w as f64).abs();
            let tol = atol + rtol * (w as f64).abs();
            if err.partial_cmp(&tol) != Some(std::cmp::Ordering::Less) && err != tol && !(g.is_nan() && w.is_nan()) {
                bad += 1;
            }
            if err.is_finite() {
                worst = worst.max(err / (atol + (w as f64).abs()));
            } else if !(g.is_nan() && w.is_nan()) {
                worst = f64::INFINITY;
            }
        }
    }
    Ok((kernel, worst, bad))
}

fn main() -> ExitCode {
    let info = match cuda_available() {
        Ok(info) => info,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let dir = std::env::args().nth(1).unwrap_or_else(|| "target/gpucheck".into());
    println!("device {}: {} (sm_{})", info.ordinal, info.name, info.sm());
    let ctx = match CudaContext::new(info.ordinal) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("context: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cases: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(r) => r.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("meta.txt").exists()).collect(),
        Err(e) => {
            eprintln!("{dir}: {e}");
            return ExitCode::FAILURE;
        }
    };
    cases.sort();
    let (mut pass, mut fail) = (0, 0);
    println!("{:<5} {:<60} {:>10} {:>8}", "case", "kernel", "max rel", "result");
    for c in &cases {
        let name = c.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        match run_case(&ctx, c, info.sm()) {
            Ok((kernel, worst, 0)) => {
                pass += 1;
                println!("{name:<5} {kernel:<60} {worst:>10.2e} {:>8}", "pass");
            }
            Ok((kernel, worst, bad)) => {
                fail += 1;
                println!("{name:<5} {kernel:<60} {worst:>10.2e} {:>8}", format!("FAIL {bad}"));
            }
            Err(e) => {
                fail += 1;
                println!("{name:<5} ERROR {e}");
            }
        }
    }
    println!("{pass} passed, {fail} failed");
    if fail == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
