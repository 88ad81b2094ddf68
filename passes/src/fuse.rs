//! Kernel fusion: partitions every non-leaf node into kernel groups (`g.kernels`), one group per kernel a backend
//! emits, so that no group feeds another group that feeds it back (the kernel graph stays acyclic).
//!
//! # Policy
//! - **Leaves** (`param`, `input`, `const`) belong to no kernel: they are a kernel's inputs. Scalar constants are
//!   folded into their readers as immediates by the lowering; here they simply stay outside.
//! - **Anchors** — `matmul`, `qmatmul`, `lora_linear`, `attention`, `attention_bwd`, `linear_cross_entropy[_bwd]`,
//!   `cross_entropy[_bwd]`, `embedding[_bwd]`, `rms_norm`, `rms_norm_bwd_x`, `rms_norm_bwd_w`, `softmax[_bwd]`,
//!   `sum`, `sum_to`, `concat`, `nf4_quantize`, `nf4_dequantize`, `transpose`, `adamw_update` — each starts its own
//!   group, and a group holds at most one anchor.
//! - **AdamW chain**: per parameter, `adamw_moment` ×2, the `adamw_update` that reads them and the clipping `mul`
//!   of the gradient (when only the two moments read it) form one kernel, named after the update.
//! - **Views** (`reshape`, `stop_gradient`, `slice`) join their producer's kernel (they move no data).
//! - **Elementwise** ops (`add`, `sub`, `mul`, `div`, `minimum`, `maximum`, `neg`, `exp`, `log`, `sqrt`, `rsqrt`,
//!   `sigmoid`, `silu`, `silu_bwd`, `swiglu`, `scale`, `dropout`, `cast`, `broadcast_to`, `rope`, and an
//!   `adamw_moment` outside a chain), visited in node order:
//!   1. *epilogue*: join the kernel of an input's producer when no other kernel reads that value before this op
//!      does. Either nothing else outside the producer's kernel reads it (a pure epilogue: the residual `add`
//!      after o_proj/down_proj, a `scale` after a matmul, RoPE after the q/k projection's reshape), or every other
//!      reader comes later in node order — then the kernel stores the value for them as it would anyway, and the
//!      op runs where it would have run next. (A strict "no other reader" rule fuses almost nothing in a training
//!      step: every activation saved for the backward has a second reader, e.g. `swiglu`'s gate and up.) Among
//!      several producers: pure epilogues first, then kernels with an anchor, then the latest producer.
//!   2. *prologue* (in reverse node order, for groups still without an anchor): join the one kernel that reads the
//!      group's values, when exactly one does (the values are then never stored, except graph outputs).
//!   3. otherwise the op stays in its own elementwise kernel; chains of elementwise ops have merged by 1 and 2.
//! - **Convexity**: every merge is checked on the kernel graph first: merging A and B is refused when a path
//!   A → X → … → B (or B → … → A) through another kernel exists, since the merged kernel would both feed and read X.
//! - **Names**: `<anchor mnemonic>:<anchor label>`, or `elementwise:<first member's label>` without an anchor.
//!
//! Graph outputs do not count as readers: the kernel writes an output wherever the value is computed. Existing
//! kernel groups are discarded and formed anew. Kernels are listed by their first node, which is not always an order
//! they can run in (a kernel may read a value computed after its first node); `schedule` orders them.

use crate::Pass;
use ir::{Graph, Kernel, Op, ValueId};
pub use kernels::template::Uses;

/// The fusion pass: the policy (see the module docs), then [`split_uncovered`] so that every kernel has a template.
pub struct Fuse;

/// The fusion policy alone, without splitting groups no template covers (for testing the policy).
pub struct FusePolicy;

impl Pass for FusePolicy {
    fn name(&self) -> &'static str {
        "fuse-policy"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        g.kernels = partition(g);
        check_partition(g)?;
        Ok(summary(g))
    }
}

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        g.kernels = partition(g);
        let split = split_uncovered(g);
        check_partition(g)?;
        Ok(format!("{}; {split} groups split (no template covers them)", summary(g)))
    }
}

fn summary(g: &Graph) -> String {
    let nodes: usize = g.kernels.iter().map(|k| k.nodes.len()).sum();
    let fused = nodes - g.kernels.len();
    format!("{} kernels for {nodes} nodes; {fused} nodes fused into another op's kernel", g.kernels.len())
}

/// How fusion treats an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusionClass {
    /// Parameters, inputs and constants: kernel inputs, in no kernel.
    Leaf,
    /// Starts its own kernel; at most one per kernel.
    Anchor,
    /// Joins its producer's or its reader's kernel, or forms an elementwise kernel.
    Elementwise,
    /// Moves no data; joins its producer's kernel.
    View,
}

/// The fusion class of an op (exhaustive, so a new op must be placed here).
pub fn fusion_class(op: &Op) -> FusionClass {
    use FusionClass::*;
    match op {
        Op::Param { .. } | Op::Input { .. } | Op::Const { .. } => Leaf,
        Op::Reshape { .. } | Op::StopGradient {} | Op::Slice { .. } => View,
        Op::MatMul { .. }
        | Op::QMatMul { .. }
        | Op::LoraLinear { .. }
        | Op::Attention { .. }
        | Op::AttentionBwd { .. }
        | Op::LinearCrossEntropy { .. }
        | Op::LinearCrossEntropyBwd { .. }
        | Op::CrossEntropy { .. }
        | Op::CrossEntropyBwd { .. }
        | Op::Embedding {}
        | Op::EmbeddingBwd { .. }
        | Op::RmsNorm { .. }
        | Op::RmsNormBwdX { .. }
        | Op::RmsNormBwdW { .. }
        | Op::Softmax {}
        | Op::SoftmaxBwd {}
        | Op::Sum { .. }
        | Op::SumTo { .. }
        | Op::Concat { .. }
        | Op::Nf4Quantize { .. }
        | Op::Nf4Dequantize {}
        | Op::Transpose { .. }
        | Op::AdamWUpdate { .. } => Anchor,
        Op::Add {}
        | Op::Sub {}
        | Op::Mul {}
        | Op::Div {}
        | Op::Minimum {}
        | Op::Maximum {}
        | Op::Neg {}
        | Op::Exp {}
        | Op::Log {}
        | Op::Sqrt {}
        | Op::Rsqrt {}
        | Op::Sigmoid {}
        | Op::Silu {}
        | Op::SiluBwd {}
        | Op::Swiglu {}
        | Op::Scale { .. }
        | Op::Dropout { .. }
        | Op::Cast { .. }
        | Op::BroadcastTo { .. }
        | Op::Rope { .. }
        | Op::AdamWMoment { .. } => Elementwise,
    }
}

/// Distinct reader nodes of every node, in increasing order.
fn readers(g: &Graph) -> Vec<Vec<usize>> {
    let mut readers: Vec<Vec<usize>> = vec![vec![]; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        for v in &n.inputs {
            let r = &mut readers[v.index()];
            if r.last() != Some(&i) {
                r.push(i);
            }
        }
    }
    readers
}

const NONE: usize = usize::MAX;

/// Groups under construction: a group id per node, members and anchor per group.
struct Groups<'a> {
    readers: &'a [Vec<usize>],
    gid: Vec<usize>,
    members: Vec<Vec<usize>>,
    anchor: Vec<Option<usize>>,
    /// Visit marks for the reachability search (`mark[group] == epoch` means visited).
    mark: Vec<u32>,
    epoch: u32,
    /// Readers looked at so far (cycle checks, reader-group queries): the pass's work, for tests of its growth.
    work: u64,
}

impl Groups<'_> {
    /// Merges group `b` into group `a` (or the reverse, whichever is smaller moves) unless that would put two
    /// anchors in one group or create a cycle between groups. Returns whether the two are now one group.
    fn merge(&mut self, a: usize, b: usize) -> bool {
        if a == b {
            return true;
        }
        if self.anchor[a].is_some() && self.anchor[b].is_some() {
            return false;
        }
        if self.reaches_through_other(a, b) || self.reaches_through_other(b, a) {
            return false;
        }
        let (big, small) = if self.members[a].len() >= self.members[b].len() { (a, b) } else { (b, a) };
        let moved = std::mem::take(&mut self.members[small]);
        for &m in &moved {
            self.gid[m] = big;
        }
        self.members[big].extend(moved);
        self.anchor[big] = self.anchor[big].or(self.anchor[small].take());
        true
    }

    /// Whether a path from group `from` to group `to` passes through some third group.
    ///
    /// Node indices increase along every edge, so a path into `to` only uses reader nodes below `to`'s last
    /// member: the search never looks past that window (which keeps fusion linear in practice).
    fn reaches_through_other(&mut self, from: usize, to: usize) -> bool {
        let Some(&limit) = self.members[to].iter().max() else { return false };
        self.epoch += 1;
        let epoch = self.epoch;
        let mut stack = vec![];
        for &m in &self.members[from] {
            for &r in self.readers[m].iter().filter(|&&r| r <= limit) {
                self.work += 1;
                let gr = self.gid[r];
                if gr != from && gr != to && self.mark[gr] != epoch {
                    self.mark[gr] = epoch;
                    stack.push(gr);
                }
            }
        }
        while let Some(x) = stack.pop() {
            for &m in &self.members[x] {
                for &r in self.readers[m].iter().filter(|&&r| r <= limit) {
                    self.work += 1;
                    let gr = self.gid[r];
                    if gr == to {
                        return true;
                    }
                    if gr != x && self.mark[gr] != epoch {
                        self.mark[gr] = epoch;
                        stack.push(gr);
                    }
                }
            }
        }
        false
    }

    /// Groups (other than `g`'s own) that read a value of group `g`.
    fn reader_groups(&mut self, g: usize) -> Vec<usize> {
        let mut out: Vec<usize> = self.members[g]
            .iter()
            .flat_map(|&m| self.readers[m].iter().map(|&r| self.gid[r]))
            .filter(|&gr| gr != g)
            .collect();
        self.work += out.len() as u64 + self.members[g].len() as u64;
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The kernel groups of `g` under the fusion policy, listed by first node.
pub fn partition(g: &Graph) -> Vec<Kernel> {
    partition_counted(g).0
}

/// [`partition`], and the work it did (readers looked at by its cycle checks and reader-group queries; the node
/// visits of its linear sweeps are not counted), so that tests can check the work grows linearly with depth.
pub fn partition_counted(g: &Graph) -> (Vec<Kernel>, u64) {
    let n = g.nodes.len();
    let readers = readers(g);
    let class: Vec<FusionClass> = g.nodes.iter().map(|n| fusion_class(&n.op)).collect();
    let mut gs = Groups {
        readers: &readers,
        gid: vec![NONE; n],
        members: vec![],
        anchor: vec![],
        mark: vec![],
        epoch: 0,
        work: 0,
    };
    for (i, &c) in class.iter().enumerate() {
        if c != FusionClass::Leaf {
            gs.gid[i] = gs.members.len();
            gs.members.push(vec![i]);
            gs.anchor.push((c == FusionClass::Anchor).then_some(i));
        }
    }
    gs.mark = vec![0; gs.members.len()];
    let input = |i: usize, k: usize| g.nodes[i].inputs[k].index();

    // AdamW chains: update + both moments + the clipping mul of the gradient.
    for u in 0..n {
        if !matches!(g.nodes[u].op, Op::AdamWUpdate { .. }) {
            continue;
        }
        let (m1, v1) = (input(u, 1), input(u, 2));
        let is_moment = |i: usize| matches!(g.nodes[i].op, Op::AdamWMoment { .. });
        if !is_moment(m1) || !is_moment(v1) {
            continue;
        }
        if !(gs.merge(gs.gid[u], gs.gid[m1]) && gs.merge(gs.gid[u], gs.gid[v1])) {
            continue;
        }
        let grad = input(m1, 1);
        let clip_only = readers[grad].iter().all(|&r| r == m1 || r == v1);
        if grad == input(v1, 1) && matches!(g.nodes[grad].op, Op::Mul {}) && clip_only {
            gs.merge(gs.gid[u], gs.gid[grad]);
        }
    }

    // Views join their producer's kernel.
    for i in 0..n {
        if class[i] == FusionClass::View && class[input(i, 0)] != FusionClass::Leaf {
            gs.merge(gs.gid[input(i, 0)], gs.gid[i]);
        }
    }

    // Epilogues, in node order.
    for (i, &c) in class.iter().enumerate() {
        if c != FusionClass::Elementwise || gs.anchor[gs.gid[i]].is_some() {
            continue;
        }
        let gi = gs.gid[i];
        // (pure epilogue, producer kernel has an anchor, producer)
        let mut candidates: Vec<(bool, bool, usize)> = vec![];
        for v in &g.nodes[i].inputs {
            let p = v.index();
            let gp = gs.gid[p];
            if gp == NONE || gp == gi || candidates.iter().any(|c| c.2 == p) {
                continue;
            }
            gs.work += readers[p].len() as u64;
            let mut others = readers[p].iter().filter(|&&r| r != i && gs.gid[r] != gp);
            let pure = others.clone().next().is_none();
            if pure || others.all(|&r| r > i) {
                candidates.push((pure, gs.anchor[gp].is_some(), p));
            }
        }
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        for (_, _, p) in candidates {
            if gs.merge(gs.gid[p], gs.gid[i]) {
                break;
            }
        }
    }

    // Prologues, in reverse node order: an anchorless group read by exactly one other group joins it.
    for i in (0..n).rev() {
        let gi = gs.gid[i];
        if gi == NONE || gs.anchor[gi].is_some() {
            continue;
        }
        if let [only] = gs.reader_groups(gi)[..] {
            gs.merge(only, gi);
        }
    }

    let mut kernels: Vec<Kernel> = gs
        .members
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.is_empty())
        .map(|(gid, m)| {
            let mut nodes: Vec<ValueId> = m.iter().map(|&i| ValueId(i as u32)).collect();
            nodes.sort_unstable();
            let name = match gs.anchor[gid] {
                Some(a) => kernel_name(g.nodes[a].op.mnemonic(), g.nodes[a].label.as_deref()),
                None => kernel_name("elementwise", nodes.iter().find_map(|&v| g.node(v).label.as_deref())),
            };
            Kernel { name, nodes }
        })
        .collect();
    kernels.sort_by_key(|k| k.nodes[0]);
    (kernels, gs.work)
}

/// Splits every group no kernel template covers (`kernels::template`) into groups that are covered: the anchor with
/// its aliasing views and, when a template covers that (a GEMM with an elementwise epilogue), the rest of the group
/// after it; the rest of the group before it (what feeds the anchor) and after it, each as one loop nest when a
/// template covers that, else one kernel per node (aliasing views staying with the node they view). Splitting
/// a convex group keeps the kernel graph acyclic: a path between two pieces through another kernel would have been
/// a path out of and back into the group. Returns how many groups were split.
pub fn split_uncovered(g: &mut Graph) -> usize {
    let uses = Uses::of(g);
    split_uncovered_with(g, &uses)
}

/// [`split_uncovered`] with the graph's readers computed once (the templates look up each group's outputs there;
/// `uses.visits` counts the readers they looked at).
pub fn split_uncovered_with(g: &mut Graph, uses: &Uses) -> usize {
    use kernels::template::{is_alias_view, Template};
    let mut out: Vec<Kernel> = Vec::with_capacity(g.kernels.len());
    let mut split = 0;
    for k in std::mem::take(&mut g.kernels) {
        if Template::covers_with(g, &k, uses) {
            out.push(k);
            continue;
        }
        split += 1;
        let member = |v: ValueId| k.nodes.binary_search(&v).is_ok();
        // Each node's "owner": the node an aliasing view (transitively) views inside the group, else itself.
        let owner = |mut v: ValueId| {
            while is_alias_view(&g.node(v).op) && member(g.node(v).inputs[0]) {
                v = g.node(v).inputs[0];
            }
            v
        };
        let anchor = k.nodes.iter().copied().find(|&v| fusion_class(&g.node(v).op) == FusionClass::Anchor);
        let mut pieces: Vec<Vec<ValueId>> = vec![];
        let singles = |nodes: &[ValueId], pieces: &mut Vec<Vec<ValueId>>| {
            let owners: Vec<ValueId> = nodes.iter().copied().filter(|&v| owner(v) == v).collect();
            for o in owners {
                pieces.push(nodes.iter().copied().filter(|&v| owner(v) == o).collect());
            }
        };
        match anchor {
            Some(a) => {
                // Members the anchor depends on (within the group), by position in the group (sized by the group,
                // not the graph: one such vector per split group made splitting quadratic).
                let pos = |v: ValueId| k.nodes.binary_search(&v).ok();
                let mut feeds_at = vec![false; k.nodes.len()];
                if let Some(p) = pos(a) {
                    feeds_at[p] = true;
                }
                for (p, &v) in k.nodes.iter().enumerate().rev() {
                    if feeds_at[p] {
                        for &i in &g.node(v).inputs {
                            if let Some(q) = pos(i) {
                                feeds_at[q] = true;
                            }
                        }
                    }
                }
                let feeds = |v: ValueId| pos(v).is_some_and(|p| feeds_at[p]);
                let head: Vec<ValueId> = k.nodes.iter().copied().filter(|&v| owner(v) == a).collect();
                let rest = |pre: bool| -> Vec<ValueId> {
                    k.nodes.iter().copied().filter(|&v| owner(v) != a && feeds(owner(v)) == pre).collect()
                };
                // The anchor with its epilogue when a template covers that (a GEMM's elementwise epilogue).
                let (head, post) = {
                    let (head, post) = (head, rest(false));
                    let whole: Vec<ValueId> =
                        k.nodes.iter().copied().filter(|v| head.contains(v) || post.contains(v)).collect();
                    let whole_kernel = Kernel { name: k.name.clone(), nodes: whole.clone() };
                    if !post.is_empty() && Template::covers_with(g, &whole_kernel, uses) {
                        (whole, vec![])
                    } else {
                        (head, post)
                    }
                };
                for part in [rest(true), head, post] {
                    if part.is_empty() {
                        continue;
                    }
                    let whole = Kernel { name: String::new(), nodes: part.clone() };
                    if Template::covers_with(g, &whole, uses) {
                        pieces.push(part);
                    } else {
                        singles(&part, &mut pieces);
                    }
                }
            }
            None => singles(&k.nodes, &mut pieces),
        }
        for nodes in pieces {
            let name = if nodes.contains(&anchor.unwrap_or(ValueId(u32::MAX))) {
                k.name.clone()
            } else {
                let first = nodes.iter().copied().find(|&v| owner(v) == v).unwrap_or(nodes[0]);
                match nodes.iter().filter(|&&v| owner(v) == v).count() {
                    1 => kernel_name(g.node(first).op.mnemonic(), g.node(first).label.as_deref()),
                    _ => kernel_name("elementwise", nodes.iter().find_map(|&v| g.node(v).label.as_deref())),
                }
            };
            out.push(Kernel { name, nodes });
        }
    }
    out.sort_by_key(|k| k.nodes[0]);
    g.kernels = out;
    split
}

fn kernel_name(what: &str, label: Option<&str>) -> String {
    match label {
        Some(l) => format!("{what}:{l}"),
        None => what.to_string(),
    }
}

/// The kernel of each node (`None` for nodes in no kernel). Errors when a node is in two kernels or undefined.
pub fn kernel_of(g: &Graph) -> Result<Vec<Option<usize>>, String> {
    let mut of = vec![None; g.nodes.len()];
    for (k, kernel) in g.kernels.iter().enumerate() {
        for v in &kernel.nodes {
            let slot = of.get_mut(v.index()).ok_or_else(|| format!("kernel `{}`: {v} is not defined", kernel.name))?;
            if slot.replace(k).is_some() {
                return Err(format!("{v} is in two kernels"));
            }
        }
    }
    Ok(of)
}

/// Checks that kernels partition the non-leaf nodes (every one in exactly one kernel, no leaf in a kernel) and that
/// the kernel graph (an edge where a kernel reads another's value) is acyclic, which makes every kernel convex.
pub fn check_partition(g: &Graph) -> Result<(), String> {
    let of = kernel_of(g)?;
    for (i, n) in g.nodes.iter().enumerate() {
        match (n.op.is_leaf(), of[i]) {
            (true, Some(k)) => return Err(format!("leaf %{i} sits in kernel `{}`", g.kernels[k].name)),
            (false, None) => return Err(format!("%{i} ({}) is in no kernel", n.op.mnemonic())),
            _ => {}
        }
    }
    kernel_topo_order(g, &of).map(|_| ())
}

/// A topological order of the kernels (Kahn's algorithm, smallest index first), or an error naming a kernel on a
/// cycle. `of` is [`kernel_of`].
pub(crate) fn kernel_topo_order(g: &Graph, of: &[Option<usize>]) -> Result<Vec<usize>, String> {
    let k = g.kernels.len();
    let mut succ: Vec<Vec<usize>> = vec![vec![]; k];
    let mut indeg = vec![0usize; k];
    // Edges seen (a set, not a scan of `succ`: one kernel may feed thousands, like the gradient-clipping scale).
    let mut seen: std::collections::HashSet<(usize, usize)> = std::collections::HashSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let Some(ki) = of[i] else { continue };
        for v in &n.inputs {
            if let Some(kv) = of[v.index()] {
                if kv != ki && seen.insert((kv, ki)) {
                    succ[kv].push(ki);
                    indeg[ki] += 1;
                }
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..k).filter(|&x| indeg[x] == 0).collect();
    let mut order = Vec::with_capacity(k);
    while let Some(x) = ready.pop_first() {
        order.push(x);
        for &s in &succ[x] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                ready.insert(s);
            }
        }
    }
    match (0..k).find(|&x| indeg[x] > 0) {
        Some(x) => Err(format!("kernel `{}` is on a cycle between kernels", g.kernels[x].name)),
        None => Ok(order),
    }
}
