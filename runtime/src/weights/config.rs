//! Hugging Face `config.json` for Llama models (transformers' `LlamaConfig`). Reading accepts what transformers
//! writes (v4 `rope_theta`, v5 `rope_parameters`, `eos_token_id` as a number or a list, `dtype` or `torch_dtype`);
//! writing produces a file transformers loads with `LlamaForCausalLM.from_pretrained`.

use std::path::Path;

use serde_json::{json, Value};

use super::{read_json, write_json, WeightsError};

/// The fields of `LlamaConfig` tunec uses.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `hidden_size / num_attention_heads` unless the config says otherwise.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub hidden_act: String,
    /// `rope_scaling` (or a `rope_parameters` with a non-default `rope_type`), kept to refuse what tunec cannot run.
    pub rope_scaling: Option<Value>,
}

impl LlamaConfig {
    /// The config as transformers writes it (`torch_dtype` float32).
    pub fn to_json(&self) -> Value {
        let eos = match self.eos_token_ids.as_slice() {
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "torch_dtype": "float32",
        })
    }

    pub fn write(&self, path: &Path) -> Result<(), WeightsError> {
        write_json(path, &self.to_json())
    }

    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        Self::from_json(path, &read_json(path)?)
    }

    /// Parses a config value; `path` names the file in errors.
    pub fn from_json(path: &Path, v: &Value) -> Result<Self, WeightsError> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if !matches!(model_type, "llama" | "mistral" | "") {
            return Err(WeightsError::unsupported(
                path,
                format!("model_type \"{model_type}\": tunec runs Llama-architecture models (model_type \"llama\")"),
            ));
        }
        let usize_field = |k: &str| -> Result<usize, WeightsError> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| WeightsError::format(path, format!("missing or non-integer field `{k}`")))
        };
        let opt_usize = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let opt_u32 = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as u32);
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = opt_usize("num_key_value_heads").unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(WeightsError::format(
                path,
                format!(
                    "{num_attention_heads} attention heads are not a multiple of {num_key_value_heads} key/value heads"
                ),
            ));
        }
        let head_dim = opt_usize("head_dim").unwrap_or(hidden_size / num_attention_heads);
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| rope_params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10000.0);
        let mut rope_scaling = v.get("rope_scaling").filter(|s| !s.is_null()).cloned();
        if rope_scaling.is_none() {
            if let Some(p) = rope_params {
                let ty = p.get("rope_type").and_then(Value::as_str).unwrap_or("default");
                if ty != "default" {
                    rope_scaling = Some(p.clone());
                }
            }
        }
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![],
        };
        Ok(LlamaConfig {
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            vocab_size: usize_field("vocab_size")?,
            max_position_embeddings: opt_usize("max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: opt_u32("bos_token_id"),
            eos_token_ids,
            pad_token_id: opt_u32("pad_token_id"),
            hidden_act: v.get("hidden_act").and_then(Value::as_str).unwrap_or("silu").to_string(),
            rope_scaling,
        })
    }

    /// Parameters of the model this config describes (embeddings counted once when tied).
    pub fn num_params(&self) -> usize {
        let (h, i, l) = (self.hidden_size, self.intermediate_size, self.num_hidden_layers);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        let embed = self.vocab_size * h;
        embed + l * layer + h + if self.tie_word_embeddings { 0 } else { embed }
    }

    /// `generation_config.json` for this model (greedy by default, as transformers writes when none is given).
    pub fn generation_config(&self) -> Value {
        let eos = match self.eos_token_ids.as_slice() {
            [one] => json!(one),
            many => json!(many),
        };
        json!({ "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id })
    }
}
