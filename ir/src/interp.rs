//! The reference interpreter: runs any graph on the CPU, plainly. It is the oracle every faster path is checked
//! against, so each op is written for obviousness, not speed.
//!
//! Every float op computes in f64 and rounds its result to the node's dtype: in [`Precision::F32`] mode f32 results
//! are rounded to f32 after each op; in [`Precision::F64`] mode (gradient checks) they are kept in f64. bf16/f16
//! results are always rounded to their type. NF4 (de)quantization runs in f32 exactly as bitsandbytes does.

// Index loops here mirror the formulas they implement; that matters more than iterator style in the oracle.
#![allow(clippy::needless_range_loop)]

use crate::attr::AttnArg;
use crate::graph::{Graph, ValueId};
use crate::infer::broadcast_shapes;
use crate::nf4::{self, Nf4Tensor};
use crate::ops::Op;
use crate::types::{numel, DType, Type};
use std::collections::HashMap;

/// A float tensor (values held in f64).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Tensor {
        assert_eq!(numel(&shape), data.len(), "tensor data does not match shape {shape:?}");
        Tensor { shape, data }
    }
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), data: vec![0.0; numel(shape)] }
    }
    pub fn scalar(x: f64) -> Tensor {
        Tensor { shape: vec![], data: vec![x] }
    }
    pub fn from_f32(shape: Vec<usize>, data: &[f32]) -> Tensor {
        Tensor::new(shape, data.iter().map(|&x| x as f64).collect())
    }
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }
}

/// A runtime value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    F(Tensor),
    I { shape: Vec<usize>, data: Vec<i32> },
    Q(Nf4Tensor),
}

impl Value {
    pub fn ints(shape: Vec<usize>, data: Vec<i32>) -> Value {
        assert_eq!(numel(&shape), data.len());
        Value::I { shape, data }
    }
    pub fn as_f(&self) -> Option<&Tensor> {
        match self {
            Value::F(t) => Some(t),
            _ => None,
        }
    }
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F(t) => &t.shape,
            Value::I { shape, .. } => shape,
            Value::Q(q) => &q.shape,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Round every f32 result to f32 (what the model computes).
    F32,
    /// Keep f32-typed results in f64 (for finite-difference gradient checks).
    F64,
}

/// Parameters and inputs by name, plus optional pinned values.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub params: HashMap<String, Value>,
    pub inputs: HashMap<String, Value>,
    /// Values forced for given nodes instead of computing them (used to hold `stop_gradient` values fixed when
    /// checking gradients by finite differences).
    pub pinned: HashMap<ValueId, Value>,
}

/// Seeded random values for every parameter and input of a training step, for kernel and backend tests: weights
/// uniform in ±0.1 (norm weights 1), optimizer states 0, the learning rate 1e-3, step 1, position ids `0..T` per
/// row, segment ids 0, other integer inputs (token ids, labels) below 128, other float inputs uniform in ±1.
pub fn random_env(g: &crate::Graph, seed: u64) -> Env {
    use crate::{DType, Op, Role};
    let mut env = Env::default();
    let rand = |shape: &[usize], s: u64, scale: f64| {
        let n: usize = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|i| scale * (2.0 * crate::rng::uniform(s, 7, i as u64) as f64 - 1.0)).collect(),
        )
    };
    for (i, n) in g.nodes.iter().enumerate() {
        let s = seed * 10_000 + i as u64;
        match &n.op {
            Op::Param { name, role, .. } => {
                let v = match role {
                    Role::State => Tensor::zeros(&n.ty.shape),
                    _ if name.contains("norm") => Tensor::new(n.ty.shape.clone(), vec![1.0; n.ty.numel()]),
                    _ => rand(&n.ty.shape, s, 0.1),
                };
                env.params.insert(name.clone(), Value::F(v));
            }
            Op::Input { name } => {
                let v = match (name.as_str(), n.ty.dtype) {
                    ("lr", _) => Value::F(Tensor::scalar(1e-3)),
                    ("opt_step", _) | ("step", _) => Value::ints(vec![], vec![1]),
                    ("position_ids", _) => {
                        let t = n.ty.shape[1];
                        Value::ints(n.ty.shape.clone(), (0..n.ty.numel()).map(|k| (k % t) as i32).collect())
                    }
                    ("segment_ids", _) => Value::ints(n.ty.shape.clone(), vec![0; n.ty.numel()]),
                    (_, DType::I32) => Value::ints(
                        n.ty.shape.clone(),
                        (0..n.ty.numel()).map(|k| ((k * 37 + 11) % 128) as i32).collect(),
                    ),
                    _ => Value::F(rand(&n.ty.shape, s, 1.0)),
                };
                env.inputs.insert(name.clone(), v);
            }
            _ => {}
        }
    }
    env
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{at} ({op}): {message}")]
pub struct InterpError {
    pub at: ValueId,
    pub op: &'static str,
    pub message: String,
}

/// Runs the graph; returns the value of every node.
pub fn run(g: &Graph, env: &Env, precision: Precision) -> Result<Vec<Value>, InterpError> {
    let mut vals: Vec<Value> = Vec::with_capacity(g.nodes.len());
    for (i, n) in g.nodes.iter().enumerate() {
        let at = ValueId(i as u32);
        let v = match env.pinned.get(&at) {
            Some(v) => v.clone(),
            None => {
                let ins: Vec<&Value> = n.inputs.iter().map(|v| &vals[v.index()]).collect();
                eval(&n.op, &ins, &n.ty, env, precision).map_err(|message| InterpError {
                    at,
                    op: n.op.mnemonic(),
                    message,
                })?
            }
        };
        let v = round(v, &n.ty, precision);
        if v.shape() != n.ty.shape.as_slice() {
            return Err(InterpError {
                at,
                op: n.op.mnemonic(),
                message: format!("produced shape {:?}, type says {}", v.shape(), n.ty),
            });
        }
        vals.push(v);
    }
    Ok(vals)
}

fn round(v: Value, ty: &Type, p: Precision) -> Value {
    let Value::F(mut t) = v else { return v };
    match (ty.dtype, p) {
        (DType::F32, Precision::F32) => t.data.iter_mut().for_each(|x| *x = *x as f32 as f64),
        (DType::BF16, _) => t.data.iter_mut().for_each(|x| *x = half::bf16::from_f64(*x).to_f64()),
        (DType::F16, _) => t.data.iter_mut().for_each(|x| *x = half::f16::from_f64(*x).to_f64()),
        _ => {}
    }
    Value::F(t)
}

fn f(v: &Value) -> Result<&Tensor, String> {
    v.as_f().ok_or_else(|| "expected a float tensor".to_string())
}

fn ints(v: &Value) -> Result<&[i32], String> {
    match v {
        Value::I { data, .. } => Ok(data),
        _ => Err("expected an i32 tensor".into()),
    }
}

fn scalar_int(v: &Value) -> Result<i64, String> {
    Ok(ints(v)?.first().copied().ok_or("empty i32 scalar")? as i64)
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// For each element of `out` (row-major), the offset of the element of `x` that broadcasting maps to it.
fn broadcast_offsets(x: &[usize], out: &[usize]) -> Vec<usize> {
    let xs = strides(x);
    let pad = out.len() - x.len();
    let mut offs = Vec::with_capacity(numel(out));
    let mut idx = vec![0usize; out.len()];
    for _ in 0..numel(out) {
        let mut o = 0;
        for (k, &i) in idx.iter().enumerate().skip(pad) {
            if x[k - pad] != 1 {
                o += i * xs[k - pad];
            }
        }
        offs.push(o);
        for k in (0..out.len()).rev() {
            idx[k] += 1;
            if idx[k] < out[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    offs
}

fn map(x: &Tensor, fun: impl Fn(f64) -> f64) -> Value {
    Value::F(Tensor::new(x.shape.clone(), x.data.iter().map(|&v| fun(v)).collect()))
}

fn zip(a: &Tensor, b: &Tensor, fun: impl Fn(f64, f64) -> f64) -> Result<Value, String> {
    let shape = broadcast_shapes(&a.shape, &b.shape)?;
    let (oa, ob) = (broadcast_offsets(&a.shape, &shape), broadcast_offsets(&b.shape, &shape));
    let data = oa.iter().zip(&ob).map(|(&i, &j)| fun(a.data[i], b.data[j])).collect();
    Ok(Value::F(Tensor::new(shape, data)))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Splits `shape` into (rows, last axis).
fn rows(shape: &[usize]) -> (usize, usize) {
    let d = *shape.last().unwrap_or(&1);
    (numel(shape) / d.max(1), d)
}

fn eval(op: &Op, ins: &[&Value], ty: &Type, env: &Env, precision: Precision) -> Result<Value, String> {
    Ok(match op {
        Op::Param { name, .. } => {
            let v = env.params.get(name).ok_or_else(|| format!("no value for parameter `{name}`"))?;
            match (ty.dtype, v) {
                (DType::Nf4(fmt), Value::F(t)) => Value::Q(nf4::quantize(
                    &t.to_f32(),
                    &t.shape,
                    fmt.block as usize,
                    fmt.double_quant.map(|b| b as usize),
                )),
                _ => v.clone(),
            }
        }
        Op::Input { name } => env.inputs.get(name).cloned().ok_or_else(|| format!("no value for input `{name}`"))?,
        Op::Const { value } => match ty.dtype {
            DType::I32 => Value::ints(ty.shape.clone(), vec![*value as i32; ty.numel()]),
            _ => Value::F(Tensor::new(ty.shape.clone(), vec![*value; ty.numel()])),
        },
        Op::Reshape { shape } => match ins[0] {
            Value::F(t) => Value::F(Tensor::new(shape.clone(), t.data.clone())),
            Value::I { data, .. } => Value::ints(shape.clone(), data.clone()),
            Value::Q(_) => return Err("cannot reshape NF4".into()),
        },
        Op::Transpose { perm } => {
            let x = f(ins[0])?;
            let xs = strides(&x.shape);
            let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
            let mut data = Vec::with_capacity(x.data.len());
            let mut idx = vec![0usize; out_shape.len()];
            for _ in 0..x.data.len() {
                data.push(x.data[idx.iter().zip(perm).map(|(&i, &p)| i * xs[p]).sum::<usize>()]);
                for k in (0..idx.len()).rev() {
                    idx[k] += 1;
                    if idx[k] < out_shape[k] {
                        break;
                    }
                    idx[k] = 0;
                }
            }
            Value::F(Tensor::new(out_shape, data))
        }
        Op::Concat { axis } => {
            let ts: Vec<&Tensor> = ins.iter().map(|v| f(v)).collect::<Result<_, _>>()?;
            let outer: usize = ts[0].shape[..*axis].iter().product();
            let mut data = Vec::new();
            for o in 0..outer {
                for t in &ts {
                    let chunk = numel(&t.shape[*axis..]);
                    data.extend_from_slice(&t.data[o * chunk..(o + 1) * chunk]);
                }
            }
            Value::F(Tensor::new(ty.shape.clone(), data))
        }
        Op::Slice { axis, start, end } => {
            let x = f(ins[0])?;
            let outer: usize = x.shape[..*axis].iter().product();
            let inner: usize = x.shape[axis + 1..].iter().product();
            let n = x.shape[*axis];
            let mut data = Vec::new();
            for o in 0..outer {
                data.extend_from_slice(&x.data[(o * n + start) * inner..(o * n + end) * inner]);
            }
            Value::F(Tensor::new(ty.shape.clone(), data))
        }
        Op::BroadcastTo { shape } => {
            let x = f(ins[0])?;
            Value::F(Tensor::new(
                shape.clone(),
                broadcast_offsets(&x.shape, shape).iter().map(|&o| x.data[o]).collect(),
            ))
        }
        Op::SumTo { shape } => {
            let x = f(ins[0])?;
            let mut out = Tensor::zeros(shape);
            for (k, o) in broadcast_offsets(shape, &x.shape).into_iter().enumerate() {
                out.data[o] += x.data[k];
            }
            Value::F(out)
        }
        Op::Cast { .. } => ins[0].clone(),
        Op::Add {} => zip(f(ins[0])?, f(ins[1])?, |a, b| a + b)?,
        Op::Sub {} => zip(f(ins[0])?, f(ins[1])?, |a, b| a - b)?,
        Op::Mul {} => zip(f(ins[0])?, f(ins[1])?, |a, b| a * b)?,
        Op::Div {} => zip(f(ins[0])?, f(ins[1])?, |a, b| a / b)?,
        Op::Minimum {} => zip(f(ins[0])?, f(ins[1])?, f64::min)?,
        Op::Maximum {} => zip(f(ins[0])?, f(ins[1])?, f64::max)?,
        Op::Neg {} => map(f(ins[0])?, |x| -x),
        Op::Exp {} => map(f(ins[0])?, f64::exp),
        Op::Log {} => map(f(ins[0])?, f64::ln),
        Op::Sqrt {} => map(f(ins[0])?, f64::sqrt),
        Op::Rsqrt {} => map(f(ins[0])?, |x| 1.0 / x.sqrt()),
        Op::Sigmoid {} => map(f(ins[0])?, sigmoid),
        Op::Silu {} => map(f(ins[0])?, |x| x * sigmoid(x)),
        Op::SiluBwd {} => zip(f(ins[0])?, f(ins[1])?, |dy, x| {
            let s = sigmoid(x);
            dy * s * (1.0 + x * (1.0 - s))
        })?,
        Op::Swiglu {} => zip(f(ins[0])?, f(ins[1])?, |g, u| g * sigmoid(g) * u)?,
        Op::Scale { c } => map(f(ins[0])?, |x| c * x),
        Op::StopGradient {} => ins[0].clone(),
        Op::Sum { axes, .. } => {
            let x = f(ins[0])?;
            let kept: Vec<usize> =
                x.shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
            let mut out = Tensor::zeros(&kept);
            for (k, o) in broadcast_offsets(&kept, &x.shape).into_iter().enumerate() {
                out.data[o] += x.data[k];
            }
            Value::F(Tensor::new(ty.shape.clone(), out.data))
        }
        Op::MatMul { ta, tb } => matmul(f(ins[0])?, f(ins[1])?, *ta, *tb, &ty.shape),
        Op::Embedding {} => {
            let (table, ids) = (f(ins[0])?, ints(ins[1])?);
            let (v, d) = (table.shape[0], table.shape[1]);
            let mut data = Vec::with_capacity(ids.len() * d);
            for &id in ids {
                if id < 0 || id as usize >= v {
                    return Err(format!("token id {id} is outside the vocabulary of {v}"));
                }
                data.extend_from_slice(&table.data[id as usize * d..(id as usize + 1) * d]);
            }
            Value::F(Tensor::new(ty.shape.clone(), data))
        }
        Op::EmbeddingBwd { vocab } => {
            let (dy, ids) = (f(ins[0])?, ints(ins[1])?);
            let d = ty.shape[1];
            let mut out = Tensor::zeros(&ty.shape);
            for (t, &id) in ids.iter().enumerate() {
                if id < 0 || id as usize >= *vocab {
                    return Err(format!("token id {id} is outside the vocabulary of {vocab}"));
                }
                for j in 0..d {
                    out.data[id as usize * d + j] += dy.data[t * d + j];
                }
            }
            Value::F(out)
        }
        Op::RmsNorm { eps } => {
            let (x, w) = (f(ins[0])?, f(ins[1])?);
            let (n, d) = rows(&x.shape);
            let mut data = vec![0.0; x.data.len()];
            for r in 0..n {
                let row = &x.data[r * d..(r + 1) * d];
                let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
                for j in 0..d {
                    data[r * d + j] = row[j] * inv * w.data[j];
                }
            }
            Value::F(Tensor::new(x.shape.clone(), data))
        }
        Op::RmsNormBwdX { eps } => {
            // y_j = w_j·x_j·r, r = (Σx²/D + eps)^(-1/2)  ⇒  dx_j = r·w_j·dy_j − r³/D · x_j · Σ_k dy_k·w_k·x_k
            let (dy, x, w) = (f(ins[0])?, f(ins[1])?, f(ins[2])?);
            let (n, d) = rows(&x.shape);
            let mut data = vec![0.0; x.data.len()];
            for r in 0..n {
                let (xr, dyr) = (&x.data[r * d..(r + 1) * d], &dy.data[r * d..(r + 1) * d]);
                let inv = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
                let dot: f64 = (0..d).map(|k| dyr[k] * w.data[k] * xr[k]).sum();
                for j in 0..d {
                    data[r * d + j] = inv * w.data[j] * dyr[j] - inv.powi(3) / d as f64 * xr[j] * dot;
                }
            }
            Value::F(Tensor::new(x.shape.clone(), data))
        }
        Op::RmsNormBwdW { eps } => {
            let (dy, x) = (f(ins[0])?, f(ins[1])?);
            let (n, d) = rows(&x.shape);
            let mut out = Tensor::zeros(&[d]);
            for r in 0..n {
                let xr = &x.data[r * d..(r + 1) * d];
                let inv = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
                for j in 0..d {
                    out.data[j] += dy.data[r * d + j] * xr[j] * inv;
                }
            }
            Value::F(out)
        }
        Op::Rope { theta, inverse } => rope(f(ins[0])?, ints(ins[1])?, *theta, *inverse, precision),
        Op::Attention { causal, scale } => {
            let (q, k, v) = (f(ins[0])?, f(ins[1])?, f(ins[2])?);
            attention(q, k, v, ints(ins[3])?, *causal, *scale, None)
        }
        Op::AttentionBwd { causal, scale, wrt } => {
            let (q, k, v) = (f(ins[1])?, f(ins[2])?, f(ins[3])?);
            attention(q, k, v, ints(ins[4])?, *causal, *scale, Some((f(ins[0])?, *wrt)))
        }
        Op::Softmax {} => {
            let x = f(ins[0])?;
            let (n, d) = rows(&x.shape);
            let mut data = vec![0.0; x.data.len()];
            for r in 0..n {
                data[r * d..(r + 1) * d].copy_from_slice(&softmax(&x.data[r * d..(r + 1) * d]));
            }
            Value::F(Tensor::new(x.shape.clone(), data))
        }
        Op::SoftmaxBwd {} => {
            let (dy, y) = (f(ins[0])?, f(ins[1])?);
            let (n, d) = rows(&y.shape);
            let mut data = vec![0.0; y.data.len()];
            for r in 0..n {
                let s = r * d..(r + 1) * d;
                let dot: f64 = dy.data[s.clone()].iter().zip(&y.data[s.clone()]).map(|(a, b)| a * b).sum();
                for j in s {
                    data[j] = y.data[j] * (dy.data[j] - dot);
                }
            }
            Value::F(Tensor::new(y.shape.clone(), data))
        }
        Op::CrossEntropy { ignore_index } => {
            let (logits, labels) = (f(ins[0])?, ints(ins[1])?);
            let (n, v) = rows(&logits.shape);
            let (mut total, mut count) = (0.0, 0usize);
            for r in 0..n {
                let Some(l) = label(labels[r], *ignore_index, v)? else { continue };
                let row = &logits.data[r * v..(r + 1) * v];
                total += logsumexp(row) - row[l];
                count += 1;
            }
            // All rows ignored: the loss is 0 (torch would give NaN for the mean of nothing).
            Value::F(Tensor::scalar(if count == 0 { 0.0 } else { total / count as f64 }))
        }
        Op::CrossEntropyBwd { ignore_index } => {
            let (dloss, logits, labels) = (f(ins[0])?.data[0], f(ins[1])?, ints(ins[2])?);
            let (n, v) = rows(&logits.shape);
            let mut count = 0;
            for &l in labels {
                count += label(l, *ignore_index, v)?.is_some() as usize;
            }
            let mut out = Tensor::zeros(&logits.shape);
            for r in 0..n {
                let Some(l) = label(labels[r], *ignore_index, v)? else { continue };
                let p = softmax(&logits.data[r * v..(r + 1) * v]);
                for j in 0..v {
                    out.data[r * v + j] = dloss * (p[j] - (j == l) as u8 as f64) / count as f64;
                }
            }
            Value::F(out)
        }
        Op::Nf4Quantize { block, double_quant } => {
            let x = f(ins[0])?;
            Value::Q(nf4::quantize(&x.to_f32(), &x.shape, *block, (*double_quant > 0).then_some(*double_quant)))
        }
        Op::Nf4Dequantize {} => match ins[0] {
            Value::Q(q) => Value::F(Tensor::from_f32(q.shape.clone(), &nf4::dequantize(q))),
            _ => return Err("expected an NF4 tensor".into()),
        },
        // Fused ops: their decompositions, literally.
        Op::QMatMul { tb } => {
            let w = weight(ins[1])?;
            matmul(f(ins[0])?, &w, false, *tb, &ty.shape)
        }
        Op::LoraLinear { s, tb } => {
            let w = weight(ins[1])?;
            let Value::F(base) = matmul(f(ins[0])?, &w, false, *tb, &ty.shape) else { unreachable!() };
            let Value::F(low) = matmul(f(ins[2])?, f(ins[3])?, false, *tb, &ty.shape) else { unreachable!() };
            Value::F(Tensor::new(ty.shape.clone(), base.data.iter().zip(&low.data).map(|(a, b)| a + s * b).collect()))
        }
        Op::LinearCrossEntropy { ignore_index, .. } => {
            let (h, w) = (f(ins[0])?, weight(ins[1])?);
            let logits = matmul(h, &w, false, true, &[h.shape[0], w.shape[0]]);
            eval(&Op::CrossEntropy { ignore_index: *ignore_index }, &[&logits, ins[2]], ty, env, precision)?
        }
        Op::LinearCrossEntropyBwd { ignore_index, .. } => {
            let (h, w) = (f(ins[1])?, weight(ins[2])?);
            let shape = [h.shape[0], w.shape[0]];
            let logits = matmul(h, &w, false, true, &shape);
            let lt = Type::f32(shape.to_vec());
            let dl = eval(
                &Op::CrossEntropyBwd { ignore_index: *ignore_index },
                &[ins[0], &logits, ins[3]],
                &lt,
                env,
                precision,
            )?;
            matmul(f(&dl)?, &w, false, false, &ty.shape)
        }
        Op::Dropout { p, seed } => {
            let (x, step) = (f(ins[0])?, scalar_int(ins[1])?);
            let keep_scale = 1.0 / (1.0 - p);
            let data = (0..x.data.len())
                .map(|i| {
                    if crate::rng::dropout_keep(*seed, step as u64, i as u64, *p) {
                        x.data[i] * keep_scale
                    } else {
                        0.0
                    }
                })
                .collect();
            Value::F(Tensor::new(x.shape.clone(), data))
        }
        Op::AdamWMoment { beta, square } => {
            zip(f(ins[0])?, f(ins[1])?, |m, g| beta * m + (1.0 - beta) * if *square { g * g } else { g })?
        }
        Op::AdamWUpdate { beta1, beta2, eps, weight_decay } => {
            let (p, m, v) = (f(ins[0])?, f(ins[1])?, f(ins[2])?);
            let (lr, t) = (f(ins[3])?.data[0], scalar_int(ins[4])?);
            if t < 1 {
                return Err(format!("AdamW step must be ≥ 1, got {t}"));
            }
            let bc1 = 1.0 - beta1.powi(t as i32);
            let bc2_sqrt = (1.0f64 - beta2.powi(t as i32)).sqrt();
            let data = (0..p.data.len())
                .map(|i| {
                    let decayed = p.data[i] * (1.0 - lr * weight_decay);
                    decayed - lr / bc1 * m.data[i] / (v.data[i].sqrt() / bc2_sqrt + eps)
                })
                .collect();
            Value::F(Tensor::new(p.shape.clone(), data))
        }
    })
}

/// An f32 weight as is, or an NF4 weight dequantized (exactly as `nf4_dequantize`).
fn weight(v: &Value) -> Result<Tensor, String> {
    match v {
        Value::F(t) => Ok(t.clone()),
        Value::Q(q) => Ok(Tensor::from_f32(q.shape.clone(), &nf4::dequantize(q))),
        Value::I { .. } => Err("expected a weight".into()),
    }
}

fn label(l: i32, ignore: i64, v: usize) -> Result<Option<usize>, String> {
    if l as i64 == ignore {
        Ok(None)
    } else if l < 0 || l as usize >= v {
        Err(format!("label {l} is outside the vocabulary of {v} (ignore index {ignore})"))
    } else {
        Ok(Some(l as usize))
    }
}

fn logsumexp(row: &[f64]) -> f64 {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool, out_shape: &[usize]) -> Value {
    let r = a.shape.len();
    let batch: usize = a.shape[..r - 2].iter().product();
    let (m, n) = (out_shape[r - 2], out_shape[r - 1]);
    let k = if ta { a.shape[r - 2] } else { a.shape[r - 1] };
    let (sa, sb) = (numel(&a.shape[r - 2..]), numel(&b.shape[r - 2..]));
    let mut out = vec![0.0; batch * m * n];
    for bi in 0..batch {
        let (ab, bb) = (&a.data[bi * sa..(bi + 1) * sa], &b.data[bi * sb..(bi + 1) * sb]);
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    let x = if ta { ab[p * m + i] } else { ab[i * k + p] };
                    let y = if tb { bb[j * k + p] } else { bb[p * n + j] };
                    acc += x * y;
                }
                out[bi * m * n + i * n + j] = acc;
            }
        }
    }
    Value::F(Tensor::new(out_shape.to_vec(), out))
}

/// HF Llama's rotary embedding (rotate_half layout): for j < hd/2, with a = pos·θ^(−2j/hd),
/// out_j = x_j·cos a − x_{j+hd/2}·sin a and out_{j+hd/2} = x_{j+hd/2}·cos a + x_j·sin a.
/// Angles are computed as HF does: inv_freq and pos·inv_freq in f32 (in F32 mode).
fn rope(x: &Tensor, pos: &[i32], theta: f64, inverse: bool, precision: Precision) -> Value {
    let (b, t, h, hd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let half = hd / 2;
    let angle = |p: i32, j: usize| -> f64 {
        match precision {
            Precision::F32 => {
                let inv = 1.0f32 / (theta as f32).powf((2 * j) as f32 / hd as f32);
                (p as f32 * inv) as f64
            }
            Precision::F64 => p as f64 / theta.powf((2 * j) as f64 / hd as f64),
        }
    };
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut out = vec![0.0; x.data.len()];
    for bi in 0..b {
        for ti in 0..t {
            let p = pos[bi * t + ti];
            for hi in 0..h {
                let base = ((bi * t + ti) * h + hi) * hd;
                for j in 0..half {
                    let a = angle(p, j);
                    let (c, s) = match precision {
                        Precision::F32 => ((a as f32).cos() as f64, sign * (a as f32).sin() as f64),
                        Precision::F64 => (a.cos(), sign * a.sin()),
                    };
                    let (x1, x2) = (x.data[base + j], x.data[base + j + half]);
                    out[base + j] = x1 * c - x2 * s;
                    out[base + j + half] = x2 * c + x1 * s;
                }
            }
        }
    }
    Value::F(Tensor::new(x.shape.clone(), out))
}

/// Causal GQA attention, or (with `grad`) one of its three gradients. Query head h reads kv head h / (H / KV).
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seg: &[i32],
    causal: bool,
    scale: f64,
    grad: Option<(&Tensor, AttnArg)>,
) -> Value {
    let (b, t, h, hd) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let kvh = k.shape[2];
    let rep = h / kvh;
    let qi = |bi: usize, ti: usize, hi: usize| ((bi * t + ti) * h + hi) * hd;
    let ki = |bi: usize, ti: usize, hi: usize| ((bi * t + ti) * kvh + hi) * hd;
    let out_shape = match grad {
        Some((_, AttnArg::K | AttnArg::V)) => k.shape.clone(),
        _ => q.shape.clone(),
    };
    let mut out = vec![0.0; numel(&out_shape)];
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / rep;
            for i in 0..t {
                let visible: Vec<usize> =
                    (0..t).filter(|&j| seg[bi * t + j] == seg[bi * t + i] && (!causal || j <= i)).collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        scale * (0..hd).map(|d| q.data[qi(bi, i, hi) + d] * k.data[ki(bi, j, g) + d]).sum::<f64>()
                    })
                    .collect();
                let p = softmax(&scores);
                match grad {
                    None => {
                        for (pj, &j) in p.iter().zip(&visible) {
                            for d in 0..hd {
                                out[qi(bi, i, hi) + d] += pj * v.data[ki(bi, j, g) + d];
                            }
                        }
                    }
                    Some((dout, wrt)) => {
                        let dor = &dout.data[qi(bi, i, hi)..qi(bi, i, hi) + hd];
                        let dp: Vec<f64> = visible
                            .iter()
                            .map(|&j| (0..hd).map(|d| dor[d] * v.data[ki(bi, j, g) + d]).sum::<f64>())
                            .collect();
                        let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                        for (n, &j) in visible.iter().enumerate() {
                            let ds = p[n] * (dp[n] - pdp);
                            for d in 0..hd {
                                match wrt {
                                    AttnArg::Q => out[qi(bi, i, hi) + d] += scale * ds * k.data[ki(bi, j, g) + d],
                                    AttnArg::K => out[ki(bi, j, g) + d] += scale * ds * q.data[qi(bi, i, hi) + d],
                                    AttnArg::V => out[ki(bi, j, g) + d] += p[n] * dor[d],
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Value::F(Tensor::new(out_shape, out))
}
