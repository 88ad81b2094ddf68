//! tunec's typed dataflow IR: types, the op table, graphs and their builder, the text format, the verifier,
//! NF4 quantization (bit-exact with bitsandbytes) and the reference interpreter.
#![allow(clippy::too_many_arguments)]

pub mod attr;
pub mod builder;
pub mod graph;
pub mod infer;
pub mod init;
pub mod interp;
pub mod nf4;
pub mod ops;
pub mod plan;
pub mod rng;
pub mod settings;
pub mod text;
pub mod types;
pub mod untrusted;
pub mod verify;

pub use attr::{AttnArg, Init, Role};
pub use builder::Builder;
pub use graph::{Graph, Kernel, Node, Output, OutputKind, ValueId};
pub use ops::{Op, OpKind};
pub use types::{DType, Nf4Format, Shape, Type};
