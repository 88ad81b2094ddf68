//! The code generator's driver: every kernel group of an optimized training step to code — PTX per architecture
//! (checked by ptxas, its register/spill report kept) and one host shared library for the `cpu` backend.
//!
//! Kernels that are the same computation on the same shapes (the same layer's kernel in every layer) are generated
//! once: a kernel is keyed by its loop nest with names and value ids erased, and shares the symbol `tunec_k<N>` of
//! the first kernel with that key. So codegen time follows the number of distinct kernels, not the depth.
//! Templates: loop nests (elementwise and row kernels), GEMMs and the transformer ops (single-op groups for now).
//! Kernels no template covers yet are listed in [`Build::missing`], with the reason.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use inkwell::context::Context;
use inkwell::targets::FileType;
use inkwell::values::AnyValue;
use ir::plan::{KernelArg, KernelLaunch};
use ir::Graph;

use crate::lower::{emit_host, emit_ptx as emit_ptx_fn, host_target_machine, optimize_host};
use crate::ptxas::{self, KernelResources};
use crate::CodegenError;

/// The code of one kernel group.
#[derive(Clone, Debug, Default)]
pub struct KernelBuild {
    /// The group's name (`rms_norm:model.layers.0.input_layernorm`).
    pub name: String,
    /// The entry symbol in the PTX and the host library (`tunec_k<N>`); empty when no template covers the group.
    pub symbol: String,
    /// ptxas's resources per SM architecture (when ptxas ran).
    pub resources: BTreeMap<u32, KernelResources>,
    /// The kernel's LLVM IR (host flavour), as text.
    pub llvm_ir: String,
    /// Buffer arguments in ABI order, and the GPU launch (empty / `None` without code).
    pub args: Vec<ir::plan::KernelArg>,
    pub launch: Option<ir::plan::KernelLaunch>,
    /// Run-time constants passed after the buffers (see `ir::plan::KernelCode::seeds`).
    pub seeds: Vec<u64>,
}

/// What codegen produced for a graph.
#[derive(Clone, Debug, Default)]
pub struct Build {
    pub kernels: Vec<KernelBuild>,
    /// One PTX module per SM architecture holding every distinct kernel (entries `tunec_k<N>`).
    pub ptx: BTreeMap<u32, String>,
    /// The distinct kernels' descriptions, by symbol order (`tunec_k0`, `tunec_k1`, …), for `--emit ptx|llvm`.
    pub nests: Vec<Template>,
    /// A shared object with every host kernel (`void tunec_k<N>(void** args, i32 tid, i32 nthreads)`).
    pub host_library: Option<Vec<u8>>,
    /// Distinct kernels generated.
    pub distinct: usize,
    /// Kernel groups without code, with the op that has no template yet.
    pub missing: Vec<(String, String)>,
    pub seconds: f64,
}

/// Options for [`build`].
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub archs: Vec<u32>,
    /// Assemble every PTX module with ptxas and keep its report.
    pub ptxas: bool,
    /// Link a host shared library (needs a C compiler driver, `cc`).
    pub host: bool,
    /// Keep each distinct kernel's (host) LLVM IR as text in [`KernelBuild::llvm_ir`].
    pub llvm_ir: bool,
    /// How GEMMs multiply, on both targets: f32 (the default, the interpreter's arithmetic) or bf16 operands with f32
    /// accumulation (tensor cores on the GPU; the host emulates the rounding so the backends agree).
    pub gemm_precision: kernels::gemm::GemmPrecision,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            archs: vec![80, 90],
            ptxas: true,
            host: true,
            llvm_ir: true,
            gemm_precision: kernels::gemm::GemmPrecision::F32,
        }
    }
}

pub use kernels::gemm::GemmPrecision;
pub use kernels::template::Template;

/// Emission of a template's description for each target.
trait Emit {
    fn emit_host<'ctx>(
        &self,
        ctx: &'ctx Context,
        module: &inkwell::module::Module<'ctx>,
    ) -> Result<inkwell::values::FunctionValue<'ctx>, CodegenError>;
    fn emit_ptx<'ctx>(
        &self,
        ctx: &'ctx Context,
        module: &inkwell::module::Module<'ctx>,
    ) -> Result<inkwell::values::FunctionValue<'ctx>, CodegenError>;
}

impl Emit for Template {
    fn emit_host<'ctx>(
        &self,
        ctx: &'ctx Context,
        module: &inkwell::module::Module<'ctx>,
    ) -> Result<inkwell::values::FunctionValue<'ctx>, CodegenError> {
        match self {
            Template::Loops(n) => emit_host(ctx, module, n),
            Template::Gemm(gm) => crate::gemm::emit_host(ctx, module, gm),
            Template::Nn(nn) => crate::nn::emit_host(ctx, module, nn),
        }
    }

    fn emit_ptx<'ctx>(
        &self,
        ctx: &'ctx Context,
        module: &inkwell::module::Module<'ctx>,
    ) -> Result<inkwell::values::FunctionValue<'ctx>, CodegenError> {
        match self {
            Template::Loops(n) => emit_ptx_fn(ctx, module, n),
            Template::Gemm(gm) => crate::gemm::emit_ptx(ctx, module, gm),
            Template::Nn(nn) => crate::nn::emit_ptx(ctx, module, nn),
        }
    }
}

/// Emits a template's host function (`void sym(void** args, i32 tid, i32 nthreads)`) into `module`.
pub fn emit_host_template<'ctx>(
    ctx: &'ctx Context,
    module: &inkwell::module::Module<'ctx>,
    t: &Template,
) -> Result<inkwell::values::FunctionValue<'ctx>, CodegenError> {
    t.emit_host(ctx, module)
}

/// The kernel's buffer arguments in ABI order (graph values; NF4 weights split into their storage parts) and its
/// GPU launch.
pub fn kernel_interface(g: &Graph, k: &ir::Kernel, t: &Template) -> (Vec<KernelArg>, KernelLaunch) {
    let plain = |v: ir::ValueId| KernelArg { value: v.0, part: 0 };
    let block = |b: u32| KernelLaunch { block: b, ..KernelLaunch::default() };
    let clamp = |n: usize| n.clamp(1, 65_535) as u32;
    match t {
        Template::Loops(n) => {
            let grid = match n.iteration {
                kernels::loops::Iteration::Elements { len } => clamp(len.div_ceil(256)),
                kernels::loops::Iteration::Rows { rows, .. } => clamp(rows),
            };
            let launch = KernelLaunch { grid: (grid, 1, 1), ..block(256) };
            let args =
                n.args().into_iter().map(|(b, part)| KernelArg { value: n.buffers[b].value.0, part: part as u8 });
            (args.collect(), launch)
        }
        Template::Nn(nn) => {
            let l = nn.launch();
            let out = nn.n_inputs as u32;
            let launch = KernelLaunch {
                grid: (l.grid, 1, 1),
                zero_host: if l.zero_output_host { vec![out] } else { vec![] },
                zero_gpu: if l.zero_output_gpu { vec![out] } else { vec![] },
                ..block(kernels::nn::NN_BLOCK_THREADS)
            };
            (nn.buffers.iter().map(|b| plain(b.value)).collect(), launch)
        }
        Template::Gemm(gm) => {
            let anchor = k
                .nodes
                .iter()
                .copied()
                .find(|&v| kernels::gemm::is_gemm_op(&g.node(v).op))
                .expect("a GEMM kernel has its GEMM node");
            let mut args = vec![];
            for &i in &g.node(anchor).inputs {
                match g.ty(i).dtype {
                    ir::DType::Nf4(f) => {
                        let parts = if f.double_quant.is_some() { 4 } else { 2 };
                        args.extend((0..parts).map(|part| KernelArg { value: i.0, part }));
                    }
                    _ => args.push(plain(i)),
                }
            }
            match &gm.epilogue {
                None => args.push(plain(anchor)),
                Some(e) => {
                    args.extend(e.extra_inputs().map(|b| plain(e.nest.buffers[b].value)));
                    if e.store_acc {
                        args.push(plain(anchor));
                    }
                    args.extend(e.nest.outputs().iter().map(|b| plain(b.value)));
                }
            }
            let (gx, gy) = crate::gemm::gpu_grid(gm);
            (args, KernelLaunch { grid: (gx, gy, 1), ..block(crate::gemm::gpu_block_threads(gm)) })
        }
    }
}

/// Generates code for every kernel group of `g` (which must have been through `fuse` and `schedule`).
pub fn build(g: &Graph, opts: &BuildOptions) -> Result<Build, CodegenError> {
    let t0 = Instant::now();
    let mut out = Build::default();
    let mut distinct: Vec<Template> = vec![];
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut kernel_distinct: Vec<Option<usize>> = vec![];
    let mut templates: Vec<Option<Template>> = vec![];
    // One reader index for all groups (`Template::of` builds one per call: quadratic over a deep model's kernels).
    let uses = kernels::template::Uses::of(g);
    for k in &g.kernels {
        let t = Template::of_with(g, k, &uses).map(|mut t| {
            if let Template::Gemm(gm) = &mut t {
                gm.precision = opts.gemm_precision;
            }
            t
        });
        templates.push(t.as_ref().ok().cloned());
        match t {
            Ok(t) => {
                let idx = *by_key.entry(t.key()).or_insert_with(|| {
                    let mut n = t.clone();
                    n.rename(format!("k{}", distinct.len()));
                    distinct.push(n);
                    distinct.len() - 1
                });
                kernel_distinct.push(Some(idx));
            }
            Err(e) => {
                out.missing.push((k.name.clone(), e));
                kernel_distinct.push(None);
            }
        }
    }
    out.distinct = distinct.len();

    // Code generation runs on four threads, each with its own LLVM context: the PTX of half the distinct kernels
    // twice (optimized, then generated for the lowest architecture; the two texts are merged into one module) and
    // the host code of half the kernels twice (two objects linked into one shared library). Each half gets every
    // other GEMM (the expensive kernels) and every other kernel of the rest; host kernels that share a GEMM core
    // (`codegen::gemm::emit_host`) go to the same object, so the core is compiled once.
    const PARTS: usize = 2;
    let deal = |unit_of: &dyn Fn(usize, &Template) -> String| -> Vec<usize> {
        let mut units: HashMap<String, usize> = HashMap::new();
        let mut next = [0usize, 1usize];
        distinct
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let class = usize::from(!matches!(t, Template::Gemm(_)));
                *units.entry(unit_of(i, t)).or_insert_with(|| {
                    next[class] += 1;
                    (next[class] - 1) % PARTS
                })
            })
            .collect()
    };
    let ptx_part_of = deal(&|i, _| i.to_string());
    let host_part_of = deal(&|i, t| match t {
        Template::Gemm(gm) => crate::gemm::host_core_symbol(gm),
        _ => i.to_string(),
    });
    let (ptx_part_of, host_part_of) = (&ptx_part_of, &host_part_of);

    // LLVM's NVPTX output for our templates differs between the architectures only in the `.target` line (none uses
    // an architecture-specific instruction yet; `codegen/tests/build.rs` checks this on every distinct kernel of the
    // tiny steps), so the higher architectures' modules are the lowest one's text retargeted.
    let base_sm = opts.archs.iter().copied().min().unwrap_or(crate::ptx::MIN_SM);
    let ptx_part = |part: usize| -> Result<String, CodegenError> {
        let ctx = Context::create();
        let module = ctx.create_module(&format!("tunec_kernels{part}"));
        for (_, t) in distinct.iter().enumerate().filter(|(i, _)| ptx_part_of[*i] == part) {
            t.emit_ptx(&ctx, &module)?;
        }
        let bitcode = crate::ptx::optimize_for_nvptx(&module, base_sm)?;
        crate::ptx::ptx_from_bitcode(&bitcode, base_sm)
    };
    type PtxOut = Result<(u32, String, Vec<Option<KernelResources>>), CodegenError>;
    let assemble = |ptx: String, sm: u32| -> PtxOut {
        let mut res = vec![None; distinct.len()];
        if opts.ptxas {
            let report = ptxas::assemble(&ptx, sm)?;
            for (i, nest) in distinct.iter().enumerate() {
                res[i] = report.kernel(&nest.symbol()).cloned();
            }
        }
        Ok((sm, ptx, res))
    };
    type HostPart = Result<(Vec<(usize, String)>, Vec<u8>), CodegenError>;
    let host_part = |part: usize| -> HostPart {
        let ctx = Context::create();
        let module = ctx.create_module(&format!("tunec_host{part}"));
        let mut llvm = vec![];
        for (i, t) in distinct.iter().enumerate().filter(|(i, _)| host_part_of[*i] == part) {
            let f = t.emit_host(&ctx, &module)?;
            llvm.push((i, if opts.llvm_ir { f.print_to_string().to_string() } else { String::new() }));
        }
        optimize_host(&module)?;
        let machine = host_target_machine()?;
        let obj = machine
            .write_to_memory_buffer(&module, FileType::Object)
            .map_err(|e| CodegenError::Llvm { stage: "host object", message: e.to_string() })?;
        Ok((llvm, obj.as_slice().to_vec()))
    };
    let link_parts = |parts: Vec<HostPart>| -> Result<(Vec<String>, Vec<u8>), CodegenError> {
        let mut llvm = vec![String::new(); distinct.len()];
        let mut objects = vec![];
        for p in parts {
            let (texts, obj) = p?;
            for (i, t) in texts {
                llvm[i] = t;
            }
            objects.push(obj);
        }
        Ok((llvm, link_shared(&objects)?))
    };
    let mut res_of: Vec<BTreeMap<u32, KernelResources>> = vec![BTreeMap::new(); distinct.len()];
    let mut llvm_of: Vec<String> = vec![String::new(); distinct.len()];
    if !distinct.is_empty() {
        let (ptx_results, host_result) = std::thread::scope(|scope| {
            let host_jobs: Vec<_> =
                if opts.host { (0..PARTS).map(|p| scope.spawn(move || host_part(p))).collect() } else { vec![] };
            let ptx: Vec<PtxOut> = if opts.archs.is_empty() {
                vec![]
            } else {
                let jobs: Vec<_> = (0..PARTS).map(|p| scope.spawn(move || ptx_part(p))).collect();
                let texts: Result<Vec<String>, CodegenError> =
                    jobs.into_iter().map(|j| j.join().expect("PTX thread")).collect();
                match texts.and_then(|t| crate::ptx::merge_modules(&t)) {
                    Err(e) => vec![Err(e)],
                    Ok(base) => {
                        let jobs: Vec<_> = opts
                            .archs
                            .iter()
                            .map(|&sm| {
                                let ptx = crate::ptx::retarget(&base, base_sm, sm);
                                scope.spawn(move || assemble(ptx, sm))
                            })
                            .collect();
                        jobs.into_iter().map(|j| j.join().expect("ptxas thread")).collect()
                    }
                }
            };
            let host = (!host_jobs.is_empty())
                .then(|| host_jobs.into_iter().map(|j| j.join().expect("host thread")).collect::<Vec<_>>());
            (ptx, host.map(link_parts))
        });
        for r in ptx_results {
            let (sm, ptx, res) = r?;
            for (i, r) in res.into_iter().enumerate() {
                if let Some(r) = r {
                    res_of[i].insert(sm, r);
                }
            }
            out.ptx.insert(sm, ptx);
        }
        if let Some(h) = host_result {
            let (llvm, lib) = h?;
            llvm_of = llvm;
            out.host_library = Some(lib);
        }
    }

    for ((k, d), t) in g.kernels.iter().zip(&kernel_distinct).zip(&templates) {
        out.kernels.push(match (d, t) {
            (Some(i), Some(t)) => {
                let (args, launch) = kernel_interface(g, k, t);
                KernelBuild {
                    name: k.name.clone(),
                    symbol: distinct[*i].symbol(),
                    resources: res_of[*i].clone(),
                    llvm_ir: llvm_of[*i].clone(),
                    args,
                    launch: Some(launch),
                    seeds: t.seeds().to_vec(),
                }
            }
            _ => KernelBuild { name: k.name.clone(), ..KernelBuild::default() },
        });
    }
    out.nests = distinct;
    out.seconds = t0.elapsed().as_secs_f64();
    Ok(out)
}

/// PTX for one distinct kernel alone (for `--emit ptx <dir>`).
pub fn kernel_ptx(t: &Template, sm: u32) -> Result<String, CodegenError> {
    match t {
        Template::Loops(n) => crate::lower::nest_to_ptx(n, sm),
        Template::Gemm(gm) => crate::gemm::gemm_to_ptx(gm, sm),
        Template::Nn(nn) => crate::nn::kernel_to_ptx(nn, sm),
    }
}

/// Links object files into one shared library with the system's C compiler driver.
fn link_shared(objects: &[Vec<u8>]) -> Result<Vec<u8>, CodegenError> {
    let dir = tempfile::Builder::new()
        .prefix("tunec-link-")
        .tempdir()
        .map_err(|source| CodegenError::Io { path: std::env::temp_dir(), source })?;
    let lib = dir.path().join("libkernels.so");
    let mut paths = vec![];
    for (i, object) in objects.iter().enumerate() {
        let obj = dir.path().join(format!("kernels{i}.o"));
        std::fs::write(&obj, object).map_err(|source| CodegenError::Io { path: obj.clone(), source })?;
        paths.push(obj);
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let run = std::process::Command::new(&cc)
        .args(["-shared", "-o"])
        .arg(&lib)
        .args(&paths)
        .output()
        .map_err(|source| CodegenError::Io { path: cc.clone().into(), source })?;
    if !run.status.success() {
        return Err(CodegenError::Llvm {
            stage: "link host library",
            message: String::from_utf8_lossy(&run.stderr).into_owned(),
        });
    }
    std::fs::read(&lib).map_err(|source| CodegenError::Io { path: lib.clone(), source })
}
