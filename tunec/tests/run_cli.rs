//! `tunec run` end to end on the tiny LoRA recipe (compiled on the fly for the cpu target), seeded random weights, a
//! word-level tokenizer small enough for the tiny vocabulary, and a few alpaca records:
//! - a run killed with SIGKILL after a checkpoint and resumed with `--resume` ends with the same adapter, byte for
//!   byte, as an uninterrupted run;
//! - a malformed record is reported with file, line and field, and `--skip-bad` skips and counts it;
//! - the outputs a user looks at are there (metrics.jsonl, loss.svg, adapter/);
//! - a plan is code: `compile -o` signs the plan with the user's key, `run` and `inspect --verify` take it, and refuse
//!   another user's plan until `tunec trust` (or `--trust-plan`) says otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A word-level tokenizer (≤ 128 ids, the tiny recipe's vocabulary) with the special tokens the Alpaca template
/// needs; unknown words map to `[UNK]`.
fn tokenizer_dir(dir: &Path) {
    let words = "below is an instruction that describes a task paired with input provides further context write \
                 response appropriately completes the request give three tips for staying healthy eat balanced diet \
                 exercise regularly sleep well translate phrase to french good morning bonjour what 2 4 1 3 # : . + ?";
    let mut vocab = serde_json::Map::new();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for w in words.split_whitespace() {
        let n = vocab.len();
        vocab.entry(w.to_string()).or_insert(n.into());
        let cap = w[..1].to_uppercase() + &w[1..];
        let n = vocab.len();
        vocab.entry(cap).or_insert(n.into());
    }
    assert!(vocab.len() <= 128, "{} words", vocab.len());
    let added: Vec<serde_json::Value> = specials[..3]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                               "normalized": false, "special": true})
        })
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
    let cfg = serde_json::json!({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": null});
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
}

fn data(dir: &Path) -> PathBuf {
    let p = dir.join("alpaca.jsonl");
    let recs = [
        r#"{"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat a balanced diet. 2. Exercise regularly. 3. Sleep well."}"#,
        r#"{"instruction": "Translate the phrase to French.", "input": "Good morning", "output": "Bonjour"}"#,
        r#"{"instruction": "What is 2 + 2?", "input": "", "output": "4"}"#,
        r#"{"instruction": "Write a response.", "input": "", "output": "Good morning. Sleep well."}"#,
        r#"{"instruction": "Give a tip.", "input": "", "output": "Exercise regularly."}"#,
    ];
    std::fs::write(&p, recs.join("\n") + "\n").unwrap();
    p
}

/// `tunec ARGS` with the test's own config dir (`TUNEC_HOME`: its plan-signing key and trust list).
fn tunec(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tunec"));
    c.args(args).env("TUNEC_HOME", home.join("tunec-home"));
    c
}

/// The tiny recipe's rows are 8 tokens, shorter than the Alpaca prompt: the loss is taken on every token.
fn run_args<'a>(data: &'a str, tok: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tiny.lora.rs");
    vec![
        "run",
        recipe,
        "--data",
        data,
        "--tokenizer",
        tok,
        "--random-weights",
        "--out",
        out,
        "--steps",
        steps,
        "--save-every",
        "2",
        "--eval-split",
        "1",
        "--lr",
        "1e-2",
        "--threads",
        "2",
        "--quiet",
        "--loss-on-all",
        "--keep-checkpoints",
        "0",
    ]
}

#[test]
fn a_run_killed_with_sigkill_and_resumed_ends_with_the_uninterrupted_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    tokenizer_dir(&tok);
    let data = data(dir.path());
    let (d, t) = (data.to_str().unwrap(), tok.to_str().unwrap());
    let a = dir.path().join("a");
    let b = dir.path().join("b");

    let whole = tunec(dir.path(), &run_args(d, t, a.to_str().unwrap(), "40")).output().unwrap();
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));
    let stdout = String::from_utf8_lossy(&whole.stdout);
    assert!(stdout.contains("eval loss before"), "{stdout}");
    for f in ["metrics.jsonl", "loss.svg", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"] {
        assert!(a.join(f).is_file(), "{f} missing");
    }

    // Kill the second run once it has written a checkpoint past step 4, then resume it.
    let mut child = tunec(dir.path(), &run_args(d, t, b.to_str().unwrap(), "40"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let ck = |s: u64| b.join("checkpoints").join(format!("step-{s:07}.safetensors"));
    while !ck(6).exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(!b.join("adapter/adapter_model.safetensors").exists(), "killed before the end");
    let mut resume = run_args(d, t, b.to_str().unwrap(), "40");
    resume.push("--resume");
    let resumed = tunec(dir.path(), &resume).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming from"));
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    assert!(
        read(a.join("adapter/adapter_model.safetensors")) == read(b.join("adapter/adapter_model.safetensors")),
        "the resumed run's adapter differs from the uninterrupted run's"
    );
}

#[test]
fn a_malformed_record_names_file_line_and_field_and_skip_bad_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    tokenizer_dir(&tok);
    let data = data(dir.path());
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"instruction\": \"Give a tip.\", \"input\": \"\", \"output\": 4}\n");
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("o");
    let (d, t, o) = (data.to_str().unwrap(), tok.to_str().unwrap(), out.to_str().unwrap());
    let bad = tunec(dir.path(), &run_args(d, t, o, "2")).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("alpaca.jsonl:6") && err.contains("\"output\""), "{err}");
    let mut args = run_args(d, t, o, "2");
    args.push("--skip-bad");
    let ok = tunec(dir.path(), &args).output().unwrap();
    let err = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{err}");
    assert!(err.contains("1 skipped as bad"), "{err}");
    let _ = root();
}

/// A tokenizer with a token past the model's vocabulary (the tiny recipe's 128): the cpu backend's generated code
/// indexes the embedding table unchecked, so the run must refuse the data before any step, naming the record.
#[test]
fn a_token_id_past_the_vocabulary_is_refused_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    tokenizer_dir(&tok);
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tok.join("tokenizer.json")).unwrap()).unwrap();
    t["model"]["vocab"]["zebra"] = 200.into();
    std::fs::write(tok.join("tokenizer.json"), t.to_string()).unwrap();
    // A bare chat template, so that the token falls within the recipe's 8-token rows.
    let cfg = serde_json::json!({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}{{ m.content }} {% endfor %}"});
    std::fs::write(tok.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let data = data(dir.path());
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"instruction\": \"zebra Give a tip.\", \"input\": \"\", \"output\": \"Sleep well.\"}\n");
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("o");
    let (d, t, o) = (data.to_str().unwrap(), tok.to_str().unwrap(), out.to_str().unwrap());
    let mut args = run_args(d, t, o, "2");
    args.extend(["--template", "chat"]);
    let run = tunec(dir.path(), &args).output().unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(
        err.contains(&format!("{d}:6: token id 200 \"zebra\""))
            && err.contains("outside the model's vocabulary of 128")
            && err.contains("the tokenizer does not match the model"),
        "{err}"
    );
    assert!(!out.join("metrics.jsonl").exists(), "no step ran");
}

#[test]
fn a_compiled_plan_is_signed_and_another_users_plan_needs_trust() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok");
    tokenizer_dir(&tok);
    let data = data(dir.path());
    let (d, t) = (data.to_str().unwrap(), tok.to_str().unwrap());
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tiny.lora.rs");
    let plan = dir.path().join("tiny.plan");
    let p = plan.to_str().unwrap();
    // Compiled by another user (another config dir): signed with their key, created on first use.
    let other = dir.path().join("other");
    let compile = tunec(&other, &["compile", recipe, "--target", "cpu", "-o", p]).output().unwrap();
    let err = String::from_utf8_lossy(&compile.stderr);
    assert!(compile.status.success(), "{err}");
    assert!(err.contains("created your plan-signing key") && err.contains("signed with key"), "{err}");
    let key = other.join("tunec-home/plan-signing.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // Their tunec takes it.
    let ok = tunec(&other, &["inspect", "--verify", p]).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("trust: yes, signed with your key"));
    // This user's: refused by run and inspect --verify; plain inspect shows it and says it is not trusted.
    let out = dir.path().join("o");
    let mut args = run_args(d, t, out.to_str().unwrap(), "2");
    args[1] = p;
    let refused = tunec(dir.path(), &args).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("refused: the plan is signed with another key") && err.contains("tunec trust"), "{err}");
    let v = tunec(dir.path(), &["inspect", "--verify", p]).output().unwrap();
    assert!(!v.status.success());
    assert!(String::from_utf8_lossy(&v.stderr).contains("signed with another key"));
    let i = tunec(dir.path(), &["inspect", p]).output().unwrap();
    assert!(i.status.success());
    let shown = String::from_utf8_lossy(&i.stdout);
    assert!(
        shown.contains("plan tiny.lora for cpu") && shown.contains("trust: NO, signed with another key"),
        "{shown}"
    );
    // Trusted once, then for good.
    let mut once = args.clone();
    once.push("--trust-plan");
    let ran = tunec(dir.path(), &once).output().unwrap();
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let trust = tunec(dir.path(), &["trust", p]).output().unwrap();
    assert!(trust.status.success(), "{}", String::from_utf8_lossy(&trust.stderr));
    // A fresh run (a run refuses an --out holding an earlier run's checkpoints).
    std::fs::remove_dir_all(&out).unwrap();
    let ran = tunec(dir.path(), &args).output().unwrap();
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
}
