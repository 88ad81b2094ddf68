//! Lists the kernel groups of a recipe's optimized training step that no template covers, counted by reason.
//!
//! `cargo run --release -p codegen --example coverage -- examples/tiny.lora.rs`
use codegen::build::Template;
use passes::{training_pipeline, PassManager, PipelineOptions};
use std::collections::BTreeMap;

fn main() {
    for path in std::env::args().skip(1) {
        let r = frontend::compile_file(std::path::Path::new(&path), models::library()).expect("recipe");
        let mut g = r.forward.clone();
        PassManager::new(training_pipeline(&PipelineOptions::default())).run(&mut g).expect("pipeline");
        let mut reasons: BTreeMap<String, (usize, String)> = BTreeMap::new();
        let mut missing = 0;
        for k in &g.kernels {
            if let Err(e) = Template::of(&g, k) {
                missing += 1;
                let ops: Vec<String> = k.nodes.iter().map(|v| g.node(*v).op.mnemonic().to_string()).collect();
                let key = format!("{e} | {}", ops.join(","));
                let ent = reasons.entry(key).or_insert((0, k.name.clone()));
                ent.0 += 1;
            }
        }
        println!("{path}: {missing}/{} kernels without a template", g.kernels.len());
        let mut kinds: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for k in &g.kernels {
            if let Ok(t) = Template::of(&g, k) {
                let kind = k.name.split(':').next().unwrap_or("").to_string();
                kinds.entry(kind).or_default().insert(t.key());
            }
        }
        for (kind, keys) in &kinds {
            println!("  distinct {kind}: {}", keys.len());
        }
        for (r, (n, ex)) in reasons {
            println!("  {n:5}  {r}   (e.g. {ex})");
        }
    }
}
