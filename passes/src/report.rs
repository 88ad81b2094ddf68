//! The compile report: what one training step costs and what the optimizer did, for a person (`--report`) and
//! for tools (`--report-json`).

use crate::cost::{flops, is_view, kernel_time};
use crate::memory;
use crate::target::Target;
use ir::{Graph, Op, OutputKind, Role, ValueId};
use serde_json::{json, Value};
use std::collections::HashSet;

/// Step-level numbers of one graph.
#[derive(Clone, Debug)]
pub struct StepMetrics {
    pub nodes: usize,
    /// Kernel groups, or (before fusion) every op that moves data.
    pub kernels: usize,
    pub flops_per_step: f64,
    /// Bytes crossing kernel boundaries (before fusion: every op reads its inputs and writes its output).
    pub bytes_per_step: f64,
    /// Roofline estimate of the step on the target, launches included.
    pub modeled_seconds: f64,
    pub peak_memory_bytes: usize,
    pub persistent_bytes: usize,
    pub frozen_weight_grad_matmuls: usize,
    pub materialized_dequant: usize,
    /// LoRA branches folded into their base GEMM (forward, one per adapted module; recomputed copies not counted).
    pub fused_lora_linears: usize,
    /// Backward dX GEMMs with the LoRA rank update folded in.
    pub fused_lora_linears_bwd: usize,
    /// Quantized GEMMs with NF4 dequantization in the prologue (LoRA-fused ones included).
    pub quantized_gemms: usize,
}

/// Nodes that some output of `pick` depends on.
fn needed_by(g: &Graph, pick: &dyn Fn(&OutputKind) -> bool) -> Vec<bool> {
    let mut need = vec![false; g.nodes.len()];
    for o in g.outputs.iter().filter(|o| pick(&o.kind)) {
        need[o.value.index()] = true;
    }
    for i in (0..g.nodes.len()).rev() {
        if need[i] {
            for v in &g.nodes[i].inputs {
                need[v.index()] = true;
            }
        }
    }
    need
}

/// For each node, whether a node of another kernel (or a graph output) reads it.
fn used_outside(g: &Graph) -> Vec<bool> {
    let mut kernel_of = vec![usize::MAX; g.nodes.len()];
    for (k, kern) in g.kernels.iter().enumerate() {
        for v in &kern.nodes {
            kernel_of[v.index()] = k;
        }
    }
    let mut out = vec![false; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        for v in &n.inputs {
            if kernel_of[v.index()] != kernel_of[i] || kernel_of[i] == usize::MAX {
                out[v.index()] = true;
            }
        }
    }
    for o in &g.outputs {
        out[o.value.index()] = true;
    }
    out
}

pub fn step_metrics(g: &Graph, target: &Target) -> StepMetrics {
    let frozen: HashSet<&str> = g.params().into_iter().filter(|p| p.2 == Role::Frozen).map(|p| p.1).collect();
    let for_frozen = needed_by(g, &|k| matches!(k, OutputKind::Grad(p) if frozen.contains(p.as_str())));
    let for_rest = needed_by(g, &|k| !matches!(k, OutputKind::Grad(p) if frozen.contains(p.as_str())));
    let outside = used_outside(g);
    let mut m = StepMetrics {
        nodes: g.nodes.len(),
        kernels: 0,
        flops_per_step: 0.0,
        bytes_per_step: 0.0,
        modeled_seconds: 0.0,
        peak_memory_bytes: 0,
        persistent_bytes: 0,
        frozen_weight_grad_matmuls: 0,
        materialized_dequant: 0,
        fused_lora_linears: 0,
        fused_lora_linears_bwd: 0,
        quantized_gemms: 0,
    };
    for (i, n) in g.nodes.iter().enumerate() {
        let v = ValueId(i as u32);
        m.flops_per_step += flops(g, v);
        match &n.op {
            Op::MatMul { ta: true, .. } if for_frozen[i] && !for_rest[i] => m.frozen_weight_grad_matmuls += 1,
            Op::Nf4Dequantize {} if g.kernels.is_empty() || outside[i] => m.materialized_dequant += 1,
            // Recomputed copies (per-block recompute) are the same modules again: count each module once.
            Op::LoraLinear { tb: true, .. } if !n.label.as_deref().is_some_and(|l| l.ends_with("(recompute)")) => {
                m.fused_lora_linears += 1
            }
            Op::LoraLinear { tb: false, .. } => m.fused_lora_linears_bwd += 1,
            _ => {}
        }
        let quantized = matches!(n.op, Op::QMatMul { .. })
            || matches!(n.op, Op::LoraLinear { .. } if matches!(g.ty(n.inputs[1]).dtype, ir::DType::Nf4(_)));
        m.quantized_gemms += quantized as usize;
    }
    if g.kernels.is_empty() {
        for (i, n) in g.nodes.iter().enumerate() {
            if n.op.is_leaf() || is_view(&n.op) {
                continue;
            }
            let v = ValueId(i as u32);
            m.kernels += 1;
            m.bytes_per_step += crate::cost::bytes(g, v);
            m.modeled_seconds += crate::cost::node_time(g, v, target);
        }
    } else {
        m.kernels = g.kernels.len();
        for k in &g.kernels {
            let inside = |v: ValueId| k.nodes.binary_search(&v).is_ok();
            let mut read = HashSet::new();
            let mut written = 0usize;
            for &v in &k.nodes {
                for &i in &g.node(v).inputs {
                    if !inside(i) {
                        read.insert(i);
                    }
                }
                if outside[v.index()] && !is_view(&g.node(v).op) {
                    written += g.ty(v).bytes();
                }
            }
            m.bytes_per_step += (read.iter().map(|&i| g.ty(i).bytes()).sum::<usize>() + written) as f64;
            m.modeled_seconds += kernel_time(g, &k.nodes, &|v| outside[v.index()], target);
        }
    }
    let plan = memory::plan(g);
    m.peak_memory_bytes = plan.peak_bytes;
    m.persistent_bytes = plan.persistent_bytes;
    m
}

impl StepMetrics {
    pub fn to_json(&self) -> Value {
        json!({
            "nodes": self.nodes,
            "kernels": self.kernels,
            "flops_per_step": self.flops_per_step,
            "bytes_per_step": self.bytes_per_step,
            "modeled_seconds": self.modeled_seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "persistent_bytes": self.persistent_bytes,
            "frozen_weight_grad_matmuls": self.frozen_weight_grad_matmuls,
            "materialized_dequant": self.materialized_dequant,
            "fused_lora_linears": self.fused_lora_linears,
            "fused_lora_linears_bwd": self.fused_lora_linears_bwd,
            "quantized_gemms": self.quantized_gemms,
        })
    }
}

fn gb(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2} G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else {
        format!("{:.0}", x)
    }
}

/// The side-by-side table `tunec compile --report` prints.
pub fn table(before: &StepMetrics, after: &StepMetrics, target: &Target) -> String {
    let rows: Vec<(&str, String, String)> = vec![
        ("IR nodes", before.nodes.to_string(), after.nodes.to_string()),
        ("kernels", before.kernels.to_string(), after.kernels.to_string()),
        ("FLOP per step", gb(before.flops_per_step), gb(after.flops_per_step)),
        ("bytes moved per step", gb(before.bytes_per_step), gb(after.bytes_per_step)),
        (
            "modeled step time",
            format!("{:.1} ms", before.modeled_seconds * 1e3),
            format!("{:.1} ms", after.modeled_seconds * 1e3),
        ),
        ("peak memory", gb(before.peak_memory_bytes as f64), gb(after.peak_memory_bytes as f64)),
        (
            "frozen weight-grad matmuls",
            before.frozen_weight_grad_matmuls.to_string(),
            after.frozen_weight_grad_matmuls.to_string(),
        ),
        ("materialized NF4 dequant", before.materialized_dequant.to_string(), after.materialized_dequant.to_string()),
        ("fused LoRA linears (fwd)", before.fused_lora_linears.to_string(), after.fused_lora_linears.to_string()),
        (
            "fused LoRA dX GEMMs (bwd)",
            before.fused_lora_linears_bwd.to_string(),
            after.fused_lora_linears_bwd.to_string(),
        ),
        ("GEMMs reading NF4 directly", before.quantized_gemms.to_string(), after.quantized_gemms.to_string()),
    ];
    let mut s = format!("{:<30} {:>14} {:>14}   (target: {})\n", "", "unoptimized", "optimized", target.name);
    for (k, a, b) in rows {
        s.push_str(&format!("{k:<30} {a:>14} {b:>14}\n"));
    }
    s
}
