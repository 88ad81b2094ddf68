//! tunec's passes over the IR. Each pass is one file; [`pipeline`] lists them in order.

pub mod adamw;
pub mod autodiff;
pub mod cost;
pub mod cse;
pub mod dce;
pub mod drop_logits;
pub mod eqsat;
pub mod frozen_grads;
pub mod fuse;
pub mod gradcheck;
pub mod manager;
pub mod memory;
pub mod pipeline;
pub mod recompute;
pub mod report;
pub mod schedule;
pub mod target;

pub use manager::{Pass, PassError, PassManager, PassReport};
pub use pipeline::{training_pipeline, PipelineOptions};
