//! Quantization rules: NF4 weights are dequantized inside the GEMM, never into a buffer.

use super::{as_matmul, nodes, union_all, Rule};
use crate::eqsat::lang::{add, TEGraph};
use ir::Op;

pub fn rules() -> Vec<Rule> {
    vec![Rule {
        name: "fuse-dequant-matmul",
        identity: "matmul(x, nf4_dequantize(q), tb) = qmatmul(x, q, tb)   (forward x·Wᵀ and backward dY·W)",
        apply: fuse_dequant_matmul,
    }]
}

fn fuse_dequant_matmul(eg: &mut TEGraph) -> usize {
    let mut found = vec![];
    for class in eg.classes() {
        for n in &class.nodes {
            let Some((x, w, tb)) = as_matmul(n) else { continue };
            for d in nodes(eg, w) {
                if let Op::Nf4Dequantize {} = d.op {
                    found.push((class.id, x, d.children[0], tb));
                }
            }
        }
    }
    let pairs = found.into_iter().map(|(e, x, q, tb)| (add(eg, Op::QMatMul { tb }, vec![x, q]), e)).collect();
    union_all(eg, pairs)
}
