//! Plans of the tiny recipes, built exactly as `tunec compile -o` builds them: through the pipeline and the memory
//! plan, written, read back, and summarized.

#[allow(dead_code)] // attach_code is for plans with code (tests/cpu_backend.rs)
#[path = "../../tunec/src/plan_source.rs"]
mod plan_source;

use ir::plan::{Plan, ValuePlacement, FORMAT_VERSION, TUNEC_VERSION};
use ir::{DType, Role};
use passes::{training_pipeline, PassManager, PipelineOptions};
use tests::compile_example;

fn plan_for(example: &str) -> Plan {
    let recipe = compile_example(example);
    let mut g = recipe.forward.clone();
    PassManager::new(training_pipeline(&PipelineOptions::default())).run(&mut g).unwrap();
    let memory = passes::memory::plan(&g);
    plan_source::plan_of(&recipe, g, &memory, "h100").unwrap()
}

#[test]
fn the_tiny_qlora_plan_round_trips_through_a_file() {
    let plan = plan_for("tiny.qlora.rs");
    let dir = std::env::temp_dir().join(format!("tunec-plan-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.qlora.plan.bin");
    let bytes = plan.write(&path).unwrap();
    let back = Plan::read_unverified(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    let back = back.unwrap();
    assert_eq!(back, plan);
    assert!(bytes > 1000, "{bytes} bytes");

    // What the runtime needs is there: NF4 frozen weights, trainable adapters with their moments, kernels, buffers.
    let nf4 = back.params.iter().filter(|p| matches!(p.dtype, DType::Nf4(_))).count();
    assert_eq!(nf4, 14, "7 linears × 2 layers are quantized");
    assert!(back.params.iter().filter(|p| matches!(p.dtype, DType::Nf4(_))).all(|p| p.role == Role::Frozen));
    let trainable = back.params.iter().filter(|p| p.role == Role::Trainable).count();
    assert_eq!(trainable, 28, "lora_A and lora_B of 14 modules");
    assert_eq!(back.params.iter().filter(|p| p.role == Role::State).count(), 2 * trainable, "AdamW m and v");
    assert!(!back.kernels.is_empty());
    assert_eq!(back.kernels.len(), back.graph.kernels.len());
    assert!(back.values.iter().any(|v| matches!(v, ValuePlacement::InPlace { .. })), "updates in place");
    assert!(back.arena_bytes > 0 && back.persistent_bytes > 0);
    assert_eq!(back.peft.as_ref().map(|a| a.method.as_str()), Some("qlora"));

    let summary = back.summary();
    for want in ["nf4<64,256> ×14", "kernels by kind:", "lora_linear", "adapter: qlora"] {
        assert!(summary.contains(want), "summary lacks {want:?}:\n{summary}");
    }
}

#[test]
fn summary_of_the_tiny_qlora_plan() {
    let plan = plan_for("tiny.qlora.rs");
    assert_eq!(plan.format_version, FORMAT_VERSION);
    // The snapshot should not change with every release.
    let summary = plan.summary().replace(&format!("tunec {TUNEC_VERSION}"), "tunec <version>");
    insta::assert_snapshot!("tiny_qlora_plan_summary", summary);
}

#[test]
fn every_tiny_recipe_makes_a_plan_that_reads_back() {
    for example in ["tiny.lora.rs", "tiny.lora-rslora.rs", "tiny.dora.rs", "tiny.qdora.rs"] {
        let plan = plan_for(example);
        let back = Plan::from_bytes(&plan.to_bytes().unwrap()).unwrap_or_else(|e| panic!("{example}: {e}"));
        assert_eq!(back, plan, "{example}");
    }
}
