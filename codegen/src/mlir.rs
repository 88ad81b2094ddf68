//! MLIR through melior: build a small `func.func` with `arith` ops, print it, parse text back and verify it. This is
//! the seed of the MLIR export (`tunec compile --emit mlir`); today it proves the MLIR 22 C API links and works.

use std::cell::RefCell;
use std::rc::Rc;

use melior::dialect::{arith, func, DialectRegistry};
use melior::ir::attribute::{StringAttribute, TypeAttribute};
use melior::ir::operation::OperationLike;
use melior::ir::r#type::FunctionType;
use melior::ir::{Block, BlockLike, Location, Module, Region, RegionLike, Type};
use melior::utility::register_all_dialects;
use melior::Context;

use crate::CodegenError;

/// The symbol of the function [`mlir_smoke`] builds.
pub const SMOKE_FUNCTION: &str = "tunec_axpy_scalar";

/// Collects the diagnostics MLIR emits on a context, so errors can carry them.
pub(crate) struct Diagnostics {
    lines: Rc<RefCell<Vec<String>>>,
}

impl Diagnostics {
    pub(crate) fn attach(context: &Context) -> Self {
        let lines = Rc::new(RefCell::new(Vec::new()));
        let sink = Rc::clone(&lines);
        context.attach_diagnostic_handler(move |diagnostic| {
            sink.borrow_mut().push(format!("{}: {}", diagnostic.location(), diagnostic));
            true
        });
        Diagnostics { lines }
    }

    pub(crate) fn take(&self, fallback: &str) -> String {
        let lines = std::mem::take(&mut *self.lines.borrow_mut());
        if lines.is_empty() {
            fallback.to_string()
        } else {
            lines.join("\n")
        }
    }
}

/// A context with every upstream dialect registered and loaded.
pub fn context_with_all_dialects() -> Context {
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let context = Context::new();
    context.append_dialect_registry(&registry);
    context.load_all_available_dialects();
    context
}

/// Builds `func.func @tunec_axpy_scalar(%a: f32, %x: f32, %y: f32) -> f32 { a·x + y }` with `arith.mulf` and
/// `arith.addf`, verifies the module, and returns its text.
pub fn mlir_smoke() -> Result<String, CodegenError> {
    let context = context_with_all_dialects();
    let diagnostics = Diagnostics::attach(&context);
    let location = Location::unknown(&context);
    let module = Module::new(location);
    let f32_type = Type::float32(&context);

    let block = Block::new(&[(f32_type, location), (f32_type, location), (f32_type, location)]);
    let argument =
        |i: usize| block.argument(i).map_err(|e| CodegenError::Mlir { stage: "build", message: e.to_string() });
    let (a, x, y) = (argument(0)?, argument(1)?, argument(2)?);
    let product = block.append_operation(arith::mulf(a.into(), x.into(), location));
    let product = product.result(0).map_err(|e| CodegenError::Mlir { stage: "build", message: e.to_string() })?;
    let sum = block.append_operation(arith::addf(product.into(), y.into(), location));
    let sum = sum.result(0).map_err(|e| CodegenError::Mlir { stage: "build", message: e.to_string() })?;
    block.append_operation(func::r#return(&[sum.into()], location));

    let region = Region::new();
    region.append_block(block);
    let function_type = FunctionType::new(&context, &[f32_type, f32_type, f32_type], &[f32_type]);
    module.body().append_operation(func::func(
        &context,
        StringAttribute::new(&context, SMOKE_FUNCTION),
        TypeAttribute::new(function_type.into()),
        region,
        &[],
        location,
    ));

    if !module.as_operation().verify() {
        return Err(CodegenError::Mlir { stage: "verify", message: diagnostics.take("module failed to verify") });
    }
    Ok(module.as_operation().to_string())
}

/// Parses MLIR `text` (generic or custom syntax, any upstream dialect) and verifies it.
pub fn parse_and_verify(text: &str) -> Result<(), CodegenError> {
    if text.contains('\0') {
        return Err(CodegenError::Mlir { stage: "parse", message: "input contains a NUL byte".into() });
    }
    let context = context_with_all_dialects();
    let diagnostics = Diagnostics::attach(&context);
    let module = Module::parse(&context, text)
        .ok_or_else(|| CodegenError::Mlir { stage: "parse", message: diagnostics.take("could not parse") })?;
    if !module.as_operation().verify() {
        return Err(CodegenError::Mlir { stage: "verify", message: diagnostics.take("module failed to verify") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_module_round_trips() {
        let text = mlir_smoke().expect("build MLIR");
        assert!(text.contains(&format!("func.func @{SMOKE_FUNCTION}(")), "{text}");
        assert!(text.contains("arith.mulf") && text.contains("arith.addf"), "{text}");
        assert!(text.contains("-> f32"), "{text}");
        parse_and_verify(&text).expect("printed MLIR parses and verifies");
    }

    #[test]
    fn parse_errors_carry_mlir_diagnostics() {
        let err = parse_and_verify("func.func @f() -> f32 { %0 = arith.bogus : f32 }").expect_err("must not parse");
        match err {
            CodegenError::Mlir { stage: "parse", message } => assert!(message.contains("arith.bogus"), "{message}"),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn verify_errors_are_reported() {
        // Parses, but the return type disagrees with the signature.
        let text = "func.func @f(%a: f32) -> i32 { return %a : f32 }";
        let err = parse_and_verify(text).expect_err("must not verify");
        assert!(matches!(err, CodegenError::Mlir { .. }), "{err:?}");
        assert!(err.to_string().contains("return"), "{err}");
    }

    #[test]
    fn nul_bytes_are_rejected_not_panicked_on() {
        assert!(matches!(parse_and_verify("module {}\0"), Err(CodegenError::Mlir { stage: "parse", .. })));
    }
}
