//! Regression tests for the deployment state machine, with the real binaries: each is a bug that
//! was reproduced on the old head (a paused head, a same-name redeploy, a restart that gave its GPUs
//! away, repeated and wrong blame, a phantom `ready`, a second head on one data dir).

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tessera_proto::v1 as pb;
use tessera_tests::deploy::{Cluster, delete_and_wait, probe, running_at, wait_for};
use tessera_tests::{alive, start_head, start_worker_with};

fn signal(pid: u32, s: Signal) {
    kill(Pid::from_raw(pid as i32), s).expect("signal");
}

/// Every deployment event from now on, collected in the background.
async fn deployment_events(url: &str) -> tokio::sync::mpsc::UnboundedReceiver<pb::Event> {
    let mut c = tessera_tests::cluster_client(url).await;
    let mut s = c.watch_events(pb::WatchEventsRequest { include_current: false }).await.expect("watch").into_inner();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(e)) = s.message().await {
            if e.kind == pb::EventKind::DeploymentChanged as i32 && tx.send(e).is_err() {
                return;
            }
        }
    });
    rx
}

fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<pb::Event>) -> Vec<pb::Deployment> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.extend(e.deployment);
    }
    out
}

#[tokio::test]
async fn a_paused_head_declares_no_node_dead_and_restarts_nothing() {
    let cluster = Cluster::start(&[]).await;
    let mut c = cluster.client().await;
    c.create(probe("steady", 4, 2)).await.expect("create");
    let d = wait_for(&c, "steady", "running", running_at(1)).await;
    let pids: Vec<u32> = d.ranks.iter().map(|r| r.pid).collect();
    let mut nodes = tessera_tests::cluster_client(&cluster.head.url).await;
    let mut w =
        nodes.watch_events(pb::WatchEventsRequest { include_current: false }).await.expect("watch").into_inner();

    // A frozen VM or a stalled disk: the head does not run for twice the node timeout (3 s).
    cluster.head.daemon.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.head.daemon.signal(Signal::SIGCONT);
    // Long enough for any wrong verdict to come out: the node timeout and the reconnect grace.
    let window = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(window);
    let mut dead = Vec::new();
    loop {
        tokio::select! {
            _ = &mut window => break,
            e = w.message() => match e {
                Ok(Some(e)) => {
                    if let Some(n) = e.node.filter(|n| n.state == pb::NodeState::Dead as i32) {
                        dead.push(n.name);
                    }
                }
                _ => break,
            },
        }
    }
    assert!(dead.is_empty(), "nodes declared dead after the head's own pause: {dead:?}");
    let d = c.get(pb::GetDeploymentRequest { name: "steady".into() }).await.expect("get").into_inner();
    assert_eq!((d.state, d.generation, d.restarts), (pb::DeploymentState::Running as i32, 1, 0), "{}", d.message);
    let after: Vec<u32> = d.ranks.iter().map(|r| r.pid).collect();
    assert_eq!(after, pids, "the same engine processes");
    assert!(pids.iter().all(|&p| alive(p)));
}

#[tokio::test]
async fn a_deployment_deleted_and_created_again_under_its_name_runs() {
    let cluster = Cluster::start(&[]).await;
    let mut c = cluster.client().await;
    c.create(probe("again", 4, 2)).await.expect("create");
    let first = wait_for(&c, "again", "running", running_at(1)).await;
    delete_and_wait(&c, "again").await;
    c.create(probe("again", 4, 2)).await.expect("create again");
    let second = wait_for(&c, "again", "running again, generation 1 of a new incarnation", running_at(1)).await;
    assert_ne!(first.uid, second.uid);
    assert!(second.ranks.iter().all(|r| r.pid > 0 && alive(r.pid)));

    // A rank past u32 is not rank 0.
    let e = c
        .logs(pb::LogsRequest { name: "again".into(), rank: 1 << 32, ..Default::default() })
        .await
        .expect_err("no rank 4294967296");
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
}

#[tokio::test]
async fn a_group_restart_keeps_its_gpus_from_a_pending_deployment() {
    let cluster = Cluster::start(&[]).await;
    let mut c = cluster.client().await;
    c.create(probe("p1", 4, 2)).await.expect("create p1");
    let d = wait_for(&c, "p1", "running", running_at(1)).await;
    let p2 = c.create(probe("p2", 4, 2)).await.expect("p2 accepted as pending").into_inner();
    assert_eq!(p2.state, pb::DeploymentState::Pending as i32, "{}", p2.message);
    signal(d.ranks[5].pid, Signal::SIGKILL);
    wait_for(&c, "p1", "p1 running again at generation 2", running_at(2)).await;
    let p2 = c.get(pb::GetDeploymentRequest { name: "p2".into() }).await.expect("get").into_inner();
    assert_eq!((p2.state, p2.generation), (pb::DeploymentState::Pending as i32, 0), "p2 never took p1's GPUs");
}

#[tokio::test]
async fn a_killed_rank_is_blamed_in_one_event_with_its_signal() {
    let cluster = Cluster::start(&[]).await;
    let mut c = cluster.client().await;
    c.create(probe("blame", 4, 2)).await.expect("create");
    let d = wait_for(&c, "blame", "running", running_at(1)).await;
    let mut events = deployment_events(&cluster.head.url).await;
    signal(d.ranks[7].pid, Signal::SIGKILL);
    wait_for(&c, "blame", "running at generation 2", running_at(2)).await;
    // Let late exit reports of generation 1 arrive: they must not make events of their own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = drain(&mut events);
    let of = |s: pb::DeploymentState| seen.iter().filter(|d| d.state == s as i32).collect::<Vec<_>>();
    let restarting = of(pb::DeploymentState::Restarting);
    assert_eq!(restarting.len(), 1, "one event for one group restart: {seen:#?}");
    assert!(
        restarting[0].message.starts_with("rank 7 (rank-7 on ") && restarting[0].message.contains("killed by signal 9"),
        "the killed rank is blamed: {}\n{}",
        restarting[0].message,
        cluster.head.daemon.log_text()
    );
    assert_eq!(of(pb::DeploymentState::Starting).len(), 1, "{seen:#?}");
    assert_eq!(of(pb::DeploymentState::Running).len(), 1, "{seen:#?}");
}

#[tokio::test]
async fn a_worker_restarted_without_its_state_dir_restarts_the_group_instead_of_showing_ready() {
    let mut cluster = Cluster::start(&[]).await;
    let mut c = cluster.client().await;
    c.create(probe("phantom", 4, 2)).await.expect("create");
    let d = wait_for(&c, "phantom", "running", running_at(1)).await;
    let victim = d.ranks[4].node.clone();
    let idx = if victim == "w1" { 0 } else { 1 };
    let state = cluster.dir.path().join(format!("{victim}-state"));
    cluster.workers[idx].signal(Signal::SIGKILL);
    cluster.workers[idx].wait();
    std::fs::remove_dir_all(&state).expect("remove the state dir");
    cluster.workers[idx] =
        start_worker_with(cluster.dir.path(), &victim, &cluster.head.url, &state, &["--orphan-timeout", "3s"]);
    let d2 = wait_for(&c, "phantom", "running at generation 2", running_at(2)).await;
    assert!(d2.ranks.iter().all(|r| r.pid > 0 && alive(r.pid)), "every rank shown is a live process: {d2:#?}");
}

#[tokio::test]
async fn a_second_head_on_a_data_dir_in_use_is_refused_and_touches_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let first = start_head(dir.path(), "head", "127.0.0.1:0", &["--metrics-listen", "127.0.0.1:0"]);
    let files = |name: &str| std::fs::read_to_string(first.data_dir.join(name)).unwrap_or_default();
    let before = (files("head.addr"), files("metrics.addr"), files("admin.token"));
    let out = std::process::Command::new(tessera_tests::bin("tessera-head"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&first.data_dir)
        .output()
        .expect("run a second head");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let pid = first.daemon.pid().as_raw();
    assert!(text.contains(&format!("is in use by pid {pid}")), "{text}");
    assert!(!text.contains("move it aside"), "{text}");
    assert_eq!((files("head.addr"), files("metrics.addr"), files("admin.token")), before, "nothing was touched");
}

#[tokio::test]
async fn a_damaged_store_stops_the_head_with_the_way_out_and_reset_state_takes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let data = dir.path().join("head");
    tessera_tests::write_tokens(&data);
    std::fs::write(data.join("state.redb"), b"").expect("a 0-byte store");
    let run = |extra: &[&str]| {
        std::process::Command::new(tessera_tests::bin("tessera-head"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--no-worker", "--data-dir"])
            .arg(&data)
            .args(extra)
            .output()
            .expect("run the head")
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1), "a clear error, not a panic (101)");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("state.redb") && text.contains("empty (0 bytes)") && text.contains("--reset-state"),
        "{text}"
    );
    // With --reset-state the file goes aside and the head starts.
    let mut head = tessera_tests::Daemon::spawn(
        "head",
        "tessera-head",
        &["--listen", "127.0.0.1:0", "--no-worker", "--reset-state", "--data-dir", &data.display().to_string()]
            .map(String::from),
        dir.path(),
    );
    tessera_tests::wait_until("the head serves", || {
        let ok = data.join("head.addr").exists();
        async move { ok.then_some(()) }
    })
    .await;
    let aside = std::fs::read_dir(&data)
        .expect("data dir")
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("state.redb.reset-"));
    assert!(aside, "the damaged file was kept aside");
    head.signal(Signal::SIGTERM);
    head.wait();
}
