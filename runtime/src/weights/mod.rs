//! Model weights in and out: the GGUF reader (llama.cpp's format, with its quantized block types dequantized to
//! f32), safetensors (mmap reader, writer), HF `config.json`, a `tokenizer.json` rebuilt from GGUF metadata, the
//! import of a GGUF file into an HF Llama directory, [`ModelDir`] (the normal way to load a model) and PEFT LoRA/DoRA
//! adapters with their merge into the base weights.
//!
//! | module | holds |
//! |---|---|
//! | [`gguf`] | GGUF v2/v3 reader: header, metadata of every type, tensor infos, alignment, tensor data |
//! | [`dequant`] | ggml block types (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) to f32 |
//! | [`names`] | GGUF tensor names to HF names; undoing llama.cpp's q/k row permutation |
//! | [`safetensors_io`] | safetensors reader (mmap; F32, F16, BF16 to f32) and writer (F32) |
//! | [`config`] | HF `LlamaConfig` (`config.json`) |
//! | [`tokenizer`] | `tokenizer.json` / `tokenizer_config.json` from GGUF tokenizer metadata |
//! | [`import`] | GGUF file to an HF Llama directory |
//! | [`model_dir`] | [`ModelDir`]: config + safetensors (+ tokenizer) of an HF Llama directory |
//! | [`adapter`] | PEFT LoRA / DoRA adapters: loading, applying to a weight, merging a model directory |

pub mod adapter;
pub mod config;
pub mod dequant;
pub mod gguf;
pub mod import;
pub mod model_dir;
pub mod names;
pub mod safetensors_io;
pub mod tokenizer;

use std::path::{Path, PathBuf};

pub use adapter::{merge, LoraAdapter, LoraModule};
pub use config::LlamaConfig;
pub use gguf::{GgufFile, GgufValue};
pub use import::{import_gguf, ImportReport};
pub use model_dir::ModelDir;
pub use safetensors_io::{write_safetensors, SafeTensorsFile};

/// A dense f32 tensor in row-major order (HF layout: a linear weight is `[out, in]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// What can go wrong reading or writing weights, configs, tokenizers and adapters. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file's content is not what its format says it should be.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error(
        "{}: tensor `{tensor}` has GGUF type {ty}, which tunec cannot dequantize (supported: {})",
        path.display(),
        dequant::SUPPORTED
    )]
    UnsupportedType { path: PathBuf, tensor: String, ty: String },
    /// A tensor whose shape is not the one the config implies.
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}", path.display())]
    Shape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    /// Something the model, tokenizer or adapter asks for that tunec does not support.
    #[error("{}: {message}", path.display())]
    Unsupported { path: PathBuf, message: String },
}

impl WeightsError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        WeightsError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn format(path: &Path, message: impl Into<String>) -> Self {
        WeightsError::Format { path: path.to_path_buf(), message: message.into() }
    }

    pub(crate) fn unsupported(path: &Path, message: impl Into<String>) -> Self {
        WeightsError::Unsupported { path: path.to_path_buf(), message: message.into() }
    }
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, then a rename).
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| WeightsError::io(path, e))?;
    tmp.write_all(bytes).map_err(|e| WeightsError::io(path, e))?;
    tmp.persist(path).map_err(|e| WeightsError::io(path, e.error))?;
    Ok(())
}

/// Reads a JSON file into a value, naming the file in errors.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, WeightsError> {
    let text = std::fs::read_to_string(path).map_err(|e| WeightsError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| WeightsError::format(path, format!("invalid JSON: {e}")))
}

/// Writes a JSON value pretty-printed (atomically).
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), WeightsError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| WeightsError::format(path, e.to_string()))?;
    text.push('\n');
    write_file_atomic(path, text.as_bytes())
}
