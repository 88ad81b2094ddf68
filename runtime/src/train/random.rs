//! Seeded random weights and inputs for timing and checking plans without a model or data (`tunec bench`,
//! `cuda_step`): frozen weights uniform in ±0.02 (norm weights 1), token ids below the vocabulary, positions `0..T`
//! per row, one segment per row, labels = the token ids, every step applying its update.

use ir::plan::Plan;
use ir::DType;

use super::{PlanBackend, ACCUM_APPLY};

/// One per-step input's values.
#[derive(Clone, Debug, PartialEq)]
pub enum InputData {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

/// The seeded values of a run.
#[derive(Clone, Copy, Debug)]
pub struct RandomData {
    pub seed: u64,
    pub lr: f32,
}

impl RandomData {
    /// Element `i` is a function of (seed, name, i) alone; large tensors are filled on every core (a 7B model's
    /// weights are 6.7 G values).
    fn uniform(&self, name: &str, n: usize, scale: f32) -> Vec<f32> {
        let s = ir::init::param_seed(self.seed, name);
        let mut out = vec![0f32; n];
        let chunk = n.div_ceil(crate::cpu::default_threads()).max(1 << 16);
        std::thread::scope(|scope| {
            for (c, part) in out.chunks_mut(chunk).enumerate() {
                scope.spawn(move || {
                    for (j, x) in part.iter_mut().enumerate() {
                        *x = scale * (2.0 * ir::rng::uniform(s, 11, (c * chunk + j) as u64) - 1.0);
                    }
                });
            }
        });
        out
    }

    /// A frozen (loaded) parameter's values.
    pub fn frozen(&self, name: &str, n: usize) -> Vec<f32> {
        if name.contains("norm") {
            vec![1.0; n]
        } else {
            self.uniform(name, n, 0.02)
        }
    }

    /// A per-step input by name (`opt_step` and the dropout `step` are the 1-based step).
    pub fn input(&self, name: &str, shape: &[usize], dtype: DType, step: u64, vocab: usize) -> InputData {
        let n: usize = shape.iter().product();
        let t = shape.last().copied().unwrap_or(1).max(1);
        let tokens = || -> Vec<i32> {
            let s = ir::init::param_seed(self.seed, "tokens");
            (0..n)
                .map(|i| ((ir::rng::uniform(s, step, i as u64) as f64 * vocab as f64) as i32).min(vocab as i32 - 1))
                .collect()
        };
        match (name, dtype) {
            ("lr", _) => InputData::F32(vec![self.lr]),
            // Every step applies its update (a plan with gradient accumulation runs k = 1 micro-steps here).
            (ACCUM_APPLY, _) => InputData::F32(vec![1.0]),
            ("opt_step", _) | ("step", _) => InputData::I32(vec![step as i32]),
            ("position_ids", _) => InputData::I32((0..n).map(|k| (k % t) as i32).collect()),
            ("segment_ids", _) => InputData::I32(vec![0; n]),
            ("input_ids", _) | ("labels", _) => InputData::I32(tokens()),
            (_, DType::I32) => InputData::I32(vec![0; n]),
            _ => InputData::F32(self.uniform(name, n, 1.0)),
        }
    }
}

impl RandomData {
    /// Sets every loaded (frozen) parameter of `plan` on `be` from the seeded values.
    pub fn load_frozen(&self, plan: &Plan, be: &mut dyn PlanBackend) -> Result<(), String> {
        for p in plan.params.iter().filter(|p| matches!(p.init, ir::Init::Load)) {
            be.put_param_f32(&p.name, &self.frozen(&p.name, p.shape.iter().product()))?;
        }
        Ok(())
    }

    /// Sets every input of `plan` on `be` to its seeded values for `step`.
    pub fn set_inputs(&self, plan: &Plan, be: &mut dyn PlanBackend, step: u64) -> Result<(), String> {
        let vocab = vocab_of(plan);
        for i in &plan.inputs {
            match self.input(&i.name, &i.shape, i.dtype, step, vocab) {
                InputData::F32(d) => be.put_input_f32(&i.name, &d),
                InputData::I32(d) => be.put_input_i32(&i.name, &d),
            }?;
        }
        Ok(())
    }
}

/// The plan's vocabulary size (its model config's `vocab`; 32000 when absent).
pub fn vocab_of(plan: &Plan) -> usize {
    plan.model_config.iter().find(|(k, _)| k == "vocab").and_then(|(_, v)| v.parse().ok()).unwrap_or(32000)
}
