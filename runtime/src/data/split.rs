//! The held-out eval split: a seeded choice of examples, disjoint from the training ones, both kept in file order.
//! A fraction rounds up (as HF `datasets`' `train_test_split` does): 0.1 of 999 examples is 100.

use super::dataset::{Dataset, TokenizedExample};
use super::error::DataError;
use super::rng::{derive_seed, permutation};

/// How many examples to hold out for evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EvalSplit {
    /// A fraction in (0, 1) of the examples, rounded up.
    Fraction(f64),
    /// A number of examples.
    Count(usize),
}

/// The seed stream of the eval split (shuffles use others).
const EVAL_STREAM: u64 = 0x6576_616c; // "eval"

impl EvalSplit {
    /// How many of `n` examples this holds out; at least one remains for training.
    pub fn count(&self, n: usize) -> Result<usize, DataError> {
        let k = match *self {
            EvalSplit::Fraction(f) => {
                if !(f > 0.0 && f < 1.0) {
                    return Err(DataError::Invalid(format!("the eval fraction must be in (0, 1), not {f}")));
                }
                (f * n as f64).ceil() as usize
            }
            EvalSplit::Count(k) => k,
        };
        if k >= n {
            return Err(DataError::Invalid(format!(
                "an eval split of {k} leaves no training examples (there are {n})"
            )));
        }
        Ok(k)
    }
}

/// Splits `items` into (train, eval): which items are eval is drawn with `seed`; both keep their input order.
pub fn split_eval<T>(items: Vec<T>, split: EvalSplit, seed: u64) -> Result<(Vec<T>, Vec<T>), DataError> {
    split_eval_at_most(items, split, usize::MAX, seed)
}

/// [`split_eval`] holding out at most `max_eval` items: of the items `split` draws, the first `max_eval` in input
/// order are eval and the others stay in training (none is dropped: `train.len() + eval.len() == items.len()`).
/// The eval items are those [`split_eval`]'s eval list starts with.
pub fn split_eval_at_most<T>(
    items: Vec<T>,
    split: EvalSplit,
    max_eval: usize,
    seed: u64,
) -> Result<(Vec<T>, Vec<T>), DataError> {
    let k = split.count(items.len())?;
    let mut is_eval = vec![false; items.len()];
    for &i in &permutation(items.len(), derive_seed(seed, EVAL_STREAM, 0))[..k] {
        is_eval[i as usize] = true;
    }
    let k = k.min(max_eval);
    let (mut train, mut eval) = (Vec::with_capacity(items.len() - k), Vec::with_capacity(k));
    for (item, e) in items.into_iter().zip(is_eval) {
        if e && eval.len() < k {
            eval.push(item);
        } else {
            train.push(item);
        }
    }
    Ok((train, eval))
}

impl Dataset {
    /// Moves the eval examples out of `self.examples` (which keeps the training ones) and returns them.
    pub fn split_eval(&mut self, split: EvalSplit, seed: u64) -> Result<Vec<TokenizedExample>, DataError> {
        split.count(self.examples.len())?;
        let (train, eval) = split_eval(std::mem::take(&mut self.examples), split, seed)?;
        self.examples = train;
        Ok(eval)
    }

    /// [`Dataset::split_eval`] holding out at most `max_eval` examples ([`split_eval_at_most`]): the examples the
    /// split draws past `max_eval` stay in training.
    pub fn split_eval_at_most(
        &mut self,
        split: EvalSplit,
        max_eval: usize,
        seed: u64,
    ) -> Result<Vec<TokenizedExample>, DataError> {
        split.count(self.examples.len())?;
        let (train, eval) = split_eval_at_most(std::mem::take(&mut self.examples), split, max_eval, seed)?;
        self.examples = train;
        Ok(eval)
    }
}
