//! Failure detector tests on paused tokio time: every deadline is exact and nothing sleeps.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tessera_common::fake::FakeGpuSpec;
use tessera_common::ids::NodeId;
use tessera_common::node::{JoinInfo, NodeState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;

fn info(name: &str, fingerprint: &str) -> JoinInfo {
    let spec: FakeGpuSpec = "2x80GiB".parse().expect("valid spec");
    JoinInfo {
        node_id: None,
        name: name.into(),
        labels: Default::default(),
        advertise_address: None,
        inventory: spec.inventory(name),
        version: "test".into(),
        is_head: false,
        machine_fingerprint: fingerprint.into(),
        hostname: "host".into(),
        capabilities: Default::default(),
    }
}

fn conn(last_octet: u8) -> ConnInfo {
    ConnInfo { peer: IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet)), local: None }
}

type Rx = mpsc::Receiver<Result<pb::HeadMessage, tonic::Status>>;

async fn join(m: &Membership, i: JoinInfo) -> (Admitted, Rx) {
    let (tx, rx) = mpsc::channel(16);
    (m.join(i, None, false, conn(2), tx).await.expect("join accepted"), rx)
}

async fn state_of(m: &Membership, id: NodeId) -> NodeState {
    m.list().await.into_iter().find(|n| n.id == id).expect("node listed").state
}

fn start() -> Membership {
    Membership::spawn(MembershipConfig::default(), CancellationToken::new()).0
}

/// Lets the detector run through `d` of paused time, in small steps.
async fn advance(d: Duration) {
    let step = Duration::from_millis(10);
    let mut left = d;
    while !left.is_zero() {
        let s = step.min(left);
        tokio::time::advance(s).await;
        tokio::task::yield_now().await;
        left -= s;
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_a_node_alive() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    for _ in 0..20 {
        advance(Duration::from_millis(500)).await;
        a.liveness.touch();
    }
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Alive);
}

#[tokio::test(start_paused = true)]
async fn silent_node_is_suspect_then_dead_after_the_node_timeout() {
    let m = start();
    let (a, mut rx) = join(&m, info("a", "fp-a")).await;
    advance(Duration::from_millis(900)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Alive, "one missed heartbeat is not suspicious");
    advance(Duration::from_millis(300)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Suspect, "two missed heartbeats are");
    advance(Duration::from_millis(1700)).await; // 2.9 s of silence
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Suspect, "not dead before the 3 s timeout");
    advance(Duration::from_millis(200)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Dead);
    // The silent session is closed so that a worker that wakes up must rejoin.
    let closing = rx.recv().await.expect("a message").expect_err("an error status");
    assert_eq!(closing.code(), tonic::Code::Unavailable);
}

#[tokio::test(start_paused = true)]
async fn suspect_node_recovers_when_heartbeats_resume() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    advance(Duration::from_millis(1200)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Suspect);
    a.liveness.touch();
    advance(Duration::from_millis(100)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Alive);
}

#[tokio::test(start_paused = true)]
async fn closed_session_is_dead_after_the_grace_unless_it_reconnects() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    let (b, _rxb) = join(&m, info("b", "fp-b")).await;
    m.session_closed(a.node_id, a.session_id, "connection reset".into()).await;
    m.session_closed(b.node_id, b.session_id, "connection reset".into()).await;
    advance(Duration::from_millis(10)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Suspect);

    // b reconnects within the grace with its node id and credential: alive again, same id.
    let mut again = info("b", "fp-b");
    again.node_id = Some(b.node_id);
    let (tx, _rxb2) = mpsc::channel(16);
    let b2 = m.join(again, b.new_secret.clone(), false, conn(2), tx).await.expect("rejoin with the credential");
    assert_eq!(b2.new_secret, None, "a node that presented its credential keeps it");
    assert_eq!(b2.node_id, b.node_id);
    assert!(b2.rejoined);

    advance(Duration::from_millis(500)).await;
    b2.liveness.touch();
    advance(Duration::from_millis(400)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Suspect, "still inside the 1 s grace");
    advance(Duration::from_millis(150)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Dead);
    assert_eq!(state_of(&m, b.node_id).await, NodeState::Alive);
    assert_eq!(m.list().await.len(), 2, "the rejoin did not add a node");
}

#[tokio::test(start_paused = true)]
async fn leave_is_left_not_dead_and_stale_sessions_are_ignored() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    // A stale session id (from before a rejoin) cannot make the node leave.
    m.leave(a.node_id, a.session_id + 100, "stale".into()).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Alive);
    m.leave(a.node_id, a.session_id, "SIGTERM".into()).await;
    m.session_closed(a.node_id, a.session_id, "stream ended".into()).await;
    advance(Duration::from_secs(10)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Left);
}

#[tokio::test(start_paused = true)]
async fn another_machine_with_the_same_node_id_is_refused() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "machine-1:/var/lib/tessera")).await;
    // A copy of a's state dir, credential and all, on another machine.
    let mut thief = info("a-copy", "machine-2:/var/lib/tessera");
    thief.node_id = Some(a.node_id);
    let (tx, _rx2) = mpsc::channel(4);
    let err = m.join(thief, a.new_secret.clone(), false, conn(3), tx).await.expect_err("refused");
    assert!(matches!(err, JoinError::NodeIdConflict { .. }), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::AlreadyExists);
    assert_eq!(m.list().await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_name_is_the_nodes_until_it_is_removed_even_while_it_is_away() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-1")).await;
    let (tx, _r) = mpsc::channel(4);
    let err = m.join(info("a", "fp-2"), None, false, conn(3), tx).await.expect_err("name in use");
    assert!(matches!(err, JoinError::NameConflict { .. }), "{err}");

    // Away (left, dead), the name is still a's: it may come back with its credential.
    m.leave(a.node_id, a.session_id, "bye".into()).await;
    let (tx, _r) = mpsc::channel(4);
    let err = m.join(info("a", "fp-2"), None, false, conn(3), tx).await.expect_err("name reserved");
    assert!(matches!(err, JoinError::NameReserved { .. }), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::AlreadyExists);
    let mut back = info("a", "fp-1");
    back.node_id = Some(a.node_id);
    let (tx, _r) = mpsc::channel(4);
    let again = m.join(back, a.new_secret.clone(), false, conn(2), tx).await.expect("the real node comes back");
    assert_eq!(again.node_id, a.node_id);

    // Once an operator removed it, the name is free.
    m.leave(a.node_id, again.session_id, "bye".into()).await;
    m.remove("a".into()).await.expect("removed");
    let (b, _rxb) = join(&m, info("a", "fp-2")).await;
    assert_ne!(b.node_id, a.node_id);
    assert_eq!(m.list().await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_node_id_is_taken_only_with_its_credential() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    let secret = a.new_secret.clone().expect("a credential on the first join");
    // The same id with the same fingerprint (both are not secrets) but no or a wrong credential.
    for presented in [None, Some("tsn_wrong_credential_000000000000".to_string())] {
        let mut impostor = info("a", "fp-a");
        impostor.node_id = Some(a.node_id);
        let (tx, _r) = mpsc::channel(4);
        let err = m.join(impostor, presented, false, conn(9), tx).await.expect_err("refused");
        assert!(matches!(err, JoinError::BadCredential { .. }), "{err}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::PermissionDenied);
    }
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Alive, "the real session was not touched");
    let mut real = info("a", "fp-a");
    real.node_id = Some(a.node_id);
    let (tx, _r) = mpsc::channel(4);
    m.join(real, Some(secret), false, conn(2), tx).await.expect("the holder of the credential may replace its session");
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_lost_its_state_dir_joins_as_a_new_node_once_the_old_one_is_gone() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    m.session_closed(a.node_id, a.session_id, "crash".into()).await;
    // Within the reconnect grace the old session may still come back: try again later.
    let (tx, _r) = mpsc::channel(4);
    let err = m.join(info("a", "fp-a"), None, false, conn(2), tx).await.expect_err("previous still there");
    assert!(matches!(err, JoinError::PreviousStillConnected), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    advance(Duration::from_millis(1100)).await;
    let (again, _rx2) = join(&m, info("a", "fp-a")).await; // node_id: None
    assert_ne!(again.node_id, a.node_id, "a new node, with a new credential");
    assert!(again.new_secret.is_some());
    let ids: Vec<NodeId> = m.list().await.iter().map(|n| n.id).collect();
    assert_eq!(ids, vec![again.node_id], "the old entry of the same machine and state dir is forgotten");
}

#[tokio::test(start_paused = true)]
async fn events_follow_every_transition_in_order() {
    let m = start();
    let (_, mut events) = m.subscribe().await.expect("subscribed");
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    m.session_closed(a.node_id, a.session_id, "reset".into()).await;
    advance(Duration::from_millis(1100)).await;
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push((e.kind, e.node.state));
    }
    assert_eq!(
        seen,
        vec![
            (EventKind::Joined { rejoined: false }, NodeState::Alive),
            (EventKind::StateChanged, NodeState::Suspect),
            (EventKind::StateChanged, NodeState::Dead),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn draining_shows_while_alive_and_clears() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    let v = m.set_draining("a".into(), true).await.expect("found by name");
    assert_eq!(v.state, NodeState::Draining);
    let v = m.set_draining(a.node_id.to_string(), false).await.expect("found by id");
    assert_eq!(v.state, NodeState::Alive);
    let e = m.set_draining("nope".into(), true).await.expect_err("unknown");
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::NotFound);
}

#[tokio::test(start_paused = true)]
async fn shutdown_tells_every_session() {
    let token = CancellationToken::new();
    let (m, task) = Membership::spawn(MembershipConfig::default(), token.clone());
    let (_a, mut rx) = join(&m, info("a", "fp-a")).await;
    token.cancel();
    task.await.expect("task ends");
    let msg = rx.recv().await.expect("message").expect("ok message");
    assert!(matches!(msg.msg, Some(pb::head_message::Msg::Shutdown(_))));
}

#[test]
fn config_rules() {
    let c = MembershipConfig::default();
    assert_eq!(c.suspect_after(), Duration::from_secs(1));
    assert!(c.tick() <= Duration::from_millis(50));
    let bad = MembershipConfig { node_timeout: Duration::from_millis(600), ..c };
    assert!(bad.validate().expect_err("too short").contains("twice"));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_head_does_not_judge_nodes_on_time_it_did_not_run() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    let mut events = m.subscribe().await.expect("subscribed").1;
    // The whole head stops for 10 s (SIGSTOP, a frozen VM): time jumps at once, no tick in between.
    tokio::time::advance(Duration::from_secs(10)).await;
    tokio::task::yield_now().await;
    advance(Duration::from_millis(100)).await;
    assert_eq!(
        state_of(&m, a.node_id).await,
        NodeState::Alive,
        "10 s of the head's own stall is not the node's silence"
    );
    assert!(events.try_recv().is_err(), "no state change at all");
    // From the resume on, the clock runs as usual: a node that stays silent still dies.
    advance(Duration::from_millis(3000)).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Dead);
}

#[tokio::test(start_paused = true)]
async fn a_gpu_reported_by_two_live_nodes_is_refused_and_the_error_names_only_the_gpu() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    let mut twin = info("b", "fp-b");
    twin.inventory = info("a", "fp-a").inventory;
    let uuid = twin.inventory.gpus[0].uuid.clone();
    let (tx, _rx2) = mpsc::channel(16);
    let e = m.join(twin.clone(), None, false, conn(3), tx).await.expect_err("same GPU on two nodes");
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains(&uuid), "{}", status.message());
    assert!(!status.message().contains(&a.node_id.to_string()), "no other node's id: {}", status.message());
    // Once `a` has left, its GPUs may show up under another node (the same machine, a new id).
    m.leave(a.node_id, a.session_id, "bye".into()).await;
    let (tx, _rx3) = mpsc::channel(16);
    m.join(twin, None, false, conn(3), tx).await.expect("accepted after a left");
    assert_eq!(m.list().await.len(), 1, "the departed twin is forgotten");
}

#[tokio::test(start_paused = true)]
async fn refusals_never_reveal_another_nodes_id_address_or_fingerprint() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-secret")).await;
    let (tx, _r) = mpsc::channel(16);
    let e = m.join(info("a", "fp-other"), None, false, conn(3), tx).await.expect_err("name taken");
    let text = e.to_string();
    assert!(!text.contains(&a.node_id.to_string()) && !text.contains("127.0.0.2"), "{text}");
    let mut copy = info("c", "fp-other");
    copy.node_id = Some(a.node_id);
    let (tx, _r) = mpsc::channel(16);
    let e = m.join(copy, None, false, conn(3), tx).await.expect_err("id held by another machine");
    assert!(!e.to_string().contains("fp-secret"), "{e}");
}

fn start_with(config: MembershipConfig) -> Membership {
    Membership::spawn(config, CancellationToken::new()).0
}

#[tokio::test(start_paused = true)]
async fn departed_nodes_are_forgotten_after_forget_after_unless_pinned() {
    let cfg = MembershipConfig { forget_after: Duration::from_secs(60), ..MembershipConfig::default() };
    let m = start_with(cfg);
    let mut churn = Vec::new();
    for i in 0..20 {
        let (a, _rx) = join(&m, info(&format!("churn-{i}"), &format!("fp-{i}"))).await;
        m.leave(a.node_id, a.session_id, "bye".into()).await;
        churn.push(a.node_id);
    }
    let (pinned, _rx) = join(&m, info("pinned", "fp-p")).await;
    m.leave(pinned.node_id, pinned.session_id, "bye".into()).await;
    m.set_pinned([pinned.node_id].into()).await;
    let mut events = m.subscribe().await.expect("subscribed").1;
    advance(Duration::from_secs(59)).await;
    assert_eq!(m.list().await.len(), 21, "not before forget_after");
    advance(Duration::from_secs(2)).await;
    let left: Vec<NodeId> = m.list().await.iter().map(|n| n.id).collect();
    assert_eq!(left, vec![pinned.node_id], "only the node a deployment holds is kept");
    let mut removed = 0;
    while let Ok(e) = events.try_recv() {
        removed += usize::from(e.kind == EventKind::Removed);
    }
    assert_eq!(removed, 20, "one event per forgotten node");
}

#[tokio::test(start_paused = true)]
async fn an_operator_removes_only_departed_unpinned_nodes() {
    let m = start();
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    let e = m.remove("a".into()).await.expect_err("alive");
    assert!(matches!(e, NodeError::Live(..)), "{e}");
    assert_eq!(tonic::Status::from(e).code(), tonic::Code::FailedPrecondition);
    m.leave(a.node_id, a.session_id, "bye".into()).await;
    m.set_pinned([a.node_id].into()).await;
    assert!(matches!(m.remove("a".into()).await, Err(NodeError::Pinned(_))));
    m.set_pinned(Default::default()).await;
    let v = m.remove(a.node_id.to_string()).await.expect("removed");
    assert_eq!(v.state, NodeState::Left);
    assert!(m.list().await.is_empty());
    assert!(matches!(m.remove("a".into()).await, Err(NodeError::NotFound(_))));
}

#[tokio::test(start_paused = true)]
async fn with_manual_approval_new_nodes_wait_and_the_heads_own_does_not() {
    let cfg = MembershipConfig { manual_approval: true, ..MembershipConfig::default() };
    let m = start_with(cfg);
    let (a, _rx) = join(&m, info("a", "fp-a")).await;
    assert_eq!(state_of(&m, a.node_id).await, NodeState::PendingApproval);
    let mut head = info("head", "fp-head");
    head.is_head = true;
    let (tx, _rh) = mpsc::channel(16);
    let local = ConnInfo { peer: IpAddr::V4(Ipv4Addr::LOCALHOST), local: None };
    let h = m.join(head, None, false, local, tx).await.expect("the head's own worker");
    assert_eq!(state_of(&m, h.node_id).await, NodeState::Alive, "the head's own worker over loopback");
    // A remote node claiming to be the head is not waved through.
    let mut fake_head = info("fake", "fp-fake");
    fake_head.is_head = true;
    let (tx, _rf) = mpsc::channel(16);
    let remote = ConnInfo { peer: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), local: None };
    let f = m.join(fake_head, None, false, remote, tx).await.expect("joins");
    assert_eq!(state_of(&m, f.node_id).await, NodeState::PendingApproval);
    let v = m.approve("a".into()).await.expect("approve");
    assert_eq!(v.state, NodeState::Alive);
    // Its approval stays with it across a reconnect.
    m.session_closed(a.node_id, a.session_id, "reset".into()).await;
    let mut again = info("a", "fp-a");
    again.node_id = Some(a.node_id);
    let (tx, _r2) = mpsc::channel(16);
    m.join(again, a.new_secret.clone(), false, conn(2), tx).await.expect("rejoin");
    assert_eq!(state_of(&m, a.node_id).await, NodeState::Alive);
}
