//! Transformer-op kernels: the one description of an attention, RoPE, embedding or cross-entropy node that both
//! targets lower from (`codegen::nn`).
//!
//! An [`NnKernel`] is built from one graph node ([`NnKernel::from_node`]) or from a kernel group holding exactly one
//! such node ([`NnKernel::from_group`]). Its buffers are the node's inputs, then its output (dense row-major f32 or
//! i32 arrays of static shape), exactly as the loop-nest kernels (`loops`) lay them out.
//!
//! Work is split into *items* (query rows, tokens, rows of logits, …). Each item is processed by a *team*: one host
//! thread, or on the GPU one thread, one warp or one block ([`Team`]); [`NnKernel::launch`] says which, how many items
//! there are, and whether the output must be zeroed before the launch (kernels that accumulate with atomics).

use ir::{AttnArg, DType, Graph, Kernel, Op, ValueId};

use crate::loops::{Buffer, Elem, LoopError};

/// What one transformer-op kernel computes (sizes are static).
#[derive(Clone, Debug, PartialEq)]
pub enum NnOp {
    /// `attention` (grad `None`) or `attention_bwd` (grad `Some(wrt)`): q: [B,T,H,hd], k, v: [B,T,KV,hd], seg: i32[B,T].
    Attention {
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        causal: bool,
        scale: f64,
        grad: Option<AttnArg>,
    },
    /// x: [B,T,H,hd], pos: i32[B,T].
    Rope { batch: usize, seq: usize, heads: usize, head_dim: usize, theta: f64, inverse: bool },
    /// table: [V,D], ids: i32[N] → [N,D].
    Embedding { vocab: usize, dim: usize, tokens: usize },
    /// dy: [N,D], ids: i32[N] → [V,D].
    EmbeddingBwd { vocab: usize, dim: usize, tokens: usize },
    /// logits: [N,V], labels: i32[N] → f32[].
    CrossEntropy { rows: usize, vocab: usize, ignore_index: i64 },
    /// dloss: f32[], logits: [N,V], labels: i32[N] → [N,V].
    CrossEntropyBwd { rows: usize, vocab: usize, ignore_index: i64 },
    /// h: [N,D], W: [V,D], labels: i32[N] → f32[].
    LinearCrossEntropy { rows: usize, dim: usize, vocab: usize, ignore_index: i64, chunk: usize },
    /// dloss: f32[], h: [N,D], W: [V,D], labels: i32[N] → [N,D].
    LinearCrossEntropyBwd { rows: usize, dim: usize, vocab: usize, ignore_index: i64, chunk: usize },
}

/// Who processes one work item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Team {
    /// One thread per item (host: a thread's slice of items; GPU: grid-stride over threads).
    Thread,
    /// GPU: one warp per item, its 32 lanes splitting the item's inner dimension (grid-stride over warps).
    Warp,
    /// GPU: one block per item (grid-stride over blocks); `blockDim.x` must be [`NN_BLOCK_THREADS`].
    Block,
}

/// `blockDim.x` for every NVPTX kernel of this module (a multiple of 32; block teams rely on it exactly).
pub const NN_BLOCK_THREADS: u32 = 256;

/// How a kernel is launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Work items of the host function (its threads split them into contiguous slices).
    pub host_items: usize,
    /// Work items of the GPU kernel (one per team).
    pub items: usize,
    /// The GPU team per item (the host always uses one thread per item).
    pub team: Team,
    /// A good `gridDim.x` for [`NN_BLOCK_THREADS`]-thread blocks (the kernels are grid-stride, so any grid works).
    pub grid: u32,
    /// The output must hold zeros before the launch (it is accumulated into, with atomics where threads share it).
    pub zero_output_host: bool,
    /// As `zero_output_host`, for the GPU kernel.
    pub zero_output_gpu: bool,
}

/// A transformer-op kernel: one node, its buffers (inputs, then the output) and its sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct NnKernel {
    /// The kernel's name (`attention:model.layers.0.self_attn`).
    pub name: String,
    pub op: NnOp,
    /// Inputs (the first `n_inputs`), then the output.
    pub buffers: Vec<Buffer>,
    pub n_inputs: usize,
}

fn elem_of(dtype: DType) -> Result<Elem, LoopError> {
    match dtype {
        DType::F32 => Ok(Elem::F32),
        DType::I32 => Ok(Elem::I32),
        other => Err(LoopError::Unsupported(format!("{other} values"))),
    }
}

impl NnKernel {
    /// The kernel's symbol: `tunec_` + the name with every non-alphanumeric character as `_`.
    pub fn symbol(&self) -> String {
        let body: String = self.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        format!("tunec_{body}")
    }

    pub fn output(&self) -> &Buffer {
        &self.buffers[self.n_inputs]
    }

    /// Describes the single transformer op of kernel group `kernel`.
    pub fn from_group(g: &Graph, kernel: &Kernel) -> Result<NnKernel, LoopError> {
        let [node] = kernel.nodes.as_slice() else {
            return Err(LoopError::Shape {
                kernel: kernel.name.clone(),
                message: format!("{} nodes in a transformer-op kernel (one expected)", kernel.nodes.len()),
            });
        };
        NnKernel::from_node(g, *node, &kernel.name)
    }

    /// Describes node `v` of `g` as kernel `name`.
    pub fn from_node(g: &Graph, v: ValueId, name: &str) -> Result<NnKernel, LoopError> {
        let node = g.node(v);
        let shape = |k: usize| g.ty(node.inputs[k]).shape.clone();
        let err = |message: String| LoopError::Shape { kernel: name.to_string(), message };
        let rank = |k: usize, r: usize| -> Result<Vec<usize>, LoopError> {
            let s = shape(k);
            if s.len() != r {
                return Err(err(format!("input {k} of `{}` has shape {s:?}, expected rank {r}", node.op.mnemonic())));
            }
            Ok(s)
        };
        let op = match &node.op {
            Op::Attention { causal, scale } | Op::AttentionBwd { causal, scale, .. } => {
                let first = usize::from(matches!(node.op, Op::AttentionBwd { .. }));
                let (q, k) = (rank(first, 4)?, rank(first + 1, 4)?);
                if k[2] == 0 || q[2] % k[2] != 0 {
                    return Err(err(format!("{} query heads over {} kv heads", q[2], k[2])));
                }
                let grad = match &node.op {
                    Op::AttentionBwd { wrt, .. } => Some(*wrt),
                    _ => None,
                };
                NnOp::Attention {
                    batch: q[0],
                    seq: q[1],
                    heads: q[2],
                    kv_heads: k[2],
                    head_dim: q[3],
                    causal: *causal,
                    scale: *scale,
                    grad,
                }
            }
            Op::Rope { theta, inverse } => {
                let x = rank(0, 4)?;
                if x[3] % 2 != 0 {
                    return Err(err(format!("rope over an odd head dim {}", x[3])));
                }
                NnOp::Rope { batch: x[0], seq: x[1], heads: x[2], head_dim: x[3], theta: *theta, inverse: *inverse }
            }
            Op::Embedding {} => {
                let t = rank(0, 2)?;
                NnOp::Embedding { vocab: t[0], dim: t[1], tokens: shape(1).iter().product() }
            }
            Op::EmbeddingBwd { vocab } => {
                let d = *node.ty.shape.last().ok_or_else(|| err("embedding_bwd to a scalar".into()))?;
                NnOp::EmbeddingBwd { vocab: *vocab, dim: d, tokens: shape(1).iter().product() }
            }
            Op::CrossEntropy { ignore_index } => {
                let l = rank(0, 2)?;
                NnOp::CrossEntropy { rows: l[0], vocab: l[1], ignore_index: *ignore_index }
            }
            Op::CrossEntropyBwd { ignore_index } => {
                let l = rank(1, 2)?;
                NnOp::CrossEntropyBwd { rows: l[0], vocab: l[1], ignore_index: *ignore_index }
            }
            Op::LinearCrossEntropy { ignore_index, chunk } | Op::LinearCrossEntropyBwd { ignore_index, chunk } => {
                let first = usize::from(matches!(node.op, Op::LinearCrossEntropyBwd { .. }));
                let (h, w) = (rank(first, 2)?, rank(first + 1, 2)?);
                if g.ty(node.inputs[first + 1]).dtype != DType::F32 {
                    return Err(LoopError::Unsupported("linear_cross_entropy over an NF4 weight".into()));
                }
                let (rows, dim, vocab, ignore_index, chunk) = (h[0], h[1], w[0], *ignore_index, *chunk);
                if first == 1 {
                    NnOp::LinearCrossEntropyBwd { rows, dim, vocab, ignore_index, chunk }
                } else {
                    NnOp::LinearCrossEntropy { rows, dim, vocab, ignore_index, chunk }
                }
            }
            other => return Err(LoopError::Unsupported(other.mnemonic().to_string())),
        };
        let mut buffers = Vec::with_capacity(node.inputs.len() + 1);
        for &i in &node.inputs {
            let ty = g.ty(i);
            buffers.push(Buffer { value: i, elem: elem_of(ty.dtype)?, shape: ty.shape.clone() });
        }
        let n_inputs = buffers.len();
        buffers.push(Buffer { value: v, elem: elem_of(node.ty.dtype)?, shape: node.ty.shape.clone() });
        Ok(NnKernel { name: name.to_string(), op, buffers, n_inputs })
    }

    /// How the kernel splits its work (see the module docs).
    pub fn launch(&self) -> Launch {
        let (items, team, zero_host, zero_gpu) = match self.op {
            NnOp::Attention { batch, seq, heads, kv_heads, grad, .. } => match grad {
                None | Some(AttnArg::Q) => (batch * seq * heads, Team::Warp, false, false),
                Some(_) => (batch * kv_heads, Team::Block, false, false),
            },
            NnOp::Rope { batch, seq, heads, head_dim, .. } => {
                (batch * seq * heads * (head_dim / 2), Team::Thread, false, false)
            }
            NnOp::Embedding { tokens, .. } => (tokens, Team::Warp, false, false),
            NnOp::EmbeddingBwd { tokens, .. } => (tokens, Team::Warp, false, true),
            NnOp::CrossEntropy { rows, .. } | NnOp::LinearCrossEntropy { rows, .. } => (rows, Team::Block, true, true),
            NnOp::CrossEntropyBwd { rows, .. } | NnOp::LinearCrossEntropyBwd { rows, .. } => {
                (rows, Team::Block, false, false)
            }
        };
        let per_block = match team {
            Team::Thread => NN_BLOCK_THREADS as usize,
            Team::Warp => NN_BLOCK_THREADS as usize / 32,
            Team::Block => 1,
        };
        let grid = items.div_ceil(per_block).clamp(1, 65_535) as u32;
        // The host partitions embedding_bwd by vocabulary rows (each thread owns its rows), so it needs no atomics.
        // Host attention takes a whole (batch, head) per item, or (batch, kv head) for dk and dv (whose thread then
        // owns the gradient's slab).
        let host_items = match self.op {
            NnOp::EmbeddingBwd { vocab, .. } => vocab,
            NnOp::Attention { batch, heads, grad: None | Some(AttnArg::Q), .. } => batch * heads,
            NnOp::Attention { batch, kv_heads, .. } => batch * kv_heads,
            _ => items,
        };
        Launch { host_items, items, team, grid, zero_output_host: zero_host, zero_output_gpu: zero_gpu }
    }
}
