//! Tessera's shared vocabulary: domain types, validation, and the pure math of placement.
//!
//! Nothing here does I/O on its own; the head, the worker and the CLI all build on these types.
//!
//! # Layout
//! - [`auth`]: bearer tokens (join and admin), their files, the check and the client interceptor.
//! - [`files`]: private files and dirs for secrets (umask 077, 0700 dirs, warnings).
//! - [`ids`]: typed ids (node, deployment incarnation, generation, process key).
//! - [`node`]: GPUs, inventories, node states, join info, and their proto conversions.
//! - [`validate`]: field rules (names, labels, lengths) with errors that name the field.
//! - [`model`]: model configs and safetensors headers -> what the planner needs.
//! - [`plan`]: the sharding planner (TP/PP rules, stages, memory fit, placement); pure.
//! - [`fake`]: `--fake-gpus COUNTxMEMORY` and the fake inventory it makes.
//! - [`tls`]: TLS settings from PEM files.
//! - [`size`]: human byte sizes (`80GiB`).
//! - [`duration`]: human durations (`500ms`, `3s`).
//! - [`env`]: the `TESSERA_*` environment variable names.

pub mod auth;
pub mod duration;
pub mod env;
pub mod fake;
pub mod files;
mod hostile;
pub mod ids;
pub mod model;
pub mod node;
pub mod plan;
pub mod size;
pub mod tls;
pub mod validate;

/// An error and its sources on one line: `connect failed: tcp connect error: Connection refused`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Version of this build of Tessera, reported by every binary and in every join.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
