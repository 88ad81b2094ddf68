//! tunec's passes over the IR. Each pass is one file; [`pipeline`] lists them in order.

pub mod adamw;
pub mod autodiff;
pub mod dce;
pub mod drop_logits;
pub mod frozen_grads;
pub mod gradcheck;
pub mod manager;
pub mod pipeline;

pub use manager::{Pass, PassError, PassManager, PassReport};
pub use pipeline::{training_pipeline, PipelineOptions};
