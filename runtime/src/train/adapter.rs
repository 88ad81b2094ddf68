//! The trained adapter in Hugging Face PEFT's format: `adapter_model.safetensors` with keys
//! `base_model.model.<parameter name>` (`…q_proj.lora_A.weight` [r, in], `…lora_B.weight` [out, r], DoRA's
//! `…lora_magnitude_vector` [out]) and `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
//! lora_dropout, target_modules, bias "none", use_dora, use_rslora, fan_in_fan_out false, base_model_name_or_path).

use std::path::Path;

use ir::plan::AdapterSettings;

use super::checkpoint::{safetensors_bytes, write_atomic, CheckpointError};

/// PEFT's key for one of our adapter parameters.
pub fn peft_key(name: &str) -> String {
    format!("base_model.model.{name}")
}

/// Whether a trainable parameter belongs to the adapter (everything trainable does in a PEFT recipe).
pub fn is_adapter_param(name: &str) -> bool {
    !name.starts_with("optimizer.")
        && (name.ends_with(".lora_A.weight")
            || name.ends_with(".lora_B.weight")
            || name.ends_with(".lora_magnitude_vector"))
}

/// `adapter_config.json` for `settings`.
pub fn adapter_config(settings: &AdapterSettings, base_model: &str) -> serde_json::Value {
    let mut targets = settings.target_modules.clone();
    targets.sort();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "bias": "none",
        "use_dora": settings.use_dora,
        "use_rslora": settings.use_rslora,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "base_model_name_or_path": base_model,
        "revision": null,
        "library_name": "tunec",
    })
}

/// Writes `<dir>/adapter_model.safetensors` and `<dir>/adapter_config.json` (each atomically).
pub fn write_adapter(
    dir: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    settings: &AdapterSettings,
    base_model: &str,
) -> Result<usize, CheckpointError> {
    let keyed: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .filter(|(n, _, _)| is_adapter_param(n))
        .map(|(n, s, d)| (peft_key(n), s.clone(), d.clone()))
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(&dir.join("adapter_model.safetensors"), &safetensors_bytes(&keyed, Some(meta)))?;
    let config = serde_json::to_string_pretty(&adapter_config(settings, base_model)).expect("json");
    write_atomic(&dir.join("adapter_config.json"), config.as_bytes())?;
    Ok(keyed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_config_follow_peft() {
        assert_eq!(
            peft_key("model.layers.0.self_attn.q_proj.lora_A.weight"),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert!(is_adapter_param("model.layers.3.mlp.down_proj.lora_magnitude_vector"));
        assert!(!is_adapter_param("optimizer.model.layers.0.self_attn.q_proj.lora_A.weight.exp_avg"));
        let s = AdapterSettings {
            method: "dora".into(),
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec!["v_proj".into(), "q_proj".into()],
            use_rslora: false,
            use_dora: true,
        };
        let c = adapter_config(&s, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(c["peft_type"], "LORA");
        assert_eq!(c["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
        assert_eq!(c["use_dora"], true);
        assert_eq!(c["r"], 8);
    }
}
