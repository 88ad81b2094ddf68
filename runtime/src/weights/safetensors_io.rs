//! safetensors files: a memory-mapped reader that hands out tensors as f32 (from F32, F16 or BF16), and a writer
//! of F32 tensors (atomic: a temporary file renamed into place).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo, View};

use super::{Tensor, WeightsError};

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
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let file = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
        // SAFETY: read-only map of a weights file that is not modified while open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| WeightsError::io(path, e))?;
        let (header_len, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| WeightsError::format(path, format!("not a valid safetensors file: {e}")))?;
        // Validate offsets against the buffer once (deserialize checks every tensor's extent).
        SafeTensors::deserialize(&map)
            .map_err(|e| WeightsError::format(path, format!("not a valid safetensors file: {e}")))?;
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
        let bytes = &self.map[self.data_start + start..self.data_start + end];
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(WeightsError::unsupported(
                    &self.path,
                    format!("tensor `{name}` is {other:?}; tunec reads F32, F16 and BF16 tensors"),
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
