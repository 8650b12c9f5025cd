//! The status page: `GET /ui` (plain HTML and a little JavaScript, no build step) and the JSON it
//! reads, `GET /ui/status.json`, on the head's metrics port. Nodes with their GPUs (memory, and
//! which deployment holds each), deployments with replicas, ranks, state and endpoint, and the
//! latest events; the page reads the JSON every 2 s.
//!
//! Like /metrics it needs no token, so it shows nothing secret: never a deployment's env (its
//! `HF_TOKEN`) or command, no tokens, no credentials. Bind `--metrics-listen` to a network you
//! trust.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};
use tessera_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::deploy::Deployments;
use crate::membership::Membership;

/// Events the page shows (the newest).
const RECENT: usize = 50;

const PAGE: &str = include_str!("page.html");

/// The latest events, kept for the page.
#[derive(Default)]
pub struct Recent(Mutex<VecDeque<pb::Event>>);

impl Recent {
    fn push(&self, e: pb::Event) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == RECENT {
            q.pop_front();
        }
        q.push_back(e);
    }

    fn list(&self) -> Vec<pb::Event> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().cloned().collect()
    }
}

#[derive(Clone)]
struct Ui {
    membership: Membership,
    deployments: Deployments,
    recent: Arc<Recent>,
}

/// The page's routes; keeps the latest node and deployment events until `stop`.
pub fn router(membership: Membership, deployments: Deployments, stop: CancellationToken) -> Router {
    let recent = Arc::new(Recent::default());
    let (r, m, d) = (recent.clone(), membership.clone(), deployments.clone());
    tokio::spawn(async move {
        let mut deps = d.subscribe();
        let Some((_, mut nodes)) = m.subscribe().await else { return };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                e = deps.recv() => match e {
                    Ok(e) => r.push((*e).clone()),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
                e = nodes.recv() => match e {
                    Ok(e) => r.push(pb::Event::from(&*e)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
            }
        }
    });
    Router::new()
        .route("/", get(|| async { axum::response::Redirect::to("/ui") }))
        .route("/ui", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE) }))
        .route("/ui/status.json", get(status))
        .with_state(Ui { membership, deployments, recent })
}

async fn status(State(ui): State<Ui>) -> impl IntoResponse {
    let nodes = ui.membership.list().await;
    let deployments = ui.deployments.list().await.unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], status_json(&nodes, &deployments, &ui.recent.list()).to_string())
}

/// `NODE_STATE_ALIVE` -> `alive`: an enum value's proto name without its prefix.
fn enum_name(name: Result<&str, prost::UnknownEnumValue>, prefix: &str) -> String {
    name.map(|n| n.trim_start_matches(prefix).to_lowercase()).unwrap_or_else(|_| "unknown".into())
}

fn node_state(s: i32) -> String {
    enum_name(pb::NodeState::try_from(s).map(|s| s.as_str_name()), "NODE_STATE_")
}

fn deployment_state(s: i32) -> String {
    enum_name(pb::DeploymentState::try_from(s).map(|s| s.as_str_name()), "DEPLOYMENT_STATE_")
}

/// What the page shows, as JSON (no env, command or secrets).
pub fn status_json(
    nodes: &[crate::membership::NodeView],
    deployments: &[pb::Deployment],
    events: &[pb::Event],
) -> Value {
    // Which deployment holds each GPU, by node id and GPU index.
    let mut holder: HashMap<(String, u32), String> = HashMap::new();
    for d in deployments {
        for r in &d.ranks {
            for g in &r.gpu_indices {
                holder.insert((r.node_id.clone(), *g), d.name.clone());
            }
        }
    }
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|v| {
            let n = pb::Node::from(v);
            let gpus: Vec<Value> = n
                .inventory
                .as_ref()
                .map(|i| i.gpus.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|g| {
                    json!({
                        "index": g.index,
                        "name": g.name,
                        "memory_total_bytes": g.memory_total_bytes,
                        "memory_used_bytes": g.memory_used_bytes,
                        "deployment": holder.get(&(n.id.clone(), g.index)),
                    })
                })
                .collect();
            json!({
                "id": n.id,
                "name": n.name,
                "state": node_state(n.state),
                "address": n.address,
                "is_head": n.is_head,
                "labels": n.labels,
                "gpus": gpus,
            })
        })
        .collect();
    let deployments: Vec<Value> = deployments
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "state": deployment_state(d.state),
                "message": (!d.message.is_empty()).then_some(&d.message),
                "model": d.model_path,
                "tp": d.tp,
                "pp": d.pp,
                "generation": d.generation,
                "restarts": d.restarts,
                "revision": d.revision,
                "endpoint": (!d.endpoint.is_empty()).then_some(&d.endpoint),
                "replicas": d.replicas.iter().map(|r| json!({
                    "index": r.index,
                    "state": deployment_state(r.state),
                    "generation": r.generation,
                    "endpoint": (!r.endpoint.is_empty()).then_some(&r.endpoint),
                })).collect::<Vec<_>>(),
                "ranks": d.ranks.iter().map(|r| json!({
                    "rank": r.rank,
                    "node": r.node,
                    "gpus": r.gpu_indices,
                    "state": enum_name(pb::ProcessState::try_from(r.state).map(|s| s.as_str_name()), "PROCESS_STATE_"),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "unix_ms": e.unix_ms,
                "kind": enum_name(pb::EventKind::try_from(e.kind).map(|s| s.as_str_name()), "EVENT_KIND_"),
                "node": e.node.as_ref().map(|n| &n.name),
                "deployment": e.deployment.as_ref().map(|d| &d.name),
                "state": e.deployment.as_ref().map(|d| deployment_state(d.state))
                    .or_else(|| e.node.as_ref().map(|n| node_state(n.state))),
                "reason": (!e.reason.is_empty()).then_some(&e.reason),
            })
        })
        .collect();
    json!({"nodes": nodes, "deployments": deployments, "events": events})
}
