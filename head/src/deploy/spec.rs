//! A deployment's spec, validated on receipt, and the processes each engine runs on each node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tessera_common::model::{DType, ModelDesc, load::Model};
use tessera_common::plan::memory::Weights;
use tessera_proto::v1 as pb;
use tonic::Status;

use super::engine::vllm;

/// Default group restarts allowed within [`RESTART_WINDOW`].
pub const DEFAULT_MAX_RESTARTS: u32 = 5;
/// The window in which restarts are counted.
pub const RESTART_WINDOW: Duration = Duration::from_secs(600);
/// Seconds between SIGTERM and SIGKILL when stopping a process.
pub const STOP_GRACE_S: u32 = 10;
/// Most bytes of `env` (names and values) and of `engine_args` (each) a deployment may carry: every
/// launch repeats them per process, and a launch must fit the 4 MiB a worker accepts.
pub const MAX_ENV_BYTES: usize = 256 * 1024;
pub const MAX_ARGS_BYTES: usize = 256 * 1024;

/// Environment variables Tessera sets from the placement; a deployment may not override them.
const RESERVED_ENV: &[&str] = &[
    "CUDA_VISIBLE_DEVICES",
    "VLLM_HOST_IP",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TESSERA_DEPLOYMENT",
    "TESSERA_GENERATION",
    "TESSERA_TP_RANK",
    "TESSERA_PP_RANK",
    "TESSERA_LAYER_START",
    "TESSERA_LAYER_END",
    "TESSERA_PROCESS_DIR",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Vllm,
    Command,
    Probe,
}

impl Engine {
    pub fn to_pb(self) -> pb::Engine {
        match self {
            Engine::Vllm => pb::Engine::Vllm,
            Engine::Command => pb::Engine::Command,
            Engine::Probe => pb::Engine::Probe,
        }
    }
}

/// What the user asked for, validated.
#[derive(Debug, Clone)]
pub struct DeploymentSpec {
    pub name: String,
    pub model_path: PathBuf,
    pub tp: u64,
    pub pp: u64,
    pub engine: Engine,
    pub engine_args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Group restarts allowed within 10 minutes.
    pub max_restarts: u32,
    pub command: String,
    pub per_node: bool,
    pub gpu_memory_utilization: f64,
    pub max_model_len: Option<u64>,
    /// vllm: `--kv-cache-dtype` from the engine args (None: the model's dtype).
    pub kv_cache_dtype: Option<DType>,
    /// vllm: `VLLM_PP_LAYER_PARTITION` from the env.
    pub layer_partition: Option<Vec<u64>>,
    /// How long a generation may take to get ready.
    pub startup_timeout: Duration,
    /// vllm: the progress watchdog's and the canary's limit (None: off).
    pub stall_timeout: Option<Duration>,
    /// vllm: how often an idle engine gets a canary request (None: never).
    pub canary_interval: Option<Duration>,
    /// How long a replica stopped on purpose keeps serving what is in flight (None: no drain).
    pub drain_timeout: Option<Duration>,
    /// Which revision of the deployment's spec this is (1, then +1 per update).
    pub revision: u32,
    /// The revision before (for a rollback); its own `previous` is not kept.
    pub previous: Option<Box<DeploymentSpec>>,
    /// Weight staging: the model is read on the head and each other node gets its stages' files.
    pub staging: bool,
    /// Staging was asked for (not the default): when the model's node cannot serve it, Create is
    /// refused rather than staging turned off.
    pub staging_asked: bool,
    /// The node holding the model (name or id) when it is not the head (`--model-from`).
    pub model_from: String,
    /// Only nodes with these labels run it (`--node-selector`).
    pub node_selector: BTreeMap<String, String>,
    /// Who declared it (`deployments-dir`: the head's `--deployments DIR`); empty: a call.
    pub managed_by: String,
    /// What that node said of the model (see [`Described`]), kept so that a restarted head can plan
    /// it again.
    pub described: Option<String>,
}

/// A model described by the node holding it (`--model-from`): its config.json and weight sizes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Described {
    pub config_json: String,
    pub weights_json: String,
}

impl Described {
    /// The model, checked like any bytes from a worker: the config parsed as the head parses its
    /// own, the weight sizes consistent with it.
    pub fn load(&self, path: &std::path::Path) -> Result<LoadedModel, String> {
        let desc = tessera_common::model::config::parse_config(&path.display().to_string(), &self.config_json)
            .map_err(|e| e.to_string())?;
        let weights: Option<tessera_common::model::safetensors::WeightBytes> = if self.weights_json.is_empty() {
            None
        } else {
            let w: tessera_common::model::safetensors::WeightBytes =
                serde_json::from_str(&self.weights_json).map_err(|e| format!("weight sizes: {e}"))?;
            let layers = desc.num_hidden_layers as usize;
            if w.per_layer.len() != layers || w.per_layer_replicated.len() != layers {
                return Err(format!("weight sizes for {} layers, the config has {layers}", w.per_layer.len()));
            }
            // At most 1 PiB each: sums of these never overflow.
            let limit = 1u64 << 50;
            let all = w.per_layer.iter().chain(&w.per_layer_replicated).chain([
                &w.embedding,
                &w.lm_head,
                &w.first_stage_other,
                &w.last_stage_other,
                &w.unused,
            ]);
            if all.into_iter().any(|&b| b > limit) {
                return Err("weight sizes over 1 PiB".into());
            }
            Some(w)
        };
        Ok(LoadedModel::of(&tessera_common::model::load::Model { path: path.to_path_buf(), desc, weights }))
    }
}

impl DeploymentSpec {
    /// The deployment this group belongs to (`name` is the group's key, see [`group_key`]).
    pub fn deployment(&self) -> &str {
        parent_of(&self.name).0
    }

    /// Which replica of its deployment this group is.
    pub fn replica(&self) -> u32 {
        parent_of(&self.name).1
    }

    /// Whether `other` asks for the same thing (names, revisions and history aside): an update to
    /// it changes nothing.
    pub fn same_as(&self, other: &DeploymentSpec) -> bool {
        let strip =
            |s: &DeploymentSpec| DeploymentSpec { name: String::new(), revision: 0, previous: None, ..s.clone() };
        format!("{:?}", strip(self)) == format!("{:?}", strip(other))
    }
}

/// vLLM 0.33's default `--gpu-memory-utilization`, passed explicitly so that what runs is what
/// was planned.
pub use tessera_common::plan::DEFAULT_GPU_MEMORY_UTILIZATION;
/// Default `--startup-timeout`: DeepSeek-size checkpoints take tens of minutes to load.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default `--stall-timeout` and `--canary-interval`.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CANARY_INTERVAL: Duration = Duration::from_secs(30);
/// Default `--drain-timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `startup_timeout_s` as the API and the store carry it: 0 means the default.
pub fn startup_from_wire(s: u32) -> Duration {
    if s == 0 { DEFAULT_STARTUP_TIMEOUT } else { Duration::from_secs(u64::from(s)) }
}

/// A check's period as the API and the store carry it (`stall_timeout_s`, `canary_interval_s`):
/// 0 means `default`, negative means off.
pub fn check_from_wire(v: i32, default: Duration) -> Option<Duration> {
    match v {
        0 => Some(default),
        v if v < 0 => None,
        v => Some(Duration::from_secs(v as u64)),
    }
}

/// The other way: off is -1.
pub fn check_to_wire(d: Option<Duration>) -> i32 {
    d.map(|d| i32::try_from(d.as_secs()).unwrap_or(i32::MAX)).unwrap_or(-1)
}

/// Longest start-up deadline and check period accepted (a week; a day).
const MAX_STARTUP_S: u32 = 7 * 24 * 3600;
const MAX_CHECK_S: i32 = 24 * 3600;

/// The model, loaded once at create.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub desc: ModelDesc,
    pub weights: Weights,
}

impl LoadedModel {
    pub fn of(m: &Model) -> Self {
        LoadedModel {
            desc: m.desc.clone(),
            weights: m.weights.as_ref().map(Weights::exact).unwrap_or_else(|| Weights::estimate(&m.desc)),
        }
    }
}

/// `model_path` of a request: an absolute path on the head's filesystem.
pub fn model_path(p: &str) -> Result<PathBuf, Status> {
    if p.is_empty() {
        return Err(Status::invalid_argument("model_path: missing; give a model directory or config.json on the head"));
    }
    if p.len() > 4096 || p.contains('\0') {
        return Err(Status::invalid_argument("model_path: not a usable path (too long or contains NUL)"));
    }
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "model_path: {p:?} is relative; give an absolute path (the head reads it on its own filesystem)"
        )));
    }
    Ok(path)
}

fn bad(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

/// A DNS label: 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit.
/// Replicas a deployment may have.
pub const MAX_REPLICAS: u32 = 64;

/// The key of replica `index` of deployment `name` in the state machine, the store and on the
/// workers: the name itself for replica 0, `name.INDEX` for the others. A name has no '.', so keys
/// cannot clash with names.
pub fn group_key(name: &str, index: u32) -> String {
    if index == 0 { name.to_string() } else { format!("{name}.{index}") }
}

/// The deployment and replica index of a group key.
pub fn parent_of(key: &str) -> (&str, u32) {
    match key.split_once('.') {
        Some((name, i)) => (name, i.parse().unwrap_or(0)),
        None => (key, 0),
    }
}

/// `replicas` as the API carries it: 0 means 1.
pub fn replicas_from_wire(n: u32) -> Result<u32, Status> {
    match n {
        0 => Ok(1),
        n if n > MAX_REPLICAS => Err(bad("replicas", format!("{n} is more than {MAX_REPLICAS}"))),
        n => Ok(n),
    }
}

pub fn check_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(bad(
            "name",
            format!(
                "{name:?} is not a DNS label: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
            ),
        ))
    }
}

/// `managed_by`: empty, or a short printable word (`deployments-dir`).
fn managed_by(v: &str) -> Result<String, Status> {
    if v.len() > 64 || v.chars().any(|c| !(c.is_ascii_alphanumeric() || "-_.:/".contains(c))) {
        return Err(bad("managed_by", format!("{v:?}: at most 64 letters, digits and - _ . : /")));
    }
    Ok(v.to_string())
}

/// `node_selector`: label pairs as workers' `--labels` are written (at most 32).
fn node_selector(m: &std::collections::HashMap<String, String>) -> Result<BTreeMap<String, String>, Status> {
    if m.len() > 32 {
        return Err(bad("node_selector", format!("{} labels; at most 32", m.len())));
    }
    let text: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let parsed = tessera_common::validate::parse_labels(&text.join(","))
        .map_err(|e| bad("node_selector", e.message.replace("--labels", "node_selector")))?;
    if parsed.len() != m.len() {
        return Err(bad("node_selector", "a key or value holds a ',' or '='"));
    }
    Ok(parsed)
}

/// Whether a request stages its model: on for the vllm and command engines when the model is a
/// directory (the probe reads no weights); `STAGING_MODE_ON` needs a directory.
fn staging_from_request(
    r: &pb::CreateDeploymentRequest,
    model: &std::path::Path,
    engine: Engine,
) -> Result<bool, Status> {
    let is_dir = std::fs::metadata(model).is_ok_and(|m| m.is_dir());
    match pb::StagingMode::try_from(r.staging).unwrap_or(pb::StagingMode::Unspecified) {
        pb::StagingMode::Off => Ok(false),
        // On another node (--model-from): what it is, that node says when it is asked.
        _ if !r.model_from.is_empty() => Ok(r.staging != pb::StagingMode::Off as i32
            && (r.staging == pb::StagingMode::On as i32 || engine != Engine::Probe)),
        pb::StagingMode::On if !is_dir => Err(bad(
            "staging",
            format!(
                "{} is not a directory on the head: staging sends a model directory (use staging off when every node has the model at this path)",
                model.display()
            ),
        )),
        pb::StagingMode::On => Ok(true),
        pb::StagingMode::Unspecified => Ok(is_dir && engine != Engine::Probe),
    }
}

impl DeploymentSpec {
    pub fn from_request(r: &pb::CreateDeploymentRequest) -> Result<Self, Status> {
        check_name(&r.name)?;
        let model_path = model_path(&r.model_path)?;
        let size = |field: &str, v: u32| -> Result<u64, Status> {
            match v {
                0 => Ok(1),
                1..=4096 => Ok(v as u64),
                _ => Err(bad(field, format!("{v} is more than 4096"))),
            }
        };
        let tp = size("tp", r.tp)?;
        let pp = size("pp", r.pp)?;
        let engine = match pb::Engine::try_from(r.engine).unwrap_or(pb::Engine::Unspecified) {
            pb::Engine::Vllm => Engine::Vllm,
            pb::Engine::Command => Engine::Command,
            pb::Engine::Probe => Engine::Probe,
            pb::Engine::Unspecified => return Err(bad("engine", "is required: one of vllm, command, probe")),
        };
        if r.engine_args.len() > 256 {
            return Err(bad("engine_args", format!("{} arguments; at most 256", r.engine_args.len())));
        }
        for (i, a) in r.engine_args.iter().enumerate() {
            if a.len() > 4096 || a.contains('\0') {
                return Err(bad(&format!("engine_args[{i}]"), "longer than 4096 bytes or contains NUL"));
            }
        }
        let args_bytes: usize = r.engine_args.iter().map(String::len).sum();
        if args_bytes > MAX_ARGS_BYTES {
            return Err(bad(
                "engine_args",
                format!(
                    "{args_bytes} bytes in all; at most {MAX_ARGS_BYTES} (put large settings in a file the engine reads)"
                ),
            ));
        }
        let env_bytes: usize = r.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if env_bytes > MAX_ENV_BYTES {
            return Err(bad(
                "env",
                format!(
                    "{env_bytes} bytes in all; at most {MAX_ENV_BYTES} (put large settings in a file the engine reads)"
                ),
            ));
        }
        if r.env.len() > 128 {
            return Err(bad("env", format!("{} variables; at most 128", r.env.len())));
        }
        for (k, v) in &r.env {
            let valid = !k.is_empty()
                && k.len() <= 128
                && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(bad("env", format!("{k:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(bad("env", format!("{k} is set by Tessera from the placement and cannot be overridden")));
            }
            if v.len() > 32 * 1024 || v.contains('\0') {
                return Err(bad("env", format!("the value of {k} is longer than 32 KiB or contains NUL")));
            }
        }
        match engine {
            Engine::Command if r.command.trim().is_empty() => {
                return Err(bad(
                    "command",
                    "is required with the command engine (a shell template, e.g. \"python serve.py --rank {rank}\")",
                ));
            }
            Engine::Command if r.command.len() > 16 * 1024 => return Err(bad("command", "longer than 16 KiB")),
            Engine::Vllm | Engine::Probe if !r.command.is_empty() => {
                return Err(bad("command", "is only for the command engine"));
            }
            _ => {}
        }
        let util = r.gpu_memory_utilization;
        if !(util == 0.0 || util > 0.0 && util <= 1.0) {
            return Err(bad(
                "gpu_memory_utilization",
                format!("{} must be more than 0 and at most 1 (0: the default {DEFAULT_GPU_MEMORY_UTILIZATION})", util),
            ));
        }
        if r.startup_timeout_s > MAX_STARTUP_S {
            let s = r.startup_timeout_s;
            return Err(bad("startup_timeout_s", format!("{s} is more than a week ({MAX_STARTUP_S})")));
        }
        let startup_timeout = startup_from_wire(r.startup_timeout_s);
        let check = |field: &str, v: i32, default: Duration| -> Result<Option<Duration>, Status> {
            if v > MAX_CHECK_S {
                return Err(bad(field, format!("{v} is more than a day ({MAX_CHECK_S} s)")));
            }
            Ok(check_from_wire(v, default))
        };
        let stall_timeout = check("stall_timeout_s", r.stall_timeout_s, DEFAULT_STALL_TIMEOUT)?;
        let canary_interval = check("canary_interval_s", r.canary_interval_s, DEFAULT_CANARY_INTERVAL)?;
        let drain_timeout = check("drain_timeout_s", r.drain_timeout_s, DEFAULT_DRAIN_TIMEOUT)?;
        let max_restarts = match r.max_restarts {
            0 => DEFAULT_MAX_RESTARTS,
            n if n < 0 => 0,
            n if n > 1000 => return Err(bad("max_restarts", format!("{n} is more than 1000"))),
            n => n as u32,
        };
        if r.model_from.len() > 253 || r.model_from.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("model_from", "not a node name or id; `tessera nodes` lists them"));
        }
        let staging = staging_from_request(r, &model_path, engine)?;
        let mut spec = DeploymentSpec {
            name: r.name.clone(),
            model_path,
            tp,
            pp,
            engine,
            engine_args: r.engine_args.clone(),
            env: r.env.clone().into_iter().collect(),
            max_restarts,
            command: r.command.clone(),
            per_node: r.per_node,
            gpu_memory_utilization: if util == 0.0 { DEFAULT_GPU_MEMORY_UTILIZATION } else { util },
            max_model_len: (r.max_model_len > 0).then_some(r.max_model_len),
            kv_cache_dtype: None,
            layer_partition: None,
            startup_timeout,
            stall_timeout,
            canary_interval,
            drain_timeout,
            revision: 1,
            previous: None,
            staging,
            staging_asked: r.staging == pb::StagingMode::On as i32,
            model_from: r.model_from.clone(),
            node_selector: node_selector(&r.node_selector)?,
            managed_by: managed_by(&r.managed_by)?,
            described: None,
        };
        spec.read_engine_settings(util != 0.0).map_err(Status::invalid_argument)?;
        Ok(spec)
    }

    /// vllm: takes what the engine args and env say about the plan into the spec (see
    /// [`vllm::args`]); the planned flags leave `engine_args`, the launch passes them from the
    /// plan. `util_given`: the request set `gpu_memory_utilization` itself.
    pub fn read_engine_settings(&mut self, util_given: bool) -> Result<(), String> {
        if self.engine == Engine::Probe {
            return super::engine::probe::check_args(&self.engine_args);
        }
        if self.engine != Engine::Vllm {
            return Ok(());
        }
        let a = vllm::args::parse(&self.engine_args)?;
        if let Some(u) = a.gpu_memory_utilization {
            if util_given && u != self.gpu_memory_utilization {
                return Err(format!(
                    "gpu_memory_utilization is {} but engine_args say --gpu-memory-utilization {u}: give it once",
                    self.gpu_memory_utilization
                ));
            }
            self.gpu_memory_utilization = u;
        }
        if let Some(l) = a.max_model_len {
            if self.max_model_len.is_some_and(|m| m != l) {
                return Err(format!(
                    "max_model_len is {} but engine_args say --max-model-len {l}: give it once",
                    self.max_model_len.unwrap_or(0)
                ));
            }
            self.max_model_len = Some(l);
        }
        self.kv_cache_dtype = a.kv_cache_dtype;
        self.layer_partition = match self.env.get("VLLM_PP_LAYER_PARTITION") {
            Some(v) => Some(vllm::args::layer_partition(v)?),
            None => None,
        };
        self.engine_args = a.rest;
        Ok(())
    }

    /// vllm: what the engine args say (a spec's args were checked on Create).
    pub fn vllm_args(&self) -> vllm::args::VllmArgs {
        vllm::args::parse(&self.engine_args).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::deploy::engine::fixture::req;

    #[test]
    fn check_periods_round_trip_through_the_wire_with_off_kept_off() {
        let d = Duration::from_secs(30);
        for v in [None, Some(Duration::from_secs(7)), Some(d)] {
            assert_eq!(check_from_wire(check_to_wire(v), d), v);
        }
        assert_eq!(check_from_wire(0, d), Some(d), "0 is the default");
        assert_eq!(startup_from_wire(0), DEFAULT_STARTUP_TIMEOUT);
        let r = pb::CreateDeploymentRequest { stall_timeout_s: -1, canary_interval_s: 5, ..req() };
        let s = DeploymentSpec::from_request(&r).expect("valid");
        assert_eq!((s.stall_timeout, s.canary_interval), (None, Some(Duration::from_secs(5))));
        let e = DeploymentSpec::from_request(&pb::CreateDeploymentRequest { stall_timeout_s: 90_000, ..req() });
        assert!(e.expect_err("too long").message().contains("stall_timeout_s: 90000 is more than a day"));
    }

    #[test]
    fn requests_are_validated_field_by_field() {
        assert!(DeploymentSpec::from_request(&req()).is_ok());
        let cases: Vec<(pb::CreateDeploymentRequest, &str)> = vec![
            (pb::CreateDeploymentRequest { name: "Llama!".into(), ..req() }, "name:"),
            (pb::CreateDeploymentRequest { name: "x".repeat(64), ..req() }, "name:"),
            (pb::CreateDeploymentRequest { model_path: "rel".into(), ..req() }, "model_path:"),
            (
                pb::CreateDeploymentRequest {
                    node_selector: [("zone a".to_string(), "x".to_string())].into_iter().collect(),
                    ..req()
                },
                "node_selector:",
            ),
            (pb::CreateDeploymentRequest { tp: 5000, ..req() }, "tp:"),
            (pb::CreateDeploymentRequest { engine: 0, ..req() }, "engine:"),
            (pb::CreateDeploymentRequest { engine: pb::Engine::Command as i32, ..req() }, "command:"),
            (pb::CreateDeploymentRequest { command: "ls".into(), ..req() }, "command:"),
            (pb::CreateDeploymentRequest { env: [("1BAD".into(), "v".into())].into(), ..req() }, "env:"),
            (
                pb::CreateDeploymentRequest { env: [("CUDA_VISIBLE_DEVICES".into(), "0".into())].into(), ..req() },
                "cannot be overridden",
            ),
            (pb::CreateDeploymentRequest { gpu_memory_utilization: 2.0, ..req() }, "gpu_memory_utilization:"),
            (pb::CreateDeploymentRequest { engine_args: vec!["a".into(); 300], ..req() }, "engine_args:"),
            // ~3.9 MiB of env in 128 variables, each under the per-value limit: refused as a whole.
            (
                pb::CreateDeploymentRequest {
                    env: (0..128).map(|i| (format!("V{i}"), "x".repeat(31 * 1024))).collect(),
                    ..req()
                },
                "bytes in all; at most 262144",
            ),
            (
                pb::CreateDeploymentRequest { engine_args: vec!["y".repeat(4000); 70], ..req() },
                "bytes in all; at most 262144",
            ),
        ];
        for (r, needle) in cases {
            let e = DeploymentSpec::from_request(&r).expect_err(needle);
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(needle), "{needle}: {}", e.message());
        }
        assert_eq!(
            DeploymentSpec::from_request(&pb::CreateDeploymentRequest { max_restarts: -1, ..req() })
                .map(|s| s.max_restarts)
                .ok(),
            Some(0)
        );
        assert_eq!(DeploymentSpec::from_request(&req()).map(|s| s.max_restarts).ok(), Some(5));
    }
}
