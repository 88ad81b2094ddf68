//! Every recipe in `examples/` compiles; what each one records; the forward graph snapshot of `tiny.lora.rs`.

use frontend::{compile_file, CompiledRecipe, PeftMethod, TargetSpec};
use ir::{DType, Init, Nf4Format, Op, Role};
use std::path::{Path, PathBuf};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name)
}

fn compile(name: &str) -> CompiledRecipe {
    compile_file(&example(name), models::library()).unwrap_or_else(|d| panic!("{name}:\n{}", d.render()))
}

#[test]
fn every_example_compiles() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let r = compile_file(&path, models::library()).unwrap_or_else(|d| panic!("{}", d.render()));
            assert!(ir::verify::verify(&r.forward).is_ok());
            n += 1;
        }
    }
    assert!(n >= 8, "found {n} examples");
}

#[test]
fn forward_graph_of_tiny_lora() {
    let r = compile("tiny.lora.rs");
    insta::assert_snapshot!("tiny_lora_forward", ir::text::print(&r.forward));
}

fn trainable(r: &CompiledRecipe) -> Vec<&str> {
    r.forward.params().into_iter().filter(|(_, _, role)| *role == Role::Trainable).map(|(_, n, _)| n).collect()
}

const ALL7: [&str; 7] = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"];

#[test]
fn tiny_recipes_record_their_adapters() {
    let lora = compile("tiny.lora.rs");
    let p = lora.peft.as_ref().expect("an adapter");
    assert_eq!(
        (p.method, p.r, p.alpha, p.dropout, p.use_rslora, p.use_dora),
        (PeftMethod::Lora, 4, 8.0, 0.0, false, false)
    );
    assert_eq!(p.targets, TargetSpec::AllLinear);
    assert_eq!(p.target_modules, ALL7);
    assert_eq!(p.modules.len(), 14);
    assert!(lora.quant.is_none());
    assert_eq!((lora.train.seq_len, lora.train.micro_batch), (8, 2));
    assert_eq!(lora.name, "tiny.lora");
    assert!(lora.forward.param("lm_head.weight").is_none(), "tied embeddings");
    assert_eq!(trainable(&lora).len(), 28);
    assert!(lora.forward.input("step").is_none());

    let rs = compile("tiny.lora-rslora.rs");
    let p = rs.peft.as_ref().expect("an adapter");
    assert_eq!((p.r, p.alpha, p.use_rslora), (8, 16.0, true));
    assert_eq!(p.targets, TargetSpec::Names(vec!["q_proj".into(), "v_proj".into()]));
    assert_eq!(p.target_modules, ["q_proj", "v_proj"]);
    assert!(rs.forward.param("lm_head.weight").is_some(), "untied");
    assert!(rs.forward.nodes.iter().any(|n| n.op == Op::Scale { c: 16.0 / 8f64.sqrt() }));

    let q = compile("tiny.qlora.rs");
    let p = q.peft.as_ref().expect("an adapter");
    assert_eq!((p.method, p.r, p.alpha), (PeftMethod::QLora, 4, 16.0));
    let quant = q.quant.as_ref().expect("quantized");
    assert_eq!((quant.block, quant.double_quant, quant.modules.len()), (64, true, 14));
    let w = q.forward.param("model.layers.1.mlp.gate_proj.weight").expect("gate_proj");
    assert_eq!(q.forward.ty(w).dtype, DType::Nf4(Nf4Format { block: 64, double_quant: Some(256) }));
    let head = q.forward.param("lm_head.weight").expect("lm_head");
    assert_eq!(q.forward.ty(head).dtype, DType::F32, "ALL_LINEAR leaves the LM head in f32");

    let d = compile("tiny.dora.rs");
    let p = d.peft.as_ref().expect("an adapter");
    assert_eq!((p.method, p.r, p.alpha, p.use_dora), (PeftMethod::Dora, 4, 8.0, true));
    assert_eq!(trainable(&d).len(), 3 * 14);

    let qd = compile("tiny.qdora.rs");
    let p = qd.peft.as_ref().expect("an adapter");
    assert_eq!((p.method, p.r, p.alpha, p.use_dora), (PeftMethod::QDora, 4, 16.0, true));
    let m = qd.forward.param("model.layers.0.self_attn.q_proj.lora_magnitude_vector").expect("magnitude");
    match &qd.forward.node(m).op {
        Op::Param { init, .. } => {
            assert_eq!(init, &Init::RowNorm { of: "model.layers.0.self_attn.q_proj.weight".into() })
        }
        _ => unreachable!(),
    }
}

#[test]
fn seven_b_qlora_recipe() {
    let r = compile("llama2-7b.qlora.rs");
    let p = r.peft.as_ref().expect("an adapter");
    assert_eq!((p.method, p.r, p.alpha, p.dropout), (PeftMethod::QLora, 64, 16.0, 0.1));
    assert_eq!(p.target_modules, ALL7);
    assert_eq!(p.modules.len(), 32 * 7);
    assert_eq!(r.quant.as_ref().map(|q| q.modules.len()), Some(32 * 7));
    assert_eq!((r.train.seq_len, r.train.micro_batch, r.train.lr), (512, 4, 2e-4));
    assert_eq!((r.train.beta1, r.train.beta2, r.train.eps, r.train.max_grad_norm), (0.9, 0.999, 1e-8, 1.0));
    assert!(r.forward.input("step").is_some(), "dropout 0.1 needs the step");
    let ids = r.forward.input("input_ids").expect("input_ids");
    assert_eq!(r.forward.ty(ids), &ir::Type::i32([4, 512]));
    let labels = r.forward.input("labels").expect("labels");
    assert_eq!(r.forward.ty(labels), &ir::Type::i32([2048]));
    let q = r.forward.param("model.layers.31.self_attn.q_proj.lora_A.weight").expect("lora_A");
    assert_eq!(r.forward.ty(q).shape, [64, 4096]);
    assert_eq!(r.model.arch, "llama");
    assert_eq!(r.model.config[0], ("vocab".to_string(), serde_json::json!(32000)));
    assert_eq!(r.model.config[6], ("rope_theta".to_string(), serde_json::json!(10000.0)));
}

#[test]
fn smollm2_recipe() {
    let r = compile("smollm2-135m.lora.rs");
    let p = r.peft.as_ref().expect("an adapter");
    assert_eq!((p.r, p.alpha, p.dropout, p.modules.len()), (16, 32.0, 0.05, 30 * 7));
    // Base parameters: embedding, 30 × (2 norms + 7 linear), final norm; the head is tied.
    let frozen = r.forward.params().iter().filter(|(_, _, role)| *role == Role::Frozen).count();
    assert_eq!(frozen, 1 + 30 * 9 + 1);
    let k = r.forward.param("model.layers.0.self_attn.k_proj.weight").expect("k_proj");
    assert_eq!(r.forward.ty(k).shape, [3 * 64, 576]);
    assert_eq!((r.train.seq_len, r.train.micro_batch), (256, 4));
}

#[test]
fn order_of_quantize_and_adapter_does_not_matter() {
    let src = std::fs::read_to_string(example("tiny.qlora.rs")).expect("readable");
    let quantize = "        .quantize(Nf4 { block: 64, double_quant: true }, ALL_LINEAR)\n";
    assert!(src.contains(quantize));
    let swapped = src.replace(quantize, "").replace(".train(", &format!("{}        .train(", quantize.trim_start()));
    assert_ne!(src, swapped);
    let a = compile("tiny.qlora.rs");
    let b = frontend::compile_source("tiny.qlora.rs", &swapped, models::library())
        .unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(ir::text::print(&a.forward), ir::text::print(&b.forward));
}

#[test]
fn regex_targets_and_helper_functions_in_a_recipe() {
    let src = r#"
use tunec::prelude::*;

/// Targets of a recipe may come from a helper, and regexes match whole module names.
fn attention_targets() -> Targets {
    regex(r".*\.(q|v)_proj")
}

pub fn recipe() -> Recipe {
    let mut layers = 0;
    for _ in 0..3 {
        layers += 1;
    }
    let cfg = LlamaConfig { vocab: 128, hidden: 64, layers, heads: 4, kv_heads: 2, ffn: 128,
                            rope_theta: 10000.0, norm_eps: 1e-5, tie_embeddings: false };
    assert!(cfg.layers == 3, "three layers, got {}", cfg.layers);
    Recipe::new(llama(cfg))
        .adapter(Lora { rank: 2, alpha: 4, targets: attention_targets() })
        .train(Train { seq_len: 4, micro_batch: 1, ..Train::default() })
        .name(format!("tiny-{layers}-layers"))
}
"#;
    let r = frontend::compile_source("regex.rs", src, models::library()).unwrap_or_else(|d| panic!("{}", d.render()));
    let p = r.peft.expect("an adapter");
    assert_eq!(p.modules.len(), 6);
    assert_eq!(p.target_modules, ["q_proj", "v_proj"]);
    assert_eq!(p.targets, TargetSpec::Regex(r".*\.(q|v)_proj".into()));
    assert_eq!(p.alpha, 4.0, "an integer alpha is accepted as a float");
    assert_eq!(r.name, "tiny-3-layers");
}
