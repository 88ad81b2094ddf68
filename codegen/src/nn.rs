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
//! - Attention (flash style, no T×T matrix anywhere): per (batch, head, query row) an online softmax over the
//!   visible keys (running max and sum, one key at a time), GQA (query head h reads kv head h / (H/KV)), masking as
//!   the interpreter: key j is visible from row i iff their segment ids are equal and (j ≤ i when causal). On the GPU
//!   one warp owns a query row, its lanes split the head dim, dot products are warp shuffles.
//!   The backward recomputes the softmax per row: a first pass gives the row's max m, sum l and
//!   D = Σ_j p_j·dp_j (online, like l), a second pass recomputes p_j = exp(s_j − m)/l and ds_j = p_j·(dp_j − D).
//!   dq is per query row. dk and dv accumulate over every query row of every query head sharing the kv head: the
//!   host partitions by (batch, kv head), so a thread owns whole dk/dv slabs; the GPU runs one block per (batch,
//!   kv head), which zeroes the slab, then its warps take query rows and add with `red.add.f32` (no memset needed;
//!   parallelism is B·KV blocks).
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
//! f32 throughout (except RoPE, above), `exp`/`log` as the Cephes-style polynomials of `lower`. Labels and token ids
//! must lie in range (or equal `ignore_index`), as the interpreter requires; out-of-range ones never read out of
//! bounds (they read row 0 / write nothing).

use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::values::{BasicValueEnum, FastMathFlags, FloatValue, FunctionValue, GlobalValue, IntValue, PointerValue};
use inkwell::{AddressSpace, AtomicOrdering, FloatPredicate, IntPredicate};
use ir::AttnArg;
use kernels::nn::{Launch, NnKernel, NnOp, Team, NN_BLOCK_THREADS};
use kernels::Sreg;

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

    /// `buf[base + d] = f(buf[base + d], d)` for `d < n`, as a loop (vectorizable on the host).
    fn row_update(
        &mut self,
        buf: usize,
        base: Iv<'ctx>,
        n: usize,
        f: &dyn Fn(&mut Self, Fv<'ctx>, Iv<'ctx>) -> Kr<Fv<'ctx>>,
    ) -> Kr<()> {
        self.for_loop("row", self.i64c(0), self.i64c(n as u64), self.i64c(1), &[], &mut |g, d, _| {
            let idx = g.iadd(base, d)?;
            let old = g.ldf(buf, idx)?;
            let new = f(g, old, d)?;
            g.stf(buf, idx, new)?;
            Ok(vec![])
        })?;
        Ok(())
    }

    /// The host's version of [`Self::attn_row`]: the same arithmetic in the same order, with the head vectors read
    /// from memory and accumulated in the output row by loops over the head dimension (not unrolled into registers,
    /// which would make LLVM spend seconds on each kernel for 128-wide heads).
    fn attn_row_host(&mut self, a: Attn, bi: Iv<'ctx>, hi: Iv<'ctx>, i: Iv<'ctx>) -> Kr<()> {
        let (dout_b, q_b, k_b, v_b, seg_b, out_b) = match a.grad {
            None => (usize::MAX, 0, 1, 2, 3, 4),
            Some(_) => (0, 1, 2, 3, 4, 5),
        };
        let hd = a.hd as u64;
        let n = a.hd;
        let rep = a.h / a.kv;
        let bt_i = self.iadd(self.imulc(bi, a.t)?, i)?;
        let qbase = self.imulc(self.iadd(self.imulc(bt_i, a.h)?, hi)?, hd)?;
        let kvh = self.udivc(hi, rep)?;
        let seg_i = self.ldi(seg_b, bt_i)?;
        let end = if a.causal { self.iadd(i, self.i64c(1))? } else { self.i64c(a.t) };
        let scale = self.f32c(a.scale);
        let zero = self.f32c(0.0);
        let need_dp = matches!(a.grad, Some(AttnArg::Q | AttnArg::K));
        let key = |g: &mut Self, j: Iv<'ctx>| -> Kr<(Iv<'ctx>, Iv<'ctx>)> {
            let bt_j = g.iadd(g.imulc(bi, a.t)?, j)?;
            let seg_j = g.ldi(seg_b, bt_j)?;
            let visible = g.b.build_int_compare(IntPredicate::EQ, seg_j, seg_i, "")?;
            let kbase = g.imulc(g.iadd(g.imulc(bt_j, a.kv)?, kvh)?, hd)?;
            Ok((visible, kbase))
        };
        if matches!(a.grad, None | Some(AttnArg::Q)) {
            self.row_update(out_b, qbase, n, &|g, _, _| Ok(g.f32c(0.0)))?;
        }

        // Pass 1: running max m, sum l, and (forward) Σ p·v in the output row, or (dq, dk) Σ p·dp.
        let mut init: Vals = vec![self.f32c(f64::NEG_INFINITY).into(), zero.into()];
        if need_dp {
            init.push(zero.into());
        }
        let stats = self.for_loop("key", self.i64c(0), end, self.i64c(1), &init, &mut |g, j, cur| {
            let (visible, kbase) = key(g, j)?;
            g.if_else(visible, cur, &mut |g| {
                let qk = g.dot_serial(q_b, qbase, k_b, kbase, n)?;
                let s = g.mul(scale, qk)?;
                let (m, l) = (cur[0].into_float_value(), cur[1].into_float_value());
                let m_new = g.fmax(m, s)?;
                let alpha = g.exp(g.sub(m, m_new)?)?;
                let p = g.exp(g.sub(s, m_new)?)?;
                let mut next: Vals = vec![m_new.into(), g.add(g.mul(l, alpha)?, p)?.into()];
                if a.grad.is_none() {
                    g.row_update(out_b, qbase, n, &|g, acc, d| {
                        let v = g.ldf(v_b, g.iadd(kbase, d)?)?;
                        g.add(g.mul(acc, alpha)?, g.mul(p, v)?)
                    })?;
                } else if need_dp {
                    let dp = g.dot_serial(dout_b, qbase, v_b, kbase, n)?;
                    next.push(g.add(g.mul(cur[2].into_float_value(), alpha)?, g.mul(p, dp)?)?.into());
                }
                Ok(next)
            })
        })?;
        let (m, l) = (stats[0].into_float_value(), stats[1].into_float_value());
        if a.grad.is_none() {
            return self.row_update(out_b, qbase, n, &|g, acc, _| g.div(acc, l));
        }
        let dsum = if need_dp { self.div(stats[2].into_float_value(), l)? } else { zero };

        // Pass 2: p = exp(s − m)/l, ds = p·(dp − D); dq accumulates in its row, dk/dv in the kv rows.
        self.for_loop("key2", self.i64c(0), end, self.i64c(1), &[], &mut |g, j, _| {
            let (visible, kbase) = key(g, j)?;
            g.if_then(visible, &mut |g| {
                let qk = g.dot_serial(q_b, qbase, k_b, kbase, n)?;
                let s = g.mul(scale, qk)?;
                let p = g.div(g.exp(g.sub(s, m)?)?, l)?;
                if a.grad == Some(AttnArg::V) {
                    return g.row_update(out_b, kbase, n, &|g, acc, d| {
                        let x = g.ldf(dout_b, g.iadd(qbase, d)?)?;
                        g.add(acc, g.mul(p, x)?)
                    });
                }
                let dp = g.dot_serial(dout_b, qbase, v_b, kbase, n)?;
                let sds = g.mul(scale, g.mul(p, g.sub(dp, dsum)?)?)?;
                let (dst, src, other) = match a.grad {
                    Some(AttnArg::K) => (kbase, q_b, qbase),
                    _ => (qbase, k_b, kbase),
                };
                g.row_update(out_b, dst, n, &|g, acc, d| {
                    let x = g.ldf(src, g.iadd(other, d)?)?;
                    g.add(acc, g.mul(sds, x)?)
                })
            })?;
            Ok(vec![])
        })?;
        Ok(())
    }

    /// One query row (batch `bi`, head `hi`, position `i`) of attention or of one of its gradients.
    fn attn_row(&mut self, a: Attn, bi: Iv<'ctx>, hi: Iv<'ctx>, i: Iv<'ctx>) -> Kr<()> {
        if self.flavor == Flavor::Host {
            return self.attn_row_host(a, bi, hi, i);
        }
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
        self.for_items(rows as u64 * half, &[], &mut |g, it, _| {
            let j = g.uremc(it, half)?;
            let row = g.udivc(it, half)?;
            let bt = g.udivc(row, heads as u64)?;
            let pos = g.ldi(1, bt)?;
            let posf = g.b.build_signed_int_to_float(pos, g.ctx.f32_type(), "")?;
            // SAFETY: j < hd/2, the table's length.
            let slot = unsafe { g.b.build_in_bounds_gep(arr, table, &[g.i64c(0), j], "")? };
            let inv = g.b.build_load(g.ctx.f32_type(), slot, "")?.into_float_value();
            let angle = g.mul(posf, inv)?;
            let f64t = g.ctx.f64_type();
            let (sin, cos) = g.sincos(g.b.build_float_ext(angle, f64t, "")?)?;
            // Round cos and sin to f32 (as the interpreter does), then rotate in f64 and round once.
            let round = |g: &Self, v: Fv<'ctx>| -> Kr<Fv<'ctx>> {
                let v = g.b.build_float_trunc(v, g.ctx.f32_type(), "")?;
                Ok(g.b.build_float_ext(v, f64t, "")?)
            };
            let c = round(g, cos)?;
            let s = round(g, sin)?;
            let s = if inverse { g.b.build_float_neg(s, "")? } else { s };
            let i1 = g.iadd(g.imulc(row, hd as u64)?, j)?;
            let i2 = g.iadd(i1, g.i64c(half))?;
            let x1 = g.b.build_float_ext(g.ldf(0, i1)?, f64t, "")?;
            let x2 = g.b.build_float_ext(g.ldf(0, i2)?, f64t, "")?;
            let o1 = g.sub(g.mul(x1, c)?, g.mul(x2, s)?)?;
            let o2 = g.add(g.mul(x2, c)?, g.mul(x1, s)?)?;
            g.stf(2, i1, g.b.build_float_trunc(o1, g.ctx.f32_type(), "")?)?;
            g.stf(2, i2, g.b.build_float_trunc(o2, g.ctx.f32_type(), "")?)?;
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
        let acc = self.lane_loop(self.i64c(n as u64), &init, &mut |g, v, acc| {
            let x = f(g, v)?;
            Ok(vec![g.combine(k, acc[0].into_float_value(), x)?.into()])
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
