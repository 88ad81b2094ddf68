//! `tunec run`: the runtime's training command (`runtime::cli`), with recipes (`.rs`) compiled on the fly.

use std::path::Path;

use ir::plan::Plan;
pub use runtime::cli::RunArgs;

fn compile(path: &Path, gpu: bool) -> Result<Plan, String> {
    let recipe = frontend::compile_file(path, models::library()).map_err(|d| d.render())?;
    let archs = if gpu { vec![80, 90] } else { vec![] };
    let opts = codegen::build::BuildOptions { archs, ptxas: false, host: true, llvm_ir: false, ..Default::default() };
    crate::plan_source::compile_plan(&recipe, if gpu { "h100" } else { "cpu" }, &opts)
}

pub fn run(args: &RunArgs) -> Result<(), String> {
    runtime::cli::run(args, Some(&compile))
}
