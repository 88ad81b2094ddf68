//! LoRA on SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct): a Llama with grouped-query attention (9 heads,
//! 3 KV heads) and tied embeddings.
use tunec::prelude::*;

pub fn recipe() -> Recipe {
    let base = llama(LlamaConfig {
        vocab: 49152,
        hidden: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        ffn: 1536,
        rope_theta: 100000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
    });
    Recipe::new(base)
        .adapter(Lora { rank: 16, alpha: 32.0, dropout: 0.05, targets: ALL_LINEAR })
        .train(Train { seq_len: 256, micro_batch: 4, ..Train::default() })
}
