//! Emits the `tunec_axpy` kernel as PTX for each SM given (default 80 and 90), assembles it with ptxas when ptxas is
//! found, writes `axpy_sm<SM>.ptx` / `.cubin` into the output directory, and prints ptxas' resource report.
//!
//! `cargo run -p codegen --example emit_axpy -- target/axpy 80 90`

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use codegen::ptx::emit_ptx;
use codegen::ptxas::{assemble, find_ptxas};
use inkwell::context::Context;
use kernels::emit_axpy_kernel;

fn run(out_dir: &Path, sm: u32) -> Result<(), Box<dyn std::error::Error>> {
    let ctx = Context::create();
    let module = ctx.create_module("axpy");
    emit_axpy_kernel(&ctx, &module)?;
    let ptx = emit_ptx(&module, sm)?;
    let ptx_path = out_dir.join(format!("axpy_sm{sm}.ptx"));
    std::fs::write(&ptx_path, &ptx)?;
    println!("wrote {}", ptx_path.display());
    if find_ptxas().is_none() {
        println!("ptxas not found (run scripts/setup.sh): no cubin for sm_{sm}");
        return Ok(());
    }
    let report = assemble(&ptx, sm)?;
    let cubin_path = out_dir.join(format!("axpy_sm{sm}.cubin"));
    std::fs::write(&cubin_path, &report.cubin)?;
    println!("wrote {}", cubin_path.display());
    for k in &report.kernels {
        println!(
            "  sm_{sm} {}: {} registers, {} B smem, {} B stack, {} B spill stores, {} B spill loads",
            k.name, k.registers, k.shared_bytes, k.stack_frame_bytes, k.spill_store_bytes, k.spill_load_bytes
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let out_dir = PathBuf::from(args.next().unwrap_or_else(|| "target/axpy".into()));
    let mut sms: Vec<u32> = Vec::new();
    for arg in args {
        match arg.parse() {
            Ok(sm) => sms.push(sm),
            Err(_) => {
                eprintln!("not an SM number: {arg} (expected e.g. 80 or 90)");
                return ExitCode::FAILURE;
            }
        }
    }
    if sms.is_empty() {
        sms = vec![80, 90];
    }
    if let Err(e) = std::fs::create_dir_all(&out_dir) {
        eprintln!("{}: {e}", out_dir.display());
        return ExitCode::FAILURE;
    }
    for sm in sms {
        if let Err(e) = run(&out_dir, sm) {
            eprintln!("sm_{sm}: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
