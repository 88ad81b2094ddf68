//! The one check of a plan against what a backend will do with it, shared by the cpu and cuda backends and run
//! before either allocates memory or loads code. A plan file comes from wherever the user got it: every buffer a
//! kernel will touch must lie inside the memory the backend allocates for it, or a kernel writes out of bounds.
//!
//! [`validate`] checks, after [`Plan::check`] (indices in range, sizes with checked arithmetic, regions at most
//! [`ir::plan::MAX_REGION_BYTES`]):
//! - every kernel has code (the backend's own error otherwise) and every computed value is in a kernel;
//! - every value's placement resolves (aliases without cycles) to a buffer inside its region, and that buffer holds
//!   at least the value's type's bytes (NF4 values are kept as their storage parts, allocated by the backend to
//!   their exact sizes, so their plan buffers are not used);
//! - every kernel argument is an NF4 parameter's existing storage part, a plain value (part 0) with memory, or a
//!   constant the backend fills (f32 or i32); `zero_host`/`zero_gpu` name arguments of the kernel;
//! - on the cuda backend, every kernel has a launch whose grid and block are within CUDA's limits;
//! - every reported output (loss, metric, logits) the backend reads back as 4-byte elements is f32 or i32;
//! - the total the backend will allocate ([`Layout::total_bytes`]) is computed with checked arithmetic, for the
//!   memory check ([`check_memory`]) that comes next.

use crate::cpu::{nf4_part_bytes, value_buffer};
use crate::slots::{alias_root, to_usize};
use crate::RuntimeError;
use ir::plan::{type_bytes, Plan, PlanError};
use ir::untrusted::show;
use ir::{DType, Op, OutputKind, ValueId};

/// The most threads per block a cuda launch may ask for.
pub const MAX_BLOCK: u32 = 1024;
/// The largest cuda launch grid (x, y, z).
pub const MAX_GRID: (u32, u32, u32) = ((1 << 31) - 1, 65_535, 65_535);

/// Which backend a plan is validated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Cpu,
    Cuda,
}

/// What [`validate`] found out about a plan: the resolved placements and the sizes to allocate.
pub(crate) struct Layout {
    /// Per value: its buffer, aliases and in-place resolved.
    pub value_buffer: Vec<Option<u32>>,
    /// Per value: the value whose storage it is (the end of its alias chain).
    pub root: Vec<ValueId>,
    pub persistent: usize,
    pub arena: usize,
    /// The memory the backend's allocations for the plan take: both regions, NF4 storage parts (on the host in
    /// place of their plan slots, which are allocated but never touched), constants passed as buffers and seeds.
    pub total_bytes: u64,
}

fn inconsistent(m: String) -> RuntimeError {
    RuntimeError::Plan(PlanError::Inconsistent(m))
}

/// Checks `plan` for `backend` before anything is allocated or loaded (see the module's documentation).
pub(crate) fn validate(plan: &Plan, backend: Backend) -> Result<Layout, RuntimeError> {
    plan.check()?;
    let missing: Vec<String> = plan.kernels.iter().filter(|k| k.symbol.is_empty()).map(|k| k.name.clone()).collect();
    if !missing.is_empty() {
        return Err(match backend {
            Backend::Cpu => RuntimeError::MissingHostCode { kernels: missing },
            Backend::Cuda => RuntimeError::Unsupported(format!(
                "{} kernels have no code (first: `{}`)",
                missing.len(),
                show(&missing[0])
            )),
        });
    }
    let g = &plan.graph;
    let value_buffer: Vec<Option<u32>> = g.ids().map(|v| value_buffer(plan, v)).collect::<Result<_, _>>()?;
    let root: Vec<ValueId> = g.ids().map(|v| alias_root(plan, v)).collect();
    let mut in_kernel = vec![false; g.nodes.len()];
    for k in &g.kernels {
        for v in &k.nodes {
            if let Some(slot) = in_kernel.get_mut(v.index()) {
                *slot = true;
            }
        }
    }
    let is_view = |op: &Op| matches!(op, Op::Reshape { .. } | Op::StopGradient {});
    if let Some(v) = g.ids().find(|v| {
        let op = &g.node(*v).op;
        !op.is_leaf() && !is_view(op) && !in_kernel[v.index()]
    }) {
        return Err(RuntimeError::Unsupported(format!(
            "value {v} (`{}`) is computed by no kernel: the plan's graph was not fused",
            g.node(v).op.mnemonic()
        )));
    }

    // Every value with memory fits its buffer (`Plan::check` put the buffer inside its region).
    let mut bytes_of = Vec::with_capacity(g.nodes.len());
    for v in g.ids() {
        // `Plan::check` computed every value's size.
        let bytes = type_bytes(g.ty(v)).ok_or_else(|| inconsistent(format!("value {v}: its size overflows")))?;
        bytes_of.push(bytes);
        let nf4 = matches!(g.ty(v).dtype, DType::Nf4(_)) || matches!(g.ty(root[v.index()]).dtype, DType::Nf4(_));
        if let (Some(b), false) = (value_buffer[v.index()], nf4) {
            let buf = &plan.buffers[b as usize];
            if buf.bytes < bytes {
                return Err(inconsistent(format!(
                    "value {v} ({}, {bytes} bytes) is placed in buffer {b} ({:?}, offset {}), which has only {} \
                     bytes: a kernel would write past it",
                    g.ty(v),
                    buf.region,
                    buf.offset,
                    buf.bytes
                )));
            }
        }
    }

    // What the backend allocates besides the regions: NF4 parameters' storage parts, constants passed as buffers,
    // seeds. Checked sums: each term is at most `MAX_REGION_BYTES` (`Plan::check`), but there can be many.
    let overflow = || inconsistent("the plan's memory adds up to more than 2^64 bytes".to_string());
    let mut total = plan.persistent_bytes.checked_add(plan.arena_bytes).ok_or_else(overflow)?;
    let mut nf4_params = std::collections::HashMap::new();
    for p in &plan.params {
        if let DType::Nf4(f) = p.dtype {
            let parts = nf4_part_bytes(f, p.shape.iter().product());
            // The parts add up to `p.bytes`. On the host, a plan slot for the parameter (in the persistent region,
            // counted above) is allocated but never touched, so it takes no memory (zeroed pages come on first
            // touch): the parts take its place. Device memory is taken when allocated.
            if backend == Backend::Cuda || value_buffer[p.value.index()].is_none() {
                total = total.checked_add(p.bytes).ok_or_else(overflow)?;
            }
            nf4_params.insert(p.value, (p.name.as_str(), parts.len()));
        }
    }

    let mut consts: Vec<ValueId> = vec![];
    for k in &plan.kernels {
        let err = |message: String| RuntimeError::Kernel { kernel: show(&k.name), message };
        for (i, a) in k.args.iter().enumerate() {
            let v = ValueId(a.value);
            let r = root[v.index()];
            if let DType::Nf4(_) = g.ty(r).dtype {
                let Some(&(name, parts)) = nf4_params.get(&r) else {
                    return Err(err(format!(
                        "argument {i} is the NF4 value {v}, which is not a parameter; the backends keep only NF4 \
                         parameters"
                    )));
                };
                if usize::from(a.part) >= parts {
                    return Err(err(format!(
                        "argument {i} is part {} of NF4 parameter `{}`, which has {parts} parts",
                        a.part,
                        show(name)
                    )));
                }
                continue;
            }
            if a.part != 0 {
                return Err(err(format!("argument {i} is part {} of {v}, which is not an NF4 value", a.part)));
            }
            if value_buffer[v.index()].is_some() {
                continue;
            }
            // A constant some template takes as a buffer: the backend allocates and fills it.
            if let Op::Const { .. } = g.node(r).op {
                let ty = g.ty(v);
                if !matches!(ty.dtype, DType::F32 | DType::I32) {
                    return Err(err(format!(
                        "argument {i} is a {} constant, passed as a buffer; the backends fill f32 and i32",
                        ty.dtype
                    )));
                }
                if !consts.contains(&r) {
                    consts.push(r);
                    total = total.checked_add(bytes_of[v.index()]).ok_or_else(overflow)?;
                }
                continue;
            }
            return Err(err(format!(
                "argument {i} is {v} (`{}`), which has no memory in the plan",
                g.node(v).op.mnemonic()
            )));
        }
        let seeds = u64::try_from(k.seeds.len()).ok().and_then(|n| n.checked_mul(8)).ok_or_else(overflow)?;
        total = total.checked_add(seeds).ok_or_else(overflow)?;
        let nargs = k.args.len();
        match (&k.launch, backend) {
            (None, Backend::Cuda) => return Err(err("no launch shape (grid and block) in the plan".to_string())),
            (None, Backend::Cpu) => {}
            (Some(l), _) => {
                for (list, zero) in [("zero_host", &l.zero_host), ("zero_gpu", &l.zero_gpu)] {
                    if let Some(z) = zero.iter().find(|&&z| z as usize >= nargs) {
                        return Err(err(format!("{list} names argument {z}, but the kernel has {nargs}")));
                    }
                }
                let (x, y, z) = l.grid;
                let grid_ok = x >= 1 && y >= 1 && z >= 1 && x <= MAX_GRID.0 && y <= MAX_GRID.1 && z <= MAX_GRID.2;
                if backend == Backend::Cuda && (!grid_ok || l.block == 0 || l.block > MAX_BLOCK) {
                    return Err(err(format!(
                        "launch grid {:?} with blocks of {}: expected a grid of 1 to {MAX_GRID:?} and blocks of 1 \
                         to {MAX_BLOCK} threads",
                        l.grid, l.block
                    )));
                }
            }
        }
    }

    // Reported outputs are read back as 4-byte elements.
    for o in &g.outputs {
        if matches!(o.kind, OutputKind::Loss | OutputKind::Metric(_) | OutputKind::Logits) {
            let ty = g.ty(o.value);
            if !matches!(ty.dtype, DType::F32 | DType::I32) {
                return Err(RuntimeError::Unsupported(format!(
                    "the output {:?} ({}) is {ty}; the backends report f32 and i32 outputs",
                    o.kind, o.value
                )));
            }
        }
    }

    Ok(Layout {
        value_buffer,
        root,
        persistent: to_usize(plan.persistent_bytes)?,
        arena: to_usize(plan.arena_bytes)?,
        total_bytes: total,
    })
}

/// Refuses a plan that needs more memory (`needed` bytes) than is `available` of `memory` (`host memory`, `GPU
/// memory`), before anything is allocated; `None`: the amount available is unknown (no check).
pub(crate) fn check_memory(memory: &str, needed: u64, available: Option<u64>) -> Result<(), RuntimeError> {
    match available {
        Some(available) if needed > available => {
            Err(RuntimeError::NotEnoughMemory { memory: memory.to_string(), needed, available })
        }
        _ => Ok(()),
    }
}

/// The host memory available to a new allocation: `MemAvailable` in `/proc/meminfo` (`None` where there is no
/// such file or line).
pub(crate) fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    mem_available(&text)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub(crate) fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16318412 kB\nMemFree:         1234567 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(mem_available(text), Some(8_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: 18446744073709551615 kB\n"), None, "overflow is unknown");
    }

    #[test]
    fn more_than_available_is_refused_with_both_numbers() {
        let gib = 1u64 << 30;
        assert!(check_memory("host memory", gib, Some(2 * gib)).is_ok());
        assert!(check_memory("host memory", 40 * gib, None).is_ok(), "unknown: no check");
        let err = check_memory("host memory", 40 * gib, Some(24 * gib)).unwrap_err();
        assert!(
            matches!(err, RuntimeError::NotEnoughMemory { needed, available, .. } if needed == 40 * gib && available == 24 * gib)
        );
        let msg = err.to_string();
        assert!(msg.contains("40.0 GiB") && msg.contains("24.0 GiB"), "{msg}");
        assert!(msg.contains("--recompute per-block"), "{msg}");
    }
}
