//! Environment variable names. Every flag of every binary can also be set as `TESSERA_<FLAG>`;
//! the names are collected here so that they are documented and spelled once.

/// Head URL for the CLI and workers (`--head`).
pub const HEAD: &str = "TESSERA_HEAD";
/// gRPC listen address of the head (`--listen`).
pub const LISTEN: &str = "TESSERA_LISTEN";
/// Head data directory (`--data-dir`).
pub const DATA_DIR: &str = "TESSERA_DATA_DIR";
/// Worker state directory (`--state-dir`).
pub const STATE_DIR: &str = "TESSERA_STATE_DIR";
/// Node name (`--node-name`).
pub const NODE_NAME: &str = "TESSERA_NODE_NAME";
/// Advertise address (`--advertise-addr`).
pub const ADVERTISE_ADDR: &str = "TESSERA_ADVERTISE_ADDR";
/// Node labels, `k=v,k=v` (`--labels`).
pub const LABELS: &str = "TESSERA_LABELS";
/// Fake GPUs, `COUNTxMEMORY` (`--fake-gpus`).
pub const FAKE_GPUS: &str = "TESSERA_FAKE_GPUS";
/// Log format, `text` or `json` (`--log-format`).
pub const LOG_FORMAT: &str = "TESSERA_LOG_FORMAT";
/// Log filter in `RUST_LOG` syntax (`--log-level`).
pub const LOG_LEVEL: &str = "TESSERA_LOG_LEVEL";
/// Heartbeat interval the head asks of workers (`--heartbeat-interval`).
pub const HEARTBEAT_INTERVAL: &str = "TESSERA_HEARTBEAT_INTERVAL";
/// Silence after which the head declares a node dead (`--node-timeout`).
pub const NODE_TIMEOUT: &str = "TESSERA_NODE_TIMEOUT";
/// Time a worker whose session broke has to reconnect before it is dead (`--reconnect-grace`).
pub const RECONNECT_GRACE: &str = "TESSERA_RECONNECT_GRACE";
/// Run the head without its in-process worker (`--no-worker`).
pub const NO_WORKER: &str = "TESSERA_NO_WORKER";
/// Output format of CLI commands (`-o/--output`).
pub const OUTPUT: &str = "TESSERA_OUTPUT";
