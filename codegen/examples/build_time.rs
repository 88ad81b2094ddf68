//! Times `codegen::build` on a recipe's optimized step with parts switched off, to see where compile time goes.
//!
//! `cargo run --release -p codegen --example build_time -- examples/llama2-7b.qlora.rs`
use codegen::build::{build, BuildOptions};
use passes::{training_pipeline, PassManager, PipelineOptions};
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("recipe");
    let r = frontend::compile_file(std::path::Path::new(&path), models::library()).expect("recipe");
    let mut g = r.forward.clone();
    PassManager::new(training_pipeline(&PipelineOptions::default())).run(&mut g).expect("pipeline");
    let cases: [(&str, BuildOptions); 5] = [
        ("full", BuildOptions::default()),
        ("no ptxas", BuildOptions { ptxas: false, ..BuildOptions::default() }),
        (
            "host only",
            BuildOptions { archs: vec![], ptxas: false, host: true, llvm_ir: false, ..BuildOptions::default() },
        ),
        (
            "sm_90 only",
            BuildOptions { archs: vec![90], ptxas: false, host: false, llvm_ir: false, ..BuildOptions::default() },
        ),
        (
            "sm_90 + ptxas",
            BuildOptions { archs: vec![90], ptxas: true, host: false, llvm_ir: false, ..BuildOptions::default() },
        ),
    ];
    // Per distinct kernel: host emission + optimization + object code, alone.
    let mut seen = std::collections::HashSet::new();
    let mut per: Vec<(f64, String)> = vec![];
    for k in &g.kernels {
        let t = codegen::build::Template::of(&g, k).expect("template");
        if !seen.insert(t.key()) {
            continue;
        }
        let t0 = Instant::now();
        let ctx = codegen::inkwell::context::Context::create();
        let m = ctx.create_module("one");
        codegen::build::emit_host_template(&ctx, &m, &t).expect("emit");
        codegen::lower::optimize_host(&m).expect("opt");
        let tm = codegen::lower::host_target_machine().expect("tm");
        tm.write_to_memory_buffer(&m, codegen::inkwell::targets::FileType::Object).expect("obj");
        per.push((t0.elapsed().as_secs_f64(), k.name.clone()));
    }
    per.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let total: f64 = per.iter().map(|p| p.0).sum();
    println!("host, kernel by kernel: {total:.2} s");
    for (t, n) in per.iter().take(12) {
        println!("  {t:>6.3} s  {n}");
    }
    for (name, o) in cases {
        let t = Instant::now();
        let b = build(&g, &o).expect("build");
        println!("{name:<16} {:>6.2} s  ({} distinct)", t.elapsed().as_secs_f64(), b.distinct);
    }
}
