//! Errors a kernel template can report while it emits LLVM IR.

use inkwell::builder::BuilderError;

/// What can go wrong while a template builds its LLVM IR.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The inkwell builder refused an instruction (e.g. it was not positioned in a block).
    #[error("LLVM IR builder: {0}")]
    Builder(#[from] BuilderError),
    /// An intrinsic the template needs is unknown to the LLVM we link against.
    #[error("LLVM intrinsic `{0}` not found (is this LLVM built with the NVPTX target?)")]
    MissingIntrinsic(&'static str),
    /// A function with the kernel's name already exists in the module.
    #[error("module already defines a function named `{0}`")]
    DuplicateKernel(String),
}
