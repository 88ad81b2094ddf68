//! Records rendered and tokenized: each example is its token ids and, per token, whether the loss trains on
//! predicting it (response tokens by default, every token on request). Examples longer than `seq_len` are cut to
//! `seq_len` tokens; an example left with no target (a prompt longer than `seq_len`, an empty text) is dropped. Both
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
    /// Records read without error.
    pub records: usize,
    /// Bad records skipped (`skip_bad`): malformed, or failing to render or tokenize; each names file:line.
    pub skipped: Vec<DataError>,
    /// Examples cut to `seq_len` tokens.
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
            let example = tokenize_record(r.line, &r.record, format, tokenizer, opts.loss_on)
                .map_err(|e| DataError::record(&path, r.line, e.to_string()));
            let mut example = match example {
                Ok(e) => e,
                Err(e) if opts.read.skip_bad => {
                    skipped.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if example.len() > opts.seq_len {
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
}

/// One record's tokens and targets, before truncation.
pub fn tokenize_record(
    line: usize,
    record: &super::record::Record,
    format: &PromptFormat,
    tokenizer: &TextTokenizer,
    loss_on: LossOn,
) -> Result<TokenizedExample, DataError> {
    if loss_on == LossOn::AllTokens {
        let ids = tokenizer.encode(&render_text(record, format, tokenizer.special())?)?.ids;
        return Ok(TokenizedExample { line, targets: vec![true; ids.len()], ids });
    }
    let rendered = render(record, format, tokenizer.special())?;
    let encoded = tokenizer.encode(&rendered.text)?;
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
    Ok(TokenizedExample { line, ids: encoded.ids, targets })
}
