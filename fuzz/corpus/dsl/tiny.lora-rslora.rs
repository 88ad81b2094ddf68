//! Golden-test recipe: rank-stabilised LoRA (s = alpha / sqrt(r)) on q_proj and v_proj of a tiny untied Llama.
use tunec::prelude::*;

pub fn recipe() -> Recipe {
    let base = llama(LlamaConfig {
        vocab: 128,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn: 128,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
    });
    Recipe::new(base)
        .adapter(Lora { rank: 8, alpha: 16.0, dropout: 0.0, targets: vec!["q_proj", "v_proj"], rslora: true })
        .train(Train { seq_len: 8, micro_batch: 2, ..Train::default() })
}
