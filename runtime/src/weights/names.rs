//! GGUF tensor names to Hugging Face Llama names, and the q/k row permutation llama.cpp applies on conversion.

/// The HF name of a GGUF Llama tensor (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`), or `None`
/// for a name that has no HF counterpart.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.split_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    matches!(suffix, "weight" | "bias").then(|| format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Which heads count a GGUF q/k projection is permuted with: `Some(false)` for q (attention heads), `Some(true)`
/// for k (key/value heads), `None` for every other tensor.
pub fn permuted_kind(gguf: &str) -> Option<bool> {
    let rest = gguf.strip_prefix("blk.")?;
    let (_, rest) = rest.split_once('.')?;
    match rest {
        "attn_q.weight" | "attn_q.bias" => Some(false),
        "attn_k.weight" | "attn_k.bias" => Some(true),
        _ => None,
    }
}

/// Undoes llama.cpp's RoPE permutation of q_proj / k_proj rows. `data` is `[rows, cols]` row-major with
/// rows = `heads · head_dim`; GGUF's rows of each head are `[head_dim/2, 2]` and HF's are `[2, head_dim/2]`:
/// GGUF row `h·hd + 2j + k` is HF row `h·hd + k·hd/2 + j`.
pub fn unpermute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    permute_impl(data, heads, cols, false)
}

/// llama.cpp's permutation (HF → GGUF), the inverse of [`unpermute_rows`].
pub fn permute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    permute_impl(data, heads, cols, true)
}

fn permute_impl(data: &[f32], heads: usize, cols: usize, to_gguf: bool) -> Vec<f32> {
    let rows = data.len() / cols;
    assert_eq!(rows * cols, data.len(), "data is not [rows, {cols}]");
    assert_eq!(rows % (2 * heads), 0, "{rows} rows are not {heads} heads of an even head_dim");
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for j in 0..half {
            for k in 0..2 {
                let gguf_row = h * hd + 2 * j + k;
                let hf_row = h * hd + k * half + j;
                let (src, dst) = if to_gguf { (hf_row, gguf_row) } else { (gguf_row, hf_row) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}
