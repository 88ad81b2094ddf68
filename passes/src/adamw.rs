//! The optimizer step: global gradient-norm clipping (as `torch.nn.utils.clip_grad_norm_`) and an AdamW update
//! (as `torch.optim.AdamW`) for every trainable parameter that has a gradient. Adds the inputs `lr` (f32[]) and
//! `opt_step` (i32[], t ≥ 1), the moment states `optimizer.<param>.exp_avg` / `.exp_avg_sq`, `update` outputs for
//! parameters and states, and the metric `grad_norm` (before clipping).
//!
//! **Gradient accumulation** (`grad_accum` k > 1) stays one program: the step also takes `accum_apply` (f32[], 1 on
//! the last micro-step of an optimizer step, else 0) and keeps per trainable parameter a state
//! `optimizer.<param>.grad_acc` (zeros). With g the micro-batch's gradient, `s = grad_acc + g`; clipping, the
//! `grad_norm` metric and AdamW see the mean `s · (1/k)`; the updates are `apply · new + (1 − apply) · old` for the
//! parameter and both moments, and `grad_acc' = (1 − apply) · s`. With apply ∈ {0, 1} and finite values this is exact:
//! a micro-step that does not apply leaves the parameter and moments bit for bit, and the applying one writes what
//! AdamW computed and empties the accumulator.

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
    /// Micro-batches per optimizer step; above 1 the step accumulates gradients (see the module docs).
    pub grad_accum: usize,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 1.0, grad_accum: 1 }
    }
}

/// Names of the AdamW moment states of a parameter.
pub fn state_names(param: &str) -> (String, String) {
    (format!("optimizer.{param}.exp_avg"), format!("optimizer.{param}.exp_avg_sq"))
}

/// Name of the gradient accumulator state of a parameter (only with `grad_accum` > 1).
pub fn grad_acc_name(param: &str) -> String {
    format!("optimizer.{param}.grad_acc")
}

/// The input that says whether a micro-step applies the update (only with `grad_accum` > 1).
pub const ACCUM_APPLY: &str = "accum_apply";

/// `apply · new + (1 − apply) · old`.
fn blend(
    b: &mut Builder,
    new: ir::ValueId,
    old: ir::ValueId,
    apply: ir::ValueId,
    keep: ir::ValueId,
) -> Result<ir::ValueId, BuildError> {
    let a = b.mul(new, apply)?;
    let k = b.mul(old, keep)?;
    b.add(a, k)
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
        // Accumulation: (accum_apply, 1 − accum_apply), and per parameter the accumulator and the sum s.
        let mut accum: Option<(ir::ValueId, ir::ValueId)> = None;
        let mut sums: Vec<Option<ir::ValueId>> = vec![None; trainable.len()];
        let mut trainable = trainable;
        if self.grad_accum > 1 && !trainable.is_empty() {
            let apply = b.input(ACCUM_APPLY, Type::f32(vec![]))?;
            let one = b.constant(1.0, Type::f32(vec![]))?;
            let keep = b.sub(one, apply)?;
            accum = Some((apply, keep));
            let inv = 1.0 / self.grad_accum as f64;
            for ((name, p, grad), sum) in trainable.iter_mut().zip(sums.iter_mut()) {
                b.set_label(Some(format!("optimizer {name}")));
                let ty = b.ty(*p).clone();
                let acc = b.param(&grad_acc_name(name), ty, Role::State, Init::Zeros)?;
                let s = b.add(acc, *grad)?;
                *sum = Some(s);
                *grad = b.scale(s, inv)?;
            }
            b.set_label(Some("optimizer".into()));
        }
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
        for ((name, p, grad), sum) in trainable.iter().zip(&sums) {
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
            let (p1, m1, v1) = match (accum, sum) {
                (Some((apply, keep)), Some(s)) => {
                    let p1 = blend(&mut b, p1, *p, apply, keep)?;
                    let m1 = blend(&mut b, m1, m, apply, keep)?;
                    let v1 = blend(&mut b, v1, v, apply, keep)?;
                    let acc1 = b.mul(*s, keep)?;
                    b.output(OutputKind::Update(grad_acc_name(name)), acc1);
                    (p1, m1, v1)
                }
                _ => (p1, m1, v1),
            };
            b.output(OutputKind::Update(name.clone()), p1);
            b.output(OutputKind::Update(m_name), m1);
            b.output(OutputKind::Update(v_name), v1);
        }
        *g = b.finish();
        let accumulating = if accum.is_some() {
            format!(", accumulating gradients over {} micro-batches", self.grad_accum)
        } else {
            String::new()
        };
        Ok(format!("AdamW for {} trainable parameters{accumulating}", trainable.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::interp::{run, Env, Precision, Tensor, Value};

    /// A trainable `w` and a frozen `f` whose gradients are the inputs `gw`, `gf` (AdamW must skip the frozen one).
    fn toy() -> Graph {
        let mut b = Builder::new("toy");
        let w = b.param("w", Type::f32(vec![2, 3]), Role::Trainable, Init::Load).unwrap();
        let f = b.param("f", Type::f32(vec![3]), Role::Frozen, Init::Load).unwrap();
        let gw = b.input("gw", Type::f32(vec![2, 3])).unwrap();
        let gf = b.input("gf", Type::f32(vec![3])).unwrap();
        let loss = b.sum(w, &[0, 1], false).unwrap();
        b.output(OutputKind::Loss, loss);
        b.output(OutputKind::Grad("w".into()), gw);
        b.output(OutputKind::Grad("f".into()), gf);
        let _ = f;
        b.finish()
    }

    fn adamw(k: usize) -> Graph {
        let mut g = toy();
        AdamW { weight_decay: 0.01, max_grad_norm: 0.5, grad_accum: k, ..AdamW::default() }.run(&mut g).unwrap();
        ir::verify::verify(&g).unwrap();
        g
    }

    /// A [2, 3] tensor of f32 values (the step's results are rounded to f32).
    fn t(data: &[f64]) -> Value {
        Value::F(Tensor::new(vec![2, 3], data.iter().map(|&x| x as f32 as f64).collect()))
    }

    /// Runs `g` and returns the updates by name.
    fn step(g: &Graph, state: &[(&str, Value)], gw: &[f64], apply: Option<f64>) -> Vec<(String, Vec<f64>)> {
        let mut env = Env::default();
        for (n, v) in state {
            env.params.insert(n.to_string(), v.clone());
        }
        env.params.insert("f".into(), Value::F(Tensor::zeros(&[3])));
        env.inputs.insert("gw".into(), t(gw));
        env.inputs.insert("gf".into(), Value::F(Tensor::zeros(&[3])));
        env.inputs.insert("lr".into(), Value::F(Tensor::scalar(0.1)));
        env.inputs.insert("opt_step".into(), Value::ints(vec![], vec![3]));
        if let Some(a) = apply {
            env.inputs.insert(ACCUM_APPLY.into(), Value::F(Tensor::scalar(a)));
        }
        let vals = run(g, &env, Precision::F32).unwrap();
        let mut out: Vec<(String, Vec<f64>)> = g
            .outputs
            .iter()
            .filter_map(|o| match &o.kind {
                OutputKind::Update(n) => Some((n.clone(), vals[o.value.index()].as_f().unwrap().data.clone())),
                OutputKind::Metric(n) => Some((n.clone(), vals[o.value.index()].as_f().unwrap().data.clone())),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn without_accumulation_the_step_is_as_before() {
        // (The pipeline snapshots in tests/ pin the whole k = 1 step; here: nothing of accumulation appears.)
        assert_eq!(AdamW::default().grad_accum, 1);
        let g = adamw(1);
        assert!(g.input(ACCUM_APPLY).is_none());
        assert!(g.param(&grad_acc_name("w")).is_none());
        let updates: Vec<_> = g.outputs.iter().filter(|o| matches!(o.kind, OutputKind::Update(_))).collect();
        assert_eq!(updates.len(), 3, "w and its two moments");
    }

    #[test]
    fn accumulation_adds_the_apply_input_the_accumulator_and_its_update() {
        let g = adamw(2);
        let apply = g.input(ACCUM_APPLY).expect("accum_apply");
        assert_eq!(g.ty(apply), &Type::f32(vec![]));
        let acc = g.param(&grad_acc_name("w")).expect("grad_acc state");
        assert!(matches!(&g.node(acc).op, Op::Param { role: Role::State, init: Init::Zeros, .. }));
        assert_eq!(g.ty(acc), &Type::f32(vec![2, 3]));
        assert!(g.param(&grad_acc_name("f")).is_none(), "frozen parameters accumulate nothing");
        for n in ["w", "optimizer.w.exp_avg", "optimizer.w.exp_avg_sq", "optimizer.w.grad_acc"] {
            assert!(g.output(&OutputKind::Update(n.into())).is_some(), "no update of {n}");
        }
    }

    #[test]
    fn accumulated_micro_steps_apply_the_mean_gradient_once() {
        let (g1, g2) = (adamw(1), adamw(2));
        let w = t(&[0.5, -0.25, 1.0, 0.0, 2.0, -1.5]);
        let m = t(&[0.01, 0.02, -0.03, 0.0, 0.1, -0.1]);
        let v = t(&[0.001, 0.002, 0.003, 0.0, 0.01, 0.02]);
        let (ga, gb) = ([0.3, -0.2, 0.1, 0.4, -0.5, 0.6], [0.1, 0.2, -0.3, 0.0, 0.5, 0.2]);
        let state = |acc: Value| {
            vec![
                ("w", w.clone()),
                ("optimizer.w.exp_avg", m.clone()),
                ("optimizer.w.exp_avg_sq", v.clone()),
                ("optimizer.w.grad_acc", acc),
            ]
        };
        let get = |o: &[(String, Vec<f64>)], n: &str| o.iter().find(|(k, _)| k == n).unwrap().1.clone();
        // Micro-step 1 does not apply: parameter and moments stay bit for bit, the accumulator holds ga.
        let o = step(&g2, &state(t(&[0.0; 6])), &ga, Some(0.0));
        for (n, want) in [("w", &w), ("optimizer.w.exp_avg", &m), ("optimizer.w.exp_avg_sq", &v)] {
            assert_eq!(get(&o, n), want.as_f().unwrap().data, "{n}");
        }
        let acc = get(&o, "optimizer.w.grad_acc");
        let f32s = |x: &[f64]| x.iter().map(|&y| y as f32 as f64).collect::<Vec<_>>();
        assert_eq!(acc, f32s(&ga));
        // Micro-step 2 applies: what one step with the mean gradient computes, and the accumulator is empty.
        let o = step(&g2, &state(t(&acc)), &gb, Some(1.0));
        let mean: Vec<f64> = ga.iter().zip(&gb).map(|(a, b)| (a + b) / 2.0).collect();
        let want = step(&g1, &state(t(&[0.0; 6]))[..3], &mean, None);
        for (n, w) in &want {
            let got = get(&o, n);
            for (x, y) in got.iter().zip(w) {
                assert!((x - y).abs() <= 1e-6 + 1e-5 * y.abs(), "{n}: {got:?} vs {w:?}");
            }
        }
        assert_eq!(get(&o, "optimizer.w.grad_acc"), vec![0.0; 6]);
    }
}
