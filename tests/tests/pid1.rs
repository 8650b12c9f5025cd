//! The worker as PID 1 of a new PID namespace (as in a container): it reaps orphans it inherits,
//! and on SIGTERM stops its shards before it exits. Needs root and `unshare`; skipped elsewhere.

use std::process::Command;

use tessera_proto::v1 as pb;
use tessera_tests::process::start_head;
use tessera_tests::{
    Daemon, cluster_client, deployments_client, environ_has, in_proc, pids_with, wait_state, wait_until,
};

#[tokio::test]
async fn as_pid_1_the_worker_reaps_orphans_and_stops_its_shards_on_sigterm() {
    let probe = Command::new("unshare").args(["--pid", "--fork", "--mount-proc", "true"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: needs root and `unshare --pid` ({probe:?})");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let state = dir.path().join("pid1-state");
    let state_s = state.display().to_string();
    let token = dir.path().join("join.token");
    std::fs::write(&token, format!("{}\n", tessera_tests::JOIN_TOKEN)).expect("token");
    let args: Vec<String> = [
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child=SIGTERM",
        &tessera_tests::bin("tessera-worker").display().to_string(),
        "--head",
        &head.url,
        "--node-name",
        "boxed",
        "--state-dir",
        &state_s,
        "--fake-gpus",
        "2x80GiB",
        "--token-file",
        &token.display().to_string(),
        "--allow-command",
        "--metrics-listen",
        "127.0.0.1:0",
        "--orphan-timeout",
        "60s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _unshare = Daemon::spawn_program("boxed", "unshare", &args, dir.path());
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "boxed", pb::NodeState::Alive).await;
    let worker_pid = *pids_with(&["tessera-worker", &state_s])
        .iter()
        .find(|&&p| !std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default().starts_with("unshare"))
        .expect("the worker's host pid");
    c.drain_node(pb::DrainNodeRequest { node: "head".into(), evict: false }).await.expect("drain the head");

    let mut d = deployments_client(&head.url).await;
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/model-configs/Llama-3.1-8B-Instruct.json");
    d.create(pb::CreateDeploymentRequest {
        name: "boxed".into(),
        model_path: std::fs::canonicalize(model).expect("model").display().to_string(),
        engine: pb::Engine::Command as i32,
        command: "sleep 1000 & wait".into(),
        max_restarts: -1,
        ..Default::default()
    })
    .await
    .expect("create");
    let engines = wait_until("the engine runs inside the namespace", || {
        let p: Vec<u32> = pids_with(&["sleep 1000"]).into_iter().filter(|&p| environ_has(p, &state_s)).collect();
        async move { (!p.is_empty()).then_some(p) }
    })
    .await;

    // Orphans: kill the shim; its engine is re-parented to PID 1 (the worker). When the engine
    // dies, the worker must reap it, or it stays a zombie in the process table.
    for s in pids_with(&["shim --dir", &state_s]) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(s as i32), nix::sys::signal::Signal::SIGKILL)
            .expect("kill shim");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    for &p in &engines {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::Signal::SIGKILL);
    }
    wait_until("the orphans were reaped, not left as zombies", || {
        let gone = engines.iter().all(|&p| !in_proc(p));
        async move { gone.then_some(()) }
    })
    .await;

    // A new deployment's engine, then SIGTERM to the worker: the engine goes with it.
    d.create(pb::CreateDeploymentRequest {
        name: "second".into(),
        model_path: std::fs::canonicalize(model).expect("model").display().to_string(),
        engine: pb::Engine::Command as i32,
        command: "sleep 1000 & wait".into(),
        ..Default::default()
    })
    .await
    .expect("create");
    let second = wait_until("the second engine runs", || {
        let p: Vec<u32> = pids_with(&["sleep 1000"]).into_iter().filter(|&p| environ_has(p, &state_s)).collect();
        async move { (!p.is_empty()).then_some(p) }
    })
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker_pid as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    wait_until("the worker stopped its shards and exited", || {
        let done = !in_proc(worker_pid) && second.iter().all(|&p| !in_proc(p));
        async move { done.then_some(()) }
    })
    .await;
}
