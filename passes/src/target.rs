//! Target descriptions for the cost model: peak compute, memory bandwidth, kernel launch overhead, memory size.

/// What the cost model knows about a machine.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub name: &'static str,
    /// Peak dense matmul throughput at the compute precision, FLOP/s.
    pub peak_flops: f64,
    /// Peak elementwise throughput (non-tensor-core), FLOP/s.
    pub vector_flops: f64,
    /// Sustained memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Fixed cost per kernel launch, seconds.
    pub launch_overhead: f64,
    /// Device memory, bytes.
    pub memory_bytes: f64,
    /// Whether the target is a GPU (dequantized NF4 weights must never round-trip through memory there).
    pub gpu: bool,
}

impl Target {
    /// NVIDIA H100 SXM: ~800 TFLOP/s dense bf16 measured (FACTS.md), ~67 TFLOP/s f32 vector, ~3 TB/s copy
    /// bandwidth measured, ~4 µs per launch (driver + tail), 80 GB.
    pub fn h100() -> Target {
        Target {
            name: "h100",
            peak_flops: 800e12,
            vector_flops: 67e12,
            bandwidth: 3.0e12,
            launch_overhead: 4e-6,
            memory_bytes: 80e9,
            gpu: true,
        }
    }

    /// This project's 2-core x86-64 machine: ~185 GFLOP/s f32 matmul (torch, measured, FACTS.md), ~20 GB/s,
    /// ~5 µs per kernel (thread-pool dispatch), 24 GiB.
    pub fn cpu() -> Target {
        Target {
            name: "cpu",
            peak_flops: 185e9,
            vector_flops: 60e9,
            bandwidth: 20e9,
            launch_overhead: 5e-6,
            memory_bytes: 24.0 * (1u64 << 30) as f64,
            gpu: false,
        }
    }

    pub fn by_name(name: &str) -> Option<Target> {
        match name {
            "h100" | "cuda" | "gpu" => Some(Target::h100()),
            "cpu" | "host" => Some(Target::cpu()),
            _ => None,
        }
    }
}
