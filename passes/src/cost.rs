//! The cost model: FLOPs and bytes of each op, and a roofline time estimate on a [`Target`].
//!
//! Bytes count what an op reads and writes when it runs as its own kernel (every input read once, the output
//! written once; NF4 weights at their packed size). Fused kernels are costed by [`kernel_cost`], which counts only
//! the values that cross the kernel's boundary.

use crate::target::Target;
use ir::{Graph, Op, Type, ValueId};

/// FLOPs of one node (multiply-add = 2).
pub fn flops(g: &Graph, v: ValueId) -> f64 {
    let n = g.node(v);
    let ins: Vec<&Type> = n.inputs.iter().map(|&i| g.ty(i)).collect();
    op_flops(&n.op, &ins, &n.ty)
}

/// FLOPs of an op with these input and output types.
pub fn op_flops(op: &Op, ins: &[&Type], out_ty: &Type) -> f64 {
    let out = out_ty.numel() as f64;
    let ty = |i: usize| ins[i];
    let mm = |a: &ir::Type, ta: bool| -> f64 {
        // 2·m·n·k: k is a's contracted axis.
        let r = a.rank();
        let k = if ta { a.shape[r - 2] } else { a.shape[r - 1] };
        2.0 * out * k as f64
    };
    match op {
        Op::Param { .. } | Op::Input { .. } | Op::Const { .. } => 0.0,
        Op::Reshape { .. } | Op::Transpose { .. } | Op::Concat { .. } | Op::Slice { .. } => 0.0,
        Op::BroadcastTo { .. } | Op::Cast { .. } | Op::StopGradient {} => 0.0,
        Op::SumTo { .. } | Op::Sum { .. } => ty(0).numel() as f64,
        Op::MatMul { ta, .. } => mm(ty(0), *ta),
        Op::QMatMul { .. } => mm(ty(0), false) + ty(1).numel() as f64,
        Op::LoraLinear { .. } => mm(ty(0), false) + mm(ty(2), false) + out,
        Op::LinearCrossEntropy { .. } => {
            let (nt, d, vocab) = (ty(0).shape[0] as f64, ty(0).shape[1] as f64, ty(1).shape[0] as f64);
            2.0 * nt * d * vocab + 5.0 * nt * vocab
        }
        Op::LinearCrossEntropyBwd { .. } => {
            let (nt, d, vocab) = (ty(1).shape[0] as f64, ty(1).shape[1] as f64, ty(2).shape[0] as f64);
            // recompute logits, softmax, then dlogits·W
            4.0 * nt * d * vocab + 6.0 * nt * vocab
        }
        Op::Attention { causal, .. } | Op::AttentionBwd { causal, .. } => {
            let q = if matches!(op, Op::Attention { .. }) { ty(0) } else { ty(1) };
            let (b, t, h, hd) = (q.shape[0] as f64, q.shape[1] as f64, q.shape[2] as f64, q.shape[3] as f64);
            let full = 4.0 * b * h * t * t * hd; // QKᵀ and PV
            let fwd = if *causal { full / 2.0 } else { full };
            if matches!(op, Op::Attention { .. }) {
                fwd
            } else {
                // each of dq, dk, dv recomputes P and does ~1 extra product
                fwd * 1.5
            }
        }
        Op::CrossEntropy { .. } | Op::Softmax {} => 5.0 * ty(0).numel() as f64,
        Op::CrossEntropyBwd { .. } => 6.0 * ty(1).numel() as f64,
        Op::SoftmaxBwd {} => 4.0 * out,
        Op::RmsNorm { .. } | Op::RmsNormBwdW { .. } => 4.0 * ty(0).numel() as f64,
        Op::RmsNormBwdX { .. } => 8.0 * out,
        Op::Rope { .. } => 6.0 * out,
        Op::Embedding {} => 0.0,
        Op::EmbeddingBwd { .. } => ty(0).numel() as f64,
        Op::Nf4Quantize { .. } => 4.0 * out,
        Op::Nf4Dequantize {} => 2.0 * out,
        Op::Silu {} | Op::Sigmoid {} | Op::SiluBwd {} | Op::Swiglu {} => 5.0 * out,
        Op::Exp {} | Op::Log {} | Op::Sqrt {} | Op::Rsqrt {} => 2.0 * out,
        Op::Add {} | Op::Sub {} | Op::Mul {} | Op::Div {} | Op::Minimum {} | Op::Maximum {} | Op::Neg {} => out,
        Op::Scale { .. } | Op::Dropout { .. } => out,
        Op::AdamWMoment { .. } => 3.0 * out,
        Op::AdamWUpdate { .. } => 8.0 * out,
    }
}

/// Whether the op's FLOPs run on the matrix units (tensor cores / the GEMM micro-kernel).
pub fn is_matmul_like(op: &Op) -> bool {
    matches!(
        op,
        Op::MatMul { .. }
            | Op::QMatMul { .. }
            | Op::LoraLinear { .. }
            | Op::LinearCrossEntropy { .. }
            | Op::LinearCrossEntropyBwd { .. }
            | Op::Attention { .. }
            | Op::AttentionBwd { .. }
    )
}

/// Whether the op moves no data when it runs (a view of its input).
pub fn is_view(op: &Op) -> bool {
    matches!(op, Op::Reshape { .. } | Op::StopGradient {})
}

/// Bytes an op's kernel template reads beyond reading each input once: the fused LM-head cross-entropy
/// (`codegen::nn`) streams the whole weight once per token row — once in the forward, twice in the backward
/// (logsumexp, then Σ dlogit·W) — so fusing it pays only while that stays below the logits' round trip.
fn template_rereads(op: &Op, ins: &[&Type]) -> f64 {
    match op {
        Op::LinearCrossEntropy { .. } => (ins[0].shape[0].saturating_sub(1) * ins[1].bytes()) as f64,
        Op::LinearCrossEntropyBwd { .. } => (2 * ins[1].shape[0] - 1) as f64 * ins[2].bytes() as f64,
        _ => 0.0,
    }
}

/// Roofline time of an op as its own kernel, from its types (views and leaves are free; a slice is a strided view
/// its consumer reads).
pub fn op_time(op: &Op, ins: &[&Type], out: &Type, t: &Target) -> f64 {
    if op.is_leaf() || is_view(op) || matches!(op, Op::Slice { .. }) {
        return 0.0;
    }
    let by = ins.iter().map(|i| i.bytes()).sum::<usize>() as f64 + out.bytes() as f64 + template_rereads(op, ins);
    let peak = if is_matmul_like(op) { t.peak_flops } else { t.vector_flops };
    (op_flops(op, ins, out) / peak).max(by / t.bandwidth) + t.launch_overhead
}

/// Bytes one node moves as its own kernel: inputs read once, output written once (views and leaves move nothing).
pub fn bytes(g: &Graph, v: ValueId) -> f64 {
    let n = g.node(v);
    if n.op.is_leaf() || is_view(&n.op) {
        return 0.0;
    }
    let ins: Vec<&Type> = n.inputs.iter().map(|&i| g.ty(i)).collect();
    let read: usize = ins.iter().map(|t| t.bytes()).sum();
    (read + n.ty.bytes()) as f64 + template_rereads(&n.op, &ins)
}

/// Roofline time of one node as its own kernel on `t`, launch included (views and leaves are free).
pub fn node_time(g: &Graph, v: ValueId, t: &Target) -> f64 {
    let n = g.node(v);
    if n.op.is_leaf() || is_view(&n.op) {
        return 0.0;
    }
    let peak = if is_matmul_like(&n.op) { t.peak_flops } else { t.vector_flops };
    (flops(g, v) / peak).max(bytes(g, v) / t.bandwidth) + t.launch_overhead
}

/// Roofline time of a fused kernel: its FLOPs, and only the bytes crossing its boundary (inputs from outside the
/// group, values used outside it or as graph outputs).
pub fn kernel_time(g: &Graph, nodes: &[ValueId], uses_outside: &dyn Fn(ValueId) -> bool, t: &Target) -> f64 {
    let inside = |v: ValueId| nodes.binary_search(&v).is_ok();
    let mut read = std::collections::BTreeSet::new();
    let (mut fl, mut mm, mut written, mut rereads) = (0.0, false, 0usize, 0.0);
    for &v in nodes {
        let n = g.node(v);
        fl += flops(g, v);
        let ins: Vec<&Type> = n.inputs.iter().map(|&i| g.ty(i)).collect();
        rereads += template_rereads(&n.op, &ins);
        mm |= is_matmul_like(&n.op);
        for &i in &n.inputs {
            if !inside(i) {
                read.insert(i);
            }
        }
        if uses_outside(v) && !is_view(&n.op) {
            written += n.ty.bytes();
        }
    }
    let by = (read.iter().map(|&i| g.ty(i).bytes()).sum::<usize>() + written) as f64 + rereads;
    let peak = if mm { t.peak_flops } else { t.vector_flops };
    (fl / peak).max(by / t.bandwidth) + t.launch_overhead
}
