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
