//! GGUF (llama.cpp's model file), versions 2 and 3, little-endian: the header (`GGUF`, version, tensor count,
//! metadata count), metadata key/values of every type (arrays included), tensor infos (name, dims innermost-first,
//! ggml type, offset) and the tensor data, which starts at the next multiple of `general.alignment` (default 32)
//! after the infos. The file is memory-mapped; tensors are dequantized to f32 on request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ir::untrusted::show;
use memmap2::Mmap;

use super::dequant::{self, GgmlType};
use super::WeightsError;

/// GGUF's magic number, "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (ggml has 4; a larger count is a corrupt file).
pub const MAX_DIMS: u32 = 8;
/// Deepest nesting of metadata arrays (arrays of arrays of …) read; deeper is refused (it would only serve to
/// exhaust the stack).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Most metadata values (array elements counted one by one) a file may hold: 2^22 (4M). A 256k-token vocabulary
/// with its merges, token types and scores is about 1M; the cap bounds the memory the metadata takes (each value
/// takes ~32 bytes in memory for as little as one byte in the file: at most ~128 MiB).
pub const MAX_METADATA_VALUES: u64 = 1 << 22;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, from a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// GGUF's type number of this value (`gguf_type`).
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// A short description for messages: the value itself, or `array of N` for arrays.
    pub fn describe(&self) -> String {
        match self {
            GgufValue::Array(a) => format!("array of {}", a.len()),
            GgufValue::String(s) => format!("\"{}\"", show(s)),
            other => format!("{other:?}"),
        }
    }
}

/// One tensor's entry in the GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: innermost (contiguous) dimension first; an HF `[out, in]` weight is `[in, out]` here.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset from the start of the tensor data.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The element count (checked not to overflow when the file was opened).
    pub fn numel(&self) -> usize {
        checked_numel(&self.dims).unwrap_or(usize::MAX)
    }

    /// The shape in row-major (HF / PyTorch) order: the GGUF dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    index: BTreeMap<String, usize>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute byte offset of the tensor data.
    pub data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The product of `dims` as a `usize`, `None` on overflow.
fn checked_numel(dims: &[u64]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

impl GgufFile {
    /// Memory-maps and parses `path` (a regular file: a FIFO or device is refused).
    pub fn open(path: &Path) -> Result<Self, WeightsError> {
        let (file, _) = super::open_regular(path)?;
        // SAFETY: the map is read-only; the file is not expected to change while it is open (as for any model file).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| WeightsError::io(path, e))?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: Mmap) -> Result<Self, WeightsError> {
        let mut r = Reader { bytes: &map, pos: 0, path, values: 0 };
        let magic = r.take(4)?;
        if magic != GGUF_MAGIC {
            return Err(WeightsError::format(path, format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
        }
        let version = r.u32()?;
        if version == 1 {
            return Err(WeightsError::unsupported(
                path,
                "GGUF version 1 (32-bit lengths) is not supported; re-convert the model with a current llama.cpp",
            ));
        }
        if version != 2 && version != 3 {
            let hint =
                if version.swap_bytes() <= 3 { " (a big-endian GGUF file, which tunec does not read)" } else { "" };
            return Err(WeightsError::unsupported(
                path,
                format!("GGUF version {version}{hint}; tunec reads versions 2 and 3"),
            ));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Each metadata entry takes at least 13 bytes (key length, type, a one-byte value), each tensor info 24
        // (name length, n_dims, type, offset): larger counts cannot fit in the file.
        r.check_count(n_kv, 13, "metadata entries (header field n_kv at byte 16)")?;
        r.check_count(n_tensors, 24, "tensors (header field n_tensors at byte 8)")?;
        let mut metadata = Vec::new();
        let mut index = BTreeMap::new();
        for i in 0..n_kv {
            let at = r.pos;
            let key = r.string().map_err(|e| context(e, path, &format!("metadata entry {i} (at byte {at})")))?;
            let ty = r.u32().map_err(|e| context(e, path, &format!("metadata `{}`", show(&key))))?;
            let value = r.value(ty, 0).map_err(|e| context(e, path, &format!("metadata `{}`", show(&key))))?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(WeightsError::format(
                    path,
                    format!("metadata key `{}` appears twice (again as entry {i}, at byte {at})", show(&key)),
                ));
            }
            metadata.push((key, value));
        }
        let mut tensors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let at = r.pos;
            let name = r.string().map_err(|e| context(e, path, &format!("tensor info {i} (at byte {at})")))?;
            let what = || format!("tensor info {i} `{}`", show(&name));
            let n_dims = r.u32().map_err(|e| context(e, path, &what()))?;
            if n_dims > MAX_DIMS {
                return Err(WeightsError::format(
                    path,
                    format!("{}: {n_dims} dimensions (at most {MAX_DIMS}): a corrupt file", what()),
                ));
            }
            let dims =
                (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>, _>>().map_err(|e| context(e, path, &what()))?;
            if checked_numel(&dims).is_none() {
                return Err(WeightsError::format(
                    path,
                    format!("{}: dims {dims:?} multiply to more elements than fit in memory: a corrupt file", what()),
                ));
            }
            let ty = GgmlType(r.u32().map_err(|e| context(e, path, &what()))?);
            let offset = r.u64().map_err(|e| context(e, path, &what()))?;
            if !names.insert(name.clone()) {
                return Err(WeightsError::format(path, format!("{}: a second tensor of that name", what())));
            }
            tensors.push(GgufTensorInfo { name, dims, ty, offset });
        }
        let alignment = match index.get("general.alignment") {
            Some(&i) => metadata[i]
                .1
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| WeightsError::format(path, "general.alignment is not a power of two"))?,
            None => DEFAULT_ALIGNMENT,
        };
        let data_offset = (r.pos as u64).checked_next_multiple_of(alignment).ok_or_else(|| {
            WeightsError::format(path, format!("general.alignment {alignment} puts the tensor data past any file"))
        })?;
        let file =
            GgufFile { path: path.to_path_buf(), map, version, metadata, index, tensors, alignment, data_offset };
        for t in &file.tensors {
            file.check_tensor(t)?;
        }
        Ok(file)
    }

    /// Checks a tensor's offset is aligned and its data (when its type's layout is known) lies inside the file.
    fn check_tensor(&self, t: &GgufTensorInfo) -> Result<(), WeightsError> {
        if t.offset % self.alignment != 0 {
            return Err(WeightsError::format(
                &self.path,
                format!(
                    "tensor `{}` starts at offset {}, not a multiple of the alignment {}",
                    show(&t.name),
                    t.offset,
                    self.alignment
                ),
            ));
        }
        if let Some((block, _)) = t.ty.block_layout() {
            let inner = t.dims.first().copied().unwrap_or(1);
            if inner % block as u64 != 0 {
                return Err(WeightsError::format(
                    &self.path,
                    format!(
                        "tensor `{}` ({}, dims {:?}): rows of {inner} elements are not whole blocks of {block}",
                        show(&t.name),
                        t.ty,
                        t.dims
                    ),
                ));
            }
            let Some(bytes) = t.ty.bytes_for(t.numel()) else {
                return Err(WeightsError::format(
                    &self.path,
                    format!(
                        "tensor `{}` ({}, dims {:?}): {} elements take more bytes than fit in memory",
                        show(&t.name),
                        t.ty,
                        t.dims,
                        t.numel()
                    ),
                ));
            };
            let end = self.data_offset.checked_add(t.offset).and_then(|e| e.checked_add(bytes as u64));
            if end.is_none_or(|end| end > self.map.len() as u64) {
                let end = end.map_or("past 2^64".to_string(), |e| e.to_string());
                return Err(WeightsError::format(
                    &self.path,
                    format!(
                        "tensor `{}` ({}, dims {:?}, {bytes} bytes at data offset {}) ends at byte {end}, past the \
                         end of the file ({} bytes): truncated file?",
                        show(&t.name),
                        t.ty,
                        t.dims,
                        t.offset,
                        self.map.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required metadata value.
    pub fn require(&self, key: &str) -> Result<&GgufValue, WeightsError> {
        self.get(key).ok_or_else(|| WeightsError::format(&self.path, format!("missing metadata `{}`", show(key))))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, WeightsError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| {
            WeightsError::format(
                &self.path,
                format!("metadata `{}` is {}, not an unsigned integer", show(key), v.describe()),
            )
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, WeightsError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| {
            WeightsError::format(&self.path, format!("metadata `{}` is {}, not a number", show(key), v.describe()))
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str, WeightsError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| {
            WeightsError::format(&self.path, format!("metadata `{}` is {}, not a string", show(key), v.describe()))
        })
    }

    /// A required array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, WeightsError> {
        let v = self.require(key)?;
        let bad = || {
            WeightsError::format(
                &self.path,
                format!("metadata `{}` is {}, not an array of strings", show(key), v.describe()),
            )
        };
        v.as_array().ok_or_else(bad)?.iter().map(|x| x.as_str().ok_or_else(bad)).collect()
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (its type's layout must be known).
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> Result<&[u8], WeightsError> {
        let len = t.ty.bytes_for(t.numel()).ok_or_else(|| self.unsupported(t))?;
        let start = self.data_offset.checked_add(t.offset).and_then(|s| usize::try_from(s).ok());
        start.and_then(|s| self.map.get(s..s.checked_add(len)?)).ok_or_else(|| {
            WeightsError::format(
                &self.path,
                format!(
                    "tensor `{}`: its {len} bytes at data offset {} lie past the end of the file",
                    show(&t.name),
                    t.offset
                ),
            )
        })
    }

    /// A tensor dequantized to f32, in GGUF's element order (row-major over the reversed dims, see
    /// [`GgufTensorInfo::shape`]).
    pub fn dequantize(&self, t: &GgufTensorInfo) -> Result<Vec<f32>, WeightsError> {
        if !t.ty.can_dequantize() {
            return Err(self.unsupported(t));
        }
        let bytes = self.tensor_bytes(t)?;
        let mut out = vec![0f32; t.numel()];
        dequant::dequantize(t.ty, bytes, &mut out)
            .map_err(|m| WeightsError::format(&self.path, format!("tensor `{}`: {m}", show(&t.name))))?;
        Ok(out)
    }

    fn unsupported(&self, t: &GgufTensorInfo) -> WeightsError {
        WeightsError::UnsupportedType { path: self.path.clone(), tensor: t.name.clone(), ty: t.ty.name() }
    }
}

fn context(e: WeightsError, path: &Path, what: &str) -> WeightsError {
    match e {
        WeightsError::Format { message, .. } => WeightsError::format(path, format!("{what}: {message}")),
        other => other,
    }
}

/// A bounds-checked little-endian cursor over the file.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata values read so far (array elements included), against [`MAX_METADATA_VALUES`].
    values: u64,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WeightsError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            WeightsError::format(
                self.path,
                format!("unexpected end of file at byte {} (reading {n} bytes): truncated file?", self.pos),
            )
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WeightsError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    /// Refuses `n` items of at least `min_bytes` each when they cannot fit in the rest of the file.
    fn check_count(&self, n: u64, min_bytes: u64, what: &str) -> Result<(), WeightsError> {
        if n.checked_mul(min_bytes).is_none_or(|need| need > self.remaining()) {
            return Err(WeightsError::format(
                self.path,
                format!(
                    "{n} {what}, of at least {min_bytes} bytes each, cannot fit in the {} bytes left after byte {}: a \
                     corrupt or truncated file",
                    self.remaining(),
                    self.pos
                ),
            ));
        }
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, WeightsError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WeightsError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, WeightsError> {
        let len = self.u64()?;
        let len = usize::try_from(len).ok().filter(|&l| l <= self.bytes.len()).ok_or_else(|| {
            WeightsError::format(
                self.path,
                format!("string length {len} at byte {} is larger than the file: a corrupt file", self.pos - 8),
            )
        })?;
        let bytes = self.take(len)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// The smallest encoding of a value of type `ty` in the file (a string: its 8-byte length; an array: its element
    /// type and count).
    fn min_size(ty: u32) -> u64 {
        match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => 1,
        }
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, WeightsError> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(WeightsError::format(
                self.path,
                format!(
                    "more than {MAX_METADATA_VALUES} metadata values (gguf::MAX_METADATA_VALUES) at byte {}: tunec \
                     refuses files with this much metadata",
                    self.pos
                ),
            ));
        }
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(WeightsError::format(self.path, format!("bool value {b}"))),
            },
            8 => GgufValue::String(self.string()?),
            9 => {
                // Nested arrays (elem 9) are legal GGUF: each inner array carries its own element type.
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(WeightsError::format(
                        self.path,
                        format!(
                            "arrays nested more than {MAX_ARRAY_DEPTH} deep (gguf::MAX_ARRAY_DEPTH) at byte {}",
                            self.pos
                        ),
                    ));
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least `min_size` bytes: a larger count means a corrupt file, and nothing
                // is allocated before that check.
                if !(0..=12).contains(&elem) {
                    return Err(WeightsError::format(
                        self.path,
                        format!("array at byte {} has unknown element type {elem}", self.pos - 12),
                    ));
                }
                self.check_count(n, Self::min_size(elem), "array elements")?;
                if n > MAX_METADATA_VALUES {
                    return Err(WeightsError::format(
                        self.path,
                        format!("array of {n} elements: more than the {MAX_METADATA_VALUES} tunec reads"),
                    ));
                }
                // Grown as elements are read: the count is only an upper bound until they are.
                let mut items = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(WeightsError::format(self.path, format!("unknown metadata value type {t}"))),
        })
    }
}

/// Writes a GGUF v3 file (used by tests and tools that need small synthetic files): `metadata` in order, then each
/// tensor `(name, ggml dims innermost-first, type, raw bytes)` aligned to `alignment`.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, GgufValue)],
    tensors: &[(String, Vec<u64>, GgmlType, Vec<u8>)],
    alignment: u64,
) -> Result<(), WeightsError> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend(x.to_le_bytes()),
            GgufValue::I16(x) => out.extend(x.to_le_bytes()),
            GgufValue::U32(x) => out.extend(x.to_le_bytes()),
            GgufValue::I32(x) => out.extend(x.to_le_bytes()),
            GgufValue::F32(x) => out.extend(x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(*x as u8),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array(items) => {
                out.extend(items.first().map_or(0u32, |i| i.type_id()).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|i| put_value(out, i));
            }
            GgufValue::U64(x) => out.extend(x.to_le_bytes()),
            GgufValue::I64(x) => out.extend(x.to_le_bytes()),
            GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
    let mut out = Vec::new();
    out.extend(GGUF_MAGIC);
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend(v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for (name, dims, ty, bytes) in tensors {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(ty.0.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + bytes.len() as u64).div_ceil(alignment) * alignment;
    }
    let data_start = (out.len() as u64).div_ceil(alignment) * alignment;
    out.resize(data_start as usize, 0);
    for ((_, _, _, bytes), off) in tensors.iter().zip(offsets) {
        out.resize((data_start + off) as usize, 0);
        out.extend(bytes);
    }
    super::write_file_atomic(path, &out)
}
