//! Lowering of [`NnKernel`]s (attention and its three gradients, RoPE, embedding and its adjoint, cross-entropy,
//! linear cross-entropy and their backward ops) to LLVM IR, for the host and for NVPTX, from one description: the
//! per-item code is shared; only who runs an item (a host thread, or a GPU thread, warp or block) differs.
//!
//! # Kernel ABI
//! Buffers are [`NnKernel::buffers`]: the op's inputs in order, then its output; dense row-major f32/i32 arrays.
//! - **Host** ([`emit_host`]): `void tunec_<name>(ptr args, i32 tid, i32 nthreads)`, `args[k]` = buffer `k`. Thread
//!   `tid` takes one contiguous slice of [`Launch::host_items`]; calling every `tid` (any order, or concurrently)
//!   runs the whole kernel. Where [`Launch::zero_output_host`] is set (the scalar losses `cross_entropy` and
//!   `linear_cross_entropy`) the output must hold 0 before the call: each thread adds its rows' share atomically.
//! - **NVPTX** ([`emit_ptx`]): `.entry tunec_<name>(ptr b0, ptr b1, …)` (calling convention 71), one pointer per
//!   buffer. Blocks of [`NN_BLOCK_THREADS`] threads (block teams need exactly that), any grid
//!   ([`Launch::grid`] is a good one): the kernels grid-stride over their items by thread, warp or block
//!   ([`Launch::team`]). Where [`Launch::zero_output_gpu`] is set (`embedding_bwd`, the scalar losses) the output must
//!   be zeroed before the launch (`cuMemsetD32`): the kernel accumulates with `red.add.f32`.
//!
//! # Algorithms
//! - Attention (flash style, no T×T matrix anywhere): GQA (query head h reads kv head h / (H/KV)), masking as the
//!   interpreter: key j is visible from row i iff their segment ids are equal and (j ≤ i when causal).
//!   On the GPU, per (batch, head, query row) an online softmax over the visible keys (running max and sum, one key
//!   at a time); one warp owns a query row, its lanes split the head dim, dot products are warp shuffles. The
//!   backward recomputes the softmax per row: a first pass gives the row's max m, sum l and D = Σ_j p_j·dp_j (online,
//!   like l), a second pass recomputes p_j = exp(s_j − m)/l and ds_j = p_j·(dp_j − D). dq is per query row. dk and dv
//!   accumulate over every query row of every query head sharing the kv head: the GPU runs one block per (batch,
//!   kv head), which zeroes the slab, then its warps take query rows and add with `red.add.f32` (no memset needed;
//!   parallelism is B·KV blocks).
//!   On the host, vectors of `gemm::host_vector_width` lanes: a thread's item is a (batch, head) — a (batch, kv
//!   head) for dk and dv, so the thread owns the gradient's slab — and it first packs the kv head's Kᵀ (and Vᵀ) into a
//!   malloc'ed scratch (once per kv head: consecutive heads share it). Then blocks of 8 query rows: the scores of a
//!   vector of keys at a time (Σ_d q_d·Kᵀ[d, j..j+16] with AVX-512, the 8 rows register-blocked, masked to −∞), per
//!   row the max m, p = exp(s − m) and l = Σ p in a row of scratch (passes over the block's ≤ T scores, no online
//!   rescaling); the forward then forms o = Σ_j p_j·v_j / l with vectors over the head dim (v rows read in place).
//!   The backward normalizes p, computes dp = dout·Vᵀ like the scores, D = Σ p·dp and ds = scale·p·(dp − D) in the
//!   same scratch, then dq = Σ_j ds_j·k_j (as the forward's product), or accumulates dkᵀ += q·ds / dvᵀ += dout·p
//!   (vectors over keys) into a transposed slab written out at the item's end.
//! - RoPE: one thread per rotated pair; angles as HF (and the interpreter, f32 mode) compute them: inv_freq in f32
//!   (baked in as a table computed by the same Rust expression), pos·inv_freq in f32; cos/sin of that f32 angle in
//!   f64 (Cody–Waite reduction, fdlibm kernels) rounded to f32, the rotation in f64 rounded once.
//! - Cross-entropy (and its backward) take one block per row: max, Σexp, and the label's logit.
//! - Linear cross-entropy never materializes [N,V]: per row, each lane walks its vocabulary rows with an online
//!   logsumexp of h·W_v (computed on the fly), then the lanes combine (max, sum) pairs. The backward recomputes the
//!   logsumexp, then goes over the vocabulary in chunks of one block (one row on the host): each lane computes one
//!   dlogit, the chunk's dlogits go to shared memory, and the lanes accumulate Σ_v dlogit_v·W_v into their columns
//!   of dh. (The `chunk` attribute is not needed by this schedule.)
//!
//! # Numerics
//! f32 throughout (except RoPE, above), `exp`/`log` as the Cephes-style polynomials of `lower` (host attention: the
//! same `expf` on vectors, with fused multiply-adds). Labels and token ids must lie in range (or equal
//! `ignore_index`), as the interpreter requires; out-of-range ones never read out of bounds (they read row 0 / write
//! nothing).

use inkwell::attributes::{Attribute, AttributeLoc};
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::targets::TargetMachine;
use inkwell::types::{BasicTypeEnum, FunctionType, VectorType};
use inkwell::values::{
    BasicMetadataValueEnum, BasicValue, BasicValueEnum, FastMathFlags, FloatValue, FunctionValue, GlobalValue,
    IntValue, PointerValue, VectorValue,
};
use inkwell::{AddressSpace, AtomicOrdering, FloatPredicate, IntPredicate};
use ir::AttnArg;
use kernels::nn::{Launch, NnKernel, NnOp, Team, NN_BLOCK_THREADS};
use kernels::{KernelError, Sreg};

use crate::emit::{kernel_fn, Emit, Kr, Red};
pub use crate::lower::Flavor;
use crate::CodegenError;
type Fv<'ctx> = FloatValue<'ctx>;
type Iv<'ctx> = IntValue<'ctx>;
type Vals<'ctx> = Vec<BasicValueEnum<'ctx>>;

/// Adds the host function for `k` to `module` (see the module docs for its ABI).
pub fn emit_host<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    k: &NnKernel,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    Ok(emit(ctx, module, k, Flavor::Host)?)
}

/// Adds the `ptx_kernel` function for `k` to `module` (lower the module with [`crate::ptx::emit_ptx`]).
pub fn emit_ptx<'ctx>(
    ctx: &'ctx Context,
    module: &Module<'ctx>,
    k: &NnKernel,
) -> Result<FunctionValue<'ctx>, CodegenError> {
    Ok(emit(ctx, module, k, Flavor::Nvptx)?)
}

/// PTX text for `k` alone, for `sm`.
pub fn kernel_to_ptx(k: &NnKernel, sm: u32) -> Result<String, CodegenError> {
    let ctx = Context::create();
    let module = ctx.create_module(&k.symbol());
    emit_ptx(&ctx, &module, k)?;
    crate::ptx::emit_ptx(&module, sm)
}

struct Gen<'a, 'ctx> {
    ctx: &'ctx Context,
    module: &'a Module<'ctx>,
    b: Builder<'ctx>,
    func: FunctionValue<'ctx>,
    flavor: Flavor,
    bufs: Vec<PointerValue<'ctx>>,
    /// Who shares the current item's inner loops (host: always one thread).
    lanes: Team,
    /// NVPTX: 32 f32 of shared memory for block reductions.
    partials: Option<GlobalValue<'ctx>>,
    /// NVPTX: one f32 per thread of shared memory (linear cross-entropy's dlogit chunk).
    chunk: Option<GlobalValue<'ctx>>,
    /// Host: a one-element stack slot standing in for `chunk`.
    chunk_slot: Option<PointerValue<'ctx>>,
}

fn emit<'ctx>(ctx: &'ctx Context, module: &Module<'ctx>, k: &NnKernel, flavor: Flavor) -> Kr<FunctionValue<'ctx>> {
    let name = k.symbol();
    let (func, b, bufs) = kernel_fn(ctx, module, &name, k.buffers.len(), flavor)?;
    let shared = |n: u32, what: &str| {
        let ty = ctx.f32_type().array_type(n);
        let g = module.add_global(ty, Some(AddressSpace::from(3u16)), &format!("{name}_{what}"));
        g.set_linkage(Linkage::Internal);
        g.set_initializer(&ty.get_undef());
        g
    };
    let launch = k.launch();
    let (mut partials, mut chunk, mut chunk_slot) = (None, None, None);
    if flavor == Flavor::Nvptx && launch.team == Team::Block {
        partials = Some(shared(32, "partials"));
    }
    if matches!(k.op, NnOp::LinearCrossEntropyBwd { .. }) {
        match flavor {
            Flavor::Nvptx => chunk = Some(shared(NN_BLOCK_THREADS, "dlogits")),
            Flavor::Host => chunk_slot = Some(b.build_alloca(ctx.f32_type(), "dlogit")?),
        }
    }
    let lanes = if flavor == Flavor::Host { Team::Thread } else { launch.team };
    if flavor == Flavor::Host && matches!(k.op, NnOp::Attention { .. }) {
        // Its vector code is for this CPU (the JIT, too, compiles for the host only when the function says so).
        let cpu = TargetMachine::get_host_cpu_name().to_string();
        let features = TargetMachine::get_host_cpu_features().to_string();
        func.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-cpu", &cpu));
        func.add_attribute(AttributeLoc::Function, ctx.create_string_attribute("target-features", &features));
        // The loops are vectorized and register-blocked by hand: `optsize` keeps LLVM from unrolling and re-vectorizing
        // them again, which would double the kernel's compile time for no measurable speed.
        let optsize = Attribute::get_named_enum_kind_id("optsize");
        func.add_attribute(AttributeLoc::Function, ctx.create_enum_attribute(optsize, 0));
    }
    let mut g = Gen { ctx, module, b, func, flavor, bufs, lanes, partials, chunk, chunk_slot };
    match k.op.clone() {
        NnOp::Attention { .. } => g.attention(k, launch)?,
        NnOp::Rope { batch, seq, heads, head_dim, theta, inverse } => {
            g.rope(batch * seq * heads, heads, head_dim, theta, inverse)?
        }
        NnOp::Embedding { vocab, dim, tokens } => g.embedding(vocab, dim, tokens)?,
        NnOp::EmbeddingBwd { vocab, dim, tokens } => g.embedding_bwd(vocab, dim, tokens)?,
        NnOp::CrossEntropy { rows, vocab, ignore_index } => g.cross_entropy(rows, vocab, ignore_index, false)?,
        NnOp::CrossEntropyBwd { rows, vocab, ignore_index } => g.cross_entropy(rows, vocab, ignore_index, true)?,
        NnOp::LinearCrossEntropy { rows, dim, vocab, ignore_index, .. } => {
            g.linear_cross_entropy(rows, dim, vocab, ignore_index, false)?
        }
        NnOp::LinearCrossEntropyBwd { rows, dim, vocab, ignore_index, .. } => {
            g.linear_cross_entropy(rows, dim, vocab, ignore_index, true)?
        }
    }
    g.b.build_return(None)?;
    Ok(func)
}

/// Host attention: query rows per block (the register tile of the score and product loops).
const HOST_ATTN_ROWS: usize = 8;

/// Host attention: the op's sizes, the vector width and one thread's scratch (64-byte aligned regions).
#[derive(Clone, Copy)]
struct Ha<'ctx> {
    a: Attn,
    /// f32 lanes per vector.
    vw: usize,
    /// The sequence length and the head dim rounded up to `vw`.
    tp: usize,
    hdp: usize,
    /// The row stride of the `[·][tp]` arrays: `tp` rounded up to an odd number of cache lines (a power-of-two stride
    /// would map a column walk onto a few cache sets).
    ld: usize,
    /// Kᵀ, and Vᵀ for dq/dk: `[hd][ld]`, keys ≥ t zero.
    kt: PointerValue<'ctx>,
    vt: Option<PointerValue<'ctx>>,
    /// Forward: V, dq: K, row-major `[t][hdp]` with the head-dim padding zero, where the head dim is no multiple of
    /// `vw` (else the product reads the rows in place).
    xp: Option<PointerValue<'ctx>>,
    /// The block's scores, then p, then (dq, dk) ds: `[HOST_ATTN_ROWS][ld]`.
    s: PointerValue<'ctx>,
    /// dq, dk: the block's dp, `[HOST_ATTN_ROWS][ld]`.
    dp: Option<PointerValue<'ctx>>,
    /// The batch row's segment ids (i32), `[tp]`.
    seg: PointerValue<'ctx>,
    /// Per row of the block: a vector (running max, then Σ p·dp), `[HOST_ATTN_ROWS][vw]`; then (forward) l.
    st: PointerValue<'ctx>,
    /// Forward, dq with a head dim that is no multiple of `vw`: the block's output rows, `[HOST_ATTN_ROWS][hdp]`.
    o: Option<PointerValue<'ctx>>,
    /// dk, dv: the item's gradient, transposed, `[hd][ld]`.
    acc: Option<PointerValue<'ctx>>,
}

/// One query row of a host attention block (the last block's extra rows repeat the last row).
struct HostRow<'ctx> {
    /// Its offset in q, dout and (forward, dq) the output.
    qbase: Iv<'ctx>,
    /// Its segment id and position (i32), in every lane.
    seg: VectorValue<'ctx>,
    i: VectorValue<'ctx>,
}

/// Sizes of one attention op.
#[derive(Clone, Copy)]
struct Attn {
    t: u64,
    h: u64,
    kv: u64,
    hd: usize,
    causal: bool,
    scale: f64,
    grad: Option<AttnArg>,
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
    // ---- arithmetic, memory ---------------------------------------------------------------------------------------

    fn add(&self, a: Fv<'ctx>, b: Fv<'ctx>) -> Kr<Fv<'ctx>> {
        Ok(self.b.build_float_add(a, b, "")?)
    }
    fn sub(&self, a: Fv<'ctx>, b: Fv<'ctx>) -> Kr<Fv<'ctx>> {
        Ok(self.b.build_float_sub(a, b, "")?)
    }
    fn mul(&self, a: Fv<'ctx>, b: Fv<'ctx>) -> Kr<Fv<'ctx>> {
        Ok(self.b.build_float_mul(a, b, "")?)
    }
    fn div(&self, a: Fv<'ctx>, b: Fv<'ctx>) -> Kr<Fv<'ctx>> {
        Ok(self.b.build_float_div(a, b, "")?)
    }
    fn iadd(&self, a: Iv<'ctx>, b: Iv<'ctx>) -> Kr<Iv<'ctx>> {
        Ok(self.b.build_int_add(a, b, "")?)
    }
    fn imul(&self, a: Iv<'ctx>, b: Iv<'ctx>) -> Kr<Iv<'ctx>> {
        Ok(self.b.build_int_mul(a, b, "")?)
    }
    fn imulc(&self, a: Iv<'ctx>, c: u64) -> Kr<Iv<'ctx>> {
        self.imul(a, self.i64c(c))
    }
    fn udivc(&self, a: Iv<'ctx>, c: u64) -> Kr<Iv<'ctx>> {
        Ok(self.b.build_int_unsigned_div(a, self.i64c(c), "")?)
    }
    fn uremc(&self, a: Iv<'ctx>, c: u64) -> Kr<Iv<'ctx>> {
        Ok(self.b.build_int_unsigned_rem(a, self.i64c(c), "")?)
    }
    fn fmax(&self, a: Fv<'ctx>, b: Fv<'ctx>) -> Kr<Fv<'ctx>> {
        self.fcall("llvm.maxnum", &[a, b])
    }

    fn ldf(&self, buf: usize, idx: Iv<'ctx>) -> Kr<Fv<'ctx>> {
        self.ld_f32(self.bufs[buf], idx)
    }
    /// An i32 element, sign-extended to i64.
    fn ldi(&self, buf: usize, idx: Iv<'ctx>) -> Kr<Iv<'ctx>> {
        let i32t = self.ctx.i32_type();
        let v = self.b.build_load(i32t, self.gep(i32t, self.bufs[buf], idx)?, "")?.into_int_value();
        Ok(self.b.build_int_s_extend(v, self.ctx.i64_type(), "")?)
    }
    fn stf(&self, buf: usize, idx: Iv<'ctx>, v: Fv<'ctx>) -> Kr<()> {
        self.st_f32(self.bufs[buf], idx, v)
    }
    /// `buf[idx] += v`: a plain read-modify-write, or (`atomic`) an atomic add.
    fn addf(&self, buf: usize, idx: Iv<'ctx>, v: Fv<'ctx>, atomic: bool) -> Kr<()> {
        let p = self.gep(self.ctx.f32_type(), self.bufs[buf], idx)?;
        if !atomic {
            let old = self.b.build_load(self.ctx.f32_type(), p, "")?.into_float_value();
            self.b.build_store(p, self.add(old, v)?)?;
            return Ok(());
        }
        match self.flavor {
            Flavor::Nvptx => {
                let ty = self.ctx.void_type().fn_type(&[p.get_type().into(), self.ctx.f32_type().into()], false);
                let asm = self.ctx.create_inline_asm(
                    ty,
                    "red.add.f32 [$0], $1;".into(),
                    "l,f,~{memory}".into(),
                    true,
                    false,
                    None,
                    false,
                );
                self.b.build_indirect_call(ty, asm, &[p.into(), v.into()], "")?;
            }
            Flavor::Host => {
                // A compare-and-swap loop on the bits (inkwell's atomicrmw takes integers only).
                let i32t = self.ctx.i32_type();
                let pre = self.b.get_insert_block().expect("positioned");
                let old0 = self.b.build_load(i32t, p, "")?.into_int_value();
                let body = self.ctx.append_basic_block(self.func, "cas");
                let done = self.ctx.append_basic_block(self.func, "cas.done");
                self.b.build_unconditional_branch(body)?;
                self.b.position_at_end(body);
                let old = self.b.build_phi(i32t, "")?;
                let ov = old.as_basic_value().into_int_value();
                let of = self.b.build_bit_cast(ov, self.ctx.f32_type(), "")?.into_float_value();
                let nv = self.b.build_bit_cast(self.add(of, v)?, i32t, "")?.into_int_value();
                let res = self.b.build_cmpxchg(
                    p,
                    ov,
                    nv,
                    AtomicOrdering::SequentiallyConsistent,
                    AtomicOrdering::Monotonic,
                )?;
                let seen = self.b.build_extract_value(res, 0, "")?.into_int_value();
                let ok = self.b.build_extract_value(res, 1, "")?.into_int_value();
                old.add_incoming(&[(&old0, pre), (&seen, body)]);
                self.b.build_conditional_branch(ok, done, body)?;
                self.b.position_at_end(done);
            }
        }
        Ok(())
    }

    // ---- teams ----------------------------------------------------------------------------------------------------

    /// Runs `body` for every item of this thread (host) or team (GPU, by `self.lanes`), carrying `init`.
    #[allow(clippy::type_complexity)]
    fn for_items(
        &mut self,
        total: u64,
        init: &[BasicValueEnum<'ctx>],
        body: &mut dyn FnMut(&mut Self, Iv<'ctx>, &[BasicValueEnum<'ctx>]) -> Kr<Vals<'ctx>>,
    ) -> Kr<Vals<'ctx>> {
        let (start, end, step) = match self.flavor {
            Flavor::Host => {
                let (s, e) = self.host_slice(self.i64c(total))?;
                (s, e, self.i64c(1))
            }
            Flavor::Nvptx => {
                let (ctaid, nctaid) = (self.sreg(Sreg::CtaIdX)?, self.sreg(Sreg::NctaIdX)?);
                let (ntid, tid) = (self.sreg(Sreg::NtidX)?, self.sreg(Sreg::TidX)?);
                let thread = self.iadd(self.imul(ctaid, ntid)?, tid)?;
                let threads = self.imul(nctaid, ntid)?;
                let five = self.i64c(5);
                match self.lanes {
                    Team::Thread => (thread, self.i64c(total), threads),
                    Team::Warp => (
                        self.b.build_right_shift(thread, five, false, "")?,
                        self.i64c(total),
                        self.b.build_right_shift(threads, five, false, "")?,
                    ),
                    Team::Block => (ctaid, self.i64c(total), nctaid),
                }
            }
        };
        self.for_loop("item", start, end, step, init, body)
    }

    /// This lane's index in its team and the team's size.
    fn lane(&self) -> Kr<(Iv<'ctx>, Iv<'ctx>)> {
        Ok(match (self.flavor, self.lanes) {
            (Flavor::Host, _) | (_, Team::Thread) => (self.i64c(0), self.i64c(1)),
            (Flavor::Nvptx, Team::Warp) => {
                (self.b.build_and(self.sreg(Sreg::TidX)?, self.i64c(31), "lane")?, self.i64c(32))
            }
            (Flavor::Nvptx, Team::Block) => (self.sreg(Sreg::TidX)?, self.sreg(Sreg::NtidX)?),
        })
    }

    /// The team size when it is a compile-time constant (host threads, GPU threads and warps).
    fn lanes_const(&self) -> u64 {
        match (self.flavor, self.lanes) {
            (Flavor::Host, _) | (_, Team::Thread) => 1,
            (Flavor::Nvptx, Team::Warp) => 32,
            (Flavor::Nvptx, Team::Block) => NN_BLOCK_THREADS as u64,
        }
    }

    /// `for i in (lane..n).step_by(lanes)` over the team.
    #[allow(clippy::type_complexity)]
    fn lane_loop(
        &mut self,
        n: Iv<'ctx>,
        init: &[BasicValueEnum<'ctx>],
        body: &mut dyn FnMut(&mut Self, Iv<'ctx>, &[BasicValueEnum<'ctx>]) -> Kr<Vals<'ctx>>,
    ) -> Kr<Vals<'ctx>> {
        let (lane, nl) = self.lane()?;
        self.for_loop("lane", lane, n, nl, init, body)
    }

    /// The team-wide reduction of every lane's `v` (every lane gets it).
    fn reduce(&mut self, k: Red, v: Fv<'ctx>) -> Kr<Fv<'ctx>> {
        if self.flavor == Flavor::Host || self.lanes == Team::Thread {
            return Ok(v);
        }
        let v = self.warp_reduce(k, v)?;
        if self.lanes == Team::Warp {
            return Ok(v);
        }
        let scratch = self.partials.expect("block teams have partials").as_pointer_value();
        self.block_combine(k, v, scratch)
    }

    /// A block barrier (GPU block teams only; a no-op elsewhere).
    fn barrier(&self) -> Kr<()> {
        if self.flavor == Flavor::Nvptx && self.lanes == Team::Block {
            self.cta_barrier()?;
        }
        Ok(())
    }

    /// Whether this is lane 0 of its team.
    fn is_lane0(&self) -> Kr<Iv<'ctx>> {
        let (lane, _) = self.lane()?;
        Ok(self.b.build_int_compare(IntPredicate::EQ, lane, self.i64c(0), "")?)
    }

    // ---- math -------------------------------------------------------------------------------------------------------

    /// (sin x, cos x) in f64 for |x| < 2²⁰·π/2: Cody–Waite reduction by π/2 in three parts, fdlibm's kernels.
    #[allow(clippy::excessive_precision)] // fdlibm's constants, digit for digit
    fn sincos(&self, x: Fv<'ctx>) -> Kr<(Fv<'ctx>, Fv<'ctx>)> {
        let c = |v: f64| self.f64c(v);
        let k = self.fcall("llvm.rint", &[self.mul(x, c(std::f64::consts::FRAC_2_PI))?])?;
        let mut r = x;
        for part in [1.57079632673412561417e+00, 6.07710050630396597660e-11, 2.02226624871116645580e-21] {
            r = self.sub(r, self.mul(k, c(part))?)?;
        }
        let z = self.mul(r, r)?;
        let sp = self.poly(
            z,
            &[
                1.58969099521155010221e-10,
                -2.50507602534068634195e-08,
                2.75573137070700676789e-06,
                -1.98412698298579493134e-04,
                8.33333333332248946124e-03,
                -1.66666666666666324348e-01,
            ],
        )?;
        let sin_r = self.add(r, self.mul(self.mul(r, z)?, sp)?)?;
        let cp = self.poly(
            z,
            &[
                -1.13596475577881948265e-11,
                2.08757232129817482790e-09,
                -2.75573143513906633035e-07,
                2.48015872894767294178e-05,
                -1.38888888888741095749e-03,
                4.16666666666666019037e-02,
            ],
        )?;
        let cos_r = self.add(self.sub(c(1.0), self.mul(z, c(0.5))?)?, self.mul(self.mul(z, z)?, cp)?)?;
        let n = self.b.build_float_to_signed_int(k, self.ctx.i64_type(), "")?;
        let q = self.b.build_and(n, self.i64c(3), "")?;
        let is = |v: u64| self.b.build_int_compare(IntPredicate::EQ, q, self.i64c(v), "");
        let (neg_s, neg_c) = (self.b.build_float_neg(sin_r, "")?, self.b.build_float_neg(cos_r, "")?);
        // quadrant 0: (s, c); 1: (c, −s); 2: (−s, −c); 3: (−c, s)
        let sin = self.select_f(is(1)?, cos_r, self.select_f(is(2)?, neg_s, self.select_f(is(3)?, neg_c, sin_r)?)?)?;
        let cos = self.select_f(is(1)?, neg_s, self.select_f(is(2)?, neg_c, self.select_f(is(3)?, sin_r, cos_r)?)?)?;
        Ok((sin, cos))
    }

    /// Σ of `vals` as a balanced tree (independent adds vectorize and pipeline).
    fn tree_sum(&self, mut vals: Vec<Fv<'ctx>>) -> Kr<Fv<'ctx>> {
        while vals.len() > 1 {
            let mut next = Vec::with_capacity(vals.len().div_ceil(2));
            for pair in vals.chunks(2) {
                next.push(if pair.len() == 2 { self.add(pair[0], pair[1])? } else { pair[0] });
            }
            vals = next;
        }
        Ok(vals.pop().unwrap_or_else(|| self.f32c(0.0)))
    }

    /// Σ_d a[abase + d]·b[bbase + d] over `n` elements by one thread (a vectorizable reduction on the host).
    fn dot_serial(&mut self, a: usize, abase: Iv<'ctx>, b: usize, bbase: Iv<'ctx>, n: usize) -> Kr<Fv<'ctx>> {
        let init = [self.f32c(0.0).into()];
        let r = self.for_loop("dot", self.i64c(0), self.i64c(n as u64), self.i64c(1), &init, &mut |g, d, acc| {
            let x = g.ldf(a, g.iadd(abase, d)?)?;
            let y = g.ldf(b, g.iadd(bbase, d)?)?;
            let s = g.add(acc[0].into_float_value(), g.mul(x, y)?)?;
            if let Some(inst) = s.as_instruction() {
                let _ = inst.set_fast_math_flags(FastMathFlags::AllowReassoc);
            }
            Ok(vec![s.into()])
        })?;
        Ok(r[0].into_float_value())
    }

    // ---- lane-split vectors (a head row split over the team's lanes) -----------------------------------------------

    /// Element c of this lane's share of an `n`-vector: index lane + c·lanes and whether it exists.
    fn lvec_index(&self, c: usize, n: usize) -> Kr<(Iv<'ctx>, Option<Iv<'ctx>>)> {
        let nl = self.lanes_const();
        if nl == 1 {
            return Ok((self.i64c(c as u64), None));
        }
        let (lane, _) = self.lane()?;
        let d = self.iadd(lane, self.i64c(c as u64 * nl))?;
        if n as u64 % nl == 0 {
            return Ok((d, None));
        }
        let ok = self.b.build_int_compare(IntPredicate::ULT, d, self.i64c(n as u64), "")?;
        Ok((self.select_i(ok, d, self.i64c(0))?, Some(ok)))
    }

    fn lvec_len(&self, n: usize) -> usize {
        n.div_ceil(self.lanes_const() as usize)
    }

    /// This lane's share of `buf[base..base + n]` (missing elements are 0).
    fn lvec_load(&self, buf: usize, base: Iv<'ctx>, n: usize) -> Kr<Vec<Fv<'ctx>>> {
        let mut out = Vec::new();
        for c in 0..self.lvec_len(n) {
            let (d, ok) = self.lvec_index(c, n)?;
            let v = self.ldf(buf, self.iadd(base, d)?)?;
            out.push(match ok {
                Some(ok) => self.select_f(ok, v, self.f32c(0.0))?,
                None => v,
            });
        }
        Ok(out)
    }

    /// Stores (or adds, atomically on the GPU when `atomic`) this lane's share into `buf[base..base + n]`.
    fn lvec_store(&mut self, buf: usize, base: Iv<'ctx>, n: usize, vals: &[Fv<'ctx>], add: bool) -> Kr<()> {
        let atomic = add && self.flavor == Flavor::Nvptx;
        for (c, &v) in vals.iter().enumerate() {
            let (d, ok) = self.lvec_index(c, n)?;
            let idx = self.iadd(base, d)?;
            let mut st = |g: &mut Self| if add { g.addf(buf, idx, v, atomic) } else { g.stf(buf, idx, v) };
            match ok {
                Some(ok) => self.if_then(ok, &mut st)?,
                None => st(self)?,
            }
        }
        Ok(())
    }

    /// The team-wide dot product of two lane-split vectors.
    fn lvec_dot(&mut self, a: &[Fv<'ctx>], b: &[Fv<'ctx>]) -> Kr<Fv<'ctx>> {
        let prods = a.iter().zip(b).map(|(&x, &y)| self.mul(x, y)).collect::<Kr<Vec<_>>>()?;
        let partial = self.tree_sum(prods)?;
        self.reduce(Red::Sum, partial)
    }

    // ---- attention ------------------------------------------------------------------------------------------------

    fn attention(&mut self, k: &NnKernel, launch: Launch) -> Kr<()> {
        let NnOp::Attention { seq, heads, kv_heads, head_dim, causal, scale, grad, .. } = k.op else {
            unreachable!("attention kernel")
        };
        let a = Attn { t: seq as u64, h: heads as u64, kv: kv_heads as u64, hd: head_dim, causal, scale, grad };
        if self.flavor == Flavor::Host {
            return self.attention_host(launch.host_items as u64, a);
        }
        match grad {
            None | Some(AttnArg::Q) => {
                // Items: (b, i, h) in row-major order, so a block's warps share the kv rows they read.
                self.for_items(launch.items as u64, &[], &mut |g, it, _| {
                    let hi = g.uremc(it, a.h)?;
                    let bt = g.udivc(it, a.h)?;
                    let i = g.uremc(bt, a.t)?;
                    let bi = g.udivc(bt, a.t)?;
                    g.attn_row(a, bi, hi, i)?;
                    Ok(vec![])
                })?;
            }
            Some(_) => {
                let out = 5;
                let rep = a.h / a.kv;
                let hd = a.hd as u64;
                self.for_items(launch.items as u64, &[], &mut |g, it, _| {
                    let kvh = g.uremc(it, a.kv)?;
                    let bi = g.udivc(it, a.kv)?;
                    // Zero this (batch, kv head)'s slab of dk/dv, then accumulate every query row into it.
                    g.lane_loop(g.i64c(a.t * hd), &[], &mut |g, e, _| {
                        let (j, d) = (g.udivc(e, hd)?, g.uremc(e, hd)?);
                        let row = g.iadd(g.imulc(g.iadd(g.imulc(bi, a.t)?, j)?, a.kv)?, kvh)?;
                        g.stf(out, g.iadd(g.imulc(row, hd)?, d)?, g.f32c(0.0))?;
                        Ok(vec![])
                    })?;
                    g.barrier()?;
                    let outer = g.lanes;
                    let (start, step) = match g.flavor {
                        Flavor::Host => (g.i64c(0), g.i64c(1)),
                        Flavor::Nvptx => {
                            let tid = g.sreg(Sreg::TidX)?;
                            let five = g.i64c(5);
                            (
                                g.b.build_right_shift(tid, five, false, "")?,
                                g.b.build_right_shift(g.sreg(Sreg::NtidX)?, five, false, "")?,
                            )
                        }
                    };
                    g.lanes = Team::Warp;
                    g.for_loop("qrow", start, g.i64c(rep * a.t), step, &[], &mut |g, r, _| {
                        let hi = g.iadd(g.imulc(kvh, rep)?, g.udivc(r, a.t)?)?;
                        let i = g.uremc(r, a.t)?;
                        g.attn_row(a, bi, hi, i)?;
                        Ok(vec![])
                    })?;
                    g.lanes = outer;
                    Ok(vec![])
                })?;
            }
        }
        Ok(())
    }

    // ---- host attention ---------------------------------------------------------------------------------------------

    /// Host attention (see the module docs): items are (batch, head) for the forward and dq, (batch, kv head) for dk
    /// and dv; each thread packs its item's K/V into a malloc'ed scratch, then takes the query rows in blocks of
    /// [`HOST_ATTN_ROWS`] ([`Self::attn_block_host`]).
    fn attention_host(&mut self, items: u64, a: Attn) -> Kr<()> {
        let vw = crate::gemm::host_vector_width();
        let (t, hd) = (a.t as usize, a.hd);
        let (tp, hdp) = (t.next_multiple_of(vw), hd.next_multiple_of(vw));
        let ld = (tp.div_ceil(16) | 1) * 16;
        let per_head = matches!(a.grad, None | Some(AttnArg::Q));
        let need_vt = matches!(a.grad, Some(AttnArg::Q | AttnArg::K));
        let rn = HOST_ATTN_ROWS;
        // Scratch regions (offsets in f32 elements), each on a 64-byte boundary.
        let mut size = 0usize;
        let mut region = |n: usize, want: bool| {
            want.then(|| {
                let o = size;
                size += n.next_multiple_of(16);
                o
            })
        };
        let kt = region(hd * ld, true);
        let vt = region(hd * ld, need_vt);
        let xp = region(t * hdp, per_head && hd % vw != 0);
        let s = region(rn * ld, true);
        let dp = region(rn * ld, need_vt);
        let seg = region(tp, true);
        let st = region(rn * vw + rn, true);
        let o = region(rn * hdp, per_head && hd % vw != 0);
        let acc = region(hd * ld, !per_head);

        let ptr_t = self.ctx.ptr_type(AddressSpace::default());
        let i64t = self.ctx.i64_type();
        let malloc = self.libc_fn("malloc", ptr_t.fn_type(&[i64t.into()], false));
        let free = self.libc_fn("free", self.ctx.void_type().fn_type(&[ptr_t.into()], false));
        let raw = self.call(malloc, &[self.i64c(4 * size as u64 + 64).into()])?.into_pointer_value();
        let addr = self.b.build_ptr_to_int(raw, i64t, "")?;
        let pad = self.b.build_and(self.b.build_int_neg(addr, "")?, self.i64c(63), "")?;
        let base = self.gep(self.ctx.i8_type(), raw, pad)?;
        let at = |g: &Self, off: Option<usize>| -> Kr<Option<PointerValue<'ctx>>> {
            off.map(|o| g.gep(g.ctx.f32_type(), base, g.i64c(o as u64))).transpose()
        };
        let ha = Ha {
            a,
            vw,
            tp,
            hdp,
            ld,
            kt: at(self, kt)?.expect("kt"),
            vt: at(self, vt)?,
            xp: at(self, xp)?,
            s: at(self, s)?.expect("s"),
            dp: at(self, dp)?,
            seg: at(self, seg)?.expect("seg"),
            st: at(self, st)?.expect("st"),
            o: at(self, o)?,
            acc: at(self, acc)?,
        };

        let rep = a.h / a.kv;
        let (start, end) = self.host_slice(self.i64c(items))?;
        // The (batch, kv head) packed last: a thread's consecutive heads share their kv head.
        let init = [self.i64c(u64::MAX).into()];
        self.for_loop("item", start, end, self.i64c(1), &init, &mut |g, it, cur| {
            let (bi, kvh, h0, nh) = if per_head {
                let hi = g.uremc(it, a.h)?;
                (g.udivc(it, a.h)?, g.udivc(hi, rep)?, hi, 1)
            } else {
                let kvh = g.uremc(it, a.kv)?;
                (g.udivc(it, a.kv)?, kvh, g.imulc(kvh, rep)?, rep)
            };
            let key = g.iadd(g.imulc(bi, a.kv)?, kvh)?;
            let stale = g.b.build_int_compare(IntPredicate::NE, key, cur[0].into_int_value(), "")?;
            g.if_then(stale, &mut |g| g.attn_pack_host(&ha, bi, kvh))?;
            // Offset of key 0's row of this (batch, kv head) in k and v.
            let kvbase = g.imulc(g.iadd(g.imulc(bi, a.t * a.kv)?, kvh)?, a.hd as u64)?;
            let h1 = g.iadd(h0, g.i64c(nh))?;
            g.for_loop("head", h0, h1, g.i64c(1), &[], &mut |g, hi, _| {
                let step = g.i64c(HOST_ATTN_ROWS as u64);
                g.for_loop("qblk", g.i64c(0), g.i64c(a.t), step, &[], &mut |g, i0, _| {
                    g.attn_block_host(&ha, bi, hi, kvbase, i0)?;
                    Ok(vec![])
                })?;
                Ok(vec![])
            })?;
            if let Some(acc) = ha.acc {
                // The accumulated dkᵀ / dvᵀ into this (batch, kv head)'s rows of the output.
                let hd64 = a.hd as u64;
                g.for_loop("st.j", g.i64c(0), g.i64c(a.t), g.i64c(1), &[], &mut |g, j, _| {
                    let row = g.imulc(g.iadd(g.imulc(g.iadd(g.imulc(bi, a.t)?, j)?, a.kv)?, kvh)?, hd64)?;
                    g.for_loop("st.d", g.i64c(0), g.i64c(hd64), g.i64c(1), &[], &mut |g, d, _| {
                        let v = g.ld_f32(acc, g.iadd(g.imulc(d, ld as u64)?, j)?)?;
                        g.stf(5, g.iadd(row, d)?, v)?;
                        Ok(vec![])
                    })?;
                    Ok(vec![])
                })?;
            }
            Ok(vec![key.into()])
        })?;
        self.b.build_call(free, &[raw.into()], "")?;
        Ok(())
    }

    /// `name` from the C library (the host library is linked with `cc`), declared once per module.
    fn libc_fn(&self, name: &str, ty: FunctionType<'ctx>) -> FunctionValue<'ctx> {
        self.module.get_function(name).unwrap_or_else(|| self.module.add_function(name, ty, Some(Linkage::External)))
    }

    /// Packs (batch `bi`, kv head `kvh`): the segment ids, Kᵀ and Vᵀ (`[hd][ld]`, keys padded with zeros), K or V
    /// row-major (`[t][hdp]`, the head dim padded with zeros) where needed; zeroes the dk/dv accumulator.
    fn attn_pack_host(&mut self, ha: &Ha<'ctx>, bi: Iv<'ctx>, kvh: Iv<'ctx>) -> Kr<()> {
        let a = ha.a;
        let (k_b, v_b, seg_b) = if a.grad.is_none() { (1, 2, 3) } else { (2, 3, 4) };
        let (tp, ld, hdp, hd) = (ha.tp as u64, ha.ld as u64, ha.hdp as u64, a.hd as u64);
        // Row-major copy: V for the forward (p·V), K for dq (ds·K).
        let xp = ha.xp.map(|p| (p, if a.grad.is_none() { v_b } else { k_b }));
        let i32t = self.ctx.i32_type();
        let (zero, one) = (self.i64c(0), self.i64c(1));
        self.for_loop("pk.j", zero, self.i64c(a.t), one, &[], &mut |g, j, _| {
            let bt = g.iadd(g.imulc(bi, a.t)?, j)?;
            let sv = g.b.build_load(i32t, g.gep(i32t, g.bufs[seg_b], bt)?, "")?;
            g.b.build_store(g.gep(i32t, ha.seg, j)?, sv)?;
            let row = g.imulc(g.iadd(g.imulc(bt, a.kv)?, kvh)?, hd)?;
            let jr = g.imulc(j, hdp)?;
            g.for_loop("pk.d", g.i64c(0), g.i64c(hd), g.i64c(1), &[], &mut |g, d, _| {
                let src = g.iadd(row, d)?;
                let tix = g.iadd(g.imulc(d, ld)?, j)?;
                g.st_f32(ha.kt, tix, g.ldf(k_b, src)?)?;
                if let Some(vt) = ha.vt {
                    g.st_f32(vt, tix, g.ldf(v_b, src)?)?;
                }
                if let Some((p, buf)) = xp {
                    g.st_f32(p, g.iadd(jr, d)?, g.ldf(buf, src)?)?;
                }
                Ok(vec![])
            })?;
            if let (Some((p, _)), true) = (xp, hdp > hd) {
                g.for_loop("pk.dz", g.i64c(hd), g.i64c(hdp), g.i64c(1), &[], &mut |g, d, _| {
                    g.st_f32(p, g.iadd(jr, d)?, g.f32c(0.0))?;
                    Ok(vec![])
                })?;
            }
            Ok(vec![])
        })?;
        if tp > a.t {
            self.for_loop("pk.jz", self.i64c(a.t), self.i64c(tp), one, &[], &mut |g, j, _| {
                g.b.build_store(g.gep(i32t, ha.seg, j)?, g.i32c(0))?;
                g.for_loop("pk.dz", g.i64c(0), g.i64c(hd), g.i64c(1), &[], &mut |g, d, _| {
                    let tix = g.iadd(g.imulc(d, ld)?, j)?;
                    g.st_f32(ha.kt, tix, g.f32c(0.0))?;
                    if let Some(vt) = ha.vt {
                        g.st_f32(vt, tix, g.f32c(0.0))?;
                    }
                    Ok(vec![])
                })?;
                Ok(vec![])
            })?;
        }
        if let Some(acc) = ha.acc {
            let zv = self.vty(ha.vw).const_zero();
            let n = self.i64c(hd * ld);
            self.for_loop("pk.z", zero, n, self.i64c(ha.vw as u64), &[], &mut |g, e, _| {
                g.vstore(acc, e, zv, ha.vw)?;
                Ok(vec![])
            })?;
        }
        Ok(())
    }

    /// Query rows `i0 .. i0 + HOST_ATTN_ROWS` of head `hi`, batch `bi` (clamped to the last row: an extra row repeats
    /// it, stores the same values into its place and adds nothing to dk, dv): scores for `vw` keys at a time (vectors
    /// over keys), softmax, then the kernel's product. `kvbase` is key 0's row of the kv head in k and v.
    fn attn_block_host(&mut self, ha: &Ha<'ctx>, bi: Iv<'ctx>, hi: Iv<'ctx>, kvbase: Iv<'ctx>, i0: Iv<'ctx>) -> Kr<()> {
        let a = ha.a;
        let (dout_b, q_b, seg_b) = if a.grad.is_none() { (usize::MAX, 0, 3) } else { (0, 1, 4) };
        let (rn, vw, tp, ld) = (HOST_ATTN_ROWS, ha.vw, ha.tp as u64, ha.ld as u64);
        let i32t = self.ctx.i32_type();
        let vt = self.vty(vw);
        let last = self.i64c(a.t - 1);
        let mut rows = Vec::with_capacity(rn);
        for r in 0..rn {
            let ir = self.iadd(i0, self.i64c(r as u64))?;
            let i = self.umin(ir, last)?;
            let bt = self.iadd(self.imulc(bi, a.t)?, i)?;
            let qbase = self.imulc(self.iadd(self.imulc(bt, a.h)?, hi)?, a.hd as u64)?;
            let seg = self.b.build_load(i32t, self.gep(i32t, self.bufs[seg_b], bt)?, "")?.into_int_value();
            let i32v = self.b.build_int_truncate(i, i32t, "")?;
            rows.push(HostRow { qbase, seg: self.splat(seg.into(), vw)?, i: self.splat(i32v.into(), vw)? });
        }
        let qbases: Vec<Iv> = rows.iter().map(|r| r.qbase).collect();
        let kend =
            if a.causal { self.umin(self.iadd(i0, self.i64c(rn as u64))?, self.i64c(a.t))? } else { self.i64c(a.t) };
        let (zero, vstep) = (self.i64c(0), self.i64c(vw as u64));
        let ninf = self.splat_c(f64::NEG_INFINITY, vw);
        let vzero = vt.const_zero();
        let srow = |g: &Self, r: usize, j0: Iv<'ctx>| g.iadd(g.i64c(r as u64 * ld), j0);

        // Scores s = scale·q·k (masked to −∞), and each row's running max.
        let iota = VectorType::const_vector(&(0..vw).map(|l| i32t.const_int(l as u64, false)).collect::<Vec<_>>());
        let scale = self.splat_c(a.scale, vw);
        let init: Vals = (0..rn).map(|_| ninf.into()).collect();
        let mx = self.for_loop("sc", zero, kend, vstep, &init, &mut |g, j0, cur| {
            let dots = g.attn_dots_host(ha, ha.kt, q_b, &qbases, j0)?;
            let j32 = g.b.build_int_truncate(j0, i32t, "")?;
            let jv = g.b.build_int_add(g.splat(j32.into(), vw)?, iota, "")?;
            let segv = g.vload_ty(i32t.vec_type(vw as u32), ha.seg, j0, vw)?.into_vector_value();
            let mut next = Vec::with_capacity(rn);
            for (r, row) in rows.iter().enumerate() {
                let s = g.b.build_float_mul(dots[r], scale, "")?;
                let mut vis = g.b.build_int_compare(IntPredicate::EQ, segv, row.seg, "")?;
                if a.causal {
                    vis = g.b.build_and(vis, g.b.build_int_compare(IntPredicate::SLE, jv, row.i, "")?, "")?;
                } else if tp > a.t {
                    let t = g.splat(g.i32c(a.t as i64).into(), vw)?;
                    vis = g.b.build_and(vis, g.b.build_int_compare(IntPredicate::SLT, jv, t, "")?, "")?;
                }
                let s = g.b.build_select(vis, s, ninf, "")?.into_vector_value();
                g.vstore(ha.s, srow(g, r, j0)?, s, vw)?;
                let cur = cur[r].into_vector_value();
                let gt = g.b.build_float_compare(FloatPredicate::OGT, s, cur, "")?;
                next.push(g.b.build_select(gt, s, cur, "")?);
            }
            Ok(next)
        })?;
        for (r, v) in mx.iter().enumerate() {
            self.vstore(ha.st, self.i64c((r * vw) as u64), v.into_vector_value(), vw)?;
        }

        // Row by row: p = exp(s − m) (0 where masked) in place, its sum l; the backward normalizes p (dk, dv: to 0 in the
        // clamped extra rows, so they add nothing); the forward keeps l for the end.
        let lrow = self.i64c((rn * vw) as u64);
        let bwd = a.grad.is_some();
        self.for_loop("sm", zero, self.i64c(rn as u64), self.i64c(1), &[], &mut |g, r, _| {
            let sr = g.imulc(r, ld)?;
            let mx = g.vload(ha.st, g.imulc(r, vw as u64)?, vw)?;
            let m = g.splat(g.vreduce(Red::Max, mx)?.into(), vw)?;
            let ls = g.for_loop("ex", zero, kend, vstep, &[vzero.into()], &mut |g, j0, cur| {
                let ix = g.iadd(sr, j0)?;
                let s = g.vload(ha.s, ix, vw)?;
                let p = g.vexp(g.b.build_float_sub(s, m, "")?)?;
                let dead = g.b.build_float_compare(FloatPredicate::OEQ, s, ninf, "")?;
                let p = g.b.build_select(dead, vzero, p, "")?.into_vector_value();
                g.vstore(ha.s, ix, p, vw)?;
                Ok(vec![g.b.build_float_add(cur[0].into_vector_value(), p, "")?.into()])
            })?;
            let l = g.vreduce(Red::Sum, ls[0].into_vector_value())?;
            if !bwd {
                g.st_f32(ha.st, g.iadd(lrow, r)?, l)?;
                return Ok(vec![]);
            }
            let mut w = g.div(g.f32c(1.0), l)?;
            if a.grad != Some(AttnArg::Q) {
                let valid = g.b.build_int_compare(IntPredicate::ULT, g.iadd(i0, r)?, g.i64c(a.t), "")?;
                w = g.select_f(valid, w, g.f32c(0.0))?;
            }
            let w = g.splat(w.into(), vw)?;
            g.for_loop("nm", zero, kend, vstep, &[], &mut |g, j0, _| {
                let ix = g.iadd(sr, j0)?;
                g.vstore(ha.s, ix, g.b.build_float_mul(g.vload(ha.s, ix, vw)?, w, "")?, vw)?;
                Ok(vec![])
            })?;
            Ok(vec![])
        })?;

        if !bwd {
            // o = (Σ_j p_j·v_j) / l.
            return self.attn_pv_host(ha, &qbases, kvbase, kend, &|g, r, acc| {
                let l = g.ld_f32(ha.st, g.i64c((rn * vw + r) as u64))?;
                Ok(g.b.build_float_div(acc, g.splat(l.into(), vw)?, "")?)
            });
        }
        if a.grad == Some(AttnArg::V) {
            // dvᵀ[d, j] += Σ_r dout_r[d]·p_rj.
            return self.attn_acc_host(ha, kend, dout_b, &qbases, &|g, r, j0| g.vload(ha.s, srow(g, r, j0)?, vw));
        }

        // dp = dout·v (vectors over keys), D = Σ_j p_j·dp_j, then ds = scale·p·(dp − D) in place of p.
        let (vtp, dpp) = (ha.vt.expect("vᵀ"), ha.dp.expect("dp scratch"));
        let init: Vals = (0..rn).map(|_| vzero.into()).collect();
        let dsum = self.for_loop("dp", zero, kend, vstep, &init, &mut |g, j0, cur| {
            let dots = g.attn_dots_host(ha, vtp, dout_b, &qbases, j0)?;
            let mut next = Vec::with_capacity(rn);
            for (r, &dp) in dots.iter().enumerate() {
                let ix = srow(g, r, j0)?;
                g.vstore(dpp, ix, dp, vw)?;
                let p = g.vload(ha.s, ix, vw)?;
                next.push(g.b.build_float_add(cur[r].into_vector_value(), g.b.build_float_mul(p, dp, "")?, "")?.into());
            }
            Ok(next)
        })?;
        for (r, v) in dsum.iter().enumerate() {
            self.vstore(ha.st, self.i64c((r * vw) as u64), v.into_vector_value(), vw)?;
        }
        self.for_loop("ds", zero, self.i64c(rn as u64), self.i64c(1), &[], &mut |g, r, _| {
            let sr = g.imulc(r, ld)?;
            let dsum = g.splat(g.vreduce(Red::Sum, g.vload(ha.st, g.imulc(r, vw as u64)?, vw)?)?.into(), vw)?;
            g.for_loop("ds.j", zero, kend, vstep, &[], &mut |g, j0, _| {
                let ix = g.iadd(sr, j0)?;
                let p = g.vload(ha.s, ix, vw)?;
                let dp = g.vload(dpp, ix, vw)?;
                let pd = g.b.build_float_mul(p, g.b.build_float_sub(dp, dsum, "")?, "")?;
                g.vstore(ha.s, ix, g.b.build_float_mul(scale, pd, "")?, vw)?;
                Ok(vec![])
            })?;
            Ok(vec![])
        })?;
        match a.grad {
            // dq = Σ_j ds_j·k_j.
            Some(AttnArg::Q) => self.attn_pv_host(ha, &qbases, kvbase, kend, &|_, _, acc| Ok(acc)),
            // dkᵀ[d, j] += Σ_r q_r[d]·ds_rj.
            _ => self.attn_acc_host(ha, kend, q_b, &qbases, &|g, r, j0| g.vload(ha.s, srow(g, r, j0)?, vw)),
        }
    }

    /// Per row r of the block: Σ_d x[qbase_r + d]·xᵀ[d, j0 .. j0 + vw] (x: buffer `xb`, xᵀ a packed `[hd][ld]`).
    fn attn_dots_host(
        &mut self,
        ha: &Ha<'ctx>,
        xt: PointerValue<'ctx>,
        xb: usize,
        qbases: &[Iv<'ctx>],
        j0: Iv<'ctx>,
    ) -> Kr<Vec<VectorValue<'ctx>>> {
        let vw = ha.vw;
        let vt = self.vty(vw);
        let fma = self.intrinsic("llvm.fma", &[vt.into()])?;
        let init: Vals = qbases.iter().map(|_| vt.const_zero().into()).collect();
        let hd = self.i64c(ha.a.hd as u64);
        let acc = self.for_loop("dot", self.i64c(0), hd, self.i64c(1), &init, &mut |g, d, cur| {
            let kv = g.vload(xt, g.iadd(g.imulc(d, ha.ld as u64)?, j0)?, vw)?;
            let mut next = Vec::with_capacity(cur.len());
            for (&qb, c) in qbases.iter().zip(cur) {
                let x = g.splat(g.ldf(xb, g.iadd(qb, d)?)?.into(), vw)?;
                next.push(g.call(fma, &[x.into(), kv.into(), (*c).into()])?);
            }
            Ok(next)
        })?;
        Ok(acc.into_iter().map(|v| v.into_vector_value()).collect())
    }

    /// Forward and dq: out_r = finish(Σ_{j < kend} c_rj·x_j) for the block's rows, with c the block's scratch rows
    /// (p or ds) and x the packed row-major K or V; vectors over the head dim (two at a time where they pair up),
    /// stored straight into the output rows (a clamped extra row repeats the last row's values into its place), or
    /// through the `o` tile where the head dim is no multiple of the vector.
    fn attn_pv_host(
        &mut self,
        ha: &Ha<'ctx>,
        qbases: &[Iv<'ctx>],
        kvbase: Iv<'ctx>,
        kend: Iv<'ctx>,
        finish: &dyn Fn(&Self, usize, VectorValue<'ctx>) -> Kr<VectorValue<'ctx>>,
    ) -> Kr<()> {
        let a = ha.a;
        // Forward: p·V (v is buffer 2); dq: ds·K (k is buffer 2 of the backward).
        let out_b = if a.grad.is_none() { 4 } else { 5 };
        let (rn, vw, ld, hdp) = (HOST_ATTN_ROWS, ha.vw, ha.ld as u64, ha.hdp as u64);
        // x_j: the packed row (padded head dim) or the row of k / v in place (then every vector is inside the row).
        let (xp, xstride, xalign) = match ha.xp {
            Some(p) => (p, hdp, 4 * vw as u32),
            None => (self.gep(self.ctx.f32_type(), self.bufs[2], kvbase)?, a.kv * a.hd as u64, 4),
        };
        let tile = if a.hd % vw == 0 { None } else { Some(ha.o.expect("o tile")) };
        let nvd = ha.hdp / vw;
        let dc = if vw >= 16 && nvd % 2 == 0 { 2 } else { 1 };
        let vt = self.vty(vw);
        let fma = self.intrinsic("llvm.fma", &[vt.into()])?;
        let one = self.i64c(1);
        self.for_loop("pv.c", self.i64c(0), self.i64c(hdp), self.i64c((dc * vw) as u64), &[], &mut |g, c0, _| {
            let init: Vals = (0..rn * dc).map(|_| vt.const_zero().into()).collect();
            let acc = g.for_loop("pv.j", g.i64c(0), kend, one, &init, &mut |g, j, cur| {
                let xrow = g.iadd(g.imulc(j, xstride)?, c0)?;
                let mut xv = Vec::with_capacity(dc);
                for c in 0..dc {
                    let p = g.gep(g.ctx.f32_type(), xp, g.iadd(xrow, g.i64c((c * vw) as u64))?)?;
                    let v = g.b.build_load(vt, p, "")?;
                    v.as_instruction_value()
                        .expect("load")
                        .set_alignment(xalign)
                        .map_err(|_| KernelError::MissingIntrinsic("align"))?;
                    xv.push(v.into_vector_value());
                }
                let mut next = Vec::with_capacity(cur.len());
                for r in 0..rn {
                    let p = g.ld_f32(ha.s, g.iadd(g.i64c(r as u64 * ld), j)?)?;
                    let pb = g.splat(p.into(), vw)?;
                    for (c, x) in xv.iter().enumerate() {
                        next.push(g.call(fma, &[pb.into(), (*x).into(), cur[r * dc + c].into()])?);
                    }
                }
                Ok(next)
            })?;
            for (r, &qb) in qbases.iter().enumerate() {
                for c in 0..dc {
                    let v = finish(g, r, acc[r * dc + c].into_vector_value())?;
                    let col = g.iadd(c0, g.i64c((c * vw) as u64))?;
                    match tile {
                        Some(o) => g.vstore(o, g.iadd(g.i64c(r as u64 * hdp), col)?, v, vw)?,
                        None => {
                            let p = g.gep(g.ctx.f32_type(), g.bufs[out_b], g.iadd(qb, col)?)?;
                            let st = g.b.build_store(p, v)?;
                            st.set_alignment(4).map_err(|_| KernelError::MissingIntrinsic("align"))?;
                        }
                    }
                }
            }
            Ok(vec![])
        })?;
        if let Some(o) = tile {
            for (r, &qb) in qbases.iter().enumerate() {
                let hd = self.i64c(a.hd as u64);
                self.for_loop("pv.d", self.i64c(0), hd, one, &[], &mut |g, d, _| {
                    let v = g.ld_f32(o, g.iadd(g.i64c(r as u64 * hdp), d)?)?;
                    g.stf(out_b, g.iadd(qb, d)?, v)?;
                    Ok(vec![])
                })?;
            }
        }
        Ok(())
    }

    /// dk and dv: accᵀ[d, j] += Σ_r x[qbase_r + d]·coef(r, j) for keys j < kend (16 at a time), x = q or dout.
    fn attn_acc_host(
        &mut self,
        ha: &Ha<'ctx>,
        kend: Iv<'ctx>,
        xb: usize,
        qbases: &[Iv<'ctx>],
        coef: &dyn Fn(&Self, usize, Iv<'ctx>) -> Kr<VectorValue<'ctx>>,
    ) -> Kr<()> {
        let (vw, ld) = (ha.vw, ha.ld as u64);
        let acc = ha.acc.expect("dk/dv accumulator");
        let vt = self.vty(vw);
        let fma = self.intrinsic("llvm.fma", &[vt.into()])?;
        let hd = self.i64c(ha.a.hd as u64);
        self.for_loop("acc", self.i64c(0), kend, self.i64c(vw as u64), &[], &mut |g, j0, _| {
            let cv = (0..qbases.len()).map(|r| coef(g, r, j0)).collect::<Kr<Vec<_>>>()?;
            g.for_loop("acc.d", g.i64c(0), hd, g.i64c(1), &[], &mut |g, d, _| {
                let ix = g.iadd(g.imulc(d, ld)?, j0)?;
                let mut v = g.vload(acc, ix, vw)?;
                for (&qb, c) in qbases.iter().zip(&cv) {
                    let x = g.splat(g.ldf(xb, g.iadd(qb, d)?)?.into(), vw)?;
                    v = g.call(fma, &[x.into(), (*c).into(), v.into()])?.into_vector_value();
                }
                g.vstore(acc, ix, v, vw)?;
                Ok(vec![])
            })?;
            Ok(vec![])
        })?;
        Ok(())
    }

    // ---- host vectors -------------------------------------------------------------------------------------------------

    fn vty(&self, vw: usize) -> VectorType<'ctx> {
        self.ctx.f32_type().vec_type(vw as u32)
    }

    /// `x` in every one of `vw` lanes.
    fn splat(&self, x: BasicValueEnum<'ctx>, vw: usize) -> Kr<VectorValue<'ctx>> {
        let vt = match x.get_type() {
            BasicTypeEnum::FloatType(t) => t.vec_type(vw as u32),
            BasicTypeEnum::IntType(t) => t.vec_type(vw as u32),
            other => unreachable!("splat of a {other:?}"),
        };
        let ins = self.b.build_insert_element(vt.get_poison(), x, self.ctx.i32_type().const_zero(), "")?;
        let mask = self.ctx.i32_type().vec_type(vw as u32).const_zero();
        Ok(self.b.build_shuffle_vector(ins, vt.get_poison(), mask, "")?)
    }

    fn splat_c(&self, v: f64, vw: usize) -> VectorValue<'ctx> {
        VectorType::const_vector(&vec![self.f32c(v); vw])
    }

    /// The vector of type `ty` at `p[i]` (elements of `ty`'s element type), aligned to its size.
    fn vload_ty(
        &self,
        ty: VectorType<'ctx>,
        p: PointerValue<'ctx>,
        i: Iv<'ctx>,
        vw: usize,
    ) -> Kr<BasicValueEnum<'ctx>> {
        let v = self.b.build_load(ty, self.gep(ty.get_element_type(), p, i)?, "")?;
        v.as_instruction_value()
            .expect("load")
            .set_alignment(4 * vw as u32)
            .map_err(|_| KernelError::MissingIntrinsic("align"))?;
        Ok(v)
    }

    fn vload(&self, p: PointerValue<'ctx>, i: Iv<'ctx>, vw: usize) -> Kr<VectorValue<'ctx>> {
        Ok(self.vload_ty(self.vty(vw), p, i, vw)?.into_vector_value())
    }

    fn vstore(&self, p: PointerValue<'ctx>, i: Iv<'ctx>, v: VectorValue<'ctx>, vw: usize) -> Kr<()> {
        let st = self.b.build_store(self.gep(self.ctx.f32_type(), p, i)?, v)?;
        st.set_alignment(4 * vw as u32).map_err(|_| KernelError::MissingIntrinsic("align"))?;
        Ok(())
    }

    /// `llvm.<name>` on vectors of `args[0]`'s type.
    fn vcall(&self, name: &'static str, args: &[VectorValue<'ctx>]) -> Kr<VectorValue<'ctx>> {
        let f = self.intrinsic(name, &[args[0].get_type().into()])?;
        let args: Vec<BasicMetadataValueEnum> = args.iter().map(|&a| a.into()).collect();
        Ok(self.call(f, &args)?.into_vector_value())
    }

    /// The maximum (`llvm.maxnum`) or the sum of `v`'s lanes, by halving: a few shuffles, not a serial chain.
    fn vreduce(&self, k: Red, mut v: VectorValue<'ctx>) -> Kr<Fv<'ctx>> {
        let i32t = self.ctx.i32_type();
        let mut w = v.get_type().get_size();
        while w > 1 {
            w /= 2;
            let half = |from: u32| {
                VectorType::const_vector(&(from..from + w).map(|l| i32t.const_int(l as u64, false)).collect::<Vec<_>>())
            };
            let lo = self.b.build_shuffle_vector(v, v.get_type().get_poison(), half(0), "")?;
            let hi = self.b.build_shuffle_vector(v, v.get_type().get_poison(), half(w), "")?;
            v = match k {
                Red::Max => self.vcall("llvm.maxnum", &[lo, hi])?,
                Red::Sum => self.b.build_float_add(lo, hi, "")?,
            };
        }
        Ok(self.b.build_extract_element(v, i32t.const_zero(), "")?.into_float_value())
    }

    /// eˣ lane by lane: [`Emit::exp`]'s Cephes `expf` (the same reduction, polynomial and scaling, and NaN stays
    /// NaN), with fused multiply-adds and the clamps as compare-and-select (one instruction each on x86).
    fn vexp(&self, x: VectorValue<'ctx>) -> Kr<VectorValue<'ctx>> {
        let b = &self.b;
        let vw = x.get_type().get_size() as usize;
        let c = |v: f64| self.splat_c(v, vw);
        let i32t = self.ctx.i32_type();
        let iv = i32t.vec_type(vw as u32);
        let ci = |v: u64| VectorType::const_vector(&vec![i32t.const_int(v, false); vw]);
        let fma =
            |a: VectorValue<'ctx>, m: VectorValue<'ctx>, acc: VectorValue<'ctx>| self.vcall("llvm.fma", &[a, m, acc]);
        let lo = b.build_float_compare(FloatPredicate::OLT, x, c(-104.0), "")?;
        let clamped = b.build_select(lo, c(-104.0), x, "")?.into_vector_value();
        let hi = b.build_float_compare(FloatPredicate::OGT, clamped, c(89.0), "")?;
        let clamped = b.build_select(hi, c(89.0), clamped, "")?.into_vector_value();
        let n = self.vcall("llvm.rint", &[b.build_float_mul(clamped, c(std::f64::consts::LOG2_E), "")?])?;
        let r = fma(n, c(-0.693359375), clamped)?;
        let r = fma(n, c(2.12194440e-4), r)?;
        let mut p = c(1.9875691500e-4);
        for k in [1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1] {
            p = fma(p, r, c(k))?;
        }
        let y = b.build_float_add(fma(p, b.build_float_mul(r, r, "")?, r)?, c(1.0), "")?;
        let ni = b.build_float_to_signed_int(n, iv, "")?;
        let n1 = b.build_right_shift(ni, ci(1), true, "")?;
        let n2 = b.build_int_sub(ni, n1, "")?;
        let pow2 = |k: VectorValue<'ctx>| -> Kr<VectorValue<'ctx>> {
            let bits = b.build_left_shift(b.build_int_add(k, ci(127), "")?, ci(23), "")?;
            Ok(b.build_bit_cast(bits, x.get_type(), "")?.into_vector_value())
        };
        let scaled = b.build_float_mul(b.build_float_mul(y, pow2(n1)?, "")?, pow2(n2)?, "")?;
        let nan = b.build_float_compare(FloatPredicate::UNO, x, x, "")?;
        Ok(b.build_select(nan, x, scaled, "")?.into_vector_value())
    }

    /// One query row (batch `bi`, head `hi`, position `i`) of attention or of one of its gradients.
    fn attn_row(&mut self, a: Attn, bi: Iv<'ctx>, hi: Iv<'ctx>, i: Iv<'ctx>) -> Kr<()> {
        // Buffers: forward (q, k, v, seg, out); backward (dout, q, k, v, seg, out).
        let (dout_b, q_b, k_b, v_b, seg_b, out_b) = match a.grad {
            None => (usize::MAX, 0, 1, 2, 3, 4),
            Some(_) => (0, 1, 2, 3, 4, 5),
        };
        let hd = a.hd as u64;
        let rep = a.h / a.kv;
        let bt_i = self.iadd(self.imulc(bi, a.t)?, i)?;
        let qbase = self.imulc(self.iadd(self.imulc(bt_i, a.h)?, hi)?, hd)?;
        let kvh = self.udivc(hi, rep)?;
        let seg_i = self.ldi(seg_b, bt_i)?;
        let q = self.lvec_load(q_b, qbase, a.hd)?;
        let dout = match a.grad {
            Some(_) => self.lvec_load(dout_b, qbase, a.hd)?,
            None => vec![],
        };
        let end = if a.causal { self.iadd(i, self.i64c(1))? } else { self.i64c(a.t) };
        let c = q.len();
        let scale = self.f32c(a.scale);
        let zero = self.f32c(0.0);
        let need_dp = matches!(a.grad, Some(AttnArg::Q | AttnArg::K));

        // (visible, k row base) of key j.
        let key = |g: &mut Self, j: Iv<'ctx>| -> Kr<(Iv<'ctx>, Iv<'ctx>)> {
            let bt_j = g.iadd(g.imulc(bi, a.t)?, j)?;
            let seg_j = g.ldi(seg_b, bt_j)?;
            let visible = g.b.build_int_compare(IntPredicate::EQ, seg_j, seg_i, "")?;
            let kbase = g.imulc(g.iadd(g.imulc(bt_j, a.kv)?, kvh)?, hd)?;
            Ok((visible, kbase))
        };

        // Pass 1: running max m, sum l, and (forward) Σ p·v or (dq, dk) Σ p·dp.
        let mut init: Vals = vec![self.f32c(f64::NEG_INFINITY).into(), zero.into()];
        match a.grad {
            None => init.extend((0..c).map(|_| BasicValueEnum::from(zero))),
            Some(_) if need_dp => init.push(zero.into()),
            Some(_) => {}
        }
        let stats = self.for_loop("key", self.i64c(0), end, self.i64c(1), &init, &mut |g, j, cur| {
            let (visible, kbase) = key(g, j)?;
            g.if_else(visible, cur, &mut |g| {
                let kr = g.lvec_load(k_b, kbase, a.hd)?;
                let qk = g.lvec_dot(&q, &kr)?;
                let s = g.mul(scale, qk)?;
                let (m, l) = (cur[0].into_float_value(), cur[1].into_float_value());
                let m_new = g.fmax(m, s)?;
                let alpha = g.exp(g.sub(m, m_new)?)?;
                let p = g.exp(g.sub(s, m_new)?)?;
                let mut next: Vals = vec![m_new.into(), g.add(g.mul(l, alpha)?, p)?.into()];
                if a.grad.is_none() {
                    let vr = g.lvec_load(v_b, kbase, a.hd)?;
                    for (acc, v) in cur[2..].iter().zip(vr) {
                        next.push(g.add(g.mul(acc.into_float_value(), alpha)?, g.mul(p, v)?)?.into());
                    }
                } else if need_dp {
                    let vr = g.lvec_load(v_b, kbase, a.hd)?;
                    let dp = g.lvec_dot(&dout, &vr)?;
                    next.push(g.add(g.mul(cur[2].into_float_value(), alpha)?, g.mul(p, dp)?)?.into());
                }
                Ok(next)
            })
        })?;
        let (m, l) = (stats[0].into_float_value(), stats[1].into_float_value());
        if a.grad.is_none() {
            let o = stats[2..].iter().map(|acc| self.div(acc.into_float_value(), l)).collect::<Kr<Vec<_>>>()?;
            return self.lvec_store(out_b, qbase, a.hd, &o, false);
        }
        let dsum = if need_dp { self.div(stats[2].into_float_value(), l)? } else { zero };

        // Pass 2: p = exp(s − m)/l, ds = p·(dp − D); dq accumulates here, dk/dv go to the kv rows.
        let init: Vals = match a.grad {
            Some(AttnArg::Q) => (0..c).map(|_| zero.into()).collect(),
            _ => vec![],
        };
        let dq = self.for_loop("key2", self.i64c(0), end, self.i64c(1), &init, &mut |g, j, cur| {
            let (visible, kbase) = key(g, j)?;
            g.if_else(visible, cur, &mut |g| {
                let kr = g.lvec_load(k_b, kbase, a.hd)?;
                let qk = g.lvec_dot(&q, &kr)?;
                let s = g.mul(scale, qk)?;
                let p = g.div(g.exp(g.sub(s, m)?)?, l)?;
                if a.grad == Some(AttnArg::V) {
                    let dv = dout.iter().map(|&x| g.mul(p, x)).collect::<Kr<Vec<_>>>()?;
                    g.lvec_store(out_b, kbase, a.hd, &dv, true)?;
                    return Ok(vec![]);
                }
                let vr = g.lvec_load(v_b, kbase, a.hd)?;
                let dp = g.lvec_dot(&dout, &vr)?;
                let sds = g.mul(scale, g.mul(p, g.sub(dp, dsum)?)?)?;
                if a.grad == Some(AttnArg::K) {
                    let dk = q.iter().map(|&x| g.mul(sds, x)).collect::<Kr<Vec<_>>>()?;
                    g.lvec_store(out_b, kbase, a.hd, &dk, true)?;
                    return Ok(vec![]);
                }
                let mut next = Vec::with_capacity(c);
                for (acc, kv) in cur.iter().zip(kr) {
                    next.push(g.add(acc.into_float_value(), g.mul(sds, kv)?)?.into());
                }
                Ok(next)
            })
        })?;
        if a.grad == Some(AttnArg::Q) {
            let dq: Vec<Fv> = dq.iter().map(|v| v.into_float_value()).collect();
            self.lvec_store(out_b, qbase, a.hd, &dq, false)?;
        }
        Ok(())
    }

    // ---- rope, embedding ------------------------------------------------------------------------------------------

    /// The inverse frequencies as the interpreter computes them in f32 mode, as a constant table.
    fn inv_freq_table(&self, hd: usize, theta: f64) -> PointerValue<'ctx> {
        let vals: Vec<Fv> =
            (0..hd / 2).map(|j| self.f32c((1.0f32 / (theta as f32).powf((2 * j) as f32 / hd as f32)) as f64)).collect();
        let arr = self.ctx.f32_type().const_array(&vals);
        let space = match self.flavor {
            Flavor::Host => AddressSpace::default(),
            Flavor::Nvptx => AddressSpace::from(1u16),
        };
        let name = format!("{}_inv_freq", self.func.get_name().to_string_lossy());
        let g = self.module.add_global(arr.get_type(), Some(space), &name);
        g.set_linkage(Linkage::Internal);
        g.set_constant(true);
        g.set_initializer(&arr);
        g.as_pointer_value()
    }

    /// x: [rows = B·T·H, hd], pos: [B·T]: one item per rotated pair.
    fn rope(&mut self, rows: usize, heads: usize, hd: usize, theta: f64, inverse: bool) -> Kr<()> {
        let half = (hd / 2) as u64;
        let table = self.inv_freq_table(hd, theta);
        let arr = self.ctx.f32_type().array_type(half as u32);
        let f64t = self.ctx.f64_type();
        // (cos, sin) of position `pos` at frequency `j`, rounded to f32 as the interpreter does, back in f64.
        let cos_sin = |g: &mut Self, pos: Iv<'ctx>, j: Iv<'ctx>| -> Kr<(Fv<'ctx>, Fv<'ctx>)> {
            let posf = g.b.build_signed_int_to_float(pos, g.ctx.f32_type(), "")?;
            // SAFETY: j < hd/2, the table's length.
            let slot = unsafe { g.b.build_in_bounds_gep(arr, table, &[g.i64c(0), j], "")? };
            let inv = g.b.build_load(g.ctx.f32_type(), slot, "")?.into_float_value();
            let angle = g.mul(posf, inv)?;
            let (sin, cos) = g.sincos(g.b.build_float_ext(angle, f64t, "")?)?;
            let round = |g: &Self, v: Fv<'ctx>| -> Kr<Fv<'ctx>> {
                let v = g.b.build_float_trunc(v, g.ctx.f32_type(), "")?;
                Ok(g.b.build_float_ext(v, f64t, "")?)
            };
            let (c, s) = (round(g, cos)?, round(g, sin)?);
            Ok((c, if inverse { g.b.build_float_neg(s, "")? } else { s }))
        };
        // Rotate the pair (j, j + hd/2) of row `row` in f64 and round once.
        let rotate = |g: &mut Self, row: Iv<'ctx>, j: Iv<'ctx>, c: Fv<'ctx>, s: Fv<'ctx>| -> Kr<()> {
            let i1 = g.iadd(g.imulc(row, hd as u64)?, j)?;
            let i2 = g.iadd(i1, g.i64c(half))?;
            let x1 = g.b.build_float_ext(g.ldf(0, i1)?, f64t, "")?;
            let x2 = g.b.build_float_ext(g.ldf(0, i2)?, f64t, "")?;
            let o1 = g.sub(g.mul(x1, c)?, g.mul(x2, s)?)?;
            let o2 = g.add(g.mul(x2, c)?, g.mul(x1, s)?)?;
            g.stf(2, i1, g.b.build_float_trunc(o1, g.ctx.f32_type(), "")?)?;
            g.stf(2, i2, g.b.build_float_trunc(o2, g.ctx.f32_type(), "")?)?;
            Ok(())
        };
        if self.flavor == Flavor::Host {
            // One item per token: each (cos, sin) is computed once and applied to every head of the token.
            let tokens = (rows / heads.max(1)) as u64;
            self.for_items(tokens, &[], &mut |g, bt, _| {
                let pos = g.ldi(1, bt)?;
                g.for_loop("j", g.i64c(0), g.i64c(half), g.i64c(1), &[], &mut |g, j, _| {
                    let (c, s) = cos_sin(g, pos, j)?;
                    g.for_loop("h", g.i64c(0), g.i64c(heads as u64), g.i64c(1), &[], &mut |g, h, _| {
                        let row = g.iadd(g.imulc(bt, heads as u64)?, h)?;
                        rotate(g, row, j, c, s)?;
                        Ok(vec![])
                    })?;
                    Ok(vec![])
                })?;
                Ok(vec![])
            })?;
            return Ok(());
        }
        self.for_items(rows as u64 * half, &[], &mut |g, it, _| {
            let j = g.uremc(it, half)?;
            let row = g.udivc(it, half)?;
            let bt = g.udivc(row, heads as u64)?;
            let pos = g.ldi(1, bt)?;
            let (c, s) = cos_sin(g, pos, j)?;
            rotate(g, row, j, c, s)?;
            Ok(vec![])
        })?;
        Ok(())
    }

    /// (in range, the id or 0) of token `t`.
    fn token_id(&self, ids: usize, t: Iv<'ctx>, vocab: usize) -> Kr<(Iv<'ctx>, Iv<'ctx>)> {
        let id = self.ldi(ids, t)?;
        let ok = self.b.build_int_compare(IntPredicate::ULT, id, self.i64c(vocab as u64), "")?;
        Ok((ok, self.select_i(ok, id, self.i64c(0))?))
    }

    /// table: [V,D], ids: [N] → out: [N,D]; one item per token.
    fn embedding(&mut self, vocab: usize, dim: usize, tokens: usize) -> Kr<()> {
        let d64 = dim as u64;
        self.for_items(tokens as u64, &[], &mut |g, t, _| {
            let (ok, id) = g.token_id(1, t, vocab)?;
            let (src, dst) = (g.imulc(id, d64)?, g.imulc(t, d64)?);
            g.lane_loop(g.i64c(d64), &[], &mut |g, d, _| {
                let v = g.ldf(0, g.iadd(src, d)?)?;
                g.stf(2, g.iadd(dst, d)?, g.select_f(ok, v, g.f32c(0.0))?)?;
                Ok(vec![])
            })?;
            Ok(vec![])
        })?;
        Ok(())
    }

    /// dy: [N,D], ids: [N] → out: [V,D]. Host: each thread owns a slice of vocabulary rows (zeroes them, then adds
    /// every token that falls in it). GPU: one warp per token, atomic adds into a zeroed output.
    fn embedding_bwd(&mut self, vocab: usize, dim: usize, tokens: usize) -> Kr<()> {
        let d64 = dim as u64;
        match self.flavor {
            Flavor::Host => {
                let (v0, v1) = self.host_slice(self.i64c(vocab as u64))?;
                let (z0, z1) = (self.imulc(v0, d64)?, self.imulc(v1, d64)?);
                self.for_loop("zero", z0, z1, self.i64c(1), &[], &mut |g, e, _| {
                    g.stf(2, e, g.f32c(0.0))?;
                    Ok(vec![])
                })?;
                self.for_loop("tok", self.i64c(0), self.i64c(tokens as u64), self.i64c(1), &[], &mut |g, t, _| {
                    let id = g.ldi(1, t)?;
                    let lo = g.b.build_int_compare(IntPredicate::SGE, id, v0, "")?;
                    let hi = g.b.build_int_compare(IntPredicate::SLT, id, v1, "")?;
                    let mine = g.b.build_and(lo, hi, "")?;
                    g.if_then(mine, &mut |g| {
                        let (src, dst) = (g.imulc(t, d64)?, g.imulc(id, d64)?);
                        g.for_loop("col", g.i64c(0), g.i64c(d64), g.i64c(1), &[], &mut |g, d, _| {
                            g.addf(2, g.iadd(dst, d)?, g.ldf(0, g.iadd(src, d)?)?, false)?;
                            Ok(vec![])
                        })?;
                        Ok(())
                    })?;
                    Ok(vec![])
                })?;
            }
            Flavor::Nvptx => {
                self.for_items(tokens as u64, &[], &mut |g, t, _| {
                    let (ok, id) = g.token_id(1, t, vocab)?;
                    g.if_then(ok, &mut |g| {
                        let (src, dst) = (g.imulc(t, d64)?, g.imulc(id, d64)?);
                        g.lane_loop(g.i64c(d64), &[], &mut |g, d, _| {
                            g.addf(2, g.iadd(dst, d)?, g.ldf(0, g.iadd(src, d)?)?, true)?;
                            Ok(vec![])
                        })?;
                        Ok(())
                    })
                    .map(|_| vec![])
                })?;
            }
        }
        Ok(())
    }

    // ---- cross-entropy --------------------------------------------------------------------------------------------

    /// Whether label `l` (i64) counts (is not `ignore_index`).
    fn counts(&self, l: Iv<'ctx>, ignore: i64) -> Kr<Iv<'ctx>> {
        Ok(self.b.build_int_compare(IntPredicate::NE, l, self.ctx.i64_type().const_int(ignore as u64, true), "")?)
    }

    /// The number of labels that count, as f32, computed by the team.
    fn label_count(&mut self, labels: usize, rows: usize, ignore: i64) -> Kr<Fv<'ctx>> {
        let init = [self.f32c(0.0).into()];
        let n = self.lane_loop(self.i64c(rows as u64), &init, &mut |g, r, acc| {
            let c = g.counts(g.ldi(labels, r)?, ignore)?;
            let one = g.select_f(c, g.f32c(1.0), g.f32c(0.0))?;
            Ok(vec![g.add(acc[0].into_float_value(), one)?.into()])
        })?;
        self.reduce(Red::Sum, n[0].into_float_value())
    }

    /// The team's reduction of `f(v)` over `v` in `0..n`.
    fn team_reduce(
        &mut self,
        k: Red,
        n: usize,
        f: &mut dyn FnMut(&mut Self, Iv<'ctx>) -> Kr<Fv<'ctx>>,
    ) -> Kr<Fv<'ctx>> {
        let init = [self.identity(k).into()];
        let host = self.flavor == Flavor::Host;
        let acc = self.lane_loop(self.i64c(n as u64), &init, &mut |g, v, acc| {
            let x = f(g, v)?;
            let c = g.combine(k, acc[0].into_float_value(), x)?;
            if host && k == Red::Sum {
                // The order of a host thread's sum is free: lets LLVM split it into vector lanes.
                if let Some(inst) = c.as_instruction() {
                    let _ = inst.set_fast_math_flags(FastMathFlags::AllowReassoc);
                }
            }
            Ok(vec![c.into()])
        })?;
        self.reduce(k, acc[0].into_float_value())
    }

    /// Adds this team's `total / count` to the scalar loss (lane 0 only; nothing when no label counts).
    fn add_loss(&mut self, out: usize, total: Fv<'ctx>, count: Fv<'ctx>) -> Kr<()> {
        let lane0 = self.is_lane0()?;
        let any = self.b.build_float_compare(FloatPredicate::OGT, count, self.f32c(0.0), "")?;
        let go = self.b.build_and(lane0, any, "")?;
        self.if_then(go, &mut |g| g.addf(out, g.i64c(0), g.div(total, count)?, true))
    }

    /// cross_entropy (logits, labels → loss) or, with `bwd`, cross_entropy_bwd (dloss, logits, labels → dlogits).
    fn cross_entropy(&mut self, rows: usize, vocab: usize, ignore: i64, bwd: bool) -> Kr<()> {
        let (x_b, l_b, out) = if bwd { (1, 2, 3) } else { (0, 1, 2) };
        let v64 = vocab as u64;
        let count = self.label_count(l_b, rows, ignore)?;
        let dloss = if bwd { self.ldf(0, self.i64c(0))? } else { self.f32c(0.0) };
        let init = [self.f32c(0.0).into()];
        let total = self.for_items(rows as u64, &init, &mut |g, r, acc| {
            let lbl = g.ldi(l_b, r)?;
            let valid = g.counts(lbl, ignore)?;
            let base = g.imulc(r, v64)?;
            if bwd {
                let invalid = g.b.build_not(valid, "")?;
                g.if_then(invalid, &mut |g| {
                    g.lane_loop(g.i64c(v64), &[], &mut |g, v, _| {
                        g.stf(out, g.iadd(base, v)?, g.f32c(0.0))?;
                        Ok(vec![])
                    })
                    .map(|_| ())
                })?;
            }
            g.if_else(valid, acc, &mut |g| {
                let m = g.team_reduce(Red::Max, vocab, &mut |g, v| g.ldf(x_b, g.iadd(base, v)?))?;
                let s = g.team_reduce(Red::Sum, vocab, &mut |g, v| g.exp(g.sub(g.ldf(x_b, g.iadd(base, v)?)?, m)?))?;
                if bwd {
                    g.lane_loop(g.i64c(v64), &[], &mut |g, v, _| {
                        let p = g.div(g.exp(g.sub(g.ldf(x_b, g.iadd(base, v)?)?, m)?)?, s)?;
                        let hit = g.b.build_int_compare(IntPredicate::EQ, v, lbl, "")?;
                        let oh = g.select_f(hit, g.f32c(1.0), g.f32c(0.0))?;
                        let d = g.div(g.mul(dloss, g.sub(p, oh)?)?, count)?;
                        g.stf(out, g.iadd(base, v)?, d)?;
                        Ok(vec![])
                    })?;
                    return Ok(acc.to_vec());
                }
                let lse = g.add(m, g.log(s)?)?;
                let in_range = g.b.build_int_compare(IntPredicate::ULT, lbl, g.i64c(v64), "")?;
                let z = g.ldf(x_b, g.iadd(base, g.select_i(in_range, lbl, g.i64c(0))?)?)?;
                Ok(vec![g.add(acc[0].into_float_value(), g.sub(lse, z)?)?.into()])
            })
        })?;
        if !bwd {
            self.add_loss(out, total[0].into_float_value(), count)?;
        }
        Ok(())
    }

    /// linear_cross_entropy (h, W, labels → loss) or, with `bwd`, its ∂/∂h (dloss, h, W, labels → dh).
    fn linear_cross_entropy(&mut self, rows: usize, dim: usize, vocab: usize, ignore: i64, bwd: bool) -> Kr<()> {
        let (h_b, w_b, l_b, out) = if bwd { (1, 2, 3, 4) } else { (0, 1, 2, 3) };
        let (d64, v64) = (dim as u64, vocab as u64);
        let count = self.label_count(l_b, rows, ignore)?;
        let dloss = if bwd { self.ldf(0, self.i64c(0))? } else { self.f32c(0.0) };
        let init = [self.f32c(0.0).into()];
        let total = self.for_items(rows as u64, &init, &mut |g, r, acc| {
            let lbl = g.ldi(l_b, r)?;
            let valid = g.counts(lbl, ignore)?;
            let hbase = g.imulc(r, d64)?;
            if bwd {
                g.lane_loop(g.i64c(d64), &[], &mut |g, d, _| {
                    g.stf(out, g.iadd(hbase, d)?, g.f32c(0.0))?;
                    Ok(vec![])
                })?;
            }
            g.if_else(valid, acc, &mut |g| {
                // Each lane's online logsumexp over its vocabulary rows; the label's logit where a lane meets it.
                let ninf = g.f32c(f64::NEG_INFINITY);
                let init = [ninf.into(), g.f32c(0.0).into(), g.f32c(0.0).into()];
                let st = g.lane_loop(g.i64c(v64), &init, &mut |g, v, cur| {
                    let z = g.dot_serial(h_b, hbase, w_b, g.imulc(v, d64)?, dim)?;
                    let (m, s) = (cur[0].into_float_value(), cur[1].into_float_value());
                    let m_new = g.fmax(m, z)?;
                    let s = g.add(g.mul(s, g.exp(g.sub(m, m_new)?)?)?, g.exp(g.sub(z, m_new)?)?)?;
                    let hit = g.b.build_int_compare(IntPredicate::EQ, v, lbl, "")?;
                    let zl = g.select_f(hit, z, cur[2].into_float_value())?;
                    Ok(vec![m_new.into(), s.into(), zl.into()])
                })?;
                let (m, s, zl) = (st[0].into_float_value(), st[1].into_float_value(), st[2].into_float_value());
                let mm = g.reduce(Red::Max, m)?;
                let scaled = g.mul(s, g.exp(g.sub(m, mm)?)?)?;
                let ss = g.reduce(Red::Sum, scaled)?;
                let lse = g.add(mm, g.log(ss)?)?;
                if !bwd {
                    let zl = g.reduce(Red::Sum, zl)?;
                    return Ok(vec![g.add(acc[0].into_float_value(), g.sub(lse, zl)?)?.into()]);
                }
                g.lce_bwd_row(hbase, lbl, lse, dloss, count, (h_b, w_b, out), dim, vocab)?;
                Ok(acc.to_vec())
            })
        })?;
        if !bwd {
            self.add_loss(out, total[0].into_float_value(), count)?;
        }
        Ok(())
    }

    /// dh_r += Σ_v dlogit_v·W_v over chunks of one vocabulary row per lane (the chunk's dlogits in shared memory).
    #[allow(clippy::too_many_arguments)]
    fn lce_bwd_row(
        &mut self,
        hbase: Iv<'ctx>,
        lbl: Iv<'ctx>,
        lse: Fv<'ctx>,
        dloss: Fv<'ctx>,
        count: Fv<'ctx>,
        (h_b, w_b, out): (usize, usize, usize),
        dim: usize,
        vocab: usize,
    ) -> Kr<()> {
        let (d64, v64) = (dim as u64, vocab as u64);
        let (lane, nl) = self.lane()?;
        let f32t = self.ctx.f32_type();
        let slot = |g: &Self, t: Iv<'ctx>| -> Kr<PointerValue<'ctx>> {
            Ok(match (g.chunk, g.chunk_slot) {
                // SAFETY: t < blockDim.x = NN_BLOCK_THREADS, the array's length.
                (Some(sh), _) => unsafe {
                    g.b.build_in_bounds_gep(
                        f32t.array_type(NN_BLOCK_THREADS),
                        sh.as_pointer_value(),
                        &[g.i64c(0), t],
                        "",
                    )?
                },
                // SAFETY: on the host the team is one thread, so t = 0.
                (None, Some(p)) => unsafe { g.b.build_in_bounds_gep(f32t, p, &[t], "")? },
                _ => unreachable!("linear_cross_entropy_bwd has a dlogit chunk"),
            })
        };
        self.for_loop("vchunk", self.i64c(0), self.i64c(v64), nl, &[], &mut |g, c0, _| {
            let v = g.iadd(c0, lane)?;
            let has = g.b.build_int_compare(IntPredicate::ULT, v, g.i64c(v64), "")?;
            let gv = g.if_else(has, &[g.f32c(0.0).into()], &mut |g| {
                let z = g.dot_serial(h_b, hbase, w_b, g.imulc(v, d64)?, dim)?;
                let p = g.exp(g.sub(z, lse)?)?;
                let hit = g.b.build_int_compare(IntPredicate::EQ, v, lbl, "")?;
                let oh = g.select_f(hit, g.f32c(1.0), g.f32c(0.0))?;
                Ok(vec![g.div(g.mul(dloss, g.sub(p, oh)?)?, count)?.into()])
            })?;
            g.b.build_store(slot(g, lane)?, gv[0])?;
            g.barrier()?;
            let rem = g.b.build_int_sub(g.i64c(v64), c0, "")?;
            let nc = g.umin(nl, rem)?;
            g.lane_loop(g.i64c(d64), &[], &mut |g, d, _| {
                let init = [g.f32c(0.0).into()];
                let acc = g.for_loop("cv", g.i64c(0), nc, g.i64c(1), &init, &mut |g, t, acc| {
                    let gt = g.b.build_load(f32t, slot(g, t)?, "")?.into_float_value();
                    let w = g.ldf(w_b, g.iadd(g.imulc(g.iadd(c0, t)?, d64)?, d)?)?;
                    Ok(vec![g.add(acc[0].into_float_value(), g.mul(gt, w)?)?.into()])
                })?;
                g.addf(out, g.iadd(hbase, d)?, acc[0].into_float_value(), false)?;
                Ok(vec![])
            })?;
            g.barrier()?;
            Ok(vec![])
        })?;
        Ok(())
    }
}
