//! Hugging Face `config.json` for Llama models (transformers' `LlamaConfig`). Reading accepts what transformers
//! writes (v4 `rope_theta`, v5 `rope_parameters`, `eos_token_id` as a number or a list, `dtype` or `torch_dtype`);
//! writing produces a file transformers loads with `LlamaForCausalLM.from_pretrained`.

use std::path::Path;

use ir::untrusted::show;
use serde_json::{json, Value};

use super::{read_json, write_json, WeightsError};

/// The DSL's `LlamaConfig` fields (`models/dsl/llama.rs`, recorded in a plan's `model_config`) and the HF
/// `config.json` keys they correspond to. `tunec run --model` compares every one (see
/// [`LlamaConfig::plan_mismatches`]).
pub const PLAN_FIELDS: &[(&str, &str)] = &[
    ("vocab", "vocab_size"),
    ("hidden", "hidden_size"),
    ("layers", "num_hidden_layers"),
    ("heads", "num_attention_heads"),
    ("kv_heads", "num_key_value_heads"),
    ("ffn", "intermediate_size"),
    ("rope_theta", "rope_theta"),
    ("norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"),
];

/// Relative tolerance of the float comparisons of [`LlamaConfig::plan_mismatches`].
pub const PLAN_FLOAT_RTOL: f64 = 1e-6;

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
        if !v.is_object() {
            return Err(WeightsError::format(path, "expected a JSON object"));
        }
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if !matches!(model_type, "llama" | "mistral" | "") {
            return Err(WeightsError::unsupported(
                path,
                format!(
                    "model_type \"{}\": tunec runs Llama-architecture models (model_type \"llama\")",
                    show(model_type)
                ),
            ));
        }
        let usize_field = |k: &str| -> Result<usize, WeightsError> {
            v.get(k).and_then(Value::as_u64).and_then(|x| usize::try_from(x).ok()).ok_or_else(|| {
                WeightsError::format(path, format!("missing or non-integer field `{k}` (a non-negative integer)"))
            })
        };
        let opt_usize = |k: &str| v.get(k).and_then(Value::as_u64).and_then(|x| usize::try_from(x).ok());
        let opt_u32 = |k: &str| v.get(k).and_then(Value::as_u64).and_then(|x| u32::try_from(x).ok());
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
        let head_dim = match v.get("head_dim") {
            None | Some(Value::Null) => hidden_size / num_attention_heads,
            Some(_) => usize_field("head_dim")?,
        };
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
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).filter_map(|x| u32::try_from(x).ok()).collect(),
            Some(x) => x.as_u64().and_then(|x| u32::try_from(x).ok()).map(|x| vec![x]).unwrap_or_default(),
            None => vec![],
        };
        let config = LlamaConfig {
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
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the sizes are usable: every dimension positive, each setting within its range of
    /// `ir::settings::MODEL_RULES` (layers, heads, finite positive `rope_theta` and `rms_norm_eps`, …), an even head
    /// dimension, every weight's element count representable (checked arithmetic). `path` names the file (config.json or the GGUF file) in errors.
    pub fn validate(&self, path: &Path) -> Result<(), WeightsError> {
        let bad = |m: String| Err(WeightsError::format(path, m));
        for (k, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(format!("`{k}` is 0; it must be positive"));
            }
        }
        // The ranges every model setting must be in (`ir::settings::MODEL_RULES`, the table the recipe and a plan
        // are checked against too): checked before anything is allocated per layer.
        let fields = [
            ("vocab", self.vocab_size as f64),
            ("hidden", self.hidden_size as f64),
            ("layers", self.num_hidden_layers as f64),
            ("heads", self.num_attention_heads as f64),
            ("kv_heads", self.num_key_value_heads as f64),
            ("ffn", self.intermediate_size as f64),
            ("rope_theta", self.rope_theta),
            ("norm_eps", self.rms_norm_eps),
        ];
        if let Err(e) = ir::settings::validate_model_config(&fields) {
            let hf = PLAN_FIELDS.iter().find(|(dsl, _)| *dsl == e.field).map_or(e.field.as_str(), |&(_, hf)| hf);
            return bad(format!("`{hf}` must be {}, found {} (ir::settings::MODEL_RULES)", e.expected, e.found));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("`head_dim` {} is odd; rotary embeddings need an even head dimension", self.head_dim));
        }
        let h = self.hidden_size;
        let products = [
            ("vocab_size × hidden_size", self.vocab_size.checked_mul(h)),
            (
                "num_attention_heads × head_dim × hidden_size",
                self.num_attention_heads.checked_mul(self.head_dim).and_then(|q| q.checked_mul(h)),
            ),
            (
                "num_key_value_heads × head_dim × hidden_size",
                self.num_key_value_heads.checked_mul(self.head_dim).and_then(|q| q.checked_mul(h)),
            ),
            ("intermediate_size × hidden_size", self.intermediate_size.checked_mul(h)),
        ];
        for (what, n) in products {
            // A weight of more than 2^40 elements (4 TiB of f32) is no model tunec can load.
            if n.is_none_or(|n| n > 1 << 40) {
                return bad(format!("{what} overflows: the sizes are corrupt"));
            }
        }
        Ok(())
    }

    /// The value of the HF key `hf` (one of [`PLAN_FIELDS`]) as a JSON value.
    fn hf_value(&self, hf: &str) -> Option<Value> {
        Some(match hf {
            "vocab_size" => json!(self.vocab_size),
            "hidden_size" => json!(self.hidden_size),
            "num_hidden_layers" => json!(self.num_hidden_layers),
            "num_attention_heads" => json!(self.num_attention_heads),
            "num_key_value_heads" => json!(self.num_key_value_heads),
            "intermediate_size" => json!(self.intermediate_size),
            "rope_theta" => json!(self.rope_theta),
            "rms_norm_eps" => json!(self.rms_norm_eps),
            "tie_word_embeddings" => json!(self.tie_word_embeddings),
            _ => return None,
        })
    }

    /// Where the model config a plan was compiled with (`(DSL field, JSON value)` pairs, `arch` first; see
    /// `ir::plan::Plan::model_config`) differs from this config: one line per difference, naming the DSL field,
    /// the HF key, the plan's value and this config's. Integers and booleans must be equal, floats equal within
    /// [`PLAN_FLOAT_RTOL`]. Also reported: a head_dim other than hidden / heads, and `rope_scaling` or a
    /// `hidden_act` other than silu, which the DSL's Llama does not compute. An empty `model_config` (a plan
    /// written before plans recorded it) gives no lines.
    pub fn plan_mismatches(&self, model_config: &[(String, String)]) -> Vec<String> {
        let mut out = Vec::new();
        if model_config.is_empty() {
            return out;
        }
        for (field, text) in model_config {
            let plan: Option<Value> = serde_json::from_str(text).ok();
            if field == "arch" {
                if plan.as_ref().and_then(Value::as_str) != Some("llama") {
                    out.push(format!(
                        "arch: the plan is for architecture {}, config.json describes a Llama model",
                        show(text)
                    ));
                }
                continue;
            }
            let Some(&(_, hf)) = PLAN_FIELDS.iter().find(|(dsl, _)| dsl == field) else {
                out.push(format!(
                    "{}: the plan has this field (= {}), which has no config.json counterpart tunec can check",
                    show(field),
                    show(text)
                ));
                continue;
            };
            let ours = self.hf_value(hf).unwrap_or(Value::Null);
            let same = match (&plan, &ours) {
                (Some(Value::Bool(a)), Value::Bool(b)) => a == b,
                (Some(p), o) if hf == "rope_theta" || hf == "rms_norm_eps" => match (p.as_f64(), o.as_f64()) {
                    (Some(a), Some(b)) => (a - b).abs() <= PLAN_FLOAT_RTOL * a.abs().max(b.abs()),
                    _ => false,
                },
                (Some(p), o) => p.as_u64().is_some() && p.as_u64() == o.as_u64(),
                (None, _) => false,
            };
            if !same {
                out.push(format!("{field}: the plan has {}, config.json has `{hf}`: {ours}", show(text)));
            }
        }
        if self.head_dim != self.hidden_size / self.num_attention_heads {
            out.push(format!(
                "head_dim: the plan's Llama uses hidden / heads = {}, config.json has `head_dim`: {}",
                self.hidden_size / self.num_attention_heads,
                self.head_dim
            ));
        }
        if let Some(s) = &self.rope_scaling {
            out.push(format!(
                "rope_scaling: the plan's Llama has none, config.json has `rope_scaling`: {}",
                show(&s.to_string())
            ));
        }
        if self.hidden_act != "silu" {
            out.push(format!(
                "hidden_act: the plan's Llama uses silu, config.json has `hidden_act`: \"{}\"",
                show(&self.hidden_act)
            ));
        }
        out
    }

    /// Parameters of the model this config describes (embeddings counted once when tied).
    /// (Saturating: a config that passed [`LlamaConfig::validate`] does not reach `usize::MAX`.)
    pub fn num_params(&self) -> usize {
        let (h, i, l) = (self.hidden_size, self.intermediate_size, self.num_hidden_layers);
        let m = |a: usize, b: usize| a.saturating_mul(b);
        let q = m(self.num_attention_heads, self.head_dim);
        let kv = m(self.num_key_value_heads, self.head_dim);
        let layer =
            [m(h, q), m(2, m(h, kv)), m(q, h), m(3, m(h, i)), m(2, h)].into_iter().fold(0, usize::saturating_add);
        let embed = m(self.vocab_size, h);
        [embed, m(l, layer), h, if self.tie_word_embeddings { 0 } else { embed }]
            .into_iter()
            .fold(0, usize::saturating_add)
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
