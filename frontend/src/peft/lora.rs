//! LoRA (Hu et al. 2021) as PEFT computes it: for each targeted linear module `m` with weight W: [out, in],
//! trainable `m.lora_A.weight`: [r, in] (kaiming-uniform, a = √5) and `m.lora_B.weight`: [out, r] (zeros), and
//! `y = x·Wᵀ + s·((dropout(x)·Aᵀ)·Bᵀ)` with s = alpha / r (rsLoRA: alpha / √r). B·A is never formed.

use super::{dora, module_seed, rebuild, LinearModule, PeftError};
use ir::{Builder, Graph, Init, Op, Role, Type, ValueId};
use std::cell::Cell;
use std::collections::HashMap;

/// `Lora { rank, alpha, dropout, rslora, dora }` of a recipe.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout probability on the adapter's input (0 = none).
    pub dropout: f64,
    /// rsLoRA scaling alpha / √r.
    pub rslora: bool,
    /// DoRA (weight-decomposed) instead of plain LoRA.
    pub dora: bool,
}

impl LoraSpec {
    /// The scaling s of the low-rank update.
    pub fn scaling(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// Adds LoRA (or DoRA, when `spec.dora`) to `modules`. When dropout > 0 the graph gets an i32[] input `step` (the
/// dropout masks depend on it).
pub fn apply_lora(g: &Graph, modules: &[LinearModule], spec: &LoraSpec) -> Result<Graph, PeftError> {
    if spec.rank == 0 {
        return Err(PeftError::Invalid("the LoRA rank must be positive".into()));
    }
    if !(0.0..1.0).contains(&spec.dropout) {
        return Err(PeftError::Invalid(format!("dropout must be in [0, 1), got {}", spec.dropout)));
    }
    let by_matmul: HashMap<ValueId, &LinearModule> = modules.iter().map(|m| (m.matmul, m)).collect();
    // The step input is emitted first (an existing one moves there), so every dropout can read it.
    let old_step = g.input("step");
    let step = Cell::new(None);
    rebuild(
        g,
        |b| {
            if spec.dropout > 0.0 || old_step.is_some() {
                step.set(Some(b.input("step", Type::i32(Vec::<usize>::new())).map_err(PeftError::build("step"))?));
            }
            Ok(())
        },
        |b, old, node, inputs| {
            let step = step.get();
            if Some(old) == old_step {
                return Ok(step);
            }
            let Some(m) = by_matmul.get(&old) else { return Ok(None) };
            let (x, w) = (inputs[0], inputs[1]);
            b.set_label(Some(m.name.clone()));
            let y = if spec.dora {
                dora::emit(b, m, x, w, spec, step)
            } else {
                let base = b.op(node.op.clone(), inputs).map_err(PeftError::build(&m.name))?;
                emit_lora(b, m, x, spec, step).and_then(|delta| b.add(base, delta).map_err(PeftError::build(&m.name)))
            };
            b.set_label(None);
            Ok(Some(y?))
        },
    )
}

/// The adapter parameters A: [r, in] and B: [out, r] of module `m`.
pub(crate) fn emit_params(b: &mut Builder, m: &LinearModule, rank: usize) -> Result<(ValueId, ValueId), PeftError> {
    let err = || PeftError::build(&m.name);
    let a = b
        .param(
            &format!("{}.lora_A.weight", m.name),
            Type::f32([rank, m.in_features]),
            Role::Trainable,
            Init::KaimingUniform { a: 5f64.sqrt() },
        )
        .map_err(err())?;
    let bb = b
        .param(&format!("{}.lora_B.weight", m.name), Type::f32([m.out_features, rank]), Role::Trainable, Init::Zeros)
        .map_err(err())?;
    Ok((a, bb))
}

/// `dropout(x)` with the module's own seed, or `x` when p = 0.
pub(crate) fn emit_dropout(
    b: &mut Builder,
    m: &LinearModule,
    x: ValueId,
    p: f64,
    step: Option<ValueId>,
) -> Result<ValueId, PeftError> {
    match step.filter(|_| p > 0.0) {
        Some(step) => {
            b.op(Op::Dropout { p, seed: module_seed(&m.name) }, &[x, step]).map_err(PeftError::build(&m.name))
        }
        None => Ok(x),
    }
}

/// s·((x·Aᵀ)·Bᵀ): [N, in] → [N, out], for an input that has already been through dropout.
pub(crate) fn emit_delta(
    b: &mut Builder,
    m: &LinearModule,
    xd: ValueId,
    a: ValueId,
    bb: ValueId,
    s: f64,
) -> Result<ValueId, PeftError> {
    let err = || PeftError::build(&m.name);
    let ax = b.matmul(xd, a, false, true).map_err(err())?;
    let bax = b.matmul(ax, bb, false, true).map_err(err())?;
    b.scale(bax, s).map_err(err())
}

/// The LoRA update of module `m` for input x: [N, in] → [N, out].
fn emit_lora(
    b: &mut Builder,
    m: &LinearModule,
    x: ValueId,
    spec: &LoraSpec,
    step: Option<ValueId>,
) -> Result<ValueId, PeftError> {
    let (a, bb) = emit_params(b, m, spec.rank)?;
    let xd = emit_dropout(b, m, x, spec.dropout, step)?;
    emit_delta(b, m, xd, a, bb, spec.scaling())
}
