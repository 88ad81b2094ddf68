//! The learning-rate schedule: linear warm-up, then cosine decay to 0 — Hugging Face's
//! `get_cosine_schedule_with_warmup` (`num_cycles = 0.5`), evaluated at the 0-based index of the optimizer step.

/// Warm-up + cosine schedule over `total` optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (1-based, as the plan's `opt_step` input).
    pub fn lr_at(&self, step: u64) -> f64 {
        let s = step.saturating_sub(1) as f64;
        if (s as u64) < self.warmup {
            return self.lr * s / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((s - self.warmup as f64) / span).min(1.0);
        self.lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_like_transformers() {
        let s = Schedule { lr: 1e-3, warmup: 10, total: 110 };
        assert_eq!(s.lr_at(1), 0.0, "HF's first step has lr 0 during warm-up");
        assert!((s.lr_at(6) - 5e-4).abs() < 1e-15);
        assert!((s.lr_at(11) - 1e-3).abs() < 1e-15);
        assert!((s.lr_at(61) - 5e-4).abs() < 1e-12, "half way: half the peak");
        assert!(s.lr_at(110) < 1e-6 && s.lr_at(110) > 0.0);
        assert_eq!(s.lr_at(500), 0.0);
        let flat = Schedule { lr: 2e-4, warmup: 0, total: 1 };
        assert_eq!(flat.lr_at(1), 2e-4);
    }
}
