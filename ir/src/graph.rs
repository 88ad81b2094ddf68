//! The graph: nodes in SSA order (every input refers to an earlier node), plus the graph's outputs.

use crate::attr::{Init, Role};
use crate::ops::Op;
use crate::types::Type;
use std::fmt;

/// Index of a node; each node defines one value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for ValueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub ty: Type,
    /// Where the node came from, for people reading the IR (`model.layers.0.self_attn.q_proj`).
    pub label: Option<String>,
}

/// What a graph output means to whoever runs the graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OutputKind {
    /// The scalar training loss.
    Loss,
    /// The model's logits.
    Logits,
    /// The gradient of the loss w.r.t. the named parameter.
    Grad(String),
    /// The new value of the named parameter (or optimizer state) after the step.
    Update(String),
    /// A named scalar the runner reports (e.g. `grad_norm`).
    Metric(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub kind: OutputKind,
    pub value: ValueId,
}

/// A group of nodes that runs as one kernel (formed by the fusion pass; empty before it).
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// A readable name: the anchor op and where it came from (`lora_linear:model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// Member nodes in increasing order; values read from outside the group are the kernel's inputs.
    pub nodes: Vec<ValueId>,
}

/// A whole program: the forward graph, or the training step (forward + backward + optimizer).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub outputs: Vec<Output>,
    /// Kernel groups, once formed (every non-leaf node in exactly one group then).
    pub kernels: Vec<Kernel>,
}

/// Error from building a node whose inputs do not type-check.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{op}: {message}")]
pub struct BuildError {
    pub op: &'static str,
    pub message: String,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Graph::default() }
    }

    pub fn node(&self, v: ValueId) -> &Node {
        &self.nodes[v.index()]
    }

    pub fn ty(&self, v: ValueId) -> &Type {
        &self.nodes[v.index()].ty
    }

    pub fn ids(&self) -> impl Iterator<Item = ValueId> {
        (0..self.nodes.len() as u32).map(ValueId)
    }

    /// Appends a node, inferring its type from its inputs (leaves take `declared`).
    pub fn push(
        &mut self,
        op: Op,
        inputs: Vec<ValueId>,
        declared: Option<Type>,
        label: Option<String>,
    ) -> Result<ValueId, BuildError> {
        let err = |message: String| BuildError { op: op.mnemonic(), message };
        if let Some(bad) = inputs.iter().find(|v| v.index() >= self.nodes.len()) {
            return Err(err(format!("input {bad} is not defined")));
        }
        let tys: Vec<&Type> = inputs.iter().map(|&v| self.ty(v)).collect();
        let decl = declared.unwrap_or_else(|| Type::f32(Vec::<usize>::new()));
        let ty = op.infer(&tys, &decl).map_err(err)?;
        self.nodes.push(Node { op, inputs, ty, label });
        Ok(ValueId(self.nodes.len() as u32 - 1))
    }

    /// The parameter named `name`, if any.
    pub fn param(&self, name: &str) -> Option<ValueId> {
        self.ids().find(|&v| matches!(&self.node(v).op, Op::Param { name: n, .. } if n == name))
    }

    /// All parameters with their names and roles, in node order.
    pub fn params(&self) -> Vec<(ValueId, &str, Role)> {
        self.ids()
            .filter_map(|v| match &self.node(v).op {
                Op::Param { name, role, .. } => Some((v, name.as_str(), *role)),
                _ => None,
            })
            .collect()
    }

    /// All inputs with their names, in node order.
    pub fn inputs(&self) -> Vec<(ValueId, &str)> {
        self.ids()
            .filter_map(|v| match &self.node(v).op {
                Op::Input { name } => Some((v, name.as_str())),
                _ => None,
            })
            .collect()
    }

    pub fn input(&self, name: &str) -> Option<ValueId> {
        self.inputs().into_iter().find(|(_, n)| *n == name).map(|(v, _)| v)
    }

    pub fn output(&self, kind: &OutputKind) -> Option<ValueId> {
        self.outputs.iter().find(|o| &o.kind == kind).map(|o| o.value)
    }

    /// How many nodes read each value (outputs count as readers).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut uses = vec![0; self.nodes.len()];
        for n in &self.nodes {
            for i in &n.inputs {
                uses[i.index()] += 1;
            }
        }
        for o in &self.outputs {
            uses[o.value.index()] += 1;
        }
        uses
    }

    /// Parameter nodes' init, for loaders.
    pub fn param_init(&self, v: ValueId) -> Option<&Init> {
        match &self.node(v).op {
            Op::Param { init, .. } => Some(init),
            _ => None,
        }
    }

    /// Keeps only nodes that outputs depend on, renumbering values; returns how many nodes were removed.
    pub fn remove_dead(&mut self) -> usize {
        let mut live = vec![false; self.nodes.len()];
        for o in &self.outputs {
            live[o.value.index()] = true;
        }
        for i in (0..self.nodes.len()).rev() {
            if live[i] {
                for v in &self.nodes[i].inputs {
                    live[v.index()] = true;
                }
            }
        }
        // Parameters and inputs are the program's interface: keep them even when unused.
        for (i, n) in self.nodes.iter().enumerate() {
            if matches!(n.op, Op::Param { .. } | Op::Input { .. }) {
                live[i] = true;
            }
        }
        self.retain(&live)
    }

    /// Keeps the nodes marked live (their inputs must be live too), renumbering values.
    pub fn retain(&mut self, live: &[bool]) -> usize {
        let mut remap = vec![None; self.nodes.len()];
        let mut kept = Vec::with_capacity(self.nodes.len());
        for (i, mut n) in std::mem::take(&mut self.nodes).into_iter().enumerate() {
            if !live[i] {
                continue;
            }
            for v in &mut n.inputs {
                *v = remap[v.index()].expect("a live node reads a removed node");
            }
            remap[i] = Some(ValueId(kept.len() as u32));
            kept.push(n);
        }
        let removed = live.len() - kept.len();
        self.nodes = kept;
        for o in &mut self.outputs {
            o.value = remap[o.value.index()].expect("an output reads a removed node");
        }
        for k in &mut self.kernels {
            k.nodes = k.nodes.iter().filter_map(|v| remap[v.index()]).collect();
        }
        self.kernels.retain(|k| !k.nodes.is_empty());
        removed
    }
}
