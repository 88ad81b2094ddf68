//! Attribute values of ops: the Rust types an op's attributes have, and their text form.
//!
//! The text parser reads every attribute value into a generic [`AttrLit`]; each attribute type converts from it
//! ([`Attr::from_lit`]) and prints itself ([`Attr::write`]) so that printing then parsing gives the same value.

use crate::types::{DType, Shape};
use std::fmt::Write;

/// A literal as written in the text format.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrLit {
    Bool(bool),
    /// Integers of any attribute type (u64 seeds and i64 indices both fit).
    Int(i128),
    Float(f64),
    Str(String),
    /// A bare word, possibly with arguments: `frozen`, `normal(0.02)`, `f32`, `nf4<64,256>`.
    Word(String, Vec<AttrLit>),
    List(Vec<AttrLit>),
}

/// One attribute type.
pub trait Attr: Sized {
    fn write(&self, out: &mut String);
    fn from_lit(lit: &AttrLit) -> Result<Self, String>;
}

impl Attr for bool {
    fn write(&self, out: &mut String) {
        out.push_str(if *self { "true" } else { "false" });
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::Bool(b) => Ok(*b),
            other => Err(format!("expected true or false, found {other:?}")),
        }
    }
}

impl Attr for usize {
    fn write(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::Int(i) if *i >= 0 && *i <= usize::MAX as i128 => Ok(*i as usize),
            other => Err(format!("expected a non-negative integer, found {other:?}")),
        }
    }
}

impl Attr for i64 {
    fn write(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::Int(i) if *i >= i64::MIN as i128 && *i <= i64::MAX as i128 => Ok(*i as i64),
            other => Err(format!("expected a 64-bit integer, found {other:?}")),
        }
    }
}

impl Attr for u64 {
    fn write(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::Int(i) if *i >= 0 && *i <= u64::MAX as i128 => Ok(*i as u64),
            other => Err(format!("expected a non-negative integer, found {other:?}")),
        }
    }
}

impl Attr for f64 {
    fn write(&self, out: &mut String) {
        // `{:?}` prints the shortest text that reads back to the same f64 and always has a '.' or exponent.
        let _ = write!(out, "{self:?}");
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::Float(f) => Ok(*f),
            AttrLit::Int(i) => Ok(*i as f64),
            AttrLit::Word(w, a) if a.is_empty() && w == "inf" => Ok(f64::INFINITY),
            AttrLit::Word(w, a) if a.is_empty() && w == "nan" => Ok(f64::NAN),
            other => Err(format!("expected a number, found {other:?}")),
        }
    }
}

impl Attr for String {
    fn write(&self, out: &mut String) {
        write_str_lit(self, out);
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::Str(s) => Ok(s.clone()),
            other => Err(format!("expected a string, found {other:?}")),
        }
    }
}

impl Attr for Shape {
    fn write(&self, out: &mut String) {
        out.push('[');
        for (i, d) in self.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{d}");
        }
        out.push(']');
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::List(items) => items.iter().map(usize::from_lit).collect(),
            other => Err(format!("expected a list of integers, found {other:?}")),
        }
    }
}

impl Attr for DType {
    fn write(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::Word(w, args) => crate::text::dtype_from_word(w, args),
            other => Err(format!("expected a dtype, found {other:?}")),
        }
    }
}

pub(crate) fn write_str_lit(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether a parameter is trained, frozen, or optimizer state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Frozen,
    Trainable,
    /// Optimizer state (AdamW moments): updated by the step, not differentiated.
    State,
}

impl Attr for Role {
    fn write(&self, out: &mut String) {
        out.push_str(match self {
            Role::Frozen => "frozen",
            Role::Trainable => "trainable",
            Role::State => "state",
        })
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::Word(w, a) if a.is_empty() => match w.as_str() {
                "frozen" => Ok(Role::Frozen),
                "trainable" => Ok(Role::Trainable),
                "state" => Ok(Role::State),
                _ => Err(format!("unknown role `{w}` (frozen, trainable, state)")),
            },
            other => Err(format!("expected a role, found {other:?}")),
        }
    }
}

/// How a parameter gets its initial value.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// Read from the checkpoint under the parameter's name (quantized on load when its dtype is NF4).
    Load,
    Zeros,
    Ones,
    /// Uniform(-b, b) with b = gain·sqrt(3 / fan_in), gain = sqrt(2 / (1 + a²)) — `nn.Linear`'s default for a = √5.
    KaimingUniform {
        a: f64,
    },
    Normal {
        std: f64,
    },
    /// The L2 norm of each row (output channel) of another parameter, dequantized if needed (DoRA's magnitude).
    RowNorm {
        of: String,
    },
}

impl Attr for Init {
    fn write(&self, out: &mut String) {
        match self {
            Init::Load => out.push_str("load"),
            Init::Zeros => out.push_str("zeros"),
            Init::Ones => out.push_str("ones"),
            Init::KaimingUniform { a } => {
                out.push_str("kaiming_uniform(");
                a.write(out);
                out.push(')');
            }
            Init::Normal { std } => {
                out.push_str("normal(");
                std.write(out);
                out.push(')');
            }
            Init::RowNorm { of } => {
                out.push_str("row_norm(");
                of.write(out);
                out.push(')');
            }
        }
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        let AttrLit::Word(w, args) = lit else { return Err(format!("expected an init, found {lit:?}")) };
        let one = || args.first().filter(|_| args.len() == 1).ok_or_else(|| format!("`{w}` takes one argument"));
        match (w.as_str(), args.len()) {
            ("load", 0) => Ok(Init::Load),
            ("zeros", 0) => Ok(Init::Zeros),
            ("ones", 0) => Ok(Init::Ones),
            ("kaiming_uniform", _) => Ok(Init::KaimingUniform { a: f64::from_lit(one()?)? }),
            ("normal", _) => Ok(Init::Normal { std: f64::from_lit(one()?)? }),
            ("row_norm", _) => Ok(Init::RowNorm { of: String::from_lit(one()?)? }),
            _ => {
                Err(format!("unknown init `{w}` (load, zeros, ones, kaiming_uniform(a), normal(std), row_norm(\"p\"))"))
            }
        }
    }
}

/// Which input of the attention an `attention_bwd` produces the gradient of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnArg {
    Q,
    K,
    V,
}

impl Attr for AttnArg {
    fn write(&self, out: &mut String) {
        out.push_str(match self {
            AttnArg::Q => "q",
            AttnArg::K => "k",
            AttnArg::V => "v",
        })
    }
    fn from_lit(lit: &AttrLit) -> Result<Self, String> {
        match lit {
            AttrLit::Word(w, a) if a.is_empty() => match w.as_str() {
                "q" => Ok(AttnArg::Q),
                "k" => Ok(AttnArg::K),
                "v" => Ok(AttnArg::V),
                _ => Err(format!("expected q, k or v, found `{w}`")),
            },
            other => Err(format!("expected q, k or v, found {other:?}")),
        }
    }
}
