//! Checkpoints: everything a run needs to continue exactly — the trainable parameters and optimizer states (f32
//! tensors), the step, the data position and the run's seed — in one safetensors file whose `__metadata__` holds the
//! rest as JSON. Written atomically: a temporary file in the same directory, synced, then renamed over the final
//! name, and the directory synced; a reader never sees a half-written checkpoint (a crash leaves the previous one).

use std::collections::HashMap;
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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename, fsync the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
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

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<(), CheckpointError> {
        let meta = HashMap::from([
            ("format".to_string(), "tunec-checkpoint-1".to_string()),
            ("tunec".to_string(), serde_json::to_string(&self.meta).expect("meta serializes")),
        ]);
        write_atomic(path, &safetensors_bytes(&self.tensors, Some(meta)))
    }

    /// Reads a checkpoint written by [`Checkpoint::write`].
    pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let fmt = |message: String| CheckpointError::Format { path: path.to_path_buf(), message };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| fmt(e.to_string()))?;
        let meta =
            header.metadata().as_ref().and_then(|m| m.get("tunec")).ok_or_else(|| fmt("no tunec metadata".into()))?;
        let meta: CheckpointMeta = serde_json::from_str(meta).map_err(|e| fmt(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fmt(e.to_string()))?;
        let mut tensors = vec![];
        let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        for n in names {
            let t = st.tensor(&n).map_err(|e| fmt(e.to_string()))?;
            if t.dtype() != Dtype::F32 {
                return Err(fmt(format!("tensor {n} is {:?}, not F32", t.dtype())));
            }
            let data = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            tensors.push((n, t.shape().to_vec(), data));
        }
        Ok(Checkpoint { meta, tensors })
    }
}

/// `<out>/checkpoints/step-<N>.safetensors`.
pub fn path_for(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:07}.safetensors"))
}

/// The newest complete checkpoint under `<out>/checkpoints` (temporary files are never named `step-*`).
pub fn latest(out: &Path) -> Option<PathBuf> {
    let dir = out.join("checkpoints");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-") && n.ends_with(".safetensors"))
        })
        .collect();
    found.sort();
    found.pop()
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
