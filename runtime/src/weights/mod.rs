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

use ir::untrusted::show;

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

/// What can go wrong reading or writing weights, configs, tokenizers and adapters. Every message names the file;
/// every string taken from a file (tensor names, keys, values) goes through [`ir::untrusted::show`] (escaped,
/// capped), here in the `Display` of the variants that hold one and at construction for `Format`/`Unsupported`.
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
    #[error("{}: missing tensor `{}`", path.display(), show(name))]
    MissingTensor { path: PathBuf, name: String },
    #[error(
        "{}: tensor `{}` has GGUF type {ty}, which tunec cannot dequantize (supported: {})",
        path.display(),
        show(tensor),
        dequant::SUPPORTED
    )]
    UnsupportedType { path: PathBuf, tensor: String, ty: String },
    /// A tensor whose shape is not the one the config implies.
    #[error("{}: tensor `{}` has shape {found:?}, expected {expected:?}", path.display(), show(name))]
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

/// The largest JSON file (`config.json`, `tokenizer.json`, `tokenizer_config.json`, `adapter_config.json`,
/// `model.safetensors.index.json`, …) or chat template tunec reads: 64 MiB. Real ones are a few MiB at most
/// (`tokenizer.json` of a 256k-token vocabulary is ~20 MiB).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Opens `path` for reading if it is a regular file (after following symlinks). A FIFO, a device such as
/// `/dev/zero`, a socket or a directory is refused before it is opened, so that a model path can neither block
/// `open` nor be read without end. Returns the file and its length.
pub(crate) fn open_regular(path: &Path) -> Result<(std::fs::File, u64), WeightsError> {
    let meta = std::fs::metadata(path).map_err(|e| WeightsError::io(path, e))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a directory" } else { "not a regular file (a device, FIFO or socket)" };
        return Err(WeightsError::format(path, format!("{kind}; expected a regular file")));
    }
    let file = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
    // The path may have been swapped between the two calls: check what was opened.
    let meta = file.metadata().map_err(|e| WeightsError::io(path, e))?;
    if !meta.is_file() {
        return Err(WeightsError::format(path, "not a regular file; expected a regular file"));
    }
    Ok((file, meta.len()))
}

/// Reads a regular file of at most `max` bytes (`what` names the limit's constant in the message).
pub(crate) fn read_capped(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, WeightsError> {
    use std::io::Read;
    let (file, len) = open_regular(path)?;
    if len > max {
        return Err(WeightsError::format(
            path,
            format!("the file is {len} bytes, larger than the {max} bytes tunec reads ({what})"),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` bounds the read even if the file grows after the size check.
    file.take(max + 1).read_to_end(&mut bytes).map_err(|e| WeightsError::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(WeightsError::format(path, format!("the file grew past the {max} bytes tunec reads ({what})")));
    }
    Ok(bytes)
}

/// Reads a UTF-8 text file of at most [`MAX_JSON_BYTES`].
pub(crate) fn read_text(path: &Path) -> Result<String, WeightsError> {
    let bytes = read_capped(path, MAX_JSON_BYTES, "weights::MAX_JSON_BYTES")?;
    String::from_utf8(bytes).map_err(|e| {
        WeightsError::format(path, format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()))
    })
}

/// Reads a JSON file (at most [`MAX_JSON_BYTES`], a regular file) into a value, naming the file in errors.
pub fn read_json(path: &Path) -> Result<serde_json::Value, WeightsError> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| WeightsError::format(path, format!("invalid JSON: {e}")))
}

/// Writes a JSON value pretty-printed (atomically).
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), WeightsError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| WeightsError::format(path, e.to_string()))?;
    text.push('\n');
    write_file_atomic(path, text.as_bytes())
}
