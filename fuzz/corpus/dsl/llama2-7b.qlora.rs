// examples/llama2-7b.qlora.rs
use tunec::prelude::*;
pub fn recipe() -> Recipe {
    let base = llama(LlamaConfig { vocab: 32000, hidden: 4096, layers: 32, heads: 32, kv_heads: 32,
                                   ffn: 11008, rope_theta: 10000.0, norm_eps: 1e-5, tie_embeddings: false });
    Recipe::new(base)
        .quantize(Nf4 { block: 64, double_quant: true }, ALL_LINEAR)
        .adapter(Lora { rank: 64, alpha: 16.0, dropout: 0.1, targets: ALL_LINEAR })
        .train(Train { seq_len: 512, micro_batch: 4, lr: 2e-4, ..Train::default() })
}
