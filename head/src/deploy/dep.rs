//! One deployment's record: intent (spec), placement (launch, holding the GPU reservations), and
//! what the workers report (processes).

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use tessera_common::ids::{DeploymentUid, Generation, NodeId, ProcKey};
use tessera_common::plan::partition::Stage;
use tessera_common::plan::placement::RankPlacement;
use tessera_proto::v1 as pb;
use tokio::time::Instant;

use super::spec::{DeploymentSpec, Engine, LoadedModel};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DState {
    Pending,
    Starting,
    Running,
    Restarting,
    Failed,
    Stopping,
    Stopped,
    /// Stopped on purpose, after the requests in flight (see [`Drain`]).
    Draining,
}

impl DState {
    pub fn to_pb(self) -> pb::DeploymentState {
        match self {
            DState::Pending => pb::DeploymentState::Pending,
            DState::Starting => pb::DeploymentState::Starting,
            DState::Running => pb::DeploymentState::Running,
            DState::Restarting => pb::DeploymentState::Restarting,
            DState::Failed => pb::DeploymentState::Failed,
            DState::Stopping => pb::DeploymentState::Stopping,
            DState::Stopped => pb::DeploymentState::Stopped,
            DState::Draining => pb::DeploymentState::Draining,
        }
    }
}

/// Where the current generation runs. Its `gpus` are the deployment's reservation, which it
/// keeps across group restarts (see `Machine::release`).
#[derive(Debug, Clone)]
pub struct Launch {
    /// Reserved GPU uuids.
    pub gpus: Vec<String>,
    pub placement: Vec<RankPlacement>,
    pub stages: Vec<Stage>,
    /// Processes per node, node rank order (empty after a head restart: nothing is resent).
    pub per_node: Vec<(NodeId, Vec<pb::ShardProcess>)>,
    pub master_addr: IpAddr,
    pub master_port: u32,
    pub health_port: u32,
    /// The launches of node ranks > 0 have been sent (after node rank 0 picked the ports).
    pub rest_sent: bool,
}

/// One process of the current generation, as reported.
#[derive(Debug, Clone)]
pub struct Proc {
    pub node_id: NodeId,
    pub node: String,
    pub ranks: Vec<u32>,
    pub pid: u32,
    pub state: pb::ProcessState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub rtt_us: Option<u64>,
    /// Its node died, or it was never launched: nothing will be reported any more.
    pub gone: bool,
    /// Its node was told to launch it.
    pub launched: bool,
}

impl Proc {
    pub fn new(node_id: NodeId, node: &str, ranks: Vec<u32>) -> Self {
        Proc {
            node_id,
            node: node.to_string(),
            ranks,
            pid: 0,
            state: pb::ProcessState::Starting,
            exit_code: None,
            signal: None,
            rtt_us: None,
            gone: false,
            launched: false,
        }
    }

    /// Applies a report of this process; true when its state changed.
    pub fn apply(&mut self, r: &pb::ShardReport) -> bool {
        let state = pb::ProcessState::try_from(r.state).unwrap_or(pb::ProcessState::Unspecified);
        // States only move forward within a generation (a late RUNNING never hides an exit).
        let rank = |s: pb::ProcessState| match s {
            pb::ProcessState::Unspecified => 0,
            pb::ProcessState::Starting => 1,
            pb::ProcessState::Running => 2,
            pb::ProcessState::Ready => 3,
            pb::ProcessState::Unhealthy => 4,
            pb::ProcessState::Stopped => 5,
            pb::ProcessState::Exited => 6,
        };
        let before = self.state;
        if rank(state) >= rank(self.state) {
            self.state = state;
        }
        if r.pid > 0 {
            self.pid = r.pid;
        }
        if state == pb::ProcessState::Exited {
            self.exit_code = r.exit_code;
            self.signal = r.signal;
        }
        if r.rtt_us.is_some() {
            self.rtt_us = r.rtt_us;
        }
        self.state != before
    }

    pub fn exited(&self) -> bool {
        self.state == pb::ProcessState::Exited
    }
}

/// The group is failing: the first failure seen so far, while later reports may still name an
/// earlier one (see `Machine::settle`).
#[derive(Debug, Clone)]
pub struct Failing {
    /// When the failure was first noticed (and the group told to stop); the restart is counted
    /// from here.
    pub noticed: Instant,
    pub noticed_unix_ms: u64,
    /// When the event is emitted and the next generation scheduled.
    pub settle_at: Instant,
    /// Why the blamed failure is the likeliest cause so far.
    pub blame: super::machine::Blame,
    pub reason: String,
    /// An operator's restart is not counted against max_restarts and has no backoff.
    pub counted: bool,
    /// The blamed failure will not heal by itself (the engine is missing or not allowed on a
    /// node): the deployment fails at once instead of restarting.
    pub permanent: bool,
    /// The group cannot run as asked and no restart changes that (a model that cannot be staged):
    /// it fails at once with the reason.
    pub fatal: bool,
}

/// A group draining before its stop: gateways stop sending it requests (they read the state every
/// second or so, hence `notice_until`), then it stops once its engine says nothing is in flight,
/// or at `deadline`.
#[derive(Debug, Clone)]
pub struct Drain {
    pub notice_until: Instant,
    pub deadline: Instant,
    /// When to ask the engine again how many requests it holds.
    pub next_check: Instant,
    /// The engine's answer to the last question (None: not asked yet, or it cannot tell).
    pub in_flight: Option<u64>,
}

pub struct Dep {
    pub uid: DeploymentUid,
    pub spec: DeploymentSpec,
    /// `None` when the model could not be read again after a head restart.
    pub model: Option<LoadedModel>,
    pub state: DState,
    pub message: String,
    pub since: Instant,
    pub generation: Generation,
    pub restarts: u32,
    pub restart_times: VecDeque<Instant>,
    pub launch: Option<Launch>,
    /// Processes of the current generation by key.
    pub procs: BTreeMap<ProcKey, Proc>,
    pub next_attempt: Option<Instant>,
    pub delete_deadline: Option<Instant>,
    /// After a head restart: by then every process of the generation must have reported.
    pub recover_deadline: Option<Instant>,
    /// Set between the first failure of a generation and the group restart it causes.
    pub failing: Option<Failing>,
    /// A durable write for this deployment is in flight; nothing is sent until it lands.
    pub parked: bool,
    pub drain: Option<Drain>,
    /// The current generation's weight staging (see `staging.rs`), when the spec stages.
    pub staging: Option<super::staging::Staging>,
}

impl Dep {
    pub fn new(uid: DeploymentUid, spec: DeploymentSpec, model: Option<LoadedModel>, now: Instant) -> Self {
        Dep {
            uid,
            spec,
            model,
            state: DState::Pending,
            message: "planning".into(),
            since: now,
            generation: Generation(0),
            restarts: 0,
            restart_times: VecDeque::new(),
            launch: None,
            procs: BTreeMap::new(),
            next_attempt: None,
            delete_deadline: None,
            recover_deadline: None,
            failing: None,
            parked: false,
            drain: None,
            staging: None,
        }
    }

    /// The generation is placed and its nodes are still fetching the model.
    pub fn staging_now(&self) -> bool {
        self.state == DState::Starting && self.failing.is_none() && self.staging.as_ref().is_some_and(|s| !s.done)
    }

    pub fn staging_pb(&self) -> Vec<pb::NodeStaging> {
        self.staging.as_ref().map(|s| s.to_pb()).unwrap_or_default()
    }

    pub fn state_pb(&self) -> pb::DeploymentState {
        if self.staging_now() { pb::DeploymentState::Staging } else { self.state.to_pb() }
    }

    pub fn set_state(&mut self, state: DState, message: String, now: Instant) {
        if state != self.state {
            self.since = now;
        }
        self.state = state;
        self.message = message;
    }

    /// GPUs this deployment holds.
    pub fn gpus(&self) -> &[String] {
        self.launch.as_ref().map(|l| l.gpus.as_slice()).unwrap_or_default()
    }

    /// The node of the process that runs `rank` now.
    pub fn locate(&self, rank: u32) -> Option<(&ProcKey, &Proc)> {
        self.procs.iter().find(|(_, p)| p.ranks.contains(&rank))
    }

    pub fn to_pb(&self, now: Instant) -> pb::Deployment {
        let (placement, stages, master_addr, master_port) = match &self.launch {
            Some(l) => (l.placement.as_slice(), l.stages.as_slice(), l.master_addr.to_string(), l.master_port),
            None => (&[][..], &[][..], String::new(), 0),
        };
        let nnodes = placement.iter().map(|r| r.node_rank).max().map(|m| m as u32 + 1).unwrap_or(0);
        let ranks = placement
            .iter()
            .map(|r| {
                let proc = self.procs.values().find(|p| p.ranks.contains(&(r.rank as u32)));
                let (ls, le) = stages.get(r.pp_rank as usize).map(|s| (s.layer_start, s.layer_end)).unwrap_or((0, 0));
                let node_gpus: Vec<u32> = if super::engine::one_process_per_node(&self.spec) {
                    placement.iter().filter(|o| o.node_rank == r.node_rank).map(|o| o.gpu_index).collect()
                } else {
                    vec![r.gpu_index]
                };
                pb::Rank {
                    rank: r.rank,
                    tp_rank: r.tp_rank,
                    pp_rank: r.pp_rank,
                    node: r.node.clone(),
                    node_id: r.node_id.clone(),
                    node_rank: r.node_rank,
                    gpu_indices: node_gpus,
                    pid: proc.map(|p| p.pid).unwrap_or(0),
                    state: proc.map(|p| p.state).unwrap_or(pb::ProcessState::Unspecified) as i32,
                    exit_code: proc.and_then(|p| p.exit_code),
                    signal: proc.and_then(|p| p.signal),
                    layer_start: ls,
                    layer_end: le,
                    rtt_us: proc.and_then(|p| p.rtt_us),
                }
            })
            .collect();
        let health_url = self.launch.as_ref().map(|l| super::engine::health_url(&self.spec, l)).unwrap_or_default();
        let endpoint = self.launch.as_ref().map(|l| super::engine::endpoint(&self.spec, l)).unwrap_or_default();
        pb::Deployment {
            replicas: Vec::new(),
            name: self.spec.name.clone(),
            state: self.state_pb() as i32,
            message: self.message.clone(),
            generation: self.generation.0,
            restarts: self.restarts,
            tp: self.spec.tp as u32,
            pp: self.spec.pp as u32,
            engine: self.spec.engine.to_pb() as i32,
            model_path: self.spec.model_path.display().to_string(),
            ranks,
            master_addr,
            master_port,
            health_url,
            max_restarts: self.spec.max_restarts as i32,
            nnodes,
            engine_args: self.spec.engine_args.clone(),
            env: self.spec.env.clone().into_iter().collect(),
            command: self.spec.command.clone(),
            per_node: self.spec.per_node,
            state_since_ms_ago: now.saturating_duration_since(self.since).as_millis() as u64,
            uid: self.uid.to_wire(),
            endpoint,
            startup_timeout_s: self.spec.startup_timeout.as_secs() as u32,
            stall_timeout_s: super::spec::check_to_wire(self.spec.stall_timeout),
            canary_interval_s: super::spec::check_to_wire(self.spec.canary_interval),
            drain_timeout_s: super::spec::check_to_wire(self.spec.drain_timeout),
            revision: self.spec.revision,
            gpu_memory_utilization: self.spec.gpu_memory_utilization,
            max_model_len: self.spec.max_model_len.unwrap_or(0),
            staging: if self.spec.staging { pb::StagingMode::On } else { pb::StagingMode::Off } as i32,
            staging_nodes: self.staging_pb(),
            model_from: self.spec.model_from.clone(),
            node_selector: self.spec.node_selector.clone().into_iter().collect(),
            managed_by: self.spec.managed_by.clone(),
        }
    }
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Vllm => "vllm",
            Engine::Command => "command",
            Engine::Probe => "probe",
        }
    }
}
