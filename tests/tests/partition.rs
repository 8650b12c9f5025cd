//! A network partition, made with a network namespace and a veth pair that this test creates (and
//! removes): the cut-off worker is declared dead after the node timeout, its deployment restarts
//! on another node, and once the link heals the worker learns its generation is stale and stops
//! its old processes. Needs root and `ip netns`; skipped, saying so, elsewhere.

use tessera_proto::v1 as pb;
use tessera_tests::netns::Netns;
use tessera_tests::process::start_head;
use tessera_tests::{Daemon, alive, cluster_client, deployments_client, start_worker_with, wait_state, wait_until};

#[tokio::test]
async fn a_partitioned_worker_is_dead_its_group_moves_and_after_healing_it_stops_the_stale_generation() {
    let ns = match Netns::create("part") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIPPED: this test needs root and `ip netns` to build a partition ({e})");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "0.0.0.0:0", &["--orphan-timeout", "30s"]);
    let port = head.url.rsplit(':').next().expect("port").to_string();
    let _w1 = start_worker_with(dir.path(), "w1", &head.url, &dir.path().join("w1-state"), &[]);
    // w2 lives in the namespace and reaches the head over the veth pair.
    let token_file = dir.path().join("w2.token");
    std::fs::write(&token_file, format!("{}\n", tessera_tests::JOIN_TOKEN)).expect("token");
    let w2_args: Vec<String> = [
        "netns",
        "exec",
        &ns.name,
        &tessera_tests::bin("tessera-worker").display().to_string(),
        "--head",
        &format!("http://{}:{port}", ns.outer_ip),
        "--node-name",
        "w2",
        "--state-dir",
        &dir.path().join("w2-state").display().to_string(),
        "--fake-gpus",
        "4x80GiB",
        "--token-file",
        &token_file.display().to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _w2 = Daemon::spawn_program("w2", "ip", &w2_args, dir.path());

    let mut c = cluster_client(&head.url).await;
    let w2 = wait_state(&mut c, "w2", pb::NodeState::Alive).await;
    assert_eq!(w2.address, ns.inner_ip, "the address the head saw w2 connect from");
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    // Only w2 may take the deployment at first.
    for n in ["head", "w1"] {
        c.drain_node(pb::DrainNodeRequest { node: n.into(), evict: false }).await.expect("drain");
    }
    let mut d = deployments_client(&head.url).await;
    let model = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/model-configs/Llama-3.1-8B-Instruct.json")
        .canonicalize()
        .expect("model");
    d.create(pb::CreateDeploymentRequest {
        name: "split".into(),
        model_path: model.display().to_string(),
        tp: 4,
        pp: 1,
        engine: pb::Engine::Probe as i32,
        ..Default::default()
    })
    .await
    .expect("create");
    let get = |d: &mut pb::deployments_client::DeploymentsClient<tessera_tests::Conn>| {
        let mut d = d.clone();
        async move { d.get(pb::GetDeploymentRequest { name: "split".into() }).await.ok().map(|r| r.into_inner()) }
    };
    let gen1 = wait_until("split running on w2", || {
        let f = get(&mut d);
        async move { f.await.filter(|x| x.state == pb::DeploymentState::Running as i32 && x.generation == 1) }
    })
    .await;
    assert!(gen1.ranks.iter().all(|r| r.node == "w2"));
    let old: Vec<u32> = gen1.ranks.iter().map(|r| r.pid).collect();
    c.undrain_node(pb::DrainNodeRequest { node: "w1".into(), evict: false }).await.expect("undrain");

    let cut_at = std::time::Instant::now();
    ns.cut();
    let dead = wait_state(&mut c, "w2", pb::NodeState::Dead).await;
    let dead_after = cut_at.elapsed();
    assert!(dead.state_reason.contains("no heartbeat"), "silence, not a closed session: {}", dead.state_reason);
    let gen2 = wait_until("split running again on w1", || {
        let f = get(&mut d);
        async move { f.await.filter(|x| x.state == pb::DeploymentState::Running as i32 && x.generation == 2) }
    })
    .await;
    assert!(gen2.ranks.iter().all(|r| r.node == "w1"));
    // Information for BENCHMARKS.md (no assertion on time).
    eprintln!("partition: w2 dead after {dead_after:?}, group running elsewhere after {:?}", cut_at.elapsed());
    assert!(old.iter().all(|&p| alive(p)), "cut off, w2's old ranks still run (they cannot be told)");

    let healed_at = std::time::Instant::now();
    ns.heal();
    wait_state(&mut c, "w2", pb::NodeState::Alive).await;
    wait_until("w2 stops its stale generation once it hears of the new one", || {
        let gone = old.iter().all(|&p| !alive(p));
        async move { gone.then_some(()) }
    })
    .await;
    eprintln!("partition: after healing, w2 stopped its stale generation within {:?}", healed_at.elapsed());
    let now = get(&mut d).await.expect("deployment");
    assert_eq!((now.state, now.generation), (pb::DeploymentState::Running as i32, 2), "{}", now.message);
    assert!(now.ranks.iter().all(|r| r.node == "w1" && alive(r.pid)), "every rank runs once, on w1");
}
