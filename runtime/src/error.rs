//! What can go wrong loading a plan onto a backend or running it: each message names the kernel, value, parameter
//! or input concerned and says what was expected and what was found.

use ir::plan::PlanError;

/// Everything the runtime's backends refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The plan file could not be read, or is not a consistent plan.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The plan file is not trusted (unsigned, another key, modified), or the key or trust list cannot be used.
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    /// Some kernels have no generated code (`KernelCode::symbol` is empty): the plan cannot run on the cpu backend.
    #[error("the plan cannot run on the cpu backend: {}", missing_code(kernels))]
    MissingHostCode {
        /// The names of the kernels without code, in schedule order.
        kernels: Vec<String>,
    },
    /// The plan carries no host library (compiled without host code).
    #[error("the plan has no host library (it was compiled without host code), which the cpu backend runs")]
    NoHostLibrary,
    /// The host library could not be written to a file or loaded.
    #[error("cannot load the plan's host library: {0}")]
    Library(String),
    /// A kernel's entry symbol is not in the host library.
    #[error("kernel '{kernel}': the host library has no symbol `{symbol}`: {message}")]
    Symbol { kernel: String, symbol: String, message: String },
    /// A kernel's argument list or launch does not fit the plan (a value without memory, a bad NF4 part, ...).
    #[error("kernel '{kernel}': {message}")]
    Kernel { kernel: String, message: String },
    /// The plan's graph, memory plan and bindings disagree in a way the backend cannot run.
    #[error("the plan cannot run: {0}")]
    Unsupported(String),
    #[error("the plan has no parameter named `{0}`")]
    UnknownParam(String),
    #[error("the plan has no input named `{0}`")]
    UnknownInput(String),
    /// Data of the wrong element type for a parameter or input.
    #[error("{what} `{name}` is {expected}, not {found}")]
    DType { what: &'static str, name: String, expected: String, found: String },
    /// Data of the wrong size for a parameter or input.
    #[error("{what} `{name}` has shape {shape:?} ({expected} elements), but {found} values were given")]
    Length { what: &'static str, name: String, shape: Vec<usize>, expected: usize, found: usize },
    /// An NF4 tensor whose storage does not match the parameter's format.
    #[error("NF4 parameter `{name}`: {message}")]
    Nf4 { name: String, message: String },
    /// `step` was called before every parameter had a value.
    #[error("{} not set (set them, or call init_params for those with an initializer): {}", count(names.len(), "parameter"), list(names))]
    ParamsNotSet { names: Vec<String> },
    /// `step` was called before every input had a value.
    #[error("{} not set: {}", count(names.len(), "input"), list(names))]
    InputsNotSet { names: Vec<String> },
    /// A parameter was read before it was set.
    #[error("parameter `{0}` has not been set")]
    NotSet(String),
    /// The plan needs more memory than is available: refused before anything is allocated.
    #[error(
        "the plan needs {} of {memory}, but {} is available: recompile the recipe with `--recompute per-block` \
         or a smaller micro_batch / seq_len, or free memory",
        gib(*needed),
        gib(*available)
    )]
    NotEnoughMemory { memory: String, needed: u64, available: u64 },
    /// An allocation failed (the system refused it): an error, not an abort.
    #[error("cannot allocate {what}: {message}")]
    Alloc { what: String, message: String },
    /// An initializer could not be materialized.
    #[error("cannot initialize parameter `{name}`: {source}")]
    Init {
        name: String,
        #[source]
        source: ir::init::InitError,
    },
}

/// `bytes` in GiB with one decimal, and exactly: `40.0 GiB (42949672960 bytes)`.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB ({bytes} bytes)", bytes as f64 / (1u64 << 30) as f64)
}

/// At most this many names are spelled out in a message; the rest are counted.
const NAMES_SHOWN: usize = 8;

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what} is")
    } else {
        format!("{n} {what}s are")
    }
}

fn list(names: &[String]) -> String {
    let mut s: Vec<String> = names.iter().take(NAMES_SHOWN).map(|n| format!("`{n}`")).collect();
    if names.len() > NAMES_SHOWN {
        s.push(format!("and {} more", names.len() - NAMES_SHOWN));
    }
    s.join(", ")
}

/// `kernel 'a' has no host code`, or for several: `kernel 'a' has no host code, nor do 'b', 'c' (3 kernels)`.
fn missing_code(kernels: &[String]) -> String {
    let Some((first, rest)) = kernels.split_first() else { return "no kernel lacks code".to_string() };
    let mut s = format!("kernel '{first}' has no host code");
    if !rest.is_empty() {
        let mut others: Vec<String> = rest.iter().take(NAMES_SHOWN - 1).map(|n| format!("'{n}'")).collect();
        if rest.len() > NAMES_SHOWN - 1 {
            others.push(format!("and {} more", rest.len() - (NAMES_SHOWN - 1)));
        }
        s.push_str(&format!(", nor do {} ({} kernels without code)", others.join(", "), kernels.len()));
    }
    s
}
