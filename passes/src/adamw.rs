//! The optimizer step: global gradient-norm clipping (as `torch.nn.utils.clip_grad_norm_`) and an AdamW update
//! (as `torch.optim.AdamW`) for every trainable parameter that has a gradient. Adds the inputs `lr` (f32[]) and
//! `opt_step` (i32[], t ≥ 1), the moment states `optimizer.<param>.exp_avg` / `.exp_avg_sq`, `update` outputs for
//! parameters and states, and the metric `grad_norm` (before clipping).

use crate::Pass;
use ir::graph::BuildError;
use ir::{Builder, Graph, Init, Op, OutputKind, Role, Type};

#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub max_grad_norm: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 1.0 }
    }
}

/// Names of the AdamW moment states of a parameter.
pub fn state_names(param: &str) -> (String, String) {
    (format!("optimizer.{param}.exp_avg"), format!("optimizer.{param}.exp_avg_sq"))
}

impl Pass for AdamW {
    fn name(&self) -> &'static str {
        "adamw"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        self.append(g).map_err(|e| e.to_string())
    }
}

impl AdamW {
    fn append(&self, g: &mut Graph) -> Result<String, BuildError> {
        let by_name: std::collections::HashMap<&str, ir::ValueId> =
            g.params().into_iter().map(|(v, n, _)| (n, v)).collect();
        let trainable: Vec<(String, ir::ValueId, ir::ValueId)> = g
            .outputs
            .iter()
            .filter_map(|o| match &o.kind {
                OutputKind::Grad(name) => {
                    let p = *by_name.get(name.as_str())?;
                    matches!(g.node(p).op, Op::Param { role: Role::Trainable, .. }).then(|| (name.clone(), p, o.value))
                }
                _ => None,
            })
            .collect();
        let mut b = Builder::from_graph(std::mem::take(g));
        b.set_label(Some("optimizer".into()));
        let lr = b.input("lr", Type::f32(vec![]))?;
        let step = b.input("opt_step", Type::i32(vec![]))?;
        // Global gradient norm over all trainable gradients.
        let mut sq = None;
        for (_, _, grad) in &trainable {
            let s = b.mul(*grad, *grad)?;
            let axes: Vec<usize> = (0..b.ty(s).rank()).collect();
            let s = b.sum(s, &axes, false)?;
            sq = Some(match sq {
                None => s,
                Some(acc) => b.add(acc, s)?,
            });
        }
        let Some(sq) = sq else {
            *g = b.finish();
            return Ok("no trainable parameters".into());
        };
        let norm = b.sqrt(sq)?;
        b.output(OutputKind::Metric("grad_norm".into()), norm);
        let clip = if self.max_grad_norm > 0.0 {
            // clip = min(1, max_norm / (norm + 1e-6))
            let tiny = b.constant(1e-6, Type::f32(vec![]))?;
            let denom = b.add(norm, tiny)?;
            let max = b.constant(self.max_grad_norm, Type::f32(vec![]))?;
            let coef = b.div(max, denom)?;
            let one = b.constant(1.0, Type::f32(vec![]))?;
            Some(b.op(Op::Minimum {}, &[coef, one])?)
        } else {
            None
        };
        for (name, p, grad) in &trainable {
            b.set_label(Some(format!("optimizer {name}")));
            let ty = b.ty(*p).clone();
            let grad = match clip {
                Some(c) => b.mul(*grad, c)?,
                None => *grad,
            };
            let (m_name, v_name) = state_names(name);
            let m = b.param(&m_name, ty.clone(), Role::State, Init::Zeros)?;
            let v = b.param(&v_name, ty, Role::State, Init::Zeros)?;
            let m1 = b.op(Op::AdamWMoment { beta: self.beta1, square: false }, &[m, grad])?;
            let v1 = b.op(Op::AdamWMoment { beta: self.beta2, square: true }, &[v, grad])?;
            let upd = Op::AdamWUpdate {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
            };
            let p1 = b.op(upd, &[*p, m1, v1, lr, step])?;
            b.output(OutputKind::Update(name.clone()), p1);
            b.output(OutputKind::Update(m_name), m1);
            b.output(OutputKind::Update(v_name), v1);
        }
        *g = b.finish();
        Ok(format!("AdamW for {} trainable parameters", trainable.len()))
    }
}
