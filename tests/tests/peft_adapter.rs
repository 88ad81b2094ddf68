//! The adapter a training run saves loads into Hugging Face PEFT on top of the same base model, with 0 missing and 0
//! unexpected keys, and PEFT's logits reproduce ours within 1e-4 (inf-norm relative): LoRA, QLoRA and DoRA.
//!
//! Per recipe (`examples/tiny.{lora,qlora,dora}.rs`): the plan for the cpu target trains 4 steps from seeded random
//! frozen weights on a synthetic data source at lr 1e-2 (so LoRA B and DoRA's magnitude move away from their
//! identity init); `runtime::train::train` writes `<out>/adapter/`. The base model goes out as a Hugging Face
//! directory (`config.json`, f32 `model.safetensors` with exactly the plan's frozen parameters). Our logits for a
//! fixed 2×8 batch come from the reference interpreter on `recipe.forward` with the frozen weights and the adapter
//! tensors read back from `adapter_model.safetensors` (so the file is what is tested). `tests/reference/
//! check_adapter.py` then loads base + adapter with transformers + PEFT (QLoRA: bitsandbytes nf4 with double quant
//! and f32 compute, which equals our NF4 bit for bit) and compares.
//!
//! The Python check needs the reference venv (`$TUNEC_REF_VENV`, default `~/.cache/tunec/ref-venv`, made by
//! `tests/reference/run.sh`). Without it the test still trains, writes and re-reads the adapter, checks its keys
//! against the plan, and says loudly that the PEFT comparison was skipped: the Rust suite does not depend on the venv.

#[allow(dead_code)]
#[path = "../../tunec/src/plan_source.rs"]
mod plan_source;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use codegen::build::BuildOptions;
use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::plan::Plan;
use ir::{Init, OutputKind, Role};
use runtime::train::{train, Batch, DataSource, TrainOptions};
use runtime::CpuBackend;
use safetensors::{Dtype, SafeTensors};
use serde_json::json;
use tests::{compile_example, repo_root};

const PREFIX: &str = "base_model.model.";
const STEPS: u64 = 4;
const LR: f64 = 1e-2;
/// The fixed batch whose logits are compared: B rows of T tokens.
const B: usize = 2;
const T: usize = 8;

/// Deterministic training batches: batch k's tokens are a hash of (k, position); eval is one fixed batch.
struct Synthetic {
    b: usize,
    t: usize,
    vocab: i32,
    next: u64,
}

impl Synthetic {
    fn batch(&self, k: u64) -> Batch {
        let n = self.b * self.t;
        let ids: Vec<i32> =
            (0..n).map(|i| (ir::rng::uniform(7, k, i as u64) * self.vocab as f32) as i32 % self.vocab).collect();
        let labels: Vec<i32> = (0..n).map(|i| if (i + 1) % self.t == 0 { -100 } else { ids[i + 1] }).collect();
        Batch {
            input_ids: ids,
            position_ids: (0..n).map(|i| (i % self.t) as i32).collect(),
            segment_ids: (0..n).map(|i| (i / self.t) as i32).collect(),
            labels,
        }
    }
}

impl DataSource for Synthetic {
    fn next_batch(&mut self) -> Result<Batch, String> {
        self.next += 1;
        Ok(self.batch(self.next - 1))
    }
    fn eval_batches(&self) -> Vec<Batch> {
        vec![self.batch(1000)]
    }
    fn position(&self) -> serde_json::Value {
        json!({ "next": self.next })
    }
    fn restore(&mut self, p: &serde_json::Value) -> Result<(), String> {
        self.next = p["next"].as_u64().ok_or("bad position")?;
        Ok(())
    }
}

fn config_value(plan: &Plan, key: &str) -> serde_json::Value {
    let (_, v) =
        plan.model_config.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("model_config has no `{key}`"));
    serde_json::from_str(v).unwrap()
}

fn config_usize(plan: &Plan, key: &str) -> usize {
    config_value(plan, key).as_u64().unwrap_or_else(|| panic!("`{key}` is not an integer")) as usize
}

/// The seeded frozen weights: (HF name, shape, values). Norm weights are 1 + U(−0.1, 0.1), the rest U(−0.2, 0.2).
fn frozen_weights(plan: &Plan) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    plan.params
        .iter()
        .filter(|p| matches!(p.init, Init::Load))
        .map(|p| {
            let n: usize = p.shape.iter().product();
            let s = ir::init::param_seed(5, &p.name);
            let u = |i: usize| 2.0 * ir::rng::uniform(s, 1, i as u64) - 1.0;
            let v: Vec<f32> = if p.name.contains("norm") {
                (0..n).map(|i| 1.0 + 0.1 * u(i)).collect()
            } else {
                (0..n).map(|i| 0.2 * u(i)).collect()
            };
            (p.name.clone(), p.shape.clone(), v)
        })
        .collect()
}

/// `config.json` of the base as transformers' `LlamaConfig` reads it, from the plan's model config.
fn hf_config(plan: &Plan) -> serde_json::Value {
    assert_eq!(config_value(plan, "arch"), "llama");
    let (hidden, heads) = (config_usize(plan, "hidden"), config_usize(plan, "heads"));
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config_usize(plan, "vocab"),
        "hidden_size": hidden,
        "intermediate_size": config_usize(plan, "ffn"),
        "num_hidden_layers": config_usize(plan, "layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": config_usize(plan, "kv_heads"),
        "head_dim": hidden / heads,
        "hidden_act": "silu",
        "rms_norm_eps": config_value(plan, "norm_eps"),
        "rope_theta": config_value(plan, "rope_theta"),
        "tie_word_embeddings": config_value(plan, "tie_embeddings"),
        "max_position_embeddings": 64,
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    })
}

/// Every f32 tensor of a safetensors file: (name, shape, values).
fn read_safetensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), Dtype::F32, "{name}: the adapter is f32");
            let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (name, t.shape().to_vec(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn reference_python() -> Option<PathBuf> {
    let venv = std::env::var_os("TUNEC_REF_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tunec/ref-venv")))?;
    let py = venv.join("bin/python");
    py.exists().then_some(py)
}

fn peft_loads_our_adapter(example: &str) {
    let recipe = compile_example(example);
    let opts = BuildOptions { archs: vec![], ptxas: false, host: true, llvm_ir: false, ..BuildOptions::default() };
    let plan = plan_source::compile_plan(&recipe, "cpu", &opts).expect("plan");
    let settings = plan.peft.clone().expect("a PEFT recipe");
    assert_eq!(settings.dropout, 0.0, "{example}: the comparison assumes dropout 0");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    // 1. Train a few steps from seeded frozen weights; the run writes <root>/run/adapter/.
    let frozen = frozen_weights(&plan);
    let mut be = CpuBackend::new(&plan, 2).expect("backend");
    for (name, _, v) in &frozen {
        be.set_param_f32(name, v).unwrap();
    }
    be.init_params(plan.train.seed).unwrap();
    let vocab = config_usize(&plan, "vocab");
    let mut data =
        Synthetic { b: plan.train.micro_batch as usize, t: plan.train.seq_len as usize, vocab: vocab as i32, next: 0 };
    let o = TrainOptions {
        out: root.join("run"),
        steps: STEPS,
        lr: LR,
        warmup: 0,
        eval_every: 0,
        save_every: 0,
        seed: 42,
        resume: false,
        base_model: "tunec-test/tiny-base".into(),
        progress: false,
        stop_after: None,
        keep_checkpoints: 0,
    };
    let summary = train(&plan, &mut be, &mut data, &o).unwrap();
    eprintln!("{example}: {STEPS} steps, eval loss {:?} → {:?}", summary.eval_before, summary.eval_after);

    // The base model as a Hugging Face directory: exactly the plan's frozen parameters, f32 (unquantized for QLoRA).
    let base = root.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let st =
        runtime::train::checkpoint::safetensors_bytes(&frozen, Some([("format".to_string(), "pt".to_string())].into()));
    std::fs::write(base.join("model.safetensors"), st).unwrap();
    std::fs::write(base.join("config.json"), serde_json::to_string_pretty(&hf_config(&plan)).unwrap()).unwrap();
    let tied = config_value(&plan, "tie_embeddings") == true;
    assert_eq!(frozen.iter().any(|(n, _, _)| n == "lm_head.weight"), !tied, "lm_head only when untied");

    // 2. The adapter as saved: keys `base_model.model.<parameter>` for exactly the plan's trainable parameters.
    let adapter_dir = root.join("adapter");
    std::fs::rename(root.join("run/adapter"), &adapter_dir).unwrap();
    let saved = read_safetensors(&adapter_dir.join("adapter_model.safetensors"));
    let mut adapter = vec![];
    for (key, shape, v) in saved {
        let name = key.strip_prefix(PREFIX).unwrap_or_else(|| panic!("adapter key `{key}` lacks `{PREFIX}`"));
        adapter.push((name.to_string(), shape, v));
    }
    let trainable: BTreeSet<&str> =
        plan.params.iter().filter(|p| matches!(p.role, Role::Trainable)).map(|p| p.name.as_str()).collect();
    let in_file: BTreeSet<&str> = adapter.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(in_file, trainable, "{example}: the adapter file holds exactly the trainable parameters");
    let modules = 7 * config_usize(&plan, "layers");
    let per_module = if settings.use_dora { 3 } else { 2 };
    assert_eq!(adapter.len(), modules * per_module, "{example}: A, B (and DoRA's magnitude) of every adapted module");
    // The adapter is not the identity: every B moved off zero, and DoRA's magnitude off its init (the row norm).
    for (name, shape, v) in &adapter {
        let p = plan.params.iter().find(|p| &p.name == name).unwrap();
        assert_eq!(shape, &p.shape, "{name}: shape");
        if name.ends_with("lora_B.weight") {
            assert!(v.iter().any(|&x| x.abs() > 1e-4), "{example}: {name} is still ~0 after training");
        }
        if let Some(module) = name.strip_suffix(".lora_magnitude_vector") {
            let (_, wshape, w) = frozen.iter().find(|(n, _, _)| *n == format!("{module}.weight")).unwrap();
            let cols = wshape[1];
            let moved = v.iter().enumerate().map(|(r, &m)| {
                let norm = w[r * cols..(r + 1) * cols].iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                (m as f64 - norm).abs()
            });
            assert!(moved.fold(0.0, f64::max) > 1e-4, "{example}: {name} did not move from the row norm");
        }
    }

    // Our logits: the interpreter on the forward graph with the frozen weights (NF4 ones quantized on load) and the
    // file's adapter.
    let g = &recipe.forward;
    let mut env = Env::default();
    for (name, shape, v) in frozen.iter().chain(&adapter) {
        env.params.insert(name.clone(), Value::F(Tensor::from_f32(shape.clone(), v)));
    }
    let graph_params: BTreeSet<&str> = g.params().into_iter().map(|(_, n, _)| n).collect();
    let given: BTreeSet<&str> = env.params.keys().map(String::as_str).collect();
    assert_eq!(graph_params, given, "{example}: the forward graph's parameters are the frozen ones and the adapter");
    let ids: Vec<i32> = (0..B * T).map(|i| ((i * 37 + 11) % vocab) as i32).collect();
    let mut labels = vec![-100i32; B * T];
    for i in 0..B * T {
        if (i + 1) % T != 0 {
            labels[i] = ids[i + 1];
        }
    }
    for (_, name) in g.inputs() {
        let v = match name {
            "input_ids" => Value::ints(vec![B, T], ids.clone()),
            "position_ids" => Value::ints(vec![B, T], (0..B * T).map(|i| (i % T) as i32).collect()),
            "segment_ids" => Value::ints(vec![B, T], (0..B * T).map(|i| (i / T) as i32).collect()),
            "labels" => Value::ints(vec![B * T], labels.clone()),
            "step" => Value::ints(vec![], vec![0]),
            other => panic!("{example}: forward input `{other}` not provided"),
        };
        env.inputs.insert(name.to_string(), v);
    }
    let vals = run(g, &env, Precision::F32).unwrap_or_else(|e| panic!("{example}: {e}"));
    let logits = vals[g.output(&OutputKind::Logits).expect("logits output").index()].as_f().unwrap().to_f32();
    assert_eq!(logits.len(), B * T * vocab);
    assert!(logits.iter().all(|x| x.is_finite()));
    let quant = recipe.quant.is_some().then_some("nf4");
    let spec = json!({
        "recipe": example,
        "quant": quant,
        "input_ids": ids.chunks(T).collect::<Vec<_>>(),
        "logits_shape": [B, T, vocab],
        "logits": logits,
    });
    std::fs::write(root.join("ids.json"), spec.to_string()).unwrap();

    // 3. PEFT's verdict.
    let Some(python) = reference_python() else {
        eprintln!(
            "\n!!!! {example}: PEFT CHECK SKIPPED: the reference venv is absent ($TUNEC_REF_VENV or \
             ~/.cache/tunec/ref-venv); run tests/reference/run.sh to create it. The adapter was written and re-read, \
             but not loaded into PEFT.\n"
        );
        return;
    };
    let script = repo_root().join("tests/reference/check_adapter.py");
    let out = std::process::Command::new(&python).arg(&script).arg(root).output().expect("run check_adapter.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout.lines().find_map(|l| l.strip_prefix("check_adapter: "));
    let keep = std::env::var_os("TUNEC_KEEP_ADAPTER_CHECK").is_some();
    if !(out.status.success() && line.is_some()) || keep {
        // Keep the directory for a rerun by hand: `<venv>/bin/python tests/reference/check_adapter.py <dir>`.
        let kept = dir.keep();
        eprintln!("{example}: kept {}", kept.display());
        assert!(
            out.status.success() && line.is_some(),
            "{example}: check_adapter.py {} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            kept.display(),
            out.status
        );
    }
    let r: serde_json::Value = serde_json::from_str(line.unwrap()).unwrap();
    eprintln!(
        "{example}: PEFT loaded the adapter: missing {}, unexpected {}, logits rel err {:.3e} (adapter moves the \
         logits by {:.3e}), {} tensors, {} LoRA layers, {} bnb 4-bit layers",
        r["missing"],
        r["unexpected"],
        r["rel_err"].as_f64().unwrap_or(f64::NAN),
        r["adapter_effect"].as_f64().unwrap_or(f64::NAN),
        r["adapter_tensors"],
        r["peft_lora_layers"],
        r["bnb_4bit_layers"]
    );
    assert_eq!(r["ok"], true, "{example}: {r}");
    assert_eq!(r["missing"], 0, "{example}: {r}");
    assert_eq!(r["unexpected"], 0, "{example}: {r}");
    assert!(r["rel_err"].as_f64().unwrap() <= 1e-4, "{example}: {r}");
    assert_eq!(r["adapter_tensors"], adapter.len(), "{example}: {r}");
    assert_eq!(r["peft_lora_layers"], modules, "{example}: {r}");
    assert_eq!(r["bnb_4bit_layers"], if quant.is_some() { modules } else { 0 }, "{example}: {r}");
    assert_eq!(r["use_dora"], settings.use_dora, "{example}: {r}");
}

#[test]
fn lora_adapter_loads_into_peft_and_reproduces_our_logits() {
    peft_loads_our_adapter("tiny.lora.rs");
}

#[test]
fn qlora_adapter_loads_into_peft_with_bitsandbytes_and_reproduces_our_logits() {
    peft_loads_our_adapter("tiny.qlora.rs");
}

#[test]
fn dora_adapter_loads_into_peft_and_reproduces_our_logits() {
    peft_loads_our_adapter("tiny.dora.rs");
}
