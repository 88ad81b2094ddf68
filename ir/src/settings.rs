//! The allowed range of every training, adapter and model setting, in one table each. The recipe's diagnostics
//! (`frontend::recipe`), the command-line overrides of `tunec run` (`runtime::cli`) and a loaded plan's settings
//! ([`TrainSettings::validate`], [`AdapterSettings::validate`], [`validate_model_config`]) all check against these
//! tables, so a setting means the same thing wherever it comes from. Floating-point settings must be finite; integer
//! settings have upper bounds that keep sizes, step counters (the plan's `opt_step` and dropout `step` inputs are
//! i32) and memory sane.

use crate::plan::{AdapterSettings, TrainSettings};
use std::fmt;

/// The largest step count (and micro-step count, `steps × grad_accum`): the plan's step inputs are i32.
pub const MAX_STEPS: u64 = i32::MAX as u64;
/// The longest sequence a recipe may train on.
pub const MAX_SEQ_LEN: u64 = 1 << 20;
/// The most sequences per micro-batch.
pub const MAX_MICRO_BATCH: u64 = 1 << 16;
/// The most micro-batches per optimizer step.
pub const MAX_GRAD_ACCUM: u64 = 1 << 16;
/// The largest LoRA rank.
pub const MAX_RANK: u64 = 1 << 16;
/// The largest vocabulary.
pub const MAX_VOCAB: u64 = 1 << 22;
/// The largest hidden size.
pub const MAX_HIDDEN: u64 = 1 << 16;
/// The largest MLP size.
pub const MAX_FFN: u64 = 1 << 18;
/// The most layers, attention heads and key/value heads.
pub const MAX_LAYERS: u64 = 1 << 10;
pub const MAX_HEADS: u64 = 1 << 10;

/// What values a setting may take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Range {
    /// An integer in `[min, max]`.
    Int { min: u64, max: u64 },
    /// A finite number above `min` (or equal to it, when `min_inclusive`) and below `max` (or equal to it), when
    /// there is a `max`.
    Float { min: f64, min_inclusive: bool, max: Option<(f64, bool)> },
}

/// One row of a table: a setting and its range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rule {
    /// The field as the recipe's DSL names it (`warmup_steps`, `rank`, `norm_eps`).
    pub field: &'static str,
    pub range: Range,
}

const fn int(field: &'static str, min: u64, max: u64) -> Rule {
    Rule { field, range: Range::Int { min, max } }
}

/// A finite number ≥ `min` (`incl`) or > `min`, with no upper bound.
const fn above(field: &'static str, min: f64, incl: bool) -> Rule {
    Rule { field, range: Range::Float { min, min_inclusive: incl, max: None } }
}

/// A finite number in `[0, 1)`.
const fn unit(field: &'static str) -> Rule {
    Rule { field, range: Range::Float { min: 0.0, min_inclusive: true, max: Some((1.0, false)) } }
}

/// `Train { .. }` and a plan's [`TrainSettings`] (the same names).
pub const TRAIN_RULES: &[Rule] = &[
    int("seq_len", 1, MAX_SEQ_LEN),
    int("micro_batch", 1, MAX_MICRO_BATCH),
    above("lr", 0.0, false),
    int("steps", 1, MAX_STEPS),
    int("warmup_steps", 0, MAX_STEPS),
    above("weight_decay", 0.0, true),
    unit("beta1"),
    unit("beta2"),
    above("eps", 0.0, false),
    int("grad_accum", 1, MAX_GRAD_ACCUM),
    // 0 turns clipping off (`passes::adamw`).
    above("max_grad_norm", 0.0, true),
    int("seed", 0, u64::MAX),
    int("eval_every", 0, MAX_STEPS),
    int("save_every", 0, MAX_STEPS),
];

/// `Lora { .. }` / `Dora { .. }` and a plan's [`AdapterSettings`] (whose `r` is `rank`).
pub const ADAPTER_RULES: &[Rule] = &[int("rank", 1, MAX_RANK), above("alpha", 0.0, false), unit("dropout")];

/// The numeric fields of an architecture's config (`LlamaConfig`), by the DSL's names.
pub const MODEL_RULES: &[Rule] = &[
    int("vocab", 1, MAX_VOCAB),
    int("hidden", 1, MAX_HIDDEN),
    int("layers", 1, MAX_LAYERS),
    int("heads", 1, MAX_HEADS),
    int("kv_heads", 1, MAX_HEADS),
    int("ffn", 1, MAX_FFN),
    above("rope_theta", 0.0, false),
    above("norm_eps", 0.0, false),
];

/// The rule of `field` in `table`.
pub fn rule(table: &[Rule], field: &str) -> Option<Rule> {
    table.iter().find(|r| r.field == field).copied()
}

impl fmt::Display for Range {
    /// What the range allows, as a phrase: "an integer in [1, 1048576]", "a finite number > 0",
    /// "a finite number in [0, 1)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Range::Int { min, max: u64::MAX } => write!(f, "an integer ≥ {min}"),
            Range::Int { min, max } => write!(f, "an integer in [{min}, {max}]"),
            Range::Float { min, min_inclusive, max: None } => {
                write!(f, "a finite number {} {min}", if min_inclusive { "≥" } else { ">" })
            }
            Range::Float { min, min_inclusive, max: Some((max, max_inclusive)) } => write!(
                f,
                "a finite number in {}{min}, {max}{}",
                if min_inclusive { "[" } else { "(" },
                if max_inclusive { "]" } else { ")" }
            ),
        }
    }
}

impl Range {
    /// Whether `x` lies in the range (an integer range takes only whole numbers).
    pub fn allows_f64(&self, x: f64) -> bool {
        match *self {
            Range::Int { min, max } => x.fract() == 0.0 && x >= min as f64 && x <= max as f64,
            Range::Float { min, min_inclusive, max } => {
                x.is_finite()
                    && (if min_inclusive { x >= min } else { x > min })
                    && max.is_none_or(|(m, incl)| if incl { x <= m } else { x < m })
            }
        }
    }

    /// Whether the integer `x` lies in the range (a float range takes it as a number).
    pub fn allows_int(&self, x: i128) -> bool {
        match *self {
            Range::Int { min, max } => x >= min as i128 && x <= max as i128,
            Range::Float { .. } => self.allows_f64(x as f64),
        }
    }
}

/// A setting out of its range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("`{field}` must be {expected}, found {found}")]
pub struct SettingError {
    pub field: String,
    /// The range, as [`Range`]'s phrase (or a cross-field rule).
    pub expected: String,
    /// The value found, as written.
    pub found: String,
}

/// Checks a number against `field`'s rule in `table` (fields without a rule pass).
pub fn check_f64(table: &[Rule], field: &str, x: f64) -> Result<(), SettingError> {
    match rule(table, field) {
        Some(r) if !r.range.allows_f64(x) => {
            Err(SettingError { field: field.to_string(), expected: r.range.to_string(), found: format!("{x:?}") })
        }
        _ => Ok(()),
    }
}

/// Checks an integer against `field`'s rule in `table` (fields without a rule pass).
pub fn check_int(table: &[Rule], field: &str, x: i128) -> Result<(), SettingError> {
    match rule(table, field) {
        Some(r) if !r.range.allows_int(x) => {
            Err(SettingError { field: field.to_string(), expected: r.range.to_string(), found: x.to_string() })
        }
        _ => Ok(()),
    }
}

/// The rules between training settings: `steps × grad_accum` micro-steps fit the plan's i32 step counter.
pub fn check_train_cross(steps: u64, grad_accum: u64) -> Result<(), SettingError> {
    match steps.checked_mul(grad_accum) {
        Some(n) if n <= MAX_STEPS => Ok(()),
        _ => Err(SettingError {
            field: "steps".into(),
            expected: format!("at most {MAX_STEPS} / grad_accum ({grad_accum}) (micro-steps are counted in an i32)"),
            found: steps.to_string(),
        }),
    }
}

impl TrainSettings {
    /// Checks every setting against [`TRAIN_RULES`] and the cross-field rules; the first violation is returned.
    pub fn validate(&self) -> Result<(), SettingError> {
        let ints = [
            ("seq_len", self.seq_len),
            ("micro_batch", self.micro_batch),
            ("steps", self.steps),
            ("warmup_steps", self.warmup_steps),
            ("grad_accum", self.grad_accum),
            ("seed", self.seed),
            ("eval_every", self.eval_every),
            ("save_every", self.save_every),
        ];
        let floats = [
            ("lr", self.lr),
            ("weight_decay", self.weight_decay),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("eps", self.eps),
            ("max_grad_norm", self.max_grad_norm),
        ];
        for (f, x) in ints {
            check_int(TRAIN_RULES, f, x as i128)?;
        }
        for (f, x) in floats {
            check_f64(TRAIN_RULES, f, x)?;
        }
        check_train_cross(self.steps, self.grad_accum)
    }
}

impl AdapterSettings {
    /// Checks `r`, `alpha` and `dropout` against [`ADAPTER_RULES`].
    pub fn validate(&self) -> Result<(), SettingError> {
        check_int(ADAPTER_RULES, "rank", self.r as i128).map_err(|e| SettingError { field: "r".into(), ..e })?;
        check_f64(ADAPTER_RULES, "alpha", self.alpha)?;
        check_f64(ADAPTER_RULES, "dropout", self.dropout)
    }
}

/// Checks an architecture's config (`(field, value)` pairs; fields without a rule pass) against [`MODEL_RULES`] and
/// the rules between fields: `heads` divides `hidden`, `kv_heads` divides `heads`.
pub fn validate_model_config(fields: &[(&str, f64)]) -> Result<(), SettingError> {
    for &(f, x) in fields {
        check_f64(MODEL_RULES, f, x)?;
    }
    let get = |n: &str| fields.iter().find(|(f, _)| *f == n).map(|&(_, x)| x as u64);
    if let (Some(hidden), Some(heads)) = (get("hidden"), get("heads")) {
        if !hidden.is_multiple_of(heads) {
            return Err(SettingError {
                field: "heads".into(),
                expected: format!("a divisor of hidden ({hidden})"),
                found: heads.to_string(),
            });
        }
    }
    if let (Some(heads), Some(kv)) = (get("heads"), get("kv_heads")) {
        if !heads.is_multiple_of(kv) {
            return Err(SettingError {
                field: "kv_heads".into(),
                expected: format!("a divisor of heads ({heads})"),
                found: kv.to_string(),
            });
        }
    }
    Ok(())
}

/// [`validate_model_config`] of a plan's `model_config` (`(field, JSON text)` pairs): numeric fields are checked,
/// the others (`arch`, `tie_embeddings`) left alone; a field with a rule that is not a number is refused.
pub fn validate_model_config_text(config: &[(String, String)]) -> Result<(), SettingError> {
    let mut fields = vec![];
    for (k, v) in config {
        let Some(r) = rule(MODEL_RULES, k) else { continue };
        match v.trim().parse::<f64>() {
            Ok(x) => fields.push((k.as_str(), x)),
            Err(_) => {
                return Err(SettingError {
                    field: k.clone(),
                    expected: r.range.to_string(),
                    found: crate::untrusted::show(v),
                })
            }
        }
    }
    validate_model_config(&fields)
}

impl crate::plan::Plan {
    /// Checks the plan's training, adapter and model settings against the tables ([`crate::plan::Plan::from_bytes`]
    /// calls it: a plan file may come from anyone).
    pub fn check_settings(&self) -> Result<(), crate::plan::PlanError> {
        use crate::plan::PlanError::Settings;
        self.train.validate().map_err(|e| Settings(format!("train settings: {e}")))?;
        if let Some(a) = &self.peft {
            a.validate().map_err(|e| Settings(format!("adapter settings: {e}")))?;
        }
        validate_model_config_text(&self.model_config).map_err(|e| Settings(format!("model config: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> TrainSettings {
        TrainSettings { seq_len: 8, micro_batch: 2, steps: 10, ..TrainSettings::default() }
    }

    #[test]
    fn good_settings_pass_and_every_nonsense_value_is_named() {
        good().validate().unwrap();
        type Set = fn(&mut TrainSettings);
        let cases: Vec<(Set, &str, &str)> = vec![
            (|t| t.lr = f64::NAN, "lr", "a finite number > 0, found NaN"),
            (|t| t.lr = f64::INFINITY, "lr", "found inf"),
            (|t| t.lr = -1e-3, "lr", "found -0.001"),
            (|t| t.beta1 = 2.0, "beta1", "a finite number in [0, 1), found 2.0"),
            (|t| t.beta2 = 1.0, "beta2", "in [0, 1)"),
            (|t| t.eps = 0.0, "eps", "> 0"),
            (|t| t.max_grad_norm = f64::NAN, "max_grad_norm", "a finite number ≥ 0, found NaN"),
            (|t| t.weight_decay = -0.1, "weight_decay", "≥ 0"),
            (|t| t.seq_len = 0, "seq_len", "an integer in [1, 1048576], found 0"),
            (|t| t.micro_batch = 1 << 40, "micro_batch", "found 1099511627776"),
            (|t| t.steps = 0, "steps", "found 0"),
            (|t| t.steps = u64::MAX, "steps", "an integer in [1, 2147483647]"),
            (|t| t.grad_accum = 0, "grad_accum", "found 0"),
            (|t| t.warmup_steps = u64::MAX, "warmup_steps", "found 18446744073709551615"),
            (
                |t| {
                    t.steps = 1 << 30;
                    t.grad_accum = 4
                },
                "steps",
                "grad_accum (4)",
            ),
        ];
        for (set, field, msg) in cases {
            let mut t = good();
            set(&mut t);
            let e = t.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(msg), "{e}");
        }
    }

    #[test]
    fn adapter_and_model_settings_follow_their_tables() {
        let a = AdapterSettings {
            method: "lora".into(),
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec![],
            use_rslora: false,
            use_dora: false,
        };
        a.validate().unwrap();
        let e = AdapterSettings { alpha: f64::NAN, ..a.clone() }.validate().unwrap_err();
        assert_eq!(e.to_string(), "`alpha` must be a finite number > 0, found NaN");
        assert_eq!(AdapterSettings { r: 0, ..a.clone() }.validate().unwrap_err().field, "r");
        assert_eq!(AdapterSettings { dropout: 1.0, ..a }.validate().unwrap_err().field, "dropout");

        let cfg = [("vocab", 128.0), ("hidden", 64.0), ("heads", 4.0), ("kv_heads", 2.0), ("norm_eps", 1e-5)];
        validate_model_config(&cfg).unwrap();
        let e = validate_model_config(&[("norm_eps", f64::INFINITY)]).unwrap_err();
        assert_eq!(e.to_string(), "`norm_eps` must be a finite number > 0, found inf");
        assert_eq!(validate_model_config(&[("rope_theta", -1.0)]).unwrap_err().field, "rope_theta");
        assert_eq!(validate_model_config(&[("hidden", 66.0), ("heads", 4.0)]).unwrap_err().field, "heads");
        assert_eq!(validate_model_config(&[("heads", 4.0), ("kv_heads", 3.0)]).unwrap_err().field, "kv_heads");
        assert_eq!(validate_model_config(&[("layers", 2.5)]).unwrap_err().field, "layers");
        let text = vec![("arch".to_string(), "\"llama\"".to_string()), ("rope_theta".into(), "null".into())];
        assert_eq!(validate_model_config_text(&text).unwrap_err().field, "rope_theta");
    }
}
