//! Deployments: plan, reserve, launch, supervise, and restart the whole group on any failure.
//!
//! One task owns every deployment and the GPU reservations. Worker reports, membership events and
//! RPCs arrive as commands; a tick drives backoff and pending deployments. See README.md beside
//! this file for the lifecycle.

pub mod spec;
mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tessera_common::node::NodeState;
use tessera_common::plan::{self, PlanRequest, Size};
use tessera_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};
use uuid::Uuid;

use crate::membership::{Event as MemberEvent, Membership};
use crate::store::{Store, StoredDeployment};
use spec::{DeploymentSpec, LaunchContext, LoadedModel, NodeShare, RESTART_WINDOW, STOP_GRACE_S};
pub use state::DState;
use state::{Dep, Launch, Proc};

/// Longest a delete waits for processes to confirm they stopped before forgetting them.
const DELETE_TIMEOUT: Duration = Duration::from_secs(30);
/// First restart delay; doubles per restart in the window, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub type LogStream = mpsc::Receiver<Result<pb::LogChunk, Status>>;

enum Cmd {
    Create {
        spec: Box<DeploymentSpec>,
        model: Box<LoadedModel>,
        reply: oneshot::Sender<Result<pb::Deployment, Status>>,
    },
    Get {
        name: String,
        reply: oneshot::Sender<Result<pb::Deployment, Status>>,
    },
    List {
        reply: oneshot::Sender<Vec<pb::Deployment>>,
    },
    Delete {
        name: String,
        reply: oneshot::Sender<Result<pb::Deployment, Status>>,
    },
    Restart {
        name: String,
        reply: oneshot::Sender<Result<pb::Deployment, Status>>,
    },
    Report {
        node_id: Uuid,
        report: pb::ShardReport,
    },
    NodeJoined {
        node_id: Uuid,
        shards: Vec<pb::ShardReport>,
    },
    LogData {
        data: pb::LogData,
    },
    Logs {
        req: pb::LogsRequest,
        reply: oneshot::Sender<Result<(u64, LogStream), Status>>,
    },
    LogCancel {
        id: u64,
    },
    Reserved {
        reply: oneshot::Sender<(usize, usize)>,
    },
}

/// Handle to the deployment task. Cheap to clone.
#[derive(Clone)]
pub struct Deployments {
    tx: mpsc::Sender<Cmd>,
    events: broadcast::Sender<pb::Event>,
}

impl Deployments {
    /// Starts the deployment task with the deployments recorded in `store` (after a head restart:
    /// their workers have `recovery_window` to report what runs before anything is judged).
    pub fn spawn(
        membership: Membership,
        seq: Arc<AtomicU64>,
        store: Arc<Store>,
        recovery_window: Duration,
        shutdown: CancellationToken,
    ) -> Result<Deployments, crate::store::StoreError> {
        let (tx, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(4096);
        let stored = store.load()?;
        let mut actor = Actor {
            membership,
            deps: BTreeMap::new(),
            reserved: HashMap::new(),
            events: events.clone(),
            seq,
            next_log_id: 1,
            log_routes: HashMap::new(),
            last_pending_retry: Instant::now(),
            store,
        };
        for d in stored {
            actor.recover(d, recovery_window);
        }
        tokio::spawn(actor.run(rx, shutdown));
        Ok(Deployments { tx, events })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.events.subscribe()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Status::unavailable("the head is shutting down"))?;
        rx.await.map_err(|_| Status::unavailable("the head is shutting down"))
    }

    pub async fn create(&self, spec: DeploymentSpec, model: LoadedModel) -> Result<pb::Deployment, Status> {
        self.ask(|reply| Cmd::Create { spec: Box::new(spec), model: Box::new(model), reply }).await?
    }
    pub async fn get(&self, name: String) -> Result<pb::Deployment, Status> {
        self.ask(|reply| Cmd::Get { name, reply }).await?
    }
    pub async fn list(&self) -> Result<Vec<pb::Deployment>, Status> {
        self.ask(|reply| Cmd::List { reply }).await
    }
    pub async fn delete(&self, name: String) -> Result<pb::Deployment, Status> {
        self.ask(|reply| Cmd::Delete { name, reply }).await?
    }
    pub async fn restart(&self, name: String) -> Result<pb::Deployment, Status> {
        self.ask(|reply| Cmd::Restart { name, reply }).await?
    }
    pub async fn logs(&self, req: pb::LogsRequest) -> Result<(u64, LogStream), Status> {
        self.ask(|reply| Cmd::Logs { req, reply }).await?
    }
    pub async fn log_cancel(&self, id: u64) {
        let _ = self.tx.send(Cmd::LogCancel { id }).await;
    }
    /// (GPUs reserved, GPUs held by live deployments' assignments): always equal.
    pub async fn reservation_counts(&self) -> Result<(usize, usize), Status> {
        self.ask(|reply| Cmd::Reserved { reply }).await
    }

    pub async fn report(&self, node_id: Uuid, report: pb::ShardReport) {
        let _ = self.tx.send(Cmd::Report { node_id, report }).await;
    }
    pub async fn node_joined(&self, node_id: Uuid, shards: Vec<pb::ShardReport>) {
        let _ = self.tx.send(Cmd::NodeJoined { node_id, shards }).await;
    }
    pub async fn log_data(&self, data: pb::LogData) {
        let _ = self.tx.send(Cmd::LogData { data }).await;
    }
}

struct Actor {
    membership: Membership,
    deps: BTreeMap<String, Dep>,
    /// GPU uuid -> deployment holding it.
    reserved: HashMap<String, String>,
    events: broadcast::Sender<pb::Event>,
    seq: Arc<AtomicU64>,
    next_log_id: u64,
    log_routes: HashMap<u64, (Uuid, mpsc::Sender<Result<pb::LogChunk, Status>>)>,
    last_pending_retry: Instant,
    store: Arc<Store>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, shutdown: CancellationToken) {
        let mut members = self.membership.subscribe().await.map(|(_, rx)| rx);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                cmd = rx.recv() => match cmd {
                    Some(c) => self.handle(c).await,
                    None => return,
                },
                ev = recv_member(&mut members) => match ev {
                    Some(e) => self.on_member(e).await,
                    None => members = self.membership.subscribe().await.map(|(_, rx)| rx),
                },
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    async fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Create { spec, model, reply } => {
                let r = self.create(*spec, *model).await;
                let _ = reply.send(r);
            }
            Cmd::Get { name, reply } => {
                let _ = reply.send(self.deps.get(&name).map(Dep::to_pb).ok_or_else(|| not_found(&name)));
            }
            Cmd::List { reply } => {
                let _ = reply.send(self.deps.values().map(Dep::to_pb).collect());
            }
            Cmd::Delete { name, reply } => {
                let r = self.delete(&name).await;
                let _ = reply.send(r);
            }
            Cmd::Restart { name, reply } => {
                let r = match self.deps.get(&name).map(|d| d.state) {
                    None => Err(not_found(&name)),
                    Some(DState::Stopping | DState::Stopped) => {
                        Err(Status::failed_precondition(format!("deployment {name:?} is being deleted")))
                    }
                    Some(_) => {
                        self.group_restart(&name, "restarted by an operator".into(), false).await;
                        Ok(self.deps[&name].to_pb())
                    }
                };
                let _ = reply.send(r);
            }
            Cmd::Report { node_id, report } => self.on_report(node_id, report).await,
            Cmd::NodeJoined { node_id, shards } => {
                for s in shards {
                    self.on_report(node_id, s).await;
                }
            }
            Cmd::LogData { data } => {
                if let Some((_, tx)) = self.log_routes.get(&data.request_id) {
                    let item = if data.error.is_empty() {
                        Ok(pb::LogChunk { data: data.data })
                    } else {
                        Err(Status::unavailable(data.error))
                    };
                    let failed = tx.try_send(item).is_err();
                    if data.done || failed {
                        self.log_routes.remove(&data.request_id);
                    }
                }
            }
            Cmd::Logs { req, reply } => {
                let r = self.logs(req).await;
                let _ = reply.send(r);
            }
            Cmd::LogCancel { id } => {
                if let Some((node, _)) = self.log_routes.remove(&id) {
                    self.send(node, pb::head_message::Msg::LogCancel(pb::LogCancel { request_id: id })).await;
                }
            }
            Cmd::Reserved { reply } => {
                let held: usize = self.deps.values().filter_map(|d| d.launch.as_ref()).map(|l| l.gpus.len()).sum();
                let _ = reply.send((self.reserved.len(), held));
            }
        }
    }

    async fn create(&mut self, spec: DeploymentSpec, model: LoadedModel) -> Result<pb::Deployment, Status> {
        if self.deps.contains_key(&spec.name) {
            return Err(Status::already_exists(format!(
                "a deployment named {:?} exists; delete it first or choose another name",
                spec.name
            )));
        }
        // The planner's checks first, against the cluster as if it were empty of other
        // deployments: a shape or size that can never work is refused outright.
        let nodes = self.membership.list().await;
        let empty = crate::server::planner::cluster_of(&nodes);
        let report = plan::plan(&model.desc, &model.weights, &empty, &plan_request(&spec));
        let fatal: Vec<String> = report
            .errors
            .iter()
            .filter(|e| e.rule != "placement")
            .map(|e| format!("[{}] {}", e.rule, e.message))
            .collect();
        if !fatal.is_empty() {
            return Err(Status::failed_precondition(format!("invalid plan: {}", fatal.join("; "))));
        }
        let name = spec.name.clone();
        info!(deployment = %name, tp = spec.tp, pp = spec.pp, engine = ?spec.engine, "deployment created");
        let dep = Dep::new(spec, Some(model));
        // Durable before the RPC answers.
        self.store
            .put(&dep.to_stored())
            .map_err(|e| Status::unavailable(format!("cannot record the deployment: {e}")))?;
        self.deps.insert(name.clone(), dep);
        self.launch_on(&name, nodes, empty).await;
        Ok(self.deps[&name].to_pb())
    }

    /// Plans against free GPUs and launches the next generation, or leaves the deployment pending.
    async fn try_launch(&mut self, name: &str) {
        let nodes = self.membership.list().await;
        let cluster = crate::server::planner::cluster_of(&nodes);
        self.launch_on(name, nodes, cluster).await;
    }

    /// [`Actor::try_launch`] with the inventory already read (a 10,000-node table is worth reading
    /// once per call, not twice).
    async fn launch_on(
        &mut self,
        name: &str,
        nodes: Vec<crate::membership::NodeView>,
        mut cluster: tessera_common::plan::placement::Cluster,
    ) {
        if !self.reserved.is_empty() {
            for n in &mut cluster.nodes {
                for g in &mut n.gpus {
                    g.reserved = self.reserved.contains_key(&g.uuid);
                }
            }
        }
        let Some(dep) = self.deps.get_mut(name) else { return };
        let Some(model) = dep.model.as_ref() else {
            dep.set_state(
                DState::Failed,
                format!("cannot read the model at {} to plan it", dep.spec.model_path.display()),
            );
            self.persist(name);
            self.emit(name);
            return;
        };
        let report = plan::plan(&model.desc, &model.weights, &cluster, &plan_request(&dep.spec));
        if !report.valid {
            let msg = report.errors.iter().map(|e| e.message.clone()).collect::<Vec<_>>().join("; ");
            let only_placement = report.errors.iter().all(|e| e.rule == "placement");
            if only_placement {
                // Retried when capacity changes (a node joins, a deployment is deleted) and on ticks.
                dep.next_attempt = None;
                let message = format!("waiting for GPUs: {msg}");
                if dep.state != DState::Pending || dep.message != message {
                    dep.set_state(DState::Pending, message);
                    self.emit(name);
                }
            } else {
                dep.set_state(DState::Failed, format!("cannot plan: {msg}"));
                self.persist(name);
                self.emit(name);
            }
            return;
        }
        // Keyed by Uuid: formatting 10,000 ids into strings for a handful of lookups costs more.
        let by_id: HashMap<Uuid, &crate::membership::NodeView> = nodes.iter().map(|n| (n.id, n)).collect();
        let mut shares: Vec<NodeShare> = Vec::new();
        for r in &report.placement {
            if shares.last().map(|s| s.node_rank) != Some(r.node_rank) {
                let Some(n) = Uuid::parse_str(&r.node_id).ok().and_then(|id| by_id.get(&id)) else { continue };
                shares.push(NodeShare {
                    node_id: r.node_id.clone(),
                    node: r.node.clone(),
                    address: n.address,
                    node_rank: r.node_rank,
                    ranks: Vec::new(),
                });
            }
            if let Some(s) = shares.last_mut() {
                s.ranks.push(r.clone());
            }
        }
        let Some(master_addr) = shares.first().map(|s| s.address) else { return };
        // Reserve, then launch generation + 1.
        let gpus: Vec<String> = report.placement.iter().map(|r| r.gpu_uuid.clone()).collect();
        for g in &gpus {
            let prev = self.reserved.insert(g.clone(), name.to_string());
            debug_assert!(prev.is_none(), "GPU {g} reserved twice");
        }
        dep.generation += 1;
        let ctx = LaunchContext {
            spec: &dep.spec,
            generation: dep.generation,
            nodes: &shares,
            stages: &report.stages,
            master_addr,
        };
        let mut per_node: Vec<(Uuid, Vec<pb::ShardProcess>)> = Vec::new();
        let mut procs = BTreeMap::new();
        for s in &shares {
            let ps = spec::processes(&ctx, s);
            let node_uuid = Uuid::parse_str(&s.node_id).unwrap_or_default();
            for p in &ps {
                procs.insert(p.key.clone(), Proc::new(node_uuid, &s.node, p.ranks.clone()));
            }
            per_node.push((node_uuid, ps));
        }
        dep.launch = Some(Launch {
            gpus,
            placement: report.placement.clone(),
            stages: report.stages.clone(),
            per_node,
            master_addr,
            master_port: 0,
            health_port: 0,
            rest_sent: false,
        });
        dep.procs = procs;
        let generation = dep.generation;
        dep.set_state(
            DState::Starting,
            format!("generation {generation}: launching {} process(es) on {} node(s)", dep.procs.len(), shares.len()),
        );
        info!(deployment = %name, generation, nodes = shares.len(), "launching");
        self.persist(name);
        self.emit(name);
        // Node rank 0 first: it picks the rendezvous ports; the others follow once they are known.
        let (first, procs0) = {
            let l = self.deps[name].launch.as_ref().expect("just set");
            l.per_node[0].clone()
        };
        if let Some(d) = self.deps.get_mut(name) {
            for p in d.procs.values_mut().filter(|p| p.node_id == first) {
                p.launched = true;
            }
        }
        let msg = pb::LaunchShards {
            deployment: name.to_string(),
            generation,
            processes: procs0,
            pick_ports: true,
            master_port: 0,
            health_port: 0,
            stop_grace_s: STOP_GRACE_S,
        };
        if !self.send(first, pb::head_message::Msg::Launch(msg)).await {
            self.group_restart(name, "node rank 0 is not connected".into(), true).await;
        }
    }

    async fn send_rest(&mut self, name: &str) {
        let Some(dep) = self.deps.get_mut(name) else { return };
        let Some(l) = dep.launch.as_mut() else { return };
        if l.rest_sent || l.master_port == 0 {
            return;
        }
        l.rest_sent = true;
        let first = l.per_node.first().map(|(n, _)| *n);
        for p in dep.procs.values_mut().filter(|p| Some(p.node_id) != first) {
            p.launched = true;
        }
        let sends: Vec<(Uuid, pb::LaunchShards)> = l.per_node[1..]
            .iter()
            .map(|(node, ps)| {
                (
                    *node,
                    pb::LaunchShards {
                        deployment: name.to_string(),
                        generation: dep.generation,
                        processes: ps.clone(),
                        pick_ports: false,
                        master_port: l.master_port,
                        health_port: l.health_port,
                        stop_grace_s: STOP_GRACE_S,
                    },
                )
            })
            .collect();
        for (node, msg) in sends {
            if !self.send(node, pb::head_message::Msg::Launch(msg)).await {
                self.group_restart(name, format!("node {node} is not connected"), true).await;
                return;
            }
        }
    }

    async fn on_report(&mut self, node_id: Uuid, r: pb::ShardReport) {
        let exited = r.state == pb::ProcessState::Exited as i32;
        let Some(dep) = self.deps.get_mut(&r.deployment) else {
            // Not ours (a deployment deleted while the node was away, or from before a head
            // restart): nothing of it may keep running.
            if !exited {
                warn!(deployment = %r.deployment, node_id = %node_id, "stopping processes of an unknown deployment");
                let stop = pb::StopShards {
                    deployment: r.deployment.clone(),
                    below_generation: 0,
                    reason: "unknown deployment".into(),
                };
                self.send(node_id, pb::head_message::Msg::Stop(stop)).await;
            }
            return;
        };
        if r.generation != dep.generation {
            // Fencing: reports of other generations change nothing, but what still runs is stopped.
            let below = if r.generation < dep.generation { dep.generation } else { 0 };
            let deleting = dep.state == DState::Stopping;
            if deleting {
                dep.forget_proc(&r.key, r.generation);
            }
            if !exited {
                let stop = pb::StopShards {
                    deployment: r.deployment.clone(),
                    below_generation: below,
                    reason: "stale generation".into(),
                };
                self.send(node_id, pb::head_message::Msg::Stop(stop)).await;
            }
            if deleting {
                self.finish_delete_if_done(&r.deployment);
            }
            return;
        }
        let name = r.deployment.clone();
        let mut learned_ports = false;
        if let Some(l) = dep.launch.as_mut() {
            if l.master_port == 0 && r.master_port > 0 {
                l.master_port = r.master_port;
                l.health_port = r.health_port;
                learned_ports = true;
            }
        }
        if learned_ports {
            self.persist(&r.deployment);
        }
        let Some(dep) = self.deps.get_mut(&r.deployment) else { return };
        let Some(p) = dep.procs.get_mut(&r.key) else { return };
        let before = p.state;
        p.apply(&r);
        let changed = p.state != before;
        if dep.state == DState::Stopping {
            self.finish_delete_if_done(&name);
            return;
        }
        self.send_rest(&name).await;
        let Some(dep) = self.deps.get_mut(&name) else { return };
        if exited && matches!(dep.state, DState::Starting | DState::Running) {
            let reason = describe_exit(&r, dep.procs.get(&r.key).map(|p| p.node.as_str()).unwrap_or("?"));
            warn!(deployment = %name, key = %r.key, %reason, "a process exited: restarting the group");
            self.group_restart(&name, reason, true).await;
            return;
        }
        if dep.state == DState::Starting && dep.procs.values().all(|p| p.state == pb::ProcessState::Ready) {
            let g = dep.generation;
            dep.set_state(DState::Running, format!("generation {g}: all {} process(es) ready", dep.procs.len()));
            info!(deployment = %name, generation = g, "running");
            self.emit(&name);
        } else if changed {
            self.emit(&name);
        }
    }

    /// Stops every process of the current generation, releases the GPUs, and schedules the next
    /// generation after a backoff, or gives up after max_restarts within 10 minutes.
    async fn group_restart(&mut self, name: &str, reason: String, counted: bool) {
        let now = Instant::now();
        let Some(dep) = self.deps.get_mut(name) else { return };
        let generation = dep.generation;
        let nodes: HashSet<Uuid> = dep.procs.values().map(|p| p.node_id).collect();
        release(&mut self.reserved, dep);
        if counted {
            dep.restart_times.push_back(now);
            while dep.restart_times.front().is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW) {
                dep.restart_times.pop_front();
            }
        }
        let recent = dep.restart_times.len() as u32;
        let failed = counted && recent > dep.spec.max_restarts;
        if failed {
            dep.set_state(
                DState::Failed,
                format!(
                    "{reason}; gave up after {} restart(s) within 10 minutes (--max-restarts {})",
                    recent - 1,
                    dep.spec.max_restarts
                ),
            );
            dep.next_attempt = None;
        } else {
            dep.restarts += 1;
            let backoff = if counted {
                (BASE_BACKOFF * 2u32.saturating_pow(recent.saturating_sub(1))).min(MAX_BACKOFF)
            } else {
                Duration::ZERO
            };
            dep.set_state(
                DState::Restarting,
                format!("{reason}; restarting the group at generation {} in {:?}", generation + 1, backoff),
            );
            dep.next_attempt = Some(now + backoff);
        }
        self.persist(name);
        self.emit(name);
        for node in nodes {
            let stop = pb::StopShards {
                deployment: name.to_string(),
                below_generation: generation + 1,
                reason: reason.clone(),
            };
            self.send(node, pb::head_message::Msg::Stop(stop)).await;
        }
    }

    async fn delete(&mut self, name: &str) -> Result<pb::Deployment, Status> {
        let Some(dep) = self.deps.get_mut(name) else { return Err(not_found(name)) };
        if dep.state == DState::Stopping {
            return Ok(dep.to_pb());
        }
        // Processes whose node was never told to launch them will never report: nothing to wait for.
        for p in dep.procs.values_mut().filter(|p| !p.launched) {
            p.gone = true;
        }
        let nodes: HashSet<Uuid> = dep
            .procs
            .values()
            .filter(|p| p.launched && p.state != pb::ProcessState::Exited)
            .map(|p| p.node_id)
            .collect();
        release(&mut self.reserved, dep);
        if let Err(e) = self.store.remove(name) {
            // Deleting goes on: after a head restart, processes of an unknown deployment are stopped.
            warn!(deployment = %name, error = %e, "cannot remove the deployment's record");
        }
        let Some(dep) = self.deps.get_mut(name) else { return Err(not_found(name)) };
        dep.set_state(DState::Stopping, "deleting: stopping every process".into());
        dep.delete_deadline = Some(Instant::now() + DELETE_TIMEOUT);
        let snapshot = dep.to_pb();
        self.emit(name);
        for node in nodes {
            let stop = pb::StopShards { deployment: name.to_string(), below_generation: 0, reason: "deleted".into() };
            self.send(node, pb::head_message::Msg::Stop(stop)).await;
        }
        self.finish_delete_if_done(name);
        // Capacity freed: pending deployments may start.
        self.retry_pending().await;
        Ok(snapshot)
    }

    fn finish_delete_if_done(&mut self, name: &str) {
        let Some(dep) = self.deps.get(name) else { return };
        if dep.state != DState::Stopping {
            return;
        }
        let timed_out = dep.delete_deadline.is_some_and(|d| Instant::now() >= d);
        if dep.procs.values().all(|p| p.state == pb::ProcessState::Exited || p.gone) || timed_out {
            if timed_out {
                warn!(deployment = %name, "some processes did not confirm their stop in time; forgetting them");
            }
            let mut dep = self.deps.remove(name).expect("present");
            dep.set_state(DState::Stopped, "deleted".into());
            info!(deployment = %name, "deployment deleted");
            self.emit_dep(&dep);
        }
    }

    async fn on_member(&mut self, e: MemberEvent) {
        let node = e.node.id;
        match e.node.state {
            NodeState::Dead | NodeState::Left => {
                let affected: Vec<String> = self
                    .deps
                    .iter()
                    .filter(|(_, d)| d.procs.values().any(|p| p.node_id == node))
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in affected {
                    let state = self.deps[&name].state;
                    match state {
                        DState::Starting | DState::Running => {
                            let why = format!("node {} is {}: {}", e.node.info.name, e.node.state, e.node.state_reason);
                            self.group_restart(&name, why, true).await;
                        }
                        DState::Stopping => {
                            if let Some(d) = self.deps.get_mut(&name) {
                                for p in d.procs.values_mut().filter(|p| p.node_id == node) {
                                    p.gone = true;
                                }
                            }
                            self.finish_delete_if_done(&name);
                        }
                        _ => {}
                    }
                }
            }
            NodeState::Alive => self.retry_pending().await,
            _ => {}
        }
    }

    async fn retry_pending(&mut self) {
        let pending: Vec<String> =
            self.deps.iter().filter(|(_, d)| d.state == DState::Pending).map(|(n, _)| n.clone()).collect();
        for name in pending {
            self.try_launch(&name).await;
        }
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .deps
            .iter()
            .filter(|(_, d)| d.state == DState::Restarting && d.next_attempt.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.try_launch(&name).await;
        }
        // After a head restart: a generation whose processes did not all report in time restarts.
        let unrecovered: Vec<(String, Vec<String>)> = self
            .deps
            .iter()
            .filter(|(_, d)| d.state == DState::Starting && d.recover_deadline.is_some_and(|t| t <= now))
            .map(|(n, d)| {
                (
                    n.clone(),
                    d.procs.iter().filter(|(_, p)| p.pid == 0).map(|(k, p)| format!("{k} on {}", p.node)).collect(),
                )
            })
            .collect();
        for (name, missing) in unrecovered {
            if let Some(d) = self.deps.get_mut(&name) {
                d.recover_deadline = None;
            }
            if !missing.is_empty() {
                let why =
                    format!("after the head restart, {} did not report within the recovery window", missing.join(", "));
                self.group_restart(&name, why, true).await;
            }
        }
        let stopping: Vec<String> =
            self.deps.iter().filter(|(_, d)| d.state == DState::Stopping).map(|(n, _)| n.clone()).collect();
        for name in stopping {
            self.finish_delete_if_done(&name);
        }
        // Pending deployments also retry now and then, in case capacity came back quietly.
        if now.duration_since(self.last_pending_retry) >= Duration::from_secs(2) {
            self.last_pending_retry = now;
            self.retry_pending().await;
        }
    }

    async fn logs(&mut self, req: pb::LogsRequest) -> Result<(u64, LogStream), Status> {
        let dep = self.deps.get(&req.name).ok_or_else(|| not_found(&req.name))?;
        let (key, node) = dep
            .procs
            .iter()
            .find(|(_, p)| p.ranks.contains(&(req.rank as u32)))
            .map(|(k, p)| (k.clone(), p.node_id))
            .ok_or_else(|| {
                Status::not_found(format!("deployment {:?} has no rank {} running now", req.name, req.rank))
            })?;
        let id = self.next_log_id;
        self.next_log_id += 1;
        let (tx, rx) = mpsc::channel(64);
        self.log_routes.insert(id, (node, tx));
        let msg = pb::LogRequest {
            request_id: id,
            deployment: req.name.clone(),
            key,
            tail_lines: if req.tail == 0 { 100 } else { req.tail.min(100_000) },
            follow: req.follow,
        };
        if !self.send(node, pb::head_message::Msg::LogRequest(msg)).await {
            self.log_routes.remove(&id);
            return Err(Status::unavailable("the node running that rank is not connected"));
        }
        Ok((id, rx))
    }

    async fn send(&self, node: Uuid, msg: pb::head_message::Msg) -> bool {
        self.membership.send(node, pb::HeadMessage { msg: Some(msg) }).await
    }

    /// Writes a deployment's record; a failure is logged (the in-memory state stays authoritative
    /// until the next successful write).
    fn persist(&self, name: &str) {
        if let Some(d) = self.deps.get(name) {
            if let Err(e) = self.store.put(&d.to_stored()) {
                warn!(deployment = %name, error = %e, "cannot record the deployment's state");
            }
        }
    }

    /// Rebuilds a deployment from its record at start-up: the current generation's processes are
    /// expected to be running still, and are adopted as their workers report them.
    fn recover(&mut self, d: StoredDeployment, window: Duration) {
        let now = Instant::now();
        let spec = match d.to_spec() {
            Ok(s) => s,
            Err(e) => {
                warn!(deployment = %d.name, error = %e, "cannot rebuild the deployment; forgetting it");
                return;
            }
        };
        let model = tessera_common::model::load_model(&spec.model_path).ok().map(|m| LoadedModel::of(&m));
        let name = spec.name.clone();
        let mut dep = Dep::new(spec, model);
        dep.generation = d.generation;
        dep.restarts = d.restarts;
        let unix_now = crate::membership::unix_ms();
        dep.restart_times = d
            .restart_times_unix_ms
            .iter()
            .filter_map(|&t| now.checked_sub(Duration::from_millis(unix_now.saturating_sub(t))))
            .collect();
        match (d.failed, d.launch) {
            (Some(why), _) => dep.set_state(DState::Failed, why),
            (None, Some(l)) => {
                for g in &l.gpus {
                    self.reserved.insert(g.clone(), name.clone());
                }
                for p in &l.processes {
                    let node = Uuid::parse_str(&p.node_id).unwrap_or_default();
                    let mut proc = Proc::new(node, &p.node, p.ranks.clone());
                    proc.launched = true;
                    dep.procs.insert(p.key.clone(), proc);
                }
                dep.launch = Some(Launch {
                    gpus: l.gpus,
                    placement: l.placement,
                    stages: l.stages,
                    per_node: Vec::new(),
                    master_addr: l.master_addr.parse().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
                    master_port: l.master_port,
                    health_port: l.health_port,
                    rest_sent: true,
                });
                dep.recover_deadline = Some(now + window);
                dep.set_state(
                    DState::Starting,
                    format!(
                        "recovering after a head restart: waiting up to {:?} for generation {} to report",
                        window, d.generation
                    ),
                );
            }
            (None, None) => {
                dep.next_attempt = Some(now + window);
                dep.set_state(
                    DState::Restarting,
                    "recovering after a head restart: relaunching once the nodes are back".into(),
                );
            }
        }
        info!(deployment = %name, generation = dep.generation, state = ?dep.state, "deployment recovered from the store");
        self.deps.insert(name, dep);
    }

    fn emit(&self, name: &str) {
        if let Some(d) = self.deps.get(name) {
            self.emit_dep(d);
        }
    }

    fn emit_dep(&self, d: &Dep) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let event = pb::Event {
            seq,
            unix_ms: crate::membership::unix_ms(),
            kind: pb::EventKind::DeploymentChanged as i32,
            node: None,
            previous_state: 0,
            reason: d.message.clone(),
            rejoined: false,
            deployment: Some(d.to_pb()),
        };
        let _ = self.events.send(event);
    }
}

/// Releases a deployment's GPUs. Draining the launch's list makes a second release a no-op, so
/// GPUs are released exactly once whatever the order of failures. The rest of the launch stays
/// for display until the next generation replaces it.
fn release(reserved: &mut HashMap<String, String>, dep: &mut Dep) {
    if let Some(l) = dep.launch.as_mut() {
        for g in l.gpus.drain(..) {
            if reserved.get(&g).is_some_and(|n| *n == dep.spec.name) {
                reserved.remove(&g);
            }
        }
    }
}

fn plan_request(s: &DeploymentSpec) -> PlanRequest {
    PlanRequest {
        tp: Size::Fixed(s.tp),
        pp: Size::Fixed(s.pp),
        gpu_memory_utilization: s.gpu_memory_utilization,
        max_model_len: s.max_model_len,
        layer_partition: None,
        strict: false,
    }
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!("no deployment named {name:?}; `tessera deployments` lists them"))
}

fn describe_exit(r: &pb::ShardReport, node: &str) -> String {
    let how = match (r.exit_code, r.signal) {
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        (Some(code), None) => format!("exited with code {code}"),
        _ => "exited".to_string(),
    };
    let ranks: Vec<String> = r.ranks.iter().map(u32::to_string).collect();
    let mut s = format!("rank {} ({} on {node}) {how}", ranks.join(","), r.key);
    if !r.error.is_empty() {
        s.push_str(&format!(": {}", r.error));
    }
    let tail: Vec<&str> = r.log_tail.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
    if !tail.is_empty() {
        s.push_str(&format!("; last log lines: {}", tail.join(" | ")));
    }
    s
}

async fn recv_member(rx: &mut Option<broadcast::Receiver<MemberEvent>>) -> Option<MemberEvent> {
    match rx {
        Some(r) => loop {
            match r.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        },
        None => std::future::pending().await,
    }
}
