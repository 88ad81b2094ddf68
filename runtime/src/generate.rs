//! Text generation with a Llama model in plain Rust, f32, on the CPU: the forward pass of HF's `LlamaForCausalLM`
//! (Touvron et al. 2023, "LLaMA"; transformers' `modeling_llama.py`): RMSNorm, rotary embeddings (`rope_theta`,
//! rotate-half layout), grouped-query attention with a KV cache, SwiGLU MLP, tied or separate LM head. The big
//! matmuls split their output rows over threads. Sampling is greedy, or temperature + top-p with a seeded RNG; a
//! PEFT LoRA/DoRA adapter can be merged into the weights at load time. Prompts go through the model's chat template.
//!
//! This is the reference path for checking imported and fine-tuned models (`tunec generate`), not a fast server.

use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::weights::{LlamaConfig, LoraAdapter, ModelDir, Tensor, WeightsError};

/// What can go wrong loading a model for generation or generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Template(String),
    #[error("the prompt is {tokens} tokens; with {max_new} new tokens that exceeds the model's context of {context}")]
    TooLong { tokens: usize, max_new: usize, context: usize },
}

/// One transformer block's weights, with q/k/v and gate/up fused row-wise.
struct Block {
    attn_norm: Vec<f32>,
    /// `[q_dim + 2·kv_dim, hidden]`: q rows, then k rows, then v rows.
    qkv: Vec<f32>,
    /// `[hidden, q_dim]`
    o: Vec<f32>,
    mlp_norm: Vec<f32>,
    /// `[2·intermediate, hidden]`: gate rows, then up rows.
    gate_up: Vec<f32>,
    /// `[hidden, intermediate]`
    down: Vec<f32>,
}

/// A Llama model's weights in f32, ready to run.
pub struct Llama {
    pub config: LlamaConfig,
    /// `[vocab, hidden]`
    embed: Vec<f32>,
    /// `[vocab, hidden]`, `None` when tied to the embeddings.
    lm_head: Option<Vec<f32>>,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    /// `[head_dim / 2]`
    inv_freq: Vec<f32>,
    threads: usize,
}

/// Keys and values of the positions seen so far, per layer: `[positions, kv_heads · head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The number of threads [`Llama::load`] uses by default: every available core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Llama {
    /// Loads the weights of `model`, merging `adapter` into the adapted linear layers when given.
    pub fn load(model: &ModelDir, adapter: Option<&LoraAdapter>) -> Result<Self, GenerateError> {
        let c = model.config.clone();
        if c.hidden_act != "silu" {
            return Err(GenerateError::Unsupported(format!(
                "{}: hidden_act \"{}\" (tunec runs silu)",
                model.dir.display(),
                c.hidden_act
            )));
        }
        if let Some(s) = &c.rope_scaling {
            return Err(GenerateError::Unsupported(format!(
                "{}: rope_scaling {s} is not supported",
                model.dir.display()
            )));
        }
        if c.head_dim % 2 != 0 {
            return Err(GenerateError::Unsupported(format!("odd head_dim {}", c.head_dim)));
        }
        if let Some(a) = adapter {
            a.check_against(model)?;
        }
        let load = |name: &str| -> Result<Vec<f32>, GenerateError> {
            let mut t: Tensor = model.tensor(name)?;
            if let Some(a) = adapter {
                if let Some(m) = a.module_for(name) {
                    a.merge_into(m, &mut t);
                }
            }
            Ok(t.data)
        };
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut qkv = load(&format!("{p}.self_attn.q_proj.weight"))?;
            qkv.extend(load(&format!("{p}.self_attn.k_proj.weight"))?);
            qkv.extend(load(&format!("{p}.self_attn.v_proj.weight"))?);
            let mut gate_up = load(&format!("{p}.mlp.gate_proj.weight"))?;
            gate_up.extend(load(&format!("{p}.mlp.up_proj.weight"))?);
            blocks.push(Block {
                attn_norm: load(&format!("{p}.input_layernorm.weight"))?,
                qkv,
                o: load(&format!("{p}.self_attn.o_proj.weight"))?,
                mlp_norm: load(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_up,
                down: load(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        let lm_head = if c.tie_word_embeddings { None } else { Some(load("lm_head.weight")?) };
        // As transformers: inv_freq = 1 / theta^(2i/d), in f32.
        let d = c.head_dim;
        let inv_freq = (0..d / 2).map(|i| 1.0 / (c.rope_theta as f32).powf((2 * i) as f32 / d as f32)).collect();
        Ok(Llama {
            embed: load("model.embed_tokens.weight")?,
            lm_head,
            blocks,
            norm: load("model.norm.weight")?,
            inv_freq,
            threads: default_threads(),
            config: c,
        })
    }

    /// Sets the number of threads the matmuls use (at least 1).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    pub fn new_cache(&self) -> KvCache {
        let n = self.config.num_hidden_layers;
        KvCache { k: vec![Vec::new(); n], v: vec![Vec::new(); n], len: 0 }
    }

    /// Runs `tokens` after the positions in `cache` (which it extends) and returns the logits: `[vocab]` of the last
    /// token, or `[tokens, vocab]` of every token with `all_logits`. Ids past the vocabulary read the last
    /// embedding row ([`Generator`] refuses them before they get here).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Vec<f32> {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (n_q, n_kv) = (c.num_attention_heads, c.num_key_value_heads);
        let (q_dim, kv_dim, inter) = (n_q * hd, n_kv * hd, c.intermediate_size);
        let n = tokens.len();
        let start = cache.len;
        let eps = c.rms_norm_eps as f32;

        // x: [n, hidden]
        let mut x = Vec::with_capacity(n * h);
        for &t in tokens {
            let t = (t as usize).min(c.vocab_size - 1);
            x.extend_from_slice(&self.embed[t * h..(t + 1) * h]);
        }
        for (l, b) in self.blocks.iter().enumerate() {
            let hn = rms_norm(&x, &b.attn_norm, eps);
            let qkv = self.linear(&hn, n, &b.qkv, q_dim + 2 * kv_dim, h);
            let mut q = Vec::with_capacity(n * q_dim);
            for t in 0..n {
                let row = &qkv[t * (q_dim + 2 * kv_dim)..(t + 1) * (q_dim + 2 * kv_dim)];
                let pos = start + t;
                let mut qt = row[..q_dim].to_vec();
                let mut kt = row[q_dim..q_dim + kv_dim].to_vec();
                self.rope(&mut qt, pos);
                self.rope(&mut kt, pos);
                q.extend_from_slice(&qt);
                cache.k[l].extend_from_slice(&kt);
                cache.v[l].extend_from_slice(&row[q_dim + kv_dim..]);
            }
            let attn = attention(&q, &cache.k[l], &cache.v[l], n, start, n_q, n_kv, hd);
            let o = self.linear(&attn, n, &b.o, h, q_dim);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            let hn = rms_norm(&x, &b.mlp_norm, eps);
            let gu = self.linear(&hn, n, &b.gate_up, 2 * inter, h);
            let mut act = Vec::with_capacity(n * inter);
            for t in 0..n {
                let (g, u) = gu[t * 2 * inter..(t + 1) * 2 * inter].split_at(inter);
                act.extend(g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u));
            }
            let down = self.linear(&act, n, &b.down, h, inter);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        cache.len += n;
        let rows = if all_logits { &x[..] } else { &x[(n - 1) * h..] };
        let m = rows.len() / h;
        let xn = rms_norm(rows, &self.norm, eps);
        let head = self.lm_head.as_deref().unwrap_or(&self.embed);
        self.linear(&xn, m, head, c.vocab_size, h)
    }

    /// Rotary embedding of one token's heads (`x`: `[heads, head_dim]`) at `pos`, rotate-half layout.
    fn rope(&self, x: &mut [f32], pos: usize) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        for head in x.chunks_exact_mut(hd) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let angle = pos as f32 * self.inv_freq[i];
                let (sin, cos) = angle.sin_cos();
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos - x2 * sin;
                b[i] = x2 * cos + x1 * sin;
            }
        }
    }

    /// y = x·Wᵀ. x: `[n, cols]`, W: `[rows, cols]` -> y: `[n, rows]`. Output rows are split over the threads.
    fn linear(&self, x: &[f32], n: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), n * cols);
        debug_assert_eq!(w.len(), rows * cols);
        // yt: [rows, n], filled in chunks of CHUNK_ROWS rows that the threads take in turn (so a thread the OS
        // preempts does not hold the others up, as fixed halves would).
        const CHUNK_ROWS: usize = 64;
        let mut yt = vec![0f32; rows * n];
        let threads = self.threads.min(rows.div_ceil(CHUNK_ROWS)).max(1);
        if threads == 1 {
            matmul_rows(x, n, w, cols, &mut yt);
        } else {
            let chunks = std::sync::Mutex::new(yt.chunks_mut(CHUNK_ROWS * n).enumerate());
            let work = || loop {
                let next = chunks.lock().unwrap_or_else(|p| p.into_inner()).next();
                let Some((i, out)) = next else { break };
                let first = i * CHUNK_ROWS;
                matmul_rows(x, n, &w[first * cols..(first + out.len() / n) * cols], cols, out);
            };
            std::thread::scope(|s| {
                for _ in 1..threads {
                    s.spawn(work);
                }
                work();
            });
        }
        if n == 1 {
            return yt;
        }
        let mut y = vec![0f32; n * rows];
        for r in 0..rows {
            for t in 0..n {
                y[t * rows + r] = yt[r * n + t];
            }
        }
        y
    }
}

/// RMSNorm over rows of `x` (`[n, d]`): x / √(mean(x²) + eps) · w.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ms = row.iter().map(|&v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| g * (v * r)));
    }
    out
}

/// Causal attention of `n` new tokens (at positions start..start+n) over every cached position.
/// q: `[n, n_q · hd]`, k/v: `[positions, n_kv · hd]` -> `[n, n_q · hd]`.
#[allow(clippy::too_many_arguments)]
fn attention(q: &[f32], k: &[f32], v: &[f32], n: usize, start: usize, n_q: usize, n_kv: usize, hd: usize) -> Vec<f32> {
    let group = n_q / n_kv;
    let kv_dim = n_kv * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; n * n_q * hd];
    let mut scores = Vec::new();
    for t in 0..n {
        let visible = start + t + 1;
        for head in 0..n_q {
            let g = head / group;
            let qh = &q[(t * n_q + head) * hd..(t * n_q + head + 1) * hd];
            scores.clear();
            scores.extend((0..visible).map(|j| dot(qh, &k[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd]) * scale));
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[(t * n_q + head) * hd..(t * n_q + head + 1) * hd];
            for (j, &p) in scores.iter().enumerate() {
                let p = p / sum;
                let vj = &v[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd];
                o.iter_mut().zip(vj).for_each(|(a, &b)| *a += p * b);
            }
        }
    }
    out
}

/// out[r·n + t] = x_t · w_r for every row r of `w` (`[rows, cols]`) and token t of `x` (`[n, cols]`).
fn matmul_rows(x: &[f32], n: usize, w: &[f32], cols: usize, out: &mut [f32]) {
    debug_assert_eq!(x.len(), n * cols);
    debug_assert_eq!(out.len() * cols, w.len() * n);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { matmul_rows_avx2(x, n, w, cols, out) };
        return;
    }
    for (wr, o) in w.chunks_exact(cols).zip(out.chunks_exact_mut(n)) {
        for (t, y) in o.iter_mut().enumerate() {
            *y = dot(&x[t * cols..(t + 1) * cols], wr);
        }
    }
}

/// [`matmul_rows`] with AVX2/FMA intrinsics (explicit, so it is vectorized at any opt-level): tiles of 4 weight rows
/// against one token at a time, the 4 rows (a few KiB) staying in L1 while every token passes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn matmul_rows_avx2(x: &[f32], n: usize, w: &[f32], cols: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    let rows = w.len() / cols;
    let body = cols / 8 * 8;
    let mut r = 0;
    while r + 4 <= rows {
        let w0 = &w[r * cols..(r + 1) * cols];
        let w1 = &w[(r + 1) * cols..(r + 2) * cols];
        let w2 = &w[(r + 2) * cols..(r + 3) * cols];
        let w3 = &w[(r + 3) * cols..(r + 4) * cols];
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i < body {
                // SAFETY: i + 8 <= body <= cols, the length of every slice read.
                unsafe {
                    let xv = _mm256_loadu_ps(xt.as_ptr().add(i));
                    a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0.as_ptr().add(i)), a0);
                    a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w1.as_ptr().add(i)), a1);
                    a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w2.as_ptr().add(i)), a2);
                    a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w3.as_ptr().add(i)), a3);
                }
                i += 8;
            }
            let mut sums = [hsum(a0), hsum(a1), hsum(a2), hsum(a3)];
            for j in body..cols {
                sums[0] += xt[j] * w0[j];
                sums[1] += xt[j] * w1[j];
                sums[2] += xt[j] * w2[j];
                sums[3] += xt[j] * w3[j];
            }
            for (k, s) in sums.into_iter().enumerate() {
                out[(r + k) * n + t] = s;
            }
        }
        r += 4;
    }
    for r in r..rows {
        let wr = &w[r * cols..(r + 1) * cols];
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            let mut a = _mm256_setzero_ps();
            let mut i = 0;
            while i < body {
                // SAFETY: i + 8 <= body <= cols.
                unsafe {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(xt.as_ptr().add(i)), _mm256_loadu_ps(wr.as_ptr().add(i)), a)
                };
                i += 8;
            }
            let mut s = hsum(a);
            for j in body..cols {
                s += xt[j] * wr[j];
            }
            out[r * n + t] = s;
        }
    }
}

/// Dot product with 16 independent accumulators, so the compiler can keep them in vector registers.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let whole = a.len() / L * L;
    for (ca, cb) in a[..whole].chunks_exact(L).zip(b[..whole].chunks_exact(L)) {
        for k in 0..L {
            acc[k] += ca[k] * cb[k];
        }
    }
    let mut s = 0.0;
    for k in 0..L / 2 {
        acc[k] += acc[k + L / 2];
    }
    for v in &acc[..L / 2] {
        s += v;
    }
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        s += x * y;
    }
    s
}

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 (or less): greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to at least `top_p`.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// Picks tokens from logits according to a [`Sampling`], with its own seeded RNG.
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        Sampler { sampling, rng: StdRng::seed_from_u64(sampling.seed) }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.sampling.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.sampling.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / t).exp())).collect();
        let sum: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= sum);
        let top_p = self.sampling.top_p;
        if top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p.1;
                if cum >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f32>() * total;
        for &(id, p) in &probs {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// The index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Options of [`Generator::generate`].
#[derive(Clone, Copy, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 64, sampling: Sampling::default() }
    }
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The generated text (special tokens skipped).
    pub text: String,
    pub prompt_tokens: usize,
    /// The generated token ids (the EOS that stopped it included).
    pub tokens: Vec<u32>,
    pub stopped_at_eos: bool,
    /// Seconds spent on the prompt (one forward over all its tokens).
    pub prefill_secs: f64,
    /// Seconds spent producing the tokens after the first.
    pub decode_secs: f64,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Generated tokens per second after the first (each one a forward of one token).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// A model with its tokenizer and chat template, ready to answer prompts.
pub struct Generator {
    pub model: Llama,
    pub model_dir: ModelDir,
    eos_ids: Vec<u32>,
}

impl Generator {
    /// Opens the HF model directory `model_dir` (which must have a `tokenizer.json`) and merges the PEFT adapter of
    /// `adapter_dir` into its weights when given.
    pub fn load(model_dir: &Path, adapter_dir: Option<&Path>) -> Result<Self, GenerateError> {
        let dir = ModelDir::open(model_dir)?;
        dir.require_tokenizer()?;
        let adapter = adapter_dir.map(LoraAdapter::open).transpose()?;
        let model = Llama::load(&dir, adapter.as_ref())?;
        let mut eos_ids = dir.config.eos_token_ids.clone();
        let gen_config = model_dir.join("generation_config.json");
        if gen_config.exists() {
            let v = crate::weights::read_json(&gen_config)?;
            match v.get("eos_token_id") {
                Some(serde_json::Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                Some(x) => eos_ids.extend(x.as_u64().map(|x| x as u32)),
                None => {}
            }
        }
        if let (Some(t), Some(tok)) = (dir.chat_template.as_ref().and_then(|c| c.eos_token.clone()), &dir.tokenizer) {
            eos_ids.extend(tok.token_to_id(&t));
        }
        eos_ids.sort();
        eos_ids.dedup();
        Ok(Generator { model, model_dir: dir, eos_ids })
    }

    /// The token ids that stop generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    fn tokenizer(&self) -> &tokenizers::Tokenizer {
        self.model_dir.tokenizer.as_ref().expect("checked at load")
    }

    /// `user` as a one-message conversation in the model's chat template with the assistant's turn opened
    /// (`add_generation_prompt`); the text unchanged when the model has no template.
    pub fn chat_prompt(&self, user: &str) -> Result<String, GenerateError> {
        match &self.model_dir.chat_template {
            Some(t) => t.render(&[("user", user)], true).map_err(GenerateError::Template),
            None => Ok(user.to_string()),
        }
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. a BOS some models
    /// add). Chat prompts are encoded without it: their template writes the special tokens itself.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, GenerateError> {
        let enc =
            self.tokenizer().encode(text, add_special_tokens).map_err(|e| GenerateError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, GenerateError> {
        self.tokenizer().decode(ids, true).map_err(|e| GenerateError::Tokenizer(e.to_string()))
    }

    /// Answers `user` in the chat format (see [`Generator::chat_prompt`]).
    pub fn chat(
        &self,
        user: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation, GenerateError> {
        let prompt = self.chat_prompt(user)?;
        let special = self.model_dir.chat_template.is_none();
        self.generate_ids(&self.encode(&prompt, special)?, opts, on_text)
    }

    /// Continues the raw text `prompt` (encoded with the tokenizer's special tokens, e.g. a BOS).
    pub fn generate(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation, GenerateError> {
        self.generate_ids(&self.encode(prompt, true)?, opts, on_text)
    }

    /// Continues the tokens `ids` for up to `opts.max_new_tokens` tokens, stopping at an EOS token. `on_text`
    /// receives the text as it is produced (whole characters only).
    pub fn generate_ids(
        &self,
        ids: &[u32],
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, GenerateError> {
        if ids.is_empty() {
            return Err(GenerateError::Tokenizer("the prompt encodes to no tokens".into()));
        }
        let vocab = self.model.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerateError::Tokenizer(format!(
                "token id {bad} is outside the model's vocabulary of {vocab} (config.json vocab_size)"
            )));
        }
        let context = self.model.config.max_position_embeddings;
        if ids.len() + opts.max_new_tokens > context {
            return Err(GenerateError::TooLong { tokens: ids.len(), max_new: opts.max_new_tokens, context });
        }
        let mut sampler = Sampler::new(opts.sampling);
        let mut cache = self.model.new_cache();
        let t0 = Instant::now();
        let mut logits = self.model.forward(ids, &mut cache, false);
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut tokens = Vec::new();
        let mut emitted = 0;
        let mut stopped_at_eos = false;
        let mut text = String::new();
        while tokens.len() < opts.max_new_tokens {
            let next = sampler.sample(&logits);
            tokens.push(next);
            if self.eos_ids.contains(&next) {
                stopped_at_eos = true;
                break;
            }
            text = self.decode(&tokens)?;
            if !text.ends_with('\u{FFFD}') && text.len() > emitted && text.is_char_boundary(emitted) {
                on_text(&text[emitted..]);
                emitted = text.len();
            }
            if tokens.len() == opts.max_new_tokens {
                break;
            }
            logits = self.model.forward(&[next], &mut cache, false);
        }
        if text.len() > emitted && text.is_char_boundary(emitted) {
            on_text(&text[emitted..]);
        }
        Ok(Generation {
            text,
            prompt_tokens: ids.len(),
            tokens,
            stopped_at_eos,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }
}
