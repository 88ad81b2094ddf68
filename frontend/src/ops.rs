//! Binary operators on plain values: integer arithmetic (checked, truncating division as in Rust), float arithmetic
//! (an int meeting a float is widened), comparisons, string concatenation. Tensor operands go to `tensor.rs`.

use crate::diag::DiagKind;
use crate::value::{Str, Value};
use std::cmp::Ordering;
use std::rc::Rc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    BitAnd,
    BitOr,
    BitXor,
    Shl,
    Shr,
}

impl BinOp {
    /// The operator, and whether it is the compound assignment form (`+=`). `&&`/`||` are not here: they short-cut.
    pub fn from_syn(op: &syn::BinOp) -> Option<(BinOp, bool)> {
        use syn::BinOp as S;
        Some(match op {
            S::Add(_) => (BinOp::Add, false),
            S::Sub(_) => (BinOp::Sub, false),
            S::Mul(_) => (BinOp::Mul, false),
            S::Div(_) => (BinOp::Div, false),
            S::Rem(_) => (BinOp::Rem, false),
            S::Eq(_) => (BinOp::Eq, false),
            S::Ne(_) => (BinOp::Ne, false),
            S::Lt(_) => (BinOp::Lt, false),
            S::Le(_) => (BinOp::Le, false),
            S::Gt(_) => (BinOp::Gt, false),
            S::Ge(_) => (BinOp::Ge, false),
            S::BitAnd(_) => (BinOp::BitAnd, false),
            S::BitOr(_) => (BinOp::BitOr, false),
            S::BitXor(_) => (BinOp::BitXor, false),
            S::Shl(_) => (BinOp::Shl, false),
            S::Shr(_) => (BinOp::Shr, false),
            S::AddAssign(_) => (BinOp::Add, true),
            S::SubAssign(_) => (BinOp::Sub, true),
            S::MulAssign(_) => (BinOp::Mul, true),
            S::DivAssign(_) => (BinOp::Div, true),
            S::RemAssign(_) => (BinOp::Rem, true),
            S::BitAndAssign(_) => (BinOp::BitAnd, true),
            S::BitOrAssign(_) => (BinOp::BitOr, true),
            S::BitXorAssign(_) => (BinOp::BitXor, true),
            S::ShlAssign(_) => (BinOp::Shl, true),
            S::ShrAssign(_) => (BinOp::Shr, true),
            _ => return None,
        })
    }

    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::BitAnd => "&",
            BinOp::BitOr => "|",
            BinOp::BitXor => "^",
            BinOp::Shl => "<<",
            BinOp::Shr => ">>",
        }
    }
}

type OpResult = Result<Value, (DiagKind, String)>;

/// `l op r` for non-tensor values.
pub fn binary(op: BinOp, l: &Value, r: &Value) -> OpResult {
    use BinOp::*;
    match op {
        Eq => return Ok(Value::Bool(equal(l, r))),
        Ne => return Ok(Value::Bool(!equal(l, r))),
        Lt | Le | Gt | Ge => {
            let ord = compare(l, r).ok_or_else(|| mismatch(op, l, r))?;
            return Ok(Value::Bool(match op {
                Lt => ord == Ordering::Less,
                Le => ord != Ordering::Greater,
                Gt => ord == Ordering::Greater,
                _ => ord != Ordering::Less,
            }));
        }
        _ => {}
    }
    match (l, r) {
        (Value::Int(a), Value::Int(b)) => int_op(op, *a, *b),
        (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)) => {
            let (a, b) = (as_f64(l).unwrap_or(0.0), as_f64(r).unwrap_or(0.0));
            Ok(Value::Float(match op {
                Add => a + b,
                Sub => a - b,
                Mul => a * b,
                Div => a / b,
                Rem => a % b,
                _ => return Err(mismatch(op, l, r)),
            }))
        }
        (Value::Bool(a), Value::Bool(b)) => match op {
            BitAnd => Ok(Value::Bool(a & b)),
            BitOr => Ok(Value::Bool(a | b)),
            BitXor => Ok(Value::Bool(a ^ b)),
            _ => Err(mismatch(op, l, r)),
        },
        (Value::Str(a), Value::Str(b)) if op == Add => {
            Ok(Value::Str(Str { text: Rc::from(format!("{}{}", a.text, b.text)), origin: None }))
        }
        _ => Err(mismatch(op, l, r)),
    }
}

fn int_op(op: BinOp, a: i64, b: i64) -> OpResult {
    use BinOp::*;
    let overflow = || (DiagKind::Eval, format!("attempt to compute `{a} {} {b}`, which overflows", op.symbol()));
    if matches!(op, Div | Rem) && b == 0 {
        return Err((DiagKind::Eval, format!("attempt to compute `{a} {} 0`: division by zero", op.symbol())));
    }
    let v = match op {
        Add => a.checked_add(b),
        Sub => a.checked_sub(b),
        Mul => a.checked_mul(b),
        Div => a.checked_div(b),
        Rem => a.checked_rem(b),
        BitAnd => Some(a & b),
        BitOr => Some(a | b),
        BitXor => Some(a ^ b),
        Shl => u32::try_from(b).ok().and_then(|b| a.checked_shl(b)),
        Shr => u32::try_from(b).ok().and_then(|b| a.checked_shr(b)),
        Eq | Ne | Lt | Le | Gt | Ge => None,
    };
    v.map(Value::Int).ok_or_else(overflow)
}

fn mismatch(op: BinOp, l: &Value, r: &Value) -> (DiagKind, String) {
    (DiagKind::WrongType, format!("cannot apply `{}` to {} and {}", op.symbol(), l.describe(), r.describe()))
}

pub fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(x) => Some(*x),
        _ => None,
    }
}

/// Equality, with ints and floats compared as numbers.
pub fn equal(l: &Value, r: &Value) -> bool {
    match (l, r) {
        (Value::Int(a), Value::Float(b)) | (Value::Float(b), Value::Int(a)) => *a as f64 == *b,
        _ => l == r,
    }
}

pub fn compare(l: &Value, r: &Value) -> Option<Ordering> {
    match (l, r) {
        (Value::Int(a), Value::Int(b)) => Some(a.cmp(b)),
        (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)) => as_f64(l)?.partial_cmp(&as_f64(r)?),
        (Value::Str(a), Value::Str(b)) => Some(a.text.cmp(&b.text)),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_follows_rust_with_widening() {
        assert_eq!(binary(BinOp::Div, &Value::Int(7), &Value::Int(2)), Ok(Value::Int(3)));
        assert_eq!(binary(BinOp::Rem, &Value::Int(4096), &Value::Int(32)), Ok(Value::Int(0)));
        assert_eq!(binary(BinOp::Div, &Value::Float(1.0), &Value::Int(4)), Ok(Value::Float(0.25)));
        assert_eq!(binary(BinOp::Lt, &Value::Int(1), &Value::Float(1.5)), Ok(Value::Bool(true)));
        assert_eq!(binary(BinOp::Add, &Value::str("a"), &Value::str("b")), Ok(Value::str("ab")));
        assert_eq!(binary(BinOp::Div, &Value::Int(1), &Value::Int(0)).map_err(|e| e.0), Err(DiagKind::Eval));
        assert_eq!(binary(BinOp::Mul, &Value::Int(i64::MAX), &Value::Int(2)).map_err(|e| e.0), Err(DiagKind::Eval));
        assert_eq!(binary(BinOp::Add, &Value::str("a"), &Value::Int(1)).map_err(|e| e.0), Err(DiagKind::WrongType));
    }
}
