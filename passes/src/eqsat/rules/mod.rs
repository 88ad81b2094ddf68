//! Rewrite rules, grouped by topic. Each rule searches the e-graph, then adds the equal terms it found and unions
//! them with the matched e-class; nothing is ever removed — extraction decides what is worth keeping.

pub mod fusion;
pub mod lora;
pub mod quant;

use super::lang::{TEGraph, TNode};
use egg::Id;
use ir::Op;

/// One rule: a kebab-case name, the algebraic identity it adds, and its search-then-apply function (returns the
/// number of e-class unions that changed the e-graph).
pub struct Rule {
    pub name: &'static str,
    pub identity: &'static str,
    pub apply: fn(&mut TEGraph) -> usize,
}

/// Every rule, by topic.
pub fn all() -> Vec<Rule> {
    let mut r = quant::rules();
    r.extend(lora::rules());
    r.extend(fusion::rules());
    r
}

/// The e-nodes of a class.
pub(crate) fn nodes(eg: &TEGraph, id: Id) -> Vec<TNode> {
    eg[id].nodes.clone()
}

/// Applies a batch of (new term, class it equals) pairs; returns how many unions changed something.
pub(crate) fn union_all(eg: &mut TEGraph, found: Vec<(Id, Id)>) -> usize {
    let mut n = 0;
    for (a, b) in found {
        if eg.union(a, b) {
            n += 1;
        }
    }
    n
}

/// `matmul{ta=false, tb}(a, b)` → (a, b, tb)
pub(crate) fn as_matmul(n: &TNode) -> Option<(Id, Id, bool)> {
    match n.op {
        Op::MatMul { ta: false, tb } => Some((n.children[0], n.children[1], tb)),
        _ => None,
    }
}
