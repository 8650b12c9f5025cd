//! A deployment's durable record and back: what the store keeps is a plain record; turning it into
//! a spec and a deployment (and the other way) is the deployments' business, not the store's.

use std::time::Duration;

use tessera_common::ids::{DeploymentUid, Generation, NodeId, ProcKey};
use tokio::time::Instant;

use super::dep::{DState, Dep, Launch, Proc};
use super::spec::{
    DEFAULT_CANARY_INTERVAL, DEFAULT_DRAIN_TIMEOUT, DEFAULT_STALL_TIMEOUT, DeploymentSpec, Engine, LoadedModel,
    check_from_wire, check_to_wire, startup_from_wire,
};
use crate::store::{StoredDeployment, StoredLaunch, StoredProcess};

/// Wall clock and monotonic clock at one instant: records keep wall-clock times, the machine
/// monotonic ones.
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub now: Instant,
    pub unix_ms: u64,
}

impl At {
    pub fn unix_of(&self, t: Instant) -> u64 {
        self.unix_ms.saturating_sub(self.now.saturating_duration_since(t).as_millis() as u64)
    }
    /// The instant of a wall-clock time in the past; `None` when it lies before this process's
    /// monotonic clock began.
    pub fn instant_of(&self, unix_ms: u64) -> Option<Instant> {
        self.now.checked_sub(Duration::from_millis(self.unix_ms.saturating_sub(unix_ms)))
    }
}

/// The durable record of a deployment.
pub fn to_stored(d: &Dep, at: At) -> StoredDeployment {
    let s = &d.spec;
    StoredDeployment {
        uid: d.uid.to_wire(),
        previous: s.previous.as_ref().map(|p| Box::new(spec_record(p))),
        generation: d.generation.0,
        restarts: d.restarts,
        restart_times_unix_ms: d.restart_times.iter().map(|t| at.unix_of(*t)).collect(),
        failed: (d.state == DState::Failed).then(|| d.message.clone()),
        launch: d.launch.as_ref().filter(|l| !l.gpus.is_empty()).map(|l| StoredLaunch {
            gpus: l.gpus.clone(),
            placement: l.placement.clone(),
            stages: l.stages.clone(),
            processes: d
                .procs
                .iter()
                .map(|(k, p)| StoredProcess {
                    key: k.0.clone(),
                    node_id: p.node_id.to_string(),
                    node: p.node.clone(),
                    ranks: p.ranks.clone(),
                })
                .collect(),
            master_addr: l.master_addr.to_string(),
            master_port: l.master_port,
            health_port: l.health_port,
        }),
        ..spec_record(s)
    }
}

/// A record of a spec alone (an earlier revision kept for a rollback, or the spec part of a
/// deployment's record): no state, no launch.
fn spec_record(s: &DeploymentSpec) -> StoredDeployment {
    StoredDeployment {
        name: s.name.clone(),
        uid: String::new(),
        model_path: s.model_path.clone(),
        tp: s.tp,
        pp: s.pp,
        engine: s.engine.as_str().into(),
        engine_args: s.engine_args.clone(),
        env: s.env.clone(),
        max_restarts: s.max_restarts,
        command: s.command.clone(),
        per_node: s.per_node,
        gpu_memory_utilization: s.gpu_memory_utilization,
        max_model_len: s.max_model_len,
        startup_timeout_s: s.startup_timeout.as_secs() as u32,
        stall_timeout_s: check_to_wire(s.stall_timeout),
        canary_interval_s: check_to_wire(s.canary_interval),
        drain_timeout_s: check_to_wire(s.drain_timeout),
        revision: s.revision,
        previous: None,
        staging: s.staging,
        model_from: s.model_from.clone(),
        node_selector: s.node_selector.clone(),
        managed_by: s.managed_by.clone(),
        described: s.described.clone(),
        generation: 0,
        restarts: 0,
        restart_times_unix_ms: Vec::new(),
        failed: None,
        launch: None,
    }
}

/// The spec a record was made from.
pub fn to_spec(r: &StoredDeployment) -> Result<DeploymentSpec, String> {
    let engine = match r.engine.as_str() {
        "vllm" => Engine::Vllm,
        "command" => Engine::Command,
        "probe" => Engine::Probe,
        other => return Err(format!("unknown engine {other:?}")),
    };
    let mut spec = DeploymentSpec {
        name: r.name.clone(),
        model_path: r.model_path.clone(),
        tp: r.tp,
        pp: r.pp,
        engine,
        engine_args: r.engine_args.clone(),
        env: r.env.clone(),
        max_restarts: r.max_restarts,
        command: r.command.clone(),
        per_node: r.per_node,
        gpu_memory_utilization: r.gpu_memory_utilization,
        max_model_len: r.max_model_len,
        kv_cache_dtype: None,
        layer_partition: None,
        startup_timeout: startup_from_wire(r.startup_timeout_s),
        stall_timeout: check_from_wire(r.stall_timeout_s, DEFAULT_STALL_TIMEOUT),
        canary_interval: check_from_wire(r.canary_interval_s, DEFAULT_CANARY_INTERVAL),
        drain_timeout: check_from_wire(r.drain_timeout_s, DEFAULT_DRAIN_TIMEOUT),
        revision: r.revision.max(1),
        previous: match &r.previous {
            Some(p) => Some(Box::new(to_spec(p)?)),
            None => None,
        },
        staging: r.staging,
        staging_asked: false,
        model_from: r.model_from.clone(),
        node_selector: r.node_selector.clone(),
        managed_by: r.managed_by.clone(),
        described: r.described.clone(),
    };
    // Records of older versions may hold engine args this version refuses at Create: they keep
    // running as they were launched (their args pass through unread) rather than be dropped.
    if let Err(e) = spec.read_engine_settings(false) {
        tracing::warn!(deployment = %spec.name, error = %e, "engine args of a stored deployment kept as they are");
    }
    Ok(spec)
}

/// Rebuilds a deployment from its record after a head restart: the current generation is expected
/// to be running still, and is adopted as its workers report it within `window`.
pub fn recover(r: StoredDeployment, model: Option<LoadedModel>, at: At, window: Duration) -> Result<Dep, String> {
    let spec = to_spec(&r)?;
    let uid = DeploymentUid::from_wire(&r.uid).map_err(|e| e.to_string())?;
    let mut dep = Dep::new(uid, spec, model, at.now);
    dep.generation = Generation(r.generation);
    dep.restarts = r.restarts;
    dep.restart_times = r.restart_times_unix_ms.iter().filter_map(|&t| at.instant_of(t)).collect();
    match (r.failed, r.launch) {
        (Some(why), _) => dep.set_state(DState::Failed, why, at.now),
        (None, Some(l)) => {
            for p in &l.processes {
                let node: NodeId = p.node_id.parse().map_err(|e| format!("process {}: {e}", p.key))?;
                let mut proc = Proc::new(node, &p.node, p.ranks.clone());
                proc.launched = true;
                dep.procs.insert(ProcKey(p.key.clone()), proc);
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
            dep.recover_deadline = Some(at.now + window);
            dep.set_state(
                DState::Starting,
                format!(
                    "recovering after a head restart: waiting up to {} for generation {} to report",
                    tessera_common::duration::format_duration(window),
                    r.generation
                ),
                at.now,
            );
        }
        (None, None) => {
            dep.next_attempt = Some(at.now + window);
            dep.set_state(
                DState::Restarting,
                "recovering after a head restart: relaunching once the nodes are back".into(),
                at.now,
            );
        }
    }
    Ok(dep)
}
