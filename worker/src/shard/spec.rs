//! What a shim runs, written as `spec.json` in the process's directory before the shim starts, and
//! the line protocol between a shim and its agent.
//!
//! Directory of one process: `<state-dir>/shards/<deployment>/<uid>-g<generation>/<key>/` holding
//! `spec.json`, `state.json` (pid, exit), `shim.sock`, `output.log` (+ `.1`, `.2` rotated) and
//! `shim.log`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShimSpec {
    pub deployment: String,
    /// The deployment's incarnation (empty in specs written before incarnations existed).
    #[serde(default)]
    pub deployment_uid: String,
    pub generation: u64,
    pub key: String,
    pub ranks: Vec<u32>,
    /// Program and arguments.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Seconds between SIGTERM and SIGKILL.
    pub stop_grace_s: u64,
    /// Seconds without an agent after which the shim stops its engine and exits.
    pub orphan_timeout_s: u64,
    /// Largest size of output.log before it is rotated.
    pub log_max_bytes: u64,
    /// Health endpoint to poll for readiness (agent side), if any.
    pub health_port: Option<u16>,
    pub master_port: Option<u16>,
    /// `--engine-user`: the engine runs as this user, not as the daemon's.
    #[serde(default)]
    pub run_as: Option<EngineUser>,
    /// Address the health endpoint is checked on; empty: 127.0.0.1.
    #[serde(default)]
    pub health_host: String,
    /// Seconds the process may take to get ready (0: no deadline).
    #[serde(default)]
    pub startup_timeout_s: u64,
    /// Checks of a ready engine (node rank 0 of vllm).
    #[serde(default)]
    pub liveness: Option<LivenessSpec>,
    /// The staged model directory's key (kept from cache eviction while the process lives).
    #[serde(default)]
    pub staged_model: String,
}

/// `pb::Liveness`, as kept in `spec.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LivenessSpec {
    pub stall_timeout_ms: u64,
    pub canary_interval_ms: u64,
    pub model: String,
    pub check_interval_ms: u64,
    /// The API key the canary presents (vLLM's `--api-key` / `VLLM_API_KEY`).
    #[serde(default)]
    pub api_key: String,
}

/// A user engines run as (`--engine-user`), resolved when the worker starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl EngineUser {
    /// Looks `name` up in the user database.
    pub fn lookup(name: &str) -> Result<EngineUser, String> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(EngineUser { name: u.name, uid: u.uid.as_raw(), gid: u.gid.as_raw(), home: u.dir }),
            Ok(None) => Err(format!(
                "--engine-user {name:?}: no such user; create it (useradd --system {name}) or name another"
            )),
            Err(e) => Err(format!("--engine-user {name:?}: cannot read the user database: {e}")),
        }
    }
}

/// `state.json`: what the shim knows about its engine, for an agent that connects later.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShimState {
    pub shim_pid: u32,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when the engine could not be started at all.
    pub error: Option<String>,
    pub exited: bool,
    /// When the engine exited (Unix milliseconds).
    #[serde(default)]
    pub exited_unix_ms: Option<u64>,
}

/// Shim -> agent: the state, sent on connect and on every change.
/// Agent -> shim: commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ShimCommand {
    /// Stop the engine (SIGTERM to its group, SIGKILL after the grace), then exit.
    Stop,
}

pub fn spec_path(dir: &Path) -> PathBuf {
    dir.join("spec.json")
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("shim.sock")
}

pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("output.log")
}

/// The process directory for a deployment incarnation's generation's key.
pub fn process_dir(state_dir: &Path, deployment: &str, uid: &str, generation: u64, key: &str) -> PathBuf {
    let generation_dir = if uid.is_empty() { format!("g{generation}") } else { format!("{uid}-g{generation}") };
    state_dir.join("shards").join(deployment).join(generation_dir).join(key)
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Writes JSON atomically (temp file + rename).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    // A spec holds the deployment's env (tokens): its user's alone, whatever the umask.
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    f.write_all(&data)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<T> {
    let data = std::fs::read(path)?;
    serde_json::from_slice(&data).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
