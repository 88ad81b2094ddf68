//! Type rules used by the op table: each returns the result type or a message saying what is wrong.

use crate::types::{DType, Nf4Format, Shape, Type};

pub type Rule = Result<Type, String>;

fn float(t: &Type) -> Result<(), String> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(format!("expected a float tensor, found {t}"))
    }
}

fn int(t: &Type) -> Result<(), String> {
    if t.dtype == DType::I32 {
        Ok(())
    } else {
        Err(format!("expected an i32 tensor, found {t}"))
    }
}

pub fn scalar_i32(t: &Type) -> Result<(), String> {
    int(t)?;
    if t.rank() == 0 {
        Ok(())
    } else {
        Err(format!("expected an i32 scalar, found {t}"))
    }
}

pub fn scalar_f32(t: &Type) -> Result<(), String> {
    float(t)?;
    if t.rank() == 0 {
        Ok(())
    } else {
        Err(format!("expected a float scalar, found {t}"))
    }
}

fn rank(t: &Type, r: usize) -> Result<(), String> {
    if t.rank() == r {
        Ok(())
    } else {
        Err(format!("expected rank {r}, found {t}"))
    }
}

pub fn leaf_numeric(decl: &Type) -> Rule {
    if decl.dtype.is_float() || decl.dtype == DType::I32 {
        Ok(decl.clone())
    } else {
        Err(format!("a constant must be float or i32, found {decl}"))
    }
}

pub fn float_unary(x: &Type) -> Rule {
    float(x)?;
    Ok(x.clone())
}

pub fn same2(ins: &[&Type]) -> Rule {
    float(ins[0])?;
    if ins[0] != ins[1] {
        return Err(format!("inputs must have the same type, found {} and {}", ins[0], ins[1]));
    }
    Ok(ins[0].clone())
}

/// numpy broadcasting of two shapes (aligned at the trailing axis).
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Shape, String> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        };
    }
    Ok(out)
}

pub fn broadcast2(ins: &[&Type]) -> Rule {
    float(ins[0])?;
    if ins[0].dtype != ins[1].dtype {
        return Err(format!("dtypes differ: {} and {}", ins[0], ins[1]));
    }
    Ok(Type::new(ins[0].dtype, broadcast_shapes(&ins[0].shape, &ins[1].shape)?))
}

pub fn broadcast_to(x: &Type, shape: &[usize]) -> Rule {
    let b = broadcast_shapes(&x.shape, shape)?;
    if b != shape {
        return Err(format!("{x} does not broadcast to {shape:?}"));
    }
    Ok(Type::new(x.dtype, shape.to_vec()))
}

pub fn sum_to(x: &Type, shape: &[usize]) -> Rule {
    float(x)?;
    if broadcast_shapes(shape, &x.shape)? != x.shape {
        return Err(format!("{x} cannot be summed to {shape:?}"));
    }
    Ok(Type::new(x.dtype, shape.to_vec()))
}

pub fn cast(x: &Type, to: DType) -> Rule {
    float(x)?;
    if !to.is_float() {
        return Err(format!("cast goes between float dtypes, not to {to}"));
    }
    Ok(x.with_dtype(to))
}

pub fn reshape(x: &Type, shape: &[usize]) -> Rule {
    // Checked: a graph read from a file may have shapes whose element counts overflow.
    let count = |s: &[usize]| s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count(&x.shape).is_none() || count(&x.shape) != count(shape) {
        return Err(format!("cannot reshape {x} to {shape:?}: element counts differ"));
    }
    if matches!(x.dtype, DType::Nf4(_)) {
        return Err("NF4 tensors cannot be reshaped".into());
    }
    Ok(Type::new(x.dtype, shape.to_vec()))
}

pub fn transpose(x: &Type, perm: &[usize]) -> Rule {
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank() || perm.iter().any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true)) {
        return Err(format!("{perm:?} is not a permutation of the axes of {x}"));
    }
    Ok(Type::new(x.dtype, perm.iter().map(|&p| x.shape[p]).collect::<Vec<_>>()))
}

pub fn concat(ins: &[&Type], axis: usize) -> Rule {
    let first = ins[0];
    if axis >= first.rank() {
        return Err(format!("axis {axis} out of range for {first}"));
    }
    let mut shape = first.shape.clone();
    shape[axis] = 0;
    for t in ins {
        let same_rest = t.rank() == first.rank()
            && t.dtype == first.dtype
            && (0..t.rank()).all(|i| i == axis || t.shape[i] == first.shape[i]);
        if !same_rest {
            return Err(format!("cannot concatenate {t} with {first} along axis {axis}"));
        }
        shape[axis] += t.shape[axis];
    }
    Ok(Type::new(first.dtype, shape))
}

pub fn slice(x: &Type, axis: usize, start: usize, end: usize) -> Rule {
    if axis >= x.rank() || start > end || end > x.shape[axis] {
        return Err(format!("slice {start}..{end} of axis {axis} is out of range for {x}"));
    }
    let mut shape = x.shape.clone();
    shape[axis] = end - start;
    Ok(Type::new(x.dtype, shape))
}

pub fn sum(x: &Type, axes: &[usize], keepdim: bool) -> Rule {
    float(x)?;
    if axes.iter().any(|&a| a >= x.rank()) {
        return Err(format!("axes {axes:?} out of range for {x}"));
    }
    let shape = (0..x.rank())
        .filter_map(|i| match (axes.contains(&i), keepdim) {
            (false, _) => Some(x.shape[i]),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect::<Vec<_>>();
    Ok(Type::new(x.dtype, shape))
}

pub fn matmul(a: &Type, b: &Type, ta: bool, tb: bool) -> Rule {
    float(a)?;
    if a.dtype != b.dtype {
        return Err(format!("matmul operands differ in dtype: {a} and {b}"));
    }
    if !((a.rank() == 2 && b.rank() == 2) || (a.rank() == 3 && b.rank() == 3 && a.shape[0] == b.shape[0])) {
        return Err(format!(
            "matmul takes two rank-2 tensors or two rank-3 tensors with equal batch, found {a} and {b}"
        ));
    }
    let r = a.rank();
    let (m, ka) = if ta { (a.shape[r - 1], a.shape[r - 2]) } else { (a.shape[r - 2], a.shape[r - 1]) };
    let (kb, n) = if tb { (b.shape[r - 1], b.shape[r - 2]) } else { (b.shape[r - 2], b.shape[r - 1]) };
    if ka != kb {
        return Err(format!(
            "matmul inner dimensions differ: {a}{} · {b}{}",
            if ta { "ᵀ" } else { "" },
            if tb { "ᵀ" } else { "" }
        ));
    }
    let mut shape = a.shape[..r - 2].to_vec();
    shape.extend([m, n]);
    Ok(Type::new(a.dtype, shape))
}

pub fn embedding(table: &Type, ids: &Type) -> Rule {
    float(table)?;
    rank(table, 2)?;
    int(ids)?;
    let mut shape = ids.shape.clone();
    shape.push(table.shape[1]);
    Ok(Type::new(table.dtype, shape))
}

pub fn embedding_bwd(dy: &Type, ids: &Type, vocab: usize) -> Rule {
    float(dy)?;
    int(ids)?;
    if dy.rank() != ids.rank() + 1 || dy.shape[..ids.rank()] != ids.shape[..] {
        return Err(format!("embedding gradient {dy} does not match ids {ids}"));
    }
    Ok(Type::new(dy.dtype, vec![vocab, *dy.shape.last().unwrap_or(&0)]))
}

pub fn rms_norm(x: &Type, w: &Type) -> Rule {
    float(x)?;
    rank(w, 1)?;
    if x.shape.last() != Some(&w.shape[0]) || x.dtype != w.dtype {
        return Err(format!("rms_norm weight {w} does not match the last axis of {x}"));
    }
    Ok(x.clone())
}

pub fn rms_norm_bwd_w(dy: &Type, x: &Type) -> Rule {
    same2(&[dy, x])?;
    let d = *x.shape.last().ok_or("rms_norm needs rank ≥ 1")?;
    Ok(Type::new(x.dtype, vec![d]))
}

pub fn rope(x: &Type, pos: &Type) -> Rule {
    float(x)?;
    rank(x, 4)?;
    int(pos)?;
    if pos.shape[..] != x.shape[..2] {
        return Err(format!("rope positions {pos} must be [batch, seq] of {x}"));
    }
    if !x.shape[3].is_multiple_of(2) {
        return Err(format!("rope needs an even head dimension, found {x}"));
    }
    Ok(x.clone())
}

pub fn attention(q: &Type, k: &Type, v: &Type, seg: &Type) -> Rule {
    float(q)?;
    rank(q, 4)?;
    if k != v || k.rank() != 4 || k.dtype != q.dtype {
        return Err(format!("attention keys {k} and values {v} must have the same type"));
    }
    let (b, t, h, hd) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let kv = k.shape[2];
    if k.shape[0] != b || k.shape[1] != t || k.shape[3] != hd || kv == 0 || h % kv != 0 {
        return Err(format!("attention: keys {k} do not fit queries {q} (kv heads must divide heads)"));
    }
    int(seg)?;
    if seg.shape[..] != [b, t] {
        return Err(format!("attention segment ids {seg} must be [batch, seq] = [{b},{t}]"));
    }
    Ok(q.clone())
}

pub fn attention_bwd(ins: &[&Type], wrt: crate::attr::AttnArg) -> Rule {
    let out = attention(ins[1], ins[2], ins[3], ins[4])?;
    if ins[0] != &out {
        return Err(format!("attention gradient {} must match the output {out}", ins[0]));
    }
    Ok(match wrt {
        crate::attr::AttnArg::Q => ins[1].clone(),
        crate::attr::AttnArg::K => ins[2].clone(),
        crate::attr::AttnArg::V => ins[3].clone(),
    })
}

pub fn cross_entropy(logits: &Type, labels: &Type) -> Rule {
    float(logits)?;
    rank(logits, 2)?;
    int(labels)?;
    if labels.shape[..] != logits.shape[..1] {
        return Err(format!("labels {labels} must be [{}] for logits {logits}", logits.shape[0]));
    }
    Ok(Type::scalar(logits.dtype))
}

pub fn cross_entropy_bwd(ins: &[&Type]) -> Rule {
    scalar_f32(ins[0])?;
    cross_entropy(ins[1], ins[2])?;
    Ok(ins[1].clone())
}

pub fn nf4_quantize(w: &Type, block: usize, double_quant: usize) -> Rule {
    if w.dtype != DType::F32 {
        return Err(format!("nf4_quantize takes f32, found {w}"));
    }
    if block == 0 || !block.is_multiple_of(2) {
        return Err(format!("NF4 block size must be even and positive, found {block}"));
    }
    let double_quant = (double_quant > 0).then_some(double_quant as u32);
    Ok(w.with_dtype(DType::Nf4(Nf4Format { block: block as u32, double_quant })))
}

pub fn nf4_dequantize(q: &Type) -> Rule {
    match q.dtype {
        DType::Nf4(_) => Ok(q.with_dtype(DType::F32)),
        _ => Err(format!("nf4_dequantize takes an NF4 tensor, found {q}")),
    }
}

pub fn adamw_update(ins: &[&Type]) -> Rule {
    same2(&ins[..2])?;
    same2(&[ins[0], ins[2]])?;
    scalar_f32(ins[3])?;
    scalar_i32(ins[4])?;
    Ok(ins[0].clone())
}

fn nf4_or_f32(w: &Type) -> Result<Type, String> {
    match w.dtype {
        DType::Nf4(_) | DType::F32 => Ok(w.with_dtype(DType::F32)),
        _ => Err(format!("expected an f32 or NF4 weight, found {w}")),
    }
}

pub fn qmatmul(x: &Type, q: &Type, tb: bool) -> Rule {
    if !matches!(q.dtype, DType::Nf4(_)) {
        return Err(format!("qmatmul takes an NF4 weight, found {q}"));
    }
    matmul(x, &q.with_dtype(DType::F32), false, tb)
}

pub fn lora_linear(ins: &[&Type], tb: bool) -> Rule {
    let w = nf4_or_f32(ins[1])?;
    let base = matmul(ins[0], &w, false, tb)?;
    let low = matmul(ins[2], ins[3], false, tb)?;
    if base != low {
        return Err(format!("lora_linear: the base product {base} and the low-rank product {low} differ"));
    }
    Ok(base)
}

pub fn linear_cross_entropy(h: &Type, w: &Type, labels: &Type) -> Rule {
    let logits = matmul(h, &nf4_or_f32(w)?, false, true)?;
    cross_entropy(&logits, labels)
}
