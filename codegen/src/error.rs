//! `CodegenError`: everything codegen reports, with enough context to act on.

use std::path::PathBuf;

use kernels::KernelError;

/// An error from lowering, PTX emission, ptxas, MLIR or the host JIT.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    /// A kernel template failed to build its LLVM IR.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// We only target sm_80 (A100) and newer.
    #[error("unsupported GPU architecture sm_{0}: tunec targets sm_80 and newer (e.g. 80, 86, 89, 90)")]
    UnsupportedSm(u32),
    /// LLVM rejected the module or could not set up a target.
    #[error("LLVM ({stage}): {message}")]
    Llvm {
        /// What we were doing: "verify", "NVPTX target", "optimize", "emit PTX", ...
        stage: &'static str,
        /// LLVM's own message.
        message: String,
    },
    /// No ptxas binary was found.
    #[error(
        "ptxas not found: set TUNEC_PTXAS, put ptxas on PATH, or run scripts/setup.sh (it installs ptxas under \
         ~/.cache/tunec/ptxas)"
    )]
    PtxasNotFound,
    /// A file the code generator reads or writes (objects, the host library).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Running ptxas (or preparing its input) failed at the OS level.
    #[error("running ptxas {path}: {source}")]
    PtxasIo {
        /// The ptxas binary or the temporary file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// ptxas ran and rejected the PTX.
    #[error("ptxas -arch=sm_{sm} failed ({status}):\n{stderr}")]
    PtxasFailed {
        /// Target architecture passed to ptxas.
        sm: u32,
        /// Exit status as text.
        status: String,
        /// Everything ptxas wrote to stderr.
        stderr: String,
    },
    /// MLIR parsing, building or verification failed.
    #[error("MLIR ({stage}): {message}")]
    Mlir {
        /// What we were doing: "parse", "verify", ...
        stage: &'static str,
        /// Diagnostics MLIR emitted, one per line.
        message: String,
    },
    /// Host JIT setup or lookup failed.
    #[error("host JIT: {0}")]
    Jit(String),
}
