//! vLLM: one `vllm serve` per node holding all of that node's GPUs, multi-node without Ray
//! (`--nnodes/--node-rank/--master-addr/--master-port`, `--headless` past node rank 0). Ready
//! when node rank 0 answers `GET /health` on its API port.

use tessera_common::ids::ProcKey;
use tessera_proto::v1 as pb;

use super::{LaunchContext, NodeShare};

/// The port vLLM serves its API (and /health) on: `--port N` in the engine args, else 8000.
pub fn port(args: &[String]) -> u16 {
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

pub fn processes(ctx: &LaunchContext<'_>, share: &NodeShare) -> Vec<pb::ShardProcess> {
    let s = ctx.spec;
    let mut args = vec![
        "serve".to_string(),
        s.model_path.display().to_string(),
        "--tensor-parallel-size".into(),
        s.tp.to_string(),
        "--pipeline-parallel-size".into(),
        s.pp.to_string(),
        "--nnodes".into(),
        ctx.nodes.len().to_string(),
        "--node-rank".into(),
        share.node_rank.to_string(),
        "--master-addr".into(),
        ctx.master_addr.to_string(),
        "--master-port".into(),
        "{master_port}".into(),
    ];
    if share.node_rank > 0 {
        args.push("--headless".into());
    }
    args.extend(s.engine_args.iter().cloned());
    let mut env = ctx.base_env();
    env.insert("CUDA_VISIBLE_DEVICES".into(), share.gpu_list());
    env.insert("VLLM_HOST_IP".into(), share.address.to_string());
    let first = share.node_rank == 0;
    vec![pb::ShardProcess {
        key: ProcKey::node(share.node_rank).0,
        ranks: share.ranks.iter().map(|r| r.rank as u32).collect(),
        program: pb::ShardProgram::Vllm as i32,
        args,
        env: env.into_iter().collect(),
        health_check: first,
        health_port: if first { port(&s.engine_args) as u32 } else { 0 },
    }]
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::super::processes;
    use super::*;
    use crate::deploy::spec::Engine;

    #[test]
    fn one_process_per_node_headless_past_node_0_with_the_node_gpus() {
        let (mut spec, shares, stages) = fixture::shares();
        spec.engine = Engine::Vllm;
        spec.command.clear();
        spec.engine_args = vec!["--port".into(), "9000".into()];
        let ctx = fixture::ctx(&spec, &shares, &stages);
        let n0 = &processes(&ctx, &shares[0])[0];
        let n1 = &processes(&ctx, &shares[1])[0];
        assert!(!n0.args.contains(&"--headless".to_string()) && n1.args.contains(&"--headless".to_string()));
        assert!(n0.health_check && n0.health_port == 9000 && !n1.health_check);
        assert_eq!(n1.env.get("VLLM_HOST_IP").map(String::as_str), Some("10.0.0.2"));
        assert_eq!(n1.env.get("CUDA_VISIBLE_DEVICES").map(String::as_str), Some("0,1"));
        assert_eq!(n1.key, "node-1");
    }

    #[test]
    fn the_port_comes_from_the_engine_args() {
        assert_eq!(port(&[]), 8000);
        assert_eq!(port(&["--port".into(), "9000".into()]), 9000);
        assert_eq!(port(&["--port=9100".into()]), 9100);
    }
}
