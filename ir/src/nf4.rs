//! NF4 (4-bit NormalFloat, QLoRA) storage, bit-exact with bitsandbytes 0.50.2 on the CPU.
//!
//! [`quantize`] reproduces `bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
//! compress_statistics=...)` and [`dequantize`] reproduces `dequantize_4bit` (float32 output), including every
//! float32 rounding step, so that codes, scales and dequantized values are identical bit for bit. The algorithm,
//! as bitsandbytes 0.50.2 runs it on the CPU (`backends/default/ops.py` for the 4-bit quantizer, the native
//! `libbitsandbytes_cpu.so` for the 8-bit double quantization and both dequantizers):
//!
//! * The weight is flattened row-major and cut into blocks of `block` (64) elements; the last block may be short.
//!   The input is **not** padded: the short block has its own absmax over its real elements.
//! * Full blocks: `absmax = max |w|` (stored as is, possibly 0); `scaled = clamp(w * (1 / max(absmax, 1e-38)),
//!   -1, 1)` — a multiplication by the float32 reciprocal.
//! * The short last block: `absmax = max(max |w|, 1e-38)` (the clamped value is what is stored) and
//!   `scaled = clamp(w / absmax, -1, 1)` — a true division.
//! * `code = #{ t in thresholds : t < scaled }` (`torch.bucketize`, right=False) with the 15 thresholds
//!   `(NF4[i] + NF4[i + 1]) / 2` computed in float32: a value exactly on a threshold takes the LOWER code.
//! * Packing: two codes a byte, the even element in the high nibble; an odd element count is padded with the
//!   code of 0.0 (7) in the last low nibble.
//! * Double quantization (`compress_statistics=True`): `offset = mean(absmax)` (torch's float32 cascade sum,
//!   then a division by the count), then `absmax - offset` is quantized blockwise (256) with the signed dynamic
//!   map ([`dynamic_map_signed`]) by bitsandbytes' native 8-bit CPU quantizer, which is a 65536-entry lookup
//!   table, not an exact nearest search (see `quantize_blockwise_dynamic`).
//! * Decode: `absmax[b] = map[codes[b]] * absmax2[b / 256] + offset` (two roundings), then
//!   `w[i] = NF4[code(i)] * absmax[i / block]`.
//!
//! Compared with the usual description (FACTS.md), the reference differs in these details: the short block
//! divides while full blocks multiply by a reciprocal; absmax is clamped to 1e-38 in the scaling (and stored
//! clamped for the short block); the 8-bit double-quant codes come from a lookup table, so they are not always
//! the nearest map value; and an all-zero 256-block of `absmax - offset` gets code 0 (the map's -0.99297),
//! decoding to `-0.0 + offset`.

use std::sync::OnceLock;

/// The 16 NF4 code values, index 0..15 (bitsandbytes `get_4bit_type("nf4")`), as float32.
pub const NF4_CODEBOOK: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The value bitsandbytes clamps absmax to before scaling: the Python float `1e-38` converted to float32
/// (a subnormal).
const ABSMAX_FLOOR: f32 = 1e-38_f64 as f32;

/// Vector width of torch's float32 sum kernel on x86-64 (AVX2; the AVX-512 build dispatches to the same AVX2
/// kernel) and on the generic build: 8 lanes.
const TORCH_SUM_LANES: usize = 8;

/// torch's `internal::GRAIN_SIZE`: reductions over fewer elements always run serially.
const TORCH_GRAIN_SIZE: usize = 32768;

/// Size of bitsandbytes' 8-bit quantization lookup table.
const LUT_SIZE: usize = 65536;

/// Per-block scales of an [`Nf4Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum Nf4Scales {
    /// One float32 absmax per block (`compress_statistics=False`). `absmax`: `[ceil(numel / block)]`.
    Plain {
        /// Per-block absmax, `[ceil(numel / block)]`.
        absmax: Vec<f32>,
    },
    /// Double quantization (`compress_statistics=True`): the absmax minus `offset`, 8-bit coded with the signed
    /// dynamic map in blocks of `block2` values, each with a float32 scale.
    Double {
        /// 8-bit codes into [`dynamic_map_signed`], `[ceil(numel / block)]`.
        codes: Vec<u8>,
        /// Scale per `block2` codes, `[ceil(codes.len() / block2)]`.
        absmax2: Vec<f32>,
        /// Mean of the original absmax values.
        offset: f32,
        /// Block size of the second quantization (bitsandbytes: 256).
        block2: usize,
    },
}

/// A tensor in NF4 storage, laid out exactly as bitsandbytes stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    /// Logical shape of the original tensor (row-major).
    pub shape: Vec<usize>,
    /// Number of consecutive elements sharing one absmax (bitsandbytes: 64).
    pub block: usize,
    /// Packed 4-bit codes, `[ceil(numel / 2)]`: element `2k` in the high nibble of byte `k`, `2k + 1` in the low.
    pub packed: Vec<u8>,
    /// Per-block scales.
    pub scales: Nf4Scales,
}

impl Nf4Tensor {
    /// Number of elements, the product of `shape`.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of blocks, `ceil(numel / block)`.
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.block)
    }

    /// Per-block scales, `[ceil(numel / block)]`, decoded as bitsandbytes does: for double quantization,
    /// `dynamic_map[codes[b]] * absmax2[b / block2]` rounded to float32, plus `offset` rounded again.
    pub fn absmax(&self) -> Vec<f32> {
        match &self.scales {
            Nf4Scales::Plain { absmax } => absmax.clone(),
            Nf4Scales::Double { codes, absmax2, offset, block2 } => {
                let map = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(b, &c)| {
                        let scaled = map[usize::from(c)] * absmax2[b / block2];
                        scaled + offset
                    })
                    .collect()
            }
        }
    }

    /// The 4-bit code (0..15, an index into [`NF4_CODEBOOK`]) of element `i` (row-major).
    ///
    /// # Panics
    /// If `i` is outside the packed storage.
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i & 1 == 0 {
            byte >> 4
        } else {
            byte & 0x0F
        }
    }

    /// Storage cost in bits per element: the packed codes (with the pad nibble of an odd count) plus the scales
    /// (float32 absmax, or 8-bit codes + float32 absmax2 + the float32 offset). About 4.5 for plain storage and
    /// 4.127 for double quantization with blocks of 64 and 256; 0 for an empty tensor.
    pub fn bits_per_param(&self) -> f64 {
        let numel = self.numel();
        if numel == 0 {
            return 0.0;
        }
        let scale_bits = match &self.scales {
            Nf4Scales::Plain { absmax } => 32 * absmax.len(),
            Nf4Scales::Double { codes, absmax2, .. } => 8 * codes.len() + 32 * absmax2.len() + 32,
        };
        (8 * self.packed.len() + scale_bits) as f64 / numel as f64
    }
}

/// bitsandbytes' `create_dynamic_map(signed=True)` (max_exponent_bits 7, 8 bits): 256 sorted float32 values in
/// [-0.99297, 1] with a single 0, bit-exact with torch's x86-64 (AVX2 / AVX-512) build.
///
/// Per exponent `i` in 0..7 it takes the midpoints of `torch.linspace(0.1, 1, 2^i + 1)` scaled by `±10^(i-6)`.
/// torch's CPU linspace computes `start + step * k` for the first half and `end - step * (steps - k - 1)` for the
/// second, which the x86-64 build contracts into fused multiply-adds; the generic (non-SIMD) torch build rounds
/// the product separately and gives a map that differs by one or two ulps in 42 entries.
pub fn dynamic_map_signed() -> [f32; 256] {
    // Python's `10 ** (i - 6)` for i in 0..7 (max_exponent_bits), a correctly rounded double, converted to
    // float32 by torch's multiplication.
    const POW10: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, &p) in POW10.iter().enumerate() {
        // signed: 2^i + 1 boundaries per exponent (non_sign_bits 7 - max_exponent_bits 7 = 0).
        let items = (1usize << i) + 1;
        let bounds = torch_linspace_f32(0.1_f64 as f32, 1.0, items);
        let scale = p as f32;
        for pair in bounds.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(f32::total_cmp);
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// torch.linspace(start, end, steps, dtype=float32) on the x86-64 CPU build (fused multiply-adds).
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|k| if k < halfway { step.mul_add(k as f32, start) } else { (-step).mul_add((steps - k - 1) as f32, end) })
        .collect()
}

fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(dynamic_map_signed)
}

/// bitsandbytes' `build_quantize_lut` for the dynamic map: entry `i` is the map index for the normalized value
/// `2i / 65535 - 1`, the first index whose midpoint `0.5 * (map[k] + map[k + 1])` is not below it.
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let map = dynamic_map();
        let mid: Vec<f32> = map.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect();
        let mut lut = vec![0u8; LUT_SIZE];
        let mut k = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let fi = i as f32;
            let val = (fi + fi) / (LUT_SIZE - 1) as f32 - 1.0;
            while k < mid.len() && val > mid[k] {
                k += 1;
            }
            *slot = k as u8;
        }
        lut
    })
}

/// The 15 NF4 decision thresholds, `(NF4[i] + NF4[i + 1]) / 2` in float32.
fn nf4_thresholds() -> [f32; 15] {
    let mut t = [0.0f32; 15];
    for (i, slot) in t.iter_mut().enumerate() {
        *slot = (NF4_CODEBOOK[i] + NF4_CODEBOOK[i + 1]) / 2.0;
    }
    t
}

/// `torch.bucketize(x, thresholds)` (right=False): the number of thresholds below `x`; a tie takes the lower
/// code, NaN gives 15.
fn nf4_code_of(thresholds: &[f32; 15], x: f32) -> u8 {
    thresholds.iter().filter(|&&t| x.is_nan() || t < x).count() as u8
}

/// `tensor.abs().max()` in torch: NaN propagates.
fn torch_absmax(xs: &[f32]) -> f32 {
    let mut m = 0.0f32;
    for &x in xs {
        let a = x.abs();
        if a.is_nan() {
            return a;
        }
        if a > m {
            m = a;
        }
    }
    m
}

/// `tensor.clamp(min=1e-38)` in torch: NaN propagates.
fn clamp_absmax(m: f32) -> f32 {
    if m.is_nan() || m >= ABSMAX_FLOOR {
        m
    } else {
        ABSMAX_FLOOR
    }
}

/// Quantizes a row-major float32 tensor to NF4 exactly as bitsandbytes 0.50.2 does on the CPU.
///
/// `w`: `[numel]` with `numel = shape.iter().product()`; `block`: elements per absmax (bitsandbytes: 64);
/// `double_quant_block`: `Some(256)` for `compress_statistics=True`, `None` for plain float32 absmax.
/// Equivalent to [`quantize_with_torch_threads`] with 1 thread.
///
/// # Panics
/// If `w.len()` differs from the shape's element count, or a block size is 0.
pub fn quantize(w: &[f32], shape: &[usize], block: usize, double_quant_block: Option<usize>) -> Nf4Tensor {
    quantize_with_torch_threads(w, shape, block, double_quant_block, 1)
}

/// [`quantize`], reproducing the double-quant `offset = mean(absmax)` of a torch run with `torch_threads` intra-op
/// threads. torch sums float32 serially below 32768 values (i.e. up to 2^21 weights with blocks of 64): there the
/// result does not depend on the thread count. Above, torch splits the sum into one chunk per thread, so the last
/// bits of `offset` (and hence the absmax codes) depend on `torch.get_num_threads()`.
///
/// # Panics
/// As [`quantize`].
pub fn quantize_with_torch_threads(
    w: &[f32],
    shape: &[usize],
    block: usize,
    double_quant_block: Option<usize>,
    torch_threads: usize,
) -> Nf4Tensor {
    let numel: usize = shape.iter().product();
    assert_eq!(w.len(), numel, "nf4::quantize: {} values for shape {:?}", w.len(), shape);
    assert!(block > 0, "nf4::quantize: block size must be positive");
    let mut absmax = vec![0f32; numel.div_ceil(block)];
    let mut packed = vec![0u8; numel.div_ceil(2)];
    quantize_blocks(w, block, &mut packed, &mut absmax);
    finish(shape, block, packed, absmax, double_quant_block, torch_threads)
}

/// [`quantize`] with the blocks split over `threads` threads (the same result bit for bit): for loading large
/// weights (a 7B model's 6.7 G values).
pub fn quantize_parallel(
    w: &[f32],
    shape: &[usize],
    block: usize,
    double_quant_block: Option<usize>,
    threads: usize,
) -> Nf4Tensor {
    let numel: usize = shape.iter().product();
    assert_eq!(w.len(), numel, "nf4::quantize: {} values for shape {:?}", w.len(), shape);
    assert!(block > 0, "nf4::quantize: block size must be positive");
    let mut absmax = vec![0f32; numel.div_ceil(block)];
    let mut packed = vec![0u8; numel.div_ceil(2)];
    // Chunks of whole blocks, an even number of values each, so that chunks own whole bytes of `packed`.
    let blocks_per = numel.div_ceil(block).div_ceil(threads.max(1)).max(1).next_multiple_of(2);
    let chunk = blocks_per * block;
    std::thread::scope(|scope| {
        for ((w, packed), absmax) in
            w.chunks(chunk).zip(packed.chunks_mut(chunk / 2)).zip(absmax.chunks_mut(blocks_per))
        {
            scope.spawn(move || quantize_blocks(w, block, packed, absmax));
        }
    });
    finish(shape, block, packed, absmax, double_quant_block, 1)
}

/// The 4-bit codes and the per-block absmax of `w` (which starts at a block boundary and an even index), into
/// `packed` (zeroed, `ceil(len / 2)` bytes) and `absmax` (one per block). An odd length pads the last byte's low
/// nibble with the code of 0.
fn quantize_blocks(w: &[f32], block: usize, packed: &mut [u8], absmax: &mut [f32]) {
    let thresholds = nf4_thresholds();
    let mut put = |i: usize, code: u8| {
        if i & 1 == 0 {
            packed[i / 2] |= code << 4;
        } else {
            packed[i / 2] |= code;
        }
    };
    for (b, chunk) in w.chunks(block).enumerate() {
        let start = b * block;
        let m = torch_absmax(chunk);
        if chunk.len() == block {
            // A_com * (1.0 / absmax.clamp(min=1e-38)): torch's `1.0 / t` is `t.reciprocal() * 1.0`.
            absmax[b] = m;
            let inv = 1.0 / clamp_absmax(m);
            for (j, &x) in chunk.iter().enumerate() {
                put(start + j, nf4_code_of(&thresholds, (x * inv).clamp(-1.0, 1.0)));
            }
        } else {
            // The remainder: am = max|w|.clamp(min=1e-38); A_rem / am.
            let am = clamp_absmax(m);
            absmax[b] = am;
            for (j, &x) in chunk.iter().enumerate() {
                put(start + j, nf4_code_of(&thresholds, (x / am).clamp(-1.0, 1.0)));
            }
        }
    }
    if w.len() & 1 == 1 {
        put(w.len(), nf4_code_of(&thresholds, 0.0));
    }
}

/// The scales of a quantized tensor from its per-block absmax (double quantization when asked).
fn finish(
    shape: &[usize],
    block: usize,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    double_quant_block: Option<usize>,
    torch_threads: usize,
) -> Nf4Tensor {
    let scales = match double_quant_block {
        None => Nf4Scales::Plain { absmax },
        Some(block2) => {
            assert!(block2 > 0, "nf4::quantize: double-quant block size must be positive");
            let offset = torch_mean_f32(&absmax, torch_threads);
            let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
            let (codes, absmax2) = quantize_blockwise_dynamic(&centered, block2);
            Nf4Scales::Double { codes, absmax2, offset, block2 }
        }
    };
    Nf4Tensor { shape: shape.to_vec(), block, packed, scales }
}

/// Dequantizes to float32 exactly as bitsandbytes' `dequantize_4bit` (float32 output):
/// `out[i] = NF4[code(i)] * absmax[i / block]` with the absmax of [`Nf4Tensor::absmax`]. Returns `[numel]`,
/// row-major in `q.shape`.
///
/// Blocks run over the flattened tensor, as in bitsandbytes' quantizer, its CUDA kernel and its scalar CPU
/// kernel. (bitsandbytes 0.50.2's AVX-512 CPU kernel, used when the last dimension is a multiple of 16, indexes
/// blocks per row instead, which differs when the last dimension is not a multiple of the block; that is a bug
/// there, not reproduced here.)
///
/// # Panics
/// If the packed storage or the scales are shorter than the shape requires.
pub fn dequantize(q: &Nf4Tensor) -> Vec<f32> {
    let numel = q.numel();
    assert!(q.packed.len() >= numel.div_ceil(2), "nf4::dequantize: packed storage too short");
    let absmax = q.absmax();
    assert!(absmax.len() >= numel.div_ceil(q.block), "nf4::dequantize: too few scales");
    (0..numel).map(|i| NF4_CODEBOOK[usize::from(q.code(i))] * absmax[i / q.block]).collect()
}

/// bitsandbytes 0.50.2's native CPU 8-bit blockwise quantizer (`quantize_cpu_impl<float>`, what
/// `quantize_blockwise(x, code=dynamic_map, blocksize)` runs on the CPU) with the signed dynamic map.
/// Returns the codes `[x.len()]` and one absmax per block `[ceil(x.len() / block)]`.
///
/// Per block: `absmax = max(0, max |x|)` (NaN ignored); an all-zero block gets code 0 everywhere; otherwise
/// `v = clamp(x * (1 / absmax), -1, 1)` and the code is `lut[trunc(fma((v + 1) * 0.5, 65535, 0.5))]`, with the
/// lookup table of `build_quantize_lut` (the nearest map value of the 65536-point grid, ties to the lower one).
fn quantize_blockwise_dynamic(x: &[f32], block: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = dynamic_lut();
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for chunk in x.chunks(block) {
        // std::max(acc, fabs(v)) from -inf, then vmaxss(0, acc).
        let mut acc = f32::NEG_INFINITY;
        for &v in chunk {
            let a = v.abs();
            if a > acc {
                acc = a;
            }
        }
        let am = if 0.0 > acc { 0.0 } else { acc };
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, chunk.len()));
            continue;
        }
        let inv = 1.0 / am;
        for &v in chunk {
            // std::clamp(v * inv, -1, 1): NaN passes through, as with f32::clamp.
            let s = (v * inv).clamp(-1.0, 1.0);
            // (uint16_t)((val + 1) * 0.5 * 65535 + 0.5), the last multiply-add fused by the compiler.
            let idx = ((s + 1.0) * 0.5).mul_add((LUT_SIZE - 1) as f32, 0.5) as i32 as u16;
            codes.push(lut[usize::from(idx)]);
        }
    }
    (codes, absmax)
}

/// `tensor.mean()` of a 1-D float32 tensor on torch's CPU: the cascade sum, then a float32 division by the count.
fn torch_mean_f32(x: &[f32], threads: usize) -> f32 {
    torch_sum_f32(x, threads) / x.len() as f32
}

/// `tensor.sum()` of a contiguous 1-D float32 tensor on torch's CPU with `threads` intra-op threads: serial below
/// 32768 elements or with one thread; otherwise the two-pass reduction (one chunk per thread into a buffer of
/// `threads` partial sums, then the sum of that buffer).
fn torch_sum_f32(x: &[f32], threads: usize) -> f32 {
    let n = x.len();
    if n < TORCH_GRAIN_SIZE || threads <= 1 {
        return 0.0 + torch_cascade_sum(x);
    }
    let used = threads.min(n.div_ceil(TORCH_GRAIN_SIZE));
    let chunk = n.div_ceil(used);
    let mut buffer = vec![0.0f32; threads];
    for (t, part) in x.chunks(chunk).enumerate() {
        buffer[t] += torch_cascade_sum(part);
    }
    0.0 + torch_cascade_sum(&buffer)
}

/// One float32 accumulator (a scalar or an 8-lane vector) of torch's cascade sum.
trait SumAcc: Copy {
    const ZERO: Self;
    fn add(self, other: Self) -> Self;
}

impl SumAcc for f32 {
    const ZERO: Self = 0.0;
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl SumAcc for [f32; TORCH_SUM_LANES] {
    const ZERO: Self = [0.0; TORCH_SUM_LANES];
    fn add(mut self, other: Self) -> Self {
        for (a, b) in self.iter_mut().zip(other) {
            *a += b;
        }
        self
    }
}

/// torch's `cascade_sum` inner reduction (aten/src/ATen/native/cpu/SumKernel.cpp, `vectorized_inner_sum`):
/// 8-lane vectors through `row_sum`, the scalar tail, then the lanes in order; fewer than 8 values go through the
/// scalar `row_sum`.
fn torch_cascade_sum(x: &[f32]) -> f32 {
    let n = x.len();
    if n < TORCH_SUM_LANES {
        return row_sum(n, |i| x[i]);
    }
    let vecs = n / TORCH_SUM_LANES;
    let vacc: [f32; TORCH_SUM_LANES] = row_sum(vecs, |i| {
        let mut v = [0.0f32; TORCH_SUM_LANES];
        v.copy_from_slice(&x[i * TORCH_SUM_LANES..(i + 1) * TORCH_SUM_LANES]);
        v
    });
    let mut acc = 0.0f32;
    for &v in &x[vecs * TORCH_SUM_LANES..] {
        acc += v;
    }
    for lane in vacc {
        acc += lane;
    }
    acc
}

/// torch's `row_sum`: the row seen as `[size / 4, 4]`, `multi_row_sum` over its 4 columns, the leftover rows
/// added to column 0, then columns 1..3 added to column 0.
fn row_sum<T: SumAcc>(size: usize, load: impl Fn(usize) -> T) -> T {
    const ILP: usize = 4;
    let rows = size / ILP;
    let mut partial = multi_row_sum::<T, ILP>(rows, |i, k| load(i * ILP + k));
    for i in rows * ILP..size {
        partial[0] = partial[0].add(load(i));
    }
    let mut acc = partial[0];
    for p in &partial[1..] {
        acc = acc.add(*p);
    }
    acc
}

/// `ceil(log2(x))` as torch's `utils::CeilLog2` (1 for x <= 2).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// torch's `multi_row_sum`: `N` interleaved running sums with 4 levels of partial sums that are carried up every
/// `2^level_power` rows.
fn multi_row_sum<T: SumAcc, const N: usize>(size: usize, load: impl Fn(usize, usize) -> T) -> [T; N] {
    const LEVELS: usize = 4;
    let level_power = (ceil_log2(size) / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[T::ZERO; N]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a = a.add(load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (a, b) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                *a = a.add(*b);
                *b = T::ZERO;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a = a.add(load(i, k));
        }
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (a, b) in first[0].iter_mut().zip(level) {
            *a = a.add(*b);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn parallel_quantization_equals_the_serial_one() {
        for (numel, block, dq) in
            [(1, 64, Some(256)), (131, 64, None), (64 * 300 + 7, 64, Some(256)), (999, 3, Some(5))]
        {
            let w: Vec<f32> = (0..numel).map(|i| ((i * 7919 % 1009) as f32 / 504.5 - 1.0) * 0.02).collect();
            let want = quantize(&w, &[numel], block, dq);
            for threads in [1, 2, 3, 7, 64] {
                let got = quantize_parallel(&w, &[numel], block, dq, threads);
                assert_eq!(got, want, "numel {numel} block {block} threads {threads}");
            }
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // A tiny safetensors reader (8-byte LE header length, JSON header, raw LE data) with a minimal JSON parser.

    #[derive(Debug)]
    enum Json {
        Str(String),
        Num(f64),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
        Other,
    }

    impl Json {
        fn get(&self, key: &str) -> Option<&Json> {
            match self {
                Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }
        fn str(&self) -> &str {
            match self {
                Json::Str(s) => s,
                other => panic!("not a string: {other:?}"),
            }
        }
        fn usizes(&self) -> Vec<usize> {
            match self {
                Json::Arr(a) => a
                    .iter()
                    .map(|v| match v {
                        Json::Num(n) => *n as usize,
                        other => panic!("not a number: {other:?}"),
                    })
                    .collect(),
                other => panic!("not an array: {other:?}"),
            }
        }
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn eat(&mut self, c: u8) {
            self.ws();
            assert_eq!(self.s[self.i], c, "JSON: expected {:?} at {}", c as char, self.i);
            self.i += 1;
        }
        fn value(&mut self) -> Json {
            self.ws();
            match self.s[self.i] {
                b'{' => {
                    self.i += 1;
                    let mut m = Vec::new();
                    self.ws();
                    if self.s[self.i] == b'}' {
                        self.i += 1;
                        return Json::Obj(m);
                    }
                    loop {
                        self.ws();
                        let k = self.string();
                        self.eat(b':');
                        let v = self.value();
                        m.push((k, v));
                        self.ws();
                        let c = self.s[self.i];
                        self.i += 1;
                        if c == b'}' {
                            return Json::Obj(m);
                        }
                        assert_eq!(c, b',', "JSON: expected ',' or '}}'");
                    }
                }
                b'[' => {
                    self.i += 1;
                    let mut a = Vec::new();
                    self.ws();
                    if self.s[self.i] == b']' {
                        self.i += 1;
                        return Json::Arr(a);
                    }
                    loop {
                        a.push(self.value());
                        self.ws();
                        let c = self.s[self.i];
                        self.i += 1;
                        if c == b']' {
                            return Json::Arr(a);
                        }
                        assert_eq!(c, b',', "JSON: expected ',' or ']'");
                    }
                }
                b'"' => Json::Str(self.string()),
                b'-' | b'0'..=b'9' => {
                    let start = self.i;
                    while self.i < self.s.len()
                        && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    {
                        self.i += 1;
                    }
                    Json::Num(std::str::from_utf8(&self.s[start..self.i]).unwrap().parse().unwrap())
                }
                _ => {
                    while self.i < self.s.len() && self.s[self.i].is_ascii_alphabetic() {
                        self.i += 1;
                    }
                    Json::Other
                }
            }
        }
        fn string(&mut self) -> String {
            assert_eq!(self.s[self.i], b'"');
            self.i += 1;
            let mut out = String::new();
            while self.s[self.i] != b'"' {
                if self.s[self.i] == b'\\' {
                    self.i += 1;
                    match self.s[self.i] {
                        b'n' => out.push('\n'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.i + 1..self.i + 5]).unwrap();
                            out.push(char::from_u32(u32::from_str_radix(hex, 16).unwrap()).unwrap_or('?'));
                            self.i += 4;
                        }
                        c => out.push(c as char),
                    }
                    self.i += 1;
                } else {
                    let start = self.i;
                    while self.s[self.i] != b'"' && self.s[self.i] != b'\\' {
                        self.i += 1;
                    }
                    out.push_str(std::str::from_utf8(&self.s[start..self.i]).unwrap());
                }
            }
            self.i += 1;
            out
        }
    }

    struct Tensor {
        dtype: String,
        shape: Vec<usize>,
        data: Vec<u8>,
    }

    impl Tensor {
        fn f32s(&self) -> Vec<f32> {
            assert_eq!(self.dtype, "F32");
            self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        fn u8s(&self) -> Vec<u8> {
            assert_eq!(self.dtype, "U8");
            self.data.clone()
        }
    }

    struct Fixture {
        metadata: HashMap<String, String>,
        tensors: HashMap<String, Tensor>,
    }

    impl Fixture {
        fn load(path: &str) -> Fixture {
            let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header = Parser { s: &bytes[8..8 + n], i: 0 }.value();
            let data = &bytes[8 + n..];
            let Json::Obj(entries) = header else { panic!("safetensors header is not an object") };
            let mut metadata = HashMap::new();
            let mut tensors = HashMap::new();
            for (name, v) in entries {
                if name == "__metadata__" {
                    if let Json::Obj(m) = v {
                        for (k, val) in m {
                            metadata.insert(k, val.str().to_string());
                        }
                    }
                    continue;
                }
                let offs = v.get("data_offsets").unwrap().usizes();
                let t = Tensor {
                    dtype: v.get("dtype").unwrap().str().to_string(),
                    shape: v.get("shape").unwrap().usizes(),
                    data: data[offs[0]..offs[1]].to_vec(),
                };
                tensors.insert(name, t);
            }
            Fixture { metadata, tensors }
        }
        fn t(&self, name: &str) -> &Tensor {
            self.tensors.get(name).unwrap_or_else(|| panic!("fixture has no tensor {name}"))
        }
    }

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/nf4_bnb.safetensors");

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Asserts bitwise equality of two float32 slices, reporting the first difference.
    fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!(
                "{what}: first difference at {i}: got {:e} ({:#010x}), bitsandbytes {:e} ({:#010x})",
                got[i],
                got[i].to_bits(),
                want[i],
                want[i].to_bits()
            );
        }
    }

    fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            panic!("{what}: first difference at {i}: got {:#04x}, bitsandbytes {:#04x}", got[i], want[i]);
        }
    }

    /// The `large` case's weight, generated as in tests/reference/make_nf4_fixture.py::large_weight.
    fn large_weight() -> Vec<f32> {
        fn fmix32(mut x: u32) -> u32 {
            x ^= x >> 16;
            x = x.wrapping_mul(0x85EB_CA6B);
            x ^= x >> 13;
            x = x.wrapping_mul(0xC2B2_AE35);
            x ^= x >> 16;
            x
        }
        let (rows, cols) = (256usize, 576usize);
        let mut w = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let mut s = 2.0f32.powi(-((r % 6) as i32)) * (1.0 + (r % 4) as f32 / 4.0);
            if r % 37 == 5 {
                s = 0.0;
            }
            if r == 100 {
                s = 8.0;
            }
            for c in 0..cols {
                let i = (r * cols + c) as u32;
                let u = (fmix32(i.wrapping_mul(0x9E37_79B1)) >> 8) as f32 * 2.0f32.powi(-24) - 0.5;
                w.push(u * s);
            }
        }
        w
    }

    fn check_case(fx: &Fixture, name: &str, w: &[f32], shape: &[usize], with_dequant: bool) {
        let plain = quantize(w, shape, 64, None);
        let double = quantize(w, shape, 64, Some(256));
        let packed = fx.t(&format!("{name}.packed")).u8s();
        assert_bytes_eq(&format!("{name}: packed (plain)"), &plain.packed, &packed);
        assert_bytes_eq(&format!("{name}: packed (double)"), &double.packed, &packed);
        let Nf4Scales::Plain { absmax } = &plain.scales else { panic!("plain scales expected") };
        assert_bits_eq(&format!("{name}: absmax_plain"), absmax, &fx.t(&format!("{name}.absmax_plain")).f32s());
        let Nf4Scales::Double { codes, absmax2, offset, block2 } = &double.scales else {
            panic!("double scales expected")
        };
        assert_eq!(*block2, 256);
        let want_offset = fx.t(&format!("{name}.offset")).f32s();
        assert_bits_eq(&format!("{name}: offset"), &[*offset], &want_offset);
        assert_bits_eq(&format!("{name}: absmax2"), absmax2, &fx.t(&format!("{name}.absmax2")).f32s());
        assert_bytes_eq(&format!("{name}: absmax_codes"), codes, &fx.t(&format!("{name}.absmax_codes")).u8s());
        assert_bits_eq(&format!("{name}: decoded absmax"), &double.absmax(), &fx.t(&format!("{name}.absmax")).f32s());
        if with_dequant {
            let deq = fx.t(&format!("{name}.dequant"));
            assert_eq!(deq.shape, shape);
            assert_bits_eq(&format!("{name}: dequant"), &dequantize(&double), &deq.f32s());
            assert_bits_eq(
                &format!("{name}: dequant_plain"),
                &dequantize(&plain),
                &fx.t(&format!("{name}.dequant_plain")).f32s(),
            );
        }
    }

    #[test]
    fn golden_bitsandbytes() {
        let fx = Fixture::load(FIXTURE);
        assert_eq!(fx.metadata.get("format").map(String::as_str), Some("tunec-golden-nf4"));
        assert_eq!(fx.metadata.get("version").map(String::as_str), Some("1"));
        assert!(fx.metadata.contains_key("bitsandbytes"));
        let cases: Vec<String> = fx.metadata["cases"].split(',').map(str::to_string).collect();
        assert!(cases.len() >= 5, "cases: {cases:?}");
        for name in cases.iter().filter(|c| *c != "large") {
            let wt = fx.t(&format!("{name}.weight"));
            check_case(&fx, name, &wt.f32s(), &wt.shape, true);
        }
        // [256, 576]: 2304 absmax values, 9 double-quant blocks of 256.
        let w = large_weight();
        let probe = fx.t("large.weight_probe").f32s();
        let mine: Vec<f32> = w.iter().step_by(997).copied().collect();
        assert_bits_eq("large: weight generator", &mine, &probe);
        check_case(&fx, "large", &w, &[256, 576], false);
        let q = quantize(&w, &[256, 576], 64, Some(256));
        let Nf4Scales::Double { absmax2, .. } = &q.scales else { unreachable!() };
        assert_eq!(absmax2.len(), 9);
    }

    #[test]
    fn dynamic_map_matches_bitsandbytes() {
        let fx = Fixture::load(FIXTURE);
        let want = fx.t("dynamic_map");
        assert_eq!(want.shape, [256]);
        assert_eq!(bits(&dynamic_map_signed()), bits(&want.f32s()));
        let map = dynamic_map_signed();
        assert_eq!(map[255], 1.0);
        assert_eq!(map.iter().filter(|&&v| v == 0.0).count(), 1);
        assert!(map.windows(2).all(|p| p[0] < p[1]));
    }

    #[test]
    fn codebook_values() {
        let want: [f64; 16] = [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ];
        for (i, (&c, &w)) in NF4_CODEBOOK.iter().zip(&want).enumerate() {
            assert_eq!(c.to_bits(), (w as f32).to_bits(), "NF4[{i}]");
            assert_eq!(f64::from(c), w, "NF4[{i}] is exactly the f64 literal");
        }
        let fx = Fixture::load(FIXTURE);
        assert_eq!(bits(&NF4_CODEBOOK), bits(&fx.t("nf4_code").f32s()));
    }

    #[test]
    fn packing_even_element_high_nibble() {
        // A block starting with values of code 0 and 11 packs as 0x0B.
        let mut w = vec![0.0f32; 64];
        w[0] = -1.0;
        w[1] = NF4_CODEBOOK[11];
        let q = quantize(&w, &[64], 64, None);
        assert_eq!(q.packed[0], 0x0B);
        assert_eq!(q.code(0), 0);
        assert_eq!(q.code(1), 11);
        assert_eq!(q.code(2), 7);
        assert_eq!(q.packed[1], 0x77);
        assert_eq!(q.packed.len(), 32);
    }

    #[test]
    fn ties_take_the_lower_code() {
        let t = nf4_thresholds();
        let mut w = vec![1.0f32];
        w.extend_from_slice(&t);
        w.resize(64, 0.0);
        let q = quantize(&w, &[64], 64, None);
        for i in 0..15 {
            assert_eq!(q.code(1 + i), i as u8, "threshold {i}");
        }
    }

    /// Small deterministic generator for the property-style tests.
    fn lcg_normalish(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                let mut acc = 0.0f32;
                for _ in 0..4 {
                    s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                }
                acc * scale
            })
            .collect()
    }

    #[test]
    fn round_trip_error_bound() {
        let max_gap = NF4_CODEBOOK.windows(2).map(|p| p[1] - p[0]).fold(0.0f32, f32::max);
        for (numel, seed) in [(4096usize, 1u64), (783, 2), (50, 3), (3, 4), (64 * 300, 5)] {
            let w = lcg_normalish(numel, seed, 0.05);
            for dq in [None, Some(256)] {
                let q = quantize(&w, &[numel], 64, dq);
                let deq = dequantize(&q);
                let absmax = q.absmax();
                // With double quantization the scale itself is approximate: bound against the exact absmax.
                let exact = quantize(&w, &[numel], 64, None).absmax();
                for i in 0..numel {
                    let b = i / 64;
                    let err = (w[i] - deq[i]).abs();
                    let bound = match dq {
                        None => absmax[b] * max_gap / 2.0 * (1.0 + 1e-6),
                        Some(_) => exact[b] * max_gap / 2.0 * (1.0 + 1e-6) + (absmax[b] - exact[b]).abs(),
                    };
                    assert!(err <= bound, "numel {numel} dq {dq:?} i {i}: |{} - {}| > {bound}", w[i], deq[i]);
                }
            }
        }
    }

    #[test]
    fn odd_sizes_like_bitsandbytes() {
        for numel in [1usize, 3, 50, 63, 64, 65, 127, 783] {
            let w = lcg_normalish(numel, numel as u64, 0.1);
            let q = quantize(&w, &[numel], 64, Some(256));
            assert_eq!(q.packed.len(), numel.div_ceil(2));
            assert_eq!(q.num_blocks(), numel.div_ceil(64));
            assert_eq!(q.absmax().len(), numel.div_ceil(64));
            if numel & 1 == 1 {
                assert_eq!(q.packed[numel / 2] & 0x0F, 7, "pad nibble is the code of 0.0");
            }
            // The short block has its own absmax over its real elements, not padded.
            let plain = quantize(&w, &[numel], 64, None);
            let rem = numel % 64;
            if rem != 0 {
                let tail = &w[numel - rem..];
                let m = tail.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                assert_eq!(plain.absmax().last().copied(), Some(m.max(ABSMAX_FLOOR)));
            }
            assert_eq!(dequantize(&q).len(), numel);
        }
        // An all-zero remainder stores the clamped absmax, an all-zero full block stores 0.
        let q = quantize(&[0.0; 70], &[70], 64, None);
        assert_eq!(bits(&q.absmax()), bits(&[0.0, ABSMAX_FLOOR]));
        assert!(q.packed.iter().all(|&b| b == 0x77));
        assert_eq!(dequantize(&q), vec![0.0; 70]);
    }

    #[test]
    fn remainder_divides_full_blocks_multiply() {
        // Find x with x * fl(1/a) and x / a in different buckets; a full block and the remainder must disagree.
        let a = 0.7f32;
        let inv = 1.0 / a;
        let t = nf4_thresholds();
        let mut found = None;
        'outer: for &m in &t {
            let x0 = a * m;
            for k in -64i32..=64 {
                let x = f32::from_bits((x0.to_bits() as i32 + k) as u32);
                if nf4_code_of(&t, x * inv) != nf4_code_of(&t, x / a) {
                    found = Some(x);
                    break 'outer;
                }
            }
        }
        let x = found.expect("a reciprocal/division trap exists for 0.7");
        let mut w = vec![0.0f32; 64 + 2];
        w[0] = a;
        w[1] = x;
        w[64] = a;
        w[65] = x;
        let q = quantize(&w, &[66], 64, None);
        assert_eq!(q.code(1), nf4_code_of(&t, (x * inv).clamp(-1.0, 1.0)));
        assert_eq!(q.code(65), nf4_code_of(&t, (x / a).clamp(-1.0, 1.0)));
        assert_ne!(q.code(1), q.code(65));
    }

    #[test]
    fn bits_per_param() {
        let w = lcg_normalish(64 * 256 * 4, 9, 0.02);
        let d = quantize(&w, &[256, 256], 64, Some(256));
        assert!((d.bits_per_param() - (4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0) + 32.0 / 65536.0)).abs() < 1e-12);
        assert!((d.bits_per_param() - 4.127).abs() < 0.001);
        let p = quantize(&w, &[256, 256], 64, None);
        assert_eq!(p.bits_per_param(), 4.5);
    }

    #[test]
    fn double_quant_zero_block_and_constant_absmax() {
        // Every block has absmax 0.5: offset 0.5, absmax - offset is all 0, absmax2 is 0, codes are 0 and the
        // decode is map[0] * 0 + 0.5 = 0.5.
        let mut w = vec![0.125f32; 256];
        for b in 0..4 {
            w[b * 64 + 3] = -0.5;
        }
        let q = quantize(&w, &[4, 64], 64, Some(256));
        let Nf4Scales::Double { codes, absmax2, offset, .. } = &q.scales else { unreachable!() };
        assert_eq!(*offset, 0.5);
        assert_eq!(bits(absmax2), bits(&[0.0]));
        assert_eq!(codes, &vec![0u8; 4]);
        assert_eq!(q.absmax(), vec![0.5; 4]);
    }

    #[test]
    fn torch_sum_matches_reference_structure() {
        // Cross-check the cascade sum against an f64 sum (it is accurate) and pin a few exact cases.
        for n in [0usize, 1, 7, 8, 9, 63, 64, 65, 1000, 4099, 40000] {
            let x = lcg_normalish(n, n as u64 + 17, 1.0);
            let x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let exact: f64 = x.iter().map(|&v| f64::from(v)).sum();
            for threads in [1, 2, 3] {
                let s = torch_sum_f32(&x, threads);
                assert!((f64::from(s) - exact).abs() <= 1e-5 * exact.max(1.0), "n {n}: {s} vs {exact}");
            }
        }
        // Integers are exact whatever the order.
        let x: Vec<f32> = (0..100).map(|i| i as f32).collect();
        assert_eq!(torch_sum_f32(&x, 1), 4950.0);
        assert_eq!(torch_mean_f32(&x, 1), 49.5);
        assert!(torch_mean_f32(&[], 1).is_nan());
    }

    #[test]
    fn empty_tensor() {
        let q = quantize(&[], &[0, 64], 64, Some(256));
        assert_eq!(q.numel(), 0);
        assert!(q.packed.is_empty());
        assert!(dequantize(&q).is_empty());
        assert_eq!(q.bits_per_param(), 0.0);
    }
}
