//! Golden-test recipe: QLoRA (NF4 base weights with double quantization) on a tiny untied Llama.
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
        .quantize(Nf4 { block: 64, double_quant: true }, ALL_LINEAR)
        .adapter(Lora { rank: 4, alpha: 16.0, dropout: 0.0, targets: ALL_LINEAR })
        .train(Train { seq_len: 8, micro_batch: 2, ..Train::default() })
}
