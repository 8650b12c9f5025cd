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
pub mod manifest;
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

/// The heads in a `--head` value: one URL, or several separated by commas (heads on one etcd
/// store, of which one leads). Empty parts are skipped; at most 16.
pub fn head_list(value: &str) -> Result<Vec<String>, String> {
    let heads: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('/').to_string())
        .collect();
    if heads.is_empty() {
        return Err(format!("--head {value:?} names no head; write e.g. http://10.0.0.1:7470"));
    }
    if heads.len() > 16 {
        return Err(format!("--head names {} heads; at most 16", heads.len()));
    }
    Ok(heads)
}

#[cfg(test)]
mod head_list_tests {
    #[test]
    fn head_lists_split_on_commas() {
        assert_eq!(super::head_list("http://a:1").expect("one"), vec!["http://a:1".to_string()]);
        assert_eq!(
            super::head_list(" http://a:1/, http://b:2 ,").expect("two"),
            vec!["http://a:1".to_string(), "http://b:2".to_string()]
        );
        assert!(super::head_list(" , ").expect_err("empty").contains("names no head"));
    }
}
