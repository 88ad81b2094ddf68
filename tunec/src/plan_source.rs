//! Converts a compiled recipe, its optimized training step and the step's memory plan into an `ir::plan::Plan`.
//! The `tests` crate includes this file (`#[path]`), so the tests build plans exactly as `tunec compile -o` does.

use frontend::CompiledRecipe;
use ir::plan::{
    build_plan, AdapterSettings, Plan, PlanBuffer, PlanError, PlanSource, Region, TrainSettings, ValuePlacement,
};
use passes::memory::{MemoryPlan, Placement};

/// The memory plan in the plan file's terms: every value's placement, and the buffers.
pub fn memory_parts(memory: &MemoryPlan) -> (Vec<ValuePlacement>, Vec<PlanBuffer>) {
    let values = memory
        .values
        .iter()
        .map(|v| match v.placement {
            Placement::None => ValuePlacement::None,
            Placement::Owns(b) => ValuePlacement::Owns(b as u32),
            Placement::Alias(of) => ValuePlacement::Alias(of.0),
            Placement::InPlace { of, buffer } => ValuePlacement::InPlace { of: of.0, buffer: buffer as u32 },
        })
        .collect();
    let buffers = memory
        .buffers
        .iter()
        .map(|b| PlanBuffer {
            region: match b.region {
                passes::memory::Region::Persistent => Region::Persistent,
                passes::memory::Region::Arena => Region::Arena,
            },
            offset: b.offset as u64,
            bytes: b.bytes as u64,
            start: b.start as u64,
            end: b.end as u64,
            first: b.first.0,
        })
        .collect();
    (values, buffers)
}

/// The warning `tunec compile` prints when the memory plan's peak exceeds the target's memory; `None` when it fits.
pub fn memory_warning(memory: &MemoryPlan, target: &passes::target::Target) -> Option<String> {
    const GIB: f64 = (1u64 << 30) as f64;
    let peak = memory.peak_bytes as f64;
    (peak > target.memory_bytes).then(|| {
        format!(
            "warning: the plan needs {:.1} GiB at peak, the target ({}) has {:.1} GiB: use --recompute per-block or a \
             smaller micro_batch / seq_len",
            peak / GIB,
            target.name,
            target.memory_bytes / GIB
        )
    })
}

/// The plan for `graph`, the optimized training step of `recipe`, with its memory plan `memory`, built for `target`.
pub fn plan_of(
    recipe: &CompiledRecipe,
    graph: ir::Graph,
    memory: &MemoryPlan,
    target: &str,
) -> Result<Plan, PlanError> {
    let (values, buffers) = memory_parts(memory);
    let t = &recipe.train;
    let train = TrainSettings {
        seq_len: t.seq_len as u64,
        micro_batch: t.micro_batch as u64,
        lr: t.lr,
        steps: t.steps as u64,
        warmup_steps: t.warmup_steps as u64,
        weight_decay: t.weight_decay,
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        grad_accum: t.grad_accum as u64,
        max_grad_norm: t.max_grad_norm,
        seed: t.seed,
        eval_every: t.eval_every as u64,
        save_every: t.save_every as u64,
    };
    let peft = recipe.peft.as_ref().map(|p| AdapterSettings {
        method: p.method.as_str().to_string(),
        r: p.r as u64,
        alpha: p.alpha,
        dropout: p.dropout,
        target_modules: p.target_modules.clone(),
        use_rslora: p.use_rslora,
        use_dora: p.use_dora,
    });
    let arch = ("arch".to_string(), serde_json::Value::from(recipe.model.arch.as_str()).to_string());
    let model_config = std::iter::once(arch).chain(recipe.model.config.iter().map(|(k, v)| (k.clone(), v.to_string())));
    build_plan(PlanSource {
        recipe: recipe.name.clone(),
        target: target.to_string(),
        graph,
        values,
        buffers,
        arena_bytes: memory.arena_bytes as u64,
        persistent_bytes: memory.persistent_bytes as u64,
        train,
        peft,
        model_config: model_config.collect(),
    })
}

/// Fills the plan's kernel code from a codegen build: each kernel's symbol, arguments, launch and run-time seeds;
/// each distinct kernel's LLVM IR once, on its first instance (when the build kept it); the PTX modules and the
/// host library.
pub fn attach_code(plan: &mut Plan, b: &codegen::build::Build) {
    let mut seen = std::collections::HashSet::new();
    for (code, k) in plan.kernels.iter_mut().zip(&b.kernels) {
        code.symbol = k.symbol.clone();
        let first = seen.insert(k.symbol.clone());
        code.llvm_ir = (first && !k.llvm_ir.is_empty()).then(|| k.llvm_ir.clone());
        code.args = k.args.clone();
        code.launch = k.launch.clone();
        code.seeds = k.seeds.clone();
    }
    plan.ptx_modules = b.ptx.clone();
    plan.host_library = b.host_library.clone();
}

/// The pipeline options of a recipe's training step for `target` (`h100`, `cpu`), as `tunec compile` uses them.
pub fn pipeline_options(
    recipe: &CompiledRecipe,
    target: &str,
    recompute: Option<passes::recompute::RecomputePolicy>,
) -> Result<passes::PipelineOptions, String> {
    let t = &recipe.train;
    Ok(passes::PipelineOptions {
        adamw: passes::adamw::AdamW {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            max_grad_norm: t.max_grad_norm,
            grad_accum: t.grad_accum,
        },
        target: passes::target::Target::by_name(target)
            .ok_or_else(|| format!("error: unknown --target {target} (h100, cpu)"))?,
        unoptimized: false,
        recompute,
    })
}

/// A recipe's whole plan: the optimized training step for `target`, its memory plan, and the code `build` makes.
pub fn compile_plan(
    recipe: &CompiledRecipe,
    target: &str,
    build: &codegen::build::BuildOptions,
) -> Result<Plan, String> {
    let opts = pipeline_options(recipe, target, None)?;
    let mut g = recipe.forward.clone();
    passes::PassManager::new(passes::training_pipeline(&opts)).run(&mut g).map_err(|e| format!("error: {e}"))?;
    let b = codegen::build::build(&g, build).map_err(|e| format!("error: code generation: {e}"))?;
    let memory = passes::memory::plan(&g);
    let mut plan = plan_of(recipe, g, &memory, opts.target.name).map_err(|e| format!("error: {e}"))?;
    attach_code(&mut plan, &b);
    Ok(plan)
}
