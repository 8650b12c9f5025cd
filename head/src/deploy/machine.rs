//! The deployments' state machine: every deployment, every GPU reservation and the planner's view
//! of the cluster, owned by one synchronous value. Inputs (RPCs, worker reports, membership
//! changes, store results, ticks) and the time go in; effects (durable writes, messages to nodes,
//! events, replies) come out. No I/O, no tokio task, no clock of its own: the async shell in
//! `mod.rs` runs the effects, and the tests drive it with plain values.
//!
//! Rules it keeps:
//! - **Persist before act.** A transition that needs a new generation (or removes a record) emits
//!   `Persist` and parks; its sends and its reply leave only once `Persisted` comes back.
//!   `PersistFailed` undoes the transition and answers the RPC that caused it with the error.
//! - **Incarnations.** `Create` mints a [`DeploymentUid`]; launches, stops and reports carry it, so
//!   nothing of a deleted deployment is mistaken for a new one of the same name.
//! - **Reservations** belong to the group across its restarts: a restarting group is planned on
//!   its own GPUs first, then on its own plus free ones; pending deployments see only free GPUs.
//! - **One event per transition.** A failing group is stopped at once; its event is emitted after
//!   a short settle time and names the process that failed first (by exit time; a dead node
//!   explains every exit).
//! - **Node-scoped reports.** A report counts only for a process the head placed on that node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use prost::Message;
use tessera_common::ids::{DeploymentUid, Generation, NodeId, ProcKey};
use tessera_common::node::NodeState;
use tessera_common::plan::{self, PlanReport, PlanRequest, Size};
use tessera_proto::v1 as pb;
use tokio::time::Instant;
use tracing::{info, warn};

use super::dep::{DState, Dep, Failing, Launch, Proc};
use super::engine::{self, LaunchContext, NodeShare};
use super::inventory::Inventory;
use super::record::{self, At};
use super::spec::{DeploymentSpec, LoadedModel, RESTART_WINDOW, STOP_GRACE_S};
use super::staging::{self, NodeStage, Staging, StagingMsg};
use crate::membership::NodeView;
use crate::store::StoredDeployment;

/// Longest a delete waits for processes to confirm they stopped before forgetting them.
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(30);
/// First restart delay; doubles per restart in the window, up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a failing group waits for reports naming an earlier failure before its event. It
/// overlaps the first backoff (500 ms), so a first restart is no later for it.
pub const SETTLE: Duration = Duration::from_millis(400);
/// How often pending deployments try again even when nothing seems to have changed.
pub const PENDING_RETRY: Duration = Duration::from_secs(2);
/// How long a draining group keeps taking requests' ends before it may stop even when idle:
/// gateways read the deployments every second (`--refresh`), so by then none sends it more.
pub const DRAIN_NOTICE: Duration = Duration::from_secs(2);
/// How often a draining group's engine is asked how many requests it holds.
pub const LOAD_CHECK_EVERY: Duration = Duration::from_millis(500);
/// A staging in which no node moved a byte for this long fails its generation.
pub const STAGING_STALL: Duration = Duration::from_secs(300);
/// The largest launch message sent to a worker; workers accept 4 MiB messages.
pub const MAX_LAUNCH_BYTES: usize = 3 * 1024 * 1024;

pub type ReplyId = u64;
pub type PersistId = u64;

/// What the machine is told.
#[derive(Debug)]
pub enum Input {
    Create {
        spec: Box<DeploymentSpec>,
        model: Box<LoadedModel>,
        reply: ReplyId,
    },
    Delete {
        name: String,
        reply: ReplyId,
    },
    Restart {
        name: String,
        reply: ReplyId,
    },
    /// How many requests a draining group's engine holds (None: it cannot tell).
    Load {
        name: String,
        generation: u64,
        in_flight: Option<u64>,
    },
    /// A process report from a node's session.
    Report {
        node: NodeId,
        report: pb::ShardReport,
    },
    /// A worker's staging message: the source's index of the model, or a receiver's progress.
    Staging {
        node: NodeId,
        msg: StagingMsg,
    },
    /// A node (re)joined and listed what it runs.
    NodeJoined {
        node: NodeId,
        running: Vec<pb::ShardReport>,
    },
    /// A membership change of one node.
    NodeChanged(Box<NodeView>),
    /// The whole membership table (at start, and after the event stream lagged).
    NodesListed(Vec<NodeView>),
    /// A node was forgotten by membership.
    NodeForgotten(NodeId),
    Persisted(PersistId),
    PersistFailed(PersistId, String),
    /// A launch could not be handed to its node's session.
    Undeliverable {
        node: NodeId,
        deployment: String,
        generation: Generation,
    },
    Tick,
}

/// A durable write.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Put(Box<StoredDeployment>),
    Remove(String),
}

/// What the shell must do.
#[derive(Debug)]
pub enum Effect {
    /// Write durably, then feed back `Persisted` or `PersistFailed`.
    Persist(PersistId, Write),
    /// A message to a node; losing it is harmless (stops, fencing).
    Send(NodeId, pb::head_message::Msg),
    /// A launch; if it cannot be handed over, feed back `Undeliverable`.
    Launch(NodeId, pb::LaunchShards),
    /// Ask the engine at `endpoint` how many requests it holds (`GET /load`), then feed back
    /// `Load` (a draining group).
    CheckLoad {
        name: String,
        generation: u64,
        endpoint: String,
    },
    /// A deployment changed state: one event.
    Emit(Box<pb::Deployment>),
    Reply(ReplyId, Result<Box<pb::Deployment>, DeployError>),
}

/// Why a deployment call failed; mapped to gRPC codes in `server/`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeployError {
    #[error("no deployment named {0:?}; `tessera deployments` lists them")]
    NotFound(String),
    #[error("a deployment named {0:?} exists; delete it first or choose another name")]
    AlreadyExists(String),
    #[error("deployment {0:?} is being deleted; wait until `tessera get {0}` says it is gone")]
    BeingDeleted(String),
    #[error("a deployment named {0:?} is still being deleted; create it again once `tessera get {0}` says it is gone")]
    NameBeingDeleted(String),
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    #[error("deployment {name:?} has no rank {rank} running now")]
    NoSuchRank { name: String, rank: u64 },
    #[error(
        "cannot record {what}: {message}; nothing was changed, try again once the state store (its disk, or etcd) is healthy"
    )]
    Store { what: String, message: String },
    #[error("the node running rank {rank} of {name:?} is not connected; try again once it is")]
    NodeUnreachable { name: String, rank: u64 },
    #[error("the head is shutting down")]
    ShuttingDown,
    /// An update or rollback stopped: what happened, and what still serves.
    #[error("{0}")]
    RollStopped(String),
}

/// What a parked write releases or undoes.
#[derive(Debug)]
enum Park {
    /// A new deployment's record (with its first generation when it could be placed at once).
    Create { name: String, reply: ReplyId },
    /// Generation `generation` of `name`: on success its node rank 0 is told to launch.
    Launch { name: String, generation: Generation },
    /// Node rank 0's ports for `generation`: on success the other nodes are told.
    Ports { name: String, generation: Generation },
    /// A delete: nothing changes until the record is gone.
    Delete { name: String, reply: ReplyId },
    /// A state record (restart counters, failed); nothing waits on it.
    Record { name: String },
}

pub struct Machine {
    deps: BTreeMap<String, Dep>,
    /// GPU uuid -> deployment name holding it.
    reserved: HashMap<String, String>,
    inventory: Inventory,
    parked: HashMap<PersistId, Park>,
    next_persist: PersistId,
    recovery_window: Duration,
    last_pending_retry: Option<Instant>,
    /// GPUs reserved per node: membership never forgets these nodes.
    pins: HashMap<NodeId, usize>,
    pins_changed: bool,
    out: Vec<Effect>,
}

impl Machine {
    pub fn new(recovery_window: Duration) -> Machine {
        Machine {
            deps: BTreeMap::new(),
            reserved: HashMap::new(),
            inventory: Inventory::default(),
            parked: HashMap::new(),
            next_persist: 1,
            recovery_window,
            last_pending_retry: None,
            pins: HashMap::new(),
            pins_changed: false,
            out: Vec::new(),
        }
    }

    /// Rebuilds the deployments recorded in the store (after a head restart). `load` reads a
    /// model again (it may be gone: such a deployment cannot be planned again, but what runs of it
    /// is adopted).
    pub fn recover(
        &mut self,
        records: Vec<StoredDeployment>,
        load: impl Fn(&StoredDeployment) -> Option<LoadedModel>,
        at: At,
    ) {
        for r in records {
            let name = r.name.clone();
            let model = load(&r);
            match record::recover(r, model, at, self.recovery_window) {
                Ok(dep) => {
                    for g in dep.gpus().to_vec() {
                        self.reserve(&g, &name);
                    }
                    info!(deployment = %name, generation = %dep.generation, state = ?dep.state, "deployment recovered from the store");
                    self.deps.insert(name, dep);
                }
                Err(e) => warn!(deployment = %name, error = %e, "cannot rebuild the deployment; forgetting it"),
            }
        }
    }

    // ---- queries ----

    /// A deployment: the fields of its lowest-numbered group of the newest revision that is not on
    /// its way out (else its lowest-numbered group), named by the deployment, with every replica
    /// listed.
    pub fn get(&self, name: &str, now: Instant) -> Result<pb::Deployment, DeployError> {
        let keys = self.group_keys(name);
        let groups: Vec<&Dep> = keys.iter().filter_map(|k| self.deps.get(k)).collect();
        let staying = |d: &Dep| !matches!(d.state, DState::Draining | DState::Stopping | DState::Stopped);
        let newest = groups.iter().filter(|d| staying(d)).map(|d| d.spec.revision).max();
        let first = groups
            .iter()
            .find(|d| staying(d) && Some(d.spec.revision) == newest)
            .or(groups.first())
            .ok_or_else(|| DeployError::NotFound(name.into()))?;
        let mut d = first.to_pb(now);
        d.name = name.to_string();
        d.replicas = keys.iter().filter_map(|k| self.deps.get(k)).map(|g| replica_of(g, now)).collect();
        d.revision = d.replicas.iter().map(|r| r.revision).max().unwrap_or(1);
        Ok(d)
    }

    /// Every deployment (see [`Machine::get`]), by name.
    pub fn list(&self, now: Instant) -> Vec<pb::Deployment> {
        let mut names: Vec<&str> = self.deps.keys().map(|k| super::spec::parent_of(k).0).collect();
        names.sort();
        names.dedup();
        names.into_iter().filter_map(|n| self.get(n, now).ok()).collect()
    }

    /// The group keys of deployment `name` (see [`spec::group_key`]), by replica index.
    pub fn group_keys(&self, name: &str) -> Vec<String> {
        if name.contains('.') {
            return Vec::new();
        }
        let mut keys: Vec<(u32, String)> =
            self.deps.get_key_value(name).map(|(k, _)| (0, k.clone())).into_iter().collect();
        // Keys `name.N` sort between `name.` and `name/` ('/' follows '.').
        let (lo, hi) = (format!("{name}."), format!("{name}/"));
        keys.extend(self.deps.range(lo..hi).map(|(k, _)| (super::spec::parent_of(k).1, k.clone())));
        keys.sort();
        keys.into_iter().map(|(_, k)| k).collect()
    }

    /// The newest revision's spec of `name` (named as the lowest-numbered group that runs it) and
    /// model: what more replicas and updates start from.
    pub fn spec_of(&self, name: &str) -> Option<(DeploymentSpec, Option<LoadedModel>)> {
        let keys = self.group_keys(name);
        let newest = keys.iter().filter_map(|k| self.deps.get(k)).map(|d| d.spec.revision).max()?;
        let d = keys.iter().filter_map(|k| self.deps.get(k)).find(|d| d.spec.revision == newest)?;
        Some((d.spec.clone(), d.model.clone()))
    }

    /// (GPUs reserved, GPUs held by deployments' launches): always equal.
    pub fn reservation_counts(&self) -> (usize, usize) {
        (self.reserved.len(), self.deps.values().map(|d| d.gpus().len()).sum())
    }

    /// Which node runs `rank` of `name` now, and the process's key there.
    pub fn locate(&self, name: &str, rank: u64) -> Result<(NodeId, ProcKey), DeployError> {
        let dep = self.deps.get(name).ok_or_else(|| DeployError::NotFound(name.into()))?;
        let no_rank = || DeployError::NoSuchRank { name: name.into(), rank };
        let rank32 = u32::try_from(rank).map_err(|_| no_rank())?;
        dep.locate(rank32).map(|(k, p)| (p.node_id, k.clone())).ok_or_else(no_rank)
    }

    /// The nodes whose GPUs deployments hold, when that set changed since the last call.
    pub fn take_pinned(&mut self) -> Option<HashSet<NodeId>> {
        if !std::mem::take(&mut self.pins_changed) {
            return None;
        }
        Some(self.pins.keys().copied().collect())
    }

    /// The earliest instant at which a `Tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for d in self.deps.values() {
            at(d.failing.as_ref().map(|f| f.settle_at));
            if d.state == DState::Restarting {
                at(d.next_attempt);
            }
            at(d.recover_deadline);
            at(d.delete_deadline);
            if d.staging_now()
                && let Some(s) = &d.staging
            {
                at(Some(s.last_progress + STAGING_STALL));
            }
            if let Some(dr) = &d.drain {
                at(Some(dr.deadline));
                at(Some(dr.next_check.max(dr.notice_until)));
            }
        }
        if self.deps.values().any(|d| d.state == DState::Pending) {
            at(self.last_pending_retry.map(|t| t + PENDING_RETRY));
        }
        t
    }

    // ---- inputs ----

    pub fn handle(&mut self, input: Input, at: At) -> Vec<Effect> {
        match input {
            Input::Create { spec, model, reply } => self.create(*spec, *model, reply, at),
            Input::Delete { name, reply } => self.delete(name, reply, at),
            Input::Restart { name, reply } => self.restart(&name, reply, at),
            Input::Report { node, report } => self.report(node, report, at),
            Input::Staging { node, msg: StagingMsg::Index(m) } => self.model_indexed(node, *m, at),
            Input::Staging { node, msg: StagingMsg::Progress(p) } => self.stage_progress(node, *p, at),
            Input::Load { name, generation, in_flight } => self.load(&name, generation, in_flight, at),
            Input::NodeJoined { node, running } => self.node_joined(node, running, at),
            Input::NodeChanged(v) => self.node_changed(&v, at),
            Input::NodesListed(all) => {
                let seen: HashSet<NodeId> = all.iter().map(|v| v.id).collect();
                let missing: Vec<NodeId> =
                    self.inventory.nodes().map(|n| n.id).filter(|id| !seen.contains(id)).collect();
                for v in &all {
                    self.node_changed(v, at);
                }
                for id in missing {
                    self.node_gone(id, "is no longer a member".into(), at);
                    self.inventory.remove(id);
                }
            }
            Input::NodeForgotten(id) => {
                self.node_gone(id, "was forgotten".into(), at);
                self.inventory.remove(id);
            }
            Input::Persisted(id) => self.persisted(id, at),
            Input::PersistFailed(id, message) => self.persist_failed(id, message, at),
            Input::Undeliverable { node, deployment, generation } => {
                let current = self.deps.get(&deployment).is_some_and(|d| d.generation == generation);
                if current {
                    let name = self.inventory.node(node).map(|n| n.name.clone()).unwrap_or_else(|| node.to_string());
                    let why = format!("the launch could not be handed to node {name} (not connected, or not reading)");
                    self.fail(&deployment, why, Blame::other(at.unix_ms), true, at);
                }
            }
            Input::Tick => self.tick(at),
        }
        std::mem::take(&mut self.out)
    }

    fn create(&mut self, mut spec: DeploymentSpec, model: LoadedModel, reply: ReplyId, at: At) {
        // A new deployment's first group: no group of the name may be left (one still draining or
        // stopping after a delete would otherwise be taken for a replica of the new one).
        let leftover = (spec.replica() == 0)
            .then(|| self.group_keys(&spec.name).into_iter().find(|k| *k != spec.name))
            .flatten()
            .and_then(|k| self.deps.get(&k));
        if let Some(d) = self.deps.get(&spec.name).or(leftover) {
            let e = if matches!(d.state, DState::Stopping | DState::Draining) {
                DeployError::NameBeingDeleted(spec.name.clone())
            } else {
                DeployError::AlreadyExists(spec.name.clone())
            };
            self.out.push(Effect::Reply(reply, Err(e)));
            return;
        }
        let req = plan_request(&spec);
        let engine = spec.engine;
        let sel = spec.node_selector.clone();
        let report =
            self.inventory.for_nodes(engine, &sel, |inv| plan::plan(&model.desc, &model.weights, inv.cluster(), &req));
        if !report.valid {
            // No node at all can run the engine: refused, with each node's reason.
            let (why, capable) = self.inventory.incapable(engine);
            if capable == 0 && !why.is_empty() {
                let e = format!("[capabilities] no node can run the {} engine: {}", engine.as_str(), why.join("; "));
                self.out.push(Effect::Reply(reply, Err(DeployError::InvalidPlan(e))));
                return;
            }
            // Would it ever fit? Plan against the cluster as if no GPU were reserved: a shape or size
            // that can never work is refused outright and reserves nothing.
            let empty = self
                .inventory
                .for_nodes(engine, &sel, |inv| inv.with_all_free(|c| plan::plan(&model.desc, &model.weights, c, &req)));
            let fatal: Vec<String> = empty
                .errors
                .iter()
                .filter(|e| e.rule != "placement")
                .map(|e| format!("[{}] {}", e.rule, e.message))
                .collect();
            if !fatal.is_empty() {
                self.out.push(Effect::Reply(reply, Err(DeployError::InvalidPlan(fatal.join("; ")))));
                return;
            }
        }
        let no_source = self.inventory.source_of(&spec.model_from).is_none_or(|h| h.capabilities.transfer_port == 0);
        if spec.staging && no_source && !spec.staging_asked {
            // The default, with nobody to stage from (a head with --no-worker): as before staging,
            // every node reads the model at its path.
            info!(deployment = %spec.name, "no node to stage the model from: staging off");
            spec.staging = false;
        }
        if spec.staging && no_source {
            let e = format!(
                "[staging] the model is staged from {}, which is not connected or has no transfer server; deploy with --staging off when every node has the model at its path",
                source_name(&spec.model_from)
            );
            self.out.push(Effect::Reply(reply, Err(DeployError::InvalidPlan(e))));
            return;
        }
        let name = spec.name.clone();
        info!(deployment = %name, tp = spec.tp, pp = spec.pp, engine = ?spec.engine, "deployment created");
        let dep = Dep::new(DeploymentUid::new_random(), spec, Some(model), at.now);
        self.deps.insert(name.clone(), dep);
        // One write: the record, with its first generation when it can be placed now.
        self.place(&name, Some(report), at);
        let rec = self.record(&name, at);
        self.park(Park::Create { name, reply }, rec);
    }

    fn delete(&mut self, name: String, reply: ReplyId, at: At) {
        match self.deps.get(&name).map(|d| d.state) {
            None => self.out.push(Effect::Reply(reply, Err(DeployError::NotFound(name)))),
            Some(DState::Stopping | DState::Draining) => {
                let snapshot = self.deps[&name].to_pb(at.now);
                self.out.push(Effect::Reply(reply, Ok(Box::new(snapshot))));
            }
            Some(_) => self.park(Park::Delete { name: name.clone(), reply }, Write::Remove(name)),
        }
    }

    fn restart(&mut self, name: &str, reply: ReplyId, at: At) {
        let r = match self.deps.get(name).map(|d| d.state) {
            None => Err(DeployError::NotFound(name.into())),
            Some(DState::Stopping | DState::Stopped | DState::Draining) => Err(DeployError::BeingDeleted(name.into())),
            Some(_) => {
                self.fail(name, "restarted by an operator".into(), Blame::head(), false, at);
                self.settle(name, at);
                Ok(Box::new(self.deps[name].to_pb(at.now)))
            }
        };
        self.out.push(Effect::Reply(reply, r));
    }

    fn report(&mut self, node: NodeId, r: pb::ShardReport, at: At) {
        let exited = r.state == pb::ProcessState::Exited as i32;
        let Ok(uid) = DeploymentUid::from_wire(&r.deployment_uid) else {
            warn!(node_id = %node, deployment = %r.deployment, "report with a malformed deployment uid ignored");
            return;
        };
        let stop = |below: u64, keep: DeploymentUid, reason: &str| {
            pb::head_message::Msg::Stop(pb::StopShards {
                deployment: r.deployment.clone(),
                below_generation: below,
                reason: reason.into(),
                deployment_uid: keep.to_wire(),
            })
        };
        // A node that hosts nothing of the deployment gets the answer an unknown name gets, so that
        // reports cannot be used to learn which deployments exist or their generation.
        let hosts_some = self.deps.get(&r.deployment).is_some_and(|d| d.procs.values().any(|p| p.node_id == node));
        let Some(dep) = self.deps.get_mut(&r.deployment).filter(|_| hosts_some) else {
            // Not ours (deleted while the node was away, or from before a head restart): nothing of
            // it may keep running.
            if !exited {
                warn!(deployment = %r.deployment, node_id = %node, "stopping processes of an unknown deployment");
                self.out.push(Effect::Send(node, stop(0, DeploymentUid::default(), "unknown deployment")));
            }
            return;
        };
        let deleting = dep.state == DState::Stopping;
        let other_incarnation = !uid.is_nil() && uid != dep.uid;
        if other_incarnation || r.generation != dep.generation.0 {
            // Fencing: reports of other incarnations and generations change nothing, but what
            // still runs of them is stopped.
            if deleting
                && !other_incarnation
                && let Some(p) = dep.procs.get_mut(&ProcKey(r.key.clone())).filter(|p| p.node_id == node)
                && r.generation == dep.generation.0
            {
                p.gone = true;
            }
            if !exited {
                let below = if deleting || r.generation > dep.generation.0 { 0 } else { dep.generation.0 };
                let keep = if deleting { DeploymentUid::default() } else { dep.uid };
                self.out.push(Effect::Send(node, stop(below, keep, "stale generation")));
            }
            if deleting {
                self.finish_delete_if_done(&r.deployment.clone(), at);
            }
            return;
        }
        let key = ProcKey(r.key.clone());
        let Some(p) = dep.procs.get_mut(&key) else {
            warn!(deployment = %r.deployment, key = %r.key, node_id = %node, "report of a process that is not part of the generation ignored");
            return;
        };
        if p.node_id != node {
            warn!(
                deployment = %r.deployment, key = %r.key, node_id = %node, placed_on = %p.node_id,
                "report from a node for a process placed on another node refused"
            );
            return;
        }
        let node_name = p.node.clone();
        p.apply(&r);
        let name = r.deployment.clone();
        if deleting {
            self.finish_delete_if_done(&name, at);
            return;
        }
        // Node rank 0 picked the rendezvous ports: record them, then tell the other nodes.
        let first_node = dep.launch.as_ref().and_then(|l| l.per_node.first().map(|(n, _)| *n));
        if let Some(l) = dep.launch.as_mut()
            && l.master_port == 0
            && r.master_port > 0
            && first_node == Some(node)
        {
            l.master_port = r.master_port;
            l.health_port = r.health_port;
            let generation = dep.generation;
            let rec = self.record(&name, at);
            self.park(Park::Ports { name: name.clone(), generation }, rec);
        }
        let Some(dep) = self.deps.get_mut(&name) else { return };
        let failing_or_live =
            dep.failing.is_some() || matches!(dep.state, DState::Starting | DState::Running | DState::Draining);
        if exited {
            if failing_or_live {
                let reason = describe_exit(&r, &node_name);
                let first = dep.failing.is_none();
                let engine = dep.spec.engine;
                if r.permanent {
                    // The engine cannot start on this node and will not by itself (not installed,
                    // not allowed): the node stops counting for this engine until it joins again,
                    // and the group is planned elsewhere.
                    self.inventory.mark_incapable(node, engine, clean(&r.error, 512));
                }
                self.fail(&name, reason, Blame::exit(&r, at), true, at);
                if r.permanent
                    && first
                    && let Some(f) = self.deps.get_mut(&name).and_then(|d| d.failing.as_mut())
                {
                    f.permanent = true;
                }
            }
            return;
        }
        if r.state == pb::ProcessState::Unhealthy as i32 {
            // The worker's checks saw a hung or dead engine behind a live process: the group
            // restarts with the check's verdict as the reason (it explains what follows).
            if failing_or_live {
                let reason = format!("{} on {node_name} is unhealthy: {}", r.key, clean(&r.error, 2048));
                let tail = last_lines(&r.log_tail, 5);
                let reason = if tail.is_empty() { reason } else { format!("{reason}; last log lines: {tail}") };
                self.fail(&name, reason, Blame::unhealthy(at), true, at);
            }
            return;
        }
        if dep.state == DState::Starting
            && dep.failing.is_none()
            && dep.procs.values().all(|p| p.state == pb::ProcessState::Ready)
        {
            let g = dep.generation;
            dep.recover_deadline = None;
            dep.set_state(
                DState::Running,
                format!("generation {g}: all {} process(es) ready", dep.procs.len()),
                at.now,
            );
            info!(deployment = %name, generation = %g, "running");
            self.emit(&name, at);
        }
    }

    /// A node (re)joined: its reports count as usual, and every process the head expects on it
    /// that it did not list is gone (its state dir was lost, or the launch never arrived).
    fn node_joined(&mut self, node: NodeId, running: Vec<pb::ShardReport>, at: At) {
        // A node that (re)joins mid-staging may have lost its part (a restarted worker): it is told
        // again, and resumes from what its cache holds.
        let mut again = Vec::new();
        for (name, d) in self.deps.iter().filter(|(_, d)| d.staging_now()) {
            let Some(s) = d.staging.as_ref() else { continue };
            if let Some(n) = s.nodes.get(&node).filter(|n| !n.done) {
                again.push((name.clone(), pb::head_message::Msg::StageModel(n.msg.clone())));
            }
            if s.source == node && !s.indexed {
                again.push((name.clone(), pb::head_message::Msg::IndexModel(index_msg(d, s))));
            }
        }
        for (name, msg) in again {
            info!(deployment = %name, node_id = %node, "node rejoined while staging: telling it its part again");
            self.out.push(Effect::Send(node, msg));
        }
        let listed: HashSet<(String, u64, String)> =
            running.iter().map(|r| (r.deployment.clone(), r.generation, r.key.clone())).collect();
        for r in running {
            self.report(node, r, at);
        }
        let names: Vec<String> = self.deps.keys().cloned().collect();
        for name in names {
            let Some(dep) = self.deps.get_mut(&name) else { continue };
            let missing: Vec<ProcKey> = dep
                .procs
                .iter()
                .filter(|(k, p)| {
                    p.node_id == node
                        && p.launched
                        && !p.exited()
                        && !p.gone
                        && !listed.contains(&(name.clone(), dep.generation.0, k.0.clone()))
                })
                .map(|(k, _)| k.clone())
                .collect();
            if missing.is_empty() {
                continue;
            }
            for k in &missing {
                if let Some(p) = dep.procs.get_mut(k) {
                    p.state = pb::ProcessState::Exited;
                    p.gone = true;
                }
            }
            match dep.state {
                DState::Stopping => self.finish_delete_if_done(&name, at),
                DState::Starting | DState::Running if dep.failing.is_none() => {
                    let node_name = dep.procs[&missing[0]].node.clone();
                    let keys: Vec<&str> = missing.iter().map(ProcKey::as_str).collect();
                    let why = format!(
                        "{} on {node_name} not running: the node rejoined without it (its state dir was lost, or the launch never arrived)",
                        keys.join(", ")
                    );
                    self.fail(&name, why, Blame::other(at.unix_ms), true, at);
                }
                _ => {}
            }
        }
    }

    fn node_changed(&mut self, v: &NodeView, at: At) {
        let reserved = &self.reserved;
        let previous = self.inventory.upsert(v, |u| reserved.contains_key(u));
        if previous.is_none() && v.info.inventory.gpus.iter().any(|g| self.reserved.contains_key(&g.uuid)) {
            // Reservations taken before this node was known (recovered from the store).
            self.recount_pins();
        }
        let id = v.id;
        match v.state {
            NodeState::Dead | NodeState::Left => {
                let why = if v.state_reason.is_empty() {
                    v.state.to_string()
                } else {
                    format!("{}: {}", v.state, v.state_reason)
                };
                self.node_gone(id, why, at);
            }
            NodeState::Alive if previous != Some(NodeState::Alive) => self.retry_pending(at),
            _ => {}
        }
    }

    /// A node is dead, left or forgotten: every group with a process there restarts (a dead node
    /// explains every other failure of the group, so it is blamed first).
    fn node_gone(&mut self, id: NodeId, why: String, at: At) {
        let node_name = self.inventory.node(id).map(|n| n.name.clone()).unwrap_or_else(|| id.to_string());
        let affected: Vec<String> = self
            .deps
            .iter()
            .filter(|(_, d)| {
                d.procs.values().any(|p| p.node_id == id && !p.gone)
                    || (d.staging_now() && d.staging.as_ref().is_some_and(|s| s.participants().contains(&id)))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in affected {
            let Some(dep) = self.deps.get_mut(&name) else { continue };
            for p in dep.procs.values_mut().filter(|p| p.node_id == id) {
                p.gone = true;
            }
            match dep.state {
                DState::Stopping => self.finish_delete_if_done(&name, at),
                DState::Starting | DState::Running | DState::Draining => {
                    self.fail(&name, format!("node {node_name} is {why}"), Blame::head(), true, at);
                }
                _ if dep.failing.is_some() => {
                    self.fail(&name, format!("node {node_name} is {why}"), Blame::head(), true, at)
                }
                _ => {}
            }
        }
    }

    fn tick(&mut self, at: At) {
        let now = at.now;
        // A staging that makes no progress at all (a peer that hangs, a source that went quiet)
        // fails its generation rather than wait forever.
        let stalled: Vec<String> = self
            .deps
            .iter()
            .filter(|(_, d)| {
                d.staging_now() && d.staging.as_ref().is_some_and(|s| now >= s.last_progress + STAGING_STALL)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in stalled {
            let why =
                format!("staging made no progress for {}", tessera_common::duration::format_duration(STAGING_STALL));
            self.fail(&name, why, Blame::head(), true, at);
        }
        let settle: Vec<String> = self
            .deps
            .iter()
            .filter(|(_, d)| d.failing.as_ref().is_some_and(|f| f.settle_at <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in settle {
            self.settle(&name, at);
        }
        let due: Vec<String> = self
            .deps
            .iter()
            .filter(|(_, d)| d.state == DState::Restarting && !d.parked && d.next_attempt.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.relaunch(&name, at);
        }
        // After a head restart: a generation whose processes did not all report in time restarts.
        let unrecovered: Vec<(String, Vec<String>)> = self
            .deps
            .iter()
            .filter(|(_, d)| d.state == DState::Starting && d.recover_deadline.is_some_and(|t| t <= now))
            .map(|(n, d)| {
                let missing = d
                    .procs
                    .iter()
                    .filter(|(_, p)| p.pid == 0 && !p.exited())
                    .map(|(k, p)| format!("{k} on {}", p.node));
                (n.clone(), missing.collect())
            })
            .collect();
        for (name, missing) in unrecovered {
            if let Some(d) = self.deps.get_mut(&name) {
                d.recover_deadline = None;
            }
            if !missing.is_empty() {
                let why =
                    format!("after the head restart, {} did not report within the recovery window", missing.join(", "));
                self.fail(&name, why, Blame::other(at.unix_ms), true, at);
            }
        }
        self.drain_tick(at);
        let stopping: Vec<String> =
            self.deps.iter().filter(|(_, d)| d.state == DState::Stopping).map(|(n, _)| n.clone()).collect();
        for name in stopping {
            self.finish_delete_if_done(&name, at);
        }
        if self.last_pending_retry.is_none_or(|t| now.saturating_duration_since(t) >= PENDING_RETRY) {
            self.last_pending_retry = Some(now);
            self.retry_pending(at);
        }
    }

    // ---- transitions ----

    /// The group of `name` failed. The first failure stops the generation everywhere at once; the
    /// event and the next generation wait for [`SETTLE`], in case a report names an earlier or a
    /// likelier cause (see [`Blame`]).
    fn fail(&mut self, name: &str, reason: String, blame: Blame, counted: bool, at: At) {
        let Some(dep) = self.deps.get_mut(name) else { return };
        if dep.state == DState::Draining {
            // Going away anyway: no restart, stop what is left now.
            info!(deployment = %name, %reason, "a draining group failed; stopping it now");
            self.do_delete(name, None, at);
            return;
        }
        if let Some(f) = dep.failing.as_mut() {
            // What failed after the group was told to stop may be a consequence of the stop, unless
            // it died of a signal the stop does not send (SIGTERM first, SIGKILL only after the
            // grace, long past the settle time): a shim reads the exit time a little after the
            // exit, and a `kill -9` can look later than the peers it took down.
            let not_ours = blame.class == 0 || blame.at_unix_ms <= f.noticed_unix_ms || blame.foreign_signal;
            if not_ours && (blame.class, blame.at_unix_ms) < (f.blame.class, f.blame.at_unix_ms) {
                f.reason = reason;
                f.blame = blame;
                f.permanent = false;
            }
            return;
        }
        warn!(deployment = %name, generation = %dep.generation, %reason, "group failing: stopping every process");
        dep.failing = Some(Failing {
            noticed: at.now,
            noticed_unix_ms: at.unix_ms,
            settle_at: at.now + SETTLE,
            blame,
            reason,
            counted,
            permanent: false,
            fatal: false,
        });
        dep.recover_deadline = None;
        let mut nodes: HashSet<NodeId> =
            dep.procs.values().filter(|p| p.launched && !p.gone).map(|p| p.node_id).collect();
        // Nodes still staging this generation stop fetching (and serving it).
        if let Some(s) = dep.staging.as_ref().filter(|s| !s.done) {
            nodes.extend(s.participants());
        }
        let stop = pb::StopShards {
            deployment: name.to_string(),
            below_generation: dep.generation.0 + 1,
            reason: "the group is restarting".into(),
            deployment_uid: dep.uid.to_wire(),
        };
        let mut nodes: Vec<NodeId> = nodes.into_iter().collect();
        nodes.sort();
        for n in nodes {
            self.out.push(Effect::Send(n, pb::head_message::Msg::Stop(stop.clone())));
        }
    }

    /// A failure no restart can heal: the group stops like any failing group and then fails.
    fn fail_fatal(&mut self, name: &str, reason: String, at: At) {
        self.fail(name, reason, Blame::head(), true, at);
        if let Some(f) = self.deps.get_mut(name).and_then(|d| d.failing.as_mut()) {
            f.fatal = true;
        }
    }

    /// The failure is settled: one event, then backoff (or `failed` after max_restarts).
    fn settle(&mut self, name: &str, at: At) {
        let Some(dep) = self.deps.get_mut(name) else { return };
        let Some(f) = dep.failing.take() else { return };
        let now = at.now;
        if f.counted {
            dep.restart_times.push_back(f.noticed);
            while dep.restart_times.front().is_some_and(|t| now.saturating_duration_since(*t) > RESTART_WINDOW) {
                dep.restart_times.pop_front();
            }
        }
        let recent = dep.restart_times.len() as u32;
        let next = dep.generation.next();
        let no_capable_node = f.permanent && self.inventory.incapable(dep.spec.engine).1 == 0;
        if f.fatal {
            dep.set_state(
                DState::Failed,
                format!(
                    "{}; not restarted: this will not change by itself (fix it, then `tessera restart {name}`)",
                    f.reason
                ),
                now,
            );
            dep.next_attempt = None;
            self.release(name);
        } else if no_capable_node {
            dep.set_state(
                DState::Failed,
                format!(
                    "{}; not restarted: no node can run the {} engine, and this will not change by itself (fix a node, then `tessera restart {name}`)",
                    f.reason,
                    dep.spec.engine.as_str()
                ),
                now,
            );
            dep.next_attempt = None;
            self.release(name);
        } else if f.counted && recent > dep.spec.max_restarts {
            dep.set_state(
                DState::Failed,
                format!(
                    "{}; gave up after {} restart(s) within 10 minutes (--max-restarts {})",
                    f.reason,
                    recent - 1,
                    dep.spec.max_restarts
                ),
                now,
            );
            dep.next_attempt = None;
            self.release(name);
        } else {
            dep.restarts += 1;
            let backoff = if f.counted {
                (BASE_BACKOFF * 2u32.saturating_pow(recent.saturating_sub(1))).min(MAX_BACKOFF)
            } else {
                Duration::ZERO
            };
            dep.set_state(
                DState::Restarting,
                format!(
                    "{}; restarting the group at generation {next} in {}",
                    f.reason,
                    tessera_common::duration::format_duration(backoff)
                ),
                now,
            );
            dep.next_attempt = Some(f.noticed + backoff);
        }
        self.emit(name, at);
        let rec = self.record(name, at);
        self.park(Park::Record { name: name.to_string() }, rec);
        if self.deps.get(name).is_some_and(|d| d.state == DState::Failed) {
            self.retry_pending(at);
        }
    }

    fn relaunch(&mut self, name: &str, at: At) {
        if self.place(name, None, at) {
            let rec = self.record(name, at);
            let generation = self.deps[name].generation;
            self.park(Park::Launch { name: name.to_string(), generation }, rec);
        }
    }

    /// Plans the next generation of `name` (with `report` when the caller planned already) and
    /// takes its GPUs; true when it was placed. Sends nothing: the caller persists first.
    fn place(&mut self, name: &str, report: Option<PlanReport>, at: At) -> bool {
        let Some(dep) = self.deps.get(name) else { return false };
        let Some(model) = dep.model.clone() else {
            let why = format!("cannot read the model at {} to plan it", dep.spec.model_path.display());
            self.set_state_and_emit(name, DState::Failed, why, at);
            self.release(name);
            return false;
        };
        let req = plan_request(&dep.spec);
        let model_path = dep.spec.model_path.display().to_string();
        let own = dep.gpus().to_vec();
        let report = match report {
            Some(r) => r,
            None => {
                // The same GPUs when they are all on schedulable nodes; else its own plus free ones.
                let engine = dep.spec.engine;
                let sel = dep.spec.node_selector.clone();
                self.inventory.for_nodes(engine, &sel, |inv| {
                    let same = inv
                        .only(&own)
                        .filter(|_| !own.is_empty())
                        .map(|c| plan::plan(&model.desc, &model.weights, &c, &req))
                        .filter(|r| r.valid);
                    match same {
                        Some(r) => r,
                        None => inv.with_free(&own, |c| plan::plan(&model.desc, &model.weights, c, &req)),
                    }
                })
            }
        };
        if !report.valid {
            let msg = report.errors.iter().map(|e| e.message.clone()).collect::<Vec<_>>().join("; ");
            let only_placement = report.errors.iter().all(|e| e.rule == "placement");
            // A deployment that cannot run holds nothing.
            self.release(name);
            if only_placement {
                let (why, _) = self.inventory.incapable(self.deps[name].spec.engine);
                let mut message = if why.is_empty() {
                    format!("waiting for GPUs: {msg}")
                } else {
                    format!(
                        "waiting for GPUs: {msg} (not counted: {} node(s) that cannot run it: {})",
                        why.len(),
                        why.join("; ")
                    )
                };
                let sel = &self.deps[name].spec.node_selector;
                if !sel.is_empty() {
                    let pairs: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    message.push_str(&format!(
                        " (node selector {}: {} schedulable node(s) match)",
                        pairs.join(","),
                        self.inventory.selected(sel)
                    ));
                }
                let dep = self.deps.get_mut(name).expect("checked above");
                dep.next_attempt = None;
                if dep.state != DState::Pending || dep.message != message {
                    self.set_state_and_emit(name, DState::Pending, message, at);
                }
            } else {
                self.set_state_and_emit(name, DState::Failed, format!("cannot plan: {msg}"), at);
            }
            return false;
        }
        let mut shares: Vec<NodeShare> = Vec::new();
        for r in &report.placement {
            if shares.last().map(|s| s.node_rank) != Some(r.node_rank) {
                let Some(meta) = r.node_id.parse::<NodeId>().ok().and_then(|id| self.inventory.node(id)) else {
                    continue;
                };
                shares.push(NodeShare {
                    node_id: meta.id,
                    node: r.node.clone(),
                    address: meta.address,
                    node_rank: r.node_rank,
                    ranks: Vec::new(),
                    model: model_path.clone(),
                });
            }
            if let Some(s) = shares.last_mut() {
                s.ranks.push(r.clone());
            }
        }
        let Some(master_addr) = shares.first().map(|s| s.address) else { return false };
        // Staging: the head's node reads the model where it is; every other node reads the copy
        // of its stages' files that staging makes in its cache.
        let from = self.deps[name].spec.model_from.clone();
        let staging = match (self.deps[name].spec.staging, self.inventory.source_of(&from)) {
            (false, _) => None,
            (true, Some(h)) if h.capabilities.transfer_port > 0 => Some(Staging::new(h.id, h.name.clone(), at.now)),
            (true, _) => {
                let why = format!(
                    "cannot stage the model: {}, which holds it, is not connected or has no transfer server; deploy with --staging off when every node has the model at its path",
                    source_name(&from)
                );
                self.set_state_and_emit(name, DState::Failed, why, at);
                self.release(name);
                return false;
            }
        };
        if let Some(st) = &staging {
            for s in shares.iter_mut().filter(|s| s.node_id != st.source) {
                s.model = "{staged_model}".into();
            }
        }
        // Take the new GPUs, give back those of the old placement it no longer uses.
        let gpus: Vec<String> = report.placement.iter().map(|r| r.gpu_uuid.clone()).collect();
        let keep: HashSet<&String> = gpus.iter().collect();
        for g in own.iter().filter(|g| !keep.contains(g)) {
            self.unreserve(g, name);
        }
        for g in &gpus {
            self.reserve(g, name);
        }
        let dep = self.deps.get_mut(name).expect("checked above");
        dep.generation = dep.generation.next();
        let generation = dep.generation;
        let ctx = LaunchContext { spec: &dep.spec, generation, nodes: &shares, stages: &report.stages, master_addr };
        let mut per_node: Vec<(NodeId, Vec<pb::ShardProcess>)> = Vec::new();
        let mut procs = BTreeMap::new();
        for s in &shares {
            let ps = engine::processes(&ctx, s);
            for p in &ps {
                procs.insert(ProcKey(p.key.clone()), Proc::new(s.node_id, &s.node, p.ranks.clone()));
            }
            per_node.push((s.node_id, ps));
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
        dep.staging = staging;
        dep.next_attempt = None;
        let message =
            format!("generation {generation}: launching {} process(es) on {} node(s)", dep.procs.len(), shares.len());
        info!(deployment = %name, %generation, nodes = shares.len(), "launching");
        self.set_state_and_emit(name, DState::Starting, message, at);
        true
    }

    /// The generation is durable: it stages the model first when its spec says so, else node
    /// rank 0 is told to launch.
    fn send_first(&mut self, name: &str, at: At) {
        let staging = self.deps.get(name).is_some_and(|d| d.staging.as_ref().is_some_and(|s| !s.done));
        if staging { self.start_staging(name, at) } else { self.launch_first(name, at) }
    }

    /// Staging begins: the source (the head's node) is asked to index the model.
    fn start_staging(&mut self, name: &str, at: At) {
        let Some(dep) = self.deps.get_mut(name) else { return };
        let Some(s) = dep.staging.as_ref() else { return };
        let msg = index_msg(dep, s);
        let source = s.source;
        dep.message =
            format!("generation {}: staging the model: {} reads and hashes it", dep.generation, s.source_name);
        self.out.push(Effect::Send(source, pb::head_message::Msg::IndexModel(msg)));
        self.emit(name, at);
    }

    /// The source described (or could not read) the model: each node is told what to fetch.
    fn model_indexed(&mut self, node: NodeId, m: pb::ModelIndex, at: At) {
        let name = m.deployment.clone();
        let Some(dep) = staging_group(&mut self.deps, &m.deployment, &m.deployment_uid, m.generation) else { return };
        let Some(s) = dep.staging.as_mut().filter(|s| s.source == node && !s.indexed) else {
            warn!(deployment = %name, node_id = %node, "a model index from a node that was not asked for one ignored");
            return;
        };
        if !m.done {
            if m.bytes_hashed > s.hashed.0 {
                s.last_progress = at.now;
            }
            s.hashed = (m.bytes_hashed, m.bytes_total);
            return;
        }
        let source_name = s.source_name.clone();
        let bad = if !m.error.is_empty() { Some(clean(&m.error, 2048)) } else { staging::check_index(&m.files).err() };
        if let Some(why) = bad {
            let why = format!("staging: the model on {source_name} cannot be staged: {why}");
            self.fail_fatal(&name, why, at);
            return;
        }
        let total: u64 = m.files.iter().map(|f| f.size_bytes).sum();
        s.indexed = true;
        s.hashed = (total, total);
        s.model_bytes = total;
        let (source, token) = (s.source, s.token.clone());
        s.last_progress = at.now;
        let Some(l) = dep.launch.as_ref() else {
            self.fail(&name, "staging: the generation has no placement".into(), Blame::head(), true, at);
            return;
        };
        let (layers, tied) =
            dep.model.as_ref().map(|m| (m.desc.num_hidden_layers, m.desc.tie_word_embeddings)).unwrap_or((0, false));
        let stages = l.stages.clone();
        let mut receivers = Vec::new();
        let mut refused = Vec::new();
        for (id, _) in l.per_node.iter().filter(|(id, _)| *id != source) {
            let Some(meta) = self.inventory.node(*id) else { continue };
            if meta.capabilities.transfer_port == 0 {
                refused.push(meta.name.clone());
                continue;
            }
            let mut pp_ranks: Vec<u64> =
                l.placement.iter().filter(|r| r.node_id == id.to_string()).map(|r| r.pp_rank).collect();
            pp_ranks.dedup();
            receivers.push(staging::Receiver {
                id: *id,
                name: meta.name.clone(),
                address: meta.address,
                port: meta.capabilities.transfer_port,
                pp_ranks,
            });
        }
        if !refused.is_empty() {
            let why = format!(
                "staging: node(s) {} cannot receive a staged model: their worker has no transfer server (a worker older than staging); upgrade them, or deploy with --staging off when every node has the model at {}",
                refused.join(", "),
                dep.spec.model_path.display()
            );
            self.fail_fatal(&name, why, at);
            return;
        }
        let Some(src_meta) = self.inventory.node(source) else {
            self.fail(&name, format!("staging: {source_name} is no longer a member"), Blame::head(), true, at);
            return;
        };
        let src = pb::StageSource {
            node: src_meta.name.clone(),
            address: src_meta.address.to_string(),
            port: src_meta.capabilities.transfer_port as u32,
        };
        let assigned = staging::assign(&m.files, &stages, layers, tied, &src, &receivers);
        let Some(dep) = self.deps.get_mut(&name) else { return };
        let (uid, generation) = (dep.uid.to_wire(), dep.generation);
        let Some(s) = dep.staging.as_mut() else { return };
        let mut sends = Vec::new();
        for ((id, key, files), r) in assigned.into_iter().zip(&receivers) {
            let bytes_needed: u64 = files.iter().filter_map(|f| f.file.as_ref()).map(|f| f.size_bytes).sum();
            s.nodes.insert(
                id,
                NodeStage {
                    name: r.name.clone(),
                    key: key.clone(),
                    bytes_needed,
                    files_needed: files.len() as u32,
                    bytes_done: 0,
                    files_done: 0,
                    chunks_refetched: 0,
                    rate: 0,
                    last: None,
                    done: false,
                    msg: pb::StageModel {
                        deployment: name.clone(),
                        deployment_uid: uid.clone(),
                        generation: generation.0,
                        token: token.clone(),
                        key,
                        files,
                    },
                },
            );
            sends.push((id, s.nodes[&id].msg.clone()));
        }
        if s.nodes.is_empty() {
            s.done = true;
            dep.message = format!("generation {generation}: every process runs on {source_name}, which has the model");
            self.launch_first(&name, at);
            self.emit(&name, at);
            return;
        }
        dep.message = format!(
            "generation {generation}: staging the model ({}) from {source_name} to {} node(s)",
            tessera_common::size::HumanBytes(total),
            sends.len()
        );
        let too_big = sends.iter().map(|(_, m)| prost::Message::encoded_len(m)).max().filter(|&n| n > MAX_LAUNCH_BYTES);
        if let Some(n) = too_big {
            let why = format!(
                "staging: a node's part of the model's index is {n} bytes, more than the {MAX_LAUNCH_BYTES} a session message may carry (a model of this many files and chunks cannot be staged); deploy with --staging off"
            );
            self.fail_fatal(&name, why, at);
            return;
        }
        info!(deployment = %name, %generation, nodes = sends.len(), bytes = total, "staging the model");
        for (id, msg) in sends {
            self.out.push(Effect::Send(id, pb::head_message::Msg::StageModel(msg)));
        }
        self.emit(&name, at);
    }

    /// A node's staging progress; the generation launches once every node has its files.
    fn stage_progress(&mut self, node: NodeId, p: pb::StageProgress, at: At) {
        let name = p.deployment.clone();
        let Some(dep) = staging_group(&mut self.deps, &p.deployment, &p.deployment_uid, p.generation) else { return };
        let generation = dep.generation;
        let Some(s) = dep.staging.as_mut() else { return };
        let Some(node_name) = s.nodes.get(&node).map(|n| n.name.clone()) else {
            warn!(deployment = %name, node_id = %node, "staging progress from a node that is not staging it ignored");
            return;
        };
        if p.done && !p.error.is_empty() {
            let why = format!("staging to {node_name} failed: {}", clean(&p.error, 2048));
            self.fail(&name, why, Blame::other(at.unix_ms), true, at);
            return;
        }
        if s.nodes.get(&node).is_some_and(|n| p.bytes_done > n.bytes_done || (p.done && !n.done)) {
            s.last_progress = at.now;
        }
        if s.progress(node, &p, at.now) && s.all_done() {
            s.done = true;
            let nodes = s.nodes.len();
            let procs = dep.procs.len();
            dep.message =
                format!("generation {generation}: model staged to {nodes} node(s); launching {procs} process(es)");
            info!(deployment = %name, %generation, nodes, "model staged; launching");
            self.launch_first(&name, at);
            self.emit(&name, at);
        }
    }

    /// Node rank 0 of the current generation is told to launch; it picks the ports.
    fn launch_first(&mut self, name: &str, at: At) {
        let Some(dep) = self.deps.get_mut(name) else { return };
        let Some(l) = dep.launch.as_ref() else { return };
        let Some((node, procs)) = l.per_node.first().cloned() else { return };
        for p in dep.procs.values_mut().filter(|p| p.node_id == node) {
            p.launched = true;
        }
        let msg = launch_msg(dep, node, procs, true, 0, 0);
        self.launch(name, node, msg, at);
    }

    /// The other nodes, once node rank 0's ports are known (and recorded).
    fn send_rest(&mut self, name: &str, at: At) {
        let Some(dep) = self.deps.get_mut(name) else { return };
        let Some(l) = dep.launch.as_mut() else { return };
        if l.rest_sent || l.master_port == 0 {
            return;
        }
        l.rest_sent = true;
        let (mp, hp) = (l.master_port, l.health_port);
        let rest: Vec<(NodeId, Vec<pb::ShardProcess>)> = l.per_node.iter().skip(1).cloned().collect();
        let first = l.per_node.first().map(|(n, _)| *n);
        for p in dep.procs.values_mut().filter(|p| Some(p.node_id) != first) {
            p.launched = true;
        }
        let msgs: Vec<(NodeId, pb::LaunchShards)> =
            rest.into_iter().map(|(n, ps)| (n, launch_msg(dep, n, ps, false, mp, hp))).collect();
        for (node, msg) in msgs {
            self.launch(name, node, msg, at);
        }
    }

    fn launch(&mut self, name: &str, node: NodeId, msg: pb::LaunchShards, at: At) {
        let size = pb::HeadMessage { msg: Some(pb::head_message::Msg::Launch(msg.clone())) }.encoded_len();
        if size > MAX_LAUNCH_BYTES {
            let why = format!(
                "the launch for node {} is {size} bytes, more than the {MAX_LAUNCH_BYTES} a worker accepts; \
                 make env and engine args smaller (each process of a node gets its own copy)",
                self.inventory.node(node).map(|n| n.name.as_str()).unwrap_or("?")
            );
            // This will not get smaller on a retry.
            self.set_state_and_emit(name, DState::Failed, why, at);
            self.release(name);
            let rec = self.record(name, at);
            self.park(Park::Record { name: name.to_string() }, rec);
            return;
        }
        self.out.push(Effect::Launch(node, msg));
    }

    fn persisted(&mut self, id: PersistId, at: At) {
        let Some(park) = self.parked.remove(&id) else { return };
        match park {
            Park::Create { name, reply } => {
                self.unpark(&name);
                let Some(dep) = self.deps.get(&name) else { return };
                self.out.push(Effect::Reply(reply, Ok(Box::new(dep.to_pb(at.now)))));
                if dep.state == DState::Starting {
                    self.send_first(&name, at);
                }
            }
            Park::Launch { name, generation } => {
                self.unpark(&name);
                if self.deps.get(&name).is_some_and(|d| d.generation == generation && d.state == DState::Starting) {
                    self.send_first(&name, at);
                }
            }
            Park::Ports { name, generation } => {
                self.unpark(&name);
                if self.deps.get(&name).is_some_and(|d| d.generation == generation && d.failing.is_none()) {
                    self.send_rest(&name, at);
                }
            }
            Park::Delete { name, reply } => {
                self.unpark(&name);
                self.stop_on_purpose(&name, reply, at);
            }
            Park::Record { name } => self.unpark(&name),
        }
    }

    fn persist_failed(&mut self, id: PersistId, message: String, at: At) {
        let Some(park) = self.parked.remove(&id) else { return };
        match park {
            Park::Create { name, reply } => {
                warn!(deployment = %name, error = %message, "cannot record a new deployment; refused");
                self.release(&name);
                self.deps.remove(&name);
                let what = format!("deployment {name:?}");
                self.out.push(Effect::Reply(reply, Err(DeployError::Store { what, message })));
            }
            Park::Launch { name, generation } | Park::Ports { name, generation } => {
                self.unpark(&name);
                let Some(dep) = self.deps.get_mut(&name) else { return };
                if dep.generation != generation {
                    return;
                }
                warn!(deployment = %name, %generation, error = %message, "cannot record the generation; it is not launched");
                let why = format!("cannot record generation {generation}: {message}");
                // Nothing of it may run: fail it like any other generation (backoff, then again).
                self.fail(&name, why, Blame::head(), true, at);
            }
            Park::Delete { name, reply } => {
                self.unpark(&name);
                warn!(deployment = %name, error = %message, "cannot remove the deployment's record; delete refused");
                let what = format!("the delete of {name:?}");
                self.out.push(Effect::Reply(reply, Err(DeployError::Store { what, message })));
            }
            Park::Record { name } => {
                self.unpark(&name);
                warn!(deployment = %name, error = %message, "cannot record the deployment's state");
            }
        }
    }

    /// A deleted group (its removal is durable): a running one with an API drains first (see
    /// [`Drain`]); anything else stops at once.
    fn stop_on_purpose(&mut self, name: &str, reply: ReplyId, at: At) {
        let Some(dep) = self.deps.get_mut(name) else {
            self.out.push(Effect::Reply(reply, Err(DeployError::NotFound(name.into()))));
            return;
        };
        let endpoint = dep.launch.as_ref().map(|l| engine::endpoint(&dep.spec, l)).unwrap_or_default();
        let timeout = dep.spec.drain_timeout.filter(|t| !t.is_zero());
        match timeout {
            // A failing group (its processes are being stopped) has nothing left to drain.
            Some(t) if dep.state == DState::Running && dep.failing.is_none() && !endpoint.is_empty() => {
                dep.drain = Some(super::dep::Drain {
                    notice_until: at.now + DRAIN_NOTICE.min(t),
                    deadline: at.now + t,
                    next_check: at.now,
                    in_flight: None,
                });
                let why = format!(
                    "draining: no new requests; up to {}s for those in flight, then every process stops",
                    t.as_secs()
                );
                self.set_state_and_emit(name, DState::Draining, why, at);
                let snapshot = self.deps[name].to_pb(at.now);
                self.out.push(Effect::Reply(reply, Ok(Box::new(snapshot))));
            }
            _ => self.do_delete(name, Some(reply), at),
        }
    }

    /// A draining group's engine says how many requests it holds: none left after the notice
    /// period, it stops now.
    fn load(&mut self, name: &str, generation: u64, in_flight: Option<u64>, at: At) {
        let Some(dep) = self.deps.get_mut(name) else { return };
        let Some(drain) = dep.drain.as_mut() else { return };
        if dep.state != DState::Draining || dep.generation.0 != generation {
            return;
        }
        drain.in_flight = in_flight;
        if in_flight == Some(0) && at.now >= drain.notice_until {
            info!(deployment = %name, "drained: no request in flight");
            self.do_delete(name, None, at);
        }
    }

    /// Draining groups: ask their engines, and stop those past their deadline.
    fn drain_tick(&mut self, at: At) {
        let draining: Vec<String> =
            self.deps.iter().filter(|(_, d)| d.state == DState::Draining).map(|(n, _)| n.clone()).collect();
        for name in draining {
            let Some(dep) = self.deps.get_mut(&name) else { continue };
            let Some(drain) = dep.drain.as_mut() else { continue };
            if at.now >= drain.deadline {
                let left = drain.in_flight.map_or("an unknown number of".to_string(), |n| n.to_string());
                warn!(deployment = %name, requests = %left, "drain timeout: stopping with requests in flight");
                self.do_delete(&name, None, at);
                continue;
            }
            if at.now >= drain.notice_until && at.now >= drain.next_check {
                drain.next_check = at.now + LOAD_CHECK_EVERY;
                let endpoint = dep.launch.as_ref().map(|l| engine::endpoint(&dep.spec, l)).unwrap_or_default();
                self.out.push(Effect::CheckLoad { name: name.clone(), generation: dep.generation.0, endpoint });
            }
        }
    }

    /// Stops every process of `name` (its removal is durable); `reply` gets the snapshot.
    fn do_delete(&mut self, name: &str, reply: Option<ReplyId>, at: At) {
        let Some(dep) = self.deps.get_mut(name) else {
            if let Some(reply) = reply {
                self.out.push(Effect::Reply(reply, Err(DeployError::NotFound(name.into()))));
            }
            return;
        };
        dep.drain = None;
        // Processes whose node was never told to launch them will never report: nothing to wait for.
        for p in dep.procs.values_mut().filter(|p| !p.launched) {
            p.gone = true;
        }
        let mut nodes: Vec<NodeId> =
            dep.procs.values().filter(|p| p.launched && !p.exited() && !p.gone).map(|p| p.node_id).collect();
        if let Some(s) = dep.staging.as_ref().filter(|s| !s.done) {
            nodes.extend(s.participants());
        }
        nodes.sort();
        nodes.dedup();
        dep.failing = None;
        dep.delete_deadline = Some(at.now + DELETE_TIMEOUT);
        let stop = pb::StopShards {
            deployment: name.to_string(),
            below_generation: 0,
            reason: "deleted".into(),
            deployment_uid: dep.uid.to_wire(),
        };
        self.set_state_and_emit(name, DState::Stopping, "deleting: stopping every process".into(), at);
        if let Some(reply) = reply {
            let snapshot = self.deps[name].to_pb(at.now);
            self.out.push(Effect::Reply(reply, Ok(Box::new(snapshot))));
        }
        for node in nodes {
            self.out.push(Effect::Send(node, pb::head_message::Msg::Stop(stop.clone())));
        }
        self.finish_delete_if_done(name, at);
    }

    fn finish_delete_if_done(&mut self, name: &str, at: At) {
        let Some(dep) = self.deps.get(name) else { return };
        if dep.state != DState::Stopping {
            return;
        }
        let timed_out = dep.delete_deadline.is_some_and(|d| at.now >= d);
        if dep.procs.values().all(|p| p.exited() || p.gone) || timed_out {
            if timed_out {
                warn!(deployment = %name, "some processes did not confirm their stop in time; forgetting them");
            }
            // The GPUs are free once nothing of the deployment runs on them any more.
            self.release(name);
            let mut dep = self.deps.remove(name).expect("present");
            dep.set_state(DState::Stopped, "deleted".into(), at.now);
            info!(deployment = %name, "deployment deleted");
            self.out.push(Effect::Emit(Box::new(dep.to_pb(at.now))));
            self.retry_pending(at);
        }
    }

    fn retry_pending(&mut self, at: At) {
        let pending: Vec<String> =
            self.deps.iter().filter(|(_, d)| d.state == DState::Pending && !d.parked).map(|(n, _)| n.clone()).collect();
        for name in pending {
            self.relaunch(&name, at);
        }
    }

    // ---- helpers ----

    fn record(&self, name: &str, at: At) -> Write {
        Write::Put(Box::new(record::to_stored(&self.deps[name], at)))
    }

    fn park(&mut self, park: Park, write: Write) {
        let id = self.next_persist;
        self.next_persist += 1;
        let name = match &park {
            Park::Create { name, .. }
            | Park::Launch { name, .. }
            | Park::Ports { name, .. }
            | Park::Delete { name, .. }
            | Park::Record { name } => name.clone(),
        };
        if let Some(d) = self.deps.get_mut(&name) {
            d.parked = true;
        }
        self.parked.insert(id, park);
        self.out.push(Effect::Persist(id, write));
    }

    fn unpark(&mut self, name: &str) {
        let still = self.parked.values().any(|p| match p {
            Park::Create { name: n, .. }
            | Park::Launch { name: n, .. }
            | Park::Ports { name: n, .. }
            | Park::Delete { name: n, .. }
            | Park::Record { name: n } => n == name,
        });
        if let Some(d) = self.deps.get_mut(name) {
            d.parked = still;
        }
    }

    fn recount_pins(&mut self) {
        let mut pins: HashMap<NodeId, usize> = HashMap::new();
        for g in self.reserved.keys() {
            if let Some(n) = self.inventory.node_of_gpu(g) {
                *pins.entry(n).or_insert(0) += 1;
            }
        }
        self.pins_changed |= pins.keys().collect::<HashSet<_>>() != self.pins.keys().collect::<HashSet<_>>();
        self.pins = pins;
    }

    fn reserve(&mut self, gpu: &str, name: &str) {
        let prev = self.reserved.insert(gpu.to_string(), name.to_string());
        debug_assert!(prev.as_deref().is_none_or(|p| p == name), "GPU {gpu} reserved twice");
        self.inventory.set_reserved(gpu, true);
        if prev.is_none()
            && let Some(node) = self.inventory.node_of_gpu(gpu)
        {
            let n = self.pins.entry(node).or_insert(0);
            self.pins_changed |= *n == 0;
            *n += 1;
        }
    }

    fn unreserve(&mut self, gpu: &str, name: &str) {
        if self.reserved.get(gpu).is_some_and(|n| n == name) {
            self.reserved.remove(gpu);
            self.inventory.set_reserved(gpu, false);
            if let Some(node) = self.inventory.node_of_gpu(gpu)
                && let Some(n) = self.pins.get_mut(&node)
            {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.pins.remove(&node);
                    self.pins_changed = true;
                }
            }
        }
    }

    /// Gives back every GPU of `name`. Draining the launch's list makes a second release a no-op.
    fn release(&mut self, name: &str) {
        let gpus = match self.deps.get_mut(name).and_then(|d| d.launch.as_mut()) {
            Some(l) => std::mem::take(&mut l.gpus),
            None => return,
        };
        for g in &gpus {
            self.unreserve(g, name);
        }
    }

    fn set_state_and_emit(&mut self, name: &str, state: DState, message: String, at: At) {
        if let Some(d) = self.deps.get_mut(name) {
            d.set_state(state, message, at.now);
        }
        self.emit(name, at);
    }

    fn emit(&mut self, name: &str, at: At) {
        if let Some(d) = self.deps.get(name) {
            self.out.push(Effect::Emit(Box::new(d.to_pb(at.now))));
        }
    }
}

/// One group as a replica of its deployment.
fn replica_of(g: &Dep, now: Instant) -> pb::Replica {
    let d = g.to_pb(now);
    pb::Replica {
        index: g.spec.replica(),
        revision: g.spec.revision,
        state: d.state,
        message: d.message,
        generation: d.generation,
        restarts: d.restarts,
        endpoint: d.endpoint,
        ranks: d.ranks,
        state_since_ms_ago: d.state_since_ms_ago,
        staging_nodes: d.staging_nodes,
    }
}

/// How likely a failure is the cause of a group's other failures: the lowest class wins, then
/// the earliest time. A node that died or the head's own verdict explains everything (0); a
/// process killed by a signal (an OOM kill, a segfault, a `kill -9`) is a likelier cause than its
/// peers exiting with an error because it went away (1); an error exit (2); a clean exit (3).
/// Exit times come from the shims (each node's clock), to the millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blame {
    pub class: u8,
    pub at_unix_ms: u64,
    /// Killed by a signal other than SIGTERM: not by a stop of ours.
    pub foreign_signal: bool,
}

/// SIGTERM, the signal a stop sends first.
const SIGTERM: i32 = 15;

impl Blame {
    fn head() -> Blame {
        Blame { class: 0, at_unix_ms: 0, foreign_signal: false }
    }
    fn other(at_unix_ms: u64) -> Blame {
        Blame { class: 2, at_unix_ms, foreign_signal: false }
    }
    /// A failed liveness check: as likely a cause as a rank killed by a signal (a hang explains
    /// the exits of the peers stopped after it), timed when the head heard of it.
    fn unhealthy(at: At) -> Blame {
        Blame { class: 1, at_unix_ms: at.unix_ms, foreign_signal: false }
    }
    fn exit(r: &pb::ShardReport, at: At) -> Blame {
        let class = match (r.signal, r.exit_code) {
            (Some(_), _) => 1,
            (None, Some(0)) => 3,
            _ => 2,
        };
        Blame {
            class,
            at_unix_ms: if r.exited_unix_ms > 0 { r.exited_unix_ms } else { at.unix_ms },
            foreign_signal: r.signal.is_some_and(|s| s != SIGTERM),
        }
    }
}

/// What the node holding the model is asked for its generation's staging.
fn index_msg(d: &Dep, s: &Staging) -> pb::IndexModel {
    pb::IndexModel {
        deployment: d.spec.name.clone(),
        deployment_uid: d.uid.to_wire(),
        generation: d.generation.0,
        path: d.spec.model_path.display().to_string(),
        token: s.token.clone(),
    }
}

/// Who holds a deployment's model, in words.
fn source_name(model_from: &str) -> String {
    if model_from.is_empty() {
        "the head's own node (not with --no-worker)".into()
    } else {
        format!("node {model_from}")
    }
}

/// The group a staging message is about, when it is the current generation's and still stages.
fn staging_group<'a>(
    deps: &'a mut BTreeMap<String, Dep>,
    deployment: &str,
    uid: &str,
    generation: u64,
) -> Option<&'a mut Dep> {
    deps.get_mut(deployment).filter(|d| d.uid.to_wire() == uid && d.generation.0 == generation && d.staging_now())
}

fn launch_msg(
    dep: &Dep,
    node: NodeId,
    processes: Vec<pb::ShardProcess>,
    pick_ports: bool,
    mp: u32,
    hp: u32,
) -> pb::LaunchShards {
    let staged_model = dep.staging.as_ref().and_then(|s| s.nodes.get(&node)).map(|n| n.key.clone()).unwrap_or_default();
    pb::LaunchShards {
        staged_model,
        deployment: dep.spec.name.clone(),
        generation: dep.generation.0,
        processes,
        pick_ports,
        master_port: mp,
        health_port: hp,
        stop_grace_s: STOP_GRACE_S,
        deployment_uid: dep.uid.to_wire(),
    }
}

fn plan_request(s: &DeploymentSpec) -> PlanRequest {
    PlanRequest {
        tp: Size::Fixed(s.tp),
        pp: Size::Fixed(s.pp),
        gpu_memory_utilization: s.gpu_memory_utilization,
        max_model_len: s.max_model_len,
        layer_partition: s.layer_partition.clone(),
        kv_cache_dtype: s.kv_cache_dtype,
        strict: false,
    }
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
    let tail = last_lines(&r.log_tail, 5);
    if !tail.is_empty() {
        s.push_str(&format!("; last log lines: {tail}"));
    }
    s
}

/// The last `n` lines of a log tail (each at most 512 characters), joined with " | ".
fn last_lines(tail: &str, n: usize) -> String {
    let lines: Vec<String> =
        tail.lines().rev().take(n).map(|l| clean(l, 512)).collect::<Vec<_>>().into_iter().rev().collect();
    lines.join(" | ")
}

/// A worker's text for a message: at most `max` characters, no control or bidirectional
/// formatting characters.
fn clean(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| !c.is_control() && !('\u{202a}'..='\u{202e}').contains(c) && !('\u{2066}'..='\u{2069}').contains(c))
        .take(max)
        .collect()
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
