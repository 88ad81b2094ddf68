//! What users see when a recipe is wrong: each error kind, rendered without colors, snapshotted.

use frontend::{compile_source, DiagKind, Diagnostic};

/// The tiny config, with `{hidden}`, `{heads}`, `{kv_heads}` to break it.
fn config(hidden: usize, heads: usize, kv_heads: usize) -> String {
    format!(
        "LlamaConfig {{ vocab: 128, hidden: {hidden}, layers: 2, heads: {heads}, kv_heads: {kv_heads},\n\
         \x20                                  ffn: 128, rope_theta: 10000.0, norm_eps: 1e-5, tie_embeddings: true }}"
    )
}

/// A recipe whose body is `body` after `let base = llama(<tiny config>);`.
fn recipe_with(body: &str) -> String {
    format!(
        "use tunec::prelude::*;\npub fn recipe() -> Recipe {{\n    let base = llama({});\n    {body}\n}}\n",
        config(64, 4, 2)
    )
}

fn error(src: &str) -> Diagnostic {
    match compile_source("recipe.rs", src, models::library()) {
        Ok(_) => panic!("expected an error for:\n{src}"),
        Err(d) => d,
    }
}

#[test]
fn unknown_function() {
    let src = recipe_with("Recipe::new(base)").replace("llama(", "lama(");
    let d = error(&src);
    assert_eq!(d.kind, DiagKind::UnknownFunction);
    insta::assert_snapshot!(d.render());
}

#[test]
fn unknown_struct_field_suggests_the_closest() {
    let src = recipe_with("Recipe::new(base)").replace("hidden:", "hiden:");
    let d = error(&src);
    assert_eq!(d.kind, DiagKind::UnknownField);
    assert_eq!(d.help.as_deref(), Some("did you mean `hidden`?"));
    insta::assert_snapshot!(d.render());
}

#[test]
fn unknown_method() {
    let d = error(&recipe_with("Recipe::new(base).adaptor(Lora { rank: 4, alpha: 8.0, targets: ALL_LINEAR })"));
    assert_eq!(d.kind, DiagKind::UnknownMethod);
    insta::assert_snapshot!(d.render());
}

#[test]
fn wrong_argument_type() {
    let d = error(&recipe_with("Recipe::new(base).adapter(Lora { rank: \"16\", alpha: 8.0, targets: ALL_LINEAR })"));
    assert_eq!(d.kind, DiagKind::WrongType);
    assert!(d.message.starts_with("wrong argument type"), "{}", d.message);
    insta::assert_snapshot!(d.render());
}

#[test]
fn hidden_not_divisible_by_heads_points_at_the_recipe() {
    let src = format!(
        "use tunec::prelude::*;\npub fn recipe() -> Recipe {{\n    Recipe::new(llama({}))\n}}\n",
        config(66, 4, 2)
    );
    let d = error(&src);
    assert_eq!(d.kind, DiagKind::Assertion);
    assert_eq!(d.file, "recipe.rs");
    insta::assert_snapshot!(d.render());
}

#[test]
fn kv_heads_not_dividing_heads_points_at_the_recipe() {
    let src = "use tunec::prelude::*;
pub fn recipe() -> Recipe {
    let base = llama(LlamaConfig {
        vocab: 128,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 3,
        ffn: 128,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
    });
    Recipe::new(base)
}
";
    let d = error(src);
    assert_eq!(d.kind, DiagKind::Assertion);
    assert_eq!((d.file.as_str(), d.line), ("recipe.rs", 7));
    insta::assert_snapshot!(d.render());
}

#[test]
fn target_that_matches_nothing() {
    let d = error(&recipe_with(
        "Recipe::new(base).adapter(Lora { rank: 4, alpha: 8.0, targets: vec![\"q_proj\", \"vproj\"] })",
    ));
    assert_eq!(d.kind, DiagKind::TargetNotFound);
    insta::assert_snapshot!(d.render());
}

#[test]
fn regex_that_matches_nothing() {
    let d = error(&recipe_with("Recipe::new(base).adapter(Lora { rank: 4, alpha: 8.0, targets: regex(r\"q_proj\") })"));
    assert_eq!(d.kind, DiagKind::TargetNotFound);
    insta::assert_snapshot!(d.render());
}

#[test]
fn syntax_error() {
    let src = "use tunec::prelude::*;\npub fn recipe() -> Recipe {\n    let base = llama(LlamaConfig { vocab: 128, hidden: 64 layers: 2 });\n    Recipe::new(base)\n}\n";
    let d = error(src);
    assert_eq!(d.kind, DiagKind::Syntax);
    insta::assert_snapshot!(d.render());
}

#[test]
fn missing_field() {
    let d = error(&recipe_with("Recipe::new(base).adapter(Lora { rank: 4, targets: ALL_LINEAR })"));
    assert_eq!(d.kind, DiagKind::MissingField);
    insta::assert_snapshot!(d.render());
}

#[test]
fn out_of_range_dropout() {
    let d = error(&recipe_with(
        "Recipe::new(base).adapter(Lora { rank: 4, alpha: 8.0, dropout: 1.5, targets: ALL_LINEAR })",
    ));
    assert_eq!(d.kind, DiagKind::InvalidValue);
    insta::assert_snapshot!(d.render());
}

#[test]
fn graph_error_inside_a_user_model_points_at_the_call() {
    let src = "use tunec::prelude::*;
struct Cfg { d: usize }
fn forward(cfg: Cfg, tokens: Tokens) -> Tensor {
    let w = param(\"w.weight\", [cfg.d, 3]);
    let x = embedding(param(\"embed.weight\", [10, 4]), tokens.input_ids).reshape([tokens.batch * tokens.seq, 4]);
    linear(x, w)
}
pub fn recipe() -> Recipe {
    Recipe::new(Model::new(\"toy\", Cfg { d: 5 }, forward))
}
";
    let d = error(src);
    assert_eq!(d.kind, DiagKind::Graph);
    insta::assert_snapshot!(d.render());
}

#[test]
fn missing_recipe_function() {
    let d = error("use tunec::prelude::*;\nfn helper() {}\n");
    assert_eq!(d.kind, DiagKind::NoRecipe);
    insta::assert_snapshot!(d.render());
}

/// Issue 11, defect 5: every training, adapter and model setting is range-checked (the table in `ir::settings`),
/// with the field, the allowed range and a caret on the value.
#[test]
fn a_nan_learning_rate_is_refused() {
    let d = error(&recipe_with("Recipe::new(base).train(Train { lr: 0.0 / 0.0, ..Train::default() })"));
    assert_eq!(d.kind, DiagKind::InvalidValue);
    assert_eq!(d.message, "invalid Train: `lr` must be a finite number > 0, found NaN");
    insta::assert_snapshot!(d.render());
}

#[test]
fn beta1_outside_0_1_is_refused() {
    let d = error(&recipe_with("Recipe::new(base).train(Train { beta1: 2.0, ..Train::default() })"));
    assert_eq!(d.kind, DiagKind::InvalidValue);
    assert_eq!(d.message, "invalid Train: `beta1` must be a finite number in [0, 1), found 2.0");
    insta::assert_snapshot!(d.render());
}

#[test]
fn every_nonsense_training_setting_names_its_field() {
    for (field, value, found) in [
        ("max_grad_norm", "0.0 / 0.0", "NaN"),
        ("max_grad_norm", "-1.0", "-1.0"),
        ("beta2", "1.0", "1.0"),
        ("eps", "0.0", "0.0"),
        ("weight_decay", "1.0 / 0.0", "inf"),
        ("lr", "-0.001", "-0.001"),
        ("steps", "0", "0"),
        ("seq_len", "2000000", "2000000"),
    ] {
        let d =
            error(&recipe_with(&format!("Recipe::new(base).train(Train {{ {field}: {value}, ..Train::default() }})")));
        assert_eq!(d.kind, DiagKind::InvalidValue, "{field}: {}", d.message);
        assert!(d.message.contains(&format!("`{field}` must be")), "{}", d.message);
        assert!(d.message.ends_with(&format!("found {found}")), "{}", d.message);
    }
    let d = error(&recipe_with(
        "Recipe::new(base).train(Train { seq_len: 8, steps: 1073741824, grad_accum: 4, ..Train::default() })",
    ));
    assert!(d.message.contains("`steps` must be at most 2147483647 / grad_accum (4)"), "{}", d.message);
}

#[test]
fn nonsense_adapter_settings_name_their_field() {
    for (lora, msg) in [
        ("rank: 4, alpha: 0.0 / 0.0", "alpha must be a finite number"),
        ("rank: 4, alpha: -8.0", "`alpha` must be a finite number > 0, found -8.0"),
        ("rank: 100000, alpha: 8.0", "`rank` must be an integer in [1, 65536], found 100000"),
        ("rank: 4, alpha: 8.0, dropout: 0.0 / 0.0", "dropout must be in [0, 1), got NaN"),
    ] {
        let d = error(&recipe_with(&format!("Recipe::new(base).adapter(Lora {{ {lora}, targets: ALL_LINEAR }})")));
        assert_eq!(d.kind, DiagKind::InvalidValue, "{}", d.message);
        assert!(d.message.contains(msg), "{}", d.message);
    }
}

#[test]
fn an_infinite_norm_eps_is_refused() {
    let d = error(&recipe_with("Recipe::new(base)").replace("norm_eps: 1e-5", "norm_eps: 1.0 / 0.0"));
    assert_eq!(d.kind, DiagKind::InvalidValue);
    assert_eq!(d.message, "invalid LlamaConfig: `norm_eps` must be a finite number > 0, found inf");
    insta::assert_snapshot!(d.render());
}

#[test]
fn a_negative_rope_theta_is_refused() {
    let d = error(&recipe_with("Recipe::new(base)").replace("rope_theta: 10000.0", "rope_theta: -10000.0"));
    assert_eq!(d.kind, DiagKind::InvalidValue);
    assert_eq!(d.message, "invalid LlamaConfig: `rope_theta` must be a finite number > 0, found -10000.0");
    insta::assert_snapshot!(d.render());
}

#[test]
fn an_oversized_model_dimension_is_refused() {
    let d = error(&recipe_with("Recipe::new(base)").replace("vocab: 128", "vocab: 1000000000"));
    assert_eq!(d.kind, DiagKind::InvalidValue);
    assert_eq!(d.message, "invalid LlamaConfig: `vocab` must be an integer in [1, 4194304], found 1000000000");
}
