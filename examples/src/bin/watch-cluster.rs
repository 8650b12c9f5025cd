//! A minimal client of the public API: list the nodes, then print membership events as they come.
//!
//! ```text
//! cargo run -p tessera-examples --bin watch-cluster -- http://127.0.0.1:7470
//! ```

use tessera_proto::v1 as pb;
use tokio_stream::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let head = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:7470".into());
    let mut client = pb::cluster_client::ClusterClient::connect(head.clone()).await?;

    let nodes = client.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
    println!("{} node(s) at {head}:", nodes.len());
    for n in &nodes {
        let gpus = n.inventory.as_ref().map_or(0, |i| i.gpus.len());
        let state = pb::NodeState::try_from(n.state).map(|s| s.as_str_name()).unwrap_or("?");
        println!("  {:<20} {:<22} {:<15} {gpus} GPU(s)", n.name, state, n.address);
    }

    let mut events = client.watch_events(pb::WatchEventsRequest { include_current: false }).await?.into_inner();
    println!("following events (Ctrl-C to stop)");
    while let Some(e) = events.next().await {
        let e = e?;
        let node = e.node.unwrap_or_default();
        let kind = pb::EventKind::try_from(e.kind).map(|k| k.as_str_name()).unwrap_or("?");
        println!("#{} {kind} {} -> {}", e.seq, node.name, e.reason);
    }
    Ok(())
}
