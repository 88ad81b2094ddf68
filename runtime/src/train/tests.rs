//! The training loop against hostile settings and checkpoints (issue 11), on a mock backend (no compiled code, so
//! these run in milliseconds): nonsense options are refused naming the flag; an update that leaves a parameter
//! non-finite stops the run naming the step and the tensor; a resumed checkpoint must be complete, intact (CRC-32),
//! finite, of this plan and within `--steps`, and a bad one names the previous good one; temporary files of a killed
//! run are removed; old checkpoints are pruned.

use super::checkpoint::{self, Checkpoint};
use super::*;
use ir::plan::{build_plan, PlanSource, TrainSettings, ValuePlacement};

/// A plan with a trainable `w` [2, 3] and its optimizer state (the graph is never run).
fn plan() -> Plan {
    let g = ir::text::parse(
        r#"graph "mock" {
  %0 = param {name="w", role=trainable, init=zeros} : f32[2,3]
  %1 = param {name="optimizer.w.exp_avg", role=state, init=zeros} : f32[2,3]
  %2 = add(%0, %1) : f32[2,3]
  output logits = %2
}
"#,
    )
    .unwrap();
    let train = TrainSettings { seq_len: 2, lr: 0.1, steps: 4, seed: 1, save_every: 1, ..TrainSettings::default() };
    build_plan(PlanSource {
        recipe: "mock".into(),
        target: "cpu".into(),
        graph: g,
        values: vec![ValuePlacement::None; 3],
        buffers: vec![],
        arena_bytes: 0,
        persistent_bytes: 0,
        train,
        peft: None,
        model_config: vec![("hidden".into(), "3".into())],
    })
    .unwrap()
}

/// `w -= lr` and `exp_avg += 1` per step; the loss is the sum of `w`. At step `poison`, the update writes NaN into
/// `w[1]` (the loss stays finite).
struct Mock {
    state: Vec<(String, Vec<usize>, Vec<f32>)>,
    lr: f32,
    step: u64,
    poison: Option<u64>,
}

impl Mock {
    fn new() -> Mock {
        Mock {
            state: vec![
                ("w".into(), vec![2, 3], vec![1.0; 6]),
                ("optimizer.w.exp_avg".into(), vec![2, 3], vec![0.0; 6]),
            ],
            lr: 0.0,
            step: 0,
            poison: None,
        }
    }
}

impl StepBackend for Mock {
    fn set_inputs(&mut self, _: &Batch, lr: f32, step: u64) -> Result<(), String> {
        (self.lr, self.step) = (lr, step);
        Ok(())
    }
    fn run_step(&mut self) -> Result<(f32, Option<f32>), String> {
        let loss = self.state[0].2.iter().sum();
        self.state[0].2.iter_mut().for_each(|w| *w -= self.lr);
        self.state[1].2.iter_mut().for_each(|m| *m += 1.0);
        if self.poison == Some(self.step) && self.lr > 0.0 {
            self.state[0].2[1] = f32::NAN;
        }
        Ok((loss, Some(1.0)))
    }
    fn state(&self) -> Result<Tensors, String> {
        Ok(self.state.clone())
    }
    fn set_state(&mut self, name: &str, data: &[f32]) -> Result<(), String> {
        let t = self.state.iter_mut().find(|t| t.0 == name).ok_or_else(|| format!("no `{name}`"))?;
        t.2 = data.to_vec();
        Ok(())
    }
    fn first_nonfinite(&mut self) -> Result<Option<String>, String> {
        Ok(Some("the mock's update".into()))
    }
}

struct Data {
    next: u64,
}

impl DataSource for Data {
    fn next_batch(&mut self) -> Result<Batch, String> {
        self.next += 1;
        Ok(Batch { input_ids: vec![1, 2], position_ids: vec![0, 1], segment_ids: vec![0, 0], labels: vec![2, -100] })
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

fn options(out: &std::path::Path, steps: u64) -> TrainOptions {
    TrainOptions {
        out: out.to_path_buf(),
        steps,
        lr: 0.1,
        warmup: 0,
        eval_every: 0,
        save_every: 1,
        seed: 1,
        resume: false,
        base_model: "mock".into(),
        progress: false,
        stop_after: None,
        keep_checkpoints: 0,
    }
}

fn run(out: &std::path::Path, o: &TrainOptions) -> Result<TrainSummary, String> {
    train(&plan(), &mut Mock::new(), &mut Data { next: 0 }, &TrainOptions { out: out.to_path_buf(), ..o.clone() })
}

#[test]
fn nonsense_options_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let o = options(dir.path(), 4);
    let err = run(dir.path(), &TrainOptions { lr: f64::NAN, ..o.clone() }).unwrap_err();
    assert_eq!(err, "--lr (the peak learning rate): expected a finite number > 0, found NaN");
    let err = run(dir.path(), &TrainOptions { lr: f64::INFINITY, ..o.clone() }).unwrap_err();
    assert!(err.contains("found inf"), "{err}");
    let err = run(dir.path(), &TrainOptions { steps: 0, ..o.clone() }).unwrap_err();
    assert!(err.starts_with("--steps: expected an integer in [1, 2147483647], found 0"), "{err}");
    let err = run(dir.path(), &TrainOptions { warmup: u64::MAX, ..o }).unwrap_err();
    assert!(err.starts_with("--warmup:"), "{err}");
    assert!(checkpoint::latest(dir.path()).is_none(), "nothing was trained");
}

#[test]
fn an_update_that_makes_a_parameter_non_finite_stops_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut be = Mock { poison: Some(3), ..Mock::new() };
    let err = train(&plan(), &mut be, &mut Data { next: 0 }, &options(dir.path(), 4)).unwrap_err();
    assert!(err.starts_with("step 3: the loss is "), "{err}");
    assert!(err.contains("after the update `w` holds NaN at element 1"), "{err}");
    assert!(err.contains("First non-finite value: the mock's update"), "{err}");
    // The state is that before the bad step, and no checkpoint holds the bad values.
    assert!(be.state[0].2.iter().all(|x| x.is_finite()));
    assert!(checkpoint::latest(dir.path()).unwrap().ends_with("step-0000002.safetensors"));
}

/// A run of 2 steps (checkpoints at 1 and 2) under `dir`.
fn two_steps(dir: &std::path::Path) {
    let mut o = options(dir, 4);
    o.stop_after = Some(2);
    run(dir, &o).unwrap();
}

fn resume(dir: &std::path::Path, steps: u64) -> Result<TrainSummary, String> {
    let mut o = options(dir, steps);
    o.resume = true;
    run(dir, &o)
}

/// Rewrites the newest checkpoint (step 2) through `f`, with valid checksums.
fn rewrite(dir: &std::path::Path, f: impl FnOnce(&mut Checkpoint)) -> std::path::PathBuf {
    let p = checkpoint::latest(dir).unwrap();
    let mut ck = Checkpoint::read(&p).unwrap();
    f(&mut ck);
    ck.write(&p).unwrap();
    p
}

#[test]
fn a_good_checkpoint_resumes_and_the_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    two_steps(dir.path());
    let s = resume(dir.path(), 4).unwrap();
    assert_eq!((s.first_step, s.last_step), (3, 4));
}

#[test]
fn a_checkpoint_missing_a_tensor_is_refused_naming_it_and_the_previous_good_one() {
    let dir = tempfile::tempdir().unwrap();
    two_steps(dir.path());
    rewrite(dir.path(), |ck| ck.tensors.retain(|t| t.0 == "w"));
    let err = resume(dir.path(), 4).unwrap_err();
    assert!(err.contains("step-0000002.safetensors: tensor `optimizer.w.exp_avg` is missing"), "{err}");
    assert!(err.contains("the previous checkpoint") && err.contains("step-0000001.safetensors is intact"), "{err}");
}

#[test]
fn an_extra_tensor_a_transposed_shape_or_another_plan_is_refused() {
    type Tamper = fn(&mut Checkpoint);
    let cases: [(Tamper, &str); 4] = [
        (|ck| ck.tensors.push(("evil".into(), vec![1], vec![0.0])), "tensor `evil` is not a trainable parameter"),
        (|ck| ck.tensors[0].1 = vec![3, 2], "has shape [3, 2], the plan's is [2, 3]"),
        (|ck| ck.meta.plan = "recipe mock; model hidden=4".into(), "written for another plan"),
        (|ck| ck.meta.recipe = "other\u{1b}[2J".into(), "a checkpoint of recipe `other\\u{1b}[2J`, not `mock`"),
    ];
    for (tamper, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        two_steps(dir.path());
        rewrite(dir.path(), tamper);
        let err = resume(dir.path(), 4).unwrap_err();
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn a_flipped_bit_or_a_changed_value_fails_the_checksum() {
    for patch in [None, Some(1e30f32)] {
        let dir = tempfile::tempdir().unwrap();
        two_steps(dir.path());
        let p = checkpoint::latest(dir.path()).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        match patch {
            None => bytes[n - 3] ^= 0x10,
            Some(x) => bytes[n - 4..].copy_from_slice(&x.to_le_bytes()),
        }
        std::fs::write(&p, bytes).unwrap();
        let err = resume(dir.path(), 4).unwrap_err();
        assert!(err.contains("is corrupt: its CRC-32 is"), "{err}");
        assert!(err.contains("step-0000001.safetensors is intact"), "{err}");
    }
}

#[test]
fn a_non_finite_value_with_a_valid_checksum_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    two_steps(dir.path());
    rewrite(dir.path(), |ck| ck.tensors[0].2[4] = f32::INFINITY);
    let err = resume(dir.path(), 4).unwrap_err();
    assert!(err.contains("holds inf at element 4"), "{err}");
}

#[test]
fn a_step_past_the_run_or_beyond_any_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    two_steps(dir.path());
    rewrite(dir.path(), |ck| ck.meta.step = 10);
    let err = resume(dir.path(), 4).unwrap_err();
    assert!(err.ends_with("the checkpoint is at step 10, past --steps 4: nothing to train; raise --steps"), "{err}");
    rewrite(dir.path(), |ck| ck.meta.step = u64::MAX);
    let err = resume(dir.path(), 4).unwrap_err();
    assert!(err.contains("step 18446744073709551615 is beyond any run (at most 2147483647)"), "{err}");
}

#[test]
fn an_oversized_or_foreign_file_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    two_steps(dir.path());
    let p = checkpoint::latest(dir.path()).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(checkpoint::MAX_HEADER_BYTES + 1024).unwrap();
    let err = resume(dir.path(), 4).unwrap_err();
    assert!(err.contains("but this plan's tensors need at most"), "{err}");
    std::fs::write(&p, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
    let err = resume(dir.path(), 4).unwrap_err();
    assert!(err.contains("not a tunec checkpoint"), "{err}");
}

#[test]
fn temporary_files_of_a_killed_run_are_removed_and_old_checkpoints_pruned() {
    let dir = tempfile::tempdir().unwrap();
    two_steps(dir.path());
    let ck = dir.path().join("checkpoints");
    for stale in [".tunec-tmp-Ab12Cd", ".tmpXy34Zw"] {
        std::fs::write(ck.join(stale), b"half a checkpoint").unwrap();
    }
    std::fs::write(ck.join("notes.txt"), b"mine").unwrap();
    let mut o = options(dir.path(), 6);
    o.resume = true;
    o.keep_checkpoints = 2;
    run(dir.path(), &o).unwrap();
    let mut left: Vec<String> =
        std::fs::read_dir(&ck).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    // The newest two, the one the run resumed from (step 2), and the user's file; no temporary files.
    assert_eq!(left, ["notes.txt", "step-0000002.safetensors", "step-0000005.safetensors", "step-0000006.safetensors"]);
}

#[test]
fn a_fresh_run_does_not_overwrite_an_earlier_runs_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    two_steps(dir.path());
    let err = run(dir.path(), &options(dir.path(), 4)).unwrap_err();
    assert!(err.contains("holds a checkpoint of an earlier run") && err.contains("--resume"), "{err}");
}
