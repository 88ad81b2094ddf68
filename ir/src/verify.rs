//! The verifier: every input defined before use, arity and type rules hold, declared types match inferred ones,
//! parameter and input names are unique, and outputs refer to real values and parameters.

use crate::attr::Role;
use crate::graph::{Graph, OutputKind, ValueId};
use crate::ops::Op;
use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error("{at} ({op}): input {input} is not defined before use")]
    Dangling { at: ValueId, op: &'static str, input: ValueId },
    #[error("{at} ({op}): {message}")]
    Type { at: ValueId, op: &'static str, message: String },
    #[error("{at} ({op}): declared type {declared} but the inputs give {inferred}")]
    Mismatch { at: ValueId, op: &'static str, declared: String, inferred: String },
    #[error("two {what} are named `{name}`")]
    Duplicate { what: &'static str, name: String },
    #[error("output {kind:?} refers to {value}, which is not defined")]
    DanglingOutput { kind: OutputKind, value: ValueId },
    #[error("kernel `{kernel}`: {problem}")]
    BadKernel { kernel: String, problem: String },
    #[error("output {kind:?} names parameter `{name}`, which {problem}")]
    BadOutputParam { kind: OutputKind, name: String, problem: String },
}

pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    let mut params = HashSet::new();
    let mut inputs = HashSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let at = ValueId(i as u32);
        let op = n.op.mnemonic();
        if let Some(&input) = n.inputs.iter().find(|v| v.index() >= i) {
            return Err(VerifyError::Dangling { at, op, input });
        }
        let tys: Vec<_> = n.inputs.iter().map(|&v| g.ty(v)).collect();
        let inferred = n.op.infer(&tys, &n.ty).map_err(|message| VerifyError::Type { at, op, message })?;
        if inferred != n.ty {
            return Err(VerifyError::Mismatch { at, op, declared: n.ty.to_string(), inferred: inferred.to_string() });
        }
        match &n.op {
            Op::Param { name, .. } if !params.insert(name.as_str()) => {
                return Err(VerifyError::Duplicate { what: "parameters", name: name.clone() })
            }
            Op::Input { name } if !inputs.insert(name.as_str()) => {
                return Err(VerifyError::Duplicate { what: "inputs", name: name.clone() })
            }
            _ => {}
        }
    }
    let by_name: std::collections::HashMap<&str, ValueId> = g.params().into_iter().map(|(v, n, _)| (n, v)).collect();
    let mut seen_outputs = HashSet::new();
    for o in &g.outputs {
        if o.value.index() >= g.nodes.len() {
            return Err(VerifyError::DanglingOutput { kind: o.kind.clone(), value: o.value });
        }
        if !seen_outputs.insert(&o.kind) {
            return Err(VerifyError::Duplicate { what: "outputs", name: format!("{:?}", o.kind) });
        }
        let (OutputKind::Grad(name) | OutputKind::Update(name)) = &o.kind else { continue };
        let bad = |problem: String| VerifyError::BadOutputParam { kind: o.kind.clone(), name: name.clone(), problem };
        let Some(&p) = by_name.get(name.as_str()) else { return Err(bad("does not exist".into())) };
        let (pt, ot) = (g.ty(p), g.ty(o.value));
        if pt != ot {
            return Err(bad(format!("has type {pt}, but the output has type {ot}")));
        }
        if let (OutputKind::Update(_), Op::Param { role: Role::Frozen, .. }) = (&o.kind, &g.node(p).op) {
            return Err(bad("is frozen and cannot be updated".into()));
        }
    }
    let mut owner = vec![None; g.nodes.len()];
    for k in &g.kernels {
        let bad = |problem: String| VerifyError::BadKernel { kernel: k.name.clone(), problem };
        if k.nodes.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("nodes are not in increasing order".into()));
        }
        for v in &k.nodes {
            let slot = owner.get_mut(v.index()).ok_or_else(|| bad(format!("{v} is not defined")))?;
            if let Some(other) = slot.replace(k.name.as_str()) {
                return Err(bad(format!("{v} is also in kernel `{other}`")));
            }
        }
    }
    Ok(())
}
