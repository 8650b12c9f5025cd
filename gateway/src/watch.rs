//! Keeping the table in step with the head: the deployments (read with the reader token, every
//! `--refresh`) and each ready replica's `/health` (every `--health-interval`). When the head
//! cannot be reached the last view stays: the replicas keep serving through a head restart.

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::proxy::Shared;
use crate::table::{DeploymentView, ReplicaId, Target};

/// The names a request's `model` may use for `d`: its name and its `--served-model-name`s.
pub fn models_of(d: &pb::Deployment) -> Vec<String> {
    let mut names = vec![d.name.clone()];
    let mut it = d.engine_args.iter().peekable();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--served-model-name=") {
            names.push(v.to_string());
        } else if a == "--served-model-name" {
            while let Some(v) = it.next_if(|v| !v.starts_with('-')) {
                names.push(v.clone());
            }
        }
    }
    names.dedup();
    names
}

/// The head's deployments as the table sees them: one target per replica with an endpoint.
pub fn view_of(deployments: &[pb::Deployment]) -> Vec<DeploymentView> {
    let running = pb::DeploymentState::Running as i32;
    deployments
        .iter()
        .map(|d| {
            // A head without replicas in its answers: the deployment is its one replica.
            let replicas: Vec<(u32, &str, i32)> = if d.replicas.is_empty() {
                vec![(0, d.endpoint.as_str(), d.state)]
            } else {
                d.replicas.iter().map(|r| (r.index, r.endpoint.as_str(), r.state)).collect()
            };
            let replicas = replicas
                .into_iter()
                .filter(|(_, endpoint, _)| !endpoint.is_empty())
                .map(|(index, endpoint, state)| Target {
                    id: ReplicaId { deployment: d.name.clone(), replica: index.to_string() },
                    endpoint: endpoint.to_string(),
                    ready: state == running,
                    draining: state == pb::DeploymentState::Draining as i32,
                })
                .collect();
            DeploymentView { name: d.name.clone(), models: models_of(d), replicas }
        })
        .collect()
}

pub type DeploymentsClient = pb::deployments_client::DeploymentsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, tessera_common::auth::Bearer>,
>;

/// Reads the head's deployments every `every` into the table until `stop`.
pub async fn deployments(
    shared: Arc<Shared>,
    clients: Vec<(String, DeploymentsClient)>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut failing = false;
    // With several heads (heads on one etcd store), the one that answers; a standby's answer
    // names the leader, asked next.
    let mut current = 0usize;
    loop {
        let mut answered = false;
        for _ in 0..clients.len() {
            let (url, client) = &clients[current];
            let mut client = client.clone();
            let why = match tokio::time::timeout(Duration::from_secs(5), client.list(pb::ListDeploymentsRequest {}))
                .await
            {
                Ok(Ok(r)) => {
                    if failing {
                        info!(head = %url, "the head answers again");
                        failing = false;
                    }
                    let view = view_of(&r.into_inner().deployments);
                    shared.table.lock().unwrap_or_else(|p| p.into_inner()).update(view);
                    answered = true;
                    break;
                }
                Ok(Err(e)) => {
                    let leader = e.metadata().get("tessera-leader").and_then(|v| v.to_str().ok()).map(str::to_string);
                    if let Some(i) =
                        leader.and_then(|l| clients.iter().position(|(u, _)| *u == l.trim_end_matches('/')))
                    {
                        current = i;
                        continue;
                    }
                    format!("{}: {} ({:?})", url, e.message(), e.code())
                }
                Err(_) => format!("{url}: no answer within 5 s"),
            };
            if !failing {
                warn!(error = %why, "cannot read the deployments from the head; routing on the last view");
            }
            current = (current + 1) % clients.len();
        }
        if !answered {
            failing = true;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Checks every ready replica's `/health` every `every` until `stop`.
pub async fn health(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let mut bad = std::collections::BTreeSet::<ReplicaId>::new();
    loop {
        let targets = shared.table.lock().unwrap_or_else(|p| p.into_inner()).to_check();
        let checks = targets.into_iter().map(|(id, endpoint)| {
            let shared = shared.clone();
            async move {
                let ok = shared.check(&endpoint).await;
                (id, endpoint, ok)
            }
        });
        for (id, endpoint, ok) in futures_util::future::join_all(checks).await {
            shared.table.lock().unwrap_or_else(|p| p.into_inner()).health(&id, ok);
            match (ok, bad.contains(&id)) {
                (false, false) => {
                    warn!(replica = %id, %endpoint, "health check failed; no new requests go there until one passes");
                    bad.insert(id);
                }
                (true, true) => {
                    info!(replica = %id, "health check passes again");
                    bad.remove(&id);
                }
                _ => {}
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_model_names_come_from_the_engine_args() {
        let d = pb::Deployment {
            name: "llama".into(),
            engine_args: ["--served-model-name", "a", "b", "--max-num-seqs", "8", "--served-model-name=c"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ..Default::default()
        };
        assert_eq!(models_of(&d), ["llama", "a", "b", "c"]);
        let v = view_of(&[pb::Deployment {
            endpoint: "http://h:1".into(),
            state: pb::DeploymentState::Running as i32,
            ..d
        }]);
        assert_eq!(v[0].replicas.len(), 1);
        assert!(v[0].replicas[0].ready);
        let v = view_of(&[pb::Deployment {
            name: "x".into(),
            state: pb::DeploymentState::Running as i32,
            ..Default::default()
        }]);
        assert!(v[0].replicas.is_empty(), "no endpoint: nothing to route to");
    }
}
