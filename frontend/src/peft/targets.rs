//! Which linear modules an adapter or a quantization applies to, matched as PEFT matches `target_modules`.
//!
//! A *linear module* `m` is a node `matmul(x, w, ta=false, tb=true)` whose `w` is the frozen parameter `m.weight`
//! (or `nf4_dequantize` of it, after quantization). A weight that an `embedding` also reads is the token embedding,
//! not a linear module (a tied LM head). The *output layer* is the module whose matmul gives the logits (or is named
//! `lm_head`).
//!
//! Matching: a name matches a module if it equals the module's full name or is a suffix after a `.` (PEFT's rule:
//! `q_proj` matches `model.layers.0.self_attn.q_proj`); a regex must match the whole module name (`re.fullmatch`);
//! `ALL_LINEAR` is every linear module but the output layer (PEFT's "all-linear").

use crate::diag::Span;
use ir::{Graph, Op, OutputKind, Role, ValueId};
use std::fmt;

/// The targets as the user wrote them.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetSpec {
    /// `ALL_LINEAR`
    AllLinear,
    /// `["q_proj", "v_proj"]`
    Names(Vec<String>),
    /// `regex(r".*\.(q|v)_proj")`
    Regex(String),
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::AllLinear => f.write_str("ALL_LINEAR"),
            TargetSpec::Names(ns) => write!(f, "{ns:?}"),
            TargetSpec::Regex(r) => write!(f, "regex({r:?})"),
        }
    }
}

/// A target spec with where each part was written (for "matches nothing" diagnostics).
#[derive(Clone, Debug, PartialEq)]
pub struct Targets {
    pub spec: TargetSpec,
    /// For `Names`: where each name was written, when it was a literal.
    pub name_spans: Vec<Option<Span>>,
    /// Where the whole spec was written.
    pub span: Option<Span>,
}

impl Targets {
    pub fn all_linear(span: Option<Span>) -> Targets {
        Targets { spec: TargetSpec::AllLinear, name_spans: vec![], span }
    }

    pub fn regex(pattern: &str, span: Option<Span>) -> Targets {
        Targets { spec: TargetSpec::Regex(pattern.to_string()), name_spans: vec![], span }
    }

    pub fn names(names: Vec<(String, Option<Span>)>) -> Targets {
        let (names, spans) = names.into_iter().unzip();
        Targets { spec: TargetSpec::Names(names), name_spans: spans, span: None }
    }

    /// Where to report that part `index` of the spec matched nothing.
    pub fn span_of(&self, index: usize) -> Option<Span> {
        self.name_spans.get(index).copied().flatten().or(self.span)
    }
}

/// One linear module of a graph.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearModule {
    /// Full module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// The `matmul` node.
    pub matmul: ValueId,
    /// The weight parameter node (`{name}.weight`).
    pub weight: ValueId,
    /// Whether the weight is read through `nf4_dequantize`.
    pub quantized: bool,
    pub in_features: usize,
    pub out_features: usize,
    /// The output layer (lm_head), which `ALL_LINEAR` leaves out.
    pub is_output: bool,
}

impl LinearModule {
    /// The last component of the name (`q_proj`), as PEFT's adapter_config.json lists target modules.
    pub fn short_name(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }
}

/// Every linear module of `g`, in node order.
pub fn linear_modules(g: &Graph) -> Vec<LinearModule> {
    let embedding_tables: Vec<ValueId> =
        g.nodes.iter().filter(|n| matches!(n.op, Op::Embedding {})).filter_map(|n| n.inputs.first().copied()).collect();
    let logits = g.output(&OutputKind::Logits);
    super::count_visits(2 * g.nodes.len());
    let mut out = Vec::new();
    for v in g.ids() {
        let n = g.node(v);
        let Op::MatMul { ta: false, tb: true } = n.op else { continue };
        let Some(&w) = n.inputs.get(1) else { continue };
        let (weight, quantized) = match &g.node(w).op {
            Op::Nf4Dequantize {} => (g.node(w).inputs[0], true),
            _ => (w, false),
        };
        let Op::Param { name, role: Role::Frozen, .. } = &g.node(weight).op else { continue };
        let Some(module) = name.strip_suffix(".weight") else { continue };
        if embedding_tables.contains(&weight) {
            continue;
        }
        let shape = &g.ty(weight).shape;
        if shape.len() != 2 {
            continue;
        }
        out.push(LinearModule {
            name: module.to_string(),
            matmul: v,
            weight,
            quantized,
            in_features: shape[1],
            out_features: shape[0],
            is_output: logits == Some(v) || module == "lm_head",
        });
    }
    out
}

/// PEFT's name rule: the full name, or a suffix after a dot.
pub fn module_matches(module: &str, target: &str) -> bool {
    module == target
        || (module.len() > target.len()
            && module.ends_with(target)
            && module[..module.len() - target.len()].ends_with('.'))
}

/// A target that selects nothing.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TargetError {
    /// Part `index` of the spec (a name, or the whole regex / ALL_LINEAR) matches no linear module.
    #[error("target {target} matches no linear module of the model")]
    NoMatch { index: usize, target: String },
    #[error("invalid regular expression: {0}")]
    BadRegex(String),
}

/// The modules `spec` selects, in node order; every part of the spec must select at least one.
pub fn select(modules: &[LinearModule], spec: &TargetSpec) -> Result<Vec<LinearModule>, TargetError> {
    let chosen: Vec<bool> = match spec {
        TargetSpec::AllLinear => modules.iter().map(|m| !m.is_output).collect(),
        TargetSpec::Regex(p) => {
            let re = regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| TargetError::BadRegex(e.to_string()))?;
            modules.iter().map(|m| re.is_match(&m.name)).collect()
        }
        TargetSpec::Names(names) => {
            for (index, t) in names.iter().enumerate() {
                if !modules.iter().any(|m| module_matches(&m.name, t)) {
                    return Err(TargetError::NoMatch { index, target: format!("{t:?}") });
                }
            }
            modules.iter().map(|m| names.iter().any(|t| module_matches(&m.name, t))).collect()
        }
    };
    if !chosen.iter().any(|c| *c) {
        return Err(TargetError::NoMatch { index: 0, target: spec.to_string() });
    }
    Ok(modules.iter().zip(chosen).filter(|(_, c)| *c).map(|(m, _)| m.clone()).collect())
}

/// Sorted, de-duplicated short names of modules (adapter_config.json's `target_modules`).
pub fn short_names(modules: &[LinearModule]) -> Vec<String> {
    let mut names: Vec<String> = modules.iter().map(|m| m.short_name().to_string()).collect();
    names.sort();
    names.dedup();
    names
}
