//! Fuzz harnesses for tunec's readers of untrusted input: each function takes the fuzzer's bytes, turns them into
//! what the reader takes (a string, a file, a directory of files), calls the real library entry point and ignores
//! the `Result`: an `Err` is a correct answer to a bad input; a panic, an abort, a hang or an allocation failure is
//! a defect. Each returns whether the input went all the way through (every call `Ok`), which the replay test uses
//! to check that the seeds reach the deep code. The AFL binaries (`src/bin/*.rs`, feature `afl`) call these functions; `tests/replay.rs` replays every
//! committed corpus file and every saved regression through them without AFL.
//!
//! Files go to one scratch directory per process (under `$TMPDIR`), rewritten on every call.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use runtime::data::{
    reader::parse_records, ChatTemplate, Dataset, DatasetOptions, LossOn, PromptFormat, ReadOptions, TextTokenizer,
    TokenizerConfig,
};

/// A fuzz target: its name (the corpus folder `fuzz/corpus/<name>`, the binary `fuzz/src/bin/<name>.rs`) and its
/// harness.
pub type Target = (&'static str, fn(&[u8]) -> bool);

/// Every target, in the order `scripts/fuzz.sh` runs them.
pub const TARGETS: &[Target] = &[
    ("dsl", dsl),
    ("plan", plan),
    ("gguf", gguf),
    ("model_dir", model_dir),
    ("checkpoint", checkpoint),
    ("data", data),
];

/// The harness called `name`.
pub fn target(name: &str) -> Option<fn(&[u8]) -> bool> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

thread_local! {
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// A fresh, empty directory `name` in this thread's scratch directory.
fn scratch(name: &str) -> PathBuf {
    let root = SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let dir = s.get_or_insert_with(|| tempfile::Builder::new().prefix("tunec-fuzz-").tempdir().expect("temp dir"));
        dir.path().to_path_buf()
    });
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("scratch file");
}

/// `dsl`: a recipe's source, parsed and evaluated with the built-in model library, up to the forward graph with
/// the adapters (`frontend::compile_source`); the passes are not run.
pub fn dsl(bytes: &[u8]) -> bool {
    let Ok(source) = std::str::from_utf8(bytes) else { return false };
    frontend::compile_source("fuzz.rs", source, models::library()).is_ok()
}

/// `plan`: `Plan::from_bytes` (which ends with `Plan::check`) on the bytes as they are, then once more with the
/// header's payload length and CRC-32 recomputed, so mutations of the payload reach the decoder instead of stopping
/// at the checksum.
pub fn plan(bytes: &[u8]) -> bool {
    use ir::plan::{Plan, HEADER_BYTES, MAGIC};
    let ok = Plan::from_bytes(bytes).is_ok_and(|p| p.check().is_ok());
    if bytes.len() >= HEADER_BYTES && bytes[..MAGIC.len()] == MAGIC {
        let mut fixed = bytes.to_vec();
        let body_len = (bytes.len() - HEADER_BYTES) as u64;
        fixed[12..20].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32(&fixed[HEADER_BYTES..]);
        fixed[20..24].copy_from_slice(&crc.to_le_bytes());
        if let Ok(p) = Plan::from_bytes(&fixed) {
            let _ = p.check();
        }
    }
    ok
}

/// CRC-32 (IEEE), as the plan header stores it.
fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !bytes.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// `gguf`: the bytes as `model.gguf`: `GgufFile::open`, every tensor dequantized, the tokenizer read, then the
/// importer (`import_gguf`) into a fresh directory, and the imported directory opened again.
pub fn gguf(bytes: &[u8]) -> bool {
    use runtime::weights::{gguf::GgufFile, import_gguf, tokenizer::tokenizer_from_gguf, ModelDir};
    let dir = scratch("gguf");
    let path = dir.join("model.gguf");
    write(&path, bytes);
    let mut ok = true;
    match GgufFile::open(&path) {
        Ok(g) => {
            for t in &g.tensors {
                ok &= g.dequantize(t).is_ok();
            }
            ok &= tokenizer_from_gguf(&g).is_ok();
        }
        Err(_) => ok = false,
    }
    let out = dir.join("out");
    ok && import_gguf(&path, &out).is_ok() && ModelDir::open(&out).is_ok()
}

/// The files of a model directory, in the order the `model_dir` input holds them.
pub const MODEL_DIR_FILES: &[&str] =
    &["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"];

/// Splits a `model_dir` input into files: for each name of [`MODEL_DIR_FILES`] in turn, a u32 little-endian length
/// then that many bytes (fewer if the input ends first); a file whose length field is missing (the input ended) or
/// is `0xFFFF_FFFF` is absent.
pub fn split_files(mut bytes: &[u8]) -> Vec<(&'static str, Option<&[u8]>)> {
    MODEL_DIR_FILES
        .iter()
        .map(|&name| {
            if bytes.len() < 4 {
                bytes = &[];
                return (name, None);
            }
            let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            bytes = &bytes[4..];
            if len == u32::MAX {
                return (name, None);
            }
            let n = (len as usize).min(bytes.len());
            let (file, rest) = bytes.split_at(n);
            bytes = rest;
            (name, Some(file))
        })
        .collect()
}

/// The inverse of [`split_files`] (for building seeds).
pub fn join_files(files: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &name in MODEL_DIR_FILES {
        match files.iter().find(|(n, _)| *n == name).and_then(|(_, f)| *f) {
            Some(f) => {
                out.extend((f.len() as u32).to_le_bytes());
                out.extend(f);
            }
            None => out.extend(u32::MAX.to_le_bytes()),
        }
    }
    out
}

/// `model_dir`: the files of [`split_files`] written to a directory, then `ModelDir::open` (config, safetensors,
/// tokenizer, chat template), every tensor read as f32, the chat template rendered, and the data pipeline's
/// `TextTokenizer::from_dir` with its chat template.
pub fn model_dir(bytes: &[u8]) -> bool {
    use runtime::weights::ModelDir;
    let dir = scratch("model");
    for (name, file) in split_files(bytes) {
        if let Some(file) = file {
            write(&dir.join(name), file);
        }
    }
    let mut ok = true;
    match ModelDir::open(&dir) {
        Ok(m) => {
            let names: Vec<String> = m.tensor_names().map(str::to_string).collect();
            for n in names {
                ok &= m.tensor(&n).is_ok();
            }
            if let Some(t) = &m.chat_template {
                ok &= t.render(&[("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")], true).is_ok();
            }
        }
        Err(_) => ok = false,
    }
    match TextTokenizer::from_dir(&dir) {
        Ok((tokenizer, config)) => {
            ok &= tokenizer.encode("Hello <|im_start|>user\nHi<|im_end|> 123").is_ok();
            if let Some(source) = &config.chat_template {
                match ChatTemplate::new(source, &config.special) {
                    Ok(t) => {
                        let messages = [
                            runtime::data::Message { role: runtime::data::Role::User, content: "Hi".into() },
                            runtime::data::Message { role: runtime::data::Role::Assistant, content: "Hello.".into() },
                        ];
                        ok &= t.render_with_responses(&messages).is_ok();
                    }
                    Err(_) => ok = false,
                }
            }
        }
        Err(_) => ok = false,
    }
    ok
}

/// `checkpoint`: the bytes as a checkpoint file: `Checkpoint::read`, then its data position parsed as the loader's
/// state and restored into a small loader, as `tunec run --resume` does.
pub fn checkpoint(bytes: &[u8]) -> bool {
    use runtime::data::{LoaderState, TrainLoader};
    use runtime::train::checkpoint::Checkpoint;
    let dir = scratch("checkpoint");
    let path = dir.join("step-0000001.safetensors");
    write(&path, bytes);
    let Ok(ck) = Checkpoint::read(&path) else { return false };
    let Ok(state) = serde_json::from_value::<LoaderState>(ck.meta.data.clone()) else { return false };
    let Some(examples) = fixture_examples() else { return false };
    let Ok(mut loader) = TrainLoader::new(examples, checkpoint_batch_options(ck.meta.seed)) else { return false };
    if loader.restore(&state).is_err() {
        return false;
    }
    loader.next_batch();
    true
}

/// The checkpoint target's loader options.
pub fn checkpoint_batch_options(seed: u64) -> runtime::data::BatchOptions {
    runtime::data::BatchOptions {
        micro_batch: 2,
        seq_len: 256,
        packing: true,
        shuffle: true,
        seed,
        pad_id: 0,
        vocab: u32::MAX as usize,
    }
}

/// The fixture tokenizer (a byte-level BPE with ChatML special tokens, `fuzz/fixtures/tokenizer.json`) and
/// SmolLM2-135M-Instruct's `tokenizer_config.json` (special tokens, chat template).
fn fixture_tokenizer() -> Option<&'static (TextTokenizer, TokenizerConfig)> {
    static T: OnceLock<Option<(TextTokenizer, TokenizerConfig)>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let t = TextTokenizer::from_dir(&dir);
        // A harness must not fail on its own fixtures: that would hide every input behind one error.
        Some(t.expect("fuzz/fixtures/tokenizer.json and tokenizer_config.json load"))
    })
    .as_ref()
}

/// A few tokenized examples for the checkpoint target's loader.
pub fn fixture_examples() -> Option<Vec<runtime::data::TokenizedExample>> {
    let (tokenizer, _) = fixture_tokenizer()?;
    let text = r#"[{"instruction": "Say hi.", "input": "", "output": "Hi."},
                   {"instruction": "Count to 3.", "input": "", "output": "1, 2, 3."},
                   {"instruction": "Name a colour.", "input": "", "output": "Blue."}]"#;
    let records = parse_records(Path::new("fixture.json"), text, &ReadOptions::default()).expect("fixture records");
    let opts = DatasetOptions { read: ReadOptions::default(), loss_on: LossOn::Responses, seq_len: 256 };
    Some(Dataset::build(records, &PromptFormat::Alpaca, tokenizer, &opts).expect("fixture dataset").examples)
}

/// `data`: the first byte picks the options (bit 0: the chat template instead of Alpaca's; bit 1: `--skip-bad`;
/// bit 2: loss on all tokens; bits 3–7: the sequence length, 2 + 8·n); the rest is a data file (alpaca JSON array,
/// JSONL, chat JSONL; layout and schema detected), read with `parse_records` and built into a dataset with the
/// fixture tokenizer.
pub fn data(bytes: &[u8]) -> bool {
    let Some((&flags, rest)) = bytes.split_first() else { return false };
    let Ok(text) = std::str::from_utf8(rest) else { return false };
    let Some((tokenizer, config)) = fixture_tokenizer() else { return false };
    let format = if flags & 1 != 0 {
        let Some(source) = &config.chat_template else { return false };
        match ChatTemplate::new(source, &config.special) {
            Ok(t) => PromptFormat::Chat(t),
            Err(_) => return false,
        }
    } else {
        PromptFormat::Alpaca
    };
    let read = ReadOptions { skip_bad: flags & 2 != 0, ..ReadOptions::default() };
    let loss_on = if flags & 4 != 0 { LossOn::AllTokens } else { LossOn::Responses };
    let seq_len = 2 + 8 * (flags >> 3) as usize;
    let path = Path::new("data.jsonl");
    let Ok(records) = parse_records(path, text, &read) else { return false };
    let opts = DatasetOptions { read, loss_on, seq_len };
    Dataset::build(records, &format, tokenizer, &opts).is_ok()
}
