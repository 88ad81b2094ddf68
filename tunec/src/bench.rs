//! `tunec bench`: times training steps of a compiled plan on a backend, with seeded random weights and tokens (the
//! shapes are what cost, not the values), prints a table and writes JSON.

use std::path::Path;
use std::time::Instant;

use ir::interp::{Env, Precision, Tensor, Value};
use ir::plan::Plan;
use ir::Init;
use runtime::train::random::{vocab_of, InputData, RandomData};

/// An input's seeded values as the interpreter takes them.
fn value(d: InputData, shape: &[usize]) -> Value {
    match d {
        InputData::F32(v) => Value::F(Tensor::from_f32(shape.to_vec(), &v)),
        InputData::I32(v) => Value::ints(shape.to_vec(), v),
    }
}

/// One backend's measured steps.
pub struct BenchResult {
    pub backend: String,
    pub threads: usize,
    pub step_seconds: Vec<f64>,
    pub losses: Vec<f32>,
    pub tokens_per_step: usize,
}

impl BenchResult {
    pub fn median(&self) -> f64 {
        let mut t = self.step_seconds.clone();
        t.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
        t[t.len() / 2]
    }
}

/// Runs `warmup + steps` steps of `plan` on `backend` (`cpu` or `interp`). With `profile`, the cpu backend's last
/// step runs kernel by kernel and the time per kernel kind (`matmul`, `attention_bwd`, …) is printed.
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
    let mut out =
        BenchResult { backend: backend.to_string(), threads, step_seconds: vec![], losses: vec![], tokens_per_step };
    match backend {
        "cpu" => {
            let mut be = runtime::cpu::CpuBackend::new(plan, threads).map_err(|e| format!("error: {e}"))?;
            for p in &plan.params {
                if matches!(p.init, Init::Load) {
                    let n: usize = p.shape.iter().product();
                    be.set_param_f32(&p.name, &data.frozen(&p.name, n)).map_err(|e| format!("error: {e}"))?;
                }
            }
            be.init_params(plan.train.seed).map_err(|e| format!("error: {e}"))?;
            for step in 1..=(warmup + steps) as u64 {
                for i in &plan.inputs {
                    match data.input(&i.name, &i.shape, i.dtype, step, vocab) {
                        InputData::F32(d) => be.set_input_f32(&i.name, &d),
                        InputData::I32(d) => be.set_input_i32(&i.name, &d),
                    }
                    .map_err(|e| format!("error: {e}"))?;
                }
                let t0 = Instant::now();
                let last = step as usize == warmup + steps;
                let o = if profile && last {
                    let mut per: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
                    let mut each: Vec<(f64, usize)> = vec![];
                    let mut t = Instant::now();
                    let o = be
                        .step_each(|k, _| {
                            let kind = plan.kernels[k].name.split(':').next().unwrap_or("").to_string();
                            let e = per.entry(kind).or_default();
                            let dt = t.elapsed().as_secs_f64();
                            e.0 += dt;
                            e.1 += 1;
                            each.push((dt, k));
                            t = Instant::now();
                        })
                        .map_err(|e| format!("error: step {step}: {e}"))?;
                    let mut rows: Vec<_> = per.into_iter().collect();
                    rows.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).expect("finite"));
                    println!("profile (one step, kernel by kernel): kind, kernels, seconds");
                    for (kind, (sec, n)) in rows {
                        println!("  {kind:<28} {n:>6} {sec:>9.3}");
                    }
                    each.sort_by(|a, b| b.0.partial_cmp(&a.0).expect("finite"));
                    println!("slowest kernels: ms, symbol, name");
                    for (dt, k) in each.iter().take(12) {
                        let c = &plan.kernels[*k];
                        println!("  {:>8.2}  {:<10} {}", dt * 1e3, c.symbol, c.name);
                    }
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
            let mut be = runtime::CudaBackend::new(plan, 0).map_err(|e| format!("error: --backend cuda: {e}"))?;
            for p in plan.params.iter().filter(|p| matches!(p.init, Init::Load)) {
                let n: usize = p.shape.iter().product();
                be.set_param_f32(&p.name, &data.frozen(&p.name, n)).map_err(|e| format!("error: {e}"))?;
            }
            be.init_params(plan.train.seed).map_err(|e| format!("error: {e}"))?;
            for step in 1..=(warmup + steps) as u64 {
                for i in &plan.inputs {
                    match data.input(&i.name, &i.shape, i.dtype, step, vocab) {
                        InputData::F32(d) => be.set_input_f32(&i.name, &d),
                        InputData::I32(d) => be.set_input_i32(&i.name, &d),
                    }
                    .map_err(|e| format!("error: {e}"))?;
                }
                let t0 = Instant::now();
                let o = be.step().map_err(|e| format!("error: step {step}: {e}"))?;
                let dt = t0.elapsed().as_secs_f64();
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

/// `tunec bench <plan> ...`: runs each backend, prints a table, writes JSON.
pub fn run(
    path: &Path,
    backends: &[String],
    steps: usize,
    warmup: usize,
    threads: usize,
    profile: bool,
    json: Option<&Path>,
) -> Result<(), String> {
    let plan = Plan::read(path).map_err(|e| format!("error: {}: {e}", path.display()))?;
    println!(
        "{:<10} {:>8} {:>7} {:>12} {:>12} {:>12} {:>10}",
        "backend", "threads", "steps", "median_s", "min_s", "tokens/s", "loss"
    );
    let mut rows = vec![];
    for b in backends {
        let (s, w) = if b == "interp" { (steps.min(1), 0) } else { (steps, warmup) };
        let r = bench(&plan, b, s, w, threads, profile)?;
        let min = r.step_seconds.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "{:<10} {:>8} {:>7} {:>12.3} {:>12.3} {:>12.1} {:>10.4}",
            r.backend,
            r.threads,
            r.step_seconds.len(),
            r.median(),
            min,
            r.tokens_per_step as f64 / r.median(),
            r.losses.last().copied().unwrap_or(f32::NAN)
        );
        rows.push(serde_json::json!({
            "backend": r.backend, "threads": r.threads, "step_seconds": r.step_seconds, "median_s": r.median(),
            "tokens_per_step": r.tokens_per_step, "losses": r.losses,
        }));
    }
    if let Some(j) = json {
        let doc = serde_json::json!({ "plan": path.display().to_string(), "recipe": plan.recipe, "results": rows });
        if let Some(dir) = j.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("error: {}: {e}", dir.display()))?;
        }
        std::fs::write(j, serde_json::to_string_pretty(&doc).expect("json"))
            .map_err(|e| format!("error: {}: {e}", j.display()))?;
        println!("wrote {}", j.display());
    }
    Ok(())
}
