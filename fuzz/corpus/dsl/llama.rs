//! Llama 2: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models" (arXiv:2307.09288).
//! Follows Hugging Face transformers' `models/llama/modeling_llama.py` (`LlamaForCausalLM`): the same computation,
//! and parameters named as in its checkpoints (`model.layers.0.self_attn.q_proj.weight`, ...).
//!
//! `llama(cfg)` checks the config and returns a `Model`. The recipe builds the graph later, once `.train(..)` has
//! fixed the batch size B and sequence length T, by calling `llama_forward(cfg, tokens)`. Hidden states are
//! [N = B·T, hidden]; attention sees [B, T, heads, head_dim].

use tunec::prelude::*;

/// The shape of a Llama model (the fields of HF's `LlamaConfig` that shape the graph).
pub struct LlamaConfig {
    /// `vocab_size`
    pub vocab: usize,
    /// `hidden_size` D
    pub hidden: usize,
    /// `num_hidden_layers`
    pub layers: usize,
    /// `num_attention_heads` H
    pub heads: usize,
    /// `num_key_value_heads` KV (KV < H is grouped-query attention)
    pub kv_heads: usize,
    /// `intermediate_size` F of the MLP
    pub ffn: usize,
    /// `rope_theta`
    pub rope_theta: f64,
    /// `rms_norm_eps`
    pub norm_eps: f64,
    /// `tie_word_embeddings`: the LM head reuses the token embedding
    pub tie_embeddings: bool,
}

/// A Llama causal language model.
pub fn llama(cfg: LlamaConfig) -> Model {
    assert!(cfg.vocab > 0, "invalid LlamaConfig: vocab must be positive");
    assert!(cfg.hidden > 0, "invalid LlamaConfig: hidden must be positive");
    assert!(cfg.layers > 0, "invalid LlamaConfig: layers must be positive");
    assert!(cfg.heads > 0, "invalid LlamaConfig: heads must be positive");
    assert!(cfg.kv_heads > 0, "invalid LlamaConfig: kv_heads must be positive");
    assert!(cfg.ffn > 0, "invalid LlamaConfig: ffn must be positive");
    assert!(
        cfg.hidden % cfg.heads == 0,
        "invalid LlamaConfig: hidden ({}) is not divisible by heads ({})",
        cfg.hidden,
        cfg.heads
    );
    assert!(
        cfg.heads % cfg.kv_heads == 0,
        "invalid LlamaConfig: kv_heads ({}) does not divide heads ({})",
        cfg.kv_heads,
        cfg.heads
    );
    assert!(
        cfg.hidden / cfg.heads % 2 == 0,
        "invalid LlamaConfig: the head dimension hidden / heads = {} must be even for rotary embeddings",
        cfg.hidden / cfg.heads
    );
    Model::new("llama", cfg, llama_forward)
}

/// `LlamaForCausalLM.forward`: token ids [B, T] → logits [B·T, vocab].
fn llama_forward(cfg: LlamaConfig, tokens: Tokens) -> Tensor {
    let n = tokens.batch * tokens.seq;
    label("model.embed_tokens");
    let embed = param("model.embed_tokens.weight", [cfg.vocab, cfg.hidden]);
    let mut h = embedding(embed, tokens.input_ids).reshape([n, cfg.hidden]);
    for i in 0..cfg.layers {
        // LlamaDecoderLayer: pre-norm attention and MLP, each added to the residual stream.
        let layer = format!("model.layers.{i}");
        label(layer);
        let x = rms_norm_module(h, format!("{layer}.input_layernorm"), cfg.norm_eps);
        h = h + self_attention(&cfg, format!("{layer}.self_attn"), x, &tokens);
        let x = rms_norm_module(h, format!("{layer}.post_attention_layernorm"), cfg.norm_eps);
        h = h + mlp(&cfg, format!("{layer}.mlp"), x);
    }
    let h = rms_norm_module(h, "model.norm", cfg.norm_eps);
    if cfg.tie_embeddings {
        // tie_word_embeddings: the logits read the token embedding.
        label("lm_head");
        linear(h, embed)
    } else {
        proj(h, "lm_head", cfg.vocab)
    }
}

/// `LlamaRMSNorm` with weight `{name}.weight`: x [N, D] → [N, D].
fn rms_norm_module(x: Tensor, name: String, eps: f64) -> Tensor {
    label(name);
    let w = param(format!("{name}.weight"), [x.dim(1)]);
    rms_norm(x, w, eps)
}

/// A bias-free `nn.Linear` named `name` with weight [out, in]: x [N, in] → [N, out].
fn proj(x: Tensor, name: String, out: usize) -> Tensor {
    label(name);
    let w = param(format!("{name}.weight"), [out, x.dim(1)]);
    linear(x, w)
}

/// `LlamaAttention`: x [N, D] → [N, D]; rotary embeddings on q and k, causal grouped-query attention within
/// sequence segments.
fn self_attention(cfg: &LlamaConfig, name: String, x: Tensor, tokens: &Tokens) -> Tensor {
    let (b, t) = (tokens.batch, tokens.seq);
    let hd = cfg.hidden / cfg.heads;
    let q = proj(x, format!("{name}.q_proj"), cfg.heads * hd);
    let k = proj(x, format!("{name}.k_proj"), cfg.kv_heads * hd);
    let v = proj(x, format!("{name}.v_proj"), cfg.kv_heads * hd);
    label(name);
    let q = rope(q.reshape([b, t, cfg.heads, hd]), tokens.position_ids, cfg.rope_theta);
    let k = rope(k.reshape([b, t, cfg.kv_heads, hd]), tokens.position_ids, cfg.rope_theta);
    let v = v.reshape([b, t, cfg.kv_heads, hd]);
    let o = causal_attention(q, k, v, tokens.segment_ids, 1.0 / (hd as f64).sqrt());
    proj(o.reshape([b * t, cfg.heads * hd]), format!("{name}.o_proj"), cfg.hidden)
}

/// `LlamaMLP`: down_proj(silu(gate_proj(x)) ⊙ up_proj(x)), x [N, D] → [N, D].
fn mlp(cfg: &LlamaConfig, name: String, x: Tensor) -> Tensor {
    let gate = proj(x, format!("{name}.gate_proj"), cfg.ffn);
    let up = proj(x, format!("{name}.up_proj"), cfg.ffn);
    label(name);
    proj(swiglu(gate, up), format!("{name}.down_proj"), cfg.hidden)
}
