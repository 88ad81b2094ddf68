//! Lowering of [`Gemm`] kernels (`matmul`, `qmatmul`, `lora_linear`) to LLVM IR for the host and for NVPTX, from
//! the one description: both targets share the element loaders (A with its transpose, the weight with its transpose
//! and the NF4 dequantization, the LoRA factors); only the tiling around them differs.
//!
//! # Kernel ABI
//! Buffers are [`Gemm::buffers`]: the op's inputs, then the output, dense row-major; an NF4 weight is its storage
//! split into `packed` (u8), `absmax_codes` (u8), `absmax2` (f32), `offset` (f32\[1\]) — or `packed`, `absmax` (f32)
//! for plain scales (see `kernels::gemm`).
//! - **Host** ([`emit_host`]): `void tunec_<name>(ptr args, i32 tid, i32 nthreads)`, `args[k]` = buffer `k`. Thread
//!   `tid` of `nthreads` computes one contiguous slice of the M rows (of every batch entry); calling every `tid` in
//!   `0..nthreads` (in any order or concurrently) runs the whole kernel.
//! - **NVPTX** ([`emit_ptx`]): `.entry tunec_<name>(ptr b0, ptr b1, …)` (calling convention 71), launched with
//!   [`GPU_BLOCK_THREADS`] threads in x and the grid of [`gpu_grid`] (x over N tiles, y over M tiles).
//!
//! # Host tiling
//! Per thread: for each panel of `NR = 2·VW` output columns (`VW` = 16 lanes with AVX-512, else 8) and each block of
//! `KC` = 256 values of K, the weight panel `KC × NR` is packed into a 64-byte-aligned stack buffer — this is where
//! `tb` is undone, NF4 is dequantized (a prologue per panel, exact values) and the N edge is zero-padded. Then a
//! register-blocked micro-kernel of `MR = 6` rows × 2 vectors (12 `<VW x float>` accumulators, `llvm.fma`, K
//! innermost, A read as broadcast scalars with stride 1 or M for `ta`) runs over the thread's rows; the tile goes
//! through a small stack buffer and is stored (first K block) or added to the output. The LoRA term is the
//! epilogue of each output panel: after the last K block, `B`'s panel `r × NR` is packed and the same micro-kernel
//! computes `U·op(B)` for the tile, added as `out += s·(U·op(B))` — `B·A` is never formed.
//!
//! # NVPTX tiling
//! This first version is an **f32 SIMT** GEMM (no tensor cores yet): 256 threads compute a 64×64 output tile, each a
//! 4×4 register block; K advances by 16 through shared-memory tiles of A (64×16) and of the weight (16×64). The
//! weight tile's loads are the NF4 dequantization prologue; edge tiles are zero-filled (clamped index + select) and
//! stores are bounds-checked; the LoRA rank update runs in the epilogue per output element, reading `U` and `B`
//! from global memory, then the elementwise epilogue (`kernels::gemm::Epilogue`, when present) on the register value
//! before the stores. f32 throughout, so the GPU result has the host's tolerance.
//!
//! With [`GemmPrecision::Bf16`] the NVPTX kernel uses tensor cores instead ([`GPU_MMA_THREADS`] threads, 4 warps
//! of 2×4 `mma.sync.m16n8k16` bf16 tiles per 64×64 output tile, operands rounded to bf16 as they enter shared
//! memory); the host kernel rounds A and the packed weight panel the same way, so both targets compute the same
//! products (f32 sums in another order).
//!
//! # Host epilogues
//! The host kernel is a thin wrapper around a module-internal GEMM *core* shared by GEMMs that differ only in their
//! epilogue ([`emit_host`]); the core calls the kernel's epilogue hook on each output panel once it is final (all K
//! blocks and the LoRA term added), and the hook rewrites the panel in place through the epilogue's loop nest.
//!
//! # Numerics
//! f32 accumulation with fused multiply-adds; NF4 dequantization is separately rounded `(map[c]·absmax2) + offset`
//! then `nf4[q]·absmax`, exactly `ir::nf4::dequantize` (no contraction: no fast-math flags).

use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::targets::TargetMachine;
use inkwell::types::{BasicType, FloatType};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValue, BasicValueEnum, FloatValue, FunctionValue, GlobalValue, IntValue, PointerValue,
    VectorValue,
};
use inkwell::{AddressSpace, IntPredicate};
use kernels::gemm::{BufIx, Gemm, GemmPrecision, WeightFormat};
use kernels::{KernelError, Sreg};

use crate::emit::{kernel_fn, Emit, Kr, Nf4Parts, Nf4Tables};
use crate::lower::Flavor;
use crate::CodegenError;

/// Host micro-kernel rows.
pub const HOST_MR: usize = 6;
/// Host K block (values of K per packed weight panel).
pub const HOST_KC: usize = 256;
/// Threads per block of the NVPTX kernel (x dimension only).
pub const GPU_BLOCK_THREADS: u32 = 256;
/// Threads per block of the bf16 tensor-core NVPTX kernel (4 warps).
pub const GPU_MMA_THREADS: u32 = 128;

/// The NVPTX kernel's block size (x) for `g`.
pub fn gpu_block_threads(g: &Gemm) -> u32 {
    match g.precision {
        GemmPrecision::F32 => GPU_BLOCK_THREADS,
        GemmPrecision::Bf16 => GPU_MMA_THREADS,
    }
}
/// Output tile of one NVPTX block: rows and columns.
pub const GPU_TILE_M: usize = 64;
pub const GPU_TILE_N: usize = 64;
/// K step of the NVPTX kernel's shared-memory tiles.
pub const GPU_TILE_K: usize = 16;
const GPU_TM: usize = 4;
const GPU_TN: usize = 4;

/// The NVPTX launch grid for `g`: (x, y) = (N tiles, M tiles); the block is `GPU_BLOCK_THREADS × 1 × 1`.
pub fn gpu_grid(g: &Gemm) -> (u32, u32) {
    (g.n.div_ceil(GPU_TILE_N) as u32, g.m.div_ceil(GPU_TILE_M) as u32)
}

/// Vector lanes of the host micro-kernel: 16 where the host has AVX-512F, else 8.
pub fn host_vector_width() -> usize {
    let features = TargetMachine::get_host_cpu_features().to_string();
    if features.split(',').any(|f| f == "+avx512f") {
        16
    } else {
        8
    }
}

/// Adds the host function for `g` to `module` (see the module docs for its ABI). Optimize the module with
/// [`crate::lower::optimize_host`].
///
/// The GEMM itself is the module-internal *core* function [`host_core_symbol`], shared by every GEMM of the module
/// that differs only in its epilogue (so its compile time is paid once): `void core(ptr bufs, i32 tid, i32 nthreads,
/// ptr hook, ptr hook_args)` over the buffers `[a, w…, u, b, out]`; after each output panel is final it calls
/// `hook(hook_args, bt, row0, row1, n0, ncols)` when `hook` is not null. The kernel itself passes its own buffers to
/// the core and, with an epilogue, a hook that applies it to the panel in place.
pub fn emit_host<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    g: &Gemm,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    Ok(host_kernel(ctx, module, g)?)
}

fn host_kernel<'ctx>(ctx: &'ctx Context, module: &Module<'ctx>, g: &Gemm) -> Kr<FunctionValue<'ctx>> {
    let core_g = Gemm { epilogue: None, ..g.clone() };
    let core_sym = host_core_symbol(g);
    let ptr = ctx.ptr_type(AddressSpace::default());
    let (i32t, i64t) = (ctx.i32_type(), ctx.i64_type());
    let core = match module.get_function(&core_sym) {
        Some(f) => f,
        None => {
            let ty = ctx.void_type().fn_type(&[ptr.into(), i32t.into(), i32t.into(), ptr.into(), ptr.into()], false);
            let f = module.add_function(&core_sym, ty, Some(Linkage::Internal));
            let b = ctx.create_builder();
            b.position_at_end(ctx.append_basic_block(f, "entry"));
            let bufs = load_buffers(ctx, &b, f, core_g.buffers().len())?;
            let hook = Some((
                f.get_nth_param(3).expect("hook").into_pointer_value(),
                f.get_nth_param(4).expect("args").into_pointer_value(),
            ));
            let tables = nf4_tables(ctx, module, &core_g, &core_sym, Flavor::Host);
            let mut gen = Gen { ctx, module, b, func: f, g: &core_g, ix: core_g.buf_ix(), bufs, tables, hook };
            gen.host(host_vector_width())?;
            gen.b.build_return(None)?;
            host_attributes(ctx, f);
            // Compiled once, not once more per kernel that calls it (with its hook inlined).
            f.add_attribute(
                AttributeLoc::Function,
                ctx.create_enum_attribute(Attribute::get_named_enum_kind_id("noinline"), 0),
            );
            f
        }
    };
    let name = g.symbol();
    let hook = match &g.epilogue {
        None => None,
        Some(_) => {
            let ty = ctx
                .void_type()
                .fn_type(&[ptr.into(), i64t.into(), i64t.into(), i64t.into(), i64t.into(), i64t.into()], false);
            let f = module.add_function(&format!("{name}_epilogue"), ty, Some(Linkage::Internal));
            let b = ctx.create_builder();
            b.position_at_end(ctx.append_basic_block(f, "entry"));
            let bufs = load_buffers(ctx, &b, f, g.buffers().len())?;
            let mut gen = Gen { ctx, module, b, func: f, g, ix: g.buf_ix(), bufs, tables: None, hook: None };
            gen.host_epilogue()?;
            gen.b.build_return(None)?;
            host_attributes(ctx, f);
            f.add_attribute(
                AttributeLoc::Function,
                ctx.create_enum_attribute(Attribute::get_named_enum_kind_id("noinline"), 0),
            );
            Some(f)
        }
    };
    let (func, b, bufs) = kernel_fn(ctx, module, &name, g.buffers().len(), Flavor::Host)?;
    let (ix, core_ix) = (g.buf_ix(), core_g.buf_ix());
    let n_core = core_g.buffers().len();
    let local = b.build_array_alloca(ptr, i64t.const_int(n_core as u64, false), "core_bufs")?;
    for i in 0..n_core {
        let v = if i == core_ix.out { bufs[ix.out] } else { bufs[i] };
        // SAFETY: `local` holds n_core pointers.
        let slot = unsafe { b.build_in_bounds_gep(ptr, local, &[i64t.const_int(i as u64, false)], "")? };
        b.build_store(slot, v)?;
    }
    let p = |k: u32| func.get_nth_param(k).expect("kernel param");
    let hook_ptr = hook.map_or(ptr.const_null(), |h| h.as_global_value().as_pointer_value());
    b.build_call(core, &[local.into(), p(1).into(), p(2).into(), hook_ptr.into(), p(0).into()], "")?;
    b.build_return(None)?;
    host_attributes(ctx, func);
    Ok(func)
}

/// The module-internal symbol of `g`'s host core (see [`emit_host`]): equal for GEMMs that differ only in name and
/// epilogue.
pub fn host_core_symbol(g: &Gemm) -> String {
    let core = Gemm { name: String::new(), epilogue: None, ..g.clone() };
    // FNV-1a over the description: stable across runs and processes.
    let h =
        format!("{core:?}").bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("tunec_gemm_core_{h:016x}")
}

/// The JIT (MCJIT) and AOT paths compile for the host CPU only when the function says so.
fn host_attributes<'ctx>(ctx: &'ctx Context, f: FunctionValue<'ctx>) {
    let cpu = TargetMachine::get_host_cpu_name().to_string();
    let features = TargetMachine::get_host_cpu_features().to_string();
    f.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-cpu", &cpu));
    f.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-features", &features));
}

/// Loads the `n` buffer pointers from `f`'s first parameter (an array of pointers).
fn load_buffers<'ctx>(
    ctx: &'ctx Context,
    b: &Builder<'ctx>,
    f: FunctionValue<'ctx>,
    n: usize,
) -> Kr<Vec<PointerValue<'ctx>>> {
    let ptr = ctx.ptr_type(AddressSpace::default());
    let args = f.get_nth_param(0).expect("args param").into_pointer_value();
    (0..n)
        .map(|k| {
            // SAFETY: `args` holds one pointer per buffer (the ABI); k < n.
            let slot = unsafe { b.build_in_bounds_gep(ptr, args, &[ctx.i64_type().const_int(k as u64, false)], "")? };
            Ok(b.build_load(ptr, slot, &format!("buf{k}"))?.into_pointer_value())
        })
        .collect()
}

fn nf4_tables<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    g: &Gemm,
    name: &str,
    flavor: Flavor,
) -> Option<Nf4Tables<'ctx>> {
    match g.weight {
        WeightFormat::F32 => None,
        WeightFormat::Nf4 { double_quant, .. } => {
            Some(Nf4Tables::new(ctx, module, name, double_quant.is_some(), flavor))
        }
    }
}

/// Adds the `ptx_kernel` function for `g` to `module` (lower the module with [`crate::ptx::emit_ptx`]).
pub fn emit_ptx<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    g: &Gemm,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    Ok(emit(ctx, module, g)?)
}

/// PTX text for `g` alone, for `sm`.
pub fn gemm_to_ptx(g: &Gemm, sm: u32) -> Result<String, CodegenError> {
    let ctx = Context::create();
    let module = ctx.create_module(&g.symbol());
    emit_ptx(&ctx, &module, g)?;
    crate::ptx::emit_ptx(&module, sm)
}

struct Gen<'a, 'ctx> {
    ctx: &'ctx Context,
    module: &'a Module<'ctx>,
    b: Builder<'ctx>,
    func: FunctionValue<'ctx>,
    g: &'a Gemm,
    ix: BufIx,
    bufs: Vec<PointerValue<'ctx>>,
    /// The NF4 codebook (16 f32) and, for double quantization, the signed dynamic map (256 f32).
    tables: Option<Nf4Tables<'ctx>>,
    /// The host core's panel hook and its argument (see [`emit_host`]).
    hook: Option<(PointerValue<'ctx>, PointerValue<'ctx>)>,
}

/// The NVPTX kernel for `g`.
fn emit<'ctx>(ctx: &'ctx Context, module: &Module<'ctx>, g: &Gemm) -> Kr<FunctionValue<'ctx>> {
    let name = g.symbol();
    let (func, b, bufs) = kernel_fn(ctx, module, &name, g.buffers().len(), Flavor::Nvptx)?;
    let tables = nf4_tables(ctx, module, g, &name, Flavor::Nvptx);
    let mut gen = Gen { ctx, module, b, func, g, ix: g.buf_ix(), bufs, tables, hook: None };
    gen.nvptx()?;
    gen.b.build_return(None)?;
    Ok(func)
}

/// Where the micro-kernel reads its A operand: per-row base pointers and the element stride along K.
struct ARows<'ctx> {
    rows: Vec<PointerValue<'ctx>>,
    stride: IntValue<'ctx>,
    /// Round each A value to bf16 as it is read ([`GemmPrecision::Bf16`]).
    round: bool,
}

impl<'ctx> Emit<'ctx> for Gen<'_, 'ctx> {
    /// Every loop here counts up from a non-negative start.
    const UNSIGNED_LOOPS: bool = true;

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
    fn f32t(&self) -> FloatType<'ctx> {
        self.ctx.f32_type()
    }

    fn add(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Kr<IntValue<'ctx>> {
        Ok(self.b.build_int_nuw_add(a, b, "")?)
    }
    fn mul(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Kr<IntValue<'ctx>> {
        Ok(self.b.build_int_nuw_mul(a, b, "")?)
    }
    fn mulc(&self, a: IntValue<'ctx>, c: usize) -> Kr<IntValue<'ctx>> {
        self.mul(a, self.i64c(c as u64))
    }
    fn ult(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Kr<IntValue<'ctx>> {
        Ok(self.b.build_int_compare(IntPredicate::ULT, a, b, "")?)
    }

    fn fma(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>, c: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let f = self.intrinsic("llvm.fma", &[self.f32t().as_basic_type_enum()])?;
        Ok(self.call(f, &[a.into(), b.into(), c.into()])?.into_float_value())
    }

    // ---- The shared element loaders (both targets) ----

    /// `op_a(A[bt])[i, k]`.
    fn load_a(&self, bt: IntValue<'ctx>, i: IntValue<'ctx>, k: IntValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let g = self.g;
        let e = if g.ta { self.add(self.mulc(k, g.m)?, i)? } else { self.add(self.mulc(i, g.k)?, k)? };
        let e = self.add(self.mulc(bt, g.m * g.k)?, e)?;
        self.ld_f32(self.bufs[self.ix.a], e)
    }

    /// `op_b(W[bt])[k, n]`: an f32 load, or the NF4 dequantization of that element.
    fn load_w(&self, bt: IntValue<'ctx>, k: IntValue<'ctx>, n: IntValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let g = self.g;
        let e = if g.tb { self.add(self.mulc(n, g.k)?, k)? } else { self.add(self.mulc(k, g.n)?, n)? };
        match g.weight {
            WeightFormat::F32 => {
                let e = self.add(self.mulc(bt, g.k * g.n)?, e)?;
                self.ld_f32(self.bufs[self.ix.w], e)
            }
            WeightFormat::Nf4 { block, double_quant } => self.dequant(e, block, double_quant),
        }
    }

    /// Element `e` (row-major) of the NF4 weight, exactly as `ir::nf4::dequantize`.
    fn dequant(&self, e: IntValue<'ctx>, block: usize, double_quant: Option<usize>) -> Kr<FloatValue<'ctx>> {
        let ix = self.ix;
        let parts = Nf4Parts {
            packed: self.bufs[ix.w],
            absmax: self.bufs[ix.absmax.expect("absmax buffer")],
            double: double_quant
                .map(|_| (self.bufs[ix.absmax2.expect("absmax2")], self.bufs[ix.offset.expect("offset")])),
        };
        self.nf4_dequant(e, parts, self.tables.expect("NF4 tables"), block, double_quant)
    }

    /// `op_b(B)[p, n]` of the LoRA term.
    fn load_lora_b(&self, p: IntValue<'ctx>, n: IntValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let (g, r) = (self.g, self.g.lora.expect("lora").rank);
        let e = if g.tb { self.add(self.mulc(n, r)?, p)? } else { self.add(self.mulc(p, g.n)?, n)? };
        self.ld_f32(self.bufs[self.ix.lb.expect("lora b")], e)
    }

    /// `U[i, p]` of the LoRA term.
    fn load_u(&self, i: IntValue<'ctx>, p: IntValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let r = self.g.lora.expect("lora").rank;
        self.ld_f32(self.bufs[self.ix.u.expect("lora u")], self.add(self.mulc(i, r)?, p)?)
    }

    /// The elementwise epilogue at output element `lin` (over the whole batch) whose GEMM result is `v`.
    fn epilogue(&mut self, lin: IntValue<'ctx>, v: FloatValue<'ctx>, flavor: Flavor) -> Kr<()> {
        let e = self.g.epilogue.as_ref().expect("an epilogue");
        let bufs = self.g.epilogue_buffers().into_iter().map(|k| self.bufs[k]).collect();
        crate::lower::emit_epilogue_element(
            self.ctx,
            self.module,
            self.func,
            &self.b,
            &e.nest,
            bufs,
            e.acc,
            lin,
            v,
            flavor,
        )
    }

    /// The bits of `v` rounded to bf16 (round to nearest even; inputs are finite), as an i32 holding the 16 bits.
    fn bf16_bits(&self, v: FloatValue<'ctx>) -> Kr<IntValue<'ctx>> {
        let (b, i32t) = (&self.b, self.ctx.i32_type());
        let bits = b.build_bit_cast(v, i32t, "")?.into_int_value();
        let lsb = b.build_and(
            b.build_right_shift(bits, i32t.const_int(16, false), false, "")?,
            i32t.const_int(1, false),
            "",
        )?;
        let biased = b.build_int_add(bits, b.build_int_add(lsb, i32t.const_int(0x7fff, false), "")?, "")?;
        Ok(b.build_right_shift(biased, i32t.const_int(16, false), false, "")?)
    }

    /// `v` rounded to bf16 and back to f32.
    fn round_bf16(&self, v: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        let hi = self.b.build_left_shift(self.bf16_bits(v)?, self.ctx.i32_type().const_int(16, false), "")?;
        Ok(self.b.build_bit_cast(hi, self.f32t(), "")?.into_float_value())
    }

    /// A product operand as the GEMM's precision sees it.
    fn operand(&self, v: FloatValue<'ctx>) -> Kr<FloatValue<'ctx>> {
        match self.g.precision {
            GemmPrecision::F32 => Ok(v),
            GemmPrecision::Bf16 => self.round_bf16(v),
        }
    }

    // ---- Host ----

    fn host(&mut self, vw: usize) -> Kr<()> {
        let g = self.g;
        let nr = 2 * vw;
        let (m, n, k) = (self.i64c(g.m as u64), self.i64c(g.n as u64), self.i64c(g.k as u64));
        let (mstart, mend) = self.host_slice(m)?;
        let kc_max = if let Some(l) = g.lora { HOST_KC.max(l.rank) } else { HOST_KC };
        let pack_ty = self.f32t().array_type((kc_max * nr) as u32);
        let pack = self.b.build_alloca(pack_ty, "bpack")?;
        pack.as_instruction().expect("alloca").set_alignment(64).map_err(|_| KernelError::MissingIntrinsic("align"))?;
        let tile = self.b.build_alloca(self.f32t().array_type((HOST_MR * nr) as u32), "ctile")?;
        tile.as_instruction().expect("alloca").set_alignment(64).map_err(|_| KernelError::MissingIntrinsic("align"))?;
        let has_rows = self.ult(mstart, mend)?;
        self.if_then(has_rows, &mut |s| {
            s.for_loop("bt", s.i64c(0), s.i64c(g.batch as u64), s.i64c(1), &[], &mut |s, bt, _| {
                s.for_loop("n0", s.i64c(0), n, s.i64c(nr as u64), &[], &mut |s, n0, _| {
                    let ncols = s.umin(s.i64c(nr as u64), s.b.build_int_sub(n, n0, "")?)?;
                    s.for_loop("k0", s.i64c(0), k, s.i64c(HOST_KC as u64), &[], &mut |s, k0, _| {
                        let kc = s.umin(s.i64c(HOST_KC as u64), s.b.build_int_sub(k, k0, "")?)?;
                        s.pack(pack, nr, k0, kc, n0, ncols, g.tb, &|s, kk, nn| s.operand(s.load_w(bt, kk, nn)?))?;
                        let first = s.b.build_int_compare(IntPredicate::EQ, k0, s.i64c(0), "first")?;
                        s.row_groups(mstart, mend, &mut |s, i0, rows| {
                            let a = s.a_rows(bt, &rows, k0)?;
                            let acc = s.micro(vw, pack, &a, kc)?;
                            s.store_tile(vw, tile, &acc, bt, i0, mend, n0, ncols, Epi::Base { first })
                        })?;
                        Ok(vec![])
                    })?;
                    if let Some(l) = g.lora {
                        let r = s.i64c(l.rank as u64);
                        s.pack(pack, nr, s.i64c(0), r, n0, ncols, g.tb, &|s, p, nn| s.load_lora_b(p, nn))?;
                        s.row_groups(mstart, mend, &mut |s, i0, rows| {
                            let mut ptrs = Vec::with_capacity(rows.len());
                            for &row in &rows {
                                ptrs.push(s.gep(s.f32t(), s.bufs[s.ix.u.expect("u")], s.mulc(row, l.rank)?)?);
                            }
                            let u = ARows { rows: ptrs, stride: s.i64c(1), round: false };
                            let acc = s.micro(vw, pack, &u, r)?;
                            s.store_tile(vw, tile, &acc, bt, i0, mend, n0, ncols, Epi::Lora { s: l.s })
                        })?;
                    }
                    if let Some((hook, hook_args)) = s.hook {
                        // The panel is final: the kernel's epilogue, if any.
                        let set = s.b.build_is_not_null(hook, "")?;
                        s.if_then(set, &mut |s| {
                            let i64t = s.ctx.i64_type();
                            let ty = s.ctx.void_type().fn_type(
                                &[
                                    hook_args.get_type().into(),
                                    i64t.into(),
                                    i64t.into(),
                                    i64t.into(),
                                    i64t.into(),
                                    i64t.into(),
                                ],
                                false,
                            );
                            let args =
                                [hook_args.into(), bt.into(), mstart.into(), mend.into(), n0.into(), ncols.into()];
                            s.b.build_indirect_call(ty, hook, &args, "")?;
                            Ok(())
                        })?;
                    }
                    Ok(vec![])
                })?;
                Ok(vec![])
            })?;
            Ok(())
        })
    }

    /// The body of a kernel's epilogue hook (see [`emit_host`]): the epilogue over rows `[row0, row1)` and columns
    /// `[n0, n0 + ncols)` of batch entry `bt`, in place over the GEMM result in [`BufIx::out`].
    fn host_epilogue(&mut self) -> Kr<()> {
        let g = self.g;
        let p = |k: u32| self.func.get_nth_param(k).expect("hook param").into_int_value();
        let (bt, row0, row1, n0, ncols) = (p(1), p(2), p(3), p(4), p(5));
        self.for_loop("pr", row0, row1, self.i64c(1), &[], &mut |s, row, _| {
            let base = s.add(s.mulc(bt, g.m * g.n)?, s.add(s.mulc(row, g.n)?, n0)?)?;
            s.for_loop("pc", s.i64c(0), ncols, s.i64c(1), &[], &mut |s, j, _| {
                let lin = s.add(base, j)?;
                let v = s.ld_f32(s.bufs[s.ix.out], lin)?;
                s.epilogue(lin, v, Flavor::Host)?;
                Ok(vec![])
            })?;
            Ok(vec![])
        })?;
        Ok(())
    }

    /// Packs `op(k0 + kk, n0 + jj)` for kk < kc, jj < nr into `pack[kk·nr + jj]`, zero for jj ≥ ncols. The loop
    /// order follows the source layout (`by_col`: K is contiguous).
    #[allow(clippy::too_many_arguments)]
    fn pack(
        &mut self,
        pack: PointerValue<'ctx>,
        nr: usize,
        k0: IntValue<'ctx>,
        kc: IntValue<'ctx>,
        n0: IntValue<'ctx>,
        ncols: IntValue<'ctx>,
        by_col: bool,
        load: &dyn Fn(&Self, IntValue<'ctx>, IntValue<'ctx>) -> Kr<FloatValue<'ctx>>,
    ) -> Kr<()> {
        let nlast = self.i64c(self.g.n as u64 - 1);
        let one = |s: &mut Self, kk: IntValue<'ctx>, jj: IntValue<'ctx>| -> Kr<()> {
            let nn = s.umin(s.add(n0, jj)?, nlast)?;
            let v = load(s, s.add(k0, kk)?, nn)?;
            let v = s.select_f(s.ult(jj, ncols)?, v, s.f32c(0.0))?;
            s.st_f32(pack, s.add(s.mulc(kk, nr)?, jj)?, v)
        };
        let (one_c, nr_c) = (self.i64c(1), self.i64c(nr as u64));
        if by_col {
            self.for_loop("pj", self.i64c(0), nr_c, one_c, &[], &mut |s, jj, _| {
                s.for_loop("pk", s.i64c(0), kc, one_c, &[], &mut |s, kk, _| one(s, kk, jj).map(|_| vec![]))?;
                Ok(vec![])
            })?;
        } else {
            self.for_loop("pk", self.i64c(0), kc, one_c, &[], &mut |s, kk, _| {
                s.for_loop("pj", s.i64c(0), nr_c, one_c, &[], &mut |s, jj, _| one(s, kk, jj).map(|_| vec![]))?;
                Ok(vec![])
            })?;
        }
        Ok(())
    }

    /// Loops over the thread's rows in groups of `HOST_MR`; `body` gets the group's first row and its `HOST_MR` row
    /// indices, clamped to the last row (the extra rows of an edge group are computed but not stored).
    #[allow(clippy::type_complexity)]
    fn row_groups(
        &mut self,
        mstart: IntValue<'ctx>,
        mend: IntValue<'ctx>,
        body: &mut dyn FnMut(&mut Self, IntValue<'ctx>, Vec<IntValue<'ctx>>) -> Kr<()>,
    ) -> Kr<()> {
        self.for_loop("i0", mstart, mend, self.i64c(HOST_MR as u64), &[], &mut |s, i0, _| {
            let last = s.b.build_int_sub(mend, s.i64c(1), "")?;
            let rows = (0..HOST_MR).map(|r| s.umin(s.add(i0, s.i64c(r as u64))?, last)).collect::<Kr<Vec<_>>>()?;
            body(s, i0, rows)?;
            Ok(vec![])
        })?;
        Ok(())
    }

    /// Base pointers of `op_a(A[bt])[row, k0..]` for each row, and the stride along K.
    fn a_rows(&self, bt: IntValue<'ctx>, rows: &[IntValue<'ctx>], k0: IntValue<'ctx>) -> Kr<ARows<'ctx>> {
        let g = self.g;
        let base = self.gep(self.f32t(), self.bufs[self.ix.a], self.mulc(bt, g.m * g.k)?)?;
        let mut out = Vec::with_capacity(rows.len());
        for &row in rows {
            let e = if g.ta { self.add(row, self.mulc(k0, g.m)?)? } else { self.add(self.mulc(row, g.k)?, k0)? };
            out.push(self.gep(self.f32t(), base, e)?);
        }
        let round = g.precision == GemmPrecision::Bf16;
        Ok(ARows { rows: out, stride: self.i64c(if g.ta { g.m } else { 1 } as u64), round })
    }

    /// The register-blocked micro-kernel: `HOST_MR` rows × 2 vectors of `vw` lanes, over `kc` values of K.
    fn micro(
        &mut self,
        vw: usize,
        pack: PointerValue<'ctx>,
        a: &ARows<'ctx>,
        kc: IntValue<'ctx>,
    ) -> Kr<Vec<VectorValue<'ctx>>> {
        let vt = self.f32t().vec_type(vw as u32);
        let zero = vt.const_zero();
        let init: Vec<BasicValueEnum> = (0..HOST_MR * 2).map(|_| zero.into()).collect();
        let fma = self.intrinsic("llvm.fma", &[vt.as_basic_type_enum()])?;
        let splat_mask = self.ctx.i32_type().vec_type(vw as u32).const_zero();
        let nr = 2 * vw;
        let acc = self.for_loop("kk", self.i64c(0), kc, self.i64c(1), &init, &mut |s, kk, acc| {
            let mut bv = Vec::with_capacity(2);
            for v in 0..2 {
                let p = s.gep(s.f32t(), pack, s.add(s.mulc(kk, nr)?, s.i64c((v * vw) as u64))?)?;
                let l = s.b.build_load(vt, p, "")?;
                l.as_instruction_value()
                    .expect("load")
                    .set_alignment(4 * vw as u32)
                    .map_err(|_| KernelError::MissingIntrinsic("align"))?;
                bv.push(l.into_vector_value());
            }
            let off = s.mul(kk, a.stride)?;
            let mut next = Vec::with_capacity(acc.len());
            for (r, &row) in a.rows.iter().enumerate() {
                let x = s.ld_f32(row, off)?;
                let x = if a.round { s.round_bf16(x)? } else { x };
                let ins = s.b.build_insert_element(vt.get_poison(), x, s.ctx.i32_type().const_zero(), "")?;
                let xs = s.b.build_shuffle_vector(ins, vt.get_poison(), splat_mask, "")?;
                for v in 0..2 {
                    let c = acc[r * 2 + v].into_vector_value();
                    next.push(s.call(fma, &[xs.into(), bv[v].into(), c.into()])?);
                }
            }
            Ok(next)
        })?;
        Ok(acc.into_iter().map(|v| v.into_vector_value()).collect())
    }

    /// Writes the micro-kernel's tile to the output through the stack tile: rows `i0..min(i0 + MR, mend)`, columns
    /// `n0..n0 + ncols`.
    #[allow(clippy::too_many_arguments)]
    fn store_tile(
        &mut self,
        vw: usize,
        tile: PointerValue<'ctx>,
        acc: &[VectorValue<'ctx>],
        bt: IntValue<'ctx>,
        i0: IntValue<'ctx>,
        mend: IntValue<'ctx>,
        n0: IntValue<'ctx>,
        ncols: IntValue<'ctx>,
        epi: Epi<'ctx>,
    ) -> Kr<()> {
        let nr = 2 * vw;
        for (i, v) in acc.iter().enumerate() {
            let p = self.gep(self.f32t(), tile, self.i64c((i * vw) as u64))?;
            let st = self.b.build_store(p, *v)?;
            st.set_alignment(4 * vw as u32).map_err(|_| KernelError::MissingIntrinsic("align"))?;
        }
        let g = self.g;
        let out = self.gep(self.f32t(), self.bufs[self.ix.out], self.mulc(bt, g.m * g.n)?)?;
        let nrows = self.umin(self.i64c(HOST_MR as u64), self.b.build_int_sub(mend, i0, "")?)?;
        let one = self.i64c(1);
        self.for_loop("er", self.i64c(0), nrows, one, &[], &mut |s, r, _| {
            let crow = s.gep(s.f32t(), out, s.add(s.mulc(s.add(i0, r)?, g.n)?, n0)?)?;
            let trow = s.gep(s.f32t(), tile, s.mulc(r, nr)?)?;
            s.for_loop("ej", s.i64c(0), ncols, one, &[], &mut |s, j, _| {
                let t = s.ld_f32(trow, j)?;
                let c = s.ld_f32(crow, j)?;
                let v = match epi {
                    Epi::Base { first } => {
                        let c = s.select_f(first, s.f32c(0.0), c)?;
                        s.b.build_float_add(c, t, "")?
                    }
                    Epi::Lora { s: scale } => s.fma(s.f32c(scale), t, c)?,
                };
                s.st_f32(crow, j, v)?;
                Ok(vec![])
            })?;
            Ok(vec![])
        })?;
        Ok(())
    }

    // ---- NVPTX ----

    fn shared(&self, suffix: &str, len: usize) -> GlobalValue<'ctx> {
        let ty = self.f32t().array_type(len as u32);
        let gl = self.module.add_global(ty, Some(AddressSpace::from(3u16)), &format!("{}_{suffix}", self.g.symbol()));
        gl.set_linkage(Linkage::Internal);
        gl.set_initializer(&ty.get_undef());
        gl.set_alignment(16);
        gl
    }

    fn nvptx(&mut self) -> Kr<()> {
        if self.g.precision == GemmPrecision::Bf16 {
            return self.nvptx_mma();
        }
        let g = self.g;
        let (bm, bn, bk) = (GPU_TILE_M, GPU_TILE_N, GPU_TILE_K);
        let nthreads = GPU_BLOCK_THREADS as usize;
        let a_sh = self.shared("as", bk * bm).as_pointer_value();
        let b_sh = self.shared("bs", bk * bn).as_pointer_value();
        let tid = self.sreg(Sreg::TidX)?;
        let tx = self.b.build_and(tid, self.i64c(15), "tx")?;
        let ty = self.b.build_right_shift(tid, self.i64c(4), false, "ty")?;
        let m0 = self.mulc(self.sreg(Sreg::CtaIdY)?, bm)?;
        let n0 = self.mulc(self.sreg(Sreg::CtaIdX)?, bn)?;
        let k = self.i64c(g.k as u64);
        let one = self.i64c(1);
        self.for_loop("bt", self.i64c(0), self.i64c(g.batch as u64), one, &[], &mut |s, bt, _| {
            let init: Vec<BasicValueEnum> = (0..GPU_TM * GPU_TN).map(|_| s.f32c(0.0).into()).collect();
            let acc = s.for_loop("k0", s.i64c(0), k, s.i64c(bk as u64), &init, &mut |s, k0, acc| {
                // Prologue: the A tile and the weight tile (NF4 dequantized here) into shared memory.
                s.load_tiles(
                    bt,
                    k0,
                    tid,
                    nthreads,
                    m0,
                    n0,
                    &mut |s, row, kk, v| s.st_f32(a_sh, s.add(s.mulc(kk, bm)?, row)?, v),
                    &mut |s, col, kk, v| s.st_f32(b_sh, s.add(s.mulc(kk, bn)?, col)?, v),
                )?;
                s.cta_barrier()?;
                let mut acc: Vec<FloatValue> = acc.iter().map(|v| v.into_float_value()).collect();
                let (ar, bc) = (s.mulc(ty, GPU_TM)?, s.mulc(tx, GPU_TN)?);
                for kk in 0..bk {
                    let av = (0..GPU_TM)
                        .map(|i| s.ld_f32(a_sh, s.add(s.i64c((kk * bm + i) as u64), ar)?))
                        .collect::<Kr<Vec<_>>>()?;
                    let bv = (0..GPU_TN)
                        .map(|j| s.ld_f32(b_sh, s.add(s.i64c((kk * bn + j) as u64), bc)?))
                        .collect::<Kr<Vec<_>>>()?;
                    for i in 0..GPU_TM {
                        for j in 0..GPU_TN {
                            acc[i * GPU_TN + j] = s.fma(av[i], bv[j], acc[i * GPU_TN + j])?;
                        }
                    }
                }
                s.cta_barrier()?;
                Ok(acc.into_iter().map(|v| v.as_basic_value_enum()).collect())
            })?;
            // Epilogue: the LoRA rank update, the elementwise epilogue, bounds-checked stores.
            for i in 0..GPU_TM {
                for j in 0..GPU_TN {
                    let row = s.add(s.add(m0, s.mulc(ty, GPU_TM)?)?, s.i64c(i as u64))?;
                    let col = s.add(s.add(n0, s.mulc(tx, GPU_TN)?)?, s.i64c(j as u64))?;
                    s.finish_element(bt, row, col, acc[i * GPU_TN + j].into_float_value())?;
                }
            }
            Ok(vec![])
        })?;
        Ok(())
    }

    /// One K step's tile loads, shared by the SIMT and the tensor-core kernels: `nthreads` threads load the
    /// `GPU_TILE_M × GPU_TILE_K` tile of A at (`m0`, `k0`) and the `GPU_TILE_K × GPU_TILE_N` tile of the weight at
    /// (`k0`, `n0`) — the weight's loads are the NF4 dequantization prologue — as 0 outside the matrices (clamped
    /// index + select), and give each value to `put_a(row, kk, v)` / `put_w(col, kk, v)`. Consecutive threads read
    /// along the source's contiguous axis.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn load_tiles(
        &mut self,
        bt: IntValue<'ctx>,
        k0: IntValue<'ctx>,
        tid: IntValue<'ctx>,
        nthreads: usize,
        m0: IntValue<'ctx>,
        n0: IntValue<'ctx>,
        put_a: &mut dyn FnMut(&mut Self, IntValue<'ctx>, IntValue<'ctx>, FloatValue<'ctx>) -> Kr<()>,
        put_w: &mut dyn FnMut(&mut Self, IntValue<'ctx>, IntValue<'ctx>, FloatValue<'ctx>) -> Kr<()>,
    ) -> Kr<()> {
        let g = self.g;
        let (bm, bn, bk) = (GPU_TILE_M, GPU_TILE_N, GPU_TILE_K);
        let (m, n, k) = (self.i64c(g.m as u64), self.i64c(g.n as u64), self.i64c(g.k as u64));
        let (mlast, nlast, klast) =
            (self.i64c(g.m as u64 - 1), self.i64c(g.n as u64 - 1), self.i64c(g.k.max(1) as u64 - 1));
        // (index along M or N, kk) of element e of a tile `wide` long in M/N: K-contiguous or M/N-contiguous source.
        let split =
            |s: &Self, e: IntValue<'ctx>, wide: usize, k_contiguous: bool| -> Kr<(IntValue<'ctx>, IntValue<'ctx>)> {
                let b = &s.b;
                Ok(if k_contiguous {
                    (
                        b.build_right_shift(e, s.i64c(bk.trailing_zeros() as u64), false, "")?,
                        b.build_and(e, s.i64c(bk as u64 - 1), "")?,
                    )
                } else {
                    (
                        b.build_and(e, s.i64c(wide as u64 - 1), "")?,
                        b.build_right_shift(e, s.i64c(wide.trailing_zeros() as u64), false, "")?,
                    )
                })
            };
        for q in 0..(bm * bk) / nthreads {
            let e = self.add(tid, self.i64c((q * nthreads) as u64))?;
            let (row, kk) = split(self, e, bm, !g.ta)?;
            let (gi, gk) = (self.add(m0, row)?, self.add(k0, kk)?);
            let ok = self.b.build_and(self.ult(gi, m)?, self.ult(gk, k)?, "")?;
            let v = self.load_a(bt, self.umin(gi, mlast)?, self.umin(gk, klast)?)?;
            let v = self.select_f(ok, v, self.f32c(0.0))?;
            put_a(self, row, kk, v)?;
        }
        for q in 0..(bn * bk) / nthreads {
            let e = self.add(tid, self.i64c((q * nthreads) as u64))?;
            let (col, kk) = split(self, e, bn, g.tb)?;
            let (gn, gk) = (self.add(n0, col)?, self.add(k0, kk)?);
            let ok = self.b.build_and(self.ult(gn, n)?, self.ult(gk, k)?, "")?;
            let v = self.load_w(bt, self.umin(gk, klast)?, self.umin(gn, nlast)?)?;
            let v = self.select_f(ok, v, self.f32c(0.0))?;
            put_w(self, col, kk, v)?;
        }
        Ok(())
    }

    /// Output element (`row`, `col`) of batch entry `bt` whose product is `v`, if inside the output: the LoRA term
    /// added, the elementwise epilogue applied, stored.
    fn finish_element(
        &mut self,
        bt: IntValue<'ctx>,
        row: IntValue<'ctx>,
        col: IntValue<'ctx>,
        v: FloatValue<'ctx>,
    ) -> Kr<()> {
        let g = self.g;
        let ok = self.b.build_and(self.ult(row, self.i64c(g.m as u64))?, self.ult(col, self.i64c(g.n as u64))?, "")?;
        self.if_then(ok, &mut |s| {
            let mut v = v;
            if let Some(l) = g.lora {
                let one = s.i64c(1);
                let low =
                    s.for_loop("p", s.i64c(0), s.i64c(l.rank as u64), one, &[s.f32c(0.0).into()], &mut |s, p, a| {
                        let x = s.fma(s.load_u(row, p)?, s.load_lora_b(p, col)?, a[0].into_float_value())?;
                        Ok(vec![x.into()])
                    })?;
                v = s.fma(s.f32c(l.s), low[0].into_float_value(), v)?;
            }
            let out = s.gep(s.f32t(), s.bufs[s.ix.out], s.mulc(bt, g.m * g.n)?)?;
            let local = s.add(s.mulc(row, g.n)?, col)?;
            match &g.epilogue {
                None => s.st_f32(out, local, v),
                Some(e) => {
                    if e.store_acc {
                        s.st_f32(out, local, v)?;
                    }
                    let lin = s.add(s.mulc(bt, g.m * g.n)?, local)?;
                    s.epilogue(lin, v, Flavor::Nvptx)
                }
            }
        })
    }

    /// The bf16 tensor-core kernel ([`GemmPrecision::Bf16`]): [`GPU_MMA_THREADS`] threads (4 warps) per 64×64 output
    /// tile, each warp 32×32 as 2×4 `mma.sync.m16n8k16` bf16 tiles with f32 accumulators. K advances by 16: every
    /// thread loads 8 elements of A and 8 of the weight (the NF4 dequantization prologue), rounds them to bf16 and
    /// stores them to shared memory K-contiguous (A as [64 rows][16], the weight as [64 columns][16]), so each
    /// fragment register is one 32-bit shared load of two consecutive K values. Fragments follow the PTX ISA's
    /// m16n8k16 layout: with lane = 4·gid + tig, A regs hold rows gid / gid+8 at K 2·tig(+1) and 2·tig+8(+1); B regs
    /// K 2·tig(+1) and 2·tig+8(+1) at column gid; accumulator i is row gid + 8·(i ≥ 2), column 2·tig + (i & 1).
    fn nvptx_mma(&mut self) -> Kr<()> {
        let g = self.g;
        let (bm, bn, bk) = (GPU_TILE_M, GPU_TILE_N, GPU_TILE_K);
        let nthreads = GPU_MMA_THREADS as usize;
        let i16t = self.ctx.i16_type();
        let shared16 = |s: &Self, suffix: &str, len: usize| {
            let ty = i16t.array_type(len as u32);
            let gl = s.module.add_global(ty, Some(AddressSpace::from(3u16)), &format!("{}_{suffix}", g.symbol()));
            gl.set_linkage(Linkage::Internal);
            gl.set_initializer(&ty.get_undef());
            gl.set_alignment(16);
            gl.as_pointer_value()
        };
        let a_sh = shared16(self, "as16", bm * bk);
        let b_sh = shared16(self, "bs16", bn * bk);
        let tid = self.sreg(Sreg::TidX)?;
        let lane = self.b.build_and(tid, self.i64c(31), "lane")?;
        let warp = self.b.build_right_shift(tid, self.i64c(5), false, "warp")?;
        let gid = self.b.build_right_shift(lane, self.i64c(2), false, "gid")?;
        let tig = self.b.build_and(lane, self.i64c(3), "tig")?;
        let wm = self.mulc(self.b.build_right_shift(warp, self.i64c(1), false, "")?, 32)?;
        let wn = self.mulc(self.b.build_and(warp, self.i64c(1), "")?, 32)?;
        let m0 = self.mulc(self.sreg(Sreg::CtaIdY)?, bm)?;
        let n0 = self.mulc(self.sreg(Sreg::CtaIdX)?, bn)?;
        let k = self.i64c(g.k as u64);
        let i32t = self.ctx.i32_type();
        let mma = self.intrinsic("llvm.nvvm.mma.m16n8k16.row.col.bf16", &[])?;
        let one = self.i64c(1);
        self.for_loop("bt", self.i64c(0), self.i64c(g.batch as u64), one, &[], &mut |s, bt, _| {
            let init: Vec<BasicValueEnum> = (0..2 * 4 * 4).map(|_| s.f32c(0.0).into()).collect();
            let acc = s.for_loop("k0", s.i64c(0), k, s.i64c(bk as u64), &init, &mut |s, k0, acc| {
                // Prologue: A and the weight (NF4 dequantized here) into shared memory as bf16, K-contiguous.
                let put = |sh: PointerValue<'ctx>| {
                    move |s: &mut Self, mn: IntValue<'ctx>, kk: IntValue<'ctx>, v: FloatValue<'ctx>| -> Kr<()> {
                        let h = s.b.build_int_truncate(s.bf16_bits(v)?, i16t, "")?;
                        s.b.build_store(s.gep(i16t, sh, s.add(s.mulc(mn, bk)?, kk)?)?, h)?;
                        Ok(())
                    }
                };
                s.load_tiles(bt, k0, tid, nthreads, m0, n0, &mut put(a_sh), &mut put(b_sh))?;
                s.cta_barrier()?;
                // Fragments: 32-bit words of the shared tiles (word w holds K values 2w and 2w + 1 of a row).
                let word = |s: &Self, base: PointerValue<'ctx>, r: IntValue<'ctx>, w: usize| -> Kr<IntValue<'ctx>> {
                    let ix = s.add(s.add(s.mulc(r, bk / 2)?, tig)?, s.i64c(w as u64))?;
                    Ok(s.b.build_load(i32t, s.gep(i32t, base, ix)?, "")?.into_int_value())
                };
                let mut a_frag = vec![];
                for mi in 0..2 {
                    let r = s.add(s.add(wm, s.i64c((mi * 16) as u64))?, gid)?;
                    let r8 = s.add(r, s.i64c(8))?;
                    a_frag.push([
                        word(s, a_sh, r, 0)?,
                        word(s, a_sh, r8, 0)?,
                        word(s, a_sh, r, 4)?,
                        word(s, a_sh, r8, 4)?,
                    ]);
                }
                let mut b_frag = vec![];
                for ni in 0..4 {
                    let c = s.add(s.add(wn, s.i64c((ni * 8) as u64))?, gid)?;
                    b_frag.push([word(s, b_sh, c, 0)?, word(s, b_sh, c, 4)?]);
                }
                let mut next: Vec<BasicValueEnum> = Vec::with_capacity(acc.len());
                for (mi, a) in a_frag.iter().enumerate() {
                    for (ni, b) in b_frag.iter().enumerate() {
                        let c = &acc[(mi * 4 + ni) * 4..(mi * 4 + ni + 1) * 4];
                        let args: Vec<BasicMetadataValueEnum> = a
                            .iter()
                            .chain(b.iter())
                            .map(|&x| x.into())
                            .chain(c.iter().map(|&x| x.into_float_value().into()))
                            .collect();
                        let d = s.call(mma, &args)?.into_struct_value();
                        for i in 0..4 {
                            next.push(s.b.build_extract_value(d, i, "")?);
                        }
                    }
                }
                s.cta_barrier()?;
                Ok(next)
            })?;
            for mi in 0..2 {
                for ni in 0..4 {
                    for i in 0..4 {
                        let row = s.add(s.add(s.add(m0, wm)?, s.i64c((mi * 16 + 8 * (i / 2)) as u64))?, gid)?;
                        let col = s.add(s.add(s.add(n0, wn)?, s.i64c((ni * 8 + (i & 1)) as u64))?, s.mulc(tig, 2)?)?;
                        s.finish_element(bt, row, col, acc[(mi * 4 + ni) * 4 + i].into_float_value())?;
                    }
                }
            }
            Ok(vec![])
        })?;
        Ok(())
    }
}

/// What the host epilogue does with a tile.
#[derive(Clone, Copy)]
enum Epi<'ctx> {
    /// `out = (first ? 0 : out) + tile`.
    Base { first: IntValue<'ctx> },
    /// `out += s · tile`.
    Lora { s: f64 },
}
