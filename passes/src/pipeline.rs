//! The pass pipeline, in order, and why each pass sits where it does.

use crate::adamw::AdamW;
use crate::autodiff::{Autodiff, Wrt};
use crate::dce::Dce;
use crate::drop_logits::DropLogits;
use crate::frozen_grads::EliminateFrozenGrads;
use crate::Pass;

/// What the pipeline needs from the recipe.
#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    pub adamw: AdamW,
}

/// The passes that turn a forward graph (outputs: loss, logits) into a whole training step.
pub fn training_pipeline(opts: &PipelineOptions) -> Vec<Box<dyn Pass>> {
    vec![
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
        Box::new(Dce),
    ]
}
