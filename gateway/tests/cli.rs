//! The `tessera-gateway` binary's flags: help that explains, and errors that name what is wrong.
//! (This file also makes `cargo test --workspace` build the binary for the cluster tests.)

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera-gateway"))
}

#[test]
fn help_explains_what_it_needs_and_the_defaults() {
    let out = gateway().arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in [
        "--head",
        "TESSERA_HEAD",
        "--token-file",
        "reader token",
        "--listen",
        "[default: 0.0.0.0:8080]",
        "--api-key-file",
        "--retries",
        "[default: 2]",
        "--first-byte-timeout",
        "/v1/chat/completions",
    ] {
        assert!(help.contains(s), "{s} missing from --help:\n{help}");
    }
}

#[test]
fn a_missing_token_file_is_named() {
    let out =
        gateway().args(["--token-file", "/nonexistent/reader.token", "--listen", "127.0.0.1:0"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--token-file /nonexistent/reader.token"), "{err}");
}

#[test]
fn a_bad_duration_exits_2_and_names_the_value() {
    let out = gateway().args(["--refresh", "often"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'often'"));
}
