//! Reverse-mode autodiff: appends the backward graph of the loss and a `grad "p"` output for every parameter asked
//! for. It differentiates w.r.t. every float parameter by default — as a framework would without `requires_grad` —
//! so that the next pass, `eliminate-frozen-grads`, visibly removes what frozen weights do not need.
//!
//! One vector-Jacobian rule per op ([`vjp`]); an op without one is an error if a gradient reaches it.

use crate::Pass;
use ir::graph::BuildError;
use ir::{AttnArg, Builder, Graph, Op, OutputKind, Role, Type, ValueId};

/// Which parameters get gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wrt {
    /// Every float parameter, frozen or not (the naive training step; frozen ones are pruned later).
    AllParams,
    /// Only trainable parameters.
    Trainable,
}

pub struct Autodiff {
    pub wrt: Wrt,
}

impl Pass for Autodiff {
    fn name(&self) -> &'static str {
        "autodiff"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        let before = g.nodes.len();
        let wanted = differentiate(g, self.wrt)?;
        Ok(format!("{} backward nodes, gradients for {wanted} parameters", g.nodes.len() - before))
    }
}

/// Appends the backward graph; returns how many parameters got a gradient output.
pub fn differentiate(g: &mut Graph, wrt: Wrt) -> Result<usize, String> {
    let loss = g.output(&OutputKind::Loss).ok_or("the graph has no loss output")?;
    if g.ty(loss).rank() != 0 || !g.ty(loss).dtype.is_float() {
        return Err(format!("the loss must be a float scalar, found {}", g.ty(loss)));
    }
    let n = g.nodes.len();
    let wanted: Vec<bool> = g
        .nodes
        .iter()
        .map(|node| match &node.op {
            Op::Param { role, .. } => {
                node.ty.dtype.is_float()
                    && (*role == Role::Trainable || (wrt == Wrt::AllParams && *role == Role::Frozen))
            }
            _ => false,
        })
        .collect();
    // needs[i]: node i depends on a wanted parameter, so a gradient flowing into it is worth computing.
    let mut needs = wanted.clone();
    for i in 0..n {
        if !needs[i] && !matches!(g.nodes[i].op, Op::StopGradient {}) {
            needs[i] = g.nodes[i].inputs.iter().any(|v| needs[v.index()]);
        }
    }
    let mut b = Builder::from_graph(std::mem::take(g));
    let mut adj: Vec<Option<ValueId>> = vec![None; n];
    let err = |e: BuildError| e.to_string();
    b.set_label(Some("loss (bwd)".into()));
    adj[loss.index()] = Some(b.constant(1.0, b.ty(loss).clone()).map_err(err)?);
    for i in (0..n).rev() {
        let Some(dy) = adj[i] else { continue };
        let node = b.graph.nodes[i].clone();
        if node.op.is_leaf() || !needs[i] {
            continue;
        }
        b.set_label(Some(format!("{} (bwd)", node.label.as_deref().unwrap_or(""))));
        let grads =
            vjp(&mut b, ValueId(i as u32), dy, &needs).map_err(|e| format!("%{i} ({}): {e}", node.op.mnemonic()))?;
        for (x, gx) in node.inputs.iter().zip(grads) {
            let Some(gx) = gx else { continue };
            if !needs[x.index()] {
                continue;
            }
            adj[x.index()] = Some(match adj[x.index()] {
                None => gx,
                Some(acc) => b.add(acc, gx).map_err(err)?,
            });
        }
    }
    b.set_label(None);
    let mut count = 0;
    for i in 0..n {
        if !wanted[i] {
            continue;
        }
        let Op::Param { name, .. } = &b.graph.nodes[i].op else { continue };
        let name = name.clone();
        let grad = match adj[i] {
            Some(gv) => gv,
            // The parameter does not reach the loss: its gradient is zero.
            None => b.constant(0.0, b.graph.nodes[i].ty.clone()).map_err(err)?,
        };
        b.output(OutputKind::Grad(name), grad);
        count += 1;
    }
    *g = b.finish();
    Ok(count)
}

/// Sums `dy` down to the shape of `x` when broadcasting stretched `x`.
fn unbroadcast(b: &mut Builder, dy: ValueId, x: ValueId) -> Result<ValueId, BuildError> {
    let shape = b.ty(x).shape.clone();
    if b.ty(dy).shape == shape {
        Ok(dy)
    } else {
        b.sum_to(dy, &shape)
    }
}

/// The vector-Jacobian product of node `y` given its adjoint `dy`: one optional gradient per input (`None` where the
/// input is not differentiable or not needed).
pub fn vjp(b: &mut Builder, y: ValueId, dy: ValueId, needs: &[bool]) -> Result<Vec<Option<ValueId>>, String> {
    let node = b.graph.node(y).clone();
    let x = &node.inputs;
    let need = |i: usize| needs[x[i].index()];
    let e = |r: Result<ValueId, BuildError>| r.map_err(|e| e.to_string());
    let one = |b: &mut Builder| b.constant(1.0, Type::scalar(node.ty.dtype));
    let g = match &node.op {
        Op::Param { .. } | Op::Input { .. } | Op::Const { .. } => vec![],
        Op::Reshape { .. } => {
            let shape = b.ty(x[0]).shape.clone();
            vec![Some(e(b.reshape(dy, &shape))?)]
        }
        Op::Transpose { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            vec![Some(e(b.transpose(dy, &inv))?)]
        }
        Op::Concat { axis } => {
            let mut off = 0;
            let mut out = vec![];
            for &xi in x {
                let len = b.ty(xi).shape[*axis];
                out.push(Some(e(b.slice(dy, *axis, off, off + len))?));
                off += len;
            }
            out
        }
        Op::Slice { axis, start, end } => {
            let xt = b.ty(x[0]).clone();
            let mut parts = vec![];
            if *start > 0 {
                let mut s = xt.shape.clone();
                s[*axis] = *start;
                parts.push(e(b.constant(0.0, Type::new(xt.dtype, s)))?);
            }
            parts.push(dy);
            if *end < xt.shape[*axis] {
                let mut s = xt.shape.clone();
                s[*axis] = xt.shape[*axis] - end;
                parts.push(e(b.constant(0.0, Type::new(xt.dtype, s)))?);
            }
            vec![Some(if parts.len() == 1 { dy } else { e(b.concat(&parts, *axis))? })]
        }
        Op::BroadcastTo { .. } => vec![Some(e(unbroadcast(b, dy, x[0]))?)],
        Op::SumTo { .. } => {
            let shape = b.ty(x[0]).shape.clone();
            vec![Some(e(b.broadcast_to(dy, &shape))?)]
        }
        Op::Cast { .. } => {
            let dt = b.ty(x[0]).dtype;
            vec![Some(e(b.cast(dy, dt))?)]
        }
        Op::Add {} => vec![Some(e(unbroadcast(b, dy, x[0]))?), Some(e(unbroadcast(b, dy, x[1]))?)],
        Op::Sub {} => {
            let neg = if need(1) { Some(e(b.neg(dy))?) } else { None };
            vec![
                Some(e(unbroadcast(b, dy, x[0]))?),
                neg.map(|n| unbroadcast(b, n, x[1])).transpose().map_err(|e| e.to_string())?,
            ]
        }
        Op::Mul {} => {
            let mut out = vec![None, None];
            for (i, other) in [(0, x[1]), (1, x[0])] {
                if need(i) {
                    let p = e(b.mul(dy, other))?;
                    out[i] = Some(e(unbroadcast(b, p, x[i]))?);
                }
            }
            out
        }
        Op::Div {} => {
            // y = a / b: da = dy / b, db = −dy·y / b
            let mut out = vec![None, None];
            if need(0) {
                let q = e(b.div(dy, x[1]))?;
                out[0] = Some(e(unbroadcast(b, q, x[0]))?);
            }
            if need(1) {
                let p = e(b.mul(dy, y))?;
                let q = e(b.div(p, x[1]))?;
                let n = e(b.neg(q))?;
                out[1] = Some(e(unbroadcast(b, n, x[1]))?);
            }
            out
        }
        Op::Neg {} => vec![Some(e(b.neg(dy))?)],
        Op::Exp {} => vec![Some(e(b.mul(dy, y))?)],
        Op::Log {} => vec![Some(e(b.div(dy, x[0]))?)],
        Op::Sqrt {} => {
            // d√x = dy / (2√x)
            let h = e(b.scale(dy, 0.5))?;
            vec![Some(e(b.div(h, y))?)]
        }
        Op::Rsqrt {} => {
            // y = x^(-1/2): dx = −½·dy·y/x
            let q = e(b.div(y, x[0]))?;
            let p = e(b.mul(dy, q))?;
            vec![Some(e(b.scale(p, -0.5))?)]
        }
        Op::Sigmoid {} => {
            // dx = dy·y·(1 − y)
            let o = e(one(b))?;
            let c = e(b.sub(o, y))?;
            let p = e(b.mul(y, c))?;
            vec![Some(e(b.mul(dy, p))?)]
        }
        Op::Silu {} => vec![Some(e(b.op(Op::SiluBwd {}, &[dy, x[0]]))?)],
        Op::Swiglu {} => {
            // y = silu(g)·u: dg = silu'(g)·dy·u, du = dy·silu(g)
            let mut out = vec![None, None];
            if need(0) {
                let du = e(b.mul(dy, x[1]))?;
                out[0] = Some(e(b.op(Op::SiluBwd {}, &[du, x[0]]))?);
            }
            if need(1) {
                let s = e(b.silu(x[0]))?;
                out[1] = Some(e(b.mul(dy, s))?);
            }
            out
        }
        Op::Scale { c } => vec![Some(e(b.scale(dy, *c))?)],
        Op::StopGradient {} => vec![None],
        Op::Sum { axes, .. } => {
            let xs = b.ty(x[0]).shape.clone();
            let kept: Vec<usize> = xs.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
            let r = if b.ty(dy).shape == kept { dy } else { e(b.reshape(dy, &kept))? };
            vec![Some(e(b.broadcast_to(r, &xs))?)]
        }
        Op::MatMul { ta, tb } => {
            // C = op(A)·op(B); the four transpose cases, each written without forming anything larger than A or B.
            let (a, bb) = (x[0], x[1]);
            let da = need(0).then(|| match (ta, tb) {
                (false, false) => b.matmul(dy, bb, false, true),
                (false, true) => b.matmul(dy, bb, false, false),
                (true, false) => b.matmul(bb, dy, false, true),
                (true, true) => b.matmul(bb, dy, true, true),
            });
            let db = need(1).then(|| match (ta, tb) {
                (false, false) => b.matmul(a, dy, true, false),
                (false, true) => b.matmul(dy, a, true, false),
                (true, false) => b.matmul(a, dy, false, false),
                (true, true) => b.matmul(dy, a, true, true),
            });
            vec![da.map(e).transpose()?, db.map(e).transpose()?]
        }
        Op::Embedding {} => {
            let vocab = b.ty(x[0]).shape[0];
            vec![Some(e(b.op(Op::EmbeddingBwd { vocab }, &[dy, x[1]]))?), None]
        }
        Op::RmsNorm { eps } => {
            let dx = need(0).then(|| b.op(Op::RmsNormBwdX { eps: *eps }, &[dy, x[0], x[1]]));
            let dw = need(1).then(|| b.op(Op::RmsNormBwdW { eps: *eps }, &[dy, x[0]]));
            vec![dx.map(e).transpose()?, dw.map(e).transpose()?]
        }
        Op::Rope { theta, inverse } => {
            vec![Some(e(b.op(Op::Rope { theta: *theta, inverse: !inverse }, &[dy, x[1]]))?), None]
        }
        Op::Attention { causal, scale } => {
            let ins = [dy, x[0], x[1], x[2], x[3]];
            let mut out = vec![];
            for (i, wrt) in [AttnArg::Q, AttnArg::K, AttnArg::V].into_iter().enumerate() {
                out.push(need(i).then(|| b.attention_bwd(ins, *causal, *scale, wrt)).map(e).transpose()?);
            }
            out.push(None);
            out
        }
        Op::Softmax {} => vec![Some(e(b.op(Op::SoftmaxBwd {}, &[dy, y]))?)],
        Op::CrossEntropy { ignore_index } => {
            vec![Some(e(b.op(Op::CrossEntropyBwd { ignore_index: *ignore_index }, &[dy, x[0], x[1]]))?), None]
        }
        // Quantized tensors are not differentiable; nothing trainable sits behind them.
        Op::Nf4Quantize { .. } | Op::Nf4Dequantize {} => vec![None],
        // The same mask (same seed, same step) scales the gradient.
        Op::Dropout { p, seed } => vec![Some(e(b.dropout(dy, x[1], *p, *seed))?), None],
        Op::Minimum {}
        | Op::Maximum {}
        | Op::QMatMul { .. }
        | Op::LoraLinear { .. }
        | Op::LinearCrossEntropy { .. }
        | Op::LinearCrossEntropyBwd { .. }
        | Op::SiluBwd {}
        | Op::EmbeddingBwd { .. }
        | Op::RmsNormBwdX { .. }
        | Op::RmsNormBwdW { .. }
        | Op::AttentionBwd { .. }
        | Op::SoftmaxBwd {}
        | Op::CrossEntropyBwd { .. }
        | Op::AdamWMoment { .. }
        | Op::AdamWUpdate { .. } => {
            return Err("no gradient rule: this op is not differentiated (it should not depend on a parameter)".into())
        }
    };
    Ok(g)
}
