//! Fusion rules that change which ops exist: the LM head's matmul and the cross-entropy become one chunked op (and
//! so do their backwards), so the [tokens, vocab] logits are never materialized.

use super::{as_matmul, nodes, union_all, Rule};
use crate::eqsat::lang::{add, TEGraph};
use ir::Op;

/// Vocabulary rows per chunk of the fused LM-head cross-entropy: 4096 rows keep a chunk of logits for 2048 tokens
/// at 32 MiB (f32) while each chunk is still a large GEMM.
pub const CE_CHUNK: usize = 4096;

pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            name: "fuse-linear-cross-entropy",
            identity: "cross_entropy(matmul(h, W, tb), y) = linear_cross_entropy(h, W, y)",
            apply: fuse_linear_ce,
        },
        Rule {
            name: "fuse-linear-cross-entropy-bwd",
            identity: "matmul(cross_entropy_bwd(d, matmul(h, W, tb), y), W) = linear_cross_entropy_bwd(d, h, W, y)",
            apply: fuse_linear_ce_bwd,
        },
    ]
}

fn chunk(eg: &TEGraph, w: egg::Id) -> usize {
    eg[w].data.shape[0].min(CE_CHUNK)
}

fn fuse_linear_ce(eg: &mut TEGraph) -> usize {
    let mut found = vec![];
    for class in eg.classes() {
        for n in &class.nodes {
            let Op::CrossEntropy { ignore_index } = n.op else { continue };
            for m in nodes(eg, n.children[0]) {
                if let Some((h, w, true)) = as_matmul(&m) {
                    found.push((class.id, ignore_index, h, w, n.children[1]));
                }
            }
        }
    }
    let pairs = found
        .into_iter()
        .map(|(e, ignore_index, h, w, y)| {
            let op = Op::LinearCrossEntropy { ignore_index, chunk: chunk(eg, w) };
            (add(eg, op, vec![h, w, y]), e)
        })
        .collect();
    union_all(eg, pairs)
}

fn fuse_linear_ce_bwd(eg: &mut TEGraph) -> usize {
    let mut found = vec![];
    for class in eg.classes() {
        for n in &class.nodes {
            let Some((dl, w, false)) = as_matmul(n) else { continue };
            for c in nodes(eg, dl) {
                let Op::CrossEntropyBwd { ignore_index } = c.op else { continue };
                for m in nodes(eg, c.children[1]) {
                    match as_matmul(&m) {
                        Some((h, w2, true)) if eg.find(w2) == eg.find(w) => {
                            found.push((class.id, ignore_index, c.children[0], h, w, c.children[2]))
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    let pairs = found
        .into_iter()
        .map(|(e, ignore_index, d, h, w, y)| {
            let op = Op::LinearCrossEntropyBwd { ignore_index, chunk: chunk(eg, w) };
            (add(eg, op, vec![d, h, w, y]), e)
        })
        .collect();
    union_all(eg, pairs)
}
