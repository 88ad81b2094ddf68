//! Memory planning: which values need a buffer, how long each lives over the kernel order, which results are written
//! in place, and where every transient buffer sits in one arena (greedy best-fit offsets, reused across lifetimes).
//!
//! The unit of time is a *step*: one kernel. After fusion and scheduling `g.kernels` gives the steps in order; before
//! them every non-leaf node that is not a view runs as its own kernel, in node order.
//!
//! - Leaves: parameters and optimizer states (role `state`) own one persistent buffer each at their storage size
//!   (`Type::bytes`, NF4 packing and scales included); inputs own one persistent buffer for the step. Constants are
//!   folded into the kernels that read them (a fill), so they need memory only when they are graph outputs.
//! - Views (`reshape`, `stop_gradient`) alias the buffer of the value they view.
//! - Any other value needs a buffer when a kernel other than its producer reads it (directly or through views) or
//!   when it is a graph output; a value read only inside its own kernel lives in registers/shared memory.
//! - Liveness: from the producing step to the last reading step; graph outputs live to the end (step `steps`).
//! - In place: an `update "p"` output is written into `p`'s persistent buffer (AdamW updates the parameter and its
//!   moments in place) when nothing reads the old `p` after that kernel. A result of an elementwise kernel reuses the
//!   buffer of an input that dies in that kernel when both have the same element count and byte size.
//! - Arena: buffers sorted by size (largest first), each placed at the best-fitting gap between the buffers already
//!   placed whose lifetimes overlap its own (smallest gap that fits, lowest offset on ties), or on top of them.

use crate::cost::is_view;
use ir::{Graph, Op, OutputKind, Role, ValueId};
use std::fmt::Write;

/// Every buffer's offset and size are multiples of this many bytes (coalesced, vector-aligned accesses).
pub const ALIGN: usize = 256;

fn align(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// Parameters, optimizer states and inputs: allocated for the whole training step (and kept across steps).
    Persistent,
    /// Transient values, packed into one arena by lifetime.
    Arena,
}

/// One allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub region: Region,
    /// Offset within its region, bytes.
    pub offset: usize,
    /// Reserved bytes (the value's storage size rounded up to [`ALIGN`]).
    pub bytes: usize,
    /// First and last step (inclusive) during which it holds a value someone still needs; `steps` is "after the
    /// last kernel" (graph outputs, persistent buffers).
    pub start: usize,
    pub end: usize,
    /// The value it was allocated for (later in-place results may reuse it).
    pub first: ValueId,
}

/// How one value is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Placement {
    /// No memory of its own: read only inside its producing kernel, a constant folded into its readers, or unused.
    None,
    /// Owns buffer `.0` (an index into [`MemoryPlan::buffers`]).
    Owns(usize),
    /// A view: shares the buffer of this (non-view) value.
    Alias(ValueId),
    /// Written into the buffer of `of`, whose value is no longer needed by then: an `update "p"` output into `p`'s
    /// buffer, or an elementwise result into an input that dies in the same kernel.
    InPlace { of: ValueId, buffer: usize },
}

/// The plan for one value.
#[derive(Clone, Debug, PartialEq)]
pub struct ValuePlan {
    pub placement: Placement,
    /// The buffer holding the value, with aliases and in-place chains resolved.
    pub buffer: Option<usize>,
    /// The step that computes the value (`None` for leaves and views, which no kernel computes).
    pub step: Option<usize>,
    /// Steps during which the value itself must be kept (producer to last reader, inclusive), for values with
    /// memory of their own (not views).
    pub live: Option<(usize, usize)>,
}

/// Buffers, lifetimes and the totals a report needs.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// Kernels in the schedule the plan assumes.
    pub steps: usize,
    /// Whether each non-leaf, non-view node was taken as its own kernel (no kernels yet, or unusable ones).
    pub per_node: bool,
    pub values: Vec<ValuePlan>,
    pub buffers: Vec<Buffer>,
    /// Parameters (trainable and frozen), optimizer states and inputs.
    pub persistent_bytes: usize,
    pub param_bytes: usize,
    pub state_bytes: usize,
    pub input_bytes: usize,
    /// The arena's size: the peak of the transient memory as placed.
    pub arena_bytes: usize,
    /// `persistent_bytes + arena_bytes`.
    pub peak_bytes: usize,
    /// Every transient value in its own buffer, no reuse and nothing in place (what a naive allocator needs).
    pub naive_bytes: usize,
    /// The most transient bytes live at any one step: a lower bound on any arena for this schedule.
    pub max_live_bytes: usize,
    /// Values written in place, and of those the `update` outputs written into their parameter or state.
    pub in_place: usize,
    pub in_place_updates: usize,
    /// Things the plan could not do as asked (an update that must be copied back, an unusable kernel list).
    pub notes: Vec<String>,
}

impl MemoryPlan {
    /// The buffer that holds `v`, if it has one.
    pub fn buffer_of(&self, v: ValueId) -> Option<&Buffer> {
        self.values[v.index()].buffer.map(|b| &self.buffers[b])
    }

    /// A few lines for `tunec compile --report`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let arena_buffers = self.buffers.iter().filter(|b| b.region == Region::Arena).count();
        let _ = writeln!(
            s,
            "memory: peak {} = persistent {} (params {}, optimizer state {}, inputs {}) + arena {}",
            human(self.peak_bytes),
            human(self.persistent_bytes),
            human(self.param_bytes),
            human(self.state_bytes),
            human(self.input_bytes),
            human(self.arena_bytes),
        );
        let ratio = if self.arena_bytes > 0 { self.naive_bytes as f64 / self.arena_bytes as f64 } else { 1.0 };
        let _ = writeln!(
            s,
            "  arena: {arena_buffers} buffers over {} kernels{}; {} values in place ({} optimizer updates); \
             live peak {}; without reuse {} ({ratio:.1}x the arena)",
            self.steps,
            if self.per_node { " (one per node)" } else { "" },
            self.in_place,
            self.in_place_updates,
            human(self.max_live_bytes),
            human(self.naive_bytes),
        );
        for n in &self.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        s
    }
}

/// Bytes in binary units with three significant digits.
pub fn human(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = bytes as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{x:.3} {}", UNITS[u])
    }
}

/// Whether output element `i` of the op depends only on element `i` of each input of the same size, so the result
/// may overwrite such an input (broadcast operands are smaller and never overwritten).
fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
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
            | Op::Cast { .. }
            | Op::Dropout { .. }
            | Op::AdamWMoment { .. }
            | Op::AdamWUpdate { .. }
    )
}

/// The schedule: the step of each node that runs (non-leaf, non-view), the members of each step, and whether the
/// graph's kernels were used.
struct Schedule {
    step: Vec<Option<usize>>,
    members: Vec<Vec<ValueId>>,
    per_node: bool,
    note: Option<String>,
}

fn schedule(g: &Graph, root: &[ValueId]) -> Schedule {
    let runs = |v: ValueId| !g.node(v).op.is_leaf() && !is_view(&g.node(v).op);
    let per_node = |note: Option<String>| {
        let mut step = vec![None; g.nodes.len()];
        let mut members = vec![];
        for v in g.ids().filter(|&v| runs(v)) {
            step[v.index()] = Some(members.len());
            members.push(vec![v]);
        }
        Schedule { step, members, per_node: true, note }
    };
    if g.kernels.is_empty() {
        return per_node(None);
    }
    let mut step = vec![None; g.nodes.len()];
    let mut members = vec![vec![]; g.kernels.len()];
    for (k, kernel) in g.kernels.iter().enumerate() {
        for &v in &kernel.nodes {
            let Some(slot) = step.get_mut(v.index()) else {
                return per_node(Some(format!("kernel `{}` names {v}, which is not defined", kernel.name)));
            };
            if slot.is_some() {
                return per_node(Some(format!("{v} is in two kernels; planned one kernel per node")));
            }
            *slot = Some(k);
            members[k].push(v);
        }
    }
    for v in g.ids().filter(|&v| runs(v)) {
        let Some(s) = step[v.index()] else {
            return per_node(Some(format!("{v} is in no kernel; planned one kernel per node")));
        };
        for &x in &g.node(v).inputs {
            let r = root[x.index()];
            if let Some(t) = step[r.index()].filter(|_| runs(r)) {
                if t > s {
                    return per_node(Some(format!(
                        "{v} (kernel {s}) reads {r} from the later kernel {t}; planned one kernel per node"
                    )));
                }
            }
        }
    }
    // Views inside kernels do not run; keep steps only for the nodes that do.
    for v in g.ids().filter(|&v| !runs(v)) {
        step[v.index()] = None;
    }
    for m in &mut members {
        m.retain(|&v| runs(v));
    }
    Schedule { step, members, per_node: false, note: None }
}

/// The element count shared by every running node of the kernel, when the kernel is elementwise throughout.
fn elementwise_numel(g: &Graph, members: &[ValueId]) -> Option<usize> {
    let numel = g.ty(*members.first()?).numel();
    members.iter().all(|&v| is_elementwise(&g.node(v).op) && g.ty(v).numel() == numel).then_some(numel)
}

/// Plans the memory of one training step (see the module docs).
pub fn plan(g: &Graph) -> MemoryPlan {
    let n = g.nodes.len();
    // The non-view value whose buffer each value uses.
    let mut root: Vec<ValueId> = Vec::with_capacity(n);
    for v in g.ids() {
        let node = g.node(v);
        root.push(if is_view(&node.op) { root[node.inputs[0].index()] } else { v });
    }
    let sched = schedule(g, &root);
    let steps = sched.members.len();
    let mut notes: Vec<String> = sched.note.iter().cloned().collect();

    // Steps that read each root (through views too), and which roots are graph outputs.
    let mut readers: Vec<Vec<usize>> = vec![vec![]; n];
    for v in g.ids() {
        let Some(s) = sched.step[v.index()] else { continue };
        for &x in &g.node(v).inputs {
            readers[root[x.index()].index()].push(s);
        }
    }
    let mut is_output = vec![false; n];
    for o in &g.outputs {
        is_output[root[o.value.index()].index()] = true;
    }

    let mut values: Vec<ValuePlan> = g
        .ids()
        .map(|v| ValuePlan { placement: Placement::None, buffer: None, step: sched.step[v.index()], live: None })
        .collect();
    let mut buffers: Vec<Buffer> = vec![];
    let (mut param_bytes, mut state_bytes, mut input_bytes, mut persistent) = (0, 0, 0, 0);

    // Persistent buffers, in node order.
    for v in g.ids() {
        let node = g.node(v);
        let bytes = align(node.ty.bytes());
        match &node.op {
            Op::Param { role: Role::State, .. } => state_bytes += bytes,
            Op::Param { .. } => param_bytes += bytes,
            Op::Input { .. } => input_bytes += bytes,
            _ => continue,
        }
        values[v.index()].placement = Placement::Owns(buffers.len());
        values[v.index()].buffer = Some(buffers.len());
        values[v.index()].live = Some((0, steps));
        buffers.push(Buffer { region: Region::Persistent, offset: persistent, bytes, start: 0, end: steps, first: v });
        persistent += bytes;
    }

    // Lifetimes of the values that need a transient buffer.
    let mut naive = 0;
    for v in g.ids() {
        let node = g.node(v);
        if is_view(&node.op) || matches!(node.op, Op::Param { .. } | Op::Input { .. }) {
            continue;
        }
        let live = match sched.step[v.index()] {
            // A constant that is an output is filled at the end.
            None if is_output[v.index()] => Some((steps, steps)),
            None => None,
            Some(s) if is_output[v.index()] => Some((s, steps)),
            Some(s) => readers[v.index()]
                .iter()
                .any(|&t| t != s)
                .then(|| (s, readers[v.index()].iter().copied().max().unwrap_or(s))),
        };
        if live.is_some() {
            naive += align(node.ty.bytes());
        }
        values[v.index()].live = live;
    }

    // Decide placements in execution order: in place where allowed, else a new arena buffer.
    let transient =
        |v: ValueId| values[v.index()].live.is_some() && !matches!(g.node(v).op, Op::Param { .. } | Op::Input { .. });
    let mut order: Vec<ValueId> = g.ids().filter(|&v| transient(v)).collect();
    // Constants that are outputs have no step: they are filled after the last kernel.
    order.sort_by_key(|&v| (sched.step[v.index()].unwrap_or(steps), v));
    let mut update_of: Vec<Option<ValueId>> = vec![None; n];
    let param_ids: std::collections::HashMap<&str, ValueId> = g.params().into_iter().map(|(v, n, _)| (n, v)).collect();
    for o in &g.outputs {
        if let OutputKind::Update(name) = &o.kind {
            if let Some(&p) = param_ids.get(name.as_str()) {
                let r = root[o.value.index()];
                if r != p && update_of[r.index()].is_none() {
                    update_of[r.index()] = Some(p);
                }
            }
        }
    }
    // Per buffer: the last step at which a result was written into it in place (one in-place write per step).
    let mut written_at: Vec<Option<usize>> = vec![None; buffers.len()];
    let mut claimed_param = vec![false; n];
    let (mut in_place, mut in_place_updates) = (0, 0);
    for v in order {
        let (start, end) = values[v.index()].live.expect("ordered values are live");
        let bytes = align(g.ty(v).bytes());
        let step = sched.step[v.index()];
        let elementwise = step.and_then(|s| elementwise_numel(g, &sched.members[s]));
        let mut target = None;
        if let (Some(p), Some(s)) = (update_of[v.index()], step) {
            // The old parameter must not be read after this kernel (nor in it, unless the kernel is elementwise),
            // and it must not itself be an output.
            let late_read = readers[p.index()].iter().any(|&t| t > s || (t == s && elementwise.is_none()));
            let why = if late_read {
                Some("the old value is still read after the kernel that computes the new one starts")
            } else if g.ty(p).bytes() != g.ty(v).bytes() {
                Some("the sizes differ")
            } else if is_output[p.index()] {
                Some("the old value is itself an output")
            } else if claimed_param[p.index()] {
                Some("another value already updates it in place")
            } else {
                None
            };
            match why {
                None => {
                    claimed_param[p.index()] = true;
                    target = Some((p, values[p.index()].buffer.expect("parameters own a buffer")));
                    in_place_updates += 1;
                }
                Some(why) => notes.push(format!(
                    "the update of `{}` gets its own buffer and must be copied back: {why}",
                    param_name(g, p)
                )),
            }
        }
        if let (None, Some(s), Some(numel)) = (target, step, elementwise) {
            // An input of this kernel whose buffer holds nothing needed after this step.
            let mut ins: Vec<ValueId> = sched.members[s]
                .iter()
                .flat_map(|&m| g.node(m).inputs.iter().map(|x| root[x.index()]))
                .filter(|r| sched.step[r.index()] != Some(s))
                .collect();
            ins.sort();
            ins.dedup();
            target = ins.into_iter().find_map(|x| {
                let b = values[x.index()].buffer?;
                let buf = &buffers[b];
                let fits = buf.region == Region::Arena
                    && buf.end == s
                    && buf.bytes == bytes
                    && written_at[b] != Some(s)
                    && g.ty(x).numel() == numel
                    && g.ty(x).bytes() == g.ty(v).bytes();
                fits.then_some((x, b))
            });
        }
        let b = match target {
            Some((of, b)) => {
                in_place += 1;
                written_at[b] = step;
                buffers[b].end = buffers[b].end.max(end);
                values[v.index()].placement = Placement::InPlace { of, buffer: b };
                b
            }
            None => {
                buffers.push(Buffer { region: Region::Arena, offset: 0, bytes, start, end, first: v });
                written_at.push(None);
                values[v.index()].placement = Placement::Owns(buffers.len() - 1);
                buffers.len() - 1
            }
        };
        values[v.index()].buffer = Some(b);
    }

    // Views share their root's buffer.
    for v in g.ids() {
        if is_view(&g.node(v).op) {
            let r = root[v.index()];
            values[v.index()].placement = Placement::Alias(r);
            values[v.index()].buffer = values[r.index()].buffer;
        }
    }

    let arena_bytes = place_arena(&mut buffers);
    let max_live_bytes = max_live(&buffers, steps);
    MemoryPlan {
        steps,
        per_node: sched.per_node,
        values,
        buffers,
        persistent_bytes: persistent,
        param_bytes,
        state_bytes,
        input_bytes,
        arena_bytes,
        peak_bytes: persistent + arena_bytes,
        naive_bytes: naive,
        max_live_bytes,
        in_place,
        in_place_updates,
        notes,
    }
}

fn param_name(g: &Graph, p: ValueId) -> &str {
    match &g.node(p).op {
        Op::Param { name, .. } => name,
        _ => "?",
    }
}

/// Greedy best-fit offsets for the arena buffers; returns the arena size. Greedy placement depends on the order, so
/// three orders are tried (largest first, earliest first, longest-lived first) and the smallest arena is kept.
fn place_arena(buffers: &mut [Buffer]) -> usize {
    let arena: Vec<usize> = (0..buffers.len()).filter(|&b| buffers[b].region == Region::Arena).collect();
    let key = |b: &Buffer| (b.bytes, b.start, b.end - b.start);
    type Order = fn((usize, usize, usize)) -> (usize, usize, usize);
    let orders: [Order; 3] = [
        |(bytes, start, _)| (usize::MAX - bytes, start, 0),
        |(bytes, start, _)| (start, usize::MAX - bytes, 0),
        |(bytes, start, span)| (usize::MAX - span, usize::MAX - bytes, start),
    ];
    // The offline best-fit below looks at every placed buffer whose lifetime overlaps; with thousands of long-lived
    // activations that is quadratic. A simulated allocator (buffers claimed in start order, best-fit from a free
    // list, freed at their end) is O(n log n) and always a candidate; the offline orders run on small plans.
    let mut best: Option<(usize, Vec<usize>)> = Some(sweep_fit(buffers, &arena));
    let orders: &[Order] = if arena.len() <= 1500 { &orders } else { &[] };
    for &order in orders {
        let mut o = arena.clone();
        o.sort_by_key(|&b| (order(key(&buffers[b])), b));
        let (top, offsets) = best_fit(buffers, &o);
        if best.as_ref().is_none_or(|(t, _)| top < *t) {
            best = Some((top, offsets));
        }
    }
    let Some((top, offsets)) = best else { return 0 };
    for (&b, off) in arena.iter().zip(offsets) {
        buffers[b].offset = off;
    }
    top
}

/// A simulated allocator over time: at each buffer's first step take the smallest free block that fits (lowest
/// offset on ties, else grow the arena), at its last step give the block back (merging neighbours).
fn sweep_fit(buffers: &[Buffer], arena: &[usize]) -> (usize, Vec<usize>) {
    use std::cmp::Reverse;
    use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
    let mut by_start: Vec<usize> = arena.to_vec();
    by_start.sort_by_key(|&b| (buffers[b].start, Reverse(buffers[b].bytes), b));
    let mut free_by_off: BTreeMap<usize, usize> = BTreeMap::new(); // offset -> size
    let mut free_by_size: BTreeSet<(usize, usize)> = BTreeSet::new(); // (size, offset)
    let mut ending: BinaryHeap<Reverse<(usize, usize)>> = BinaryHeap::new(); // (end step, buffer)
    let mut offset_of = vec![usize::MAX; buffers.len()];
    let mut top = 0usize;
    let release =
        |off: usize, size: usize, by_off: &mut BTreeMap<usize, usize>, by_size: &mut BTreeSet<(usize, usize)>| {
            let (mut off, mut size) = (off, size);
            if let Some((&o, &s)) = by_off.range(..off).next_back() {
                if o + s == off {
                    by_off.remove(&o);
                    by_size.remove(&(s, o));
                    off = o;
                    size += s;
                }
            }
            if let Some(&s) = by_off.get(&(off + size)) {
                by_off.remove(&(off + size));
                by_size.remove(&(s, off + size));
                size += s;
            }
            by_off.insert(off, size);
            by_size.insert((size, off));
        };
    for &b in &by_start {
        let (start, bytes) = (buffers[b].start, buffers[b].bytes);
        while let Some(&Reverse((end, o))) = ending.peek() {
            if end >= start {
                break;
            }
            ending.pop();
            release(offset_of[o], buffers[o].bytes, &mut free_by_off, &mut free_by_size);
        }
        let fit = free_by_size.range((bytes, 0)..).next().copied();
        let offset = match fit {
            Some((size, off)) => {
                free_by_size.remove(&(size, off));
                free_by_off.remove(&off);
                if size > bytes {
                    free_by_off.insert(off + bytes, size - bytes);
                    free_by_size.insert((size - bytes, off + bytes));
                }
                off
            }
            None => {
                // Grow: reuse a free block that ends at the top, if any.
                match free_by_off.iter().next_back().map(|(&o, &s)| (o, s)) {
                    Some((o, s)) if o + s == top => {
                        free_by_off.remove(&o);
                        free_by_size.remove(&(s, o));
                        top = o + bytes;
                        o
                    }
                    _ => {
                        let o = top;
                        top += bytes;
                        o
                    }
                }
            }
        };
        offset_of[b] = offset;
        ending.push(Reverse((buffers[b].end, b)));
    }
    let mut sorted: Vec<usize> = arena.to_vec();
    sorted.sort();
    (top, sorted.into_iter().map(|b| offset_of[b]).collect())
}

/// Places `order`'s buffers one by one at the smallest gap that fits between the already placed buffers whose
/// lifetimes overlap (lowest offset on ties), else on top of them. Returns the arena size and each buffer's offset
/// (indexed like the arena buffers in index order).
fn best_fit(buffers: &[Buffer], order: &[usize]) -> (usize, Vec<usize>) {
    // Placed buffers are indexed by the time buckets their lifetimes cover, so a query only looks at buffers live
    // near its own lifetime (linear in the live set, not in everything placed so far).
    const BUCKET: usize = 64;
    let steps = buffers.iter().map(|b| b.end).max().unwrap_or(0) + 1;
    let mut by_bucket: Vec<Vec<usize>> = vec![vec![]; steps / BUCKET + 1];
    let mut stamp = vec![usize::MAX; buffers.len()];
    let mut offset_of = vec![usize::MAX; buffers.len()];
    let mut top = 0;
    for (q, &b) in order.iter().enumerate() {
        let (start, end, bytes) = (buffers[b].start, buffers[b].end, buffers[b].bytes);
        let mut taken: Vec<(usize, usize)> = vec![];
        for bucket in &by_bucket[start / BUCKET..=end / BUCKET] {
            for &o in bucket {
                if stamp[o] != q && buffers[o].start <= end && start <= buffers[o].end {
                    stamp[o] = q;
                    taken.push((offset_of[o], offset_of[o] + buffers[o].bytes));
                }
            }
        }
        taken.sort();
        let (mut best, mut cursor) = (None::<(usize, usize)>, 0);
        for &(lo, hi) in &taken {
            if lo >= cursor + bytes {
                let gap = lo - cursor;
                if best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, cursor));
                }
            }
            cursor = cursor.max(hi);
        }
        let offset = best.map_or(cursor, |(_, off)| off);
        offset_of[b] = offset;
        top = top.max(offset + bytes);
        for bucket in &mut by_bucket[start / BUCKET..=end / BUCKET] {
            bucket.push(b);
        }
    }
    let mut arena: Vec<usize> = order.to_vec();
    arena.sort();
    (top, arena.into_iter().map(|b| offset_of[b]).collect())
}

/// The most arena bytes live at one step.
fn max_live(buffers: &[Buffer], steps: usize) -> usize {
    let mut delta = vec![0i128; steps + 2];
    for b in buffers.iter().filter(|b| b.region == Region::Arena) {
        delta[b.start] += b.bytes as i128;
        delta[b.end + 1] -= b.bytes as i128;
    }
    let (mut live, mut peak) = (0i128, 0i128);
    for d in delta {
        live += d;
        peak = peak.max(live);
    }
    peak as usize
}
