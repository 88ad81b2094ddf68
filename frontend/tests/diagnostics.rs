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

// ---- hostile recipes: every resource limit ends evaluation quickly with a diagnostic at the offending span ----

/// A recipe file whose `recipe()` runs `body` first; `items` are extra items before it.
fn hostile(items: &str, body: &str) -> String {
    format!(
        "use tunec::prelude::*;\n{items}pub fn recipe() -> Recipe {{\n    {body}\n    Recipe::new(llama({}))\n}}\n",
        config(64, 4, 2)
    )
}

/// Compiles `src`, which must fail with a `Limit` diagnostic within a few seconds (a debug build).
fn limit_error(src: &str) -> Diagnostic {
    let t0 = std::time::Instant::now();
    let d = error(src);
    assert!(t0.elapsed().as_secs_f64() < 10.0, "took {:?}", t0.elapsed());
    assert_eq!(d.kind, DiagKind::Limit, "{}", d.render());
    assert_eq!(d.file, "recipe.rs");
    d
}

#[test]
fn endless_loop_hits_the_step_limit() {
    let d = limit_error(&hostile("", "loop {}"));
    assert_eq!((d.line, d.column), (3, 5));
    insta::assert_snapshot!(d.render());
}

#[test]
fn huge_for_range_hits_the_step_limit() {
    let d = limit_error(&hostile("", "for _ in 0..9223372036854775807 {}"));
    assert_eq!((d.line, d.column), (3, 5));
    insta::assert_snapshot!(d.render());
    // `i64::MAX` itself is not a value recipes have.
    assert_eq!(error(&hostile("", "for _ in 0..i64::MAX {}")).kind, DiagKind::Unsupported);
}

#[test]
fn string_doubled_forty_times_hits_the_string_limit() {
    let d = limit_error(&hostile("", "let mut s = String::from(\"ab\");\n    for _ in 0..40 { s = s.clone() + &s; }"));
    assert!(d.message.contains("string"), "{}", d.message);
    assert_eq!((d.line, d.column), (4, 26));
    insta::assert_snapshot!(d.render());
}

#[test]
fn list_extended_with_itself_hits_the_list_limit() {
    let d = limit_error(&hostile("", "let mut xs = vec![1, 2];\n    loop { let ys = xs.clone(); xs.extend(ys); }"));
    assert!(d.message.contains("list"), "{}", d.message);
    assert_eq!((d.line, d.column), (4, 43));
    insta::assert_snapshot!(d.render());
}

#[test]
fn values_nested_in_a_loop_hit_the_depth_limit() {
    let d = limit_error(&hostile("", "let mut x = vec![0];\n    loop { x = vec![x]; }"));
    assert!(d.message.contains("nest"), "{}", d.message);
    // Each push adds the list to itself: a shared structure measured once per distinct part, so the depth limit,
    // not the exponential tree size, ends it.
    let d = limit_error(&hostile("", "let mut x = vec![0];\n    loop { let y = x.clone(); x.push(y); }"));
    assert!(d.message.contains("nest") || d.message.contains("MiB"), "{}", d.message);
    let d = limit_error(&hostile("", "let mut x = vec![0];\n    loop { x = x.iter().enumerate(); }"));
    assert!(d.message.contains("nest"), "{}", d.message);
}

#[test]
fn many_large_lists_hit_the_memory_limit() {
    let d = limit_error(&hostile("", "let mut all = vec![];\n    loop { all.push(vec![0; 1000000]); }"));
    assert!(d.message.contains("MiB"), "{}", d.message);
    // One long string repeated in a list and joined: refused before it is built.
    let d = limit_error(&hostile(
        "",
        "let mut s = String::from(\"ab\");\n    for _ in 0..19 { s = s.clone() + &s; }\n    let xs = vec![s; 100000];\n    let j = xs.join(\",\");",
    ));
    assert!(d.message.contains("string"), "{}", d.message);
    let d = error(&hostile("", "let s = format!(\"{:.1000000000}\", 1.0);"));
    assert!(d.message.contains("MAX_PRECISION"), "{}", d.render());
    // A list of a million references to a million-element list: its full size counts, so it is refused.
    let d = limit_error(&hostile("", "let x = vec![0; 1000000];\n    let y = vec![x; 1000000];"));
    assert!(d.message.contains("MiB"), "{}", d.message);
}

#[test]
fn fifty_thousand_parentheses_in_an_uncalled_function_hit_the_nesting_limit() {
    let parens = format!("{}1{}", "(\n".repeat(50_000), ")".repeat(50_000));
    let d = limit_error(&hostile(&format!("fn unused() -> i64 {{\n{parens}\n}}\n"), ""));
    assert!(d.message.contains("nests more than"), "{}", d.message);
    insta::assert_snapshot!(d.render());
    // Long prefix-operator and binary-operator chains are nesting too (syn and the evaluator recurse on them).
    let minus = format!("fn unused() -> i64 {{ {}1 }}\n", "-".repeat(50_000));
    limit_error(&hostile(&minus, ""));
    let sum = format!("fn unused() -> i64 {{ 1{} }}\n", " + 1".repeat(50_000));
    limit_error(&hostile(&sum, ""));
}

#[test]
fn deep_recursion_hits_the_call_depth_limit() {
    let d = limit_error(&hostile("fn down(n: i64) -> i64 {\n    down(n + 1)\n}\n", "down(0);"));
    assert!(d.message.contains("calls nest deeper"), "{}", d.message);
    insta::assert_snapshot!(d.render());
}

#[test]
fn deep_expressions_in_deep_recursion_stay_on_the_stack() {
    // 200 nested parentheses in a function that recurses 250 times: bounded by the evaluator's depth limit.
    let deep = format!("{}down(n + 1){}", "(".repeat(200), ")".repeat(200));
    let src =
        hostile(&format!("fn down(n: i64) -> i64 {{\n    if n > 250 {{ 0 }} else {{ {deep} }}\n}}\n"), "down(0);");
    let d = limit_error(&src);
    assert!(d.message.contains("evaluation nests deeper"), "{}", d.message);
}

#[test]
fn oversized_recipe_is_refused_before_parsing() {
    let src = hostile(&format!("// {}\n", "x".repeat(frontend::limits::MAX_SOURCE_BYTES)), "");
    let d = limit_error(&src);
    assert!(d.message.contains("bytes"), "{}", d.message);
}

#[test]
fn recipes_cannot_read_files_or_the_environment() {
    let cases = [
        ("let s = include_str!(\"/etc/passwd\");", DiagKind::UnknownFunction),
        ("let s = include_bytes!(\"/etc/passwd\");", DiagKind::UnknownFunction),
        ("let s = env!(\"HOME\");", DiagKind::UnknownFunction),
        ("let s = std::fs::read(\"/etc/passwd\");", DiagKind::Unsupported),
        ("let s = fs::read_to_string(\"/etc/passwd\");", DiagKind::UnknownFunction),
        ("let s = std::env::var(\"HOME\");", DiagKind::Unsupported),
        ("let s = std::process::Command::new(\"sh\");", DiagKind::Unsupported),
    ];
    for (body, kind) in cases {
        let d = error(&hostile("", body));
        assert_eq!(d.kind, kind, "{body}: {}", d.render());
        assert_eq!(d.file, "recipe.rs");
    }
    for item in ["use std::fs;\n", "use std::env::var;\n", "use tunec::fs::*;\n", "mod m { }\n", "extern crate std;\n"]
    {
        let d = error(&hostile(item, ""));
        assert_eq!(d.kind, DiagKind::Unsupported, "{item}: {}", d.render());
        assert_eq!(d.line, 2, "{item}");
    }
    let d = error(&hostile("", "let s = include_str!(\"/etc/passwd\");"));
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
