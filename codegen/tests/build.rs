//! The codegen driver on a whole optimized training step (tiny QLoRA): identical kernels share code, every
//! generated kernel has its argument list (NF4 weights split into their storage parts) and a launch, the PTX modules
//! assembled (ptxas ran inside `build`), and the host library is a shared object.

use codegen::build::{build, kernel_interface, BuildOptions, GemmPrecision, Template};
use ir::DType;
use passes::{training_pipeline, PassManager, PipelineOptions};

mod common;
use common::require_ptxas;

#[test]
fn the_tiny_qlora_step_builds_with_arguments_and_launches() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let r = frontend::compile_file(&root.join("examples/tiny.qlora.rs"), models::library()).expect("recipe");
    let mut g = r.forward.clone();
    PassManager::new(training_pipeline(&PipelineOptions::default())).run(&mut g).expect("pipeline");
    let opts = BuildOptions { ptxas: require_ptxas(), ..BuildOptions::default() };
    let b = build(&g, &opts).expect("build");
    assert_eq!(b.kernels.len(), g.kernels.len());
    assert!(b.distinct > 0 && b.distinct < b.kernels.len() - b.missing.len(), "identical kernels share code");
    assert_eq!(b.ptx.keys().copied().collect::<Vec<_>>(), vec![80, 90]);
    let lib = b.host_library.as_ref().expect("host library");
    assert_eq!(&lib[..4], b"\x7fELF", "a shared object");
    let mut nf4_parts = 0;
    for (k, kb) in g.kernels.iter().zip(&b.kernels) {
        if kb.symbol.is_empty() {
            assert!(b.missing.iter().any(|(n, _)| n == &k.name), "{} has no code and is not listed missing", k.name);
            continue;
        }
        let t = Template::of(&g, k).expect("covered");
        let (args, launch) = kernel_interface(&g, k, &t);
        assert_eq!(kb.args, args);
        assert!(kb.launch.as_ref().is_some_and(|l| l.grid.0 >= 1 && l.block % 32 == 0), "{}", k.name);
        assert!(args.iter().all(|a| (a.value as usize) < g.nodes.len()));
        for a in &args {
            if let DType::Nf4(_) = g.ty(ir::ValueId(a.value)).dtype {
                nf4_parts += 1;
                assert!(a.part < 4);
            }
        }
        if opts.ptxas {
            assert!(kb.resources.contains_key(&80) && kb.resources.contains_key(&90), "{}", kb.symbol);
        }
        let _ = launch;
    }
    assert!(nf4_parts > 0, "the QLoRA step passes NF4 weights as storage parts");
}

/// Every PTX kernel of the 7B QLoRA plan assembles with ptxas for sm_80 and sm_90, and ptxas reports its resources.
#[test]
fn every_kernel_of_the_7b_qlora_plan_assembles_with_ptxas() {
    if !require_ptxas() {
        return;
    }
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let r = frontend::compile_file(&root.join("examples/llama2-7b.qlora.rs"), models::library()).expect("recipe");
    let mut g = r.forward.clone();
    PassManager::new(training_pipeline(&PipelineOptions::default())).run(&mut g).expect("pipeline");
    // With f32 SIMT GEMMs and with bf16 tensor-core GEMMs (`mma.sync`).
    for precision in [GemmPrecision::F32, GemmPrecision::Bf16] {
        let opts = BuildOptions { host: false, llvm_ir: false, gemm_precision: precision, ..BuildOptions::default() };
        let b = build(&g, &opts).expect("build (ptxas ran inside)");
        assert!(b.missing.is_empty(), "{:?}", b.missing);
        assert_eq!(b.kernels.len(), g.kernels.len());
        for kb in &b.kernels {
            for sm in [80, 90] {
                let res = kb
                    .resources
                    .get(&sm)
                    .unwrap_or_else(|| panic!("{} ({}): no ptxas report for sm_{sm}", kb.name, kb.symbol));
                assert!(res.registers > 0 && res.registers <= 255, "{}: {res:?}", kb.symbol);
                assert_eq!(res.spill_store_bytes, 0, "{} sm_{sm} spills: {res:?}", kb.symbol);
            }
            assert!(b.ptx[&80].contains(&format!(".entry {}", kb.symbol)), "{}", kb.symbol);
        }
        let mma = b.ptx[&90].matches("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32").count();
        assert_eq!(mma > 0, precision == GemmPrecision::Bf16, "{precision:?}: {mma} mma.sync instructions");
        eprintln!(
            "7B QLoRA ({precision:?} GEMMs): {} kernels, {} distinct, all assembled by ptxas for sm_80 and sm_90",
            b.kernels.len(),
            b.distinct
        );
    }
}

/// The build derives the sm_90 module from the sm_80 one by its `.target` line: valid only while LLVM's output for
/// every template is otherwise the same for both architectures. Checked here kernel by kernel on the tiny steps (and
/// the derived 7B module is assembled by ptxas for sm_90 above).
#[test]
fn llvm_emits_the_same_ptx_for_sm80_and_sm90_but_the_target() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut seen = std::collections::HashSet::new();
    for recipe in ["tiny.lora.rs", "tiny.qlora.rs", "tiny.dora.rs"] {
        let r = frontend::compile_file(&root.join("examples").join(recipe), models::library()).expect("recipe");
        let mut g = r.forward.clone();
        PassManager::new(training_pipeline(&PipelineOptions::default())).run(&mut g).expect("pipeline");
        for k in &g.kernels {
            let t = Template::of(&g, k).expect("covered");
            // GEMMs also with bf16 tensor cores (`mma.sync` is the same instruction on both architectures).
            let bf16 = match &t {
                Template::Gemm(gm) => {
                    Some(Template::Gemm(kernels::gemm::Gemm { precision: GemmPrecision::Bf16, ..gm.clone() }))
                }
                _ => None,
            };
            for t in std::iter::once(t).chain(bf16) {
                if !seen.insert(t.key()) {
                    continue;
                }
                let (p80, p90) =
                    (codegen::build::kernel_ptx(&t, 80).unwrap(), codegen::build::kernel_ptx(&t, 90).unwrap());
                assert!(p90.contains("\n.target sm_90\n"), "{}", k.name);
                assert_eq!(codegen::ptx::retarget(&p80, 80, 90), p90, "kernel `{}`", k.name);
            }
        }
    }
    assert!(seen.len() > 50);
}
