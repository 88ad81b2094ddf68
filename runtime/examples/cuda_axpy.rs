//! GPU smoke check: probes the CUDA driver, loads `tunec_axpy` from each PTX or cubin file given on the command line
//! (as written by `cargo run -p codegen --example emit_axpy`), runs it on sizes 3, 50, 783 and 2^20 + 1, and compares
//! y + a·x with the host, bit for bit (the kernel rounds the multiply and the add separately, as the host does).
//!
//! `cargo run -p runtime --example cuda_axpy -- target/axpy/axpy_sm90.ptx target/axpy/axpy_sm90.cubin`
//! Exit status: 0 all matched, 1 a mismatch or driver error, 2 no CUDA here.

use std::process::ExitCode;

use cudarc::driver::{CudaContext, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use runtime::cuda_available;

fn run_file(ctx: &std::sync::Arc<CudaContext>, path: &str) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let image = if path.ends_with(".ptx") {
        Ptx::from_src(String::from_utf8(bytes).map_err(|e| format!("{path}: {e}"))?)
    } else {
        Ptx::from_binary(bytes)
    };
    let driver = |what: &'static str| move |e: DriverError| format!("{path}: {what}: {e}");
    let module = ctx.load_module(image).map_err(driver("load module"))?;
    let axpy = module.load_function("tunec_axpy").map_err(driver("load tunec_axpy"))?;
    let stream = ctx.default_stream();
    for n in [3usize, 50, 783, (1 << 20) + 1] {
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.001 - 0.5).collect();
        let y: Vec<f32> = (0..n).map(|i| ((i * 104729) % 1000) as f32 * 0.002 - 1.0).collect();
        let a = 1.7f32;
        let x_dev = stream.clone_htod(&x).map_err(driver("copy x"))?;
        let mut y_dev = stream.clone_htod(&y).map_err(driver("copy y"))?;
        let n_arg = n as i32;
        // Launch more threads than elements so the bounds check matters.
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(256) + 1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(&axpy);
        launch.arg(&mut y_dev).arg(&x_dev).arg(&a).arg(&n_arg);
        // SAFETY: tunec_axpy(float* y, const float* x, float a, i32 n) with y and x of n elements each.
        unsafe { launch.launch(cfg) }.map_err(driver("launch"))?;
        let got = stream.clone_dtoh(&y_dev).map_err(driver("copy back"))?;
        let mismatches = (0..n).filter(|&i| got[i].to_bits() != (y[i] + a * x[i]).to_bits()).count();
        if mismatches > 0 {
            let i = (0..n).find(|&i| got[i].to_bits() != (y[i] + a * x[i]).to_bits()).unwrap_or(0);
            return Err(format!(
                "{path}: n={n}: {mismatches} mismatches, first at {i}: {} vs {}",
                got[i],
                y[i] + a * x[i]
            ));
        }
        println!("{path}: n={n}: all {n} elements match the host bit for bit");
    }
    Ok(())
}

fn main() -> ExitCode {
    let info = match cuda_available() {
        Ok(info) => info,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "device {}: {} (sm_{}), {:.1} GiB",
        info.ordinal,
        info.name,
        info.sm(),
        info.total_memory_bytes as f64 / (1u64 << 30) as f64
    );
    let ctx = match CudaContext::new(info.ordinal) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("creating a context: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    for path in std::env::args().skip(1) {
        if let Err(e) = run_file(&ctx, &path) {
            eprintln!("FAIL {e}");
            ok = false;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
