//! Records rendered and tokenized: each example is its token ids and, per token, whether the loss trains on
//! predicting it (response tokens by default, every token on request). A record's text is cut to
//! [`max_text_bytes`] before it is rendered and tokenized; examples longer than `seq_len` are cut to `seq_len` tokens; an example left with no target (a prompt longer than `seq_len`, an empty text) is dropped. Both
//! are counted in the [`DataReport`], as are the records skipped.

use std::fmt;
use std::path::{Path, PathBuf};

use super::error::DataError;
use super::reader::{read_records, ReadOptions, Records};
use super::template::{render, render_text, PromptFormat};
use super::tokenize::TextTokenizer;

/// Which tokens the loss trains on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossOn {
    /// The responses only: Alpaca's output and EOS, chat's assistant turns (with the template's end-of-turn tokens).
    #[default]
    Responses,
    /// Every token (but the first of an example, which nothing predicts).
    AllTokens,
}

/// How to build a [`Dataset`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatasetOptions {
    /// Layout and schema (detected when `None`) and `skip_bad`, which also skips records that fail to render or
    /// tokenize.
    pub read: ReadOptions,
    pub loss_on: LossOn,
    /// The plan's sequence length: longer examples are truncated to it.
    pub seq_len: usize,
}

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedExample {
    /// The line of the data file where its record starts.
    pub line: usize,
    pub ids: Vec<u32>,
    /// `targets[i]`: the loss trains on predicting token `i` (from tokens `..i`). Never true at 0 in effect: nothing
    /// predicts the first token.
    pub targets: Vec<bool>,
}

impl TokenizedExample {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// How many positions get a label: tokens `1..` that are targets.
    pub fn label_count(&self) -> usize {
        self.targets.iter().skip(1).filter(|t| **t).count()
    }

    /// The label of each position of this example alone, shifted for next-token prediction: `ids[i + 1]` where token
    /// `i + 1` is a target, else `ignore` — always at the last position.
    pub fn labels(&self, ignore: i32) -> impl Iterator<Item = i32> + '_ {
        (0..self.ids.len()).map(move |i| match self.targets.get(i + 1) {
            Some(true) => self.ids[i + 1] as i32,
            _ => ignore,
        })
    }
}

/// What building a dataset did with the records.
#[derive(Debug)]
pub struct DataReport {
    pub path: PathBuf,
    /// Every record of the file: those read without error and the malformed ones skipped (`skip_bad`).
    pub total: usize,
    /// Records read without error.
    pub records: usize,
    /// Bad records skipped (`skip_bad`): malformed, or failing to render or tokenize; each names file:line.
    pub skipped: Vec<DataError>,
    /// Examples cut to `seq_len` tokens, or whose text was cut to [`max_text_bytes`] before tokenizing.
    pub truncated: usize,
    /// Examples dropped because no token of theirs is a target (after truncation).
    pub without_targets: usize,
    /// Examples kept.
    pub examples: usize,
    /// Tokens of the examples kept.
    pub tokens: usize,
    /// Positions with a label.
    pub labels: usize,
    pub seq_len: usize,
}

impl DataReport {
    /// The counts, without the file name.
    pub fn counts(&self) -> String {
        format!(
            "{} records, {} skipped as bad, {} truncated to {} tokens, {} without targets dropped; {} examples, {} \
             tokens, {} labelled",
            self.records,
            self.skipped.len(),
            self.truncated,
            self.seq_len,
            self.without_targets,
            self.examples,
            self.tokens,
            self.labels
        )
    }
}

impl DataReport {
    /// Examples dropped or skipped: bad records (`skip_bad`) and examples without a target. With the examples kept,
    /// they add up to [`DataReport::total`].
    pub fn dropped(&self) -> usize {
        self.skipped.len() + self.without_targets
    }

    /// Where every record of the file went, once `train` + `eval` = [`DataReport::examples`] are split:
    /// `200000 records → 189936 train, 64 eval, 0 skipped (…)`; train + eval + skipped = records. Skipped as bad:
    /// malformed, or failing to render or tokenize (`skip_bad`).
    pub fn partition(&self, train: usize, eval: usize) -> String {
        format!(
            "{} records → {train} train, {eval} eval, {} skipped ({} skipped as bad, {} without target tokens \
             within {} tokens); {} truncated to {} tokens; {} tokens, {} labelled",
            self.total,
            self.dropped(),
            self.skipped.len(),
            self.without_targets,
            self.seq_len,
            self.truncated,
            self.seq_len,
            self.tokens,
            self.labels
        )
    }
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.counts())
    }
}

/// Tokenized examples in file order, and the report of how they were made.
#[derive(Debug)]
pub struct Dataset {
    pub examples: Vec<TokenizedExample>,
    pub report: DataReport,
}

impl Dataset {
    /// Reads `path` and builds the dataset.
    pub fn load(
        path: &Path,
        format: &PromptFormat,
        tokenizer: &TextTokenizer,
        opts: &DatasetOptions,
    ) -> Result<Dataset, DataError> {
        Dataset::build(read_records(path, &opts.read)?, format, tokenizer, opts)
    }

    /// Renders and tokenizes `records`.
    pub fn build(
        records: Records,
        format: &PromptFormat,
        tokenizer: &TextTokenizer,
        opts: &DatasetOptions,
    ) -> Result<Dataset, DataError> {
        if opts.seq_len < 2 {
            return Err(DataError::Invalid(format!("seq_len must be at least 2, not {}", opts.seq_len)));
        }
        let Records { path, records, mut skipped, .. } = records;
        let mut report = DataReport {
            path: path.clone(),
            total: records.len() + skipped.len(),
            records: records.len(),
            skipped: Vec::new(),
            truncated: 0,
            without_targets: 0,
            examples: 0,
            tokens: 0,
            labels: 0,
            seq_len: opts.seq_len,
        };
        let mut examples = Vec::with_capacity(records.len());
        for r in &records {
            let example = match tokenize_record(r.line, &r.record, format, tokenizer, opts.loss_on, opts.seq_len) {
                Ok(e) => Ok(e),
                // The template, not the record, is at fault: never skipped.
                Err(e @ DataError::TemplateLimit(_)) => {
                    return Err(DataError::File { path, line: Some(r.line), message: e.to_string() })
                }
                Err(e) => Err(DataError::record(&path, r.line, e.to_string())),
            };
            let (mut example, cut) = match example {
                Ok(e) => e,
                Err(e) if opts.read.skip_bad => {
                    skipped.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if example.len() > opts.seq_len || cut {
                example.ids.truncate(opts.seq_len);
                example.targets.truncate(opts.seq_len);
                report.truncated += 1;
            }
            let labels = example.label_count();
            if labels == 0 {
                report.without_targets += 1;
                continue;
            }
            report.tokens += example.len();
            report.labels += labels;
            examples.push(example);
        }
        // Keep the skipped records in file order (reading ones and rendering ones interleave).
        skipped.sort_by_key(|e| match e {
            DataError::Record { line, .. } => *line,
            _ => 0,
        });
        report.skipped = skipped;
        report.examples = examples.len();
        if examples.is_empty() {
            return Err(DataError::File {
                path,
                line: None,
                message: format!("no examples to train on ({})", report.counts()),
            });
        }
        Ok(Dataset { examples, report })
    }

    /// Refuses token ids the model cannot take: every id of every example, and the tokenizer's pad and EOS ids, must
    /// be below `vocab` (the plan's embedding rows and LM-head outputs, [`crate::train::source::plan_vocab`]). The
    /// first offending record is named (file:line) with the token; such a token means the tokenizer is not the
    /// model's (an added token past the model's vocabulary, or another model's tokenizer).
    pub fn check_vocab(&self, tokenizer: &TextTokenizer, vocab: usize) -> Result<(), DataError> {
        let hint = "the tokenizer does not match the model: use the tokenizer of the model you train (--model or \
                    --tokenizer), or a plan compiled for this tokenizer's vocabulary";
        let token = |id: u32| match tokenizer.inner().id_to_token(id) {
            Some(t) => format!(" \"{}\"", ir::untrusted::show(&t)),
            None => String::new(),
        };
        for (what, id) in [("pad", tokenizer.pad_id()), ("EOS", tokenizer.eos_id())] {
            if id as usize >= vocab {
                return Err(DataError::Tokenizer {
                    path: tokenizer.path().to_path_buf(),
                    message: format!(
                        "the {what} token{} has id {id}, outside the model's vocabulary of {vocab} (ids 0..{vocab}): \
                         {hint}",
                        token(id)
                    ),
                });
            }
        }
        for e in &self.examples {
            if let Some(&id) = e.ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(DataError::File {
                    path: self.report.path.clone(),
                    line: Some(e.line),
                    message: format!(
                        "token id {id}{} (tokenizer {}) is outside the model's vocabulary of {vocab} (ids \
                         0..{vocab}): {hint}",
                        token(id),
                        tokenizer.path().display()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Bytes of text a record may spend per token of `seq_len`: a record's text is cut to
/// [`max_text_bytes`]`(seq_len)` bytes before it is rendered and tokenized, so a huge record costs bounded time and
/// memory. Real text averages 3 to 6 bytes per token, so the first `seq_len` tokens — all training takes — are
/// the same as the whole text's unless the text averages over 64 bytes per token.
pub const MAX_BYTES_PER_TOKEN: usize = 64;

/// The bytes of a record's text (and of its rendering) read for `seq_len` tokens: `seq_len ×`
/// [`MAX_BYTES_PER_TOKEN`].
pub fn max_text_bytes(seq_len: usize) -> usize {
    seq_len.saturating_mul(MAX_BYTES_PER_TOKEN)
}

/// One record's tokens and targets, before truncation to `seq_len` tokens. A record with more text than
/// [`max_text_bytes`] (or more messages than `seq_len`) is cut first; the second value says whether it was.
pub fn tokenize_record(
    line: usize,
    record: &super::record::Record,
    format: &PromptFormat,
    tokenizer: &TextTokenizer,
    loss_on: LossOn,
    seq_len: usize,
) -> Result<(TokenizedExample, bool), DataError> {
    let max = max_text_bytes(seq_len);
    let cut_record = record.cut(max, seq_len);
    let record = cut_record.as_ref().unwrap_or(record);
    let mut cut = cut_record.is_some();
    let mut text_of = |text: &str| -> usize {
        let kept = super::record::cut_str(text, max).len();
        cut |= kept < text.len();
        kept
    };
    if loss_on == LossOn::AllTokens {
        let text = render_text(record, format, tokenizer.special())?;
        let ids = tokenizer.encode(&text[..text_of(&text)])?.ids;
        return Ok((TokenizedExample { line, targets: vec![true; ids.len()], ids }, cut));
    }
    let rendered = render(record, format, tokenizer.special())?;
    let encoded = tokenizer.encode(&rendered.text[..text_of(&rendered.text)])?;
    // A token is a target when its bytes overlap a response (a token straddling the boundary is one).
    let targets = encoded
        .offsets
        .iter()
        .map(|&(start, end)| {
            rendered
                .responses
                .iter()
                .any(|r| if start < end { start < r.end && end > r.start } else { r.contains(&start) })
        })
        .collect();
    Ok((TokenizedExample { line, ids: encoded.ids, targets }, cut))
}
