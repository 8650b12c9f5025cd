//! What an engine and a local user can reach, with the real binaries: engines get a clean
//! environment (no token of the daemon), hook variables are refused, engines can run as another
//! user, and the daemons' secrets are their user's alone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tessera_proto::v1 as pb;
use tessera_tests::deploy::{Cluster, probe, running_at, wait_for};
use tessera_tests::process::{Daemon, start_head};
use tessera_tests::{JOIN_TOKEN, cluster_client, wait_state};

fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    raw.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).to_string()).collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

#[tokio::test]
async fn engines_get_a_clean_environment_without_the_workers_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let args: Vec<String> = ["--head", &head.url, "--node-name", "w1", "--fake-gpus", "4x80GiB", "--state-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().join("w1-state").display().to_string()])
        .collect();
    let env = [
        ("TESSERA_TOKEN", JOIN_TOKEN.to_string()),
        ("SOME_DAEMON_SECRET", "do-not-leak".to_string()),
        ("CUDA_CACHE_PATH", "/tmp/cuda-cache".to_string()),
    ];
    let _w1 = Daemon::spawn_env("w1", "tessera-worker", &args, &env, dir.path());
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    let mut deps = tessera_tests::deployments_client(&head.url).await;
    deps.create(probe("clean", 4, 2)).await.expect("create");
    let d = wait_for(&deps, "clean", "running", running_at(1)).await;
    let rank = d.ranks.iter().find(|r| r.node == "w1").expect("a rank on w1");
    let env = environ(rank.pid);
    assert!(!env.iter().any(|v| v.starts_with("TESSERA_TOKEN=")), "the join token reached the engine: {env:?}");
    assert!(!env.iter().any(|v| v.starts_with("SOME_DAEMON_SECRET=")), "{env:?}");
    assert!(env.iter().any(|v| v == "CUDA_CACHE_PATH=/tmp/cuda-cache"), "allowlisted variables pass: {env:?}");
    assert!(env.iter().any(|v| v == "TESSERA_DEPLOYMENT=clean"), "Tessera's own variables are set: {env:?}");
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", rank.pid)).expect("cwd");
    assert!(!cwd.starts_with(dir.path()), "the engine does not start in a daemon dir: {}", cwd.display());

    // Secrets on disk are the daemon user's alone.
    assert_eq!(mode(&head.data_dir), 0o700);
    assert_eq!(mode(&head.data_dir.join("state.redb")), 0o600);
    assert_eq!(mode(&dir.path().join("w1-state")), 0o700);
    let shards = dir.path().join("w1-state/shards/clean");
    let generation = std::fs::read_dir(&shards).expect("generation dirs").next().expect("one").expect("entry").path();
    let proc_dir = std::fs::read_dir(&generation).expect("process dirs").next().expect("one").expect("entry").path();
    for f in ["spec.json", "output.log", "state.json"] {
        assert_eq!(mode(&proc_dir.join(f)), 0o600, "{f}");
    }
}

#[tokio::test]
async fn env_that_hooks_an_interpreter_is_refused_without_allow_command() {
    let cluster = Cluster::start(&[]).await;
    let c = cluster.client().await;
    let mut req = probe("hooked", 1, 1);
    req.env.insert("PYTHONWARNINGS".into(), "ignore::antigravity.x".into());
    req.env.insert("BROWSER".into(), "/bin/sh -c 'id > /tmp/pwned' #%s".into());
    req.max_restarts = -1;
    let mut cl = c.clone();
    cl.create(req).await.expect("create");
    let d = wait_for(&c, "hooked", "failed", |d| d.state == pb::DeploymentState::Failed as i32).await;
    assert!(
        d.message.contains("env BROWSER, PYTHONWARNINGS can make the engine run other code")
            && d.message.contains("--allow-command"),
        "{}",
        d.message
    );
}

#[tokio::test]
async fn engines_run_as_the_engine_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: --engine-user needs root (CI runs as root)");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").expect("passwd").expect("a nobody user");
    let cluster = Cluster::start(&["--engine-user", "nobody"]).await;
    let mut c = cluster.client().await;
    c.create(probe("unprivileged", 4, 2)).await.expect("create");
    let d = wait_for(&c, "unprivileged", "running as nobody", |d| {
        assert_ne!(d.state, pb::DeploymentState::Failed as i32, "{}", d.message);
        running_at(1)(d)
    })
    .await;
    for r in &d.ranks {
        let status = std::fs::read_to_string(format!("/proc/{}/status", r.pid)).expect("status");
        let uid = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid line");
        assert!(uid.split_whitespace().nth(1) == Some(&nobody.uid.to_string()), "rank {}: {uid}", r.rank);
    }
    // What a compromised engine could try: the head's admin token is not readable as nobody.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid", &nobody.uid.to_string(), "--regid", &nobody.gid.to_string(), "--clear-groups", "cat"])
        .arg(cluster.head.data_dir.join("admin.token"))
        .output()
        .expect("setpriv (util-linux, which .ci/run installs)");
    assert!(!out.status.success(), "nobody read the admin token: {}", String::from_utf8_lossy(&out.stdout));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

type RawSession = (tokio::sync::mpsc::Sender<pb::WorkerMessage>, tonic::Streaming<pb::HeadMessage>, pb::Joined);

/// Opens a raw membership session with the join token, as any holder of it could.
async fn raw_session(url: &str, join: pb::JoinRequest) -> Result<RawSession, tonic::Status> {
    raw_session_with(url, JOIN_TOKEN, join).await
}

async fn raw_session_with(url: &str, token: &str, join: pb::JoinRequest) -> Result<RawSession, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Join(join)) }).await.expect("queue join");
    let conn = tessera_tests::conn_with(url, Some(token)).await;
    let mut c = pb::membership_client::MembershipClient::new(conn);
    let mut inbound = c.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(pb::HeadMessage { msg: Some(pb::head_message::Msg::Joined(j)) }) => Ok((tx, inbound, j)),
        other => panic!("expected joined, got {other:?}"),
    }
}

#[tokio::test]
async fn a_join_token_holder_can_neither_take_over_a_node_nor_forge_its_reports() {
    let cluster = Cluster::start(&[]).await;
    let mut c = cluster.client().await;
    c.create(probe("target", 4, 2)).await.expect("create");
    let d = wait_for(&c, "target", "running", running_at(1)).await;
    let victim = d.ranks[4].node.clone();
    let victim_id = d.ranks[4].node_id.clone();

    // The victim's name and id, even with a guessed fingerprint: refused, nothing revealed.
    let takeover = pb::JoinRequest {
        node_id: victim_id.clone(),
        name: victim.clone(),
        machine_fingerprint: "guess".into(),
        ..Default::default()
    };
    let e = raw_session(&cluster.head.url, takeover).await.expect_err("takeover refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    assert!(!e.message().contains(&cluster.dir.path().display().to_string()), "no fingerprint in: {}", e.message());

    // A node of its own (it may join): its reports about other nodes' processes count for nothing.
    let evil = pb::JoinRequest { name: "evil".into(), machine_fingerprint: "evil".into(), ..Default::default() };
    let (tx, _inbound, joined) = raw_session(&cluster.head.url, evil).await.expect("a new node may join");
    assert!(!joined.node_secret.is_empty(), "it gets its own credential");
    for key in ["rank-0", "rank-4"] {
        let forged = pb::ShardReport {
            deployment: "target".into(),
            deployment_uid: d.uid.clone(),
            generation: 1,
            key: key.into(),
            state: pb::ProcessState::Exited as i32,
            exit_code: Some(1),
            error: "forged".into(),
            ..Default::default()
        };
        tx.send(pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Shard(forged)) }).await.expect("send");
    }
    // The victim's own session was never replaced, and the forged exits changed nothing.
    let mut nodes = tessera_tests::cluster_client(&cluster.head.url).await;
    let listed = tessera_tests::list_nodes(&mut nodes).await;
    let v = tessera_tests::node(&listed, &victim).expect("victim listed");
    assert_eq!(tessera_tests::state(v), pb::NodeState::Alive);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let after = c.get(pb::GetDeploymentRequest { name: "target".into() }).await.expect("get").into_inner();
    assert_eq!(
        (after.state, after.generation, after.restarts),
        (pb::DeploymentState::Running as i32, 1, 0),
        "{}",
        after.message
    );
}

#[tokio::test]
async fn a_rotated_join_token_stops_joining_new_nodes_and_joined_nodes_keep_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let state = dir.path().join("w1-state");
    let mut w1 = tessera_tests::start_worker_in(dir.path(), "w1", &head.url, &state);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    let out = std::process::Command::new(tessera_tests::bin("tessera"))
        .args(["--head", &head.url, "tokens", "rotate-join"])
        .env("TESSERA_TOKEN_FILE", head.data_dir.join("admin.token"))
        .output()
        .expect("run tessera");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fresh = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(fresh.starts_with("tsj_") && fresh != JOIN_TOKEN);
    let on_disk = std::fs::read_to_string(head.data_dir.join("join.token")).expect("join.token");
    assert_eq!(on_disk.trim(), fresh, "written where the head reads it at its next start");
    // The old token joins nobody new.
    let newcomer = pb::JoinRequest { name: "late".into(), machine_fingerprint: "late".into(), ..Default::default() };
    let e = raw_session(&head.url, newcomer).await.expect_err("old join token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
    // w1 (its token file still holds the old token) restarts and rejoins with its own credential.
    w1.signal(nix::sys::signal::Signal::SIGKILL);
    w1.wait();
    let _w1 = tessera_tests::start_worker_in(dir.path(), "w1", &head.url, &state);
    tessera_tests::wait_until("w1 back with its credential", || {
        let mut c = c.clone();
        async move {
            let nodes = tessera_tests::list_nodes(&mut c).await;
            let w = tessera_tests::node(&nodes, "w1")?;
            (tessera_tests::state(w) == pb::NodeState::Alive && w.state_reason == "rejoined").then_some(())
        }
    })
    .await;
    // A node credential opens only its own node's session.
    let secret = std::fs::read_to_string(state.join("node.secret")).expect("node.secret").trim().to_string();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let other = pb::JoinRequest { name: "other".into(), machine_fingerprint: "other".into(), ..Default::default() };
    tx.send(pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Join(other)) }).await.expect("queue");
    let conn = tessera_tests::conn_with(&head.url, Some(&secret)).await;
    let mut m = pb::membership_client::MembershipClient::new(conn);
    let e = m.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect_err("not its node");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
}

#[tokio::test]
async fn a_bootstrap_token_joins_as_many_nodes_as_it_may_while_it_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &["--no-worker"]);
    let create = |ttl: &str, uses: &str| {
        let out = std::process::Command::new(tessera_tests::bin("tessera"))
            .args(["--head", &head.url, "tokens", "create", "--ttl", ttl, "--uses", uses])
            .env("TESSERA_TOKEN_FILE", head.data_dir.join("admin.token"))
            .output()
            .expect("run tessera");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let join =
        |name: &str| pb::JoinRequest { name: name.into(), machine_fingerprint: name.into(), ..Default::default() };
    let token = create("1h", "2");
    assert!(token.starts_with("tsb_"), "{token}");
    let _a = raw_session_with(&head.url, &token, join("a")).await.expect("first use");
    let _b = raw_session_with(&head.url, &token, join("b")).await.expect("second use");
    let e = raw_session_with(&head.url, &token, join("c")).await.expect_err("no uses left");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
    // It never opens anything but a membership session.
    let mut admin = pb::cluster_client::ClusterClient::new(tessera_tests::conn_with(&head.url, Some(&token)).await);
    assert!(admin.list_nodes(pb::ListNodesRequest::default()).await.is_err());
    // Expired is expired.
    let short = create("1s", "5");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let e = raw_session_with(&head.url, &short, join("d")).await.expect_err("expired");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{}", e.message());
}

#[tokio::test]
async fn another_session_can_neither_write_into_nor_end_an_admins_log_stream() {
    let cluster = Cluster::start(&[]).await;
    let mut c = cluster.client().await;
    c.create(probe("logged", 4, 2)).await.expect("create");
    wait_for(&c, "logged", "running", running_at(1)).await;
    // The admin follows rank 4's log (on a worker).
    let mut stream = c
        .logs(pb::LogsRequest { name: "logged".into(), rank: 4, tail: 5, follow: true, replica: 0, generation: 0 })
        .await
        .expect("logs")
        .into_inner();
    let first = stream.message().await.expect("log data").expect("some data");
    assert!(!first.data.is_empty());

    // A node of its own sends log data for every id a sequential scheme would have used (and
    // some), each ending its stream.
    let evil = pb::JoinRequest { name: "evil".into(), machine_fingerprint: "evil".into(), ..Default::default() };
    let (tx, _inbound, _) = raw_session(&cluster.head.url, evil).await.expect("a new node may join");
    for request_id in 0..2000u64 {
        let data = pb::LogData { request_id, data: b"INJECTED\n".to_vec(), done: true, error: String::new() };
        tx.send(pb::WorkerMessage { msg: Some(pb::worker_message::Msg::LogData(data)) }).await.expect("send");
    }
    // The stream is neither written into nor ended: within 2 s it gives only real data, or none.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while let Ok(m) = tokio::time::timeout_at(deadline, stream.message()).await {
        let chunk = m.expect("the stream is not failed").expect("the stream is not ended");
        assert!(!String::from_utf8_lossy(&chunk.data).contains("INJECTED"), "injected into the admin's log");
    }
}
