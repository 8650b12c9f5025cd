//! In-process cluster tests: a real head and real worker agents over loopback gRPC.

use std::collections::HashMap;

use tessera_proto::v1 as pb;
use tessera_tests::{TestCluster, cluster_client, list_nodes, node, state, wait_state, wait_until};
use tokio_stream::StreamExt;

async fn all_alive(url: &str, n: usize) -> Vec<pb::Node> {
    let mut c = cluster_client(url).await;
    wait_until(&format!("{n} alive nodes"), || {
        let mut c = c.clone();
        async move {
            let nodes = list_nodes(&mut c).await;
            (nodes.len() == n && nodes.iter().all(|x| state(x) == pb::NodeState::Alive)).then_some(nodes)
        }
    })
    .await;
    list_nodes(&mut c).await
}

#[tokio::test]
async fn head_and_three_workers_join_and_are_listed_head_first() {
    let cluster = TestCluster::start(3).await;
    let nodes = all_alive(&cluster.url, 4).await;
    assert_eq!(nodes[0].name, "head");
    assert!(nodes[0].is_head);
    assert_eq!(nodes.iter().filter(|n| n.is_head).count(), 1);
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["head", "worker-1", "worker-2", "worker-3"]);
    for n in &nodes {
        let inv = n.inventory.as_ref().expect("inventory");
        assert_eq!(inv.gpus.len(), 4, "{}", n.name);
        assert!(inv.gpus.iter().all(|g| g.fake && g.memory_total_bytes == 80 << 30));
        assert_eq!(n.address, "127.0.0.1", "the address the head saw");
        uuid::Uuid::parse_str(&n.id).expect("node id is a uuid");
    }
    assert_eq!(node(&nodes, "worker-2").expect("listed").labels.get("role").map(String::as_str), Some("test"));
    let uuids: std::collections::HashSet<_> =
        nodes.iter().flat_map(|n| n.inventory.as_ref().expect("inv").gpus.iter().map(|g| g.uuid.clone())).collect();
    assert_eq!(uuids.len(), 16, "every fake GPU has its own UUID");

    let mut c = cluster_client(&cluster.url).await;
    let s = c.get_status(pb::GetStatusRequest {}).await.expect("status").into_inner();
    assert_eq!((s.nodes_total, s.nodes_alive, s.gpus_total, s.gpus_fake), (4, 4, 16, 16));
    cluster.stop().await;
}

#[tokio::test]
async fn watch_reports_current_members_then_joins_failures_and_leaves() {
    let mut cluster = TestCluster::start(1).await;
    all_alive(&cluster.url, 2).await;
    let mut c = cluster_client(&cluster.url).await;
    let mut events =
        c.watch_events(pb::WatchEventsRequest { include_current: true }).await.expect("watch").into_inner();
    let mut next = async || events.next().await.expect("stream open").expect("event ok");

    let mut current: Vec<String> = Vec::new();
    for _ in 0..2 {
        let e = next().await;
        assert_eq!(e.kind, pb::EventKind::NodeJoined as i32);
        current.push(e.node.expect("node").name);
    }
    current.sort();
    assert_eq!(current, ["head", "worker-1"]);

    cluster.add_worker("worker-2").await;
    let e = next().await;
    assert_eq!((e.kind, e.node.as_ref().expect("node").name.as_str()), (pb::EventKind::NodeJoined as i32, "worker-2"));

    // worker-2's process "dies": its task is aborted, the connection drops without a leave.
    let w2 = cluster.workers.pop().expect("worker-2");
    w2.task.abort();
    let e = next().await;
    assert_eq!(e.kind, pb::EventKind::NodeStateChanged as i32);
    assert_eq!(e.node.as_ref().expect("node").state, pb::NodeState::Suspect as i32, "{}", e.reason);
    let e = next().await;
    assert_eq!(e.node.as_ref().expect("node").state, pb::NodeState::Dead as i32);
    assert!(e.reason.contains("no reconnect"), "{}", e.reason);

    // worker-1 stops gracefully: left, not dead.
    let w1 = cluster.workers.pop().expect("worker-1");
    w1.token.cancel();
    w1.task.await.expect("task").expect("clean leave");
    let e = next().await;
    assert_eq!(e.kind, pb::EventKind::NodeLeft as i32);
    assert_eq!(e.node.as_ref().expect("node").state, pb::NodeState::Left as i32);
    cluster.stop().await;
}

#[tokio::test]
async fn workers_rejoin_a_restarted_head_with_the_same_ids() {
    let mut cluster = TestCluster::start(3).await;
    let before: HashMap<String, String> =
        all_alive(&cluster.url, 4).await.into_iter().map(|n| (n.name, n.id)).collect();
    cluster.restart_head().await;
    let after: HashMap<String, String> = all_alive(&cluster.url, 4).await.into_iter().map(|n| (n.name, n.id)).collect();
    assert_eq!(before, after, "same machines, same ids, none twice");
    for w in &cluster.workers {
        assert!(w.status.borrow().joins >= 2, "{} rejoined", w.name);
    }
    cluster.stop().await;
}

#[tokio::test]
async fn drain_marks_a_node_and_undrain_clears_it() {
    let cluster = TestCluster::start(1).await;
    all_alive(&cluster.url, 2).await;
    let mut c = cluster_client(&cluster.url).await;
    let n =
        c.drain_node(pb::DrainNodeRequest { node: "worker-1".into(), evict: false }).await.expect("drain").into_inner();
    assert_eq!(n.state, pb::NodeState::Draining as i32);
    assert!(n.draining);
    let status = c.get_status(pb::GetStatusRequest {}).await.expect("status").into_inner();
    assert_eq!((status.nodes_alive, status.nodes_draining), (1, 1));
    let n = c.undrain_node(pb::DrainNodeRequest { node: n.id, evict: false }).await.expect("undrain").into_inner();
    assert_eq!(n.state, pb::NodeState::Alive as i32);
    let err = c.drain_node(pb::DrainNodeRequest { node: "nope".into(), evict: false }).await.expect_err("unknown node");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("nope"), "{}", err.message());
    cluster.stop().await;
}

#[tokio::test]
async fn a_session_that_does_not_start_with_join_is_refused() {
    let cluster = TestCluster::start(0).await;
    let ch = tessera_tests::conn_with(&cluster.url, Some(tessera_tests::JOIN_TOKEN)).await;
    let mut m = pb::membership_client::MembershipClient::new(ch);
    let hb = pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Heartbeat(pb::Heartbeat { seq: 1, gpu_usage: vec![] })),
    };
    let err = m.session(tokio_stream::iter(vec![hb])).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("join"), "{}", err.message());

    let bad = pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Join(pb::JoinRequest { name: "Bad Name".into(), ..Default::default() })),
    };
    let err = m.session(tokio_stream::iter(vec![bad])).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("join.name"), "{}", err.message());
    let mut c = cluster_client(&cluster.url).await;
    wait_state(&mut c, "head", pb::NodeState::Alive).await;
    assert_eq!(list_nodes(&mut c).await.len(), 1, "nothing was added");
    cluster.stop().await;
}

#[tokio::test]
async fn list_nodes_pages_in_order_and_refuses_a_forged_token() {
    let cluster = TestCluster::start(3).await;
    let all = all_alive(&cluster.url, 4).await;
    let mut c = cluster_client(&cluster.url).await;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let p = c.list_nodes(pb::ListNodesRequest { page_size: 3, page_token }).await.expect("page").into_inner();
        assert!(p.nodes.len() <= 3);
        seen.extend(p.nodes.into_iter().map(|n| n.name));
        pages += 1;
        if p.next_page_token.is_empty() {
            break;
        }
        page_token = p.next_page_token;
    }
    assert_eq!(pages, 2);
    assert_eq!(seen, all.iter().map(|n| n.name.clone()).collect::<Vec<_>>(), "every node once, head first");
    let e = c
        .list_nodes(pb::ListNodesRequest { page_size: 1, page_token: "not-a-token".into() })
        .await
        .expect_err("forged token");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("page_token"), "{}", e.message());
}
