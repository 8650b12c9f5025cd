//! The node table does not grow for ever: departed nodes can be removed by an operator (and are
//! forgotten after --forget-after), with the real binaries and the `tessera` CLI.

use nix::sys::signal::Signal;
use tessera_proto::v1 as pb;
use tessera_tests::{cluster_client, list_nodes, start_head, start_worker, wait_state};

#[tokio::test]
async fn tessera_nodes_remove_forgets_a_departed_node_and_refuses_a_live_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let mut w1 = start_worker(dir.path(), "w1", &head.url);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    let cli = |args: &[&str]| {
        std::process::Command::new(tessera_tests::bin("tessera"))
            .args(["--head", &head.url])
            .args(args)
            .env("TESSERA_TOKEN_FILE", head.data_dir.join("admin.token"))
            .output()
            .expect("run tessera")
    };
    let out = cli(&["nodes", "remove", "w1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only dead or departed nodes can be removed"), "{err}");

    w1.signal(Signal::SIGTERM);
    w1.wait();
    wait_state(&mut c, "w1", pb::NodeState::Left).await;
    let out = cli(&["nodes", "remove", "w1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("w1"), "{}", String::from_utf8_lossy(&out.stdout));
    let names: Vec<String> = list_nodes(&mut c).await.into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["head"]);
    let out = cli(&["nodes", "remove", "w1"]);
    assert_eq!(out.status.code(), Some(1), "gone is gone");
}

#[tokio::test]
async fn with_manual_approval_a_new_node_gets_no_work_until_approved() {
    use tessera_tests::deploy::{probe, running_at, wait_for};
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &["--node-approval", "manual"]);
    let _w1 = start_worker(dir.path(), "w1", &head.url);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "head", pb::NodeState::Alive).await;
    wait_state(&mut c, "w1", pb::NodeState::PendingApproval).await;
    let deps = tessera_tests::deployments_client(&head.url).await;
    let d = deps.clone().create(probe("waits", 4, 2)).await.expect("create").into_inner();
    assert_eq!(d.state, pb::DeploymentState::Pending as i32, "8 GPUs need w1, which is not approved: {}", d.message);
    let out = std::process::Command::new(tessera_tests::bin("tessera"))
        .args(["--head", &head.url, "nodes", "approve", "w1"])
        .env("TESSERA_TOKEN_FILE", head.data_dir.join("admin.token"))
        .output()
        .expect("run tessera");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(&deps, "waits", "running once w1 is approved", running_at(1)).await;
}
