//! The runtime's `cpu` backend runs real plans — built as `tunec compile --target cpu -o` builds them: the training
//! pipeline for the cpu target, the memory plan, codegen's host library — and agrees with the reference interpreter
//! (f32): on small hand-built graphs (rms_norm, an NF4 GEMM, a GEMM, elementwise ops, an update), and on three
//! training steps of the tiny LoRA, QLoRA and DoRA recipes (loss per step; every adapter weight and optimizer state
//! after step 3, within 1e-5 + 1e-4·|ref|). A plan with a kernel that has no host code is refused, naming it.

#[path = "../../tunec/src/plan_source.rs"]
mod plan_source;

use codegen::build::{build, BuildOptions};
use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::plan::{build_plan, Plan, PlanSource, TrainSettings, ValuePlacement};
use ir::{Builder, DType, Graph, Init, Nf4Format, Op, OutputKind, Role, Type, ValueId};
use passes::PassManager;
use runtime::{CpuBackend, RuntimeError};
use std::collections::HashMap;
use tests::compile_example;

/// Host code only: the cpu backend needs no PTX (the CLI also builds PTX for sm_80/sm_90, which changes nothing
/// in the host library).
fn host_only() -> BuildOptions {
    BuildOptions { archs: vec![], ptxas: false, host: true, ..BuildOptions::default() }
}

/// The plan of a tiny recipe for the cpu target, read back from its bytes as a runtime would get it.
fn recipe_plan(example: &str) -> Plan {
    let recipe = compile_example(example);
    let plan = plan_source::compile_plan(&recipe, "cpu", &host_only()).unwrap_or_else(|e| panic!("{example}: {e}"));
    Plan::from_bytes(&plan.to_bytes().unwrap()).unwrap()
}

/// The plan of a hand-built graph: fused, scheduled, memory-planned and compiled like a recipe's step.
fn graph_plan(mut g: Graph) -> Plan {
    let passes: Vec<Box<dyn passes::Pass>> = vec![Box::new(passes::fuse::Fuse), Box::new(passes::schedule::Schedule)];
    PassManager::new(passes).run(&mut g).unwrap();
    let b = build(&g, &host_only()).unwrap();
    assert!(b.missing.is_empty(), "kernels without a template: {:?}", b.missing);
    let memory = passes::memory::plan(&g);
    let (values, buffers) = plan_source::memory_parts(&memory);
    let train = TrainSettings { seq_len: 1, lr: 1e-3, steps: 1, seed: 0, save_every: 0, ..TrainSettings::default() };
    let mut plan = build_plan(PlanSource {
        recipe: g.name.clone(),
        target: "cpu".into(),
        graph: g,
        values,
        buffers,
        arena_bytes: memory.arena_bytes as u64,
        persistent_bytes: memory.persistent_bytes as u64,
        train,
        peft: None,
        model_config: vec![],
    })
    .unwrap();
    plan_source::attach_code(&mut plan, &b);
    plan
}

/// Seeded values in (−scale, scale).
fn random(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    (0..n).map(|i| (scale * (2.0 * ir::rng::uniform(seed, 7, i as u64) as f64 - 1.0)) as f32).collect()
}

/// `|got − want| ≤ 1e-5 + 1e-4·|want|` elementwise; the worst element in the message.
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let excess = (g - w).abs() / (1e-5 + 1e-4 * w.abs());
        if (excess.is_nan() || excess > 1.0) && worst.is_none_or(|(_, e)| excess > e || excess.is_nan()) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, e)) = worst {
        panic!("{what}: element {i} is {} but the interpreter has {} ({e:.1}× the tolerance)", got[i], want[i]);
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_f().expect("a float value").to_f32()
}

/// rms_norm → qmatmul (NF4, double quant) → silu → matmul → loss = Σ z², metric Σ z, and an update of the f32
/// weight; two steps with the update fed back.
#[test]
fn a_small_graph_runs_like_the_interpreter() {
    let mut b = Builder::new("small");
    let x = b.input("x", Type::f32(vec![6, 64])).unwrap();
    let gw = b.param("norm.weight", Type::f32(vec![64]), Role::Frozen, Init::Load).unwrap();
    let nf4 = DType::Nf4(Nf4Format { block: 64, double_quant: Some(256) });
    let q = b.param("q.weight", Type::new(nf4, vec![32, 64]), Role::Frozen, Init::Load).unwrap();
    let w = b.param("w", Type::f32(vec![32, 16]), Role::Trainable, Init::Load).unwrap();
    let h = b.rms_norm(x, gw, 1e-5).unwrap();
    let y = b.op(Op::QMatMul { tb: true }, &[h, q]).unwrap();
    let a = b.silu(y).unwrap();
    let z = b.matmul(a, w, false, false).unwrap();
    let zz = b.mul(z, z).unwrap();
    let loss = b.sum(zz, &[0, 1], false).unwrap();
    let zsum = b.sum(z, &[0, 1], false).unwrap();
    let decay = b.scale(w, 0.01).unwrap();
    let w1 = b.sub(w, decay).unwrap();
    b.output(OutputKind::Loss, loss);
    b.output(OutputKind::Metric("zsum".into()), zsum);
    b.output(OutputKind::Update("w".into()), w1);
    let plan = graph_plan(b.finish());

    let data: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![
        ("norm.weight", vec![64], random(64, 1, 1.0).iter().map(|v| 1.0 + 0.5 * v).collect()),
        ("q.weight", vec![32, 64], random(32 * 64, 2, 0.2)),
        ("w", vec![32, 16], random(32 * 16, 3, 0.3)),
    ];
    for threads in [1, 2] {
        let mut cpu = CpuBackend::new(&plan, threads).unwrap();
        let mut env = Env::default();
        for (name, shape, d) in &data {
            cpu.set_param_f32(name, d).unwrap();
            env.params.insert(name.to_string(), Value::F(Tensor::from_f32(shape.clone(), d)));
        }
        for step in 0..2 {
            let xs = random(6 * 64, 10 + step, 1.0);
            cpu.set_input_f32("x", &xs).unwrap();
            env.inputs.insert("x".into(), Value::F(Tensor::from_f32(vec![6, 64], &xs)));
            let vals = run(&plan.graph, &env, Precision::F32).unwrap();
            let out = cpu.step().unwrap();
            let g = &plan.graph;
            let want = |kind: &OutputKind| floats(&vals[g.output(kind).unwrap().index()]);
            let what = format!("{threads} threads, step {step}");
            assert_close(&format!("{what}: loss"), &[out.loss().unwrap()], &want(&OutputKind::Loss));
            let zsum = OutputKind::Metric("zsum".into());
            assert_close(&format!("{what}: zsum"), &[out.metric("zsum").unwrap()], &want(&zsum));
            let z_now = cpu.value_f32(z).expect("z is stored (two kernels read it)");
            assert_close(&format!("{what}: z"), &z_now, &floats(&vals[z.index()]));
            let new_w = &vals[g.output(&OutputKind::Update("w".into())).unwrap().index()];
            assert_close(&format!("{what}: w"), &cpu.param_f32("w").unwrap(), &floats(new_w));
            env.params.insert("w".into(), new_w.clone());
        }
    }
}

/// `load` parameters by name, with their f32 data.
type Loaded = Vec<(String, Vec<f32>)>;

/// Weights for a recipe's `load` parameters (seeded; norms near 1) and the `init` of the others as
/// `ir::init::materialize` gives them (NF4 base weights quantized first, as the interpreter and PEFT see them).
fn recipe_params(g: &Graph, seed: u64) -> (Loaded, HashMap<String, Value>) {
    let mut loaded = vec![];
    let mut env: HashMap<String, Value> = HashMap::new();
    for (i, (v, name, _)) in g.params().into_iter().enumerate() {
        let Op::Param { init: Init::Load, .. } = &g.node(v).op else { continue };
        let shape = g.ty(v).shape.clone();
        let n = g.ty(v).numel();
        let data = if name.contains("norm") {
            random(n, 100 + i as u64, 0.2).iter().map(|x| 1.0 + x).collect()
        } else {
            random(n, 100 + i as u64, 0.1)
        };
        env.insert(name.to_string(), Value::F(Tensor::from_f32(shape, &data)));
        loaded.push((name.to_string(), data));
    }
    let source = |n: &str| {
        let p = g.param(n)?;
        let t = env.get(n)?.as_f()?.clone();
        Some(match g.ty(p).dtype {
            DType::Nf4(f) => {
                Value::Q(ir::nf4::quantize(&t.to_f32(), &t.shape, f.block as usize, f.double_quant.map(|b| b as usize)))
            }
            _ => Value::F(t),
        })
    };
    let mut init = HashMap::new();
    for (v, name, _) in g.params() {
        let Op::Param { init: i, .. } = &g.node(v).op else { unreachable!() };
        if !matches!(i, Init::Load) {
            let t = ir::init::materialize(i, name, &g.ty(v).shape, seed, &source).unwrap();
            init.insert(name.to_string(), Value::F(t));
        }
    }
    env.extend(init);
    (loaded, env)
}

/// The per-step inputs: token ids, shifted labels (last position ignored), positions, one segment per row, the
/// dropout step, the optimizer step (from 1) and the learning rate.
fn step_inputs(plan: &Plan, step: usize) -> Vec<(String, Value)> {
    let t = plan.train.seq_len as usize;
    plan.inputs
        .iter()
        .map(|i| {
            let n: usize = i.shape.iter().product();
            let shape = i.shape.clone();
            let token = |k: usize| ((k * 37 + 11 + 13 * step) % 128) as i32;
            let v = match i.name.as_str() {
                "input_ids" => Value::ints(shape, (0..n).map(token).collect()),
                "labels" => {
                    Value::ints(shape, (0..n).map(|k| if k % t == t - 1 { -100 } else { token(k + 1) }).collect())
                }
                "position_ids" => Value::ints(shape, (0..n).map(|k| (k % t) as i32).collect()),
                "segment_ids" => Value::ints(shape, vec![0; n]),
                "step" => Value::ints(shape, vec![step as i32]),
                "opt_step" => Value::ints(shape, vec![step as i32 + 1]),
                "lr" => Value::F(Tensor::scalar(plan.train.lr as f32 as f64)),
                other => panic!("unexpected input `{other}`"),
            };
            (i.name.clone(), v)
        })
        .collect()
}

/// The first value kernel `k` computed (and still holds) that differs from the interpreter's beyond the tolerance.
fn wrong_kernel_output(plan: &Plan, k: usize, cpu: &CpuBackend, vals: &[Value]) -> Option<String> {
    let g = &plan.graph;
    for &v in &g.kernels[k].nodes {
        let (Some(got), Value::F(want)) = (cpu.value_f32(v), &vals[v.index()]) else { continue };
        let want = want.to_f32();
        let off = |x: f32, w: f32| {
            let d = (x as f64 - w as f64).abs();
            d.is_nan() || d > 1e-5 + 1e-4 * (w as f64).abs()
        };
        let bad = got.iter().zip(&want).position(|(&x, &w)| off(x, w));
        if let Some(i) = bad {
            let n = g.node(v);
            let inputs: Vec<String> = n.inputs.iter().map(|x| x.to_string()).collect();
            // An input whose buffer another member of the kernel overwrites (in place) is a likely cause.
            let buffer = |x: ValueId| runtime::cpu::value_buffer(plan, x).ok().flatten();
            let mut notes = String::new();
            for &x in &n.inputs {
                for &m in g.kernels[k].nodes.iter().filter(|&&m| m != v && buffer(x).is_some()) {
                    if matches!(plan.values[m.index()], ValuePlacement::InPlace { .. }) && buffer(m) == buffer(x) {
                        notes.push_str(&format!(
                            "; its input {x} is in buffer {}, which {m} (same kernel) overwrites in place",
                            buffer(x).unwrap()
                        ));
                    }
                }
            }
            return Some(format!(
                "kernel {k} '{}' ({}) computes {v} = {}({}) ({}, placed {:?}) wrong: element {i} is {}, the \
                 interpreter has {}{notes}",
                g.kernels[k].name,
                plan.kernels[k].symbol,
                n.op.mnemonic(),
                inputs.join(", "),
                n.ty,
                plan.values[v.index()],
                got[i],
                want[i]
            ));
        }
    }
    None
}

/// Three training steps of a tiny recipe on the cpu backend and on the interpreter, from the same parameters and
/// inputs, the updates fed back into the interpreter's next step.
fn training_steps_match(example: &str) {
    let plan = recipe_plan(example);
    let g = &plan.graph;
    let seed = plan.train.seed;
    let (loaded, params) = recipe_params(g, seed);
    let mut cpu = match CpuBackend::new(&plan, 2) {
        Ok(cpu) => cpu,
        Err(e) => panic!("{example}: {e}"),
    };
    for (name, data) in &loaded {
        cpu.set_param_f32(name, data).unwrap();
    }
    cpu.init_params(seed).unwrap();
    // The backend initializes exactly as `ir::init` does.
    for p in &plan.params {
        if !matches!(p.init, Init::Load) {
            assert_eq!(cpu.param_f32(&p.name).unwrap(), floats(&params[&p.name]), "{example}: init of {}", p.name);
        }
    }
    let mut env = Env { params, ..Env::default() };
    for step in 0..3 {
        for (name, v) in step_inputs(&plan, step) {
            match &v {
                Value::I { data, .. } => cpu.set_input_i32(&name, data).unwrap(),
                Value::F(t) => cpu.set_input_f32(&name, &t.to_f32()).unwrap(),
                Value::Q(_) => unreachable!(),
            }
            env.inputs.insert(name, v);
        }
        let vals = run(g, &env, Precision::F32).unwrap();
        // The first step starts from identical parameters: check what every kernel computes, to name the first
        // one that goes wrong.
        let out = if step == 0 {
            let mut first_wrong = None;
            let out = cpu.step_each(|k, cpu| {
                if first_wrong.is_none() {
                    first_wrong = wrong_kernel_output(&plan, k, cpu, &vals);
                }
            });
            if let Some(m) = first_wrong {
                panic!("{example} step 1: {m}");
            }
            out.unwrap()
        } else {
            let t0 = std::time::Instant::now();
            let out = cpu.step().unwrap();
            eprintln!("{example} step {}: {:.2} ms on the cpu backend", step + 1, t0.elapsed().as_secs_f64() * 1e3);
            out
        };
        let want_loss = floats(&vals[g.output(&OutputKind::Loss).unwrap().index()]);
        assert_close(&format!("{example} step {}: loss", step + 1), &[out.loss().unwrap()], &want_loss);
        eprintln!("{example} step {}: loss {} (interpreter {})", step + 1, out.loss().unwrap(), want_loss[0]);
        for o in &g.outputs {
            if let OutputKind::Update(name) = &o.kind {
                env.params.insert(name.clone(), vals[o.value.index()].clone());
            }
        }
    }
    let mut compared = 0;
    for p in &plan.params {
        if matches!(p.role, Role::Trainable | Role::State) {
            let got = cpu.param_f32(&p.name).unwrap();
            assert_close(&format!("{example} after step 3: {}", p.name), &got, &floats(&env.params[&p.name]));
            compared += 1;
        }
    }
    assert!(compared >= 3 * 28, "{example}: compared only {compared} adapter weights and states");
}

#[test]
fn cpu_backend_training_step_matches_reference_lora() {
    training_steps_match("tiny.lora.rs");
}

#[test]
fn cpu_backend_training_step_matches_reference_qlora() {
    training_steps_match("tiny.qlora.rs");
}

#[test]
fn cpu_backend_training_step_matches_reference_dora() {
    training_steps_match("tiny.dora.rs");
}

#[test]
fn cpu_backend_training_step_matches_reference_qdora() {
    training_steps_match("tiny.qdora.rs");
}

/// A kernel whose code is missing (here: the first one's symbol removed) makes the plan unrunnable on the cpu
/// backend, and the error names it.
#[test]
fn a_plan_with_a_kernel_without_host_code_is_refused() {
    let mut plan = recipe_plan("tiny.lora.rs");
    let first = plan.kernels[0].name.clone();
    plan.kernels[0].symbol.clear();
    match CpuBackend::new(&plan, 1) {
        Err(e @ RuntimeError::MissingHostCode { .. }) => {
            let RuntimeError::MissingHostCode { kernels } = &e else { unreachable!() };
            assert_eq!(kernels[0], first);
            let message = e.to_string();
            let want = format!("the plan cannot run on the cpu backend: kernel '{first}' has no host code");
            assert!(message.starts_with(&want), "{message}");
        }
        Err(e) => panic!("expected the missing host code error, got: {e}"),
        Ok(_) => panic!("a plan with a kernel without code was accepted"),
    }
}

/// Every NF4 argument of the QLoRA plan is a storage part of an NF4 parameter, in the layout the kernels take
/// (`kernels::gemm::nf4_buffers`), which the runtime copies rather than depending on `kernels`.
#[test]
fn the_runtime_lays_out_nf4_parts_as_the_kernels_take_them() {
    for dq in [Some(256), None] {
        let w = random(70 * 64, 5, 0.3);
        let q = ir::nf4::quantize(&w, &[70, 64], 64, dq);
        assert_eq!(runtime::cpu::nf4_parts(&q), kernels::gemm::nf4_buffers(&q), "double quant {dq:?}");
    }
    let plan = recipe_plan("tiny.qlora.rs");
    let g = &plan.graph;
    let mut parts = 0;
    for k in &plan.kernels {
        for a in &k.args {
            if let DType::Nf4(f) = g.ty(ValueId(a.value)).dtype {
                assert!(matches!(g.node(ValueId(a.value)).op, Op::Param { .. }), "{}: NF4 args are parameters", k.name);
                assert!((a.part as usize) < runtime::cpu::nf4_part_bytes(f, g.ty(ValueId(a.value)).numel()).len());
                parts += 1;
            }
        }
    }
    assert!(parts > 0, "the QLoRA plan passes NF4 weights by parts");
}

/// One step's loss of `plan` from the recipe's seeded parameters and the first step's inputs.
fn first_step_loss(plan: &Plan) -> f32 {
    let (loaded, _) = recipe_params(&plan.graph, plan.train.seed);
    let mut cpu = CpuBackend::new(plan, 2).unwrap();
    for (name, data) in &loaded {
        cpu.set_param_f32(name, data).unwrap();
    }
    cpu.init_params(plan.train.seed).unwrap();
    for (name, v) in step_inputs(plan, 0) {
        match &v {
            Value::I { data, .. } => cpu.set_input_i32(&name, data).unwrap(),
            Value::F(t) => cpu.set_input_f32(&name, &t.to_f32()).unwrap(),
            Value::Q(_) => unreachable!(),
        }
    }
    cpu.step().unwrap().loss().expect("a loss")
}

/// `--gemm-precision bf16` (tensor-core arithmetic, emulated on the host): the whole QLoRA step runs and its loss
/// moves from the f32 plan's by bf16 rounding only — more than f32 reordering would (1e-6), less than 1%.
#[test]
fn bf16_gemms_change_the_qlora_loss_by_rounding_only() {
    let recipe = compile_example("tiny.qlora.rs");
    let bf16 = BuildOptions { gemm_precision: codegen::build::GemmPrecision::Bf16, ..host_only() };
    let plan_bf16 = plan_source::compile_plan(&recipe, "cpu", &bf16).unwrap();
    let (f, b) = (first_step_loss(&recipe_plan("tiny.qlora.rs")), first_step_loss(&plan_bf16));
    let rel = ((b - f) / f).abs();
    assert!(rel > 1e-6 && rel < 1e-2, "f32 loss {f}, bf16 loss {b}: relative change {rel}");
}

/// Real plans of the tiny recipes (dropout seeds, NF4 parts, shared kernels) pass the runtime's validation, and a
/// crafted arena near 2^64 in one of them is refused (defect 2) rather than wrapped into a tiny allocation.
#[test]
fn real_plans_pass_validation_and_a_huge_arena_is_refused() {
    let mut plan = recipe_plan("tiny.qlora.rs");
    CpuBackend::new(&plan, 1).expect("a real plan loads");
    plan.arena_bytes = u64::MAX - 10;
    let err = Plan::from_bytes(&plan.to_bytes().unwrap()).unwrap_err().to_string();
    assert!(err.contains("the arena is 18446744073709551605 bytes"), "{err}");
    let err = CpuBackend::new(&plan, 1).unwrap_err().to_string();
    assert!(err.contains("the arena is 18446744073709551605 bytes"), "{err}");
}

/// Defect 4: `tunec compile` warns when the memory plan's peak exceeds the target's memory, with both numbers and
/// the fix; a plan that fits gets no warning.
#[test]
fn a_plan_over_the_target_memory_gets_a_warning() {
    let recipe = compile_example("tiny.lora.rs");
    let opts = plan_source::pipeline_options(&recipe, "cpu", None).unwrap();
    let mut g = recipe.forward.clone();
    PassManager::new(passes::training_pipeline(&opts)).run(&mut g).unwrap();
    let memory = passes::memory::plan(&g);
    assert_eq!(plan_source::memory_warning(&memory, &opts.target), None, "the tiny recipe fits 24 GiB");
    let small = passes::target::Target { memory_bytes: memory.peak_bytes as f64 / 2.0, ..opts.target.clone() };
    let w = plan_source::memory_warning(&memory, &small).expect("a warning");
    let gib = |b: f64| format!("{:.1} GiB", b / (1u64 << 30) as f64);
    assert_eq!(
        w,
        format!(
            "warning: the plan needs {} at peak, the target (cpu) has {}: use --recompute per-block or a smaller \
             micro_batch / seq_len",
            gib(memory.peak_bytes as f64),
            gib(memory.peak_bytes as f64 / 2.0)
        )
    );
}
