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

impl Template {
    /// The template for a kernel group, or why none applies.
    pub fn of(g: &Graph, k: &Kernel) -> Result<Template, String> {
        let loops = match LoopNest::from_group(g, k) {
            Ok(n) => return Ok(Template::Loops(n)),
            Err(e) => e.to_string(),
        };
        if k.nodes.iter().any(|&v| is_gemm_op(&g.node(v).op)) {
            return Gemm::from_group(g, k).map(Template::Gemm).map_err(|e| e.to_string());
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
