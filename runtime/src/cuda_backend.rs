//! The `cuda` backend: runs a compiled plan's training step on an NVIDIA GPU, launching the plan's PTX kernels with
//! cudarc (the driver API, loaded at run time). Same plan semantics as the cpu backend ([`crate::cpu`]):
//!
//! - [`CudaBackend::new`] first probes the driver ([`crate::cuda::cuda_device`]): without `libcuda.so` or without
//!   the device it returns [`CudaError::Unavailable`] at once, never touching cudarc's lazily loaded driver (which
//!   panics when the library is missing);
//! - the PTX module is the plan's highest architecture not above the device's (sm_90 on H100/H200; sm_80 PTX runs
//!   on sm_90 too), loaded once; each distinct entry symbol is looked up once;
//! - memory: one zeroed device allocation for the persistent region and one for the arena, each buffer at its planned
//!   offset (a value's buffer: its placement with `Alias` chains and `InPlace` resolved, [`crate::cpu::value_buffer`]);
//!   NF4 parameters are kept as their storage parts ([`crate::cpu::nf4_parts`]), each its own allocation; constants
//!   that a kernel takes as a buffer get a filled allocation of their own; a kernel's run-time constants (`seeds`)
//!   are one more pointer after its buffers, to a device array of u64s;
//! - every kernel argument is resolved to a raw device address once (a pointer parameter of a PTX entry is a `.u64`
//!   parameter, so the address is passed as a `u64` value).
//!
//! A step ([`CudaBackend::step`]) runs on one stream: for each kernel in schedule order, its `zero_gpu` arguments are
//! zeroed (`cuMemsetD8Async`) and it is launched with the plan's grid and block; then constant outputs are filled,
//! `update` outputs the memory plan could not write in place are copied into their parameter's buffer
//! (device-to-device; one whose source is itself a persistent buffer goes through a scratch allocation first, so no
//! copy reads what another one wrote), the stream is synchronized and the loss and metrics are read back.

use crate::cpu::{check_nf4_format, nf4_part_bytes, nf4_parts, StepOutputs};
use crate::cuda::{cuda_device, CudaUnavailable, DeviceInfo};
use crate::slots::{check_fits, read_f32, read_i32, InputSlot};
use crate::validate::{check_memory, validate, Backend, Layout};
use crate::RuntimeError;
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig};
use cudarc::driver::{DevicePtr, PushKernelArg};
use cudarc::nvrtc::Ptx;
use ir::interp::Value;
use ir::nf4::Nf4Tensor;
use ir::plan::{InputBinding, ParamBinding, Plan, PlanBuffer, Region};
use ir::{DType, Graph, Op, OutputKind, ValueId};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Everything the cuda backend refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No driver, no such device, or the probe failed: the backend cannot run here.
    #[error(transparent)]
    Unavailable(#[from] CudaUnavailable),
    /// The plan (or a call's arguments) does not fit: the same errors as the cpu backend's.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The plan has no PTX the device can run.
    #[error("the plan has no PTX for sm_{device} or below (it has {}): recompile it for a GPU target", list_archs(.available))]
    NoPtx { device: u32, available: Vec<u32> },
    /// A driver call failed.
    #[error("CUDA driver error while {doing}: {source}")]
    Driver {
        doing: String,
        #[source]
        source: DriverError,
    },
}

fn list_archs(a: &[u32]) -> String {
    if a.is_empty() {
        return "no PTX".to_string();
    }
    a.iter().map(|sm| format!("sm_{sm}")).collect::<Vec<_>>().join(", ")
}

/// A closure mapping a driver error to [`CudaError::Driver`] with what was being done.
fn driver(doing: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
    let doing = doing.into();
    move |source| CudaError::Driver { doing, source }
}

/// A device allocation of `len` bytes (at least one byte is allocated, so every address is valid).
struct DevBuf {
    /// Owns the allocation (freed on drop); kernels and copies use `ptr`.
    _slice: CudaSlice<u8>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl DevBuf {
    fn zeroed(stream: &Arc<CudaStream>, len: usize, what: &str) -> Result<DevBuf, CudaError> {
        let slice =
            stream.alloc_zeros::<u8>(len.max(1)).map_err(driver(format!("allocating {len} bytes for {what}")))?;
        let ptr = {
            let (p, _sync) = slice.device_ptr(stream);
            p
        };
        Ok(DevBuf { _slice: slice, ptr, len })
    }
}

type Nf4Slot = crate::slots::Nf4Slot<DevBuf>;
type ParamSlot = crate::slots::ParamSlot<DevBuf>;

/// One kernel launch: the function, its arguments as device addresses, what to zero first.
struct Launch {
    /// Index into `CudaBackend::functions`.
    func: usize,
    args: Vec<u64>,
    /// (address, bytes) to zero before the launch.
    zero: Vec<(u64, usize)>,
    cfg: LaunchConfig,
}

/// A graph output that is a constant with a buffer: filled after the last kernel.
struct ConstFill {
    buffer: u32,
    dtype: DType,
    numel: usize,
    value: f64,
}

/// An `update` output that is not in its parameter's buffer: copied there after the step.
struct CopyBack {
    from: u32,
    to: u32,
    bytes: usize,
    /// Where a persistent source is staged (an offset into `scratch`), so no copy reads another's destination.
    staged: Option<usize>,
}

/// A loaded plan, ready to run training steps on a GPU.
pub struct CudaBackend {
    // Fields drop in declaration order: the launches and functions before the module, memory before the stream.
    launches: Vec<Launch>,
    functions: Vec<CudaFunction>,
    _const_args: Vec<(ValueId, DevBuf)>,
    _seed_args: Vec<DevBuf>,
    scratch: DevBuf,
    persistent: DevBuf,
    arena: DevBuf,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    device: DeviceInfo,
    /// The PTX architecture loaded (`90` → sm_90).
    ptx_sm: u32,
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
    reported: Vec<(OutputKind, ValueId)>,
    steps: u64,
}

/// The bytes of a constant `value` at every element of `ty` (f32 or i32).
fn const_bytes(ty: &ir::Type, value: f64) -> Result<Vec<u8>, String> {
    let element = match ty.dtype {
        DType::F32 => (value as f32).to_le_bytes(),
        DType::I32 => (value as i32).to_le_bytes(),
        other => return Err(format!("a {other} constant is passed as a buffer; the cuda backend fills f32 and i32")),
    };
    Ok(element.repeat(ty.numel()))
}

/// The PTX architecture to load for a device of SM `device`: the highest the plan has that is not above it.
pub fn pick_ptx_arch(available: impl IntoIterator<Item = u32>, device: u32) -> Option<u32> {
    available.into_iter().filter(|&sm| sm <= device).max()
}

/// Copies `bytes` to device address `dst` on `stream` and waits for the copy. `dst` must lie in an allocation of the
/// caller's with room for `bytes`.
fn upload_now(stream: &CudaStream, dst: u64, bytes: &[u8], what: &str) -> Result<(), CudaError> {
    // SAFETY: the caller passes an address with room for `bytes`; the stream is synchronized before `bytes` can be
    // dropped.
    unsafe { result::memcpy_htod_async(dst, bytes, stream.cu_stream()) }
        .map_err(driver(format!("uploading {what}")))?;
    stream.synchronize().map_err(driver(format!("uploading {what}")))
}

impl CudaBackend {
    /// Reads a plan file, authenticates it (`crate::trust::load_plan`: its kernels are native code) and loads it
    /// onto device `ordinal`.
    pub fn load(path: &Path, ordinal: usize, trust: &crate::trust::TrustOptions) -> Result<CudaBackend, CudaError> {
        CudaBackend::new(&crate::trust::load_plan(path, trust).map_err(RuntimeError::from)?.0, ordinal)
    }

    /// Loads `plan` onto device `ordinal`: probes the driver (a clean error without one), picks and loads the PTX
    /// module, allocates device memory and resolves every kernel argument.
    pub fn new(plan: &Plan, ordinal: usize) -> Result<CudaBackend, CudaError> {
        // The plan first (every size, offset and kernel argument against the memory allocated below), so a bad
        // plan is refused on any machine; then the probe: it never panics without a driver, and nothing below runs
        // without one.
        let layout = validate(plan, Backend::Cuda)?;
        let device = cuda_device(ordinal)?;
        let available: Vec<u32> = plan.ptx_modules.keys().copied().collect();
        let ptx_sm = pick_ptx_arch(available.iter().copied(), device.sm())
            .ok_or(CudaError::NoPtx { device: device.sm(), available: available.clone() })?;
        let Layout { value_buffer, root, .. } = layout;
        let g = &plan.graph;

        let ctx = CudaContext::new(ordinal).map_err(driver(format!("creating a context on device {ordinal}")))?;
        // One stream, in order: cudarc's cross-stream events are not needed.
        // SAFETY: every allocation and every launch of this backend is on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("creating a stream"))?;
        // Device memory before any allocation or code: refused with the numbers rather than failing half-way.
        let free = ctx.mem_get_info().map(|(free, _)| free as u64).ok();
        check_memory("GPU memory (free on the device)", layout.total_bytes, free)?;
        let module = ctx
            .load_module(Ptx::from_src(plan.ptx_modules[&ptx_sm].clone()))
            .map_err(driver(format!("loading the plan's sm_{ptx_sm} PTX module")))?;

        let persistent = DevBuf::zeroed(&stream, layout.persistent, "the persistent region")?;
        let arena = DevBuf::zeroed(&stream, layout.arena, "the arena")?;
        let region_base = |r: Region| match r {
            Region::Persistent => persistent.ptr,
            Region::Arena => arena.ptr,
        };

        // Parameters and inputs.
        let mut params = Vec::with_capacity(plan.params.len());
        for p in &plan.params {
            let nf4 = match p.dtype {
                DType::Nf4(format) => {
                    let mut parts = vec![];
                    for (i, n) in nf4_part_bytes(format, p.shape.iter().product()).into_iter().enumerate() {
                        parts.push(DevBuf::zeroed(&stream, n, &format!("part {i} of `{}`", p.name))?);
                    }
                    Some(Nf4Slot { format, parts, tensor: None })
                }
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

        // The entry points.
        let mut functions = vec![];
        let mut function_of: HashMap<&str, usize> = HashMap::new();
        for k in &plan.kernels {
            if function_of.contains_key(k.symbol.as_str()) {
                continue;
            }
            let f = module
                .load_function(&k.symbol)
                .map_err(driver(format!("looking up `{}` (kernel '{}') in the PTX module", k.symbol, k.name)))?;
            function_of.insert(k.symbol.as_str(), functions.len());
            functions.push(f);
        }

        // Every launch with its argument addresses.
        let mut launches = Vec::with_capacity(plan.kernels.len());
        let mut const_args: Vec<(ValueId, DevBuf)> = vec![];
        let mut seed_args: Vec<DevBuf> = vec![];
        for k in &plan.kernels {
            let err = |message: String| RuntimeError::Kernel { kernel: k.name.clone(), message };
            let Some(launch) = &k.launch else {
                return Err(err("no launch shape (grid and block) in the plan".to_string()).into());
            };
            let mut args = Vec::with_capacity(k.args.len() + 1);
            let mut sizes = Vec::with_capacity(k.args.len() + 1);
            for (i, a) in k.args.iter().enumerate() {
                let v = ValueId(a.value);
                let r = root[v.index()];
                if let DType::Nf4(_) = g.ty(r).dtype {
                    let Some(&pi) = nf4_of.get(&r) else {
                        return Err(err(format!(
                            "argument {i} is the NF4 value {v}, which is not a parameter; the cuda backend keeps only \
                             NF4 parameters"
                        ))
                        .into());
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
                    args.push(part.ptr);
                    sizes.push(part.len);
                    continue;
                }
                if a.part != 0 {
                    return Err(
                        err(format!("argument {i} is part {} of {v}, which is not an NF4 value", a.part)).into()
                    );
                }
                let Some(b) = value_buffer[v.index()] else {
                    // A constant some template takes as a buffer: the backend keeps it filled.
                    if let Op::Const { value } = g.node(r).op {
                        let at = match const_args.iter().position(|(c, _)| *c == r) {
                            Some(at) => at,
                            None => {
                                let bytes = const_bytes(g.ty(v), value).map_err(&err)?;
                                let buf = DevBuf::zeroed(&stream, bytes.len(), &format!("constant {r}"))?;
                                upload_now(&stream, buf.ptr, &bytes, &format!("constant {r}"))?;
                                const_args.push((r, buf));
                                const_args.len() - 1
                            }
                        };
                        args.push(const_args[at].1.ptr);
                        sizes.push(const_args[at].1.len);
                        continue;
                    }
                    return Err(err(format!(
                        "argument {i} is {v} (`{}`), which has no memory in the plan",
                        g.node(v).op.mnemonic()
                    ))
                    .into());
                };
                let bytes = g.ty(v).bytes();
                check_fits(plan, Some(b), bytes, &format!("argument {i} ({v})")).map_err(|e| err(e.to_string()))?;
                let buf = &plan.buffers[b as usize];
                args.push(region_base(buf.region) + buf.offset);
                sizes.push(bytes);
            }
            if !k.seeds.is_empty() {
                let bytes: Vec<u8> = k.seeds.iter().flat_map(|s| s.to_le_bytes()).collect();
                let buf = DevBuf::zeroed(&stream, bytes.len(), &format!("the seeds of kernel '{}'", k.name))?;
                upload_now(&stream, buf.ptr, &bytes, &format!("the seeds of kernel '{}'", k.name))?;
                args.push(buf.ptr);
                sizes.push(buf.len);
                seed_args.push(buf);
            }
            let mut zero = Vec::with_capacity(launch.zero_gpu.len());
            for &z in &launch.zero_gpu {
                let z = z as usize;
                if z >= k.args.len() {
                    return Err(err(format!("zero_gpu names argument {z}, but the kernel has {}", k.args.len())).into());
                }
                zero.push((args[z], sizes[z]));
            }
            let (x, y, z) = launch.grid;
            if x == 0 || y == 0 || z == 0 || launch.block == 0 {
                return Err(err(format!("launch grid {:?} with blocks of {}", launch.grid, launch.block)).into());
            }
            let cfg = LaunchConfig { grid_dim: launch.grid, block_dim: (launch.block, 1, 1), shared_mem_bytes: 0 };
            launches.push(Launch { func: function_of[k.symbol.as_str()], args, zero, cfg });
        }

        // After the kernels: constant outputs, updates copied back, reported outputs.
        let mut const_fills = vec![];
        let mut copy_backs = vec![];
        let mut reported = vec![];
        let mut scratch_bytes = 0usize;
        for o in &g.outputs {
            let r = root[o.value.index()];
            if let (Op::Const { value }, Some(b)) = (&g.node(r).op, value_buffer[o.value.index()]) {
                if !const_fills.iter().any(|c: &ConstFill| c.buffer == b) {
                    let ty = g.ty(r);
                    if !matches!(ty.dtype, DType::F32 | DType::I32) {
                        return Err(
                            RuntimeError::Unsupported(format!("the output {r} is a {} constant", ty.dtype)).into()
                        );
                    }
                    const_fills.push(ConstFill { buffer: b, dtype: ty.dtype, numel: ty.numel(), value: *value });
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
                        ))
                        .into());
                    }
                    let (Some(from), Some(to)) = (value_buffer[o.value.index()], slot.buffer) else {
                        return Err(RuntimeError::Unsupported(format!(
                            "the update of `{name}` ({}) or the parameter has no memory in the plan",
                            o.value
                        ))
                        .into());
                    };
                    if plan.buffers[to as usize].region != Region::Persistent {
                        return Err(RuntimeError::Unsupported(format!(
                            "parameter `{name}` is not in persistent memory"
                        ))
                        .into());
                    }
                    let bytes = g.ty(o.value).bytes();
                    if bytes != g.ty(slot.binding.value).bytes() {
                        return Err(RuntimeError::Unsupported(format!(
                            "the update of `{name}` is {}, the parameter {}",
                            g.ty(o.value),
                            g.ty(slot.binding.value)
                        ))
                        .into());
                    }
                    if from != to {
                        let staged = (plan.buffers[from as usize].region == Region::Persistent).then(|| {
                            let at = scratch_bytes;
                            scratch_bytes += bytes.div_ceil(256) * 256;
                            at
                        });
                        copy_backs.push(CopyBack { from, to, bytes, staged });
                    }
                }
                OutputKind::Loss | OutputKind::Metric(_) | OutputKind::Logits => {
                    if value_buffer[o.value.index()].is_none() && !matches!(g.node(r).op, Op::Const { .. }) {
                        return Err(RuntimeError::Unsupported(format!(
                            "the output {:?} ({}) has no memory in the plan",
                            o.kind, o.value
                        ))
                        .into());
                    }
                    reported.push((o.kind.clone(), o.value));
                }
                OutputKind::Grad(_) => {}
            }
        }
        let scratch = DevBuf::zeroed(&stream, scratch_bytes, "staging updates")?;
        stream.synchronize().map_err(driver("setting up device memory"))?;

        Ok(CudaBackend {
            launches,
            functions,
            _const_args: const_args,
            _seed_args: seed_args,
            scratch,
            persistent,
            arena,
            stream,
            ctx,
            device,
            ptx_sm,
            graph: g.clone(),
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
            steps: 0,
        })
    }

    /// The device the backend runs on.
    pub fn device(&self) -> &DeviceInfo {
        &self.device
    }

    /// Device memory in use on this GPU (total − free, as the driver reports it: this process's context and
    /// allocations, and any other process's).
    pub fn memory_in_use(&self) -> Result<u64, CudaError> {
        let (free, total) = self.ctx.mem_get_info().map_err(driver("querying device memory".to_string()))?;
        Ok((total - free) as u64)
    }

    /// Bytes this backend allocated on the device: the persistent region, the arena, NF4 parts, constants, seeds and
    /// scratch.
    pub fn allocated_bytes(&self) -> u64 {
        let nf4: usize =
            self.params.iter().filter_map(|p| p.nf4.as_ref()).flat_map(|n| n.parts.iter().map(|b| b.len)).sum();
        let consts: usize = self._const_args.iter().map(|(_, b)| b.len).sum::<usize>()
            + self._seed_args.iter().map(|b| b.len).sum::<usize>();
        (self.persistent.len + self.arena.len + self.scratch.len + nf4 + consts) as u64
    }

    /// The PTX architecture loaded (90 for sm_90).
    pub fn ptx_arch(&self) -> u32 {
        self.ptx_sm
    }

    /// Steps run so far.
    pub fn steps_run(&self) -> u64 {
        self.steps
    }

    /// The plan's graph (the training step).
    pub fn graph(&self) -> &Graph {
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
    pub fn is_param_set(&self, name: &str) -> Result<bool, CudaError> {
        Ok(self.params[self.param(name)?].set)
    }

    fn param(&self, name: &str) -> Result<usize, RuntimeError> {
        self.param_index.get(name).copied().ok_or_else(|| RuntimeError::UnknownParam(name.to_string()))
    }

    fn input(&self, name: &str) -> Result<usize, RuntimeError> {
        self.input_index.get(name).copied().ok_or_else(|| RuntimeError::UnknownInput(name.to_string()))
    }

    fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(driver("binding the context to this thread"))
    }

    /// The device address of buffer `b`.
    fn buffer_ptr(&self, b: u32) -> u64 {
        let buf = &self.buffers[b as usize];
        let base = match buf.region {
            Region::Persistent => self.persistent.ptr,
            Region::Arena => self.arena.ptr,
        };
        base + buf.offset
    }

    fn upload(&self, dst: u64, bytes: &[u8], what: &str) -> Result<(), CudaError> {
        self.bind()?;
        upload_now(&self.stream, dst, bytes, what)
    }

    fn download(&self, src: u64, bytes: usize, what: &str) -> Result<Vec<u8>, CudaError> {
        self.bind()?;
        let mut out = vec![0u8; bytes];
        // SAFETY: `src` is inside one of this backend's allocations with `bytes` bytes after it; synchronized below
        // before `out` is read.
        unsafe { result::memcpy_dtoh_async(&mut out, src, self.stream.cu_stream()) }
            .map_err(driver(format!("reading {what}")))?;
        self.stream.synchronize().map_err(driver(format!("reading {what}")))?;
        Ok(out)
    }

    /// Sets a parameter from f32 data (row-major, its shape's element count). An NF4 parameter is quantized on the
    /// host as the reference interpreter quantizes it (`ir::nf4::quantize` with the dtype's block sizes).
    pub fn set_param_f32(&mut self, name: &str, data: &[f32]) -> Result<(), CudaError> {
        let i = self.param(name)?;
        let b = &self.params[i].binding;
        crate::slots::check_len("parameter", name, &b.shape, data.len())?;
        match b.dtype {
            DType::F32 => {
                if let Some(buf) = self.params[i].buffer {
                    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                    self.upload(self.buffer_ptr(buf), &bytes, &format!("parameter `{name}`"))?;
                }
                self.params[i].set = true;
                Ok(())
            }
            DType::Nf4(f) => {
                let q = crate::cpu::quantize_param(data, &b.shape, f);
                self.set_param_nf4(name, &q)
            }
            other => Err(RuntimeError::Unsupported(format!(
                "parameter `{name}` is {other}; the cuda backend takes f32 and nf4 parameters"
            ))
            .into()),
        }
    }

    /// Sets an NF4 parameter from its quantized storage, which must be in the parameter's format.
    pub fn set_param_nf4(&mut self, name: &str, q: &Nf4Tensor) -> Result<(), CudaError> {
        let i = self.param(name)?;
        let slot = &self.params[i];
        let Some(nf4) = slot.nf4.as_ref() else {
            return Err(RuntimeError::DType {
                what: "parameter",
                name: name.to_string(),
                expected: slot.binding.dtype.to_string(),
                found: "nf4".to_string(),
            }
            .into());
        };
        check_nf4_format(q, nf4.format, &slot.binding.shape)
            .map_err(|message| RuntimeError::Nf4 { name: name.to_string(), message })?;
        for (k, (dst, src)) in nf4.parts.iter().zip(nf4_parts(q)).enumerate() {
            self.upload(dst.ptr, &src, &format!("part {k} of `{name}`"))?;
        }
        let slot = &mut self.params[i];
        slot.nf4.as_mut().expect("checked above").tensor = Some(q.clone());
        slot.set = true;
        Ok(())
    }

    /// The current value of an f32 parameter or optimizer state (after a step: the updated one); an NF4 parameter
    /// dequantized (from the host copy of what was uploaded).
    pub fn param_f32(&self, name: &str) -> Result<Vec<f32>, CudaError> {
        let slot = &self.params[self.param(name)?];
        if !slot.set {
            return Err(RuntimeError::NotSet(name.to_string()).into());
        }
        if let Some(nf4) = &slot.nf4 {
            return Ok(ir::nf4::dequantize(nf4.tensor.as_ref().expect("a set NF4 parameter has its tensor")));
        }
        let numel: usize = slot.binding.shape.iter().product();
        match (slot.binding.dtype, slot.buffer) {
            (DType::F32, Some(b)) => {
                Ok(read_f32(&self.download(self.buffer_ptr(b), 4 * numel, &format!("parameter `{name}`"))?))
            }
            (DType::F32, None) => Err(RuntimeError::Unsupported(format!("parameter `{name}` has no memory")).into()),
            (other, _) => Err(RuntimeError::DType {
                what: "parameter",
                name: name.to_string(),
                expected: other.to_string(),
                found: "a read as f32".to_string(),
            }
            .into()),
        }
    }

    /// An NF4 parameter's storage, when set.
    pub fn param_nf4(&self, name: &str) -> Result<Option<&Nf4Tensor>, CudaError> {
        Ok(self.params[self.param(name)?].nf4.as_ref().and_then(|n| n.tensor.as_ref()))
    }

    /// The bytes of storage part `part` of an NF4 parameter as the kernels read them (downloaded).
    pub fn nf4_part(&self, name: &str, part: usize) -> Result<Option<Vec<u8>>, CudaError> {
        let slot = &self.params[self.param(name)?];
        match slot.nf4.as_ref().and_then(|n| n.parts.get(part)) {
            Some(p) => Ok(Some(self.download(p.ptr, p.len, &format!("part {part} of `{name}`"))?)),
            None => Ok(None),
        }
    }

    /// Materializes every parameter whose initializer is not `load` (`ir::init::materialize` with the run seed
    /// `seed`, exactly as the cpu backend does): LoRA A and B, DoRA magnitudes (from their base weight, which must
    /// be set first), optimizer states.
    pub fn init_params(&mut self, seed: u64) -> Result<(), CudaError> {
        for i in crate::cpu::init_order(self.params.iter().map(|p| &p.binding)) {
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
    pub fn set_input_f32(&mut self, name: &str, data: &[f32]) -> Result<(), CudaError> {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.set_input(name, DType::F32, data.len(), &bytes)
    }

    /// Sets an i32 input (token ids, labels, positions, the step counter).
    pub fn set_input_i32(&mut self, name: &str, data: &[i32]) -> Result<(), CudaError> {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.set_input(name, DType::I32, data.len(), &bytes)
    }

    fn set_input(&mut self, name: &str, dtype: DType, len: usize, bytes: &[u8]) -> Result<(), CudaError> {
        let i = self.input(name)?;
        crate::slots::check_input(&self.inputs[i].binding, dtype, len)?;
        if let Some(buf) = self.inputs[i].buffer {
            self.upload(self.buffer_ptr(buf), bytes, &format!("input `{name}`"))?;
        }
        self.inputs[i].set = true;
        Ok(())
    }

    fn check_ready(&self) -> Result<(), RuntimeError> {
        crate::slots::check_ready(&self.params, &self.inputs)
    }

    /// Runs one training step on the GPU: every kernel in order on one stream (its `zero_gpu` arguments zeroed
    /// first), then the constant outputs and the updates that were not written in place; synchronizes and reads the
    /// reported outputs. Every parameter and input must have been set.
    pub fn step(&mut self) -> Result<StepOutputs, CudaError> {
        self.run_step(None)
    }

    /// [`CudaBackend::step`], waiting for each kernel and calling `after_kernel(k)` after kernel `k` finished (for
    /// timing kernels one by one; slower than `step`).
    pub fn step_each(&mut self, mut after_kernel: impl FnMut(usize)) -> Result<StepOutputs, CudaError> {
        self.run_step(Some(&mut after_kernel))
    }

    fn run_step(&mut self, mut each: Option<&mut dyn FnMut(usize)>) -> Result<StepOutputs, CudaError> {
        self.check_ready()?;
        self.bind()?;
        let cu_stream = self.stream.cu_stream();
        for (k, l) in self.launches.iter().enumerate() {
            for &(ptr, bytes) in &l.zero {
                // SAFETY: `ptr` and `bytes` are an argument of this kernel, inside this backend's memory.
                unsafe { result::memset_d8_async(ptr, 0, bytes, cu_stream) }
                    .map_err(driver(format!("zeroing an argument of kernel {k}")))?;
            }
            let mut b = self.stream.launch_builder(&self.functions[l.func]);
            for a in &l.args {
                b.arg(a);
            }
            // SAFETY: the entry takes one pointer per buffer argument (and one for its seeds), in this order, each
            // the address of memory of the planned size; the grid and block are the plan's.
            unsafe { b.launch(l.cfg) }.map_err(driver(format!("launching kernel {k}")))?;
            if let Some(f) = each.as_deref_mut() {
                self.stream.synchronize().map_err(driver(format!("running kernel {k}")))?;
                f(k);
            }
        }
        // Kept until the stream is synchronized below.
        let fills: Vec<Vec<u8>> = self
            .const_fills
            .iter()
            .map(|c| {
                match c.dtype {
                    DType::I32 => (c.value as i32).to_le_bytes(),
                    _ => (c.value as f32).to_le_bytes(),
                }
                .repeat(c.numel)
            })
            .collect();
        for (c, bytes) in self.const_fills.iter().zip(&fills) {
            // SAFETY: the buffer holds the output (checked at load); `fills` outlives the synchronization below.
            unsafe { result::memcpy_htod_async(self.buffer_ptr(c.buffer), bytes, cu_stream) }
                .map_err(driver("filling a constant output"))?;
        }
        // Updates read from another persistent buffer are staged first: none reads a buffer another has written.
        for c in &self.copy_backs {
            if let Some(at) = c.staged {
                // SAFETY: the scratch allocation has room at `at` for `bytes` (sized at load).
                unsafe {
                    result::memcpy_dtod_async(self.scratch.ptr + at as u64, self.buffer_ptr(c.from), c.bytes, cu_stream)
                }
                .map_err(driver("staging an update"))?;
            }
        }
        for c in &self.copy_backs {
            let src = match c.staged {
                Some(at) => self.scratch.ptr + at as u64,
                None => self.buffer_ptr(c.from),
            };
            // SAFETY: both buffers hold `bytes` bytes (checked at load); the arena and the scratch never overlap the
            // persistent destination.
            unsafe { result::memcpy_dtod_async(self.buffer_ptr(c.to), src, c.bytes, cu_stream) }
                .map_err(driver("copying an update into its parameter"))?;
        }
        self.stream.synchronize().map_err(driver(format!("running step {}", self.steps + 1)))?;
        self.steps += 1;
        let mut outputs = Vec::with_capacity(self.reported.len());
        for (kind, v) in &self.reported {
            outputs.push((kind.clone(), self.read_f32_value(*v)?));
        }
        Ok(StepOutputs { outputs })
    }

    /// Waits for everything queued on the backend's stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.bind()?;
        self.stream.synchronize().map_err(driver("synchronizing"))
    }

    /// A value as f32 (i32 values converted; constants without memory filled), reading its buffer as it is now.
    fn read_f32_value(&self, v: ValueId) -> Result<Vec<f32>, CudaError> {
        let ty = self.graph.ty(v);
        let r = self.root[v.index()];
        Ok(match (self.value_buffer[v.index()], &self.graph.node(r).op) {
            (None, Op::Const { value }) => vec![*value as f32; ty.numel()],
            (None, _) => vec![],
            (Some(b), _) => {
                let bytes = self.download(self.buffer_ptr(b), 4 * ty.numel(), &format!("output {v}"))?;
                match ty.dtype {
                    DType::I32 => read_i32(&bytes).into_iter().map(|x| x as f32).collect(),
                    _ => read_f32(&bytes),
                }
            }
        })
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("graph", &self.graph.name)
            .field("device", &self.device.name)
            .field("ptx", &format!("sm_{}", self.ptx_sm))
            .field("persistent_bytes", &self.persistent.len)
            .field("arena_bytes", &self.arena.len)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

crate::train::plan_backend!(
    CudaBackend,
    fn nonfinite_kernel(&mut self) -> Result<Option<String>, String> {
        Ok(Some("no parameter holds one; the kernel-level search needs --backend cpu (run the same step there)".into()))
    }
);
