//! Replays every committed corpus file (`fuzz/corpus/<target>/`) and every saved crash (`fuzz/regressions/<target>/`)
//! through the harnesses, without AFL: none may panic. Regressions listed in `fuzz/regressions/PENDING` (crashes
//! whose fix is on another branch, with their cause) are skipped and named; remove a line once its fix is merged.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/name` of each pending regression.
fn pending() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("regressions/PENDING")).unwrap_or_default();
    text.lines().map(|l| l.split('#').next().unwrap_or("").trim().to_string()).filter(|l| !l.is_empty()).collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let harness = tunec_fuzz::target(target).unwrap();
    let pending = pending();
    let corpus = files(&root().join("corpus").join(target));
    assert!(!corpus.is_empty(), "no corpus for {target} in fuzz/corpus/{target}");
    let regressions = files(&root().join("regressions").join(target));
    let mut skipped = vec![];
    for f in corpus.iter().chain(&regressions) {
        let name = format!("{target}/{}", f.file_name().unwrap().to_string_lossy());
        if pending.contains(&name) {
            skipped.push(name);
            continue;
        }
        let bytes = std::fs::read(f).unwrap();
        if let Err(e) = std::panic::catch_unwind(|| harness(&bytes)) {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("{}: the {target} harness panicked: {}", f.display(), msg.unwrap_or_default());
        }
    }
    if !skipped.is_empty() {
        eprintln!("{target}: skipped {} pending regressions (fuzz/regressions/PENDING): {skipped:?}", skipped.len());
    }
}

#[test]
fn dsl() {
    replay("dsl");
}

#[test]
fn plan() {
    replay("plan");
}

#[test]
fn gguf() {
    replay("gguf");
}

#[test]
fn model_dir() {
    replay("model_dir");
}

#[test]
fn checkpoint() {
    replay("checkpoint");
}

#[test]
fn data() {
    replay("data");
}

/// The seeds that are good inputs go all the way through their harness (so fuzzing starts from the deep code).
#[test]
fn good_seeds_are_accepted() {
    for (target, name) in [
        ("dsl", "tiny.lora.rs"),
        ("dsl", "llama2-7b.qlora.rs"),
        ("plan", "tiny.lora.forward.plan"),
        ("plan", "tiny.qlora.plan"),
        ("gguf", "tiny-tied.gguf"),
        ("model_dir", "tiny"),
        ("model_dir", "tiny-smol-template"),
        ("checkpoint", "step-1"),
        ("data", "alpaca.json"),
        ("data", "alpaca.json.chat"),
        ("data", "chat.jsonl"),
    ] {
        let bytes = std::fs::read(root().join("corpus").join(target).join(name)).unwrap();
        assert!(tunec_fuzz::target(target).unwrap()(&bytes), "fuzz/corpus/{target}/{name} is refused");
    }
}

/// The `model_dir` input format: lengths then bytes, absent files as `0xFFFF_FFFF`, a short input cut off.
#[test]
fn model_dir_files_split_and_join() {
    let files = [("config.json", Some(&b"{}"[..])), ("model.safetensors", None), ("tokenizer.json", Some(&b""[..]))];
    let bytes = tunec_fuzz::join_files(&files);
    let split = tunec_fuzz::split_files(&bytes);
    assert_eq!(split[0], ("config.json", Some(&b"{}"[..])));
    assert_eq!(split[1], ("model.safetensors", None));
    assert_eq!(split[2], ("tokenizer.json", Some(&b""[..])));
    assert_eq!(split[3], ("tokenizer_config.json", None));
    let cut = tunec_fuzz::split_files(&[5, 0, 0, 0, b'{']);
    assert_eq!(cut[0], ("config.json", Some(&b"{"[..])));
    assert_eq!(cut[1], ("model.safetensors", None));
}
