//! Golden-test recipe: a tiny Llama with tied embeddings, LoRA on all 7 linear modules of each layer.
use tunec::prelude::*;

/// The tiny model of the golden tests.
pub fn tiny(tie_embeddings: bool) -> Model {
    llama(LlamaConfig {
        vocab: 128,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn: 128,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings,
    })
}

pub fn recipe() -> Recipe {
    Recipe::new(tiny(true))
        .adapter(Lora { rank: 4, alpha: 8.0, dropout: 0.0, targets: ALL_LINEAR })
        .train(Train { seq_len: 8, micro_batch: 2, ..Train::default() })
}
