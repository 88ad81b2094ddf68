//! Writes the seed corpora (`fuzz/corpus/<target>/`) and the data target's tokenizer (`fuzz/fixtures/`) from real
//! files and the library's own writers:
//!   cargo run --manifest-path fuzz/Cargo.toml --bin make_seeds -- [plan files compiled by `tunec compile -o`…]
//! Compiled plans are added without their host library and PTX (the reader checks them, never runs them), which
//! keeps the corpus small. Run from the repository root.

use std::path::{Path, PathBuf};

use ir::plan::{build_plan, Plan, PlanSource, TrainSettings, ValuePlacement};
use runtime::data::TrainLoader;
use runtime::train::checkpoint::{Checkpoint, CheckpointMeta};
use runtime::weights::dequant::GgmlType;
use runtime::weights::gguf::{write_gguf, GgufValue};
use runtime::weights::import_gguf;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(name), bytes).unwrap();
}

fn main() {
    assert!(Path::new("fuzz/Cargo.toml").exists(), "run from the repository root");
    dsl();
    let model = gguf();
    model_dir(&model);
    plans(&std::env::args().skip(1).map(PathBuf::from).collect::<Vec<_>>());
    checkpoint();
    data();
}

/// The example recipes and the model library.
fn dsl() {
    let mut files: Vec<PathBuf> = std::fs::read_dir("examples").unwrap().map(|e| e.unwrap().path()).collect();
    files.extend(std::fs::read_dir("models/dsl").unwrap().map(|e| e.unwrap().path()));
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "rs")) {
        put("dsl", &f.file_name().unwrap().to_string_lossy(), &std::fs::read(f).unwrap());
    }
}

/// A deterministic pseudo-random value in [-1, 1).
fn rnd(i: usize, salt: usize) -> f32 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (salt as u64).wrapping_mul(0xD1B5_4A32_D192_ED69);
    let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// Values in the layout of `ty` (F32, F16, Q8_0, Q4_0), `n` a multiple of 32.
fn encode(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x.iter().flat_map(|&v| f16_bytes(v)).collect(),
        GgmlType::Q8_0 => x
            .chunks(32)
            .flat_map(|b| {
                let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                f16_bytes(d)
                    .into_iter()
                    .chain(b.iter().map(move |v| ((v * id).round() as i8) as u8))
                    .collect::<Vec<_>>()
            })
            .collect(),
        GgmlType::Q4_0 => x
            .chunks(32)
            .flat_map(|b| {
                let d = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 8.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                let mut out = f16_bytes(d).to_vec();
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
                out
            })
            .collect(),
        _ => unreachable!(),
    }
}

/// A tiny Llama GGUF (hidden 32, 1 layer, 2 heads / 1 kv head, a byte-level vocabulary with ChatML specials);
/// returns its path.
fn gguf() -> PathBuf {
    let (hidden, inter, heads, kv_heads) = (32usize, 64usize, 2usize, 1usize);
    let hd = hidden / heads;
    let s = |x: &str| GgufValue::String(x.to_string());
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut n = 0;
    for b in 0..=255u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
        tokens.push(c.to_string());
    }
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"];
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let vocab = tokens.len();
    let types: Vec<GgufValue> = (0..vocab).map(|i| GgufValue::I32(if i < 3 { 3 } else { 1 })).collect();
    let u32v = GgufValue::U32;
    let metadata = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.name".to_string(), s("tiny")),
        ("general.alignment".to_string(), u32v(32)),
        ("llama.block_count".to_string(), u32v(1)),
        ("llama.context_length".to_string(), u32v(64)),
        ("llama.embedding_length".to_string(), u32v(hidden as u32)),
        ("llama.feed_forward_length".to_string(), u32v(inter as u32)),
        ("llama.attention.head_count".to_string(), u32v(heads as u32)),
        ("llama.attention.head_count_kv".to_string(), u32v(kv_heads as u32)),
        ("llama.rope.freq_base".to_string(), GgufValue::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon".to_string(), GgufValue::F32(1e-5)),
        ("llama.vocab_size".to_string(), u32v(vocab as u32)),
        ("llama.rope.dimension_count".to_string(), u32v(hd as u32)),
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".to_string(), s("smollm")),
        ("tokenizer.ggml.tokens".to_string(), GgufValue::Array(tokens.iter().map(|t| s(t)).collect())),
        ("tokenizer.ggml.token_type".to_string(), GgufValue::Array(types)),
        ("tokenizer.ggml.merges".to_string(), GgufValue::Array(merges.iter().map(|m| s(m)).collect())),
        ("tokenizer.ggml.bos_token_id".to_string(), u32v(1)),
        ("tokenizer.ggml.eos_token_id".to_string(), u32v(2)),
        ("tokenizer.ggml.add_bos_token".to_string(), GgufValue::Bool(false)),
        (
            "tokenizer.chat_template".to_string(),
            s(concat!(
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
            )),
        ),
    ];
    let mut tensors = Vec::new();
    let mut salt = 0;
    let mut add = |name: &str, shape: Vec<usize>, ty: GgmlType| {
        salt += 1;
        let numel: usize = shape.iter().product();
        let x: Vec<f32> = (0..numel).map(|i| 0.2 * rnd(i, salt)).collect();
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        tensors.push((name.to_string(), dims, ty, encode(ty, &x)));
    };
    add("token_embd.weight", vec![vocab, hidden], GgmlType::Q8_0);
    add("blk.0.attn_norm.weight", vec![hidden], GgmlType::F32);
    add("blk.0.attn_q.weight", vec![heads * hd, hidden], GgmlType::Q4_0);
    add("blk.0.attn_k.weight", vec![kv_heads * hd, hidden], GgmlType::F16);
    add("blk.0.attn_v.weight", vec![kv_heads * hd, hidden], GgmlType::Q8_0);
    add("blk.0.attn_output.weight", vec![hidden, heads * hd], GgmlType::F32);
    add("blk.0.ffn_norm.weight", vec![hidden], GgmlType::F32);
    add("blk.0.ffn_gate.weight", vec![inter, hidden], GgmlType::Q4_0);
    add("blk.0.ffn_up.weight", vec![inter, hidden], GgmlType::F16);
    add("blk.0.ffn_down.weight", vec![hidden, inter], GgmlType::Q8_0);
    add("output_norm.weight", vec![hidden], GgmlType::F32);
    let path = corpus("gguf").join("tiny-tied.gguf");
    write_gguf(&path, &metadata, &tensors, 32).unwrap();
    // A second seed: metadata only (the tensors' absence is an error the importer must name).
    write_gguf(&corpus("gguf").join("metadata-only.gguf"), &metadata[..13], &[], 32).unwrap();
    path
}

fn view<'a>(fs: &'a [(&'static str, Option<Vec<u8>>)]) -> Vec<(&'static str, Option<&'a [u8]>)> {
    fs.iter().map(|(n, f)| (*n, f.as_deref())).collect()
}

/// The tiny GGUF imported to a model directory, packed as the `model_dir` target reads it; its tokenizer also
/// becomes the data target's fixture tokenizer.
fn model_dir(gguf: &Path) {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    import_gguf(gguf, &dir).unwrap();
    let read = |n: &str| std::fs::read(dir.join(n)).ok();
    let files: Vec<(&str, Option<Vec<u8>>)> = tunec_fuzz::MODEL_DIR_FILES.iter().map(|&n| (n, read(n))).collect();
    put("model_dir", "tiny", &tunec_fuzz::join_files(&view(&files)));
    // With SmolLM2's tokenizer_config.json (its chat template) and a chat_template.jinja.
    let mut smol = files.clone();
    smol[3].1 = Some(std::fs::read("runtime/tests/data/tokenizer_config.json").unwrap());
    smol[4].1 = Some(b"{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}".to_vec());
    put("model_dir", "tiny-smol-template", &tunec_fuzz::join_files(&view(&smol)));
    // Config and tokenizer files only (no weights).
    let mut no_weights = files.clone();
    no_weights[1].1 = None;
    put("model_dir", "no-weights", &tunec_fuzz::join_files(&view(&no_weights)));
    std::fs::create_dir_all("fuzz/fixtures").unwrap();
    std::fs::copy(dir.join("tokenizer.json"), "fuzz/fixtures/tokenizer.json").unwrap();
    std::fs::copy("runtime/tests/data/tokenizer_config.json", "fuzz/fixtures/tokenizer_config.json").unwrap();
}

/// A plan holding the tiny LoRA recipe's forward graph (no kernels, no memory plan), and the compiled plans given
/// on the command line without their code.
fn plans(compiled: &[PathBuf]) {
    let recipe = frontend::compile_file(Path::new("examples/tiny.lora.rs"), models::library()).unwrap();
    let nodes = recipe.forward.nodes.len();
    let plan = build_plan(PlanSource {
        recipe: recipe.name.clone(),
        target: "cpu".into(),
        graph: recipe.forward.clone(),
        values: vec![ValuePlacement::None; nodes],
        buffers: vec![],
        arena_bytes: 0,
        persistent_bytes: 0,
        train: TrainSettings {
            seq_len: 16,
            micro_batch: 2,
            lr: 1e-3,
            steps: 10,
            warmup_steps: 1,
            seed: 0,
            save_every: 0,
            ..TrainSettings::default()
        },
        peft: None,
        model_config: vec![("arch".into(), "\"llama\"".into())],
    })
    .unwrap();
    put("plan", "tiny.lora.forward.plan", &plan.to_bytes().unwrap());
    for p in compiled {
        let mut plan = Plan::read_unverified(p).unwrap();
        plan.host_library = None;
        plan.ptx_modules.clear();
        for k in &mut plan.kernels {
            k.llvm_ir = None;
        }
        put("plan", &p.file_name().unwrap().to_string_lossy(), &plan.to_bytes().unwrap());
    }
}

/// A checkpoint whose data position restores into the checkpoint target's loader.
fn checkpoint() {
    let examples = tunec_fuzz::fixture_examples().unwrap();
    let opts = tunec_fuzz::checkpoint_batch_options(7);
    let mut loader = TrainLoader::new(examples, opts).unwrap();
    loader.next_batch();
    let ck = Checkpoint {
        meta: CheckpointMeta {
            step: 1,
            data: serde_json::to_value(loader.state()).unwrap(),
            seed: 7,
            recipe: "tiny.lora".into(),
            tokens: 32,
            plan: "tiny.lora".into(),
        },
        tensors: vec![
            ("lora_A.q".into(), vec![2, 4], (0..8).map(|i| i as f32 * 0.5).collect()),
            ("lora_B.q".into(), vec![4, 2], vec![0.0; 8]),
            ("adam.m.lora_A.q".into(), vec![8], vec![1e-3; 8]),
        ],
    };
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ck.safetensors");
    ck.write(&p).unwrap();
    put("checkpoint", "step-1", &std::fs::read(&p).unwrap());
}

/// The data readers' test fixtures, each with the option byte for Alpaca and for the chat template.
fn data() {
    for e in std::fs::read_dir("runtime/tests/data").unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name == "tokenizer_config.json" {
            continue;
        }
        let text = std::fs::read(&p).unwrap();
        // seq_len 2 + 8·31 = 250; bit 0 chat, bit 1 skip-bad.
        let chat = name.starts_with("chat") || name.starts_with("unknown");
        let flags: u8 = (31 << 3) | if chat { 1 } else { 0 } | 2;
        let mut bytes = vec![flags];
        bytes.extend(&text);
        put("data", &name, &bytes);
        if !chat {
            let mut bytes = vec![(31 << 3) | 1 | 2];
            bytes.extend(&text);
            put("data", &format!("{name}.chat"), &bytes);
        }
    }
}
