//! DoRA (Liu et al. 2024) as PEFT 0.21 computes it. For module `m` with weight W: [out, in] (dequantized for
//! QLoRA), LoRA's A and B, and the trainable magnitude `m.lora_magnitude_vector`: [out] (initialised to the row
//! norms of W):
//!
//! ```text
//! Wc = W + s·B·A                       (here B·A is formed: [out, r]·[r, in])
//! n  = stop_gradient(‖Wc‖ per row)      (detached, DoRA §4.3)
//! ms = m / n
//! y  = ms ⊙ (x·Wᵀ + s·lora(x))                                   when dropout = 0
//! y  = x·Wᵀ + (ms − 1) ⊙ (xd·Wᵀ) + ms ⊙ s·lora(xd),  xd = dropout(x)   otherwise (PEFT's training path)
//! ```

use super::lora::{emit_delta, emit_dropout, emit_params, LoraSpec};
use super::{LinearModule, PeftError};
use ir::{Builder, Init, Role, Type, ValueId};

/// Emits DoRA for module `m`: x: [N, in], w: [out, in] → [N, out].
pub(crate) fn emit(
    b: &mut Builder,
    m: &LinearModule,
    x: ValueId,
    w: ValueId,
    spec: &LoraSpec,
    step: Option<ValueId>,
) -> Result<ValueId, PeftError> {
    let err = || PeftError::build(&m.name);
    let s = spec.scaling();
    let base = b.matmul(x, w, false, true).map_err(err())?;
    let (a, bb) = emit_params(b, m, spec.rank)?;
    let magnitude = b
        .param(
            &format!("{}.lora_magnitude_vector", m.name),
            Type::f32([m.out_features]),
            Role::Trainable,
            Init::RowNorm { of: format!("{}.weight", m.name) },
        )
        .map_err(err())?;
    // ms = m / stop_gradient(‖W + s·B·A‖ per row): [out]
    let ba = b.matmul(bb, a, false, false).map_err(err())?;
    let sba = b.scale(ba, s).map_err(err())?;
    let wc = b.add(w, sba).map_err(err())?;
    let sq = b.mul(wc, wc).map_err(err())?;
    let ss = b.sum(sq, &[1], false).map_err(err())?;
    let norm = b.sqrt(ss).map_err(err())?;
    let norm = b.stop_gradient(norm).map_err(err())?;
    let ms = b.div(magnitude, norm).map_err(err())?;
    if spec.dropout == 0.0 {
        let delta = emit_delta(b, m, x, a, bb, s)?;
        let sum = b.add(base, delta).map_err(err())?;
        return b.mul(sum, ms).map_err(err());
    }
    let xd = emit_dropout(b, m, x, spec.dropout, step)?;
    let delta = emit_delta(b, m, xd, a, bb, s)?;
    let xdw = b.matmul(xd, w, false, true).map_err(err())?;
    let one = b.constant(1.0, Type::f32(Vec::<usize>::new())).map_err(err())?;
    let ms1 = b.sub(ms, one).map_err(err())?;
    let t1 = b.mul(xdw, ms1).map_err(err())?;
    let t2 = b.mul(delta, ms).map_err(err())?;
    let y = b.add(base, t1).map_err(err())?;
    b.add(y, t2).map_err(err())
}
