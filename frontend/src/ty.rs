//! Declared types: what a struct field, a function parameter or a `let` annotation may hold, read from Rust type
//! syntax, and the check (with int → float widening) applied when a value is stored there.

use crate::value::Value;
use std::fmt;
use std::rc::Rc;

/// The value kinds that are not structs, by their type name in recipes.
pub const BUILTIN_TYPES: &[&str] = &["Tensor", "Model", "Recipe", "Targets", "Range"];

/// A declared type.
#[derive(Clone, Debug, PartialEq)]
pub enum Ty {
    /// `_`, `impl ..`, or no annotation: anything.
    Any,
    Unit,
    /// `i64`, `i32`, `isize`, ... (`unsigned`: `usize`, `u32`, `u64`, which reject negative values).
    Int {
        name: &'static str,
        unsigned: bool,
    },
    /// `f64` or `f32`; integers are accepted and widened.
    Float {
        name: &'static str,
    },
    Bool,
    /// `String` or `&str`.
    Str,
    /// `Vec<T>`, `[T]`, `[T; n]`.
    List(Box<Ty>),
    Tuple(Vec<Ty>),
    /// A struct (declared in a recipe or library file, or built in like `Lora`) or a builtin kind (`Tensor`, ...).
    Named(String),
}

impl Ty {
    /// Reads a Rust type. `Err` carries the span and the name of a type that is not supported.
    pub fn from_syn(t: &syn::Type) -> Result<Ty, (proc_macro2::Span, String)> {
        use syn::spanned::Spanned;
        let unsupported = |t: &syn::Type| Err((t.span(), "this type is not supported in recipes".to_string()));
        match t {
            syn::Type::Reference(r) => Ty::from_syn(&r.elem),
            syn::Type::Paren(p) => Ty::from_syn(&p.elem),
            syn::Type::Group(g) => Ty::from_syn(&g.elem),
            syn::Type::Infer(_) | syn::Type::ImplTrait(_) => Ok(Ty::Any),
            syn::Type::Slice(s) => Ok(Ty::List(Box::new(Ty::from_syn(&s.elem)?))),
            syn::Type::Array(a) => Ok(Ty::List(Box::new(Ty::from_syn(&a.elem)?))),
            syn::Type::Tuple(tu) if tu.elems.is_empty() => Ok(Ty::Unit),
            syn::Type::Tuple(tu) => Ok(Ty::Tuple(tu.elems.iter().map(Ty::from_syn).collect::<Result<_, _>>()?)),
            syn::Type::Path(p) if p.qself.is_none() => {
                let Some(seg) = p.path.segments.last() else { return unsupported(t) };
                let name = seg.ident.to_string();
                let generic = match &seg.arguments {
                    syn::PathArguments::AngleBracketed(a) => a.args.iter().find_map(|g| match g {
                        syn::GenericArgument::Type(t) => Some(t),
                        _ => None,
                    }),
                    _ => None,
                };
                Ok(match (name.as_str(), generic) {
                    ("Vec", Some(inner)) => Ty::List(Box::new(Ty::from_syn(inner)?)),
                    ("Vec", None) => Ty::List(Box::new(Ty::Any)),
                    ("Box" | "Rc", Some(inner)) => Ty::from_syn(inner)?,
                    (n, _) => Ty::from_name(n),
                })
            }
            _ => unsupported(t),
        }
    }

    /// The type a single name denotes (primitive names, otherwise a named type to be resolved).
    pub fn from_name(n: &str) -> Ty {
        match n {
            "i64" => Ty::Int { name: "i64", unsigned: false },
            "i32" => Ty::Int { name: "i32", unsigned: false },
            "isize" => Ty::Int { name: "isize", unsigned: false },
            "usize" => Ty::Int { name: "usize", unsigned: true },
            "u64" => Ty::Int { name: "u64", unsigned: true },
            "u32" => Ty::Int { name: "u32", unsigned: true },
            "f64" => Ty::Float { name: "f64" },
            "f32" => Ty::Float { name: "f32" },
            "bool" => Ty::Bool,
            "String" | "str" => Ty::Str,
            other => Ty::Named(other.to_string()),
        }
    }

    /// Names of structs this type refers to (to check they exist when a file is loaded).
    pub fn named(&self, out: &mut Vec<String>) {
        match self {
            Ty::Named(n) => out.push(n.clone()),
            Ty::List(t) => t.named(out),
            Ty::Tuple(ts) => ts.iter().for_each(|t| t.named(out)),
            _ => {}
        }
    }

    /// Checks that `v` may be stored as this type; returns it converted (ints widened to floats), or a message
    /// saying what was expected and what was found.
    pub fn check(&self, v: Value) -> Result<Value, String> {
        let mismatch = |v: &Value| Err(format!("expected `{self}`, found {}", v.describe()));
        match (self, v) {
            (Ty::Any, v) => Ok(v),
            (Ty::Unit, Value::Unit) => Ok(Value::Unit),
            (Ty::Int { name, unsigned: true }, Value::Int(i)) if i < 0 => {
                Err(format!("expected `{name}` (a non-negative integer), found {i}"))
            }
            (Ty::Int { .. }, v @ Value::Int(_)) => Ok(v),
            (Ty::Float { .. }, Value::Int(i)) => Ok(Value::Float(i as f64)),
            (Ty::Float { .. }, v @ Value::Float(_)) => Ok(v),
            (Ty::Bool, v @ Value::Bool(_)) => Ok(v),
            (Ty::Str, v @ Value::Str(_)) => Ok(v),
            (Ty::List(elem), Value::List(items)) => {
                let items = Rc::unwrap_or_clone(items);
                let checked = items.into_iter().map(|x| elem.check(x)).collect::<Result<Vec<_>, _>>();
                checked.map(|xs| Value::List(Rc::new(xs))).map_err(|e| format!("in a list: {e}"))
            }
            (Ty::Tuple(tys), Value::Tuple(items)) if tys.len() == items.len() => {
                let items = Rc::unwrap_or_clone(items);
                let checked = tys.iter().zip(items).map(|(t, x)| t.check(x)).collect::<Result<Vec<_>, _>>();
                checked.map(|xs| Value::Tuple(Rc::new(xs)))
            }
            (Ty::Named(n), v) if v.type_name() == *n => Ok(v),
            // A list of strings, `ALL_LINEAR` or `regex(..)` all say which modules to target.
            (Ty::Named(n), v @ Value::List(_)) if n == "Targets" => Ok(v),
            (_, v) => mismatch(&v),
        }
    }
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Any => f.write_str("_"),
            Ty::Unit => f.write_str("()"),
            Ty::Int { name, .. } | Ty::Float { name } => f.write_str(name),
            Ty::Bool => f.write_str("bool"),
            Ty::Str => f.write_str("String"),
            Ty::List(t) => write!(f, "Vec<{t}>"),
            Ty::Tuple(ts) => {
                f.write_str("(")?;
                for (i, t) in ts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{t}")?;
                }
                f.write_str(")")
            }
            Ty::Named(n) => f.write_str(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(s: &str) -> Ty {
        Ty::from_syn(&syn::parse_str::<syn::Type>(s).expect("type parses")).expect("supported")
    }

    #[test]
    fn reads_rust_types() {
        assert_eq!(ty("usize"), Ty::Int { name: "usize", unsigned: true });
        assert_eq!(ty("&str"), Ty::Str);
        assert_eq!(ty("Vec<f64>"), Ty::List(Box::new(Ty::Float { name: "f64" })));
        assert_eq!(ty("&[String]"), Ty::List(Box::new(Ty::Str)));
        assert_eq!(ty("(usize, bool)").to_string(), "(usize, bool)");
        assert_eq!(ty("LlamaConfig"), Ty::Named("LlamaConfig".into()));
    }

    #[test]
    fn checks_and_widens() {
        let f = Ty::Float { name: "f64" };
        assert_eq!(f.check(Value::Int(3)), Ok(Value::Float(3.0)));
        assert!(f.check(Value::str("3")).unwrap_err().contains("expected `f64`, found a string"));
        let u = Ty::Int { name: "usize", unsigned: true };
        assert!(u.check(Value::Int(-1)).is_err());
        assert!(u.check(Value::Float(1.0)).is_err());
        let l = Ty::List(Box::new(f));
        assert_eq!(
            l.check(Value::List(Rc::new(vec![Value::Int(1)]))),
            Ok(Value::List(Rc::new(vec![Value::Float(1.0)])))
        );
    }
}
