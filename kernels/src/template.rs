//! Which template describes a kernel group: the one place that decides whether a group of the `fuse` pass has code.
//! `passes::fuse` asks it so that every group it forms is covered; `codegen::build` lowers what it returns.

use ir::{Graph, Kernel, Op, ValueId};

use crate::gemm::{is_gemm_op, Gemm};
use crate::loops::LoopNest;
use crate::nn::NnKernel;

/// A kernel group's description under one of the templates.
#[derive(Clone, Debug)]
pub enum Template {
    /// Elementwise, data-movement (slice, concat) and reduction groups (`kernels::loops`).
    Loops(LoopNest),
    /// GEMMs: matmul, qmatmul (NF4 prologue), lora_linear (rank-r epilogue), with elementwise epilogues
    /// (`kernels::gemm`).
    Gemm(Gemm),
    /// Attention (+ backward), RoPE, embedding (+ backward), cross-entropy (+ linear, + backward) (`kernels::nn`).
    Nn(NnKernel),
}

/// Views that move no data (the memory plan aliases them): a kernel of one anchor and such views is the anchor's.
pub fn is_alias_view(op: &Op) -> bool {
    matches!(op, Op::Reshape { .. } | Op::StopGradient {})
}

/// Who reads each value of a graph, computed once per graph (linear in its size) so that finding a group's
/// outputs costs what its members' readers cost, not a scan of the whole graph per group (which made fusing a
/// deep model quadratic).
#[derive(Debug, Default)]
pub struct Uses {
    /// Readers of each node, ascending (a node reading a value twice is listed twice).
    readers: Vec<Vec<ValueId>>,
    /// Whether a graph output returns each node.
    output: Vec<bool>,
    /// Readers looked at so far: the work of [`Uses::read_outside`], for tests that check the cost stays linear.
    pub visits: std::cell::Cell<u64>,
}

impl Uses {
    pub fn of(g: &Graph) -> Uses {
        let mut readers: Vec<Vec<ValueId>> = vec![vec![]; g.nodes.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for v in &n.inputs {
                if let Some(r) = readers.get_mut(v.index()) {
                    r.push(ValueId(i as u32));
                }
            }
        }
        let mut output = vec![false; g.nodes.len()];
        for o in &g.outputs {
            if let Some(x) = output.get_mut(o.value.index()) {
                *x = true;
            }
        }
        Uses { readers, output, visits: Default::default() }
    }

    /// Whether a node outside the group (`member` false) reads `v`, or the graph returns it.
    pub fn read_outside(&self, v: ValueId, member: impl Fn(ValueId) -> bool) -> bool {
        if self.output.get(v.index()).copied().unwrap_or(false) {
            return true;
        }
        let readers = self.readers.get(v.index()).map_or(&[][..], Vec::as_slice);
        let mut seen = 0;
        let outside = readers.iter().any(|&r| {
            seen += 1;
            !member(r)
        });
        self.visits.set(self.visits.get() + seen);
        outside
    }
}

impl Template {
    /// The template for a kernel group, or why none applies.
    pub fn of(g: &Graph, k: &Kernel) -> Result<Template, String> {
        Template::of_with(g, k, &Uses::of(g))
    }

    /// [`Template::of`] with the graph's [`Uses`] computed once by the caller (for many groups of one graph).
    pub fn of_with(g: &Graph, k: &Kernel, uses: &Uses) -> Result<Template, String> {
        let loops = match LoopNest::from_group_with(g, k, uses) {
            Ok(n) => return Ok(Template::Loops(n)),
            Err(e) => e.to_string(),
        };
        if k.nodes.iter().any(|&v| is_gemm_op(&g.node(v).op)) {
            return Gemm::from_group_with(g, k, uses).map(Template::Gemm).map_err(|e| e.to_string());
        }
        if let Some(v) = Template::anchor(g, k) {
            if let Ok(nn) = NnKernel::from_node(g, v, &k.name) {
                return Ok(Template::Nn(nn));
            }
        }
        Err(loops)
    }

    /// Whether some template covers the group.
    pub fn covers(g: &Graph, k: &Kernel) -> bool {
        Template::of(g, k).is_ok()
    }

    /// [`Template::covers`] with the graph's [`Uses`] computed once by the caller.
    pub fn covers_with(g: &Graph, k: &Kernel, uses: &Uses) -> bool {
        Template::of_with(g, k, uses).is_ok()
    }

    /// The one node of a group that is not an aliasing view, if there is exactly one.
    pub fn anchor(g: &Graph, k: &Kernel) -> Option<ValueId> {
        match k.nodes.iter().filter(|v| !is_alias_view(&g.node(**v).op)).collect::<Vec<_>>().as_slice() {
            [v] => Some(**v),
            _ => None,
        }
    }

    pub fn rename(&mut self, name: String) {
        match self {
            Template::Loops(n) => n.name = name,
            Template::Gemm(gm) => {
                if let Some(e) = &mut gm.epilogue {
                    e.nest.name = name.clone();
                }
                gm.name = name
            }
            Template::Nn(nn) => nn.name = name,
        }
    }

    /// How many of the kernel's buffers are outputs (the rest, first, are inputs).
    pub fn n_outputs(&self) -> usize {
        match self {
            Template::Loops(n) => n.buffers.len() - n.n_inputs,
            Template::Nn(nn) => nn.buffers.len() - nn.n_inputs,
            Template::Gemm(gm) => gm.n_outputs(),
        }
    }

    /// Per-instance run-time constants passed after the buffers (the dropout seeds of a loop nest).
    pub fn seeds(&self) -> &[u64] {
        match self {
            Template::Loops(n) => &n.seeds,
            _ => &[],
        }
    }

    pub fn symbol(&self) -> String {
        match self {
            Template::Loops(n) => n.symbol(),
            Template::Gemm(gm) => gm.symbol(),
            Template::Nn(nn) => nn.symbol(),
        }
    }

    /// Everything instance-specific erased: equal keys are the same kernel.
    pub fn key(&self) -> String {
        let mut t = self.clone();
        t.rename(String::new());
        match &mut t {
            Template::Loops(n) => {
                n.buffers.iter_mut().for_each(|b| b.value = ValueId(0));
                n.seeds.clear();
            }
            Template::Nn(nn) => nn.buffers.iter_mut().for_each(|b| b.value = ValueId(0)),
            Template::Gemm(gm) => {
                if let Some(e) = &mut gm.epilogue {
                    e.nest.buffers.iter_mut().for_each(|b| b.value = ValueId(0));
                }
            }
        }
        format!("{t:?}")
    }
}
