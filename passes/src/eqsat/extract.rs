//! Extraction: picks one e-node per needed e-class by the target's cost model and rebuilds an IR graph.
//!
//! Costs are DAG-aware: a program's cost is the sum of the own roofline times of the e-nodes it needs, each counted
//! once. Plain tree costs would charge a shared value (one wide GEMM feeding three slices, one dequantized weight
//! read by the forward and the backward) once per use and never see the benefit of sharing; see [`choose`].

use super::lang::{TEGraph, TNode};
use crate::cost::op_time;
use crate::target::Target;
use egg::Id;
use ir::{Node, Type};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The chosen e-node of every needed class.
pub struct Choice {
    pub best: HashMap<Id, TNode>,
    /// The DAG cost of the choice: own costs summed over the classes the roots need, each counted once.
    pub cost: f64,
    /// The DAG cost of the original program under the same model.
    pub original_cost: f64,
}

type Own = HashMap<Id, Vec<(TNode, f64)>>;

/// Best e-node per class when a child's cost is divided by `share(child)` (1 everywhere gives tree costs).
fn select(eg: &TEGraph, own: &Own, order: &[Id], share: &dyn Fn(Id) -> f64) -> HashMap<Id, TNode> {
    let mut cost: HashMap<Id, f64> = HashMap::new();
    let mut best: HashMap<Id, TNode> = HashMap::new();
    loop {
        let mut changed = false;
        for id in order {
            for (n, c) in &own[id] {
                let mut total = *c;
                let mut ok = true;
                for &ch in &n.children {
                    let ch = eg.find(ch);
                    match cost.get(&ch) {
                        Some(cc) => total += cc / share(ch),
                        None => {
                            ok = false;
                            break;
                        }
                    }
                }
                // Strictly better by a relative margin, so ties keep the earlier form.
                if ok && cost.get(id).is_none_or(|&old| total < old * (1.0 - 1e-9)) {
                    cost.insert(*id, total);
                    best.insert(*id, n.clone());
                    changed = true;
                }
            }
        }
        if !changed {
            return best;
        }
    }
}

/// Classes the roots need under a choice, and for each how many needed classes read it.
fn needed(eg: &TEGraph, best: &HashMap<Id, TNode>, roots: &[Id]) -> Option<HashMap<Id, usize>> {
    let mut uses: HashMap<Id, usize> = HashMap::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| eg.find(r)).collect();
    let mut seen = HashSet::new();
    for &r in &stack {
        uses.entry(r).or_insert(0);
    }
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let n = best.get(&id)?;
        let kids: HashSet<Id> = n.children.iter().map(|&c| eg.find(c)).collect();
        for c in kids {
            *uses.entry(c).or_insert(0) += 1;
            stack.push(c);
        }
    }
    Some(uses)
}

fn dag_cost(eg: &TEGraph, own: &Own, best: &HashMap<Id, TNode>, roots: &[Id]) -> Option<f64> {
    let uses = needed(eg, best, roots)?;
    let mut total = 0.0;
    for id in uses.keys() {
        let n = &best[id];
        total += own[id].iter().find(|(m, _)| m == n).map(|(_, c)| *c)?;
    }
    Some(total)
}

/// Chooses what to keep. Candidates: tree costs; costs amortized over every potential parent (so a wide GEMM
/// feeding three slices can win); and, from each, costs re-amortized over the parents actually chosen, until
/// stable. Each candidate is scored by its true DAG cost, and so is the original program (`original` holds each
/// original class's original e-node): the result is never costlier than the input under the model.
pub fn choose(eg: &TEGraph, target: &Target, roots: &[Id], original: &HashMap<Id, TNode>) -> Choice {
    let mut own: Own = HashMap::new();
    let mut potential: HashMap<Id, HashSet<Id>> = HashMap::new();
    for class in eg.classes() {
        for n in &class.nodes {
            let ins: Vec<&Type> = n.children.iter().map(|&c| &eg[c].data).collect();
            own.entry(class.id).or_default().push((n.clone(), op_time(&n.op, &ins, &class.data, target)));
            for &c in &n.children {
                potential.entry(eg.find(c)).or_default().insert(class.id);
            }
        }
    }
    for v in own.values_mut() {
        v.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let mut order: Vec<Id> = own.keys().copied().collect();
    order.sort();
    let mut candidates: Vec<HashMap<Id, TNode>> = vec![];
    let starts: [&dyn Fn(Id) -> f64; 2] = [&|_| 1.0, &|id| potential.get(&id).map_or(1, |p| p.len().max(1)) as f64];
    for start in starts {
        let mut best = select(eg, &own, &order, start);
        for _ in 0..6 {
            candidates.push(best.clone());
            let Some(uses) = needed(eg, &best, roots) else { break };
            let next = select(eg, &own, &order, &|id| uses.get(&id).copied().unwrap_or(1).max(1) as f64);
            if next == best {
                break;
            }
            best = next;
        }
    }
    let original_cost = dag_cost(eg, &own, original, roots).unwrap_or(f64::INFINITY);
    let mut winner = (original.clone(), original_cost);
    for c in candidates {
        if let Some(cost) = dag_cost(eg, &own, &c, roots) {
            if cost < winner.1 * (1.0 - 1e-9) {
                winner = (c, cost);
            }
        }
    }
    Choice { best: winner.0, cost: winner.1, original_cost }
}

/// A node of an extracted graph before numbering: inputs refer to other e-classes.
pub struct Emitted {
    pub class: Id,
    pub node: TNode,
    /// Where the node belongs in the original program: the original position of its class, or (for a class the
    /// rules created) just before its first user.
    pub key: f64,
}

/// The chosen nodes needed by `roots`, children before parents; among ready nodes the one with the smallest
/// `key` comes first (keys are original positions, so the result follows the original program order).
pub fn emit_order(eg: &TEGraph, choice: &Choice, roots: &[Id], key: &HashMap<Id, f64>) -> Vec<Emitted> {
    // Needed classes and their keys (a new class takes the smallest key of its users).
    let mut need: BTreeMap<Id, f64> = BTreeMap::new();
    let mut stack: Vec<(Id, f64)> = roots.iter().map(|&r| (eg.find(r), f64::INFINITY)).collect();
    while let Some((id, user_key)) = stack.pop() {
        let k = key.get(&id).copied().unwrap_or(user_key - 1e-3);
        let entry = need.entry(id).or_insert(f64::INFINITY);
        if k >= *entry {
            continue;
        }
        *entry = k;
        let n = &choice.best[&id];
        for &c in &n.children {
            stack.push((eg.find(c), k));
        }
    }
    // Kahn's algorithm with the keys as priority.
    let mut indeg: HashMap<Id, usize> = HashMap::new();
    let mut users: HashMap<Id, Vec<Id>> = HashMap::new();
    for &id in need.keys() {
        let kids: HashSet<Id> = choice.best[&id].children.iter().map(|&c| eg.find(c)).collect();
        indeg.insert(id, kids.len());
        for c in kids {
            users.entry(c).or_default().push(id);
        }
    }
    let mut ready: BTreeMap<(OrdF64, Id), ()> = BTreeMap::new();
    for (&id, &d) in &indeg {
        if d == 0 {
            ready.insert((OrdF64(need[&id]), id), ());
        }
    }
    let mut out = vec![];
    while let Some(((_, id), ())) = ready.pop_first() {
        out.push(Emitted { class: id, node: choice.best[&id].clone(), key: need[&id] });
        for u in users.get(&id).into_iter().flatten() {
            let d = indeg.get_mut(u).expect("user is needed");
            *d -= 1;
            if *d == 0 {
                ready.insert((OrdF64(need[u]), *u), ());
            }
        }
    }
    assert_eq!(out.len(), need.len(), "extraction found a cycle");
    out
}

/// Total order on f64 keys (no NaNs occur).
#[derive(Clone, Copy)]
struct OrdF64(f64);
impl PartialEq for OrdF64 {
    fn eq(&self, o: &Self) -> bool {
        self.0.total_cmp(&o.0).is_eq()
    }
}
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// An IR node for an emitted e-node, given the numbering of classes already emitted.
pub fn to_node(eg: &TEGraph, e: &Emitted, ids: &HashMap<Id, ir::ValueId>, label: Option<String>) -> Node {
    Node {
        op: e.node.op.clone(),
        inputs: e.node.children.iter().map(|c| ids[&eg.find(*c)]).collect(),
        ty: eg[e.class].data.clone(),
        label,
    }
}
