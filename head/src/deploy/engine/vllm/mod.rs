//! vLLM: one `vllm serve` per node holding all of that node's GPUs, multi-node without Ray
//! (`--nnodes/--node-rank/--master-addr/--master-port`, `--headless` past node rank 0). Ready
//! when node rank 0 answers `GET /health` on its API port.

pub mod args;

use tessera_common::ids::ProcKey;
use tessera_proto::v1 as pb;

use super::{LaunchContext, NodeShare};

/// The address the API's health endpoint is checked on: `--host` when it names one address,
/// else loopback (vLLM binds every address by default).
pub fn health_host(host: Option<&str>) -> String {
    match host {
        None | Some("") | Some("0.0.0.0") => String::new(),
        Some("::") | Some("[::]") => "::1".into(),
        Some(h) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
    }
}

pub fn processes(ctx: &LaunchContext<'_>, share: &NodeShare) -> Vec<pb::ShardProcess> {
    let s = ctx.spec;
    let a = s.vllm_args();
    let mut args = vec![
        "serve".to_string(),
        share.model.clone(),
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
        "--distributed-executor-backend".into(),
        "mp".into(),
        // What was planned is what runs.
        "--gpu-memory-utilization".into(),
        s.gpu_memory_utilization.to_string(),
    ];
    if let Some(l) = s.max_model_len {
        args.extend(["--max-model-len".into(), l.to_string()]);
    }
    let first = share.node_rank == 0;
    if !first {
        args.push("--headless".into());
    } else {
        if a.port.is_none() {
            // Tessera picks node rank 0's API port, like the rendezvous port.
            args.extend(["--port".into(), "{health_port}".into()]);
        }
        // The API server counts the requests it holds (`/load`): the progress watchdog's measure,
        // since vLLM's scheduler stats freeze with a hung engine.
        let said = |f: &str| s.engine_args.iter().any(|x| x == f || x.starts_with(&format!("{f}=")));
        if !said("--enable-server-load-tracking") && !said("--no-enable-server-load-tracking") {
            args.push("--enable-server-load-tracking".into());
        }
    }
    if first {
        // Requests may name the deployment as their model (what the gateway routes by) as well
        // as what vLLM serves by default or was told to.
        args.extend(args::with_served_name(&s.engine_args, &s.model_path.display().to_string(), s.deployment()));
    } else {
        args.extend(s.engine_args.iter().cloned());
    }
    let mut env = ctx.base_env();
    env.insert("CUDA_VISIBLE_DEVICES".into(), share.gpu_list());
    env.insert("VLLM_HOST_IP".into(), share.address.to_string());
    env.entry("CUDA_DEVICE_ORDER".into()).or_insert_with(|| "PCI_BUS_ID".into());
    // vLLM gives up on a slow start by itself after this long; Tessera's deadline decides.
    env.entry("VLLM_ENGINE_READY_TIMEOUT_S".into()).or_insert_with(|| s.startup_timeout.as_secs().to_string());
    let liveness = (first && s.stall_timeout.is_some()).then(|| pb::Liveness {
        stall_timeout_ms: s.stall_timeout.map(|d| d.as_millis() as u32).unwrap_or(0),
        canary_interval_ms: s.canary_interval.map(|d| d.as_millis() as u32).unwrap_or(0),
        model: a.served_model_name.clone().unwrap_or_else(|| s.model_path.display().to_string()),
        check_interval_ms: CHECK_INTERVAL_MS,
        api_key: a.api_key.clone().or_else(|| s.env.get("VLLM_API_KEY").cloned()).unwrap_or_default(),
    });
    vec![pb::ShardProcess {
        key: ProcKey::node(share.node_rank).0,
        ranks: share.ranks.iter().map(|r| r.rank as u32).collect(),
        program: pb::ShardProgram::Vllm as i32,
        args,
        env: env.into_iter().collect(),
        health_check: first,
        health_port: if first { a.port.unwrap_or(0) as u32 } else { 0 },
        health_host: if first { health_host(a.host.as_deref()) } else { String::new() },
        startup_timeout_s: s.startup_timeout.as_secs() as u32,
        liveness,
        socket_ifname_of: share.address.to_string(),
    }]
}

/// How often node rank 0's worker checks `/health` and `/metrics` of a running vLLM.
pub const CHECK_INTERVAL_MS: u32 = 1000;

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
        spec.engine_args = vec!["--port".into(), "9000".into(), "--host".into(), "10.0.0.1".into()];
        let ctx = fixture::ctx(&spec, &shares, &stages);
        let n0 = &processes(&ctx, &shares[0])[0];
        let n1 = &processes(&ctx, &shares[1])[0];
        assert!(!n0.args.contains(&"--headless".to_string()) && n1.args.contains(&"--headless".to_string()));
        assert!(n0.health_check && n0.health_port == 9000 && n0.health_host == "10.0.0.1" && !n1.health_check);
        assert_eq!(n1.env.get("VLLM_HOST_IP").map(String::as_str), Some("10.0.0.2"));
        assert_eq!(n1.env.get("CUDA_VISIBLE_DEVICES").map(String::as_str), Some("0,1"));
        assert_eq!(n1.socket_ifname_of, "10.0.0.2");
        assert_eq!(n1.key, "node-1");
        assert!(n0.liveness.is_some() && n1.liveness.is_none(), "node rank 0 alone is checked");
    }

    #[test]
    fn what_was_planned_is_passed_and_the_api_port_is_picked() {
        let (mut spec, shares, stages) = fixture::shares();
        spec.engine = Engine::Vllm;
        spec.command.clear();
        spec.max_model_len = Some(4096);
        spec.env.insert("CUDA_DEVICE_ORDER".into(), "FASTEST_FIRST".into());
        let ctx = fixture::ctx(&spec, &shares, &stages);
        let n0 = &processes(&ctx, &shares[0])[0];
        let args = n0.args.join(" ");
        assert!(args.contains("--distributed-executor-backend mp"), "{args}");
        assert!(args.contains("--gpu-memory-utilization 0.92"), "{args}");
        assert!(args.contains("--max-model-len 4096"), "{args}");
        assert!(args.contains("--port {health_port}") && n0.health_port == 0, "{args}");
        assert!(args.contains("--enable-server-load-tracking"), "{args}");
        assert_eq!(n0.env.get("CUDA_DEVICE_ORDER").map(String::as_str), Some("FASTEST_FIRST"), "the user's wins");
        assert_eq!(n0.env.get("VLLM_ENGINE_READY_TIMEOUT_S").map(String::as_str), Some("1800"));
        assert_eq!(n0.startup_timeout_s, 1800);
        let live = n0.liveness.as_ref().expect("checked");
        assert_eq!((live.stall_timeout_ms, live.canary_interval_ms), (30_000, 30_000));
        assert_eq!(live.model, "/models/llama");
        let n1 = &processes(&ctx, &shares[1])[0];
        assert!(!n1.args.iter().any(|a| a == "--port"), "headless nodes serve no API");
    }

    #[test]
    fn the_health_host_is_the_bound_address_or_loopback() {
        assert_eq!(health_host(None), "");
        assert_eq!(health_host(Some("0.0.0.0")), "");
        assert_eq!(health_host(Some("::")), "::1");
        assert_eq!(health_host(Some("10.1.2.3")), "10.1.2.3");
        assert_eq!(health_host(Some("[fd00::1]")), "fd00::1");
    }
}
