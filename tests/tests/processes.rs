//! Process-level tests with the real binaries: what only processes show (kill -9, SIGSTOP,
//! SIGTERM, exit codes, restarts). Each test asserts states and reasons, never how fast.

use std::collections::HashMap;

use nix::sys::signal::Signal;
use tessera_proto::v1 as pb;
use tessera_tests::process::{start_head, start_worker, start_worker_in};
use tessera_tests::{cluster_client, list_nodes, node, state, wait_state, wait_until};

#[tokio::test]
async fn kill_9_of_a_worker_is_seen_through_the_broken_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let mut w = start_worker(dir.path(), "w1", &head.url);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    w.signal(Signal::SIGKILL);
    w.wait();
    let dead = wait_state(&mut c, "w1", pb::NodeState::Dead).await;
    assert!(
        dead.state_reason.contains("session closed and no reconnect"),
        "dead through the reconnect grace, not the heartbeat timeout: {}",
        dead.state_reason
    );
    // The head's own node is untouched.
    assert_eq!(state(node(&list_nodes(&mut c).await, "head").expect("head")), pb::NodeState::Alive);
}

#[tokio::test]
async fn a_frozen_worker_is_suspect_then_dead_after_the_timeout_then_rejoins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let w = start_worker(dir.path(), "w1", &head.url);
    let mut c = cluster_client(&head.url).await;
    let alive = wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    w.signal(Signal::SIGSTOP);
    let suspect = wait_state(&mut c, "w1", pb::NodeState::Suspect).await;
    assert!(suspect.state_reason.contains("heartbeat late"), "{}", suspect.state_reason);
    let dead = wait_state(&mut c, "w1", pb::NodeState::Dead).await;
    assert!(dead.state_reason.contains("no heartbeat for"), "{}", dead.state_reason);
    assert!(
        dead.last_heartbeat_ms_ago >= 3000,
        "declared only after the 3s node timeout: {}",
        dead.last_heartbeat_ms_ago
    );
    // Thawed, it notices its session was closed and rejoins with the same id.
    w.signal(Signal::SIGCONT);
    let back = wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    assert_eq!(back.id, alive.id);
    assert_eq!(list_nodes(&mut c).await.len(), 2);
}

#[tokio::test]
async fn sigterm_makes_a_worker_leave_and_exit_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let mut w = start_worker(dir.path(), "w1", &head.url);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    w.signal(Signal::SIGTERM);
    let status = w.wait();
    assert!(status.success(), "exit status {status}; log:\n{}", w.log_text());
    let left = wait_state(&mut c, "w1", pb::NodeState::Left).await;
    assert!(left.state_reason.starts_with("left"), "{}", left.state_reason);
}

#[tokio::test]
async fn sigterm_stops_the_head_with_exit_0_and_its_own_node_leaves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let mut head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "head", pb::NodeState::Alive).await;
    let mut events =
        c.watch_events(pb::WatchEventsRequest { include_current: false }).await.expect("watch").into_inner();
    head.daemon.signal(Signal::SIGTERM);
    let left = events.message().await.expect("event").expect("an event before the stream ends");
    assert_eq!(left.kind, pb::EventKind::NodeLeft as i32);
    assert!(left.node.expect("node").is_head);
    let status = head.daemon.wait();
    assert!(status.success(), "exit status {status}; log:\n{}", head.daemon.log_text());
}

#[tokio::test]
async fn after_a_head_kill_9_and_restart_every_node_rejoins_with_its_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let mut head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let listen = head.url.trim_start_matches("http://").to_string();
    let _w1 = start_worker(dir.path(), "w1", &head.url);
    let _w2 = start_worker(dir.path(), "w2", &head.url);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    wait_state(&mut c, "w2", pb::NodeState::Alive).await;
    let before: HashMap<String, String> = list_nodes(&mut c).await.into_iter().map(|n| (n.name, n.id)).collect();
    assert_eq!(before.len(), 3);

    head.daemon.signal(Signal::SIGKILL);
    head.daemon.wait();
    let head2 = start_head(dir.path(), "head", &listen, &[]);
    assert_eq!(head2.url, head.url);
    let mut c = cluster_client(&head2.url).await;
    let after = wait_until("all three nodes back", || {
        let mut c = c.clone();
        async move {
            let nodes = list_nodes(&mut c).await;
            (nodes.len() == 3 && nodes.iter().all(|n| state(n) == pb::NodeState::Alive))
                .then(|| nodes.into_iter().map(|n| (n.name, n.id)).collect::<HashMap<_, _>>())
        }
    })
    .await;
    assert_eq!(before, after);
    assert_eq!(list_nodes(&mut c).await.len(), 3, "no node shown twice");
}

#[tokio::test]
async fn two_machines_claiming_one_node_id_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let state_a = dir.path().join("a-state");
    let _a = start_worker_in(dir.path(), "node-a", &head.url, &state_a);
    let mut c = cluster_client(&head.url).await;
    let a = wait_state(&mut c, "node-a", pb::NodeState::Alive).await;

    // A second machine gets a copy of node-a's state dir (same node id, other place).
    let state_b = dir.path().join("b-state");
    std::fs::create_dir_all(&state_b).expect("mkdir");
    std::fs::copy(state_a.join("node-id"), state_b.join("node-id")).expect("copy node-id");
    std::fs::copy(state_a.join("node.secret"), state_b.join("node.secret")).expect("copy node.secret");
    let mut b = start_worker_in(dir.path(), "node-b", &head.url, &state_b);
    let status = b.wait();
    assert_eq!(status.code(), Some(1), "refused for good, not retried; log:\n{}", b.log_text());
    let log = b.log_text();
    assert!(log.contains(&a.id) && log.contains("held by another machine"), "clear error:\n{log}");

    let nodes = list_nodes(&mut c).await;
    assert_eq!(nodes.len(), 2, "head and node-a only");
    assert_eq!(state(node(&nodes, "node-a").expect("a")), pb::NodeState::Alive);
}

#[tokio::test]
async fn one_state_dir_cannot_serve_two_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let state_dir = dir.path().join("shared-state");
    let _a = start_worker_in(dir.path(), "a", &head.url, &state_dir);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "a", pb::NodeState::Alive).await;
    let mut b = start_worker_in(dir.path(), "b", &head.url, &state_dir);
    assert_eq!(b.wait().code(), Some(1));
    assert!(b.log_text().contains("in use by another running worker"), "{}", b.log_text());
}

#[tokio::test]
async fn an_operators_drain_mark_survives_a_head_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let mut head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let listen = head.url.trim_start_matches("http://").to_string();
    let _w1 = start_worker(dir.path(), "w1", &head.url);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    c.drain_node(pb::DrainNodeRequest { node: "w1".into(), evict: false }).await.expect("drain");
    head.daemon.signal(Signal::SIGKILL);
    head.daemon.wait();
    let head2 = start_head(dir.path(), "head", &listen, &[]);
    let mut c = cluster_client(&head2.url).await;
    let w1 = wait_state(&mut c, "w1", pb::NodeState::Draining).await;
    assert!(w1.draining);
    assert_eq!(state(node(&list_nodes(&mut c).await, "head").expect("head")), pb::NodeState::Alive);
}
