//! Models and recipes: `Model::new(arch, config, forward)`, `Recipe::new(model).quantize(..).adapter(..).train(..)`,
//! and the compilation of a recipe value into a forward graph: run the model's forward function with the token
//! inputs (batch and sequence length come from `.train(..)`), add the loss, then quantize and insert the adapter.

use crate::builtins::{unknown_method, Args};
use crate::diag::{did_you_mean, DiagKind, Error, Span};
use crate::eval::Interp;
use crate::peft::targets::{linear_modules, select, short_names, LinearModule, TargetError, TargetSpec, Targets};
use crate::peft::{apply_lora, apply_nf4, LoraSpec, Nf4Spec, PeftError};
use crate::value::{Field, StructVal, Value};
use ir::{Builder, Graph, OutputKind, Type};
use std::rc::Rc;

/// Training settings (`Train { .. }`); defaults as Hugging Face / PEFT users expect.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub seq_len: usize,
    pub micro_batch: usize,
    pub lr: f64,
    pub steps: usize,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Steps between evaluations; 0 = never.
    pub eval_every: usize,
    /// Steps between checkpoints; 0 = never.
    pub save_every: usize,
    /// Recompute activations in the backward pass instead of keeping them.
    pub recompute: bool,
}

impl Default for TrainConfig {
    /// The defaults of the plan's settings type (`ir::plan::TrainSettings::default`), the one place they are written.
    fn default() -> TrainConfig {
        let t = ir::plan::TrainSettings::default();
        TrainConfig {
            seq_len: t.seq_len as usize,
            micro_batch: t.micro_batch as usize,
            lr: t.lr,
            steps: t.steps as usize,
            warmup_steps: t.warmup_steps as usize,
            weight_decay: t.weight_decay,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            grad_accum: t.grad_accum as usize,
            max_grad_norm: t.max_grad_norm,
            seed: t.seed,
            eval_every: t.eval_every as usize,
            save_every: t.save_every as usize,
            recompute: false,
        }
    }
}

impl TrainConfig {
    /// Reads a `Train` struct value (its fields are complete and typed: the schema saw to it).
    fn from_struct(s: &StructVal) -> TrainConfig {
        let d = TrainConfig::default();
        let int = |n: &str, d: usize| match s.field(n).map(|f| &f.value) {
            Some(Value::Int(i)) => *i as usize,
            _ => d,
        };
        let float = |n: &str, d: f64| match s.field(n).map(|f| &f.value) {
            Some(Value::Float(x)) => *x,
            Some(Value::Int(i)) => *i as f64,
            _ => d,
        };
        TrainConfig {
            seq_len: int("seq_len", d.seq_len),
            micro_batch: int("micro_batch", d.micro_batch),
            lr: float("lr", d.lr),
            steps: int("steps", d.steps),
            warmup_steps: int("warmup_steps", d.warmup_steps),
            weight_decay: float("weight_decay", d.weight_decay),
            beta1: float("beta1", d.beta1),
            beta2: float("beta2", d.beta2),
            eps: float("eps", d.eps),
            grad_accum: int("grad_accum", d.grad_accum),
            max_grad_norm: float("max_grad_norm", d.max_grad_norm),
            seed: int("seed", d.seed as usize) as u64,
            eval_every: int("eval_every", d.eval_every),
            save_every: int("save_every", d.save_every),
            recompute: matches!(s.field("recompute").map(|f| &f.value), Some(Value::Bool(true))),
        }
    }
}

/// Which PEFT method a recipe applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeftMethod {
    Lora,
    /// LoRA over NF4 base weights.
    QLora,
    Dora,
    /// DoRA over NF4 base weights.
    QDora,
}

impl PeftMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            PeftMethod::Lora => "lora",
            PeftMethod::QLora => "qlora",
            PeftMethod::Dora => "dora",
            PeftMethod::QDora => "qdora",
        }
    }
}

/// What the adapter is, for writing PEFT's adapter_config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftConfig {
    pub method: PeftMethod,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// The targets as the user wrote them.
    pub targets: TargetSpec,
    /// Short names of the adapted modules, sorted (`["k_proj", "q_proj", ..]`): adapter_config's `target_modules`.
    pub target_modules: Vec<String>,
    /// Full names of the adapted modules, in graph order.
    pub modules: Vec<String>,
    pub use_rslora: bool,
    pub use_dora: bool,
}

/// How base weights are quantized.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    pub block: usize,
    pub double_quant: bool,
    pub targets: TargetSpec,
    /// Full names of the quantized modules, in graph order.
    pub modules: Vec<String>,
}

/// The architecture and its config, for writing config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// `"llama"`
    pub arch: String,
    /// The config struct's fields in declaration order, as the DSL names them (`hidden`, `heads`, ...).
    pub config: Vec<(String, serde_json::Value)>,
}

/// A compiled recipe: the forward graph with adapters inserted, and everything needed to train and export.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledRecipe {
    pub name: String,
    pub forward: Graph,
    pub train: TrainConfig,
    pub peft: Option<PeftConfig>,
    pub quant: Option<QuantConfig>,
    pub model: ModelInfo,
}

/// A model value: an architecture's config and the forward function that builds its graph.
#[derive(Debug, PartialEq)]
pub struct ModelVal {
    pub arch: String,
    pub config: Value,
    pub forward: Rc<str>,
    /// Where the user's recipe made the model (errors of the forward pass are reported there).
    pub call_site: Span,
}

/// A recipe value, built up by its methods.
#[derive(Clone, Debug, PartialEq)]
pub struct RecipeVal {
    pub model: Rc<ModelVal>,
    pub quant: Option<QuantSpec>,
    pub adapter: Option<AdapterSpec>,
    pub train: Option<TrainConfig>,
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QuantSpec {
    pub nf4: Nf4Spec,
    pub targets: Targets,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    pub lora: LoraSpec,
    pub targets: Targets,
    pub span: Span,
}

/// `Model::new("llama", cfg, llama_forward)`: `llama_forward(cfg, tokens: Tokens) -> Tensor` returns the logits.
pub fn new_model(it: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(3)?;
    let arch = a.str(0)?;
    let Value::Struct(_) = &a.vals[1] else { return Err(a.wrong(1, "a config struct")) };
    let Value::Fn(forward) = &a.vals[2] else { return Err(a.wrong(2, "a function `fn(config, Tokens) -> Tensor`")) };
    check_model_config(&a.vals[1], a.span(1))?;
    let takes = it.prog.fns.get(&**forward).map_or(0, |d| d.params.len());
    if takes != 2 {
        return Err(a.wrong(2, "a function `fn(config, Tokens) -> Tensor` (two parameters)"));
    }
    Ok(Value::Model(Rc::new(ModelVal {
        arch: arch.text.to_string(),
        config: a.vals[1].clone(),
        forward: forward.clone(),
        call_site: it.user_call_site().unwrap_or(a.call),
    })))
}

/// The numeric fields of an architecture's config against `ir::settings::MODEL_RULES` (and the rules between them:
/// heads divide hidden, kv_heads divide heads); a diagnostic at the offending field.
fn check_model_config(config: &Value, at: Span) -> Result<(), Error> {
    let Value::Struct(s) = config else { return Ok(()) };
    let what = s.name.clone();
    check_fields(s, ir::settings::MODEL_RULES, at, &what)?;
    let nums: Vec<(&str, f64)> = s
        .fields
        .iter()
        .filter_map(|f| match f.value {
            Value::Int(i) => Some((f.name.as_str(), i as f64)),
            Value::Float(x) => Some((f.name.as_str(), x)),
            _ => None,
        })
        .collect();
    ir::settings::validate_model_config(&nums).map_err(|e| {
        let span = field_span(s, &e.field, at);
        setting_error(e, span, &what)
    })
}

/// `Recipe::new(model)`.
pub fn new_recipe(_: &mut Interp, a: &Args) -> Result<Value, Error> {
    a.expect(1)?;
    let Value::Model(m) = &a.vals[0] else { return Err(a.wrong(0, "a model (e.g. `llama(LlamaConfig { .. })`)")) };
    Ok(Value::Recipe(Rc::new(RecipeVal { model: m.clone(), quant: None, adapter: None, train: None, name: None })))
}

const RECIPE_METHODS: &[&str] = &["quantize", "adapter", "train", "name", "clone"];

/// Methods of `Recipe`; each returns a new recipe.
pub fn method(_: &mut Interp, r: &Rc<RecipeVal>, a: &Args) -> Result<Value, Error> {
    let mut r = (**r).clone();
    match a.name.as_str() {
        "quantize" => {
            a.expect(2)?;
            let s = struct_arg(a, 0, &["Nf4"])?;
            let targets = to_targets(&a.vals[1], a.span(1)).map_err(|m| a.wrong(1, &m))?;
            let block = int_field(&s, "block", a.span(0))?;
            if block == 0 || !block.is_multiple_of(2) {
                let at = field_span(&s, "block", a.span(0));
                return Err(Error::new(
                    DiagKind::InvalidValue,
                    at,
                    format!("the NF4 block size must be even and positive, got {block}"),
                )
                .label("invalid block size"));
            }
            if r.quant.is_some() {
                return Err(Error::new(DiagKind::Duplicate, a.call, "the recipe is already quantized")
                    .label("second `quantize`"));
            }
            let nf4 = Nf4Spec { block, double_quant: bool_field(&s, "double_quant") };
            r.quant = Some(QuantSpec { nf4, targets, span: a.call });
        }
        "adapter" => {
            a.expect(1)?;
            let s = struct_arg(a, 0, &["Lora", "Dora"])?;
            let lora = lora_spec(&s, a.span(0))?;
            let Some(Field { value, origin, .. }) = s.field("targets") else { return Err(a.wrong(0, "targets")) };
            let at = origin.unwrap_or(a.span(0));
            let targets = to_targets(value, at).map_err(|m| Error::new(DiagKind::WrongType, at, m))?;
            if r.adapter.is_some() {
                return Err(Error::new(DiagKind::Duplicate, a.call, "the recipe already has an adapter")
                    .label("second `adapter`"));
            }
            r.adapter = Some(AdapterSpec { lora, targets, span: a.call });
        }
        "train" => {
            a.expect(1)?;
            let s = struct_arg(a, 0, &["Train"])?;
            for f in ["seq_len", "micro_batch", "grad_accum"] {
                if int_field(&s, f, a.span(0))? == 0 {
                    return Err(Error::new(
                        DiagKind::InvalidValue,
                        field_span(&s, f, a.span(0)),
                        format!("`{f}` must be positive"),
                    )
                    .label("must be > 0"));
                }
            }
            check_fields(&s, ir::settings::TRAIN_RULES, a.span(0), "Train")?;
            let (steps, accum) = (int_field(&s, "steps", a.span(0))?, int_field(&s, "grad_accum", a.span(0))?);
            ir::settings::check_train_cross(steps as u64, accum as u64)
                .map_err(|e| setting_error(e, field_span(&s, "steps", a.span(0)), "Train"))?;
            r.train = Some(TrainConfig::from_struct(&s));
        }
        "name" => {
            a.expect(1)?;
            r.name = Some(a.str(0)?.text.to_string());
        }
        "clone" => {}
        _ => return Err(unknown_method(&Value::Recipe(Rc::new(r)), a, RECIPE_METHODS)),
    }
    Ok(Value::Recipe(Rc::new(r)))
}

/// Checks every numeric field of `s` that has a rule in `table` (`ir::settings`): a diagnostic at the first field
/// out of its range, naming the field and the range.
fn check_fields(s: &StructVal, table: &[ir::settings::Rule], at: Span, what: &str) -> Result<(), Error> {
    for f in &s.fields {
        let checked = match &f.value {
            Value::Int(i) => ir::settings::check_int(table, &f.name, *i as i128),
            Value::Float(x) => ir::settings::check_f64(table, &f.name, *x),
            _ => Ok(()),
        };
        checked.map_err(|e| setting_error(e, f.origin.unwrap_or(at), what))?;
    }
    Ok(())
}

/// A setting out of range as a diagnostic at `at`.
fn setting_error(e: ir::settings::SettingError, at: Span, what: &str) -> Error {
    let help = format!("allowed for `{}` in `{what}`: {}", e.field, e.expected);
    Error::new(DiagKind::InvalidValue, at, format!("invalid {what}: {e}")).label("out of range").help(help)
}

fn struct_arg(a: &Args, i: usize, names: &[&str]) -> Result<Rc<StructVal>, Error> {
    match a.vals.get(i) {
        Some(Value::Struct(s)) if names.contains(&s.name.as_str()) => Ok(s.clone()),
        _ => {
            let want: Vec<String> = names.iter().map(|n| format!("`{n} {{ .. }}`")).collect();
            Err(a.wrong(i, &want.join(" or ")))
        }
    }
}

fn field_span(s: &StructVal, name: &str, fallback: Span) -> Span {
    s.field(name).and_then(|f| f.origin).unwrap_or(fallback)
}

fn int_field(s: &StructVal, name: &str, at: Span) -> Result<usize, Error> {
    match s.field(name).map(|f| &f.value) {
        Some(Value::Int(i)) if *i >= 0 => Ok(*i as usize),
        _ => Err(Error::new(
            DiagKind::WrongType,
            field_span(s, name, at),
            format!("`{name}` must be a non-negative integer"),
        )),
    }
}

fn float_field(s: &StructVal, name: &str) -> f64 {
    match s.field(name).map(|f| &f.value) {
        Some(Value::Float(x)) => *x,
        Some(Value::Int(i)) => *i as f64,
        _ => 0.0,
    }
}

fn bool_field(s: &StructVal, name: &str) -> bool {
    matches!(s.field(name).map(|f| &f.value), Some(Value::Bool(true)))
}

/// `Lora { .. }` or `Dora { .. }` (= `Lora { .., dora: true }`), range-checked.
fn lora_spec(s: &StructVal, at: Span) -> Result<LoraSpec, Error> {
    let rank = int_field(s, "rank", at)?;
    if rank == 0 {
        return Err(Error::new(DiagKind::InvalidValue, field_span(s, "rank", at), "the LoRA rank must be positive")
            .label("must be > 0"));
    }
    let alpha = float_field(s, "alpha");
    if !alpha.is_finite() {
        return Err(Error::new(DiagKind::InvalidValue, field_span(s, "alpha", at), "alpha must be a finite number"));
    }
    let dropout = float_field(s, "dropout");
    if !(0.0..1.0).contains(&dropout) {
        return Err(Error::new(
            DiagKind::InvalidValue,
            field_span(s, "dropout", at),
            format!("dropout must be in [0, 1), got {dropout}"),
        )
        .label("out of range"));
    }
    // The remaining bounds of the shared table (the rank's maximum, alpha > 0).
    check_fields(s, ir::settings::ADAPTER_RULES, at, &s.name)?;
    let dora = s.name == "Dora" || bool_field(s, "dora");
    Ok(LoraSpec { rank, alpha, dropout, rslora: bool_field(s, "rslora"), dora })
}

/// A target list from a value: `ALL_LINEAR`, `regex(..)`, or a list of module names.
pub fn to_targets(v: &Value, at: Span) -> Result<Targets, String> {
    match v {
        Value::Targets(t) => {
            let mut t = (**t).clone();
            t.span = t.span.or(Some(at));
            Ok(t)
        }
        Value::List(items) => {
            let mut names = Vec::with_capacity(items.len());
            for x in items.iter() {
                match x {
                    Value::Str(s) => names.push((s.text.to_string(), s.origin)),
                    other => return Err(format!("expected module names (strings), found {}", other.describe())),
                }
            }
            let mut t = Targets::names(names);
            t.span = Some(at);
            Ok(t)
        }
        other => {
            Err(format!("expected targets (ALL_LINEAR, [\"q_proj\", ..] or regex(..)), found {}", other.describe()))
        }
    }
}

/// Runs the model's forward function and applies the recipe's quantization and adapter.
pub fn compile(it: &mut Interp, r: &RecipeVal, default_name: &str) -> Result<CompiledRecipe, Error> {
    let name = r.name.clone().unwrap_or_else(|| default_name.to_string());
    let train = r.train.clone().unwrap_or_default();
    let site = r.model.call_site;
    let mut g = forward_graph(it, &r.model, &name, train.micro_batch, train.seq_len)?;
    let mut quant = None;
    if let Some(q) = &r.quant {
        let modules = select_modules(&g, &q.targets, q.span)?;
        g = apply_nf4(&g, &modules, &q.nf4).map_err(|e| peft_error(e, q.span))?;
        let names = modules.iter().map(|m| m.name.clone()).collect();
        quant = Some(QuantConfig {
            block: q.nf4.block,
            double_quant: q.nf4.double_quant,
            targets: q.targets.spec.clone(),
            modules: names,
        });
    }
    let mut peft = None;
    if let Some(a) = &r.adapter {
        let modules = select_modules(&g, &a.targets, a.span)?;
        g = apply_lora(&g, &modules, &a.lora).map_err(|e| peft_error(e, a.span))?;
        let method = match (a.lora.dora, quant.is_some()) {
            (false, false) => PeftMethod::Lora,
            (false, true) => PeftMethod::QLora,
            (true, false) => PeftMethod::Dora,
            (true, true) => PeftMethod::QDora,
        };
        peft = Some(PeftConfig {
            method,
            r: a.lora.rank,
            alpha: a.lora.alpha,
            dropout: a.lora.dropout,
            targets: a.targets.spec.clone(),
            target_modules: short_names(&modules),
            modules: modules.iter().map(|m| m.name.clone()).collect(),
            use_rslora: a.lora.rslora,
            use_dora: a.lora.dora,
        });
    }
    ir::verify::verify(&g)
        .map_err(|e| Error::new(DiagKind::Internal, site, format!("the compiled graph does not verify: {e}")))?;
    Ok(CompiledRecipe { name, forward: g, train, peft, quant, model: model_info(&r.model) })
}

/// The forward graph: inputs, the model's forward function, and the loss.
fn forward_graph(it: &mut Interp, model: &ModelVal, name: &str, batch: usize, seq: usize) -> Result<Graph, Error> {
    let site = model.call_site;
    let internal = |e: ir::graph::BuildError| Error::new(DiagKind::Internal, site, e.to_string());
    let Some(n) = batch.checked_mul(seq).filter(|n| *n <= 1 << 40) else {
        let msg = format!("micro_batch × seq_len = {batch} × {seq} is too large");
        return Err(Error::new(DiagKind::InvalidValue, site, msg));
    };
    let mut b = Builder::new(name);
    let ids = b.input("input_ids", Type::i32([batch, seq])).map_err(internal)?;
    let pos = b.input("position_ids", Type::i32([batch, seq])).map_err(internal)?;
    let seg = b.input("segment_ids", Type::i32([batch, seq])).map_err(internal)?;
    let field = |n: &str, v: Value| Field { name: n.to_string(), value: v, origin: None };
    let tokens = Value::Struct(Rc::new(StructVal {
        name: "Tokens".into(),
        fields: vec![
            field("batch", Value::Int(batch as i64)),
            field("seq", Value::Int(seq as i64)),
            field("input_ids", Value::Tensor(ids)),
            field("position_ids", Value::Tensor(pos)),
            field("segment_ids", Value::Tensor(seg)),
        ],
    }));
    it.builder = Some(b);
    let logits = it.call_named(&model.forward, vec![model.config.clone(), tokens], site).map_err(|mut e| {
        if let Some(last) = e.trace.last_mut() {
            last.1 = format!("in the forward pass (`{}`) of the model built here", model.forward);
        }
        e
    });
    let b = it.builder.take();
    let (logits, mut b) = match (logits?, b) {
        (Value::Tensor(t), Some(b)) => (t, b),
        (v, _) => {
            let msg = format!("`{}` must return the logits tensor, but returned {}", model.forward, v.describe());
            return Err(Error::new(DiagKind::WrongType, site, msg));
        }
    };
    let lt = b.ty(logits).clone();
    if lt.rank() != 2 || lt.shape[0] != n {
        let msg =
            format!("`{}` must return logits of shape [batch·seq = {n}, vocab], but returned {lt}", model.forward);
        return Err(Error::new(DiagKind::Graph, site, msg));
    }
    b.set_label(Some("loss".into()));
    let labels = b.input("labels", Type::i32([n])).map_err(internal)?;
    let loss = b.cross_entropy(logits, labels, -100).map_err(internal)?;
    b.output(OutputKind::Loss, loss);
    b.output(OutputKind::Logits, logits);
    Ok(b.finish())
}

/// The modules `targets` selects, or a diagnostic at the target that matches nothing.
fn select_modules(g: &Graph, targets: &Targets, call: Span) -> Result<Vec<LinearModule>, Error> {
    let modules = linear_modules(g);
    select(&modules, &targets.spec).map_err(|e| {
        let (index, msg) = match &e {
            TargetError::NoMatch { index, target } => {
                (*index, format!("target module {target} matches no linear module of the model"))
            }
            TargetError::BadRegex(_) => (0, e.to_string()),
        };
        let available = short_names(&modules);
        let wanted = match &targets.spec {
            TargetSpec::Names(ns) => ns.get(index).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        let listing = format!("the model's linear modules are {}", available.join(", "));
        let help = match (&targets.spec, did_you_mean(&wanted, available.iter().map(String::as_str))) {
            (TargetSpec::Regex(_), _) => {
                format!("a pattern must match the whole module name, e.g. `regex(r\".*\\.q_proj\")` ({listing})")
            }
            (_, Some(d)) => format!("{d} ({listing})"),
            (_, None) => listing,
        };
        Error::new(DiagKind::TargetNotFound, targets.span_of(index).unwrap_or(call), msg)
            .label("matches nothing")
            .help(help)
    })
}

fn peft_error(e: PeftError, at: Span) -> Error {
    Error::new(DiagKind::InvalidValue, at, e.to_string())
}

fn model_info(m: &ModelVal) -> ModelInfo {
    let config = match &m.config {
        Value::Struct(s) => s.fields.iter().map(|f| (f.name.clone(), to_json(&f.value))).collect(),
        _ => vec![],
    };
    ModelInfo { arch: m.arch.clone(), config }
}

fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::Float(x) => serde_json::Value::from(*x),
        Value::Str(s) => serde_json::Value::String(s.text.to_string()),
        Value::List(items) | Value::Tuple(items) => serde_json::Value::Array(items.iter().map(to_json).collect()),
        Value::Struct(s) => {
            serde_json::Value::Object(s.fields.iter().map(|f| (f.name.clone(), to_json(&f.value))).collect())
        }
        _ => serde_json::Value::Null,
    }
}
