//! The slim runner (`tunec-runner`, no LLVM): it runs plan files and refuses recipes with what to do instead;
//! `tunec/tests/run_cli.rs` covers the training command itself (the same `runtime::cli::run`). A plan is code: `run`
//! and `bench` refuse a plan that is unsigned, signed with another key or modified after signing — and load none of
//! its code — unless `trust` or `--trust-plan` says otherwise; every test has its own config dir (`TUNEC_HOME`).

use ir::plan::{
    build_plan, KernelArg, KernelLaunch, Plan, PlanBuffer, PlanSource, Region, TrainSettings, ValuePlacement,
};
use runtime::trust::{write_signed, TrustOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn the_runner_refuses_a_recipe_and_says_how_to_compile_it() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tunec-runner"))
        .env("TUNEC_HOME", home.path())
        .args(["run", "examples/tiny.lora.rs", "--data", "x.jsonl", "--out", "/nonexistent", "--random-weights"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("this runner executes compiled plans") && err.contains("tunec compile"), "{err}");
}

#[test]
fn the_runner_names_a_missing_plan_file() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tunec-runner"))
        .env("TUNEC_HOME", home.path())
        .args(["run", "/nonexistent/plan.bin", "--data", "x.jsonl", "--out", "/tmp/o", "--backend", "cpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/plan.bin"), "{err}");
}

// ---- A plan is code: the runner loads only plans it can authenticate (runtime::trust) ----

/// A host library whose constructor writes the file `$TUNEC_TEST_MARKER` the moment it is loaded (what a hostile
/// plan would do: run code on load), with the one kernel of [`plan_with`]: y = x + x.
const HOSTILE_C: &str = r#"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void on_load(void) {
    const char *m = getenv("TUNEC_TEST_MARKER");
    if (m) { FILE *f = fopen(m, "w"); if (f) { fputs("code from the plan ran\n", f); fclose(f); } }
}
void t_double(void **a, int32_t tid, int32_t nt) {
    const float *x = a[0];
    float *y = a[1];
    if (tid == 0) for (int i = 0; i < 8; i++) y[i] = x[i] + x[i];
}
"#;

/// The same kernel without a constructor.
const BENIGN_C: &str = r#"
#include <stdint.h>
void t_double(void **a, int32_t tid, int32_t nt) {
    const float *x = a[0];
    float *y = a[1];
    if (tid == 0) for (int i = 0; i < 8; i++) y[i] = x[i] + x[i];
}
"#;

fn shared_object(dir: &Path, name: &str, source: &str) -> Vec<u8> {
    let (src, lib) = (dir.join(format!("{name}.c")), dir.join(format!("lib{name}.so")));
    std::fs::write(&src, source).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc).args(["-shared", "-fPIC", "-O1", "-o"]).arg(&lib).arg(&src).output().unwrap();
    assert!(out.status.success(), "{cc}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&lib).unwrap()
}

/// A complete one-kernel plan (y = x + x) the cpu backend runs, with `library` as its host library.
fn plan_with(library: Vec<u8>) -> Plan {
    let graph = ir::text::parse(
        "graph \"double\" {\n  %0 = input {name=\"x\"} : f32[8]\n  %1 = add(%0, %0) : f32[8]\n  output logits = %1\n  \
         kernel \"add:y\" = [%1]\n}\n",
    )
    .unwrap();
    let buf = |region, first| PlanBuffer { region, offset: 0, bytes: 32, start: 0, end: 1, first };
    let mut plan = build_plan(PlanSource {
        recipe: "double".into(),
        target: "cpu".into(),
        graph,
        values: vec![ValuePlacement::Owns(0), ValuePlacement::Owns(1)],
        buffers: vec![buf(Region::Persistent, 0), buf(Region::Arena, 1)],
        arena_bytes: 32,
        persistent_bytes: 32,
        train: TrainSettings {
            seq_len: 1,
            lr: 0.1,
            steps: 1,
            max_grad_norm: 0.0,
            seed: 1,
            save_every: 0,
            ..TrainSettings::default()
        },
        peft: None,
        model_config: vec![],
    })
    .unwrap();
    plan.kernels[0].symbol = "t_double".into();
    plan.kernels[0].args = vec![KernelArg { value: 0, part: 0 }, KernelArg { value: 1, part: 0 }];
    plan.kernels[0].launch = Some(KernelLaunch { grid: (1, 1, 1), block: 1, ..Default::default() });
    plan.host_library = Some(library);
    plan
}

/// A test's own world: the victim's config dir (its key and trust list), an attacker's, the marker file.
struct World {
    dir: tempfile::TempDir,
    hostile: Vec<u8>,
    benign: Vec<u8>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let hostile = shared_object(dir.path(), "hostile", HOSTILE_C);
        let benign = shared_object(dir.path(), "benign", BENIGN_C);
        World { dir, hostile, benign }
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    fn marker(&self) -> PathBuf {
        self.dir.path().join("marker")
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// `tunec-runner ARGS` as the victim (their config dir, the marker's path in the environment).
    fn runner(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_tunec-runner"))
            .args(args)
            .env("TUNEC_HOME", self.home())
            .env("TUNEC_TEST_MARKER", self.marker())
            .output()
            .unwrap()
    }
    fn bench(&self, plan: &Path, extra: &[&str]) -> std::process::Output {
        let mut args = vec!["bench", plan.to_str().unwrap(), "--backend", "cpu", "--steps", "1", "--threads", "1"];
        args.extend_from_slice(extra);
        self.runner(&args)
    }
    fn run(&self, plan: &Path, extra: &[&str]) -> std::process::Output {
        let out = self.path("out");
        let mut args = vec![
            "run",
            plan.to_str().unwrap(),
            "--data",
            "/nonexistent/data.jsonl",
            "--tokenizer",
            "/nonexistent/tok",
            "--random-weights",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.runner(&args)
    }
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts `o` failed, refusing the plan for `case`, saying a plan is native code and how to trust one, and that no
/// code of the plan ran.
fn assert_refused(w: &World, o: &std::process::Output, case: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "{err}");
    for want in [case, "refused", "a plan is native code", "trust ", "--trust-plan"] {
        assert!(err.to_lowercase().contains(&want.to_lowercase()), "stderr lacks {want:?}: {err}");
    }
    assert!(!w.marker().exists(), "the plan's host library was loaded: {err}");
}

#[test]
fn a_plan_whose_host_library_was_swapped_runs_no_code() {
    let w = World::new();
    let victim = TrustOptions::in_dir(w.home());
    // The victim compiled (signed) a plan; an attacker swapped its host library for one with a constructor and fixed
    // the CRC (re-encoded the payload), keeping the signature block.
    let good = w.path("good.plan");
    write_signed(&plan_with(w.benign.clone()), &good, &victim).unwrap();
    let signed = std::fs::read(&good).unwrap();
    let block = &signed[signed.len() - ir::plan::SIGNATURE_BYTES..];
    let mut swapped = plan_with(w.hostile.clone()).to_bytes().unwrap();
    swapped.extend_from_slice(block);
    let evil = w.path("swapped.plan");
    std::fs::write(&evil, &swapped).unwrap();
    let case = "does not match its content: the file was modified after it was signed";
    assert_refused(&w, &w.bench(&evil, &[]), case);
    assert_refused(&w, &w.run(&evil, &[]), case);
    // Unsigned (a plan written without a key), and signed with the attacker's own key: refused the same way.
    let unsigned = w.path("unsigned.plan");
    plan_with(w.hostile.clone()).write(&unsigned).unwrap();
    assert_refused(&w, &w.bench(&unsigned, &[]), "the plan is not signed");
    assert_refused(&w, &w.run(&unsigned, &[]), "the plan is not signed");
    let foreign = w.path("foreign.plan");
    write_signed(&plan_with(w.hostile.clone()), &foreign, &TrustOptions::in_dir(w.path("attacker"))).unwrap();
    assert_refused(&w, &w.bench(&foreign, &[]), "signed with another key");
    assert_refused(&w, &w.run(&foreign, &[]), "signed with another key");
    // The control: had the plan been loaded, its code would have run (what happened before plans were signed).
    let o = w.bench(&unsigned, &["--trust-plan"]);
    assert!(w.marker().exists(), "the control did not load the library: {}", stderr(&o));
}

#[test]
fn the_users_own_plan_runs_and_trust_or_trust_plan_make_a_foreign_plan_run() {
    let w = World::new();
    let own = w.path("own.plan");
    write_signed(&plan_with(w.benign.clone()), &own, &TrustOptions::in_dir(w.home())).unwrap();
    let o = w.bench(&own, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let foreign = w.path("foreign.plan");
    write_signed(&plan_with(w.hostile.clone()), &foreign, &TrustOptions::in_dir(w.path("builder"))).unwrap();
    assert_refused(&w, &w.bench(&foreign, &[]), "signed with another key");
    // --trust-plan: once, with a warning; nothing is recorded.
    let o = w.bench(&foreign, &["--trust-plan"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("not verified (--trust-plan)"), "{}", stderr(&o));
    assert!(w.marker().exists());
    std::fs::remove_file(w.marker()).unwrap();
    assert_refused(&w, &w.bench(&foreign, &[]), "signed with another key");
    // `trust --sha256` with the wrong digest trusts nothing.
    let wrong = "0".repeat(64);
    let o = w.runner(&["trust", foreign.to_str().unwrap(), "--sha256", &wrong]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("not {wrong}")) && stderr(&o).contains("nothing was trusted"),
        "{}",
        stderr(&o)
    );
    assert_refused(&w, &w.bench(&foreign, &[]), "signed with another key");
    // `trust` with the right digest (as sha256sum prints it): from then on it runs.
    let digest = runtime::trust::sha256_hex(&std::fs::read(&foreign).unwrap());
    let o = w.runner(&["trust", foreign.to_str().unwrap(), "--sha256", &digest.to_uppercase()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("trusted {}", foreign.display())));
    let list = std::fs::read_to_string(w.home().join("trusted-plans")).unwrap();
    assert!(list.starts_with(&format!("{digest} ")), "{list}");
    let o = w.bench(&foreign, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(w.marker().exists());
    // A trusted digest names exactly that file: one changed byte and it is refused again.
    let mut changed = std::fs::read(&foreign).unwrap();
    let n = changed.len();
    changed[n - 1] ^= 1;
    std::fs::write(&foreign, &changed).unwrap();
    std::fs::remove_file(w.marker()).unwrap();
    assert_refused(&w, &w.bench(&foreign, &[]), "signed with another key");
}

#[test]
fn a_truncated_signature_and_a_device_are_refused_with_their_own_message() {
    let w = World::new();
    let own = w.path("own.plan");
    write_signed(&plan_with(w.hostile.clone()), &own, &TrustOptions::in_dir(w.home())).unwrap();
    let mut b = std::fs::read(&own).unwrap();
    b.truncate(b.len() - 5);
    std::fs::write(&own, &b).unwrap();
    for o in [w.bench(&own, &[]), w.bench(&own, &["--trust-plan"])] {
        assert!(!o.status.success());
        assert!(stderr(&o).contains("truncated signature"), "{}", stderr(&o));
        assert!(!w.marker().exists());
    }
    let o = w.bench(Path::new("/dev/zero"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/dev/zero: not a regular file (a character device)"), "{}", stderr(&o));
}

#[test]
fn nonsense_numbers_on_the_command_line_are_refused_before_anything_runs() {
    // Issue 11, defect 5: `--lr nan` used to train and write an all-NaN adapter with exit status 0.
    for (flag, value, want) in [
        ("--lr", "nan", "error: --lr (the peak learning rate): expected a finite number > 0, found NaN"),
        ("--lr", "-1e-4", "found -0.0001"),
        ("--lr", "inf", "found inf"),
        ("--steps", "0", "error: --steps: expected an integer in [1, 2147483647], found 0"),
        ("--warmup", "99999999999", "error: --warmup: expected an integer in [0, 2147483647]"),
        ("--eval-split", "nan", "error: --eval-split: expected a fraction in [0, 1) or a whole count"),
        ("--eval-split", "2.5", "found 2.5"),
        ("--threads", "0", "error: --threads: expected an integer in [1, 4096], found 0"),
    ] {
        let arg = format!("{flag}={value}");
        let out = Command::new(env!("CARGO_BIN_EXE_tunec-runner"))
            .args(["run", "/nonexistent/plan.bin", "--data", "x.jsonl", "--out", "/nonexistent/o", &arg])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{flag} {value}: {err}");
    }
}
