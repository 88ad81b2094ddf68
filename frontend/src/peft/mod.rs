//! PEFT methods as graph transformations: pure functions from a forward graph to a new forward graph, each
//! rebuilding the graph node by node (old value → new value remap) and verifying the result.
//!
//! | module | transformation |
//! |---|---|
//! | `targets` | finding linear modules; PEFT's target matching (names, regex, ALL_LINEAR) |
//! | `lora` | LoRA / rsLoRA: `y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ`; DoRA dispatches to `dora` |
//! | `dora` | DoRA: magnitude ⊙ direction with the detached weight norm, as PEFT 0.21 computes it |
//! | `qlora` | NF4 storage of base weights, dequantized before their matmul |

pub mod dora;
pub mod lora;
pub mod qlora;
pub mod targets;

pub use lora::{apply_lora, LoraSpec};
pub use qlora::{apply_nf4, Nf4Spec};
pub use targets::{linear_modules, select, LinearModule, TargetError, TargetSpec};

use ir::graph::BuildError;
use ir::verify::VerifyError;
use ir::{Builder, Graph, Node, Output, ValueId};

/// Graph nodes visited by the front end's passes over the graph (finding modules, rebuilding it for quantization
/// and adapters, checking a parameter name is new), in this process: tests check it grows linearly with depth.
static NODES_VISITED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// See [`NODES_VISITED`].
pub fn nodes_visited() -> u64 {
    NODES_VISITED.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) fn count_visits(n: usize) {
    NODES_VISITED.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
}

/// A transformation that could not be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PeftError {
    #[error("module `{module}`: {source}")]
    Build { module: String, source: BuildError },
    #[error("the transformed graph does not verify: {0}")]
    Verify(#[from] VerifyError),
    #[error("module `{0}` is already quantized")]
    AlreadyQuantized(String),
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl PeftError {
    pub(crate) fn build(module: &str) -> impl FnOnce(BuildError) -> PeftError + '_ {
        move |source| PeftError::Build { module: module.to_string(), source }
    }
}

/// Rebuilds `g` node by node. `prologue` may emit nodes first (an input the new nodes need); for each old node,
/// `replace(builder, old id, old node, remapped inputs)` either emits nodes and returns the value that stands for
/// the old one, or returns `None` to copy the node as it is. Outputs are remapped; the result is verified.
pub(crate) fn rebuild(
    g: &Graph,
    prologue: impl FnOnce(&mut Builder) -> Result<(), PeftError>,
    mut replace: impl FnMut(&mut Builder, ValueId, &Node, &[ValueId]) -> Result<Option<ValueId>, PeftError>,
) -> Result<Graph, PeftError> {
    let mut b = Builder::new(g.name.clone());
    prologue(&mut b)?;
    count_visits(g.nodes.len());
    let mut remap: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
    for (i, n) in g.nodes.iter().enumerate() {
        let inputs: Vec<ValueId> = n.inputs.iter().map(|v| remap[v.index()]).collect();
        let old = ValueId(i as u32);
        let new = match replace(&mut b, old, n, &inputs)? {
            Some(v) => v,
            None => b
                .graph
                .push(n.op.clone(), inputs, Some(n.ty.clone()), n.label.clone())
                .map_err(|source| PeftError::Build { module: n.label.clone().unwrap_or_default(), source })?,
        };
        remap.push(new);
    }
    let mut out = b.finish();
    out.outputs = g.outputs.iter().map(|o| Output { kind: o.kind.clone(), value: remap[o.value.index()] }).collect();
    ir::verify::verify(&out)?;
    Ok(out)
}

/// A stable 64-bit seed from a module name (FNV-1a), so each module's dropout mask differs and never changes
/// between compilations.
pub fn module_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
