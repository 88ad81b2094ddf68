//! The training-step pipeline on the tiny recipes: IR snapshots after each pass, frozen-gradient elimination as a
//! visible, counted step, and the whole step running in the interpreter.

use ir::interp::{run, Precision, Tensor, Value};
use ir::{Graph, Op, OutputKind, Role};
use passes::autodiff::{differentiate, Wrt};
use passes::{training_pipeline, PassManager, PipelineOptions};
use tests::compile_example;
use tests::fixture::Fixture;

fn run_pipeline(example: &str) -> (Graph, PassManager) {
    let recipe = compile_example(example);
    let mut g = recipe.forward.clone();
    let mut pm = PassManager::new(training_pipeline(&PipelineOptions::default()));
    pm.dump_all();
    pm.run(&mut g).unwrap();
    (g, pm)
}

fn dump<'a>(pm: &'a PassManager, pass: &str) -> &'a str {
    &pm.dumps.iter().find(|(p, _)| p == pass).unwrap_or_else(|| panic!("no dump after {pass}")).1
}

/// Matmuls that produce a weight gradient: op(A)ᵀ·B with the token axis contracted (ta = true).
fn weight_grad_matmuls(g: &Graph) -> usize {
    g.nodes.iter().filter(|n| matches!(n.op, Op::MatMul { ta: true, .. })).count()
}

fn frozen_grad_outputs(g: &Graph) -> usize {
    let frozen: Vec<_> = g.params().into_iter().filter(|p| p.2 == Role::Frozen).map(|p| p.1.to_string()).collect();
    g.outputs.iter().filter(|o| matches!(&o.kind, OutputKind::Grad(p) if frozen.contains(p))).count()
}

#[test]
fn snapshots_of_the_lora_training_step() {
    let (_, pm) = run_pipeline("tiny.lora.rs");
    for pass in pm.names() {
        insta::assert_snapshot!(format!("tiny_lora_after_{pass}"), dump(&pm, pass));
    }
}

#[test]
fn snapshots_of_the_qlora_training_step() {
    let (_, pm) = run_pipeline("tiny.qlora.rs");
    for pass in pm.names() {
        insta::assert_snapshot!(format!("tiny_qlora_after_{pass}"), dump(&pm, pass));
    }
}

#[test]
fn frozen_gradients_are_eliminated_visibly() {
    for example in ["tiny.lora.rs", "tiny.qlora.rs", "tiny.dora.rs"] {
        let (g, pm) = run_pipeline(example);
        let after_ad = ir::text::parse(dump(&pm, "autodiff")).unwrap();
        let after_elim = ir::text::parse(dump(&pm, "eliminate-frozen-grads")).unwrap();
        let lora_modules = g.params().iter().filter(|p| p.1.ends_with(".lora_A.weight")).count();
        assert_eq!(lora_modules, 14, "{example}: 7 linears × 2 layers carry LoRA");
        // Before: every float frozen parameter has a gradient (unquantized linears, norms, embeddings, lm_head).
        assert!(frozen_grad_outputs(&after_ad) > 0, "{example}: autodiff produced no frozen gradients to remove");
        assert_eq!(frozen_grad_outputs(&after_elim), 0, "{example}");
        assert_eq!(frozen_grad_outputs(&g), 0, "{example}");
        // After: weight-gradient matmuls are exactly dA and dB of each LoRA module.
        assert!(weight_grad_matmuls(&after_ad) > 2 * lora_modules, "{example}");
        assert_eq!(weight_grad_matmuls(&g), 2 * lora_modules, "{example}: weight-gradient matmuls");
        // No gradient reaches the embedding table.
        assert!(!g.nodes.iter().any(|n| matches!(n.op, Op::EmbeddingBwd { .. })), "{example}: embedding backward");
        let report = pm.reports.iter().find(|r| r.pass == "eliminate-frozen-grads").unwrap();
        assert!(report.nodes_after < report.nodes_before, "{example}: {}", report.summary);
    }
}

/// Differentiating w.r.t. trainable parameters directly and pruning dead code gives the same matmul work as the
/// pipeline: the elimination removes everything frozen gradients needed and nothing else.
#[test]
fn elimination_equals_differentiating_only_trainables() {
    for example in ["tiny.lora.rs", "tiny.qlora.rs", "tiny.dora.rs"] {
        let recipe = compile_example(example);
        let mut direct = recipe.forward.clone();
        differentiate(&mut direct, Wrt::Trainable).unwrap();
        direct.remove_dead();
        let (_, pm) = run_pipeline(example);
        let elim = ir::text::parse(dump(&pm, "eliminate-frozen-grads")).unwrap();
        let count = |g: &Graph, pred: &dyn Fn(&Op) -> bool| g.nodes.iter().filter(|n| pred(&n.op)).count();
        for (what, pred) in [
            ("matmul", &(|o: &Op| matches!(o, Op::MatMul { .. })) as &dyn Fn(&Op) -> bool),
            ("attention_bwd", &|o: &Op| matches!(o, Op::AttentionBwd { .. })),
            ("rms_norm_bwd_x", &|o: &Op| matches!(o, Op::RmsNormBwdX { .. })),
        ] {
            assert_eq!(count(&direct, pred), count(&elim, pred), "{example}: {what}");
        }
    }
}

/// Three whole training steps (forward, backward, clipping, AdamW) in the interpreter: the loss goes down and only
/// trainable parameters change.
#[test]
fn training_step_runs_and_lowers_the_loss() {
    let fx = Fixture::load("llama_lora.safetensors", "tunec-golden-llama", "1");
    let (g, _) = run_pipeline("tiny.lora.rs");
    let mut env = fx.llama_env();
    for (_, name, role) in g.params() {
        if role == Role::State {
            let ty = g.ty(g.param(name).unwrap());
            env.params.insert(name.to_string(), Value::F(Tensor::zeros(&ty.shape)));
        }
    }
    env.inputs.insert("lr".into(), Value::F(Tensor::scalar(1e-2)));
    let mut losses = vec![];
    for t in 1..=3 {
        env.inputs.insert("opt_step".into(), Value::ints(vec![], vec![t]));
        let vals = run(&g, &env, Precision::F32).unwrap();
        losses.push(vals[g.output(&OutputKind::Loss).unwrap().index()].as_f().unwrap().data[0]);
        let norm = vals[g.output(&OutputKind::Metric("grad_norm".into())).unwrap().index()].as_f().unwrap().data[0];
        assert!(norm > 0.0 && norm.is_finite());
        for o in &g.outputs {
            if let OutputKind::Update(p) = &o.kind {
                env.params.insert(p.clone(), vals[o.value.index()].clone());
            }
        }
    }
    assert!(losses[2] < losses[0], "loss did not go down: {losses:?}");
    let updated: Vec<_> =
        g.outputs.iter().filter_map(|o| if let OutputKind::Update(p) = &o.kind { Some(p) } else { None }).collect();
    assert_eq!(updated.len(), 3 * 28, "each of 28 LoRA tensors and its two moments");
    assert!(updated.iter().all(|p| p.contains("lora_")));
}
