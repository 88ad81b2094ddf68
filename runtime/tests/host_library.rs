//! Defect 12 (part): the cpu backend loads a plan's host library from a temporary file; the file is removed as soon
//! as the library is loaded (so a killed process leaves none behind), and files that killed processes left behind
//! are removed on the next load. Its own test binary: it points `TMPDIR` at a directory of its own, which no other
//! test may see change.

use ir::plan::{build_plan, KernelArg, KernelLaunch, PlanBuffer, PlanSource, Region, TrainSettings, ValuePlacement};
use ir::{Builder, Kernel, OutputKind, Type};
use runtime::cpu::remove_stale_host_libraries;
use runtime::CpuBackend;
use std::path::Path;

/// `y = x` (one kernel) with its host code compiled here by the system's C compiler.
fn plan() -> ir::plan::Plan {
    let dir = tempfile::tempdir().unwrap();
    let (src, lib) = (dir.path().join("k.c"), dir.path().join("libk.so"));
    std::fs::write(
        &src,
        "#include <stdint.h>\nvoid t_copy(void **a, int32_t tid, int32_t nt) {\n  const float *x = a[0]; float *y = a[1];\n  \
         if (tid == 0) for (int i = 0; i < 8; i++) y[i] = x[i];\n}\n",
    )
    .unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(&cc).args(["-shared", "-fPIC", "-o"]).arg(&lib).arg(&src).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut b = Builder::new("copy");
    let x = b.input("x", Type::f32(vec![8])).unwrap();
    let y = b.scale(x, 1.0).unwrap();
    b.output(OutputKind::Logits, y);
    let mut g = b.finish();
    g.kernels = vec![Kernel { name: "copy:y".into(), nodes: vec![y] }];
    let buffer = |region, first| PlanBuffer { region, offset: 0, bytes: 256, start: 0, end: 1, first };
    let mut plan = build_plan(PlanSource {
        recipe: "copy".into(),
        target: "cpu".into(),
        graph: g,
        values: vec![ValuePlacement::Owns(0), ValuePlacement::Owns(1)],
        buffers: vec![buffer(Region::Persistent, x.0), buffer(Region::Arena, y.0)],
        arena_bytes: 256,
        persistent_bytes: 256,
        train: TrainSettings {
            seq_len: 1,
            lr: 0.0,
            steps: 1,
            max_grad_norm: 0.0,
            seed: 0,
            save_every: 0,
            ..TrainSettings::default()
        },
        peft: None,
        model_config: vec![],
    })
    .unwrap();
    plan.kernels[0].symbol = "t_copy".into();
    plan.kernels[0].args = vec![KernelArg { value: x.0, part: 0 }, KernelArg { value: y.0, part: 0 }];
    plan.kernels[0].launch = Some(KernelLaunch { grid: (1, 1, 1), block: 32, ..KernelLaunch::default() });
    plan.host_library = Some(std::fs::read(&lib).unwrap());
    plan
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The pid of a process that has exited (a child, waited for).
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn no_library_file_is_left_and_stale_ones_are_removed() {
    let plan = plan();
    let tmp = tempfile::tempdir().unwrap();
    // The only test in this binary: nothing else reads TMPDIR concurrently.
    std::env::set_var("TMPDIR", tmp.path());
    let dead = dead_pid();
    let me = std::process::id();
    for name in [
        format!("tunec-host-{dead}-AbC123.so"),
        format!("tunec-host-{me}-alive.so"),
        "tunec-host-notapid-x.so".to_string(),
        "other.so".to_string(),
    ] {
        std::fs::write(tmp.path().join(name), b"stale").unwrap();
    }
    let mut cpu = CpuBackend::new(&plan, 2).unwrap();
    // While the backend runs, its library is loaded and no file of it remains; the dead process's file is gone.
    let mut want =
        vec![format!("tunec-host-{me}-alive.so"), "other.so".to_string(), "tunec-host-notapid-x.so".to_string()];
    want.sort();
    assert_eq!(files(tmp.path()), want);
    cpu.set_input_f32("x", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).unwrap();
    assert_eq!(cpu.step().unwrap().logits().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    let second = CpuBackend::new(&plan, 1).unwrap();
    assert_eq!(files(tmp.path()), want, "a second backend in the same process loads its own copy");
    drop((cpu, second));
    assert_eq!(remove_stale_host_libraries(tmp.path()), 0, "files of live processes and other names stay");
}
