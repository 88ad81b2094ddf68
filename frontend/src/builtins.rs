//! Built-in functions and methods on plain values: the prelude's free functions (`regex`, `min`, `max`, `sqrt`, and
//! the graph builders of `tensor.rs`), associated functions (`Recipe::new`, `Model::new`, `Train::default()`, ...),
//! and methods of numbers, strings, lists and ranges.

use crate::diag::{did_you_mean, DiagKind, Error, Span};
use crate::eval::Interp;
use crate::ops::as_f64;
use crate::peft::targets::Targets;
use crate::value::{Str, Value};
use crate::{limits, recipe, schema, tensor};
use std::rc::Rc;

/// A built-in function.
pub type BuiltinFn = fn(&mut Interp, &Args) -> Result<Value, Error>;

/// Evaluated arguments of a built-in call, with their spans.
pub struct Args {
    pub vals: Vec<Value>,
    pub spans: Vec<Span>,
    /// The callee's name (or method name) span.
    pub call: Span,
    pub name: String,
}

impl Args {
    /// Checks the argument count.
    pub fn expect(&self, n: usize) -> Result<(), Error> {
        if self.vals.len() == n {
            return Ok(());
        }
        let msg = format!(
            "`{}` takes {n} argument{} but {} {} supplied",
            self.name,
            if n == 1 { "" } else { "s" },
            self.vals.len(),
            if self.vals.len() == 1 { "was" } else { "were" }
        );
        Err(Error::new(DiagKind::WrongArgCount, self.call, msg).label(format!("expected {n}")))
    }

    pub fn span(&self, i: usize) -> Span {
        self.spans.get(i).copied().unwrap_or(self.call)
    }

    /// "wrong argument type" for argument `i`.
    pub fn wrong(&self, i: usize, expected: &str) -> Error {
        let found = self.vals.get(i).map_or("nothing".to_string(), Value::describe);
        Error::new(
            DiagKind::WrongType,
            self.span(i),
            format!("wrong argument type for `{}`: expected {expected}, found {found}", self.name),
        )
        .label(format!("expected {expected}"))
    }

    pub fn int(&self, i: usize) -> Result<i64, Error> {
        match self.vals.get(i) {
            Some(Value::Int(x)) => Ok(*x),
            _ => Err(self.wrong(i, "an integer")),
        }
    }

    pub fn usize(&self, i: usize) -> Result<usize, Error> {
        match self.vals.get(i) {
            Some(Value::Int(x)) if *x >= 0 => Ok(*x as usize),
            _ => Err(self.wrong(i, "a non-negative integer")),
        }
    }

    pub fn float(&self, i: usize) -> Result<f64, Error> {
        self.vals.get(i).and_then(as_f64).ok_or_else(|| self.wrong(i, "a number"))
    }

    pub fn bool(&self, i: usize) -> Result<bool, Error> {
        self.vals.get(i).and_then(Value::as_bool).ok_or_else(|| self.wrong(i, "a bool"))
    }

    pub fn str(&self, i: usize) -> Result<Str, Error> {
        match self.vals.get(i) {
            Some(Value::Str(s)) => Ok(s.clone()),
            _ => Err(self.wrong(i, "a string")),
        }
    }

    pub fn tensor(&self, i: usize) -> Result<ir::ValueId, Error> {
        match self.vals.get(i) {
            Some(Value::Tensor(t)) => Ok(*t),
            _ => Err(self.wrong(i, "a tensor")),
        }
    }

    /// A list of non-negative integers (`[b, t, heads, hd]`) whose product fits in 2⁵³ (a tensor shape).
    pub fn shape(&self, i: usize) -> Result<Vec<usize>, Error> {
        let bad = || self.wrong(i, "a list of non-negative integers");
        let dims: Vec<usize> = match self.vals.get(i) {
            Some(Value::List(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Int(x) if *x >= 0 => Ok(*x as usize),
                    _ => Err(bad()),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad()),
        };
        let numel = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d).filter(|n| *n <= 1 << 53));
        if numel.is_none() {
            return Err(Error::new(
                DiagKind::InvalidValue,
                self.span(i),
                format!("the shape {dims:?} has too many elements"),
            ));
        }
        Ok(dims)
    }
}

/// Free functions on plain values.
const FUNCTIONS: &[(&str, BuiltinFn)] = &[("regex", regex), ("min", min), ("max", max), ("sqrt", sqrt)];

/// A built-in free function by name.
pub fn function(name: &str) -> Option<BuiltinFn> {
    FUNCTIONS.iter().chain(tensor::FUNCTIONS).find(|(n, _)| *n == name).map(|(_, f)| *f)
}

pub fn function_names() -> impl Iterator<Item = &'static str> {
    FUNCTIONS.iter().chain(tensor::FUNCTIONS).map(|(n, _)| *n)
}

/// `regex(r"...")`: modules whose full name matches the whole pattern (PEFT's `re.fullmatch`).
fn regex(_: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(1)?;
    let pattern = a.str(0)?;
    if let Err(e) = regex::Regex::new(&format!("^(?:{})$", pattern.text)) {
        return Err(Error::new(DiagKind::InvalidValue, a.span(0), format!("invalid regular expression: {e}"))
            .label("invalid pattern"));
    }
    Ok(Value::Targets(Rc::new(Targets::regex(&pattern.text, Some(a.call.to(a.span(0)))))))
}

fn min(_: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(2)?;
    numeric2(a, i64::min, f64::min)
}

fn max(_: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(2)?;
    numeric2(a, i64::max, f64::max)
}

fn numeric2(a: &Args, fi: fn(i64, i64) -> i64, ff: fn(f64, f64) -> f64) -> Result<Value, Error> {
    match (&a.vals[0], &a.vals[1]) {
        (Value::Int(x), Value::Int(y)) => Ok(Value::Int(fi(*x, *y))),
        _ => Ok(Value::Float(ff(a.float(0)?, a.float(1)?))),
    }
}

/// `sqrt(x)` of a number, or elementwise of a tensor.
fn sqrt(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(1)?;
    if let Value::Tensor(t) = a.vals[0] {
        return tensor::unary(it, a, t, "sqrt");
    }
    Ok(Value::Float(a.float(0)?.sqrt()))
}

/// `Type::name(..)` for built-in types; `None` if there is no such function.
pub fn assoc(it: &mut Interp, ty: &str, name: &str, a: &Args) -> Option<Result<Value, Error>> {
    Some(match (ty, name) {
        ("Recipe", "new") => recipe::new_recipe(it, a),
        ("Model", "new") => recipe::new_model(it, a),
        ("String", "from") => a.expect(1).and_then(|_| a.str(0)).map(Value::Str),
        ("String", "new") => a.expect(0).map(|_| Value::str("")),
        ("Vec", "new") => a.expect(0).map(|_| Value::list(vec![])),
        (s, "default") => {
            let def = schema::builtin_struct(s)?;
            a.expect(0).and_then(|_| {
                schema::default_value(&def).ok_or_else(|| {
                    let req: Vec<String> =
                        def.fields.iter().filter(|f| f.default.is_none()).map(|f| format!("`{}`", f.name)).collect();
                    Error::new(DiagKind::MissingField, a.call, format!("`{s}` has no default"))
                        .help(format!("give {} in a `{s} {{ .. }}` literal", req.join(", ")))
                })
            })
        }
        _ => return None,
    })
}

/// Methods that change their receiver (which must be a `mut` place).
pub const MUTATING_METHODS: &[&str] = &["push", "pop", "extend", "insert", "clear", "push_str"];

/// Applies a mutating method; returns its value and the bytes of new values it created (for the budget). Lengths
/// are checked against `limits.rs` before anything grows.
pub fn mutate(target: &mut Value, a: &Args) -> Result<(Value, u64), Error> {
    let slots = |n: usize| (n as u64).saturating_mul(limits::SLOT_BYTES);
    // Growing a shared list copies it first.
    let copied = match &*target {
        Value::List(items) if Rc::strong_count(items) > 1 => slots(items.len()),
        _ => 0,
    };
    let unit = |bytes: u64| Ok((Value::Unit, bytes.saturating_add(copied)));
    match (a.name.as_str(), target) {
        ("push", Value::List(items)) => {
            a.expect(1)?;
            limits::check_list_len(items.len() as u128 + 1, a.call)?;
            Rc::make_mut(items).push(a.vals[0].clone());
            unit(slots(1))
        }
        ("pop", Value::List(items)) => {
            a.expect(0)?;
            let v = Rc::make_mut(items)
                .pop()
                .ok_or_else(|| Error::new(DiagKind::Eval, a.call, "`pop` on an empty list"))?;
            Ok((v, copied))
        }
        ("extend", Value::List(items)) => {
            a.expect(1)?;
            let more = match &a.vals[0] {
                Value::List(more) => more.len() as u128,
                Value::Range(x, y) => (i128::from(*y) - i128::from(*x)).max(0) as u128,
                _ => return Err(a.wrong(0, "a list")),
            };
            limits::check_list_len(items.len() as u128 + more, a.span(0))?;
            match &a.vals[0] {
                Value::List(more) => Rc::make_mut(items).extend(more.iter().cloned()),
                Value::Range(x, y) => Rc::make_mut(items).extend((*x..*y).map(Value::Int)),
                _ => return Err(a.wrong(0, "a list")),
            }
            unit(slots(more as usize))
        }
        ("insert", Value::List(items)) => {
            a.expect(2)?;
            let i = a.usize(0)?;
            if i > items.len() {
                return Err(Error::new(
                    DiagKind::Eval,
                    a.span(0),
                    format!("insertion index {i} > len {}", items.len()),
                ));
            }
            limits::check_list_len(items.len() as u128 + 1, a.call)?;
            Rc::make_mut(items).insert(i, a.vals[1].clone());
            unit(slots(items.len()))
        }
        ("clear", Value::List(items)) => {
            a.expect(0)?;
            *items = Rc::new(vec![]);
            Ok((Value::Unit, 0))
        }
        ("push_str", Value::Str(s)) => {
            a.expect(1)?;
            let more = a.str(0)?;
            let len = s.text.len().saturating_add(more.text.len());
            limits::check_string_len(len as u128, a.call)?;
            *s = Str { text: Rc::from(format!("{}{}", s.text, more.text)), origin: None };
            Ok((Value::Unit, len as u64))
        }
        (_, v) => Err(unknown_method(v, a, MUTATING_METHODS)),
    }
}

pub fn unknown_method(v: &Value, a: &Args, known: &[&str]) -> Error {
    Error::new(DiagKind::UnknownMethod, a.call, format!("no method named `{}` found for {}", a.name, v.describe()))
        .label("unknown method")
        .maybe_help(did_you_mean(&a.name, known.iter().copied()))
}

const INT_METHODS: &[&str] =
    &["abs", "pow", "min", "max", "to_string", "clone", "is_power_of_two", "into", "sqrt", "powi", "powf"];
const FLOAT_METHODS: &[&str] = &[
    "sqrt",
    "powi",
    "powf",
    "abs",
    "exp",
    "ln",
    "log2",
    "min",
    "max",
    "floor",
    "ceil",
    "round",
    "to_string",
    "clone",
    "into",
];
const STR_METHODS: &[&str] = &[
    "len",
    "is_empty",
    "to_string",
    "to_owned",
    "clone",
    "into",
    "as_str",
    "to_uppercase",
    "to_lowercase",
    "starts_with",
    "ends_with",
    "contains",
    "replace",
];
const LIST_METHODS: &[&str] =
    &["len", "is_empty", "clone", "iter", "into_iter", "to_vec", "collect", "enumerate", "rev", "contains", "join"];
const RANGE_METHODS: &[&str] = &["rev", "len", "contains", "step_by", "collect", "iter", "into_iter", "clone"];

/// Methods of numbers, strings, lists, ranges; `clone` of anything.
pub fn method(it: &mut Interp, recv: &Value, a: &Args) -> Result<Value, Error> {
    let m = a.name.as_str();
    if matches!(m, "clone" | "into" | "to_owned") {
        a.expect(0)?;
        return Ok(recv.clone());
    }
    let out = match recv {
        Value::Int(i) => int_method(*i, recv, a),
        Value::Float(x) => float_method(*x, recv, a),
        Value::Str(s) => str_method(s, recv, a),
        Value::List(items) => {
            // Every list method but `len`/`is_empty` visits the elements.
            it.budget.steps(items.len() as u64, a.call)?;
            list_method(items, recv, a)
        }
        Value::Range(x, y) => range_method(*x, *y, recv, a),
        v => Err(unknown_method(v, a, &["clone"])),
    }?;
    // Count what was created (a new list or string; `recv.clone()` shares and costs nothing).
    match &out {
        Value::List(items) if !matches!(recv, Value::List(r) if Rc::ptr_eq(r, items)) => {
            limits::check_list_len(items.len() as u128, a.call)?;
            let m = crate::eval::measure(&out);
            it.budget.steps(m.slots, a.call)?;
            it.budget.bytes(m.slots.saturating_mul(limits::SLOT_BYTES), a.call)?;
            if m.depth > limits::MAX_VALUE_DEPTH {
                return Err(limits::limit(
                    a.call,
                    format!("this value would nest {} levels deep", m.depth),
                    "nests too deeply",
                    "MAX_VALUE_DEPTH",
                ));
            }
        }
        Value::Str(s) if !matches!(recv, Value::Str(r) if Rc::ptr_eq(&r.text, &s.text)) => {
            it.budget.string(s.text.len(), a.call)?;
        }
        _ => {}
    }
    Ok(out)
}

fn int_method(i: i64, recv: &Value, a: &Args) -> Result<Value, Error> {
    match a.name.as_str() {
        "abs" => a.expect(0).and_then(|_| {
            i.checked_abs().map(Value::Int).ok_or_else(|| Error::new(DiagKind::Eval, a.call, "`abs` overflows"))
        }),
        "pow" => {
            a.expect(1)?;
            let e = u32::try_from(a.usize(0)?).map_err(|_| a.wrong(0, "a small exponent"))?;
            i.checked_pow(e).map(Value::Int).ok_or_else(|| Error::new(DiagKind::Eval, a.call, "`pow` overflows"))
        }
        "min" | "max" => {
            a.expect(1)?;
            let args = Args {
                vals: vec![recv.clone(), a.vals[0].clone()],
                spans: vec![a.call, a.span(0)],
                call: a.call,
                name: a.name.clone(),
            };
            if a.name == "min" {
                numeric2(&args, i64::min, f64::min)
            } else {
                numeric2(&args, i64::max, f64::max)
            }
        }
        "to_string" => a.expect(0).map(|_| Value::str(&i.to_string())),
        "is_power_of_two" => a.expect(0).map(|_| Value::Bool(i > 0 && (i & (i - 1)) == 0)),
        // Integers used where Rust would write `(x as f64).sqrt()`: accepted and widened.
        "sqrt" | "powi" | "powf" => float_method(i as f64, recv, a),
        _ => Err(unknown_method(recv, a, INT_METHODS)),
    }
}

fn float_method(x: f64, recv: &Value, a: &Args) -> Result<Value, Error> {
    let unary = |f: fn(f64) -> f64| a.expect(0).map(|_| Value::Float(f(x)));
    match a.name.as_str() {
        "sqrt" => unary(f64::sqrt),
        "abs" => unary(f64::abs),
        "exp" => unary(f64::exp),
        "ln" => unary(f64::ln),
        "log2" => unary(f64::log2),
        "floor" => unary(f64::floor),
        "ceil" => unary(f64::ceil),
        "round" => unary(f64::round),
        "powi" => {
            a.expect(1)?;
            let e = i32::try_from(a.int(0)?).map_err(|_| a.wrong(0, "a small exponent"))?;
            Ok(Value::Float(x.powi(e)))
        }
        "powf" => a.expect(1).and_then(|_| Ok(Value::Float(x.powf(a.float(0)?)))),
        "min" => a.expect(1).and_then(|_| Ok(Value::Float(x.min(a.float(0)?)))),
        "max" => a.expect(1).and_then(|_| Ok(Value::Float(x.max(a.float(0)?)))),
        "to_string" => a.expect(0).map(|_| Value::str(&x.to_string())),
        _ => Err(unknown_method(recv, a, FLOAT_METHODS)),
    }
}

fn str_method(s: &Str, recv: &Value, a: &Args) -> Result<Value, Error> {
    let t = &*s.text;
    match a.name.as_str() {
        "len" => a.expect(0).map(|_| Value::Int(t.len() as i64)),
        "is_empty" => a.expect(0).map(|_| Value::Bool(t.is_empty())),
        "to_string" | "as_str" => a.expect(0).map(|_| recv.clone()),
        // Case mapping grows a string at most 3×; both strings are bounded by MAX_STRING_BYTES.
        "to_uppercase" => a.expect(0).map(|_| Value::str(&t.to_uppercase())),
        "to_lowercase" => a.expect(0).map(|_| Value::str(&t.to_lowercase())),
        "starts_with" => a.expect(1).and_then(|_| Ok(Value::Bool(t.starts_with(&*a.str(0)?.text)))),
        "ends_with" => a.expect(1).and_then(|_| Ok(Value::Bool(t.ends_with(&*a.str(0)?.text)))),
        "contains" => a.expect(1).and_then(|_| Ok(Value::Bool(t.contains(&*a.str(0)?.text)))),
        "replace" => {
            a.expect(2)?;
            let (from, to) = (a.str(0)?, a.str(1)?);
            // The result's length, before building it: `"x".replace("", s)` inserts `s` between every char.
            let count = if from.text.is_empty() { t.chars().count() + 1 } else { t.matches(&*from.text).count() };
            let len = (t.len() as u128) - (count as u128 * from.text.len() as u128).min(t.len() as u128)
                + count as u128 * to.text.len() as u128;
            limits::check_string_len(len, a.call)?;
            Ok(Value::str(&t.replace(&*from.text, &to.text)))
        }
        _ => Err(unknown_method(recv, a, STR_METHODS)),
    }
}

fn list_method(items: &Rc<Vec<Value>>, recv: &Value, a: &Args) -> Result<Value, Error> {
    match a.name.as_str() {
        "len" => a.expect(0).map(|_| Value::Int(items.len() as i64)),
        "is_empty" => a.expect(0).map(|_| Value::Bool(items.is_empty())),
        "iter" | "into_iter" | "to_vec" | "collect" => a.expect(0).map(|_| recv.clone()),
        "enumerate" => a.expect(0).map(|_| {
            Value::list(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Value::Tuple(Rc::new(vec![Value::Int(i as i64), v.clone()])))
                    .collect(),
            )
        }),
        "rev" => a.expect(0).map(|_| Value::list(items.iter().rev().cloned().collect())),
        "contains" => a.expect(1).map(|_| Value::Bool(items.iter().any(|v| crate::ops::equal(v, &a.vals[0])))),
        "join" => {
            a.expect(1)?;
            let sep = a.str(0)?;
            let mut out = String::new();
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    limits::check_string_len(out.len() as u128 + sep.text.len() as u128, a.call)?;
                    out.push_str(&sep.text);
                }
                v.display(&mut out, None);
                limits::check_string_len(out.len() as u128, a.call)?;
            }
            Ok(Value::str(&out))
        }
        _ => Err(unknown_method(recv, a, LIST_METHODS)),
    }
}

fn range_method(x: i64, y: i64, recv: &Value, a: &Args) -> Result<Value, Error> {
    if matches!(a.name.as_str(), "rev" | "step_by" | "collect" | "iter" | "into_iter") {
        let step = if a.name == "step_by" { a.usize(0).unwrap_or(1).max(1) as i128 } else { 1 };
        let len = (i128::from(y) - i128::from(x)).max(0);
        limits::check_list_len(((len + step - 1) / step) as u128, a.call)?;
    }
    match a.name.as_str() {
        "rev" => a.expect(0).map(|_| Value::list((x..y).rev().map(Value::Int).collect())),
        "len" => a.expect(0).map(|_| Value::Int(y.saturating_sub(x).max(0))),
        "contains" => a.expect(1).and_then(|_| {
            let v = a.int(0)?;
            Ok(Value::Bool(x <= v && v < y))
        }),
        "step_by" => {
            a.expect(1)?;
            let step = a.usize(0)?;
            if step == 0 {
                return Err(Error::new(DiagKind::InvalidValue, a.span(0), "`step_by` needs a positive step"));
            }
            Ok(Value::list((x..y).step_by(step).map(Value::Int).collect()))
        }
        "collect" | "iter" | "into_iter" => a.expect(0).map(|_| Value::list((x..y).map(Value::Int).collect())),
        _ => Err(unknown_method(recv, a, RANGE_METHODS)),
    }
}
