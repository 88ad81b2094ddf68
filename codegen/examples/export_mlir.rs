//! Exports a recipe's optimized training step as MLIR and reports how long each stage took:
//! `cargo run --release -p codegen --example export_mlir -- examples/llama2-7b.qlora.rs [out.mlir]`.

use std::path::Path;
use std::time::Instant;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let recipe = args.next().ok_or("usage: export_mlir RECIPE [OUT.mlir]")?;
    let out = args.next();

    let t0 = Instant::now();
    let compiled = frontend::compile_file(Path::new(&recipe), models::library()).map_err(|d| d.render())?;
    let mut g = compiled.forward;
    passes::PassManager::new(passes::training_pipeline(&Default::default())).run(&mut g).map_err(|e| e.to_string())?;
    let t_compile = t0.elapsed();

    let t1 = Instant::now();
    let text = codegen::mlir_export::module_text(&g).map_err(|e| e.to_string())?;
    let t_text = t1.elapsed();
    let t2 = Instant::now();
    let mlir = codegen::mlir_export::export_mlir(&g).map_err(|e| e.to_string())?;
    let t_export = t2.elapsed();

    let calls = mlir.matches(" call @tunec.").count();
    println!(
        "{recipe}: {} nodes, {} params, {} inputs, {} outputs; {calls} external calls; MLIR {:.1} MB",
        g.nodes.len(),
        g.params().len(),
        g.inputs().len(),
        g.outputs.len(),
        mlir.len() as f64 / 1e6
    );
    println!(
        "front end + passes {:.2} s; module text ({:.1} MB) {:.3} s; export (text + parse + verify + print) {:.3} s",
        t_compile.as_secs_f64(),
        text.len() as f64 / 1e6,
        t_text.as_secs_f64(),
        t_export.as_secs_f64()
    );
    if let Some(out) = out {
        std::fs::write(&out, &mlir).map_err(|e| format!("{out}: {e}"))?;
        println!("wrote {out}");
    }
    Ok(())
}
