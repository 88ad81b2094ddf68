//! Every kernel group of the tiny recipes' optimized training steps (LoRA, QLoRA, DoRA, QDoRA), as `fuse` forms them and
//! `codegen::build` lowers them, run on the host (2 threads) on the reference interpreter's values for its inputs
//! (seeded random weights and data): every output matches the interpreter within `atol + rtol·|ref|`.

use codegen::build::{emit_host_template, kernel_interface, Template};
use codegen::inkwell::context::Context;
use codegen::inkwell::OptimizationLevel;
use codegen::lower::optimize_host;
use ir::interp::{random_env, run, Precision, Value};
use passes::{training_pipeline, PassManager, PipelineOptions};
use std::collections::HashMap;

const ATOL: f64 = 2e-5;
const RTOL: f64 = 1e-4;

fn check_recipe(recipe: &str) {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let r = frontend::compile_file(&root.join("examples").join(recipe), models::library()).expect("recipe");
    let mut g = r.forward.clone();
    PassManager::new(training_pipeline(&PipelineOptions::default())).run(&mut g).expect("pipeline");
    let vals = run(&g, &random_env(&g, 3), Precision::F32).expect("interpreter");

    // One host module with every distinct kernel, JIT-compiled once.
    let ctx = Context::create();
    let module = ctx.create_module("groups");
    let mut symbol_of_key: HashMap<String, String> = HashMap::new();
    let mut kernels = vec![];
    let mut with_epilogue = 0;
    for k in &g.kernels {
        let mut t =
            Template::of(&g, k).unwrap_or_else(|e| panic!("{recipe}: kernel `{}` has no template: {e}", k.name));
        with_epilogue += usize::from(matches!(&t, Template::Gemm(gm) if gm.epilogue.is_some()));
        let n = symbol_of_key.len();
        let sym = symbol_of_key.entry(t.key()).or_insert_with(|| format!("g{n}")).clone();
        let (args, launch) = kernel_interface(&g, k, &t);
        if module.get_function(&format!("tunec_{sym}")).is_none() {
            t.rename(sym.clone());
            emit_host_template(&ctx, &module, &t).expect("emit host");
        }
        let seeds = t.seeds().to_vec();
        kernels.push((k, format!("tunec_{sym}"), args, launch, t.n_outputs(), seeds));
    }
    optimize_host(&module).expect("optimize");
    let engine = module.create_jit_execution_engine(OptimizationLevel::Aggressive).expect("JIT");
    type HostKernel = unsafe extern "C" fn(*const *mut u8, i32, i32);

    let mut checked = 0;
    for (k, sym, args, launch, n_out, mut seeds) in kernels {
        // SAFETY: every template defines `void sym(ptr, i32, i32)`.
        let f = unsafe { engine.get_function::<HostKernel>(&sym) }.expect("symbol");
        let n_in = args.len() - n_out;
        let mut bufs: Vec<Vec<u8>> = vec![];
        for (i, a) in args.iter().enumerate() {
            let v = &vals[a.value as usize];
            bufs.push(if i >= n_in {
                let fill = if launch.zero_host.contains(&(i as u32)) { 0.0f32 } else { f32::NAN };
                let n = g.ty(ir::ValueId(a.value)).numel();
                (0..n).flat_map(|_| fill.to_le_bytes()).collect()
            } else {
                match v {
                    Value::F(t) => t.to_f32().iter().flat_map(|x| x.to_le_bytes()).collect(),
                    Value::I { data, .. } => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    Value::Q(q) => kernels::gemm::nf4_buffers(q)[a.part as usize].clone(),
                }
            });
        }
        // f32 views need 4-byte alignment: copy into u32-backed storage.
        let mut aligned: Vec<Vec<u32>> = bufs
            .iter()
            .map(|b| {
                let mut w = vec![0u32; b.len().div_ceil(4).max(1)];
                for (i, c) in b.chunks(4).enumerate() {
                    let mut x = [0u8; 4];
                    x[..c.len()].copy_from_slice(c);
                    w[i] = u32::from_le_bytes(x);
                }
                w
            })
            .collect();
        let mut ptrs: Vec<*mut u8> = aligned.iter_mut().map(|w| w.as_mut_ptr() as *mut u8).collect();
        if !seeds.is_empty() {
            ptrs.push(seeds.as_mut_ptr() as *mut u8);
        }
        for tid in 0..2 {
            // SAFETY: one pointer per argument with the argument's size (the kernel ABI).
            unsafe { f.call(ptrs.as_ptr(), tid, 2) };
        }
        for (i, a) in args.iter().enumerate().skip(n_in) {
            let want = vals[a.value as usize].as_f().expect("float output");
            let got: Vec<f32> = aligned[i].iter().take(want.data.len()).map(|&w| f32::from_bits(w)).collect();
            for (j, (&w, &x)) in want.data.iter().zip(&got).enumerate() {
                let ok = w == x as f64 || (x as f64 - w).abs() <= ATOL + RTOL * w.abs();
                assert!(
                    ok,
                    "{recipe}: kernel `{}` ({sym}) output %{}[{j}] of {}: got {x}, want {w}",
                    k.name,
                    a.value,
                    want.data.len()
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, g.kernels.len());
    // The residual adds after o_proj/down_proj and swiglu after up_proj are GEMM epilogues in every recipe.
    assert!(with_epilogue > 0, "{recipe}: no GEMM with an elementwise epilogue");
    eprintln!(
        "{recipe}: {checked} kernel groups ({} distinct, {with_epilogue} GEMMs with epilogues) match the interpreter",
        symbol_of_key.len()
    );
}

#[test]
fn every_group_of_the_tiny_lora_step_matches_reference() {
    check_recipe("tiny.lora.rs");
}

#[test]
fn every_group_of_the_tiny_qlora_step_matches_reference() {
    check_recipe("tiny.qlora.rs");
}

#[test]
fn every_group_of_the_tiny_dora_step_matches_reference() {
    check_recipe("tiny.dora.rs");
}

#[test]
fn every_group_of_the_tiny_qdora_step_matches_reference() {
    check_recipe("tiny.qdora.rs");
}
