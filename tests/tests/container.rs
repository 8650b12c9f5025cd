//! The container entrypoint picks the role from TESSERA_ROLE or LeaderWorkerSet's variables.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn run(env: &[(&str, &str)]) -> (i32, String, String) {
    let bin = tempfile::tempdir().expect("tempdir");
    for name in ["tessera-head", "tessera-worker"] {
        let p = bin.path().join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho \"{name} $* HEAD=${{TESSERA_HEAD:-}} NAME=${{TESSERA_NODE_NAME:-}}\"\n"),
        )
        .expect("stub");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/container/entrypoint.sh");
    let mut c = Command::new("sh");
    c.arg(script).env_clear().env("PATH", path);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run entrypoint");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn roles_from_tessera_role_and_from_leaderworkerset() {
    let (code, out, _) = run(&[("TESSERA_ROLE", "head")]);
    assert_eq!((code, out.as_str()), (0, "tessera-head --data-dir /var/lib/tessera/head HEAD= NAME="));

    let (code, out, _) = run(&[("LWS_WORKER_INDEX", "0"), ("LWS_LEADER_ADDRESS", "llama-0.llama")]);
    assert_eq!(code, 0);
    assert!(out.starts_with("tessera-head "), "index 0 is the head: {out}");

    let (code, out, _) = run(&[("LWS_WORKER_INDEX", "1"), ("LWS_LEADER_ADDRESS", "llama-0.llama")]);
    assert_eq!(
        (code, out.as_str()),
        (0, "tessera-worker --state-dir /var/lib/tessera/worker HEAD=http://llama-0.llama:7470 NAME=worker-1")
    );

    let (_, out, _) = run(&[("LWS_WORKER_INDEX", "2"), ("LWS_LEADER_ADDRESS", "l0"), ("TESSERA_TLS_CA", "/ca.pem")]);
    assert!(out.contains("HEAD=https://l0:7470"), "TLS makes it https: {out}");

    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("set TESSERA_ROLE"), "{err}");
    let (code, _, err) = run(&[("TESSERA_ROLE", "worker")]);
    assert_eq!(code, 2);
    assert!(err.contains("needs TESSERA_HEAD"), "{err}");
}
