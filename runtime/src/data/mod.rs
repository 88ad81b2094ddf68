//! The training data pipeline: records from a file, prompt text, tokens with response-only labels, and fixed-shape
//! batches `[micro_batch, seq_len]` for the training step, packed or padded, shuffled per epoch with a seed, with a
//! position a checkpoint saves and restores exactly, and a held-out eval split.
//!
//! | module | holds |
//! |---|---|
//! | [`error`] | [`DataError`]: every message names the file and line (and field or JSON column) of a bad record |
//! | [`record`] | [`Record`]: an Alpaca record or a chat (system/user/assistant messages) |
//! | [`reader`] | [`read_records`]: Alpaca JSON arrays and JSONL, chat JSONL (or JSON array); format detection, `skip_bad` |
//! | [`template`] | the Alpaca prompt ([`alpaca_prompt`]), HF chat templates ([`ChatTemplate`], minijinja), [`render`] |
//! | [`tokenize`] | [`TextTokenizer`] (a `tokenizer.json`), [`SpecialTokens`], [`TokenizerConfig`] (`tokenizer_config.json`) |
//! | [`dataset`] | [`Dataset`]: records rendered and tokenized, with which tokens are training targets |
//! | [`split`] | [`Dataset::split_eval`]: a seeded held-out split, disjoint from training |
//! | [`batch`] | [`Batch`], [`TrainLoader`] (epochs, shuffling, [`LoaderPosition`]), [`eval_batches`] |
//! | [`rng`] | SplitMix64 and the Fisher–Yates shuffle every order here derives from (stable across versions) |
//!
//! # Labels
//! The training step's loss is `cross_entropy(logits, labels, ignore_index = -100)` over rows `r = b·T + t`
//! (`frontend/src/recipe.rs`, `ir::interp` `Op::CrossEntropy`): `labels[r]` is the target of logits row `r` itself,
//! nothing is shifted inside the graph. So the labels here are already shifted for next-token prediction:
//! `labels[b·T + t] = input_ids[b, t + 1]` when token `t + 1` belongs to the same example and is a training target,
//! and `-100` otherwise — in particular at the last token of every example (its label never points into the next
//! packed example) and on padding.
//!
//! # Response-only targets
//! The text of a record is rendered once, whole, and tokenized once, whole; the response byte ranges are known from
//! rendering (Alpaca: everything after the prompt, i.e. the output and the EOS token; chat: for each assistant
//! message, from the end of the conversation before it rendered with `add_generation_prompt = true` to the end of the
//! conversation up to and including it, so `content<|im_end|>\n` in ChatML). A token is a target when its byte span
//! (offsets from the `tokenizers` crate, with the post-processor removed so none are trimmed) overlaps a response
//! range. Because the whole text is tokenized in one piece, the tokens at a prompt/response boundary are exactly those
//! of tokenizing the whole text; a token that straddles the boundary counts as a response token.

pub mod batch;
pub mod dataset;
pub mod error;
pub mod reader;
pub mod record;
pub mod rng;
pub mod split;
pub mod template;
pub mod tokenize;

pub use batch::{eval_batches, Batch, BatchOptions, LoaderPosition, LoaderState, TrainLoader, IGNORE_INDEX};
pub use dataset::{DataReport, Dataset, DatasetOptions, LossOn, TokenizedExample};
pub use error::DataError;
pub use reader::{read_records, Layout, ReadOptions, Records, Schema};
pub use record::{AlpacaRecord, Message, Record, Role, SourceRecord};
pub use split::{split_eval, EvalSplit};
pub use template::{alpaca_prompt, render, render_text, ChatTemplate, PromptFormat, Rendered};
pub use tokenize::{SpecialTokens, TextTokenizer, TokenizerConfig};
