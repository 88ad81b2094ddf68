//! A convenience layer over [`Graph::push`]: one method per op, and a current label stamped on new nodes.

use crate::attr::{AttnArg, Init, Role};
use crate::graph::{BuildError, Graph, Output, OutputKind, ValueId};
use crate::ops::Op;
use crate::types::{DType, Type};

pub type Built = Result<ValueId, BuildError>;

/// Builds a [`Graph`] op by op.
pub struct Builder {
    pub graph: Graph,
    label: Option<String>,
}

impl Builder {
    pub fn new(name: impl Into<String>) -> Builder {
        Builder { graph: Graph::new(name), label: None }
    }

    /// Wraps an existing graph, to append to it.
    pub fn from_graph(graph: Graph) -> Builder {
        Builder { graph, label: None }
    }

    pub fn finish(self) -> Graph {
        self.graph
    }

    /// Sets the label stamped on the nodes built from now on (`None` clears it).
    pub fn set_label(&mut self, label: Option<String>) {
        self.label = label;
    }

    pub fn label(&self) -> Option<&str> {
        self.label.as_deref()
    }

    pub fn ty(&self, v: ValueId) -> &Type {
        self.graph.ty(v)
    }

    pub fn op(&mut self, op: Op, inputs: &[ValueId]) -> Built {
        self.graph.push(op, inputs.to_vec(), None, self.label.clone())
    }

    pub fn param(&mut self, name: &str, ty: Type, role: Role, init: Init) -> Built {
        let op = Op::Param { name: name.to_string(), role, init };
        self.graph.push(op, vec![], Some(ty), None)
    }

    pub fn input(&mut self, name: &str, ty: Type) -> Built {
        self.graph.push(Op::Input { name: name.to_string() }, vec![], Some(ty), None)
    }

    pub fn constant(&mut self, value: f64, ty: Type) -> Built {
        self.graph.push(Op::Const { value }, vec![], Some(ty), self.label.clone())
    }

    pub fn output(&mut self, kind: OutputKind, value: ValueId) {
        self.graph.outputs.push(Output { kind, value });
    }

    pub fn reshape(&mut self, x: ValueId, shape: &[usize]) -> Built {
        self.op(Op::Reshape { shape: shape.to_vec() }, &[x])
    }
    pub fn transpose(&mut self, x: ValueId, perm: &[usize]) -> Built {
        self.op(Op::Transpose { perm: perm.to_vec() }, &[x])
    }
    pub fn concat(&mut self, xs: &[ValueId], axis: usize) -> Built {
        self.op(Op::Concat { axis }, xs)
    }
    pub fn slice(&mut self, x: ValueId, axis: usize, start: usize, end: usize) -> Built {
        self.op(Op::Slice { axis, start, end }, &[x])
    }
    pub fn broadcast_to(&mut self, x: ValueId, shape: &[usize]) -> Built {
        self.op(Op::BroadcastTo { shape: shape.to_vec() }, &[x])
    }
    pub fn sum_to(&mut self, x: ValueId, shape: &[usize]) -> Built {
        self.op(Op::SumTo { shape: shape.to_vec() }, &[x])
    }
    pub fn cast(&mut self, x: ValueId, to: DType) -> Built {
        self.op(Op::Cast { to }, &[x])
    }
    pub fn add(&mut self, a: ValueId, b: ValueId) -> Built {
        self.op(Op::Add {}, &[a, b])
    }
    pub fn sub(&mut self, a: ValueId, b: ValueId) -> Built {
        self.op(Op::Sub {}, &[a, b])
    }
    pub fn mul(&mut self, a: ValueId, b: ValueId) -> Built {
        self.op(Op::Mul {}, &[a, b])
    }
    pub fn div(&mut self, a: ValueId, b: ValueId) -> Built {
        self.op(Op::Div {}, &[a, b])
    }
    pub fn neg(&mut self, x: ValueId) -> Built {
        self.op(Op::Neg {}, &[x])
    }
    pub fn sqrt(&mut self, x: ValueId) -> Built {
        self.op(Op::Sqrt {}, &[x])
    }
    pub fn silu(&mut self, x: ValueId) -> Built {
        self.op(Op::Silu {}, &[x])
    }
    pub fn swiglu(&mut self, gate: ValueId, up: ValueId) -> Built {
        self.op(Op::Swiglu {}, &[gate, up])
    }
    pub fn scale(&mut self, x: ValueId, c: f64) -> Built {
        self.op(Op::Scale { c }, &[x])
    }
    pub fn stop_gradient(&mut self, x: ValueId) -> Built {
        self.op(Op::StopGradient {}, &[x])
    }
    pub fn sum(&mut self, x: ValueId, axes: &[usize], keepdim: bool) -> Built {
        self.op(Op::Sum { axes: axes.to_vec(), keepdim }, &[x])
    }
    /// op(a)·op(b); `linear(x, w)` is `matmul(x, w, false, true)`.
    pub fn matmul(&mut self, a: ValueId, b: ValueId, ta: bool, tb: bool) -> Built {
        self.op(Op::MatMul { ta, tb }, &[a, b])
    }
    pub fn embedding(&mut self, table: ValueId, ids: ValueId) -> Built {
        self.op(Op::Embedding {}, &[table, ids])
    }
    pub fn rms_norm(&mut self, x: ValueId, w: ValueId, eps: f64) -> Built {
        self.op(Op::RmsNorm { eps }, &[x, w])
    }
    pub fn rope(&mut self, x: ValueId, pos: ValueId, theta: f64) -> Built {
        self.op(Op::Rope { theta, inverse: false }, &[x, pos])
    }
    pub fn attention(&mut self, q: ValueId, k: ValueId, v: ValueId, seg: ValueId, scale: f64) -> Built {
        self.op(Op::Attention { causal: true, scale }, &[q, k, v, seg])
    }
    pub fn attention_bwd(&mut self, ins: [ValueId; 5], causal: bool, scale: f64, wrt: AttnArg) -> Built {
        self.op(Op::AttentionBwd { causal, scale, wrt }, &ins)
    }
    pub fn softmax(&mut self, x: ValueId) -> Built {
        self.op(Op::Softmax {}, &[x])
    }
    pub fn cross_entropy(&mut self, logits: ValueId, labels: ValueId, ignore_index: i64) -> Built {
        self.op(Op::CrossEntropy { ignore_index }, &[logits, labels])
    }
    pub fn nf4_dequantize(&mut self, q: ValueId) -> Built {
        self.op(Op::Nf4Dequantize {}, &[q])
    }
    pub fn dropout(&mut self, x: ValueId, step: ValueId, p: f64, seed: u64) -> Built {
        self.op(Op::Dropout { p, seed }, &[x, step])
    }
}
