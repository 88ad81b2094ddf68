//! Code generation: LLVM IR (built by `kernels` templates through inkwell) to PTX for NVIDIA GPUs and to native code
//! for the host, the ptxas resource report for every PTX module, and MLIR export through melior.
//!
//! Today this crate proves the native toolchain end to end: [`ptx::emit_ptx`] lowers a module with the NVPTX target,
//! [`ptxas::assemble`] runs ptxas on the result and parses its register/spill report, [`mlir`] builds, prints, parses
//! and verifies MLIR, and [`host`] JIT-compiles a function for the machine we run on. Lowering of fused `ir` groups
//! and plan writing come next.

pub mod build;
mod emit;
pub mod error;
pub mod gemm;
pub mod host;
pub mod lower;
pub mod mlir;
pub mod mlir_export;
pub mod nn;
pub mod ptx;
pub mod ptxas;

pub use error::CodegenError;

/// Re-exported so callers build modules with the same LLVM bindings.
pub use inkwell;
pub use kernels;
