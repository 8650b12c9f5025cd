//! The `Planner` RPC against a live in-process cluster, and `tessera plan` against it.

use std::path::PathBuf;

use tessera_proto::v1 as pb;
use tessera_tests::{TestCluster, cluster_client, list_nodes, state, wait_until};

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/model-configs")
        .join(format!("{name}.json"))
        .canonicalize()
        .expect("model config exists")
        .display()
        .to_string()
}

async fn ready(url: &str, n: usize) {
    let c = cluster_client(url).await;
    wait_until("all nodes alive", || {
        let mut c = c.clone();
        async move {
            let nodes = list_nodes(&mut c).await;
            (nodes.len() == n && nodes.iter().all(|x| state(x) == pb::NodeState::Alive)).then_some(())
        }
    })
    .await;
}

async fn planner(url: &str) -> pb::planner_client::PlannerClient<tessera_tests::Conn> {
    tessera_tests::planner_client(url).await
}

#[tokio::test]
async fn plans_against_the_live_inventory_with_stage_0_on_the_head() {
    let cluster = TestCluster::start(2).await;
    ready(&cluster.url, 3).await;
    let mut p = planner(&cluster.url).await;
    let req = pb::PlanRequest { model_path: model("Llama-3.1-8B-Instruct"), tp: 4, pp: 2, ..Default::default() };
    let r = p.plan(req.clone()).await.expect("plan").into_inner();
    assert!(r.valid, "{:?}", r.errors);
    assert_eq!((r.world_size, r.nnodes), (8, 2));
    assert_eq!(r.placement.len(), 8);
    assert!(r.placement[..4].iter().all(|x| x.node == "head" && x.pp_rank == 0 && x.node_rank == 0));
    assert!(r.placement[4..].iter().all(|x| x.node != "head" && x.pp_rank == 1));
    let mem = r.memory.expect("memory");
    assert_eq!(mem.gpu_memory_bytes, 80 << 30);
    assert_eq!(mem.weights_source, "estimated");

    // Draining the head moves stage 0 elsewhere; draining everything leaves no room.
    let mut c = cluster_client(&cluster.url).await;
    c.drain_node(pb::DrainNodeRequest { node: "head".into(), evict: false }).await.expect("drain");
    let r = p.plan(req.clone()).await.expect("plan").into_inner();
    assert!(r.valid, "{:?}", r.errors);
    assert!(r.placement.iter().all(|x| x.node != "head"));
    c.drain_node(pb::DrainNodeRequest { node: "worker-1".into(), evict: false }).await.expect("drain");
    let r = p.plan(req).await.expect("plan").into_inner();
    assert!(!r.valid);
    assert_eq!(r.errors[0].rule, "placement");
    assert!(r.errors[0].message.starts_with("need 8 GPUs as 2 nodes x 4; free: worker-2 4"), "{}", r.errors[0].message);
    cluster.stop().await;
}

#[tokio::test]
async fn bad_plan_requests_get_the_right_codes() {
    let cluster = TestCluster::start(0).await;
    let mut p = planner(&cluster.url).await;
    let cases = [
        (pb::PlanRequest { model_path: "".into(), ..Default::default() }, tonic::Code::InvalidArgument, "model_path"),
        (
            pb::PlanRequest { model_path: "relative/dir".into(), ..Default::default() },
            tonic::Code::InvalidArgument,
            "relative",
        ),
        (
            pb::PlanRequest { model_path: "/no/such/model".into(), ..Default::default() },
            tonic::Code::NotFound,
            "/no/such/model",
        ),
        (
            pb::PlanRequest { model_path: model("Phi-3-mini-4k-instruct"), tp: 5000, ..Default::default() },
            tonic::Code::InvalidArgument,
            "tp",
        ),
        (
            pb::PlanRequest {
                model_path: model("Phi-3-mini-4k-instruct"),
                gpu_memory_utilization: 1.5,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "gpu_memory_utilization",
        ),
    ];
    for (req, code, needle) in cases {
        let e = p.plan(req).await.expect_err(needle);
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(needle), "{}", e.message());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    std::fs::write(dir.path().join("config.json"), "{\"num_attention_heads\": 8,").expect("write");
    let e = p
        .plan(pb::PlanRequest { model_path: dir.path().display().to_string(), ..Default::default() })
        .await
        .expect_err("malformed");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("config.json: invalid JSON"), "{}", e.message());
    cluster.stop().await;
}

#[test]
fn tessera_plan_exit_codes_and_json() {
    let tessera = tessera_tests::bin("tessera");
    let run = |args: &[&str]| {
        std::process::Command::new(&tessera).args(args).env_remove("TESSERA_HEAD").output().expect("run")
    };
    let m70 = model("Llama-3.1-70B-Instruct");
    let ok = run(&["plan", "--model", &m70, "--tp", "8", "--pp", "2", "--gpus", "2x8x80GiB", "-o", "json"]);
    assert_eq!(ok.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    for key in [
        "valid",
        "errors",
        "warnings",
        "tp",
        "pp",
        "world_size",
        "nnodes",
        "valid_tp_sizes",
        "model",
        "stages",
        "memory",
        "placement",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for key in
        ["architecture", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "is_moe", "is_mla", "dtype"]
    {
        assert!(v["model"].get(key).is_some(), "missing model.{key}");
    }
    for key in ["weights_source", "weight_bytes_per_gpu", "kv_cache_bytes_per_gpu", "kv_cache_tokens", "fits"] {
        assert!(v["memory"].get(key).is_some(), "missing memory.{key}");
    }
    for key in ["rank", "tp_rank", "pp_rank", "node", "node_rank", "gpu_index", "gpu_uuid"] {
        assert!(v["placement"][0].get(key).is_some(), "missing placement[].{key}");
    }
    assert_eq!(v["stages"][1]["layer_start"], 40);

    let bad =
        run(&["plan", "--model", &model("granite-3.3-8b-instruct"), "--tp", "3", "--pp", "1", "--gpus", "1x8x80GiB"]);
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.starts_with("INVALID"), "verdict first: {text}");
    assert!(
        text.contains("Total number of attention heads (32) must be divisible by tensor parallel size (3)."),
        "{text}"
    );

    let usage = run(&["plan", "--model", &m70, "--gpus", "eight"]);
    assert_eq!(usage.status.code(), Some(2));
    let missing = run(&["plan", "--model", "/no/such/model", "--gpus", "1x8x80GiB"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/model"));
    let env_partition = std::process::Command::new(&tessera)
        .args(["plan", "--model", &m70, "--tp", "8", "--pp", "2", "--gpus", "2x8x80GiB", "-o", "json"])
        .env("VLLM_PP_LAYER_PARTITION", "41,39")
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_slice(&env_partition.stdout).expect("json");
    assert_eq!(v["stages"][0]["num_layers"], 41, "VLLM_PP_LAYER_PARTITION is honoured");
}
