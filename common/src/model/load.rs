//! Reads a model directory (or a bare config.json): the config, and safetensors headers if present.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::ModelDesc;
use super::safetensors::{self, WeightBytes};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{file}: invalid JSON at line {line} column {column}: {message}")]
    Json { file: String, line: usize, column: usize, message: String },
    #[error("{file}: {field} is missing")]
    Missing { file: String, field: String },
    #[error("{file}: {field} {why}")]
    Invalid { file: String, field: String, why: String },
    #[error("{file}: not a valid safetensors file: {why}")]
    Safetensors { file: String, why: String },
}

impl ModelError {
    pub fn missing(file: &str, field: &str) -> Self {
        ModelError::Missing { file: file.to_string(), field: field.to_string() }
    }

    pub fn invalid(file: &str, field: &str, why: &str) -> Self {
        ModelError::Invalid { file: file.to_string(), field: field.to_string(), why: why.to_string() }
    }
}

/// Where the weight sizes come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsSource {
    /// Summed from safetensors headers.
    Safetensors,
    /// Computed from the config (no weight files found).
    Estimated,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub path: PathBuf,
    pub desc: ModelDesc,
    /// Exact bytes when the weight files are there.
    pub weights: Option<WeightBytes>,
}

impl Model {
    pub fn weights_source(&self) -> WeightsSource {
        if self.weights.is_some() { WeightsSource::Safetensors } else { WeightsSource::Estimated }
    }
}

fn io(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io { path: path.display().to_string(), message: e.to_string() }
}

/// The most a `config.json` (or an index) may weigh: real ones are a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// Opens a model file for reading: regular files only (a FIFO, a device such as `/dev/zero`, or a
/// socket is refused), and the open never waits for a writer.
pub fn open_regular(path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file (a FIFO, a device or a socket); give the model's real files".into());
    }
    Ok(f)
}

/// Reads a small text file of the model (config, index), at most [`MAX_CONFIG_BYTES`].
fn read_small(path: &Path) -> Result<String, ModelError> {
    use std::io::Read;
    let err = |message: String| ModelError::Io { path: path.display().to_string(), message };
    let f = open_regular(path).map_err(err)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_CONFIG_BYTES {
        return Err(err(format!("{len} bytes; a model's config is at most {MAX_CONFIG_BYTES} bytes")));
    }
    let mut text = String::new();
    f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text).map_err(|e| err(e.to_string()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(err(format!("more than {MAX_CONFIG_BYTES} bytes")));
    }
    Ok(text)
}

/// Loads `path`: a model directory with `config.json`, or a `config.json` file itself.
pub fn load_model(path: &Path) -> Result<Model, ModelError> {
    let meta = std::fs::metadata(path).map_err(|e| io(path, e))?;
    let (dir, config) = if meta.is_dir() {
        (path.to_path_buf(), path.join("config.json"))
    } else {
        (path.parent().map(Path::to_path_buf).unwrap_or_default(), path.to_path_buf())
    };
    let text = read_small(&config)?;
    let desc = super::config::parse_config(&config.display().to_string(), &text)?;
    let weights = if meta.is_dir() { read_weights(&dir, desc.num_hidden_layers)? } else { None };
    Ok(Model { path: path.to_path_buf(), desc, weights })
}

fn read_weights(dir: &Path, layers: u64) -> Result<Option<WeightBytes>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text = read_small(&index)?;
        safetensors::index_files(&text)
            .map_err(|why| ModelError::Invalid { file: index.display().to_string(), field: "weight_map".into(), why })?
            .into_iter()
            .map(|f| dir.join(f))
            .collect()
    } else if dir.join("model.safetensors").exists() {
        vec![dir.join("model.safetensors")]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    };
    if files.is_empty() {
        return Ok(None);
    }
    let mut all = Vec::new();
    for f in &files {
        let tensors = safetensors::read_header(f)
            .map_err(|why| ModelError::Safetensors { file: f.display().to_string(), why })?;
        all.extend(tensors);
    }
    let mut w = WeightBytes::from_tensors(layers, &all);
    w.files = files.len();
    Ok(Some(w))
}

impl Model {
    /// `safetensors` or `estimated`, as reports show it.
    pub fn weights_source_name(&self) -> &'static str {
        match self.weights_source() {
            WeightsSource::Safetensors => "safetensors",
            WeightsSource::Estimated => "estimated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_huge_configs_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A FIFO nobody writes to: opening it for reading would wait for ever.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let e = load_model(&fifo).expect_err("a FIFO");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let d = dir.path().join("fifo-model");
        std::fs::create_dir(&d).expect("mkdir");
        nix::unistd::mkfifo(&d.join("config.json"), nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        assert!(load_model(&d).expect_err("a FIFO config").to_string().contains("not a regular file"));
        let e = load_model(Path::new("/dev/zero")).expect_err("a device");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.path().join("big");
        std::fs::create_dir(&big).expect("mkdir");
        let f = std::fs::File::create(big.join("config.json")).expect("create");
        f.set_len(MAX_CONFIG_BYTES + 1).expect("sparse 16 MiB + 1");
        let e = load_model(&big).expect_err("too big");
        assert!(e.to_string().contains("at most 16777216 bytes"), "{e}");
    }

    const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "hidden_size": 64,
        "num_hidden_layers": 2, "vocab_size": 128, "intermediate_size": 256, "torch_dtype": "bfloat16"}"#;

    #[test]
    fn a_sharded_checkpoint_is_summed_through_its_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.json"), CONFIG).expect("write");
        let a = safetensors::build_file(&[
            ("model.embed_tokens.weight", "BF16", &[128, 64]),
            ("model.layers.0.w", "BF16", &[64, 64]),
        ]);
        let b =
            safetensors::build_file(&[("model.layers.1.w", "BF16", &[64, 64]), ("lm_head.weight", "BF16", &[128, 64])]);
        std::fs::write(dir.path().join("model-00001-of-00002.safetensors"), a).expect("write");
        std::fs::write(dir.path().join("model-00002-of-00002.safetensors"), b).expect("write");
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "model.layers.0.w": "model-00001-of-00002.safetensors",
                "model.layers.1.w": "model-00002-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}"#,
        )
        .expect("write");
        let m = load_model(dir.path()).expect("load");
        assert_eq!(m.weights_source_name(), "safetensors");
        let w = m.weights.expect("exact weights");
        assert_eq!(w.files, 2);
        assert_eq!(w.per_layer, vec![8192, 8192]);
        assert_eq!((w.embedding, w.lm_head), (16384, 16384));
    }

    #[test]
    fn without_weights_the_model_is_estimated_and_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.json"), CONFIG).expect("write");
        let m = load_model(dir.path()).expect("load");
        assert!(m.weights.is_none());
        let m = load_model(&dir.path().join("config.json")).expect("bare config");
        assert_eq!(m.desc.num_hidden_layers, 2);

        let e = load_model(&dir.path().join("nope")).expect_err("missing");
        assert!(e.to_string().contains("nope"), "{e}");
        std::fs::write(dir.path().join("model.safetensors"), [0u8; 3]).expect("write");
        let e = load_model(dir.path()).expect_err("corrupt weights");
        assert!(e.to_string().contains("model.safetensors: not a valid safetensors file"), "{e}");
    }
}
