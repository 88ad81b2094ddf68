//! Shared helpers for tunec's cross-crate tests: reading the golden fixtures written by `tests/reference/`,
//! compiling the example recipes, and preparing interpreter environments.

pub mod fixture;

use std::path::PathBuf;

/// The repository root (this crate sits in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Compiles `examples/<name>` with the shipped model library.
pub fn compile_example(name: &str) -> frontend::CompiledRecipe {
    let path = repo_root().join("examples").join(name);
    match frontend::compile_file(&path, models::library()) {
        Ok(r) => r,
        Err(d) => panic!("{}", d.render()),
    }
}

/// Inf-norm relative error: max|a − b| / max|b|.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}
