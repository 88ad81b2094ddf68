//! The model library parses, its items and declared types check, and its models build graphs.

#[test]
fn library_parses_and_checks() {
    if let Err(d) = frontend::check_library(models::library()) {
        panic!("{}", d.render());
    }
}

#[test]
fn llama_builds_a_graph_from_a_minimal_recipe() {
    let src = r#"
use tunec::prelude::*;
pub fn recipe() -> Recipe {
    Recipe::new(llama(LlamaConfig { vocab: 32, hidden: 16, layers: 1, heads: 2, kv_heads: 1, ffn: 24,
                                    rope_theta: 10000.0, norm_eps: 1e-6, tie_embeddings: false }))
        .train(Train { seq_len: 4, micro_batch: 1, ..Train::default() })
}
"#;
    let r = frontend::compile_source("minimal.rs", src, models::library()).unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(r.model.arch, "llama");
    assert!(r.forward.param("model.layers.0.self_attn.k_proj.weight").is_some());
    assert!(r.forward.param("lm_head.weight").is_some());
    assert!(ir::verify::verify(&r.forward).is_ok());
}
