//! `tunec_axpy`: y[i] += a·x[i], one thread per element. The smallest real kernel, used to prove the NVPTX path
//! (LLVM IR → PTX `.entry` → ptxas) and, on a GPU host, the launch path.

use inkwell::context::Context;
use inkwell::module::Module;
use inkwell::values::FunctionValue;
use inkwell::{AddressSpace, IntPredicate};

use crate::nvptx::{read_sreg, set_ptx_kernel, Sreg};
use crate::KernelError;

/// The symbol of the kernel [`emit_axpy_kernel`] defines.
pub const AXPY_KERNEL_NAME: &str = "tunec_axpy";

/// Adds `void tunec_axpy(float* y, const float* x, float a, i32 n)` to `module` and returns it.
///
/// y: [n], x: [n] -> y: [n], y[i] += a·x[i]. Thread `i = blockIdx.x·blockDim.x + threadIdx.x`; threads with
/// `i >= n` do nothing, so any grid with at least `n` threads is valid. The function carries the `ptx_kernel` calling
/// convention; the caller sets the module's NVPTX triple and data layout (codegen does).
pub fn emit_axpy_kernel<'ctx>(ctx: &'ctx Context, module: &Module<'ctx>) -> Result<FunctionValue<'ctx>, KernelError> {
    if module.get_function(AXPY_KERNEL_NAME).is_some() {
        return Err(KernelError::DuplicateKernel(AXPY_KERNEL_NAME.to_string()));
    }
    let f32_type = ctx.f32_type();
    let i32_type = ctx.i32_type();
    let i64_type = ctx.i64_type();
    let ptr_type = ctx.ptr_type(AddressSpace::default());
    let fn_type = ctx.void_type().fn_type(&[ptr_type.into(), ptr_type.into(), f32_type.into(), i32_type.into()], false);
    let function = module.add_function(AXPY_KERNEL_NAME, fn_type, None);
    set_ptx_kernel(function);

    let params = function.get_params();
    let y = params[0].into_pointer_value();
    let x = params[1].into_pointer_value();
    let a = params[2].into_float_value();
    let n = params[3].into_int_value();
    y.set_name("y");
    x.set_name("x");
    a.set_name("a");
    n.set_name("n");

    let entry = ctx.append_basic_block(function, "entry");
    let body = ctx.append_basic_block(function, "body");
    let exit = ctx.append_basic_block(function, "exit");
    let builder = ctx.create_builder();

    builder.position_at_end(entry);
    let block_idx = read_sreg(module, &builder, Sreg::CtaIdX, "block_idx")?;
    let block_dim = read_sreg(module, &builder, Sreg::NtidX, "block_dim")?;
    let thread_idx = read_sreg(module, &builder, Sreg::TidX, "thread_idx")?;
    let block_start = builder.build_int_mul(block_idx, block_dim, "block_start")?;
    let i = builder.build_int_add(block_start, thread_idx, "i")?;
    let in_bounds = builder.build_int_compare(IntPredicate::SLT, i, n, "in_bounds")?;
    builder.build_conditional_branch(in_bounds, body, exit)?;

    builder.position_at_end(body);
    let i64_index = builder.build_int_s_extend(i, i64_type, "i64")?;
    // SAFETY: the GEPs index the f32 arrays y and x at i, and 0 <= i < n holds in this block; the caller guarantees
    // both arrays have n elements.
    let (x_ptr, y_ptr) = unsafe {
        (
            builder.build_in_bounds_gep(f32_type, x, &[i64_index], "x_ptr")?,
            builder.build_in_bounds_gep(f32_type, y, &[i64_index], "y_ptr")?,
        )
    };
    let x_value = builder.build_load(f32_type, x_ptr, "x_i")?.into_float_value();
    let y_value = builder.build_load(f32_type, y_ptr, "y_i")?.into_float_value();
    let scaled = builder.build_float_mul(a, x_value, "a_x")?;
    let sum = builder.build_float_add(y_value, scaled, "y_new")?;
    builder.build_store(y_ptr, sum)?;
    builder.build_unconditional_branch(exit)?;

    builder.position_at_end(exit);
    builder.build_return(None)?;
    Ok(function)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PTX_KERNEL_CALL_CONV;

    #[test]
    fn axpy_is_a_verified_ptx_kernel() {
        let ctx = Context::create();
        let module = ctx.create_module("axpy");
        let function = emit_axpy_kernel(&ctx, &module).expect("emit axpy");
        assert_eq!(function.get_call_conventions(), PTX_KERNEL_CALL_CONV);
        assert_eq!(function.count_params(), 4);
        module.verify().map_err(|e| e.to_string()).expect("module verifies");
        let text = module.print_to_string().to_string();
        assert!(text.contains("define ptx_kernel void @tunec_axpy("), "{text}");
        assert!(text.contains("llvm.nvvm.read.ptx.sreg.tid.x"), "{text}");
        assert!(text.contains("icmp slt i32"), "{text}");
    }

    #[test]
    fn axpy_twice_in_one_module_is_an_error() {
        let ctx = Context::create();
        let module = ctx.create_module("axpy");
        emit_axpy_kernel(&ctx, &module).expect("first emit");
        let err = emit_axpy_kernel(&ctx, &module).expect_err("second emit must fail");
        assert!(matches!(err, KernelError::DuplicateKernel(ref name) if name == AXPY_KERNEL_NAME));
    }
}
