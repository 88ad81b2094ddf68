//! The pass pipeline, in order, and why each pass sits where it does.

use crate::adamw::AdamW;
use crate::autodiff::{Autodiff, Wrt};
use crate::cse::Cse;
use crate::dce::Dce;
use crate::drop_logits::DropLogits;
use crate::eqsat::Eqsat;
use crate::frozen_grads::EliminateFrozenGrads;
use crate::fuse::Fuse;
use crate::recompute::{RecomputeFor, RecomputePolicy};
use crate::schedule::Schedule;
use crate::target::Target;
use crate::Pass;

/// What the pipeline needs from the recipe and the command line.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    pub adamw: AdamW,
    /// The machine the cost model optimizes for.
    pub target: Target,
    /// Stop after the training step is formed (no rewrites): the reference the optimized step is checked against.
    pub unoptimized: bool,
    /// Activation recompute: `None` chooses against the target's memory.
    pub recompute: Option<RecomputePolicy>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions { adamw: AdamW::default(), target: Target::h100(), unoptimized: false, recompute: None }
    }
}

/// The passes that turn a forward graph (outputs: loss, logits) into a whole training step.
pub fn training_pipeline(opts: &PipelineOptions) -> Vec<Box<dyn Pass>> {
    let mut passes: Vec<Box<dyn Pass>> = vec![
        // 1. The backward graph, naively w.r.t. every float parameter, so the next pass has something to prove.
        Box::new(Autodiff { wrt: Wrt::AllParams }),
        // 2. Frozen weights need no gradient: drop those outputs and all that only fed them (weight-gradient
        //    matmuls of frozen linears, dX chains that end at frozen embeddings). Runs before the optimizer so
        //    AdamW only sees trainable gradients.
        Box::new(EliminateFrozenGrads),
        // 3. The optimizer step: clipping + AdamW, reading the surviving gradients.
        Box::new(AdamW { ..opts.adamw.clone() }),
        // 4. The training step does not return logits (the loss is what it needs); drop them and what only fed them.
        Box::new(DropLogits),
    ];
    if opts.unoptimized {
        passes.push(Box::new(Dce));
        return passes;
    }
    passes.extend::<Vec<Box<dyn Pass>>>(vec![
        // 5. Merge duplicates (and drop what is dead) so the e-graph starts small.
        Box::new(Cse),
        // 6. Equality saturation: NF4 dequantization into GEMMs, LoRA folds and merges, the fused LM-head
        //    cross-entropy; extraction by the target's cost model. After the optimizer so its rewrites see the
        //    whole step (forward, backward and the update).
        Box::new(Eqsat::new(opts.target.clone())),
        // 7. What extraction made dead (the dequantized weights, the logits) goes.
        Box::new(Dce),
        // 8. Activation recompute (off / per block), chosen against the memory budget. After CSE and eqsat, which
        //    would merge the recomputed copies back into the originals; before fusion, which groups them.
        Box::new(RecomputeFor { policy: opts.recompute, budget_bytes: opts.target.memory_bytes }),
        // 9. Kernel groups: elementwise and reduction ops join the GEMM/attention/norm kernel that produces or
        //    consumes their values (epilogues, prologues); after eqsat so the fused ops are the anchors.
        Box::new(Fuse),
        // 10. A topological order of kernels that frees memory early; memory planning reads this order.
        Box::new(Schedule),
    ]);
    passes
}
