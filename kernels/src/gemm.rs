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
//!
//! # Epilogues
//! A GEMM may carry an elementwise [`Epilogue`]: a loop nest over the output's elements (the residual `add` after
//! o_proj/down_proj, `swiglu` after up_proj, a `scale`, gradient sums in the backward) evaluated on each output
//! element as soon as it is final, so the GEMM result never makes a round trip through memory for it. Its buffers
//! follow the GEMM's inputs: the epilogue's other inputs (f32, in the nest's order), then the outputs — the GEMM
//! result first when something outside the kernel reads it ([`Epilogue::store_acc`]), then the nest's outputs.
//! Without `store_acc` the first nest output is where the GEMM accumulates (the host kernel sums K blocks in
//! memory), and the epilogue overwrites it in place, element by element.

use ir::nf4::{Nf4Scales, Nf4Tensor};
use ir::{DType, Graph, Kernel, Op, ValueId};

use crate::loops::{Elem, ExprOp, Iteration, LoopNest};

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
    /// Where the GEMM result goes: the first output (with an epilogue without `store_acc`, the first epilogue
    /// output, overwritten in place by the epilogue).
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
    /// Elementwise ops applied to each output element (see the module docs).
    pub epilogue: Option<Epilogue>,
    /// The arithmetic of the `A · op(W)` product (the LoRA term and the epilogue are f32 either way).
    pub precision: GemmPrecision,
}

/// How a GEMM multiplies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GemmPrecision {
    /// f32 products with f32 accumulation (the interpreter's arithmetic; GPU: SIMT FMAs).
    #[default]
    F32,
    /// A and W rounded to bf16 (round to nearest even) and multiplied exactly, accumulated in f32: what bf16 tensor
    /// cores compute (GPU: `mma.sync.m16n8k16` bf16; the host emulates it with the same rounding). The QLoRA compute
    /// dtype of bitsandbytes' usual setup.
    Bf16,
}

/// An elementwise loop nest fused after a GEMM (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Epilogue {
    /// Over the GEMM output's elements; one of its input buffers is the GEMM result.
    pub nest: LoopNest,
    /// The nest's input buffer that holds the GEMM result (its loads read the accumulator).
    pub acc: usize,
    /// Whether the GEMM result itself is a kernel output (read outside the kernel, or a graph output).
    pub store_acc: bool,
}

impl Epilogue {
    /// The nest's inputs other than the GEMM result, in order (the kernel's extra input buffers).
    pub fn extra_inputs(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nest.n_inputs).filter(move |&b| b != self.acc)
    }
}

/// Whether `op` is one the GEMM template lowers.
pub fn is_gemm_op(op: &Op) -> bool {
    matches!(op, Op::MatMul { .. } | Op::QMatMul { .. } | Op::LoraLinear { .. })
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
        Ok(Gemm {
            name: name.to_string(),
            batch,
            m,
            n,
            k,
            ta,
            tb,
            weight,
            lora,
            epilogue: None,
            precision: GemmPrecision::F32,
        })
    }

    /// Describes kernel group `k` of `g` as its one GEMM node, aliasing views of it, and an elementwise epilogue over
    /// the GEMM's output (see the module docs); `Err` when the group is not of that form.
    pub fn from_group(g: &Graph, k: &Kernel) -> Result<Gemm, GemmError> {
        Gemm::from_group_with(g, k, &crate::template::Uses::of(g))
    }

    /// [`Gemm::from_group`] with the graph's readers computed once by the caller.
    pub fn from_group_with(g: &Graph, k: &Kernel, uses: &crate::template::Uses) -> Result<Gemm, GemmError> {
        let unsupported = |why: String| Err(GemmError::Unsupported(format!("kernel `{}`: {why}", k.name)));
        let gemms: Vec<ValueId> = k.nodes.iter().copied().filter(|&v| is_gemm_op(&g.node(v).op)).collect();
        let [anchor] = gemms[..] else { return unsupported(format!("{} GEMM nodes", gemms.len())) };
        let mut gm = Gemm::from_node(g, anchor, &k.name)?;
        let mut sorted = k.nodes.clone();
        sorted.sort_unstable();
        let member = |v: ValueId| sorted.binary_search(&v).is_ok();
        // Each member's root through aliasing views; the GEMM result is read outside when a value rooted at it is.
        let view = |v: ValueId| matches!(g.node(v).op, Op::Reshape { .. } | Op::StopGradient {});
        let rooted_at_anchor = |mut v: ValueId| loop {
            if v == anchor {
                return true;
            }
            if !(view(v) && member(v)) {
                return false;
            }
            v = g.node(v).inputs[0];
        };
        let rest: Vec<ValueId> = k.nodes.iter().copied().filter(|&v| v != anchor).collect();
        if rest.iter().all(|&v| rooted_at_anchor(v)) {
            return Ok(gm);
        }
        // An epilogue only: no member may feed the GEMM (a prologue, which the GEMM would read from memory before
        // the epilogue wrote it). Members beside the GEMM's path (silu(gate) in the MLP backward) are fine.
        let mut feeds: std::collections::HashSet<ValueId> = std::collections::HashSet::new();
        let mut stack: Vec<ValueId> = g.node(anchor).inputs.clone();
        while let Some(v) = stack.pop() {
            if member(v) && feeds.insert(v) {
                stack.extend(g.node(v).inputs.iter().copied());
            }
        }
        if let Some(v) = rest.iter().find(|v| feeds.contains(v)) {
            return unsupported(format!("{v} ({}) feeds the GEMM: not an epilogue", g.node(*v).op.mnemonic()));
        }
        // Values read by a node outside the group, or returned by the graph.
        let read_outside = |v: ValueId| uses.read_outside(v, member);
        let store_acc = read_outside(anchor) || rest.iter().any(|&v| rooted_at_anchor(v) && read_outside(v));
        let sub = Kernel { name: k.name.clone(), nodes: rest };
        let mut nest = LoopNest::from_group_with(g, &sub, uses).map_err(|e| GemmError::Unsupported(e.to_string()))?;
        // Outputs that are views of the GEMM result are the result's own buffer (`store_acc`), not nest outputs.
        let n_in = nest.n_inputs;
        let keep: Vec<bool> =
            nest.buffers.iter().enumerate().map(|(i, b)| i < n_in || !rooted_at_anchor(b.value)).collect();
        let mut new_ix = vec![usize::MAX; keep.len()];
        let mut kept = 0;
        for (i, &kp) in keep.iter().enumerate() {
            if kp {
                new_ix[i] = kept;
                kept += 1;
            }
        }
        nest.stores.retain(|s| keep[s.buffer]);
        nest.stores.iter_mut().for_each(|s| s.buffer = new_ix[s.buffer]);
        let mut i = 0;
        nest.buffers.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        if nest.stores.is_empty() {
            return unsupported("the epilogue has no outputs".into());
        }
        let len = gm.batch * gm.m * gm.n;
        if nest.iteration != (Iteration::Elements { len }) {
            return unsupported(format!("the epilogue iterates {:?}, not the {len} output elements", nest.iteration));
        }
        if !nest.seeds.is_empty() || nest.buffers.iter().any(|b| b.elem != Elem::F32) {
            return unsupported("the epilogue reads non-f32 buffers or dropout seeds".into());
        }
        let Some(acc) = nest.inputs().iter().position(|b| b.value == anchor) else {
            return unsupported("the epilogue does not read the GEMM result".into());
        };
        // Every expression that depends on the GEMM result is evaluated at the output element's own index.
        let mut dep = vec![false; nest.exprs.len()];
        for (e, x) in nest.exprs.iter().enumerate() {
            dep[e] = matches!(x.op, ExprOp::Load { buffer } if buffer == acc) || x.args.iter().any(|&a| dep[a]);
            let elementwise = !matches!(
                x.op,
                ExprOp::Strided { .. }
                    | ExprOp::Concat { .. }
                    | ExprOp::Broadcast
                    | ExprOp::AdamWMoment { .. }
                    | ExprOp::AdamWUpdate { .. }
            ) && !x.op.is_row_op();
            if dep[e] && (!elementwise || x.numel() != len) {
                return unsupported(format!("the epilogue reads the GEMM result through {:?}", x.op));
            }
        }
        gm.epilogue = Some(Epilogue { nest, acc, store_acc });
        Ok(gm)
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
        let out = self.batch * self.m * self.n;
        match &self.epilogue {
            None => v.push(f("out", out)),
            Some(e) => {
                v.extend(e.extra_inputs().map(|b| f("epilogue_in", e.nest.buffers[b].numel())));
                if e.store_acc {
                    v.push(f("out", out));
                }
                v.extend(e.nest.outputs().iter().map(|b| f("epilogue_out", b.numel())));
            }
        }
        v
    }

    /// How many of the kernel's buffers are outputs (the last ones).
    pub fn n_outputs(&self) -> usize {
        match &self.epilogue {
            None => 1,
            Some(e) => usize::from(e.store_acc) + e.nest.outputs().len(),
        }
    }

    /// The kernel buffer of each of the epilogue nest's buffers (the GEMM result's maps to [`BufIx::out`]).
    pub fn epilogue_buffers(&self) -> Vec<usize> {
        let Some(e) = &self.epilogue else { return vec![] };
        let ix = self.buf_ix();
        let mut extra = ix.out - e.nest.n_inputs + 1;
        let mut out = ix.out + usize::from(e.store_acc);
        (0..e.nest.buffers.len())
            .map(|b| {
                if b == e.acc {
                    ix.out
                } else if b < e.nest.n_inputs {
                    extra += 1;
                    extra - 1
                } else {
                    out += 1;
                    out - 1
                }
            })
            .collect()
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
        if let Some(e) = &self.epilogue {
            next += e.nest.n_inputs - 1;
        }
        ix.out = next;
        ix
    }

    /// The GEMM in f64 from its operands as f32 values (`a`, the weight — NF4 dequantized — and, for `lora_linear`,
    /// `u` and `b`), rounding A and W as [`Gemm::precision`] says: a reference for the kernels (the epilogue is not
    /// applied). Row-major `[batch, m, n]`.
    pub fn reference(&self, inputs: &[Vec<f32>]) -> Vec<f64> {
        let op = |x: f32| -> f64 {
            match self.precision {
                GemmPrecision::F32 => x as f64,
                GemmPrecision::Bf16 => {
                    let b = x.to_bits();
                    f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000) as f64
                }
            }
        };
        let (m, n, k) = (self.m, self.n, self.k);
        let (a, w) = (&inputs[0], &inputs[1]);
        let mut out = vec![0f64; self.batch * m * n];
        for bt in 0..self.batch {
            let (a, w) = (&a[bt * m * k..], if w.len() > k * n { &w[bt * k * n..] } else { &w[..] });
            for row in 0..m {
                for col in 0..n {
                    let mut acc = 0f64;
                    for kk in 0..k {
                        let x = if self.ta { a[kk * m + row] } else { a[row * k + kk] };
                        let y = if self.tb { w[col * k + kk] } else { w[kk * n + col] };
                        acc += op(x) * op(y);
                    }
                    if let Some(l) = self.lora {
                        let (u, b) = (&inputs[2], &inputs[3]);
                        let r = l.rank;
                        let low: f64 = (0..r)
                            .map(|p| {
                                u[row * r + p] as f64 * if self.tb { b[col * r + p] } else { b[p * n + col] } as f64
                            })
                            .sum();
                        acc += l.s * low;
                    }
                    out[(bt * m + row) * n + col] = acc;
                }
            }
        }
        out
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
