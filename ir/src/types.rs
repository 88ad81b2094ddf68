//! Types of IR values: a dtype and a static shape.

use std::fmt;

/// How an NF4 tensor stores its per-block scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nf4Format {
    /// Elements per absmax block (bitsandbytes: 64).
    pub block: u32,
    /// Blocks per second-level block when the absmax values are themselves quantized (bitsandbytes: 256); `None`
    /// keeps one f32 absmax per block.
    pub double_quant: Option<u32>,
}

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    /// 4-bit NormalFloat, two codes per byte, with block scales (QLoRA).
    Nf4(Nf4Format),
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    /// Bytes of storage for `n` elements, scales included.
    pub fn storage_bytes(self, n: usize) -> usize {
        match self {
            DType::F32 | DType::I32 => 4 * n,
            DType::BF16 | DType::F16 => 2 * n,
            DType::Nf4(f) => {
                let blocks = n.div_ceil(f.block as usize);
                let scales = match f.double_quant {
                    None => 4 * blocks,
                    Some(b2) => blocks + 4 * blocks.div_ceil(b2 as usize) + 4,
                };
                n.div_ceil(2) + scales
            }
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DType::F32 => f.write_str("f32"),
            DType::BF16 => f.write_str("bf16"),
            DType::F16 => f.write_str("f16"),
            DType::I32 => f.write_str("i32"),
            DType::Nf4(Nf4Format { block, double_quant: None }) => write!(f, "nf4<{block}>"),
            DType::Nf4(Nf4Format { block, double_quant: Some(b2) }) => write!(f, "nf4<{block},{b2}>"),
        }
    }
}

/// A static shape; `[]` is a scalar.
pub type Shape = Vec<usize>;

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The type of one IR value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Type {
    pub dtype: DType,
    pub shape: Shape,
}

impl Type {
    pub fn new(dtype: DType, shape: impl Into<Shape>) -> Type {
        Type { dtype, shape: shape.into() }
    }
    pub fn f32(shape: impl Into<Shape>) -> Type {
        Type::new(DType::F32, shape)
    }
    pub fn i32(shape: impl Into<Shape>) -> Type {
        Type::new(DType::I32, shape)
    }
    pub fn scalar(dtype: DType) -> Type {
        Type::new(dtype, Vec::new())
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn bytes(&self) -> usize {
        self.dtype.storage_bytes(self.numel())
    }
    /// Same shape, other dtype.
    pub fn with_dtype(&self, dtype: DType) -> Type {
        Type { dtype, shape: self.shape.clone() }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}
