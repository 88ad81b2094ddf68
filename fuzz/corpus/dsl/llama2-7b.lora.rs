//! LoRA on Llama-2-7B (meta-llama/Llama-2-7b-hf), attention projections only, as in the LoRA paper's setup.
use tunec::prelude::*;

pub fn recipe() -> Recipe {
    let base = llama(LlamaConfig {
        vocab: 32000,
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        ffn: 11008,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
    });
    Recipe::new(base)
        .adapter(Lora { rank: 16, alpha: 32.0, dropout: 0.05, targets: vec!["q_proj", "k_proj", "v_proj", "o_proj"] })
        .train(Train { seq_len: 512, micro_batch: 4, lr: 2e-4, warmup_steps: 100, ..Train::default() })
}
