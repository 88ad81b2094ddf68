//! The plan file (`plan.bin`): everything a runtime needs to run a compiled recipe's training step — the optimized
//! graph with its kernels in schedule order, the memory plan, parameter and input bindings, kernel code, the training
//! and adapter settings — as one versioned, checksummed binary file.
//!
//! Layout: the 8-byte magic `TUNECPLN`, the format version (u32 LE), the payload's length (u64 LE), the CRC-32 of the
//! payload (u32 LE), then the payload: a postcard encoding of [`Payload`], then (in a signed plan) the signature
//! block: the 8-byte magic `TUNECSIG`, an 8-byte key id and a 32-byte tag over every byte before the tag. The graph
//! travels in its stable text form (`ir::text`) and is parsed and verified on load; parameter and input bindings are
//! derived from it rather than stored twice, so a plan cannot disagree with its own graph.
//!
//! A plan is native code (its host library is loaded into the process that runs it), so the runtime decodes a plan
//! file only after `runtime::trust` has authenticated it. This module knows the signature block's framing
//! ([`split_signature`], [`attach_signature`]) but no keys, no MAC and no policy; [`read_file`] reads a plan file with
//! bounds (a regular file, at most [`MAX_PLAN_BYTES`], no more than its header declares), and
//! [`Plan::read_unverified`] decodes one without asking whether to trust it (for `tunec inspect`).
//!
//! The types here are plain data: the CLI converts the front end's and the passes' types into a [`PlanSource`] and
//! calls [`build_plan`]; the runtime only needs `ir` to read a plan.

use crate::attr::{Init, Role};
use crate::graph::{Graph, ValueId};
use crate::ops::Op;
use crate::types::DType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The first eight bytes of every plan file.
pub const MAGIC: [u8; 8] = *b"TUNECPLN";
/// The version of the payload's layout this tunec writes and reads. Bump it on any change to [`Payload`] or to the
/// meaning of a field; older or newer plans are refused with [`PlanError::Version`].
/// Version 5 added the signature block.
pub const FORMAT_VERSION: u32 = 5;
/// Magic + version + payload length + checksum.
pub const HEADER_BYTES: usize = 8 + 4 + 8 + 4;
/// The first eight bytes of the signature block that follows the payload of a signed plan.
pub const SIGNATURE_MAGIC: [u8; 8] = *b"TUNECSIG";
/// The key id in a signature block: the first 8 bytes of the SHA-256 of the signing key.
pub const KEY_ID_BYTES: usize = 8;
/// The tag in a signature block (HMAC-SHA256).
pub const TAG_BYTES: usize = 32;
/// The signature block: magic, key id, tag.
pub const SIGNATURE_BYTES: usize = SIGNATURE_MAGIC.len() + KEY_ID_BYTES + TAG_BYTES;
/// The largest plan file tunec reads (header, payload and signature): 4 GiB. Plans hold code and the memory plan, not
/// weights; a 7B QLoRA plan is tens of MiB.
pub const MAX_PLAN_BYTES: u64 = 4 << 30;
/// The tunec release that writes plans (all crates share the workspace version).
pub const TUNEC_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The largest region (persistent or arena) and the largest single value a plan may declare: 16 TiB, more than any
/// machine tunec runs on has, and far below where sizes computed from it (rounding, sums of regions) could
/// overflow 64 bits.
pub const MAX_REGION_BYTES: u64 = 1 << 44;

/// The storage bytes of a value of type `ty` (NF4 packing and scales included), with checked arithmetic: `None`
/// when the element count or the size overflows, or an NF4 block size is zero.
pub fn type_bytes(ty: &crate::types::Type) -> Option<u64> {
    let n = ty.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let bytes = match ty.dtype {
        DType::F32 | DType::I32 => n.checked_mul(4)?,
        DType::BF16 | DType::F16 => n.checked_mul(2)?,
        DType::Nf4(f) => {
            let blocks = n.checked_div(f.block as usize)? + usize::from(n % (f.block as usize) != 0);
            let scales = match f.double_quant {
                None => blocks.checked_mul(4)?,
                Some(b2) => {
                    let blocks2 = blocks.checked_div(b2 as usize)? + usize::from(blocks % (b2 as usize) != 0);
                    blocks.checked_add(blocks2.checked_mul(4)?)?.checked_add(4)?
                }
            };
            n.div_ceil(2).checked_add(scales)?
        }
    };
    u64::try_from(bytes).ok()
}

/// Everything wrong a plan file can be; each message says what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a tunec plan: the file starts with \"{}\", a plan with \"TUNECPLN\"", found.escape_ascii())]
    NotAPlan { found: Vec<u8> },
    #[error(
        "plan format version {found}, but this tunec ({TUNEC_VERSION}) reads version {expected}: recompile the \
         recipe with this tunec"
    )]
    Version { found: u32, expected: u32 },
    #[error("truncated plan: expected {expected} bytes, found {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("the plan has {} bytes after its payload (expected {expected} bytes, found {found})", found - expected)]
    TrailingBytes { expected: u64, found: u64 },
    #[error(
        "truncated signature: the plan's signature block should be {SIGNATURE_BYTES} bytes after the payload, found \
         {found}: the file was cut short (copy it again)"
    )]
    SignatureTruncated { found: u64 },
    #[error("the plan's signature block is followed by {} more bytes (expected {expected} bytes, found {found})", found - expected)]
    AfterSignature { expected: u64, found: u64 },
    #[error("{}: not a regular file ({kind}): a plan is a file written by `tunec compile -o`", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "{}: the plan's header declares {declared} bytes, more than the {MAX_PLAN_BYTES} bytes a plan may have \
         (ir::plan::MAX_PLAN_BYTES): the file is corrupt or not a plan",
        path.display()
    )]
    TooLarge { path: PathBuf, declared: u64 },
    #[error("cannot sign the plan: {0}")]
    Sign(String),
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x}): the plan is corrupt")]
    Checksum { stored: u32, computed: u32 },
    #[error("cannot decode the plan's payload: {0}")]
    Decode(String),
    #[error("cannot encode the plan: {0}")]
    Encode(String),
    #[error("the plan's graph does not verify: {0}")]
    Graph(String),
    #[error("inconsistent plan: {0}")]
    Inconsistent(String),
    /// A training, adapter or model setting out of its range (`crate::settings`).
    #[error("the plan's {0}; recompile the recipe (a plan from elsewhere may hold any values)")]
    Settings(String),
}

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Region {
    /// Parameters, optimizer states and inputs: allocated once, kept across steps.
    Persistent,
    /// Transient values, packed into one arena by lifetime.
    Arena,
}

/// One allocation of the memory plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanBuffer {
    pub region: Region,
    /// Offset within its region, bytes.
    pub offset: u64,
    /// Reserved bytes (aligned).
    pub bytes: u64,
    /// First and last kernel (inclusive) during which it holds a needed value; the kernel count means "after the
    /// last kernel".
    pub start: u64,
    pub end: u64,
    /// The value it was allocated for (index of a graph node).
    pub first: u32,
}

/// How one value (graph node) is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValuePlacement {
    /// No memory of its own (lives inside its kernel, a folded constant, or unused).
    None,
    /// Owns this buffer (index into [`Plan::buffers`]).
    Owns(u32),
    /// A view: shares the buffer of this value.
    Alias(u32),
    /// Written into `buffer`, which held value `of` until then.
    InPlace { of: u32, buffer: u32 },
}

/// A parameter (or optimizer state) the runtime loads, initializes or keeps: derived from the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamBinding {
    /// The Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    pub value: ValueId,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub role: Role,
    pub init: Init,
    /// Storage bytes (NF4 packing and scales included).
    pub bytes: u64,
}

/// A per-step input the runtime feeds (token ids, labels, the learning rate, the step counter): derived from the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct InputBinding {
    pub name: String,
    pub value: ValueId,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// The code of one kernel, in the order of the graph's kernels (the schedule). Codegen fills it; empty until then.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelCode {
    pub name: String,
    /// The entry symbol in [`Plan::ptx_modules`] and the host library (`tunec_k<N>`; kernels that are the same
    /// computation share one); empty when no code was generated for this kernel.
    pub symbol: String,
    /// PTX text per SM architecture (`80` → sm_80).
    pub ptx: BTreeMap<u32, String>,
    /// The kernel's LLVM IR, as text.
    pub llvm_ir: Option<String>,
    /// A host object file for the CPU backend.
    #[serde(with = "serde_bytes")]
    pub host_object: Option<Vec<u8>>,
    /// The kernel's buffer arguments in ABI order (inputs, then outputs): which value, and which part of it (NF4
    /// weights are passed as their storage parts: packed codes, absmax codes or absmax, absmax2, offset).
    pub args: Vec<KernelArg>,
    /// How to launch it on a GPU, and which arguments must hold zeros first (outputs the kernel accumulates into).
    pub launch: Option<KernelLaunch>,
    /// Run-time constants of this instance (the dropout seeds of a loop nest), passed after the buffer arguments as
    /// one more pointer, to `seeds.len()` u64s; no pointer when empty. Kernels that differ only in their seeds
    /// (every layer's dropout) share one symbol.
    pub seeds: Vec<u64>,
}

/// One buffer argument of a kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelArg {
    /// The graph value (`ValueId.0`).
    pub value: u32,
    /// 0 for a plain tensor; the storage part for an NF4 value.
    pub part: u8,
}

/// The launch shape of a kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelLaunch {
    pub grid: (u32, u32, u32),
    pub block: u32,
    /// Argument indices to zero before the host function runs.
    pub zero_host: Vec<u32>,
    /// Argument indices to zero before the GPU kernel runs.
    pub zero_gpu: Vec<u32>,
}

/// The training settings of the recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub seq_len: u64,
    pub micro_batch: u64,
    pub lr: f64,
    pub steps: u64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_accum: u64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Steps between evaluations; 0 = never.
    pub eval_every: u64,
    /// Steps between checkpoints; 0 = never.
    pub save_every: u64,
}

impl Default for TrainSettings {
    /// The recipe's `Train::default()` (`frontend::recipe::TrainConfig` starts from these).
    fn default() -> TrainSettings {
        TrainSettings {
            seq_len: 512,
            micro_batch: 1,
            lr: 2e-4,
            steps: 1000,
            warmup_steps: 0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_accum: 1,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            save_every: 500,
        }
    }
}

/// What PEFT's `adapter_config.json` needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterSettings {
    /// `lora`, `qlora`, `dora`, `qdora`.
    pub method: String,
    pub r: u64,
    pub alpha: f64,
    pub dropout: f64,
    /// Short module names, sorted (`["k_proj", "q_proj", ..]`).
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub use_dora: bool,
}

/// A compiled training step, ready for a runtime.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub format_version: u32,
    pub tunec_version: String,
    /// The recipe's name (`tiny.qlora`).
    pub recipe: String,
    /// The target the cost model optimized for (`h100`, `cpu`).
    pub target: String,
    /// The optimized training step; `graph.kernels` are the kernels in schedule order.
    pub graph: Graph,
    /// The memory plan: one placement per graph node.
    pub values: Vec<ValuePlacement>,
    pub buffers: Vec<PlanBuffer>,
    pub arena_bytes: u64,
    pub persistent_bytes: u64,
    /// Derived from `graph` (parameters in node order).
    pub params: Vec<ParamBinding>,
    /// Derived from `graph` (inputs in node order).
    pub inputs: Vec<InputBinding>,
    /// One per `graph.kernels` entry, same order and names.
    pub kernels: Vec<KernelCode>,
    /// A shared object with the host code for the CPU backend.
    pub host_library: Option<Vec<u8>>,
    /// One PTX module per SM architecture with every kernel's entry.
    pub ptx_modules: BTreeMap<u32, String>,
    pub train: TrainSettings,
    pub peft: Option<AdapterSettings>,
    /// The architecture's config as `(field, JSON value)` pairs, `arch` first.
    pub model_config: Vec<(String, String)>,
}

/// What the encoded payload holds (everything in [`Plan`] that is not derived from the graph).
#[derive(Serialize, Deserialize)]
struct Payload {
    tunec_version: String,
    recipe: String,
    target: String,
    /// `ir::text::print` of the graph.
    graph: String,
    values: Vec<ValuePlacement>,
    buffers: Vec<PlanBuffer>,
    arena_bytes: u64,
    persistent_bytes: u64,
    kernels: Vec<KernelCode>,
    #[serde(with = "serde_bytes")]
    host_library: Option<Vec<u8>>,
    ptx_modules: BTreeMap<u32, String>,
    train: TrainSettings,
    peft: Option<AdapterSettings>,
    model_config: Vec<(String, String)>,
}

/// What [`build_plan`] needs, in plain data.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSource {
    pub recipe: String,
    pub target: String,
    /// The optimized, scheduled training step.
    pub graph: Graph,
    pub values: Vec<ValuePlacement>,
    pub buffers: Vec<PlanBuffer>,
    pub arena_bytes: u64,
    pub persistent_bytes: u64,
    pub train: TrainSettings,
    pub peft: Option<AdapterSettings>,
    pub model_config: Vec<(String, String)>,
}

/// Assembles a plan: bindings from the graph, one (empty) [`KernelCode`] per kernel; checks it for consistency.
pub fn build_plan(src: PlanSource) -> Result<Plan, PlanError> {
    let kernels = src.graph.kernels.iter().map(|k| KernelCode { name: k.name.clone(), ..KernelCode::default() });
    let plan = Plan {
        format_version: FORMAT_VERSION,
        tunec_version: TUNEC_VERSION.to_string(),
        recipe: src.recipe,
        target: src.target,
        params: param_bindings(&src.graph),
        inputs: input_bindings(&src.graph),
        kernels: kernels.collect(),
        graph: src.graph,
        values: src.values,
        buffers: src.buffers,
        arena_bytes: src.arena_bytes,
        persistent_bytes: src.persistent_bytes,
        host_library: None,
        ptx_modules: BTreeMap::new(),
        train: src.train,
        peft: src.peft,
        model_config: src.model_config,
    };
    crate::verify::verify(&plan.graph).map_err(|e| PlanError::Graph(e.to_string()))?;
    plan.check()?;
    Ok(plan)
}

fn param_bindings(g: &Graph) -> Vec<ParamBinding> {
    g.ids()
        .filter_map(|v| {
            let node = g.node(v);
            match &node.op {
                Op::Param { name, role, init } => Some(ParamBinding {
                    name: name.clone(),
                    value: v,
                    dtype: node.ty.dtype,
                    shape: node.ty.shape.clone(),
                    role: *role,
                    init: init.clone(),
                    // Checked: a crafted graph's sizes may overflow; `Plan::check` refuses what does not fit.
                    bytes: type_bytes(&node.ty).unwrap_or(u64::MAX),
                }),
                _ => None,
            }
        })
        .collect()
}

fn input_bindings(g: &Graph) -> Vec<InputBinding> {
    g.inputs()
        .into_iter()
        .map(|(v, name)| InputBinding {
            name: name.to_string(),
            value: v,
            dtype: g.ty(v).dtype,
            shape: g.ty(v).shape.clone(),
        })
        .collect()
}

impl Plan {
    /// The whole file: header and payload.
    pub fn to_bytes(&self) -> Result<Vec<u8>, PlanError> {
        let payload = Payload {
            tunec_version: self.tunec_version.clone(),
            recipe: self.recipe.clone(),
            target: self.target.clone(),
            graph: crate::text::print(&self.graph),
            values: self.values.clone(),
            buffers: self.buffers.clone(),
            arena_bytes: self.arena_bytes,
            persistent_bytes: self.persistent_bytes,
            kernels: self.kernels.clone(),
            host_library: self.host_library.clone(),
            ptx_modules: self.ptx_modules.clone(),
            train: self.train.clone(),
            peft: self.peft.clone(),
            model_config: self.model_config.clone(),
        };
        let body = postcard::to_allocvec(&payload).map_err(|e| PlanError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.format_version.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Reads a plan from the bytes of a plan file, checking everything in the order a reader would want to be told:
    /// what the file is, its version, its size, its checksum, its payload, its graph, its internal consistency. A
    /// signature block is framed ([`split_signature`]) but not authenticated: that is `runtime::trust`'s work, done
    /// before this is called on a file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Plan, PlanError> {
        let file = split_signature(bytes)?;
        let body = &file.plan[HEADER_BYTES..];
        let (stored, computed) = (u32_at(file.plan, 20), crc32fast::hash(body));
        if stored != computed {
            return Err(PlanError::Checksum { stored, computed });
        }
        let version = file.version;
        let (p, rest): (Payload, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| PlanError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PlanError::Decode(format!("{} bytes left over after the payload", rest.len())));
        }
        let graph = crate::text::parse(&p.graph).map_err(|e| PlanError::Graph(format!("line {e}")))?;
        crate::verify::verify(&graph).map_err(|e| PlanError::Graph(e.to_string()))?;
        let plan = Plan {
            format_version: version,
            tunec_version: p.tunec_version,
            recipe: p.recipe,
            target: p.target,
            params: param_bindings(&graph),
            inputs: input_bindings(&graph),
            graph,
            values: p.values,
            buffers: p.buffers,
            arena_bytes: p.arena_bytes,
            persistent_bytes: p.persistent_bytes,
            kernels: p.kernels,
            host_library: p.host_library,
            ptx_modules: p.ptx_modules,
            train: p.train,
            peft: p.peft,
            model_config: p.model_config,
        };
        plan.check()?;
        plan.check_settings()?;
        Ok(plan)
    }

    /// Writes the plan, unsigned, atomically (see [`write_file`]); returns its size. `tunec compile` writes a signed
    /// plan through `runtime::trust` instead: the runtime refuses unsigned plan files.
    pub fn write(&self, path: &Path) -> Result<u64, PlanError> {
        write_file(path, &self.to_bytes()?)
    }

    /// Reads a plan file ([`read_file`]: bounded) and decodes it **without authenticating it**: for showing what a
    /// file holds (`tunec inspect`). Nothing that runs a plan may call this: the runtime goes through
    /// `runtime::trust::load_plan`, which checks the signature or the trust list first.
    pub fn read_unverified(path: &Path) -> Result<Plan, PlanError> {
        Plan::from_bytes(&read_file(path)?)
    }

    /// Checks what the verifier does not: the memory plan and the kernel code against the graph. Every size, offset
    /// and count is checked arithmetic, so a plan crafted with sizes near 2^64 is refused here rather than wrapping
    /// into a small allocation later:
    /// - every value's storage size is computable (no overflow, NF4 block sizes not zero) and at most
    ///   [`MAX_REGION_BYTES`]; parameters' `bytes` are their dtype's storage for their shape;
    /// - the two regions are at most [`MAX_REGION_BYTES`] each; every buffer lies inside its region and names a
    ///   value of the graph; every placement names a buffer or value that exists;
    /// - one kernel code per graph kernel, in order and by name; every argument names a graph value; kernels that
    ///   share an entry symbol (the same code) take the same number of arguments and seeds. (What a backend needs of
    ///   each argument — its memory, its NF4 storage part — and of a launch is checked by the runtime before it
    ///   allocates.)
    pub fn check(&self) -> Result<(), PlanError> {
        let bad = |m: String| Err(PlanError::Inconsistent(m));
        let (nodes, buffers) = (self.graph.nodes.len(), self.buffers.len());
        for (what, bytes) in [("persistent region", self.persistent_bytes), ("arena", self.arena_bytes)] {
            if bytes > MAX_REGION_BYTES {
                return bad(format!(
                    "the {what} is {bytes} bytes, more than the limit of {MAX_REGION_BYTES} bytes (16 TiB) any \
                     machine could hold: the plan is corrupt or crafted; recompile the recipe"
                ));
            }
        }
        for v in self.graph.ids() {
            let ty = self.graph.ty(v);
            match type_bytes(ty) {
                Some(b) if b <= MAX_REGION_BYTES => {}
                Some(b) => {
                    return bad(format!(
                        "value {v} is {ty} ({b} bytes), more than the limit of {MAX_REGION_BYTES} bytes (16 TiB)"
                    ))
                }
                None => {
                    return bad(format!(
                        "value {v} is {ty}, whose size overflows 64 bits (or an NF4 block size is 0): the plan is \
                         corrupt or crafted"
                    ))
                }
            }
        }
        for p in &self.params {
            let want = type_bytes(self.graph.ty(p.value));
            if want != Some(p.bytes) {
                return bad(format!(
                    "parameter `{}` ({}) is {} storage bytes, but its type needs {want:?}",
                    crate::untrusted::show(&p.name),
                    p.value,
                    p.bytes
                ));
            }
        }
        if self.values.len() != nodes {
            return bad(format!("{} value placements for {nodes} graph nodes", self.values.len()));
        }
        for (v, p) in self.values.iter().enumerate() {
            let ok = match *p {
                ValuePlacement::None => true,
                ValuePlacement::Owns(b) => (b as usize) < buffers,
                ValuePlacement::Alias(of) => (of as usize) < nodes,
                ValuePlacement::InPlace { of, buffer } => (of as usize) < nodes && (buffer as usize) < buffers,
            };
            if !ok {
                return bad(format!(
                    "value %{v} is placed at {p:?}, but there are {buffers} buffers and {nodes} values"
                ));
            }
        }
        for (i, b) in self.buffers.iter().enumerate() {
            let limit = match b.region {
                Region::Persistent => self.persistent_bytes,
                Region::Arena => self.arena_bytes,
            };
            if b.offset.checked_add(b.bytes).is_none_or(|end| end > limit) || b.first as usize >= nodes {
                return bad(format!(
                    "buffer {i} ({:?}, offset {}, {} bytes, for %{}) lies outside its region of {limit} bytes or \
                     names a missing value",
                    b.region, b.offset, b.bytes, b.first
                ));
            }
        }
        if self.kernels.len() != self.graph.kernels.len() {
            return bad(format!(
                "code for {} kernels, but the graph has {}",
                self.kernels.len(),
                self.graph.kernels.len()
            ));
        }
        if let Some((i, (code, k))) =
            self.kernels.iter().zip(&self.graph.kernels).enumerate().find(|(_, (c, k))| c.name != k.name)
        {
            return bad(format!(
                "kernel {i} is `{}` in the graph but its code is for `{}`",
                crate::untrusted::show(&k.name),
                crate::untrusted::show(&code.name)
            ));
        }
        // The first kernel with each entry symbol: (kernel index, arguments, seeds).
        let mut by_symbol: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
        for (ki, k) in self.kernels.iter().enumerate() {
            let name = crate::untrusted::show(&k.name);
            let kbad = |m: String| Err(PlanError::Inconsistent(format!("kernel {ki} `{name}`: {m}")));
            if let Some((i, a)) = k.args.iter().enumerate().find(|(_, a)| a.value as usize >= nodes) {
                return kbad(format!(
                    "argument {i} takes value %{}, which the graph does not have ({nodes} values)",
                    a.value
                ));
            }
            if !k.symbol.is_empty() {
                let this = (ki, k.args.len(), k.seeds.len());
                let first = *by_symbol.entry(k.symbol.as_str()).or_insert(this);
                if (first.1, first.2) != (this.1, this.2) {
                    return kbad(format!(
                        "it runs `{}` with {} arguments and {} seeds, but kernel {} runs the same code with {} \
                         arguments and {} seeds",
                        crate::untrusted::show(&k.symbol),
                        this.1,
                        this.2,
                        first.0,
                        first.1,
                        first.2
                    ));
                }
            }
        }
        Ok(())
    }

    /// A readable account of the plan, for `tunec inspect`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let g = &self.graph;
        let _ = writeln!(
            s,
            "plan {} for {} (plan format {}, written by tunec {})",
            self.recipe, self.target, self.format_version, self.tunec_version
        );
        let _ = writeln!(
            s,
            "graph \"{}\": {} nodes, {} outputs, {} kernels",
            g.name,
            g.nodes.len(),
            g.outputs.len(),
            g.kernels.len()
        );
        // Kernels by kind: the name up to its first ':' (the anchor op).
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for k in &g.kernels {
            *kinds.entry(k.name.split(':').next().unwrap_or(&k.name)).or_default() += 1;
        }
        if !kinds.is_empty() {
            let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(s, "  kernels by kind: {}", list.join(", "));
        }

        let total: u64 = self.params.iter().map(|p| p.bytes).sum();
        let _ = writeln!(s, "parameters: {} ({})", self.params.len(), human(total));
        for role in [Role::Frozen, Role::Trainable, Role::State] {
            let of_role: Vec<&ParamBinding> = self.params.iter().filter(|p| p.role == role).collect();
            if of_role.is_empty() {
                continue;
            }
            let mut by_dtype: BTreeMap<String, (usize, u64)> = BTreeMap::new();
            for p in &of_role {
                let e = by_dtype.entry(p.dtype.to_string()).or_default();
                e.0 += 1;
                e.1 += p.bytes;
            }
            let bytes: u64 = of_role.iter().map(|p| p.bytes).sum();
            let list: Vec<String> = by_dtype.iter().map(|(d, (n, b))| format!("{d} ×{n} {}", human(*b))).collect();
            let role = match role {
                Role::Frozen => "frozen",
                Role::Trainable => "trainable",
                Role::State => "optimizer state",
            };
            let _ = writeln!(s, "  {role:<16} {:>5}  {:>11}  ({})", of_role.len(), human(bytes), list.join(", "));
        }
        let inputs: Vec<String> = self
            .inputs
            .iter()
            .map(|i| format!("{} {}", i.name, crate::types::Type::new(i.dtype, i.shape.clone())))
            .collect();
        let _ = writeln!(s, "inputs: {}", if inputs.is_empty() { "none".to_string() } else { inputs.join(", ") });

        let arena = self.buffers.iter().filter(|b| b.region == Region::Arena).count();
        let in_place = self.values.iter().filter(|p| matches!(p, ValuePlacement::InPlace { .. })).count();
        let _ = writeln!(
            s,
            "memory: persistent {}, arena {} ({} buffers: {} persistent, {arena} arena; {in_place} values in place)",
            human(self.persistent_bytes),
            human(self.arena_bytes),
            self.buffers.len(),
            self.buffers.len() - arena,
        );

        let mut archs: BTreeMap<u32, usize> = BTreeMap::new();
        for k in &self.kernels {
            for sm in k.ptx.keys() {
                *archs.entry(*sm).or_default() += 1;
            }
        }
        let with_symbol = self.kernels.iter().filter(|k| !k.symbol.is_empty()).count();
        for sm in self.ptx_modules.keys() {
            *archs.entry(*sm).or_default() += with_symbol;
        }
        let ptx = if archs.is_empty() {
            "none".to_string()
        } else {
            archs.iter().map(|(sm, n)| format!("sm_{sm} ({n} kernels)")).collect::<Vec<_>>().join(", ")
        };
        let llvm = self.kernels.iter().filter(|k| k.llvm_ir.is_some()).count();
        let objects: Vec<usize> = self.kernels.iter().filter_map(|k| k.host_object.as_ref().map(Vec::len)).collect();
        let host = match &self.host_library {
            Some(lib) => human(lib.len() as u64),
            None => "none".to_string(),
        };
        let _ = writeln!(
            s,
            "code: PTX {ptx}; LLVM IR for {llvm} kernels; host objects for {} kernels ({}); host library {host}",
            objects.len(),
            human(objects.iter().sum::<usize>() as u64)
        );

        let t = &self.train;
        let _ = writeln!(
            s,
            "train: seq_len {}, micro_batch {}, grad_accum {}, lr {:?}, steps {}, warmup {}, weight_decay {:?}, \
             betas ({:?}, {:?}), eps {:?}, max_grad_norm {:?}, seed {}, eval_every {}, save_every {}",
            t.seq_len,
            t.micro_batch,
            t.grad_accum,
            t.lr,
            t.steps,
            t.warmup_steps,
            t.weight_decay,
            t.beta1,
            t.beta2,
            t.eps,
            t.max_grad_norm,
            t.seed,
            t.eval_every,
            t.save_every
        );
        match &self.peft {
            Some(a) => {
                let _ = writeln!(
                    s,
                    "adapter: {} r={} alpha={:?} dropout={:?} rslora={} dora={}; target_modules: {}",
                    a.method,
                    a.r,
                    a.alpha,
                    a.dropout,
                    a.use_rslora,
                    a.use_dora,
                    a.target_modules.join(", ")
                );
            }
            None => s.push_str("adapter: none\n"),
        }
        if !self.model_config.is_empty() {
            let cfg: Vec<String> = self.model_config.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "model: {}", cfg.join(", "));
        }
        s
    }
}

/// A plan file's parts: the plan (header and payload, what [`Plan::to_bytes`] writes) and, when signed, its signature
/// block. Only the fixed-size header has been read; nothing is decoded.
#[derive(Clone, Copy, Debug)]
pub struct PlanFile<'a> {
    pub version: u32,
    /// Header and payload.
    pub plan: &'a [u8],
    pub signature: Option<SignatureBlock<'a>>,
}

/// The signature block of a signed plan file, as found (not authenticated).
#[derive(Clone, Copy, Debug)]
pub struct SignatureBlock<'a> {
    /// The first 8 bytes of the SHA-256 of the key that signed it.
    pub key_id: [u8; KEY_ID_BYTES],
    pub tag: [u8; TAG_BYTES],
    /// The bytes the tag covers: header, payload, the block's magic and its key id — everything before the tag.
    pub signed: &'a [u8],
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// The header's format version and payload length, after checking the magic and the version.
fn parse_header(bytes: &[u8]) -> Result<(u32, u64), PlanError> {
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(PlanError::NotAPlan { found: bytes[..magic_len].to_vec() });
    }
    if bytes.len() < HEADER_BYTES {
        return Err(PlanError::Truncated { expected: HEADER_BYTES as u64, found: bytes.len() as u64 });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(PlanError::Version { found: version, expected: FORMAT_VERSION });
    }
    let mut len = [0; 8];
    len.copy_from_slice(&bytes[12..20]);
    Ok((version, u64::from_le_bytes(len)))
}

/// Splits a plan file into the plan and its signature block, checking the header (magic, version) and the framing
/// (the declared length, a whole signature block or none, nothing after it); decodes nothing.
pub fn split_signature(bytes: &[u8]) -> Result<PlanFile<'_>, PlanError> {
    let (version, payload_len) = parse_header(bytes)?;
    let found = bytes.len() as u64;
    let expected = payload_len.saturating_add(HEADER_BYTES as u64);
    if found < expected {
        return Err(PlanError::Truncated { expected, found });
    }
    // expected <= found, so it is an index into `bytes`.
    let end = expected as usize;
    let (plan, rest) = bytes.split_at(end);
    if rest.is_empty() {
        return Ok(PlanFile { version, plan, signature: None });
    }
    let magic_len = rest.len().min(SIGNATURE_MAGIC.len());
    if rest[..magic_len] != SIGNATURE_MAGIC[..magic_len] {
        return Err(PlanError::TrailingBytes { expected, found });
    }
    if rest.len() < SIGNATURE_BYTES {
        return Err(PlanError::SignatureTruncated { found: rest.len() as u64 });
    }
    if rest.len() > SIGNATURE_BYTES {
        return Err(PlanError::AfterSignature { expected: expected + SIGNATURE_BYTES as u64, found });
    }
    let mut key_id = [0; KEY_ID_BYTES];
    key_id.copy_from_slice(&rest[SIGNATURE_MAGIC.len()..SIGNATURE_MAGIC.len() + KEY_ID_BYTES]);
    let mut tag = [0; TAG_BYTES];
    tag.copy_from_slice(&rest[SIGNATURE_BYTES - TAG_BYTES..]);
    let signed = &bytes[..bytes.len() - TAG_BYTES];
    Ok(PlanFile { version, plan, signature: Some(SignatureBlock { key_id, tag, signed }) })
}

/// Appends a signature block to an unsigned plan file's bytes: the magic and `key_id`, then the tag `mac` computes
/// over every byte before it. The MAC (and the key) are the caller's: `ir` knows the framing only.
pub fn attach_signature(
    mut plan: Vec<u8>,
    key_id: [u8; KEY_ID_BYTES],
    mac: impl FnOnce(&[u8]) -> [u8; TAG_BYTES],
) -> Result<Vec<u8>, PlanError> {
    if split_signature(&plan)?.signature.is_some() {
        return Err(PlanError::Sign("the plan is signed already".into()));
    }
    plan.extend_from_slice(&SIGNATURE_MAGIC);
    plan.extend_from_slice(&key_id);
    let tag = mac(&plan);
    plan.extend_from_slice(&tag);
    Ok(plan)
}

/// What a file that is not a regular file is.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Reads a plan file's bytes, with bounds: a regular file only (a FIFO, a device such as `/dev/zero` or a directory
/// is refused before anything is read), no more than its header declares plus a signature block, and at most
/// [`MAX_PLAN_BYTES`]. Checks the header (magic, version) and reports bytes past the signature block; the rest of the
/// framing is [`split_signature`]'s.
pub fn read_file(path: &Path) -> Result<Vec<u8>, PlanError> {
    use std::io::Read as _;
    let io = |source| PlanError::Io { path: path.to_path_buf(), source };
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Opening a FIFO blocks until a writer comes; non-blocking, it opens at once and is refused below.
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(PlanError::NotAFile { path: path.to_path_buf(), kind: file_kind(&meta.file_type()) });
    }
    let mut bytes = Vec::with_capacity(HEADER_BYTES);
    (&file).take(HEADER_BYTES as u64).read_to_end(&mut bytes).map_err(io)?;
    let (_, payload_len) = parse_header(&bytes)?;
    let most = MAX_PLAN_BYTES - (HEADER_BYTES + SIGNATURE_BYTES) as u64;
    if payload_len > most {
        return Err(PlanError::TooLarge {
            path: path.to_path_buf(),
            declared: payload_len.saturating_add((HEADER_BYTES + SIGNATURE_BYTES) as u64),
        });
    }
    // At most the declared plan and a signature block (within MAX_PLAN_BYTES), and one byte more to notice extra.
    let want = payload_len + (HEADER_BYTES + SIGNATURE_BYTES) as u64;
    let rest = want - HEADER_BYTES as u64;
    bytes.reserve(usize::try_from(rest.min(meta.len())).unwrap_or(0));
    (&file).take(rest + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > want {
        let found = meta.len().max(bytes.len() as u64);
        let end = HEADER_BYTES + payload_len as usize;
        return Err(if bytes[end..].starts_with(&SIGNATURE_MAGIC) {
            PlanError::AfterSignature { expected: want, found }
        } else {
            PlanError::TrailingBytes { expected: end as u64, found }
        });
    }
    Ok(bytes)
}

/// Writes a plan file's bytes atomically (a temporary file in the same directory, renamed over `path`), mode 0644;
/// returns the size.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<u64, PlanError> {
    let io = |source| PlanError::Io { path: path.to_path_buf(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new().prefix(".tunec-plan-").suffix(".tmp").tempfile_in(dir).map_err(io)?;
    // A temporary file is private (0600); a plan is an ordinary file like any other the compiler writes.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io)?;
    }
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(bytes.len() as u64)
}

/// Bytes in binary units with three significant decimals.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut x, mut u) = (bytes as f64, 0);
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{x:.3} {}", UNITS[u])
    }
}
