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
