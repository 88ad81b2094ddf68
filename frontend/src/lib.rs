//! tunec's front end: recipes and model architectures written in a Rust-syntax DSL (parsed with syn, evaluated by
//! a tree-walking interpreter), compiled into a forward `ir::Graph` with PEFT adapters (LoRA, rsLoRA, QLoRA, DoRA)
//! inserted; errors are miette diagnostics pointing into the recipe.
//!
//! ```no_run
//! match frontend::compile_file(std::path::Path::new("examples/tiny.lora.rs"), models::library()) {
//!     Ok(recipe) => print!("{}", ir::text::print(&recipe.forward)),
//!     Err(diagnostic) => eprint!("{}", diagnostic.render()),
//! }
//! ```

pub mod builtins;
pub mod diag;
pub mod eval;
pub mod format;
pub mod limits;
pub mod ops;
pub mod peft;
pub mod program;
pub mod recipe;
pub mod schema;
pub mod tensor;
pub mod ty;
pub mod value;

pub use diag::{DiagKind, Diagnostic};
pub use peft::targets::TargetSpec;
pub use recipe::{CompiledRecipe, ModelInfo, PeftConfig, PeftMethod, QuantConfig, TrainConfig};

use diag::{Error, FileId, SourceMap, Span};
use eval::Interp;
use program::Program;
use std::path::Path;
use value::Value;

/// Stack for the evaluator's thread: recursion in recipes becomes recursion in the interpreter.
const EVAL_STACK_BYTES: usize = 64 << 20;

/// Compiles a recipe: evaluates its `fn recipe() -> Recipe` with the `library` files (name, source) in scope, runs
/// the model's forward function, and applies quantization and the adapter.
pub fn compile_source(file_name: &str, source: &str, library: &[(&str, &str)]) -> Result<CompiledRecipe, Diagnostic> {
    let name = recipe_name(file_name);
    on_big_stack(|| {
        with_program(file_name, source, library, |it, user| {
            let prog = it.prog;
            let Some(def) = prog.fns.get("recipe").filter(|d| d.file == user) else {
                let end = it.sources.file(user).text.len();
                return Err(Error::new(
                    DiagKind::NoRecipe,
                    Span { file: user, lo: 0, hi: end.min(1) },
                    "no recipe in this file",
                )
                .label("expected `pub fn recipe() -> Recipe` in this file"));
            };
            match it.call_fn(def, None, vec![], &[], def.span, "recipe")? {
                Value::Recipe(r) => recipe::compile(it, &r, &name),
                v => Err(Error::new(
                    DiagKind::WrongType,
                    def.span,
                    format!("`recipe` must return a `Recipe`, not {}", v.describe()),
                )),
            }
        })
    })
}

/// Reads and compiles a recipe file; diagnostics name the file as `path` is written.
pub fn compile_file(path: &Path, library: &[(&str, &str)]) -> Result<CompiledRecipe, Diagnostic> {
    let source = read_source(path)?;
    compile_source(&path.display().to_string(), &source, library)
}

/// Reads a source file of at most [`limits::MAX_SOURCE_BYTES`] (a larger one is refused without reading it whole).
fn read_source(path: &Path) -> Result<String, Diagnostic> {
    use std::io::Read;
    let io =
        |e: std::io::Error| Diagnostic::without_source(DiagKind::Io, format!("cannot read {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(limits::MAX_SOURCE_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() > limits::MAX_SOURCE_BYTES {
        let mut d = Diagnostic::without_source(
            DiagKind::Limit,
            format!(
                "{}: the file is larger than the limit of {} bytes for a recipe (MAX_SOURCE_BYTES in {})",
                path.display(),
                limits::MAX_SOURCE_BYTES,
                limits::WHERE
            ),
        );
        d.file = path.display().to_string();
        return Err(d);
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let mut d = Diagnostic::without_source(
            DiagKind::Io,
            format!("{}: the file is not UTF-8 text (invalid byte at offset {at})", path.display()),
        );
        d.file = path.display().to_string();
        d
    })
}

/// Parses the library files and checks their items (names, declared types), without running anything.
pub fn check_library(library: &[(&str, &str)]) -> Result<(), Diagnostic> {
    on_big_stack(|| with_program("<empty>", "", library, |_, _| Ok(())))
}

/// `examples/tiny.lora.rs` → `tiny.lora`.
fn recipe_name(file_name: &str) -> String {
    let base = Path::new(file_name).file_name().and_then(|s| s.to_str()).unwrap_or(file_name);
    base.strip_suffix(".rs").unwrap_or(base).to_string()
}

/// Runs `f` on a thread with a large stack (falls back to this thread if one cannot be started).
fn on_big_stack<T: Send>(f: impl FnOnce() -> Result<T, Diagnostic> + Send) -> Result<T, Diagnostic> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new().stack_size(EVAL_STACK_BYTES).spawn_scoped(s, move || {
            let _ = tx.send(f());
        });
        match spawned {
            Ok(handle) => {
                let _ = handle.join();
                rx.recv()
                    .unwrap_or_else(|_| Err(Diagnostic::without_source(DiagKind::Internal, "the compiler crashed")))
            }
            Err(e) => {
                Err(Diagnostic::without_source(DiagKind::Internal, format!("cannot start the compiler thread: {e}")))
            }
        }
    })
}

/// Parses the files, loads their items, and runs `f` with an interpreter whose top level is the user's file.
pub(crate) fn with_program<T>(
    file_name: &str,
    source: &str,
    library: &[(&str, &str)],
    f: impl FnOnce(&mut Interp, FileId) -> Result<T, Error>,
) -> Result<T, Diagnostic> {
    let mut sources = SourceMap::default();
    let lib_ids: Vec<FileId> = library.iter().map(|(n, s)| sources.add(n, s, true)).collect();
    let user = sources.add(file_name, source, false);
    let mut files = Vec::with_capacity(lib_ids.len() + 1);
    for id in lib_ids.into_iter().chain([user]) {
        let text = sources.file(id).text.clone();
        // syn's parser recurses: the file's size and nesting are bounded before it runs.
        limits::check_source(id, &text).map_err(|e| e.into_diagnostic(&sources))?;
        let ast = syn::parse_file(&text).map_err(|e| {
            Error::new(DiagKind::Syntax, Span::of(id, e.span()), format!("syntax error: {e}"))
                .label(e.to_string())
                .into_diagnostic(&sources)
        })?;
        files.push((id, ast));
    }
    let prog = Program::load(&files).map_err(|e| e.into_diagnostic(&sources))?;
    let mut it = Interp::new(&prog, &sources, user);
    f(&mut it, user).map_err(|e| e.into_diagnostic(&sources))
}

/// Evaluates `fn name()` of `source` and returns its value printed with `{:?}` (for tests of the language).
#[cfg(test)]
pub(crate) fn eval_debug(source: &str, name: &str) -> Result<String, Diagnostic> {
    on_big_stack(|| {
        with_program("test.rs", source, &[], |it, _| {
            let v = it.call_named(name, vec![], Span { file: FileId(0), lo: 0, hi: 0 })?;
            let mut s = String::new();
            v.debug(&mut s);
            Ok(s)
        })
    })
}
