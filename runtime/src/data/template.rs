//! Prompt text: Stanford Alpaca's template, or the model's own Jinja `chat_template` rendered with minijinja the way
//! HF transformers renders it (`trim_blocks`, `lstrip_blocks`, `raise_exception`, Python string methods through
//! minijinja-contrib's pycompat, `tojson` as Python's `json.dumps`, `bos_token`/`eos_token`/... in the context,
//! `tools` and `documents` none). `strftime_now` and the `{% generation %}` tag are not provided.
//!
//! [`render`] gives the text of a record and the byte ranges of its responses (what response-only loss trains on).
//!
//! A chat template comes with a downloaded model and is a program: one rendering runs at most [`TEMPLATE_FUEL`]
//! instructions, writes at most [`MAX_TEMPLATE_OUTPUT`] bytes and nests at most [`MAX_TEMPLATE_RECURSION`] deep; a
//! template past a limit is refused ([`DataError::TemplateLimit`], naming the file it came from), never run on.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use super::error::DataError;
use super::record::{Message, Record, Role};
use super::tokenize::SpecialTokens;

/// Alpaca's prompt for a record with an input (FACTS.md, "Prompt formats").
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides \
further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n\
### Input:\n{input}\n\n### Response:\n";

/// Alpaca's prompt for a record without one.
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately \
completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// The Alpaca prompt: everything before the response. An empty `input` takes the template without input.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    // One pass of substitution, so braces inside the instruction are never substituted again.
    let template = if input.is_empty() { ALPACA_NO_INPUT } else { ALPACA_WITH_INPUT };
    let mut out = String::with_capacity(template.len() + instruction.len() + input.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(r) = after.strip_prefix("{instruction}") {
            out.push_str(instruction);
            rest = r;
        } else if let Some(r) = after.strip_prefix("{input}") {
            out.push_str(input);
            rest = r;
        } else {
            out.push('{');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Instructions one rendering of a chat template may run (minijinja's fuel): ample for real templates (SmolLM2's
/// ChatML runs about 20 per message), and spent within a fraction of a second by one that loops without end.
pub const TEMPLATE_FUEL: u64 = 10_000_000;

/// Bytes one rendering of a chat template may write. Records are cut to [`super::dataset::max_text_bytes`] (a few
/// MiB at most for real sequence lengths) before rendering, so a real template stays far below.
pub const MAX_TEMPLATE_OUTPUT: usize = 32 << 20;

/// How deep loops, conditions, macros and includes of a chat template may nest (minijinja's recursion limit,
/// whose own default and maximum is 500).
pub const MAX_TEMPLATE_RECURSION: usize = 100;

/// Indentation widths the `indent` filter takes (minijinja's own allocates whatever width a template asks for).
const MAX_INDENT: usize = 1024;

/// A compiled HF chat template.
pub struct ChatTemplate {
    env: Box<Environment<'static>>,
    special: SpecialTokens,
    /// The file the template came from (`tokenizer_config.json`, `chat_template.jinja`), for messages.
    origin: Option<PathBuf>,
}

const TEMPLATE_NAME: &str = "chat_template";

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = self.env.get_template(TEMPLATE_NAME).map(|t| t.source().to_string()).unwrap_or_default();
        f.debug_struct("ChatTemplate").field("source", &source).field("special", &self.special).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `special` fills `bos_token`, `eos_token`, `pad_token`, `unk_token` (those present).
    pub fn new(source: &str, special: &SpecialTokens) -> Result<ChatTemplate, DataError> {
        ChatTemplate::compile(source, special, None)
    }

    /// The chat template of a tokenizer config ([`super::TokenizerConfig::chat_template`]), compiled once; its
    /// errors name the file it came from. `None` when the config has none.
    pub fn from_config(config: &super::TokenizerConfig) -> Result<Option<ChatTemplate>, DataError> {
        let Some(source) = config.chat_template.as_deref() else { return Ok(None) };
        ChatTemplate::compile(source, &config.special, config.chat_template_path.as_deref()).map(Some)
    }

    /// Compiles `source` read from `origin`.
    pub fn compile(source: &str, special: &SpecialTokens, origin: Option<&Path>) -> Result<ChatTemplate, DataError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        apply_limits(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, ir::untrusted::show(&message)))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| DataError::Template(at(origin, &describe(&e))))?;
        Ok(ChatTemplate { env: Box::new(env), special: special.clone(), origin: origin.map(Path::to_path_buf) })
    }

    /// The file the template came from, if known.
    pub fn origin(&self) -> Option<&Path> {
        self.origin.as_deref()
    }

    /// The template's text for `messages`; with `add_generation_prompt`, followed by what opens an assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, DataError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_object(MessageValue { role: m.role.as_str(), content: Value::from(m.content.as_str()) })
            })
            .collect();
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        ctx.insert("eos_token", Value::from(self.special.eos.as_str()));
        for (key, token) in
            [("bos_token", &self.special.bos), ("pad_token", &self.special.pad), ("unk_token", &self.special.unk)]
        {
            if let Some(t) = token {
                ctx.insert(key, Value::from(t.as_str()));
            }
        }
        let origin = self.origin.as_deref();
        let template =
            self.env.get_template(TEMPLATE_NAME).map_err(|e| DataError::Template(at(origin, &describe(&e))))?;
        let mut out = CappedWriter { bytes: Vec::new(), over: false };
        if let Err(e) = template.render_captured_to(Value::from(ctx), &mut out) {
            return Err(if out.over {
                DataError::TemplateLimit(at(
                    origin,
                    &format!(
                        "the chat template wrote more than {MAX_TEMPLATE_OUTPUT} bytes for one conversation (the \
                         limit, MAX_TEMPLATE_OUTPUT): it may be hostile or broken; fix or replace it"
                    ),
                ))
            } else if e.kind() == ErrorKind::OutOfFuel {
                DataError::TemplateLimit(at(
                    origin,
                    &format!(
                        "the chat template ran out of fuel after {TEMPLATE_FUEL} instructions (the limit, \
                         TEMPLATE_FUEL): it may loop forever; fix or replace it"
                    ),
                ))
            } else {
                DataError::Template(at(origin, &describe(&e)))
            });
        }
        String::from_utf8(out.bytes).map_err(|_| DataError::Template(at(origin, "the rendered text is not UTF-8")))
    }

    /// The text of a chat and the byte range of each assistant turn in it: from the end of the chat before the turn
    /// rendered with the generation prompt, to the end of the chat up to and including the turn. Fails when the
    /// template renders those prefixes differently from the start of the whole chat (then response spans cannot be
    /// told from it).
    pub fn render_with_responses(&self, messages: &[Message]) -> Result<Rendered, DataError> {
        let text = self.render(messages, false)?;
        let mut responses = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = if i + 1 == messages.len() { text.clone() } else { self.render(&messages[..=i], false)? };
            if !text.starts_with(&before) || !text.starts_with(&through) || before.len() > through.len() {
                return Err(DataError::Template(format!(
                    "the template does not render the conversation before message {i} (with the generation prompt) \
                     and through it as prefixes of the whole conversation, so the assistant's tokens cannot be \
                     told; train on all tokens instead"
                )));
            }
            responses.push(before.len()..through.len());
        }
        Ok(Rendered { text, responses })
    }
}

/// Bounds what a template rendered in `env` may cost: [`TEMPLATE_FUEL`] instructions, [`MAX_TEMPLATE_RECURSION`]
/// levels, an `indent` filter that refuses widths past 1024 or results past [`MAX_TEMPLATE_OUTPUT`]. For every
/// minijinja environment that renders a downloaded template (the output itself is bounded by rendering into a
/// capped writer, as [`ChatTemplate::render`] does). An out-of-fuel error has the kind `ErrorKind::OutOfFuel`.
pub fn apply_limits(env: &mut Environment<'_>) {
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_recursion_limit(MAX_TEMPLATE_RECURSION);
    env.add_filter("indent", indent);
}

/// The message `m` of the template read from `origin`: `path: m`.
fn at(origin: Option<&Path>, m: &str) -> String {
    match origin {
        Some(p) => format!("{}: {m}", p.display()),
        None => m.to_string(),
    }
}

/// The rendered text, refusing to grow past [`MAX_TEMPLATE_OUTPUT`] (`over` says the render failed for that).
struct CappedWriter {
    bytes: Vec<u8>,
    over: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > MAX_TEMPLATE_OUTPUT {
            self.over = true;
            return Err(std::io::Error::other("the chat template's output is over its limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// minijinja's `indent` filter (same arguments and result) refusing a width past [`MAX_INDENT`] or a result past
/// [`MAX_TEMPLATE_OUTPUT`] before allocating it (minijinja's own allocates whatever a template asks for).
fn indent(
    value: String,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<String, minijinja::Error> {
    let width = match width {
        Some(w) => w,
        None => kwargs.get::<Option<usize>>("width")?.unwrap_or(4),
    };
    let first = match first {
        Some(f) => f,
        None => kwargs.get::<Option<bool>>("first")?.unwrap_or(false),
    };
    let blank = match blank {
        Some(b) => b,
        None => kwargs.get::<Option<bool>>("blank")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let lines = value.bytes().filter(|b| *b == b'\n').count() + 1;
    let size = lines.checked_mul(width).and_then(|n| n.checked_add(value.len()));
    if width > MAX_INDENT || size.is_none_or(|n| n > MAX_TEMPLATE_OUTPUT) {
        let msg = format!(
            "indent: {width} spaces on {lines} lines is past the limits (a width of at most {MAX_INDENT}, a result \
             of at most {MAX_TEMPLATE_OUTPUT} bytes)"
        );
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg));
    }
    let strip = |s: &str| -> usize {
        let s = s.strip_suffix('\n').unwrap_or(s);
        s.strip_suffix('\r').unwrap_or(s).len()
    };
    let input = &value[..strip(&value)];
    let pad = " ".repeat(width);
    let mut out = String::with_capacity(input.len() + lines * width);
    let mut it = input.split('\n');
    if !first {
        out.push_str(it.next().unwrap_or_default());
        out.push('\n');
    }
    for line in it {
        if !line.is_empty() {
            out.push_str(&pad);
            out.push_str(line);
        } else if blank {
            out.push_str(&pad);
        }
        out.push('\n');
    }
    out.truncate(strip(&out));
    Ok(out)
}

/// A message as templates see it: a map with the keys `role` and `content`, in that order (as a Python dict built
/// from the JSON record would have them, which `tojson` shows).
#[derive(Debug)]
struct MessageValue {
    role: &'static str,
    content: Value,
}

impl Object for MessageValue {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.role)),
            "content" => Some(self.content.clone()),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// minijinja's error with its detail and location, as one line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False, indent=indent)` — `", "` and
/// `": "` separators inline, `","` and newlines with `indent`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(value, indent, 0, &mut out)?;
    Ok(Value::from(out))
}

fn py_json(v: &Value, indent: Option<usize>, level: usize, out: &mut String) -> Result<(), minijinja::Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match v.as_i64() {
            Some(i) if v.is_integer() => out.push_str(&i.to_string()),
            _ => {
                let x = f64::try_from(v.clone())?;
                let s = if x.is_nan() {
                    "NaN".to_string()
                } else if x.is_infinite() {
                    if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
                } else {
                    // Python's repr keeps a ".0" on integral floats.
                    let s = format!("{x:?}");
                    if s.contains(['.', 'e', 'E']) {
                        s
                    } else {
                        format!("{s}.0")
                    }
                };
                out.push_str(&s);
            }
        },
        ValueKind::String => {
            out.push_str(&serde_json::to_string(v.as_str().unwrap_or_default()).unwrap_or_default());
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                let key = k.as_str().map(str::to_string).unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::to_string(&key).unwrap_or_default());
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_json(item, indent, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        _ => {
            let msg = format!("tojson: cannot serialize a value of kind {}", v.kind());
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg));
        }
    }
    Ok(())
}

/// How records become text.
#[derive(Debug)]
pub enum PromptFormat {
    /// Alpaca's template; the response is the output followed by the EOS token. Takes Alpaca records only.
    Alpaca,
    /// The model's chat template; Alpaca records go through it as user (instruction + `"\n\n"` + input) and
    /// assistant (output) turns.
    Chat(ChatTemplate),
}

/// A record's text and the byte ranges of the responses in it, in order, not overlapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub responses: Vec<Range<usize>>,
}

/// The text of `record` in `format` without response spans (training on all tokens needs no more, and works with
/// templates whose prefixes differ from the whole conversation's start).
pub fn render_text(record: &Record, format: &PromptFormat, special: &SpecialTokens) -> Result<String, DataError> {
    match (record, format) {
        (Record::Alpaca(a), PromptFormat::Chat(t)) => t.render(&a.to_messages(), false),
        (Record::Chat(m), PromptFormat::Chat(t)) => t.render(m, false),
        _ => Ok(render(record, format, special)?.text),
    }
}

/// The text of `record` in `format`; `special.eos` ends an Alpaca response.
pub fn render(record: &Record, format: &PromptFormat, special: &SpecialTokens) -> Result<Rendered, DataError> {
    match (record, format) {
        (Record::Alpaca(a), PromptFormat::Alpaca) => {
            let prompt = alpaca_prompt(&a.instruction, &a.input);
            let text = format!("{prompt}{}{}", a.output, special.eos);
            let response = prompt.len()..text.len();
            Ok(Rendered { responses: std::iter::once(response).collect(), text })
        }
        (Record::Alpaca(a), PromptFormat::Chat(t)) => t.render_with_responses(&a.to_messages()),
        (Record::Chat(m), PromptFormat::Chat(t)) => t.render_with_responses(m),
        (Record::Chat(_), PromptFormat::Alpaca) => Err(DataError::Invalid(
            "a chat record needs a chat template: the Alpaca format takes Alpaca records only".into(),
        )),
    }
}
