//! Drops the `logits` output from the training step: the step needs the loss, not [tokens, vocab] logits.

use crate::Pass;

/// Removes the `logits` output from the training step.
pub struct DropLogits;

impl Pass for DropLogits {
    fn name(&self) -> &'static str {
        "drop-logits"
    }
    fn run(&self, g: &mut ir::Graph) -> Result<String, String> {
        let n = g.outputs.len();
        g.outputs.retain(|o| o.kind != ir::OutputKind::Logits);
        Ok(format!("dropped {} output", n - g.outputs.len()))
    }
}
