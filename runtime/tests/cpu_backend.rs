//! The cpu backend on hand-built plans, without codegen: the host library is a small C file compiled here with the
//! system's C compiler (the same driver codegen links with), so these tests need no LLVM. They cover loading (code
//! for every kernel, symbols, argument memory), buffer resolution (aliases, in place), the thread pool (1–3 threads
//! split each kernel), `zero_host`, updates written in place or copied back, constant outputs, NF4 storage parts
//! and the errors a caller can make.

use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::plan::{
    build_plan, KernelArg, KernelLaunch, Plan, PlanBuffer, PlanSource, Region, TrainSettings, ValuePlacement,
};
use ir::{Builder, DType, Init, Kernel, Nf4Format, OutputKind, Role, Type, ValueId};
use runtime::cpu::{check_nf4_format, nf4_part_bytes, nf4_parts, value_buffer};
use runtime::{CpuBackend, RuntimeError};
use std::path::Path;

/// The C kernels of the hand-built plans, in the host ABI `void f(void **args, int32_t tid, int32_t nthreads)`.
fn c_source() -> String {
    let nf4: Vec<String> = ir::nf4::NF4_CODEBOOK.iter().map(|x| format!("{x:?}f")).collect();
    format!(
        r#"
#include <stdint.h>
#include <string.h>
static void span(int64_t n, int tid, int nt, int64_t *lo, int64_t *hi) {{
    *lo = n * tid / nt;
    *hi = n * (tid + 1) / nt;
}}
static void atomic_addf(float *p, float v) {{
    uint32_t *u = (uint32_t *)p, old = __atomic_load_n(u, __ATOMIC_RELAXED), next;
    do {{
        float f;
        memcpy(&f, &old, 4);
        f += v;
        memcpy(&next, &f, 4);
    }} while (!__atomic_compare_exchange_n(u, &old, next, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
}}
/* a = x + p */
void t_add(void **a, int32_t tid, int32_t nt) {{
    const float *x = a[0], *p = a[1];
    float *o = a[2];
    int64_t lo, hi;
    span(8, tid, nt, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) o[i] = x[i] + p[i];
}}
/* loss = sum(a): each thread adds its share into a zeroed output */
void t_sum(void **a, int32_t tid, int32_t nt) {{
    const float *x = a[0];
    float *o = a[1], s = 0;
    int64_t lo, hi;
    span(8, tid, nt, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) s += x[i];
    atomic_addf(o, s);
}}
/* p1 = p - a * lr */
void t_update(void **a, int32_t tid, int32_t nt) {{
    const float *p = a[0], *g = a[1], *lr = a[2];
    float *o = a[3];
    int64_t lo, hi;
    span(8, tid, nt, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {{
        float t = g[i] * lr[0];
        o[i] = p[i] - t;
    }}
}}
/* m1 = m + a */
void t_moment(void **a, int32_t tid, int32_t nt) {{
    const float *m = a[0], *g = a[1];
    float *o = a[2];
    int64_t lo, hi;
    span(8, tid, nt, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) o[i] = m[i] + g[i];
}}
/* y = x + seeds[i % 2] % 97: run-time constants follow the buffers */
void t_seeded(void **a, int32_t tid, int32_t nt) {{
    const float *x = a[0];
    float *o = a[1];
    const uint64_t *seeds = a[2];
    int64_t lo, hi;
    span(8, tid, nt, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) o[i] = x[i] + (float)(seeds[i % 2] % 97);
}}
/* d = nf4_dequantize(w), plain absmax, blocks of 64 */
static const float NF4[16] = {{ {nf4} }};
void t_dequant(void **a, int32_t tid, int32_t nt) {{
    const uint8_t *packed = a[0];
    const float *absmax = a[1];
    float *o = a[2];
    int64_t lo, hi;
    span(256, tid, nt, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {{
        uint8_t b = packed[i / 2];
        int c = (i & 1) ? (b & 15) : (b >> 4);
        o[i] = NF4[c] * absmax[i / 64];
    }}
}}
"#,
        nf4 = nf4.join(", ")
    )
}

/// The C kernels as a shared object.
fn host_library() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (src, lib) = (dir.path().join("kernels.c"), dir.path().join("libkernels.so"));
    std::fs::write(&src, c_source()).expect("write C source");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-ffp-contract=off", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` (set CC): {e}"));
    assert!(out.status.success(), "{cc} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&lib).expect("read the library")
}

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

fn kernel(symbol: &str, args: &[u32], zero_host: &[u32]) -> (String, Vec<KernelArg>, Option<KernelLaunch>) {
    let launch = KernelLaunch { grid: (1, 1, 1), block: 32, zero_host: zero_host.to_vec(), zero_gpu: vec![] };
    (symbol.to_string(), args.iter().map(|&value| KernelArg { value, part: 0 }).collect(), Some(launch))
}

/// The values of the SGD plan, by name.
struct Sgd {
    x: ValueId,
    p: ValueId,
    a: ValueId,
    r: ValueId,
    t: ValueId,
    p1: ValueId,
    m1: ValueId,
}

/// A step with a view, a reduction that accumulates (zero_host), an update written in place (`p`), one that must
/// be copied back (`m`), and a constant output:
/// `a = x + p; loss = sum(reshape(a)); p ← p − a·lr; m ← m + a; metric c = 2.5`.
fn sgd_plan(lib: &[u8]) -> (Plan, Sgd) {
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
        target: "cpu".into(),
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
    plan.host_library = Some(lib.to_vec());
    (plan, Sgd { x, p, a, r, t, p1, m1 })
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_f().expect("a float value").to_f32()
}

#[test]
fn sgd_steps_match_the_interpreter_on_one_to_three_threads() {
    let lib = host_library();
    let (plan, ids) = sgd_plan(&lib);
    // Through the file format, as a runtime gets it.
    let plan = Plan::from_bytes(&plan.to_bytes().unwrap()).unwrap();
    let p0: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 1.0).collect();
    let xs: Vec<Vec<f32>> = (0..3).map(|s| (0..8).map(|i| (i * (s + 1)) as f32 - 3.0).collect()).collect();
    for threads in [1, 2, 3] {
        let mut cpu = CpuBackend::new(&plan, threads).unwrap();
        assert_eq!(cpu.threads(), threads);
        let mut env = Env::default();
        env.params.insert("p".into(), Value::F(Tensor::from_f32(vec![8], &p0)));
        env.params.insert("m".into(), Value::F(Tensor::zeros(&[8])));
        env.inputs.insert("lr".into(), Value::F(Tensor::scalar(0.25)));
        cpu.set_param_f32("p", &p0).unwrap();
        cpu.init_params(0).unwrap();
        cpu.set_input_f32("lr", &[0.25]).unwrap();
        for x in &xs {
            env.inputs.insert("x".into(), Value::F(Tensor::from_f32(vec![8], x)));
            cpu.set_input_f32("x", x).unwrap();
            assert_eq!(cpu.value_f32(ids.x).as_deref(), Some(&x[..]), "an input is readable once set");
            let vals = run(&plan.graph, &env, Precision::F32).unwrap();
            let out = cpu.step().unwrap();
            let want_loss = floats(&vals[plan.graph.output(&OutputKind::Loss).unwrap().index()])[0];
            // Exact: small integers and halves, summed in any order (and zeroed before each step's sum).
            assert_eq!(out.loss(), Some(want_loss), "{threads} threads");
            assert_eq!(out.metric("c"), Some(2.5), "a constant output is filled");
            assert_eq!(cpu.value_f32(ids.a), Some(floats(&vals[ids.a.index()])));
            assert_eq!(cpu.value_f32(ids.r), Some(floats(&vals[ids.r.index()])), "a view reads its base");
            assert_eq!(cpu.value_f32(ids.p1), Some(floats(&vals[ids.p1.index()])), "p's update is in place");
            assert_eq!(cpu.value_f32(ids.p), None, "p's buffer holds its update now");
            assert_eq!(cpu.value_f32(ids.t), None, "t lives inside its kernel");
            assert_eq!(cpu.value_f32(ids.m1), Some(floats(&vals[ids.m1.index()])));
            // Feed the updates back, as the next step sees them.
            for (name, v) in [("p", ids.p1), ("m", ids.m1)] {
                env.params.insert(name.into(), vals[v.index()].clone());
                assert_eq!(cpu.param_f32(name).unwrap(), floats(&vals[v.index()]), "{name} after the step");
            }
        }
        assert_eq!(cpu.steps_run(), 3);
    }
}

#[test]
fn buffers_resolve_through_aliases_and_in_place() {
    let (plan, ids) = sgd_plan(b"");
    assert_eq!(value_buffer(&plan, ids.a).unwrap(), Some(4));
    assert_eq!(value_buffer(&plan, ids.r).unwrap(), Some(4), "a view shares its base's buffer");
    assert_eq!(value_buffer(&plan, ids.p1).unwrap(), Some(2), "an update in place is in its parameter's buffer");
    assert_eq!(value_buffer(&plan, ids.t).unwrap(), None);
    let mut cyclic = plan.clone();
    cyclic.values[ids.a.index()] = ValuePlacement::Alias(ids.r.0);
    let err = value_buffer(&cyclic, ids.r).unwrap_err().to_string();
    assert!(err.contains("cycle"), "{err}");
}

#[test]
fn a_kernel_without_code_is_refused_by_name() {
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.kernels[1].symbol.clear();
    let err = CpuBackend::new(&plan, 1).unwrap_err();
    assert!(matches!(&err, RuntimeError::MissingHostCode { kernels } if kernels == &["sum:loss"]), "{err:?}");
    assert_eq!(err.to_string(), "the plan cannot run on the cpu backend: kernel 'sum:loss' has no host code");
    for k in &mut plan.kernels {
        k.symbol.clear();
    }
    let err = CpuBackend::new(&plan, 1).unwrap_err().to_string();
    assert_eq!(
        err,
        "the plan cannot run on the cpu backend: kernel 'add:a' has no host code, nor do 'sum:loss', 'update:p', \
         'add:m' (4 kernels without code)"
    );
}

#[test]
fn missing_library_or_symbol_is_refused() {
    let lib = host_library();
    let (mut plan, _) = sgd_plan(&lib);
    plan.host_library = None;
    assert!(matches!(CpuBackend::new(&plan, 1), Err(RuntimeError::NoHostLibrary)));
    plan.host_library = Some(b"not a shared object".to_vec());
    let err = CpuBackend::new(&plan, 1).unwrap_err();
    assert!(matches!(err, RuntimeError::Library(_)), "{err:?}");
    let (mut plan, _) = sgd_plan(&lib);
    plan.kernels[2].symbol = "t_nowhere".into();
    let err = CpuBackend::new(&plan, 1).unwrap_err().to_string();
    assert!(err.starts_with("kernel 'update:p': the host library has no symbol `t_nowhere`"), "{err}");
}

#[test]
fn kernel_arguments_without_memory_are_refused() {
    let lib = host_library();
    let (mut plan, ids) = sgd_plan(&lib);
    plan.kernels[2].args.push(KernelArg { value: ids.t.0, part: 0 });
    let err = CpuBackend::new(&plan, 1).unwrap_err().to_string();
    assert_eq!(err, format!("kernel 'update:p': argument 4 is {} (`mul`), which has no memory in the plan", ids.t));
    let (mut plan, ids) = sgd_plan(&lib);
    plan.kernels[0].args[1].part = 2;
    let err = CpuBackend::new(&plan, 1).unwrap_err().to_string();
    assert_eq!(err, format!("kernel 'add:a': argument 1 is part 2 of {}, which is not an NF4 value", ids.p));
    let (mut plan, _) = sgd_plan(&lib);
    plan.kernels[1].launch.as_mut().unwrap().zero_host = vec![5];
    let err = CpuBackend::new(&plan, 1).unwrap_err().to_string();
    assert_eq!(err, "kernel 'sum:loss': zero_host names argument 5, but the kernel has 2");
}

#[test]
fn parameters_and_inputs_are_checked() {
    let lib = host_library();
    let (plan, _) = sgd_plan(&lib);
    let mut cpu = CpuBackend::new(&plan, 2).unwrap();
    let err = cpu.step().unwrap_err().to_string();
    assert_eq!(err, "2 parameters are not set (set them, or call init_params for those with an initializer): `p`, `m`");
    cpu.init_params(7).unwrap();
    assert!(!cpu.is_param_set("p").unwrap() && cpu.is_param_set("m").unwrap(), "load parameters are not initialized");
    assert_eq!(cpu.param_f32("m").unwrap(), vec![0.0; 8]);
    assert!(matches!(cpu.param_f32("p"), Err(RuntimeError::NotSet(_))));
    let err = cpu.set_param_f32("p", &[1.0; 7]).unwrap_err().to_string();
    assert_eq!(err, "parameter `p` has shape [8] (8 elements), but 7 values were given");
    assert!(matches!(cpu.set_param_f32("q", &[1.0]), Err(RuntimeError::UnknownParam(n)) if n == "q"));
    cpu.set_param_f32("p", &[1.0; 8]).unwrap();
    let err = cpu.step().unwrap_err().to_string();
    assert_eq!(err, "2 inputs are not set: `x`, `lr`");
    let err = cpu.set_input_i32("lr", &[1]).unwrap_err().to_string();
    assert_eq!(err, "input `lr` is f32[], not i32 data");
    assert!(matches!(cpu.set_input_f32("y", &[1.0]), Err(RuntimeError::UnknownInput(n)) if n == "y"));
    let err = cpu.set_param_nf4("p", &ir::nf4::quantize(&[0.0; 8], &[8], 64, None)).unwrap_err().to_string();
    assert_eq!(err, "parameter `p` is f32, not nf4");
    cpu.set_input_f32("lr", &[0.5]).unwrap();
    cpu.set_input_f32("x", &[2.0; 8]).unwrap();
    assert_eq!(cpu.step().unwrap().loss(), Some(24.0));
    assert_eq!(cpu.param_f32("p").unwrap(), vec![-0.5; 8]);
    assert_eq!(cpu.param_f32("m").unwrap(), vec![3.0; 8], "the copied-back update");
}

#[test]
fn nf4_parts_follow_the_kernel_layout() {
    for (shape, block, dq) in [(vec![4, 64], 64, Some(256)), (vec![3, 70], 64, None), (vec![513], 64, Some(4))] {
        let numel: usize = shape.iter().product();
        let w: Vec<f32> = (0..numel).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let q = ir::nf4::quantize(&w, &shape, block, dq);
        let f = Nf4Format { block: block as u32, double_quant: dq.map(|b| b as u32) };
        let parts = nf4_parts(&q);
        let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert_eq!(lens, nf4_part_bytes(f, numel), "{shape:?}");
        assert_eq!(lens.iter().sum::<usize>(), DType::Nf4(f).storage_bytes(numel), "{shape:?}");
        assert_eq!(parts[0], q.packed);
        let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        match &q.scales {
            ir::nf4::Nf4Scales::Plain { absmax } => assert_eq!(parts[1], le(absmax)),
            ir::nf4::Nf4Scales::Double { codes, absmax2, offset, .. } => {
                assert_eq!((&parts[1], &parts[2], &parts[3]), (codes, &le(absmax2), &le(&[*offset])));
            }
        }
        check_nf4_format(&q, f, &shape).unwrap();
        let other = Nf4Format { double_quant: if dq.is_some() { None } else { Some(256) }, ..f };
        assert!(check_nf4_format(&q, other, &shape).is_err());
        assert!(check_nf4_format(&q, Nf4Format { block: 32, ..f }, &shape).is_err());
        assert!(check_nf4_format(&q, f, &[numel + 1]).is_err());
    }
}

/// An NF4 weight set from f32 is quantized as the interpreter quantizes it, and a kernel reading its storage parts
/// dequantizes it bit for bit.
#[test]
fn an_nf4_parameter_is_quantized_and_passed_as_its_parts() {
    let lib = host_library();
    let f = Nf4Format { block: 64, double_quant: None };
    let mut b = Builder::new("nf4");
    let w = b.param("w", Type::new(DType::Nf4(f), vec![4, 64]), Role::Frozen, Init::Load).unwrap();
    let d = b.nf4_dequantize(w).unwrap();
    b.output(OutputKind::Logits, d);
    let mut g = b.finish();
    g.kernels = vec![Kernel { name: "nf4_dequantize:w".into(), nodes: vec![d] }];
    let values = vec![ValuePlacement::Owns(0), ValuePlacement::Owns(1)];
    let bytes = DType::Nf4(f).storage_bytes(256) as u64;
    let buffers = vec![
        PlanBuffer {
            region: Region::Persistent,
            offset: 0,
            bytes: bytes.div_ceil(256) * 256,
            start: 0,
            end: 1,
            first: 0,
        },
        PlanBuffer { region: Region::Arena, offset: 0, bytes: 1024, start: 0, end: 1, first: 1 },
    ];
    let mut plan = build_plan(PlanSource {
        recipe: "nf4".into(),
        target: "cpu".into(),
        graph: g,
        values,
        buffers,
        arena_bytes: 1024,
        persistent_bytes: 256,
        train: train(),
        peft: None,
        model_config: vec![],
    })
    .unwrap();
    plan.kernels[0].symbol = "t_dequant".into();
    plan.kernels[0].args =
        vec![KernelArg { value: w.0, part: 0 }, KernelArg { value: w.0, part: 1 }, KernelArg { value: d.0, part: 0 }];
    plan.host_library = Some(lib);
    let weights: Vec<f32> = (0..256).map(|i| ((i as f32) * 0.731).sin() * 0.1).collect();
    let mut env = Env::default();
    env.params.insert("w".into(), Value::F(Tensor::from_f32(vec![4, 64], &weights)));
    let want = run(&plan.graph, &env, Precision::F32).unwrap();
    let q = ir::nf4::quantize(&weights, &[4, 64], 64, None);

    let mut cpu = CpuBackend::new(&plan, 2).unwrap();
    cpu.set_param_f32("w", &weights).unwrap();
    assert_eq!(cpu.param_nf4("w").unwrap(), Some(&q));
    for (k, part) in nf4_parts(&q).iter().enumerate() {
        assert_eq!(cpu.nf4_part("w", k).unwrap(), Some(&part[..]), "part {k}");
    }
    let out = cpu.step().unwrap();
    let got: Vec<u32> = out.logits().unwrap().iter().map(|x| x.to_bits()).collect();
    let want: Vec<u32> = floats(&want[d.index()]).iter().map(|x| x.to_bits()).collect();
    assert_eq!(got, want);
    assert_eq!(cpu.param_f32("w").unwrap(), ir::nf4::dequantize(&q));

    // A tensor in another format is refused.
    let err = cpu.set_param_nf4("w", &ir::nf4::quantize(&weights, &[4, 64], 64, Some(256))).unwrap_err().to_string();
    assert_eq!(err, "NF4 parameter `w`: double-quantized scales, but the format keeps plain f32 absmax");
    // An NF4 part the parameter does not have.
    plan.kernels[0].args[1].part = 3;
    let err = CpuBackend::new(&plan, 1).unwrap_err().to_string();
    assert_eq!(err, "kernel 'nf4_dequantize:w': argument 1 is part 3 of NF4 parameter `w`, which has 2 parts");
}

#[test]
fn a_plan_file_loads() {
    let lib = host_library();
    let (plan, _) = sgd_plan(&lib);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sgd.plan.bin");
    // A plan file loads only when it is authenticated (signed with the user's key; here a test's own config dir).
    let trust = runtime::trust::TrustOptions::in_dir(dir.path().join("home"));
    runtime::trust::write_signed(&plan, &path, &trust).unwrap();
    let cpu = CpuBackend::load(&path, 0, &trust).unwrap();
    assert!(cpu.threads() >= 1);
    plan.write(&path).unwrap();
    let err = CpuBackend::load(&path, 0, &trust).unwrap_err();
    assert!(err.to_string().contains("refused: the plan is not signed"), "{err}");
    let err = CpuBackend::load(Path::new("/nonexistent/plan.bin"), 1, &trust).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Trust(runtime::trust::TrustError::Plan { source: ir::plan::PlanError::Io { .. }, .. })
        ),
        "{err:?}"
    );
}

/// A kernel with run-time constants (`KernelCode::seeds`) gets a pointer to them after its buffers.
#[test]
fn seeds_follow_the_buffers() {
    let lib = host_library();
    let mut b = Builder::new("seeded");
    let x = b.input("x", Type::f32(vec![8])).unwrap();
    let y = b.scale(x, 1.0).unwrap();
    b.output(OutputKind::Logits, y);
    let mut g = b.finish();
    g.kernels = vec![Kernel { name: "seeded:y".into(), nodes: vec![y] }];
    let mut plan = build_plan(PlanSource {
        recipe: "seeded".into(),
        target: "cpu".into(),
        graph: g,
        values: vec![ValuePlacement::Owns(0), ValuePlacement::Owns(1)],
        buffers: vec![buffer(Region::Persistent, 0, x.0), buffer(Region::Arena, 0, y.0)],
        arena_bytes: 256,
        persistent_bytes: 256,
        train: train(),
        peft: None,
        model_config: vec![],
    })
    .unwrap();
    let (symbol, args, launch) = kernel("t_seeded", &[x.0, y.0], &[]);
    plan.kernels[0] =
        ir::plan::KernelCode { symbol, args, launch, seeds: vec![100, u64::MAX], ..plan.kernels[0].clone() };
    plan.host_library = Some(lib);
    let mut cpu = CpuBackend::new(&plan, 2).unwrap();
    cpu.set_input_f32("x", &[0.0; 8]).unwrap();
    let (a, b) = ((100 % 97) as f32, (u64::MAX % 97) as f32);
    assert_eq!(cpu.step().unwrap().logits().unwrap(), &[a, b, a, b, a, b, a, b]);
}

/// The message of a plan the cpu backend refuses (and that it refuses it at all).
fn refusal(plan: &Plan) -> String {
    match CpuBackend::new(plan, 1) {
        Ok(_) => panic!("the plan was loaded"),
        Err(e) => e.to_string(),
    }
}

/// Defect 2 (a): an arena of nearly 2^64 bytes used to wrap to a tiny allocation (release builds) that the kernels
/// then wrote past (SIGSEGV). Refused when read and when loaded, before anything is allocated.
#[test]
fn an_arena_near_2_64_bytes_is_refused_before_allocating() {
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.arena_bytes = u64::MAX - 10;
    let err = Plan::from_bytes(&plan.to_bytes().unwrap()).unwrap_err();
    assert!(matches!(err, ir::plan::PlanError::Inconsistent(_)), "{err:?}");
    assert!(err.to_string().contains("the arena is 18446744073709551605 bytes, more than the limit"), "{err}");
    let err = CpuBackend::new(&plan, 1).unwrap_err();
    assert!(matches!(err, RuntimeError::Plan(ir::plan::PlanError::Inconsistent(_))), "{err:?}");
    // The largest a region may be still has every buffer checked, and then the memory available.
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.persistent_bytes = ir::plan::MAX_REGION_BYTES;
    let err = CpuBackend::new(&plan, 1).unwrap_err();
    assert!(matches!(err, RuntimeError::NotEnoughMemory { .. }), "{err:?}");
}

/// Defect 2 (b): a buffer whose offset + bytes leave its region (or overflow) names the buffer.
#[test]
fn a_buffer_beyond_its_region_is_refused_by_name() {
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.buffers[4].offset = 1000;
    assert!(refusal(&plan).contains("buffer 4 (Arena, offset 1000, 256 bytes"), "{}", refusal(&plan));
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.buffers[2].offset = 512;
    plan.buffers[2].bytes = u64::MAX - 100;
    assert!(refusal(&plan).contains("buffer 2 (Persistent, offset 512, 18446744073709551515 bytes"));
}

/// Defect 2 (c): a value in a buffer smaller than its type — a kernel argument, or a constant output the backend
/// fills — is refused naming the value and the buffer (a constant output used to be written past its buffer).
#[test]
fn a_value_in_a_too_small_buffer_is_refused_by_name() {
    let (mut plan, ids) = sgd_plan(b"not loaded");
    plan.buffers[4].bytes = 16;
    let err = refusal(&plan);
    let want = format!("value {} (f32[8], 32 bytes) is placed in buffer 4 (Arena, offset 0), which has only 16", ids.a);
    assert!(err.contains(&want), "{err}");
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.buffers[7].bytes = 2;
    let err = refusal(&plan);
    assert!(err.contains("(f32[], 4 bytes) is placed in buffer 7 (Arena, offset 768), which has only 2"), "{err}");
}

/// Defect 2 (d): indices out of range — a kernel argument's value, a placement's buffer, `zero_host`/`zero_gpu`
/// (also the seeds pointer's slot, which used to index past the sizes: a panic) — and kernels that share code but
/// not its argument count are refused by name.
#[test]
fn indices_out_of_range_are_refused_by_name() {
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.kernels[2].args[3].value = 4_000_000_000;
    let err = refusal(&plan);
    assert!(err.contains("kernel 2 `update:p`: argument 3 takes value %4000000000"), "{err}");
    let (mut plan, ids) = sgd_plan(b"not loaded");
    plan.values[ids.m1.index()] = ValuePlacement::Owns(8);
    assert!(refusal(&plan).contains("is placed at Owns(8), but there are 8 buffers"), "{}", refusal(&plan));
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.kernels[3].launch.as_mut().unwrap().zero_gpu = vec![3];
    assert_eq!(refusal(&plan), "kernel 'add:m': zero_gpu names argument 3, but the kernel has 3");
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.kernels[0].seeds = vec![1];
    plan.kernels[0].launch.as_mut().unwrap().zero_host = vec![3];
    assert_eq!(refusal(&plan), "kernel 'add:a': zero_host names argument 3, but the kernel has 3");
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.kernels[3].symbol = "t_add".into();
    plan.kernels[3].args.truncate(2);
    let err = refusal(&plan);
    assert!(err.contains("kernel 3 `add:m`: it runs `t_add` with 2 arguments and 0 seeds, but kernel 0"), "{err}");
}

/// Defect 4: a plan needing more memory than the host has available is refused before allocating, with both
/// numbers and the fix (it used to abort in the allocator).
#[test]
fn a_plan_needing_more_than_mem_available_is_refused() {
    let (mut plan, _) = sgd_plan(b"not loaded");
    plan.arena_bytes = 1 << 43;
    let err = CpuBackend::new(&plan, 1).unwrap_err();
    let msg = err.to_string();
    let RuntimeError::NotEnoughMemory { needed, available, .. } = err else { panic!("{msg}") };
    assert_eq!(needed, (1 << 43) + 1024);
    assert!(available < needed);
    assert!(msg.starts_with("the plan needs 8192.0 GiB (8796093023232 bytes) of host memory (MemAvailable), but "));
    assert!(msg.contains(&format!("({available} bytes) is available")), "{msg}");
    assert!(msg.contains("--recompute per-block` or a smaller micro_batch / seq_len"), "{msg}");
}
