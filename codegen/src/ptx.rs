//! PTX emission through LLVM's NVPTX backend: set the module's triple and data layout, optimize it, verify it, and
//! print PTX assembly for one SM architecture.

use std::sync::Once;

use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;

use crate::CodegenError;

/// LLVM's triple for 64-bit CUDA.
pub const NVPTX_TRIPLE: &str = "nvptx64-nvidia-cuda";

/// The PTX ISA version we ask for. PTX 8.0 (CUDA 12.0) covers sm_80..sm_90 and is accepted by ptxas from CUDA 12.0
/// on; LLVM 22 would otherwise pick the minimum the SM needs (7.0 for sm_80, 7.8 for sm_90).
pub const PTX_ISA_FEATURE: &str = "+ptx80";

/// The lowest SM we target: mma.sync bf16 and cp.async need sm_80.
pub const MIN_SM: u32 = 80;

fn initialize_nvptx() {
    static INIT: Once = Once::new();
    INIT.call_once(|| Target::initialize_nvptx(&InitializationConfig::default()));
}

/// Creates an NVPTX target machine for `sm_<sm>` (e.g. 80 for A100, 90 for H100/H200).
pub fn nvptx_target_machine(sm: u32) -> Result<TargetMachine, CodegenError> {
    if sm < MIN_SM {
        return Err(CodegenError::UnsupportedSm(sm));
    }
    initialize_nvptx();
    let triple = TargetTriple::create(NVPTX_TRIPLE);
    let target = Target::from_triple(&triple)
        .map_err(|e| CodegenError::Llvm { stage: "NVPTX target", message: e.to_string() })?;
    let cpu = format!("sm_{sm}");
    target
        .create_target_machine(
            &triple,
            &cpu,
            PTX_ISA_FEATURE,
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| CodegenError::Llvm {
            stage: "NVPTX target",
            message: format!("LLVM could not create a target machine for {NVPTX_TRIPLE} {cpu} {PTX_ISA_FEATURE}"),
        })
}

/// Lowers `module` to PTX text for `sm_<sm>`.
///
/// The module is changed in place: its triple and data layout become NVPTX's and the LLVM `default<O3>` pipeline runs
/// over it. Kernels must carry the `ptx_kernel` calling convention (see `kernels::set_ptx_kernel`) to come out as
/// `.entry` functions.
pub fn emit_ptx(module: &Module<'_>, sm: u32) -> Result<String, CodegenError> {
    optimize(module, sm)?;
    emit_optimized_ptx(module, sm)
}

/// Sets NVPTX's triple and data layout for `sm_<sm>` on `module`, verifies it and runs `default<O3>`.
fn optimize(module: &Module<'_>, sm: u32) -> Result<(), CodegenError> {
    let machine = nvptx_target_machine(sm)?;
    module.set_triple(&machine.get_triple());
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    module.verify().map_err(|e| CodegenError::Llvm { stage: "verify", message: e.to_string() })?;
    module
        .run_passes("default<O3>", &machine, PassBuilderOptions::create())
        .map_err(|e| CodegenError::Llvm { stage: "optimize", message: e.to_string() })
}

/// Optimizes `module` for NVPTX once (with `sm_<sm>`'s target machine) and returns it as bitcode, so that PTX for
/// several architectures can be generated from it in parallel ([`ptx_from_bitcode`]) without optimizing it again.
pub fn optimize_for_nvptx(module: &Module<'_>, sm: u32) -> Result<Vec<u8>, CodegenError> {
    optimize(module, sm)?;
    Ok(module.write_bitcode_to_memory().as_slice().to_vec())
}

/// PTX for `sm_<sm>` from a module [`optimize_for_nvptx`] produced (in a fresh context, so any thread can do it).
pub fn ptx_from_bitcode(bitcode: &[u8], sm: u32) -> Result<String, CodegenError> {
    let ctx = inkwell::context::Context::create();
    let buf = inkwell::memory_buffer::MemoryBuffer::create_from_memory_range_copy(bitcode, "tunec_kernels");
    let module = ctx
        .create_module_from_ir(buf)
        .map_err(|e| CodegenError::Llvm { stage: "read bitcode", message: e.to_string() })?;
    emit_optimized_ptx(&module, sm)
}

/// One PTX module from modules LLVM generated for the same architecture (a build's parts): the first whole, then
/// the others without their header (up to and including `.address_size`). Module-level names must be unique across
/// the parts (kernels and their tables are named after the kernel): a name declared twice is an error, except
/// identical `.extern` declarations, which are kept once.
pub fn merge_modules(parts: &[String]) -> Result<String, CodegenError> {
    let mut out = String::new();
    let mut names: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (p, text) in parts.iter().enumerate() {
        let body = if p == 0 {
            text.as_str()
        } else {
            let at = text.find("\n.address_size").ok_or_else(|| CodegenError::Llvm {
                stage: "merge PTX",
                message: format!("part {p} has no .address_size header"),
            })?;
            let end = text[at + 1..].find('\n').map_or(text.len(), |e| at + 1 + e + 1);
            &text[end..]
        };
        for line in body.lines() {
            let Some(name) = module_level_name(line) else {
                out.push_str(line);
                out.push('\n');
                continue;
            };
            match names.get(&name) {
                Some(prev) if prev == line && line.starts_with(".extern") => continue,
                Some(_) => {
                    return Err(CodegenError::Llvm {
                        stage: "merge PTX",
                        message: format!("`{name}` is declared by two parts of the module"),
                    })
                }
                None => {
                    names.insert(name, line.to_string());
                }
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// The name a module-level PTX declaration line declares (`.visible .entry k(`, `.global .align 4 .b8 t[64] = …`),
/// or `None` for other lines (function bodies are indented; `.version`/`.target`/`.address_size` declare nothing).
fn module_level_name(line: &str) -> Option<String> {
    if !line.starts_with('.') || line.starts_with(".version") || line.starts_with(".target") {
        return None;
    }
    if line.starts_with(".address_size") {
        return None;
    }
    let tok = line.split_whitespace().find(|t| !t.starts_with('.') && !t.starts_with(|c: char| c.is_ascii_digit()))?;
    let name: String = tok.chars().take_while(|c| !"([;=,".contains(*c)).collect();
    (!name.is_empty()).then_some(name)
}

/// `ptx` (generated for `sm_<from>`) for `sm_<to>`: the `.target` directives changed. Valid when the code uses no
/// instruction specific to either architecture, which holds for every template today.
pub fn retarget(ptx: &str, from: u32, to: u32) -> String {
    if from == to {
        return ptx.to_string();
    }
    ptx.replace(&format!("\n.target sm_{from}\n"), &format!("\n.target sm_{to}\n"))
}

/// Code generation only: PTX text of an already optimized module.
fn emit_optimized_ptx(module: &Module<'_>, sm: u32) -> Result<String, CodegenError> {
    let machine = nvptx_target_machine(sm)?;
    module.set_triple(&machine.get_triple());
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    let buffer = machine
        .write_to_memory_buffer(module, FileType::Assembly)
        .map_err(|e| CodegenError::Llvm { stage: "emit PTX", message: e.to_string() })?;
    let text = String::from_utf8_lossy(buffer.as_slice());
    // The buffer may carry a trailing NUL from LLVM's raw_svector_ostream.
    Ok(text.trim_end_matches('\0').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use inkwell::context::Context;
    use kernels::emit_axpy_kernel;

    fn axpy_ptx(sm: u32) -> String {
        let ctx = Context::create();
        let module = ctx.create_module("axpy");
        emit_axpy_kernel(&ctx, &module).expect("emit axpy");
        emit_ptx(&module, sm).expect("emit PTX")
    }

    #[test]
    fn merged_modules_keep_one_header_and_refuse_duplicate_names() {
        let a = axpy_ptx(80);
        let ctx = Context::create();
        let module = ctx.create_module("b");
        crate::gemm::emit_ptx(&ctx, &module, &test_gemm("mm:b")).expect("gemm");
        let b = emit_ptx(&module, 80).expect("PTX");
        let merged = merge_modules(&[a.clone(), b]).expect("merge");
        assert_eq!(merged.matches(".version").count(), 1, "{merged}");
        assert_eq!(merged.matches(".address_size").count(), 1, "{merged}");
        assert!(merged.contains(".entry tunec_axpy") && merged.contains(".entry tunec_mm_b"), "{merged}");
        if crate::ptxas::find_ptxas().is_some() {
            let report = crate::ptxas::assemble(&merged, 80).expect("ptxas");
            assert!(report.kernel("tunec_axpy").is_some() && report.kernel("tunec_mm_b").is_some());
        }
        let err = merge_modules(&[a.clone(), a]).unwrap_err().to_string();
        assert!(err.contains("tunec_axpy") && err.contains("two parts"), "{err}");
    }

    fn test_gemm(name: &str) -> kernels::gemm::Gemm {
        kernels::gemm::Gemm {
            name: name.into(),
            batch: 1,
            m: 5,
            n: 7,
            k: 3,
            ta: false,
            tb: true,
            weight: kernels::gemm::WeightFormat::F32,
            lora: None,
            epilogue: None,
            precision: kernels::gemm::GemmPrecision::F32,
        }
    }

    #[test]
    fn axpy_ptx_has_an_entry_for_sm80_and_sm90() {
        for sm in [80, 90] {
            let ptx = axpy_ptx(sm);
            assert!(ptx.contains(".entry tunec_axpy"), "sm_{sm}: no .entry in\n{ptx}");
            assert!(!ptx.contains(".func tunec_axpy"), "sm_{sm}: kernel emitted as .func\n{ptx}");
            assert!(ptx.contains(&format!(".target sm_{sm}")), "sm_{sm}: wrong .target in\n{ptx}");
            assert!(ptx.contains(".version 8.0"), "sm_{sm}: expected PTX ISA 8.0 in\n{ptx}");
            assert!(ptx.contains(".address_size 64"), "{ptx}");
            // The special registers and the bounds check survive optimization.
            assert!(ptx.contains("%tid.x") && ptx.contains("%ctaid.x") && ptx.contains("%ntid.x"), "{ptx}");
            assert!(ptx.contains("setp."), "no bounds check in\n{ptx}");
            // Without fast-math flags LLVM keeps the multiply and the add separately rounded (no contraction to fma).
            assert!(ptx.contains("fma.rn.f32") || ptx.contains("mul.rn.f32"), "no multiply in\n{ptx}");
            assert!(ptx.contains("st.global"), "no store to y in\n{ptx}");
        }
    }

    #[test]
    fn old_sm_is_rejected() {
        let ctx = Context::create();
        let module = ctx.create_module("axpy");
        emit_axpy_kernel(&ctx, &module).expect("emit axpy");
        assert!(matches!(emit_ptx(&module, 70), Err(CodegenError::UnsupportedSm(70))));
    }
}
