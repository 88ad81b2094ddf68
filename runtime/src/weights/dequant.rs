//! ggml's tensor element types and their dequantization to f32, following llama.cpp's `ggml-quants.c`
//! (`dequantize_row_*`). Blocks are little-endian; `d`/`m` scales are f16.
//!
//! | type | block | bytes | element |
//! |---|---|---|---|
//! | Q8_0 | 32 | 2 + 32 | `q·d` (q: i8) |
//! | Q4_0 | 32 | 2 + 16 | `(nibble − 8)·d`; element j < 16 is the low nibble of byte j, j + 16 the high one |
//! | Q4_1 | 32 | 2 + 2 + 16 | `nibble·d + m`, same nibble order |
//! | Q5_0 | 32 | 2 + 4 + 16 | `(nibble | bit·16 − 16)·d`, bit j of the u32 `qh` is element j's fifth bit |
//! | Q5_1 | 32 | 2 + 2 + 4 + 16 | `(nibble | bit·16)·d + m` |
//! | Q4_K | 256 | 2 + 2 + 12 + 128 | 8 sub-blocks of 32 with 6-bit scale and min: `d·sc·q − dmin·m` |
//! | Q5_K | 256 | 2 + 2 + 12 + 32 + 128 | as Q4_K with a fifth bit from `qh` |
//! | Q6_K | 256 | 128 + 64 + 16 + 2 | 16 sub-blocks of 16 with i8 scales: `d·sc·(q − 32)`, q 6 bits (`ql` low 4, `qh` high 2) |

use half::{bf16, f16};

/// The types [`dequantize`] handles, for messages.
pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K";

/// A ggml tensor type (`enum ggml_type`), by its number in the GGUF file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q8_1: GgmlType = GgmlType(9);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const Q8_K: GgmlType = GgmlType(15);
    pub const I8: GgmlType = GgmlType(24);
    pub const I16: GgmlType = GgmlType(25);
    pub const I32: GgmlType = GgmlType(26);
    pub const I64: GgmlType = GgmlType(27);
    pub const F64: GgmlType = GgmlType(28);
    pub const BF16: GgmlType = GgmlType(30);

    /// ggml's name for the type (`Q4_1`), or `type 17` for one tunec does not know.
    pub fn name(self) -> String {
        let known = match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            n => return format!("type {n}"),
        };
        known.to_string()
    }

    /// (elements per block, bytes per block), for the types whose layout tunec knows.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self.0 {
            0 => (1, 4),
            1 => (1, 2),
            2 => (32, 18),
            3 => (32, 20),
            6 => (32, 22),
            7 => (32, 24),
            8 => (32, 34),
            9 => (32, 36),
            10 => (256, 84),
            11 => (256, 110),
            12 => (256, 144),
            13 => (256, 176),
            14 => (256, 210),
            15 => (256, 292),
            20 => (32, 18),
            23 => (256, 136),
            24 => (1, 1),
            25 => (1, 2),
            26 => (1, 4),
            27 => (1, 8),
            28 => (1, 8),
            30 => (1, 2),
            39 => (32, 17),
            _ => return None,
        })
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
    }

    /// Bytes holding `elements` values, or `None` when the layout is unknown, `elements` is not a whole number of
    /// blocks or the byte count overflows.
    pub fn bytes_for(self, elements: usize) -> Option<usize> {
        let (block, bytes) = self.block_layout()?;
        if elements % block != 0 {
            return None;
        }
        (elements / block).checked_mul(bytes)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out`, which must hold exactly the blocks' elements.
/// Errors (as a message) for a type [`GgmlType::can_dequantize`] refuses or a size mismatch.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    if !ty.can_dequantize() {
        return Err(format!("cannot dequantize type {ty} (supported: {SUPPORTED})"));
    }
    let (block, block_bytes) = ty.block_layout().expect("every dequantizable type has a layout");
    if out.len() % block != 0 || Some(bytes.len()) != (out.len() / block).checked_mul(block_bytes) {
        return Err(format!(
            "{ty}: {} bytes do not hold {} elements (blocks of {block} elements in {block_bytes} bytes)",
            bytes.len(),
            out.len()
        ));
    }
    let blocks = bytes.chunks_exact(block_bytes).zip(out.chunks_exact_mut(block));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| q6_k(b, y)),
        _ => unreachable!("checked by can_dequantize"),
    }
    Ok(())
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q8_0: f16 d, 32 × i8 q; x = q·d.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (x, &q) in y.iter_mut().zip(&b[2..34]) {
        *x = (q as i8) as f32 * d;
    }
}

/// Q4_0: f16 d, 16 bytes; x_j = (low nibble of byte j − 8)·d, x_{j+16} = (high nibble − 8)·d.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[2..18].iter().enumerate() {
        lo[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes; x = nibble·d + m (nibble order as Q4_0).
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[4..20].iter().enumerate() {
        lo[j] = (q & 0x0F) as f32 * d + m;
        hi[j] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 d, u32 qh, 16 bytes; 5-bit q = nibble | (bit j of qh) << 4 (bit j + 16 for element j + 16); x = (q − 16)·d.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[6..22].iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        lo[j] = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        hi[j] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 d, f16 m, u32 qh, 16 bytes; x = q·d + m with q as in Q5_0.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[8..24].iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        lo[j] = ((q & 0x0F) as u32 | h0) as f32 * d + m;
        hi[j] = ((q >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block (`get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles. Each 64 elements use 32
/// bytes: the low nibbles are the first 32 elements (sub-block 2i), the high nibbles the next 32 (sub-block 2i + 1).
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (i, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (lo, hi) = out.split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            hi[l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: f16 d, f16 dmin, 12 bytes of scales/mins, 32 bytes qh, 128 bytes of nibbles; as Q4_K, with the fifth bit of
/// element l of the 64-element group i taken from bit 2i (low half) or 2i + 1 (high half) of `qh[l]`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (i, (q, out)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * i), 1u8 << (2 * i + 1));
        let (lo, hi) = out.split_at_mut(32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            lo[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
            hi[l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 × i8 scales, f16 d. Per 128 elements (64 ql, 32
/// qh, 8 scales): element l + 32k (l < 32, k < 4) takes the low (k even) or high (k odd) nibble of ql[l + 32·(k&1)]
/// and bits 2k..2k+2 of qh[l]; scale index l/16 + 2k; x = d·scale·(q − 32).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for (n, out) in y.chunks_exact_mut(128).enumerate() {
        let ql = &ql_all[64 * n..64 * n + 64];
        let qh = &qh_all[32 * n..32 * n + 32];
        let sc = &sc_all[8 * n..8 * n + 8];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
