//! The slim runner (`tunec-runner`, no LLVM): it runs plan files and refuses recipes with what to do instead;
//! `tunec/tests/run_cli.rs` covers the training command itself (the same `runtime::cli::run`).

use std::process::Command;

#[test]
fn the_runner_refuses_a_recipe_and_says_how_to_compile_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_tunec-runner"))
        .args(["run", "examples/tiny.lora.rs", "--data", "x.jsonl", "--out", "/nonexistent", "--random-weights"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("this runner executes compiled plans") && err.contains("tunec compile"), "{err}");
}

#[test]
fn the_runner_names_a_missing_plan_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_tunec-runner"))
        .args(["run", "/nonexistent/plan.bin", "--data", "x.jsonl", "--out", "/tmp/o", "--backend", "cpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/plan.bin"), "{err}");
}
