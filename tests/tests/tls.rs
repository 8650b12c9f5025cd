//! TLS (rustls) with certificates made at run time: a head requiring client certificates, a
//! worker and the CLI reaching it over https, and what happens without the right files.

use std::path::Path;
use std::process::Command;

use tessera_tests::pki::pki;
use tessera_tests::process::start_head;
use tessera_tests::{Daemon, wait_until};

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn mutual_tls_for_workers_and_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let pki = pki(dir.path());
    let head = start_head(
        dir.path(),
        "head",
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &s(&pki.server_cert),
            "--tls-key",
            &s(&pki.server_key),
            "--tls-client-ca",
            &s(&pki.ca),
            "--tls-ca",
            &s(&pki.ca),
        ],
    );
    let port = head.url.rsplit(':').next().expect("port");
    let https = format!("https://127.0.0.1:{port}");
    let token_file = dir.path().join("join.token");
    std::fs::write(&token_file, format!("{}\n", tessera_tests::JOIN_TOKEN)).expect("token");
    let _w = Daemon::spawn(
        "w1",
        "tessera-worker",
        &[
            "--head",
            &https,
            "--node-name",
            "w1",
            "--state-dir",
            &s(&dir.path().join("w1")),
            "--fake-gpus",
            "2x80GiB",
            "--token-file",
            &s(&token_file),
            "--tls-ca",
            &s(&pki.ca),
            "--tls-cert",
            &s(&pki.client_cert),
            "--tls-key",
            &s(&pki.client_key),
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .map(String::from),
        dir.path(),
    );
    let admin_file = dir.path().join("head/admin.token");
    let tessera = |extra: &[&str]| {
        let mut c = Command::new(tessera_tests::bin("tessera"));
        c.args(["--head", &https, "--token-file", &s(&admin_file)]).args(extra).env_remove("TESSERA_HEAD");
        c
    };
    let with_certs = ["--tls-ca", &s(&pki.ca), "--tls-cert", &s(&pki.client_cert), "--tls-key", &s(&pki.client_key)];
    let nodes = wait_until("the head (over loopback TLS) and w1 joined", || {
        let out = tessera(&with_certs).args(["nodes", "-o", "json"]).output().expect("run");
        let v: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
        let done = v
            .as_ref()
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.len() == 2 && a.iter().all(|n| n["state"] == "alive"));
        async move { done.then_some(v) }
    })
    .await;
    assert!(nodes.is_some());

    // No client certificate: the handshake is refused.
    let out = tessera(&["--tls-ca", &s(&pki.ca)]).arg("nodes").output().expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    // Plain http against a TLS head, or https without a CA: clear errors.
    let out = tessera(&[]).args(["nodes"]).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("give --tls-ca"), "{}", String::from_utf8_lossy(&out.stderr));
    let plain = Command::new(tessera_tests::bin("tessera"))
        .args(["--head", &head.url, "--token-file", &s(&admin_file), "--tls-ca", &s(&pki.ca), "nodes"])
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("use https://"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
}
