//! Activation recomputation (gradient checkpointing) per transformer block: the backward pass reads a recomputed
//! copy of each block's activations instead of keeping them alive from the forward pass.
//!
//! A block is the forward nodes labelled `model.layers.{i}` or `model.layers.{i}.…` (backward nodes end in
//! ` (bwd)`). Its *checkpoints* stay alive as before: the values entering the block (the residual stream) and the
//! values leaving it (read by forward code outside the block, or graph outputs). Every other activation of block `i`
//! that a backward node reads is recomputed: the block's forward nodes needed for those reads are cloned (labelled
//! `… (recompute)`) right before the block's first backward node, reading the checkpoints, and the
//! backward reads are redirected to the clones. Parameters, inputs and constants are shared, never cloned; a cloned
//! dropout keeps its seed and reads the same `step` input, so its mask is the original's. Forward values that only
//! the backward read are dropped.
//!
//! The pass works on the graph before fusion and scheduling (it is an error if kernels exist) and is idempotent.
//! [`choose_policy`] estimates the peak memory with and without it ([`crate::memory::plan`]).

use crate::memory::{human, plan};
use crate::Pass;
use ir::{Graph, Node, ValueId};
use std::collections::BTreeMap;

/// Whether, and how, activations are recomputed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecomputePolicy {
    /// Keep every activation from the forward pass.
    Off,
    /// Keep only block inputs and outputs; recompute the rest of each block before its backward.
    PerBlock,
}

/// The recomputation pass.
#[derive(Clone, Debug)]
pub struct Recompute {
    pub policy: RecomputePolicy,
}

const BWD: &str = " (bwd)";
const CLONE: &str = " (recompute)";

impl Pass for Recompute {
    fn name(&self) -> &'static str {
        "recompute"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        if !g.kernels.is_empty() {
            return Err("recomputation runs before fusion and scheduling, but the graph already has kernels".into());
        }
        match self.policy {
            RecomputePolicy::Off => Ok("off".into()),
            RecomputePolicy::PerBlock => Ok(per_block(g)),
        }
    }
}

/// The block index of a forward label: `model.layers.{i}` or `model.layers.{i}.…`, not backward, not a clone.
pub fn forward_block(label: &str) -> Option<usize> {
    if label.ends_with(BWD) || label.ends_with(CLONE) {
        return None;
    }
    let rest = label.strip_prefix("model.layers.")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (index, tail) = rest.split_at(digits);
    if index.is_empty() || !(tail.is_empty() || tail.starts_with('.')) {
        return None;
    }
    index.parse().ok()
}

/// Rewrites `g` for per-block recomputation; returns the summary line.
fn per_block(g: &mut Graph) -> String {
    let n = g.nodes.len();
    let block: Vec<Option<usize>> = g
        .nodes
        .iter()
        .map(|node| if node.op.is_leaf() { None } else { node.label.as_deref().and_then(forward_block) })
        .collect();
    let is_bwd: Vec<bool> =
        g.nodes.iter().map(|node| node.label.as_deref().is_some_and(|l| l.ends_with(BWD))).collect();

    // Checkpoints: block values read by forward code outside their block, and graph outputs.
    let mut checkpoint = vec![false; n];
    for (r, node) in g.nodes.iter().enumerate() {
        if is_bwd[r] {
            continue;
        }
        for x in &node.inputs {
            if block[x.index()].is_some() && block[x.index()] != block[r] {
                checkpoint[x.index()] = true;
            }
        }
    }
    for o in &g.outputs {
        checkpoint[o.value.index()] = true;
    }
    let recomputable = |v: usize| block[v].is_some() && !checkpoint[v];

    // What the backward reads, and the forward nodes needed to recompute it.
    let mut needed = vec![false; n];
    let mut first_reader: BTreeMap<usize, usize> = BTreeMap::new();
    let mut first_bwd: BTreeMap<usize, usize> = BTreeMap::new();
    for r in (0..n).filter(|&r| is_bwd[r]) {
        let label = g.nodes[r].label.as_deref().unwrap_or("");
        if let Some(b) = forward_block(label.strip_suffix(BWD).unwrap_or(label)) {
            first_bwd.entry(b).or_insert(r);
        }
        for x in &g.nodes[r].inputs {
            if let Some(b) = block[x.index()].filter(|_| recomputable(x.index())) {
                needed[x.index()] = true;
                first_reader.entry(b).or_insert(r);
            }
        }
    }
    for v in (0..n).rev() {
        if needed[v] {
            for x in &g.nodes[v].inputs {
                // Within a block every non-checkpoint input is recomputable (cross-block reads are checkpoints).
                if recomputable(x.index()) {
                    needed[x.index()] = true;
                }
            }
        }
    }

    // Each block's clones go right before its first backward node (or before the first backward read of one of its
    // activations, if that comes earlier). A block whose recomputation would read a value computed after that point
    // (not the case in graphs from autodiff, where the whole forward comes first) is left as it is.
    let mut clones_at: Vec<Vec<usize>> = vec![vec![]; n];
    for (&b, &reader) in &first_reader {
        let at = first_bwd.get(&b).map_or(reader, |&f| f.min(reader));
        let members: Vec<usize> = (0..n).filter(|&v| needed[v] && block[v] == Some(b)).collect();
        let ready = members.iter().flat_map(|&v| &g.nodes[v].inputs).all(|x| needed[x.index()] || x.index() < at);
        if ready {
            clones_at[at].extend(members);
        } else {
            for v in members {
                needed[v] = false;
            }
        }
    }
    let cloned = needed.iter().filter(|&&b| b).count();
    if cloned == 0 {
        return "no block activations to recompute".into();
    }

    // Rebuild in SSA order with the clones inserted.
    let old = std::mem::take(&mut g.nodes);
    let mut remap: Vec<ValueId> = vec![ValueId(u32::MAX); n];
    let mut clone_of: Vec<Option<ValueId>> = vec![None; n];
    for (i, node) in old.iter().enumerate() {
        for &v in &clones_at[i] {
            let src = &old[v];
            let inputs = src.inputs.iter().map(|x| clone_of[x.index()].unwrap_or(remap[x.index()])).collect();
            let label = Some(format!("{}{CLONE}", src.label.as_deref().unwrap_or("")));
            clone_of[v] = Some(ValueId(g.nodes.len() as u32));
            g.nodes.push(Node { op: src.op.clone(), inputs, ty: src.ty.clone(), label });
        }
        let inputs = node
            .inputs
            .iter()
            .map(|x| match clone_of[x.index()] {
                Some(c) if is_bwd[i] && recomputable(x.index()) => c,
                _ => remap[x.index()],
            })
            .collect();
        remap[i] = ValueId(g.nodes.len() as u32);
        g.nodes.push(Node { op: node.op.clone(), inputs, ty: node.ty.clone(), label: node.label.clone() });
    }
    for o in &mut g.outputs {
        o.value = remap[o.value.index()];
    }

    // Drop the forward originals that only the backward read.
    let mut live = vec![false; g.nodes.len()];
    for o in &g.outputs {
        live[o.value.index()] = true;
    }
    for i in (0..g.nodes.len()).rev() {
        if live[i] {
            for x in &g.nodes[i].inputs {
                live[x.index()] = true;
            }
        }
    }
    let mut keep = vec![true; g.nodes.len()];
    for v in (0..n).filter(|&v| recomputable(v) && !live[remap[v].index()]) {
        keep[remap[v].index()] = false;
    }
    // Whatever a kept node reads stays (a dead original may still feed a node that was dead before the pass).
    for i in (0..g.nodes.len()).rev() {
        if keep[i] {
            for x in g.nodes[i].inputs.clone() {
                keep[x.index()] = true;
            }
        }
    }
    let dropped = g.retain(&keep);
    let blocks = clones_at.iter().filter(|c| !c.is_empty()).count();
    format!("recomputes {cloned} nodes in {blocks} blocks; {dropped} forward values no longer computed")
}

/// Estimated peak memory without and with per-block recomputation, and the policy to use: `Off` when its peak fits
/// `budget_bytes`, else `PerBlock`. Plans the graph as given (before fusion, one kernel per node), so the numbers are
/// upper bounds of what fusion will need. If recomputation cannot run, its peak is reported as the `Off` peak.
pub fn choose_policy(g: &Graph, budget_bytes: f64) -> (RecomputePolicy, f64, f64) {
    let off = plan(g).peak_bytes as f64;
    let mut rc = g.clone();
    let per_block = match (Recompute { policy: RecomputePolicy::PerBlock }).run(&mut rc) {
        Ok(_) => plan(&rc).peak_bytes as f64,
        Err(_) => off,
    };
    let policy = if off <= budget_bytes { RecomputePolicy::Off } else { RecomputePolicy::PerBlock };
    (policy, off, per_block)
}

/// The pipeline's recompute step: a fixed policy, or (`None`) the one [`choose_policy`] picks for a memory budget.
pub struct RecomputeFor {
    pub policy: Option<RecomputePolicy>,
    pub budget_bytes: f64,
}

impl Pass for RecomputeFor {
    fn name(&self) -> &'static str {
        "recompute"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        let (policy, why) = match self.policy {
            Some(p) => (p, "as asked".to_string()),
            None => {
                let (p, off, per_block) = choose_policy(g, self.budget_bytes);
                let why = format!(
                    "estimated peak {} without, {} with per-block recompute; budget {}",
                    human(off as usize),
                    human(per_block as usize),
                    human(self.budget_bytes as usize)
                );
                (p, why)
            }
        };
        let done = Recompute { policy }.run(g)?;
        Ok(format!("policy {policy:?} ({why}): {done}"))
    }
}
