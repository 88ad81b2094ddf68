//! Kernel templates: functions that emit LLVM IR (through inkwell) for one kernel each, so that the same description
//! lowers to NVPTX (PTX text, `ptx_kernel` calling convention) and, later, to the host.
//!
//! Today this crate holds one real template, [`emit_axpy_kernel`], which proves the path
//! inkwell → LLVM IR → NVPTX → ptxas end to end. The GEMM (NF4 prologue, LoRA epilogue), attention, norm,
//! cross-entropy and AdamW templates land here next; see the README for the planned module table.

mod axpy;
mod error;
pub mod gemm;
pub mod loops;
pub mod nn;
mod nvptx;
pub mod template;

pub use axpy::{emit_axpy_kernel, AXPY_KERNEL_NAME};
pub use error::KernelError;
pub use nvptx::{read_sreg, set_ptx_kernel, Sreg, PTX_KERNEL_CALL_CONV};
