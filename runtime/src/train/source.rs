//! The data module's loader as the training loop's [`DataSource`].

use super::{Batch, DataSource};
use crate::data::{Batch as DataBatch, BatchOptions, LoaderState, TokenizedExample, TrainLoader};

impl From<DataBatch> for Batch {
    fn from(b: DataBatch) -> Batch {
        Batch { input_ids: b.input_ids, position_ids: b.position_ids, segment_ids: b.segment_ids, labels: b.labels }
    }
}

/// Training batches from a [`TrainLoader`], eval batches fixed at construction.
pub struct LoaderSource {
    loader: TrainLoader,
    eval: Vec<Batch>,
}

impl LoaderSource {
    /// `train` and `eval` examples, batched with `opts` (eval in order, never shuffled).
    pub fn new(
        train: Vec<TokenizedExample>,
        eval: &[TokenizedExample],
        opts: BatchOptions,
    ) -> Result<LoaderSource, String> {
        let eval = if eval.is_empty() {
            vec![]
        } else {
            crate::data::eval_batches(eval, &opts).map_err(|e| e.to_string())?.map(Batch::from).collect()
        };
        Ok(LoaderSource { loader: TrainLoader::new(train, opts).map_err(|e| e.to_string())?, eval })
    }

    pub fn loader(&self) -> &TrainLoader {
        &self.loader
    }
}

impl DataSource for LoaderSource {
    fn next_batch(&mut self) -> Result<Batch, String> {
        Ok(self.loader.next_batch().into())
    }
    fn eval_batches(&self) -> Vec<Batch> {
        self.eval.clone()
    }
    fn position(&self) -> serde_json::Value {
        serde_json::to_value(self.loader.state()).expect("the loader state serializes")
    }
    fn restore(&mut self, position: &serde_json::Value) -> Result<(), String> {
        let state: LoaderState =
            serde_json::from_value(position.clone()).map_err(|e| format!("checkpoint data position: {e}"))?;
        self.loader.restore(&state).map_err(|e| e.to_string())
    }
}
