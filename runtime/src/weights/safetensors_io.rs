//! safetensors files: a memory-mapped reader that hands out tensors as f32 (from F32, F16 or BF16), and a writer
//! of F32 tensors (atomic: a temporary file renamed into place).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ir::untrusted::show;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo, View};

use super::{Tensor, WeightsError};

/// The largest safetensors header (the JSON after the 8-byte length) tunec reads: 100 MB, the safetensors crate's
/// own limit.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Checks the layout of a safetensors file before the safetensors crate reads it, so that every problem is reported
/// on the tensor that has it, and a truncated file is called truncated: the header length, the header's JSON, each
/// tensor's dtype, shape and `data_offsets` (checked arithmetic: elements × dtype size must equal the span), the
/// tensors' data back to back without gap or overlap, and the data ending exactly at the end of the file.
fn check_layout(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    let err = |m: String| WeightsError::format(path, m);
    let file_len = bytes.len() as u64;
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(err(format!(
            "truncated: the file has {file_len} bytes, fewer than the 8-byte header length a safetensors file \
             starts with; the file is incomplete (interrupted download?)"
        )));
    };
    let n = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default());
    if n > MAX_HEADER_BYTES {
        return Err(err(format!(
            "the header length (first 8 bytes) is {n}, more than the {MAX_HEADER_BYTES} bytes tunec reads \
             (safetensors_io::MAX_HEADER_BYTES): not a safetensors file, or a corrupt one"
        )));
    }
    let Some(header) = bytes.get(8..8 + n as usize) else {
        return Err(err(format!(
            "truncated: the header length (first 8 bytes) declares a {n}-byte header, the file has {} bytes after \
             it; the file is incomplete (interrupted download?)",
            file_len - 8
        )));
    };
    let text = std::str::from_utf8(header).map_err(|e| {
        err(format!("the header is not UTF-8 (invalid byte at byte {} of the file)", 8 + e.valid_up_to()))
    })?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| err(format!("the header is not a JSON object: {e}")))?;
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(json.len());
    for (name, info) in &json {
        if name == "__metadata__" {
            continue;
        }
        let tensor = || format!("tensor `{}`", show(name));
        let (dtype, shape, offsets) = match info {
            serde_json::Value::Object(o) => (o.get("dtype"), o.get("shape"), o.get("data_offsets")),
            _ => return Err(err(format!("{}: expected an object with dtype, shape and data_offsets", tensor()))),
        };
        let dtype_name = dtype.and_then(|d| d.as_str()).unwrap_or("");
        let Ok(dtype) = serde_json::from_value::<Dtype>(serde_json::Value::String(dtype_name.to_string())) else {
            return Err(err(format!("{}: unknown or missing dtype \"{}\"", tensor(), show(dtype_name))));
        };
        let Some(shape) =
            shape.and_then(|s| s.as_array()).and_then(|s| s.iter().map(|d| d.as_u64()).collect::<Option<Vec<u64>>>())
        else {
            return Err(err(format!("{}: `shape` is missing or not a list of non-negative integers", tensor())));
        };
        let Some([start, end]) = offsets
            .and_then(|o| o.as_array())
            .and_then(|o| o.iter().map(|d| d.as_u64()).collect::<Option<Vec<u64>>>())
            .and_then(|o| <[u64; 2]>::try_from(o).ok())
        else {
            return Err(err(format!("{}: `data_offsets` is missing or not two non-negative integers", tensor())));
        };
        let bits = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bitsize() as u64))
            .filter(|b| b % 8 == 0);
        let Some(need) = bits.map(|b| b / 8) else {
            return Err(err(format!(
                "{}: shape {shape:?} of {dtype:?} is not a whole number of bytes that fits in memory",
                tensor()
            )));
        };
        if end < start || end - start != need {
            return Err(err(format!(
                "{}: shape {shape:?} of {dtype:?} needs {need} bytes, but its data_offsets [{start}, {end}] span {}",
                tensor(),
                end as i128 - start as i128
            )));
        }
        spans.push((start, end, name));
    }
    spans.sort();
    let mut pos = 0u64;
    let mut prev: Option<&str> = None;
    for &(start, end, name) in &spans {
        if start != pos {
            let before = prev.map_or("the start of the data".to_string(), |p| format!("tensor `{}`", show(p)));
            let how = if start < pos { "overlaps" } else { "leaves a gap after" };
            return Err(err(format!(
                "tensor `{}`: its data_offsets [{start}, {end}] {how} {before} (which ends at {pos})",
                show(name)
            )));
        }
        pos = end;
        prev = Some(name);
    }
    let data_len = file_len - 8 - n;
    if pos > data_len {
        return Err(err(format!(
            "truncated: the header declares {pos} bytes of tensor data, the file has {data_len}; the file is \
             incomplete (interrupted download?)"
        )));
    }
    if pos < data_len {
        return Err(err(format!(
            "{} bytes after the tensor data: the header declares {pos} bytes of tensor data, the file has \
             {data_len}",
            data_len - pos
        )));
    }
    Ok(())
}

/// An opened safetensors file (memory-mapped; tensors are converted to f32 when read).
pub struct SafeTensorsFile {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    infos: HashMap<String, TensorInfo>,
    names: Vec<String>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafeTensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensorsFile").field("path", &self.path).field("tensors", &self.names.len()).finish()
    }
}

impl SafeTensorsFile {
    /// Maps and checks `path` (a regular file; see [`check_layout`] for what is checked).
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let (file, _) = super::open_regular(path)?;
        // SAFETY: read-only map of a weights file that is not modified while open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| WeightsError::io(path, e))?;
        check_layout(path, &map)?;
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
            WeightsError::format(path, format!("not a valid safetensors file: {}", show(&e.to_string())))
        })?;
        // Validate offsets against the buffer once (deserialize checks every tensor's extent).
        SafeTensors::deserialize(&map).map_err(|e| {
            WeightsError::format(path, format!("not a valid safetensors file: {}", show(&e.to_string())))
        })?;
        let infos: HashMap<String, TensorInfo> = meta.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
        let mut names: Vec<String> = infos.keys().cloned().collect();
        names.sort();
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafeTensorsFile { path: path.to_path_buf(), map, data_start: 8 + header_len, infos, names, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.infos.contains_key(name)
    }

    /// The `__metadata__` map of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.infos.get(name).map(|i| i.shape.as_slice())
    }

    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.infos.get(name).map(|i| i.dtype)
    }

    /// A tensor as f32 (converted from F16 / BF16); other dtypes are refused with a message naming the tensor.
    pub fn tensor(&self, name: &str) -> Result<Tensor, WeightsError> {
        let info = self
            .infos
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor { path: self.path.clone(), name: name.to_string() })?;
        let (start, end) = info.data_offsets;
        let bytes = self
            .data_start
            .checked_add(start)
            .zip(self.data_start.checked_add(end))
            .and_then(|(s, e)| self.map.get(s..e))
            .ok_or_else(|| {
                WeightsError::format(
                    &self.path,
                    format!("tensor `{}`: data_offsets past the end of the file", show(name)),
                )
            })?;
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(WeightsError::unsupported(
                    &self.path,
                    format!("tensor `{}` is {other:?}; tunec reads F32, F16 and BF16 tensors", show(name)),
                ))
            }
        };
        Ok(Tensor::new(info.shape.clone(), data))
    }
}

/// Whether [`SafeTensorsFile::tensor`] reads this dtype (F32, F16, BF16).
pub fn is_float_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// A tensor to write: an f32 view, or a closure that produces the data when the writer reaches it (so a large
/// model can be written without holding every converted tensor in memory at once).
pub struct F32View<'a> {
    shape: Vec<usize>,
    source: F32Source<'a>,
}

enum F32Source<'a> {
    Slice(&'a [f32]),
    Lazy(Box<dyn Fn() -> Vec<f32> + 'a>),
}

impl<'a> F32View<'a> {
    pub fn slice(shape: Vec<usize>, data: &'a [f32]) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?} does not match {} values", data.len());
        F32View { shape, source: F32Source::Slice(data) }
    }

    /// `produce` must return `shape.product()` values.
    pub fn lazy(shape: Vec<usize>, produce: impl Fn() -> Vec<f32> + 'a) -> Self {
        F32View { shape, source: F32Source::Lazy(Box::new(produce)) }
    }
}

fn le_bytes(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

impl View for &F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match &self.source {
            F32Source::Slice(d) => Cow::Owned(le_bytes(d)),
            F32Source::Lazy(f) => {
                let d = f();
                assert_eq!(d.len(), self.data_len() / 4, "a lazy tensor produced the wrong number of values");
                Cow::Owned(le_bytes(&d))
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Writes F32 tensors to `path` (atomically), with `metadata` as the header's `__metadata__` (HF expects
/// `{"format": "pt"}`).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, F32View<'_>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), WeightsError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| WeightsError::io(path, e))?;
    let views = tensors.iter().map(|(n, v)| (n.as_str(), v));
    safetensors::tensor::serialize_to_file(views, metadata, tmp.path())
        .map_err(|e| WeightsError::format(path, format!("cannot write safetensors: {e}")))?;
    tmp.persist(path).map_err(|e| WeightsError::io(path, e.error))?;
    Ok(())
}

/// [`write_safetensors`] for owned tensors, with `{"format": "pt"}` metadata.
pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), WeightsError> {
    let views: Vec<(String, F32View<'_>)> =
        tensors.iter().map(|(n, t)| (n.clone(), F32View::slice(t.shape.clone(), &t.data))).collect();
    write_safetensors(path, &views, Some(pt_metadata()))
}

/// The `__metadata__` transformers expects of a PyTorch checkpoint.
pub fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}
