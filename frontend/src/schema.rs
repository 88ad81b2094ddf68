//! The built-in structs of the prelude (`Lora`, `Dora`, `Nf4`, `Train`, `Tokens`): their fields, types and defaults.
//! Unlike structs declared in a file, a struct literal of a built-in struct may leave out fields that have a default.

use crate::program::{FieldDef, StructDef};
use crate::recipe::TrainConfig;
use crate::ty::Ty;
use crate::value::Value;

pub const BUILTIN_STRUCTS: &[&str] = &["Lora", "Dora", "Nf4", "Train", "Tokens"];

const USIZE: Ty = Ty::Int { name: "usize", unsigned: true };
const U64: Ty = Ty::Int { name: "u64", unsigned: true };
const F64: Ty = Ty::Float { name: "f64" };

fn field(name: &str, ty: Ty, default: Option<Value>, doc: &'static str) -> FieldDef {
    FieldDef { name: name.to_string(), ty, default, doc }
}

fn targets() -> Ty {
    Ty::Named("Targets".into())
}

fn tensor() -> Ty {
    Ty::Named("Tensor".into())
}

/// LoRA's fields (`Dora` has the same without `dora`).
fn lora_fields(with_dora: bool) -> Vec<FieldDef> {
    let mut f = vec![
        field("rank", USIZE, None, "the rank r of A: [r, in] and B: [out, r]"),
        field("alpha", F64, None, "scaling numerator: s = alpha / r (rsLoRA: alpha / sqrt(r))"),
        field("dropout", F64, Some(Value::Float(0.0)), "dropout probability on the adapter's input"),
        field("targets", targets(), None, "modules to adapt: ALL_LINEAR, [\"q_proj\", ..] or regex(..)"),
        field("rslora", Ty::Bool, Some(Value::Bool(false)), "rank-stabilised scaling alpha / sqrt(r)"),
    ];
    if with_dora {
        f.push(field("dora", Ty::Bool, Some(Value::Bool(false)), "weight-decomposed LoRA (DoRA)"));
    }
    f
}

/// The definition of a built-in struct.
pub fn builtin_struct(name: &str) -> Option<StructDef> {
    let fields = match name {
        "Lora" => lora_fields(true),
        "Dora" => lora_fields(false),
        "Nf4" => vec![
            field("block", USIZE, Some(Value::Int(64)), "elements per absmax block"),
            field("double_quant", Ty::Bool, Some(Value::Bool(true)), "quantize the absmax values too (block 256)"),
        ],
        "Train" => train_fields(),
        "Tokens" => vec![
            field("batch", USIZE, None, "sequences per micro-batch B"),
            field("seq", USIZE, None, "tokens per sequence T"),
            field("input_ids", tensor(), None, "i32[B, T]"),
            field("position_ids", tensor(), None, "i32[B, T]"),
            field("segment_ids", tensor(), None, "i32[B, T]; attention only within equal ids"),
        ],
        _ => return None,
    };
    Some(StructDef { name: name.to_string(), fields, span: None })
}

/// `Train`'s fields, defaults taken from [`TrainConfig::default`].
fn train_fields() -> Vec<FieldDef> {
    let d = TrainConfig::default();
    let int = |x: usize| Some(Value::Int(x as i64));
    let float = |x: f64| Some(Value::Float(x));
    vec![
        field("seq_len", USIZE, int(d.seq_len), "tokens per sequence"),
        field("micro_batch", USIZE, int(d.micro_batch), "sequences per forward/backward pass"),
        field("lr", F64, float(d.lr), "peak learning rate"),
        field("steps", USIZE, int(d.steps), "optimizer steps"),
        field("warmup_steps", USIZE, int(d.warmup_steps), "linear warm-up steps"),
        field("weight_decay", F64, float(d.weight_decay), "AdamW decoupled weight decay"),
        field("beta1", F64, float(d.beta1), "AdamW β₁"),
        field("beta2", F64, float(d.beta2), "AdamW β₂"),
        field("eps", F64, float(d.eps), "AdamW ε"),
        field("grad_accum", USIZE, int(d.grad_accum), "micro-batches per optimizer step"),
        field("max_grad_norm", F64, float(d.max_grad_norm), "gradient clipping norm (0 = off)"),
        field("seed", U64, Some(Value::Int(d.seed as i64)), "seed for initialisation and data order"),
        field("eval_every", USIZE, int(d.eval_every), "steps between evaluations (0 = never)"),
        field("save_every", USIZE, int(d.save_every), "steps between checkpoints (0 = never)"),
        field("recompute", Ty::Bool, Some(Value::Bool(d.recompute)), "recompute activations in the backward pass"),
    ]
}

/// `S::default()` for a built-in struct whose fields all have defaults.
pub fn default_value(def: &StructDef) -> Option<Value> {
    let fields = def
        .fields
        .iter()
        .map(|f| Some(crate::value::Field { name: f.name.clone(), value: f.default.clone()?, origin: None }))
        .collect::<Option<Vec<_>>>()?;
    Some(Value::Struct(std::rc::Rc::new(crate::value::StructVal { name: def.name.clone(), fields })))
}
