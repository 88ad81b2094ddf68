//! Graph-building built-ins: the functions, methods and operators on tensors that a model's forward function uses
//! (`param`, `linear`, `rms_norm`, `rope`, `causal_attention`, `x.reshape(..)`, `a + b`, ...). Each appends nodes to
//! the graph under construction through `ir::Builder`; a node that does not type-check becomes a diagnostic at the
//! call that built it.

use crate::builtins::{unknown_method, Args, BuiltinFn};
use crate::diag::{DiagKind, Error, Span};
use crate::eval::Interp;
use crate::ops::{as_f64, BinOp};
use crate::value::Value;
use ir::builder::Built;
use ir::{Builder, Init, Role, Type, ValueId};

pub const FUNCTIONS: &[(&str, BuiltinFn)] = &[
    ("param", param),
    ("linear", linear),
    ("matmul", matmul),
    ("embedding", embedding),
    ("rms_norm", rms_norm),
    ("rope", rope),
    ("causal_attention", causal_attention),
    ("swiglu", swiglu),
    ("silu", silu),
    ("softmax", softmax),
    ("cross_entropy", cross_entropy),
    ("concat", concat),
    ("label", label),
];

/// The builder, or an error if no graph is being built (tensors exist only inside a model's forward function).
fn builder<'i>(it: &'i mut Interp, call: Span) -> Result<&'i mut Builder, Error> {
    it.builder.as_mut().ok_or_else(|| {
        Error::new(DiagKind::Eval, call, "tensors can only be built inside a model's forward function")
            .label("no graph is being built here")
            .help("the recipe runs the forward function given to `Model::new` once `.train(..)` fixes batch and sequence length")
    })
}

/// A built node as a value, or the builder's type error at the call.
fn built(r: Built, call: Span) -> Result<Value, Error> {
    r.map(Value::Tensor).map_err(|e| {
        Error::new(DiagKind::Graph, call, format!("cannot build `{}`: {}", e.op, e.message)).label("in this operation")
    })
}

/// `param(name, [d0, d1, ..])`: a frozen f32 parameter loaded from the checkpoint under `name`.
fn param(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(2)?;
    let name = a.str(0)?;
    let shape = a.shape(1)?;
    // Names seen so far, so that each declaration is checked in constant time (a scan of the graph per parameter
    // made building a deep model quadratic); a name seen before is confirmed against the graph being built.
    let seen = !it.param_names.insert(name.text.clone());
    let b = builder(it, a.call)?;
    if seen {
        crate::peft::count_visits(b.graph.nodes.len());
    }
    if seen && b.graph.param(&name.text).is_some() {
        let msg = format!("parameter `{}` is declared twice", ir::untrusted::show(&name.text));
        return Err(Error::new(DiagKind::Duplicate, a.span(0), msg));
    }
    built(b.param(&name.text, Type::f32(shape), Role::Frozen, Init::Load), a.call)
}

/// `linear(x, w)`: x: [N, in], w: [out, in] → x·wᵀ: [N, out] (a bias-free `nn.Linear`; PEFT finds modules by this).
fn linear(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(2)?;
    let (x, w) = (a.tensor(0)?, a.tensor(1)?);
    built(builder(it, a.call)?.matmul(x, w, false, true), a.call)
}

/// `matmul(a, b)`: [m, k]·[k, n] → [m, n].
fn matmul(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(2)?;
    let (x, y) = (a.tensor(0)?, a.tensor(1)?);
    built(builder(it, a.call)?.matmul(x, y, false, false), a.call)
}

/// `embedding(table, ids)`: table: [V, D], ids: i32[..] → [.., D].
fn embedding(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(2)?;
    let (t, ids) = (a.tensor(0)?, a.tensor(1)?);
    built(builder(it, a.call)?.embedding(t, ids), a.call)
}

/// `rms_norm(x, w, eps)`: x: [.., D], w: [D].
fn rms_norm(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(3)?;
    let (x, w, eps) = (a.tensor(0)?, a.tensor(1)?, a.float(2)?);
    built(builder(it, a.call)?.rms_norm(x, w, eps), a.call)
}

/// `rope(x, positions, theta)`: x: [B, T, H, hd], positions: i32[B, T].
fn rope(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(3)?;
    let (x, pos, theta) = (a.tensor(0)?, a.tensor(1)?, a.float(2)?);
    built(builder(it, a.call)?.rope(x, pos, theta), a.call)
}

/// `causal_attention(q, k, v, segment_ids, scale)`: q: [B, T, H, hd], k, v: [B, T, KV, hd] → [B, T, H, hd].
fn causal_attention(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(5)?;
    let (q, k, v, seg, scale) = (a.tensor(0)?, a.tensor(1)?, a.tensor(2)?, a.tensor(3)?, a.float(4)?);
    built(builder(it, a.call)?.attention(q, k, v, seg, scale), a.call)
}

/// `swiglu(gate, up)` = silu(gate) ⊙ up.
fn swiglu(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(2)?;
    let (g, u) = (a.tensor(0)?, a.tensor(1)?);
    built(builder(it, a.call)?.swiglu(g, u), a.call)
}

fn silu(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(1)?;
    let t = a.tensor(0)?;
    unary(it, a, t, "silu")
}

fn softmax(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(1)?;
    let t = a.tensor(0)?;
    unary(it, a, t, "softmax")
}

/// `cross_entropy(logits, labels, ignore_index)`: logits: [N, V], labels: i32[N] → the mean loss.
fn cross_entropy(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(3)?;
    let (logits, labels, ignore) = (a.tensor(0)?, a.tensor(1)?, a.int(2)?);
    built(builder(it, a.call)?.cross_entropy(logits, labels, ignore), a.call)
}

/// `concat([a, b, ..], axis)`.
fn concat(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(2)?;
    let Value::List(items) = &a.vals[0] else { return Err(a.wrong(0, "a list of tensors")) };
    let xs = items
        .iter()
        .map(|v| match v {
            Value::Tensor(t) => Ok(*t),
            _ => Err(a.wrong(0, "a list of tensors")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let axis = a.usize(1)?;
    built(builder(it, a.call)?.concat(&xs, axis), a.call)
}

/// `label("model.layers.0.self_attn")`: names the nodes built from here until the current function returns
/// (shown after `;` in the printed IR).
fn label(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(1)?;
    let name = a.str(0)?;
    builder(it, a.call)?.set_label(Some(name.text.to_string()));
    Ok(Value::Unit)
}

/// Elementwise functions by name (shared by free functions and methods).
pub fn unary(it: &mut Interp, a: &Args, t: ValueId, name: &str) -> Result<Value, Error> {
    let b = builder(it, a.call)?;
    let r = match name {
        "sqrt" => b.sqrt(t),
        "silu" => b.silu(t),
        "softmax" => b.softmax(t),
        "stop_gradient" => b.stop_gradient(t),
        "neg" => b.neg(t),
        "exp" => b.op(ir::Op::Exp {}, &[t]),
        "log" => b.op(ir::Op::Log {}, &[t]),
        "sigmoid" => b.op(ir::Op::Sigmoid {}, &[t]),
        _ => return Err(unknown_method(&Value::Tensor(t), a, TENSOR_METHODS)),
    };
    built(r, a.call)
}

const TENSOR_METHODS: &[&str] = &[
    "reshape",
    "transpose",
    "shape",
    "dim",
    "sum",
    "slice",
    "sqrt",
    "exp",
    "log",
    "silu",
    "sigmoid",
    "softmax",
    "stop_gradient",
    "neg",
    "clone",
];

/// Methods of tensors: `x.reshape([n, d])`, `x.shape()`, `x.dim(1)`, `x.sum([1], false)`, `x.sqrt()`, ...
pub fn method(it: &mut Interp, t: ValueId, a: &Args) -> Result<Value, Error> {
    let shape_of = |it: &mut Interp| -> Result<Vec<usize>, Error> { Ok(builder(it, a.call)?.ty(t).shape.clone()) };
    match a.name.as_str() {
        "reshape" => {
            a.expect(1)?;
            let shape = a.shape(0)?;
            built(builder(it, a.call)?.reshape(t, &shape), a.call)
        }
        "transpose" => {
            a.expect(1)?;
            let perm = a.shape(0)?;
            built(builder(it, a.call)?.transpose(t, &perm), a.call)
        }
        "shape" => {
            a.expect(0)?;
            Ok(Value::list(shape_of(it)?.into_iter().map(|d| Value::Int(d as i64)).collect()))
        }
        "dim" => {
            a.expect(1)?;
            let i = a.usize(0)?;
            let shape = shape_of(it)?;
            match shape.get(i) {
                Some(d) => Ok(Value::Int(*d as i64)),
                None => {
                    Err(Error::new(DiagKind::Eval, a.span(0), format!("axis {i} of a rank-{} tensor", shape.len())))
                }
            }
        }
        "sum" => {
            a.expect(2)?;
            let (axes, keep) = (a.shape(0)?, a.bool(1)?);
            built(builder(it, a.call)?.sum(t, &axes, keep), a.call)
        }
        "slice" => {
            a.expect(3)?;
            let (axis, start, end) = (a.usize(0)?, a.usize(1)?, a.usize(2)?);
            built(builder(it, a.call)?.slice(t, axis, start, end), a.call)
        }
        "clone" => Ok(Value::Tensor(t)),
        m => {
            a.expect(0)?;
            unary(it, a, t, m)
        }
    }
}

/// `-x` for a tensor.
pub fn neg(it: &mut Interp, t: ValueId, span: Span) -> Result<Value, Error> {
    let b = builder(it, span)?;
    built(b.neg(t), span)
}

/// Arithmetic with at least one tensor operand: elementwise (broadcasting) with a tensor, `scale` by a number for
/// `*` and `/`, a scalar constant for `+` and `-`.
pub fn binary(it: &mut Interp, op: BinOp, l: &Value, r: &Value, span: Span) -> Result<Value, Error> {
    let b = builder(it, span)?;
    let mismatch = || {
        Error::new(
            DiagKind::WrongType,
            span,
            format!("cannot apply `{}` to {} and {}", op.symbol(), l.describe(), r.describe()),
        )
    };
    let r = match (l, r) {
        (Value::Tensor(x), Value::Tensor(y)) => match op {
            BinOp::Add => b.add(*x, *y),
            BinOp::Sub => b.sub(*x, *y),
            BinOp::Mul => b.mul(*x, *y),
            BinOp::Div => b.div(*x, *y),
            _ => return Err(mismatch()),
        },
        (Value::Tensor(x), n) => {
            let c = as_f64(n).ok_or_else(mismatch)?;
            match op {
                BinOp::Mul => b.scale(*x, c),
                BinOp::Div => b.scale(*x, 1.0 / c),
                BinOp::Add | BinOp::Sub => {
                    let k = b
                        .constant(c, Type::scalar(b.ty(*x).dtype))
                        .map_err(|e| Error::new(DiagKind::Graph, span, e.to_string()))?;
                    if op == BinOp::Add {
                        b.add(*x, k)
                    } else {
                        b.sub(*x, k)
                    }
                }
                _ => return Err(mismatch()),
            }
        }
        (n, Value::Tensor(y)) => {
            let c = as_f64(n).ok_or_else(mismatch)?;
            match op {
                BinOp::Mul => b.scale(*y, c),
                BinOp::Add | BinOp::Sub | BinOp::Div => {
                    let k = b
                        .constant(c, Type::scalar(b.ty(*y).dtype))
                        .map_err(|e| Error::new(DiagKind::Graph, span, e.to_string()))?;
                    match op {
                        BinOp::Add => b.add(k, *y),
                        BinOp::Sub => b.sub(k, *y),
                        _ => b.div(k, *y),
                    }
                }
                _ => return Err(mismatch()),
            }
        }
        _ => return Err(mismatch()),
    };
    built(r, span)
}
