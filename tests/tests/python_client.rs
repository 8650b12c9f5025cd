//! The Python client example (stubs generated from proto/ with grpcio-tools) against a live head:
//! the public API from another language. `.ci/run` installs grpcio-tools; elsewhere without it the
//! test says it is skipped.

use std::process::Command;

use tessera_proto::v1 as pb;
use tessera_tests::process::start_head;
use tessera_tests::{cluster_client, wait_state};

#[tokio::test]
async fn the_python_client_lists_plans_deploys_follows_and_deletes() {
    let ok = Command::new("python3").args(["-c", "import grpc, grpc_tools"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "SKIPPED: python3 with grpcio and grpcio-tools is needed (pip install -r examples/python/requirements.txt)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "head", pb::NodeState::Alive).await;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("python3")
        .arg(format!("{root}/examples/python/client.py"))
        .args(["--head", head.url.trim_start_matches("http://"), "--token", tessera_tests::ADMIN_TOKEN])
        .args(["--model", &format!("{root}/examples/model-configs/Llama-3.1-8B-Instruct.json"), "--tp", "2"])
        .output()
        .expect("run python");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "1 node(s):",
        "plan: valid=True tp=2 pp=1",
        "DEPLOYMENT_STATE_RUNNING",
        "py-demo is running",
        "py-demo deleted",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}
