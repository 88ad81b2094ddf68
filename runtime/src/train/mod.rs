//! The training loop: AdamW steps of a compiled plan (the update, weight decay and gradient-norm clipping are in the
//! plan's graph) with the runtime feeding the warm-up + cosine learning rate and the step counter, eval loss before
//! training and every N steps, `metrics.jsonl`, a loss plot, atomic checkpoints every N steps and at the end, exact
//! resume, a NaN/inf guard that names the first offending tensor, and the adapter in PEFT's format.
//!
//! **Eval loss** runs the training step on the eval batch with learning rate 0 and restores every trainable
//! parameter and optimizer state afterwards (the plan holds one program, the training step; with lr 0 AdamW leaves
//! the parameters as they are but moves its moments, which the restore undoes). The loss is the forward loss of the
//! current parameters; LoRA dropout, when the recipe has it, stays on, as in the training loss.
//!
//! **Gradient accumulation** (the plan's `train.grad_accum` k > 1): one optimizer step is k micro-steps, each on
//! the next batch, with the step's learning rate and `opt_step`, a distinct dropout `step` (the 1-based global
//! micro-step counter) and `accum_apply` 1 on the last micro-step only: the plan's graph sums the gradients into its
//! `optimizer.<param>.grad_acc` states and applies AdamW to their mean on that micro-step (`passes::adamw`). The
//! logged loss is the mean of the k micro-losses, the gradient norm that of the applying micro-step (the norm of the
//! mean gradient), tokens/s counts all k batches; steps, eval, checkpoints and `stop_after` count optimizer steps, so
//! checkpoints fall where every accumulator is zero.
//!
//! **Reproducibility**: dropout masks derive from the recipe's seeds and the step counter, the data order from the
//! data seed and the iterator position, AdamW's state is checkpointed: a resumed run computes exactly what the
//! uninterrupted run computes.

pub mod adapter;
pub mod checkpoint;
pub mod interp;
pub mod metrics;
pub mod random;
pub mod schedule;
pub mod source;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Instant;

use ir::plan::Plan;
use ir::{Role, ValueId};

use crate::cpu::CpuBackend;
use checkpoint::{Checkpoint, CheckpointMeta};
use metrics::{MetricsLog, Record};
use schedule::Schedule;

/// Named f32 tensors: (name, shape, values).
pub type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// One micro-batch in the plan's input shapes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// `[micro_batch, seq_len]` row-major.
    pub input_ids: Vec<i32>,
    pub position_ids: Vec<i32>,
    pub segment_ids: Vec<i32>,
    /// `[micro_batch · seq_len]`, −100 where no loss is taken.
    pub labels: Vec<i32>,
}

impl Batch {
    /// Tokens that carry a label.
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l >= 0).count()
    }
}

/// Where batches come from (the data module implements it).
pub trait DataSource {
    /// The next training batch (the iterator wraps around epochs).
    fn next_batch(&mut self) -> Result<Batch, String>;
    /// The held-out batches, in a fixed order.
    fn eval_batches(&self) -> Vec<Batch>;
    /// The iterator's position, to store in a checkpoint.
    fn position(&self) -> serde_json::Value;
    /// Continues from a stored position.
    fn restore(&mut self, position: &serde_json::Value) -> Result<(), String>;
}

/// The scalar inputs of one micro-step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInputs {
    pub lr: f32,
    /// The 1-based optimizer step (`opt_step`, AdamW's bias correction).
    pub opt_step: u64,
    /// The 1-based global micro-step counter (the dropout masks' `step`); `opt_step` without accumulation.
    pub micro_step: u64,
    /// Whether this micro-step applies the update (`accum_apply`; plans without accumulation always apply).
    pub apply: bool,
}

impl StepInputs {
    /// A whole optimizer step (no accumulation): micro-step = optimizer step, applied.
    pub fn step(lr: f32, step: u64) -> StepInputs {
        StepInputs { lr, opt_step: step, micro_step: step, apply: true }
    }
}

/// The name of the plan input that says whether a micro-step applies the update (`passes::adamw::ACCUM_APPLY`).
pub const ACCUM_APPLY: &str = "accum_apply";

/// What the loop needs from a backend.
pub trait StepBackend {
    /// Sets the step's inputs (the batch, the learning rate and the 1-based optimizer step).
    fn set_inputs(&mut self, b: &Batch, lr: f32, step: u64) -> Result<(), String>;
    /// Sets one micro-step's inputs. The default serves backends that do not run gradient accumulation: a whole
    /// optimizer step is `set_inputs`, a micro-step of an accumulating plan is refused.
    fn set_step_inputs(&mut self, b: &Batch, s: StepInputs) -> Result<(), String> {
        if s.micro_step != s.opt_step || !s.apply {
            return Err("this backend does not run gradient accumulation (grad_accum > 1) yet".into());
        }
        self.set_inputs(b, s.lr, s.opt_step)
    }
    /// Runs the training step: (loss, gradient norm).
    fn run_step(&mut self) -> Result<(f32, Option<f32>), String>;
    /// Every trainable parameter and optimizer state: (name, shape, values).
    fn state(&self) -> Result<Tensors, String>;
    /// Overwrites a parameter or state.
    fn set_state(&mut self, name: &str, data: &[f32]) -> Result<(), String>;
    /// After a non-finite loss, with the step's starting state restored: which tensor is the first to hold a
    /// non-finite value (a parameter, an input, or a kernel's result, in execution order).
    fn first_nonfinite(&mut self) -> Result<Option<String>, String>;
}

/// What the loop needs of a backend that runs a plan (the cpu and cuda backends), with their own error types
/// turned into messages: the shared parts of their [`StepBackend`] implementations are written once against it.
pub trait PlanBackend {
    fn has_input(&self, name: &str) -> bool;
    fn put_input_i32(&mut self, name: &str, data: &[i32]) -> Result<(), String>;
    fn put_input_f32(&mut self, name: &str, data: &[f32]) -> Result<(), String>;
    fn param_bindings(&self) -> Vec<ir::plan::ParamBinding>;
    fn get_param_f32(&self, name: &str) -> Result<Vec<f32>, String>;
    fn put_param_f32(&mut self, name: &str, data: &[f32]) -> Result<(), String>;
    /// Runs one step of the plan.
    fn run_plan_step(&mut self) -> Result<crate::StepOutputs, String>;
    /// Reruns the step to name the first kernel result holding a non-finite value, where the backend can look
    /// inside a step (a message saying it cannot, otherwise).
    fn nonfinite_kernel(&mut self) -> Result<Option<String>, String>;
}

/// [`PlanBackend`] for a backend whose inherent methods have the usual names (`set_input_*`, `params`,
/// `param_f32`, `set_param_f32`, `step`), their errors turned into messages; `nonfinite_kernel` is given.
macro_rules! plan_backend {
    ($t:ty, $nonfinite_kernel:item) => {
        impl $crate::train::PlanBackend for $t {
            fn has_input(&self, name: &str) -> bool {
                self.inputs().any(|i| i.name == name)
            }
            fn put_input_i32(&mut self, name: &str, data: &[i32]) -> Result<(), String> {
                self.set_input_i32(name, data).map_err(|e| e.to_string())
            }
            fn put_input_f32(&mut self, name: &str, data: &[f32]) -> Result<(), String> {
                self.set_input_f32(name, data).map_err(|e| e.to_string())
            }
            fn param_bindings(&self) -> Vec<ir::plan::ParamBinding> {
                self.params().cloned().collect()
            }
            fn get_param_f32(&self, name: &str) -> Result<Vec<f32>, String> {
                self.param_f32(name).map_err(|e| e.to_string())
            }
            fn put_param_f32(&mut self, name: &str, data: &[f32]) -> Result<(), String> {
                self.set_param_f32(name, data).map_err(|e| e.to_string())
            }
            fn run_plan_step(&mut self) -> Result<$crate::StepOutputs, String> {
                self.step().map_err(|e| e.to_string())
            }
            $nonfinite_kernel
        }
    };
}
pub(crate) use plan_backend;

/// Every plan backend is a training-loop backend.
impl<T: PlanBackend> StepBackend for T {
    fn set_inputs(&mut self, b: &Batch, lr: f32, step: u64) -> Result<(), String> {
        self.set_step_inputs(b, StepInputs::step(lr, step))
    }

    fn set_step_inputs(&mut self, b: &Batch, s: StepInputs) -> Result<(), String> {
        set_plan_inputs(self, b, s)
    }

    fn run_step(&mut self) -> Result<(f32, Option<f32>), String> {
        let o = self.run_plan_step()?;
        Ok((o.loss().unwrap_or(f32::NAN), o.metric("grad_norm")))
    }

    fn state(&self) -> Result<Tensors, String> {
        plan_state(self)
    }

    fn set_state(&mut self, name: &str, data: &[f32]) -> Result<(), String> {
        self.put_param_f32(name, data)
    }

    fn first_nonfinite(&mut self) -> Result<Option<String>, String> {
        match nonfinite_param(self) {
            Some(p) => Ok(Some(p)),
            None => self.nonfinite_kernel(),
        }
    }
}

/// One micro-step's inputs into a plan backend: the batch, lr, the optimizer step, the dropout step counter and
/// `accum_apply` (the last two only where the plan has them).
pub fn set_plan_inputs(be: &mut dyn PlanBackend, b: &Batch, s: StepInputs) -> Result<(), String> {
    be.put_input_i32("input_ids", &b.input_ids)?;
    be.put_input_i32("labels", &b.labels)?;
    for (name, data) in [("position_ids", &b.position_ids), ("segment_ids", &b.segment_ids)] {
        if be.has_input(name) {
            be.put_input_i32(name, data)?;
        }
    }
    be.put_input_f32("lr", &[s.lr])?;
    be.put_input_i32("opt_step", &[s.opt_step as i32])?;
    // The dropout masks' step counter (present when the recipe has dropout).
    if be.has_input("step") {
        be.put_input_i32("step", &[s.micro_step as i32])?;
    }
    // Gradient accumulation (present when the recipe's grad_accum > 1).
    if be.has_input(ACCUM_APPLY) {
        be.put_input_f32(ACCUM_APPLY, &[if s.apply { 1.0 } else { 0.0 }])?;
    }
    Ok(())
}

/// Every trainable parameter and optimizer state of a plan backend.
pub fn plan_state(be: &dyn PlanBackend) -> Result<Tensors, String> {
    let mut out = vec![];
    for p in be.param_bindings().into_iter().filter(|p| matches!(p.role, Role::Trainable | Role::State)) {
        let d = be.get_param_f32(&p.name)?;
        out.push((p.name, p.shape, d));
    }
    Ok(out)
}

/// The first parameter of a plan backend holding a non-finite value, described.
pub fn nonfinite_param(be: &dyn PlanBackend) -> Option<String> {
    for p in be.param_bindings() {
        if let Ok(d) = be.get_param_f32(&p.name) {
            if let Some(i) = d.iter().position(|x| !x.is_finite()) {
                return Some(format!("parameter `{}` holds {} at element {i}", p.name, d[i]));
            }
        }
    }
    None
}

plan_backend!(
    CpuBackend,
    /// The cpu backend reruns the step kernel by kernel and checks every kernel's results.
    fn nonfinite_kernel(&mut self) -> Result<Option<String>, String> {
        let kernels: Vec<ir::Kernel> = self.graph().kernels.clone();
        let mut found: Option<String> = None;
        self.step_each(|k, cpu| {
            if found.is_some() {
                return;
            }
            for &v in &kernels[k].nodes {
                if let Some(d) = cpu.value_f32(v) {
                    if let Some(i) = d.iter().position(|x| !x.is_finite()) {
                        found = Some(describe(cpu.graph(), v, &kernels[k].name, d[i], i));
                        return;
                    }
                }
            }
        })
        .map_err(|e| e.to_string())?;
        Ok(found)
    }
);

fn describe(g: &ir::Graph, v: ValueId, kernel: &str, x: f32, i: usize) -> String {
    let n = g.node(v);
    let label = n.label.as_deref().map(|l| format!(" of `{l}`")).unwrap_or_default();
    format!("{v} = {}{label} : {} (kernel `{kernel}`) holds {x} at element {i}", n.op.mnemonic(), n.ty)
}

/// How a run is set up.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub out: PathBuf,
    /// Optimizer steps in total (a resumed run continues up to this).
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    /// Eval every N steps (0: only before and after training).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: u64,
    pub seed: u64,
    pub resume: bool,
    /// `base_model_name_or_path` in the adapter's config.
    pub base_model: String,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Stop after this many steps of this invocation (for tests of resume); `None` runs to `steps`.
    pub stop_after: Option<u64>,
    /// Keep the newest N checkpoints (0: all); the one a run resumed from is never deleted.
    pub keep_checkpoints: usize,
}

/// `--keep-checkpoints`' default.
pub const DEFAULT_KEEP_CHECKPOINTS: usize = 3;

impl TrainOptions {
    /// Checks the run's settings against `ir::settings::TRAIN_RULES` (and `steps × grad_accum` against the plan's
    /// step counter), naming the setting: the command line and library callers get the same rules as a recipe.
    pub fn validate(&self, grad_accum: u64) -> Result<(), String> {
        use ir::settings::{check_f64, check_int, check_train_cross, TRAIN_RULES};
        let flag = |f: &str, e: ir::settings::SettingError| format!("{f}: expected {}, found {}", e.expected, e.found);
        check_f64(TRAIN_RULES, "lr", self.lr).map_err(|e| flag("--lr (the peak learning rate)", e))?;
        check_int(TRAIN_RULES, "steps", self.steps as i128).map_err(|e| flag("--steps", e))?;
        check_int(TRAIN_RULES, "warmup_steps", self.warmup as i128).map_err(|e| flag("--warmup", e))?;
        check_int(TRAIN_RULES, "eval_every", self.eval_every as i128).map_err(|e| flag("--eval-every", e))?;
        check_int(TRAIN_RULES, "save_every", self.save_every as i128).map_err(|e| flag("--save-every", e))?;
        check_train_cross(self.steps, grad_accum).map_err(|e| flag("--steps", e))
    }
}

/// What a checkpoint records of the plan, to refuse resuming another plan's: the recipe, the model's config, the
/// adapter and the batch shape. (Not the graph itself: the same recipe compiled for another target or backend resumes.)
pub fn plan_identity(plan: &Plan) -> String {
    let t = &plan.train;
    let model: Vec<String> = plan.model_config.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let adapter = plan.peft.as_ref().map_or("none".to_string(), |a| {
        format!(
            "{} r={} alpha={:?} rslora={} dora={} targets={}",
            a.method,
            a.r,
            a.alpha,
            a.use_rslora,
            a.use_dora,
            a.target_modules.join(",")
        )
    });
    format!(
        "recipe {}; model {}; adapter {adapter}; seq_len {} micro_batch {} grad_accum {}",
        plan.recipe,
        model.join(" "),
        t.seq_len,
        t.micro_batch,
        t.grad_accum
    )
}

/// The first non-finite value among `tensors`, described.
fn first_nonfinite_tensor(tensors: &Tensors) -> Option<String> {
    tensors.iter().find_map(|(n, _, d)| {
        let i = d.iter().position(|x| !x.is_finite())?;
        Some(format!("`{n}` holds {} at element {i}", d[i]))
    })
}

/// Reads and checks the newest checkpoint; when it is bad, says which older one is intact.
fn read_for_resume(path: &std::path::Path, want: &checkpoint::Expected) -> Result<Checkpoint, String> {
    let max = want.max_file_bytes().ok_or("the plan's tensors overflow a checkpoint's size")?;
    let read = |p: &std::path::Path| -> Result<Checkpoint, checkpoint::CheckpointError> {
        let ck = Checkpoint::read_bounded(p, max)?;
        ck.check_against(p, want)?;
        Ok(ck)
    };
    read(path).map_err(|e| {
        let older = checkpoint::list(path.parent().and_then(|d| d.parent()).unwrap_or(std::path::Path::new(".")));
        let good = older.iter().rev().filter(|p| p.as_path() != path).find(|p| read(p).is_ok());
        let hint = match good {
            Some(g) => format!(
                "; the previous checkpoint {} is intact: move {} out of the way and --resume again",
                g.display(),
                path.display()
            ),
            None => "; no older checkpoint is intact: start again without --resume (in a new --out)".to_string(),
        };
        format!("--resume: {e}{hint}")
    })
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainSummary {
    pub first_step: u64,
    pub last_step: u64,
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    pub final_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub adapter_tensors: usize,
}

/// The mean eval loss over the held-out batches (state restored afterwards).
pub fn eval_loss(be: &mut dyn StepBackend, data: &dyn DataSource, step: u64) -> Result<Option<f64>, String> {
    let batches = data.eval_batches();
    if batches.is_empty() {
        return Ok(None);
    }
    let saved = be.state()?;
    // Each batch's loss is the mean over its labelled tokens: weight it by their count.
    let (mut total, mut count) = (0.0f64, 0usize);
    for b in &batches {
        be.set_inputs(b, 0.0, step.max(1))?;
        let n = b.label_tokens();
        let loss = be.run_step()?.0 as f64;
        if n > 0 {
            total += loss * n as f64;
            count += n;
        }
    }
    for (n, _, d) in &saved {
        be.set_state(n, d)?;
    }
    Ok((count > 0).then(|| total / count as f64))
}

/// Trains: see the module docs. `plan` is the compiled step (for its recipe name, adapter settings and shapes).
pub fn train(
    plan: &Plan,
    be: &mut dyn StepBackend,
    data: &mut dyn DataSource,
    opts: &TrainOptions,
) -> Result<TrainSummary, String> {
    opts.validate(plan.train.grad_accum)?;
    std::fs::create_dir_all(&opts.out).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    let metrics_path = opts.out.join("metrics.jsonl");
    // A killed run leaves its temporary files (`.tunec-tmp-*`) behind: remove them.
    let dirs = [opts.out.clone(), opts.out.join("checkpoints"), opts.out.join("adapter")];
    let stale = checkpoint::remove_stale_temp_files(&dirs).map_err(|e| e.to_string())?;
    if stale > 0 {
        eprintln!("removed {stale} temporary file(s) a killed run left under {}", opts.out.display());
    }
    let mut start = 0u64;
    let mut tokens_total = 0u64;
    let mut resumed_from = None;
    if opts.resume {
        match checkpoint::latest(&opts.out) {
            Some(p) => {
                let want = checkpoint::Expected {
                    tensors: plan
                        .params
                        .iter()
                        .filter(|p| matches!(p.role, Role::Trainable | Role::State))
                        .map(|p| (p.name.clone(), p.shape.clone()))
                        .collect(),
                    plan: plan_identity(plan),
                    recipe: plan.recipe.clone(),
                    steps: opts.steps,
                };
                let ck = read_for_resume(&p, &want)?;
                if ck.meta.step > opts.steps {
                    return Err(format!(
                        "--resume: {}: the checkpoint is at step {}, past --steps {}: nothing to train; raise --steps",
                        p.display(),
                        ck.meta.step,
                        opts.steps
                    ));
                }
                for (n, _, d) in &ck.tensors {
                    be.set_state(n, d)?;
                }
                data.restore(&ck.meta.data).map_err(|e| format!("--resume: {}: {e}", p.display()))?;
                start = ck.meta.step;
                tokens_total = ck.meta.tokens;
                // Lines a killed run wrote after its last checkpoint are dropped: they are computed again.
                if let Ok(recs) = metrics::read(&metrics_path) {
                    let kept: Vec<String> = recs
                        .iter()
                        .filter(|r| r.step <= start)
                        .map(|r| serde_json::to_string(r).expect("json"))
                        .collect();
                    let text = if kept.is_empty() { String::new() } else { kept.join("\n") + "\n" };
                    checkpoint::write_atomic(&metrics_path, text.as_bytes()).map_err(|e| e.to_string())?;
                }
                if start == opts.steps {
                    eprintln!("resuming from {} (step {start} = --steps): nothing to train", p.display());
                } else {
                    eprintln!("resuming from {} (step {start})", p.display());
                }
                resumed_from = Some(p);
            }
            None => eprintln!("--resume: no checkpoint under {}; starting from step 0", opts.out.display()),
        }
    } else {
        if let Some(p) = checkpoint::latest(&opts.out) {
            return Err(format!(
                "{} holds a checkpoint of an earlier run ({}): --resume to continue it, or choose another --out (or \
                 remove that folder) to start over",
                opts.out.join("checkpoints").display(),
                p.display()
            ));
        }
        if metrics_path.exists() {
            std::fs::remove_file(&metrics_path).map_err(|e| format!("{}: {e}", metrics_path.display()))?;
        }
    }
    let mut log = MetricsLog::open(&metrics_path).map_err(|e| format!("{}: {e}", metrics_path.display()))?;
    let sched = Schedule { lr: opts.lr, warmup: opts.warmup, total: opts.steps };
    let mut summary = TrainSummary { first_step: start + 1, last_step: start, ..TrainSummary::default() };

    if start == 0 {
        summary.eval_before = eval_loss(be, data, 1)?;
        if let Some(l) = summary.eval_before {
            log.write(&Record { step: 0, eval_loss: Some(l), ..Record::default() }).map_err(|e| e.to_string())?;
        }
    }
    let end = opts.stop_after.map_or(opts.steps, |n| start.saturating_add(n).min(opts.steps));
    let bar = opts.progress.then(|| {
        let pb = indicatif::ProgressBar::new(opts.steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        pb.set_position(start);
        pb
    });
    let t_run = Instant::now();
    let mut run_tokens = 0u64;
    let save = |be: &dyn StepBackend, data: &dyn DataSource, step: u64, tokens: u64| -> Result<(), String> {
        let ck = Checkpoint {
            meta: CheckpointMeta {
                step,
                data: data.position(),
                seed: opts.seed,
                recipe: plan.recipe.clone(),
                tokens,
                plan: plan_identity(plan),
            },
            tensors: be.state()?,
        };
        let path = checkpoint::path_for(&opts.out, step);
        ck.write(&path).map_err(|e| e.to_string())?;
        checkpoint::prune(&opts.out, opts.keep_checkpoints, &path, resumed_from.as_deref())
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    // The trainable parameters and optimizer states before each micro-step (restored to name the culprit when a
    // step goes non-finite); after each, the same is checked for non-finite values.
    let mut current = if start < end { be.state()? } else { vec![] };
    let k = plan.train.grad_accum.max(1);
    for step in start + 1..=end {
        let lr = sched.lr_at(step);
        let (mut loss_sum, mut grad_norm, mut tokens, mut dt) = (0.0f64, None, 0u64, 0.0f64);
        for micro in 0..k {
            let batch = data.next_batch()?;
            let s = StepInputs {
                lr: lr as f32,
                opt_step: step,
                micro_step: (step - 1) * k + micro + 1,
                apply: micro + 1 == k,
            };
            be.set_step_inputs(&batch, s)?;
            let t0 = Instant::now();
            let (loss, norm) = be.run_step()?;
            dt += t0.elapsed().as_secs_f64();
            // A finite loss can still come with a non-finite update (an infinite gradient, a corrupt optimizer
            // state): the parameters and states after the step are checked too.
            let after = if loss.is_finite() { Some(be.state()?) } else { None };
            let bad_update = after.as_ref().and_then(first_nonfinite_tensor);
            if !loss.is_finite() || bad_update.is_some() {
                for (n, _, d) in &current {
                    be.set_state(n, d)?;
                }
                be.set_step_inputs(&batch, s)?;
                let culprit = be.first_nonfinite()?.unwrap_or_else(|| "no tensor of the step holds one".into());
                if let Some(b) = &bar {
                    b.abandon();
                }
                let at = if k > 1 { format!(" (micro-batch {} of {k})", micro + 1) } else { String::new() };
                let what = match bad_update {
                    Some(t) => format!(
                        "the loss is {loss} but after the update {t} (gradient norm {})",
                        norm.map_or("n/a".to_string(), |g| g.to_string())
                    ),
                    None => format!("the loss is {loss}"),
                };
                return Err(format!(
                    "step {step}{at}: {what}; stopped (nothing of this step was saved). First non-finite value: \
                     {culprit}"
                ));
            }
            current = after.unwrap_or_default();
            loss_sum += loss as f64;
            grad_norm = norm;
            tokens += batch.input_ids.len() as u64;
        }
        let loss = loss_sum / k as f64;
        tokens_total += tokens;
        run_tokens += tokens;
        let tps = tokens as f64 / dt;
        let mut rec = Record {
            step,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: grad_norm.map(|g| g as f64),
            tokens_per_s: Some(tps),
            eval_loss: None,
        };
        if opts.eval_every > 0 && step % opts.eval_every == 0 && step != opts.steps {
            rec.eval_loss = eval_loss(be, data, step)?;
        }
        if step == opts.steps {
            rec.eval_loss = eval_loss(be, data, step)?;
            summary.eval_after = rec.eval_loss;
        }
        log.write(&rec).map_err(|e| e.to_string())?;
        summary.final_loss = Some(loss);
        summary.last_step = step;
        if let Some(b) = &bar {
            b.set_position(step);
            b.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {tps:.0} tok/s"));
        }
        if opts.save_every > 0 && step % opts.save_every == 0 || step == end {
            save(be, data, step, tokens_total)?;
        }
    }
    if let Some(b) = &bar {
        b.finish();
    }
    summary.tokens_per_s = run_tokens as f64 / t_run.elapsed().as_secs_f64().max(1e-9);
    if let Ok(recs) = metrics::read(&metrics_path) {
        let svg = metrics::loss_svg(&recs);
        checkpoint::write_atomic(&opts.out.join("loss.svg"), svg.as_bytes()).map_err(|e| e.to_string())?;
    }
    if let Some(settings) = &plan.peft {
        let state = be.state()?;
        summary.adapter_tensors = adapter::write_adapter(&opts.out.join("adapter"), &state, settings, &opts.base_model)
            .map_err(|e| e.to_string())?;
    }
    Ok(summary)
}
