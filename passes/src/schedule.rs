//! Kernel scheduling: picks an execution order of the kernels formed by `fuse` and rewrites the graph to it — leaves
//! first (in their original relative order), then each kernel's nodes contiguously, kernels in execution order —
//! renumbering values in nodes, outputs and kernel lists.
//!
//! The order is a greedy list schedule over the kernel graph: among the kernels whose inputs are all computed, run
//! the one that frees the most bytes (inputs whose last reader it is, and which are not graph outputs); ties go to
//! the kernel whose first node came first. The tie-break keeps the original order (forward of layer i before layer
//! i + 1, backward in reverse) wherever freeing memory does not argue otherwise. Views (`reshape`,
//! `stop_gradient`) share their source's memory, so a value is freed when the last reader of it or of any view of
//! it has run.

use crate::cost::is_view;
use crate::fuse::{check_partition, kernel_of, kernel_topo_order};
use crate::Pass;
use ir::{Graph, ValueId};

/// The scheduling pass (see the module docs).
pub struct Schedule;

impl Pass for Schedule {
    fn name(&self) -> &'static str {
        "schedule"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        check_partition(g).map_err(|e| format!("kernels are not a valid partition (run `fuse` first): {e}"))?;
        let mem = Memory::new(g)?;
        // The order the kernels had, made valid: listing order where dependences allow.
        let original = kernel_topo_order(g, &kernel_of(g)?)?;
        let order = mem.greedy_order();
        let (before, after) = (mem.peak(&original), mem.peak(&order));
        apply_order(g, &order);
        Ok(format!(
            "{} kernels; peak of live intermediates {} → {}",
            g.kernels.len(),
            human_bytes(before),
            human_bytes(after)
        ))
    }
}

/// What the scheduler knows about the kernels: their dependences and the values crossing their boundaries.
struct Memory {
    /// Kernels each kernel reads from.
    preds: Vec<Vec<usize>>,
    /// Storage roots (views resolved) each kernel reads from other kernels.
    reads: Vec<Vec<usize>>,
    /// Storage roots each kernel stores (read by another kernel or a graph output).
    writes: Vec<Vec<usize>>,
    /// Kernels reading each root.
    reader_count: Vec<usize>,
    /// Roots that are graph outputs (never freed).
    is_output: Vec<bool>,
    bytes: Vec<usize>,
    /// First node of each kernel (the tie-break).
    first: Vec<ValueId>,
}

impl Memory {
    fn new(g: &Graph) -> Result<Memory, String> {
        let of = kernel_of(g)?;
        let n = g.nodes.len();
        let k = g.kernels.len();
        // root[v]: the value whose storage v uses (itself unless v is a view).
        let mut root: Vec<usize> = (0..n).collect();
        for (i, node) in g.nodes.iter().enumerate() {
            if is_view(&node.op) {
                root[i] = root[node.inputs[0].index()];
            }
        }
        let mut is_output = vec![false; n];
        for o in &g.outputs {
            is_output[root[o.value.index()]] = true;
        }
        let (mut preds, mut reads, mut writes) = (vec![vec![]; k], vec![vec![]; k], vec![vec![]; k]);
        let mut reader_count = vec![0; n];
        for (i, node) in g.nodes.iter().enumerate() {
            let Some(ki) = of[i] else { continue };
            for v in &node.inputs {
                let Some(kv) = of[v.index()] else { continue };
                if kv == ki {
                    continue;
                }
                let r = root[v.index()];
                if !preds[ki].contains(&kv) {
                    preds[ki].push(kv);
                }
                // A leaf root (a view of a parameter) is resident, not an intermediate.
                if let Some(kr) = of[r] {
                    if !reads[ki].contains(&r) {
                        reads[ki].push(r);
                        reader_count[r] += 1;
                        if !writes[kr].contains(&r) {
                            writes[kr].push(r);
                        }
                    }
                }
            }
        }
        for (r, out) in is_output.iter().enumerate() {
            if let (true, Some(kr)) = (*out, of[r]) {
                if !writes[kr].contains(&r) {
                    writes[kr].push(r);
                }
            }
        }
        let bytes = g.nodes.iter().map(|n| n.ty.bytes()).collect();
        let first = g.kernels.iter().map(|k| k.nodes[0]).collect();
        Ok(Memory { preds, reads, writes, reader_count, is_output, bytes, first })
    }

    /// The greedy order: most bytes freed first, then the earliest first node.
    fn greedy_order(&self) -> Vec<usize> {
        let k = self.preds.len();
        let mut waiting: Vec<usize> = self.preds.iter().map(Vec::len).collect();
        let mut succ = vec![vec![]; k];
        for (ki, ps) in self.preds.iter().enumerate() {
            for &p in ps {
                succ[p].push(ki);
            }
        }
        let mut remaining = self.reader_count.clone();
        let mut ready: Vec<usize> = (0..k).filter(|&x| waiting[x] == 0).collect();
        let mut order = Vec::with_capacity(k);
        while !ready.is_empty() {
            let freed = |x: usize| -> usize {
                self.reads[x].iter().filter(|&&r| remaining[r] == 1 && !self.is_output[r]).map(|&r| self.bytes[r]).sum()
            };
            let (at, _) = ready
                .iter()
                .enumerate()
                .max_by(|(_, &a), (_, &b)| freed(a).cmp(&freed(b)).then(self.first[b].cmp(&self.first[a])))
                .expect("ready is not empty");
            let x = ready.swap_remove(at);
            order.push(x);
            for &r in &self.reads[x] {
                remaining[r] -= 1;
            }
            for &s in &succ[x] {
                waiting[s] -= 1;
                if waiting[s] == 0 {
                    ready.push(s);
                }
            }
        }
        debug_assert_eq!(order.len(), k, "check_partition guarantees an acyclic kernel graph");
        order
    }

    /// Peak bytes of stored intermediates while running kernels in `order` (a kernel's inputs and outputs are live
    /// together; parameters and inputs are not counted).
    fn peak(&self, order: &[usize]) -> usize {
        let mut remaining = self.reader_count.clone();
        let (mut live, mut peak) = (0usize, 0usize);
        for &x in order {
            live += self.writes[x].iter().map(|&r| self.bytes[r]).sum::<usize>();
            peak = peak.max(live);
            for &r in &self.reads[x] {
                remaining[r] -= 1;
                if remaining[r] == 0 && !self.is_output[r] {
                    live -= self.bytes[r];
                }
            }
        }
        peak
    }
}

/// Rewrites `g` so that leaves come first, then the kernels in `order`, each kernel's nodes contiguous.
fn apply_order(g: &mut Graph, order: &[usize]) {
    let mut new_order: Vec<usize> = (0..g.nodes.len()).filter(|&i| g.nodes[i].op.is_leaf()).collect();
    for &k in order {
        new_order.extend(g.kernels[k].nodes.iter().map(|v| v.index()));
    }
    let mut remap = vec![ValueId(u32::MAX); g.nodes.len()];
    for (new, &old) in new_order.iter().enumerate() {
        remap[old] = ValueId(new as u32);
    }
    let mut old_nodes: Vec<Option<ir::Node>> = std::mem::take(&mut g.nodes).into_iter().map(Some).collect();
    g.nodes = new_order
        .iter()
        .map(|&old| {
            let mut n = old_nodes[old].take().expect("each node is placed once");
            n.inputs.iter_mut().for_each(|v| *v = remap[v.index()]);
            n
        })
        .collect();
    for o in &mut g.outputs {
        o.value = remap[o.value.index()];
    }
    let mut old_kernels: Vec<Option<ir::Kernel>> = std::mem::take(&mut g.kernels).into_iter().map(Some).collect();
    g.kernels = order
        .iter()
        .map(|&k| {
            let mut kernel = old_kernels[k].take().expect("each kernel is scheduled once");
            kernel.nodes.iter_mut().for_each(|v| *v = remap[v.index()]);
            kernel
        })
        .collect();
}

fn human_bytes(b: usize) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.2} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
