//! What can go wrong reading, rendering and tokenizing training data. A bad record names its file and line (for a JSON
//! array, the line where the record starts), then the field or the JSON column:
//! `alpaca.jsonl:17: field "output": expected a string, found number`, `chat.jsonl:3:14: invalid JSON: ...`.

use std::fmt;
use std::path::{Path, PathBuf};

/// Everything the data pipeline refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// One record is malformed, or could not be rendered or tokenized. With `skip_bad` these are skipped and counted.
    #[error("{}:{line}{}: {problem}", path.display(), Column(*column))]
    Record {
        path: PathBuf,
        /// 1-based line where the record starts (JSON lines: its line).
        line: usize,
        /// 1-based byte column, for invalid JSON.
        column: Option<usize>,
        /// `field "output": expected a string, found number`, `missing field "messages"`, `invalid JSON: ...`.
        problem: String,
    },
    /// The file as a whole is unusable (not JSON of a known shape, no records, not UTF-8, a JSON array that does not
    /// parse past some point). `line` where one is known.
    #[error("{}{}: {message}", path.display(), Line(*line))]
    File { path: PathBuf, line: Option<usize>, message: String },
    /// The tokenizer file could not be loaded, or lacks a token the pipeline needs.
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// The chat template does not compile, or cannot be used the way asked.
    #[error("chat template: {0}")]
    Template(String),
    /// The chat template went past a limit while rendering (`TEMPLATE_FUEL`, `MAX_TEMPLATE_OUTPUT`): the template, not
    /// a record, is at fault, so `skip_bad` never skips it.
    #[error("chat template: {0}")]
    TemplateLimit(String),
    /// Options that do not fit together or the data (an eval split larger than the data, a zero batch size, ...).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    /// A record-level error at `path:line`.
    pub fn record(path: &Path, line: usize, problem: impl Into<String>) -> DataError {
        DataError::Record { path: path.to_path_buf(), line, column: None, problem: problem.into() }
    }

    /// Whether this is a single bad record (what `skip_bad` skips) rather than a whole-file or setup problem.
    pub fn is_record(&self) -> bool {
        matches!(self, DataError::Record { .. })
    }
}

struct Column(Option<usize>);

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(c) => write!(f, ":{c}"),
            None => Ok(()),
        }
    }
}

struct Line(Option<usize>);

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(l) => write!(f, ":{l}"),
            None => Ok(()),
        }
    }
}
