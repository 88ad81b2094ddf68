//! Reading records: Alpaca as a JSON array (`[{"instruction", "input", "output"}, ...]`) or JSON lines, chat as JSON
//! lines (or a JSON array) of `{"messages": [{"role", "content"}, ...]}`.
//!
//! The layout comes from the file: `.jsonl` is JSON lines; otherwise a file whose first non-blank character is `[` is
//! a JSON array and anything else JSON lines (HF `datasets` writes JSON lines to `.json` files). The schema comes from
//! the first record's keys: `messages` means chat, `instruction` or `output` Alpaca. Both can be fixed with
//! [`ReadOptions`].
//!
//! Every bad record is an error naming the file, the line where the record starts and the field. With `skip_bad` the
//! bad records are skipped and returned in [`Records::skipped`] instead — except invalid JSON inside a JSON array,
//! after which no later record can be found, which always fails. Blank lines in JSON lines are not records.
//! Alpaca's `input` may be missing or null (no input); unknown keys are ignored.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::DataError;
use super::record::{AlpacaRecord, Message, Record, Role, SourceRecord};

/// How records are laid out in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One JSON array of records (`.json`).
    JsonArray,
    /// One JSON object per line (`.jsonl`).
    JsonLines,
}

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// `{"instruction", "input", "output"}`
    Alpaca,
    /// `{"messages": [{"role": "system" | "user" | "assistant", "content"}]}`
    Chat,
}

/// How to read a data file; `None` fields are detected from the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    pub layout: Option<Layout>,
    pub schema: Option<Schema>,
    /// Skip bad records (listed in [`Records::skipped`]) rather than fail at the first.
    pub skip_bad: bool,
}

/// The records of one file.
#[derive(Debug)]
pub struct Records {
    pub path: PathBuf,
    pub layout: Layout,
    pub schema: Schema,
    /// The good records in file order.
    pub records: Vec<SourceRecord>,
    /// The bad records skipped (`skip_bad`), each a [`DataError::Record`], in file order.
    pub skipped: Vec<DataError>,
}

/// The largest data file read (8 GiB). The file is read whole, then parsed; split a larger data set into several
/// files, or sample it.
pub const MAX_DATA_FILE_BYTES: u64 = 8 << 30;

/// The largest record: one JSON line, or one element of a JSON array (64 MiB). A larger one is a bad record
/// (skipped with `skip_bad`); training reads at most [`super::dataset::max_text_bytes`] of any record anyway.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// The most records (good or bad) a file may hold: 16,777,216. Real instruction sets hold up to a few million; each
/// record costs memory beyond its bytes, so a file of millions of tiny records must not exhaust it.
pub const MAX_RECORDS: usize = 1 << 24;

/// Reads and checks every record of `path`.
pub fn read_records(path: &Path, opts: &ReadOptions) -> Result<Records, DataError> {
    let text = read_text_file(path, MAX_DATA_FILE_BYTES)?;
    parse_records(path, &text, opts)
}

/// The UTF-8 text of the regular file `path`, of at most `max` bytes. Devices (`/dev/zero`), FIFOs, sockets and
/// directories are refused before they are opened (reading them may never end), as is a file past `max`.
pub fn read_text_file(path: &Path, max: u64) -> Result<String, DataError> {
    use std::io::Read as _;
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let bad = |message: String| DataError::File { path: path.to_path_buf(), line: None, message };
    let check = |meta: &std::fs::Metadata| -> Result<u64, DataError> {
        if !meta.is_file() {
            return Err(bad(format!(
                "not a regular file but {}: tunec reads data, tokenizer and template files whole, and reading this \
                 may never end; copy it to a file first",
                file_kind(meta)
            )));
        }
        if meta.len() > max {
            return Err(bad(format!(
                "the file is {} bytes, over the limit of {max} bytes: split it into smaller files or sample it",
                meta.len()
            )));
        }
        Ok(meta.len())
    };
    check(&std::fs::metadata(path).map_err(io)?)?;
    let file = std::fs::File::open(path).map_err(io)?;
    // The path may have been replaced between the two looks: check what was opened.
    let len = check(&file.metadata().map_err(io)?)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(bad(format!("the file grew past the limit of {max} bytes while it was read")));
    }
    match String::from_utf8(bytes) {
        Ok(t) => Ok(t),
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..valid].iter().filter(|b| **b == b'\n').count() + 1;
            let message = format!("not valid UTF-8 (byte {valid})");
            Err(DataError::File { path: path.to_path_buf(), line: Some(line), message })
        }
    }
}

/// What a file that is not a regular one is, for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        let t = meta.file_type();
        if t.is_char_device() {
            return "a character device";
        } else if t.is_block_device() {
            return "a block device";
        } else if t.is_fifo() {
            return "a FIFO (named pipe)";
        } else if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Parses `text` as the contents of the file `path` (which is only used for detection by extension and messages).
pub fn parse_records(path: &Path, text: &str, opts: &ReadOptions) -> Result<Records, DataError> {
    parse_records_at_most(path, text, opts, MAX_RECORDS)
}

/// [`parse_records`] refusing a file of more than `max_records` records.
fn parse_records_at_most(
    path: &Path,
    text: &str,
    opts: &ReadOptions,
    max_records: usize,
) -> Result<Records, DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let file_error = |line: Option<usize>, message: String| DataError::File { path: path.to_path_buf(), line, message };
    let first = text.bytes().find(|b| !b.is_ascii_whitespace());
    let Some(first) = first else { return Err(file_error(None, "the file is empty".into())) };
    let layout = opts.layout.unwrap_or_else(|| {
        let jsonl = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
        if !jsonl && first == b'[' {
            Layout::JsonArray
        } else {
            Layout::JsonLines
        }
    });
    // Each record is checked as it is parsed: the parsed JSON of the whole file is never held at once.
    let mut schema = opts.schema;
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    let mut count = 0usize;
    let mut each = |(line, value): RawRecord| -> Result<(), DataError> {
        count += 1;
        if count > max_records {
            let message = format!(
                "more than {max_records} records (the limit, MAX_RECORDS): split the file into smaller ones or sample it"
            );
            return Err(file_error(Some(line), message));
        }
        let checked = value.and_then(|v| {
            if schema.is_none() {
                if let Value::Object(obj) = &v {
                    schema = Some(detect_schema(obj).map_err(|m| file_error(Some(line), m))?);
                }
            }
            let record = match schema {
                Some(Schema::Alpaca) => alpaca_record(&v),
                Some(Schema::Chat) => chat_record(&v),
                None => Err(format!("expected a JSON object, found {}", kind(&v))),
            };
            record.map_err(|problem| DataError::record(path, line, problem))
        });
        match checked {
            Ok(record) => records.push(SourceRecord { line, record }),
            Err(e) if opts.skip_bad && e.is_record() => skipped.push(e),
            Err(e) => return Err(e),
        }
        Ok(())
    };
    match layout {
        Layout::JsonArray => parse_json_array(path, text, &mut each)?,
        Layout::JsonLines => parse_json_lines(path, text, &mut each)?,
    }
    if count == 0 {
        return Err(file_error(None, "the file holds no records".into()));
    }
    let Some(schema) = schema.filter(|_| !records.is_empty()) else {
        let first = skipped.first().map(|e| format!("; the first: {e}")).unwrap_or_default();
        return Err(file_error(None, format!("no usable records ({} skipped{first})", skipped.len())));
    };
    Ok(Records { path: path.to_path_buf(), layout, schema, records, skipped })
}

/// A parsed JSON value (or why it is not one) with the line where it starts.
type RawRecord = (usize, Result<Value, DataError>);

/// What receives each [`RawRecord`] of a file.
type Each<'a> = &'a mut dyn FnMut(RawRecord) -> Result<(), DataError>;

/// Calls `each` on the records of JSON lines, in order; stops at its first error.
fn parse_json_lines(path: &Path, text: &str, each: Each<'_>) -> Result<(), DataError> {
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > MAX_RECORD_BYTES {
            each((i + 1, Err(too_large(path, i + 1, line.len()))))?;
            continue;
        }
        let value = serde_json::from_str::<Value>(line).map_err(|e| DataError::Record {
            path: path.to_path_buf(),
            line: i + 1,
            column: Some(e.column()),
            problem: format!("invalid JSON: {}", json_message(&e)),
        });
        each((i + 1, value))?;
    }
    Ok(())
}

/// Where a scan of the text stands, with its 1-based line and the byte where that line starts.
struct Cursor<'t> {
    text: &'t str,
    pos: usize,
    line: usize,
    line_start: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn column(&self) -> usize {
        self.pos - self.line_start + 1
    }

    fn advance_to(&mut self, pos: usize) {
        for (i, b) in self.text.as_bytes()[self.pos..pos].iter().enumerate() {
            if *b == b'\n' {
                self.line += 1;
                self.line_start = self.pos + i + 1;
            }
        }
        self.pos = pos;
    }

    fn skip_whitespace(&mut self) {
        let rest = &self.text.as_bytes()[self.pos..];
        let n = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
        self.advance_to(self.pos + n);
    }
}

/// The elements of a JSON array, each with the line where it starts. Invalid JSON fails the whole file (there is no
/// telling where the next element starts), with the line and column of the fault.
fn parse_json_array(path: &Path, text: &str, each: Each<'_>) -> Result<(), DataError> {
    let at = |line: usize, column: usize, problem: String| DataError::Record {
        path: path.to_path_buf(),
        line,
        column: Some(column),
        problem: format!("invalid JSON: {problem}"),
    };
    let mut cur = Cursor { text, pos: 0, line: 1, line_start: 0 };
    cur.skip_whitespace();
    if cur.peek() != Some(b'[') {
        return Err(at(cur.line, cur.column(), "expected a JSON array of records (`[`)".into()));
    }
    cur.advance_to(cur.pos + 1);
    let mut empty = true;
    loop {
        cur.skip_whitespace();
        match cur.peek() {
            None => return Err(at(cur.line, cur.column(), "the file ends inside the array".into())),
            Some(b']') if empty => {
                cur.advance_to(cur.pos + 1);
                break;
            }
            Some(b']') => return Err(at(cur.line, cur.column(), "trailing comma before `]`".into())),
            Some(_) => {}
        }
        let (line, column) = (cur.line, cur.column());
        let mut stream = serde_json::Deserializer::from_str(&text[cur.pos..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => {
                let len = stream.byte_offset();
                cur.advance_to(cur.pos + len);
                empty = false;
                each((line, if len > MAX_RECORD_BYTES { Err(too_large(path, line, len)) } else { Ok(v) }))?;
            }
            Some(Err(e)) => {
                // The error's position is relative to the element's start.
                let (l, c) = if e.line() <= 1 {
                    (line, column + e.column().max(1) - 1)
                } else {
                    (line + e.line() - 1, e.column())
                };
                return Err(at(l, c, json_message(&e)));
            }
            None => return Err(at(cur.line, cur.column(), "the file ends inside the array".into())),
        }
        cur.skip_whitespace();
        match cur.peek() {
            Some(b',') => cur.advance_to(cur.pos + 1),
            Some(b']') => {
                cur.advance_to(cur.pos + 1);
                break;
            }
            None => return Err(at(cur.line, cur.column(), "the file ends inside the array".into())),
            Some(_) => return Err(at(cur.line, cur.column(), "expected `,` or `]` after an array element".into())),
        }
    }
    cur.skip_whitespace();
    if cur.peek().is_some() {
        return Err(at(cur.line, cur.column(), "unexpected characters after the array".into()));
    }
    Ok(())
}

/// A record past [`MAX_RECORD_BYTES`].
fn too_large(path: &Path, line: usize, len: usize) -> DataError {
    DataError::record(
        path,
        line,
        format!(
            "the record is {len} bytes, over the limit of {MAX_RECORD_BYTES} bytes (MAX_RECORD_BYTES); shorten it, or \
             skip it with --skip-bad"
        ),
    )
}

/// serde_json's message without its " at line L column C" (we give the position ourselves).
fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn detect_schema(obj: &Map<String, Value>) -> Result<Schema, String> {
    if obj.contains_key("messages") {
        Ok(Schema::Chat)
    } else if obj.contains_key("instruction") || obj.contains_key("output") {
        Ok(Schema::Alpaca)
    } else {
        let mut keys: Vec<String> = obj.keys().take(16).map(|k| format!("\"{}\"", ir::untrusted::show(k))).collect();
        if obj.len() > 16 {
            keys.push(format!("… {} keys in all", obj.len()));
        }
        Err(format!(
            "cannot tell the data format: the first record has neither \"messages\" (chat) nor \"instruction\" and \
             \"output\" (Alpaca); its keys are [{}]",
            keys.join(", ")
        ))
    }
}

/// The JSON type of `v` as messages name it.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn object<'v>(v: &'v Value, field: Option<&str>) -> Result<&'v Map<String, Value>, String> {
    match (v, field) {
        (Value::Object(o), _) => Ok(o),
        (_, None) => Err(format!("expected a JSON object, found {}", kind(v))),
        (_, Some(f)) => Err(format!("field \"{f}\": expected an object, found {}", kind(v))),
    }
}

/// The string at `key` of `obj`, named `field` in messages.
fn string(obj: &Map<String, Value>, key: &str, field: &str) -> Result<String, String> {
    match obj.get(key) {
        None => Err(format!("missing field \"{field}\"")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("field \"{field}\": expected a string, found {}", kind(v))),
    }
}

fn alpaca_record(v: &Value) -> Result<Record, String> {
    let obj = object(v, None)?;
    let instruction = string(obj, "instruction", "instruction")?;
    let input = match obj.get("input") {
        None | Some(Value::Null) => String::new(),
        Some(_) => string(obj, "input", "input")?,
    };
    let output = string(obj, "output", "output")?;
    Ok(Record::Alpaca(AlpacaRecord { instruction, input, output }))
}

fn chat_record(v: &Value) -> Result<Record, String> {
    let obj = object(v, None)?;
    let messages = match obj.get("messages") {
        None => return Err("missing field \"messages\"".into()),
        Some(Value::Array(m)) => m,
        Some(v) => return Err(format!("field \"messages\": expected an array, found {}", kind(v))),
    };
    if messages.is_empty() {
        return Err("field \"messages\": empty messages (a chat needs at least one message)".into());
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let m = object(m, Some(&format!("messages[{i}]")))?;
        let role_field = format!("messages[{i}].role");
        let role = string(m, "role", &role_field)?;
        let Some(role) = Role::parse(&role) else {
            return Err(format!(
                "field \"{role_field}\": unknown role \"{}\" (expected \"system\", \"user\" or \"assistant\")",
                ir::untrusted::show(&role)
            ));
        };
        let content = string(m, "content", &format!("messages[{i}].content"))?;
        out.push(Message { role, content });
    }
    Ok(Record::Chat(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_past_max_records_is_refused_at_the_first_record_past_it() {
        let text = "{\"instruction\": \"i\", \"output\": \"a\"}\n".repeat(4);
        let opts = ReadOptions { skip_bad: true, ..ReadOptions::default() };
        assert_eq!(parse_records_at_most(Path::new("d.jsonl"), &text, &opts, 4).unwrap().records.len(), 4);
        let e = parse_records_at_most(Path::new("d.jsonl"), &text, &opts, 3).unwrap_err().to_string();
        assert_eq!(
            e,
            "d.jsonl:4: more than 3 records (the limit, MAX_RECORDS): split the file into smaller ones or sample it"
        );
        let array = format!("[{}]", ["{\"instruction\": \"i\", \"output\": \"a\"}"; 4].join(",\n"));
        let e = parse_records_at_most(Path::new("d.json"), &array, &opts, 3).unwrap_err().to_string();
        assert!(e.starts_with("d.json:4: more than 3 records"), "{e}");
    }
}
