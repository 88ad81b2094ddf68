//! Gradient checking: autodiff gradients vs central finite differences, both in f64 on the reference interpreter.
//!
//! `stop_gradient` values are held at their values at the unperturbed point while differencing, so the check
//! compares against the gradient the graph defines (e.g. DoRA's detached weight norm), not the gradient of a
//! different function.

use crate::autodiff::{differentiate, Wrt};
use ir::interp::{run, Env, Precision, Value};
use ir::{Graph, Op, OutputKind, Role, ValueId};

/// The result for one parameter.
#[derive(Clone, Debug)]
pub struct ParamCheck {
    pub param: String,
    /// Elements compared.
    pub checked: usize,
    /// ‖fd − ad‖₂ / ‖fd‖₂ over the checked elements.
    pub rel_err: f64,
    /// ‖fd‖₂ over the checked elements (so a check on zero gradients is visible).
    pub fd_norm: f64,
}

/// Checks the gradient of the loss of `forward` w.r.t. every trainable parameter, at up to `per_param` elements
/// of each (chosen by a seeded stride; `None` checks all), with step `h`.
pub fn check_gradients(
    forward: &Graph,
    env: &Env,
    h: f64,
    per_param: Option<usize>,
) -> Result<Vec<ParamCheck>, String> {
    let mut step = forward.clone();
    step.outputs.retain(|o| o.kind == OutputKind::Loss);
    let fwd_only = step.clone();
    differentiate(&mut step, Wrt::Trainable)?;
    let values = run(&step, env, Precision::F64).map_err(|e| e.to_string())?;
    let loss_id = fwd_only.output(&OutputKind::Loss).ok_or("no loss")?;
    // Hold stop_gradient values fixed at the base point.
    let mut pinned_env = env.clone();
    for (i, n) in fwd_only.nodes.iter().enumerate() {
        if matches!(n.op, Op::StopGradient {}) {
            pinned_env.pinned.insert(ValueId(i as u32), values[i].clone());
        }
    }
    let loss_at = |e: &Env| -> Result<f64, String> {
        let v = run(&fwd_only, e, Precision::F64).map_err(|e| e.to_string())?;
        Ok(v[loss_id.index()].as_f().ok_or("loss is not float")?.data[0])
    };
    let mut out = vec![];
    for (_, name, role) in fwd_only.params() {
        if role != Role::Trainable {
            continue;
        }
        let gid = step.output(&OutputKind::Grad(name.to_string())).ok_or(format!("no gradient for {name}"))?;
        let ad = values[gid.index()].as_f().ok_or("gradient is not float")?.data.clone();
        let base = match pinned_env.params.get(name) {
            Some(Value::F(t)) => t.clone(),
            _ => return Err(format!("parameter `{name}` needs an f32 value in the environment")),
        };
        let n = base.data.len();
        let picks: Vec<usize> = match per_param {
            Some(k) if k < n => (0..k).map(|i| (i * n / k + (i * 7919) % (n / k).max(1)) % n).collect(),
            _ => (0..n).collect(),
        };
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for &i in &picks {
            let mut e = pinned_env.clone();
            let mut t = base.clone();
            t.data[i] = base.data[i] + h;
            e.params.insert(name.to_string(), Value::F(t.clone()));
            let up = loss_at(&e)?;
            t.data[i] = base.data[i] - h;
            e.params.insert(name.to_string(), Value::F(t));
            let down = loss_at(&e)?;
            let fd = (up - down) / (2.0 * h);
            num += (fd - ad[i]).powi(2);
            den += fd * fd;
        }
        let rel_err = if den == 0.0 { num.sqrt() } else { (num / den).sqrt() };
        out.push(ParamCheck { param: name.to_string(), checked: picks.len(), rel_err, fd_norm: den.sqrt() });
    }
    Ok(out)
}
