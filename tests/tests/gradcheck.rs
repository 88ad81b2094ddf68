//! Gradient checks: autodiff gradients of the tiny Llama (2 layers, hidden 64, GQA 4/2 heads) vs central finite
//! differences in f64, for LoRA, QLoRA and DoRA, at the golden fixtures' weights (B ≠ 0, so every path carries
//! gradient). Error per parameter: ‖fd − ad‖₂ / ‖fd‖₂ over the checked elements, required < 1e-6.

use passes::gradcheck::check_gradients;
use tests::compile_example;
use tests::fixture::Fixture;

fn gradcheck(case: &str, example: &str) {
    let fx = Fixture::load(&format!("llama_{case}.safetensors"), "tunec-golden-llama", "1");
    let recipe = compile_example(example);
    let env = fx.llama_env();
    // Six elements of every trainable tensor (every LoRA A and B, every DoRA magnitude).
    let checks = check_gradients(&recipe.forward, &env, 1e-5, Some(6)).unwrap();
    assert!(checks.len() >= 28, "{case}: only {} parameters checked", checks.len());
    let worst = checks.iter().max_by(|a, b| a.rel_err.total_cmp(&b.rel_err)).unwrap();
    for c in &checks {
        assert!(c.fd_norm > 0.0, "{case}: {} has zero finite-difference gradient", c.param);
        assert!(c.rel_err < 1e-6, "{case}: {} relative error {:e}", c.param, c.rel_err);
    }
    eprintln!("{case}: {} tensors, worst {} at {:e}", checks.len(), worst.param, worst.rel_err);
}

#[test]
fn lora_gradients_match_finite_differences() {
    gradcheck("lora", "tiny.lora.rs");
}

#[test]
fn qlora_gradients_match_finite_differences() {
    gradcheck("qlora", "tiny.qlora.rs");
}

#[test]
fn dora_gradients_match_finite_differences() {
    gradcheck("dora", "tiny.dora.rs");
}
