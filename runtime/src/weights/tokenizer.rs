//! Tokenizers: `tokenizer.json` and `tokenizer_config.json` rebuilt from GGUF metadata (byte-level BPE), loading
//! a `tokenizer.json` with the `tokenizers` crate, and the chat template of `tokenizer_config.json` rendered with
//! minijinja the way transformers renders it (`trim_blocks`, `lstrip_blocks`, Python string methods).
//!
//! GGUF keys used: `tokenizer.ggml.model` ("gpt2" = byte-level BPE), `.tokens`, `.token_type` (3 control and 4
//! user-defined become special added tokens), `.merges` ("a b"), `.pre` (the pre-tokenizer: "smollm" splits
//! digits one by one and then applies the GPT-2 byte-level regex, without a prefix space), `.bos_token_id`,
//! `.eos_token_id`, `.padding_token_id`, `.unknown_token_id`, `.add_bos_token`, and `tokenizer.chat_template`.

use std::path::Path;

use ir::untrusted::show;
use serde_json::{json, Map, Value};

use super::gguf::GgufFile;
use super::{read_capped, read_json, read_text, WeightsError, MAX_JSON_BYTES};

/// The GGUF token types that become special added tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The tokenizer files rebuilt from a GGUF file.
#[derive(Clone, Debug)]
pub struct GgufTokenizer {
    /// The content of `tokenizer.json`.
    pub tokenizer_json: Value,
    /// The content of `tokenizer_config.json`.
    pub tokenizer_config: Value,
    pub vocab_size: usize,
    pub merges: usize,
    /// The special (added) tokens: (id, text).
    pub special_tokens: Vec<(u32, String)>,
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub has_chat_template: bool,
}

/// The pre-tokenizer of `tokenizer.json` for llama.cpp's `tokenizer.ggml.pre` name.
fn pre_tokenizer(path: &Path, pre: &str) -> Result<Value, WeightsError> {
    let byte_level = |use_regex: bool| json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex });
    let split = |pattern: &str| json!({ "type": "Split", "pattern": { "Regex": pattern }, "behavior": "Isolated", "invert": false });
    Ok(match pre {
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [{ "type": "Digits", "individual_digits": true }, byte_level(true)],
        }),
        "gpt-2" | "gpt2" | "default" => byte_level(true),
        "llama-bpe" | "llama3" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false),
            ],
        }),
        "qwen2" => json!({
            "type": "Sequence",
            "pretokenizers": [
                split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
                byte_level(false),
            ],
        }),
        other => {
            return Err(WeightsError::unsupported(
                path,
                format!("tokenizer.ggml.pre \"{}\": tunec rebuilds the pre-tokenizers smollm, gpt2/default, llama-bpe and qwen2", show(other)),
            ))
        }
    })
}

/// Rebuilds `tokenizer.json` and `tokenizer_config.json` from the GGUF tokenizer metadata.
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<GgufTokenizer, WeightsError> {
    let path = g.path();
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(WeightsError::unsupported(
            path,
            format!(
                "tokenizer.ggml.model \"{}\": tunec rebuilds byte-level BPE tokenizers (\"gpt2\") only",
                show(model)
            ),
        ));
    }
    let tokens = g.get_strings("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_i64()).collect::<Option<Vec<_>>>())
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| {
                WeightsError::format(
                    path,
                    format!("tokenizer.ggml.token_type is {}, expected {} integers", v.describe(), tokens.len()),
                )
            })?,
        None => vec![1; tokens.len()],
    };
    let merges = g.get_strings("tokenizer.ggml.merges")?;
    let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");

    let mut vocab = Map::new();
    for (id, tok) in tokens.iter().enumerate() {
        if vocab.insert(tok.to_string(), json!(id)).is_some() {
            return Err(WeightsError::format(
                path,
                format!("token \"{}\" appears twice in tokenizer.ggml.tokens (again at id {id})", show(tok)),
            ));
        }
    }
    let merge_pairs = merges
        .iter()
        .map(|m| match m.split(' ').collect::<Vec<_>>().as_slice() {
            [a, b] => Ok(json!([a, b])),
            _ => Err(WeightsError::format(
                path,
                format!("merge \"{}\" is not two tokens separated by one space", show(m)),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;

    let special_tokens: Vec<(u32, String)> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, _)| (id as u32, tokens[id].to_string()))
        .collect();
    let added_tokens: Vec<Value> = special_tokens
        .iter()
        .map(|(id, content)| {
            json!({ "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": true })
        })
        .collect();

    let token_of = |key: &str| -> Result<Option<(u32, String)>, WeightsError> {
        match g.get(key) {
            None => Ok(None),
            Some(v) => {
                let id = v.as_u64().filter(|&i| (i as usize) < tokens.len()).ok_or_else(|| {
                    WeightsError::format(
                        path,
                        format!("metadata `{key}` is {}, not a token id below {}", v.describe(), tokens.len()),
                    )
                })?;
                Ok(Some((id as u32, tokens[id as usize].to_string())))
            }
        }
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;
    let pad = token_of("tokenizer.ggml.padding_token_id")?;
    let unk = token_of("tokenizer.ggml.unknown_token_id")?;
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);

    let byte_level_post =
        json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true });
    let post_processor = match (&bos, add_bos) {
        (Some((id, text)), true) => json!({
            "type": "Sequence",
            "processors": [
                byte_level_post,
                {
                    "type": "TemplateProcessing",
                    "single": [{ "SpecialToken": { "id": text, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } }],
                    "pair": [
                        { "SpecialToken": { "id": text, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } },
                        { "SpecialToken": { "id": text, "type_id": 1 } }, { "Sequence": { "id": "B", "type_id": 1 } }
                    ],
                    "special_tokens": { text: { "id": text, "ids": [id], "tokens": [text] } }
                }
            ]
        }),
        _ => byte_level_post,
    };

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(path, pre)?,
        "post_processor": post_processor,
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merge_pairs,
        },
    });

    let chat_template = g.get("tokenizer.chat_template").and_then(|v| v.as_str());
    let mut decoder = Map::new();
    for (id, content) in &special_tokens {
        decoder.insert(
            id.to_string(),
            json!({ "content": content, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true }),
        );
    }
    let context_length = g
        .get("general.architecture")
        .and_then(|a| a.as_str())
        .and_then(|arch| g.get(&format!("{arch}.context_length")))
        .and_then(|v| v.as_u64());
    let text = |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| s.clone());
    let tokenizer_config = json!({
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "bos_token": text(&bos),
        "eos_token": text(&eos),
        "pad_token": text(&pad),
        "unk_token": text(&unk),
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": false,
        "model_max_length": context_length,
        "tokenizer_class": "GPT2Tokenizer",
    });

    Ok(GgufTokenizer {
        tokenizer_json,
        tokenizer_config,
        vocab_size: tokens.len(),
        merges: merges.len(),
        special_tokens,
        bos,
        eos,
        has_chat_template: chat_template.is_some(),
    })
}

/// Loads a `tokenizer.json` with the `tokenizers` crate.
/// Loads a `tokenizer.json` (a regular file of at most [`MAX_JSON_BYTES`]) with the `tokenizers` crate.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, WeightsError> {
    if !path.exists() {
        return Err(WeightsError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer.json")));
    }
    let bytes = read_capped(path, MAX_JSON_BYTES, "weights::MAX_JSON_BYTES")?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| WeightsError::format(path, format!("cannot load the tokenizer: not UTF-8: {e}")))?;
    tokenizer_from_json(text)
        .map_err(|e| WeightsError::format(path, format!("cannot load the tokenizer: {}", show(&e))))
}

/// Parses the text of a `tokenizer.json`. The text is checked to be JSON first, parsed into values (not skimmed:
/// a lone surrogate escape `\ud800` or a number like `1e400` passes a skim): the `tokenizers` crate (0.23) panics
/// (`.expect("Helper")` in its decoder deserializer) instead of returning an error when the `decoder` object is not
/// valid JSON.
pub fn tokenizer_from_json(text: &str) -> Result<tokenizers::Tokenizer, String> {
    serde_json::from_str::<serde_json::Value>(text).map_err(|e| format!("invalid JSON: {e}"))?;
    text.parse::<tokenizers::Tokenizer>().map_err(|e| e.to_string())
}

/// A chat template and the special tokens it may refer to (`tokenizer_config.json`).
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string or an AddedToken object with `content`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// The template of a model directory: `chat_template.jinja` if present (transformers ≥ 4.43 may write it), else
    /// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates: "default" is used).
    /// `None` when the directory has neither.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, WeightsError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() { Some(read_json(&config_path)?) } else { None };
        let bos_token = config.as_ref().and_then(|c| token_text(c.get("bos_token")));
        let eos_token = config.as_ref().and_then(|c| token_text(c.get("eos_token")));
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            Some(read_text(&jinja)?)
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            }
        };
        Ok(source.map(|source| ChatTemplate { source, bos_token, eos_token }))
    }

    /// Renders `messages` (role, content) as transformers' `apply_chat_template(..., tokenize=False)` does, through
    /// the same bounded renderer training uses ([`crate::data::ChatTemplate`]: fuel, recursion and output limits).
    pub fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String, String> {
        use crate::data::{Message, Role, SpecialTokens};
        let special = SpecialTokens {
            bos: self.bos_token.clone(),
            eos: self.eos_token.clone().unwrap_or_default(),
            pad: None,
            unk: None,
        };
        let template = crate::data::ChatTemplate::new(&self.source, &special)
            .map_err(|e| format!("cannot compile the chat template: {e}"))?;
        let messages = messages
            .iter()
            .map(|(role, content)| {
                Role::parse(role)
                    .map(|r| Message::new(r, *content))
                    .ok_or_else(|| format!("unknown chat role \"{}\"", show(role)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        template.render(&messages, add_generation_prompt).map_err(|e| format!("cannot render the chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::{tokenizer_from_json, ChatTemplate};

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate { source: source.into(), bos_token: None, eos_token: Some("</s>".into()) }
    }

    #[test]
    fn generation_renders_chat_templates_with_the_training_renderer() {
        let t = template("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{{ eos_token }}");
        assert_eq!(t.render(&[("user", "hi")], true).unwrap(), "<user>hi</s>");
    }

    #[test]
    fn a_looping_template_is_stopped_when_generating() {
        let t = template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
        let e = t.render(&[("user", "hi")], true).unwrap_err();
        assert!(e.contains("ran out of fuel"), "{e}");
        let e = template("{{ m }}").render(&[("robot\u{1b}", "hi")], true).unwrap_err();
        assert!(e.contains("unknown chat role") && !e.contains('\u{1b}'), "{e}");
    }

    /// A `tokenizer.json` whose `decoder` object is not well-formed JSON (found by `fuzz/`, target model_dir): an
    /// error naming the place, not the `tokenizers` crate's panic ("Helper").
    #[test]
    fn malformed_tokenizer_json_is_an_error_not_a_panic() {
        let text = r#"{"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
            "post_processor": null, "decoder": {"type": "ByteLevel", 7: 1},
            "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}"#;
        let err = tokenizer_from_json(text).unwrap_err();
        assert!(err.starts_with("invalid JSON: key must be a string at line 2"), "{err}");
        // Well-formed but invalid JSON (found by the second campaign): a lone surrogate in the decoder's type.
        let surrogate = text.replace("7: 1", r#""type": "B\ud800el""#).replace(r#""type": "ByteLevel", "#, "");
        let err = tokenizer_from_json(&surrogate).unwrap_err();
        assert!(err.starts_with("invalid JSON: unexpected end of hex escape"), "{err}");
        // A tokenizer the crate wrote still loads.
        let good = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default()).to_string(false).unwrap();
        assert!(tokenizer_from_json(&good).is_ok());
    }
}
