//! A Hugging Face Llama model directory: `config.json`, the weights as `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, and (optional) `tokenizer.json` / `tokenizer_config.json`.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use ir::untrusted::show;

use super::config::LlamaConfig;
use super::import::expected_tensors;
use super::safetensors_io::SafeTensorsFile;
use super::tokenizer::{load_tokenizer, ChatTemplate};
use super::{read_json, Tensor, WeightsError};

/// An opened model directory. Weights stay memory-mapped until [`ModelDir::tensor`] reads one.
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    shards: Vec<SafeTensorsFile>,
    /// Tensor name → index into `shards`.
    index: BTreeMap<String, usize>,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for ModelDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelDir")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("tensors", &self.index.len())
            .field("tokenizer", &self.tokenizer.is_some())
            .finish()
    }
}

impl ModelDir {
    /// Opens `dir`: reads the config, maps the safetensors file(s), loads the tokenizer when `tokenizer.json` is
    /// there, and checks every tensor the config implies is present with the right shape.
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        if !dir.is_dir() {
            return Err(WeightsError::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory")));
        }
        let config = LlamaConfig::read(&dir.join("config.json"))?;
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut index = BTreeMap::new();
        if single.exists() {
            let f = SafeTensorsFile::open(&single)?;
            for n in f.names() {
                index.insert(n.clone(), 0);
            }
            shards.push(f);
        } else if index_path.exists() {
            let idx = read_json(&index_path)?;
            let map = idx
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| WeightsError::format(&index_path, "no `weight_map` object"))?;
            let mut files: Vec<&str> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    WeightsError::format(
                        &index_path,
                        format!(
                            "weight_map: tensor `{}` maps to {}, not a file name",
                            show(tensor),
                            show(&file.to_string())
                        ),
                    )
                })?;
                // A shard is a plain file of the model directory: no path separators, no `..`, not absolute, so
                // that an index can name nothing outside the directory.
                let mut parts = Path::new(file).components();
                let plain = matches!((parts.next(), parts.next()), (Some(Component::Normal(_)), None))
                    && !file.contains(['/', '\\'])
                    && file.len() <= 255
                    && !file.chars().any(char::is_control);
                if !plain {
                    return Err(WeightsError::format(
                        &index_path,
                        format!(
                            "weight_map: tensor `{}` is in \"{}\", which is not a file name in the model directory \
                             (shards must be plain file names of at most 255 bytes without control characters, \
                             such as model-00001-of-00002.safetensors)",
                            show(tensor),
                            show(file)
                        ),
                    ));
                }
                files.push(file);
            }
            files.sort();
            files.dedup();
            for file in files {
                let f = SafeTensorsFile::open(&dir.join(file))?;
                for n in f.names() {
                    if let Some(&other) = index.get(n) {
                        let other: &SafeTensorsFile = &shards[other];
                        return Err(WeightsError::format(
                            &index_path,
                            format!(
                                "tensor `{}` is in two shards: {} and {}",
                                show(n),
                                other.path().display(),
                                f.path().display()
                            ),
                        ));
                    }
                    index.insert(n.clone(), shards.len());
                }
                shards.push(f);
            }
        } else {
            return Err(WeightsError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors (nor model.safetensors.index.json) in the model directory",
                ),
            ));
        }
        let model = ModelDir { dir: dir.to_path_buf(), config, shards, index, tokenizer: None, chat_template: None };
        for (name, shape) in expected_tensors(&model.config) {
            match model.shape(&name) {
                None => return Err(WeightsError::MissingTensor { path: model.weights_path(), name }),
                Some(found) if found != shape.as_slice() => {
                    return Err(WeightsError::Shape {
                        path: model.weights_path(),
                        name,
                        expected: shape,
                        found: found.to_vec(),
                    })
                }
                Some(_) => {}
            }
        }
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.exists() { Some(load_tokenizer(&tokenizer_path)?) } else { None };
        let chat_template = ChatTemplate::from_dir(dir)?;
        Ok(ModelDir { tokenizer, chat_template, ..model })
    }

    /// Checks the model config a plan was compiled with (`ir::plan::Plan::model_config`) against this directory's
    /// `config.json` (see [`super::LlamaConfig::plan_mismatches`]); the error lists every difference and how to fix
    /// it.
    pub fn check_plan(&self, model_config: &[(String, String)]) -> Result<(), WeightsError> {
        let diffs = self.config.plan_mismatches(model_config);
        if diffs.is_empty() {
            return Ok(());
        }
        Err(WeightsError::format(
            &self.dir.join("config.json"),
            format!(
                "the model does not match the model config the plan was compiled with ({} difference{}):\n  {}\n\
                 recompile the recipe with the model's values (the fields of its `LlamaConfig {{ .. }}` from \
                 config.json), or give --model the model the recipe was written for",
                diffs.len(),
                if diffs.len() == 1 { "" } else { "s" },
                diffs.join("\n  ")
            ),
        ))
    }

    /// The weights file (the single file, or the index of the shards), for messages.
    pub fn weights_path(&self) -> PathBuf {
        match self.shards.as_slice() {
            [one] => one.path().to_path_buf(),
            _ => self.dir.join("model.safetensors.index.json"),
        }
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).and_then(|&i| self.shards[i].shape(name))
    }

    /// The stored element type of a tensor.
    pub fn dtype(&self, name: &str) -> Option<safetensors::Dtype> {
        self.index.get(name).and_then(|&i| self.shards[i].dtype(name))
    }

    /// A tensor as f32.
    pub fn tensor(&self, name: &str) -> Result<Tensor, WeightsError> {
        match self.index.get(name) {
            Some(&i) => self.shards[i].tensor(name),
            None => Err(WeightsError::MissingTensor { path: self.weights_path(), name: name.to_string() }),
        }
    }

    /// The tokenizer, or an error naming the missing `tokenizer.json`.
    pub fn require_tokenizer(&self) -> Result<&tokenizers::Tokenizer, WeightsError> {
        self.tokenizer.as_ref().ok_or_else(|| {
            WeightsError::io(
                &self.dir.join("tokenizer.json"),
                std::io::Error::new(std::io::ErrorKind::NotFound, "the model directory has no tokenizer.json"),
            )
        })
    }
}
