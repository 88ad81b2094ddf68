//! Tokenization with the `tokenizers` crate from a `tokenizer.json`, and the special tokens and chat template of a
//! `tokenizer_config.json`.
//!
//! The text is tokenized as HF's `apply_chat_template(..., tokenize=True)` does: added tokens (`<|im_start|>`, `</s>`,
//! ...) are recognised in the text, and nothing is added around it — the post-processor (which adds BOS/EOS for some
//! models and trims offsets for byte-level ones) is removed, so a BOS appears only where the template writes one.
//! Truncation and padding configured in the file are turned off too: the batcher does both.

use std::path::{Path, PathBuf};

use ir::untrusted::show;
use serde_json::Value;

use super::error::DataError;

/// The special tokens a template and the batcher need, as their text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    /// Ends a response (appended after an Alpaca output; chat templates write it themselves).
    pub eos: String,
    /// Fills padded positions; EOS when absent.
    pub pad: Option<String>,
    pub unk: Option<String>,
}

impl SpecialTokens {
    /// Only an EOS token.
    pub fn eos(eos: impl Into<String>) -> SpecialTokens {
        SpecialTokens { bos: None, eos: eos.into(), pad: None, unk: None }
    }
}

/// The largest `tokenizer_config.json` or `chat_template.jinja` read (real ones are a few KiB to a few hundred).
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// The largest `tokenizer.json` read (real ones are up to a few tens of MiB: Gemma's 256k vocabulary is 33 MiB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;

/// What the pipeline takes from an HF `tokenizer_config.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizerConfig {
    pub special: SpecialTokens,
    /// The Jinja `chat_template`, if the model has one.
    pub chat_template: Option<String>,
    /// The file `chat_template` was read from (`tokenizer_config.json` or `chat_template.jinja`), for messages.
    pub chat_template_path: Option<PathBuf>,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`: `bos_token`, `eos_token`, `pad_token`, `unk_token` (strings or
    /// `{"content": ...}` objects) and `chat_template` (a string, or a list of `{name, template}` of which the one named
    /// "default" is taken). Without a `chat_template` key, a `chat_template.jinja` beside the file is used (newer
    /// transformers save it there).
    pub fn load(path: &Path) -> Result<TokenizerConfig, DataError> {
        let text = super::reader::read_text_file(path, MAX_CONFIG_BYTES)?;
        let bad = |message: String| DataError::File { path: path.to_path_buf(), line: None, message };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let token = |key: &str| -> Result<Option<String>, DataError> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(bad(format!("field \"{key}\": an object without a string \"content\""))),
                },
                Some(_) => Err(bad(format!("field \"{key}\": expected a string or an object"))),
            }
        };
        let Some(eos) = token("eos_token")? else { return Err(bad("no \"eos_token\"".into())) };
        let special =
            SpecialTokens { bos: token("bos_token")?, eos, pad: token("pad_token")?, unk: token("unk_token")? };
        let mut chat_template_path = Some(path.to_path_buf());
        let chat_template = match v.get("chat_template") {
            None | Some(Value::Null) => {
                let beside = path.with_file_name("chat_template.jinja");
                match super::reader::read_text_file(&beside, MAX_CONFIG_BYTES) {
                    Ok(t) => {
                        chat_template_path = Some(beside);
                        Some(t)
                    }
                    Err(DataError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                }
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let named = |want: &str| {
                    list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(want))?.get("template")?.as_str()
                };
                match named("default") {
                    Some(t) => Some(t.to_string()),
                    None => return Err(bad("field \"chat_template\": no template named \"default\"".into())),
                }
            }
            Some(_) => return Err(bad("field \"chat_template\": expected a string or a list".into())),
        };
        let chat_template_path = chat_template_path.filter(|_| chat_template.is_some());
        Ok(TokenizerConfig { special, chat_template, chat_template_path })
    }
}

/// A text and its tokens, each with the byte range of the text it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// `offsets[i]` = the bytes `start..end` of the text token `i` comes from.
    pub offsets: Vec<(usize, usize)>,
}

/// A `tokenizer.json` tokenizer with the ids of its special tokens.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    special: SpecialTokens,
    bos_id: Option<u32>,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("special", &self.special)
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` at `path`; each special token must be one token of it, recognised in text.
    pub fn from_file(path: &Path, special: SpecialTokens) -> Result<TextTokenizer, DataError> {
        let bad = |message: String| DataError::Tokenizer { path: path.to_path_buf(), message };
        let json = super::reader::read_text_file(path, MAX_TOKENIZER_BYTES)?;
        let inner = crate::weights::tokenizer::tokenizer_from_json(&json).map_err(|e| bad(ir::untrusted::show(&e)))?;
        TextTokenizer::new(inner, path, special)
    }

    /// `dir/tokenizer.json` with the special tokens and chat template of `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<(TextTokenizer, TokenizerConfig), DataError> {
        let config = TokenizerConfig::load(&dir.join("tokenizer_config.json"))?;
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), config.special.clone())?;
        Ok((tokenizer, config))
    }

    /// Wraps a tokenizer built in memory; `path` only names it in messages.
    pub fn new(
        mut inner: tokenizers::Tokenizer,
        path: &Path,
        special: SpecialTokens,
    ) -> Result<TextTokenizer, DataError> {
        let bad = |message: String| DataError::Tokenizer { path: path.to_path_buf(), message };
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        inner.with_truncation(None).map_err(|e| bad(e.to_string()))?;
        inner.with_padding(None);
        let mut t = TextTokenizer { inner, path: path.to_path_buf(), special, bos_id: None, eos_id: 0, pad_id: 0 };
        let id = |t: &TextTokenizer, what: &str, token: &str| -> Result<u32, DataError> {
            let id = t
                .inner
                .token_to_id(token)
                .ok_or_else(|| bad(format!("no {what} token \"{}\" in the vocabulary", show(token))))?;
            let ids = t.encode(token)?.ids;
            if ids != [id] {
                return Err(bad(format!(
                    "the {what} token \"{}\" (id {id}) is not recognised in text: it tokenizes as {}; it must \
                     be an added (special) token",
                    show(token),
                    show(&format!("{ids:?}"))
                )));
            }
            Ok(id)
        };
        t.eos_id = id(&t, "EOS", &t.special.eos.clone())?;
        if let Some(bos) = t.special.bos.clone() {
            t.bos_id = Some(id(&t, "BOS", &bos)?);
        }
        t.pad_id = match t.special.pad.clone() {
            Some(pad) => t
                .inner
                .token_to_id(&pad)
                .ok_or_else(|| bad(format!("no pad token \"{}\" in the vocabulary", show(&pad))))?,
            None => t.eos_id,
        };
        Ok(t)
    }

    /// The tokens of `text`, with nothing added (see the module doc).
    pub fn encode(&self, text: &str) -> Result<Encoded, DataError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), offsets: enc.get_offsets().to_vec() })
    }

    /// The text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| DataError::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The pad token's id: `pad` when given, else EOS.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Vocabulary size including added tokens (every id is below it).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying `tokenizers` tokenizer (post-processor, truncation and padding removed).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
