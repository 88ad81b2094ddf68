//! Loop nests: the one description of an elementwise or row-reduction kernel group that both targets lower from.
//!
//! A [`LoopNest`] is built from one kernel group of an [`ir::Graph`] (formed by the `fuse` pass). It holds the
//! group's buffers (inputs, then outputs; f32 or i32 arrays of static shape), an expression DAG giving one output
//! element from input elements, and how the work is iterated:
//! - [`Iteration::Elements`]: one flat loop over the elements of the outputs;
//! - [`Iteration::Rows`]: one loop over rows, with inner loops over the last axis (the row reductions `rms_norm`,
//!   `rms_norm_bwd_x`, `softmax` and `sum` over the last axis compute per-row statistics first, then every full-size
//!   output is written along the row).
//!
//! An NF4 input (an `nf4` value read by `nf4_dequantize`) is a buffer of [`Elem::Nf4`]: its storage parts (packed
//! codes and scales, laid out as `kernels::gemm::nf4_buffers` gives them) are separate kernel arguments, and its
//! [`ExprOp::Load`] is the dequantized f32 element (bit-exact with `ir::nf4::dequantize`); `nf4_dequantize` itself
//! is then a view.
//!
//! Indexing follows the interpreter: an expression is evaluated at a linear (row-major) index of its own shape, and
//! an argument of a smaller shape is read at the offset numpy broadcasting maps that index to. Views (`reshape`,
//! `stop_gradient`, `cast` f32→f32) keep the linear index. Scalar constants are folded into the expressions.
//! Ops of other templates (matmul, attention, …) make the group [`LoopError::Unsupported`].

use std::collections::HashMap;

use ir::{DType, Graph, Kernel, Op, ValueId};

/// Why a group cannot be described as a loop nest.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoopError {
    /// The group holds an op (or a dtype) this template does not lower; another template owns it.
    #[error("`{0}` is not an elementwise or row-reduction op of f32 values")]
    Unsupported(String),
    /// The group's shapes do not form one iteration space.
    #[error("kernel `{kernel}`: {message}")]
    Shape { kernel: String, message: String },
}

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    I32,
    /// NF4 storage (inputs only), loaded as dequantized f32: blocks of `block` elements, with double quantization
    /// in blocks of `double_quant` absmax values when present. Its parts, in argument order: packed codes (u8),
    /// then either absmax (f32), or absmax codes (u8), absmax2 (f32) and offset (f32[1]).
    Nf4 {
        block: usize,
        double_quant: Option<usize>,
    },
}

impl Elem {
    /// How many kernel arguments (storage parts) a buffer of this type takes: 1, or 2 / 4 for NF4.
    pub fn parts(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 1,
            Elem::Nf4 { double_quant: None, .. } => 2,
            Elem::Nf4 { double_quant: Some(_), .. } => 4,
        }
    }
}

/// One array the kernel reads or writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    /// The graph value it holds.
    pub value: ValueId,
    pub elem: Elem,
    pub shape: Vec<usize>,
}

impl Buffer {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How the kernel's threads split the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iteration {
    /// One flat loop over `len` output elements.
    Elements { len: usize },
    /// `rows` rows of `cols` elements: a row loop with inner loops over the last axis.
    Rows { rows: usize, cols: usize },
}

impl Iteration {
    /// How many iterations the outer (parallel) loop has: elements or rows.
    pub fn outer(self) -> usize {
        match self {
            Iteration::Elements { len } => len,
            Iteration::Rows { rows, .. } => rows,
        }
    }
}

/// Index of an expression in [`LoopNest::exprs`].
pub type ExprId = usize;

/// What an expression computes (the arguments are [`Expr::args`]).
#[derive(Clone, Debug, PartialEq)]
pub enum ExprOp {
    /// An element of input buffer `buffer`.
    Load {
        buffer: usize,
    },
    /// A constant (every element equal).
    Scalar {
        value: f64,
        elem: Elem,
    },
    /// The argument at the same linear index (reshape, stop_gradient, cast f32→f32).
    View,
    /// The argument broadcast (numpy rules) to this shape.
    Broadcast,
    /// The argument read at a strided position (slice, transpose, the permuted view a reduction reads): for this
    /// expression's linear index, axes from the last, `(extent, stride)`; the argument's linear index is
    /// `offset + Σ coord·stride`.
    Strided {
        axes: Vec<(usize, usize)>,
        offset: usize,
    },
    /// Concatenation along an axis: this expression's index is `(outer, c, inner)` with `c < Σ lens`; argument `j`
    /// holds `c` in `[Σ lens[..j], Σ lens[..=j])`, read at `(outer, c - start, inner)`.
    Concat {
        lens: Vec<usize>,
        inner: usize,
    },
    Add,
    Sub,
    Mul,
    Div,
    Minimum,
    Maximum,
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Sigmoid,
    Silu,
    /// (dy, x)
    SiluBwd,
    /// (gate, up)
    Swiglu,
    Scale {
        c: f64,
    },
    /// (x, step: i32 scalar); the mask is `ir::rng::dropout_keep(seed, step, index, p)` with `seed =
    /// seeds[slot]`, read at run time so that every layer's dropout shares one kernel.
    Dropout {
        p: f64,
        slot: usize,
    },
    /// (m, g)
    AdamWMoment {
        beta: f64,
        square: bool,
    },
    /// (p, m, v, lr: f32 scalar, step: i32 scalar)
    AdamWUpdate {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// Row op: (x, w)
    RmsNorm {
        eps: f64,
    },
    /// Row op: (dy, x, w)
    RmsNormBwdX {
        eps: f64,
    },
    /// Row op: (x)
    Softmax,
    /// Row op: Σ over the last axis of (x); its shape is the row shape (`[.., 1]` or `[..]`).
    RowSum,
}

impl ExprOp {
    /// Whether the op needs per-row statistics (a reduction over the last axis).
    pub fn is_row_op(&self) -> bool {
        matches!(self, ExprOp::RmsNorm { .. } | ExprOp::RmsNormBwdX { .. } | ExprOp::Softmax | ExprOp::RowSum)
    }
}

/// One node of the expression DAG: evaluated at a linear index of `shape`.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub op: ExprOp,
    pub args: Vec<ExprId>,
    pub shape: Vec<usize>,
}

impl Expr {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Output buffer `buffer` receives expression `expr` (same number of elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Store {
    pub buffer: usize,
    pub expr: ExprId,
}

/// A kernel group as loops over buffers (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct LoopNest {
    /// The kernel group's name (`rms_norm:model.norm`).
    pub name: String,
    /// Inputs (the first `n_inputs`), then outputs.
    pub buffers: Vec<Buffer>,
    pub n_inputs: usize,
    pub iteration: Iteration,
    /// Expressions in dependency order (arguments come first).
    pub exprs: Vec<Expr>,
    pub stores: Vec<Store>,
    /// The dropout seeds of this instance (`ExprOp::Dropout::slot` indexes them). They are passed at run time,
    /// after the buffers, as a pointer to `u64`s (none when empty), so they are not part of the kernel's code.
    pub seeds: Vec<u64>,
}

impl LoopNest {
    /// The kernel's symbol: `tunec_` + the name with every non-alphanumeric character as `_`.
    pub fn symbol(&self) -> String {
        let body: String = self.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        format!("tunec_{body}")
    }

    pub fn inputs(&self) -> &[Buffer] {
        &self.buffers[..self.n_inputs]
    }

    pub fn outputs(&self) -> &[Buffer] {
        &self.buffers[self.n_inputs..]
    }

    /// The kernel's pointer arguments: (buffer, part) in ABI order (one per buffer, or an NF4 buffer's parts).
    pub fn args(&self) -> Vec<(usize, usize)> {
        self.buffers.iter().enumerate().flat_map(|(i, b)| (0..b.elem.parts()).map(move |p| (i, p))).collect()
    }

    /// The row ops, in dependency order.
    pub fn row_ops(&self) -> Vec<ExprId> {
        (0..self.exprs.len()).filter(|&e| self.exprs[e].op.is_row_op()).collect()
    }

    /// Describes kernel group `kernel` of `g`.
    pub fn from_group(g: &Graph, kernel: &Kernel) -> Result<LoopNest, LoopError> {
        build(g, kernel, &crate::template::Uses::of(g))
    }

    /// [`LoopNest::from_group`] with the graph's readers computed once by the caller.
    pub fn from_group_with(g: &Graph, kernel: &Kernel, uses: &crate::template::Uses) -> Result<LoopNest, LoopError> {
        build(g, kernel, uses)
    }
}

fn elem_of(dtype: DType) -> Result<Elem, LoopError> {
    match dtype {
        DType::F32 => Ok(Elem::F32),
        DType::I32 => Ok(Elem::I32),
        DType::Nf4(f) => Ok(Elem::Nf4 { block: f.block as usize, double_quant: f.double_quant.map(|b| b as usize) }),
        other => Err(LoopError::Unsupported(format!("{other} values"))),
    }
}

/// The expression op for a member node (its arguments are the node's inputs, in order).
fn expr_op(op: &Op, g: &Graph, inputs: &[ValueId]) -> Result<ExprOp, LoopError> {
    Ok(match op {
        Op::Reshape { .. } | Op::StopGradient {} => ExprOp::View,
        // Its argument is an NF4 buffer, whose load dequantizes.
        Op::Nf4Dequantize {} if matches!(elem_of(g.ty(inputs[0]).dtype)?, Elem::Nf4 { .. }) => ExprOp::View,
        Op::Cast { to: DType::F32 } if g.ty(inputs[0]).dtype == DType::F32 => ExprOp::View,
        Op::BroadcastTo { .. } => ExprOp::Broadcast,
        Op::Add {} => ExprOp::Add,
        Op::Sub {} => ExprOp::Sub,
        Op::Mul {} => ExprOp::Mul,
        Op::Div {} => ExprOp::Div,
        Op::Minimum {} => ExprOp::Minimum,
        Op::Maximum {} => ExprOp::Maximum,
        Op::Neg {} => ExprOp::Neg,
        Op::Exp {} => ExprOp::Exp,
        Op::Log {} => ExprOp::Log,
        Op::Sqrt {} => ExprOp::Sqrt,
        Op::Rsqrt {} => ExprOp::Rsqrt,
        Op::Sigmoid {} => ExprOp::Sigmoid,
        Op::Silu {} => ExprOp::Silu,
        Op::SiluBwd {} => ExprOp::SiluBwd,
        Op::Swiglu {} => ExprOp::Swiglu,
        Op::Scale { c } => ExprOp::Scale { c: *c },
        Op::Dropout { p, .. } => ExprOp::Dropout { p: *p, slot: 0 },
        Op::AdamWMoment { beta, square } => ExprOp::AdamWMoment { beta: *beta, square: *square },
        Op::AdamWUpdate { beta1, beta2, eps, weight_decay } => {
            ExprOp::AdamWUpdate { beta1: *beta1, beta2: *beta2, eps: *eps, weight_decay: *weight_decay }
        }
        Op::RmsNorm { eps } => ExprOp::RmsNorm { eps: *eps },
        Op::RmsNormBwdX { eps } => ExprOp::RmsNormBwdX { eps: *eps },
        Op::Softmax {} => ExprOp::Softmax,
        Op::Sum { .. } | Op::SumTo { .. } => ExprOp::RowSum,
        Op::Slice { axis, start, end } => {
            let src = &g.ty(inputs[0]).shape;
            let strides = row_major_strides(src);
            let mut out = src.clone();
            out[*axis] = end - start;
            strided(&out, &strides, start * strides[*axis])
        }
        Op::Transpose { perm } => {
            let src = &g.ty(inputs[0]).shape;
            let strides = row_major_strides(src);
            let out: Vec<usize> = perm.iter().map(|&p| src[p]).collect();
            let perm_strides: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
            strided(&out, &perm_strides, 0)
        }
        Op::Concat { axis } => {
            let out = &g.ty(inputs[0]).shape;
            ExprOp::Concat {
                lens: inputs.iter().map(|&v| g.ty(v).shape[*axis]).collect(),
                inner: out[axis + 1..].iter().product(),
            }
        }
        Op::Cast { to } => return Err(LoopError::Unsupported(format!("cast to {to}"))),
        other => return Err(LoopError::Unsupported(other.mnemonic().to_string())),
    })
}

/// Row-major strides of `shape`, in elements.
pub fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    strides
}

/// A strided read of an argument for an expression of shape `out`, `strides[k]` being the argument's stride along
/// output axis `k`.
fn strided(out: &[usize], strides: &[usize], offset: usize) -> ExprOp {
    ExprOp::Strided { axes: out.iter().zip(strides).rev().map(|(&e, &s)| (e, s)).collect(), offset }
}

/// For a reduction of `src` down to the axes not in `reduced`: the shape `[kept, reduced]` (as two flat extents)
/// and the strided read of `src` that lists every kept index's reduced elements contiguously (`None` when the
/// reduced axes already are the trailing ones, so a plain view does).
fn reduction_view(src: &[usize], reduced: &[usize]) -> (usize, usize, Option<ExprOp>) {
    let kept: Vec<usize> = (0..src.len()).filter(|k| !reduced.contains(k)).collect();
    let rows: usize = kept.iter().map(|&k| src[k]).product();
    let cols: usize = reduced.iter().map(|&k| src[k]).product();
    let trailing = reduced.iter().enumerate().all(|(i, &k)| k == src.len() - reduced.len() + i);
    if trailing {
        return (rows, cols, None);
    }
    let strides = row_major_strides(src);
    let order: Vec<usize> = kept.iter().chain(reduced).copied().collect();
    let out: Vec<usize> = order.iter().map(|&k| src[k]).collect();
    let st: Vec<usize> = order.iter().map(|&k| strides[k]).collect();
    (rows, cols, Some(strided(&out, &st, 0)))
}

/// The axes of `src` that a `sum_to` to `target` (numpy broadcasting in reverse) sums over.
fn sum_to_axes(src: &[usize], target: &[usize]) -> Vec<usize> {
    let pad = src.len() - target.len();
    (0..src.len()).filter(|&k| k < pad || (target[k - pad] == 1 && src[k] != 1)).collect()
}

fn build(g: &Graph, kernel: &Kernel, uses: &crate::template::Uses) -> Result<LoopNest, LoopError> {
    let shape_err = |message: String| LoopError::Shape { kernel: kernel.name.clone(), message };
    let mut members: Vec<ValueId> = kernel.nodes.clone();
    members.sort();
    members.dedup();
    let is_member = |v: ValueId| members.binary_search(&v).is_ok();

    let mut buffers: Vec<Buffer> = Vec::new();
    let mut exprs: Vec<Expr> = Vec::new();
    let mut expr_of: HashMap<ValueId, ExprId> = HashMap::new();

    // Every operand from outside the group: a folded constant or an input buffer.
    for &m in &members {
        let node = g.node(m);
        if node.op.is_leaf() {
            return Err(shape_err(format!("leaf {m} ({}) inside a kernel group", node.op.mnemonic())));
        }
        expr_op(&node.op, g, &node.inputs)?;
        for &v in &node.inputs {
            // NF4 values are only read through `nf4_dequantize` (its load dequantizes).
            if matches!(g.ty(v).dtype, DType::Nf4(_)) && !matches!(node.op, Op::Nf4Dequantize {}) {
                return Err(LoopError::Unsupported(format!("{} of nf4 values", node.op.mnemonic())));
            }
            if is_member(v) || expr_of.contains_key(&v) {
                continue;
            }
            let ty = g.ty(v);
            let elem = elem_of(ty.dtype)?;
            let op = match g.node(v).op {
                Op::Const { value } => ExprOp::Scalar { value, elem },
                _ => {
                    buffers.push(Buffer { value: v, elem, shape: ty.shape.clone() });
                    ExprOp::Load { buffer: buffers.len() - 1 }
                }
            };
            expr_of.insert(v, exprs.len());
            exprs.push(Expr { op, args: vec![], shape: ty.shape.clone() });
        }
    }
    let n_inputs = buffers.len();

    // Member expressions in node order (SSA order, so arguments come first).
    let mut seeds = vec![];
    for &m in &members {
        let node = g.node(m);
        if elem_of(node.ty.dtype)? != Elem::F32 {
            return Err(LoopError::Unsupported(format!("{} producing {}", node.op.mnemonic(), node.ty.dtype)));
        }
        let op = expr_op(&node.op, g, &node.inputs)?;
        let op = match (op, &node.op) {
            (ExprOp::Dropout { p, .. }, Op::Dropout { seed, .. }) => {
                seeds.push(*seed);
                ExprOp::Dropout { p, slot: seeds.len() - 1 }
            }
            (op, _) => op,
        };
        let mut args: Vec<ExprId> = node.inputs.iter().map(|v| expr_of[v]).collect();
        let reduced = match &node.op {
            Op::Sum { axes, .. } => Some(axes.to_vec()),
            Op::SumTo { shape } => Some(sum_to_axes(&g.ty(node.inputs[0]).shape, shape)),
            _ => None,
        };
        if let Some(mut reduced) = reduced {
            // A reduction is a row sum over `[kept, reduced]`, read through a view of its input.
            reduced.sort_unstable();
            reduced.dedup();
            let (rows, cols, view) = reduction_view(&g.ty(node.inputs[0]).shape, &reduced);
            let shape = vec![rows, cols.max(1)];
            exprs.push(Expr { op: view.unwrap_or(ExprOp::View), args: vec![args[0]], shape });
            args[0] = exprs.len() - 1;
        }
        expr_of.insert(m, exprs.len());
        exprs.push(Expr { op, args, shape: node.ty.shape.clone() });
    }

    // Outputs: member values read outside the group or returned by the graph.
    let mut stores = Vec::new();
    for &m in &members {
        if uses.read_outside(m, is_member) {
            buffers.push(Buffer { value: m, elem: Elem::F32, shape: g.ty(m).shape.clone() });
            stores.push(Store { buffer: buffers.len() - 1, expr: expr_of[&m] });
        }
    }
    if stores.is_empty() {
        return Err(shape_err("the group has no outputs".into()));
    }

    let iteration = iteration(&exprs, &stores).map_err(shape_err)?;
    Ok(LoopNest { name: kernel.name.clone(), buffers, n_inputs, iteration, exprs, stores, seeds })
}

/// The iteration space: rows of the row ops' input, or the outputs' elements; checks every store fits it.
fn iteration(exprs: &[Expr], stores: &[Store]) -> Result<Iteration, String> {
    let row_ops: Vec<&Expr> = exprs.iter().filter(|e| e.op.is_row_op()).collect();
    let Some(first) = row_ops.first() else {
        let len = exprs[stores[0].expr].numel();
        if let Some(s) = stores.iter().find(|s| exprs[s.expr].numel() != len) {
            return Err(format!("outputs of {} and {len} elements in one elementwise kernel", exprs[s.expr].numel()));
        }
        return Ok(Iteration::Elements { len });
    };
    let row_shape = |e: &Expr| -> Vec<usize> { exprs[e.args[row_input(&e.op)]].shape.clone() };
    let x = row_shape(first);
    let cols = *x.last().ok_or("a row op on a scalar")?;
    let rows = x.iter().product::<usize>() / cols.max(1);
    for e in &row_ops {
        let s = row_shape(e);
        if s.last() != Some(&cols) || s.iter().product::<usize>() != rows * cols {
            return Err(format!("row ops over {x:?} and {s:?} in one kernel"));
        }
    }
    // A row sum's value is the current row's accumulator: every reader must read it at its own row.
    for e in exprs {
        for &a in &e.args {
            if exprs[a].op != ExprOp::RowSum {
                continue;
            }
            let same = e.numel() == exprs[a].numel();
            let keepdim_broadcast = e.numel() == rows * cols
                && exprs[a].shape.len() == e.shape.len()
                && exprs[a].shape.last() == Some(&1)
                && exprs[a].shape[..e.shape.len() - 1] == e.shape[..e.shape.len() - 1];
            let readable = same || (keepdim_broadcast && !e.op.is_row_op());
            if !readable {
                return Err(format!("a row sum of shape {:?} read by an op of shape {:?}", exprs[a].shape, e.shape));
            }
        }
    }
    for s in stores {
        let n = exprs[s.expr].numel();
        if n != rows * cols && n != rows {
            return Err(format!("an output of {n} elements in a kernel over {rows} rows of {cols}"));
        }
    }
    Ok(Iteration::Rows { rows, cols })
}

/// Which argument of a row op is the row input `x` (`rms_norm_bwd_x` reads `(dy, x, w)`).
pub fn row_input(op: &ExprOp) -> usize {
    if matches!(op, ExprOp::RmsNormBwdX { .. }) {
        1
    } else {
        0
    }
}

/// How an argument of shape `arg` is indexed from a linear index of shape `out` (numpy broadcasting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexMap {
    /// Same linear index.
    Same,
    /// Always element 0.
    Zero,
    /// `i % n` (the argument is a suffix of the output shape, e.g. a `[D]` weight).
    Rem(usize),
    /// `i / n` (the argument is a prefix of the output shape padded with ones, e.g. `[R, 1]`).
    Div(usize),
    /// General: for each output axis from the last, (extent, argument stride or 0 where broadcast).
    Axes(Vec<(usize, usize)>),
}

/// The [`IndexMap`] numpy broadcasting gives for reading `arg` at linear indices of `out`.
pub fn index_map(arg: &[usize], out: &[usize]) -> IndexMap {
    let (na, no): (usize, usize) = (arg.iter().product(), out.iter().product());
    if na == no {
        return IndexMap::Same;
    }
    if na == 1 {
        return IndexMap::Zero;
    }
    let mut padded = vec![1; out.len() - arg.len()];
    padded.extend_from_slice(arg);
    let first = padded.iter().position(|&d| d != 1).unwrap_or(padded.len());
    if padded[first..] == out[first..] {
        return IndexMap::Rem(na);
    }
    let last = padded.iter().rposition(|&d| d != 1).map_or(0, |p| p + 1);
    if padded[..last] == out[..last] && padded[last..].iter().all(|&d| d == 1) {
        return IndexMap::Div(out[last..].iter().product());
    }
    let mut axes = Vec::with_capacity(out.len());
    let mut stride = 1;
    for k in (0..out.len()).rev() {
        axes.push((out[k], if padded[k] == 1 { 0 } else { stride }));
        stride *= padded[k];
    }
    IndexMap::Axes(axes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::{Builder, Type};

    #[test]
    fn index_maps_follow_numpy_broadcasting() {
        assert_eq!(index_map(&[4, 5], &[4, 5]), IndexMap::Same);
        assert_eq!(index_map(&[1, 5], &[5]), IndexMap::Same);
        assert_eq!(index_map(&[], &[4, 5]), IndexMap::Zero);
        assert_eq!(index_map(&[5], &[4, 5]), IndexMap::Rem(5));
        assert_eq!(index_map(&[1, 3, 5], &[2, 3, 5]), IndexMap::Rem(15));
        assert_eq!(index_map(&[4, 1], &[4, 5]), IndexMap::Div(5));
        assert_eq!(index_map(&[2, 1, 5], &[2, 3, 5]), IndexMap::Axes(vec![(5, 1), (3, 0), (2, 5)]));
    }

    #[test]
    fn matmul_groups_are_unsupported() {
        let mut b = Builder::new("mm");
        let x = b.input("x", Type::f32(vec![2, 3])).unwrap();
        let w = b.input("w", Type::f32(vec![3, 4])).unwrap();
        let y = b.matmul(x, w, false, false).unwrap();
        b.output(ir::OutputKind::Logits, y);
        let g = b.finish();
        let k = Kernel { name: "matmul".into(), nodes: vec![y] };
        assert_eq!(LoopNest::from_group(&g, &k), Err(LoopError::Unsupported("matmul".into())));
    }

    #[test]
    fn constants_fold_and_outputs_follow_inputs() {
        let mut b = Builder::new("c");
        let x = b.input("x", Type::f32(vec![2, 3])).unwrap();
        let c = b.constant(2.0, Type::f32(Vec::<usize>::new())).unwrap();
        let y = b.mul(x, c).unwrap();
        let z = b.neg(y).unwrap();
        b.output(ir::OutputKind::Logits, z);
        let g = b.finish();
        let nest = LoopNest::from_group(&g, &Kernel { name: "elementwise:a.b".into(), nodes: vec![y, z] }).unwrap();
        assert_eq!(nest.n_inputs, 1);
        assert_eq!(nest.buffers.len(), 2);
        assert_eq!(nest.buffers[1].value, z);
        assert_eq!(nest.iteration, Iteration::Elements { len: 6 });
        assert_eq!(nest.symbol(), "tunec_elementwise_a_b");
        assert!(nest.exprs.iter().any(|e| matches!(e.op, ExprOp::Scalar { value, .. } if value == 2.0)));
    }
}
