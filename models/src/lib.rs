//! Model architectures written in tunec's recipe DSL, shipped inside the binary as source text.
//!
//! Each file is evaluated by the front end together with the user's recipe (`frontend::compile_source(.., library())`):
//! its `pub fn`s and `pub struct`s (`llama`, `LlamaConfig`) are in scope in every recipe.

/// The library files: (file name used in diagnostics, source).
pub fn library() -> &'static [(&'static str, &'static str)] {
    LIBRARY
}

const LIBRARY: &[(&str, &str)] = &[("models/dsl/llama.rs", include_str!("../dsl/llama.rs"))];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_files_open_with_a_doc_line() {
        for (name, src) in library() {
            assert!(src.starts_with("//! "), "{name} must open with a `//!` line naming the paper and reference");
        }
    }
}
