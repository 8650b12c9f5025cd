//! The `tessera-head` binary's flags: help that explains, env vars, and usage errors (exit 2).

use std::process::Command;

fn head() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera-head"))
}

#[test]
fn help_documents_every_flag_with_its_env_var_and_default() {
    let out = head().arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--listen", "TESSERA_LISTEN"),
        ("--data-dir", "TESSERA_DATA_DIR"),
        ("--heartbeat-interval", "TESSERA_HEARTBEAT_INTERVAL"),
        ("--node-timeout", "TESSERA_NODE_TIMEOUT"),
        ("--reconnect-grace", "TESSERA_RECONNECT_GRACE"),
        ("--no-worker", "TESSERA_NO_WORKER"),
        ("--fake-gpus", "TESSERA_FAKE_GPUS"),
        ("--node-name", "TESSERA_NODE_NAME"),
        ("--advertise-addr", "TESSERA_ADVERTISE_ADDR"),
        ("--labels", "TESSERA_LABELS"),
        ("--log-format", "TESSERA_LOG_FORMAT"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
        assert!(help.contains(env), "{env} missing from --help");
    }
    assert!(
        help.contains("[default: 0.0.0.0:7470]") && help.contains("[default: 3s]") && help.contains("[default: 1s]")
    );
}

#[test]
fn bad_values_exit_2_and_name_the_value() {
    let out = head().args(["--node-timeout", "soon"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"soon\""));

    let out = head().args(["--node-timeout", "600ms", "--heartbeat-interval", "500ms"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least twice"));

    let out = head().env("TESSERA_LABELS", "zone").output().expect("run");
    assert_eq!(out.status.code(), Some(2), "env vars are validated like flags");
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
}

#[test]
fn a_busy_port_is_a_clear_error_with_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = head()
        .args(["--listen", &addr, "--data-dir", &dir.path().display().to_string(), "--no-worker"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("--listen"), "{err}");
}
