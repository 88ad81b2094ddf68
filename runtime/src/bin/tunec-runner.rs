//! `tunec-runner`: runs compiled plans without LLVM — for GPU hosts that take small uploads and have no Rust
//! toolchain. `tunec-runner run plan.bin --data ... --model ... --out ... [--backend cuda]` is `tunec run` on a plan
//! file (recipes must be compiled with the full `tunec` first); `tunec-runner bench plan.bin --backend cuda` is
//! `tunec bench`.

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
    /// Time training steps of a plan with seeded random weights (as `tunec bench`); prints a table, writes JSON.
    Bench(runtime::bench::BenchArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run(args) => runtime::cli::run(&args, None),
        Command::Bench(args) => runtime::bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
