//! The optimized training step equals the unoptimized one: loss, gradient norm and every updated parameter and
//! optimizer state after a step, on the tiny Llama with the golden fixtures' weights, in the interpreter — f64
//! (1e-9, only summation order differs) and f32 (1e-5).

use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::{Graph, OutputKind, Role};
use passes::{training_pipeline, PassManager, PipelineOptions};
use tests::fixture::Fixture;
use tests::{compile_example, rel_err};

fn step(example: &str, unoptimized: bool) -> Graph {
    let mut g = compile_example(example).forward;
    let opts = PipelineOptions { unoptimized, ..PipelineOptions::default() };
    PassManager::new(training_pipeline(&opts)).run(&mut g).unwrap();
    g
}

fn env(fx: &Fixture, g: &Graph) -> Env {
    let mut env = fx.llama_env();
    for (v, name, role) in g.params() {
        if role == Role::State {
            env.params.insert(name.to_string(), Value::F(Tensor::zeros(&g.ty(v).shape)));
        }
    }
    env.inputs.insert("lr".into(), Value::F(Tensor::scalar(1e-2)));
    env.inputs.insert("opt_step".into(), Value::ints(vec![], vec![1]));
    env
}

fn equivalent(case: &str, example: &str) {
    let fx = Fixture::load(&format!("llama_{case}.safetensors"), "tunec-golden-llama", "1");
    let (base, opt) = (step(example, true), step(example, false));
    assert!(opt.nodes.len() < base.nodes.len(), "{case}: the optimizer did nothing");
    for (precision, tol) in [(Precision::F64, 1e-9), (Precision::F32, 1e-5)] {
        let vb = run(&base, &env(&fx, &base), precision).unwrap();
        let vo = run(&opt, &env(&fx, &opt), precision).unwrap();
        let mut compared = 0;
        for o in &base.outputs {
            if matches!(o.kind, OutputKind::Grad(_)) {
                continue; // gradients feed the updates, which are compared
            }
            let other = opt.output(&o.kind).unwrap_or_else(|| panic!("{case}: optimized step lost {:?}", o.kind));
            let (a, b) = (&vb[o.value.index()].as_f().unwrap().data, &vo[other.index()].as_f().unwrap().data);
            let e = rel_err(b, a);
            assert!(e < tol, "{case} {precision:?}: {:?} differs by {e:e}", o.kind);
            compared += 1;
        }
        assert!(compared > 3 * 28, "{case}: compared only {compared} outputs");
    }
}

#[test]
fn optimized_lora_step_equals_unoptimized() {
    equivalent("lora", "tiny.lora.rs");
}

#[test]
fn optimized_qlora_step_equals_unoptimized() {
    equivalent("qlora", "tiny.qlora.rs");
}

#[test]
fn optimized_dora_step_equals_unoptimized() {
    equivalent("dora", "tiny.dora.rs");
}

#[test]
fn optimized_qdora_step_equals_unoptimized() {
    equivalent("qdora", "tiny.qdora.rs");
}
