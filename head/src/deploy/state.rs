//! One deployment's record: intent (spec), placement (launch, holding the GPU reservations), and
//! what the workers report (processes).

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use tessera_common::plan::partition::Stage;
use tessera_common::plan::placement::RankPlacement;
use tessera_proto::v1 as pb;
use tokio::time::Instant;
use uuid::Uuid;

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
        }
    }
}

/// Where the current generation runs. Dropping it (see `release`) frees its GPUs.
pub struct Launch {
    /// Reserved GPU uuids.
    pub gpus: Vec<String>,
    pub placement: Vec<RankPlacement>,
    pub stages: Vec<Stage>,
    /// Processes per node, node rank order.
    pub per_node: Vec<(Uuid, Vec<pb::ShardProcess>)>,
    pub master_addr: IpAddr,
    pub master_port: u32,
    pub health_port: u32,
    /// The launches of node ranks > 0 have been sent (after node rank 0 picked the ports).
    pub rest_sent: bool,
}

/// One process of the current generation, as reported.
pub struct Proc {
    pub node_id: Uuid,
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
    pub generation_seen: u64,
}

impl Proc {
    pub fn new(node_id: Uuid, node: &str, ranks: Vec<u32>) -> Self {
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
            generation_seen: 0,
        }
    }

    pub fn apply(&mut self, r: &pb::ShardReport) {
        let state = pb::ProcessState::try_from(r.state).unwrap_or(pb::ProcessState::Unspecified);
        // States only move forward within a generation (a late RUNNING never hides an exit).
        let rank = |s: pb::ProcessState| match s {
            pb::ProcessState::Unspecified => 0,
            pb::ProcessState::Starting => 1,
            pb::ProcessState::Running => 2,
            pb::ProcessState::Ready => 3,
            pb::ProcessState::Stopped => 4,
            pb::ProcessState::Exited => 5,
        };
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
        self.generation_seen = r.generation;
    }
}

pub struct Dep {
    pub spec: DeploymentSpec,
    /// `None` when the model could not be read again after a head restart.
    pub model: Option<LoadedModel>,
    pub state: DState,
    pub message: String,
    pub since: Instant,
    pub generation: u64,
    pub restarts: u32,
    pub restart_times: VecDeque<Instant>,
    pub launch: Option<Launch>,
    /// Processes of the current generation by key.
    pub procs: BTreeMap<String, Proc>,
    pub next_attempt: Option<Instant>,
    pub delete_deadline: Option<Instant>,
    /// After a head restart: by then every process of the generation must have reported.
    pub recover_deadline: Option<Instant>,
}

impl Dep {
    pub fn new(spec: DeploymentSpec, model: Option<LoadedModel>) -> Self {
        Dep {
            spec,
            model,
            state: DState::Pending,
            message: "planning".into(),
            since: Instant::now(),
            generation: 0,
            restarts: 0,
            restart_times: VecDeque::new(),
            launch: None,
            procs: BTreeMap::new(),
            next_attempt: None,
            delete_deadline: None,
            recover_deadline: None,
        }
    }

    /// The durable record of this deployment.
    pub fn to_stored(&self) -> crate::store::StoredDeployment {
        let s = &self.spec;
        let now = Instant::now();
        let unix_now = crate::membership::unix_ms();
        crate::store::StoredDeployment {
            name: s.name.clone(),
            model_path: s.model_path.clone(),
            tp: s.tp,
            pp: s.pp,
            engine: match s.engine {
                Engine::Vllm => "vllm",
                Engine::Command => "command",
                Engine::Probe => "probe",
            }
            .into(),
            engine_args: s.engine_args.clone(),
            env: s.env.clone(),
            max_restarts: s.max_restarts,
            command: s.command.clone(),
            per_node: s.per_node,
            gpu_memory_utilization: s.gpu_memory_utilization,
            max_model_len: s.max_model_len,
            generation: self.generation,
            restarts: self.restarts,
            restart_times_unix_ms: self
                .restart_times
                .iter()
                .map(|t| unix_now.saturating_sub(now.duration_since(*t).as_millis() as u64))
                .collect(),
            failed: (self.state == DState::Failed).then(|| self.message.clone()),
            launch: self.launch.as_ref().filter(|l| !l.gpus.is_empty()).map(|l| crate::store::StoredLaunch {
                gpus: l.gpus.clone(),
                placement: l.placement.clone(),
                stages: l.stages.clone(),
                processes: self
                    .procs
                    .iter()
                    .map(|(k, p)| crate::store::StoredProcess {
                        key: k.clone(),
                        node_id: p.node_id.to_string(),
                        node: p.node.clone(),
                        ranks: p.ranks.clone(),
                    })
                    .collect(),
                master_addr: l.master_addr.to_string(),
                master_port: l.master_port,
                health_port: l.health_port,
            }),
        }
    }

    pub fn set_state(&mut self, state: DState, message: String) {
        if state != self.state {
            self.since = Instant::now();
        }
        self.state = state;
        self.message = message;
    }

    /// A process of another generation reported during a delete.
    pub fn forget_proc(&mut self, key: &str, generation: u64) {
        if let Some(p) = self.procs.get_mut(key) {
            if p.generation_seen == generation {
                p.gone = true;
            }
        }
    }

    pub fn to_pb(&self) -> pb::Deployment {
        let (placement, stages, master_addr, master_port) = match &self.launch {
            Some(l) => (l.placement.clone(), l.stages.clone(), l.master_addr.to_string(), l.master_port),
            None => (Vec::new(), Vec::new(), String::new(), 0),
        };
        let nnodes = placement.iter().map(|r| r.node_rank).max().map(|m| m as u32 + 1).unwrap_or(0);
        let ranks = placement
            .iter()
            .map(|r| {
                let proc = self.procs.values().find(|p| p.ranks.contains(&(r.rank as u32)));
                let (ls, le) = stages.get(r.pp_rank as usize).map(|s| (s.layer_start, s.layer_end)).unwrap_or((0, 0));
                let node_gpus: Vec<u32> = match self.spec.engine {
                    // One vLLM process per node holds all of that node's GPUs.
                    Engine::Vllm => {
                        placement.iter().filter(|o| o.node_rank == r.node_rank).map(|o| o.gpu_index).collect()
                    }
                    _ if self.spec.per_node => {
                        placement.iter().filter(|o| o.node_rank == r.node_rank).map(|o| o.gpu_index).collect()
                    }
                    _ => vec![r.gpu_index],
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
        let health_url = match (self.spec.engine, &self.launch) {
            (Engine::Probe, Some(l)) if l.health_port > 0 => {
                format!("http://{}:{}/health", l.master_addr, l.health_port)
            }
            (Engine::Vllm, Some(l)) => {
                format!("http://{}:{}/health", l.master_addr, super::spec::vllm_port(&self.spec.engine_args))
            }
            _ => String::new(),
        };
        pb::Deployment {
            name: self.spec.name.clone(),
            state: self.state.to_pb() as i32,
            message: self.message.clone(),
            generation: self.generation,
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
            state_since_ms_ago: self.since.elapsed().as_millis() as u64,
        }
    }
}
