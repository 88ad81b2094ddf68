//! GGUF → Hugging Face Llama directory: `model.safetensors` (F32, HF names and `[out, in]` layout, q/k rows
//! un-permuted), `config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json` and
//! `special_tokens_map.json`. Tensors are dequantized one at a time while the safetensors file is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ir::untrusted::show;
use serde_json::json;

use super::config::LlamaConfig;
use super::gguf::{GgufFile, GgufTensorInfo};
use super::names::{hf_name, permuted_kind, unpermute_rows};
use super::safetensors_io::{pt_metadata, write_safetensors, F32View};
use super::tokenizer::{load_tokenizer, tokenizer_from_gguf};
use super::{write_json, WeightsError};

/// What [`import_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct ImportReport {
    pub out_dir: PathBuf,
    /// The files written, in the order written.
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    pub params: usize,
    /// GGUF tensor type → number of tensors of that type.
    pub gguf_types: BTreeMap<String, usize>,
    pub config: LlamaConfig,
    pub vocab_size: usize,
    pub merges: usize,
    pub special_tokens: usize,
    pub chat_template: bool,
}

/// The Llama config a GGUF file describes (`{arch}.*` keys; see llama.cpp's `gguf-py/gguf/constants.py`).
pub fn config_from_gguf(g: &GgufFile) -> Result<LlamaConfig, WeightsError> {
    let path = g.path();
    let arch = g.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(WeightsError::unsupported(
            path,
            format!("general.architecture \"{}\": tunec imports Llama models (\"llama\")", show(arch)),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let opt_u64 = |k: &str| g.get(&key(k)).and_then(|v| v.as_u64());
    let size = |k: &str, v: u64| {
        usize::try_from(v).map_err(|_| WeightsError::format(path, format!("metadata `{}` = {v} is too large", key(k))))
    };
    let hidden = size("embedding_length", g.get_u64(&key("embedding_length"))?)?;
    let heads = size("attention.head_count", g.get_u64(&key("attention.head_count"))?)?;
    let kv_heads = size("attention.head_count_kv", opt_u64("attention.head_count_kv").unwrap_or(heads as u64))?;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(WeightsError::format(
            path,
            format!("{heads} attention heads are not a multiple of {kv_heads} key/value heads"),
        ));
    }
    let head_dim = match opt_u64("attention.key_length") {
        Some(v) => size("attention.key_length", v)?,
        None => hidden / heads,
    };
    if let Some(rot) = opt_u64("rope.dimension_count") {
        if rot != head_dim as u64 {
            return Err(WeightsError::unsupported(
                path,
                format!("RoPE over {rot} of {head_dim} head dimensions (partial rotary) is not supported"),
            ));
        }
    }
    if let Some(scaling) = g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
        if scaling != "none" {
            return Err(WeightsError::unsupported(
                path,
                format!("RoPE scaling \"{}\" ({arch}.rope.scaling.type) is not supported", show(scaling)),
            ));
        }
    }
    let vocab_size = match opt_u64("vocab_size") {
        Some(v) => size("vocab_size", v)?,
        None => g.get_strings("tokenizer.ggml.tokens")?.len(),
    };
    let token_id = |k: &str| g.get(k).and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok());
    let config = LlamaConfig {
        hidden_size: hidden,
        intermediate_size: size("feed_forward_length", g.get_u64(&key("feed_forward_length"))?)?,
        num_hidden_layers: size("block_count", g.get_u64(&key("block_count"))?)?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: g.get(&key("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0),
        vocab_size,
        max_position_embeddings: opt_u64("context_length").and_then(|v| usize::try_from(v).ok()).unwrap_or(2048),
        tie_word_embeddings: g.tensor_info("output.weight").is_none(),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: token_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: token_id("tokenizer.ggml.padding_token_id"),
        hidden_act: "silu".into(),
        rope_scaling: None,
    };
    config.validate(path)?;
    Ok(config)
}

/// Every HF tensor a Llama model with `c` has, with its shape.
pub fn expected_tensors(c: &LlamaConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h]);
    m.insert("model.norm.weight".to_string(), vec![h]);
    if !c.tie_word_embeddings {
        m.insert("lm_head.weight".to_string(), vec![c.vocab_size, h]);
    }
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
            ("self_attn.q_proj", vec![q, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, q]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ] {
            m.insert(format!("{p}.{name}.weight"), shape);
        }
    }
    m
}

/// Imports a GGUF Llama model into `out` (created if missing) as an HF directory.
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<ImportReport, WeightsError> {
    let g = GgufFile::open(gguf)?;
    let config = config_from_gguf(&g)?;
    let expected = expected_tensors(&config);

    // Map, check and order every tensor before writing anything.
    let mut planned: Vec<(String, &GgufTensorInfo)> = Vec::new();
    let mut gguf_types = BTreeMap::new();
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" {
            return Err(WeightsError::unsupported(
                gguf,
                "tensor `rope_freqs.weight` (Llama 3 RoPE frequency scaling) is not supported",
            ));
        }
        let name = hf_name(&t.name).ok_or_else(|| {
            WeightsError::unsupported(gguf, format!("tensor `{}` has no Hugging Face Llama counterpart", show(&t.name)))
        })?;
        let Some(shape) = expected.get(&name) else {
            return Err(WeightsError::unsupported(
                gguf,
                format!("tensor `{}` ({name}) is not part of a Llama model with this config", show(&t.name)),
            ));
        };
        if &t.shape() != shape {
            return Err(WeightsError::Shape {
                path: gguf.to_path_buf(),
                name: t.name.clone(),
                expected: shape.clone(),
                found: t.shape(),
            });
        }
        if !t.ty.can_dequantize() {
            return Err(WeightsError::UnsupportedType {
                path: gguf.to_path_buf(),
                tensor: t.name.clone(),
                ty: t.ty.name(),
            });
        }
        g.tensor_bytes(t)?;
        *gguf_types.entry(t.ty.name()).or_insert(0) += 1;
        planned.push((name, t));
    }
    let present: BTreeSet<&str> = planned.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(missing) = expected.keys().find(|n| !present.contains(n.as_str())) {
        return Err(WeightsError::MissingTensor { path: gguf.to_path_buf(), name: missing.clone() });
    }
    let tok = tokenizer_from_gguf(&g)?;

    std::fs::create_dir_all(out).map_err(|e| WeightsError::io(out, e))?;
    let mut files = Vec::new();
    let weights_path = out.join("model.safetensors");
    let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
    let g_ref = &g;
    let views: Vec<(String, F32View<'_>)> = planned
        .iter()
        .map(|(name, t)| {
            let t: &GgufTensorInfo = t;
            let view = F32View::lazy(t.shape(), move || {
                let data = g_ref.dequantize(t).expect("tensor type and extent were checked before writing");
                match permuted_kind(&t.name) {
                    Some(is_k) => {
                        unpermute_rows(&data, if is_k { kv_heads } else { heads }, t.shape()[1..].iter().product())
                    }
                    None => data,
                }
            });
            (name.clone(), view)
        })
        .collect();
    write_safetensors(&weights_path, &views, Some(pt_metadata()))?;
    files.push(weights_path);

    let mut write = |name: &str, value: &serde_json::Value| -> Result<(), WeightsError> {
        let p = out.join(name);
        write_json(&p, value)?;
        files.push(p);
        Ok(())
    };
    write("config.json", &config.to_json())?;
    write("generation_config.json", &config.generation_config())?;
    write("tokenizer.json", &tok.tokenizer_json)?;
    write("tokenizer_config.json", &tok.tokenizer_config)?;
    let text = |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| s.clone());
    let pad = tok.tokenizer_config.get("pad_token").cloned().unwrap_or(serde_json::Value::Null);
    let unk = tok.tokenizer_config.get("unk_token").cloned().unwrap_or(serde_json::Value::Null);
    write(
        "special_tokens_map.json",
        &json!({ "bos_token": text(&tok.bos), "eos_token": text(&tok.eos), "pad_token": pad, "unk_token": unk }),
    )?;

    // The tokenizer must load with the tokenizers crate and agree with the GGUF vocabulary.
    let tokenizer_path = out.join("tokenizer.json");
    let loaded = load_tokenizer(&tokenizer_path)?;
    if loaded.get_vocab_size(true) != tok.vocab_size {
        return Err(WeightsError::format(
            &tokenizer_path,
            format!(
                "the rebuilt tokenizer has {} tokens, the GGUF file {}",
                loaded.get_vocab_size(true),
                tok.vocab_size
            ),
        ));
    }
    for (id, text) in &tok.special_tokens {
        if loaded.token_to_id(text) != Some(*id) {
            return Err(WeightsError::format(
                &tokenizer_path,
                format!("special token \"{}\" is not id {id} in the rebuilt tokenizer", show(text)),
            ));
        }
    }

    Ok(ImportReport {
        out_dir: out.to_path_buf(),
        files,
        tensors: planned.len(),
        params: planned.iter().map(|(_, t)| t.numel()).sum(),
        gguf_types,
        config,
        vocab_size: tok.vocab_size,
        merges: tok.merges,
        special_tokens: tok.special_tokens.len(),
        chat_template: tok.has_chat_template,
    })
}
