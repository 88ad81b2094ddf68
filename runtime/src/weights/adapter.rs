//! PEFT LoRA / DoRA adapters (`adapter_config.json` + `adapter_model.safetensors`): loading, merging into a base
//! weight, and [`merge`], which writes a model directory with every adapted weight merged.
//!
//! Keys: `base_model.model.<module>.lora_A.weight` `[r, in]`, `….lora_B.weight` `[out, r]`, DoRA's
//! `….lora_magnitude_vector` `[out]`. Merge: W' = W + s·B·A with s = alpha / r (rsLoRA: alpha / √r); DoRA then
//! rescales each output row: W'' = m · W' / ‖W'‖_row (PEFT's `DoraLinearLayer`, norm over dim 1 of `[out, in]`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ir::untrusted::show;
use serde_json::Value;

use super::model_dir::ModelDir;
use super::safetensors_io::{is_float_dtype, pt_metadata, write_safetensors, F32View, SafeTensorsFile};
use super::{read_capped, read_json, write_file_atomic, write_json, Tensor, WeightsError, MAX_JSON_BYTES};

/// The prefix PEFT puts before a module path in a causal LM's adapter.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// One adapted linear layer.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    /// DoRA's magnitude `[out]`.
    pub magnitude: Option<Vec<f32>>,
}

/// A module's tensors as found in the file: A, B, DoRA magnitude.
type ModuleParts = (Option<Tensor>, Option<Tensor>, Option<Vec<f32>>);

/// A loaded PEFT LoRA (or DoRA) adapter.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub dir: PathBuf,
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// alpha / r, or alpha / √r with rsLoRA.
    pub scale: f32,
    pub base_model: Option<String>,
    /// Module path (`model.layers.0.self_attn.q_proj`) → its adapter.
    pub modules: BTreeMap<String, LoraModule>,
}

impl LoraAdapter {
    /// Loads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let config_path = dir.join("adapter_config.json");
        let c = read_json(&config_path)?;
        let unsupported = |m: String| Err(WeightsError::unsupported(&config_path, m));
        let str_field = |k: &str| c.get(k).and_then(Value::as_str);
        let bool_field = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(false);
        if let Some(t) = str_field("peft_type").filter(|t| *t != "LORA") {
            return unsupported(format!("peft_type \"{}\": tunec applies LORA adapters (LoRA, rsLoRA, DoRA)", show(t)));
        }
        if bool_field("fan_in_fan_out") {
            return unsupported("fan_in_fan_out = true (Conv1D-style weights) is not supported".into());
        }
        if let Some(b) = str_field("bias").filter(|b| *b != "none") {
            return unsupported(format!("bias \"{}\": only adapters without bias terms are supported", show(b)));
        }
        if bool_field("lora_bias") {
            return unsupported("lora_bias = true is not supported".into());
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if c.get(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                return unsupported(format!("`{k}` (per-module ranks or alphas) is not supported"));
            }
        }
        if c.get("modules_to_save").and_then(Value::as_array).is_some_and(|m| !m.is_empty()) {
            return unsupported("`modules_to_save` (fully trained extra modules) is not supported".into());
        }
        let r = c
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| WeightsError::format(&config_path, "missing or invalid `r`"))? as usize;
        let alpha = c.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let use_rslora = bool_field("use_rslora");
        let use_dora = bool_field("use_dora");
        let scale = if use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 } as f32;

        let weights_path = dir.join("adapter_model.safetensors");
        let f = SafeTensorsFile::open(&weights_path)?;
        let mut parts: BTreeMap<String, ModuleParts> = BTreeMap::new();
        for key in f.names() {
            let bad = || {
                let expected = "`.lora_A.weight`, `.lora_B.weight` or `.lora_magnitude_vector`";
                WeightsError::format(
                    &weights_path,
                    format!("unexpected key `{}` (expected `{PEFT_PREFIX}<module>` + {expected})", show(key)),
                )
            };
            let path = key.strip_prefix(PEFT_PREFIX).ok_or_else(bad)?;
            let (module, part) = if let Some(m) = path.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = path.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if let Some(m) = path
                .strip_suffix(".lora_magnitude_vector")
                .or_else(|| path.strip_suffix(".lora_magnitude_vector.weight"))
            {
                (m, 2)
            } else {
                return Err(bad());
            };
            let t = f.tensor(key)?;
            let entry = parts.entry(module.to_string()).or_default();
            match part {
                0 => entry.0 = Some(t),
                1 => entry.1 = Some(t),
                _ => entry.2 = Some(t.data),
            }
        }
        if parts.is_empty() {
            return Err(WeightsError::format(&weights_path, "the adapter has no tensors"));
        }
        let mut modules = BTreeMap::new();
        for (module, (a, b, m)) in parts {
            let missing = |what: &str| WeightsError::MissingTensor {
                path: weights_path.clone(),
                name: format!("{PEFT_PREFIX}{module}.{what}"),
            };
            let a = a.ok_or_else(|| missing("lora_A.weight"))?;
            let b = b.ok_or_else(|| missing("lora_B.weight"))?;
            let shape_err = |name: &str, t: &Tensor, expected: String| {
                WeightsError::format(
                    &weights_path,
                    format!("`{PEFT_PREFIX}{}.{name}` has shape {:?}, expected {expected}", show(&module), t.shape),
                )
            };
            if a.shape.len() != 2 || a.shape[0] != r {
                return Err(shape_err("lora_A.weight", &a, format!("[{r}, in] (r = {r} in adapter_config.json)")));
            }
            if b.shape.len() != 2 || b.shape[1] != r {
                return Err(shape_err("lora_B.weight", &b, format!("[out, {r}]")));
            }
            if let Some(m) = &m {
                if m.len() != b.shape[0] {
                    return Err(WeightsError::format(
                        &weights_path,
                        format!(
                            "`{PEFT_PREFIX}{}.lora_magnitude_vector` has {} values, expected {}",
                            show(&module),
                            m.len(),
                            b.shape[0]
                        ),
                    ));
                }
            } else if use_dora {
                return Err(missing("lora_magnitude_vector"));
            }
            modules.insert(module, LoraModule { a, b, magnitude: m });
        }
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            r,
            alpha,
            use_rslora,
            use_dora,
            scale,
            base_model: str_field("base_model_name_or_path").map(str::to_string),
            modules,
        })
    }

    /// The adapted module whose weight is `weight_name` (`….q_proj.weight`), if any.
    pub fn module_for(&self, weight_name: &str) -> Option<&LoraModule> {
        weight_name.strip_suffix(".weight").and_then(|m| self.modules.get(m))
    }

    /// Checks every adapted module has a base weight of matching shape `[out, in]` in `model`.
    pub fn check_against(&self, model: &ModelDir) -> Result<(), WeightsError> {
        let weights = self.dir.join("adapter_model.safetensors");
        for (module, m) in &self.modules {
            let name = format!("{module}.weight");
            let Some(shape) = model.shape(&name) else {
                return Err(WeightsError::format(
                    &weights,
                    format!(
                        "adapter module `{}` has no weight `{}` in {}: was the adapter trained for another model?",
                        show(module),
                        show(&name),
                        model.dir.display()
                    ),
                ));
            };
            let expected = [m.b.shape[0], m.a.shape[1]];
            if shape != expected {
                return Err(WeightsError::format(
                    &weights,
                    format!(
                        "adapter module `{}` is [out, in] = {expected:?}, but `{}` is {shape:?}: was the adapter \
                         trained for another model?",
                        show(module),
                        show(&name)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Merges `module` into `weight` (`[out, in]`, shapes checked by the caller).
    pub fn merge_into(&self, module: &LoraModule, weight: &mut Tensor) {
        merge_lora(&mut weight.data, &module.a, &module.b, self.scale, module.magnitude.as_deref());
    }
}

/// W ← W + s·B·A (W: `[out, in]`, A: `[r, in]`, B: `[out, r]`); with a DoRA magnitude m, each row then becomes
/// m_o · W_o / ‖W_o‖.
pub fn merge_lora(w: &mut [f32], a: &Tensor, b: &Tensor, scale: f32, magnitude: Option<&[f32]>) {
    let (r, cols) = (a.shape[0], a.shape[1]);
    let rows = b.shape[0];
    assert_eq!(w.len(), rows * cols, "weight is not [{rows}, {cols}]");
    for (o, row) in w.chunks_exact_mut(cols).enumerate() {
        for k in 0..r {
            let coef = scale * b.data[o * r + k];
            if coef != 0.0 {
                for (x, &av) in row.iter_mut().zip(&a.data[k * cols..(k + 1) * cols]) {
                    *x += coef * av;
                }
            }
        }
        if let Some(m) = magnitude {
            let norm = row.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32;
            let factor = m[o] / norm;
            row.iter_mut().for_each(|x| *x *= factor);
        }
    }
}

/// What [`merge`] wrote.
#[derive(Clone, Debug)]
pub struct MergeReport {
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    pub merged_modules: usize,
}

/// Writes `out_dir`: the model of `model_dir` with the adapter of `adapter_dir` merged into its weights (F32
/// `model.safetensors`), its `config.json` (dtype float32) and its tokenizer and generation files copied.
pub fn merge(model_dir: &Path, adapter_dir: &Path, out_dir: &Path) -> Result<MergeReport, WeightsError> {
    let model = ModelDir::open(model_dir)?;
    let adapter = LoraAdapter::open(adapter_dir)?;
    adapter.check_against(&model)?;
    std::fs::create_dir_all(out_dir).map_err(|e| WeightsError::io(out_dir, e))?;
    let mut files = Vec::new();

    // Every tensor's shape was checked when the model was opened; the dtype is checked here, so that reading
    // cannot fail once writing has started.
    let names: Vec<String> = model.tensor_names().map(str::to_string).collect();
    for n in &names {
        if !model.dtype(n).is_some_and(is_float_dtype) {
            return Err(WeightsError::unsupported(
                &model.weights_path(),
                format!("tensor `{}` is {:?}; tunec reads F32, F16 and BF16 tensors", show(n), model.dtype(n)),
            ));
        }
    }
    let model_ref = &model;
    let adapter_ref = &adapter;
    let views: Vec<(String, F32View<'_>)> = names
        .iter()
        .map(|n| {
            let shape = model.shape(n).expect("listed").to_vec();
            let view = F32View::lazy(shape, move || {
                let mut t = model_ref.tensor(n).expect("readable: checked before writing");
                if let Some(m) = adapter_ref.module_for(n) {
                    adapter_ref.merge_into(m, &mut t);
                }
                t.data
            });
            (n.clone(), view)
        })
        .collect();
    let weights = out_dir.join("model.safetensors");
    write_safetensors(&weights, &views, Some(pt_metadata()))?;
    files.push(weights);

    let config_path = model_dir.join("config.json");
    let mut config = read_json(&config_path)?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), Value::String("float32".into()));
        obj.remove("dtype");
        obj.remove("quantization_config");
    }
    let out_config = out_dir.join("config.json");
    write_json(&out_config, &config)?;
    files.push(out_config);
    for name in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let src = model_dir.join(name);
        if src.exists() {
            // Read (a regular file of at most MAX_JSON_BYTES: a FIFO or device could block or never end) and
            // written atomically.
            let bytes = read_capped(&src, MAX_JSON_BYTES, "weights::MAX_JSON_BYTES")?;
            let dst = out_dir.join(name);
            write_file_atomic(&dst, &bytes)?;
            files.push(dst);
        }
    }
    Ok(MergeReport { files, tensors: names.len(), merged_modules: adapter.modules.len() })
}
