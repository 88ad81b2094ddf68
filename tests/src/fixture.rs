//! Golden fixtures: safetensors files written by `tests/reference/make_*.py` with a format name and version in
//! their metadata. This module checks both and turns the tensors into interpreter values.

use ir::interp::{Env, Tensor, Value};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;

pub struct Fixture {
    bytes: Vec<u8>,
    pub metadata: HashMap<String, String>,
}

/// Raw tensor data in the fixture's own dtype.
pub enum Raw {
    F32(Vec<f32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

impl Fixture {
    /// Loads `tests/fixtures/<file>` and checks its format and version.
    pub fn load(file: &str, format: &str, version: &str) -> Fixture {
        let path = crate::repo_root().join("tests/fixtures").join(file);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run tests/reference/run.sh)", path.display()));
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("fixture header");
        let metadata = meta.metadata().clone().unwrap_or_default();
        assert_eq!(metadata.get("format").map(String::as_str), Some(format), "{file}: wrong fixture format");
        assert_eq!(metadata.get("version").map(String::as_str), Some(version), "{file}: fixture version changed");
        Fixture { bytes, metadata }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("fixture tensors")
    }

    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.st().names().into_iter().map(str::to_string).collect();
        n.sort();
        n
    }

    pub fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    pub fn raw(&self, name: &str) -> (Vec<usize>, Raw) {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture has no tensor `{name}`"));
        let d = t.data();
        let raw = match t.dtype() {
            Dtype::F32 => Raw::F32(d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::I64 => Raw::I64(d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::U8 => Raw::U8(d.to_vec()),
            other => panic!("`{name}`: unsupported fixture dtype {other:?}"),
        };
        (t.shape().to_vec(), raw)
    }

    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        match self.raw(name) {
            (s, Raw::F32(v)) => (s, v),
            _ => panic!("`{name}` is not f32"),
        }
    }

    pub fn tensor(&self, name: &str) -> Tensor {
        let (s, v) = self.f32(name);
        Tensor::from_f32(s, &v)
    }

    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        match self.raw(name) {
            (s, Raw::I64(v)) => (s, v),
            _ => panic!("`{name}` is not i64"),
        }
    }

    pub fn u8(&self, name: &str) -> Vec<u8> {
        match self.raw(name) {
            (_, Raw::U8(v)) => v,
            _ => panic!("`{name}` is not u8"),
        }
    }

    /// Parameters from `weights.*` and `adapter.*` (names without the prefix), and the model inputs derived from
    /// `input_ids`/`labels` as tunec's data pipeline produces them: labels shifted left by one (the last position
    /// ignored), positions 0..T per row, one segment per row.
    pub fn llama_env(&self) -> Env {
        let mut env = Env::default();
        for name in self.names() {
            for prefix in ["weights.", "adapter."] {
                if let Some(p) = name.strip_prefix(prefix) {
                    env.params.insert(p.to_string(), Value::F(self.tensor(&name)));
                }
            }
        }
        let (shape, ids) = self.i64("input_ids");
        let (_, labels) = self.i64("labels");
        let (b, t) = (shape[0], shape[1]);
        let mut shifted = vec![-100i32; b * t];
        for r in 0..b {
            for c in 0..t - 1 {
                shifted[r * t + c] = labels[r * t + c + 1] as i32;
            }
        }
        env.inputs.insert("input_ids".into(), Value::ints(vec![b, t], ids.iter().map(|&x| x as i32).collect()));
        env.inputs.insert("labels".into(), Value::ints(vec![b * t], shifted));
        env.inputs.insert("position_ids".into(), Value::ints(vec![b, t], (0..b * t).map(|i| (i % t) as i32).collect()));
        env.inputs.insert("segment_ids".into(), Value::ints(vec![b, t], vec![0; b * t]));
        env.inputs.insert("step".into(), Value::ints(vec![], vec![0]));
        env
    }
}
