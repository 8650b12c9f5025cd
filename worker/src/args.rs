//! The flags of the worker agent, shared by `tessera-worker` and `tessera-head` (whose in-process
//! worker takes the same options). They live in the library, against the habit of keeping clap in
//! binaries, because two binaries must spell them identically; [`NodeArgs::to_parts`] turns them
//! into typed values at once.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;
use tessera_common::env;
use tessera_common::fake::FakeGpuSpec;
use tessera_common::validate;

/// Options that describe this node to the head.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Name of this node as shown in `tessera nodes` [default: the host name]
    #[arg(long, env = env::NODE_NAME, value_name = "NAME")]
    pub node_name: Option<String>,

    /// Address other nodes use to reach this one (engines' VLLM_HOST_IP and master address). Default:
    /// the address the head sees this node connect from. Set it on multi-NIC hosts.
    #[arg(long, env = env::ADVERTISE_ADDR, value_name = "IP")]
    pub advertise_addr: Option<IpAddr>,

    /// Labels for placement and display, as KEY=VALUE pairs separated by commas (zone=a,rack=12)
    #[arg(long, env = env::LABELS, value_name = "K=V,...", default_value = "")]
    pub labels: String,

    /// Pretend this node has GPUs: COUNTxMEMORY, e.g. 4x80GiB. For machines without GPUs and for
    /// tests; fake GPUs are marked fake everywhere they are shown.
    #[arg(long, env = env::FAKE_GPUS, value_name = "COUNTxMEM")]
    pub fake_gpus: Option<FakeGpuSpec>,
}

/// Where a worker keeps its node id.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// Directory for the node id and shard state; one worker per directory
    #[arg(long, env = env::STATE_DIR, value_name = "DIR", default_value = "/var/lib/tessera/worker")]
    pub state_dir: PathBuf,
}

/// Typed node options.
pub struct NodeParts {
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    pub advertise_addr: Option<IpAddr>,
    pub fake_gpus: Option<FakeGpuSpec>,
}

impl NodeArgs {
    pub fn to_parts(&self) -> Result<NodeParts, validate::FieldError> {
        let node_name = self.node_name.clone().unwrap_or_else(crate::state::default_node_name);
        validate::node_name("--node-name", &node_name)?;
        Ok(NodeParts {
            node_name,
            labels: validate::parse_labels(&self.labels)?,
            advertise_addr: self.advertise_addr,
            fake_gpus: self.fake_gpus,
        })
    }
}

/// Logging options, the same for every daemon.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format: text for people, json for log collectors
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value_t = crate::telemetry::LogFormat::Text)]
    pub log_format: crate::telemetry::LogFormat,

    /// Log filter, in RUST_LOG syntax (info, debug, tessera_head=debug,...)
    #[arg(long, env = env::LOG_LEVEL, default_value = "info", value_name = "FILTER")]
    pub log_level: String,
}

/// How this node hosts shards.
#[derive(Debug, Clone, Args)]
pub struct ShardArgs {
    /// The vllm executable for the vllm engine [default: `vllm` on PATH]
    #[arg(long, env = "TESSERA_VLLM_BIN", value_name = "PATH")]
    pub vllm_bin: Option<PathBuf>,

    /// Run the command engine's shell templates on this node. Off by default, so that an admin
    /// token alone does not give a shell on every GPU node
    #[arg(long, env = "TESSERA_ALLOW_COMMAND")]
    pub allow_command: bool,

    /// A shim that has lost its agent this long stops its engine and exits (no orphans)
    #[arg(long, env = "TESSERA_ORPHAN_TIMEOUT", value_parser = tessera_common::duration::parse_positive_duration, default_value = "30s")]
    pub orphan_timeout: std::time::Duration,

    /// Run engines as this user (not as the daemon's): they cannot read the daemon's tokens or
    /// state. Needs the worker to run as root. Default: the daemon's own user
    #[arg(long, env = "TESSERA_ENGINE_USER", value_name = "USER")]
    pub engine_user: Option<String>,

    /// The model cache: staged model files by sha256, shared by every deployment [default:
    /// STATE_DIR/cache]
    #[arg(long, env = "TESSERA_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Most bytes the model cache may hold (e.g. 500GiB); files no running deployment uses are
    /// evicted, least recently used first. Default: no limit but the disk (1 GiB is left free)
    #[arg(long, env = "TESSERA_CACHE_MAX_BYTES", value_name = "SIZE", value_parser = parse_cache_size)]
    pub cache_max_bytes: Option<u64>,

    /// Address of this node's model transfer server, which other nodes of a staging fetch files
    /// from (a token per staging; only that staging's files). Port 0 picks a free one
    #[arg(long, env = "TESSERA_TRANSFER_LISTEN", value_name = "ADDR:PORT", default_value = "0.0.0.0:0")]
    pub transfer_listen: std::net::SocketAddr,

    /// Most bytes per second this node fetches when staging models (e.g. 500MiB), so that staging
    /// leaves room on the network for serving. Default: no limit
    #[arg(long, env = "TESSERA_TRANSFER_MAX_RATE", value_name = "SIZE", value_parser = parse_cache_size)]
    pub transfer_max_rate: Option<u64>,

    /// Where engines' output goes: `file` (STATE_DIR's process dirs only, read by `tessera logs`)
    /// or `both` (also this daemon's stdout, a line at a time prefixed with
    /// `[DEPLOYMENT gGENERATION PROCESS]`: journald, `kubectl logs`). `stdout` is `both`: the file
    /// is always kept, for `tessera logs` and failure messages
    #[arg(long, env = "TESSERA_ENGINE_LOGS", value_enum, default_value_t = EngineLogs::Both)]
    pub engine_logs: EngineLogs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineLogs {
    File,
    Stdout,
    Both,
}

fn parse_cache_size(s: &str) -> Result<u64, String> {
    tessera_common::size::parse_size(s).map_err(|e| e.to_string())
}

impl ShardArgs {
    /// The shard host's settings, with shard state under `state_dir`.
    pub fn host_config(&self, state_dir: &std::path::Path) -> Result<crate::shard::HostConfig, String> {
        let engine_user = match &self.engine_user {
            None => None,
            Some(_) if !nix::unistd::geteuid().is_root() => {
                return Err("--engine-user needs the worker to run as root (it starts engines as another user)".into());
            }
            Some(name) => Some(crate::shard::spec::EngineUser::lookup(name)?),
        };
        Ok(crate::shard::HostConfig {
            state_dir: state_dir.to_path_buf(),
            exe: std::env::current_exe().map_err(|e| format!("cannot find this executable for the shims: {e}"))?,
            vllm_bin: self.vllm_bin.clone(),
            allow_command: self.allow_command,
            orphan_timeout: self.orphan_timeout,
            log_max_bytes: 16 << 20,
            engine_user,
            models_dir: Some(self.cache_root(state_dir).join("models")),
            echo_logs: self.engine_logs != EngineLogs::File,
        })
    }

    fn cache_root(&self, state_dir: &std::path::Path) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| state_dir.join("cache"))
    }

    /// Staging's settings, with the cache under `state_dir` unless --cache-dir says otherwise.
    pub fn stage_config(&self, state_dir: &std::path::Path) -> crate::stage::StageConfig {
        crate::stage::StageConfig {
            cache_dir: self.cache_root(state_dir),
            max_bytes: self.cache_max_bytes.unwrap_or(0),
            listen: self.transfer_listen,
            state_dir: state_dir.to_path_buf(),
            max_rate: self.transfer_max_rate.unwrap_or(0),
        }
    }
}

/// The token this process presents to the head.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Token for the head: the join token for workers (the head writes it to DATA_DIR/join.token).
    /// Prefer --token-file: a command line is visible to every user of the machine
    #[arg(long, env = "TESSERA_TOKEN", value_name = "TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,

    /// File holding the token (first line)
    #[arg(long, env = "TESSERA_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    pub fn resolve(&self) -> Result<Option<String>, String> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => tessera_common::auth::check_token_syntax(t)
                .map(|_| Some(t.clone()))
                .map_err(|e| format!("--token: {e}")),
            (None, Some(p)) => tessera_common::auth::read_token_file(p)
                .map(Some)
                .map_err(|e| format!("--token-file {}: {e}", p.display())),
            (None, None) => Ok(None),
        }
    }
}

/// TLS towards the head.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// CA certificate (PEM) that signed the head's certificate; needed for an https:// head
    #[arg(long, env = "TESSERA_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM), when the head requires client certificates (mTLS)
    #[arg(long, env = "TESSERA_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Key (PEM) of --tls-cert
    #[arg(long, env = "TESSERA_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    pub fn client_config(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
        tessera_common::tls::client_config(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            None,
        )
    }
}
