//! Frozen-gradient elimination: drops the gradient outputs of frozen parameters and everything only they needed —
//! the weight-gradient matmuls of every frozen linear, and the input gradients (dX) whose only consumers were frozen
//! (e.g. the backward of the first layer's embedding lookup).

use crate::Pass;
use ir::{Graph, Op, OutputKind, Role};

pub struct EliminateFrozenGrads;

impl Pass for EliminateFrozenGrads {
    fn name(&self) -> &'static str {
        "eliminate-frozen-grads"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        // A set: one lookup per output (a list made this quadratic in the number of parameters).
        let frozen: std::collections::HashSet<String> = g
            .params()
            .into_iter()
            .filter(|(_, _, role)| *role == Role::Frozen)
            .map(|(_, name, _)| name.to_string())
            .collect();
        let before_outputs = g.outputs.len();
        g.outputs.retain(|o| !matches!(&o.kind, OutputKind::Grad(p) if frozen.contains(p)));
        let dropped = before_outputs - g.outputs.len();
        let matmuls_before = count_matmuls(g);
        let removed = g.remove_dead();
        Ok(format!(
            "dropped {dropped} frozen-parameter gradients; removed {removed} nodes, {} of them matmuls",
            matmuls_before - count_matmuls(g)
        ))
    }
}

fn count_matmuls(g: &Graph) -> usize {
    g.nodes.iter().filter(|n| matches!(n.op, Op::MatMul { .. })).count()
}
