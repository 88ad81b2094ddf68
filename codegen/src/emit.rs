//! The inkwell emission helpers that `lower`, `nn` and `gemm` share: constants, intrinsic calls, NVPTX special
//! registers, counted loops and branches, GEPs, the host kernel's slice of an iteration space, the Cephes-style
//! `exp`/`log` polynomials, and warp/block reductions.
//!
//! Each template's code generator implements [`Emit`] (four accessors) and gets the rest as provided methods.

use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::{Linkage, Module};
use inkwell::types::{BasicType, BasicTypeEnum};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValueEnum, FloatValue, FunctionValue, GlobalValue, IntValue, PointerValue,
};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate};
use kernels::{read_sreg, set_ptx_kernel, KernelError, Sreg};

use crate::lower::Flavor;

pub(crate) type Kr<T> = Result<T, KernelError>;

/// The kind of a float reduction.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Red {
    Sum,
    Max,
}

/// Adds the kernel function `name` to `module` with the ABI of `flavor` (host: `void(ptr args, i32 tid,
/// i32 nthreads)`; NVPTX: `ptx_kernel void(ptr b0, …)`), positions a new builder at its entry and returns the
/// function, the builder and the `nbufs` buffer pointers (loaded from `args` on the host).
pub(crate) fn kernel_fn<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    name: &str,
    nbufs: usize,
    flavor: Flavor,
) -> Kr<(FunctionValue<'ctx>, Builder<'ctx>, Vec<PointerValue<'ctx>>)> {
    if module.get_function(name).is_some() {
        return Err(KernelError::DuplicateKernel(name.to_string()));
    }
    let ptr = ctx.ptr_type(AddressSpace::default());
    let i32t = ctx.i32_type();
    let fn_type = match flavor {
        Flavor::Host => ctx.void_type().fn_type(&[ptr.into(), i32t.into(), i32t.into()], false),
        Flavor::Nvptx => ctx.void_type().fn_type(&vec![ptr.into(); nbufs], false),
    };
    let func = module.add_function(name, fn_type, None);
    let b = ctx.create_builder();
    b.position_at_end(ctx.append_basic_block(func, "entry"));
    let bufs = match flavor {
        Flavor::Host => {
            let args = func.get_nth_param(0).expect("args param").into_pointer_value();
            let mut bufs = Vec::with_capacity(nbufs);
            for k in 0..nbufs {
                // SAFETY: `args` holds one pointer per buffer (the ABI); k < nbufs.
                let slot =
                    unsafe { b.build_in_bounds_gep(ptr, args, &[ctx.i64_type().const_int(k as u64, false)], "")? };
                bufs.push(b.build_load(ptr, slot, &format!("buf{k}"))?.into_pointer_value());
            }
            bufs
        }
        Flavor::Nvptx => {
            set_ptx_kernel(func);
            func.get_param_iter().map(|p| p.into_pointer_value()).collect()
        }
    };
    Ok((func, b, bufs))
}

/// A constant f32 table `name` in `module` (global memory on NVPTX), internal to the module.
pub(crate) fn const_f32_table<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    name: &str,
    vals: &[f32],
    flavor: Flavor,
) -> GlobalValue<'ctx> {
    let space = match flavor {
        Flavor::Host => AddressSpace::default(),
        Flavor::Nvptx => AddressSpace::from(1u16),
    };
    let f32t = ctx.f32_type();
    let init: Vec<FloatValue> = vals.iter().map(|&v| f32t.const_float(v as f64)).collect();
    let gl = module.add_global(f32t.array_type(vals.len() as u32), Some(space), name);
    gl.set_linkage(Linkage::Internal);
    gl.set_constant(true);
    gl.set_initializer(&f32t.const_array(&init));
    gl
}

/// The constant tables NF4 dequantization reads, in a kernel's module.
#[derive(Clone, Copy)]
pub(crate) struct Nf4Tables<'ctx> {
    /// The 16 NF4 code values (`ir::nf4::NF4_CODEBOOK`).
    pub nf4: GlobalValue<'ctx>,
    /// The signed dynamic map (256 values) of double quantization.
    pub dyn_map: Option<GlobalValue<'ctx>>,
}

impl<'ctx> Nf4Tables<'ctx> {
    /// Adds `{prefix}_nf4` (and `{prefix}_dynmap` with `double_quant`) to `module`.
    pub fn new(ctx: &'ctx Context, module: &Module<'ctx>, prefix: &str, double_quant: bool, flavor: Flavor) -> Self {
        Nf4Tables {
            nf4: const_f32_table(ctx, module, &format!("{prefix}_nf4"), &ir::nf4::NF4_CODEBOOK, flavor),
            dyn_map: double_quant.then(|| {
                const_f32_table(ctx, module, &format!("{prefix}_dynmap"), &ir::nf4::dynamic_map_signed(), flavor)
            }),
        }
    }
}

/// Where an NF4 tensor's storage parts are (see `kernels::gemm::nf4_buffers`): the packed codes and, without double
/// quantization, `[absmax]`, or with it `[absmax codes, absmax2, offset]`.
#[derive(Clone, Copy)]
pub(crate) struct Nf4Parts<'ctx> {
    pub packed: PointerValue<'ctx>,
    /// The absmax (f32), or with double quantization the absmax codes (u8).
    pub absmax: PointerValue<'ctx>,
    /// With double quantization: absmax2 (f32) and the offset (f32[1]).
    pub double: Option<(PointerValue<'ctx>, PointerValue<'ctx>)>,
}

/// Shared emission helpers for a code generator that owns a builder positioned in kernel `func`.
pub(crate) trait Emit<'ctx>: Sized {
    /// Loops compare unsigned and increment with `nuw` (else: signed compare, plain add).
    const UNSIGNED_LOOPS: bool = false;

    fn ctx(&self) -> &'ctx Context;
    fn module(&self) -> &Module<'ctx>;
    fn b(&self) -> &Builder<'ctx>;
    fn func(&self) -> FunctionValue<'ctx>;

    // ---- constants, intrinsics, special registers -----------------------------------------------------------------

    fn i64c(&self, v: u64) -> IntValue<'ctx> {
        self.ctx().i64_type().const_int(v, false)
    }
    fn i32c(&self, v: i64) -> IntValue<'ctx> {
        self.ctx().i32_type().const_int(v as u64, true)
    }
    fn f32c(&self, v: f64) -> FloatValue<'ctx> {
        self.ctx().f32_type().const_float(v)
    }
    fn f64c(&self, v: f64) -> FloatValue<'ctx> {
        self.ctx().f64_type().const_float(v)
    }

    fn intrinsic(&self, name: &'static str, types: &[BasicTypeEnum<'ctx>]) -> Kr<FunctionValue<'ctx>> {
        Intrinsic::find(name)
            .and_then(|i| i.get_declaration(self.module(), types))
            .ok_or(KernelError::MissingIntrinsic(name))
    }

    fn call(&self, f: FunctionValue<'ctx>, args: &[BasicMetadataValueEnum<'ctx>]) -> Kr<BasicValueEnum<'ctx>> {
        let call = self.b().build_call(f, args, "")?;
        Ok(call.try_as_basic_value().basic().expect("intrinsic returns a value"))
    }

    /// `llvm.<name>.<type of args[0]>` applied to float operands.
    fn fcall(&self, name: &'static str, args: &[FloatValue<'ctx>]) -> Kr<FloatValue<'ctx>> {
        let f = self.intrinsic(name, &[args[0].get_type().as_basic_type_enum()])?;
        let args: Vec<BasicMetadataValueEnum> = args.iter().map(|&a| a.into()).collect();
        Ok(self.call(f, &args)?.into_float_value())
    }

    /// An NVPTX special register, zero-extended to i64.
    fn sreg(&self, reg: Sreg) -> Kr<IntValue<'ctx>> {
        let v = read_sreg(self.module(), self.b(), reg, "")?;
        Ok(self.b().build_int_z_extend(v, self.ctx().i64_type(), "")?)
    }

    /// `bar.sync 0` (every thread of the block).
    fn cta_barrier(&self) -> Kr<()> {
        let f = self.intrinsic("llvm.nvvm.barrier.cta.sync.aligned.all", &[])?;
        self.b().build_call(f, &[self.i32c(0).into()], "")?;
        Ok(())
    }

    // ---- arithmetic, memory -----------------------------------------------------------------------------------------

    fn umin(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Kr<IntValue<'ctx>> {
        let lt = self.b().build_int_compare(IntPredicate::ULT, a, b, "")?;
        Ok(self.b().build_select(lt, a, b, "")?.into_int_value())
    }
    fn select_f(&self, c: IntValue<'ctx>, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        Ok(self.b().build_select(c, a, b, "")?.into_float_value())
    }
    fn select_i(&self, c: IntValue<'ctx>, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Kr<IntValue<'ctx>> {
        Ok(self.b().build_select(c, a, b, "")?.into_int_value())
    }

    /// `&p[i]` for elements of type `ty`.
    fn gep(&self, ty: impl BasicType<'ctx>, p: PointerValue<'ctx>, i: IntValue<'ctx>) -> Kr<PointerValue<'ctx>> {
        // SAFETY: every index the templates build is inside its buffer (the loops' bounds, clamped or checked).
        Ok(unsafe { self.b().build_in_bounds_gep(ty, p, &[i], "")? })
    }
    /// `&a[i]` for `a` (at `p`) an array of type `arr`.
    fn arr_gep(&self, arr: impl BasicType<'ctx>, p: PointerValue<'ctx>, i: IntValue<'ctx>) -> Kr<PointerValue<'ctx>> {
        // SAFETY: every caller's index is below the array's length (see there).
        Ok(unsafe { self.b().build_in_bounds_gep(arr, p, &[self.i64c(0), i], "")? })
    }
    fn ld_f32(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let f32t = self.ctx().f32_type();
        Ok(self.b().build_load(f32t, self.gep(f32t, p, i)?, "")?.into_float_value())
    }
    fn st_f32(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>, v: FloatValue<'ctx>) -> Kr<()> {
        self.b().build_store(self.gep(self.ctx().f32_type(), p, i)?, v)?;
        Ok(())
    }
    /// `p[i]` for a u8 array, zero-extended to i64.
    fn ld_u8(&self, p: PointerValue<'ctx>, i: IntValue<'ctx>) -> Kr<IntValue<'ctx>> {
        let i8t = self.ctx().i8_type();
        let q = self.gep(i8t, p, i)?;
        let v = self.b().build_load(i8t, q, "")?.into_int_value();
        Ok(self.b().build_int_z_extend(v, self.ctx().i64_type(), "")?)
    }
    /// Entry `i` of a constant f32 table.
    fn table(&self, t: GlobalValue<'ctx>, i: IntValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let ty = t.get_value_type().into_array_type();
        // i < the table's length (a 4-bit or 8-bit code).
        let q = self.arr_gep(ty, t.as_pointer_value(), i)?;
        Ok(self.b().build_load(self.ctx().f32_type(), q, "")?.into_float_value())
    }

    /// Element `e` (row-major, i64) of an NF4 tensor, exactly as `ir::nf4::dequantize`: separately rounded
    /// `(map[c]·absmax2) + offset` with double quantization, then `nf4[q]·absmax` (no contraction: no fast-math
    /// flags).
    fn nf4_dequant(
        &self,
        e: IntValue<'ctx>,
        parts: Nf4Parts<'ctx>,
        tables: Nf4Tables<'ctx>,
        block: usize,
        double_quant: Option<usize>,
    ) -> Kr<FloatValue<'ctx>> {
        let b = self.b();
        let byte = self.ld_u8(parts.packed, b.build_right_shift(e, self.i64c(1), false, "")?)?;
        // Even elements in the high nibble: shift = 4·(1 − (e & 1)).
        let odd = b.build_and(e, self.i64c(1), "")?;
        let shift = b.build_left_shift(b.build_xor(odd, self.i64c(1), "")?, self.i64c(2), "")?;
        let nib = b.build_and(b.build_right_shift(byte, shift, false, "")?, self.i64c(15), "nib")?;
        let q = self.table(tables.nf4, nib)?;
        let blk = b.build_int_unsigned_div(e, self.i64c(block as u64), "blk")?;
        let absmax = match (double_quant, parts.double) {
            (Some(b2), Some((absmax2, offset))) => {
                let code = self.ld_u8(parts.absmax, blk)?;
                let mapped = self.table(tables.dyn_map.expect("dynamic map"), code)?;
                let blk2 = b.build_int_unsigned_div(blk, self.i64c(b2 as u64), "")?;
                let a2 = self.ld_f32(absmax2, blk2)?;
                let off = self.ld_f32(offset, self.i64c(0))?;
                b.build_float_add(b.build_float_mul(mapped, a2, "")?, off, "absmax")?
            }
            _ => self.ld_f32(parts.absmax, blk)?,
        };
        Ok(b.build_float_mul(q, absmax, "w")?)
    }

    // ---- control flow -----------------------------------------------------------------------------------------------

    /// A counted loop `for i in (start..end).step_by(step)` carrying `init` values; `body` returns the next values.
    /// Returns the carried values after the loop.
    #[allow(clippy::type_complexity)]
    fn for_loop(
        &mut self,
        name: &str,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        step: IntValue<'ctx>,
        init: &[BasicValueEnum<'ctx>],
        body: &mut dyn FnMut(&mut Self, IntValue<'ctx>, &[BasicValueEnum<'ctx>]) -> Kr<Vec<BasicValueEnum<'ctx>>>,
    ) -> Kr<Vec<BasicValueEnum<'ctx>>> {
        let (ctx, func) = (self.ctx(), self.func());
        let pre = self.b().get_insert_block().expect("builder is positioned");
        let header = ctx.append_basic_block(func, &format!("{name}.header"));
        let body_bb = ctx.append_basic_block(func, &format!("{name}.body"));
        let exit = ctx.append_basic_block(func, &format!("{name}.exit"));
        let b = self.b();
        b.build_unconditional_branch(header)?;
        b.position_at_end(header);
        let i = b.build_phi(start.get_type(), name)?;
        let phis = init.iter().map(|v| b.build_phi(v.get_type(), "")).collect::<Result<Vec<_>, _>>()?;
        let iv = i.as_basic_value().into_int_value();
        let pred = if Self::UNSIGNED_LOOPS { IntPredicate::ULT } else { IntPredicate::SLT };
        let more = b.build_int_compare(pred, iv, end, "")?;
        b.build_conditional_branch(more, body_bb, exit)?;
        b.position_at_end(body_bb);
        let carried: Vec<BasicValueEnum> = phis.iter().map(|p| p.as_basic_value()).collect();
        let next_vals = body(self, iv, &carried)?;
        let b = self.b();
        let next =
            if Self::UNSIGNED_LOOPS { b.build_int_nuw_add(iv, step, "")? } else { b.build_int_add(iv, step, "")? };
        let latch = b.get_insert_block().expect("builder is positioned");
        b.build_unconditional_branch(header)?;
        i.add_incoming(&[(&start, pre), (&next, latch)]);
        for ((phi, init), next) in phis.iter().zip(init).zip(&next_vals) {
            phi.add_incoming(&[(init, pre), (next, latch)]);
        }
        b.position_at_end(exit);
        Ok(carried)
    }

    /// `if cond { then() } else { els }`: the values of the branch taken.
    #[allow(clippy::type_complexity)]
    fn if_else(
        &mut self,
        cond: IntValue<'ctx>,
        els: &[BasicValueEnum<'ctx>],
        then: &mut dyn FnMut(&mut Self) -> Kr<Vec<BasicValueEnum<'ctx>>>,
    ) -> Kr<Vec<BasicValueEnum<'ctx>>> {
        let (ctx, func) = (self.ctx(), self.func());
        let pre = self.b().get_insert_block().expect("positioned");
        let then_bb = ctx.append_basic_block(func, "then");
        let done = ctx.append_basic_block(func, "endif");
        self.b().build_conditional_branch(cond, then_bb, done)?;
        self.b().position_at_end(then_bb);
        let vals = then(self)?;
        let b = self.b();
        let then_end = b.get_insert_block().expect("positioned");
        b.build_unconditional_branch(done)?;
        b.position_at_end(done);
        let mut out = Vec::with_capacity(els.len());
        for (e, t) in els.iter().zip(&vals) {
            let phi = b.build_phi(e.get_type(), "")?;
            phi.add_incoming(&[(t, then_end), (e, pre)]);
            out.push(phi.as_basic_value());
        }
        Ok(out)
    }

    /// Runs `then` where `cond` holds.
    fn if_then(&mut self, cond: IntValue<'ctx>, then: &mut dyn FnMut(&mut Self) -> Kr<()>) -> Kr<()> {
        self.if_else(cond, &[], &mut |g| {
            then(g)?;
            Ok(vec![])
        })?;
        Ok(())
    }

    /// Host: this thread's slice `[start, end)` of `total` items, from the kernel's (tid, nthreads) parameters.
    fn host_slice(&self, total: IntValue<'ctx>) -> Kr<(IntValue<'ctx>, IntValue<'ctx>)> {
        let (b, i64t, func) = (self.b(), self.ctx().i64_type(), self.func());
        let tid = func.get_nth_param(1).expect("tid").into_int_value();
        let n = func.get_nth_param(2).expect("nthreads").into_int_value();
        let tid = b.build_int_z_extend(tid, i64t, "tid")?;
        let n = b.build_int_z_extend(n, i64t, "nthreads")?;
        let n1 = b.build_int_sub(n, self.i64c(1), "")?;
        let chunk = b.build_int_unsigned_div(b.build_int_add(total, n1, "")?, n, "chunk")?;
        let start = self.umin(b.build_int_mul(tid, chunk, "")?, total)?;
        let end = self.umin(b.build_int_add(start, chunk, "")?, total)?;
        Ok((start, end))
    }

    // ---- math ---------------------------------------------------------------------------------------------------------

    /// Horner evaluation of `coeffs` (highest degree first) at `x`, in `x`'s type.
    fn poly(&self, x: FloatValue<'ctx>, coeffs: &[f64]) -> Kr<FloatValue<'ctx>> {
        let (b, c) = (self.b(), |v: f64| x.get_type().const_float(v));
        let mut acc = c(coeffs[0]);
        for &k in &coeffs[1..] {
            acc = b.build_float_add(b.build_float_mul(acc, x, "")?, c(k), "")?;
        }
        Ok(acc)
    }

    /// eˣ in f32 (Cephes `expf`: x = n·ln2 + r, a degree-6 polynomial in r, scaling by 2ⁿ in two steps so results
    /// that are subnormal or overflow come out right); the result is named `name`.
    fn exp_named(&self, x: FloatValue<'ctx>, name: &str) -> Kr<FloatValue<'ctx>> {
        let (b, i32t, f32t) = (self.b(), self.ctx().i32_type(), self.ctx().f32_type());
        let clamped =
            self.fcall("llvm.minnum", &[self.fcall("llvm.maxnum", &[x, self.f32c(-104.0)])?, self.f32c(89.0)])?;
        let n = self.fcall("llvm.rint", &[b.build_float_mul(clamped, self.f32c(std::f64::consts::LOG2_E), "")?])?;
        let r = b.build_float_sub(clamped, b.build_float_mul(n, self.f32c(0.693359375), "")?, "")?;
        let r = b.build_float_sub(r, b.build_float_mul(n, self.f32c(-2.12194440e-4), "")?, "")?;
        let p = self.poly(
            r,
            &[1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1],
        )?;
        let y = b.build_float_add(
            b.build_float_add(b.build_float_mul(p, b.build_float_mul(r, r, "")?, "")?, r, "")?,
            self.f32c(1.0),
            "",
        )?;
        let ni = b.build_float_to_signed_int(n, i32t, "")?;
        let n1 = b.build_right_shift(ni, self.i32c(1), true, "")?;
        let n2 = b.build_int_sub(ni, n1, "")?;
        let pow2 = |k: IntValue<'ctx>| -> Kr<FloatValue<'ctx>> {
            let bits = b.build_left_shift(b.build_int_add(k, self.i32c(127), "")?, self.i32c(23), "")?;
            Ok(b.build_bit_cast(bits, f32t, "")?.into_float_value())
        };
        let scaled = b.build_float_mul(b.build_float_mul(y, pow2(n1)?, "")?, pow2(n2)?, "")?;
        let nan = b.build_float_compare(FloatPredicate::UNO, x, x, "")?;
        Ok(b.build_select(nan, x, scaled, name)?.into_float_value())
    }

    /// eˣ in f32 (see [`Emit::exp_named`]).
    fn exp(&self, x: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        self.exp_named(x, "")
    }

    /// ln x in f32 for finite x > 0 (Cephes `logf`: x = m·2ᵉ with m in [√½, √2), a degree-9 polynomial in m − 1).
    fn log(&self, x: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let (b, i32t, f32t) = (self.b(), self.ctx().i32_type(), self.ctx().f32_type());
        let small = b.build_float_compare(FloatPredicate::OLT, x, self.f32c(f32::MIN_POSITIVE as f64), "")?;
        let xs = self.select_f(small, b.build_float_mul(x, self.f32c(8388608.0), "")?, x)?;
        let eoff = self.select_i(small, self.i32c(-23), self.i32c(0))?;
        let bits = b.build_bit_cast(xs, i32t, "")?.into_int_value();
        let biased = b.build_and(b.build_right_shift(bits, self.i32c(23), false, "")?, self.i32c(0xff), "")?;
        let e = b.build_int_add(b.build_int_sub(biased, self.i32c(126), "")?, eoff, "")?;
        let mbits = b.build_or(b.build_and(bits, self.i32c(0x807f_ffff), "")?, self.i32c(0x3f00_0000), "")?;
        let m = b.build_bit_cast(mbits, f32t, "")?.into_float_value();
        let lt = b.build_float_compare(FloatPredicate::OLT, m, self.f32c(std::f64::consts::FRAC_1_SQRT_2), "")?;
        let e = b.build_int_sub(e, b.build_int_z_extend(lt, i32t, "")?, "")?;
        let one = self.f32c(1.0);
        let t = self.select_f(
            lt,
            b.build_float_sub(b.build_float_add(m, m, "")?, one, "")?,
            b.build_float_sub(m, one, "")?,
        )?;
        let fe = b.build_signed_int_to_float(e, f32t, "")?;
        let z = b.build_float_mul(t, t, "")?;
        let p = self.poly(
            t,
            &[
                7.0376836292e-2,
                -1.1514610310e-1,
                1.1676998740e-1,
                -1.2420140846e-1,
                1.4249322787e-1,
                -1.6668057665e-1,
                2.0000714765e-1,
                -2.4999993993e-1,
                3.3333331174e-1,
            ],
        )?;
        let y = b.build_float_mul(b.build_float_mul(p, t, "")?, z, "")?;
        let y = b.build_float_add(y, b.build_float_mul(fe, self.f32c(-2.12194440e-4), "")?, "")?;
        let y = b.build_float_sub(y, b.build_float_mul(z, self.f32c(0.5), "")?, "")?;
        let r = b.build_float_add(t, y, "")?;
        Ok(b.build_float_add(r, b.build_float_mul(fe, self.f32c(0.693359375), "")?, "")?)
    }

    // ---- reductions ---------------------------------------------------------------------------------------------------

    fn identity(&self, k: Red) -> FloatValue<'ctx> {
        match k {
            Red::Sum => self.f32c(0.0),
            Red::Max => self.f32c(f64::NEG_INFINITY),
        }
    }

    fn combine(&self, k: Red, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        match k {
            Red::Sum => Ok(self.b().build_float_add(a, b, "")?),
            Red::Max => self.fcall("llvm.maxnum", &[a, b]),
        }
    }

    /// NVPTX: the warp-wide reduction of every lane's `v` by butterfly shuffles (every lane gets it).
    fn warp_reduce(&self, k: Red, mut v: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let shfl = self.intrinsic("llvm.nvvm.shfl.sync.bfly.f32", &[])?;
        for offset in [16, 8, 4, 2, 1] {
            let args = [self.i32c(-1).into(), v.into(), self.i32c(offset).into(), self.i32c(31).into()];
            let other = self.call(shfl, &args)?.into_float_value();
            v = self.combine(k, v, other)?;
        }
        Ok(v)
    }

    /// NVPTX: combines the warps' already-reduced `v` through `scratch` (32 f32 of shared memory) into the block-wide
    /// result (every thread gets it). `blockDim.x` must be a multiple of 32, at most 1024.
    fn block_combine(&mut self, k: Red, v: FloatValue<'ctx>, scratch: PointerValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let arr = self.ctx().f32_type().array_type(32);
        let tid = self.sreg(Sreg::TidX)?;
        let b = self.b();
        let lane = b.build_and(tid, self.i64c(31), "lane")?;
        let warp = b.build_right_shift(tid, self.i64c(5), false, "warp")?;
        let nwarps = b.build_right_shift(self.sreg(Sreg::NtidX)?, self.i64c(5), false, "nwarps")?;
        let is_lane0 = b.build_int_compare(IntPredicate::EQ, lane, self.i64c(0), "")?;
        // warp < 32 because blockDim.x <= 1024 (the launch contract).
        self.if_then(is_lane0, &mut |g| {
            g.b().build_store(g.arr_gep(arr, scratch, warp)?, v)?;
            Ok(())
        })?;
        self.cta_barrier()?;
        let init = [self.identity(k).into()];
        let total = self.for_loop("warps", self.i64c(0), nwarps, self.i64c(1), &init, &mut |g, w, acc| {
            // w < nwarps <= 32.
            let p = g.b().build_load(g.ctx().f32_type(), g.arr_gep(arr, scratch, w)?, "")?.into_float_value();
            Ok(vec![g.combine(k, acc[0].into_float_value(), p)?.into()])
        })?;
        // Nobody may overwrite the partials before every thread has read them.
        self.cta_barrier()?;
        Ok(total[0].into_float_value())
    }
}
