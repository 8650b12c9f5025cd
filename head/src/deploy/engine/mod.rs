//! The engines: what processes each runs on each node, on which ports, and how readiness and GPU
//! ownership look. One module per engine; this one holds what they share (torchrun's variables).
//!
//! # Layout
//! - [`vllm`]: one `vllm serve` per node, `--headless` past node rank 0.
//! - [`command`]: a shell template per rank or per node (workers must allow it).
//! - [`probe`]: the built-in rendezvous check, one process per rank.

pub mod command;
pub mod probe;
pub mod vllm;

use std::collections::BTreeMap;
use std::net::IpAddr;

use tessera_common::ids::{Generation, NodeId};
use tessera_common::plan::partition::Stage;
use tessera_common::plan::placement::RankPlacement;
use tessera_proto::v1 as pb;

use super::dep::Launch;
use super::spec::{DeploymentSpec, Engine};

/// One node's share of a launch.
#[derive(Debug, Clone)]
pub struct NodeShare {
    pub node_id: NodeId,
    pub node: String,
    pub address: IpAddr,
    pub node_rank: u64,
    pub ranks: Vec<RankPlacement>,
    /// The model path this node's engine reads: the deployment's, or `{staged_model}` (the
    /// directory staging made in the node's cache, filled in by its worker).
    pub model: String,
}

impl NodeShare {
    pub fn gpu_list(&self) -> String {
        self.ranks.iter().map(|r| r.gpu_index.to_string()).collect::<Vec<_>>().join(",")
    }
}

/// Everything the processes of one generation need to know.
pub struct LaunchContext<'a> {
    pub spec: &'a DeploymentSpec,
    pub generation: Generation,
    pub nodes: &'a [NodeShare],
    pub stages: &'a [Stage],
    pub master_addr: IpAddr,
}

impl LaunchContext<'_> {
    /// The variables every process of the deployment gets: the user's and Tessera's own.
    fn base_env(&self) -> BTreeMap<String, String> {
        let mut env = self.spec.env.clone();
        env.insert("TESSERA_DEPLOYMENT".into(), self.spec.deployment().to_string());
        env.insert("TESSERA_REPLICA".into(), self.spec.replica().to_string());
        env.insert("TESSERA_GENERATION".into(), self.generation.to_string());
        env
    }

    fn layers(&self, pp_rank: u64) -> (u64, u64) {
        self.stages.get(pp_rank as usize).map(|st| (st.layer_start, st.layer_end)).unwrap_or((0, 0))
    }
}

/// The processes for one node.
pub fn processes(ctx: &LaunchContext<'_>, share: &NodeShare) -> Vec<pb::ShardProcess> {
    match ctx.spec.engine {
        Engine::Vllm => vllm::processes(ctx, share),
        Engine::Probe => probe::processes(ctx, share),
        Engine::Command => command::processes(ctx, share),
    }
}

/// One process holds all of a node's GPUs (vLLM; the command engine with `--per node`).
pub fn one_process_per_node(spec: &DeploymentSpec) -> bool {
    match spec.engine {
        Engine::Vllm => true,
        Engine::Command => spec.per_node,
        Engine::Probe => false,
    }
}

/// Where clients reach node rank 0's API (`http://host:port`), when the engine has one and its
/// port is known.
pub fn endpoint(spec: &DeploymentSpec, l: &Launch) -> String {
    match spec.engine {
        Engine::Probe if l.health_port > 0 => url(&l.master_addr.to_string(), l.health_port),
        Engine::Vllm => {
            let a = spec.vllm_args();
            let port = a.port.map(u32::from).unwrap_or(l.health_port);
            let host = Some(vllm::health_host(a.host.as_deref())).filter(|h| !h.is_empty());
            if port == 0 { String::new() } else { url(&host.unwrap_or_else(|| l.master_addr.to_string()), port) }
        }
        _ => String::new(),
    }
}

fn url(host: &str, port: u32) -> String {
    if host.contains(':') { format!("http://[{host}]:{port}") } else { format!("http://{host}:{port}") }
}

/// Node rank 0's health endpoint, when the engine has one.
pub fn health_url(spec: &DeploymentSpec, l: &Launch) -> String {
    let e = endpoint(spec, l);
    if e.is_empty() { e } else { format!("{e}/health") }
}

/// Everything one rank's process sees: torchrun's variables, its GPU, its TP/PP ranks and layers.
fn rank_env(ctx: &LaunchContext<'_>, share: &NodeShare, r: &RankPlacement) -> BTreeMap<String, String> {
    let mut env = torchrun_env(ctx, share, r.rank, r.rank - share.ranks[0].rank);
    let (ls, le) = ctx.layers(r.pp_rank);
    env.insert("CUDA_VISIBLE_DEVICES".into(), r.gpu_index.to_string());
    env.insert("TESSERA_TP_RANK".into(), r.tp_rank.to_string());
    env.insert("TESSERA_PP_RANK".into(), r.pp_rank.to_string());
    env.insert("TESSERA_LAYER_START".into(), ls.to_string());
    env.insert("TESSERA_LAYER_END".into(), le.to_string());
    env
}

/// torchrun's variables: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
/// MASTER_PORT (filled in by the worker).
fn torchrun_env(ctx: &LaunchContext<'_>, share: &NodeShare, rank: u64, local_rank: u64) -> BTreeMap<String, String> {
    let mut env = ctx.base_env();
    env.insert("RANK".into(), rank.to_string());
    env.insert("LOCAL_RANK".into(), local_rank.to_string());
    env.insert("WORLD_SIZE".into(), (ctx.spec.tp * ctx.spec.pp).to_string());
    env.insert("LOCAL_WORLD_SIZE".into(), share.ranks.len().to_string());
    env.insert("GROUP_RANK".into(), share.node_rank.to_string());
    env.insert("MASTER_ADDR".into(), ctx.master_addr.to_string());
    env.insert("MASTER_PORT".into(), "{master_port}".into());
    env
}

#[cfg(test)]
pub(crate) mod fixture {
    use super::*;

    pub fn req() -> pb::CreateDeploymentRequest {
        pb::CreateDeploymentRequest {
            name: "llama".into(),
            model_path: "/models/llama".into(),
            tp: 4,
            pp: 2,
            engine: pb::Engine::Probe as i32,
            ..Default::default()
        }
    }

    /// A TP 2 x PP 2 command deployment on two nodes.
    pub fn shares() -> (DeploymentSpec, Vec<NodeShare>, Vec<Stage>) {
        let mut spec = DeploymentSpec::from_request(&pb::CreateDeploymentRequest {
            engine: pb::Engine::Command as i32,
            command: "run {model} rank={rank} tp={tp_rank} pp={pp_rank} node={node_rank}/{nnodes} at {master_addr}"
                .into(),
            ..req()
        })
        .expect("valid");
        spec.tp = 2;
        spec.pp = 2;
        let a = NodeId(uuid::Uuid::from_u128(1));
        let b = NodeId(uuid::Uuid::from_u128(2));
        let rank = |rank: u64, node: &str, id: NodeId, node_rank: u64, gpu: u32| RankPlacement {
            rank,
            tp_rank: rank % 2,
            pp_rank: rank / 2,
            node: node.into(),
            node_id: id.to_string(),
            node_rank,
            gpu_index: gpu,
            gpu_uuid: format!("GPU-{node}-{gpu}"),
        };
        let shares = vec![
            NodeShare {
                node_id: a,
                node: "a".into(),
                address: "10.0.0.1".parse().expect("ip"),
                node_rank: 0,
                ranks: vec![rank(0, "a", a, 0, 2), rank(1, "a", a, 0, 3)],
                model: "/models/llama".into(),
            },
            NodeShare {
                node_id: b,
                node: "b".into(),
                address: "10.0.0.2".parse().expect("ip"),
                node_rank: 1,
                ranks: vec![rank(2, "b", b, 1, 0), rank(3, "b", b, 1, 1)],
                model: "{staged_model}".into(),
            },
        ];
        let stages = vec![
            Stage { pp_rank: 0, layer_start: 0, layer_end: 16, num_layers: 16 },
            Stage { pp_rank: 1, layer_start: 16, layer_end: 32, num_layers: 16 },
        ];
        (spec, shares, stages)
    }

    pub fn ctx<'a>(spec: &'a DeploymentSpec, shares: &'a [NodeShare], stages: &'a [Stage]) -> LaunchContext<'a> {
        LaunchContext { spec, generation: Generation(7), nodes: shares, stages, master_addr: shares[0].address }
    }
}
