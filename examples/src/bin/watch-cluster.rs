//! A minimal client of the public API: list the nodes, then print membership and deployment events
//! as they come.
//!
//! ```text
//! TESSERA_TOKEN_FILE=/var/lib/tessera/head/admin.token \
//!     cargo run -p tessera-examples --bin watch-cluster -- http://127.0.0.1:7470
//! ```

use tessera_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let head = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:7470".into());
    // Every call carries the admin token as a bearer token.
    let token = match (std::env::var("TESSERA_TOKEN"), std::env::var("TESSERA_TOKEN_FILE")) {
        (Ok(t), _) => Some(t),
        (_, Ok(f)) => Some(std::fs::read_to_string(&f)?.trim().to_string()),
        _ => None,
    };
    let bearer: Option<MetadataValue<_>> = token.map(|t| format!("Bearer {t}").parse()).transpose()?;
    let channel = tonic::transport::Endpoint::from_shared(head.clone())?.connect().await?;
    let mut client = pb::cluster_client::ClusterClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(b) = &bearer {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    });

    let nodes = client.list_nodes(pb::ListNodesRequest::default()).await?.into_inner().nodes;
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
        let kind = pb::EventKind::try_from(e.kind).map(|k| k.as_str_name()).unwrap_or("?");
        let subject = match (&e.node, &e.deployment) {
            (Some(n), _) => n.name.clone(),
            (None, Some(d)) => format!("deployment {}", d.name),
            _ => "?".into(),
        };
        println!("#{} {kind} {subject}: {}", e.seq, e.reason);
    }
    Ok(())
}
