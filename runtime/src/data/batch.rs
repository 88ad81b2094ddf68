//! Batches of the plan's fixed shape: `input_ids`, `position_ids`, `segment_ids` as i32 `[micro_batch, seq_len]` and
//! `labels` as i32 `[micro_batch · seq_len]`, the step's inputs of those names.
//!
//! Packing puts examples one after another in a row while they fit (next fit, in order, never splitting one): each
//! example of a row gets its own segment id (0, 1, ... in the row; attention never crosses segments) and position
//! ids restarting at 0; its last position's label is -100, so no label points into the next example. The rest of a row
//! is padding: the pad token, a segment id of its own (one past the row's last example), positions from 0, labels
//! -100. Without packing each row holds one example and padding. A batch never mixes two epochs: the last batch of
//! an epoch is padded, with rows of padding only if need be.
//!
//! The [`TrainLoader`] runs epochs forever, each in its own seeded order. Its [`LoaderPosition`] (epoch, examples of
//! the epoch's order consumed) is all the state there is: a loader moved to a saved position yields the same batches
//! as the one that saved it, since every batch starts at an example boundary.

use serde::{Deserialize, Serialize};

use super::dataset::TokenizedExample;
use super::error::DataError;
use super::rng::{derive_seed, permutation};

/// The label of a position the loss ignores (the step's `cross_entropy` takes `ignore_index = -100`).
pub const IGNORE_INDEX: i32 = -100;

/// The seed stream of the per-epoch shuffles.
const SHUFFLE_STREAM: u64 = 0x7368_7566; // "shuf"

/// The shape and order of batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchOptions {
    /// Rows per batch, B.
    pub micro_batch: usize,
    /// Tokens per row, T.
    pub seq_len: usize,
    /// Several examples per row (else one, padded).
    pub packing: bool,
    /// A new seeded order each epoch (else file order). Eval batches are never shuffled.
    pub shuffle: bool,
    pub seed: u64,
    /// Fills padded positions ([`super::TextTokenizer::pad_id`]).
    pub pad_id: u32,
    /// The model's vocabulary: every token id (so every label) and `pad_id` must be below it, or the loader refuses
    /// the examples. The plan's embedding rows and LM-head outputs, whichever is fewer
    /// ([`crate::train::source::plan_vocab`]); the generated code indexes its tables with the ids unchecked.
    pub vocab: usize,
}

/// Where a [`TrainLoader`] stands: the next batch starts at example `index` of epoch `epoch`'s order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub index: usize,
}

/// A loader's position and a fingerprint of its examples and options, which a restore checks: resuming on other data,
/// or other batch options, is refused rather than silently different.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoaderState {
    pub position: LoaderPosition,
    pub fingerprint: u64,
}

/// One batch, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub micro_batch: usize,
    pub seq_len: usize,
    /// i32 [B, T]
    pub input_ids: Vec<i32>,
    /// i32 [B, T]; 0 at the start of each example
    pub position_ids: Vec<i32>,
    /// i32 [B, T]; distinct per example within a row, padding has its own
    pub segment_ids: Vec<i32>,
    /// i32 [B·T]; `labels[b·T + t]` is the target of logits row `b·T + t`: `input_ids[b, t + 1]` or -100
    pub labels: Vec<i32>,
    /// Examples in the batch.
    pub examples: usize,
    /// Positions holding example tokens (not padding).
    pub tokens: usize,
    /// Positions with a label (not -100).
    pub label_count: usize,
    /// The loader's position when the batch was taken (eval: epoch 0 and the index of its first example).
    pub start: LoaderPosition,
}

impl Batch {
    /// The step's inputs by name: `input_ids`, `position_ids`, `segment_ids`, `labels`.
    pub fn inputs(&self) -> [(&'static str, &[i32]); 4] {
        [
            ("input_ids", &self.input_ids),
            ("position_ids", &self.position_ids),
            ("segment_ids", &self.segment_ids),
            ("labels", &self.labels),
        ]
    }
}

fn check(examples: &[TokenizedExample], opts: &BatchOptions) -> Result<(), DataError> {
    if opts.micro_batch == 0 || opts.seq_len == 0 {
        return Err(DataError::Invalid(format!(
            "batches need micro_batch and seq_len above 0, not {} × {}",
            opts.micro_batch, opts.seq_len
        )));
    }
    if examples.is_empty() {
        return Err(DataError::Invalid("no examples to batch".into()));
    }
    if opts.seq_len > i32::MAX as usize || opts.pad_id > i32::MAX as u32 {
        return Err(DataError::Invalid("seq_len and the pad id must fit an i32".into()));
    }
    if opts.pad_id as usize >= opts.vocab {
        return Err(DataError::Invalid(format!(
            "the pad token id {} is outside the model's vocabulary of {} (ids 0..{}): the tokenizer does not match \
             the model; use the model's own tokenizer",
            opts.pad_id, opts.vocab, opts.vocab
        )));
    }
    for e in examples {
        if e.is_empty() || e.len() > opts.seq_len || e.targets.len() != e.len() {
            return Err(DataError::Invalid(format!(
                "the example of line {} has {} tokens; batches of seq_len {} take 1 to {} (build the dataset with \
                 the same seq_len)",
                e.line,
                e.len(),
                opts.seq_len,
                opts.seq_len
            )));
        }
        if let Some(id) = e.ids.iter().find(|id| **id > i32::MAX as u32) {
            return Err(DataError::Invalid(format!("token id {id} does not fit an i32")));
        }
        if let Some(id) = e.ids.iter().find(|id| **id as usize >= opts.vocab) {
            return Err(DataError::Invalid(format!(
                "the example of line {} holds token id {id}, outside the model's vocabulary of {} (ids 0..{}): the \
                 tokenizer does not match the model; use the model's own tokenizer",
                e.line, opts.vocab, opts.vocab
            )));
        }
    }
    Ok(())
}

/// Fills one batch from the examples `order[start..]` (`order` None: file order); returns it and the index after the
/// last example taken.
fn fill(
    examples: &[TokenizedExample],
    order: Option<&[u32]>,
    start: usize,
    opts: &BatchOptions,
    position: LoaderPosition,
) -> (Batch, usize) {
    let (b, t) = (opts.micro_batch, opts.seq_len);
    let n = order.map_or(examples.len(), <[u32]>::len);
    let example = |k: usize| &examples[order.map_or(k, |o| o[k] as usize)];
    let mut batch = Batch {
        micro_batch: b,
        seq_len: t,
        input_ids: vec![opts.pad_id as i32; b * t],
        position_ids: vec![0; b * t],
        segment_ids: vec![0; b * t],
        labels: vec![IGNORE_INDEX; b * t],
        examples: 0,
        tokens: 0,
        label_count: 0,
        start: position,
    };
    let mut k = start;
    for row in 0..b {
        let base = row * t;
        let (mut used, mut segment) = (0usize, 0i32);
        while k < n {
            let e = example(k);
            if e.len() > t - used {
                break;
            }
            let at = base + used;
            for (i, (id, label)) in e.ids.iter().zip(e.labels(IGNORE_INDEX)).enumerate() {
                batch.input_ids[at + i] = *id as i32;
                batch.position_ids[at + i] = i as i32;
                batch.segment_ids[at + i] = segment;
                batch.labels[at + i] = label;
                batch.label_count += (label != IGNORE_INDEX) as usize;
            }
            used += e.len();
            segment += 1;
            k += 1;
            batch.examples += 1;
            if !opts.packing {
                break;
            }
        }
        batch.tokens += used;
        for (p, i) in (used..t).enumerate() {
            batch.segment_ids[base + i] = segment;
            batch.position_ids[base + i] = p as i32;
        }
    }
    (batch, k)
}

/// Training batches over epochs without end, each epoch in its own order.
pub struct TrainLoader {
    examples: Vec<TokenizedExample>,
    opts: BatchOptions,
    position: LoaderPosition,
    /// The order of `position.epoch`.
    order: Vec<u32>,
    fingerprint: u64,
}

impl TrainLoader {
    /// A loader at the start of epoch 0. Every example must have 1 to `seq_len` tokens.
    pub fn new(examples: Vec<TokenizedExample>, opts: BatchOptions) -> Result<TrainLoader, DataError> {
        check(&examples, &opts)?;
        if examples.len() > u32::MAX as usize {
            return Err(DataError::Invalid("more than 2³² examples".into()));
        }
        let fingerprint = fingerprint(&examples, &opts);
        let mut loader =
            TrainLoader { examples, opts, position: LoaderPosition::default(), order: Vec::new(), fingerprint };
        loader.order = loader.order_of(0);
        Ok(loader)
    }

    /// The order of the examples in `epoch`.
    pub fn order_of(&self, epoch: u64) -> Vec<u32> {
        let n = self.examples.len();
        if self.opts.shuffle {
            permutation(n, derive_seed(self.opts.seed, SHUFFLE_STREAM, epoch))
        } else {
            (0..n as u32).collect()
        }
    }

    pub fn position(&self) -> LoaderPosition {
        self.position
    }

    /// The position and the fingerprint, for a checkpoint.
    pub fn state(&self) -> LoaderState {
        LoaderState { position: self.position, fingerprint: self.fingerprint }
    }

    /// Moves to `position` (an index at the end of an epoch means the start of the next).
    pub fn seek(&mut self, position: LoaderPosition) -> Result<(), DataError> {
        let n = self.examples.len();
        if position.index > n {
            return Err(DataError::Invalid(format!(
                "data position {} of epoch {} is past the {n} examples",
                position.index, position.epoch
            )));
        }
        let position =
            if position.index == n { LoaderPosition { epoch: position.epoch + 1, index: 0 } } else { position };
        if position.epoch != self.position.epoch {
            self.order = self.order_of(position.epoch);
        }
        self.position = position;
        Ok(())
    }

    /// Moves to a saved state, refusing one saved over other examples or options.
    pub fn restore(&mut self, state: &LoaderState) -> Result<(), DataError> {
        if state.fingerprint != self.fingerprint {
            return Err(DataError::Invalid(format!(
                "the saved data position belongs to other data or batch options (fingerprint {:016x}, these are \
                 {:016x}): same data file, tokenizer, seq_len, micro_batch, packing, shuffle and seed are needed to \
                 resume",
                state.fingerprint, self.fingerprint
            )));
        }
        self.seek(state.position)
    }

    /// The next batch; moves the position past its examples (to the next epoch after the last).
    pub fn next_batch(&mut self) -> Batch {
        let (batch, next) = fill(&self.examples, Some(&self.order), self.position.index, &self.opts, self.position);
        self.position.index = next;
        if next == self.examples.len() {
            self.position = LoaderPosition { epoch: self.position.epoch + 1, index: 0 };
            self.order = self.order_of(self.position.epoch);
        }
        batch
    }

    /// How many batches epoch `epoch` has (with packing it depends on the epoch's order).
    pub fn batches_in_epoch(&self, epoch: u64) -> usize {
        let order = self.order_of(epoch);
        let (mut k, mut count) = (0, 0);
        while k < order.len() {
            k = fill(&self.examples, Some(&order), k, &self.opts, LoaderPosition::default()).1;
            count += 1;
        }
        count
    }

    pub fn examples(&self) -> &[TokenizedExample] {
        &self.examples
    }

    pub fn options(&self) -> &BatchOptions {
        &self.opts
    }
}

impl Iterator for TrainLoader {
    type Item = Batch;

    /// Never `None`: epochs follow one another.
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

/// The eval batches: every example once, in the given order (never shuffled), packed or not as `opts` says.
pub fn eval_batches<'a>(
    examples: &'a [TokenizedExample],
    opts: &BatchOptions,
) -> Result<impl Iterator<Item = Batch> + 'a, DataError> {
    check(examples, opts)?;
    let opts = *opts;
    let mut k = 0;
    Ok(std::iter::from_fn(move || {
        if k >= examples.len() {
            return None;
        }
        let (batch, next) = fill(examples, None, k, &opts, LoaderPosition { epoch: 0, index: k });
        k = next;
        Some(batch)
    }))
}

/// FNV-1a over the examples and the options that shape batches.
fn fingerprint(examples: &[TokenizedExample], opts: &BatchOptions) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for x in [opts.micro_batch as u64, opts.seq_len as u64, opts.packing as u64, opts.shuffle as u64, opts.seed] {
        eat(x);
    }
    eat(opts.pad_id as u64);
    eat(examples.len() as u64);
    for e in examples {
        eat(e.len() as u64);
        for (id, t) in e.ids.iter().zip(&e.targets) {
            eat(((*id as u64) << 1) | *t as u64);
        }
    }
    h
}
