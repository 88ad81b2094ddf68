//! The runtime: loads a compiled plan and runs it on a backend (`interp`, `cpu`, `cuda`), with weights, data, the
//! training loop and adapter export. It never depends on LLVM: a plan is everything it needs.
//!
//! Today it holds the CUDA probe ([`cuda::cuda_available`]), which tells whether `--backend cuda` can work on this
//! machine without panicking when there is no driver.

pub mod cuda;

pub use cuda::{cuda_available, CudaUnavailable, DeviceInfo};
