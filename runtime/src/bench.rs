//! `tunec bench` / `tunec-runner bench`: times training steps of a compiled plan on a backend, with seeded random
//! weights and tokens (the shapes are what cost, not the values), prints a table and writes JSON.
//!
//! Besides step time and tokens/s it reports the model FLOP rate and MFU in the accounting of issue 6 — FLOPs per
//! step = tokens · (4·N + 12·L·d·T), N the base model's linear weights including lm_head (forward 2N + backward-dX
//! 2N for the frozen base), attention forward 4·L·d·T plus backward 8·L·d·T per token (PaLM's accounting; LoRA's own
//! FLOPs are not counted) — against the device's nominal dense bf16 peak (H100/H200), the same definition as
//! `tests/bench/gpu_qlora_step.py`; and, on the GPU, the device memory the backend allocated and the peak the driver
//! reports in use.

use std::path::PathBuf;
use std::time::Instant;

use ir::interp::{Env, Precision, Tensor, Value};
use ir::plan::Plan;
use ir::Init;

use crate::train::random::{vocab_of, InputData, RandomData};

/// `bench` on the command line (shared by `tunec` and `tunec-runner`).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The plan, e.g. plan.bin (from `tunec compile ... -o plan.bin`)
    pub plan: PathBuf,
    /// Backends to time: cpu, cuda, interp (the interpreter runs one step).
    #[arg(long = "backend", default_values_t = vec!["cpu".to_string()])]
    pub backends: Vec<String>,
    /// Measured steps (after the warm-up).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Threads of the cpu backend.
    #[arg(long, default_value_t = crate::cpu::default_threads())]
    pub threads: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Time the last step (cpu or cuda) kernel by kernel and print the time per kernel kind and the slowest kernels
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub trust: crate::trust::TrustArgs,
}

/// The model FLOPs of one step of `plan` (see the module docs), or `None` without the model's shape.
pub fn model_flops_per_step(plan: &Plan) -> Option<f64> {
    let cfg = |k: &str| plan.model_config.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.parse::<f64>().ok());
    let (layers, hidden) = (cfg("layers")?, cfg("hidden")?);
    let vocab = vocab_of(plan) as f64;
    // The frozen base's linear weights (the adapters' own factors are not base weights), plus a tied lm_head.
    let mut n: f64 = plan
        .params
        .iter()
        .filter(|p| {
            let base = !p.name.contains("lora_") && p.name.ends_with(".weight");
            base && (p.name.contains("_proj.") || p.name.starts_with("lm_head"))
        })
        .map(|p| p.shape.iter().product::<usize>() as f64)
        .sum();
    if !plan.params.iter().any(|p| p.name.starts_with("lm_head")) {
        n += vocab * hidden;
    }
    let t = plan.train.seq_len as f64;
    let tokens = (plan.train.micro_batch * plan.train.seq_len) as f64;
    Some(tokens * (4.0 * n + 12.0 * layers * hidden * t))
}

/// The nominal dense bf16 peak of a GPU by name (H100 SXM / H200: 989.4 TFLOP/s; PCIe and NVL parts lower), as
/// `tests/bench/gpu_qlora_step.py` has it.
pub fn nominal_bf16_peak(device: &str) -> Option<f64> {
    let d = device.to_ascii_uppercase();
    if d.contains("H100") && d.contains("PCIE") {
        Some(756.5e12)
    } else if d.contains("NVL") && (d.contains("H100") || d.contains("H200")) {
        Some(835.5e12)
    } else if d.contains("H100") || d.contains("H200") {
        Some(989.4e12)
    } else {
        None
    }
}

/// An input's seeded values as the interpreter takes them.
fn value(d: InputData, shape: &[usize]) -> Value {
    match d {
        InputData::F32(v) => Value::F(Tensor::from_f32(shape.to_vec(), &v)),
        InputData::I32(v) => Value::ints(shape.to_vec(), v),
    }
}

/// A step timed kernel by kernel: the time per kernel kind (`matmul`, `attention_bwd`, …) and the slowest kernels.
struct Profile<'a> {
    plan: &'a Plan,
    per: std::collections::BTreeMap<String, (f64, usize)>,
    each: Vec<(f64, usize)>,
    t: Instant,
}

impl<'a> Profile<'a> {
    fn new(plan: &'a Plan) -> Profile<'a> {
        Profile { plan, per: Default::default(), each: vec![], t: Instant::now() }
    }

    /// Kernel `k` finished (the time since the previous one is its).
    fn kernel_done(&mut self, k: usize) {
        let kind = self.plan.kernels[k].name.split(':').next().unwrap_or("").to_string();
        let dt = self.t.elapsed().as_secs_f64();
        let e = self.per.entry(kind).or_default();
        e.0 += dt;
        e.1 += 1;
        self.each.push((dt, k));
        self.t = Instant::now();
    }

    fn print(mut self) {
        let mut rows: Vec<_> = self.per.into_iter().collect();
        rows.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).expect("finite"));
        println!("profile (one step, kernel by kernel): kind, kernels, seconds");
        for (kind, (sec, n)) in rows {
            println!("  {kind:<28} {n:>6} {sec:>9.3}");
        }
        self.each.sort_by(|a, b| b.0.partial_cmp(&a.0).expect("finite"));
        println!("slowest kernels: ms, symbol, name");
        for (dt, k) in self.each.iter().take(12) {
            let c = &self.plan.kernels[*k];
            println!("  {:>8.2}  {:<10} {}", dt * 1e3, c.symbol, c.name);
        }
    }
}

/// One backend's measured steps.
pub struct BenchResult {
    pub backend: String,
    pub threads: usize,
    pub step_seconds: Vec<f64>,
    pub losses: Vec<f32>,
    pub tokens_per_step: usize,
    /// The GPU's name (cuda backend).
    pub device: Option<String>,
    /// Device bytes the backend allocated, and the most the driver reported in use after a step (cuda backend).
    pub allocated_bytes: Option<u64>,
    pub peak_in_use_bytes: Option<u64>,
    /// Seconds to set the (random) weights: generation, NF4 quantization and upload.
    pub load_seconds: f64,
}

impl BenchResult {
    pub fn median(&self) -> f64 {
        let mut t = self.step_seconds.clone();
        t.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
        t[t.len() / 2]
    }
}

/// Runs `warmup + steps` steps of `plan` on `backend` (`cpu`, `cuda` or `interp`). With `profile`, the last cpu or
/// cuda step runs kernel by kernel and the time per kernel kind (`matmul`, `attention_bwd`, …) is printed.
pub fn bench(
    plan: &Plan,
    backend: &str,
    steps: usize,
    warmup: usize,
    threads: usize,
    profile: bool,
) -> Result<BenchResult, String> {
    let data = RandomData { seed: plan.train.seed, lr: 2e-4 };
    let vocab = vocab_of(plan);
    let tokens_per_step = (plan.train.micro_batch * plan.train.seq_len) as usize;
    let mut out = BenchResult {
        backend: backend.to_string(),
        threads,
        step_seconds: vec![],
        losses: vec![],
        tokens_per_step,
        device: None,
        allocated_bytes: None,
        peak_in_use_bytes: None,
        load_seconds: 0.0,
    };
    let t_load = Instant::now();
    match backend {
        "cpu" => {
            let mut be = crate::cpu::CpuBackend::new(plan, threads).map_err(|e| format!("error: {e}"))?;
            data.load_frozen(plan, &mut be).map_err(|e| format!("error: {e}"))?;
            be.init_params(plan.train.seed).map_err(|e| format!("error: {e}"))?;
            out.load_seconds = t_load.elapsed().as_secs_f64();
            for step in 1..=(warmup + steps) as u64 {
                data.set_inputs(plan, &mut be, step).map_err(|e| format!("error: {e}"))?;
                let t0 = Instant::now();
                let last = step as usize == warmup + steps;
                let o = if profile && last {
                    let mut prof = Profile::new(plan);
                    let o = be.step_each(|k, _| prof.kernel_done(k)).map_err(|e| format!("error: step {step}: {e}"))?;
                    prof.print();
                    o
                } else {
                    be.step().map_err(|e| format!("error: step {step}: {e}"))?
                };
                let dt = t0.elapsed().as_secs_f64();
                if step as usize > warmup {
                    out.step_seconds.push(dt);
                    out.losses.push(o.loss().unwrap_or(f32::NAN));
                }
            }
        }
        "cuda" => {
            // The plan's PTX on GPU 0 (step() returns after the device finished the step).
            let mut be = crate::CudaBackend::new(plan, 0).map_err(|e| format!("error: --backend cuda: {e}"))?;
            out.device = Some(be.device().name.clone());
            out.allocated_bytes = Some(be.allocated_bytes());
            data.load_frozen(plan, &mut be).map_err(|e| format!("error: {e}"))?;
            be.init_params(plan.train.seed).map_err(|e| format!("error: {e}"))?;
            out.load_seconds = t_load.elapsed().as_secs_f64();
            for step in 1..=(warmup + steps) as u64 {
                data.set_inputs(plan, &mut be, step).map_err(|e| format!("error: {e}"))?;
                let t0 = Instant::now();
                let o = if profile && step as usize == warmup + steps {
                    let mut prof = Profile::new(plan);
                    let o = be.step_each(|k| prof.kernel_done(k)).map_err(|e| format!("error: step {step}: {e}"))?;
                    prof.print();
                    o
                } else {
                    be.step().map_err(|e| format!("error: step {step}: {e}"))?
                };
                let dt = t0.elapsed().as_secs_f64();
                let in_use = be.memory_in_use().map_err(|e| format!("error: {e}"))?;
                out.peak_in_use_bytes = Some(out.peak_in_use_bytes.unwrap_or(0).max(in_use));
                if step as usize > warmup {
                    out.step_seconds.push(dt);
                    out.losses.push(o.loss().unwrap_or(f32::NAN));
                }
            }
        }
        "interp" => {
            let g = &plan.graph;
            let mut env = Env::default();
            for p in &plan.params {
                let n: usize = p.shape.iter().product();
                let v = if matches!(p.init, Init::Load) {
                    data.frozen(&p.name, n)
                } else {
                    let src = |name: &str| env.params.get(name).cloned();
                    ir::init::materialize(&p.init, &p.name, &p.shape, plan.train.seed, &src)
                        .map_err(|e| format!("error: {e}"))?
                        .to_f32()
                };
                env.params.insert(p.name.clone(), Value::F(Tensor::from_f32(p.shape.clone(), &v)));
            }
            out.load_seconds = t_load.elapsed().as_secs_f64();
            for step in 1..=(warmup + steps) as u64 {
                for i in &plan.inputs {
                    env.inputs
                        .insert(i.name.clone(), value(data.input(&i.name, &i.shape, i.dtype, step, vocab), &i.shape));
                }
                let t0 = Instant::now();
                let vals = ir::interp::run(g, &env, Precision::F32).map_err(|e| format!("error: interpreter: {e}"))?;
                let dt = t0.elapsed().as_secs_f64();
                let loss = g
                    .outputs
                    .iter()
                    .find(|o| matches!(o.kind, ir::OutputKind::Loss))
                    .and_then(|o| vals[o.value.index()].as_f().map(|t| t.data[0] as f32));
                for o in &g.outputs {
                    if let ir::OutputKind::Update(name) = &o.kind {
                        env.params.insert(name.clone(), vals[o.value.index()].clone());
                    }
                }
                if step as usize > warmup {
                    out.step_seconds.push(dt);
                    out.losses.push(loss.unwrap_or(f32::NAN));
                }
            }
        }
        other => return Err(format!("error: unknown backend `{other}` for bench (cpu, cuda, interp)")),
    }
    Ok(out)
}

/// `bench <plan> ...`: runs each backend, prints a table, writes JSON.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    let path = &args.plan;
    // A plan is native code: authenticated before it is decoded (signature or trust list).
    let (plan, how) = crate::trust::load_plan(path, &args.trust.options()).map_err(|e| format!("error: {e}"))?;
    if how == crate::trust::Trust::Once {
        eprintln!("warning: {}: running a plan that is not verified (--trust-plan)", path.display());
    }
    let flops = model_flops_per_step(&plan);
    let gib = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.2}", b as f64 / (1u64 << 30) as f64));
    println!(
        "{:<8} {:>7} {:>5} {:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "backend",
        "threads",
        "steps",
        "median_s",
        "min_s",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "alloc_GiB",
        "peak_GiB",
        "loss"
    );
    let mut rows = vec![];
    for b in &args.backends {
        let (s, w) = if b == "interp" { (args.steps.min(1), 0) } else { (args.steps, args.warmup) };
        let r = bench(&plan, b, s, w, args.threads, args.profile)?;
        let min = r.step_seconds.iter().cloned().fold(f64::INFINITY, f64::min);
        let rate = flops.map(|f| f / r.median());
        let peak = r.device.as_deref().and_then(nominal_bf16_peak);
        let mfu = rate.zip(peak).map(|(x, p)| x / p);
        println!(
            "{:<8} {:>7} {:>5} {:>10.3} {:>10.3} {:>10.1} {:>8} {:>8} {:>9} {:>9} {:>8.4}",
            r.backend,
            r.threads,
            r.step_seconds.len(),
            r.median(),
            min,
            r.tokens_per_step as f64 / r.median(),
            rate.map_or("-".into(), |x| format!("{:.2}", x / 1e12)),
            mfu.map_or("-".into(), |m| format!("{:.1}%", 100.0 * m)),
            gib(r.allocated_bytes),
            gib(r.peak_in_use_bytes),
            r.losses.last().copied().unwrap_or(f32::NAN)
        );
        rows.push(serde_json::json!({
            "backend": r.backend, "threads": r.threads, "device": r.device, "step_seconds": r.step_seconds,
            "median_s": r.median(), "tokens_per_step": r.tokens_per_step,
            "tokens_per_s": r.tokens_per_step as f64 / r.median(), "model_flops_per_step": flops,
            "model_tflops_per_s": rate.map(|x| x / 1e12), "nominal_bf16_peak_tflops": peak.map(|p| p / 1e12),
            "mfu_nominal": mfu, "allocated_bytes": r.allocated_bytes, "peak_in_use_bytes": r.peak_in_use_bytes,
            "load_seconds": r.load_seconds, "losses": r.losses,
        }));
    }
    if let Some(j) = &args.json {
        let doc = serde_json::json!({
            "plan": path.display().to_string(), "recipe": plan.recipe, "seq_len": plan.train.seq_len,
            "micro_batch": plan.train.micro_batch,
            "mfu_definition": "tokens*(4N + 12*L*d*T) per step / median step s / nominal dense bf16 peak; N = base linear weights incl. lm_head",
            "results": rows,
        });
        if let Some(dir) = j.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("error: {}: {e}", dir.display()))?;
        }
        std::fs::write(j, serde_json::to_string_pretty(&doc).expect("json"))
            .map_err(|e| format!("error: {}: {e}", j.display()))?;
        println!("wrote {}", j.display());
    }
    Ok(())
}
