//! The runtime: loads a compiled plan and runs it on a backend (`interp`, `cpu`, `cuda`), with weights, data, the
//! training loop and adapter export. It never depends on LLVM: a plan is everything it needs.
//!
//! Today it holds the `cpu` backend ([`cpu::CpuBackend`]), which runs a plan's host library on a pool of threads,
//! the CUDA probe ([`cuda::cuda_available`]), which tells whether `--backend cuda` can work on this machine
//! without panicking when there is no driver, and the `cuda` backend ([`cuda_backend::CudaBackend`]), which runs a
//! plan's PTX kernels on a GPU with the same plan semantics as the cpu backend. A plan is native code: every plan
//! file is loaded through [`trust::load_plan`], which runs only plans signed with the user's key or trusted by them.

pub mod bench;
pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod cuda_backend;
pub mod data;
mod error;
pub mod generate;
mod slots;
pub mod train;
pub mod trust;
mod validate;
pub mod weights;

pub use cpu::{CpuBackend, StepOutputs};
pub use cuda::{cuda_available, CudaUnavailable, DeviceInfo};
pub use cuda_backend::{CudaBackend, CudaError};
pub use error::RuntimeError;
