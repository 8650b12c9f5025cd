//! The Rust client example against a live head: it authenticates, lists the nodes, follows events.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn the_example_lists_the_nodes_of_a_live_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = tessera_tests::process::start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    // The head's own node joins a moment after the head listens: run until it is listed.
    let deadline = std::time::Instant::now() + tessera_tests::HANG;
    loop {
        let text = run_once(&head.url);
        if text.contains("4 GPU(s)") || std::time::Instant::now() > deadline {
            assert!(text.contains("node(s) at http://127.0.0.1:"), "{text}");
            assert!(text.contains("head") && text.contains("4 GPU(s)"), "the head's own node is listed: {text}");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Runs the example until it starts following events; returns what it printed.
fn run_once(url: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_watch-cluster"))
        .arg(url)
        .env("TESSERA_TOKEN", tessera_tests::ADMIN_TOKEN)
        .env_remove("TESSERA_TOKEN_FILE")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        let done = line.starts_with("following events");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines.join("\n")
}
