//! Writes GPU check cases for every kernel of the tiny recipes' optimized training steps that a template covers
//! (loop nests, GEMMs, transformer ops): the kernel's PTX for sm_90 and sm_80, its input buffers as the reference interpreter computed
//! them (random weights, seeded), and the interpreter's outputs. `runtime`'s `gpu_check` example runs them on a GPU.
//!
//! `cargo run --release -p codegen --example dump_gpu_cases -- target/gpucheck`

use codegen::build::{kernel_interface, kernel_ptx, Template};
use ir::interp::{run, Precision, Value};
use passes::{training_pipeline, PassManager, PipelineOptions};
use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/gpucheck".into()));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::create_dir_all(&out).expect("mkdir");
    let (mut cases, mut skipped) = (0, 0);
    for recipe in ["tiny.lora.rs", "tiny.qlora.rs", "tiny.dora.rs", "tiny.qdora.rs"] {
        let r = frontend::compile_file(&root.join("examples").join(recipe), models::library()).expect("recipe");
        let mut g = r.forward.clone();
        PassManager::new(training_pipeline(&PipelineOptions::default())).run(&mut g).expect("pipeline");
        let env = ir::interp::random_env(&g, 1);
        let vals = run(&g, &env, Precision::F32).expect("interpreter");
        for k in &g.kernels {
            let Ok(t) = Template::of(&g, k) else {
                skipped += 1;
                continue;
            };
            let dir = out.join(format!("{:03}", cases));
            std::fs::create_dir_all(&dir).expect("mkdir");
            for sm in [80, 90] {
                std::fs::write(dir.join(format!("sm{sm}.ptx")), kernel_ptx(&t, sm).expect("ptx")).expect("write");
            }
            let mut meta = String::new();
            let _ = writeln!(meta, "recipe {recipe}\nkernel {}\nsymbol {}", k.name, t.symbol());
            // Buffers as (element type, raw bytes) in the kernel's argument order, and its launch — exactly what the
            // plan records for the runtime (`codegen::build::kernel_interface`).
            let (args, launch) = kernel_interface(&g, k, &t);
            let n_inputs = args.len() - t.n_outputs();
            let _ = writeln!(meta, "iteration template");
            let _ = writeln!(meta, "launch {} {} {}", launch.grid.0, launch.grid.1, launch.block);
            if !launch.zero_gpu.is_empty() {
                let z: Vec<String> = launch.zero_gpu.iter().map(u32::to_string).collect();
                let _ = writeln!(meta, "zero {}", z.join(" "));
            }
            let mut bufs: Vec<(&'static str, Vec<u8>)> = vec![];
            for a in &args {
                bufs.push(match &vals[a.value as usize] {
                    Value::I { data, .. } => ("i32", data.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    Value::F(t) => ("f32", t.to_f32().iter().flat_map(|x| x.to_le_bytes()).collect()),
                    Value::Q(q) => {
                        let parts = kernels::gemm::nf4_buffers(q);
                        let elem = if a.part < 2 && (parts.len() == 4 || a.part == 0) { "u8" } else { "f32" };
                        (elem, parts[a.part as usize].clone())
                    }
                });
            }
            let _ = writeln!(meta, "inputs {n_inputs}");
            if !t.seeds().is_empty() {
                let s: Vec<String> = t.seeds().iter().map(u64::to_string).collect();
                let _ = writeln!(meta, "seeds {}", s.join(" "));
            }
            for (b, (elem, data)) in bufs.iter().enumerate() {
                let width = if *elem == "u8" { 1 } else { 4 };
                let _ = writeln!(meta, "buffer {b} {elem} {}", data.len() / width);
                std::fs::write(dir.join(format!("b{b}.bin")), data).expect("write");
            }
            std::fs::write(dir.join("meta.txt"), meta).expect("write");
            cases += 1;
            // The bf16 tensor-core variant of each GEMM without an epilogue, against its exact reference (bf16
            // operands, f64 sums): the tolerance is the f32 accumulation's, loosened for the tensor cores' adder.
            if let Template::Gemm(gm) = &t {
                if gm.epilogue.is_none() {
                    let bf = kernels::gemm::Gemm { precision: kernels::gemm::GemmPrecision::Bf16, ..gm.clone() };
                    bf16_case(&out.join(format!("{:03}", cases)), recipe, &k.name, &g, k, &bf, &vals, &bufs);
                    cases += 1;
                }
            }
        }
    }
    println!("wrote {cases} kernel cases to {} ({skipped} kernels need other templates)", out.display());
}

/// Writes the case of `gm` (a bf16 GEMM) for the group `k`, whose f32 case's buffers are `bufs`.
#[allow(clippy::too_many_arguments)]
fn bf16_case(
    dir: &std::path::Path,
    recipe: &str,
    name: &str,
    g: &ir::Graph,
    k: &ir::Kernel,
    gm: &kernels::gemm::Gemm,
    vals: &[Value],
    bufs: &[(&'static str, Vec<u8>)],
) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let t = Template::Gemm(gm.clone());
    for sm in [80, 90] {
        std::fs::write(dir.join(format!("sm{sm}.ptx")), kernel_ptx(&t, sm).expect("ptx")).expect("write");
    }
    let (args, launch) = kernel_interface(g, k, &t);
    let anchor = k.nodes.iter().copied().find(|&v| kernels::gemm::is_gemm_op(&g.node(v).op)).expect("GEMM node");
    let inputs: Vec<Vec<f32>> = g
        .node(anchor)
        .inputs
        .iter()
        .map(|&v| match &vals[v.index()] {
            Value::F(t) => t.to_f32(),
            Value::Q(q) => ir::nf4::dequantize(q),
            Value::I { .. } => panic!("integer GEMM operand"),
        })
        .collect();
    let want: Vec<u8> = gm.reference(&inputs).iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
    let mut meta = String::new();
    let _ = writeln!(meta, "recipe {recipe}\nkernel {name} [bf16]\nsymbol {}", t.symbol());
    let _ = writeln!(meta, "iteration template");
    let _ = writeln!(meta, "launch {} {} {}", launch.grid.0, launch.grid.1, launch.block);
    let _ = writeln!(meta, "tolerance 1e-4 1e-3");
    let _ = writeln!(meta, "inputs {}", args.len() - 1);
    for (b, (elem, data)) in bufs.iter().enumerate() {
        let data = if b == args.len() - 1 { &want } else { data };
        let width = if *elem == "u8" { 1 } else { 4 };
        let _ = writeln!(meta, "buffer {b} {elem} {}", data.len() / width);
        std::fs::write(dir.join(format!("b{b}.bin")), data).expect("write");
    }
    std::fs::write(dir.join("meta.txt"), meta).expect("write");
}
