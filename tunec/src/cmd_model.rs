//! `tunec import`, `tunec generate` and `tunec merge`: bringing a model in (GGUF → HF directory), talking to it
//! (optionally with a trained adapter), and merging an adapter into its weights.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use runtime::generate::{GenerateOptions, Generator, Sampling};

/// Import a GGUF model (llama.cpp) into a Hugging Face Llama directory.
///
/// Writes F32 model.safetensors (HF names, q/k rows un-permuted), config.json, generation_config.json,
/// tokenizer.json (byte-level BPE rebuilt from the GGUF vocabulary and merges) and tokenizer_config.json (with the
/// chat template).
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The GGUF file, e.g. ~/.cache/tunec/assets/smollm2.gguf (see scripts/fetch_assets.sh).
    pub gguf: PathBuf,
    /// The output directory (created if missing; files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
}

/// Generate text with a Hugging Face Llama directory on the CPU, optionally with a PEFT adapter.
///
/// The prompt is put in the model's chat template as one user message (unless --raw). The forward runs in f32;
/// an adapter (LoRA, rsLoRA, DoRA) is merged into the weights at load time.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The model directory (config.json, model.safetensors, tokenizer.json), e.g. from `tunec import`.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory (adapter_config.json, adapter_model.safetensors) merged into the model first.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The user's message.
    #[arg(long)]
    pub prompt: String,
    /// Use the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long = "max-new-tokens", default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities add up to this.
    #[arg(long = "top-p", default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads for the matmuls (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Merge a PEFT LoRA/DoRA adapter into a model directory's weights, writing a new directory.
///
/// W' = W + s·B·A per adapted linear (DoRA: each row then rescaled to the magnitude m); F32 model.safetensors,
/// config.json and the tokenizer files copied.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The output directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// A file size for people: `513.2 MiB`, `3.4 KiB`, `212 B`.
fn size(path: &std::path::Path) -> String {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / (1u64 << 10) as f64),
        b => format!("{b} B"),
    }
}

pub fn import(args: &ImportArgs) -> Result<(), String> {
    let t0 = Instant::now();
    let r = runtime::weights::import_gguf(&args.gguf, &args.out).map_err(|e| format!("error: {e}"))?;
    let secs = t0.elapsed().as_secs_f64();
    let c = &r.config;
    let types: Vec<String> = r.gguf_types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!("imported {} in {secs:.2} s", args.gguf.display());
    println!(
        "  model      llama: {} layers, hidden {}, intermediate {}, {} heads / {} kv heads (head_dim {}), vocab {}, \
         rope_theta {}, tied embeddings: {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        c.rope_theta,
        c.tie_word_embeddings
    );
    println!("  tensors    {} ({} parameters; GGUF types: {})", r.tensors, r.params, types.join(", "));
    println!(
        "  tokenizer  {} tokens ({} special), {} merges, chat template: {}",
        r.vocab_size,
        r.special_tokens,
        r.merges,
        if r.chat_template { "yes" } else { "no" }
    );
    for f in &r.files {
        println!("  wrote      {} ({})", f.display(), size(f));
    }
    Ok(())
}

pub fn generate(args: &GenerateArgs) -> Result<(), String> {
    let t0 = Instant::now();
    let mut g = Generator::load(&args.model, args.adapter.as_deref()).map_err(|e| format!("error: {e}"))?;
    if let Some(t) = args.threads {
        g.model.set_threads(t);
    }
    let load_secs = t0.elapsed().as_secs_f64();
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling { temperature: args.temperature, top_p: args.top_p, seed: args.seed },
    };
    let prompt =
        if args.raw { args.prompt.clone() } else { g.chat_prompt(&args.prompt).map_err(|e| format!("error: {e}"))? };
    let mut out = std::io::stdout();
    let result = g
        .generate(&prompt, &opts, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })
        .map_err(|e| format!("error: {e}"))?;
    println!();
    let adapter = args.adapter.as_ref().map(|a| format!(" + adapter {}", a.display())).unwrap_or_default();
    eprintln!(
        "[{}{adapter}: loaded in {load_secs:.2} s; prompt {} tokens at {:.1} tokens/s; generated {} tokens at {:.1} \
         tokens/s{}]",
        args.model.display(),
        result.prompt_tokens,
        result.prefill_tokens_per_sec(),
        result.tokens.len(),
        result.decode_tokens_per_sec(),
        if result.stopped_at_eos { ", stopped at EOS" } else { "" }
    );
    Ok(())
}

pub fn merge(args: &MergeArgs) -> Result<(), String> {
    let t0 = Instant::now();
    let r = runtime::weights::merge(&args.model, &args.adapter, &args.out).map_err(|e| format!("error: {e}"))?;
    println!(
        "merged {} ({} adapted modules) into {} tensors in {:.2} s",
        args.adapter.display(),
        r.merged_modules,
        r.tensors,
        t0.elapsed().as_secs_f64()
    );
    for f in &r.files {
        println!("  wrote {} ({})", f.display(), size(f));
    }
    Ok(())
}
