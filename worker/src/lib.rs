//! The Tessera worker: reports this machine's GPUs and holds a membership session with the head.
//!
//! # Layout
//! - [`agent`]: the session loop (join, heartbeat, reconnect with backoff, leave).
//! - [`config`]: `--config FILE` (TOML) and `--print-config` for the daemons.
//! - [`gpu`]: GPU inventory behind one trait: NVML (real) or fake.
//! - [`shard`]: hosting shards: shims, the probe engine, launch/stop/fencing, logs.
//! - [`metrics`]: the worker's Prometheus metrics; [`ops`]: the /metrics, /healthz, /readyz endpoint.
//! - [`notify`]: systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING).
//! - [`state`]: the state directory (node id, lock, machine fingerprint).
//! - [`args`]: the agent's flags, shared with `tessera-head`.
//! - [`telemetry`]: logging set-up.
//! - [`signals`]: SIGTERM/SIGINT to a cancellation token.
//! - [`stage`]: weight staging: the model cache, the transfer server, fetching and indexing.

pub mod agent;
pub mod args;
pub mod config;
pub mod gpu;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod shard;
pub mod signals;
pub mod stage;
pub mod state;
pub mod telemetry;
