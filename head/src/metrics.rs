//! The head's metrics (`tessera_head_*`): nodes by state, GPUs total and reserved, deployments by
//! state, group restarts, failure-detection events, heartbeat intervals seen, RPCs by method and
//! code, authentication refusals. Gauges are read at scrape time; counters follow the event stream.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tessera_common::node::NodeState;
use tessera_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;

use crate::deploy::Deployments;
use crate::membership::{EventKind, Membership};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub code: String,
}

pub struct HeadMetrics {
    registry: std::sync::Mutex<Registry>,
    nodes: Family<StateLabel, Gauge>,
    gpus_total: Gauge,
    gpus_fake: Gauge,
    gpus_reserved: Gauge,
    deployments: Family<StateLabel, Gauge>,
    group_restarts: Counter,
    detections: Family<StateLabel, Counter>,
    joins: Counter,
    pub rpcs: Family<RpcLabels, Counter>,
    pub auth_refusals: Counter,
    process: std::sync::OnceLock<Arc<tessera_worker::metrics::ProcessMetrics>>,
    /// 1 on a serving head (a standby serves its own 0).
    pub leader: Gauge,
    /// Heads on etcd: the leadership epoch (0 without election).
    pub leader_epoch: Gauge,
}

impl HeadMetrics {
    pub fn new() -> Arc<HeadMetrics> {
        let m = HeadMetrics {
            registry: std::sync::Mutex::new(Registry::default()),
            nodes: Family::default(),
            gpus_total: Gauge::default(),
            gpus_fake: Gauge::default(),
            gpus_reserved: Gauge::default(),
            deployments: Family::default(),
            group_restarts: Counter::default(),
            detections: Family::default(),
            joins: Counter::default(),
            rpcs: Family::default(),
            auth_refusals: Counter::default(),
            process: std::sync::OnceLock::new(),
            leader: Gauge::default(),
            leader_epoch: Gauge::default(),
        };
        m.leader.set(1);
        let mut r = Registry::with_prefix("tessera_head");
        r.register("membership_nodes", "Nodes by state (alive, suspect, dead, left, draining)", m.nodes.clone());
        r.register("gpus", "GPUs on alive and draining nodes", m.gpus_total.clone());
        r.register("gpus_fake", "Of those GPUs, how many are fake (--fake-gpus)", m.gpus_fake.clone());
        r.register("gpus_reserved", "GPUs held by deployments", m.gpus_reserved.clone());
        r.register("deployments", "Deployments by state", m.deployments.clone());
        r.register(
            "deploy_group_restarts",
            "Group restarts of deployments (a rank exited or its node died)",
            m.group_restarts.clone(),
        );
        r.register(
            "membership_failure_detections",
            "Nodes the failure detector marked suspect or dead",
            m.detections.clone(),
        );
        r.register("membership_joins", "Joins and rejoins of nodes", m.joins.clone());
        r.register("leader", "Whether this head leads (1) or stands by (0)", m.leader.clone());
        r.register(
            "leader_epoch",
            "Heads on etcd: the leadership epoch (the leadership key's create revision); 0 without election",
            m.leader_epoch.clone(),
        );
        r.register(
            "rpc_requests",
            "RPCs by method and gRPC status code (as known when the response starts)",
            m.rpcs.clone(),
        );
        r.register(
            "auth_refusals",
            "Calls refused for a missing, unknown or wrong-role token",
            m.auth_refusals.clone(),
        );
        let _ = m.process.set(tessera_worker::metrics::ProcessMetrics::register(&mut r));
        *m.registry.lock().expect("lock") = r;
        Arc::new(m)
    }

    /// Counts membership and deployment events as they happen.
    pub fn follow(self: &Arc<Self>, membership: Membership, deployments: Deployments) {
        let m = self.clone();
        tokio::spawn(async move {
            let Some((_, mut nodes)) = membership.subscribe().await else { return };
            let mut deps = deployments.subscribe();
            loop {
                tokio::select! {
                    e = nodes.recv() => match e {
                        Ok(e) => match (e.kind, e.node.state) {
                            (EventKind::Joined { .. }, _) => {
                                m.joins.inc();
                            }
                            (EventKind::StateChanged, s @ (NodeState::Suspect | NodeState::Dead)) => {
                                m.detections.get_or_create(&StateLabel { state: s.to_string() }).inc();
                            }
                            _ => {}
                        },
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return,
                    },
                    e = deps.recv() => match e {
                        Ok(e) => {
                            if e.deployment.as_ref().is_some_and(|d| d.state == pb::DeploymentState::Restarting as i32) {
                                m.group_restarts.inc();
                            }
                        }
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
    }

    /// Reads the gauges from the membership table and the deployments, and renders everything.
    pub async fn render(&self, membership: &Membership, deployments: &Deployments) -> String {
        if let Some(p) = self.process.get() {
            p.update();
        }
        let nodes = membership.list().await;
        self.nodes.clear();
        for s in [
            NodeState::Alive,
            NodeState::Suspect,
            NodeState::Dead,
            NodeState::Left,
            NodeState::Draining,
            NodeState::PendingApproval,
        ] {
            let n = nodes.iter().filter(|v| v.state == s).count();
            self.nodes.get_or_create(&StateLabel { state: s.to_string() }).set(n as i64);
        }
        let serving = nodes.iter().filter(|v| matches!(v.state, NodeState::Alive | NodeState::Draining));
        let gpus: Vec<_> = serving.flat_map(|v| v.info.inventory.gpus.iter()).collect();
        self.gpus_total.set(gpus.len() as i64);
        self.gpus_fake.set(gpus.iter().filter(|g| g.fake).count() as i64);
        if let Ok((reserved, _)) = deployments.reservation_counts().await {
            self.gpus_reserved.set(reserved as i64);
        }
        self.deployments.clear();
        if let Ok(list) = deployments.list().await {
            for d in list {
                let state = pb::DeploymentState::try_from(d.state)
                    .map(|s| s.as_str_name().trim_start_matches("DEPLOYMENT_STATE_").to_ascii_lowercase())
                    .unwrap_or_else(|_| "unknown".into());
                self.deployments.get_or_create(&StateLabel { state }).inc();
            }
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().expect("lock"));
        out
    }
}
