//! Runs a compiled plan's training step on the GPU (the `cuda` backend) and on the host (the `cpu` backend, the
//! reference) with identical seeded weights and inputs, and checks that they agree: per step the two losses and
//! gradient norms, after the last step every trainable parameter and optimizer state within atol 1e-4 + rtol 1e-3
//! (the GPU sums f32 in another order), then times 5 more GPU steps. One exception, reported in its own column: an
//! element of a trainable parameter outside the tolerance whose AdamW moments (`exp_avg`, `exp_avg_sq`) agree and
//! whose difference is at most 4·lr·steps is not a mismatch — where the gradient is tiny, AdamW's update
//! m̂/(sqrt(v̂)+eps) is ill-conditioned and summation order alone moves the element by up to a few lr.
//!
//! `cuda_step PLAN [STEPS]` (STEPS defaults to 3). Needs only the binary and the plan file (which carries its PTX and
//! its host library). Weights and inputs are seeded as `tunec bench` seeds them: frozen weights uniform in ±0.02
//! (norm weights 1), tokens below the vocabulary, positions `0..T`, labels = the tokens, lr 2e-4.
//!
//! Exit status: 0 all agree, 1 a mismatch or an error, 2 no CUDA here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use ir::{Init, Role};
use runtime::train::random::{vocab_of, InputData, RandomData};
use runtime::{CpuBackend, CudaBackend};

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-3;
const TIMED_STEPS: u64 = 5;
/// The learning rate of every step (as `tunec bench`).
const LR: f64 = 2e-4;
/// At most this many lr per step can an ill-conditioned AdamW update move an element differently on the two backends.
const ADAM_STEP_BOUND: f64 = 4.0;

/// Whether `got` is within atol + rtol·|want| of `want` (NaN never is).
fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= ATOL + RTOL * want.abs()
}

/// How one tensor compares: the largest differences, the elements outside the tolerance, the worst element.
struct Row {
    name: String,
    numel: usize,
    abs: f64,
    rel: f64,
    /// Elements outside the tolerance.
    bad: usize,
    /// Elements outside the tolerance only where AdamW's update is ill-conditioned (not counted as mismatches).
    adam: usize,
    worst: usize,
}

fn fmt_opt(x: Option<f32>) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.6}"))
}

fn run(path: &Path, steps: u64) -> Result<bool, String> {
    // A plan is native code: authenticated (signed with this user's key, or in the trust list) before it is decoded.
    let (plan, _) =
        runtime::trust::load_plan(path, &runtime::trust::TrustOptions::default()).map_err(|e| e.to_string())?;
    let data = RandomData { seed: plan.train.seed, lr: LR as f32 };
    let vocab = vocab_of(&plan);
    let tokens_per_step = (plan.train.micro_batch * plan.train.seq_len) as usize;

    let t0 = Instant::now();
    let mut gpu = CudaBackend::new(&plan, 0).map_err(|e| format!("cuda backend: {e}"))?;
    let gpu_load = t0.elapsed().as_secs_f64();
    let mut cpu = CpuBackend::new(&plan, 0).map_err(|e| format!("cpu backend: {e}"))?;
    println!(
        "plan {} ({} kernels); device {} (sm_{}), PTX sm_{} loaded in {:.2} s; cpu reference on {} threads",
        plan.recipe,
        plan.kernels.len(),
        gpu.device().name,
        gpu.device().sm(),
        gpu.ptx_arch(),
        gpu_load,
        cpu.threads()
    );

    for p in &plan.params {
        if matches!(p.init, Init::Load) {
            let d = data.frozen(&p.name, p.shape.iter().product());
            cpu.set_param_f32(&p.name, &d).map_err(|e| format!("cpu: {e}"))?;
            gpu.set_param_f32(&p.name, &d).map_err(|e| format!("cuda: {e}"))?;
        }
    }
    cpu.init_params(plan.train.seed).map_err(|e| format!("cpu: {e}"))?;
    gpu.init_params(plan.train.seed).map_err(|e| format!("cuda: {e}"))?;

    let set_inputs = |cpu: Option<&mut CpuBackend>, gpu: &mut CudaBackend, step: u64| -> Result<(), String> {
        let mut cpu = cpu;
        for i in &plan.inputs {
            match data.input(&i.name, &i.shape, i.dtype, step, vocab) {
                InputData::F32(d) => {
                    if let Some(c) = cpu.as_deref_mut() {
                        c.set_input_f32(&i.name, &d).map_err(|e| format!("cpu: {e}"))?;
                    }
                    gpu.set_input_f32(&i.name, &d).map_err(|e| format!("cuda: {e}"))?;
                }
                InputData::I32(d) => {
                    if let Some(c) = cpu.as_deref_mut() {
                        c.set_input_i32(&i.name, &d).map_err(|e| format!("cpu: {e}"))?;
                    }
                    gpu.set_input_i32(&i.name, &d).map_err(|e| format!("cuda: {e}"))?;
                }
            }
        }
        Ok(())
    };

    let mut ok = true;
    println!(
        "{:>4} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "step", "cpu loss", "cuda loss", "cpu gnorm", "cuda gnorm", "cuda ms", "result"
    );
    for step in 1..=steps {
        set_inputs(Some(&mut cpu), &mut gpu, step)?;
        let c = cpu.step().map_err(|e| format!("cpu: step {step}: {e}"))?;
        let t = Instant::now();
        let g = gpu.step().map_err(|e| format!("cuda: step {step}: {e}"))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let pairs = [(c.loss(), g.loss()), (c.metric("grad_norm"), g.metric("grad_norm"))];
        let agree = pairs.iter().all(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => close(*b as f64, *a as f64),
            (None, None) => true,
            _ => false,
        });
        ok &= agree;
        println!(
            "{step:>4} {:>12} {:>12} {:>12} {:>12} {ms:>10.2} {:>10}",
            fmt_opt(c.loss()),
            fmt_opt(g.loss()),
            fmt_opt(c.metric("grad_norm")),
            fmt_opt(g.metric("grad_norm")),
            if agree { "ok" } else { "MISMATCH" }
        );
    }

    // Every trainable parameter and optimizer state after the last step.
    let mut values: std::collections::HashMap<String, (Vec<f32>, Vec<f32>)> = Default::default();
    let compared: Vec<&ir::plan::ParamBinding> =
        plan.params.iter().filter(|p| matches!(p.role, Role::Trainable | Role::State)).collect();
    for p in &compared {
        let want = cpu.param_f32(&p.name).map_err(|e| format!("cpu: {e}"))?;
        let got = gpu.param_f32(&p.name).map_err(|e| format!("cuda: {e}"))?;
        values.insert(p.name.clone(), (want, got));
    }
    // Whether element `i` of the optimizer state `name` agrees (true when there is no such state).
    let state_agrees = |name: &str, i: usize| {
        values.get(name).is_none_or(|(w, g)| i < w.len() && i < g.len() && close(g[i] as f64, w[i] as f64))
    };
    let mut rows: Vec<Row> = vec![];
    for p in &compared {
        let (want, got) = &values[&p.name];
        let moments = [format!("optimizer.{}.exp_avg", p.name), format!("optimizer.{}.exp_avg_sq", p.name)];
        let has_moments = moments.iter().all(|m| values.contains_key(m));
        let mut row = Row { name: p.name.clone(), numel: want.len(), abs: 0.0, rel: 0.0, bad: 0, adam: 0, worst: 0 };
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let (g, w) = (g as f64, w as f64);
            let d = (g - w).abs();
            if !close(g, w) {
                // AdamW moves an element by lr·m̂/(sqrt(v̂)+eps) per step: where the gradient is tiny (sqrt(v) near
                // eps, or m cancelling over steps) that ratio is ill-conditioned, and summation order alone moves
                // the element by up to a few lr. Such an element is not counted as a mismatch when its moments agree
                // and the difference is within what AdamW steps can move it.
                if has_moments && moments.iter().all(|m| state_agrees(m, i)) && d <= ADAM_STEP_BOUND * LR * steps as f64
                {
                    row.adam += 1;
                } else {
                    row.bad += 1;
                }
            }
            let d = if d.is_nan() { f64::INFINITY } else { d };
            if d > row.abs {
                row.worst = i;
            }
            row.abs = row.abs.max(d);
            row.rel = row.rel.max(d / w.abs().max(1e-12));
        }
        if got.len() != want.len() {
            row.bad += 1;
        }
        rows.push(row);
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| r.bad > 0).collect();
    let excused: Vec<&Row> = rows.iter().filter(|r| r.adam > 0).collect();
    let mut shown: Vec<&Row> = rows.iter().filter(|r| r.bad + r.adam > 0).collect();
    let mut worst: Vec<&Row> = rows.iter().collect();
    worst.sort_by(|a, b| b.abs.total_cmp(&a.abs));
    for r in worst.into_iter().take(8) {
        if !shown.iter().any(|s| s.name == r.name) {
            shown.push(r);
        }
    }
    shown.sort_by(|a, b| b.abs.total_cmp(&a.abs));
    println!(
        "after step {steps}: {} trainable parameters and optimizer states; {} with elements outside atol {ATOL:e} + \
         rtol {RTOL:e}, {} more only with elements AdamW cannot pin down (moments agree, |diff| <= {ADAM_STEP_BOUND}·lr·steps)",
        rows.len(),
        failed.len(),
        excused.iter().filter(|r| r.bad == 0).count()
    );
    println!(
        "{:<64} {:>8} {:>11} {:>11} {:>6} {:>6}",
        "tensor (largest abs diff first)", "numel", "max abs", "max rel", "bad", "adamw"
    );
    for r in &shown {
        println!("{:<64} {:>8} {:>11.3e} {:>11.3e} {:>6} {:>6}", r.name, r.numel, r.abs, r.rel, r.bad, r.adam);
    }
    // For a parameter outside the tolerance: its worst element with its AdamW moments.
    for r in rows.iter().filter(|r| r.bad + r.adam > 0).take(8) {
        let (Some((want, got)), Some((m, mg)), Some((v, _))) = (
            values.get(&r.name),
            values.get(&format!("optimizer.{}.exp_avg", r.name)),
            values.get(&format!("optimizer.{}.exp_avg_sq", r.name)),
        ) else {
            continue;
        };
        let i = r.worst;
        println!(
            "  {}[{i}]: cpu {:.6e}, cuda {:.6e}; exp_avg cpu {:.3e} cuda {:.3e}, sqrt(exp_avg_sq) {:.3e}",
            r.name,
            want[i],
            got[i],
            m[i],
            mg[i],
            v[i].sqrt()
        );
    }
    ok &= failed.is_empty();

    // Timing: more GPU steps on new inputs.
    let mut times = vec![];
    for step in steps + 1..=steps + TIMED_STEPS {
        set_inputs(None, &mut gpu, step)?;
        let t = Instant::now();
        gpu.step().map_err(|e| format!("cuda: step {step}: {e}"))?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "cuda: {TIMED_STEPS} timed steps, median {:.3} ms (min {:.3} ms), {:.0} tokens/s ({tokens_per_step} tokens per step)",
        median * 1e3,
        times[0] * 1e3,
        tokens_per_step as f64 / median
    );
    println!("{}", if ok { "PASS: cuda matches cpu" } else { "FAIL: cuda differs from cpu" });
    Ok(ok)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next().map(PathBuf::from) else {
        eprintln!("usage: cuda_step PLAN [STEPS]");
        return ExitCode::FAILURE;
    };
    let steps: u64 = match args.next().map(|s| s.parse()) {
        None => 3,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => {
            eprintln!("STEPS must be a positive integer");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = runtime::cuda_available() {
        eprintln!("{e}");
        return ExitCode::from(2);
    }
    match run(&path, steps) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
