//! QLoRA's storage: the targeted base weights become NF4 parameters (same name, frozen, loaded and quantized by the
//! runtime), each read through `nf4_dequantize` before its matmul. Adapters are independent of this: they find the
//! module through the dequantize node, so the order of `.quantize(..)` and `.adapter(..)` does not matter.

use super::{rebuild, LinearModule, PeftError};
use ir::{DType, Graph, Nf4Format, Op, Type, ValueId};
use std::collections::HashMap;

/// `Nf4 { block, double_quant }` of a recipe.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nf4Spec {
    /// Elements per absmax block (bitsandbytes: 64).
    pub block: usize,
    /// Quantize the absmax values too, in blocks of 256 (bitsandbytes' `compress_statistics`).
    pub double_quant: bool,
}

impl Nf4Spec {
    pub fn format(&self) -> Nf4Format {
        Nf4Format { block: self.block as u32, double_quant: self.double_quant.then_some(256) }
    }
}

/// Stores the weights of `modules` in NF4. x: [N, in], W: nf4[out, in] → matmul(x, nf4_dequantize(W), tb).
pub fn apply_nf4(g: &Graph, modules: &[LinearModule], spec: &Nf4Spec) -> Result<Graph, PeftError> {
    if spec.block == 0 || !spec.block.is_multiple_of(2) || u32::try_from(spec.block).is_err() {
        return Err(PeftError::Invalid(format!("NF4 block size must be even and positive, got {}", spec.block)));
    }
    if let Some(m) = modules.iter().find(|m| m.quantized) {
        return Err(PeftError::AlreadyQuantized(m.name.clone()));
    }
    let by_weight: HashMap<ValueId, &LinearModule> = modules.iter().map(|m| (m.weight, m)).collect();
    let dtype = DType::Nf4(spec.format());
    rebuild(
        g,
        |_| Ok(()),
        |b, old, node, _| {
            let Some(m) = by_weight.get(&old) else { return Ok(None) };
            let Op::Param { name, role, init } = &node.op else { return Ok(None) };
            let err = PeftError::build(&m.name);
            let q = b
                .graph
                .push(
                    Op::Param { name: name.clone(), role: *role, init: init.clone() },
                    vec![],
                    Some(Type::new(dtype, node.ty.shape.clone())),
                    None,
                )
                .map_err(err)?;
            b.set_label(Some(m.name.clone()));
            let w = b.nf4_dequantize(q).map_err(PeftError::build(&m.name));
            b.set_label(None);
            Ok(Some(w?))
        },
    )
}
