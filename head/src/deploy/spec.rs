//! A deployment's spec, validated on receipt, and the processes each engine runs on each node.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tessera_common::model::{ModelDesc, load::Model};
use tessera_common::plan::memory::Weights;
use tessera_common::plan::partition::Stage;
use tessera_common::plan::placement::RankPlacement;
use tessera_proto::v1 as pb;
use tonic::Status;

/// Default group restarts allowed within [`RESTART_WINDOW`].
pub const DEFAULT_MAX_RESTARTS: u32 = 5;
/// The window in which restarts are counted.
pub const RESTART_WINDOW: Duration = Duration::from_secs(600);
/// Seconds between SIGTERM and SIGKILL when stopping a process.
pub const STOP_GRACE_S: u32 = 10;

/// Environment variables Tessera sets from the placement; a deployment may not override them.
const RESERVED_ENV: &[&str] = &[
    "CUDA_VISIBLE_DEVICES",
    "VLLM_HOST_IP",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TESSERA_DEPLOYMENT",
    "TESSERA_GENERATION",
    "TESSERA_TP_RANK",
    "TESSERA_PP_RANK",
    "TESSERA_LAYER_START",
    "TESSERA_LAYER_END",
    "TESSERA_PROCESS_DIR",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Vllm,
    Command,
    Probe,
}

impl Engine {
    pub fn to_pb(self) -> pb::Engine {
        match self {
            Engine::Vllm => pb::Engine::Vllm,
            Engine::Command => pb::Engine::Command,
            Engine::Probe => pb::Engine::Probe,
        }
    }
}

/// What the user asked for, validated.
#[derive(Debug, Clone)]
pub struct DeploymentSpec {
    pub name: String,
    pub model_path: PathBuf,
    pub tp: u64,
    pub pp: u64,
    pub engine: Engine,
    pub engine_args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Group restarts allowed within 10 minutes.
    pub max_restarts: u32,
    pub command: String,
    pub per_node: bool,
    pub gpu_memory_utilization: f64,
    pub max_model_len: Option<u64>,
}

/// The model, loaded once at create.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub desc: ModelDesc,
    pub weights: Weights,
}

impl LoadedModel {
    pub fn of(m: &Model) -> Self {
        LoadedModel {
            desc: m.desc.clone(),
            weights: m.weights.as_ref().map(Weights::exact).unwrap_or_else(|| Weights::estimate(&m.desc)),
        }
    }
}

fn bad(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

/// A DNS label: 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit.
pub fn check_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(bad(
            "name",
            format!(
                "{name:?} is not a DNS label: use 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
            ),
        ))
    }
}

impl DeploymentSpec {
    pub fn from_request(r: &pb::CreateDeploymentRequest) -> Result<Self, Status> {
        check_name(&r.name)?;
        let model_path = crate::server::planner::model_path(&r.model_path)?;
        let size = |field: &str, v: u32| -> Result<u64, Status> {
            match v {
                0 => Ok(1),
                1..=4096 => Ok(v as u64),
                _ => Err(bad(field, format!("{v} is more than 4096"))),
            }
        };
        let tp = size("tp", r.tp)?;
        let pp = size("pp", r.pp)?;
        let engine = match pb::Engine::try_from(r.engine).unwrap_or(pb::Engine::Unspecified) {
            pb::Engine::Vllm => Engine::Vllm,
            pb::Engine::Command => Engine::Command,
            pb::Engine::Probe => Engine::Probe,
            pb::Engine::Unspecified => return Err(bad("engine", "is required: one of vllm, command, probe")),
        };
        if r.engine_args.len() > 256 {
            return Err(bad("engine_args", format!("{} arguments; at most 256", r.engine_args.len())));
        }
        for (i, a) in r.engine_args.iter().enumerate() {
            if a.len() > 4096 || a.contains('\0') {
                return Err(bad(&format!("engine_args[{i}]"), "longer than 4096 bytes or contains NUL"));
            }
        }
        if r.env.len() > 128 {
            return Err(bad("env", format!("{} variables; at most 128", r.env.len())));
        }
        for (k, v) in &r.env {
            let valid = !k.is_empty()
                && k.len() <= 128
                && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(bad("env", format!("{k:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)")));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(bad("env", format!("{k} is set by Tessera from the placement and cannot be overridden")));
            }
            if v.len() > 32 * 1024 || v.contains('\0') {
                return Err(bad("env", format!("the value of {k} is longer than 32 KiB or contains NUL")));
            }
        }
        match engine {
            Engine::Command if r.command.trim().is_empty() => {
                return Err(bad(
                    "command",
                    "is required with the command engine (a shell template, e.g. \"python serve.py --rank {rank}\")",
                ));
            }
            Engine::Command if r.command.len() > 16 * 1024 => return Err(bad("command", "longer than 16 KiB")),
            Engine::Vllm | Engine::Probe if !r.command.is_empty() => {
                return Err(bad("command", "is only for the command engine"));
            }
            _ => {}
        }
        let util = if r.gpu_memory_utilization == 0.0 { 0.9 } else { r.gpu_memory_utilization };
        if !(util > 0.0 && util <= 1.0) {
            return Err(bad(
                "gpu_memory_utilization",
                format!("{} must be more than 0 and at most 1", r.gpu_memory_utilization),
            ));
        }
        let max_restarts = match r.max_restarts {
            0 => DEFAULT_MAX_RESTARTS,
            n if n < 0 => 0,
            n if n > 1000 => return Err(bad("max_restarts", format!("{n} is more than 1000"))),
            n => n as u32,
        };
        Ok(DeploymentSpec {
            name: r.name.clone(),
            model_path,
            tp,
            pp,
            engine,
            engine_args: r.engine_args.clone(),
            env: r.env.clone().into_iter().collect(),
            max_restarts,
            command: r.command.clone(),
            per_node: r.per_node,
            gpu_memory_utilization: util,
            max_model_len: (r.max_model_len > 0).then_some(r.max_model_len),
        })
    }
}

/// One node's share of a launch.
#[derive(Debug, Clone)]
pub struct NodeShare {
    pub node_id: String,
    pub node: String,
    pub address: IpAddr,
    pub node_rank: u64,
    pub ranks: Vec<RankPlacement>,
}

impl NodeShare {
    pub fn gpu_list(&self) -> String {
        self.ranks.iter().map(|r| r.gpu_index.to_string()).collect::<Vec<_>>().join(",")
    }
}

/// Everything the processes of one generation need to know.
pub struct LaunchContext<'a> {
    pub spec: &'a DeploymentSpec,
    pub generation: u64,
    pub nodes: &'a [NodeShare],
    pub stages: &'a [Stage],
    pub master_addr: IpAddr,
}

/// The port vLLM serves its API (and /health) on: `--port N` in the engine args, else 8000.
pub fn vllm_port(args: &[String]) -> u16 {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--port" {
            if let Some(p) = it.next().and_then(|v| v.parse().ok()) {
                return p;
            }
        } else if let Some(p) = a.strip_prefix("--port=").and_then(|v| v.parse().ok()) {
            return p;
        }
    }
    8000
}

/// The processes for one node.
pub fn processes(ctx: &LaunchContext<'_>, share: &NodeShare) -> Vec<pb::ShardProcess> {
    let s = ctx.spec;
    let world = s.tp * s.pp;
    let nnodes = ctx.nodes.len() as u64;
    let master = ctx.master_addr.to_string();
    let layers =
        |pp_rank: u64| ctx.stages.get(pp_rank as usize).map(|st| (st.layer_start, st.layer_end)).unwrap_or((0, 0));
    let mut base_env: BTreeMap<String, String> = s.env.clone();
    base_env.insert("TESSERA_DEPLOYMENT".into(), s.name.clone());
    base_env.insert("TESSERA_GENERATION".into(), ctx.generation.to_string());
    match s.engine {
        Engine::Vllm => {
            let mut args = vec![
                "serve".to_string(),
                s.model_path.display().to_string(),
                "--tensor-parallel-size".into(),
                s.tp.to_string(),
                "--pipeline-parallel-size".into(),
                s.pp.to_string(),
                "--nnodes".into(),
                nnodes.to_string(),
                "--node-rank".into(),
                share.node_rank.to_string(),
                "--master-addr".into(),
                master,
                "--master-port".into(),
                "{master_port}".into(),
            ];
            if share.node_rank > 0 {
                args.push("--headless".into());
            }
            args.extend(s.engine_args.iter().cloned());
            let mut env = base_env;
            env.insert("CUDA_VISIBLE_DEVICES".into(), share.gpu_list());
            env.insert("VLLM_HOST_IP".into(), share.address.to_string());
            vec![pb::ShardProcess {
                key: format!("node-{}", share.node_rank),
                ranks: share.ranks.iter().map(|r| r.rank as u32).collect(),
                program: pb::ShardProgram::Vllm as i32,
                args,
                env: env.into_iter().collect(),
                health_check: share.node_rank == 0,
                health_port: if share.node_rank == 0 { vllm_port(&s.engine_args) as u32 } else { 0 },
            }]
        }
        Engine::Probe => share
            .ranks
            .iter()
            .map(|r| {
                let mut args = vec![
                    "--rank".to_string(),
                    r.rank.to_string(),
                    "--world-size".into(),
                    world.to_string(),
                    "--master-addr".into(),
                    master.clone(),
                    "--master-port".into(),
                    "{master_port}".into(),
                ];
                if r.rank == 0 {
                    args.extend(["--health-port".to_string(), "{health_port}".to_string()]);
                }
                let env = rank_env(&base_env, ctx, share, r);
                pb::ShardProcess {
                    key: format!("rank-{}", r.rank),
                    ranks: vec![r.rank as u32],
                    program: pb::ShardProgram::Probe as i32,
                    args,
                    env: env.into_iter().collect(),
                    health_check: r.rank == 0,
                    health_port: 0,
                }
            })
            .collect(),
        Engine::Command => {
            let template = |rank: Option<&RankPlacement>| {
                let ranks: Vec<String> = share.ranks.iter().map(|r| r.rank.to_string()).collect();
                let mut t = s
                    .command
                    .replace("{model}", &s.model_path.display().to_string())
                    .replace("{tp}", &s.tp.to_string())
                    .replace("{pp}", &s.pp.to_string())
                    .replace("{world_size}", &world.to_string())
                    .replace("{ranks}", &ranks.join(","))
                    .replace("{node_rank}", &share.node_rank.to_string())
                    .replace("{nnodes}", &nnodes.to_string())
                    .replace("{master_addr}", &master)
                    .replace("{args}", &s.engine_args.join(" "));
                if let Some(r) = rank {
                    t = t
                        .replace("{rank}", &r.rank.to_string())
                        .replace("{tp_rank}", &r.tp_rank.to_string())
                        .replace("{pp_rank}", &r.pp_rank.to_string());
                }
                t
            };
            if s.per_node {
                let first = &share.ranks[0];
                let mut env = torchrun_env(&base_env, ctx, share, first.rank, 0, share.ranks.len() as u64);
                env.insert("CUDA_VISIBLE_DEVICES".into(), share.gpu_list());
                let (ls, _) = layers(first.pp_rank);
                let (_, le) = layers(share.ranks.last().map(|r| r.pp_rank).unwrap_or(first.pp_rank));
                env.insert("TESSERA_LAYER_START".into(), ls.to_string());
                env.insert("TESSERA_LAYER_END".into(), le.to_string());
                vec![pb::ShardProcess {
                    key: format!("node-{}", share.node_rank),
                    ranks: share.ranks.iter().map(|r| r.rank as u32).collect(),
                    program: pb::ShardProgram::Shell as i32,
                    args: vec![template(None)],
                    env: env.into_iter().collect(),
                    health_check: false,
                    health_port: 0,
                }]
            } else {
                share
                    .ranks
                    .iter()
                    .map(|r| {
                        let env = rank_env(&base_env, ctx, share, r);
                        pb::ShardProcess {
                            key: format!("rank-{}", r.rank),
                            ranks: vec![r.rank as u32],
                            program: pb::ShardProgram::Shell as i32,
                            args: vec![template(Some(r))],
                            env: env.into_iter().collect(),
                            health_check: false,
                            health_port: 0,
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Everything one rank's process sees: torchrun's variables, its GPU, its TP/PP ranks and layers.
fn rank_env(
    base: &BTreeMap<String, String>,
    ctx: &LaunchContext<'_>,
    share: &NodeShare,
    r: &RankPlacement,
) -> BTreeMap<String, String> {
    let mut env = torchrun_env(base, ctx, share, r.rank, r.rank - share.ranks[0].rank, share.ranks.len() as u64);
    let (ls, le) = ctx.stages.get(r.pp_rank as usize).map(|st| (st.layer_start, st.layer_end)).unwrap_or((0, 0));
    env.insert("CUDA_VISIBLE_DEVICES".into(), r.gpu_index.to_string());
    env.insert("TESSERA_TP_RANK".into(), r.tp_rank.to_string());
    env.insert("TESSERA_PP_RANK".into(), r.pp_rank.to_string());
    env.insert("TESSERA_LAYER_START".into(), ls.to_string());
    env.insert("TESSERA_LAYER_END".into(), le.to_string());
    env
}

/// torchrun's variables: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
/// MASTER_PORT (filled in by the worker).
fn torchrun_env(
    base: &BTreeMap<String, String>,
    ctx: &LaunchContext<'_>,
    share: &NodeShare,
    rank: u64,
    local_rank: u64,
    local_world: u64,
) -> BTreeMap<String, String> {
    let mut env = base.clone();
    env.insert("RANK".into(), rank.to_string());
    env.insert("LOCAL_RANK".into(), local_rank.to_string());
    env.insert("WORLD_SIZE".into(), (ctx.spec.tp * ctx.spec.pp).to_string());
    env.insert("LOCAL_WORLD_SIZE".into(), local_world.to_string());
    env.insert("GROUP_RANK".into(), share.node_rank.to_string());
    env.insert("MASTER_ADDR".into(), ctx.master_addr.to_string());
    env.insert("MASTER_PORT".into(), "{master_port}".into());
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> pb::CreateDeploymentRequest {
        pb::CreateDeploymentRequest {
            name: "llama".into(),
            model_path: "/models/llama".into(),
            tp: 4,
            pp: 2,
            engine: pb::Engine::Probe as i32,
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_validated_field_by_field() {
        assert!(DeploymentSpec::from_request(&req()).is_ok());
        let cases: Vec<(pb::CreateDeploymentRequest, &str)> = vec![
            (pb::CreateDeploymentRequest { name: "Llama!".into(), ..req() }, "name:"),
            (pb::CreateDeploymentRequest { name: "x".repeat(64), ..req() }, "name:"),
            (pb::CreateDeploymentRequest { model_path: "rel".into(), ..req() }, "model_path:"),
            (pb::CreateDeploymentRequest { tp: 5000, ..req() }, "tp:"),
            (pb::CreateDeploymentRequest { engine: 0, ..req() }, "engine:"),
            (pb::CreateDeploymentRequest { engine: pb::Engine::Command as i32, ..req() }, "command:"),
            (pb::CreateDeploymentRequest { command: "ls".into(), ..req() }, "command:"),
            (pb::CreateDeploymentRequest { env: [("1BAD".into(), "v".into())].into(), ..req() }, "env:"),
            (
                pb::CreateDeploymentRequest { env: [("CUDA_VISIBLE_DEVICES".into(), "0".into())].into(), ..req() },
                "cannot be overridden",
            ),
            (pb::CreateDeploymentRequest { gpu_memory_utilization: 2.0, ..req() }, "gpu_memory_utilization:"),
            (pb::CreateDeploymentRequest { engine_args: vec!["a".into(); 300], ..req() }, "engine_args:"),
        ];
        for (r, needle) in cases {
            let e = DeploymentSpec::from_request(&r).expect_err(needle);
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(needle), "{needle}: {}", e.message());
        }
        assert_eq!(
            DeploymentSpec::from_request(&pb::CreateDeploymentRequest { max_restarts: -1, ..req() })
                .map(|s| s.max_restarts)
                .ok(),
            Some(0)
        );
        assert_eq!(DeploymentSpec::from_request(&req()).map(|s| s.max_restarts).ok(), Some(5));
    }

    fn ctx_fixture() -> (DeploymentSpec, Vec<NodeShare>, Vec<Stage>) {
        let mut spec = DeploymentSpec::from_request(&pb::CreateDeploymentRequest {
            engine: pb::Engine::Command as i32,
            command: "run {model} rank={rank} tp={tp_rank} pp={pp_rank} node={node_rank}/{nnodes} at {master_addr}"
                .into(),
            ..req()
        })
        .expect("valid");
        spec.tp = 2;
        spec.pp = 2;
        let rank = |rank: u64, node: &str, node_rank: u64, gpu: u32| RankPlacement {
            rank,
            tp_rank: rank % 2,
            pp_rank: rank / 2,
            node: node.into(),
            node_id: format!("id-{node}"),
            node_rank,
            gpu_index: gpu,
            gpu_uuid: format!("GPU-{node}-{gpu}"),
        };
        let shares = vec![
            NodeShare {
                node_id: "id-a".into(),
                node: "a".into(),
                address: "10.0.0.1".parse().expect("ip"),
                node_rank: 0,
                ranks: vec![rank(0, "a", 0, 2), rank(1, "a", 0, 3)],
            },
            NodeShare {
                node_id: "id-b".into(),
                node: "b".into(),
                address: "10.0.0.2".parse().expect("ip"),
                node_rank: 1,
                ranks: vec![rank(2, "b", 1, 0), rank(3, "b", 1, 1)],
            },
        ];
        let stages = vec![
            Stage { pp_rank: 0, layer_start: 0, layer_end: 16, num_layers: 16 },
            Stage { pp_rank: 1, layer_start: 16, layer_end: 32, num_layers: 16 },
        ];
        (spec, shares, stages)
    }

    #[test]
    fn the_command_engine_gets_torchrun_variables_per_rank() {
        let (spec, shares, stages) = ctx_fixture();
        let ctx = LaunchContext {
            spec: &spec,
            generation: 7,
            nodes: &shares,
            stages: &stages,
            master_addr: shares[0].address,
        };
        let procs = processes(&ctx, &shares[1]);
        assert_eq!(procs.len(), 2);
        let p = &procs[1];
        assert_eq!(p.key, "rank-3");
        assert_eq!(p.args, vec!["run /models/llama rank=3 tp=1 pp=1 node=1/2 at 10.0.0.1".to_string()]);
        let env = |k: &str| p.env.get(k).cloned().unwrap_or_default();
        for (k, v) in [
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "{master_port}"),
            ("CUDA_VISIBLE_DEVICES", "1"),
            ("TESSERA_DEPLOYMENT", "llama"),
            ("TESSERA_GENERATION", "7"),
            ("TESSERA_TP_RANK", "1"),
            ("TESSERA_PP_RANK", "1"),
            ("TESSERA_LAYER_START", "16"),
            ("TESSERA_LAYER_END", "32"),
        ] {
            assert_eq!(env(k), v, "{k}");
        }
    }

    #[test]
    fn per_node_commands_hold_the_node_gpus_and_vllm_is_headless_past_node_0() {
        let (mut spec, shares, stages) = ctx_fixture();
        spec.per_node = true;
        let ctx = LaunchContext {
            spec: &spec,
            generation: 1,
            nodes: &shares,
            stages: &stages,
            master_addr: shares[0].address,
        };
        let p = &processes(&ctx, &shares[0])[0];
        assert_eq!((p.key.as_str(), p.ranks.clone()), ("node-0", vec![0, 1]));
        assert_eq!(p.env.get("CUDA_VISIBLE_DEVICES").map(String::as_str), Some("2,3"));
        assert_eq!(p.env.get("TESSERA_LAYER_END").map(String::as_str), Some("16"));

        spec.engine = Engine::Vllm;
        spec.engine_args = vec!["--port".into(), "9000".into()];
        let ctx = LaunchContext {
            spec: &spec,
            generation: 1,
            nodes: &shares,
            stages: &stages,
            master_addr: shares[0].address,
        };
        let n0 = &processes(&ctx, &shares[0])[0];
        let n1 = &processes(&ctx, &shares[1])[0];
        assert!(!n0.args.contains(&"--headless".to_string()) && n1.args.contains(&"--headless".to_string()));
        assert!(n0.health_check && n0.health_port == 9000 && !n1.health_check);
        assert_eq!(n1.env.get("VLLM_HOST_IP").map(String::as_str), Some("10.0.0.2"));
        assert_eq!(n1.env.get("CUDA_VISIBLE_DEVICES").map(String::as_str), Some("0,1"));
    }

    #[test]
    fn vllm_port_comes_from_the_engine_args() {
        assert_eq!(vllm_port(&[]), 8000);
        assert_eq!(vllm_port(&["--port".into(), "9000".into()]), 9000);
        assert_eq!(vllm_port(&["--port=9100".into()]), 9100);
    }
}
