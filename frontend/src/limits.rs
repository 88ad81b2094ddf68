//! Resource limits of the recipe language, all in one place. A recipe is data a user may have downloaded from a
//! stranger: evaluating it must end quickly, in bounded memory and stack, whatever it contains. Each limit, when hit,
//! is a diagnostic at the offending span (`DiagKind::Limit`); the real models and examples stay far below them.
//!
//! | limit | what it bounds |
//! |---|---|
//! | [`MAX_SOURCE_BYTES`] | the size of one source file (checked before reading it whole and before parsing) |
//! | [`MAX_NESTING`] | how deeply the source nests (checked by a token scan *before* syn, whose parser recurses) |
//! | [`MAX_STEPS`] | evaluation time: every expression, statement and loop iteration, and work on large values |
//! | [`MAX_CALL_DEPTH`] | nested calls of DSL functions (runaway recursion) |
//! | [`MAX_EVAL_DEPTH`] | the evaluator's own recursion (nested expressions inside nested calls) |
//! | [`MAX_STRING_BYTES`] | the length of one string |
//! | [`MAX_LIST_LEN`] | the length of one list |
//! | [`MAX_VALUE_DEPTH`] | how deeply values nest (a list in a list in ...) |
//! | [`MAX_VALUE_BYTES`] | the bytes of all values created during one compilation (an upper bound on live memory) |
//! | [`MAX_PRECISION`] | the precision `N` of `{:.N}` in format strings |

use crate::diag::{DiagKind, Error, FileId, Span};

/// Largest source file (recipe or model library file), in bytes.
pub const MAX_SOURCE_BYTES: usize = 1 << 20;

/// Deepest nesting of a source file, counted by [`check_nesting`]: every open bracket (`(`, `[`, `{`) is a level,
/// and so is every token of the expression in which it opens (operators, chained calls, `else if`), since syn's
/// parser and the evaluator recurse on each.
pub const MAX_NESTING: usize = 256;

/// Evaluation steps of one compilation: one per expression, statement and loop iteration, plus one per element
/// visited by a built-in on a large value. The 7B QLoRA recipe still compiles at 512 layers.
pub const MAX_STEPS: u64 = 10_000_000;

/// Deepest nesting of calls of DSL functions.
pub const MAX_CALL_DEPTH: usize = 256;

/// Deepest recursion of the evaluator (expressions within expressions, across calls); keeps it inside the
/// evaluator thread's stack.
pub const MAX_EVAL_DEPTH: usize = 4096;

/// Longest string, in bytes.
pub const MAX_STRING_BYTES: usize = 1 << 20;

/// Longest list.
pub const MAX_LIST_LEN: usize = 1 << 20;

/// Deepest nesting of values (lists, tuples and structs inside each other).
pub const MAX_VALUE_DEPTH: usize = 64;

/// Bytes of all strings and list/tuple/struct slots created during one compilation.
pub const MAX_VALUE_BYTES: u64 = 256 << 20;

/// Largest `N` in `{:.N}`.
pub const MAX_PRECISION: usize = 64;

/// Where the limits are defined, for messages.
pub const WHERE: &str = "frontend/src/limits.rs";

/// Bytes charged for one list, tuple or struct slot.
pub const SLOT_BYTES: u64 = std::mem::size_of::<crate::value::Value>() as u64;

/// What one compilation has used so far.
#[derive(Clone, Debug, Default)]
pub struct Budget {
    pub steps: u64,
    pub bytes: u64,
}

impl Budget {
    /// Counts `n` evaluation steps at `span`; an error once more than [`MAX_STEPS`] have been counted.
    pub fn steps(&mut self, n: u64, span: Span) -> Result<(), Error> {
        self.steps = self.steps.saturating_add(n);
        if self.steps > MAX_STEPS {
            return Err(limit(
                span,
                format!("evaluation stopped after {MAX_STEPS} steps (a loop that does not end?)"),
                "the step limit was reached here",
                "MAX_STEPS",
            ));
        }
        Ok(())
    }

    /// Counts `n` bytes of newly created values at `span`; an error once more than [`MAX_VALUE_BYTES`] have been
    /// counted.
    pub fn bytes(&mut self, n: u64, span: Span) -> Result<(), Error> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > MAX_VALUE_BYTES {
            return Err(limit(
                span,
                format!("the recipe's values take more than {} MiB", MAX_VALUE_BYTES >> 20),
                "the memory limit was reached here",
                "MAX_VALUE_BYTES",
            ));
        }
        Ok(())
    }

    /// Counts a list of `len` slots created at `span` (its length must be at most [`MAX_LIST_LEN`]).
    pub fn list(&mut self, len: usize, span: Span) -> Result<(), Error> {
        check_list_len(len as u128, span)?;
        self.bytes((len as u64).saturating_mul(SLOT_BYTES), span)
    }

    /// Counts a string of `len` bytes created at `span` (at most [`MAX_STRING_BYTES`]).
    pub fn string(&mut self, len: usize, span: Span) -> Result<(), Error> {
        check_string_len(len as u128, span)?;
        self.bytes(len as u64, span)
    }
}

/// A limit-reached error with the standard help.
pub fn limit(span: Span, message: String, label: &str, name: &str) -> Error {
    Error::new(DiagKind::Limit, span, message)
        .label(label)
        .help(format!("recipes are bounded in time and memory ({name} in {WHERE})"))
}

/// An error if a list of `len` elements would be longer than [`MAX_LIST_LEN`].
pub fn check_list_len(len: u128, span: Span) -> Result<(), Error> {
    if len > MAX_LIST_LEN as u128 {
        return Err(limit(
            span,
            format!("a list of {len} elements is longer than the limit of {MAX_LIST_LEN}"),
            "this list would be too long",
            "MAX_LIST_LEN",
        ));
    }
    Ok(())
}

/// An error if a string of `len` bytes would be longer than [`MAX_STRING_BYTES`].
pub fn check_string_len(len: u128, span: Span) -> Result<(), Error> {
    if len > MAX_STRING_BYTES as u128 {
        return Err(limit(
            span,
            format!("a string of {len} bytes is longer than the limit of {MAX_STRING_BYTES}"),
            "this string would be too long",
            "MAX_STRING_BYTES",
        ));
    }
    Ok(())
}

/// Checks a source file before syn parses it: its size, and how deeply it nests ([`check_nesting`]).
pub fn check_source(file: FileId, text: &str) -> Result<(), Error> {
    if text.len() > MAX_SOURCE_BYTES {
        return Err(limit(
            Span { file, lo: 0, hi: 0 },
            format!("the file is {} bytes, more than the limit of {MAX_SOURCE_BYTES}", text.len()),
            "in this file",
            "MAX_SOURCE_BYTES",
        ));
    }
    check_nesting(file, text)
}

/// One open bracket of [`check_nesting`].
struct Frame {
    /// Levels outside this bracket (including the bracket).
    base: usize,
    /// Tokens since the last `,` or `;` at this level.
    run: usize,
}

/// A linear scan of the tokens of `text` (comments, strings and char literals skipped) that bounds the depth of
/// anything syn or the evaluator could build from it: the depth of a token is the depth of its bracket plus the
/// number of tokens before it in the same `,`/`;`-separated run (a closed bracket counts as one token, and a run
/// also ends after a `}` followed by what starts a new statement). An expression tree is never deeper than that.
pub fn check_nesting(file: FileId, text: &str) -> Result<(), Error> {
    let b = text.as_bytes();
    let mut stack: Vec<Frame> = vec![Frame { base: 0, run: 0 }];
    let mut after_brace = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        // Skip what is not a token.
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            continue;
        }
        // One token: its kind decides how the run changes.
        enum Tok {
            Open,
            Close(bool),
            Sep,
            /// An identifier (whether it is `else` or `as`), a literal, or punctuation.
            Word(bool),
            Punct,
        }
        let tok = match c {
            b'(' | b'[' | b'{' => {
                i += 1;
                Tok::Open
            }
            b')' | b']' | b'}' => {
                i += 1;
                Tok::Close(c == b'}')
            }
            b',' | b';' => {
                i += 1;
                Tok::Sep
            }
            b'"' => {
                i = skip_string(b, i + 1);
                Tok::Word(false)
            }
            b'\'' => {
                // A char literal ('a', '\n', '\u{..}') or a lifetime / label ('a).
                if b.get(i + 1) == Some(&b'\\') {
                    // Skip the backslash and the escaped character (`'\''`), then up to the closing quote.
                    i += 3;
                    while i < b.len() && b[i] != b'\'' && b[i] != b'\n' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    let ch_len = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                    if b.get(i + 1 + ch_len) == Some(&b'\'') {
                        i += 2 + ch_len;
                    } else {
                        i += 1;
                        while i < b.len() && is_ident_byte(b[i]) {
                            i += 1;
                        }
                    }
                }
                Tok::Word(false)
            }
            c if is_ident_byte(c) => {
                while i < b.len() && is_ident_byte(b[i]) {
                    i += 1;
                }
                let word = &text[start..i];
                // Raw and byte strings: r"..", r#".."#, b"..", br#".."#, c"..".
                let raw = matches!(word, "r" | "br" | "cr") && matches!(b.get(i), Some(b'"') | Some(b'#'));
                if raw {
                    let mut hashes = 0;
                    while b.get(i) == Some(&b'#') {
                        hashes += 1;
                        i += 1;
                    }
                    if b.get(i) == Some(&b'"') {
                        i = skip_raw_string(b, i + 1, hashes);
                    }
                } else if matches!(word, "b" | "c") && b.get(i) == Some(&b'"') {
                    i = skip_string(b, i + 1);
                } else if word == "b" && b.get(i) == Some(&b'\'') {
                    i += 1;
                    if b.get(i) == Some(&b'\\') {
                        i += 2;
                    }
                    while i < b.len() && b[i] != b'\'' && b[i] != b'\n' {
                        i += 1;
                    }
                    i += 1;
                } else if c.is_ascii_digit() {
                    // A number: `1.5`, `1e-5` (the exponent's sign counts as a token, which only over-counts).
                    while b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                        i += 1;
                        while i < b.len() && is_ident_byte(b[i]) {
                            i += 1;
                        }
                    }
                }
                Tok::Word(word == "else" || word == "as")
            }
            _ => {
                i += text[i..].chars().next().map_or(1, char::len_utf8);
                Tok::Punct
            }
        };
        let i_end = i.min(b.len());
        let span = Span { file, lo: start, hi: i_end };
        // A `}` followed by an identifier, a literal, `#` or `{` ended a statement: a new run starts.
        if after_brace {
            let new_statement = match tok {
                Tok::Word(continues) => !continues,
                Tok::Open => c == b'{',
                Tok::Punct => c == b'#',
                _ => false,
            };
            if new_statement {
                if let Some(top) = stack.last_mut() {
                    top.run = 0;
                }
            }
        }
        after_brace = false;
        match tok {
            Tok::Sep => {
                if let Some(top) = stack.last_mut() {
                    top.run = 0;
                }
            }
            Tok::Open => {
                let depth = stack.last().map_or(0, |f| f.base + f.run) + 1;
                too_deep(depth, span)?;
                stack.push(Frame { base: depth, run: 0 });
            }
            Tok::Close(brace) => {
                if stack.len() > 1 {
                    stack.pop();
                }
                if let Some(top) = stack.last_mut() {
                    top.run += 1;
                    too_deep(top.base + top.run, span)?;
                }
                after_brace = brace;
            }
            Tok::Word(_) | Tok::Punct => {
                if let Some(top) = stack.last_mut() {
                    top.run += 1;
                    too_deep(top.base + top.run, span)?;
                }
            }
        }
    }
    Ok(())
}

fn too_deep(depth: usize, span: Span) -> Result<(), Error> {
    if depth > MAX_NESTING {
        return Err(Error::new(DiagKind::Limit, span, format!("the source nests more than {MAX_NESTING} levels deep"))
            .label("too deeply nested here")
            .help(format!(
                "brackets, and operators or chained calls within one expression, each count as a level; split the \
             expression with `let` bindings ({MAX_NESTING} is MAX_NESTING in {WHERE})"
            )));
    }
    Ok(())
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// The index after the closing `"` of a string whose body starts at `i` (escapes skipped).
fn skip_string(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// The index after the closing `"###` of a raw string with `hashes` hashes whose body starts at `i`.
fn skip_raw_string(b: &[u8], mut i: usize, hashes: usize) -> usize {
    while i < b.len() {
        if b[i] == b'"' && b.len() - (i + 1) >= hashes && b[i + 1..i + 1 + hashes].iter().all(|&h| h == b'#') {
            return i + 1 + hashes;
        }
        i += 1;
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(src: &str) -> bool {
        check_nesting(FileId(0), src).is_ok()
    }

    #[test]
    fn nesting_counts_brackets_and_runs() {
        let nested = |n: usize| format!("fn f() -> i64 {{ {}1{} }}", "(".repeat(n), ")".repeat(n));
        assert!(depth_ok(&nested(MAX_NESTING - 16)));
        assert!(!depth_ok(&nested(MAX_NESTING)));
        assert!(!depth_ok(&"(".repeat(50_000)));
        assert!(!depth_ok(&format!("fn f() -> i64 {{ {} 1 }}", "-".repeat(MAX_NESTING))));
        assert!(!depth_ok(&format!("fn f() -> i64 {{ 1{} }}", " + 1".repeat(MAX_NESTING))));
        // Separators and statements reset the run; comments and strings are skipped.
        let many = "let x = a + b * c;\n".repeat(10_000);
        assert!(depth_ok(&format!("fn f() {{ {many} }}")));
        let loops = "for i in 0..n { x += i; }\n".repeat(1000);
        assert!(depth_ok(&format!("fn f() {{ {loops} }}")));
        assert!(depth_ok(&format!(
            "// {}\n/* {} /* */ */ fn f() {{ \"{}\" }}",
            "(".repeat(999),
            "(".repeat(999),
            "(".repeat(999)
        )));
        assert!(depth_ok(&format!("fn f() {{ r#\"{}\"#; b'('; '('; 'a; }}", "(".repeat(999))));
        assert!(depth_ok(&format!("fn f() {{ let c = '\\''; let d = b'\\''; \"{}\" }}", "(".repeat(999))));
        // `else if` chains and `{..} + {..}` chains still count.
        assert!(!depth_ok(&format!("fn f() {{ if a {{}} {} }}", "else if a {} ".repeat(MAX_NESTING))));
        assert!(!depth_ok(&format!("fn f() {{ let x = {{1}}{}; }}", " + {1}".repeat(MAX_NESTING))));
    }

    #[test]
    fn oversized_sources_are_refused() {
        let big = " ".repeat(MAX_SOURCE_BYTES + 1);
        let e = check_source(FileId(0), &big).expect_err("too big");
        assert_eq!(e.kind, DiagKind::Limit);
    }
}
