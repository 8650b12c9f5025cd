//! Deployments: plan, reserve, launch, supervise, and restart the whole group on any failure.
//!
//! The logic is one synchronous state machine ([`machine::Machine`]); this module is its thin async
//! shell: one task feeds it RPCs, worker reports and membership events, runs its effects (store
//! writes on a blocking thread, messages through membership, events to the broadcast, replies),
//! and ticks it at its next deadline. See README.md beside this file for the lifecycle.
//!
//! # Layout
//! - [`machine`]: the state machine (inputs + now -> effects); its tests are in `machine_tests.rs`.
//! - [`dep`]: one deployment: spec, state, launch, processes.
//! - [`spec`]: a deployment's spec, validated on receipt.
//! - [`engine`]: what each engine runs on each node (vllm, command, probe).
//! - [`inventory`]: the planner's view of the cluster, kept from membership events.
//! - [`record`]: durable records <-> deployments.

pub mod dep;
pub mod engine;
pub mod inventory;
pub mod machine;
pub mod record;
pub mod spec;
pub mod staging;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use staging::StagingMsg;
use tessera_common::ids::NodeId;
use tessera_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::membership::{Event as MemberEvent, Membership};
use crate::store::Store;
pub use dep::DState;
pub use machine::DeployError;
use machine::{Effect, Input, Machine, ReplyId, Write};
use record::At;
use spec::{DeploymentSpec, LoadedModel};

/// A rank's log as its node sends it: bytes, or the node's error (the stream then ends).
pub type LogStream = mpsc::Receiver<LogItem>;
pub type LogItem = Result<Vec<u8>, String>;
type DepReply = oneshot::Sender<Result<pb::Deployment, DeployError>>;

/// The longest the shell sleeps between ticks when the machine has no deadline.
const IDLE_TICK: Duration = Duration::from_millis(500);
/// Chunks buffered per log stream towards a client.
const LOG_BUFFER: usize = 64;

enum Cmd {
    Create { spec: Box<DeploymentSpec>, model: Box<LoadedModel>, reply: DepReply },
    Delete { name: String, reply: DepReply },
    Restart { name: String, reply: DepReply },
    Get { name: String, reply: DepReply },
    Groups { name: String, reply: oneshot::Sender<Vec<String>> },
    SpecOf { name: String, reply: oneshot::Sender<Option<(DeploymentSpec, Option<LoadedModel>)>> },
    List { reply: oneshot::Sender<Vec<pb::Deployment>> },
    Reserved { reply: oneshot::Sender<(usize, usize)> },
    Report { node: NodeId, report: pb::ShardReport },
    Staging { node: NodeId, msg: StagingMsg },
    NodeJoined { node: NodeId, running: Vec<pb::ShardReport> },
    Logs { req: pb::LogsRequest, reply: oneshot::Sender<Result<(u64, LogStream), DeployError>> },
    LogData { node: NodeId, data: pb::LogData },
    LogCancel { id: u64 },
    Load { name: String, generation: u64, in_flight: Option<u64> },
}

/// Model descriptions asked at once (`--model-from`), and how long one may take.
const MAX_DESCRIBES: usize = 64;
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Handle to the deployment task. Cheap to clone.
#[derive(Clone)]
pub struct Deployments {
    tx: mpsc::Sender<Cmd>,
    events: broadcast::Sender<Arc<pb::Event>>,
    /// Calls that change a deployment's set of replicas (create, delete, scale) run one at a time.
    replica_ops: Arc<tokio::sync::Mutex<()>>,
    /// Deployments with an update rolling (one roll at a time each).
    rolling: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    membership: Membership,
    /// Model descriptions asked of nodes (`--model-from`), by request id.
    #[allow(clippy::type_complexity)]
    describes: Arc<std::sync::Mutex<HashMap<u64, (NodeId, oneshot::Sender<pb::ModelDescription>)>>>,
}

impl Deployments {
    /// Starts the deployment task with the deployments recorded in `store` (after a head restart:
    /// their workers have `recovery_window` to report what runs before anything is judged).
    pub fn spawn(
        membership: Membership,
        seq: Arc<AtomicU64>,
        store: Arc<Store>,
        recovery_window: Duration,
        fence: Arc<crate::leader::Fence>,
        shutdown: CancellationToken,
    ) -> Result<Deployments, crate::store::StoreError> {
        let (tx, rx) = mpsc::channel(1024);
        let (events, _) = broadcast::channel(4096);
        let membership2 = membership.clone();
        let mut machine = Machine::new(recovery_window);
        // A model another node holds (--model-from) is planned from what that node said of it.
        let load = |r: &crate::store::StoredDeployment| match &r.described {
            Some(d) if !r.model_from.is_empty() => serde_json::from_str::<spec::Described>(d)
                .map_err(|e| e.to_string())
                .and_then(|d| d.load(&r.model_path))
                .inspect_err(
                    |e| tracing::warn!(deployment = %r.name, error = %e, "cannot read the stored model description"),
                )
                .ok(),
            _ => tessera_common::model::load_model(&r.model_path).ok().map(|m| LoadedModel::of(&m)),
        };
        machine.recover(store.load()?, load, at_now());
        let shell = Shell {
            machine,
            membership,
            store,
            fence,
            events: events.clone(),
            seq,
            replies: HashMap::new(),
            next_reply: 1,
            log_routes: HashMap::new(),
            back: tx.downgrade(),
        };
        tokio::spawn(shell.run(rx, shutdown));
        Ok(Deployments {
            tx,
            events,
            replica_ops: Arc::new(tokio::sync::Mutex::new(())),
            rolling: Default::default(),
            membership: membership2,
            describes: Default::default(),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<pb::Event>> {
        self.events.subscribe()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, DeployError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| DeployError::ShuttingDown)?;
        rx.await.map_err(|_| DeployError::ShuttingDown)
    }

    /// Creates a deployment of `replicas` groups (each its own group key, see
    /// [`spec::group_key`]). All or nothing: if a later replica cannot be created, the ones made
    /// are deleted again and the error is returned.
    pub async fn create(
        &self,
        spec: DeploymentSpec,
        model: LoadedModel,
        replicas: u32,
    ) -> Result<pb::Deployment, DeployError> {
        let _one = self.replica_ops.lock().await;
        let name = spec.name.clone();
        self.create_group(spec.clone(), model.clone()).await?;
        for i in 1..replicas {
            let mut s = spec.clone();
            s.name = spec::group_key(&name, i);
            if let Err(e) = self.create_group(s, model.clone()).await {
                warn!(deployment = %name, replica = i, error = %e, "a replica could not be created; removing the others");
                for k in (0..i).rev().map(|j| spec::group_key(&name, j)) {
                    let _ = self.ask(|reply| Cmd::Delete { name: k, reply }).await;
                }
                return Err(e);
            }
        }
        self.get(name).await
    }

    async fn create_group(&self, spec: DeploymentSpec, model: LoadedModel) -> Result<pb::Deployment, DeployError> {
        self.ask(|reply| Cmd::Create { spec: Box::new(spec), model: Box::new(model), reply }).await?
    }

    pub async fn get(&self, name: String) -> Result<pb::Deployment, DeployError> {
        self.ask(|reply| Cmd::Get { name, reply }).await?
    }
    pub async fn list(&self) -> Result<Vec<pb::Deployment>, DeployError> {
        self.ask(|reply| Cmd::List { reply }).await
    }

    async fn groups(&self, name: &str) -> Result<Vec<String>, DeployError> {
        let keys = self.ask(|reply| Cmd::Groups { name: name.to_string(), reply }).await?;
        if keys.is_empty() {
            return Err(DeployError::NotFound(name.to_string()));
        }
        Ok(keys)
    }

    /// Deletes every replica (the highest first); answers with replica 0's stop under way.
    pub async fn delete(&self, name: String) -> Result<pb::Deployment, DeployError> {
        let _one = self.replica_ops.lock().await;
        let keys = self.groups(&name).await?;
        let mut last = None;
        for k in keys.into_iter().rev() {
            // A group that finished stopping meanwhile is fine; anything else is an answer.
            match self.ask(|reply| Cmd::Delete { name: k, reply }).await? {
                Ok(d) => last = Some(d),
                Err(DeployError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        last.ok_or(DeployError::NotFound(name))
    }

    /// Restarts every group (replica) with a process on `node` at its next generation (a drain
    /// with eviction: planned without that node, they move); their names.
    pub async fn evict(&self, node: NodeId) -> Result<Vec<String>, DeployError> {
        let _one = self.replica_ops.lock().await;
        let on = node.to_string();
        let mut keys = Vec::new();
        for d in self.ask(|reply| Cmd::List { reply }).await? {
            let groups: Vec<(u32, &Vec<pb::Rank>)> = if d.replicas.is_empty() {
                vec![(0, &d.ranks)]
            } else {
                d.replicas.iter().map(|r| (r.index, &r.ranks)).collect()
            };
            for (i, ranks) in groups {
                if ranks.iter().any(|r| r.node_id == on) {
                    keys.push(spec::group_key(&d.name, i));
                }
            }
        }
        for k in &keys {
            match self.ask(|reply| Cmd::Restart { name: k.clone(), reply }).await? {
                Ok(_) | Err(DeployError::NotFound(_) | DeployError::BeingDeleted(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(keys)
    }

    /// Restarts every replica at its next generation.
    pub async fn restart(&self, name: String) -> Result<pb::Deployment, DeployError> {
        for k in self.groups(&name).await? {
            // Replicas on their way out (a scale down) are not restarted.
            match self.ask(|reply| Cmd::Restart { name: k, reply }).await? {
                Ok(_) | Err(DeployError::NotFound(_) | DeployError::BeingDeleted(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.get(name).await
    }

    /// The newest revision's spec of `name`.
    pub async fn newest_spec(&self, name: String) -> Result<DeploymentSpec, DeployError> {
        let (spec, _) =
            self.ask(|reply| Cmd::SpecOf { name: name.clone(), reply }).await?.ok_or(DeployError::NotFound(name))?;
        Ok(spec)
    }

    /// Rolls `name` to `spec` one replica at a time (see the `Update` RPC). Runs in its own task:
    /// a client that goes away does not leave the roll half done.
    pub async fn update(
        &self,
        mut spec: DeploymentSpec,
        model: LoadedModel,
        surge: bool,
    ) -> Result<pb::Deployment, DeployError> {
        let name = spec.name.clone();
        let newest = self.newest_spec(name.clone()).await?;
        if newest.same_as(&spec) {
            // The same spec: finish an interrupted roll to it, or nothing to do.
            spec.revision = newest.revision;
            spec.previous = newest.previous;
        } else {
            spec.revision = newest.revision + 1;
            let mut before = newest;
            before.previous = None;
            before.name = name.clone();
            spec.previous = Some(Box::new(before));
        }
        if !self.rolling.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone()) {
            return Err(DeployError::RollStopped(format!(
                "an update of {name} is rolling already; wait for it (`tessera get {name}` shows each replica's revision)"
            )));
        }
        let this = self.clone();
        let r = tokio::spawn(async move {
            let r = this.roll(spec, model, surge).await;
            this.rolling.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            r
        })
        .await;
        r.map_err(|_| DeployError::ShuttingDown)?
    }

    async fn roll(&self, spec: DeploymentSpec, model: LoadedModel, surge: bool) -> Result<pb::Deployment, DeployError> {
        let name = spec.name.clone();
        loop {
            let d = self.get(name.clone()).await?;
            let live: Vec<&pb::Replica> = d.replicas.iter().filter(|r| !leaving(r.state)).collect();
            if live.is_empty() {
                return Err(DeployError::BeingDeleted(name));
            }
            let Some(victim) = live.iter().rev().find(|r| r.revision != spec.revision).map(|r| r.index) else {
                info!(deployment = %name, revision = spec.revision, "every replica runs the new revision");
                return Ok(d);
            };
            let next = d.replicas.iter().map(|r| r.index).max().unwrap_or(0) + 1;
            info!(deployment = %name, revision = spec.revision, replaces = victim, with = next, surge, "rolling one replica");
            if surge {
                self.start_replica(&spec, &model, next, true).await?;
                self.stop_replica(&name, victim).await?;
            } else {
                self.stop_replica(&name, victim).await?;
                self.wait_gone(&name, victim).await?;
                if let Err(e) = self.start_replica(&spec, &model, next, false).await {
                    // Give the capacity back with the revision that ran.
                    if let Some(before) = spec.previous.as_deref() {
                        let mut s = before.clone();
                        s.name = name.clone();
                        let path = s.model_path.clone();
                        let loaded =
                            tokio::task::spawn_blocking(move || tessera_common::model::load_model(&path)).await;
                        if let Ok(Ok(m)) = loaded {
                            let _ = self.start_replica(&s, &LoadedModel::of(&m), next + 1, false).await;
                        }
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Starts replica `index` of `spec` and waits until it runs. One that fails to start (or, with
    /// `surge`, finds no free GPUs) is removed again, with the reason.
    async fn start_replica(
        &self,
        spec: &DeploymentSpec,
        model: &LoadedModel,
        index: u32,
        surge: bool,
    ) -> Result<(), DeployError> {
        let name = spec.name.clone();
        let mut s = spec.clone();
        s.name = spec::group_key(&name, index);
        {
            let _one = self.replica_ops.lock().await;
            self.create_group(s, model.clone()).await?;
        }
        let t0 = tokio::time::Instant::now();
        let deadline = t0 + spec.startup_timeout + Duration::from_secs(30);
        let stop = |why: String| DeployError::RollStopped(why);
        loop {
            let d = self.get(name.clone()).await?;
            let Some(r) = d.replicas.iter().find(|r| r.index == index) else {
                return Err(stop(format!("replica {index} of {name} was removed while the update waited for it")));
            };
            let failed = |what: &str| {
                format!(
                    "revision {} of {name} did not start ({what}: {}); its replica was removed and the replicas of revision {} keep serving",
                    spec.revision,
                    r.message,
                    spec.revision.saturating_sub(1).max(1)
                )
            };
            let why = match pb::DeploymentState::try_from(r.state).unwrap_or(pb::DeploymentState::Unspecified) {
                pb::DeploymentState::Running => return Ok(()),
                pb::DeploymentState::Failed => Some(failed("failed")),
                pb::DeploymentState::Restarting => Some(failed("its first generation failed")),
                pb::DeploymentState::Pending if surge && t0.elapsed() > Duration::from_secs(10) => Some(format!(
                    "no free GPUs for one more replica of {name} ({}); free some, or update with --max-surge 0 --max-unavailable 1 (one replica fewer while each is replaced)",
                    r.message
                )),
                s if leaving(s as i32) => {
                    return Err(stop(format!(
                        "replica {index} of {name} is being stopped (deleted?); the update stopped"
                    )));
                }
                _ if tokio::time::Instant::now() > deadline => Some(failed("not ready before its start-up timeout")),
                _ => None,
            };
            if let Some(why) = why {
                warn!(deployment = %name, replica = index, "{why}");
                let _ = self.stop_replica(&name, index).await;
                return Err(stop(why));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Deletes (drains) one replica.
    async fn stop_replica(&self, name: &str, index: u32) -> Result<(), DeployError> {
        let _one = self.replica_ops.lock().await;
        let key = spec::group_key(name, index);
        match self.ask(|reply| Cmd::Delete { name: key, reply }).await? {
            Ok(_) | Err(DeployError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits until replica `index` of `name` is gone (drained and stopped).
    async fn wait_gone(&self, name: &str, index: u32) -> Result<(), DeployError> {
        loop {
            let keys = self.groups(name).await.unwrap_or_default();
            if !keys.contains(&spec::group_key(name, index)) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Adds replicas (copies of replica 0's spec) or deletes the highest-numbered ones until there
    /// are `replicas`; the others are not touched.
    pub async fn scale(&self, name: String, replicas: u32) -> Result<pb::Deployment, DeployError> {
        let _one = self.replica_ops.lock().await;
        let d = self.get(name.clone()).await?;
        // Replicas being stopped (an earlier scale down) no longer count; a deployment whose
        // replica 0 is going is being deleted.
        let stopping = [
            pb::DeploymentState::Draining as i32,
            pb::DeploymentState::Stopping as i32,
            pb::DeploymentState::Stopped as i32,
        ];
        if d.replicas.first().is_none_or(|r| r.index != 0 || stopping.contains(&r.state)) {
            return Err(DeployError::BeingDeleted(name));
        }
        let live: Vec<u32> = d.replicas.iter().filter(|r| !stopping.contains(&r.state)).map(|r| r.index).collect();
        let have = live.len() as u32;
        if replicas > have {
            let (spec, model) = self
                .ask(|reply| Cmd::SpecOf { name: name.clone(), reply })
                .await?
                .ok_or_else(|| DeployError::NotFound(name.clone()))?;
            let model = model.ok_or_else(|| {
                DeployError::InvalidPlan(format!(
                    "the model of {name} ({}) cannot be read now, so no replica can be planned; fix the path and scale again",
                    spec.model_path.display()
                ))
            })?;
            // New replicas take indices after the highest there is (a stopping one's included).
            let first = d.replicas.iter().map(|r| r.index).max().unwrap_or(0) + 1;
            for index in first..first + (replicas - have) {
                let mut s = spec.clone();
                s.name = spec::group_key(&name, index);
                self.create_group(s, model.clone()).await?;
            }
        } else {
            // The highest-numbered go; replica 0 stays (replicas is at least 1).
            for index in live.iter().skip(replicas as usize).rev() {
                let key = spec::group_key(&name, *index);
                self.ask(|reply| Cmd::Delete { name: key, reply }).await??;
            }
        }
        self.get(name).await
    }

    pub async fn logs(&self, req: pb::LogsRequest) -> Result<(u64, LogStream), DeployError> {
        self.ask(|reply| Cmd::Logs { req, reply }).await?
    }
    pub async fn log_cancel(&self, id: u64) {
        let _ = self.tx.send(Cmd::LogCancel { id }).await;
    }
    /// (GPUs reserved, GPUs held by live deployments' assignments): always equal.
    pub async fn reservation_counts(&self) -> Result<(usize, usize), DeployError> {
        self.ask(|reply| Cmd::Reserved { reply }).await
    }

    /// Asks `node` (name or id) to describe the model at `path` (`--model-from`): its config and
    /// weight sizes, for planning.
    pub async fn describe(&self, node: &str, path: &std::path::Path) -> Result<spec::Described, tonic::Status> {
        use tonic::Status;
        let nodes = self.membership.list().await;
        let Some(n) = nodes.iter().find(|v| v.id.to_string() == node || v.info.name == node) else {
            return Err(Status::invalid_argument(format!("model_from: no node {node:?}; `tessera nodes` lists them")));
        };
        if !matches!(n.state, tessera_common::node::NodeState::Alive | tessera_common::node::NodeState::Draining) {
            return Err(Status::failed_precondition(format!(
                "model_from: node {} is {}; it must be alive to read the model",
                n.info.name, n.state
            )));
        }
        let (id, rx) = {
            let mut d = self.describes.lock().expect("lock");
            if d.len() >= MAX_DESCRIBES {
                return Err(Status::resource_exhausted("too many model descriptions asked at once; try again"));
            }
            let mut id = rand::random::<u64>();
            while d.contains_key(&id) {
                id = rand::random::<u64>();
            }
            let (tx, rx) = oneshot::channel();
            d.insert(id, (n.id, tx));
            (id, rx)
        };
        let msg = pb::DescribeModel { request_id: id, path: path.display().to_string() };
        let sent =
            self.membership.send(n.id, pb::HeadMessage { msg: Some(pb::head_message::Msg::DescribeModel(msg)) }).await;
        let answer =
            if sent { tokio::time::timeout(DESCRIBE_TIMEOUT, rx).await.ok().and_then(|r| r.ok()) } else { None };
        self.describes.lock().expect("lock").remove(&id);
        let Some(d) = answer else {
            return Err(Status::unavailable(format!(
                "model_from: node {} did not describe {} within {DESCRIBE_TIMEOUT:?} (not connected, or its disk hangs)",
                n.info.name,
                path.display()
            )));
        };
        if !d.error.is_empty() {
            return Err(Status::failed_precondition(format!(
                "model_from: node {} cannot read the model at {}: {}",
                n.info.name,
                path.display(),
                d.error.chars().take(1024).collect::<String>()
            )));
        }
        Ok(spec::Described { config_json: d.config_json, weights_json: d.weights_json })
    }

    /// A node's answer to [`Deployments::describe`]: it counts only from the node that was asked.
    pub fn described(&self, node: NodeId, d: pb::ModelDescription) {
        let mut m = self.describes.lock().expect("lock");
        match m.get(&d.request_id) {
            Some((asked, _)) if *asked == node => {
                if let Some((_, tx)) = m.remove(&d.request_id) {
                    let _ = tx.send(d);
                }
            }
            _ => tracing::warn!(node_id = %node, "a model description nobody asked this node for ignored"),
        }
    }

    /// A worker's staging message (an index of a model, or progress).
    pub async fn staging(&self, node: NodeId, msg: StagingMsg) {
        let _ = self.tx.send(Cmd::Staging { node, msg }).await;
    }

    pub async fn report(&self, node: NodeId, report: pb::ShardReport) {
        let _ = self.tx.send(Cmd::Report { node, report }).await;
    }
    pub async fn node_joined(&self, node: NodeId, running: Vec<pb::ShardReport>) {
        let _ = self.tx.send(Cmd::NodeJoined { node, running }).await;
    }
    /// Log data from `node`'s session: it counts only for a request sent to that node.
    pub async fn log_data(&self, node: NodeId, data: pb::LogData) {
        let _ = self.tx.send(Cmd::LogData { node, data }).await;
    }
}

fn at_now() -> At {
    At { now: Instant::now(), unix_ms: crate::membership::unix_ms() }
}

struct Shell {
    machine: Machine,
    membership: Membership,
    store: Arc<Store>,
    /// Commands go to workers only while this head leads (always, on the embedded store).
    fence: Arc<crate::leader::Fence>,
    events: broadcast::Sender<Arc<pb::Event>>,
    seq: Arc<AtomicU64>,
    replies: HashMap<ReplyId, DepReply>,
    next_reply: ReplyId,
    /// Log request id (random) -> the node it was sent to, and the client's stream.
    log_routes: HashMap<u64, (NodeId, mpsc::Sender<LogItem>)>,
    /// For answers that come back later (an engine's load): a weak sender, so that the task
    /// still ends when every handle is gone.
    back: mpsc::WeakSender<Cmd>,
}

/// A replica on its way out (draining, stopping) or gone.
fn leaving(state: i32) -> bool {
    [pb::DeploymentState::Draining, pb::DeploymentState::Stopping, pb::DeploymentState::Stopped]
        .iter()
        .any(|s| *s as i32 == state)
}

/// How many requests the engine at `endpoint` holds: vLLM's and the probe's `GET /load`
/// (`{"server_load": N}`); `None` when it cannot tell.
async fn engine_load(endpoint: &str) -> Option<u64> {
    let hp = endpoint.strip_prefix("http://")?;
    let (host, port) = hp.rsplit_once(':')?;
    let (host, port) = (host.trim_matches(['[', ']']), port.parse::<u16>().ok()?);
    match tessera_worker::shard::http::call(host, port, "GET", "/load", None, Duration::from_secs(2)).await {
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body).ok()?.get("server_load")?.as_u64(),
        // Unreachable from the head (an engine bound to its node's loopback, a network problem) or
        // gone: it cannot tell; a process that died is reported by its worker anyway.
        _ => None,
    }
}

impl Shell {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, shutdown: CancellationToken) {
        let mut members = match self.membership.subscribe().await {
            Some((nodes, rx)) => {
                self.feed(Input::NodesListed(nodes)).await;
                Some(rx)
            }
            None => None,
        };
        loop {
            let deadline =
                self.machine.next_deadline().map_or(Instant::now() + IDLE_TICK, |d| d.min(Instant::now() + IDLE_TICK));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                cmd = rx.recv() => match cmd {
                    Some(c) => self.command(c).await,
                    None => return,
                },
                ev = recv_member(&mut members) => match ev {
                    Member::Event(e) if e.kind == crate::membership::EventKind::Removed => {
                        self.feed(Input::NodeForgotten(e.node.id)).await;
                    }
                    Member::Event(e) => self.feed(Input::NodeChanged(Box::new(e.node.clone()))).await,
                    // Events were dropped: read the whole table again, so that no `dead` is missed.
                    Member::Lagged => {
                        warn!("membership events lagged; re-reading the node table");
                        let nodes = self.membership.list().await;
                        self.feed(Input::NodesListed(nodes)).await;
                    }
                    Member::Closed => members = None,
                },
                _ = tokio::time::sleep_until(deadline) => self.feed(Input::Tick).await,
            }
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Create { spec, model, reply } => {
                let id = self.reply_id(reply);
                self.feed(Input::Create { spec, model, reply: id }).await;
            }
            Cmd::Delete { name, reply } => {
                let id = self.reply_id(reply);
                self.feed(Input::Delete { name, reply: id }).await;
            }
            Cmd::Restart { name, reply } => {
                let id = self.reply_id(reply);
                self.feed(Input::Restart { name, reply: id }).await;
            }
            Cmd::Get { name, reply } => {
                let _ = reply.send(self.machine.get(&name, now));
            }
            Cmd::Groups { name, reply } => {
                let _ = reply.send(self.machine.group_keys(&name));
            }
            Cmd::SpecOf { name, reply } => {
                let _ = reply.send(self.machine.spec_of(&name));
            }
            Cmd::List { reply } => {
                let _ = reply.send(self.machine.list(now));
            }
            Cmd::Reserved { reply } => {
                let _ = reply.send(self.machine.reservation_counts());
            }
            Cmd::Report { node, report } => self.feed(Input::Report { node, report }).await,
            Cmd::Staging { node, msg } => self.feed(Input::Staging { node, msg }).await,
            Cmd::Load { name, generation, in_flight } => self.feed(Input::Load { name, generation, in_flight }).await,
            Cmd::NodeJoined { node, running } => self.feed(Input::NodeJoined { node, running }).await,
            Cmd::Logs { req, reply } => {
                let r = self.open_logs(req).await;
                let _ = reply.send(r);
            }
            Cmd::LogData { node, data } => {
                let Some((to, tx)) = self.log_routes.get(&data.request_id) else { return };
                if *to != node {
                    warn!(node_id = %node, "log data for a request sent to another node refused");
                    return;
                }
                let item = if data.error.is_empty() { Ok(data.data) } else { Err(data.error) };
                let failed = tx.try_send(item).is_err();
                if data.done || failed {
                    self.log_routes.remove(&data.request_id);
                }
            }
            Cmd::LogCancel { id } => {
                if let Some((node, _)) = self.log_routes.remove(&id) {
                    let msg = pb::head_message::Msg::LogCancel(pb::LogCancel { request_id: id });
                    self.membership.send(node, pb::HeadMessage { msg: Some(msg) }).await;
                }
            }
        }
    }

    fn reply_id(&mut self, reply: DepReply) -> ReplyId {
        let id = self.next_reply;
        self.next_reply += 1;
        self.replies.insert(id, reply);
        id
    }

    async fn open_logs(&mut self, req: pb::LogsRequest) -> Result<(u64, LogStream), DeployError> {
        let group = spec::group_key(&req.name, req.replica);
        let (node, key) = self.machine.locate(&group, req.rank)?;
        // Unguessable, so that no other session can write into (or end) this stream.
        let mut id = rand::random::<u64>();
        while id == 0 || self.log_routes.contains_key(&id) {
            id = rand::random::<u64>();
        }
        let (tx, rx) = mpsc::channel(LOG_BUFFER);
        self.log_routes.insert(id, (node, tx));
        let msg = pb::LogRequest {
            generation: req.generation,
            request_id: id,
            deployment: group,
            key: key.0,
            tail_lines: if req.tail == 0 { 100 } else { req.tail.min(100_000) },
            follow: req.follow,
        };
        if !self.membership.send(node, pb::HeadMessage { msg: Some(pb::head_message::Msg::LogRequest(msg)) }).await {
            self.log_routes.remove(&id);
            return Err(DeployError::NodeUnreachable { name: req.name, rank: req.rank });
        }
        Ok((id, rx))
    }

    /// Whether this head no longer leads (then `what` is not sent: the leading head decides).
    fn fenced(&self, what: &str) -> bool {
        if self.fence.holds() {
            return false;
        }
        debug!(why = ?self.fence.why(), "not leading: {what} for a worker is not sent");
        true
    }

    /// Hands one input to the machine and runs every effect that follows, feeding store results
    /// and undeliverable launches back in before the next input.
    async fn feed(&mut self, input: Input) {
        let mut queue: std::collections::VecDeque<Effect> = self.machine.handle(input, at_now()).into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Persist(id, write) => {
                    let store = self.store.clone();
                    let r = tokio::task::spawn_blocking(move || match write {
                        Write::Put(rec) => store.put(&rec),
                        Write::Remove(name) => store.remove(&name),
                    })
                    .await;
                    let result = match r {
                        Ok(Ok(())) => Input::Persisted(id),
                        Ok(Err(e)) => Input::PersistFailed(id, e.to_string()),
                        Err(e) => Input::PersistFailed(id, format!("the store task failed: {e}")),
                    };
                    queue.extend(self.machine.handle(result, at_now()));
                }
                Effect::Send(node, msg) => {
                    if self.fenced("a command") {
                        continue;
                    }
                    self.membership.send(node, pb::HeadMessage { msg: Some(msg) }).await;
                }
                Effect::CheckLoad { name, generation, endpoint } => {
                    let back = self.back.clone();
                    tokio::spawn(async move {
                        let in_flight = engine_load(&endpoint).await;
                        if let Some(tx) = back.upgrade() {
                            let _ = tx.send(Cmd::Load { name, generation, in_flight }).await;
                        }
                    });
                }
                Effect::Launch(node, msg) => {
                    if self.fenced("a launch") {
                        continue;
                    }
                    let (deployment, generation) = (msg.deployment.clone(), msg.generation);
                    let msg = pb::HeadMessage { msg: Some(pb::head_message::Msg::Launch(msg)) };
                    if !self.membership.send(node, msg).await {
                        let input = Input::Undeliverable {
                            node,
                            deployment,
                            generation: tessera_common::ids::Generation(generation),
                        };
                        queue.extend(self.machine.handle(input, at_now()));
                    }
                }
                Effect::Emit(d) => {
                    let event = pb::Event {
                        seq: self.seq.fetch_add(1, Ordering::Relaxed),
                        unix_ms: crate::membership::unix_ms(),
                        kind: pb::EventKind::DeploymentChanged as i32,
                        node: None,
                        previous_state: 0,
                        reason: d.message.clone(),
                        rejoined: false,
                        deployment: Some(*d),
                    };
                    let _ = self.events.send(Arc::new(event));
                }
                Effect::Reply(id, r) => {
                    if let Some(tx) = self.replies.remove(&id) {
                        let _ = tx.send(r.map(|d| *d));
                    }
                }
            }
        }
        if let Some(pinned) = self.machine.take_pinned() {
            self.membership.set_pinned(pinned).await;
        }
    }
}

enum Member {
    Event(Arc<MemberEvent>),
    Lagged,
    Closed,
}

async fn recv_member(rx: &mut Option<broadcast::Receiver<Arc<MemberEvent>>>) -> Member {
    match rx {
        Some(r) => match r.recv().await {
            Ok(e) => Member::Event(e),
            Err(broadcast::error::RecvError::Lagged(_)) => Member::Lagged,
            Err(broadcast::error::RecvError::Closed) => Member::Closed,
        },
        None => std::future::pending().await,
    }
}
