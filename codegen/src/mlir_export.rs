//! MLIR export: a training-step graph as one `func.func` in upstream dialects (linalg, tensor, arith, math, func);
//! ops with no upstream equivalent become calls to declared private functions `@tunec.<op>`.
//!
//! The function's arguments are the graph's params and inputs in node order, each with `tunec.name` and `tunec.role`
//! argument attributes (NF4 params also carry `tunec.nf4 = {shape, block, double_quant}`); its results are the
//! graph's outputs, listed by kind and name in the `tunec.outputs` function attribute.
//!
//! Types: f32/bf16/f16/i32 tensors are `tensor<AxBxf32>` (rank 0: `tensor<f32>`). An NF4 tensor is passed as its
//! storage blob, `tensor<BYTESxi8>` (packed codes + block scales, [`ir::DType::storage_bytes`]), and only the
//! external functions read it.
//!
//! Each op kind that has no upstream equivalent gets one private declaration whose types keep every dimension its
//! call sites agree on (`?` for the others, `*` where ranks differ); call sites `tensor.cast` to and from it, and
//! each call carries the op's attributes as `tunec.attrs = {...}`. [`lowering`] says how each kind is exported.
//!
//! The module is built as MLIR text, parsed and verified by MLIR through melior, and printed back by MLIR.

use std::collections::BTreeMap;
use std::fmt::Write;

use ir::{DType, Graph, Op, OpKind, OutputKind, Type, ValueId};
use melior::ir::operation::OperationLike;
use melior::ir::Module;

use crate::mlir::{context_with_all_dialects, Diagnostics};
use crate::CodegenError;

/// How one op kind is exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lowering {
    /// A function argument (params and inputs).
    Argument,
    /// Ops of upstream dialects; the text names them.
    Standard(&'static str),
    /// A `func.call` to the private declaration `@tunec.<mnemonic>`.
    External,
}

/// How `kind` is exported (the emitter's arms agree with this table; tests check it).
pub fn lowering(kind: OpKind) -> Lowering {
    use Lowering::{Argument, External, Standard};
    match kind {
        OpKind::Param | OpKind::Input => Argument,
        OpKind::Const => Standard("arith.constant dense splat"),
        OpKind::Reshape => Standard("tensor.collapse_shape / tensor.expand_shape"),
        OpKind::Transpose => Standard("linalg.transpose"),
        OpKind::Concat => Standard("tensor.concat"),
        OpKind::Slice => Standard("tensor.extract_slice"),
        OpKind::BroadcastTo => Standard("linalg.broadcast (stretched unit dims collapsed first)"),
        OpKind::SumTo => Standard("linalg.reduce + tensor.expand_shape"),
        OpKind::Cast => Standard("linalg.generic { arith.extf / arith.truncf }"),
        OpKind::Add => Standard("linalg.generic { arith.addf }"),
        OpKind::Sub => Standard("linalg.generic { arith.subf }"),
        OpKind::Mul => Standard("linalg.generic { arith.mulf }"),
        OpKind::Div => Standard("linalg.generic { arith.divf }"),
        OpKind::Minimum => Standard("linalg.generic { arith.minnumf }"),
        OpKind::Maximum => Standard("linalg.generic { arith.maxnumf }"),
        OpKind::Neg => Standard("linalg.generic { arith.negf }"),
        OpKind::Exp => Standard("linalg.generic { math.exp }"),
        OpKind::Log => Standard("linalg.generic { math.log }"),
        OpKind::Sqrt => Standard("linalg.generic { math.sqrt }"),
        OpKind::Rsqrt => Standard("linalg.generic { math.rsqrt }"),
        OpKind::Sigmoid => Standard("linalg.generic { arith, math.exp }"),
        OpKind::Silu => Standard("linalg.generic { arith, math.exp }"),
        OpKind::SiluBwd => Standard("linalg.generic { arith, math.exp }"),
        OpKind::Swiglu => Standard("linalg.generic { arith, math.exp }"),
        OpKind::Scale => Standard("linalg.generic { arith.mulf by a constant }"),
        OpKind::StopGradient => Standard("identity (the input value is forwarded)"),
        OpKind::Sum => Standard("linalg.reduce (+ tensor.expand_shape for keepdim)"),
        OpKind::MatMul => Standard("linalg.matmul / linalg.batch_matmul with indexing maps for transposes"),
        OpKind::Embedding => Standard("linalg.generic { tensor.extract } (gather)"),
        OpKind::Softmax => Standard("linalg.softmax"),
        OpKind::SoftmaxBwd => Standard("linalg.generic + linalg.reduce"),
        OpKind::AdamWMoment => Standard("linalg.generic { arith }"),
        OpKind::AdamWUpdate => Standard("linalg.generic { arith, math.powf, math.sqrt }"),
        OpKind::EmbeddingBwd
        | OpKind::RmsNorm
        | OpKind::RmsNormBwdX
        | OpKind::RmsNormBwdW
        | OpKind::Rope
        | OpKind::Attention
        | OpKind::AttentionBwd
        | OpKind::CrossEntropy
        | OpKind::CrossEntropyBwd
        | OpKind::Nf4Quantize
        | OpKind::Nf4Dequantize
        | OpKind::QMatMul
        | OpKind::LoraLinear
        | OpKind::LinearCrossEntropy
        | OpKind::LinearCrossEntropyBwd
        | OpKind::Dropout => External,
    }
}

/// The symbol of the private declaration for an external op kind (the first signature group; further groups, for
/// call sites whose element types differ, get `.1`, `.2`, ...).
pub fn external_symbol(kind: OpKind) -> String {
    format!("tunec.{}", kind.mnemonic())
}

/// Exports `g` (usually the optimized training step) as an MLIR module with one `func.func` named after the graph,
/// verified by MLIR; returns the module as MLIR prints it.
pub fn export_mlir(g: &Graph) -> Result<String, CodegenError> {
    let text = module_text(g)?;
    let context = context_with_all_dialects();
    let diagnostics = Diagnostics::attach(&context);
    let module = Module::parse(&context, &text)
        .ok_or_else(|| CodegenError::Mlir { stage: "parse export", message: diagnostics.take("could not parse") })?;
    if !module.as_operation().verify() {
        return Err(CodegenError::Mlir {
            stage: "verify export",
            message: diagnostics.take("module failed to verify"),
        });
    }
    Ok(module.as_operation().to_string())
}

/// The module text before MLIR has seen it (what [`export_mlir`] parses and verifies).
pub fn module_text(g: &Graph) -> Result<String, CodegenError> {
    let mut e = Emitter { g, lines: Vec::new(), next_tmp: 0, names: Vec::with_capacity(g.nodes.len()), calls: vec![] };
    for v in g.ids() {
        let name = e.node(v)?;
        e.names.push(name);
    }
    let decls = e.place_calls();

    let mut out = String::new();
    let _ = writeln!(out, "module attributes {{tunec.graph = {}}} {{", mlir_str(&g.name));
    for d in &decls {
        let _ = writeln!(out, "  {d}");
    }
    let mut args = Vec::new();
    for v in g.ids() {
        let n = g.node(v);
        let attrs = match &n.op {
            Op::Param { name, role, init } => {
                let mut a = format!(
                    "tunec.name = {}, tunec.role = {}, tunec.init = {}",
                    mlir_str(name),
                    mlir_str(&attr_text(role)),
                    mlir_str(&attr_text(init))
                );
                if let DType::Nf4(f) = n.ty.dtype {
                    let _ = write!(
                        a,
                        ", tunec.nf4 = {{shape = {}, block = {} : i64, double_quant = {} : i64}}",
                        i64_array(&n.ty.shape),
                        f.block,
                        f.double_quant.unwrap_or(0)
                    );
                }
                a
            }
            Op::Input { name } => format!("tunec.name = {}, tunec.role = \"input\"", mlir_str(name)),
            _ => continue,
        };
        args.push(format!("%v{}: {} {{{attrs}}}", v.0, tensor_ty(&n.ty)));
    }
    let result_tys: Vec<String> = g.outputs.iter().map(|o| tensor_ty(g.ty(o.value))).collect();
    let outputs: Vec<String> = g.outputs.iter().map(|o| output_attr(&o.kind)).collect();
    let _ = write!(out, "  func.func @{}({})", symbol_name(&g.name), args.join(", "));
    if !result_tys.is_empty() {
        let _ = write!(out, " -> ({})", result_tys.join(", "));
    }
    let _ = writeln!(out, " attributes {{tunec.outputs = [{}]}} {{", outputs.join(", "));
    for l in &e.lines {
        let _ = writeln!(out, "    {l}");
    }
    if g.outputs.is_empty() {
        let _ = writeln!(out, "    return");
    } else {
        let vals: Vec<&str> = g.outputs.iter().map(|o| e.names[o.value.index()].as_str()).collect();
        let _ = writeln!(out, "    return {} : {}", vals.join(", "), result_tys.join(", "));
    }
    out.push_str("  }\n}\n");
    Ok(out)
}

/// `tiny.qlora` → `tiny_qlora`: letters, digits and `_` are kept, anything else becomes `_`.
pub fn symbol_name(graph_name: &str) -> String {
    let mut s: String =
        graph_name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if s.is_empty() {
        s.push_str("train_step");
    } else if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

// ---- the emitter ----------------------------------------------------------------------------------------------------

/// One external call site, rendered once every call site of its kind is known.
struct CallSite {
    line: usize,
    node: ValueId,
}

struct Emitter<'g> {
    g: &'g Graph,
    /// Function body, one op (or region line) per entry.
    lines: Vec<String>,
    next_tmp: usize,
    /// The SSA value holding each node's result (identities forward their input's name).
    names: Vec<String>,
    calls: Vec<CallSite>,
}

/// Element type and shape of an operand, as the emitter needs them.
#[derive(Clone, Copy)]
struct Operand<'a> {
    name: &'a str,
    shape: &'a [usize],
    elem: &'static str,
}

impl<'g> Emitter<'g> {
    fn tmp(&mut self) -> String {
        self.next_tmp += 1;
        format!("%t{}", self.next_tmp - 1)
    }

    fn line(&mut self, s: String) {
        self.lines.push(s);
    }

    /// Emits node `v`; returns the SSA value holding its result.
    fn node(&mut self, v: ValueId) -> Result<String, CodegenError> {
        let g = self.g;
        let n = g.node(v);
        let out = format!("%v{}", v.0);
        let ins: Vec<String> = n.inputs.iter().map(|i| self.names[i.index()].clone()).collect();
        let opnd = |k: usize| Operand { name: &ins[k], shape: &g.ty(n.inputs[k]).shape, elem: elem(g.ty(n.inputs[k])) };
        let (shape, el) = (&n.ty.shape[..], elem(&n.ty));
        let unary = |e: &mut Self, body: &dyn Fn(&mut Self, &str) -> String| {
            e.generic(&out, shape, el, &[opnd(0)], |e, a| body(e, &a[0]));
        };
        let binary = |e: &mut Self, body: &dyn Fn(&mut Self, &str, &str) -> String| {
            e.generic(&out, shape, el, &[opnd(0), opnd(1)], |e, a| body(e, &a[0], &a[1]));
        };
        match &n.op {
            Op::Param { .. } | Op::Input { .. } => return Ok(out),
            Op::Const { value } => {
                let lit = scalar_lit(*value, el);
                self.line(format!("{out} = arith.constant dense<{lit}> : {}", tensor_ty(&n.ty)));
            }
            Op::Reshape { shape: to } => return Ok(self.reshape(&out, opnd(0), to)),
            Op::Transpose { perm } => {
                let e = self.empty(shape, el);
                let x = opnd(0);
                self.line(format!(
                    "{out} = linalg.transpose ins({} : {}) outs({e} : {}) permutation = [{}]",
                    x.name,
                    shaped(x.shape, x.elem),
                    shaped(shape, el),
                    join(perm)
                ));
            }
            Op::Concat { axis } => {
                let tys: Vec<String> = n.inputs.iter().map(|&i| tensor_ty(g.ty(i))).collect();
                self.line(format!(
                    "{out} = tensor.concat dim({axis}) {} : ({}) -> {}",
                    ins.join(", "),
                    tys.join(", "),
                    tensor_ty(&n.ty)
                ));
            }
            Op::Slice { axis, start, .. } => {
                let x = opnd(0);
                let offsets: Vec<usize> = (0..x.shape.len()).map(|d| if d == *axis { *start } else { 0 }).collect();
                self.line(format!(
                    "{out} = tensor.extract_slice {}[{}] [{}] [{}] : {} to {}",
                    x.name,
                    join(&offsets),
                    join(shape),
                    join(&vec![1; shape.len()]),
                    shaped(x.shape, x.elem),
                    tensor_ty(&n.ty)
                ));
            }
            Op::BroadcastTo { .. } => return Ok(self.broadcast(&out, opnd(0), shape)),
            Op::SumTo { .. } => {
                let x = opnd(0);
                let lead = x.shape.len() - shape.len();
                let axes: Vec<usize> =
                    (0..x.shape.len()).filter(|&j| j < lead || (shape[j - lead] == 1 && x.shape[j] != 1)).collect();
                if axes.is_empty() {
                    return Ok(self.reshape(&out, x, shape));
                }
                let reduced_shape: Vec<usize> =
                    (0..x.shape.len()).filter(|j| !axes.contains(j)).map(|j| x.shape[j]).collect();
                let r = self.tmp();
                self.reduce_sum(&r, x, &axes);
                return Ok(self.reshape(&out, Operand { name: &r, shape: &reduced_shape, elem: x.elem }, shape));
            }
            Op::Cast { .. } => {
                if opnd(0).elem == el {
                    return Ok(ins[0].clone());
                }
                let from = opnd(0).elem;
                unary(self, &|e, a| e.convert(a, from, el));
            }
            Op::Add {} => binary(self, &|e, a, b| e.op2("arith.addf", a, b, el)),
            Op::Sub {} => binary(self, &|e, a, b| e.op2("arith.subf", a, b, el)),
            Op::Mul {} => binary(self, &|e, a, b| e.op2("arith.mulf", a, b, el)),
            Op::Div {} => binary(self, &|e, a, b| e.op2("arith.divf", a, b, el)),
            Op::Minimum {} => binary(self, &|e, a, b| e.op2("arith.minnumf", a, b, el)),
            Op::Maximum {} => binary(self, &|e, a, b| e.op2("arith.maxnumf", a, b, el)),
            Op::Neg {} => unary(self, &|e, a| e.op1("arith.negf", a, el)),
            Op::Exp {} => unary(self, &|e, a| e.op1("math.exp", a, el)),
            Op::Log {} => unary(self, &|e, a| e.op1("math.log", a, el)),
            Op::Sqrt {} => unary(self, &|e, a| e.op1("math.sqrt", a, el)),
            Op::Rsqrt {} => unary(self, &|e, a| e.op1("math.rsqrt", a, el)),
            Op::Sigmoid {} => unary(self, &|e, a| e.sigmoid(a, el)),
            Op::Silu {} => unary(self, &|e, a| {
                let s = e.sigmoid(a, el);
                e.op2("arith.mulf", a, &s, el)
            }),
            Op::SiluBwd {} => binary(self, &|e, dy, x| {
                // dy · σ(x) · (1 + x·(1 − σ(x)))
                let s = e.sigmoid(x, el);
                let one = e.constant(1.0, el);
                let one_minus_s = e.op2("arith.subf", &one, &s, el);
                let t = e.op2("arith.mulf", x, &one_minus_s, el);
                let t = e.op2("arith.addf", &one, &t, el);
                let ds = e.op2("arith.mulf", dy, &s, el);
                e.op2("arith.mulf", &ds, &t, el)
            }),
            Op::Swiglu {} => binary(self, &|e, gate, up| {
                let s = e.sigmoid(gate, el);
                let silu = e.op2("arith.mulf", gate, &s, el);
                e.op2("arith.mulf", &silu, up, el)
            }),
            Op::Scale { c } => {
                let c = *c;
                unary(self, &move |e, a| {
                    let k = e.constant(c, el);
                    e.op2("arith.mulf", a, &k, el)
                })
            }
            Op::StopGradient {} => return Ok(ins[0].clone()),
            Op::Sum { axes, keepdim } => {
                let x = opnd(0);
                if axes.is_empty() {
                    return Ok(ins[0].clone());
                }
                if !keepdim {
                    self.reduce_sum(&out, x, axes);
                } else {
                    let reduced_shape: Vec<usize> =
                        (0..x.shape.len()).filter(|j| !axes.contains(j)).map(|j| x.shape[j]).collect();
                    let r = self.tmp();
                    self.reduce_sum(&r, x, axes);
                    return Ok(self.reshape(&out, Operand { name: &r, shape: &reduced_shape, elem: x.elem }, shape));
                }
            }
            Op::MatMul { ta, tb } => self.matmul(&out, opnd(0), opnd(1), *ta, *tb, shape, el),
            Op::Embedding {} => {
                let (table, ids) = (opnd(0), opnd(1));
                let d = ids.shape.len();
                // out[i.., j] = table[ids[i..], j]: the ids are indexed by the leading output dims.
                let ids_map: Vec<String> = (0..d).map(|i| format!("d{i}")).collect();
                self.generic_with_maps(&out, shape, el, &[ids], &[ids_map], |e, a| {
                    let i = e.tmp();
                    e.line(format!("  {i} = arith.index_cast {} : {} to index", a[0], ids.elem));
                    let j = e.tmp();
                    e.line(format!("  {j} = linalg.index {d} : index"));
                    let x = e.tmp();
                    e.line(format!(
                        "  {x} = tensor.extract {}[{i}, {j}] : {}",
                        table.name,
                        shaped(table.shape, table.elem)
                    ));
                    x
                });
            }
            Op::Softmax {} => {
                let x = opnd(0);
                let e = self.empty(shape, el);
                let ty = shaped(shape, el);
                self.line(format!(
                    "{out} = linalg.softmax dimension({}) ins({} : {ty}) outs({e} : {ty}) -> {ty}",
                    shape.len().saturating_sub(1),
                    x.name
                ));
            }
            Op::SoftmaxBwd {} => {
                // y ⊙ (dy − Σ_last dy⊙y)
                let (dy, y) = (opnd(0), opnd(1));
                let prod = self.tmp();
                self.generic(&prod, shape, el, &[dy, y], |e, a| e.op2("arith.mulf", &a[0], &a[1], el));
                let last = shape.len() - 1;
                let dot = self.tmp();
                self.reduce_sum(&dot, Operand { name: &prod, shape, elem: el }, &[last]);
                let mut kept = shape.to_vec();
                kept[last] = 1;
                let dot_shape = &shape[..last];
                let dot_k = self.tmp();
                let dot_k = self.reshape(&dot_k, Operand { name: &dot, shape: dot_shape, elem: el }, &kept);
                self.generic(&out, shape, el, &[dy, y, Operand { name: &dot_k, shape: &kept, elem: el }], |e, a| {
                    let d = e.op2("arith.subf", &a[0], &a[2], el);
                    e.op2("arith.mulf", &a[1], &d, el)
                });
            }
            Op::AdamWMoment { beta, square } => {
                let (beta, square) = (*beta, *square);
                binary(self, &move |e, m, g| {
                    let b = e.constant(beta, el);
                    let one_minus_b = e.constant(1.0 - beta, el);
                    let x = if square { e.op2("arith.mulf", g, g, el) } else { g.to_string() };
                    let bm = e.op2("arith.mulf", &b, m, el);
                    let bx = e.op2("arith.mulf", &one_minus_b, &x, el);
                    e.op2("arith.addf", &bm, &bx, el)
                })
            }
            Op::AdamWUpdate { beta1, beta2, eps, weight_decay } => {
                let (beta1, beta2, eps, wd) = (*beta1, *beta2, *eps, *weight_decay);
                let operands = [opnd(0), opnd(1), opnd(2), opnd(3), opnd(4)];
                let (lr_elem, step_elem) = (operands[3].elem, operands[4].elem);
                self.generic(&out, shape, el, &operands, |e, a| {
                    // p·(1 − lr·wd) − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + eps)
                    let (p, m, v) = (&a[0], &a[1], &a[2]);
                    let lr = e.convert(&a[3], lr_elem, el);
                    let t = e.tmp();
                    e.line(format!("  {t} = arith.sitofp {} : {step_elem} to {el}", a[4]));
                    let one = e.constant(1.0, el);
                    let b1 = e.constant(beta1, el);
                    let b2 = e.constant(beta2, el);
                    let b1t = e.op2("math.powf", &b1, &t, el);
                    let bc1 = e.op2("arith.subf", &one, &b1t, el);
                    let b2t = e.op2("math.powf", &b2, &t, el);
                    let bc2 = e.op2("arith.subf", &one, &b2t, el);
                    let bc2_sqrt = e.op1("math.sqrt", &bc2, el);
                    let wdc = e.constant(wd, el);
                    let lr_wd = e.op2("arith.mulf", &lr, &wdc, el);
                    let keep = e.op2("arith.subf", &one, &lr_wd, el);
                    let decayed = e.op2("arith.mulf", p, &keep, el);
                    let step_size = e.op2("arith.divf", &lr, &bc1, el);
                    let v_sqrt = e.op1("math.sqrt", v, el);
                    let denom = e.op2("arith.divf", &v_sqrt, &bc2_sqrt, el);
                    let epsc = e.constant(eps, el);
                    let denom = e.op2("arith.addf", &denom, &epsc, el);
                    let upd = e.op2("arith.mulf", &step_size, m, el);
                    let upd = e.op2("arith.divf", &upd, &denom, el);
                    e.op2("arith.subf", &decayed, &upd, el)
                });
            }
            Op::EmbeddingBwd { .. }
            | Op::RmsNorm { .. }
            | Op::RmsNormBwdX { .. }
            | Op::RmsNormBwdW { .. }
            | Op::Rope { .. }
            | Op::Attention { .. }
            | Op::AttentionBwd { .. }
            | Op::CrossEntropy { .. }
            | Op::CrossEntropyBwd { .. }
            | Op::Nf4Quantize { .. }
            | Op::Nf4Dequantize {}
            | Op::QMatMul { .. }
            | Op::LoraLinear { .. }
            | Op::LinearCrossEntropy { .. }
            | Op::LinearCrossEntropyBwd { .. }
            | Op::Dropout { .. } => {
                self.calls.push(CallSite { line: self.lines.len(), node: v });
                self.line(String::new());
            }
        }
        Ok(out)
    }

    // ---- building blocks --------------------------------------------------------------------------------------------

    fn empty(&mut self, shape: &[usize], el: &str) -> String {
        let e = self.tmp();
        self.line(format!("{e} = tensor.empty() : {}", shaped(shape, el)));
        e
    }

    /// A tensor of zeros (accumulator of matmuls and reductions).
    fn zeros(&mut self, shape: &[usize], el: &'static str) -> String {
        let e = self.empty(shape, el);
        let z = self.constant(0.0, el);
        let f = self.tmp();
        let ty = shaped(shape, el);
        self.line(format!("{f} = linalg.fill ins({z} : {el}) outs({e} : {ty}) -> {ty}"));
        f
    }

    fn constant(&mut self, v: f64, el: &str) -> String {
        let c = self.tmp();
        self.line(format!("  {c} = arith.constant {} : {el}", scalar_lit(v, el)));
        c
    }

    fn op1(&mut self, op: &str, a: &str, el: &str) -> String {
        let r = self.tmp();
        self.line(format!("  {r} = {op} {a} : {el}"));
        r
    }

    fn op2(&mut self, op: &str, a: &str, b: &str, el: &str) -> String {
        let r = self.tmp();
        self.line(format!("  {r} = {op} {a}, {b} : {el}"));
        r
    }

    /// σ(x) = 1/(1+e⁻ˣ)
    fn sigmoid(&mut self, x: &str, el: &str) -> String {
        let n = self.op1("arith.negf", x, el);
        let ex = self.op1("math.exp", &n, el);
        let one = self.constant(1.0, el);
        let d = self.op2("arith.addf", &one, &ex, el);
        self.op2("arith.divf", &one, &d, el)
    }

    /// Converts a scalar between element types (floats by extf/truncf, i32 by sitofp).
    fn convert(&mut self, x: &str, from: &str, to: &str) -> String {
        if from == to {
            return x.to_string();
        }
        let width = |t: &str| match t {
            "f64" => 64,
            "f32" => 32,
            _ => 16,
        };
        let r = self.tmp();
        if from == "i32" {
            self.line(format!("  {r} = arith.sitofp {x} : {from} to {to}"));
        } else if width(from) == width(to) {
            // bf16 ↔ f16 goes through f32.
            let wide = self.convert(x, from, "f32");
            return self.convert(&wide, "f32", to);
        } else if width(from) < width(to) {
            self.line(format!("  {r} = arith.extf {x} : {from} to {to}"));
        } else {
            self.line(format!("  {r} = arith.truncf {x} : {from} to {to}"));
        }
        r
    }

    /// An elementwise `linalg.generic` with numpy broadcasting: operands align to the right, and a unit dim that
    /// the output stretches is indexed by the constant 0. `body` gets the block arguments of the operands and returns
    /// the value to yield.
    fn generic(
        &mut self,
        out: &str,
        shape: &[usize],
        el: &str,
        operands: &[Operand],
        body: impl FnOnce(&mut Self, &[String]) -> String,
    ) {
        let rank = shape.len();
        let maps: Vec<Vec<String>> = operands
            .iter()
            .map(|o| {
                let r = o.shape.len();
                (0..r)
                    .map(|i| {
                        let j = rank - r + i;
                        if o.shape[i] == 1 && shape[j] != 1 {
                            "0".to_string()
                        } else {
                            format!("d{j}")
                        }
                    })
                    .collect()
            })
            .collect();
        self.generic_with_maps(out, shape, el, operands, &maps, body)
    }

    /// A parallel `linalg.generic` whose operand `i` is indexed by the expressions `maps[i]` over the output dims
    /// `d0, d1, ...`.
    fn generic_with_maps(
        &mut self,
        out: &str,
        shape: &[usize],
        el: &str,
        operands: &[Operand],
        maps: &[Vec<String>],
        body: impl FnOnce(&mut Self, &[String]) -> String,
    ) {
        let e = self.empty(shape, el);
        let rank = shape.len();
        let dims: Vec<String> = (0..rank).map(|d| format!("d{d}")).collect();
        let dims = dims.join(", ");
        let mut maps: Vec<String> =
            maps.iter().map(|exprs| format!("affine_map<({dims}) -> ({})>", exprs.join(", "))).collect();
        maps.push(format!("affine_map<({dims}) -> ({dims})>"));
        let iters = vec!["\"parallel\""; rank].join(", ");
        let names: Vec<&str> = operands.iter().map(|o| o.name).collect();
        let tys: Vec<String> = operands.iter().map(|o| shaped(o.shape, o.elem)).collect();
        let ty = shaped(shape, el);
        self.line(format!(
            "{out} = linalg.generic {{indexing_maps = [{}], iterator_types = [{iters}]}} ins({} : {}) outs({e} : {ty}) {{",
            maps.join(", "),
            names.join(", "),
            tys.join(", ")
        ));
        let args: Vec<String> = operands.iter().map(|_| self.tmp()).collect();
        let acc = self.tmp();
        let mut params: Vec<String> = operands.iter().zip(&args).map(|(o, a)| format!("{a}: {}", o.elem)).collect();
        params.push(format!("{acc}: {el}"));
        self.line(format!("^bb0({}):", params.join(", ")));
        let r = body(self, &args);
        self.line(format!("  linalg.yield {r} : {el}"));
        self.line(format!("}} -> {ty}"));
    }

    /// Σ of `x` over `axes` (dropped from the shape) with `linalg.reduce`.
    fn reduce_sum(&mut self, out: &str, x: Operand, axes: &[usize]) {
        let kept: Vec<usize> = (0..x.shape.len()).filter(|j| !axes.contains(j)).map(|j| x.shape[j]).collect();
        let init = self.zeros(&kept, x.elem);
        let (a, b) = (self.tmp(), self.tmp());
        self.line(format!(
            "{out} = linalg.reduce ins({} : {}) outs({init} : {}) dimensions = [{}]",
            x.name,
            shaped(x.shape, x.elem),
            shaped(&kept, x.elem),
            join(axes)
        ));
        self.line(format!("  ({a}: {el}, {b}: {el}) {{", el = x.elem));
        let s = self.op2("arith.addf", &a, &b, x.elem);
        self.line(format!("    linalg.yield {s} : {}", x.elem));
        self.line("  }".to_string());
    }

    /// `x` with a new shape: one `tensor.collapse_shape` or `tensor.expand_shape` where the dims group, else a
    /// collapse to 1-D then an expand. Returns the value holding the result (`x` itself when the shape is equal).
    fn reshape(&mut self, out: &str, x: Operand, to: &[usize]) -> String {
        if x.shape == to {
            return x.name.to_string();
        }
        if let Some(groups) = group_dims(x.shape, to) {
            self.line(format!(
                "{out} = tensor.collapse_shape {} {} : {} into {}",
                x.name,
                reassociation(&groups),
                shaped(x.shape, x.elem),
                shaped(to, x.elem)
            ));
        } else if let Some(groups) = group_dims(to, x.shape) {
            self.line(format!(
                "{out} = tensor.expand_shape {} {} output_shape [{}] : {} into {}",
                x.name,
                reassociation(&groups),
                join(to),
                shaped(x.shape, x.elem),
                shaped(to, x.elem)
            ));
        } else {
            let flat = [x.shape.iter().product::<usize>()];
            let t = self.tmp();
            let t = self.reshape(&t, x, &flat);
            return self.reshape(out, Operand { name: &t, shape: &flat, elem: x.elem }, to);
        }
        out.to_string()
    }

    /// numpy broadcast of `x` to `shape`: unit dims that stretch are collapsed away, then `linalg.broadcast` adds the
    /// missing dims.
    fn broadcast(&mut self, out: &str, x: Operand, shape: &[usize]) -> String {
        let lead = shape.len() - x.shape.len();
        let kept: Vec<usize> = (0..x.shape.len()).filter(|&i| !(x.shape[i] == 1 && shape[lead + i] != 1)).collect();
        let kept_shape: Vec<usize> = kept.iter().map(|&i| x.shape[i]).collect();
        if kept_shape == shape {
            return self.reshape(out, x, shape);
        }
        let added: Vec<usize> = (0..shape.len()).filter(|j| !kept.iter().any(|&i| lead + i == *j)).collect();
        let k = self.tmp();
        let k = self.reshape(&k, x, &kept_shape);
        let e = self.empty(shape, x.elem);
        self.line(format!(
            "{out} = linalg.broadcast ins({k} : {}) outs({e} : {}) dimensions = [{}]",
            shaped(&kept_shape, x.elem),
            shaped(shape, x.elem),
            join(&added)
        ));
        out.to_string()
    }

    /// op(a)·op(b) as `linalg.matmul` (rank 2) or `linalg.batch_matmul` (rank 3); transposes are indexing maps.
    #[allow(clippy::too_many_arguments)]
    fn matmul(&mut self, out: &str, a: Operand, b: Operand, ta: bool, tb: bool, shape: &[usize], el: &'static str) {
        let acc = self.zeros(shape, el);
        let (op, dims, batch) = if shape.len() == 3 {
            ("linalg.batch_matmul", "d0, d1, d2, d3", "d0, ")
        } else {
            ("linalg.matmul", "d1, d2, d3", "")
        };
        // d1 = m, d2 = n, d3 = k
        let am = if ta { "d3, d1" } else { "d1, d3" };
        let bm = if tb { "d2, d3" } else { "d3, d2" };
        let ty = shaped(shape, el);
        self.line(format!(
            "{out} = {op} indexing_maps = [affine_map<({dims}) -> ({batch}{am})>, affine_map<({dims}) -> ({batch}{bm})>, \
             affine_map<({dims}) -> ({batch}d1, d2)>] ins({}, {} : {}, {}) outs({acc} : {ty}) -> {ty}",
            a.name,
            b.name,
            shaped(a.shape, a.elem),
            shaped(b.shape, b.elem),
        ));
    }

    // ---- external calls -------------------------------------------------------------------------------------------

    /// Fills in every external call site and returns the private declarations.
    fn place_calls(&mut self) -> Vec<String> {
        let g = self.g;
        // Group call sites by kind and element types; each group is one declaration.
        type Key = (OpKind, Vec<&'static str>);
        let mut groups: BTreeMap<Key, Vec<usize>> = BTreeMap::new();
        for (i, c) in self.calls.iter().enumerate() {
            let n = g.node(c.node);
            let mut elems: Vec<&'static str> = n.inputs.iter().map(|&v| elem(g.ty(v))).collect();
            elems.push(elem(&n.ty));
            groups.entry((n.op.kind(), elems)).or_default().push(i);
        }
        let mut decls = Vec::new();
        let mut per_kind: BTreeMap<OpKind, usize> = BTreeMap::new();
        let calls = std::mem::take(&mut self.calls);
        for ((kind, elems), sites) in groups {
            let k = per_kind.entry(kind).or_default();
            let sym = if *k == 0 { external_symbol(kind) } else { format!("{}.{k}", external_symbol(kind)) };
            *k += 1;
            // Every position's shapes over the call sites (inputs then the result).
            let arity = elems.len();
            let shapes = |pos: usize| -> Vec<Vec<usize>> {
                sites
                    .iter()
                    .map(|&s| {
                        let n = g.node(calls[s].node);
                        let ty = if pos + 1 == arity { &n.ty } else { g.ty(n.inputs[pos]) };
                        storage_shape(ty)
                    })
                    .collect()
            };
            let decl_tys: Vec<String> = (0..arity).map(|p| general_ty(&shapes(p), elems[p])).collect();
            let (params, result) = decl_tys.split_at(arity - 1);
            decls.push(format!("func.func private @{sym}({}) -> {}", params.join(", "), result[0]));
            for &s in &sites {
                let text = self.call_text(calls[s].node, &sym, params, &result[0]);
                self.lines[calls[s].line] = text;
            }
        }
        decls
    }

    fn call_text(&mut self, v: ValueId, sym: &str, params: &[String], result: &str) -> String {
        let g = self.g;
        let n = g.node(v);
        let mut text = String::new();
        let mut args = Vec::new();
        for (i, &x) in n.inputs.iter().enumerate() {
            let ty = tensor_ty(g.ty(x));
            let name = self.names[x.index()].clone();
            if ty == params[i] {
                args.push(name);
            } else {
                let t = self.tmp();
                let _ = writeln!(text, "{t} = tensor.cast {name} : {ty} to {}", params[i]);
                args.push(t);
            }
        }
        let attrs: Vec<String> = n.op.attrs().iter().map(|(k, v)| format!("{k} = {}", attr_value(v))).collect();
        let out_ty = tensor_ty(&n.ty);
        let res = if out_ty == result { format!("%v{}", v.0) } else { self.tmp() };
        let _ = write!(
            text,
            "{res} = func.call @{sym}({}) {{tunec.attrs = {{{}}}}} : ({}) -> {result}",
            args.join(", "),
            attrs.join(", "),
            params.join(", ")
        );
        if out_ty != result {
            let _ = write!(text, "\n%v{} = tensor.cast {res} : {result} to {out_ty}", v.0);
        }
        text
    }
}

// ---- types and literals ---------------------------------------------------------------------------------------------

fn elem(t: &Type) -> &'static str {
    match t.dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I32 => "i32",
        DType::Nf4(_) => "i8",
    }
}

/// The shape of the tensor that carries a value: NF4 values are their storage bytes.
fn storage_shape(t: &Type) -> Vec<usize> {
    match t.dtype {
        DType::Nf4(_) => vec![t.bytes()],
        _ => t.shape.clone(),
    }
}

fn tensor_ty(t: &Type) -> String {
    shaped(&storage_shape(t), elem(t))
}

fn shaped(shape: &[usize], el: &str) -> String {
    let mut s = String::from("tensor<");
    for d in shape {
        let _ = write!(s, "{d}x");
    }
    s.push_str(el);
    s.push('>');
    s
}

/// The declaration type for one position: dims every call site agrees on stay static, others are `?`; `*` where the
/// ranks differ.
fn general_ty(shapes: &[Vec<usize>], el: &str) -> String {
    let rank = shapes[0].len();
    if shapes.iter().any(|s| s.len() != rank) {
        return format!("tensor<*x{el}>");
    }
    let mut s = String::from("tensor<");
    for d in 0..rank {
        if shapes.iter().all(|x| x[d] == shapes[0][d]) {
            let _ = write!(s, "{}x", shapes[0][d]);
        } else {
            s.push_str("?x");
        }
    }
    s.push_str(el);
    s.push('>');
    s
}

/// How the dims of `big` group (contiguously) into the dims of `small`, if they do: `[2,8,64]` into `[16,64]` is
/// `[[0,1],[2]]`. Trailing unit dims join the last group; into a scalar, every dim must be 1.
fn group_dims(big: &[usize], small: &[usize]) -> Option<Vec<Vec<usize>>> {
    if big.len() < small.len() {
        return None;
    }
    if small.is_empty() {
        return big.iter().all(|&d| d == 1).then(Vec::new);
    }
    let mut groups = Vec::with_capacity(small.len());
    let mut i = 0;
    for &s in small {
        let (mut group, mut p) = (Vec::new(), 1usize);
        loop {
            let d = *big.get(i)?;
            p *= d;
            group.push(i);
            i += 1;
            if p == s {
                break;
            }
            if p > s || p == 0 {
                return None;
            }
        }
        groups.push(group);
    }
    while i < big.len() {
        if big[i] != 1 {
            return None;
        }
        groups.last_mut()?.push(i);
        i += 1;
    }
    Some(groups)
}

fn reassociation(groups: &[Vec<usize>]) -> String {
    let gs: Vec<String> = groups.iter().map(|g| format!("[{}]", join(g))).collect();
    format!("[{}]", gs.join(", "))
}

fn join(xs: &[usize]) -> String {
    let s: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
    s.join(", ")
}

fn i64_array(xs: &[usize]) -> String {
    if xs.is_empty() {
        "array<i64>".to_string()
    } else {
        format!("array<i64: {}>", join(xs))
    }
}

/// A scalar literal of element type `el` (integers for i32; hex bit patterns for infinities and NaN).
fn scalar_lit(v: f64, el: &str) -> String {
    match el {
        "i32" | "i8" => format!("{}", v as i64),
        "f64" => float_text(v, ["0x7FF0000000000000", "0xFFF0000000000000", "0x7FF8000000000000"], f64::MAX),
        "f16" => float_text(v, ["0x7C00", "0xFC00", "0x7E00"], 65504.0),
        "bf16" => float_text(v, ["0x7F80", "0xFF80", "0x7FC0"], f32::MAX as f64),
        _ => float_text(v, ["0x7F800000", "0xFF800000", "0x7FC00000"], f32::MAX as f64),
    }
}

/// Decimal text MLIR reads as a float (always with a `.`), or the bit pattern of ±inf/NaN; `max` is the largest
/// finite value of the type (beyond it the value is an infinity).
fn float_text(v: f64, [inf, ninf, nan]: [&str; 3], max: f64) -> String {
    if v.is_nan() {
        return nan.to_string();
    }
    if v.abs() > max {
        return if v > 0.0 { inf } else { ninf }.to_string();
    }
    let mut s = if max <= f32::MAX as f64 { format!("{:?}", v as f32) } else { format!("{v:?}") };
    if !s.contains('.') {
        match s.find('e') {
            Some(i) => s.insert_str(i, ".0"),
            None => s.push_str(".0"),
        }
    }
    s
}

/// An MLIR string literal (non-printable and non-ASCII bytes as `\XX`).
fn mlir_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\{b:02X}");
            }
        }
    }
    out.push('"');
    out
}

/// An attribute's text form in the `ir` text format.
fn attr_text(a: &impl ir::attr::Attr) -> String {
    let mut s = String::new();
    a.write(&mut s);
    s
}

/// An op attribute (in the `ir` text form) as an MLIR attribute: booleans, i64 (ui64 beyond), f64, `array<i64>`,
/// and strings for everything else (dtypes, `q`/`k`/`v`).
fn attr_value(text: &str) -> String {
    if text == "true" || text == "false" {
        return text.to_string();
    }
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        let ints: Option<Vec<usize>> =
            inner.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().ok()).collect();
        if let Some(ints) = ints {
            return i64_array(&ints);
        }
    }
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        let unescaped = inner.replace("\\n", "\n").replace("\\\"", "\"").replace("\\\\", "\\");
        return mlir_str(&unescaped);
    }
    if let Ok(i) = text.parse::<i128>() {
        return if i64::try_from(i).is_ok() { format!("{i} : i64") } else { format!("{i} : ui64") };
    }
    if let Ok(f) = text.parse::<f64>() {
        return format!("{} : f64", scalar_lit(f, "f64"));
    }
    mlir_str(text)
}

fn output_attr(kind: &OutputKind) -> String {
    match kind {
        OutputKind::Loss => "{kind = \"loss\"}".to_string(),
        OutputKind::Logits => "{kind = \"logits\"}".to_string(),
        OutputKind::Grad(n) => format!("{{kind = \"grad\", name = {}}}", mlir_str(n)),
        OutputKind::Update(n) => format!("{{kind = \"update\", name = {}}}", mlir_str(n)),
        OutputKind::Metric(n) => format!("{{kind = \"metric\", name = {}}}", mlir_str(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_group_for_collapse_and_expand() {
        assert_eq!(group_dims(&[2, 8, 64], &[16, 64]), Some(vec![vec![0, 1], vec![2]]));
        assert_eq!(group_dims(&[16, 1], &[16]), Some(vec![vec![0, 1]]));
        assert_eq!(group_dims(&[1, 64], &[64]), Some(vec![vec![0, 1]]));
        assert_eq!(group_dims(&[1, 1], &[]), Some(vec![]));
        assert_eq!(group_dims(&[4, 6], &[3, 8]), None);
        assert_eq!(group_dims(&[6], &[2, 3]), None);
    }

    #[test]
    fn literals_read_back_as_floats() {
        assert_eq!(scalar_lit(4.0, "f32"), "4.0");
        assert_eq!(scalar_lit(1e-5, "f32"), "1.0e-5");
        assert_eq!(scalar_lit(f64::NEG_INFINITY, "f32"), "0xFF800000");
        assert_eq!(scalar_lit(1e6, "f16"), "0x7C00");
        assert_eq!(scalar_lit(-3.0, "i32"), "-3");
        assert_eq!(attr_value("1e-5"), "1.0e-5 : f64");
        assert_eq!(attr_value("[0,2]"), "array<i64: 0, 2>");
        assert_eq!(attr_value("18446744073709551615"), "18446744073709551615 : ui64");
        assert_eq!(attr_value("q"), "\"q\"");
        assert_eq!(mlir_str("a\"b\n"), "\"a\\\"b\\0A\"");
        assert_eq!(symbol_name("tiny.qlora"), "tiny_qlora");
        assert_eq!(symbol_name("7b"), "_7b");
    }
}
