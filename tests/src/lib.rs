//! Test support: an in-process cluster, real daemons as child processes, and waiting helpers.
//!
//! # Layout
//! - [`TestCluster`]: head + N worker agents in this process, real gRPC on ephemeral loopback ports.
//! - [`Daemon`]: a real `tessera-head` / `tessera-worker` process, killed (and reaped) on drop.
//! - [`deploy`]: a head and two workers as processes, probe deployments and waits on their states.
//! - [`wait_until`]: poll a predicate with a generous deadline (catches hangs, asserts no timing).

pub mod cluster;
pub mod deploy;
pub mod etcd;
pub mod loadgen;
pub mod model;
pub mod netns;
pub mod pki;
pub mod process;
pub mod vllm;

pub use cluster::TestCluster;
pub use process::{
    Daemon, HeadProc, alive, bin, environ_has, in_proc, pids_with, start_head, start_worker, start_worker_in,
    start_worker_with,
};

use std::future::Future;
use std::time::Duration;

use tessera_common::auth::Bearer;
use tessera_proto::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Deadline for waits in tests: long enough for a loaded 2-core CI machine, short enough to end a
/// hang. Tests never assert on how fast something happened; benchmarks do that.
pub const HANG: Duration = Duration::from_secs(30);

/// Polls `check` every 20 ms until it returns `Some`, or panics after `HANG` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {HANG:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The tokens every test head uses (its data dir holds them before it starts).
pub const JOIN_TOKEN: &str = "tsj_test_join_token_0123456789";
pub const ADMIN_TOKEN: &str = "tsa_test_admin_token_0123456789";
pub const READER_TOKEN: &str = "tsr_test_reader_token_0123456789";

/// A connection whose calls carry the admin token.
pub type Conn = InterceptedService<Channel, Bearer>;

pub async fn conn_with(url: &str, token: Option<&str>) -> Conn {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("valid url")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    InterceptedService::new(ch, Bearer::new(token).expect("valid token"))
}

pub async fn conn(url: &str) -> Conn {
    conn_with(url, Some(ADMIN_TOKEN)).await
}

/// Node lists of big clusters pass gRPC's default 4 MiB (about 4,500 nodes of 8 GPUs).
pub const MAX_MESSAGE: usize = 256 << 20;

pub async fn cluster_client(url: &str) -> pb::cluster_client::ClusterClient<Conn> {
    pb::cluster_client::ClusterClient::new(conn(url).await).max_decoding_message_size(MAX_MESSAGE)
}

pub async fn deployments_client(url: &str) -> pb::deployments_client::DeploymentsClient<Conn> {
    pb::deployments_client::DeploymentsClient::new(conn(url).await)
}

pub async fn planner_client(url: &str) -> pb::planner_client::PlannerClient<Conn> {
    pb::planner_client::PlannerClient::new(conn(url).await)
}

/// Writes the test tokens into a head's data dir, where it picks them up.
pub fn write_tokens(data_dir: &std::path::Path) {
    std::fs::create_dir_all(data_dir).expect("data dir");
    std::fs::write(data_dir.join("join.token"), format!("{JOIN_TOKEN}\n")).expect("join token");
    std::fs::write(data_dir.join("admin.token"), format!("{ADMIN_TOKEN}\n")).expect("admin token");
    std::fs::write(data_dir.join("reader.token"), format!("{READER_TOKEN}\n")).expect("reader token");
}

/// Waits until exactly `n` nodes are known to the head at `url`, all of them alive.
pub async fn wait_alive(url: &str, n: usize) {
    let cl = cluster_client(url).await;
    wait_until(&format!("{n} nodes alive"), || {
        let mut cl = cl.clone();
        async move {
            let nodes = list_nodes(&mut cl).await;
            (nodes.len() == n && nodes.iter().all(|x| state(x) == pb::NodeState::Alive)).then_some(())
        }
    })
    .await;
}

pub async fn list_nodes(client: &mut pb::cluster_client::ClusterClient<Conn>) -> Vec<pb::Node> {
    client.list_nodes(pb::ListNodesRequest::default()).await.expect("ListNodes").into_inner().nodes
}

/// The node named `name`, if listed.
pub fn node<'a>(nodes: &'a [pb::Node], name: &str) -> Option<&'a pb::Node> {
    nodes.iter().find(|n| n.name == name)
}

pub fn state(n: &pb::Node) -> pb::NodeState {
    pb::NodeState::try_from(n.state).unwrap_or(pb::NodeState::Unspecified)
}

/// Waits until node `name` is in `want`, and returns it.
pub async fn wait_state(
    client: &mut pb::cluster_client::ClusterClient<Conn>,
    name: &str,
    want: pb::NodeState,
) -> pb::Node {
    let what = format!("node {name} to be {want:?}");
    wait_until(&what, || {
        let mut c = client.clone();
        async move {
            let nodes = list_nodes(&mut c).await;
            node(&nodes, name).filter(|n| state(n) == want).cloned()
        }
    })
    .await
}
