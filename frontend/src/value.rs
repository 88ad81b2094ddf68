//! Values of the recipe language: numbers, strings, lists, structs, tensors (graph values), functions, models,
//! recipes, and how they print (`{}` and `{:?}` of `format!`).

use crate::diag::Span;
use crate::peft::targets::Targets;
use crate::recipe::{ModelVal, RecipeVal};
use std::fmt::Write;
use std::rc::Rc;

/// A value. Cloning is cheap: aggregates are reference-counted and copied on write.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Unit,
    Bool(bool),
    /// Every integer type (`usize`, `i64`, ...) is an i64; declared types check the range.
    Int(i64),
    Float(f64),
    Str(Str),
    List(Rc<Vec<Value>>),
    Tuple(Rc<Vec<Value>>),
    /// `start..end` (`..=` is stored with `end + 1`).
    Range(i64, i64),
    Struct(Rc<StructVal>),
    /// A value of the graph being built.
    Tensor(ir::ValueId),
    /// Which modules an adapter or quantization applies to.
    Targets(Rc<Targets>),
    /// A `fn` item, by name.
    Fn(Rc<str>),
    Model(Rc<ModelVal>),
    Recipe(Rc<RecipeVal>),
}

/// A string, with where it was written when it is a literal (target names are reported there).
#[derive(Clone, Debug)]
pub struct Str {
    pub text: Rc<str>,
    pub origin: Option<Span>,
}

impl PartialEq for Str {
    fn eq(&self, other: &Str) -> bool {
        self.text == other.text
    }
}

/// A struct value: its type name and fields in declaration order.
#[derive(Clone, Debug, PartialEq)]
pub struct StructVal {
    pub name: String,
    pub fields: Vec<Field>,
}

/// One field of a struct value, with where its value was written (so checks can point at it).
#[derive(Clone, Debug)]
pub struct Field {
    pub name: String,
    pub value: Value,
    pub origin: Option<Span>,
}

impl PartialEq for Field {
    fn eq(&self, other: &Field) -> bool {
        self.name == other.name && self.value == other.value
    }
}

impl StructVal {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|f| f.name.as_str())
    }
}

impl Value {
    pub fn str(s: &str) -> Value {
        Value::Str(Str { text: Rc::from(s), origin: None })
    }

    pub fn list(items: Vec<Value>) -> Value {
        Value::List(Rc::new(items))
    }

    /// The type name used by declared types (`Ty::Named`) and messages.
    pub fn type_name(&self) -> String {
        match self {
            Value::Unit => "()".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "integer".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "String".into(),
            Value::List(_) => "Vec".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::Range(..) => "Range".into(),
            Value::Struct(s) => s.name.clone(),
            Value::Tensor(_) => "Tensor".into(),
            Value::Targets(_) => "Targets".into(),
            Value::Fn(_) => "fn".into(),
            Value::Model(_) => "Model".into(),
            Value::Recipe(_) => "Recipe".into(),
        }
    }

    /// "a string `\"16\"`", "an integer `3`", "a `LlamaConfig`": for messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Unit => "`()`".into(),
            Value::Bool(b) => format!("a bool `{b}`"),
            Value::Int(i) => format!("an integer `{i}`"),
            Value::Float(x) => format!("a float `{x:?}`"),
            Value::Str(s) => {
                // Debug escapes control characters; a long string is cut (it may come from a downloaded recipe).
                let max = ir::untrusted::MAX_SHOWN_CHARS;
                match s.text.char_indices().nth(max) {
                    None => format!("a string `{:?}`", &*s.text),
                    Some((cut, _)) => format!("a string `{:?}…({} bytes)`", &s.text[..cut], s.text.len()),
                }
            }
            Value::List(_) => "a list".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::Range(..) => "a range".into(),
            Value::Struct(s) => format!("a `{}`", s.name),
            Value::Tensor(_) => "a tensor".into(),
            Value::Targets(_) => "a target list".into(),
            Value::Fn(n) => format!("the function `{n}`"),
            Value::Model(_) => "a model".into(),
            Value::Recipe(_) => "a recipe".into(),
        }
    }

    /// `{}` formatting; `precision` is `{:.N}`.
    pub fn display(&self, out: &mut String, precision: Option<usize>) {
        match (self, precision) {
            (Value::Float(x), Some(p)) => {
                let _ = write!(out, "{x:.p$}");
            }
            (Value::Int(i), Some(p)) => {
                let _ = write!(out, "{:.p$}", *i as f64);
            }
            (Value::Float(x), None) => {
                let _ = write!(out, "{x}");
            }
            (Value::Str(s), _) => out.push_str(&s.text),
            (Value::Targets(t), _) => out.push_str(&t.spec.to_string()),
            (v, _) => v.debug(out),
        }
    }

    /// `{:?}` formatting, as Rust's derived Debug prints.
    pub fn debug(&self, out: &mut String) {
        let seq = |out: &mut String, open: &str, items: &[Value], close: &str| {
            out.push_str(open);
            for (i, v) in items.iter().enumerate() {
                // A huge list prints no further than a string may be long (the caller reports the length).
                if out.len() > crate::limits::MAX_STRING_BYTES {
                    return;
                }
                if i > 0 {
                    out.push_str(", ");
                }
                v.debug(out);
            }
            if open == "(" && items.len() == 1 {
                out.push(',');
            }
            out.push_str(close);
        };
        match self {
            Value::Unit => out.push_str("()"),
            Value::Bool(b) => {
                let _ = write!(out, "{b}");
            }
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::Float(x) => {
                let _ = write!(out, "{x:?}");
            }
            Value::Str(s) => {
                let _ = write!(out, "{:?}", &*s.text);
            }
            Value::List(items) => seq(out, "[", items, "]"),
            Value::Tuple(items) => seq(out, "(", items, ")"),
            Value::Range(a, b) => {
                let _ = write!(out, "{a}..{b}");
            }
            Value::Struct(s) => {
                out.push_str(&s.name);
                out.push_str(" { ");
                for (i, f) in s.fields.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(&f.name);
                    out.push_str(": ");
                    f.value.debug(out);
                }
                out.push_str(" }");
            }
            Value::Tensor(v) => {
                let _ = write!(out, "Tensor({v})");
            }
            Value::Targets(t) => {
                let _ = write!(out, "{}", t.spec);
            }
            Value::Fn(n) => {
                let _ = write!(out, "fn {n}");
            }
            Value::Model(m) => {
                let _ = write!(out, "Model({:?})", m.arch);
            }
            Value::Recipe(r) => {
                let _ = write!(out, "Recipe({:?})", r.model.arch);
            }
        }
    }

    /// Truthiness is not a thing: `if` and `&&` take bools only.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(v: &Value, debug: bool) -> String {
        let mut s = String::new();
        if debug {
            v.debug(&mut s)
        } else {
            v.display(&mut s, None)
        }
        s
    }

    #[test]
    fn prints_like_rust() {
        assert_eq!(show(&Value::Float(10000.0), false), "10000");
        assert_eq!(show(&Value::Float(10000.0), true), "10000.0");
        assert_eq!(show(&Value::Float(1e-5), true), "1e-5");
        assert_eq!(show(&Value::str("a\"b"), true), "\"a\\\"b\"");
        assert_eq!(show(&Value::list(vec![Value::Int(1), Value::str("x")]), true), "[1, \"x\"]");
        let s = StructVal {
            name: "P".into(),
            fields: vec![Field { name: "x".into(), value: Value::Bool(true), origin: None }],
        };
        assert_eq!(show(&Value::Struct(Rc::new(s)), true), "P { x: true }");
        assert_eq!(show(&Value::Tuple(Rc::new(vec![Value::Int(1)])), true), "(1,)");
    }
}
