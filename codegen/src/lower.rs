//! Lowering of [`LoopNest`]s (elementwise and row-reduction kernel groups) to LLVM IR, for the host and for NVPTX,
//! from the one description: both targets share the expression code; only the loops around it differ.
//!
//! # Kernel ABI
//! Buffers are the nest's [`LoopNest::buffers`]: inputs first, then outputs, each a dense row-major f32 (or i32)
//! array; scalar inputs (`lr`, `step`) are one-element buffers. Constants are folded into the code. An NF4 input
//! takes one pointer per storage part ([`LoopNest::args`]: packed codes, then absmax, or absmax codes, absmax2 and
//! offset), and its loads dequantize exactly as `ir::nf4::dequantize` (the GEMM template's arithmetic).
//! - **Host** ([`emit_host`]): `void tunec_<name>(ptr args, i32 tid, i32 nthreads)`, where `args[k]` is argument
//!   `k`'s pointer. Thread `tid` of `nthreads` takes one contiguous slice of the outer iteration space (elements, or
//!   rows for row kernels); calling every `tid` in `0..nthreads` (in any order, or concurrently) runs the whole kernel.
//!   Loops are plain counted loops that LLVM's loop vectorizer vectorizes ([`optimize_host`]).
//! - **NVPTX** ([`emit_ptx`]): `.entry tunec_<name>(ptr b0, ptr b1, …)` (calling convention 71, `ptx_kernel`),
//!   one generic pointer per argument in the same order. Elementwise kernels are grid-stride loops (any grid).
//!   Row kernels take one block per row (grid-stride over rows); `blockDim.x` must be a multiple of 32 and at most
//!   1024 ([`ROW_BLOCK_THREADS`] is a good choice); reductions are warp shuffles (`llvm.nvvm.shfl.sync.bfly.f32`)
//!   then one shared-memory pass over the warps' partials.
//!
//! # Numerics
//! f32 throughout, with `exp`/`log` as Cephes-style polynomials in IR (so the host loops vectorize and the GPU needs
//! no libdevice). `scale`, `dropout`, `adamw_moment` and `adamw_update` compute in f64 and round once, as the
//! interpreter does; dropout's mask is `ir::rng` re-implemented bit for bit.

use std::collections::HashMap;

use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, InitializationConfig, RelocMode, Target, TargetMachine};
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValue, BasicValueEnum, FloatValue, FunctionValue, GlobalValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate, OptimizationLevel};
use kernels::loops::{index_map, row_input, Elem, ExprId, ExprOp, IndexMap, Iteration, LoopNest};
use kernels::Sreg;

use crate::emit::{kernel_fn, Emit, Kr, Nf4Parts, Nf4Tables, Red};
use crate::CodegenError;

/// A good `blockDim.x` for row kernels on the GPU (any multiple of 32 up to 1024 is valid).
pub const ROW_BLOCK_THREADS: u32 = 256;

/// Which machine a kernel is lowered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Host,
    Nvptx,
}

/// Adds the host function for `nest` to `module` (see the module docs for its ABI).
pub fn emit_host<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    nest: &LoopNest,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    Ok(emit(ctx, module, nest, Flavor::Host)?)
}

/// Adds the `ptx_kernel` function for `nest` to `module` (lower the module with [`crate::ptx::emit_ptx`]).
pub fn emit_ptx<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    nest: &LoopNest,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    Ok(emit(ctx, module, nest, Flavor::Nvptx)?)
}

/// PTX text for `nest` alone, for `sm`.
pub fn nest_to_ptx(nest: &LoopNest, sm: u32) -> Result<String, CodegenError> {
    let ctx = Context::create();
    let module = ctx.create_module(&nest.symbol());
    emit_ptx(&ctx, &module, nest)?;
    crate::ptx::emit_ptx(&module, sm)
}

/// Emits a GEMM's elementwise epilogue (`kernels::gemm::Epilogue`) for one output element at the builder's position:
/// `nest` evaluated at linear index `lin` with the loads of input buffer `acc` replaced by `value`, every output
/// stored (all computed before the first store). `bufs[k]` is the pointer of the nest's buffer `k` (all f32). The
/// builder `b` continues after the emitted code.
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_epilogue_element<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    func: FunctionValue<'ctx>,
    b: &Builder<'ctx>,
    nest: &LoopNest,
    bufs: Vec<PointerValue<'ctx>>,
    acc: usize,
    lin: IntValue<'ctx>,
    value: FloatValue<'ctx>,
    flavor: Flavor,
) -> Kr<()> {
    let eb = ctx.create_builder();
    eb.position_at_end(b.get_insert_block().expect("the builder is positioned"));
    let first_part = (0..nest.buffers.len()).collect();
    let mut gen = Gen {
        ctx,
        module,
        b: eb,
        func,
        nest,
        flavor,
        bufs,
        first_part,
        nf4: None,
        memo: HashMap::new(),
        stats: HashMap::new(),
        hoisted: HashMap::new(),
        seeds_ptr: None,
        seeds: vec![],
        scratch: None,
    };
    for (e, x) in nest.exprs.iter().enumerate() {
        if x.op == (ExprOp::Load { buffer: acc }) {
            gen.memo.insert((e, lin), value.into());
        }
    }
    gen.store_all(Ix { lin, rc: None }, |_| true)?;
    b.position_at_end(gen.b.get_insert_block().expect("the epilogue builder is positioned"));
    Ok(())
}

/// A target machine for the CPU we run on, with its features (AVX2, AVX-512, … where present).
pub fn host_target_machine() -> Result<TargetMachine, CodegenError> {
    Target::initialize_native(&InitializationConfig::default()).map_err(CodegenError::Jit)?;
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple)
        .map_err(|e| CodegenError::Llvm { stage: "host target", message: e.to_string() })?;
    let cpu = TargetMachine::get_host_cpu_name().to_string();
    let features = TargetMachine::get_host_cpu_features().to_string();
    target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| CodegenError::Llvm { stage: "host target", message: format!("no target machine for {cpu}") })
}

/// Sets the host triple and data layout on `module`, verifies it and runs `default<O2>` (which vectorizes the loops).
/// O2, not O3: on the SmolLM2 LoRA step the host code is as fast (3.95 vs 3.99 s per step, within run-to-run noise)
/// and the host compile of the 7B plan takes 1.3 instead of 2.1 CPU-seconds (docs/decisions.md).
pub fn optimize_host(module: &Module<'_>) -> Result<(), CodegenError> {
    let machine = host_target_machine()?;
    module.set_triple(&machine.get_triple());
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    module.verify().map_err(|e| CodegenError::Llvm { stage: "verify", message: e.to_string() })?;
    module
        .run_passes("default<O2>", &machine, PassBuilderOptions::create())
        .map_err(|e| CodegenError::Llvm { stage: "optimize", message: e.to_string() })
}

/// An index into an expression's shape: the linear index, and (inside a row kernel's row loop) its split into
/// (row, column) with `lin = row·cols + col`.
#[derive(Clone, Copy)]
struct Ix<'ctx> {
    lin: IntValue<'ctx>,
    rc: Option<(IntValue<'ctx>, IntValue<'ctx>)>,
}

struct Gen<'a, 'ctx> {
    ctx: &'ctx Context,
    module: &'a Module<'ctx>,
    b: Builder<'ctx>,
    func: FunctionValue<'ctx>,
    nest: &'a LoopNest,
    flavor: Flavor,
    /// The pointer arguments in ABI order ([`LoopNest::args`]).
    bufs: Vec<PointerValue<'ctx>>,
    /// Index into `bufs` of each buffer's first part.
    first_part: Vec<usize>,
    /// The NF4 tables (when some input is NF4).
    nf4: Option<Nf4Tables<'ctx>>,
    /// Values computed in the current loop body, by (expression, linear index).
    memo: HashMap<(ExprId, IntValue<'ctx>), BasicValueEnum<'ctx>>,
    /// Per-row statistics of the row ops, valid in the current row.
    stats: HashMap<ExprId, Vec<FloatValue<'ctx>>>,
    /// Per-kernel values computed once at entry (AdamW's bias corrections).
    hoisted: HashMap<ExprId, Vec<FloatValue<'ctx>>>,
    /// The seeds argument (a `u64` array) and each slot's mixed seed, loaded at entry.
    seeds_ptr: Option<PointerValue<'ctx>>,
    seeds: Vec<IntValue<'ctx>>,
    /// NVPTX: 32 f32 of shared memory for the warps' partial sums.
    scratch: Option<GlobalValue<'ctx>>,
}

fn emit<'ctx>(ctx: &'ctx Context, module: &Module<'ctx>, nest: &LoopNest, flavor: Flavor) -> Kr<FunctionValue<'ctx>> {
    let name = nest.symbol();
    let args = nest.args();
    let (func, b, mut bufs) = kernel_fn(ctx, module, &name, args.len() + usize::from(!nest.seeds.is_empty()), flavor)?;
    let first_part: Vec<usize> =
        (0..nest.buffers.len()).map(|k| args.iter().position(|&(i, _)| i == k).expect("every buffer")).collect();
    let nf4_inputs: Vec<Option<usize>> = nest
        .inputs()
        .iter()
        .filter_map(|b| match b.elem {
            Elem::Nf4 { double_quant, .. } => Some(double_quant),
            _ => None,
        })
        .collect();
    let nf4 = (!nf4_inputs.is_empty())
        .then(|| Nf4Tables::new(ctx, module, &name, nf4_inputs.iter().any(Option::is_some), flavor));
    let seeds_ptr = if nest.seeds.is_empty() { None } else { bufs.pop() };
    if flavor == Flavor::Host {
        func.get_nth_param(0).expect("args param").set_name("args");
    }
    let scratch = match (flavor, nest.iteration) {
        (Flavor::Nvptx, Iteration::Rows { .. }) => {
            let ty = ctx.f32_type().array_type(32);
            let g = module.add_global(ty, Some(AddressSpace::from(3u16)), &format!("{name}_partials"));
            g.set_linkage(Linkage::Internal);
            g.set_initializer(&ty.get_undef());
            Some(g)
        }
        _ => None,
    };
    let mut gen = Gen {
        ctx,
        module,
        b,
        func,
        nest,
        flavor,
        bufs,
        first_part,
        nf4,
        memo: HashMap::new(),
        stats: HashMap::new(),
        hoisted: HashMap::new(),
        seeds_ptr,
        seeds: vec![],
        scratch,
    };
    gen.hoist()?;
    match nest.iteration {
        Iteration::Elements { len } => gen.elementwise(len)?,
        Iteration::Rows { rows, cols } => gen.rows(rows, cols)?,
    }
    gen.b.build_return(None)?;
    Ok(func)
}

impl<'ctx> Emit<'ctx> for Gen<'_, 'ctx> {
    fn ctx(&self) -> &'ctx Context {
        self.ctx
    }
    fn module(&self) -> &Module<'ctx> {
        self.module
    }
    fn b(&self) -> &Builder<'ctx> {
        &self.b
    }
    fn func(&self) -> FunctionValue<'ctx> {
        self.func
    }
}

impl<'a, 'ctx> Gen<'a, 'ctx> {
    /// [`Emit::for_loop`] with the expression memo scoped to the loop body (values computed inside stay inside).
    #[allow(clippy::type_complexity)]
    fn scoped_loop(
        &mut self,
        name: &str,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        step: IntValue<'ctx>,
        init: &[BasicValueEnum<'ctx>],
        body: &mut dyn FnMut(&mut Self, IntValue<'ctx>, &[BasicValueEnum<'ctx>]) -> Kr<Vec<BasicValueEnum<'ctx>>>,
    ) -> Kr<Vec<BasicValueEnum<'ctx>>> {
        self.for_loop(name, start, end, step, init, &mut |g, i, carried| {
            let saved = std::mem::take(&mut g.memo);
            let next = body(g, i, carried)?;
            g.memo = saved;
            Ok(next)
        })
    }

    /// `[start, end)` of the outer iteration space for this thread (host) or the first index and stride (NVPTX).
    fn outer_range(&self, total: usize, per_block: bool) -> Kr<(IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>)> {
        let total = self.i64c(total as u64);
        match self.flavor {
            Flavor::Host => {
                let (start, end) = self.host_slice(total)?;
                Ok((start, end, self.i64c(1)))
            }
            Flavor::Nvptx => {
                let (ctaid, nctaid) = (self.sreg(Sreg::CtaIdX)?, self.sreg(Sreg::NctaIdX)?);
                if per_block {
                    return Ok((ctaid, total, nctaid));
                }
                let (ntid, tid) = (self.sreg(Sreg::NtidX)?, self.sreg(Sreg::TidX)?);
                let start = self.b.build_int_add(self.b.build_int_mul(ctaid, ntid, "")?, tid, "")?;
                Ok((start, total, self.b.build_int_mul(ntid, nctaid, "")?))
            }
        }
    }

    fn elementwise(&mut self, len: usize) -> Kr<()> {
        let (start, end, step) = self.outer_range(len, false)?;
        self.scoped_loop("i", start, end, step, &[], &mut |g, i, _| {
            g.store_all(Ix { lin: i, rc: None }, |n| n == len)?;
            Ok(vec![])
        })?;
        Ok(())
    }

    fn rows(&mut self, rows: usize, cols: usize) -> Kr<()> {
        let (start, end, step) = self.outer_range(rows, true)?;
        self.scoped_loop("row", start, end, step, &[], &mut |g, r, _| {
            g.stats.clear();
            for e in g.nest.row_ops() {
                g.row_stats(e, r, cols)?;
            }
            // Full-size outputs along the row, then row-size outputs (one per row).
            let (j0, jstep) = g.inner_range()?;
            let base = g.b.build_int_mul(r, g.i64c(cols as u64), "")?;
            g.scoped_loop("col", j0, g.i64c(cols as u64), jstep, &[], &mut |g, j, _| {
                let lin = g.b.build_int_add(base, j, "")?;
                g.store_all(Ix { lin, rc: Some((r, j)) }, |n| n == rows * cols)?;
                Ok(vec![])
            })?;
            if g.nest.stores.iter().any(|s| g.nest.exprs[s.expr].numel() == rows && rows != rows * cols) {
                g.in_thread_zero(&mut |g| g.store_all(Ix { lin: r, rc: None }, |n| n == rows && n != rows * cols))?;
            }
            Ok(vec![])
        })?;
        Ok(())
    }

    /// Runs `f` on thread 0 of the block only (NVPTX), or plainly (host).
    fn in_thread_zero(&mut self, f: &mut dyn FnMut(&mut Self) -> Kr<()>) -> Kr<()> {
        if self.flavor == Flavor::Host {
            return f(self);
        }
        let tid = self.sreg(Sreg::TidX)?;
        let zero = self.b.build_int_compare(IntPredicate::EQ, tid, self.i64c(0), "")?;
        let then = self.ctx.append_basic_block(self.func, "thread0");
        let done = self.ctx.append_basic_block(self.func, "thread0.done");
        self.b.build_conditional_branch(zero, then, done)?;
        self.b.position_at_end(then);
        let saved = std::mem::take(&mut self.memo);
        f(self)?;
        self.memo = saved;
        self.b.build_unconditional_branch(done)?;
        self.b.position_at_end(done);
        Ok(())
    }

    /// The first column and the column stride of this thread in a row: (0, 1) on the host, (tid, ntid) on NVPTX.
    fn inner_range(&self) -> Kr<(IntValue<'ctx>, IntValue<'ctx>)> {
        match self.flavor {
            Flavor::Host => Ok((self.i64c(0), self.i64c(1))),
            Flavor::Nvptx => Ok((self.sreg(Sreg::TidX)?, self.sreg(Sreg::NtidX)?)),
        }
    }

    /// Stores every output whose element count passes `which`, at `ix`.
    /// Stores every selected output at `ix`. All values are computed (every input element loaded) before the first
    /// store: the memory plan may give an output the buffer of an input that dies in this kernel, and another
    /// output may still read that input at the same index.
    fn store_all(&mut self, ix: Ix<'ctx>, which: impl Fn(usize) -> bool) -> Kr<()> {
        let mut vals = vec![];
        for s in self.nest.stores.clone() {
            if which(self.nest.exprs[s.expr].numel()) {
                vals.push((s.buffer, self.gen(s.expr, ix)?));
            }
        }
        for (buffer, v) in vals {
            // ix.lin is below the output's element count (the loops' bounds).
            let p = self.gep(self.ctx.f32_type(), self.bufs[self.first_part[buffer]], ix.lin)?;
            self.b.build_store(p, v)?;
        }
        Ok(())
    }

    /// Reduces over the current row: `body` gives one value per reduction at each column.
    fn reduce_row(
        &mut self,
        r: IntValue<'ctx>,
        cols: usize,
        kinds: &[Red],
        body: &dyn Fn(&mut Self, Ix<'ctx>) -> Kr<Vec<FloatValue<'ctx>>>,
    ) -> Kr<Vec<FloatValue<'ctx>>> {
        let init: Vec<BasicValueEnum> = kinds.iter().map(|&k| self.identity(k).into()).collect();
        let (j0, jstep) = self.inner_range()?;
        let base = self.b.build_int_mul(r, self.i64c(cols as u64), "")?;
        let accs = self.scoped_loop("red", j0, self.i64c(cols as u64), jstep, &init, &mut |g, j, acc| {
            let lin = g.b.build_int_add(base, j, "")?;
            let vals = body(g, Ix { lin, rc: Some((r, j)) })?;
            let mut next = Vec::with_capacity(vals.len());
            for ((&k, a), v) in kinds.iter().zip(acc).zip(vals) {
                let s = g.combine(k, a.into_float_value(), v)?;
                if k == Red::Sum {
                    // Lets the vectorizer split the sum into lanes (the order of a reduction is free).
                    if let Some(inst) = s.as_instruction() {
                        let _ = inst.set_fast_math_flags(inkwell::values::FastMathFlags::AllowReassoc);
                    }
                }
                next.push(s.into());
            }
            Ok(next)
        })?;
        let mut out = Vec::with_capacity(kinds.len());
        for (&k, a) in kinds.iter().zip(accs) {
            out.push(match self.flavor {
                Flavor::Host => a.into_float_value(),
                Flavor::Nvptx => self.block_reduce(k, a.into_float_value())?,
            });
        }
        Ok(out)
    }

    /// NVPTX: the block-wide reduction of every thread's `v` (all threads get the result).
    fn block_reduce(&mut self, k: Red, v: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let v = self.warp_reduce(k, v)?;
        let scratch = self.scratch.expect("row kernels have scratch").as_pointer_value();
        self.block_combine(k, v, scratch)
    }

    /// Computes the row statistics of row op `e` for row `r` into `self.stats`.
    fn row_stats(&mut self, e: ExprId, r: IntValue<'ctx>, cols: usize) -> Kr<()> {
        let expr = self.nest.exprs[e].clone();
        let d = self.f32c(cols as f64);
        let x_arg = expr.args[row_input(&expr.op)];
        let stats = match expr.op {
            ExprOp::RmsNorm { eps } => {
                let ss = self.reduce_row(r, cols, &[Red::Sum], &|g, ix| {
                    let x = g.arg(x_arg, e, ix)?;
                    Ok(vec![g.b.build_float_mul(x, x, "")?])
                })?[0];
                vec![self.inv_rms(ss, d, eps)?]
            }
            ExprOp::RmsNormBwdX { eps } => {
                let (dy_arg, w_arg) = (expr.args[0], expr.args[2]);
                let sums = self.reduce_row(r, cols, &[Red::Sum, Red::Sum], &|g, ix| {
                    let (dy, x, w) = (g.arg(dy_arg, e, ix)?, g.arg(x_arg, e, ix)?, g.arg(w_arg, e, ix)?);
                    let dyw = g.b.build_float_mul(dy, w, "")?;
                    Ok(vec![g.b.build_float_mul(x, x, "")?, g.b.build_float_mul(dyw, x, "")?])
                })?;
                let inv = self.inv_rms(sums[0], d, eps)?;
                let inv2 = self.b.build_float_mul(inv, inv, "")?;
                let inv3 = self.b.build_float_mul(inv2, inv, "")?;
                let coef = self.b.build_float_div(inv3, d, "")?;
                vec![inv, coef, sums[1]]
            }
            ExprOp::Softmax => {
                let m = self.reduce_row(r, cols, &[Red::Max], &|g, ix| Ok(vec![g.arg(x_arg, e, ix)?]))?[0];
                let s = self.reduce_row(r, cols, &[Red::Sum], &|g, ix| {
                    let x = g.arg(x_arg, e, ix)?;
                    Ok(vec![g.exp_named(g.b.build_float_sub(x, m, "")?, "exp")?])
                })?[0];
                vec![m, s]
            }
            ExprOp::RowSum => {
                // The argument has the row-op's input shape, not the (row-sized) result's: index it directly.
                self.reduce_row(r, cols, &[Red::Sum], &|g, ix| Ok(vec![g.gen(x_arg, ix)?.into_float_value()]))?
            }
            _ => unreachable!("row_ops lists row ops only"),
        };
        self.stats.insert(e, stats);
        Ok(())
    }

    fn inv_rms(&self, ss: FloatValue<'ctx>, d: FloatValue<'ctx>, eps: f64) -> Kr<FloatValue<'ctx>> {
        let mean = self.b.build_float_div(ss, d, "")?;
        let var = self.b.build_float_add(mean, self.f32c(eps), "")?;
        let root = self.fcall("llvm.sqrt", &[var])?;
        Ok(self.b.build_float_div(self.f32c(1.0), root, "inv_rms")?)
    }

    /// Argument `a` of expression `e`, read at `e`'s index `ix` (broadcast as numpy does).
    fn arg(&mut self, a: ExprId, e: ExprId, ix: Ix<'ctx>) -> Kr<FloatValue<'ctx>> {
        let ix = self.map_ix(a, e, ix)?;
        Ok(self.gen(a, ix)?.into_float_value())
    }

    fn map_ix(&self, a: ExprId, e: ExprId, ix: Ix<'ctx>) -> Kr<Ix<'ctx>> {
        let cols = match self.nest.iteration {
            Iteration::Rows { cols, .. } => Some(cols),
            Iteration::Elements { .. } => None,
        };
        let b = &self.b;
        Ok(match index_map(&self.nest.exprs[a].shape, &self.nest.exprs[e].shape) {
            IndexMap::Same => ix,
            IndexMap::Zero => Ix { lin: self.i64c(0), rc: None },
            IndexMap::Rem(n) => match ix.rc {
                Some((_, c)) if Some(n) == cols => Ix { lin: c, rc: None },
                _ => Ix { lin: b.build_int_unsigned_rem(ix.lin, self.i64c(n as u64), "")?, rc: None },
            },
            IndexMap::Div(n) => match ix.rc {
                Some((r, _)) if Some(n) == cols => Ix { lin: r, rc: None },
                _ => Ix { lin: b.build_int_unsigned_div(ix.lin, self.i64c(n as u64), "")?, rc: None },
            },
            IndexMap::Axes(axes) => {
                let (mut rest, mut off) = (ix.lin, self.i64c(0));
                for (extent, stride) in axes {
                    let ext = self.i64c(extent as u64);
                    if stride != 0 {
                        let coord = b.build_int_unsigned_rem(rest, ext, "")?;
                        off = b.build_int_add(off, b.build_int_mul(coord, self.i64c(stride as u64), "")?, "")?;
                    }
                    rest = b.build_int_unsigned_div(rest, ext, "")?;
                }
                Ix { lin: off, rc: None }
            }
        })
    }

    /// Computes AdamW's per-step factors and loads the dropout seeds once, at kernel entry.
    fn hoist(&mut self) -> Kr<()> {
        if let Some(ptr) = self.seeds_ptr {
            let i64t = self.ctx.i64_type();
            for slot in 0..self.nest.seeds.len() {
                // SAFETY: the seeds argument holds `nest.seeds.len()` u64s (the ABI).
                let p = unsafe { self.b.build_in_bounds_gep(i64t, ptr, &[self.i64c(slot as u64)], "")? };
                let seed = self.b.build_load(i64t, p, "seed")?.into_int_value();
                let mixed = self.mix64(self.b.build_xor(seed, self.i64c(0x9e37_79b9_7f4a_7c15), "")?)?;
                self.seeds.push(mixed);
            }
        }
        let zero = Ix { lin: self.i64c(0), rc: None };
        let nest = self.nest;
        for e in 0..nest.exprs.len() {
            let expr = &nest.exprs[e];
            let ExprOp::AdamWUpdate { beta1, beta2, weight_decay, .. } = expr.op else { continue };
            let (lr_arg, step_arg) = (expr.args[3], expr.args[4]);
            let lr = self.gen(lr_arg, zero)?.into_float_value();
            let lr = self.b.build_float_ext(lr, self.ctx.f64_type(), "lr")?;
            let t = self.gen(step_arg, zero)?.into_int_value();
            let p1 = self.powi(beta1, t)?;
            let p2 = self.powi(beta2, t)?;
            let b = &self.b;
            let bc1 = b.build_float_sub(self.f64c(1.0), p1, "bc1")?;
            let bc2 = b.build_float_sub(self.f64c(1.0), p2, "")?;
            let bc2_sqrt = self.fcall("llvm.sqrt", &[bc2])?;
            let decay = b.build_float_sub(self.f64c(1.0), b.build_float_mul(lr, self.f64c(weight_decay), "")?, "")?;
            let step_size = b.build_float_div(lr, bc1, "")?;
            self.hoisted.insert(e, vec![decay, step_size, bc2_sqrt]);
        }
        self.memo.clear();
        Ok(())
    }

    /// `base^t` for i32 `t` ≥ 0, by the same square-and-multiply as compiler-rt's `__powidf2` (what Rust's `powi`
    /// calls), so the result is bit-identical to the interpreter's.
    fn powi(&mut self, base: f64, t: IntValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let f64t = self.ctx.f64_type();
        let pre = self.b.get_insert_block().expect("positioned");
        let body = self.ctx.append_basic_block(self.func, "powi");
        let exit = self.ctx.append_basic_block(self.func, "powi.done");
        self.b.build_unconditional_branch(body)?;
        self.b.position_at_end(body);
        let (r, a, bb) =
            (self.b.build_phi(f64t, "r")?, self.b.build_phi(f64t, "a")?, self.b.build_phi(t.get_type(), "b")?);
        let (rv, av, bv) = (
            r.as_basic_value().into_float_value(),
            a.as_basic_value().into_float_value(),
            bb.as_basic_value().into_int_value(),
        );
        let odd =
            self.b.build_int_compare(IntPredicate::NE, self.b.build_and(bv, self.i32c(1), "")?, self.i32c(0), "")?;
        let ra = self.b.build_float_mul(rv, av, "")?;
        let r2 = self.b.build_select(odd, ra, rv, "")?.into_float_value();
        let b2 = self.b.build_int_signed_div(bv, self.i32c(2), "")?;
        let a2 = self.b.build_float_mul(av, av, "")?;
        let done = self.b.build_int_compare(IntPredicate::EQ, b2, self.i32c(0), "")?;
        self.b.build_conditional_branch(done, exit, body)?;
        r.add_incoming(&[(&self.f64c(1.0), pre), (&r2, body)]);
        a.add_incoming(&[(&self.f64c(base), pre), (&a2, body)]);
        bb.add_incoming(&[(&t, pre), (&b2, body)]);
        self.b.position_at_end(exit);
        Ok(r2)
    }

    /// The value of expression `e` at linear index `ix` of its shape.
    fn gen(&mut self, e: ExprId, ix: Ix<'ctx>) -> Kr<BasicValueEnum<'ctx>> {
        if let Some(&v) = self.memo.get(&(e, ix.lin)) {
            return Ok(v);
        }
        let expr = self.nest.exprs[e].clone();
        let v: BasicValueEnum = match &expr.op {
            ExprOp::Load { buffer } => {
                let first = self.first_part[*buffer];
                let ty: BasicTypeEnum = match self.nest.buffers[*buffer].elem {
                    Elem::F32 => self.ctx.f32_type().into(),
                    Elem::I32 => self.ctx.i32_type().into(),
                    Elem::Nf4 { block, double_quant } => {
                        let parts = Nf4Parts {
                            packed: self.bufs[first],
                            absmax: self.bufs[first + 1],
                            double: double_quant.map(|_| (self.bufs[first + 2], self.bufs[first + 3])),
                        };
                        let tables = self.nf4.expect("NF4 tables");
                        let v = self.nf4_dequant(ix.lin, parts, tables, block, double_quant)?;
                        self.memo.insert((e, ix.lin), v.into());
                        return Ok(v.into());
                    }
                };
                // SAFETY: ix.lin indexes the buffer's shape (the nest's index maps stay in bounds).
                let p = unsafe { self.b.build_in_bounds_gep(ty, self.bufs[first], &[ix.lin], "")? };
                self.b.build_load(ty, p, "")?
            }
            ExprOp::Scalar { value, elem: Elem::F32 } => self.f32c(*value).into(),
            ExprOp::Scalar { value, elem: Elem::I32 } => self.i32c(*value as i64).into(),
            ExprOp::View => self.gen(expr.args[0], ix)?,
            ExprOp::Strided { axes, offset } => {
                let b = &self.b;
                let (mut rest, mut src) = (ix.lin, self.i64c(*offset as u64));
                for &(extent, stride) in axes {
                    let ext = self.i64c(extent as u64);
                    let coord = b.build_int_unsigned_rem(rest, ext, "")?;
                    src = b.build_int_add(src, b.build_int_mul(coord, self.i64c(stride as u64), "")?, "")?;
                    rest = b.build_int_unsigned_div(rest, ext, "")?;
                }
                self.gen(expr.args[0], Ix { lin: src, rc: None })?
            }
            ExprOp::Concat { lens, inner } => {
                // (outer, c, inner) of this index; every argument is read at a clamped (in-bounds) index and the
                // one holding `c` selected.
                let total: usize = lens.iter().sum();
                let (inner_c, total_c) = (self.i64c(*inner as u64), self.i64c(total as u64));
                let q = self.b.build_int_unsigned_div(ix.lin, inner_c, "")?;
                let r = self.b.build_int_unsigned_rem(ix.lin, inner_c, "")?;
                let c = self.b.build_int_unsigned_rem(q, total_c, "")?;
                let o = self.b.build_int_unsigned_div(q, total_c, "")?;
                let mut result: Option<FloatValue> = None;
                let mut start = 0usize;
                for (&a, &len) in expr.args.iter().zip(lens.iter()) {
                    let b = &self.b;
                    let s_c = self.i64c(start as u64);
                    let inside = b.build_and(
                        b.build_int_compare(IntPredicate::UGE, c, s_c, "")?,
                        b.build_int_compare(IntPredicate::ULT, c, self.i64c((start + len) as u64), "")?,
                        "",
                    )?;
                    let local = b.build_select(inside, b.build_int_sub(c, s_c, "")?, self.i64c(0), "")?;
                    let row =
                        b.build_int_add(b.build_int_mul(o, self.i64c(len as u64), "")?, local.into_int_value(), "")?;
                    let lin = b.build_int_add(b.build_int_mul(row, inner_c, "")?, r, "")?;
                    let v = self.gen(a, Ix { lin, rc: None })?.into_float_value();
                    result = Some(match result {
                        None => v,
                        Some(prev) => self.b.build_select(inside, v, prev, "")?.into_float_value(),
                    });
                    start += len;
                }
                result.expect("concat has arguments").into()
            }
            ExprOp::RowSum => self.stats[&e][0].into(),
            op => {
                let mut args = Vec::with_capacity(expr.args.len());
                for &a in &expr.args {
                    let aix = self.map_ix(a, e, ix)?;
                    args.push(self.gen(a, aix)?);
                }
                self.compute(e, op, &args, ix)?
            }
        };
        self.memo.insert((e, ix.lin), v);
        Ok(v)
    }

    fn compute(
        &mut self,
        e: ExprId,
        op: &ExprOp,
        args: &[BasicValueEnum<'ctx>],
        ix: Ix<'ctx>,
    ) -> Kr<BasicValueEnum<'ctx>> {
        let f = |k: usize| args[k].into_float_value();
        let b = &self.b;
        let one = self.f32c(1.0);
        let v = match op {
            ExprOp::Broadcast => f(0),
            ExprOp::Add => b.build_float_add(f(0), f(1), "")?,
            ExprOp::Sub => b.build_float_sub(f(0), f(1), "")?,
            ExprOp::Mul => b.build_float_mul(f(0), f(1), "")?,
            ExprOp::Div => b.build_float_div(f(0), f(1), "")?,
            ExprOp::Minimum => self.fcall("llvm.minnum", &[f(0), f(1)])?,
            ExprOp::Maximum => self.fcall("llvm.maxnum", &[f(0), f(1)])?,
            ExprOp::Neg => b.build_float_neg(f(0), "")?,
            ExprOp::Exp => self.exp_named(f(0), "exp")?,
            ExprOp::Log => self.log_checked(f(0))?,
            ExprOp::Sqrt => self.fcall("llvm.sqrt", &[f(0)])?,
            ExprOp::Rsqrt => {
                let root = self.fcall("llvm.sqrt", &[f(0)])?;
                self.b.build_float_div(one, root, "")?
            }
            ExprOp::Sigmoid => self.sigmoid(f(0))?,
            ExprOp::Silu => {
                let s = self.sigmoid(f(0))?;
                self.b.build_float_mul(f(0), s, "")?
            }
            ExprOp::SiluBwd => {
                // dy · σ(x)·(1 + x·(1 − σ(x)))
                let (dy, x) = (f(0), f(1));
                let s = self.sigmoid(x)?;
                let b = &self.b;
                let t = b.build_float_add(one, b.build_float_mul(x, b.build_float_sub(one, s, "")?, "")?, "")?;
                b.build_float_mul(b.build_float_mul(dy, s, "")?, t, "")?
            }
            ExprOp::Swiglu => {
                let s = self.sigmoid(f(0))?;
                let b = &self.b;
                b.build_float_mul(b.build_float_mul(f(0), s, "")?, f(1), "")?
            }
            ExprOp::Scale { c } => {
                let x = b.build_float_ext(f(0), self.ctx.f64_type(), "")?;
                b.build_float_trunc(b.build_float_mul(self.f64c(*c), x, "")?, self.ctx.f32_type(), "")?
            }
            ExprOp::Dropout { p, slot } => {
                let seed_mix = self.seeds[*slot];
                self.dropout(f(0), args[1].into_int_value(), ix.lin, *p, seed_mix)?
            }
            ExprOp::AdamWMoment { beta, square } => {
                let f64t = self.ctx.f64_type();
                let m = b.build_float_ext(f(0), f64t, "")?;
                let g = b.build_float_ext(f(1), f64t, "")?;
                let g = if *square { b.build_float_mul(g, g, "")? } else { g };
                let t1 = b.build_float_mul(self.f64c(*beta), m, "")?;
                let t2 = b.build_float_mul(self.f64c(1.0 - beta), g, "")?;
                b.build_float_trunc(b.build_float_add(t1, t2, "")?, self.ctx.f32_type(), "")?
            }
            ExprOp::AdamWUpdate { eps, .. } => {
                let h = self.hoisted[&e].clone();
                let f64t = self.ctx.f64_type();
                let (p, m, v) = (
                    b.build_float_ext(f(0), f64t, "")?,
                    b.build_float_ext(f(1), f64t, "")?,
                    b.build_float_ext(f(2), f64t, "")?,
                );
                let decayed = b.build_float_mul(p, h[0], "")?;
                let root = self.fcall("llvm.sqrt", &[v])?;
                let b = &self.b;
                let denom = b.build_float_add(b.build_float_div(root, h[2], "")?, self.f64c(*eps), "")?;
                let upd = b.build_float_div(b.build_float_mul(h[1], m, "")?, denom, "")?;
                b.build_float_trunc(b.build_float_sub(decayed, upd, "")?, self.ctx.f32_type(), "")?
            }
            ExprOp::RmsNorm { .. } => {
                let inv = self.stats[&e][0];
                b.build_float_mul(b.build_float_mul(f(0), inv, "")?, f(1), "")?
            }
            ExprOp::RmsNormBwdX { .. } => {
                let (dy, x, w) = (f(0), f(1), f(2));
                let s = &self.stats[&e];
                let first = b.build_float_mul(b.build_float_mul(s[0], w, "")?, dy, "")?;
                let second = b.build_float_mul(b.build_float_mul(s[1], x, "")?, s[2], "")?;
                b.build_float_sub(first, second, "")?
            }
            ExprOp::Softmax => {
                let s = self.stats[&e].clone();
                let z = self.exp_named(self.b.build_float_sub(f(0), s[0], "")?, "exp")?;
                self.b.build_float_div(z, s[1], "")?
            }
            ExprOp::Load { .. }
            | ExprOp::Scalar { .. }
            | ExprOp::View
            | ExprOp::Strided { .. }
            | ExprOp::Concat { .. }
            | ExprOp::RowSum => {
                unreachable!("handled by gen")
            }
        };
        Ok(v.as_basic_value_enum())
    }

    fn sigmoid(&self, x: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let e = self.exp_named(self.b.build_float_neg(x, "")?, "exp")?;
        let one = self.f32c(1.0);
        Ok(self.b.build_float_div(one, self.b.build_float_add(one, e, "")?, "")?)
    }

    /// ln x in f32 for any x ([`Emit::log`], then ∞ for ∞, −∞ for 0 and NaN below 0 or for NaN).
    fn log_checked(&self, x: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let r = self.log(x)?;
        let b = &self.b;
        let inf = self.f32c(f64::INFINITY);
        let is_inf = b.build_float_compare(FloatPredicate::OEQ, x, inf, "")?;
        let r = b.build_select(is_inf, inf, r, "")?.into_float_value();
        let is_zero = b.build_float_compare(FloatPredicate::OEQ, x, self.f32c(0.0), "")?;
        let r = b.build_select(is_zero, self.f32c(f64::NEG_INFINITY), r, "")?.into_float_value();
        let bad = b.build_float_compare(FloatPredicate::ULT, x, self.f32c(0.0), "")?;
        Ok(b.build_select(bad, self.f32c(f64::NAN), r, "log")?.into_float_value())
    }

    /// SplitMix64's finaliser (`ir::rng::mix64`) on an i64.
    fn mix64(&self, z: IntValue<'ctx>) -> Kr<IntValue<'ctx>> {
        let b = &self.b;
        let step = |z: IntValue<'ctx>, shift: u64, mul: Option<u64>| -> Kr<IntValue<'ctx>> {
            let x = b.build_xor(z, b.build_right_shift(z, self.i64c(shift), false, "")?, "")?;
            Ok(match mul {
                Some(m) => b.build_int_mul(x, self.i64c(m), "")?,
                None => x,
            })
        };
        let z = step(z, 30, Some(0xbf58_476d_1ce4_e5b9))?;
        let z = step(z, 27, Some(0x94d0_49bb_1331_11eb))?;
        step(z, 31, None)
    }

    /// Inverted dropout with `ir::rng`'s counter-based mask; the scaling is done in f64 and rounded once, as the
    /// interpreter does, so the result is bit-identical.
    fn dropout(
        &self,
        x: FloatValue<'ctx>,
        step: IntValue<'ctx>,
        index: IntValue<'ctx>,
        p: f64,
        seed_mix: IntValue<'ctx>,
    ) -> Kr<FloatValue<'ctx>> {
        let (b, f64t) = (&self.b, self.ctx.f64_type());
        let step = self.mix64(b.build_int_s_extend(step, self.ctx.i64_type(), "")?)?;
        let idx = b.build_int_mul(index, self.i64c(0xd6e8_feb8_6659_fd93), "")?;
        let h = self.mix64(b.build_int_add(b.build_int_add(seed_mix, step, "")?, idx, "")?)?;
        let bits = b.build_right_shift(h, self.i64c(40), false, "")?;
        let u = b.build_float_mul(
            b.build_unsigned_int_to_float(bits, f64t, "")?,
            self.f64c(1.0 / (1u64 << 24) as f64),
            "",
        )?;
        let keep = b.build_float_compare(FloatPredicate::OGE, u, self.f64c(p), "keep")?;
        let scaled = b.build_float_mul(b.build_float_ext(x, f64t, "")?, self.f64c(1.0 / (1.0 - p)), "")?;
        let scaled = b.build_float_trunc(scaled, self.ctx.f32_type(), "")?;
        Ok(b.build_select(keep, scaled, self.f32c(0.0), "dropout")?.into_float_value())
    }
}
