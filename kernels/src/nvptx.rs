//! NVPTX helpers shared by the kernel templates: the `ptx_kernel` calling convention and the special registers
//! (`threadIdx`, `blockIdx`, `blockDim`, `gridDim`) read through `llvm.nvvm.read.ptx.sreg.*` intrinsics.

use inkwell::builder::Builder;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::Module;
use inkwell::values::{FunctionValue, IntValue};

use crate::KernelError;

/// LLVM's `CallingConv::PTX_Kernel`. A function with it becomes a PTX `.entry` (launchable from the host).
///
/// LLVM 22 ignores the old `!nvvm.annotations` `kernel` metadata: a function marked only that way comes out as a
/// device `.func`, so templates must set this calling convention instead.
pub const PTX_KERNEL_CALL_CONV: u32 = 71;

/// Marks `function` as a PTX kernel entry point.
pub fn set_ptx_kernel(function: FunctionValue<'_>) {
    function.set_call_conventions(PTX_KERNEL_CALL_CONV);
}

/// A PTX special register holding one component of a launch coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sreg {
    /// `threadIdx.x`
    TidX,
    /// `threadIdx.y`
    TidY,
    /// `blockIdx.x`
    CtaIdX,
    /// `blockIdx.y`
    CtaIdY,
    /// `blockDim.x`
    NtidX,
    /// `blockDim.y`
    NtidY,
    /// `gridDim.x`
    NctaIdX,
}

impl Sreg {
    /// The name of the LLVM intrinsic that reads this register (returns `i32`).
    pub fn intrinsic_name(self) -> &'static str {
        match self {
            Sreg::TidX => "llvm.nvvm.read.ptx.sreg.tid.x",
            Sreg::TidY => "llvm.nvvm.read.ptx.sreg.tid.y",
            Sreg::CtaIdX => "llvm.nvvm.read.ptx.sreg.ctaid.x",
            Sreg::CtaIdY => "llvm.nvvm.read.ptx.sreg.ctaid.y",
            Sreg::NtidX => "llvm.nvvm.read.ptx.sreg.ntid.x",
            Sreg::NtidY => "llvm.nvvm.read.ptx.sreg.ntid.y",
            Sreg::NctaIdX => "llvm.nvvm.read.ptx.sreg.nctaid.x",
        }
    }
}

/// Emits a read of `reg` at the builder's position and returns it as an `i32`.
pub fn read_sreg<'ctx>(
    module: &Module<'ctx>,
    builder: &Builder<'ctx>,
    reg: Sreg,
    name: &str,
) -> Result<IntValue<'ctx>, KernelError> {
    let intrinsic_name = reg.intrinsic_name();
    let declaration = Intrinsic::find(intrinsic_name)
        .and_then(|intrinsic| intrinsic.get_declaration(module, &[]))
        .ok_or(KernelError::MissingIntrinsic(intrinsic_name))?;
    let call = builder.build_call(declaration, &[], name)?;
    call.try_as_basic_value()
        .basic()
        .map(|value| value.into_int_value())
        .ok_or(KernelError::MissingIntrinsic(intrinsic_name))
}
