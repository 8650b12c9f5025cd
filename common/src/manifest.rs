//! Deployment files (`tessera apply -f`, `tessera-head --deployments DIR`): TOML or YAML with the
//! fields of `tessera deploy`, one deployment per file, or several under `deployments`.
//!
//! ```toml
//! name = "llama"
//! model = "/models/Llama-3.1-70B-Instruct"   # relative paths are taken from the file's directory
//! tp = 8
//! pp = 2
//! replicas = 2
//! engine = "vllm"
//! args = ["--max-num-seqs", "64"]
//! env = { HF_HUB_OFFLINE = "1" }
//! startup_timeout = "30m"
//! ```
//!
//! Unknown fields are refused (a typo must not silently deploy the default), with the file and
//! the field named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tessera_proto::v1 as pb;

/// Largest deployment file read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Most files read from one directory.
pub const MAX_FILES: usize = 1000;

/// One deployment, as written in a file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// Model directory or config.json (relative: from the file's directory).
    pub model: PathBuf,
    #[serde(default = "one")]
    pub tp: u32,
    #[serde(default = "one")]
    pub pp: u32,
    #[serde(default = "one")]
    pub replicas: u32,
    /// `vllm` (the default), `command` or `probe`.
    #[serde(default)]
    pub engine: Option<String>,
    /// The engine's arguments (what follows `--` on the command line).
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `command` engine: the command template.
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub per_node: bool,
    /// 0: never restart.
    #[serde(default)]
    pub max_restarts: Option<i32>,
    #[serde(default)]
    pub gpu_memory_utilization: Option<f64>,
    #[serde(default)]
    pub max_model_len: Option<u64>,
    /// Durations as on the command line (`30m`); `off` where the flag takes it.
    #[serde(default)]
    pub startup_timeout: Option<String>,
    #[serde(default)]
    pub stall_timeout: Option<String>,
    #[serde(default)]
    pub canary_interval: Option<String>,
    #[serde(default)]
    pub drain_timeout: Option<String>,
    /// `auto` (default), `on`, `off`.
    #[serde(default)]
    pub staging: Option<String>,
    #[serde(default)]
    pub model_from: Option<String>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

/// A file with several deployments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Many {
    deployments: Vec<Manifest>,
}

/// Reads the deployments of one file (`.toml`, `.yaml` or `.yml`).
pub fn read_file(path: &Path) -> Result<Vec<Manifest>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("{}: {} bytes; a deployment file holds at most 1 MiB", path.display(), meta.len()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let yaml = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => false,
        Some("yaml" | "yml") => true,
        _ => return Err(format!("{}: name deployment files *.toml, *.yaml or *.yml", path.display())),
    };
    let err = |e: String| format!("{}: {e}", path.display());
    let mut out = if yaml { parse_yaml(&text).map_err(err)? } else { parse_toml(&text).map_err(err)? };
    let base = path.parent().unwrap_or(Path::new("."));
    for m in &mut out {
        if m.model.is_relative() && m.model_from.is_none() {
            m.model = base.join(&m.model);
        }
    }
    Ok(out)
}

fn parse_toml(text: &str) -> Result<Vec<Manifest>, String> {
    let v: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    if v.contains_key("deployments") {
        Ok(toml::from_str::<Many>(text).map_err(|e| e.to_string())?.deployments)
    } else {
        Ok(vec![toml::from_str::<Manifest>(text).map_err(|e| e.to_string())?])
    }
}

fn parse_yaml(text: &str) -> Result<Vec<Manifest>, String> {
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    if v.get("deployments").is_some() {
        Ok(serde_yaml_ng::from_str::<Many>(text).map_err(|e| e.to_string())?.deployments)
    } else {
        Ok(vec![serde_yaml_ng::from_str::<Manifest>(text).map_err(|e| e.to_string())?])
    }
}

/// The deployment files of a directory (not recursive; hidden files and other extensions are
/// skipped), sorted by name.
pub fn files_in(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let p = e.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let ext = p.extension().and_then(|x| x.to_str()).unwrap_or_default();
        if name.starts_with('.') || !matches!(ext, "toml" | "yaml" | "yml") {
            continue;
        }
        files.push(p);
        if files.len() > MAX_FILES {
            return Err(format!("{}: more than {MAX_FILES} deployment files", dir.display()));
        }
    }
    files.sort();
    Ok(files)
}

fn secs(field: &str, v: &Option<String>, off: bool) -> Result<i64, String> {
    let Some(v) = v else { return Ok(0) };
    if off && v.eq_ignore_ascii_case("off") {
        return Ok(-1);
    }
    let d = crate::duration::parse_positive_duration(v).map_err(|e| format!("{field}: {e}"))?;
    Ok(d.as_secs().clamp(1, i32::MAX as u64) as i64)
}

impl Manifest {
    /// The Create request for this deployment; `managed_by` marks who declared it.
    pub fn to_request(&self, managed_by: &str) -> Result<pb::CreateDeploymentRequest, String> {
        let in_name = |e: String| format!("deployment {:?}: {e}", self.name);
        let engine = match self.engine.as_deref().unwrap_or("vllm") {
            "vllm" => pb::Engine::Vllm,
            "command" => pb::Engine::Command,
            "probe" => pb::Engine::Probe,
            other => return Err(in_name(format!("engine {other:?}: write vllm, command or probe"))),
        };
        let staging = match self.staging.as_deref().unwrap_or("auto") {
            "auto" => pb::StagingMode::Unspecified,
            "on" => pb::StagingMode::On,
            "off" => pb::StagingMode::Off,
            other => return Err(in_name(format!("staging {other:?}: write auto, on or off"))),
        };
        let model = if self.model.is_absolute() || self.model_from.is_some() {
            self.model.clone()
        } else {
            std::path::absolute(&self.model).map_err(|e| in_name(format!("model: {e}")))?
        };
        Ok(pb::CreateDeploymentRequest {
            name: self.name.clone(),
            model_path: model.display().to_string(),
            tp: self.tp,
            pp: self.pp,
            engine: engine as i32,
            engine_args: self.args.clone(),
            env: self.env.clone().into_iter().collect(),
            // As on the command line: 0 means never restart (negative on the wire).
            max_restarts: self.max_restarts.map(|n| if n == 0 { -1 } else { n }).unwrap_or(0),
            command: self.command.clone().unwrap_or_default(),
            per_node: self.per_node,
            gpu_memory_utilization: self.gpu_memory_utilization.unwrap_or(0.0),
            max_model_len: self.max_model_len.unwrap_or(0),
            startup_timeout_s: secs("startup_timeout", &self.startup_timeout, false).map_err(in_name)? as u32,
            stall_timeout_s: secs("stall_timeout", &self.stall_timeout, true).map_err(in_name)? as i32,
            canary_interval_s: secs("canary_interval", &self.canary_interval, true).map_err(in_name)? as i32,
            replicas: self.replicas,
            drain_timeout_s: secs("drain_timeout", &self.drain_timeout, true).map_err(in_name)? as i32,
            staging: staging as i32,
            model_from: self.model_from.clone().unwrap_or_default(),
            node_selector: self.node_selector.clone().into_iter().collect(),
            managed_by: managed_by.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn toml_and_yaml_read_the_same_deployment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = write(
            dir.path(),
            "a.toml",
            "name = \"a\"\nmodel = \"m/config.json\"\ntp = 2\nengine = \"probe\"\nargs = [\"--x\"]\nenv = { K = \"v\" }\nstall_timeout = \"off\"\nstartup_timeout = \"30m\"\n",
        );
        let y = write(
            dir.path(),
            "a.yaml",
            "name: a\nmodel: m/config.json\ntp: 2\nengine: probe\nargs: [--x]\nenv:\n  K: v\nstall_timeout: \"off\"\nstartup_timeout: 30m\n",
        );
        let a = read_file(&t).expect("toml");
        let b = read_file(&y).expect("yaml");
        assert_eq!(a, b);
        assert_eq!(a[0].model, dir.path().join("m/config.json"), "relative to the file");
        let r = a[0].to_request("deployments-dir").expect("request");
        assert_eq!((r.tp, r.pp, r.replicas, r.stall_timeout_s, r.startup_timeout_s), (2, 1, 1, -1, 1800));
        assert_eq!(r.engine, pb::Engine::Probe as i32);
        assert_eq!(r.managed_by, "deployments-dir");
        assert_eq!(r.env.get("K").map(String::as_str), Some("v"));
    }

    #[test]
    fn several_per_file_and_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let many = write(
            dir.path(),
            "m.toml",
            "[[deployments]]\nname = \"a\"\nmodel = \"/m\"\n[[deployments]]\nname = \"b\"\nmodel = \"/m\"\nreplicas = 2\n",
        );
        let v = read_file(&many).expect("many");
        assert_eq!(v.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let typo = write(dir.path(), "t.toml", "name = \"a\"\nmodel = \"/m\"\nreplica = 2\n");
        let e = read_file(&typo).expect_err("unknown field");
        assert!(e.contains("t.toml") && e.contains("replica"), "{e}");
        let bad = write(dir.path(), "e.yaml", "name: a\nmodel: /m\nengine: ray\n");
        let e = read_file(&bad).expect("parses")[0].to_request("").expect_err("engine");
        assert!(e.contains("\"ray\"") && e.contains("vllm, command or probe"), "{e}");
        write(dir.path(), ".hidden.toml", "x");
        write(dir.path(), "notes.txt", "x");
        let files = files_in(dir.path()).expect("files");
        assert_eq!(files.len(), 3, "{files:?}");
        assert!(read_file(&dir.path().join("notes.txt")).expect_err("ext").contains("*.toml"));
    }
}
