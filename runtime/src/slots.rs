//! What the cpu and cuda backends share about a loaded plan's parameters and inputs: their slots (binding, buffer,
//! whether set; NF4 storage parts of the backend's buffer type), the checks on data handed to them, and small
//! helpers over the plan's memory placements.

use ir::interp::{Tensor, Value};
use ir::nf4::Nf4Tensor;
use ir::plan::{InputBinding, ParamBinding, Plan, ValuePlacement};
use ir::{DType, Nf4Format, ValueId};

use crate::RuntimeError;

/// An NF4 parameter's storage parts (in kernel-argument `part` order, each a buffer `B` of the backend) and its
/// host copy.
pub(crate) struct Nf4Slot<B> {
    pub format: Nf4Format,
    pub parts: Vec<B>,
    pub tensor: Option<Nf4Tensor>,
}

pub(crate) struct ParamSlot<B> {
    pub binding: ParamBinding,
    /// The plan's buffer (unused for NF4 parameters).
    pub buffer: Option<u32>,
    pub nf4: Option<Nf4Slot<B>>,
    pub set: bool,
}

pub(crate) struct InputSlot {
    pub binding: InputBinding,
    pub buffer: Option<u32>,
    pub set: bool,
}

/// That `len` values of `dtype` fit input `b`.
pub(crate) fn check_input(b: &InputBinding, dtype: DType, len: usize) -> Result<(), RuntimeError> {
    if b.dtype != dtype {
        return Err(RuntimeError::DType {
            what: "input",
            name: b.name.clone(),
            expected: ir::Type::new(b.dtype, b.shape.clone()).to_string(),
            found: format!("{dtype} data"),
        });
    }
    check_len("input", &b.name, &b.shape, len)
}

/// That `len` values fill a tensor `what` `name` of `shape`.
pub(crate) fn check_len(what: &'static str, name: &str, shape: &[usize], len: usize) -> Result<(), RuntimeError> {
    let numel: usize = shape.iter().product();
    if len != numel {
        return Err(RuntimeError::Length {
            what,
            name: name.to_string(),
            shape: shape.to_vec(),
            expected: numel,
            found: len,
        });
    }
    Ok(())
}

/// That every parameter and input has a value (before a step).
pub(crate) fn check_ready<B>(params: &[ParamSlot<B>], inputs: &[InputSlot]) -> Result<(), RuntimeError> {
    let unset: Vec<String> = params.iter().filter(|p| !p.set).map(|p| p.binding.name.clone()).collect();
    if !unset.is_empty() {
        return Err(RuntimeError::ParamsNotSet { names: unset });
    }
    let unset: Vec<String> = inputs.iter().filter(|i| !i.set).map(|i| i.binding.name.clone()).collect();
    if !unset.is_empty() {
        return Err(RuntimeError::InputsNotSet { names: unset });
    }
    Ok(())
}

/// A parameter's current value as the initializers read it: NF4 as its storage, f32 (`f32_value`) as a tensor;
/// `None` while unset.
pub(crate) fn source_value<B>(slot: &ParamSlot<B>, f32_value: impl FnOnce() -> Option<Vec<f32>>) -> Option<Value> {
    if !slot.set {
        return None;
    }
    match &slot.nf4 {
        Some(n) => n.tensor.clone().map(Value::Q),
        None => f32_value().map(|d| Value::F(Tensor::from_f32(slot.binding.shape.clone(), &d))),
    }
}

/// The value whose storage `v` is: `v` itself, or the end of its `Alias` chain (a view's base).
pub(crate) fn alias_root(plan: &Plan, v: ValueId) -> ValueId {
    let mut at = v;
    for _ in 0..=plan.values.len() {
        match plan.values.get(at.index()) {
            Some(ValuePlacement::Alias(of)) => at = ValueId(*of),
            _ => return at,
        }
    }
    at
}

/// That `bytes` fit buffer `b` (when there is one).
pub(crate) fn check_fits(plan: &Plan, b: Option<u32>, bytes: usize, what: &str) -> Result<(), RuntimeError> {
    match b.map(|b| &plan.buffers[b as usize]) {
        Some(buf) if (buf.bytes as usize) < bytes => {
            Err(RuntimeError::Unsupported(format!("{what} needs {bytes} bytes, but its buffer has {}", buf.bytes)))
        }
        _ => Ok(()),
    }
}

pub(crate) fn to_usize(n: u64) -> Result<usize, RuntimeError> {
    usize::try_from(n).map_err(|_| RuntimeError::Unsupported(format!("{n} bytes do not fit this machine's memory")))
}

pub(crate) fn read_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

pub(crate) fn read_i32(bytes: &[u8]) -> Vec<i32> {
    bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}
