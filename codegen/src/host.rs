//! Host code generation: the triple of the machine we run on, and a JIT smoke test (inkwell's MCJIT execution
//! engine) that compiles a small loop to native code and calls it. The `cpu` backend's kernels will be built the same
//! way, ahead of time.

use inkwell::context::Context;
use inkwell::targets::{InitializationConfig, Target, TargetMachine};
use inkwell::{IntPredicate, OptimizationLevel};

use crate::CodegenError;

/// The symbol of the function [`host_jit_smoke`] compiles.
pub const SMOKE_FUNCTION: &str = "tunec_sum_of_squares";

/// LLVM's triple for the machine we run on, e.g. `x86_64-unknown-linux-gnu`.
pub fn host_target_triple() -> String {
    TargetMachine::get_default_triple().as_str().to_string_lossy().into_owned()
}

/// The host CPU name as LLVM sees it (e.g. `znver3`), for `-mcpu`-style tuning of host kernels.
pub fn host_cpu_name() -> String {
    TargetMachine::get_host_cpu_name().to_string()
}

/// JIT-compiles `u64 tunec_sum_of_squares(u64 n) = Σ_{i<n} i²` (a counted loop with phis) for the host and calls
/// it with `n`.
pub fn host_jit_smoke(n: u64) -> Result<u64, CodegenError> {
    Target::initialize_native(&InitializationConfig::default()).map_err(CodegenError::Jit)?;
    let ctx = Context::create();
    let module = ctx.create_module("host_smoke");
    let i64_type = ctx.i64_type();
    let function = module.add_function(SMOKE_FUNCTION, i64_type.fn_type(&[i64_type.into()], false), None);
    let n_param = function.get_params()[0].into_int_value();

    let entry = ctx.append_basic_block(function, "entry");
    let header = ctx.append_basic_block(function, "header");
    let body = ctx.append_basic_block(function, "body");
    let exit = ctx.append_basic_block(function, "exit");
    let builder = ctx.create_builder();
    let build = |e: inkwell::builder::BuilderError| CodegenError::Jit(e.to_string());

    builder.position_at_end(entry);
    builder.build_unconditional_branch(header).map_err(build)?;

    builder.position_at_end(header);
    let i = builder.build_phi(i64_type, "i").map_err(build)?;
    let acc = builder.build_phi(i64_type, "acc").map_err(build)?;
    let i_value = i.as_basic_value().into_int_value();
    let acc_value = acc.as_basic_value().into_int_value();
    let more = builder.build_int_compare(IntPredicate::ULT, i_value, n_param, "more").map_err(build)?;
    builder.build_conditional_branch(more, body, exit).map_err(build)?;

    builder.position_at_end(body);
    let square = builder.build_int_mul(i_value, i_value, "square").map_err(build)?;
    let next_acc = builder.build_int_add(acc_value, square, "next_acc").map_err(build)?;
    let next_i = builder.build_int_add(i_value, i64_type.const_int(1, false), "next_i").map_err(build)?;
    builder.build_unconditional_branch(header).map_err(build)?;

    let zero = i64_type.const_zero();
    i.add_incoming(&[(&zero, entry), (&next_i, body)]);
    acc.add_incoming(&[(&zero, entry), (&next_acc, body)]);

    builder.position_at_end(exit);
    builder.build_return(Some(&acc_value)).map_err(build)?;

    module.verify().map_err(|e| CodegenError::Llvm { stage: "verify", message: e.to_string() })?;
    let engine =
        module.create_jit_execution_engine(OptimizationLevel::Default).map_err(|e| CodegenError::Jit(e.to_string()))?;
    // SAFETY: the signature matches the function built above: i64 (u64) -> i64 (u64), C calling convention.
    let compiled = unsafe { engine.get_function::<unsafe extern "C" fn(u64) -> u64>(SMOKE_FUNCTION) }
        .map_err(|e| CodegenError::Jit(e.to_string()))?;
    // SAFETY: the function only reads its argument and does wrapping integer arithmetic.
    Ok(unsafe { compiled.call(n) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_triple_names_this_machine() {
        let triple = host_target_triple();
        assert!(triple.starts_with(std::env::consts::ARCH), "{triple} vs {}", std::env::consts::ARCH);
        assert!(triple.contains(std::env::consts::OS), "{triple} vs {}", std::env::consts::OS);
        assert!(!host_cpu_name().is_empty());
    }

    #[test]
    fn jit_sum_of_squares_matches_the_closed_form() {
        for n in [0u64, 1, 3, 10, 50, 783] {
            let expected = (n.saturating_sub(1)) * n * (2 * n).saturating_sub(1) / 6;
            assert_eq!(host_jit_smoke(n).expect("host JIT"), expected, "n = {n}");
        }
    }
}
