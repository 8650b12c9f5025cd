//! The client-facing `Cluster` service: nodes, status, events, drain.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tessera_common::node::NodeState;
use tessera_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use tessera_common::ids::NodeId;

use crate::membership::{Membership, NodeError, NodeView, page_key};

/// Node lookups as gRPC codes.
impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::NotFound(_) => Status::not_found(e.to_string()),
            NodeError::Ambiguous(_) => Status::invalid_argument(e.to_string()),
            NodeError::Live(..) | NodeError::Pinned(_) => Status::failed_precondition(e.to_string()),
            NodeError::CannotRecord(_) => Status::unavailable(e.to_string()),
            NodeError::ShuttingDown => Status::unavailable(e.to_string()),
        }
    }
}

/// The most nodes one `ListNodes` page holds (a page of 10,000 is ~4 MiB).
const MAX_PAGE: u32 = 5000;

/// `h:NAME:ID`: where the previous page ended (the head sorts first).
fn page_token((not_head, name, id): &(bool, String, NodeId)) -> String {
    format!("{}:{name}:{id}", u8::from(*not_head))
}

fn parse_page_token(t: &str) -> Result<Option<(bool, String, NodeId)>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("page_token: not a token this head gave; start again with an empty one");
    let mut parts = t.splitn(3, ':');
    let (Some(h), Some(name), Some(id)) = (parts.next(), parts.next(), parts.next()) else { return Err(bad()) };
    let not_head = match h {
        "0" => false,
        "1" => true,
        _ => return Err(bad()),
    };
    let id: NodeId = id.parse().map_err(|_| bad())?;
    Ok(Some((not_head, name.to_string(), id)))
}

pub struct ClusterService {
    pub membership: Membership,
    pub deployments: crate::deploy::Deployments,
    pub head_instance_id: String,
    pub started: Instant,
    /// Event streams open at once.
    pub event_streams: super::streams::StreamLimits,
}

/// Event streams a head serves at once, and from one peer address.
pub const MAX_EVENT_STREAMS: usize = 1024;
pub const MAX_EVENT_STREAMS_PER_PEER: usize = 64;

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let r = request.into_inner();
        let after = parse_page_token(&r.page_token)?;
        let all = self.membership.list().await;
        let start = match &after {
            Some(key) => all.partition_point(|v| page_key(v) <= *key),
            None => 0,
        };
        let size = if r.page_size == 0 { usize::MAX } else { r.page_size.min(MAX_PAGE) as usize };
        let page = &all[start.min(all.len())..];
        let page = &page[..size.min(page.len())];
        let next_page_token = match page.last() {
            Some(last) if start + page.len() < all.len() => page_token(&page_key(last)),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListNodesResponse { nodes: page.iter().map(pb::Node::from).collect(), next_page_token }))
    }

    async fn approve_node(&self, request: Request<pb::DrainNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let node = request.into_inner().node;
        let v = self.membership.approve(node).await?;
        Ok(Response::new(pb::Node::from(&v)))
    }

    async fn remove_node(&self, request: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let node = request.into_inner().node;
        if node.is_empty() || node.len() > 256 {
            return Err(Status::invalid_argument("node: give a node id or name (at most 256 bytes)"));
        }
        let v = self.membership.remove(node).await?;
        Ok(Response::new(pb::Node::from(&v)))
    }

    async fn get_status(&self, _: Request<pb::GetStatusRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let nodes = self.membership.list().await;
        let cfg = self.membership.config();
        Ok(Response::new(status_of(&nodes, cfg, &self.head_instance_id, self.started.elapsed())))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(&self, request: Request<pb::WatchEventsRequest>) -> Result<Response<EventStream>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let include_current = request.into_inner().include_current;
        let mut deps_rx = self.deployments.subscribe();
        let (current, mut rx) =
            self.membership.subscribe().await.ok_or_else(|| Status::unavailable("the head is shutting down"))?;
        let current_deps = if include_current { self.deployments.list().await? } else { Vec::new() };
        let (tx, stream) = super::streams::bounded::<Queued, pb::Event>(32, &self.event_streams, peer, "event")?;
        tokio::spawn(async move {
            if include_current {
                let nodes = current.iter().map(|n| pb::Event {
                    kind: pb::EventKind::NodeJoined as i32,
                    node: Some(n.into()),
                    reason: "already a member".into(),
                    ..Default::default()
                });
                let deps = current_deps.into_iter().map(|d| pb::Event {
                    kind: pb::EventKind::DeploymentChanged as i32,
                    reason: d.message.clone(),
                    deployment: Some(d),
                    ..Default::default()
                });
                for e in nodes.chain(deps) {
                    if !tx.send(Ok(Queued::Own(Box::new(e)))).await {
                        return;
                    }
                }
            }
            let lagged = |n: u64| {
                Err(Status::resource_exhausted(format!(
                    "event stream fell {n} events behind; watch again with include_current to resync"
                )))
            };
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return,
                    r = rx.recv() => match r {
                        Ok(e) => Ok(Queued::Member(e)),
                        Err(RecvError::Lagged(n)) => lagged(n),
                        Err(RecvError::Closed) => return,
                    },
                    r = deps_rx.recv() => match r {
                        Ok(e) => Ok(Queued::Shared(e)),
                        Err(RecvError::Lagged(n)) => lagged(n),
                        Err(RecvError::Closed) => return,
                    },
                };
                let stop = item.is_err();
                if !tx.send(item).await || stop {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn drain_node(&self, request: Request<pb::DrainNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let req = request.into_inner();
        let v = self.membership.set_draining(req.node, true).await?;
        if req.evict {
            // Drained first, so that the restarted groups are planned without it.
            let moved = self.deployments.evict(v.id).await.map_err(|e| Status::unavailable(e.to_string()))?;
            tracing::info!(node = %v.info.name, groups = ?moved, "drained with eviction: groups restarted elsewhere");
        }
        Ok(Response::new((&v).into()))
    }

    async fn undrain_node(&self, request: Request<pb::DrainNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let node = request.into_inner().node;
        let v = self.membership.set_draining(node, false).await?;
        Ok(Response::new((&v).into()))
    }
}

/// An event waiting in a stream's queue: the events every stream gets are shared, and become the
/// client's copy only when it takes them (a reader that stops holds pointers, not events).
pub enum Queued {
    Member(Arc<crate::membership::Event>),
    Shared(Arc<pb::Event>),
    Own(Box<pb::Event>),
}

impl From<Queued> for pb::Event {
    fn from(q: Queued) -> Self {
        match q {
            Queued::Member(e) => pb::Event::from(e.as_ref()),
            Queued::Shared(e) => Arc::unwrap_or_clone(e),
            Queued::Own(e) => *e,
        }
    }
}

pub fn status_of(
    nodes: &[NodeView],
    cfg: crate::membership::MembershipConfig,
    head_instance_id: &str,
    uptime: std::time::Duration,
) -> pb::ClusterStatus {
    let count = |s: NodeState| nodes.iter().filter(|n| n.state == s).count() as u32;
    let serving = nodes.iter().filter(|n| matches!(n.state, NodeState::Alive | NodeState::Draining));
    let gpus: Vec<_> = serving.flat_map(|n| n.info.inventory.gpus.iter()).collect();
    pb::ClusterStatus {
        head_version: tessera_common::VERSION.to_string(),
        head_instance_id: head_instance_id.to_string(),
        head_uptime_ms: uptime.as_millis() as u64,
        nodes_total: nodes.len() as u32,
        nodes_alive: count(NodeState::Alive),
        nodes_suspect: count(NodeState::Suspect),
        nodes_dead: count(NodeState::Dead),
        nodes_left: count(NodeState::Left),
        nodes_draining: count(NodeState::Draining),
        gpus_total: gpus.len() as u32,
        gpus_fake: gpus.iter().filter(|g| g.fake).count() as u32,
        gpu_memory_total_bytes: gpus.iter().fold(0u64, |a, g| a.saturating_add(g.memory_total_bytes)),
        heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
        node_timeout_ms: cfg.node_timeout.as_millis() as u64,
        reconnect_grace_ms: cfg.reconnect_grace.as_millis() as u64,
    }
}
