//! Writes GPU check cases for every kernel of the tiny recipes' optimized training steps that a template covers
//! (loop nests, GEMMs, transformer ops): the kernel's PTX for sm_90 and sm_80, its input buffers as the reference interpreter computed
//! them (random weights, seeded), and the interpreter's outputs. `runtime`'s `gpu_check` example runs them on a GPU.
//!
//! `cargo run --release -p codegen --example dump_gpu_cases -- target/gpucheck`

use codegen::build::{kernel_ptx, Template};
use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::{DType, Op, Role};
use kernels::loops::{Elem, Iteration};
use passes::{training_pipeline, PassManager, PipelineOptions};
use std::fmt::Write as _;
use std::path::PathBuf;

fn env_for(g: &ir::Graph, seed: u64) -> Env {
    let mut env = Env::default();
    let rand = |shape: &[usize], s: u64, scale: f64| {
        let n: usize = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|i| scale * (2.0 * ir::rng::uniform(s, 7, i as u64) as f64 - 1.0)).collect(),
        )
    };
    for (i, n) in g.nodes.iter().enumerate() {
        let s = seed * 10_000 + i as u64;
        match &n.op {
            Op::Param { name, role, .. } => {
                let v = match role {
                    Role::State => Tensor::zeros(&n.ty.shape),
                    _ if name.contains("norm") => Tensor::new(n.ty.shape.clone(), vec![1.0; n.ty.numel()]),
                    _ => rand(&n.ty.shape, s, 0.1),
                };
                env.params.insert(name.clone(), Value::F(v));
            }
            Op::Input { name } => {
                let v = match (name.as_str(), n.ty.dtype) {
                    ("lr", _) => Value::F(Tensor::scalar(1e-3)),
                    ("opt_step", _) | ("step", _) => Value::ints(vec![], vec![1]),
                    ("position_ids", _) => {
                        let t = n.ty.shape[1];
                        Value::ints(n.ty.shape.clone(), (0..n.ty.numel()).map(|k| (k % t) as i32).collect())
                    }
                    ("segment_ids", _) => Value::ints(n.ty.shape.clone(), vec![0; n.ty.numel()]),
                    (_, DType::I32) => Value::ints(
                        n.ty.shape.clone(),
                        (0..n.ty.numel()).map(|k| ((k * 37 + 11) % 128) as i32).collect(),
                    ),
                    _ => Value::F(rand(&n.ty.shape, s, 1.0)),
                };
                env.inputs.insert(name.clone(), v);
            }
            _ => {}
        }
    }
    env
}

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/gpucheck".into()));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::create_dir_all(&out).expect("mkdir");
    let (mut cases, mut skipped) = (0, 0);
    for recipe in ["tiny.lora.rs", "tiny.qlora.rs", "tiny.dora.rs"] {
        let r = frontend::compile_file(&root.join("examples").join(recipe), models::library()).expect("recipe");
        let mut g = r.forward.clone();
        PassManager::new(training_pipeline(&PipelineOptions::default())).run(&mut g).expect("pipeline");
        let env = env_for(&g, 1);
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
            // Buffers as (element type, raw bytes), inputs first; and the launch for templates with their own.
            let bytes_of = |v: &Value| -> (&'static str, Vec<u8>) {
                match v {
                    Value::I { data, .. } => ("i32", data.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    Value::F(t) => ("f32", t.to_f32().iter().flat_map(|x| x.to_le_bytes()).collect()),
                    Value::Q(_) => unreachable!("NF4 values are split into their storage buffers"),
                }
            };
            let mut bufs: Vec<(&'static str, Vec<u8>)> = vec![];
            let n_inputs;
            match &t {
                Template::Loops(nest) => {
                    match nest.iteration {
                        Iteration::Elements { len } => {
                            let _ = writeln!(meta, "iteration elements {len}");
                        }
                        Iteration::Rows { rows, cols } => {
                            let _ = writeln!(meta, "iteration rows {rows} {cols}");
                        }
                    }
                    n_inputs = nest.n_inputs;
                    for buf in &nest.buffers {
                        let (e, b) = bytes_of(&vals[buf.value.index()]);
                        assert_eq!(e == "i32", buf.elem == Elem::I32);
                        bufs.push((e, b));
                    }
                }
                Template::Nn(nn) => {
                    let l = nn.launch();
                    let _ = writeln!(meta, "iteration template\nlaunch {} 1 {}", l.grid, kernels::nn::NN_BLOCK_THREADS);
                    if l.zero_output_gpu {
                        let _ = writeln!(meta, "zero {}", nn.n_inputs);
                    }
                    n_inputs = nn.n_inputs;
                    for buf in &nn.buffers {
                        bufs.push(bytes_of(&vals[buf.value.index()]));
                    }
                }
                Template::Gemm(gm) => {
                    let (gx, gy) = codegen::gemm::gpu_grid(gm);
                    let _ = writeln!(meta, "iteration template\nlaunch {gx} {gy} {}", codegen::gemm::GPU_BLOCK_THREADS);
                    let node = g.node(k.nodes[0]);
                    for (i, &input) in node.inputs.iter().enumerate() {
                        match &vals[input.index()] {
                            Value::Q(q) if i == 1 => {
                                let parts = kernels::gemm::nf4_buffers(q);
                                let kinds: Vec<&'static str> = match parts.len() {
                                    4 => vec!["u8", "u8", "f32", "f32"],
                                    _ => vec!["u8", "f32"],
                                };
                                bufs.extend(kinds.into_iter().zip(parts));
                            }
                            v => bufs.push(bytes_of(v)),
                        }
                    }
                    n_inputs = bufs.len();
                    bufs.push(bytes_of(&vals[k.nodes[0].index()]));
                }
            }
            let _ = writeln!(meta, "inputs {n_inputs}");
            for (b, (elem, data)) in bufs.iter().enumerate() {
                let width = if *elem == "u8" { 1 } else { 4 };
                let _ = writeln!(meta, "buffer {b} {elem} {}", data.len() / width);
                std::fs::write(dir.join(format!("b{b}.bin")), data).expect("write");
            }
            std::fs::write(dir.join("meta.txt"), meta).expect("write");
            cases += 1;
        }
    }
    println!("wrote {cases} kernel cases to {} ({skipped} kernels need other templates)", out.display());
}
