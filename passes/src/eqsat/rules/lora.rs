//! LoRA rules: the B-projection folds into its base GEMM as a rank-r epilogue (never forming B·A), sibling
//! A-projections that read the same input merge into one wider GEMM, and sums of GEMMs re-group so that each
//! base/low-rank pair in the backward's dX sum can fold too.

use super::{as_matmul, nodes, union_all, Rule};
use crate::eqsat::lang::{add, TEGraph, TNode};
use egg::Id;
use ir::{Op, Role};
use std::collections::BTreeMap;

/// Largest inner dimension treated as "low rank" by the fold.
pub const MAX_RANK: usize = 512;

pub fn rules() -> Vec<Rule> {
    vec![
        Rule {
            name: "fold-lora-branch",
            identity: "x·op(W) + s·(u·op(B)) = lora_linear(x, W, u, B, s)   (rank(u) ≪ rank(x); W may be NF4)",
            apply: fold_lora_branch,
        },
        Rule {
            name: "reassociate-gemm-sum",
            identity: "(a + P) + Q = a + (P + Q)   for GEMM-like P, Q only",
            apply: reassociate_gemm_sum,
        },
        Rule {
            name: "merge-sibling-lora-a",
            identity: "x·A₁ᵀ, …, x·Aₙᵀ = slices of x·[A₁; …; Aₙ]ᵀ   (LoRA A-projections of one input)",
            apply: merge_sibling_lora_a,
        },
    ]
}

/// A base product: `matmul(x, W, tb)` or `qmatmul(x, q, tb)` → (x, W, tb).
fn as_base(n: &TNode) -> Option<(Id, Id, bool)> {
    match n.op {
        Op::QMatMul { tb } => Some((n.children[0], n.children[1], tb)),
        _ => as_matmul(n),
    }
}

/// A low-rank term: `scale{c}(matmul(u, B, tb))` or `matmul(u, B, tb)` → (u, B, tb, s).
fn low_terms(eg: &TEGraph, class: Id) -> Vec<(Id, Id, bool, f64)> {
    let mut out = vec![];
    for n in nodes(eg, class) {
        if let Some((u, b, tb)) = as_matmul(&n) {
            out.push((u, b, tb, 1.0));
        }
        if let Op::Scale { c } = n.op {
            for m in nodes(eg, n.children[0]) {
                if let Some((u, b, tb)) = as_matmul(&m) {
                    out.push((u, b, tb, c));
                }
            }
        }
    }
    out
}

fn inner(eg: &TEGraph, x: Id) -> usize {
    let t = &eg[x].data;
    if t.rank() == 2 {
        t.shape[1]
    } else {
        usize::MAX
    }
}

fn fold_lora_branch(eg: &mut TEGraph) -> usize {
    let mut found = vec![];
    for class in eg.classes() {
        for n in &class.nodes {
            let Op::Add {} = n.op else { continue };
            let (a, b) = (n.children[0], n.children[1]);
            if eg[a].data != class.data || eg[b].data != class.data {
                continue; // broadcasting add: not a GEMM sum
            }
            for (base, low) in [(a, b), (b, a)] {
                for bn in nodes(eg, base) {
                    let Some((x, w, tb)) = as_base(&bn) else { continue };
                    for (u, bm, tb2, s) in low_terms(eg, low) {
                        let (k, r) = (inner(eg, x), inner(eg, u));
                        if tb == tb2 && r < k && r <= MAX_RANK && eg[x].data.rank() == 2 {
                            found.push((class.id, Op::LoraLinear { s, tb }, vec![x, w, u, bm]));
                        }
                    }
                }
            }
        }
    }
    let pairs = found.into_iter().map(|(e, op, ch)| (add(eg, op, ch), e)).collect();
    union_all(eg, pairs)
}

fn gemm_like(eg: &TEGraph, class: Id) -> bool {
    nodes(eg, class)
        .iter()
        .any(|n| as_base(n).is_some() || matches!(n.op, Op::LoraLinear { .. }) || !low_terms(eg, class).is_empty())
}

fn reassociate_gemm_sum(eg: &mut TEGraph) -> usize {
    let mut found = vec![];
    for class in eg.classes() {
        for n in &class.nodes {
            let Op::Add {} = n.op else { continue };
            let (l, q) = (n.children[0], n.children[1]);
            if eg[l].data != class.data || eg[q].data != class.data || !gemm_like(eg, q) {
                continue;
            }
            for ln in nodes(eg, l) {
                let Op::Add {} = ln.op else { continue };
                let (a, p) = (ln.children[0], ln.children[1]);
                if eg[a].data == class.data && eg[p].data == class.data && gemm_like(eg, p) {
                    found.push((class.id, a, p, q));
                }
            }
        }
    }
    let pairs = found
        .into_iter()
        .map(|(e, a, p, q)| {
            let pq = add(eg, Op::Add {}, vec![p, q]);
            (add(eg, Op::Add {}, vec![a, pq]), e)
        })
        .collect();
    union_all(eg, pairs)
}

/// The name of the trainable LoRA A parameter in a class, if it is one.
fn lora_a_name(eg: &TEGraph, class: Id) -> Option<String> {
    eg[class].nodes.iter().find_map(|n| match &n.op {
        Op::Param { name, role: Role::Trainable, .. } if name.ends_with(".lora_A.weight") => Some(name.clone()),
        _ => None,
    })
}

fn merge_sibling_lora_a(eg: &mut TEGraph) -> usize {
    // input class → (A's name, A's class, the projection's class), ordered by name for a stable concat order.
    let mut by_input: BTreeMap<Id, BTreeMap<String, (Id, Id)>> = BTreeMap::new();
    for class in eg.classes() {
        for n in &class.nodes {
            if let Some((x, a, true)) = as_matmul(n) {
                if let Some(name) = lora_a_name(eg, a) {
                    by_input.entry(eg.find(x)).or_default().insert(name, (eg.find(a), class.id));
                }
            }
        }
    }
    let mut pairs = vec![];
    for (x, sibs) in by_input {
        if sibs.len() < 2 {
            continue;
        }
        let a_ids: Vec<Id> = sibs.values().map(|(a, _)| *a).collect();
        let cat = add(eg, Op::Concat { axis: 0 }, a_ids.clone());
        let wide = add(eg, Op::MatMul { ta: false, tb: true }, vec![x, cat]);
        let mut off = 0;
        for (a, proj) in sibs.values() {
            let r = eg[*a].data.shape[0];
            let s = add(eg, Op::Slice { axis: 1, start: off, end: off + r }, vec![wide]);
            pairs.push((s, *proj));
            off += r;
        }
    }
    union_all(eg, pairs)
}
