//! Gradient accumulation on the cpu backend: the tiny LoRA recipe with micro_batch 1 and grad_accum 2, fed the two
//! rows of each batch of the same recipe with micro_batch 2 and grad_accum 1 as consecutive micro-batches, ends three
//! optimizer steps with the same parameters and AdamW states (every row carries the same number of labels, so the
//! mean of the two micro-batch means is the mean over the batch; tiny.lora has no dropout). The optimized
//! accumulating step also equals its unoptimized form in the interpreter.

mod common;
#[allow(dead_code)]
#[path = "../../tunec/src/plan_source.rs"]
mod plan_source;

use codegen::build::BuildOptions;
use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::plan::Plan;
use ir::{OutputKind, Role};
use runtime::train::{metrics, train, Batch, DataSource, StepBackend, TrainOptions};
use tests::{rel_err, repo_root};

/// tiny.lora.rs with its `Train { ... }` replaced by `train`, compiled.
fn recipe(dir: &std::path::Path, name: &str, train: &str) -> frontend::CompiledRecipe {
    let text = std::fs::read_to_string(repo_root().join("examples/tiny.lora.rs")).unwrap();
    let old = "Train { seq_len: 8, micro_batch: 2, ..Train::default() }";
    assert!(text.contains(old), "examples/tiny.lora.rs changed its Train line");
    let path = dir.join(name);
    std::fs::write(&path, text.replace(old, train)).unwrap();
    frontend::compile_file(&path, models::library()).unwrap_or_else(|d| panic!("{}", d.render()))
}

fn plan(r: &frontend::CompiledRecipe) -> Plan {
    let opts = BuildOptions { archs: vec![], ptxas: false, host: true, llvm_ir: false, ..BuildOptions::default() };
    plan_source::compile_plan(r, "cpu", &opts).expect("plan")
}

/// Row r of a fixed stream: tokens a hash of (r, position), a label on every position but the last (so every row
/// has seq_len − 1 labels); a batch is the next `rows` rows.
struct Rows {
    rows: usize,
    t: usize,
    vocab: i32,
    next: u64,
}

impl DataSource for Rows {
    fn next_batch(&mut self) -> Result<Batch, String> {
        let mut b = Batch::default();
        for _ in 0..self.rows {
            let r = self.next;
            self.next += 1;
            let ids: Vec<i32> = (0..self.t)
                .map(|i| (ir::rng::uniform(11, r, i as u64) * self.vocab as f32) as i32 % self.vocab)
                .collect();
            b.labels.extend((0..self.t).map(|i| if i + 1 == self.t { -100 } else { ids[i + 1] }));
            b.input_ids.extend(ids);
            b.position_ids.extend((0..self.t as i32).collect::<Vec<_>>());
            b.segment_ids.extend(vec![0; self.t]);
        }
        Ok(b)
    }
    fn eval_batches(&self) -> Vec<Batch> {
        vec![]
    }
    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "next": self.next })
    }
    fn restore(&mut self, p: &serde_json::Value) -> Result<(), String> {
        self.next = p["next"].as_u64().ok_or("bad position")?;
        Ok(())
    }
}

fn options(out: &std::path::Path) -> TrainOptions {
    TrainOptions {
        out: out.to_path_buf(),
        steps: 3,
        lr: 1e-2,
        warmup: 1,
        eval_every: 0,
        save_every: 0,
        seed: 42,
        resume: false,
        base_model: "tiny".into(),
        progress: false,
        stop_after: None,
        keep_checkpoints: 0,
    }
}

fn close(a: f64, want: f64) -> bool {
    (a - want).abs() <= 1e-5 + 1e-4 * want.abs()
}

#[test]
fn two_accumulated_micro_batches_train_as_one_batch_of_two() {
    let dir = tempfile::tempdir().unwrap();
    let ra = recipe(dir.path(), "accum.rs", "Train { seq_len: 8, micro_batch: 1, grad_accum: 2, ..Train::default() }");
    let rb = recipe(dir.path(), "batch.rs", "Train { seq_len: 8, micro_batch: 2, grad_accum: 1, ..Train::default() }");
    let (pa, pb) = (plan(&ra), plan(&rb));
    assert_eq!(pa.train.grad_accum, 2);
    assert!(pa.graph.input("accum_apply").is_some());
    assert!(pb.graph.input("accum_apply").is_none());
    let vocab = pa.model_config.iter().find(|(k, _)| k == "vocab").unwrap().1.parse().unwrap();

    let (oa, ob) = (dir.path().join("a"), dir.path().join("b"));
    let mut ba = common::seeded_cpu_backend(&pa);
    let mut da = Rows { rows: 1, t: 8, vocab, next: 0 };
    let sa = train(&pa, &mut ba, &mut da, &options(&oa)).unwrap();
    let mut bb = common::seeded_cpu_backend(&pb);
    let mut db = Rows { rows: 2, t: 8, vocab, next: 0 };
    let sb = train(&pb, &mut bb, &mut db, &options(&ob)).unwrap();
    assert_eq!((da.next, db.next), (6, 6), "both read six rows");
    assert_eq!((sa.last_step, sb.last_step), (3, 3));

    let (state_a, state_b) = (ba.state().unwrap(), bb.state().unwrap());
    let mut compared = 0;
    for (name, _, want) in &state_b {
        let got = &state_a.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("A has no {name}")).2;
        for (i, (&x, &y)) in got.iter().zip(want).enumerate() {
            assert!(close(x as f64, y as f64), "{name}[{i}]: accumulated {x} vs batched {y}");
        }
        compared += 1;
    }
    assert_eq!(compared, 3 * 28, "28 LoRA matrices and their two moments");
    // The accumulators are empty at an optimizer-step boundary; the parameters moved.
    let accs: Vec<_> = state_a.iter().filter(|(n, _, _)| n.ends_with(".grad_acc")).collect();
    assert_eq!(accs.len() * 4, state_a.len(), "one accumulator per trainable parameter");
    assert!(accs.iter().all(|(_, _, d)| d.iter().all(|&x| x == 0.0)));
    let init_b = common::seeded_cpu_backend(&pb).state().unwrap();
    assert!(init_b.iter().zip(&state_b).any(|(a, b)| a.2 != b.2), "training changed nothing");

    // One metrics line per optimizer step: the mean loss and the norm of the mean gradient agree.
    let (ma, mb) =
        (metrics::read(&oa.join("metrics.jsonl")).unwrap(), metrics::read(&ob.join("metrics.jsonl")).unwrap());
    assert_eq!(ma.len(), 3);
    for (a, b) in ma.iter().zip(&mb) {
        assert_eq!(a.step, b.step);
        assert!(close(a.loss.unwrap(), b.loss.unwrap()), "step {}: loss {:?} vs {:?}", a.step, a.loss, b.loss);
        let (ga, gb) = (a.grad_norm.unwrap(), b.grad_norm.unwrap());
        assert!(close(ga, gb), "step {}: grad norm {ga} vs {gb}", a.step);
    }
    assert!(runtime::train::checkpoint::latest(&oa).unwrap().ends_with("step-0000003.safetensors"));
}

/// The optimized accumulating step (cpu target) equals the unoptimized one in the interpreter on both kinds of
/// micro-step, and a micro-step that does not apply leaves every parameter and moment as it was.
#[test]
fn the_optimized_accumulating_step_equals_the_unoptimized_one() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "accum.rs", "Train { seq_len: 8, micro_batch: 1, grad_accum: 2, ..Train::default() }");
    let step = |unoptimized: bool| {
        let mut opts = plan_source::pipeline_options(&r, "cpu", None).unwrap();
        opts.unoptimized = unoptimized;
        let mut g = r.forward.clone();
        passes::PassManager::new(passes::training_pipeline(&opts)).run(&mut g).unwrap();
        g
    };
    let (base, opt) = (step(true), step(false));
    for apply in [0.0, 1.0] {
        let env = |g: &ir::Graph| {
            let mut env: Env = ir::interp::random_env(g, 3);
            for (v, name, role) in g.params() {
                if role == Role::State && name.ends_with(".grad_acc") {
                    // A half-accumulated gradient.
                    let n = g.ty(v).numel();
                    let d = (0..n).map(|i| 0.01 * (2.0 * ir::rng::uniform(9, 1, i as u64) as f64 - 1.0)).collect();
                    env.params.insert(name.to_string(), Value::F(Tensor::new(g.ty(v).shape.clone(), d)));
                }
            }
            env.inputs.insert("accum_apply".into(), Value::F(Tensor::scalar(apply)));
            env
        };
        // One environment for both (random_env seeds by node index; the parameters and inputs are the same names).
        let shared = env(&base);
        let vb = run(&base, &shared, Precision::F32).unwrap();
        let vo = run(&opt, &shared, Precision::F32).unwrap();
        let mut compared = 0;
        for o in &base.outputs {
            if matches!(o.kind, OutputKind::Grad(_)) {
                continue;
            }
            let other = opt.output(&o.kind).unwrap_or_else(|| panic!("optimized step lost {:?}", o.kind));
            let (a, b) = (&vb[o.value.index()].as_f().unwrap().data, &vo[other.index()].as_f().unwrap().data);
            let e = rel_err(b, a);
            assert!(e < 1e-5, "apply {apply}: {:?} differs by {e:e}", o.kind);
            if let (OutputKind::Update(n), 0.0) = (&o.kind, apply) {
                if !n.ends_with(".grad_acc") {
                    let old = &shared.params[n].as_f().unwrap().data;
                    assert!(b.iter().zip(old).all(|(&x, &y)| x == y as f32 as f64), "apply 0 changed {n}");
                }
            }
            compared += 1;
        }
        assert!(compared > 4 * 28, "compared only {compared} outputs");
    }
}
