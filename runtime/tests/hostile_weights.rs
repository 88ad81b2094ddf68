//! Hostile model files (issue 11): GGUF and safetensors files written byte by byte with lying sizes, counts,
//! offsets and names; model directories whose config, index or tokenizer point at devices, FIFOs or files outside
//! the directory; configs that differ from the plan. Each must be refused with a message that names the file and the
//! place, is short and carries no raw control characters: never a panic, an abort, a hang or a huge allocation.

use std::path::{Path, PathBuf};

use ir::settings::MAX_LAYERS;
use runtime::weights::config::LlamaConfig;
use runtime::weights::dequant::GgmlType;
use runtime::weights::gguf::{write_gguf, GgufFile, GgufValue, MAX_ARRAY_DEPTH};
use runtime::weights::import::config_from_gguf;
use runtime::weights::safetensors_io::write_tensors;
use runtime::weights::{import_gguf, ModelDir, SafeTensorsFile, Tensor, WeightsError};

/// GGUF bytes built by hand: the header, then whatever the test appends (little-endian throughout).
struct Gguf(Vec<u8>);

impl Gguf {
    /// `GGUF`, version 3, the tensor count and the metadata count.
    fn new(n_tensors: u64, n_kv: u64) -> Self {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        Gguf(b)
    }
    fn u32(mut self, x: u32) -> Self {
        self.0.extend(x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> Self {
        self.0.extend(x.to_le_bytes());
        self
    }
    /// A GGUF string: u64 length, then the bytes.
    fn str(self, s: &[u8]) -> Self {
        let mut g = self.u64(s.len() as u64);
        g.0.extend(s);
        g
    }
    /// A tensor info: name, dims (innermost first), ggml type, offset.
    fn tensor(self, name: &str, dims: &[u64], ty: GgmlType, offset: u64) -> Self {
        let mut g = self.str(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            g = g.u64(d);
        }
        g.u32(ty.0).u64(offset)
    }
    fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.0).unwrap();
        p
    }
}

/// The error of opening `path` as GGUF, checked to be a clean message: it names the file, is under 1 KB and holds
/// no control characters.
fn gguf_error(path: &Path) -> String {
    let e = GgufFile::open(path).expect_err("a hostile file must be refused").to_string();
    clean(&e, path);
    e
}

fn clean(e: &str, path: &Path) {
    assert!(e.contains(&path.display().to_string()), "the message must name the file: {e}");
    assert!(e.len() < 1024, "message of {} bytes: {}", e.len(), &e[..300.min(e.len())]);
    assert!(!e.chars().any(char::is_control), "raw control characters in {e:?}");
}

#[test]
fn gguf_key_of_10_mb_control_bytes_gives_a_short_escaped_message() {
    let dir = tempfile::tempdir().unwrap();
    let key = vec![0x1bu8; 10 << 20];
    // The key, then an unknown value type.
    let path = Gguf::new(0, 1).str(&key).u32(99).write(dir.path(), "key.gguf");
    let e = gguf_error(&path);
    assert!(e.contains("unknown metadata value type 99") && e.contains("\\u{1b}"), "{e}");
    // A long tensor name of control characters with too many dimensions.
    let name = "\n\u{7}".repeat(1 << 20);
    let path = Gguf::new(1, 0).tensor(&name, &[1; 9], GgmlType::F32, 0).write(dir.path(), "name.gguf");
    let e = gguf_error(&path);
    assert!(e.contains("9 dimensions") && e.contains("\\n\\u{7}"), "{e}");
    // A metadata string value shown in a type error.
    let value = "\u{1b}[2J".repeat(1 << 20);
    let meta = vec![("general.architecture".to_string(), GgufValue::String(value))];
    let path = dir.path().join("value.gguf");
    write_gguf(&path, &meta, &[], 32).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let e = g.get_u64("general.architecture").unwrap_err().to_string();
    clean(&e, &path);
    let e = config_from_gguf(&g).unwrap_err().to_string();
    clean(&e, &path);
}

#[test]
fn gguf_counts_and_array_lengths_are_checked_against_the_bytes_left() {
    let dir = tempfile::tempdir().unwrap();
    // 2^60 metadata entries or tensors in a 24-byte file.
    let e = gguf_error(&Gguf::new(0, 1 << 60).write(dir.path(), "kv.gguf"));
    assert!(e.contains("n_kv") && e.contains("cannot fit"), "{e}");
    let e = gguf_error(&Gguf::new(u64::MAX, 0).write(dir.path(), "tensors.gguf"));
    assert!(e.contains("n_tensors") && e.contains("cannot fit"), "{e}");
    // An array of 2^60 u64 elements, and one whose u64 elements need 8 times the bytes left (the count alone is
    // below the bytes left): refused before anything is allocated.
    for (name, n) in [("huge.gguf", 1u64 << 60), ("eight.gguf", 1000)] {
        let path = Gguf::new(0, 1).str(b"a").u32(9).u32(10).u64(n).zeros(2000).write(dir.path(), name);
        let e = gguf_error(&path);
        assert!(e.contains("metadata `a`") && e.contains(&format!("{n} array elements")), "{e}");
    }
    // A string length past the end of the file.
    let e = gguf_error(&Gguf::new(0, 1).u64(u64::MAX - 3).zeros(100).write(dir.path(), "str.gguf"));
    assert!(e.contains("metadata entry 0") && e.contains("larger than the file"), "{e}");
}

#[test]
fn gguf_deeply_nested_arrays_are_refused_not_a_stack_overflow() {
    let dir = tempfile::tempdir().unwrap();
    // 200 000 arrays each holding the next: 2.4 MB of file, and a stack overflow for a recursive reader.
    let mut g = Gguf::new(0, 1).str(b"deep").u32(9);
    for _ in 0..200_000 {
        g = g.u32(9).u64(1);
    }
    let e = gguf_error(&g.write(dir.path(), "deep.gguf"));
    assert!(e.contains("metadata `deep`") && e.contains(&format!("nested more than {MAX_ARRAY_DEPTH}")), "{e}");
}

#[test]
fn gguf_dims_offsets_and_block_sizes_use_checked_arithmetic() {
    let dir = tempfile::tempdir().unwrap();
    let one = |name: &str, dims: &[u64], ty: GgmlType, offset: u64| {
        Gguf::new(1, 0).tensor("w", dims, ty, offset).zeros(64).write(dir.path(), name)
    };
    // Dims multiplying past 2^64.
    let e = gguf_error(&one("dims.gguf", &[1 << 32, 1 << 32, 1 << 32], GgmlType::F32, 0));
    assert!(e.contains("tensor info 0 `w`") && e.contains("more elements than fit"), "{e}");
    // An element count whose byte count overflows (2^61 I64 values = 2^64 bytes).
    let e = gguf_error(&one("bytes.gguf", &[1 << 61], GgmlType::I64, 0));
    assert!(e.contains("tensor `w`") && e.contains("more bytes than fit"), "{e}");
    // An offset that wraps around when added to the data start.
    let e = gguf_error(&one("offset.gguf", &[8], GgmlType::F32, u64::MAX - 31));
    assert!(e.contains("tensor `w`") && e.contains("past the end of the file"), "{e}");
    // Q4_K rows that are not whole 256-element blocks, and whole blocks that the file does not hold.
    let e = gguf_error(&one("q4k.gguf", &[100, 2], GgmlType::Q4_K, 0));
    assert!(e.contains("tensor `w` (Q4_K") && e.contains("not whole blocks of 256"), "{e}");
    let e = gguf_error(&one("q4k-short.gguf", &[256, 4], GgmlType::Q4_K, 0));
    assert!(e.contains("576 bytes") && e.contains("truncated"), "{e}");
    // Duplicate tensor names and metadata keys.
    let two = Gguf::new(2, 0).tensor("w", &[8], GgmlType::F32, 0).tensor("w", &[8], GgmlType::F32, 32).zeros(96);
    let e = gguf_error(&two.write(dir.path(), "dup.gguf"));
    assert!(e.contains("tensor info 1 `w`: a second tensor"), "{e}");
    let dup = Gguf::new(0, 2).str(b"k").u32(4).u32(1).str(b"k").u32(4).u32(2);
    let e = gguf_error(&dup.write(dir.path(), "dupkey.gguf"));
    assert!(e.contains("metadata key `k` appears twice"), "{e}");
}

/// A GGUF file with the Llama metadata of a tiny model (no tensors); `edit` changes it.
fn llama_metadata(edit: impl FnOnce(&mut Vec<(String, GgufValue)>)) -> Vec<(String, GgufValue)> {
    let u = GgufValue::U32;
    let mut m = vec![
        ("general.architecture".to_string(), GgufValue::String("llama".into())),
        ("llama.block_count".to_string(), u(2)),
        ("llama.embedding_length".to_string(), u(64)),
        ("llama.feed_forward_length".to_string(), u(96)),
        ("llama.attention.head_count".to_string(), u(4)),
        ("llama.attention.head_count_kv".to_string(), u(2)),
        ("llama.attention.layer_norm_rms_epsilon".to_string(), GgufValue::F32(1e-5)),
        ("llama.vocab_size".to_string(), u(300)),
    ];
    edit(&mut m);
    m
}

#[test]
fn gguf_model_sizes_are_validated_before_anything_is_allocated_per_layer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let set = |k: &str, v: GgufValue| {
        let k = k.to_string();
        move |m: &mut Vec<(String, GgufValue)>| m.iter_mut().filter(|(n, _)| *n == k).for_each(|(_, x)| *x = v.clone())
    };
    write_gguf(&path, &llama_metadata(|_| {}), &[], 32).unwrap();
    config_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    // 2^40 layers: the expected tensors would take forever to list.
    write_gguf(&path, &llama_metadata(set("llama.block_count", GgufValue::U64(1 << 40))), &[], 32).unwrap();
    let e = import_gguf(&path, &dir.path().join("out")).unwrap_err().to_string();
    clean(&e, &path);
    assert!(e.contains("num_hidden_layers") && e.contains(&MAX_LAYERS.to_string()), "{e}");
    assert!(!dir.path().join("out").exists(), "nothing is written for a refused file");
    // An odd head dimension (hidden 66 / 6 heads = 11) would panic un-permuting the q/k rows.
    write_gguf(
        &path,
        &llama_metadata(|m| {
            set("llama.embedding_length", GgufValue::U32(66))(m);
            set("llama.attention.head_count", GgufValue::U32(6))(m);
        }),
        &[],
        32,
    )
    .unwrap();
    let e = config_from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err().to_string();
    assert!(e.contains("`head_dim` 11 is odd"), "{e}");
    // Sizes whose products would overflow are out of their range first, and a NaN epsilon.
    write_gguf(&path, &llama_metadata(set("llama.vocab_size", GgufValue::U64(u64::MAX / 2))), &[], 32).unwrap();
    let e = config_from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err().to_string();
    assert!(e.contains("`vocab_size` must be an integer in [1, 4194304]"), "{e}");
    write_gguf(
        &path,
        &llama_metadata(set("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(f32::NAN))),
        &[],
        32,
    )
    .unwrap();
    let e = config_from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err().to_string();
    assert!(e.contains("`rms_norm_eps` must be a finite number > 0, found NaN"), "{e}");
}

/// A safetensors file from a header (JSON) and `data_len` bytes of data.
fn safetensors(dir: &Path, name: &str, header: &serde_json::Value, data_len: usize) -> PathBuf {
    let h = header.to_string();
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h.as_bytes());
    b.resize(b.len() + data_len, 0);
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn st_error(path: &Path) -> String {
    let e = SafeTensorsFile::open(path).expect_err("a hostile file must be refused").to_string();
    clean(&e, path);
    e
}

#[test]
fn truncated_safetensors_says_truncated_with_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let t = Tensor::new(vec![4, 8], vec![0.5; 32]);
    write_tensors(&path, &[("a".into(), t.clone()), ("b".into(), t)]).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = st_error(&path);
    assert!(e.contains("truncated: the header declares 256 bytes of tensor data, the file has 156"), "{e}");
    assert!(e.contains("interrupted download"), "{e}");
    // Cut inside the header.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let e = st_error(&path);
    assert!(e.contains("truncated") && e.contains("12 bytes after it"), "{e}");
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert!(st_error(&path).contains("truncated"));
}

#[test]
fn safetensors_header_errors_name_the_tensor_that_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f32t = |shape: serde_json::Value, s: u64, e: u64| serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [s, e]});
    // `a` spans 12 bytes for 2 floats; `b` is right.
    let h = serde_json::json!({"a": f32t([2].into(), 0, 12), "b": f32t([1].into(), 12, 16)});
    let e = st_error(&safetensors(d, "span.safetensors", &h, 16));
    assert!(e.contains("tensor `a`") && e.contains("needs 8 bytes") && !e.contains("`b`"), "{e}");
    // A shape whose byte count overflows.
    let h = serde_json::json!({"ok": f32t([1].into(), 0, 4), "big": f32t([1u64 << 40, 1u64 << 40].into(), 4, 8)});
    let e = st_error(&safetensors(d, "overflow.safetensors", &h, 8));
    assert!(e.contains("tensor `big`") && e.contains("fits in memory"), "{e}");
    // Overlapping data.
    let h = serde_json::json!({"x": f32t([2].into(), 0, 8), "y": f32t([2].into(), 4, 12)});
    let e = st_error(&safetensors(d, "overlap.safetensors", &h, 12));
    assert!(e.contains("tensor `y`") && e.contains("overlaps tensor `x`"), "{e}");
    // An unknown dtype and a tensor name of control characters, shown escaped and capped.
    let mut h = serde_json::Map::new();
    h.insert("\n".repeat(100_000), serde_json::json!({"dtype": "\u{7}Q9", "shape": [1], "data_offsets": [0, 4]}));
    let h = serde_json::Value::Object(h);
    let e = st_error(&safetensors(d, "dtype.safetensors", &h, 4));
    assert!(e.contains("unknown or missing dtype \"\\u{7}Q9\"") && e.contains("\\n\\n"), "{e}");
    // A header length larger than any header.
    let p = d.join("len.safetensors");
    std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
    assert!(st_error(&p).contains("MAX_HEADER_BYTES"));
}

/// A tiny valid model directory: config.json (1 layer) and the weights it implies.
fn tiny_model(dir: &Path) -> serde_json::Value {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let c = LlamaConfig::from_json(&dir.join("config.json"), &config).unwrap();
    let tensors: Vec<(String, Tensor)> = runtime::weights::import::expected_tensors(&c)
        .into_iter()
        .map(|(n, s)| {
            let len = s.iter().product();
            (n, Tensor::new(s, vec![0.1; len]))
        })
        .collect();
    write_tensors(&dir.join("model.safetensors"), &tensors).unwrap();
    config
}

fn model_error(dir: &Path, names: &str) -> String {
    let e = ModelDir::open(dir).expect_err("a hostile directory must be refused").to_string();
    clean(&e, &dir.join(names));
    e
}

#[test]
fn model_files_that_are_devices_or_fifos_are_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    tiny_model(&m);
    ModelDir::open(&m).unwrap();
    // /dev/zero as tokenizer.json, config.json and the weights: read without end before.
    for name in ["tokenizer.json", "config.json", "model.safetensors"] {
        let d = dir.path().join(format!("zero-{name}"));
        tiny_model(&d);
        let _ = std::fs::remove_file(d.join(name));
        std::os::unix::fs::symlink("/dev/zero", d.join(name)).unwrap();
        let e = model_error(&d, name);
        assert!(e.contains("not a regular file"), "{e}");
    }
    // A FIFO as the weights: opening it would block until a writer comes.
    let d = dir.path().join("fifo");
    tiny_model(&d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let made = std::process::Command::new("mkfifo").arg(d.join("model.safetensors")).status();
    if made.is_ok_and(|s| s.success()) {
        let e = model_error(&d, "model.safetensors");
        assert!(e.contains("not a regular file"), "{e}");
        let e = GgufFile::open(&d.join("model.safetensors")).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
    // A config.json over the 64 MiB cap (sparse: no disk used).
    let d = dir.path().join("big");
    tiny_model(&d);
    let f = std::fs::OpenOptions::new().write(true).open(d.join("config.json")).unwrap();
    f.set_len(runtime::weights::MAX_JSON_BYTES + 1).unwrap();
    let e = model_error(&d, "config.json");
    assert!(e.contains("larger than the 67108864 bytes") && e.contains("MAX_JSON_BYTES"), "{e}");
}

#[test]
fn shard_index_cannot_name_files_outside_the_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    tiny_model(&m);
    // The real weights, moved next to the directory, and an index that reaches for them.
    std::fs::rename(m.join("model.safetensors"), dir.path().join("outside.safetensors")).unwrap();
    for shard in ["../outside.safetensors", "/etc/passwd", "a/../../outside.safetensors", "..", "\u{1b}[2J.st"] {
        let index = serde_json::json!({ "weight_map": { "model.embed_tokens.weight": shard } });
        std::fs::write(m.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = model_error(&m, "model.safetensors.index.json");
        assert!(e.contains("not a file name in the model directory"), "{shard}: {e}");
    }
    // A tensor in two shards.
    let t = Tensor::new(vec![2], vec![1.0, 2.0]);
    write_tensors(&m.join("s1.safetensors"), &[("x".into(), t.clone())]).unwrap();
    write_tensors(&m.join("s2.safetensors"), &[("x".into(), t)]).unwrap();
    let index = serde_json::json!({ "weight_map": { "x": "s1.safetensors", "y": "s2.safetensors" } });
    std::fs::write(m.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = model_error(&m, "model.safetensors.index.json");
    assert!(e.contains("tensor `x` is in two shards"), "{e}");
}

#[test]
fn config_json_sizes_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    let mut config = tiny_model(&m);
    // 10^12 layers: listing the expected tensors would run out of memory.
    config["num_hidden_layers"] = 1_000_000_000_000u64.into();
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    let e = model_error(&m, "config.json");
    assert!(e.contains("num_hidden_layers") && e.contains("must be an integer in [1, 1024]"), "{e}");
    config["num_hidden_layers"] = 1.into();
    config["model_type"] = "\u{1b}]0;pwned\u{7}".repeat(10_000).into();
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    let e = model_error(&m, "config.json");
    assert!(e.contains("model_type \"\\u{1b}]0;pwned"), "{e}");
}

#[test]
fn plan_config_is_compared_field_by_field_with_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    tiny_model(&m);
    let c = ModelDir::open(&m).unwrap().config;
    let plan = |edit: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = [
            ("arch", "\"llama\""),
            ("vocab", "10"),
            ("hidden", "8"),
            ("layers", "1"),
            ("heads", "2"),
            ("kv_heads", "1"),
            ("ffn", "16"),
            ("rope_theta", "10000.0"),
            ("norm_eps", "1e-5"),
            ("tie_embeddings", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in edit {
            p.iter_mut().filter(|(n, _)| n == k).for_each(|(_, x)| *x = v.to_string());
        }
        p
    };
    assert_eq!(c.plan_mismatches(&plan(&[])), Vec::<String>::new());
    assert_eq!(c.plan_mismatches(&[]), Vec::<String>::new(), "plans without a model config are not checked");
    // Within the relative tolerance (an f32 round trip of 1e-5), and outside it.
    assert_eq!(c.plan_mismatches(&plan(&[("norm_eps", "9.99999974737875e-6")])), Vec::<String>::new());
    let d = c.plan_mismatches(&plan(&[("rope_theta", "500000.0"), ("norm_eps", "1e-6"), ("kv_heads", "2")]));
    assert_eq!(d.len(), 3, "{d:?}");
    assert!(d[0].contains("kv_heads: the plan has 2, config.json has `num_key_value_heads`: 1"), "{d:?}");
    assert!(d[1].contains("rope_theta: the plan has 500000.0, config.json has `rope_theta`: 10000.0"), "{d:?}");
    assert!(d[2].contains("norm_eps") && d[2].contains("`rms_norm_eps`"), "{d:?}");
    let d = c.plan_mismatches(&plan(&[("tie_embeddings", "false"), ("arch", "\"gpt2\"")]));
    assert_eq!(d.len(), 2, "{d:?}");
    // What `tunec run --model` says: the file, each difference, and the fix.
    let e = ModelDir::open(&m).unwrap().check_plan(&plan(&[("rope_theta", "500000.0")])).unwrap_err().to_string();
    assert!(e.contains(&m.join("config.json").display().to_string()), "{e}");
    assert!(
        e.contains("(1 difference):\n  rope_theta: the plan has 500000.0, config.json has `rope_theta`: 10000.0"),
        "{e}"
    );
    assert!(e.contains("recompile the recipe with the model's values"), "{e}");
    // A field the table does not know is reported, not skipped.
    let mut p = plan(&[]);
    p.push(("sliding_window".into(), "4096".into()));
    let d = c.plan_mismatches(&p);
    assert!(d.len() == 1 && d[0].contains("sliding_window"), "{d:?}");
}

#[test]
fn weights_errors_escape_tensor_names() {
    let e = WeightsError::MissingTensor { path: "m.safetensors".into(), name: "\u{1b}[2J".repeat(1000) };
    let e = e.to_string();
    assert!(e.len() < 400 && !e.chars().any(char::is_control), "{e}");
}

#[test]
fn adapter_for_another_model_is_refused_by_merge() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    tiny_model(&m);
    let adapter = dir.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let config = serde_json::json!({ "peft_type": "LORA", "r": 2, "lora_alpha": 4.0, "bias": "none" });
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    // q_proj of a model with hidden 16: A is [r, 16], the tiny model's q_proj is [8, 8].
    let p = "base_model.model.model.layers.0.self_attn.q_proj";
    let write = |prefix: &str| {
        let a = Tensor::new(vec![2, 16], vec![0.1; 32]);
        let b = Tensor::new(vec![8, 2], vec![0.1; 16]);
        write_tensors(
            &adapter.join("adapter_model.safetensors"),
            &[(format!("{prefix}.lora_A.weight"), a), (format!("{prefix}.lora_B.weight"), b)],
        )
        .unwrap();
    };
    write(p);
    let out = dir.path().join("out");
    let e = runtime::weights::merge(&m, &adapter, &out).unwrap_err().to_string();
    assert!(e.contains("[out, in] = [8, 16]") && e.contains("trained for another model"), "{e}");
    assert!(!out.exists(), "nothing is written for a refused adapter");
    // A module name of control characters is shown escaped.
    write(&format!("base_model.model.{}", "\u{1b}[2J".repeat(1000)));
    let e = runtime::weights::merge(&m, &adapter, &out).unwrap_err().to_string();
    clean(&e, &adapter.join("adapter_model.safetensors"));
}

#[test]
fn gguf_metadata_value_count_is_capped() {
    use runtime::weights::gguf::MAX_METADATA_VALUES;
    let dir = tempfile::tempdir().unwrap();
    // One array just over the cap, and two arrays of half the cap plus one each: 4 MB of u8 values that would
    // take 32 times that in memory.
    let n = MAX_METADATA_VALUES + 1;
    let path = Gguf::new(0, 1).str(b"big").u32(9).u32(0).u64(n).zeros(n as usize).write(dir.path(), "one.gguf");
    let e = gguf_error(&path);
    assert!(e.contains("metadata `big`") && e.contains(&format!("array of {n} elements")), "{e}");
    let half = MAX_METADATA_VALUES / 2 + 1;
    let mut g = Gguf::new(0, 2);
    for key in [b"a", b"b"] {
        g = g.str(key).u32(9).u32(0).u64(half).zeros(half as usize);
    }
    let e = gguf_error(&g.write(dir.path(), "two.gguf"));
    assert!(e.contains("metadata `b`") && e.contains("MAX_METADATA_VALUES"), "{e}");
}

/// A WordLevel tokenizer (tokenizer.json, tokenizer_config.json) in `dir`, enough for the data pipeline.
fn word_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["<|endoftext|>", "[UNK]", "the", "a", "Give", "three"].iter().enumerate() {
        vocab.insert(w.to_string(), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = serde_json::json!({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": null});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

/// `tunec-runner run plan --model dir` refuses a model whose config.json differs from the plan's model config,
/// before any weight is loaded, listing the difference.
#[test]
fn run_refuses_a_model_whose_config_differs_from_the_plan() {
    use ir::plan::{build_plan, PlanBuffer, PlanSource, Region, TrainSettings, ValuePlacement};
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    tiny_model(&m);
    word_tokenizer(&m);
    let graph = ir::text::parse(
        "graph \"t\" {\n  %0 = param {name=\"model.norm.weight\", role=frozen, init=load} : f32[8]\n  \
         %1 = param {name=\"a\", role=trainable, init=zeros} : f32[8]\n  %2 = add(%0, %1) : f32[8]\n  \
         output logits = %2\n  kernel \"add\" = [%2]\n}\n",
    )
    .unwrap();
    let buf = |region, offset, first| PlanBuffer { region, offset, bytes: 32, start: 0, end: 1, first };
    let model_config: Vec<(String, String)> = [
        ("arch", "\"llama\""),
        ("vocab", "10"),
        ("hidden", "8"),
        ("layers", "1"),
        ("heads", "2"),
        ("kv_heads", "1"),
        ("ffn", "16"),
        ("rope_theta", "500000.0"),
        ("norm_eps", "1e-5"),
        ("tie_embeddings", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let plan = build_plan(PlanSource {
        recipe: "t".into(),
        target: "cpu".into(),
        graph,
        values: vec![ValuePlacement::Owns(0), ValuePlacement::Owns(1), ValuePlacement::Owns(2)],
        buffers: vec![buf(Region::Persistent, 0, 0), buf(Region::Persistent, 32, 1), buf(Region::Arena, 0, 2)],
        arena_bytes: 32,
        persistent_bytes: 64,
        train: TrainSettings { seq_len: 64, lr: 1e-3, steps: 1, seed: 1, save_every: 0, ..TrainSettings::default() },
        peft: None,
        model_config,
    })
    .unwrap();
    let plan_path = dir.path().join("plan.bin");
    // Signed with this test's own key (its own config dir), as `tunec compile -o` would.
    let home = dir.path().join("tunec-home");
    runtime::trust::write_signed(&plan, &plan_path, &runtime::trust::TrustOptions::in_dir(home.clone())).unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/alpaca.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunec-runner"))
        .env("TUNEC_HOME", &home)
        .arg("run")
        .arg(&plan_path)
        .arg("--data")
        .arg(&data)
        .arg("--model")
        .arg(&m)
        .arg("--out")
        .arg(dir.path().join("run"))
        .args(["--backend", "interp", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rope_theta: the plan has 500000.0, config.json has `rope_theta`: 10000.0"), "{err}");
    assert!(err.contains("recompile the recipe"), "{err}");
}
