//! The data module's loader as the training loop's [`DataSource`].

use super::{Batch, DataSource};
use crate::data::{Batch as DataBatch, BatchOptions, LoaderState, TokenizedExample, TrainLoader};
use ir::plan::Plan;
use ir::Op;

/// The number of token ids the plan's training step takes: the rows of every embedding table it indexes with token
/// ids and the classes of every cross-entropy it takes over labels (the LM head's outputs, tied or not), whichever is
/// fewest. The batches ([`BatchOptions::vocab`]) and the dataset ([`crate::data::Dataset::check_vocab`]) refuse ids
/// at or past it, so no backend is ever fed an id outside its tables (the generated host and GPU code index them
/// unchecked). A plan without an embedding or a cross-entropy takes the `vocab` of its model config.
pub fn plan_vocab(plan: &Plan) -> Result<usize, String> {
    graph_vocab(&plan.graph, &plan.model_config).ok_or_else(|| {
        format!(
            "the plan {} has no embedding, no cross-entropy and no `vocab` in its model config: the token ids of the \
             data cannot be checked against the model's vocabulary",
            ir::untrusted::show(&plan.recipe)
        )
    })
}

/// [`plan_vocab`] of a graph and a model config.
pub fn graph_vocab(g: &ir::Graph, model_config: &[(String, String)]) -> Option<usize> {
    let dim = |v: ir::ValueId, axis: usize| g.nodes.get(v.index()).and_then(|n| n.ty.shape.get(axis).copied());
    let last = |v: ir::ValueId| g.nodes.get(v.index()).and_then(|n| n.ty.shape.last().copied());
    let mut sizes = Vec::new();
    for node in &g.nodes {
        let size = match (&node.op, node.inputs.as_slice()) {
            (Op::Embedding {}, [table, ..]) => dim(*table, 0),
            (Op::EmbeddingBwd { vocab }, _) => Some(*vocab),
            (Op::CrossEntropy { .. }, [logits, ..]) => last(*logits),
            (Op::CrossEntropyBwd { .. }, [_, logits, ..]) => last(*logits),
            (Op::LinearCrossEntropy { .. }, [_, w, ..]) => dim(*w, 0),
            (Op::LinearCrossEntropyBwd { .. }, [_, _, w, ..]) => dim(*w, 0),
            _ => None,
        };
        sizes.extend(size);
    }
    if let Some(v) = sizes.into_iter().min() {
        return Some(v);
    }
    model_config.iter().find(|(k, _)| k == "vocab").and_then(|(_, v)| v.parse::<usize>().ok())
}

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

#[cfg(test)]
mod tests {
    use super::graph_vocab;
    use ir::{Builder, Init, OutputKind, Role, Type};

    /// An embedding of `embed` rows and an LM head of `head` outputs (untied), with a cross-entropy loss.
    fn lm(embed: usize, head: usize) -> ir::Graph {
        let mut b = Builder::new("lm");
        let ids = b.input("input_ids", Type::i32(vec![6])).unwrap();
        let labels = b.input("labels", Type::i32(vec![6])).unwrap();
        let table = b.param("model.embed_tokens.weight", Type::f32(vec![embed, 4]), Role::Frozen, Init::Load).unwrap();
        let w = b.param("lm_head.weight", Type::f32(vec![head, 4]), Role::Frozen, Init::Load).unwrap();
        let h = b.embedding(table, ids).unwrap();
        let logits = b.matmul(h, w, false, true).unwrap();
        let loss = b.cross_entropy(logits, labels, -100).unwrap();
        b.output(OutputKind::Loss, loss);
        b.finish()
    }

    #[test]
    fn the_vocabulary_is_the_smaller_of_the_embedding_rows_and_the_lm_head_outputs() {
        assert_eq!(graph_vocab(&lm(50, 50), &[]), Some(50));
        assert_eq!(graph_vocab(&lm(50, 40), &[]), Some(40));
        assert_eq!(graph_vocab(&lm(30, 40), &[("vocab".into(), "1000".into())]), Some(30));
        // Without an embedding or a loss over labels: the model config's vocab, else nothing to check against.
        assert_eq!(graph_vocab(&ir::Graph::new("empty"), &[("vocab".into(), "128".into())]), Some(128));
        assert_eq!(graph_vocab(&ir::Graph::new("empty"), &[]), None);
    }
}
