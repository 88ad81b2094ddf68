//! The front end's work grows linearly with the depth of the model: the graph nodes it visits (finding linear
//! modules, rebuilding the graph for NF4 and LoRA, checking parameter names) for the 7B QLoRA recipe's layers
//! at 8, 16 and 32 layers of a small Llama. A count, not a timing. (Its own test binary: the count is global.)

fn recipe(layers: usize) -> String {
    format!(
        "use tunec::prelude::*;
pub fn recipe() -> Recipe {{
    let base = llama(LlamaConfig {{ vocab: 128, hidden: 64, layers: {layers}, heads: 4, kv_heads: 2,
                                   ffn: 128, rope_theta: 10000.0, norm_eps: 1e-5, tie_embeddings: false }});
    Recipe::new(base)
        .quantize(Nf4 {{ block: 64, double_quant: true }}, ALL_LINEAR)
        .adapter(Lora {{ rank: 4, alpha: 16.0, dropout: 0.1, targets: ALL_LINEAR }})
        .train(Train {{ seq_len: 8, micro_batch: 1, ..Train::default() }})
}}
"
    )
}

/// Nodes visited compiling the recipe with `layers` layers, and the forward graph's size.
fn work(layers: usize) -> (u64, usize) {
    let before = frontend::peft::nodes_visited();
    let r = frontend::compile_source("deep.rs", &recipe(layers), models::library())
        .unwrap_or_else(|d| panic!("{}", d.render()));
    (frontend::peft::nodes_visited() - before, r.forward.nodes.len())
}

#[test]
fn lora_insertion_work_grows_linearly_with_depth() {
    let ((w8, n8), (w16, _), (w32, n32)) = (work(8), work(16), work(32));
    assert!(w8 >= n8 as u64, "{w8} visits for {n8} nodes");
    assert!(w16 as f64 <= 2.2 * w8 as f64, "8 layers: {w8}, 16 layers: {w16}");
    assert!(w32 as f64 <= 2.2 * w16 as f64, "16 layers: {w16}, 32 layers: {w32}");
    assert!(w32 <= 8 * n32 as u64, "{w32} visits for {n32} nodes");
}
