//! Source files, spans, and diagnostics: [`Error`] is what the evaluator raises (a span and a message, before it is
//! tied to source text); [`Diagnostic`] is the user-facing error, rendered by miette with the source shown.

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, Severity, SourceSpan};
use std::fmt;
use std::sync::Arc;

/// Index of a file in a [`SourceMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId(pub u32);

/// A byte range in one source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub lo: usize,
    pub hi: usize,
}

impl Span {
    /// The span of a syn/proc-macro2 token in `file` (proc-macro2 numbers bytes from the start of each parsed file).
    pub fn of(file: FileId, s: proc_macro2::Span) -> Span {
        let r = s.byte_range();
        Span { file, lo: r.start, hi: r.end.max(r.start) }
    }

    /// The smallest span covering both (the first one if they lie in different files).
    pub fn to(self, other: Span) -> Span {
        if self.file != other.file {
            return self;
        }
        Span { file: self.file, lo: self.lo.min(other.lo), hi: self.hi.max(other.hi) }
    }
}

/// One source file: the recipe, or a file of the model library.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub name: String,
    pub text: Arc<str>,
    /// Library files are written by us, not by the user: errors raised in them are reported at the user's call.
    pub is_library: bool,
}

/// All files of one compilation.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn add(&mut self, name: &str, text: &str, is_library: bool) -> FileId {
        self.files.push(SourceFile { name: name.to_string(), text: Arc::from(text), is_library });
        FileId(self.files.len() as u32 - 1)
    }

    pub fn file(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }

    pub fn is_library(&self, id: FileId) -> bool {
        self.file(id).is_library
    }

    /// The source text under a span (empty if the span is out of range).
    pub fn text(&self, span: Span) -> &str {
        self.file(span.file).text.get(span.lo..span.hi).unwrap_or("")
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, file: FileId, offset: usize) -> (usize, usize) {
        let text = &self.file(file).text;
        let offset = offset.min(text.len());
        let before = text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }
}

/// What went wrong, as a machine-readable kind (the diagnostic's code is `tunec::` + [`DiagKind::code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiagKind {
    /// The file does not parse as Rust.
    Syntax,
    /// Rust syntax that recipes do not support (closures, traits, `match`, ...).
    Unsupported,
    /// The recipe file has no `fn recipe() -> Recipe`.
    NoRecipe,
    UnknownFunction,
    UnknownStruct,
    UnknownField,
    MissingField,
    UnknownMethod,
    /// A variable or constant that is not in scope.
    UnknownName,
    UnknownType,
    /// Two items of one file, or two fields of a struct literal, with the same name.
    Duplicate,
    WrongType,
    WrongArgCount,
    /// A failed `assert!` (models validate their configs this way) or `panic!`.
    Assertion,
    /// A value of the right type that is out of range (a LoRA rank of 0, a dropout of 1.5, ...).
    InvalidValue,
    /// A target module name or pattern that matches no module of the model.
    TargetNotFound,
    /// An error while evaluating: division by zero, an index out of range, too deep recursion, ...
    Eval,
    /// Building a graph node failed (shapes or dtypes do not fit).
    Graph,
    /// A resource limit of `limits.rs` was reached (time, memory, nesting, file size).
    Limit,
    /// The recipe file could not be read.
    Io,
    /// A bug in tunec.
    Internal,
}

impl DiagKind {
    pub fn code(self) -> &'static str {
        match self {
            DiagKind::Syntax => "syntax",
            DiagKind::Unsupported => "unsupported",
            DiagKind::NoRecipe => "no_recipe",
            DiagKind::UnknownFunction => "unknown_function",
            DiagKind::UnknownStruct => "unknown_struct",
            DiagKind::UnknownField => "unknown_field",
            DiagKind::MissingField => "missing_field",
            DiagKind::UnknownMethod => "unknown_method",
            DiagKind::UnknownName => "unknown_name",
            DiagKind::UnknownType => "unknown_type",
            DiagKind::Duplicate => "duplicate",
            DiagKind::WrongType => "wrong_type",
            DiagKind::WrongArgCount => "wrong_arg_count",
            DiagKind::Assertion => "assertion",
            DiagKind::InvalidValue => "invalid_value",
            DiagKind::TargetNotFound => "target_not_found",
            DiagKind::Eval => "eval",
            DiagKind::Graph => "graph",
            DiagKind::Limit => "limit",
            DiagKind::Io => "io",
            DiagKind::Internal => "internal",
        }
    }
}

/// An error raised while compiling, with spans but without the source text (see [`Error::into_diagnostic`]).
/// Boxed: errors travel through every `Result` of the evaluator.
#[derive(Clone, Debug)]
pub struct Error(Box<ErrorInfo>);

/// The contents of an [`Error`].
#[derive(Clone, Debug)]
pub struct ErrorInfo {
    pub kind: DiagKind,
    pub message: String,
    /// Where the error was raised.
    pub span: Span,
    /// Text under `span`.
    pub label: Option<String>,
    /// The values the error is about, where they were written (a failed config check points at the fields it read).
    /// Those in the user's file are shown instead of `span`.
    pub blame: Vec<(Span, String)>,
    pub help: Option<String>,
    /// The calls the error went through, innermost first: `(call site, "in this call to `f`")`.
    pub trace: Vec<(Span, String)>,
}

impl std::ops::Deref for Error {
    type Target = ErrorInfo;
    fn deref(&self) -> &ErrorInfo {
        &self.0
    }
}

impl std::ops::DerefMut for Error {
    fn deref_mut(&mut self) -> &mut ErrorInfo {
        &mut self.0
    }
}

impl Error {
    pub fn new(kind: DiagKind, span: Span, message: impl Into<String>) -> Error {
        Error(Box::new(ErrorInfo {
            kind,
            message: message.into(),
            span,
            label: None,
            blame: vec![],
            help: None,
            trace: vec![],
        }))
    }

    pub fn label(mut self, label: impl Into<String>) -> Error {
        self.label = Some(label.into());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Error {
        self.help = Some(help.into());
        self
    }

    /// Adds `help` only if there is one.
    pub fn maybe_help(mut self, help: Option<String>) -> Error {
        if help.is_some() {
            self.help = help;
        }
        self
    }

    pub fn blame(mut self, blame: Vec<(Span, String)>) -> Error {
        self.blame = blame;
        self
    }

    /// Ties the error to its source text. An error raised inside the model library is shown where the user's
    /// recipe called into the library (the values it is about, or the call), with the library location as a note.
    pub fn into_diagnostic(self, sources: &SourceMap) -> Diagnostic {
        let e = *self.0;
        let user = |s: &Span| !sources.is_library(s.file);
        let label = e.label.clone();
        let user_blame: Vec<(Span, String)> = e.blame.iter().filter(|(s, _)| user(s)).cloned().collect();
        let call = e.trace.iter().find(|(s, _)| user(s)).cloned();
        let mut related = Vec::new();
        let labels: Vec<(Span, Option<String>)> = if let Some((first, _)) = user_blame.first() {
            let file = first.file;
            let mut labels: Vec<(Span, Option<String>)> =
                user_blame.iter().filter(|(s, _)| s.file == file).map(|(s, l)| (*s, Some(l.clone()))).collect();
            if let Some((s, l)) = call.filter(|(s, _)| s.file == file) {
                labels.push((s, Some(l)));
            }
            if e.span.file != file {
                related.push(note(sources, e.span, label));
            }
            labels
        } else if user(&e.span) {
            vec![(e.span, label)]
        } else if let Some((s, l)) = call {
            related.push(note(sources, e.span, label));
            vec![(s, Some(l))]
        } else {
            vec![(e.span, label)]
        };
        let mut d = Diagnostic::at(sources, e.kind, e.message, &labels);
        d.help = e.help;
        d.report.related = related;
        d
    }
}

/// A note pointing into another file (the library code that raised an error).
fn note(sources: &SourceMap, span: Span, label: Option<String>) -> Diagnostic {
    let name = &sources.file(span.file).name;
    let mut d = Diagnostic::at(sources, DiagKind::Internal, format!("raised in {name}"), &[(span, label)]);
    d.report.severity = Severity::Advice;
    d.report.is_note = true;
    d
}

/// A user-facing error: message, the source with labeled spans, help, and notes. Render it with
/// [`Diagnostic::render`] (plain text) or hand it to any miette report handler.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Diagnostic {
    pub kind: DiagKind,
    pub message: String,
    /// The file of the first label (the recipe, or the library file for errors inside the library).
    pub file: String,
    /// 1-based line and column of the first label.
    pub line: usize,
    pub column: usize,
    pub help: Option<String>,
    report: Box<Report>,
}

/// What miette needs to draw a diagnostic (boxed: diagnostics travel in `Result`s).
#[derive(Debug, Clone)]
struct Report {
    src: Option<NamedSource<String>>,
    labels: Vec<LabeledSpan>,
    related: Vec<Diagnostic>,
    severity: Severity,
    is_note: bool,
}

impl Diagnostic {
    /// A diagnostic with labels in one file (the first label's file; labels in other files are dropped).
    fn at(sources: &SourceMap, kind: DiagKind, message: String, labels: &[(Span, Option<String>)]) -> Diagnostic {
        let Some((first, _)) = labels.first() else { return Diagnostic::without_source(kind, message) };
        let file = sources.file(first.file);
        let (line, column) = sources.line_col(first.file, first.lo);
        let spans = labels
            .iter()
            .filter(|(s, _)| s.file == first.file)
            .enumerate()
            .map(|(i, (s, l))| {
                let lo = s.lo.min(file.text.len());
                let span = SourceSpan::new(lo.into(), s.hi.clamp(lo, file.text.len()) - lo);
                if i == 0 {
                    LabeledSpan::new_primary_with_span(l.clone(), span)
                } else {
                    LabeledSpan::new_with_span(l.clone(), span)
                }
            })
            .collect();
        Diagnostic {
            kind,
            message,
            file: file.name.clone(),
            line,
            column,
            help: None,
            report: Box::new(Report {
                src: Some(NamedSource::new(&file.name, file.text.to_string())),
                labels: spans,
                related: vec![],
                severity: Severity::Error,
                is_note: false,
            }),
        }
    }

    /// A diagnostic that points at no source (a file that cannot be read).
    pub fn without_source(kind: DiagKind, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            kind,
            message: message.into(),
            file: String::new(),
            line: 0,
            column: 0,
            help: None,
            report: Box::new(Report {
                src: None,
                labels: vec![],
                related: vec![],
                severity: Severity::Error,
                is_note: false,
            }),
        }
    }

    /// The notes attached to this diagnostic (library locations of errors reported at the user's call).
    pub fn notes(&self) -> &[Diagnostic] {
        &self.report.related
    }

    /// Renders without colors: the message, `file:line:col`, and the source with the spans underlined.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let handler = GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor()).with_width(120);
        if handler.render_report(&mut out, self).is_err() {
            return format!("error: {}", self.message);
        }
        out
    }
}

impl miette::Diagnostic for Diagnostic {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        if self.report.is_note {
            return None;
        }
        Some(Box::new(format!("tunec::{}", self.kind.code())))
    }

    fn severity(&self) -> Option<Severity> {
        Some(self.report.severity)
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.report.src.as_ref().map(|s| s as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.report.labels.is_empty() {
            return None;
        }
        Some(Box::new(self.report.labels.iter().cloned()))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        if self.report.related.is_empty() {
            return None;
        }
        Some(Box::new(self.report.related.iter().map(|d| d as &dyn miette::Diagnostic)))
    }
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a likely typo.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

/// `help: did you mean `x`?` for the closest candidate.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    closest(name, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// Levenshtein distance over characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("hiden", "hidden"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(closest("hiden", ["vocab", "hidden", "heads"]), Some("hidden"));
        assert_eq!(closest("xyz", ["vocab", "hidden"]), None);
    }

    #[test]
    fn line_col_counts_characters() {
        let mut sm = SourceMap::default();
        let f = sm.add("a.rs", "ab\ncé d", false);
        assert_eq!(sm.line_col(f, 0), (1, 1));
        assert_eq!(sm.line_col(f, 3), (2, 1));
        assert_eq!(sm.line_col(f, 7), (2, 4));
    }
}
