//! `tunec-runner`: runs compiled plans without LLVM — for GPU hosts that take small uploads and have no Rust
//! toolchain. `tunec-runner run plan.bin --data ... --model ... --out ... [--backend cuda]` is `tunec run` on a plan
//! file (recipes must be compiled with the full `tunec` first).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tunec-runner", version, about = "Runs compiled tunec plans (no compiler, no LLVM)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a compiled plan on a data set (as `tunec run`).
    Run(runtime::cli::RunArgs),
}

fn main() -> ExitCode {
    let Cli { command: Command::Run(args) } = Cli::parse();
    match runtime::cli::run(&args, None) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
