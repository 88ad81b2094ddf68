//! QLoRA on SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct): the linear layers as NF4 (block 64, double
//! quantization) with f32 compute and LoRA r=16 on all of them; otherwise as `smollm2-135m.lora.rs` (a Llama with
//! grouped-query attention, 9 heads and 3 KV heads, and tied embeddings).
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
        .quantize(Nf4 { block: 64, double_quant: true }, ALL_LINEAR)
        .adapter(Lora { rank: 16, alpha: 32.0, dropout: 0.05, targets: ALL_LINEAR })
        .train(Train { seq_len: 256, micro_batch: 4, ..Train::default() })
}
