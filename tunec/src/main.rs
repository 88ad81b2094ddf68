//! The `tunec` command line: compile recipes to IR and to plans (`-o plan.bin`), inspect plans, check the toolchain.

mod cmd_model;
mod cmd_run;
mod plan_source;

use clap::{Args, Parser, Subcommand, ValueEnum};
use passes::{training_pipeline, PassManager, PipelineOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "tunec",
    version,
    about = "A compiler for parameter-efficient fine-tuning (LoRA, QLoRA, DoRA) of LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a recipe (a Rust-syntax DSL file) into the IR of its whole training step.
    Compile(CompileArgs),
    /// Print a readable summary of a plan file written by `tunec compile -o`, and whether `run`/`bench` trust it.
    Inspect {
        /// The plan, e.g. plan.bin
        plan: PathBuf,
        /// Refuse (exit 1) unless the plan is trusted: signed with your key or in your trust list; checked before
        /// anything past the header is decoded.
        #[arg(long)]
        verify: bool,
    },
    /// Trust a plan compiled elsewhere: records its SHA-256 in your trust list (<config dir>/trusted-plans), so that
    /// `run` and `bench` run it. A plan is native code: check where it came from first.
    Trust(runtime::trust::TrustCommand),
    /// Check the native toolchain: LLVM (NVPTX + host), ptxas, MLIR, and whether a CUDA driver is present.
    Doctor,
    /// Train: a plan (or recipe) on a data set, from an HF model directory; writes metrics, checkpoints and the
    /// PEFT adapter.
    Run(cmd_run::RunArgs),
    Import(cmd_model::ImportArgs),
    Generate(cmd_model::GenerateArgs),
    Merge(cmd_model::MergeArgs),
    /// Time training steps of a plan (seeded random weights and tokens) on the cpu backend, the cuda backend and/or
    /// the reference interpreter; prints a table and writes JSON.
    Bench(runtime::bench::BenchArgs),
}

#[derive(Args)]
struct CompileArgs {
    /// The recipe, e.g. examples/llama2-7b.qlora.rs
    recipe: PathBuf,
    /// With `--emit ptx` / `--emit llvm`: the directory for one file per kernel.
    dir: Option<PathBuf>,
    /// What to print on stdout [default: ir, or none with -o].
    #[arg(long, value_enum)]
    emit: Option<Emit>,
    /// Print the IR after this pass too (repeatable; `input` is the forward graph). Passes: autodiff,
    /// eliminate-frozen-grads, adamw, drop-logits, cse, eqsat, dce, recompute, fuse, schedule.
    #[arg(long = "dump-after", value_name = "PASS")]
    dump_after: Vec<String>,
    /// Write the IR after every pass into this directory (NN-<pass>.tir).
    #[arg(long = "dump-all", value_name = "DIR")]
    dump_all: Option<PathBuf>,
    /// The machine the cost model optimizes for: h100 or cpu.
    #[arg(long, default_value = "h100")]
    target: String,
    /// Activation recompute: auto (chosen against the target's memory), off, or per-block.
    #[arg(long, default_value = "auto")]
    recompute: String,
    /// Print a table of what a step costs, unoptimized vs optimized (stderr).
    #[arg(long)]
    report: bool,
    /// Write the report as JSON to this file.
    #[arg(long = "report-json", value_name = "FILE")]
    report_json: Option<PathBuf>,
    /// Assemble every PTX kernel with ptxas (sm_80 and sm_90) while compiling; `--report` implies it (registers,
    /// shared memory and spills per kernel). Without it the plan's PTX is assembled by the CUDA driver at load.
    #[arg(long = "ptxas")]
    check_ptx: bool,
    /// How GEMMs multiply: f32, or bf16 operands with f32 accumulation (tensor cores on the GPU, `mma.sync`; the
    /// host code rounds the same way). bf16 is QLoRA's usual compute dtype; f32 is the interpreter's arithmetic.
    #[arg(long = "gemm-precision", default_value = "f32", value_parser = ["f32", "bf16"])]
    gemm_precision: String,
    /// Write the plan (graph, kernels, memory plan, bindings, settings) to this file.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    /// The training step (forward + backward + optimizer) after all passes.
    Ir,
    /// The forward graph with the adapters applied, before any pass.
    Forward,
    /// The optimized training step in standard MLIR dialects (func/arith/math/linalg/tensor), verified by MLIR.
    Mlir,
    /// One .ptx file per distinct kernel and architecture into DIR (`--emit ptx DIR`).
    Ptx,
    /// One .ll file (host LLVM IR) per distinct kernel into DIR (`--emit llvm DIR`).
    Llvm,
    /// Only the summary on stderr.
    None,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compile(args) => compile(&args),
        Command::Inspect { plan, verify } => inspect(&plan, verify),
        Command::Trust(args) => runtime::trust::trust_command(&args),
        Command::Doctor => doctor(),
        Command::Run(args) => cmd_run::run(&args),
        Command::Import(args) => cmd_model::import(&args),
        Command::Generate(args) => cmd_model::generate(&args),
        Command::Merge(args) => cmd_model::merge(&args),
        Command::Bench(args) => runtime::bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn compile(args: &CompileArgs) -> Result<(), String> {
    use passes::recompute::RecomputePolicy;
    let CompileArgs {
        recipe: path,
        dir,
        emit,
        dump_after,
        dump_all,
        target,
        recompute,
        report,
        report_json,
        check_ptx,
        gemm_precision,
        output,
    } = args;
    let emit = emit.unwrap_or(if output.is_some() { Emit::None } else { Emit::Ir });
    let report = *report;
    let recompute = match recompute.as_str() {
        "auto" => None,
        "off" => Some(RecomputePolicy::Off),
        "per-block" => Some(RecomputePolicy::PerBlock),
        other => return Err(format!("error: unknown --recompute {other} (auto, off, per-block)")),
    };
    let t0 = Instant::now();
    let recipe = frontend::compile_file(path, models::library()).map_err(|d| d.render())?;
    let t_front = t0.elapsed();
    let mut graph = recipe.forward.clone();
    let opts = plan_source::pipeline_options(&recipe, target, recompute)?;
    let mut pm = PassManager::new(training_pipeline(&opts));
    let known: Vec<&str> = std::iter::once("input").chain(pm.names()).collect();
    for d in dump_after {
        if !known.contains(&d.as_str()) {
            return Err(format!("error: --dump-after {d}: no such pass (passes: {})", known.join(", ")));
        }
        pm.dump_after(d);
    }
    if dump_all.is_some() {
        pm.dump_all();
    }
    pm.run(&mut graph).map_err(|e| format!("error: {e}"))?;
    let total = t0.elapsed();
    if report || report_json.is_some() {
        write_report(&recipe.forward, &graph, &pm, &opts, total.as_secs_f64(), report, report_json.as_deref())?;
    }
    if let Some(dir) = dump_all {
        std::fs::create_dir_all(dir).map_err(|e| format!("error: {}: {e}", dir.display()))?;
        for (i, (pass, text)) in pm.dumps.iter().enumerate() {
            let file = dir.join(format!("{i:02}-{pass}.tir"));
            std::fs::write(&file, text).map_err(|e| format!("error: {}: {e}", file.display()))?;
        }
        eprintln!("wrote {} IR dumps to {}", pm.dumps.len(), dir.display());
    } else {
        for (pass, text) in &pm.dumps {
            println!("// ---- IR after {pass} ----\n{text}");
        }
    }
    let needs_code = output.is_some() || matches!(emit, Emit::Ptx | Emit::Llvm);
    let build = if needs_code {
        let b = codegen::build::build(
            &graph,
            &codegen::build::BuildOptions {
                ptxas: report || *check_ptx,
                llvm_ir: matches!(emit, Emit::Llvm),
                gemm_precision: if gemm_precision == "bf16" {
                    codegen::build::GemmPrecision::Bf16
                } else {
                    codegen::build::GemmPrecision::F32
                },
                ..Default::default()
            },
        )
        .map_err(|e| format!("error: code generation: {e}"))?;
        eprintln!(
            "codegen: {} kernels, {} distinct generated (PTX sm_80 + sm_90{}, host library {} KiB) in {:.2} s; \
             {} kernels await templates",
            graph.kernels.len(),
            b.distinct,
            if report || *check_ptx { " checked by ptxas" } else { "" },
            b.host_library.as_ref().map_or(0, |l| l.len() / 1024),
            b.seconds,
            b.missing.len()
        );
        if report {
            eprintln!("{:<12} {:<52} {:>8} {:>8} {:>10}", "symbol", "first kernel", "regs 80", "regs 90", "spills");
            let mut seen = std::collections::HashSet::new();
            for k in b.kernels.iter().filter(|k| !k.symbol.is_empty() && seen.insert(k.symbol.clone())) {
                let regs = |sm| k.resources.get(&sm).map_or("-".to_string(), |r| r.registers.to_string());
                let spills: u64 = k.resources.values().map(|r| r.spill_store_bytes + r.spill_load_bytes).sum();
                eprintln!("{:<12} {:<52} {:>8} {:>8} {:>10}", k.symbol, k.name, regs(80), regs(90), spills);
            }
        }
        Some(b)
    } else {
        None
    };
    if let (Emit::Ptx | Emit::Llvm, Some(b)) = (emit, &build) {
        let dir =
            dir.as_ref().ok_or("error: --emit ptx|llvm needs a directory: tunec compile <recipe> --emit ptx <dir>")?;
        std::fs::create_dir_all(dir).map_err(|e| format!("error: {}: {e}", dir.display()))?;
        for (i, nest) in b.nests.iter().enumerate() {
            let files: Vec<(String, String)> = if matches!(emit, Emit::Ptx) {
                [80u32, 90]
                    .iter()
                    .map(|&sm| {
                        codegen::build::kernel_ptx(nest, sm).map(|t| (format!("{}.sm_{sm}.ptx", nest.symbol()), t))
                    })
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("error: {e}"))?
            } else {
                let ir = b.kernels.iter().find(|k| k.symbol == nest.symbol()).map(|k| k.llvm_ir.clone());
                vec![(format!("{}.ll", nest.symbol()), ir.unwrap_or_default())]
            };
            for (name, text) in files {
                let f = dir.join(name);
                std::fs::write(&f, text).map_err(|e| format!("error: {}: {e}", f.display()))?;
            }
            let _ = i;
        }
        let manifest: String = b.kernels.iter().map(|k| format!("{}\t{}\n", k.symbol, k.name)).collect();
        std::fs::write(dir.join("kernels.tsv"), manifest).map_err(|e| format!("error: {e}"))?;
        eprintln!("wrote {} kernels to {} (kernels.tsv maps kernel groups to symbols)", b.nests.len(), dir.display());
    }
    if let Some(out) = output {
        let memory = passes::memory::plan(&graph);
        if let Some(warning) = plan_source::memory_warning(&memory, &opts.target) {
            eprintln!("{warning}");
        }
        let mut plan = plan_source::plan_of(&recipe, graph.clone(), &memory, opts.target.name)
            .map_err(|e| format!("error: building the plan: {e}"))?;
        if let Some(b) = &build {
            plan_source::attach_code(&mut plan, b);
        }
        // Signed with the user's key: `run` and `bench` load only plans they can authenticate (a plan is native code).
        let opts = runtime::trust::TrustOptions::default();
        let signed =
            runtime::trust::write_signed(&plan, out, &opts).map_err(|e| format!("error: writing the plan: {e}"))?;
        if signed.created_key {
            eprintln!("created your plan-signing key {} (keep it private)", signed.key_path.display());
        }
        eprintln!(
            "wrote {} ({} bytes, signed with key {})",
            out.display(),
            signed.bytes,
            runtime::trust::hex(&signed.key_id)
        );
    }
    match emit {
        Emit::Ir => print!("{}", ir::text::print(&graph)),
        Emit::Forward => print!("{}", ir::text::print(&recipe.forward)),
        Emit::Mlir => {
            print!("{}", codegen::mlir_export::export_mlir(&graph).map_err(|e| format!("error: MLIR export: {e}"))?)
        }
        Emit::None | Emit::Ptx | Emit::Llvm => {}
    }
    let params = graph.params();
    let count = |role| params.iter().filter(|p| p.2 == role).count();
    eprintln!(
        "{}: {} forward nodes -> {} training-step nodes; {} frozen / {} trainable parameters; front end {:.1} ms, total {:.1} ms",
        path.display(),
        recipe.forward.nodes.len(),
        graph.nodes.len(),
        count(ir::Role::Frozen),
        count(ir::Role::Trainable),
        t_front.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3
    );
    for r in &pm.reports {
        eprintln!(
            "  {:<24} {:>7} -> {:>7} nodes  {:>7.1} ms  {}",
            r.pass,
            r.nodes_before,
            r.nodes_after,
            r.seconds * 1e3,
            r.summary
        );
    }
    Ok(())
}

/// The unoptimized step (naive autodiff w.r.t. every parameter + AdamW, nothing else) next to the optimized one.
fn write_report(
    forward: &ir::Graph,
    optimized: &ir::Graph,
    pm: &PassManager,
    opts: &PipelineOptions,
    compile_seconds: f64,
    print: bool,
    json_path: Option<&std::path::Path>,
) -> Result<(), String> {
    use passes::report::{step_metrics, table};
    let mut naive = forward.clone();
    let naive_passes: Vec<Box<dyn passes::Pass>> = vec![
        Box::new(passes::autodiff::Autodiff { wrt: passes::autodiff::Wrt::AllParams }),
        Box::new(opts.adamw.clone()),
        Box::new(passes::drop_logits::DropLogits),
        Box::new(passes::dce::Dce),
    ];
    PassManager::new(naive_passes).run(&mut naive).map_err(|e| format!("error: {e}"))?;
    let before = step_metrics(&naive, &opts.target);
    let after = step_metrics(optimized, &opts.target);
    if print {
        eprint!("{}", table(&before, &after, &opts.target));
    }
    if let Some(path) = json_path {
        let eqsat: serde_json::Map<String, serde_json::Value> = pm
            .reports
            .iter()
            .filter(|r| r.pass == "eqsat")
            .flat_map(|r| r.metrics.iter())
            .map(|(k, v)| {
                let num = v
                    .parse::<u64>()
                    .map(serde_json::Value::from)
                    .or_else(|_| v.parse::<f64>().map(serde_json::Value::from));
                (k.clone(), num.unwrap_or_else(|_| v.clone().into()))
            })
            .collect();
        let mut j = after.to_json();
        let obj = j.as_object_mut().expect("object");
        obj.insert("eqsat".into(), eqsat.into());
        obj.insert("compile_seconds".into(), compile_seconds.into());
        obj.insert("target".into(), opts.target.name.into());
        obj.insert("unoptimized".into(), before.to_json());
        let passes: Vec<serde_json::Value> = pm
            .reports
            .iter()
            .map(|r| serde_json::json!({"pass": r.pass, "nodes_before": r.nodes_before, "nodes_after": r.nodes_after, "seconds": r.seconds, "summary": r.summary}))
            .collect();
        obj.insert("passes".into(), passes.into());
        let text = serde_json::to_string_pretty(&j).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("error: {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Reads a plan (bounded) and prints its summary and whether `run`/`bench` trust it; with `verify`, refuses an untrusted
/// plan before decoding it. Inspecting decodes data only: no code of the plan is loaded.
fn inspect(path: &std::path::Path, verify: bool) -> Result<(), String> {
    use runtime::trust::{TrustError, TrustOptions};
    let opts = TrustOptions::default();
    let plan_err = |source| format!("error: {}", TrustError::Plan { path: path.into(), source });
    let bytes = ir::plan::read_file(path).map_err(plan_err)?;
    if verify {
        runtime::trust::verify(path, &bytes, &opts).map_err(|e| format!("error: {e}"))?;
    }
    let plan = ir::plan::Plan::from_bytes(&bytes).map_err(plan_err)?;
    println!("{}", plan.summary().trim_end());
    println!("{}", runtime::trust::describe(path, &bytes, &opts));
    Ok(())
}

/// Proves each native piece the build links: a PTX kernel through LLVM's NVPTX backend, assembled by ptxas for
/// sm_80 and sm_90; MLIR built and verified through melior; host code JIT-compiled and run; the CUDA driver probe.
fn doctor() -> Result<(), String> {
    let ctx = codegen::inkwell::context::Context::create();
    let module = ctx.create_module("doctor");
    codegen::kernels::emit_axpy_kernel(&ctx, &module).map_err(|e| format!("error: building the axpy kernel: {e}"))?;
    let mut ok = true;
    for sm in [80, 90] {
        let ptx = codegen::ptx::emit_ptx(&module, sm).map_err(|e| format!("error: NVPTX sm_{sm}: {e}"))?;
        match codegen::ptxas::assemble(&ptx, sm) {
            Ok(r) => {
                let k = r.kernel("tunec_axpy").ok_or("ptxas did not report tunec_axpy")?;
                println!("ptx  sm_{sm}: ok  ({} registers, {} B spilled)", k.registers, k.spill_store_bytes);
            }
            Err(e) => {
                ok = false;
                println!("ptx  sm_{sm}: FAILED  {e}");
            }
        }
    }
    match codegen::mlir::mlir_smoke() {
        Ok(_) => println!("mlir:       ok  (built and verified through melior)"),
        Err(e) => {
            ok = false;
            println!("mlir:       FAILED  {e}");
        }
    }
    match codegen::host::host_jit_smoke(10) {
        Ok(v) => println!(
            "host jit:   ok  ({} on {}, returned {v})",
            codegen::host::host_target_triple(),
            codegen::host::host_cpu_name()
        ),
        Err(e) => {
            ok = false;
            println!("host jit:   FAILED  {e}");
        }
    }
    match runtime::cuda::cuda_available() {
        Ok(d) => println!(
            "cuda:       {} (sm_{}, {:.1} GiB)",
            d.name,
            d.sm(),
            d.total_memory_bytes as f64 / (1u64 << 30) as f64
        ),
        Err(e) => println!("cuda:       not available: {e}"),
    }
    if ok {
        Ok(())
    } else {
        Err("error: the toolchain is incomplete (run `make setup`)".into())
    }
}
