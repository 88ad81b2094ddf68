//! `run`: trains a plan on a data set — the model's weights from an HF directory (or seeded random weights),
//! batches from the data pipeline, the training loop of `crate::train` on a backend — and writes metrics, the loss
//! plot, checkpoints and the PEFT adapter under `--out`.

use std::path::{Path, PathBuf};

use crate::data::{BatchOptions, Dataset, DatasetOptions, EvalSplit, LossOn, PromptFormat, ReadOptions, TextTokenizer};
use crate::train::{source::LoaderSource, train, TrainOptions};
use clap::{Args, ValueEnum};
use ir::plan::Plan;
use ir::Init;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The plan's generated host code on the CPU threads.
    Cpu,
    /// The reference interpreter (slow; for checking).
    Interp,
    /// An NVIDIA GPU (the CUDA backend).
    Cuda,
    /// cuda when a GPU and driver are present, else cpu.
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Template {
    /// Alpaca's prompt template (alpaca records only).
    Alpaca,
    /// The tokenizer's own chat template (tokenizer_config.json).
    Chat,
    /// chat for chat data; alpaca for alpaca data.
    Auto,
}

#[derive(Args)]
pub struct RunArgs {
    /// The plan (`tunec compile <recipe> -o plan.bin`), or a recipe (.rs), compiled for the cpu target on the fly.
    pub plan: PathBuf,
    /// Training data: alpaca JSON array or JSONL (instruction/input/output), or chat JSONL (messages).
    #[arg(long)]
    pub data: PathBuf,
    /// The base model: an HF directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where metrics.jsonl, loss.svg, checkpoints/ and adapter/ go.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Backend,
    /// Optimizer steps [default: the recipe's].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Continue from the newest checkpoint under --out.
    #[arg(long)]
    pub resume: bool,
    /// Peak learning rate [default: the recipe's].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Warm-up steps [default: the recipe's].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Eval every N steps [default: the recipe's; 0: only before and after].
    #[arg(long = "eval-every")]
    pub eval_every: Option<u64>,
    /// Checkpoint every N steps [default: the recipe's; 0: only at the end].
    #[arg(long = "save-every")]
    pub save_every: Option<u64>,
    /// Held-out examples for the eval loss: a fraction (< 1) or a count.
    #[arg(long = "eval-split", default_value = "0.05")]
    pub eval_split: f64,
    /// At most this many eval examples: the examples the split draws past it stay in training.
    #[arg(long = "max-eval", default_value_t = 64)]
    pub max_eval: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub template: Template,
    /// Take the loss on every token, not only the responses.
    #[arg(long = "loss-on-all")]
    pub loss_on_all: bool,
    /// One example per row, padded (default: packed, with attention kept inside each example).
    #[arg(long = "no-packing")]
    pub no_packing: bool,
    /// Skip malformed records (and count them) instead of stopping at the first.
    #[arg(long = "skip-bad")]
    pub skip_bad: bool,
    /// Seeded random frozen weights instead of --model (benchmarking; the tokenizer still comes from --model or
    /// --tokenizer).
    #[arg(long = "random-weights")]
    pub random_weights: bool,
    /// A tokenizer directory when --model is not given.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The run seed [default: the recipe's].
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = crate::cpu::default_threads())]
    pub threads: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub trust: crate::trust::TrustArgs,
    /// Keep the newest N checkpoints under --out/checkpoints (0: all); the one resumed from is never deleted.
    #[arg(long = "keep-checkpoints", default_value_t = crate::train::DEFAULT_KEEP_CHECKPOINTS)]
    pub keep_checkpoints: usize,
}

/// The most threads `--threads` may ask for.
pub const MAX_THREADS: usize = 4096;

/// Checks the command line's numbers before anything is loaded, each against its setting's rule
/// (`ir::settings::TRAIN_RULES`), naming the flag; `TrainOptions::validate` checks the settings in effect again.
fn check_flags(args: &RunArgs) -> Result<(), String> {
    use ir::settings::{check_f64, check_int, TRAIN_RULES};
    let flag =
        |f: &str, e: ir::settings::SettingError| format!("error: {f}: expected {}, found {}", e.expected, e.found);
    if let Some(lr) = args.lr {
        check_f64(TRAIN_RULES, "lr", lr).map_err(|e| flag("--lr (the peak learning rate)", e))?;
    }
    for (f, field, x) in [
        ("--steps", "steps", args.steps),
        ("--warmup", "warmup_steps", args.warmup),
        ("--eval-every", "eval_every", args.eval_every),
        ("--save-every", "save_every", args.save_every),
    ] {
        if let Some(x) = x {
            check_int(TRAIN_RULES, field, x as i128).map_err(|e| flag(f, e))?;
        }
    }
    let split = args.eval_split;
    if !(split.is_finite() && split >= 0.0 && (split < 1.0 || split.fract() == 0.0 && split <= u32::MAX as f64)) {
        return Err(format!(
            "error: --eval-split: expected a fraction in [0, 1) or a whole count of examples (≥ 1), found {split:?}"
        ));
    }
    if !(1..=MAX_THREADS).contains(&args.threads) {
        return Err(format!("error: --threads: expected an integer in [1, {MAX_THREADS}], found {}", args.threads));
    }
    Ok(())
}

/// Compiles a recipe (`.rs`) into a plan: for the cpu target (host code only) or, with `gpu`, the h100 target
/// with PTX. Only the full `tunec` binary can (it links LLVM); the runner reads plan files only.
pub type CompileRecipe<'a> = &'a dyn Fn(&Path, bool) -> Result<Plan, String>;

/// A recipe is compiled here (in memory: nothing to authenticate); a plan file is authenticated before it is decoded.
fn load_plan(
    path: &Path,
    gpu: bool,
    compile: Option<CompileRecipe<'_>>,
    trust: &crate::trust::TrustOptions,
) -> Result<Plan, String> {
    if path.extension().is_some_and(|e| e == "rs") {
        return match compile {
            Some(c) => c(path, gpu),
            None => Err(format!(
                "error: {}: a recipe; this runner executes compiled plans: `tunec compile {} -o plan.bin` first",
                path.display(),
                path.display()
            )),
        };
    }
    let (plan, how) = crate::trust::load_plan(path, trust).map_err(|e| format!("error: {e}"))?;
    if how == crate::trust::Trust::Once {
        eprintln!("warning: {}: running a plan that is not verified (--trust-plan)", path.display());
    }
    Ok(plan)
}

/// Receives one parameter's values.
type SetParam<'a> = dyn FnMut(&str, &[f32]) -> Result<(), String> + 'a;

/// Frozen weights from the model directory (by their HF names), or seeded random ones; `set` receives each.
fn load_weights(set: &mut SetParam<'_>, plan: &Plan, args: &RunArgs, seed: u64) -> Result<(), String> {
    let model = match (&args.model, args.random_weights) {
        (Some(dir), false) => Some(crate::weights::ModelDir::open(dir).map_err(|e| format!("error: --model: {e}"))?),
        (_, true) => None,
        (None, false) => return Err("error: give --model <dir> (an HF model directory) or --random-weights".into()),
    };
    // The plan's model config (the recipe's `llama(LlamaConfig { .. })`) must be the model's: a different
    // rope_theta or norm eps would train silently on the wrong function.
    if let Some(m) = &model {
        m.check_plan(&plan.model_config).map_err(|e| format!("error: --model: {e}"))?;
    }
    for p in plan.params.iter().filter(|p| matches!(p.init, Init::Load)) {
        let n: usize = p.shape.iter().product();
        let data = match &model {
            Some(m) => {
                let t = m.tensor(&p.name).map_err(|e| format!("error: {e}"))?;
                if t.shape != p.shape {
                    return Err(format!(
                        "error: {}: tensor `{}` is {:?} but the recipe expects {:?} (does the recipe match the model's \
                         config.json?)",
                        m.weights_path().display(),
                        ir::untrusted::show(&p.name),
                        t.shape,
                        p.shape
                    ));
                }
                t.data
            }
            None if p.name.contains("norm") => vec![1.0; n],
            None => {
                let s = ir::init::param_seed(seed, &p.name);
                (0..n).map(|i| 0.02 * (2.0 * ir::rng::uniform(s, 3, i as u64) - 1.0)).collect()
            }
        };
        set(&p.name, &data).map_err(|e| format!("error: {e}"))?;
    }
    Ok(())
}

/// Runs `tunec run` (the runner's `run`): `compile` turns a recipe path into a plan when the binary can.
pub fn run(args: &RunArgs, compile: Option<CompileRecipe<'_>>) -> Result<(), String> {
    check_flags(args)?;
    // The backend actually used: auto picks cuda when a driver and a GPU are present.
    let backend = match args.backend {
        Backend::Auto if crate::cuda_available().is_ok() => Backend::Cuda,
        Backend::Auto => Backend::Cpu,
        Backend::Cuda => {
            crate::cuda_available().map_err(|e| format!("error: --backend cuda: {e}"))?;
            Backend::Cuda
        }
        other => other,
    };
    let plan = load_plan(&args.plan, backend == Backend::Cuda, compile, &args.trust.options())?;
    let t = &plan.train;
    let seed = args.seed.unwrap_or(t.seed);
    let tok_dir = args.tokenizer.as_ref().or(args.model.as_ref()).ok_or("error: give --model or --tokenizer")?;
    let (tokenizer, config) = TextTokenizer::from_dir(tok_dir).map_err(|e| format!("error: {e}"))?;

    // Data: records → prompts → tokens and labels → held-out split → batches.
    let read = ReadOptions { layout: None, schema: None, skip_bad: args.skip_bad };
    let records = crate::data::read_records(&args.data, &read).map_err(|e| format!("error: {e}"))?;
    let is_chat = matches!(records.schema, crate::data::Schema::Chat);
    let format = match (args.template, is_chat) {
        (Template::Alpaca, true) => {
            return Err("error: --template alpaca needs alpaca records (instruction/output)".into())
        }
        (Template::Alpaca, false) | (Template::Auto, false) => PromptFormat::Alpaca,
        (Template::Chat, _) | (Template::Auto, true) => {
            let template = crate::data::ChatTemplate::from_config(&config).map_err(|e| format!("error: {e}"))?;
            PromptFormat::Chat(template.ok_or_else(|| {
                format!("error: {}: the tokenizer has no chat_template (use --template alpaca)", tok_dir.display())
            })?)
        }
    };
    let opts = DatasetOptions {
        read,
        loss_on: if args.loss_on_all { LossOn::AllTokens } else { LossOn::Responses },
        seq_len: t.seq_len as usize,
    };
    let mut ds = Dataset::build(records, &format, &tokenizer, &opts).map_err(|e| format!("error: {e}"))?;
    let vocab = crate::train::source::plan_vocab(&plan).map_err(|e| format!("error: {}: {e}", args.plan.display()))?;
    ds.check_vocab(&tokenizer, vocab).map_err(|e| format!("error: {e}"))?;
    let split = if args.eval_split < 1.0 {
        EvalSplit::Fraction(args.eval_split)
    } else {
        EvalSplit::Count(args.eval_split as usize)
    };
    let eval = if args.eval_split > 0.0 {
        ds.split_eval_at_most(split, args.max_eval, seed).map_err(|e| format!("error: {e}"))?
    } else {
        vec![]
    };
    let bopts = BatchOptions {
        micro_batch: t.micro_batch as usize,
        seq_len: t.seq_len as usize,
        packing: !args.no_packing,
        shuffle: true,
        seed,
        pad_id: tokenizer.pad_id(),
        vocab,
    };
    eprintln!("data: {}: {}", ds.report.path.display(), ds.report.partition(ds.examples.len(), eval.len()));
    let mut source = LoaderSource::new(ds.examples, &eval, bopts)?;

    let (mut cpu, mut interp, mut cuda);
    let be: &mut dyn crate::train::StepBackend = if backend == Backend::Cuda {
        cuda = crate::CudaBackend::new(&plan, 0).map_err(|e| format!("error: --backend cuda: {e}"))?;
        load_weights(&mut |n, d| cuda.set_param_f32(n, d).map_err(|e| e.to_string()), &plan, args, seed)?;
        cuda.init_params(seed).map_err(|e| format!("error: {e}"))?;
        &mut cuda
    } else if backend == Backend::Interp {
        interp = crate::train::interp::InterpBackend::new(&plan);
        load_weights(&mut |n, d| interp.set_param_f32(n, d), &plan, args, seed)?;
        interp.init_params(seed).map_err(|e| format!("error: {e}"))?;
        &mut interp
    } else {
        cpu = crate::CpuBackend::new(&plan, args.threads).map_err(|e| format!("error: {e}"))?;
        load_weights(&mut |n, d| cpu.set_param_f32(n, d).map_err(|e| e.to_string()), &plan, args, seed)?;
        cpu.init_params(seed).map_err(|e| format!("error: {e}"))?;
        &mut cpu
    };
    let base_model = args.model.as_ref().map_or("random".to_string(), |m| m.display().to_string());
    let topts = TrainOptions {
        out: args.out.clone(),
        steps: args.steps.unwrap_or(t.steps),
        lr: args.lr.unwrap_or(t.lr),
        warmup: args.warmup.unwrap_or(t.warmup_steps),
        eval_every: args.eval_every.unwrap_or(t.eval_every),
        save_every: args.save_every.unwrap_or(t.save_every),
        seed,
        resume: args.resume,
        base_model,
        progress: !args.quiet,
        stop_after: None,
        keep_checkpoints: args.keep_checkpoints,
    };
    topts.validate(t.grad_accum).map_err(|e| format!("error: {e}"))?;
    let on = if backend == Backend::Cuda {
        "the cuda backend (GPU 0)".to_string()
    } else if backend == Backend::Interp {
        "the interpreter".to_string()
    } else {
        format!("the cpu backend ({} threads)", args.threads)
    };
    eprintln!(
        "training {} on {on}: {} steps of {}{} × {} tokens, lr {:.1e}, warm-up {}",
        plan.recipe,
        topts.steps,
        if t.grad_accum > 1 { format!("{} micro-batches × ", t.grad_accum) } else { String::new() },
        t.micro_batch,
        t.seq_len,
        topts.lr,
        topts.warmup
    );
    let s = train(&plan, be, &mut source, &topts)?;
    let fmt = |x: Option<f64>| x.map_or("n/a".into(), |v| format!("{v:.4}"));
    println!("steps {}..{}: final loss {}", s.first_step, s.last_step, fmt(s.final_loss));
    println!("eval loss before {} → after {}", fmt(s.eval_before), fmt(s.eval_after));
    println!(
        "{:.1} tokens/s; wrote {}/metrics.jsonl, loss.svg, checkpoints/, adapter/ ({} tensors)",
        s.tokens_per_s,
        args.out.display(),
        s.adapter_tensors
    );
    Ok(())
}
