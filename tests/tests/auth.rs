//! Authentication with the real binaries: generated tokens, roles, refusals, --insecure.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_tests::{Daemon, conn_with, wait_until};

/// A head with a fresh data dir and no token flags: it must generate its tokens.
fn bare_head(dir: &std::path::Path, extra: &[&str]) -> (Daemon, String) {
    let data = dir.join("head");
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data.display().to_string(),
        "--node-name",
        "head",
        "--fake-gpus",
        "2x80GiB",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let d = Daemon::spawn("head", "tessera-head", &args, dir);
    let deadline = Instant::now() + tessera_tests::HANG;
    loop {
        if let Ok(s) = std::fs::read_to_string(data.join("head.addr"))
            && s.ends_with('\n')
        {
            return (d, format!("http://{}", s.trim()));
        }
        assert!(Instant::now() < deadline, "head did not start:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn a_head_without_tokens_generates_them_and_enforces_roles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let (head, url) = bare_head(dir.path(), &[]);
    let data = dir.path().join("head");
    let join = std::fs::read_to_string(data.join("join.token")).expect("join token written").trim().to_string();
    let admin = std::fs::read_to_string(data.join("admin.token")).expect("admin token written").trim().to_string();
    let reader = std::fs::read_to_string(data.join("reader.token")).expect("reader token written").trim().to_string();
    assert!(join != admin && reader != admin && reader != join);
    for f in ["join.token", "admin.token", "reader.token"] {
        let mode = std::fs::metadata(data.join(f)).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} is private");
    }
    assert!(head.log_text().contains("generated the tokens"));
    assert!(!head.log_text().contains(&admin), "the token itself is never logged");

    let list = |token: Option<String>| {
        let url = url.clone();
        async move {
            let mut c = pb::cluster_client::ClusterClient::new(conn_with(&url, token.as_deref()).await);
            c.list_nodes(pb::ListNodesRequest::default()).await
        }
    };
    let e = list(None).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("missing bearer token"), "{}", e.message());
    let e = list(Some("tsa_not_the_right_token_at_all".into())).await.expect_err("bad token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = list(Some(join.clone())).await.expect_err("a worker token cannot list");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let mut deps = pb::deployments_client::DeploymentsClient::new(conn_with(&url, Some(&join)).await);
    let e = deps.list(pb::ListDeploymentsRequest {}).await.expect_err("a worker token cannot deploy");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(list(Some(admin.clone())).await.is_ok());

    // A worker without a token is refused for good (exit 1, clear message); with the join token it joins.
    let mut w = Daemon::spawn(
        "nobody",
        "tessera-worker",
        &[
            "--head",
            &url,
            "--state-dir",
            &dir.path().join("w0").display().to_string(),
            "--node-name",
            "nobody",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .map(String::from),
        dir.path(),
    );
    assert_eq!(w.wait().code(), Some(1));
    assert!(w.log_text().contains("missing bearer token"), "{}", w.log_text());
    assert!(
        w.log_text().contains("joins with the join token"),
        "a worker is told about the join token: {}",
        w.log_text()
    );
    let token_file = data.join("join.token").display().to_string();
    let _w1 = Daemon::spawn(
        "w1",
        "tessera-worker",
        &[
            "--head",
            &url,
            "--state-dir",
            &dir.path().join("w1").display().to_string(),
            "--node-name",
            "w1",
            "--token-file",
            &token_file,
        ]
        .map(String::from),
        dir.path(),
    );
    let url2 = url.clone();
    let admin2 = admin.clone();
    wait_until("w1 joined with the join token", || {
        let (url, admin) = (url2.clone(), admin2.clone());
        async move {
            let mut c = pb::cluster_client::ClusterClient::new(conn_with(&url, Some(&admin)).await);
            let nodes = c.list_nodes(pb::ListNodesRequest::default()).await.ok()?.into_inner().nodes;
            nodes.iter().any(|n| n.name == "w1" && n.state == pb::NodeState::Alive as i32).then_some(())
        }
    })
    .await;
    drop(head);
}

#[tokio::test]
async fn insecure_turns_authentication_off_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let (head, url) = bare_head(dir.path(), &["--insecure"]);
    let mut c = pb::cluster_client::ClusterClient::new(conn_with(&url, None).await);
    let nodes = c.list_nodes(pb::ListNodesRequest::default()).await.expect("no token needed").into_inner().nodes;
    assert!(nodes.len() <= 1);
    assert!(head.log_text().contains("authentication is OFF"), "{}", head.log_text());
}
