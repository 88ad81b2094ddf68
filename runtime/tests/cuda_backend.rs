//! The cuda backend on a hand-built plan whose kernels are hand-written PTX (no codegen, no LLVM): the SGD step of
//! the cpu backend's tests — a view, a reduction that accumulates into a `zero_gpu` output (atomic adds), an update
//! written in place, one copied back from the arena, a constant output.
//!
//! Without a CUDA driver (this is most machines), `CudaBackend::new` must fail at once with the probe's error, never
//! panic; the GPU test then returns early — unless `TUNEC_EXPECT_CUDA=1` (set on GPU hosts), which demands a device.

use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::plan::{
    build_plan, KernelArg, KernelLaunch, Plan, PlanBuffer, PlanSource, Region, TrainSettings, ValuePlacement,
};
use ir::{Builder, Init, Kernel, OutputKind, Role, Type, ValueId};
use runtime::cuda_backend::pick_ptx_arch;
use runtime::{CudaBackend, CudaError, CudaUnavailable};

/// One thread per element (a single block of 8); pointer parameters are `.u64`, as codegen's.
const PTX: &str = r#"
.version 7.0
.target sm_80
.address_size 64

// o = x + p
.visible .entry t_add(.param .u64 a0, .param .u64 a1, .param .u64 a2)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<8>;
    .reg .f32 %f<4>;
    ld.param.u64 %rd1, [a0];
    ld.param.u64 %rd2, [a1];
    ld.param.u64 %rd3, [a2];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd4, %r1, 4;
    add.s64 %rd5, %rd1, %rd4;
    add.s64 %rd6, %rd2, %rd4;
    add.s64 %rd7, %rd3, %rd4;
    ld.global.f32 %f1, [%rd5];
    ld.global.f32 %f2, [%rd6];
    add.rn.f32 %f3, %f1, %f2;
    st.global.f32 [%rd7], %f3;
    ret;
}

// o[0] += x[i] (o must hold zero first)
.visible .entry t_sum(.param .u64 a0, .param .u64 a1)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<6>;
    .reg .f32 %f<2>;
    ld.param.u64 %rd1, [a0];
    ld.param.u64 %rd2, [a1];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd3, %r1, 4;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.f32 %f1, [%rd4];
    red.global.add.f32 [%rd2], %f1;
    ret;
}

// o = p - g * lr[0]
.visible .entry t_update(.param .u64 a0, .param .u64 a1, .param .u64 a2, .param .u64 a3)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<10>;
    .reg .f32 %f<6>;
    ld.param.u64 %rd1, [a0];
    ld.param.u64 %rd2, [a1];
    ld.param.u64 %rd3, [a2];
    ld.param.u64 %rd4, [a3];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd5, %r1, 4;
    add.s64 %rd6, %rd1, %rd5;
    add.s64 %rd7, %rd2, %rd5;
    add.s64 %rd8, %rd4, %rd5;
    ld.global.f32 %f1, [%rd6];
    ld.global.f32 %f2, [%rd7];
    ld.global.f32 %f3, [%rd3];
    mul.rn.f32 %f4, %f2, %f3;
    sub.rn.f32 %f5, %f1, %f4;
    st.global.f32 [%rd8], %f5;
    ret;
}

// o = m + g
.visible .entry t_moment(.param .u64 a0, .param .u64 a1, .param .u64 a2)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<8>;
    .reg .f32 %f<4>;
    ld.param.u64 %rd1, [a0];
    ld.param.u64 %rd2, [a1];
    ld.param.u64 %rd3, [a2];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd4, %r1, 4;
    add.s64 %rd5, %rd1, %rd4;
    add.s64 %rd6, %rd2, %rd4;
    add.s64 %rd7, %rd3, %rd4;
    ld.global.f32 %f1, [%rd5];
    ld.global.f32 %f2, [%rd6];
    add.rn.f32 %f3, %f1, %f2;
    st.global.f32 [%rd7], %f3;
    ret;
}
"#;

fn train() -> TrainSettings {
    TrainSettings {
        seq_len: 1,
        lr: 0.25,
        steps: 3,
        max_grad_norm: 0.0,
        seed: 0,
        save_every: 0,
        ..TrainSettings::default()
    }
}

fn buffer(region: Region, offset: u64, first: u32) -> PlanBuffer {
    PlanBuffer { region, offset, bytes: 256, start: 0, end: 4, first }
}

fn kernel(symbol: &str, args: &[u32], zero_gpu: &[u32]) -> (String, Vec<KernelArg>, Option<KernelLaunch>) {
    let launch = KernelLaunch { grid: (1, 1, 1), block: 8, zero_host: vec![], zero_gpu: zero_gpu.to_vec() };
    (symbol.to_string(), args.iter().map(|&value| KernelArg { value, part: 0 }).collect(), Some(launch))
}

/// `a = x + p; loss = sum(reshape(a)); p ← p − a·lr (in place); m ← m + a (copied back); metric c = 2.5`.
fn sgd_plan() -> (Plan, ValueId, ValueId) {
    let mut b = Builder::new("sgd");
    let x = b.input("x", Type::f32(vec![8])).unwrap();
    let lr = b.input("lr", Type::f32(vec![])).unwrap();
    let p = b.param("p", Type::f32(vec![8]), Role::Trainable, Init::Load).unwrap();
    let m = b.param("m", Type::f32(vec![8]), Role::State, Init::Zeros).unwrap();
    let a = b.add(x, p).unwrap();
    let r = b.reshape(a, &[2, 4]).unwrap();
    let s = b.sum(r, &[0, 1], false).unwrap();
    let t = b.mul(a, lr).unwrap();
    let p1 = b.sub(p, t).unwrap();
    let m1 = b.add(m, a).unwrap();
    let c = b.constant(2.5, Type::f32(vec![])).unwrap();
    b.output(OutputKind::Loss, s);
    b.output(OutputKind::Update("p".into()), p1);
    b.output(OutputKind::Update("m".into()), m1);
    b.output(OutputKind::Metric("c".into()), c);
    let mut g = b.finish();
    let k = |name: &str, nodes: &[ValueId]| Kernel { name: name.into(), nodes: nodes.to_vec() };
    g.kernels = vec![k("add:a", &[a]), k("sum:loss", &[r, s]), k("update:p", &[t, p1]), k("add:m", &[m1])];

    use ValuePlacement::{Alias, InPlace, Owns};
    let mut values = vec![ValuePlacement::None; g.nodes.len()];
    values[x.index()] = Owns(0);
    values[lr.index()] = Owns(1);
    values[p.index()] = Owns(2);
    values[m.index()] = Owns(3);
    values[a.index()] = Owns(4);
    values[r.index()] = Alias(a.0);
    values[s.index()] = Owns(5);
    values[p1.index()] = InPlace { of: p.0, buffer: 2 };
    values[m1.index()] = Owns(6);
    values[c.index()] = Owns(7);
    let buffers = vec![
        buffer(Region::Persistent, 0, x.0),
        buffer(Region::Persistent, 256, lr.0),
        buffer(Region::Persistent, 512, p.0),
        buffer(Region::Persistent, 768, m.0),
        buffer(Region::Arena, 0, a.0),
        buffer(Region::Arena, 256, s.0),
        buffer(Region::Arena, 512, m1.0),
        buffer(Region::Arena, 768, c.0),
    ];
    let mut plan = build_plan(PlanSource {
        recipe: "sgd".into(),
        target: "h100".into(),
        graph: g,
        values,
        buffers,
        arena_bytes: 1024,
        persistent_bytes: 1024,
        train: train(),
        peft: None,
        model_config: vec![],
    })
    .expect("a consistent plan");
    let codes = [
        kernel("t_add", &[x.0, p.0, a.0], &[]),
        kernel("t_sum", &[r.0, s.0], &[1]),
        kernel("t_update", &[p.0, a.0, lr.0, p1.0], &[]),
        kernel("t_moment", &[m.0, a.0, m1.0], &[]),
    ];
    for (code, (symbol, args, launch)) in plan.kernels.iter_mut().zip(codes) {
        code.symbol = symbol;
        code.args = args;
        code.launch = launch;
    }
    plan.ptx_modules.insert(80, PTX.to_string());
    (plan, p1, m1)
}

fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library; no driver call.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn expect_cuda() -> bool {
    std::env::var("TUNEC_EXPECT_CUDA").as_deref() == Ok("1")
}

#[test]
fn cuda_backend_without_a_driver_fails_cleanly() {
    if driver_present() {
        eprintln!("a CUDA driver is present: the no-driver path is not taken here");
        return;
    }
    let (plan, _, _) = sgd_plan();
    let t0 = std::time::Instant::now();
    let err = CudaBackend::new(&plan, 0).unwrap_err();
    assert!(matches!(err, CudaError::Unavailable(CudaUnavailable::NoDriver)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "no CUDA driver (libcuda.so) found: --backend cuda needs an NVIDIA GPU and driver; use --backend cpu"
    );
    assert!(t0.elapsed().as_secs_f64() < 5.0, "the refusal is immediate");
    // Through a file too, and whatever the ordinal.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sgd.plan.bin");
    let trust = runtime::trust::TrustOptions::in_dir(dir.path().join("home"));
    runtime::trust::write_signed(&plan, &path, &trust).unwrap();
    let err = CudaBackend::load(&path, 3, &trust).unwrap_err();
    assert!(matches!(err, CudaError::Unavailable(CudaUnavailable::NoDriver)), "{err:?}");
    // An unsigned plan file is refused before anything else (its PTX is code too).
    plan.write(&path).unwrap();
    let err = CudaBackend::load(&path, 0, &trust).unwrap_err();
    assert!(err.to_string().contains("refused: the plan is not signed"), "{err}");
}

#[test]
fn the_ptx_is_the_highest_architecture_the_device_runs() {
    assert_eq!(pick_ptx_arch([80, 90], 90), Some(90));
    assert_eq!(pick_ptx_arch([80, 90], 100), Some(90));
    assert_eq!(pick_ptx_arch([80, 90], 86), Some(80));
    assert_eq!(pick_ptx_arch([80], 90), Some(80));
    assert_eq!(pick_ptx_arch([80, 90], 75), None);
    assert_eq!(pick_ptx_arch([], 90), None);
}

#[test]
fn sgd_steps_on_the_gpu_match_the_interpreter() {
    let (plan, p1, m1) = sgd_plan();
    let plan = Plan::from_bytes(&plan.to_bytes().unwrap()).unwrap();
    let mut gpu = match CudaBackend::new(&plan, 0) {
        Ok(b) => b,
        Err(e) => {
            assert!(!expect_cuda(), "TUNEC_EXPECT_CUDA=1 but: {e}");
            assert!(matches!(e, CudaError::Unavailable(_)), "{e:?}");
            eprintln!("skipped: {e}");
            return;
        }
    };
    eprintln!("{gpu:?}");
    assert_eq!(gpu.ptx_arch(), 80);
    let p0: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 1.0).collect();
    let xs: Vec<Vec<f32>> = (0..3).map(|s| (0..8).map(|i| (i * (s + 1)) as f32 - 3.0).collect()).collect();
    let mut env = Env::default();
    env.params.insert("p".into(), Value::F(Tensor::from_f32(vec![8], &p0)));
    env.params.insert("m".into(), Value::F(Tensor::zeros(&[8])));
    env.inputs.insert("lr".into(), Value::F(Tensor::scalar(0.25)));
    let err = gpu.step().unwrap_err().to_string();
    assert!(err.contains("not set"), "{err}");
    gpu.set_param_f32("p", &p0).unwrap();
    gpu.init_params(0).unwrap();
    gpu.set_input_f32("lr", &[0.25]).unwrap();
    let floats = |v: &Value| v.as_f().expect("a float value").to_f32();
    for x in &xs {
        env.inputs.insert("x".into(), Value::F(Tensor::from_f32(vec![8], x)));
        gpu.set_input_f32("x", x).unwrap();
        let vals = run(&plan.graph, &env, Precision::F32).unwrap();
        let out = gpu.step().unwrap();
        let want_loss = floats(&vals[plan.graph.output(&OutputKind::Loss).unwrap().index()])[0];
        // Exact: small integers and halves, summed in any order (and zeroed before each step's sum).
        assert_eq!(out.loss(), Some(want_loss));
        assert_eq!(out.metric("c"), Some(2.5), "a constant output is filled");
        for (name, v) in [("p", p1), ("m", m1)] {
            env.params.insert(name.into(), vals[v.index()].clone());
            assert_eq!(gpu.param_f32(name).unwrap(), floats(&vals[v.index()]), "{name} after the step");
        }
    }
    assert_eq!(gpu.steps_run(), 3);
    // The training loop's view of it.
    use runtime::train::StepBackend;
    let state = gpu.state().unwrap();
    assert_eq!(state.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>(), ["p", "m"]);
    gpu.set_state("m", &[f32::NAN; 8]).unwrap();
    let culprit = gpu.first_nonfinite().unwrap().unwrap();
    assert!(culprit.contains("parameter `m`"), "{culprit}");
}

/// Defect 2: the cuda backend validates a plan (the same check as the cpu backend's) before it probes the driver,
/// allocates or loads PTX, so a crafted plan is refused by name on any machine.
#[test]
fn a_bad_plan_is_refused_before_the_driver_is_touched() {
    let (mut plan, _, _) = sgd_plan();
    plan.arena_bytes = u64::MAX - 10;
    let err = CudaBackend::new(&plan, 0).unwrap_err();
    assert!(matches!(err, CudaError::Runtime(runtime::RuntimeError::Plan(_))), "{err:?}");
    assert!(err.to_string().contains("the arena is 18446744073709551605 bytes"), "{err}");
    let (mut plan, _, _) = sgd_plan();
    plan.buffers[4].bytes = 16;
    let err = CudaBackend::new(&plan, 0).unwrap_err().to_string();
    assert!(err.contains("which has only 16 bytes: a kernel would write past it"), "{err}");
    let (mut plan, _, _) = sgd_plan();
    plan.kernels[1].launch.as_mut().unwrap().block = 4096;
    let err = CudaBackend::new(&plan, 0).unwrap_err().to_string();
    assert!(err.starts_with("kernel 'sum:loss': launch grid (1, 1, 1) with blocks of 4096"), "{err}");
    let (mut plan, _, _) = sgd_plan();
    plan.kernels[1].launch.as_mut().unwrap().zero_gpu = vec![2];
    let err = CudaBackend::new(&plan, 0).unwrap_err().to_string();
    assert_eq!(err, "kernel 'sum:loss': zero_gpu names argument 2, but the kernel has 2");
}
