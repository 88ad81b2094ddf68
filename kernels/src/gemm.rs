//! GEMM kernels: the one description of a `matmul`, `qmatmul` or `lora_linear` node that both targets lower from
//! (`codegen::gemm`).
//!
//! A [`Gemm`] computes, for each batch `b` (rank-3 `matmul` only; 1 otherwise),
//! `out[b] = op_a(A[b]) · op_b(W[b]) (+ s · U · op_b(B))`, with `op(X) = Xᵀ` where the transpose flag is set,
//! `out` of shape `[M, N]` and the inner dimension `K`. The weight `W` is dense f32 or NF4 storage (dequantized
//! inside the kernel, bit-exact with `ir::nf4::dequantize`); the optional LoRA term (`lora_linear`) has
//! `U: [M, r]` and `B: [r, N]` (`tb = false`) or `[N, r]` (`tb = true`).
//!
//! # Buffers
//! Buffers are the op's inputs in order, then its output, each dense row-major. An NF4 weight is split into the
//! buffers of its `ir::nf4::Nf4Tensor` storage, in this order (see [`Gemm::buffers`] and [`nf4_buffers`]):
//! - double quantization (`Nf4Scales::Double`): `packed: u8[ceil(numel/2)]` (element `2i` in the HIGH nibble of byte
//!   `i`), `absmax_codes: u8[num_blocks]` (indices into `ir::nf4::dynamic_map_signed()`, which the kernel embeds
//!   as a constant table), `absmax2: f32[ceil(num_blocks/block2)]`, `offset: f32[1]`;
//! - plain scales (`Nf4Scales::Plain`): `packed: u8[ceil(numel/2)]`, `absmax: f32[num_blocks]`.
//!
//! So `matmul` takes `[a, b, out]`; `qmatmul` takes `[x, packed, absmax_codes, absmax2, offset, out]` (or
//! `[x, packed, absmax, out]`); `lora_linear` takes `[x, W…, u, b, out]` with `W…` one f32 buffer or the NF4 buffers.

use ir::nf4::{Nf4Scales, Nf4Tensor};
use ir::{DType, Graph, Op, ValueId};

/// Why a node cannot be described as a [`Gemm`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GemmError {
    /// Not a GEMM op, or a dtype/rank the templates do not lower.
    #[error("not a GEMM this template lowers: {0}")]
    Unsupported(String),
}

/// How the weight operand is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Dense f32.
    F32,
    /// NF4 with `block` elements per absmax; `double_quant = Some(block2)` when the absmax values are themselves
    /// 8-bit coded in blocks of `block2`.
    Nf4 { block: usize, double_quant: Option<usize> },
}

/// The LoRA term of `lora_linear`: `s · U · op_b(B)`, with `U: [M, rank]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lora {
    pub rank: usize,
    pub s: f64,
}

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufElem {
    F32,
    U8,
}

/// One buffer of the kernel ABI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufSpec {
    pub name: &'static str,
    pub elem: BufElem,
    /// Number of elements.
    pub len: usize,
}

/// Indices of the kernel's buffers, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufIx {
    pub a: usize,
    /// The f32 weight, or the NF4 packed codes.
    pub w: usize,
    /// NF4 plain absmax (f32) or absmax codes (u8).
    pub absmax: Option<usize>,
    /// NF4 double quantization: absmax2 (f32) and offset (f32[1]).
    pub absmax2: Option<usize>,
    pub offset: Option<usize>,
    /// LoRA `U` and `B`.
    pub u: Option<usize>,
    pub lb: Option<usize>,
    pub out: usize,
}

/// A GEMM kernel (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    /// Kernel name (`lora_linear:model.layers.0.q_proj`); the symbol is [`Gemm::symbol`].
    pub name: String,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub weight: WeightFormat,
    pub lora: Option<Lora>,
}

impl Gemm {
    /// The kernel's symbol: `tunec_` + the name with every non-alphanumeric character as `_`.
    pub fn symbol(&self) -> String {
        let body: String = self.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        format!("tunec_{body}")
    }

    /// Describes node `v` of `g` (a `matmul`, `qmatmul` or `lora_linear` of f32 values) as kernel `name`.
    pub fn from_node(g: &Graph, v: ValueId, name: &str) -> Result<Gemm, GemmError> {
        let node = g.node(v);
        let out = &node.ty;
        if out.dtype != DType::F32 {
            return Err(GemmError::Unsupported(format!("{} producing {}", node.op.mnemonic(), out.dtype)));
        }
        let a = g.ty(node.inputs[0]);
        let (ta, tb, lora) = match &node.op {
            Op::MatMul { ta, tb } => (*ta, *tb, None),
            Op::QMatMul { tb } => (false, *tb, None),
            Op::LoraLinear { s, tb } => {
                let u = g.ty(node.inputs[2]);
                if u.dtype != DType::F32 || g.ty(node.inputs[3]).dtype != DType::F32 {
                    return Err(GemmError::Unsupported("lora_linear with non-f32 adapters".into()));
                }
                (false, *tb, Some(Lora { rank: u.shape[u.shape.len() - 1], s: *s }))
            }
            other => return Err(GemmError::Unsupported(other.mnemonic().to_string())),
        };
        let wt = g.ty(node.inputs[1]);
        let weight = match wt.dtype {
            DType::F32 => WeightFormat::F32,
            DType::Nf4(f) => {
                WeightFormat::Nf4 { block: f.block as usize, double_quant: f.double_quant.map(|b| b as usize) }
            }
            other => return Err(GemmError::Unsupported(format!("{other} weight"))),
        };
        if a.dtype != DType::F32 {
            return Err(GemmError::Unsupported(format!("{} activations", a.dtype)));
        }
        let r = out.shape.len();
        if !(r == 2 || (r == 3 && lora.is_none() && weight == WeightFormat::F32)) {
            return Err(GemmError::Unsupported(format!("a GEMM producing {out}")));
        }
        let (m, n) = (out.shape[r - 2], out.shape[r - 1]);
        let k = if ta { a.shape[r - 2] } else { a.shape[r - 1] };
        let batch = out.shape[..r - 2].iter().product();
        Ok(Gemm { name: name.to_string(), batch, m, n, k, ta, tb, weight, lora })
    }

    /// Elements of the weight (per batch entry for an f32 weight).
    pub fn weight_numel(&self) -> usize {
        self.k * self.n
    }

    /// The kernel's buffers, in ABI order (see the module docs).
    pub fn buffers(&self) -> Vec<BufSpec> {
        let f = |name, len| BufSpec { name, elem: BufElem::F32, len };
        let u8b = |name, len| BufSpec { name, elem: BufElem::U8, len };
        let mut v = vec![f("a", self.batch * self.m * self.k)];
        let wn = self.weight_numel();
        match self.weight {
            WeightFormat::F32 => v.push(f("w", self.batch * wn)),
            WeightFormat::Nf4 { block, double_quant } => {
                let blocks = wn.div_ceil(block);
                v.push(u8b("packed", wn.div_ceil(2)));
                match double_quant {
                    Some(b2) => {
                        v.push(u8b("absmax_codes", blocks));
                        v.push(f("absmax2", blocks.div_ceil(b2)));
                        v.push(f("offset", 1));
                    }
                    None => v.push(f("absmax", blocks)),
                }
            }
        }
        if let Some(l) = self.lora {
            v.push(f("u", self.m * l.rank));
            v.push(f("b", l.rank * self.n));
        }
        v.push(f("out", self.batch * self.m * self.n));
        v
    }

    /// Buffer indices by role.
    pub fn buf_ix(&self) -> BufIx {
        let mut ix = BufIx { a: 0, w: 1, absmax: None, absmax2: None, offset: None, u: None, lb: None, out: 0 };
        let mut next = 2;
        if let WeightFormat::Nf4 { double_quant, .. } = self.weight {
            ix.absmax = Some(next);
            next += 1;
            if double_quant.is_some() {
                ix.absmax2 = Some(next);
                ix.offset = Some(next + 1);
                next += 2;
            }
        }
        if self.lora.is_some() {
            ix.u = Some(next);
            ix.lb = Some(next + 1);
            next += 2;
        }
        ix.out = next;
        ix
    }

    /// Floating-point operations of one run (2·batch·M·N·K, plus the LoRA term).
    pub fn flops(&self) -> f64 {
        let r = self.lora.map_or(0, |l| l.rank);
        2.0 * (self.batch * self.m * self.n * (self.k + r)) as f64
    }
}

/// The NF4 storage of `q` as the kernel's weight buffers, each as raw little-endian bytes (see the module docs).
pub fn nf4_buffers(q: &Nf4Tensor) -> Vec<Vec<u8>> {
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    match &q.scales {
        Nf4Scales::Plain { absmax } => vec![q.packed.clone(), f32s(absmax)],
        Nf4Scales::Double { codes, absmax2, offset, .. } => {
            vec![q.packed.clone(), codes.clone(), f32s(absmax2), f32s(&[*offset])]
        }
    }
}
