//! Host memory for the cpu backend: zeroed, 64-byte aligned allocations, and the storage parts of NF4 weights as
//! the generated kernels take them.

use ir::nf4::{Nf4Scales, Nf4Tensor};
use ir::Nf4Format;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every allocation (a cache line; AVX-512 vectors).
pub const ALIGN: usize = 64;

/// A zero-initialized byte allocation aligned to [`ALIGN`], which never moves: kernels get raw pointers into it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an `AlignedBuf` owns its allocation like a `Box<[u8]>`; shared access hands out `&[u8]`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes (the allocation is rounded up to a multiple of [`ALIGN`]). A size that cannot be laid out
    /// (the rounding overflows, or it exceeds `isize::MAX`) or that the allocator refuses is an error, never an abort
    /// or a smaller allocation.
    pub fn zeroed(len: usize) -> Result<AlignedBuf, AllocError> {
        if len == 0 {
            // A dangling but aligned pointer: never dereferenced (no bytes), never freed.
            return Ok(AlignedBuf { ptr: NonNull::new(ALIGN as *mut u8).expect("non-null"), len });
        }
        let layout = Self::layout(len).ok_or(AllocError { bytes: len, refused: false })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(AllocError { bytes: len, refused: true })?;
        Ok(AlignedBuf { ptr, len })
    }

    /// The layout of an allocation of `len` bytes: rounded up to [`ALIGN`] with checked arithmetic.
    fn layout(len: usize) -> Option<Layout> {
        let size = len.div_ceil(ALIGN).checked_mul(ALIGN)?;
        Layout::from_size_align(size, ALIGN).ok()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the allocation, for kernel arguments.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` initialized (zeroed) bytes at `ptr`, or an empty slice at an aligned dangling pointer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // The layout `zeroed` allocated with (it was valid then, so it is now).
            if let Some(layout) = Self::layout(self.len) {
                // SAFETY: allocated in `zeroed` with this layout.
                unsafe { dealloc(self.ptr.as_ptr(), layout) }
            }
        }
    }
}

/// An allocation [`AlignedBuf::zeroed`] could not make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocError {
    /// The bytes asked for.
    pub bytes: usize,
    /// `true`: the allocator returned no memory; `false`: the size cannot be allocated at all on this machine.
    pub refused: bool,
}

impl std::fmt::Display for AllocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.refused {
            write!(f, "the system could not allocate {} bytes of host memory", self.bytes)
        } else {
            write!(f, "{} bytes cannot be allocated on this machine (larger than its address space allows)", self.bytes)
        }
    }
}

impl std::error::Error for AllocError {}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes at {:p})", self.len, self.ptr)
    }
}

/// The storage parts of an NF4 tensor as the generated kernels take them, in kernel-argument `part` order (the
/// layout of `kernels::gemm::nf4_buffers`): with double quantization `[packed u8, absmax codes u8, absmax2 f32,
/// offset f32 (one value)]`, without `[packed u8, absmax f32]`; f32 values little-endian.
pub fn nf4_parts(q: &Nf4Tensor) -> Vec<Vec<u8>> {
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    match &q.scales {
        Nf4Scales::Plain { absmax } => vec![q.packed.clone(), f32s(absmax)],
        Nf4Scales::Double { codes, absmax2, offset, .. } => {
            vec![q.packed.clone(), codes.clone(), f32s(absmax2), f32s(&[*offset])]
        }
    }
}

/// The byte size of each part [`nf4_parts`] gives for a tensor of `numel` elements in format `f`; they add up to
/// `DType::Nf4(f).storage_bytes(numel)`.
pub fn nf4_part_bytes(f: Nf4Format, numel: usize) -> Vec<usize> {
    let blocks = numel.div_ceil(f.block as usize);
    match f.double_quant {
        None => vec![numel.div_ceil(2), 4 * blocks],
        Some(b2) => vec![numel.div_ceil(2), blocks, 4 * blocks.div_ceil(b2 as usize), 4],
    }
}

/// Whether `q` is stored in format `f` with `shape`: the same shape, block size and kind of scales (and second-level
/// block size); `Err` says what differs.
pub fn check_nf4_format(q: &Nf4Tensor, f: Nf4Format, shape: &[usize]) -> Result<(), String> {
    if q.shape != shape {
        return Err(format!("shape {:?}, but the parameter is {shape:?}", q.shape));
    }
    if q.block != f.block as usize {
        return Err(format!("blocks of {}, but the parameter's format has blocks of {}", q.block, f.block));
    }
    match (&q.scales, f.double_quant) {
        (Nf4Scales::Plain { .. }, None) => {}
        (Nf4Scales::Double { block2, .. }, Some(b2)) if *block2 == b2 as usize => {}
        (Nf4Scales::Double { block2, .. }, Some(b2)) => {
            return Err(format!("double quantization in blocks of {block2}, but the format's are {b2}"))
        }
        (Nf4Scales::Plain { .. }, Some(b2)) => {
            return Err(format!("plain f32 absmax, but the format double-quantizes in blocks of {b2}"))
        }
        (Nf4Scales::Double { .. }, None) => {
            return Err("double-quantized scales, but the format keeps plain f32 absmax".to_string())
        }
    }
    let want = nf4_part_bytes(f, q.numel());
    let got: Vec<usize> = nf4_parts(q).iter().map(Vec::len).collect();
    if got != want {
        return Err(format!("storage parts of {got:?} bytes, expected {want:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defect 2: `len.div_ceil(64) * 64` used to wrap for sizes near 2^64 (to 0 in release builds: a zero-size
    /// allocation the kernels then wrote past). Now such a size is an error, and so is one the system refuses.
    #[test]
    fn sizes_that_cannot_be_allocated_are_errors() {
        let err = AlignedBuf::zeroed(usize::MAX - 10).unwrap_err();
        assert_eq!(err, AllocError { bytes: usize::MAX - 10, refused: false });
        assert!(err.to_string().contains("cannot be allocated on this machine"), "{err}");
        let err = AlignedBuf::zeroed(isize::MAX as usize).unwrap_err();
        assert!(!err.refused, "larger than a layout allows");
        // Allowed by the layout, more than any address space: the allocator returns null, which is an error.
        let err = AlignedBuf::zeroed(1 << 62).unwrap_err();
        assert_eq!(err, AllocError { bytes: 1 << 62, refused: true });
        assert!(err.to_string().contains("could not allocate 4611686018427387904 bytes"), "{err}");
        let buf = AlignedBuf::zeroed(65).unwrap();
        assert_eq!((buf.len(), buf.as_mut_ptr() as usize % ALIGN), (65, 0));
        assert!(buf.bytes().iter().all(|&b| b == 0));
        assert!(AlignedBuf::zeroed(0).unwrap().is_empty());
    }
}
