//! `tunec-runner`: runs compiled plans without LLVM — for GPU hosts that take small uploads and have no Rust
//! toolchain. `tunec-runner run plan.bin --data ... --model ... --out ... [--backend cuda]` is `tunec run` on a plan
//! file (recipes must be compiled with the full `tunec` first); `tunec-runner bench plan.bin --backend cuda` is
//! `tunec bench`; `tunec-runner trust plan.bin [--sha256 HEX]` is `tunec trust` (a plan is native code: the runner
//! runs only plans signed with this user's key or in the trust list, see `runtime::trust`).

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
    /// Trust a plan compiled elsewhere (as `tunec trust`): records its SHA-256 in the trust list, so that `run` and
    /// `bench` run it. A plan is native code: check where it came from first; `--sha256` refuses a file whose digest
    /// differs from the one its builder printed.
    Trust(runtime::trust::TrustCommand),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run(args) => runtime::cli::run(&args, None),
        Command::Bench(args) => runtime::bench::run(&args),
        Command::Trust(args) => runtime::trust::trust_command(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
