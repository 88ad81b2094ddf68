//! The `cpu` backend: runs a compiled plan's host code — the shared library codegen linked from every kernel's host
//! flavour — with no interpreter in the loop.
//!
//! Loading a plan ([`CpuBackend::new`]):
//! - every kernel must have code (a non-empty `KernelCode::symbol`); otherwise the plan is refused, naming the
//!   kernels ([`RuntimeError::MissingHostCode`]);
//! - the plan is validated first, before anything is allocated or loaded (`crate::validate`: every kernel
//!   argument's buffer inside its allocation and large enough, indices in range, sizes with checked arithmetic), and
//!   the memory it needs is compared with the host's `MemAvailable`;
//! - the host library is written to a temporary file, loaded (`libloading`) and the file removed at once (nothing
//!   is left behind if the process is killed); each distinct symbol is looked up once;
//! - memory: one zeroed, 64-byte aligned allocation for the persistent region (parameters, optimizer states, inputs)
//!   and one for the arena, each buffer at its planned offset; a value's buffer is its placement with `Alias` chains
//!   and `InPlace` resolved. NF4 parameters are kept as their storage parts ([`nf4_parts`]), each its own aligned
//!   allocation (the plan's persistent slot for them is not used);
//! - every kernel argument is resolved to a pointer once; a kernel argument without memory is an error, except a
//!   constant (which the memory plan folds into its readers, but some templates take as a buffer, e.g. the `1.0`
//!   seeding the backward of `linear_cross_entropy`): the backend keeps such constants in buffers of their own;
//! - a kernel with run-time constants (`KernelCode::seeds`, the dropout seeds) gets one more argument after its
//!   buffers: a pointer to its seeds as u64s.
//!
//! A step ([`CpuBackend::step`]) runs the kernels in schedule order on a persistent pool of threads: each thread
//! calls `tunec_k<N>(args, tid, nthreads)` and the threads meet at a barrier after every kernel; the `zero_host`
//! arguments are zeroed (by all threads, then a barrier) before their kernel. After the last kernel, graph outputs
//! that are constants are filled, `update` outputs that the memory plan could not write in place are copied into
//! their parameter's buffer (so the next step sees the new parameter), and the loss, metrics and logits are read.

mod memory;
mod pool;

pub use memory::{check_nf4_format, nf4_part_bytes, nf4_parts, AlignedBuf, AllocError, ALIGN};

use crate::slots::{check_fits, read_f32, read_i32, InputSlot};
use crate::validate::{check_memory, host_memory_available, validate, Backend, Layout};
use crate::RuntimeError;
use ir::interp::Value;
use ir::nf4::Nf4Tensor;
use ir::plan::{InputBinding, ParamBinding, Plan, PlanBuffer, Region, ValuePlacement};
use ir::{DType, Graph, Init, Op, OutputKind, ValueId};
use pool::{HostFn, Launch, Pool};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

/// The value's buffer (an index into `plan.buffers`), following `Alias` chains and taking an `InPlace` value's
/// buffer; `None` for a value without memory.
pub fn value_buffer(plan: &Plan, v: ValueId) -> Result<Option<u32>, RuntimeError> {
    let mut at = v.0;
    // A chain longer than the graph has a cycle.
    for _ in 0..=plan.values.len() {
        let p = plan.values.get(at as usize).ok_or_else(|| {
            RuntimeError::Unsupported(format!("value %{at} (reached from {v}) has no placement in the memory plan"))
        })?;
        let b = match *p {
            ValuePlacement::None => return Ok(None),
            ValuePlacement::Owns(b) | ValuePlacement::InPlace { buffer: b, .. } => b,
            ValuePlacement::Alias(of) => {
                at = of;
                continue;
            }
        };
        if b as usize >= plan.buffers.len() {
            return Err(RuntimeError::Unsupported(format!(
                "value %{at} is placed in buffer {b}, but the plan has {} buffers",
                plan.buffers.len()
            )));
        }
        return Ok(Some(b));
    }
    Err(RuntimeError::Unsupported(format!("the aliases of {v} form a cycle")))
}

/// The indices of the parameters an `init_params` materializes (every init but `load`), in the order to do it:
/// initializers that read other parameters (`row_norm`) last, so they see what the others produced.
pub fn init_order<'a>(params: impl Iterator<Item = &'a ParamBinding> + Clone) -> Vec<usize> {
    let inits = |deps: bool| {
        params
            .clone()
            .enumerate()
            .filter(move |(_, p)| !matches!(p.init, Init::Load) && matches!(p.init, Init::RowNorm { .. }) == deps)
    };
    inits(false).chain(inits(true)).map(|(i, _)| i).collect()
}

/// A parameter's f32 values in its NF4 format, quantized on every core (as bitsandbytes quantizes on load).
pub fn quantize_param(data: &[f32], shape: &[usize], f: ir::Nf4Format) -> ir::nf4::Nf4Tensor {
    ir::nf4::quantize_parallel(data, shape, f.block as usize, f.double_quant.map(|b2| b2 as usize), default_threads())
}

/// The number of worker threads to use by default: the machine's available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The graph outputs a step reports (loss, metrics, logits), as f32.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutputs {
    /// In the graph's output order.
    pub outputs: Vec<(OutputKind, Vec<f32>)>,
}

impl StepOutputs {
    /// The output of this kind.
    pub fn get(&self, kind: &OutputKind) -> Option<&[f32]> {
        self.outputs.iter().find(|(k, _)| k == kind).map(|(_, v)| v.as_slice())
    }

    /// The scalar loss.
    pub fn loss(&self) -> Option<f32> {
        self.get(&OutputKind::Loss).and_then(|v| v.first().copied())
    }

    /// A scalar metric (`grad_norm`).
    pub fn metric(&self, name: &str) -> Option<f32> {
        self.get(&OutputKind::Metric(name.to_string())).and_then(|v| v.first().copied())
    }

    /// The logits, when the step returns them.
    pub fn logits(&self) -> Option<&[f32]> {
        self.get(&OutputKind::Logits)
    }
}

type Nf4Slot = crate::slots::Nf4Slot<AlignedBuf>;
type ParamSlot = crate::slots::ParamSlot<AlignedBuf>;

/// A graph output that is a constant with a buffer: filled after the last kernel.
struct ConstFill {
    buffer: u32,
    /// The constant's node.
    node: ValueId,
    dtype: DType,
    numel: usize,
    value: f64,
}

/// An `update` output that is not in its parameter's buffer: copied there after the step.
struct CopyBack {
    from: u32,
    to: u32,
    bytes: usize,
    /// The update value (what the parameter's buffer holds afterwards).
    value: ValueId,
}

/// A loaded plan, ready to run training steps on the host.
pub struct CpuBackend {
    // Fields drop in order: the threads stop first, then the library is unloaded, then memory is freed.
    pool: Pool,
    _library: libloading::Library,
    /// Constants that kernels take as buffers, filled once; each kernel's run-time constants (`seeds`).
    _const_args: Vec<(ValueId, AlignedBuf)>,
    _seed_args: Vec<AlignedBuf>,
    persistent: AlignedBuf,
    arena: AlignedBuf,
    graph: Graph,
    buffers: Vec<PlanBuffer>,
    /// Per value: its buffer, aliases and in-place resolved.
    value_buffer: Vec<Option<u32>>,
    /// Per value: the value whose storage it is (the end of its alias chain).
    root: Vec<ValueId>,
    params: Vec<ParamSlot>,
    param_index: HashMap<String, usize>,
    inputs: Vec<InputSlot>,
    input_index: HashMap<String, usize>,
    const_fills: Vec<ConstFill>,
    copy_backs: Vec<CopyBack>,
    /// The outputs a step reports.
    reported: Vec<(OutputKind, ValueId)>,
    /// Per kernel: the buffers it writes, and the values it writes there.
    writes: Vec<Vec<(u32, ValueId)>>,
    /// Per buffer: the value whose data it holds now, and after a step.
    holder: Vec<Option<ValueId>>,
    holder_after_step: Vec<Option<ValueId>>,
    steps: u64,
}

impl CpuBackend {
    /// Reads a plan file, authenticates it (`crate::trust::load_plan`: the host library is native code) and loads
    /// it with `threads` threads (0: [`default_threads`]).
    pub fn load(path: &Path, threads: usize, trust: &crate::trust::TrustOptions) -> Result<CpuBackend, RuntimeError> {
        CpuBackend::new(&crate::trust::load_plan(path, trust)?.0, threads)
    }

    /// Loads `plan`: checks that every kernel has host code, loads the host library, allocates memory and resolves
    /// every kernel argument, and starts `threads` threads (0: [`default_threads`]; the caller's thread is one).
    pub fn new(plan: &Plan, threads: usize) -> Result<CpuBackend, RuntimeError> {
        // Every size, offset and kernel argument against the memory allocated below, before anything is.
        let layout = validate(plan, Backend::Cpu)?;
        check_memory("host memory (MemAvailable)", layout.total_bytes, host_memory_available())?;
        let Layout { value_buffer, root, .. } = layout;
        let g = &plan.graph;
        let alloc = |bytes: usize, what: &str| {
            AlignedBuf::zeroed(bytes)
                .map_err(|e| RuntimeError::Alloc { what: format!("{what} ({bytes} bytes)"), message: e.to_string() })
        };
        let persistent = alloc(layout.persistent, "the persistent region")?;
        let arena = alloc(layout.arena, "the arena")?;
        let region_base = |r: Region| match r {
            Region::Persistent => persistent.as_mut_ptr(),
            Region::Arena => arena.as_mut_ptr(),
        };

        // Parameters and inputs.
        let mut params = Vec::with_capacity(plan.params.len());
        for p in &plan.params {
            let nf4 = match p.dtype {
                DType::Nf4(format) => Some(Nf4Slot {
                    format,
                    parts: nf4_part_bytes(format, p.shape.iter().product())
                        .into_iter()
                        .enumerate()
                        .map(|(i, n)| alloc(n, &format!("part {i} of `{}`", p.name)))
                        .collect::<Result<_, _>>()?,
                    tensor: None,
                }),
                _ => None,
            };
            let buffer = value_buffer[p.value.index()];
            if nf4.is_none() {
                check_fits(plan, buffer, g.ty(p.value).bytes(), &format!("parameter `{}`", p.name))?;
            }
            params.push(ParamSlot { binding: p.clone(), buffer, nf4, set: false });
        }
        let param_index: HashMap<String, usize> =
            params.iter().enumerate().map(|(i, p)| (p.binding.name.clone(), i)).collect();
        let mut inputs = Vec::with_capacity(plan.inputs.len());
        for i in &plan.inputs {
            let buffer = value_buffer[i.value.index()];
            check_fits(plan, buffer, g.ty(i.value).bytes(), &format!("input `{}`", i.name))?;
            inputs.push(InputSlot { binding: i.clone(), buffer, set: false });
        }
        let input_index: HashMap<String, usize> =
            inputs.iter().enumerate().map(|(i, s)| (s.binding.name.clone(), i)).collect();
        let nf4_of: HashMap<ValueId, usize> =
            params.iter().enumerate().filter(|(_, p)| p.nf4.is_some()).map(|(i, p)| (p.binding.value, i)).collect();

        // The host library and its symbols.
        let library = match &plan.host_library {
            Some(bytes) => load_library(bytes)?,
            None => return Err(RuntimeError::NoHostLibrary),
        };
        let mut symbols: HashMap<&str, HostFn> = HashMap::new();
        for k in &plan.kernels {
            if symbols.contains_key(k.symbol.as_str()) {
                continue;
            }
            // SAFETY: codegen defines every `tunec_k<N>` as `void (void **args, i32 tid, i32 nthreads)`.
            let f = unsafe { library.get::<HostFn>(k.symbol.as_bytes()) }.map_err(|e| RuntimeError::Symbol {
                kernel: k.name.clone(),
                symbol: k.symbol.clone(),
                message: e.to_string(),
            })?;
            symbols.insert(k.symbol.as_str(), *f);
        }

        // Every launch with its argument pointers.
        let mut launches = Vec::with_capacity(plan.kernels.len());
        let mut const_args: Vec<(ValueId, AlignedBuf)> = vec![];
        let mut seed_args: Vec<AlignedBuf> = vec![];
        for k in &plan.kernels {
            let err = |message: String| RuntimeError::Kernel { kernel: k.name.clone(), message };
            let mut args = Vec::with_capacity(k.args.len());
            let mut sizes = Vec::with_capacity(k.args.len());
            for (i, a) in k.args.iter().enumerate() {
                let v = ValueId(a.value);
                let r = root[v.index()];
                let (ptr, bytes) = match g.ty(r).dtype {
                    DType::Nf4(_) => {
                        let Some(&pi) = nf4_of.get(&r) else {
                            return Err(err(format!(
                                "argument {i} is the NF4 value {v}, which is not a parameter; the cpu backend keeps \
                                 only NF4 parameters"
                            )));
                        };
                        let slot = params[pi].nf4.as_ref().expect("an NF4 parameter has parts");
                        let part = slot.parts.get(a.part as usize).ok_or_else(|| {
                            err(format!(
                                "argument {i} is part {} of NF4 parameter `{}`, which has {} parts",
                                a.part,
                                params[pi].binding.name,
                                slot.parts.len()
                            ))
                        })?;
                        (part.as_mut_ptr(), part.len())
                    }
                    _ => {
                        if a.part != 0 {
                            return Err(err(format!(
                                "argument {i} is part {} of {v}, which is not an NF4 value",
                                a.part
                            )));
                        }
                        let Some(b) = value_buffer[v.index()] else {
                            // A constant some template takes as a buffer (the memory plan folds constants into
                            // their readers and gives them no memory): the backend keeps it filled.
                            if let Op::Const { value } = g.node(r).op {
                                let ty = g.ty(v);
                                let buf = match const_args.iter().position(|(c, _)| *c == r) {
                                    Some(at) => &const_args[at].1,
                                    None => {
                                        const_args.push((r, const_buffer(ty, value).map_err(&err)?));
                                        &const_args[const_args.len() - 1].1
                                    }
                                };
                                args.push(buf.as_mut_ptr());
                                sizes.push(buf.len());
                                continue;
                            }
                            return Err(err(format!(
                                "argument {i} is {v} (`{}`), which has no memory in the plan",
                                g.node(v).op.mnemonic()
                            )));
                        };
                        let bytes = g.ty(v).bytes();
                        check_fits(plan, Some(b), bytes, &format!("argument {i} ({v})"))
                            .map_err(|e| err(e.to_string()))?;
                        let buf = &plan.buffers[b as usize];
                        // SAFETY: `offset + bytes` lies within the region (`Plan::check`).
                        (unsafe { region_base(buf.region).add(buf.offset as usize) }, bytes)
                    }
                };
                args.push(ptr);
                sizes.push(bytes);
            }
            if !k.seeds.is_empty() {
                // Run-time constants follow the buffers as one more pointer, to `seeds.len()` u64s.
                let mut buf = alloc(8 * k.seeds.len(), &format!("the seeds of kernel '{}'", k.name))?;
                for (slot, seed) in buf.bytes_mut().chunks_exact_mut(8).zip(&k.seeds) {
                    slot.copy_from_slice(&seed.to_le_bytes());
                }
                args.push(buf.as_mut_ptr());
                seed_args.push(buf);
            }
            let zero_host = k.launch.as_ref().map_or(&[][..], |l| l.zero_host.as_slice());
            let mut zero = Vec::with_capacity(zero_host.len());
            for &z in zero_host {
                let z = z as usize;
                if z >= args.len() {
                    return Err(err(format!("zero_host names argument {z}, but the kernel has {}", args.len())));
                }
                zero.push((args[z], sizes[z]));
            }
            launches.push(Launch { func: symbols[k.symbol.as_str()], args, zero });
        }

        // What happens after the kernels: constant outputs, updates copied back, reported outputs.
        let mut const_fills = vec![];
        let mut copy_backs = vec![];
        let mut reported = vec![];
        for o in &g.outputs {
            let r = root[o.value.index()];
            if let (Op::Const { value }, Some(b)) = (&g.node(r).op, value_buffer[o.value.index()]) {
                if !const_fills.iter().any(|c: &ConstFill| c.buffer == b) {
                    let ty = g.ty(r);
                    if !matches!(ty.dtype, DType::F32 | DType::I32) {
                        return Err(RuntimeError::Unsupported(format!("the output {r} is a {} constant", ty.dtype)));
                    }
                    const_fills.push(ConstFill {
                        buffer: b,
                        node: r,
                        dtype: ty.dtype,
                        numel: ty.numel(),
                        value: *value,
                    });
                }
            }
            match &o.kind {
                OutputKind::Update(name) => {
                    let slot = param_index.get(name).map(|&i| &params[i]).ok_or_else(|| {
                        RuntimeError::Unsupported(format!("the step updates `{name}`, which is not a parameter"))
                    })?;
                    if slot.nf4.is_some() {
                        return Err(RuntimeError::Unsupported(format!(
                            "the step updates the NF4 parameter `{name}`; NF4 parameters are frozen"
                        )));
                    }
                    let (Some(from), Some(to)) = (value_buffer[o.value.index()], slot.buffer) else {
                        return Err(RuntimeError::Unsupported(format!(
                            "the update of `{name}` ({}) or the parameter has no memory in the plan",
                            o.value
                        )));
                    };
                    if plan.buffers[to as usize].region != Region::Persistent {
                        return Err(RuntimeError::Unsupported(format!(
                            "parameter `{name}` is not in persistent memory"
                        )));
                    }
                    let bytes = g.ty(o.value).bytes();
                    if bytes != g.ty(slot.binding.value).bytes() {
                        return Err(RuntimeError::Unsupported(format!(
                            "the update of `{name}` is {}, the parameter {}",
                            g.ty(o.value),
                            g.ty(slot.binding.value)
                        )));
                    }
                    if from != to {
                        copy_backs.push(CopyBack { from, to, bytes, value: r });
                    }
                }
                OutputKind::Loss | OutputKind::Metric(_) | OutputKind::Logits => {
                    if value_buffer[o.value.index()].is_none() && !matches!(g.node(r).op, Op::Const { .. }) {
                        return Err(RuntimeError::Unsupported(format!(
                            "the output {:?} ({}) has no memory in the plan",
                            o.kind, o.value
                        )));
                    }
                    reported.push((o.kind.clone(), o.value));
                }
                OutputKind::Grad(_) => {}
            }
        }

        // Which value each buffer holds after a step.
        let mut holder_after_step: Vec<Option<ValueId>> =
            plan.buffers.iter().map(|b| (b.region == Region::Persistent).then_some(ValueId(b.first))).collect();
        let mut writes = vec![];
        for k in &g.kernels {
            let mut w = vec![];
            for &v in &k.nodes {
                if let ValuePlacement::Owns(b) | ValuePlacement::InPlace { buffer: b, .. } = plan.values[v.index()] {
                    holder_after_step[b as usize] = Some(v);
                    w.push((b, v));
                }
            }
            writes.push(w);
        }
        for c in &const_fills {
            holder_after_step[c.buffer as usize] = Some(c.node);
        }
        for c in &copy_backs {
            holder_after_step[c.to as usize] = Some(c.value);
        }

        let nthreads = if threads == 0 { default_threads() } else { threads };
        let pool = Pool::new(launches, nthreads)
            .map_err(|e| RuntimeError::Unsupported(format!("cannot start {nthreads} threads: {e}")))?;
        Ok(CpuBackend {
            pool,
            _library: library,
            _const_args: const_args,
            _seed_args: seed_args,
            persistent,
            arena,
            graph: g.clone(),
            holder: vec![None; plan.buffers.len()],
            buffers: plan.buffers.clone(),
            value_buffer,
            root,
            params,
            param_index,
            inputs,
            input_index,
            const_fills,
            copy_backs,
            reported,
            writes,
            holder_after_step,
            steps: 0,
        })
    }

    /// The threads that run each kernel (the caller's included).
    pub fn threads(&self) -> usize {
        self.pool.nthreads()
    }

    /// Steps run so far.
    pub fn steps_run(&self) -> u64 {
        self.steps
    }

    /// The plan's graph (the training step).
    pub fn graph(&self) -> &ir::Graph {
        &self.graph
    }

    /// The plan's parameters (and optimizer states).
    pub fn params(&self) -> impl Iterator<Item = &ParamBinding> {
        self.params.iter().map(|p| &p.binding)
    }

    /// The plan's per-step inputs.
    pub fn inputs(&self) -> impl Iterator<Item = &InputBinding> {
        self.inputs.iter().map(|i| &i.binding)
    }

    /// Whether parameter `name` has a value (set, or initialized).
    pub fn is_param_set(&self, name: &str) -> Result<bool, RuntimeError> {
        Ok(self.params[self.param(name)?].set)
    }

    fn param(&self, name: &str) -> Result<usize, RuntimeError> {
        self.param_index.get(name).copied().ok_or_else(|| RuntimeError::UnknownParam(name.to_string()))
    }

    fn input(&self, name: &str) -> Result<usize, RuntimeError> {
        self.input_index.get(name).copied().ok_or_else(|| RuntimeError::UnknownInput(name.to_string()))
    }

    fn region(&self, r: Region) -> &AlignedBuf {
        match r {
            Region::Persistent => &self.persistent,
            Region::Arena => &self.arena,
        }
    }

    /// The first `bytes` bytes of buffer `b`.
    fn buffer_bytes(&self, b: u32, bytes: usize) -> &[u8] {
        let buf = &self.buffers[b as usize];
        let at = buf.offset as usize;
        &self.region(buf.region).bytes()[at..at + bytes]
    }

    fn buffer_bytes_mut(&mut self, b: u32, bytes: usize) -> &mut [u8] {
        let buf = &self.buffers[b as usize];
        let at = buf.offset as usize;
        let region = match buf.region {
            Region::Persistent => &mut self.persistent,
            Region::Arena => &mut self.arena,
        };
        &mut region.bytes_mut()[at..at + bytes]
    }

    /// Sets a parameter from f32 data (row-major, its shape's element count). An NF4 parameter is quantized as the
    /// reference interpreter quantizes it (`ir::nf4::quantize` with the dtype's block sizes).
    pub fn set_param_f32(&mut self, name: &str, data: &[f32]) -> Result<(), RuntimeError> {
        let i = self.param(name)?;
        let b = &self.params[i].binding;
        crate::slots::check_len("parameter", name, &b.shape, data.len())?;
        let numel = data.len();
        match b.dtype {
            DType::F32 => {
                let (v, buffer) = (b.value, self.params[i].buffer);
                if let Some(buf) = buffer {
                    write_f32(self.buffer_bytes_mut(buf, 4 * numel), data);
                    self.holder[buf as usize] = Some(v);
                }
                self.params[i].set = true;
                Ok(())
            }
            DType::Nf4(f) => {
                let q = crate::cpu::quantize_param(data, &b.shape, f);
                self.set_param_nf4(name, &q)
            }
            other => Err(RuntimeError::Unsupported(format!(
                "parameter `{name}` is {other}; the cpu backend takes f32 and nf4 parameters"
            ))),
        }
    }

    /// Sets an NF4 parameter from its quantized storage, which must be in the parameter's format.
    pub fn set_param_nf4(&mut self, name: &str, q: &Nf4Tensor) -> Result<(), RuntimeError> {
        let i = self.param(name)?;
        let slot = &mut self.params[i];
        let Some(nf4) = slot.nf4.as_mut() else {
            return Err(RuntimeError::DType {
                what: "parameter",
                name: name.to_string(),
                expected: slot.binding.dtype.to_string(),
                found: "nf4".to_string(),
            });
        };
        check_nf4_format(q, nf4.format, &slot.binding.shape)
            .map_err(|message| RuntimeError::Nf4 { name: name.to_string(), message })?;
        for (dst, src) in nf4.parts.iter_mut().zip(nf4_parts(q)) {
            dst.bytes_mut().copy_from_slice(&src);
        }
        nf4.tensor = Some(q.clone());
        slot.set = true;
        Ok(())
    }

    /// The current value of an f32 parameter or optimizer state (after a step: the updated one); an NF4 parameter
    /// dequantized.
    pub fn param_f32(&self, name: &str) -> Result<Vec<f32>, RuntimeError> {
        let slot = &self.params[self.param(name)?];
        if !slot.set {
            return Err(RuntimeError::NotSet(name.to_string()));
        }
        if let Some(nf4) = &slot.nf4 {
            return Ok(ir::nf4::dequantize(nf4.tensor.as_ref().expect("a set NF4 parameter has its tensor")));
        }
        let numel: usize = slot.binding.shape.iter().product();
        match (slot.binding.dtype, slot.buffer) {
            (DType::F32, Some(b)) => Ok(read_f32(self.buffer_bytes(b, 4 * numel))),
            (DType::F32, None) => Err(RuntimeError::Unsupported(format!("parameter `{name}` has no memory"))),
            (other, _) => Err(RuntimeError::DType {
                what: "parameter",
                name: name.to_string(),
                expected: other.to_string(),
                found: "a read as f32".to_string(),
            }),
        }
    }

    /// An NF4 parameter's storage, when set.
    pub fn param_nf4(&self, name: &str) -> Result<Option<&Nf4Tensor>, RuntimeError> {
        Ok(self.params[self.param(name)?].nf4.as_ref().and_then(|n| n.tensor.as_ref()))
    }

    /// The bytes of storage part `part` of an NF4 parameter as the kernels read them.
    pub fn nf4_part(&self, name: &str, part: usize) -> Result<Option<&[u8]>, RuntimeError> {
        Ok(self.params[self.param(name)?].nf4.as_ref().and_then(|n| n.parts.get(part)).map(AlignedBuf::bytes))
    }

    /// Materializes every parameter whose initializer is not `load` (`ir::init::materialize` with the run seed
    /// `seed`, as the interpreter-side tests do): LoRA A and B, DoRA magnitudes (from their base weight, which must
    /// be set first), optimizer states.
    pub fn init_params(&mut self, seed: u64) -> Result<(), RuntimeError> {
        for i in init_order(self.params.iter().map(|p| &p.binding)) {
            let p = self.params[i].binding.clone();
            let source = |n: &str| self.source_value(n);
            let t = ir::init::materialize(&p.init, &p.name, &p.shape, seed, &source)
                .map_err(|source| RuntimeError::Init { name: p.name.clone(), source })?;
            self.set_param_f32(&p.name, &t.to_f32())?;
        }
        Ok(())
    }

    /// A parameter's current value as the initializers read it: NF4 as its storage, f32 as a tensor.
    fn source_value(&self, name: &str) -> Option<Value> {
        let slot = &self.params[*self.param_index.get(name)?];
        crate::slots::source_value(slot, || self.param_f32(name).ok())
    }

    /// Sets an f32 input (row-major, its shape's element count).
    pub fn set_input_f32(&mut self, name: &str, data: &[f32]) -> Result<(), RuntimeError> {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.set_input(name, DType::F32, data.len(), &bytes)
    }

    /// Sets an i32 input (token ids, labels, positions, the step counter).
    pub fn set_input_i32(&mut self, name: &str, data: &[i32]) -> Result<(), RuntimeError> {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.set_input(name, DType::I32, data.len(), &bytes)
    }

    fn set_input(&mut self, name: &str, dtype: DType, len: usize, bytes: &[u8]) -> Result<(), RuntimeError> {
        let i = self.input(name)?;
        crate::slots::check_input(&self.inputs[i].binding, dtype, len)?;
        let (v, buffer) = (self.inputs[i].binding.value, self.inputs[i].buffer);
        if let Some(buf) = buffer {
            self.buffer_bytes_mut(buf, bytes.len()).copy_from_slice(bytes);
            self.holder[buf as usize] = Some(v);
        }
        self.inputs[i].set = true;
        Ok(())
    }

    /// Runs one training step: every kernel in order, then the constant outputs, the updates that were not written
    /// in place, and the reported outputs. Every parameter and input must have been set.
    pub fn step(&mut self) -> Result<StepOutputs, RuntimeError> {
        self.check_ready()?;
        self.pool.run(0, self.pool.launches());
        self.finish_step()
    }

    /// As [`CpuBackend::step`], one kernel at a time: after kernel `k` (an index into the plan's kernels) has run,
    /// `after_kernel(k, self)` can read what it computed with [`CpuBackend::value_f32`] before later kernels reuse
    /// the memory. For finding the kernel that computes something wrong; slower than `step`.
    pub fn step_each(&mut self, mut after_kernel: impl FnMut(usize, &CpuBackend)) -> Result<StepOutputs, RuntimeError> {
        self.check_ready()?;
        for k in 0..self.pool.launches() {
            self.pool.run(k, k + 1);
            for &(b, v) in &self.writes[k] {
                self.holder[b as usize] = Some(v);
            }
            after_kernel(k, self);
        }
        self.finish_step()
    }

    fn check_ready(&self) -> Result<(), RuntimeError> {
        crate::slots::check_ready(&self.params, &self.inputs)
    }

    /// After the kernels: constant outputs, updates copied back, the reported outputs.
    fn finish_step(&mut self) -> Result<StepOutputs, RuntimeError> {
        for i in 0..self.const_fills.len() {
            let c = &self.const_fills[i];
            let (buffer, numel, value, dtype) = (c.buffer, c.numel, c.value, c.dtype);
            let out = self.buffer_bytes_mut(buffer, 4 * numel);
            match dtype {
                DType::I32 => out.chunks_exact_mut(4).for_each(|e| e.copy_from_slice(&(value as i32).to_le_bytes())),
                _ => out.chunks_exact_mut(4).for_each(|e| e.copy_from_slice(&(value as f32).to_le_bytes())),
            }
        }
        // Updates from the arena are copied straight; one from another persistent buffer is read before any is
        // written, as its source may itself be a parameter's buffer.
        let persistent_sources: Vec<Option<Vec<u8>>> = self
            .copy_backs
            .iter()
            .map(|c| {
                (self.buffers[c.from as usize].region == Region::Persistent)
                    .then(|| self.buffer_bytes(c.from, c.bytes).to_vec())
            })
            .collect();
        for (i, saved) in persistent_sources.into_iter().enumerate() {
            let CopyBack { from, to, bytes, .. } = self.copy_backs[i];
            match saved {
                Some(data) => self.buffer_bytes_mut(to, bytes).copy_from_slice(&data),
                None => {
                    // Arena to persistent (checked at load).
                    let s = self.buffers[from as usize].offset as usize;
                    let d = self.buffers[to as usize].offset as usize;
                    self.persistent.bytes_mut()[d..d + bytes].copy_from_slice(&self.arena.bytes()[s..s + bytes]);
                }
            }
        }
        self.holder.clone_from(&self.holder_after_step);
        self.steps += 1;
        let outputs = self.reported.iter().map(|(k, v)| (k.clone(), self.read_f32_value(*v))).collect();
        Ok(StepOutputs { outputs })
    }

    /// A value as f32 (i32 values converted; constants without memory filled), reading its buffer as it is now.
    fn read_f32_value(&self, v: ValueId) -> Vec<f32> {
        let ty = self.graph.ty(v);
        let r = self.root[v.index()];
        match (self.value_buffer[v.index()], &self.graph.node(r).op) {
            (None, Op::Const { value }) => vec![*value as f32; ty.numel()],
            (None, _) => vec![],
            (Some(b), _) => {
                let bytes = self.buffer_bytes(b, 4 * ty.numel());
                match ty.dtype {
                    DType::I32 => read_i32(bytes).into_iter().map(|x| x as f32).collect(),
                    _ => read_f32(bytes),
                }
            }
        }
    }

    /// The value of graph node `v` as f32, when it is an f32 value whose buffer still holds it (for tests and
    /// debugging: after a step, transient values whose arena space was reused, and parameters replaced by their
    /// update, are gone).
    pub fn value_f32(&self, v: ValueId) -> Option<Vec<f32>> {
        let ty = self.graph.nodes.get(v.index())?.ty.clone();
        if ty.dtype != DType::F32 {
            return None;
        }
        let b = self.value_buffer[v.index()]?;
        (self.holder[b as usize] == Some(self.root[v.index()])).then(|| read_f32(self.buffer_bytes(b, 4 * ty.numel())))
    }

    /// As [`CpuBackend::value_f32`], for i32 values.
    pub fn value_i32(&self, v: ValueId) -> Option<Vec<i32>> {
        let ty = self.graph.nodes.get(v.index())?.ty.clone();
        if ty.dtype != DType::I32 {
            return None;
        }
        let b = self.value_buffer[v.index()]?;
        (self.holder[b as usize] == Some(self.root[v.index()])).then(|| read_i32(self.buffer_bytes(b, 4 * ty.numel())))
    }
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("graph", &self.graph.name)
            .field("threads", &self.pool.nthreads())
            .field("persistent_bytes", &self.persistent.len())
            .field("arena_bytes", &self.arena.len())
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

/// A buffer holding constant `value` at every element of `ty` (f32 or i32).
fn const_buffer(ty: &ir::Type, value: f64) -> Result<AlignedBuf, String> {
    let element = match ty.dtype {
        DType::F32 => (value as f32).to_le_bytes(),
        DType::I32 => (value as i32).to_le_bytes(),
        other => return Err(format!("a {other} constant is passed as a buffer; the cpu backend fills f32 and i32")),
    };
    let mut buf = AlignedBuf::zeroed(4 * ty.numel()).map_err(|e| e.to_string())?;
    buf.bytes_mut().chunks_exact_mut(4).for_each(|e| e.copy_from_slice(&element));
    Ok(buf)
}

/// The prefix of the temporary file a host library is loaded from: `tunec-host-<pid>-<random>.so`.
const HOST_LIBRARY_PREFIX: &str = "tunec-host-";

/// Loads the host library: written to a temporary file, loaded, and the file removed at once (the loaded library
/// stays mapped), so a process killed while it runs leaves no file behind. A kill in the moment between writing and
/// removing can still leave one: its name carries the process id, and the next load removes the files of processes
/// that are gone ([`remove_stale_host_libraries`]).
fn load_library(bytes: &[u8]) -> Result<libloading::Library, RuntimeError> {
    let lib_err = |e: &dyn std::fmt::Display| RuntimeError::Library(e.to_string());
    let dir = std::env::temp_dir();
    remove_stale_host_libraries(&dir);
    let prefix = format!("{HOST_LIBRARY_PREFIX}{}-", std::process::id());
    let mut file = tempfile::Builder::new().prefix(&prefix).suffix(".so").tempfile_in(&dir).map_err(|e| lib_err(&e))?;
    file.write_all(bytes).map_err(|e| lib_err(&e))?;
    file.flush().map_err(|e| lib_err(&e))?;
    let path = file.into_temp_path();
    // SAFETY: the library is the plan's host code: its initializers are the C runtime's (codegen links plain
    // functions, no constructors).
    let lib = unsafe { libloading::Library::new(path.as_os_str()) }.map_err(|e| lib_err(&e));
    // Removed whether it loaded or not; a failure to remove it is left to the next load's clean-up.
    let _ = path.close();
    lib
}

/// Removes the host library files (`tunec-host-<pid>-*.so`) in `dir` of processes that no longer run (no
/// `/proc/<pid>`): what a process killed while loading its library left behind. Returns how many it removed. Files
/// of running processes, of other users (which the sticky `/tmp` keeps us from removing) and names that do not
/// follow the pattern are left alone; without `/proc` nothing is removed.
pub fn remove_stale_host_libraries(dir: &Path) -> usize {
    if !Path::new("/proc/self").exists() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(HOST_LIBRARY_PREFIX)) else { continue };
        let Some((pid, tail)) = rest.split_once('-') else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !tail.ends_with(".so") || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn write_f32(out: &mut [u8], data: &[f32]) {
    for (o, x) in out.chunks_exact_mut(4).zip(data) {
        o.copy_from_slice(&x.to_le_bytes());
    }
}
