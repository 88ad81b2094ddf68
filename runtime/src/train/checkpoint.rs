//! Checkpoints: everything a run needs to continue exactly — the trainable parameters and optimizer states (f32
//! tensors), the step, the data position and the run's seed — in one safetensors file whose `__metadata__` holds the
//! rest as JSON, with the CRC-32 of every tensor's bytes. Written atomically: a temporary file in the same directory
//! (named `.tunec-tmp-*`, so a killed run's leftovers are recognized and removed by the next run), synced, then renamed
//! over the final name, and the directory synced; a reader never sees a half-written checkpoint (a crash leaves the
//! previous one).
//!
//! A checkpoint is read back as untrusted input ([`Checkpoint::read_bounded`], [`Checkpoint::check_against`]): its
//! size is bounded by what the plan's tensors need, its format, every tensor's dtype, checksum and values (finite),
//! the tensor set and shapes (exactly the plan's trainable parameters and optimizer states), the plan it was written
//! for and its step are all checked before anything is loaded.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

/// What a checkpoint holds besides tensors.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    /// Optimizer steps completed.
    pub step: u64,
    /// The data iterator's position, as the data module serializes it.
    pub data: serde_json::Value,
    /// The run's seed (dropout masks and shuffling derive from it and the step).
    pub seed: u64,
    /// The plan's recipe name, to refuse resuming another recipe's checkpoint.
    pub recipe: String,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// What the plan is ([`super::plan_identity`]: recipe, model, adapter, batch shape), to refuse another plan's
    /// checkpoint.
    #[serde(default)]
    pub plan: String,
}

/// The `format` of the checkpoints this tunec writes and reads.
pub const FORMAT: &str = "tunec-checkpoint-2";
/// Temporary files of [`write_atomic`] start with this; [`remove_stale_temp_files`] removes them.
pub const TMP_PREFIX: &str = ".tunec-tmp-";
/// The most bytes a checkpoint's safetensors header may take besides its tensors' bytes.
pub const MAX_HEADER_BYTES: u64 = 64 << 20;
/// The largest step a checkpoint may claim (the plan's step counter is an i32).
pub const MAX_STEP: u64 = ir::settings::MAX_STEPS;

/// What a checkpoint must match to be resumed: the plan's trainable parameters and optimizer states (name, shape),
/// the plan's identity and the run's steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Expected {
    pub tensors: Vec<(String, Vec<usize>)>,
    pub plan: String,
    pub recipe: String,
    /// The run's `--steps` (the training loop refuses a checkpoint past them, naming both).
    pub steps: u64,
}

impl Expected {
    /// The checkpoint's size for these tensors (f32) plus the header allowance; `None` when it overflows.
    pub fn max_file_bytes(&self) -> Option<u64> {
        let mut total = MAX_HEADER_BYTES;
        for (_, shape) in &self.tensors {
            let n = shape.iter().try_fold(4u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))?;
            total = total.checked_add(n)?;
        }
        Some(total)
    }
}

/// A checkpoint in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    /// (name, shape, values), in a stable order.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a tunec checkpoint: {message}")]
    Format { path: PathBuf, message: String },
    /// A well-formed checkpoint that is corrupt or does not belong to this run.
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename, fsync the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::Builder::new().prefix(TMP_PREFIX).tempfile_in(dir).map_err(io(dir))?;
    tmp.write_all(bytes).map_err(io(path))?;
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| CheckpointError::Io { path: path.to_path_buf(), source: e.error })?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// f32 tensors as a safetensors file with string metadata.
pub fn safetensors_bytes(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: Option<HashMap<String, String>>,
) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("shape matches data")))
        .collect();
    safetensors::tensor::serialize(views, metadata).expect("serializable tensors")
}

/// The CRC-32 of f32 values as their little-endian bytes, as 8 hex digits.
fn crc_of(data: &[f32]) -> String {
    let mut h = crc32fast::Hasher::new();
    for x in data {
        h.update(&x.to_le_bytes());
    }
    format!("{:08x}", h.finalize())
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically, with the CRC-32 of every tensor.
    pub fn write(&self, path: &Path) -> Result<(), CheckpointError> {
        let crc: BTreeMap<&str, String> = self.tensors.iter().map(|(n, _, d)| (n.as_str(), crc_of(d))).collect();
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("tunec".to_string(), serde_json::to_string(&self.meta).expect("meta serializes")),
            ("crc32".to_string(), serde_json::to_string(&crc).expect("checksums serialize")),
        ]);
        write_atomic(path, &safetensors_bytes(&self.tensors, Some(meta)))
    }

    /// Reads a checkpoint written by [`Checkpoint::write`], of any size: see [`Checkpoint::read_bounded`].
    pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
        Checkpoint::read_bounded(path, u64::MAX)
    }

    /// Reads a checkpoint of at most `max_bytes` and checks what it says about itself: the format, every tensor
    /// F32 with a checksum that matches its bytes, every value finite. What it must match to be resumed is
    /// [`Checkpoint::check_against`].
    pub fn read_bounded(path: &Path, max_bytes: u64) -> Result<Checkpoint, CheckpointError> {
        let fmt = |message: String| CheckpointError::Format { path: path.to_path_buf(), message };
        let invalid = |message: String| CheckpointError::Invalid { path: path.to_path_buf(), message };
        let size = std::fs::metadata(path).map_err(io(path))?.len();
        if size > max_bytes {
            return Err(invalid(format!(
                "{size} bytes, but this plan's tensors need at most {max_bytes} (with the header): not a checkpoint of                  this run"
            )));
        }
        let bytes = std::fs::read(path).map_err(io(path))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| fmt(e.to_string()))?;
        let md = header.metadata().as_ref();
        let get = |k: &str| md.and_then(|m| m.get(k));
        match get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => {
                return Err(fmt(format!(
                    "format \"{}\", this tunec reads \"{FORMAT}\" (older checkpoints have no checksums and cannot be \
                     verified: start the run again without --resume)",
                    ir::untrusted::show(f)
                )))
            }
            None => return Err(fmt("no `format` in its metadata".into())),
        }
        let meta = get("tunec").ok_or_else(|| fmt("no tunec metadata".into()))?;
        let meta: CheckpointMeta = serde_json::from_str(meta)
            .map_err(|e| fmt(format!("metadata `tunec`: {}", ir::untrusted::show(&e.to_string()))))?;
        let crc = get("crc32").ok_or_else(|| fmt("no checksums (`crc32`) in its metadata".into()))?;
        let crc: BTreeMap<String, String> = serde_json::from_str(crc)
            .map_err(|e| fmt(format!("metadata `crc32`: {}", ir::untrusted::show(&e.to_string()))))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fmt(e.to_string()))?;
        let mut tensors = vec![];
        let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        for n in names {
            let shown = ir::untrusted::show(&n);
            let t = st.tensor(&n).map_err(|e| fmt(e.to_string()))?;
            if t.dtype() != Dtype::F32 {
                return Err(fmt(format!("tensor `{shown}` is {:?}, not F32", t.dtype())));
            }
            let data: Vec<f32> =
                t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let (stored, computed) = (crc.get(&n), crc_of(&data));
            match stored {
                Some(s) if *s == computed => {}
                Some(s) => {
                    return Err(invalid(format!(
                        "tensor `{shown}` is corrupt: its CRC-32 is {computed}, the checkpoint recorded {}",
                        ir::untrusted::show(s)
                    )))
                }
                None => return Err(invalid(format!("tensor `{shown}` has no checksum in the metadata"))),
            }
            if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                return Err(invalid(format!("tensor `{shown}` holds {} at element {i}", data[i])));
            }
            tensors.push((n, t.shape().to_vec(), data));
        }
        Ok(Checkpoint { meta, tensors })
    }

    /// Checks that the checkpoint belongs to this run: the same recipe and plan, exactly the expected tensors with
    /// their shapes, a step any run can reach.
    pub fn check_against(&self, path: &Path, want: &Expected) -> Result<(), CheckpointError> {
        let invalid = |message: String| CheckpointError::Invalid { path: path.to_path_buf(), message };
        let show = ir::untrusted::show;
        if self.meta.recipe != want.recipe {
            return Err(invalid(format!(
                "a checkpoint of recipe `{}`, not `{}`",
                show(&self.meta.recipe),
                show(&want.recipe)
            )));
        }
        if self.meta.plan != want.plan {
            return Err(invalid(format!(
                "written for another plan ({}); this plan is {}",
                show(&self.meta.plan),
                show(&want.plan)
            )));
        }
        let have: BTreeMap<&str, &Vec<usize>> = self.tensors.iter().map(|(n, s, _)| (n.as_str(), s)).collect();
        for (n, shape) in &want.tensors {
            match have.get(n.as_str()) {
                None => return Err(invalid(format!("tensor `{}` is missing (the plan trains or keeps it)", show(n)))),
                Some(s) if *s != shape => {
                    return Err(invalid(format!("tensor `{}` has shape {s:?}, the plan's is {shape:?}", show(n))))
                }
                Some(_) => {}
            }
        }
        let wanted: std::collections::BTreeSet<&str> = want.tensors.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = have.keys().find(|n| !wanted.contains(*n)) {
            return Err(invalid(format!(
                "tensor `{}` is not a trainable parameter or optimizer state of this plan",
                show(extra)
            )));
        }
        let step = self.meta.step;
        if step > MAX_STEP {
            return Err(invalid(format!("step {step} is beyond any run (at most {MAX_STEP}): the file is corrupt")));
        }
        Ok(())
    }
}

/// `<out>/checkpoints/step-<N>.safetensors`.
pub fn path_for(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:07}.safetensors"))
}

/// The complete checkpoints under `<out>/checkpoints` (`step-*.safetensors`; temporary files are never named so),
/// oldest first.
pub fn list(out: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) else { return vec![] };
    let mut found: Vec<(u64, PathBuf)> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter_map(|p| Some((step_of(&p)?, p))).collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// The step of a checkpoint's file name (`step-0000012.safetensors` → 12).
pub fn step_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let digits = name.strip_prefix("step-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The newest complete checkpoint under `<out>/checkpoints`.
pub fn latest(out: &Path) -> Option<PathBuf> {
    list(out).pop()
}

/// Removes the temporary files a killed run left in `dirs` ([`TMP_PREFIX`], and the `.tmpXXXXXX` names of older
/// tunec versions in a `checkpoints` folder); returns how many.
pub fn remove_stale_temp_files(dirs: &[PathBuf]) -> Result<usize, CheckpointError> {
    let mut removed = 0;
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(dir) else { continue };
        let legacy = dir.file_name().is_some_and(|n| n == "checkpoints");
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let old = legacy
                && name.len() == 10
                && name.starts_with(".tmp")
                && name[4..].bytes().all(|b| b.is_ascii_alphanumeric());
            if (name.starts_with(TMP_PREFIX) || old) && e.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Deletes all but the newest `keep` checkpoints under `<out>/checkpoints` (`keep` 0 keeps all), never `protect` (the
/// checkpoint the run resumed from) nor one newer than `newest` (the one just written); returns the deleted paths.
pub fn prune(out: &Path, keep: usize, newest: &Path, protect: Option<&Path>) -> Result<Vec<PathBuf>, CheckpointError> {
    if keep == 0 {
        return Ok(vec![]);
    }
    let last = step_of(newest);
    let mut older: Vec<PathBuf> = list(out).into_iter().filter(|p| step_of(p) <= last).collect();
    let n = older.len().saturating_sub(keep);
    older.truncate(n);
    let mut deleted = vec![];
    for p in older {
        if Some(p.as_path()) != protect {
            std::fs::remove_file(&p).map_err(io(&p))?;
            deleted.push(p);
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_latest_picks_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoint {
            meta: CheckpointMeta {
                step: 12,
                data: serde_json::json!({"epoch": 1, "index": 7}),
                seed: 42,
                recipe: "tiny".into(),
                tokens: 384,
                plan: "tiny plan".into(),
            },
            tensors: vec![
                ("a".into(), vec![2, 2], vec![1.0, -2.0, 3.5, 0.0]),
                ("b".into(), vec![1], vec![f32::MIN_POSITIVE]),
            ],
        };
        ck.write(&path_for(dir.path(), 12)).unwrap();
        let mut older = ck.clone();
        older.meta.step = 3;
        older.write(&path_for(dir.path(), 3)).unwrap();
        let p = latest(dir.path()).unwrap();
        assert!(p.ends_with("step-0000012.safetensors"));
        assert_eq!(Checkpoint::read(&p).unwrap(), ck);
        assert!(std::fs::read_dir(dir.path().join("checkpoints")).unwrap().count() == 2, "no temporary files left");
        std::fs::write(dir.path().join("junk.safetensors"), b"not a checkpoint").unwrap();
        assert!(Checkpoint::read(&dir.path().join("junk.safetensors")).is_err());
    }
}
