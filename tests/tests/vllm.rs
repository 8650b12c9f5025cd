//! Real vLLM under Tessera: the CPU build of vLLM (installed by `tests/vllm/install.sh`, cached in
//! `~/.cache/tessera/vllm-cpu`, or `TESSERA_VLLM_VENV`) serving a tiny random Llama made locally
//! (`tests/vllm/make_tiny_model.py`). Same multi-node launch as on GPU nodes, gloo instead of NCCL.
//!
//! - TP 1 x PP 2 on a head and a worker in a network namespace the test creates (so
//!   `VLLM_HOST_IP`, GLOO_SOCKET_IFNAME and the rendezvous cross a real interface; loopback when
//!   namespaces cannot be made): greedy completions equal a single-node vLLM's for the same prompt;
//!   `kill -9` of a rank -> answering again at the next generation; SIGSTOP of a rank (a hang
//!   `/health` does not show) -> the liveness checks restart the group, answering again;
//!   `delete` -> no process left.
//! - TP 2 x PP 1 on one node with two fake GPUs: the same answer.
//!
//! A vLLM start takes 1-2 minutes on 2 cores: these tests run one at a time and share one
//! single-node reference answer.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tessera_proto::v1 as pb;
use tessera_tests::deploy::{Client, running_at, wait_for_within};
use tessera_tests::netns::Netns;
use tessera_tests::process::start_head;
use tessera_tests::vllm::{ENGINE_ARGS, PROMPT, complete, cpu_env, endpoint, tree, vllm};
use tessera_tests::{Daemon, deployments_client, pids_with, wait_until};
use tessera_worker::shard::http;

/// How long one vLLM generation may take to get ready here (2 cores, other tests done).
const START: Duration = Duration::from_secs(600);

/// One real-vLLM test at a time: each needs both cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static REFERENCE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

/// The same completion from one `vllm serve` started by hand (no Tessera): the reference.
async fn reference(dir: &Path) -> String {
    REFERENCE
        .get_or_init(|| async {
            let v = vllm();
            let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
            let mut args = vec!["serve".to_string(), v.model.display().to_string(), "--port".into(), port.to_string()];
            args.extend(ENGINE_ARGS.iter().map(|s| s.to_string()));
            let mut cmd = Command::new(&v.bin);
            cmd.args(&args).envs(cpu_env()).stdin(std::process::Stdio::null());
            let log = dir.join("reference.log");
            let out = std::fs::File::create(&log).expect("log");
            cmd.stdout(out.try_clone().expect("log")).stderr(out);
            let mut child = cmd.spawn().expect("start the reference vllm");
            let deadline = tokio::time::Instant::now() + START;
            while http::health("", port, Duration::from_secs(2)).await.is_err() {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!("the reference vLLM exited ({st}):\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                }
                assert!(tokio::time::Instant::now() < deadline, "the reference vLLM did not start");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let text = complete("", port, &v.model.display().to_string()).await.expect("reference completion");
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
            text
        })
        .await
        .clone()
}

fn create(name: &str, tp: u32, pp: u32) -> pb::CreateDeploymentRequest {
    create_of(name, &vllm().model, tp, pp)
}

fn create_of(name: &str, model: &Path, tp: u32, pp: u32) -> pb::CreateDeploymentRequest {
    pb::CreateDeploymentRequest {
        name: name.into(),
        model_path: model.display().to_string(),
        tp,
        pp,
        engine: pb::Engine::Vllm as i32,
        engine_args: ENGINE_ARGS.iter().map(|s| s.to_string()).collect(),
        env: cpu_env().into_iter().collect(),
        stall_timeout_s: 10,
        canary_interval_s: 10,
        ..Default::default()
    }
}

/// Asks until the deployment answers (a just-ready server may still be warming up).
async fn answer(d: &pb::Deployment) -> String {
    let (h, p) = endpoint(d);
    let model = d.model_path.clone();
    let mut last = String::new();
    for _ in 0..20 {
        match complete(&h, p, &model).await {
            Ok(t) => return t,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("{} at generation {} does not answer: {last}", d.name, d.generation);
}

/// The events of one deployment, collected in the background.
fn collect_events(url: String, name: &'static str) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let mut c = tessera_tests::cluster_client(&url).await;
        let Ok(s) = c.watch_events(pb::WatchEventsRequest { include_current: false }).await else { return };
        let mut s = s.into_inner();
        while let Ok(Some(e)) = s.message().await {
            if let Some(d) = e.deployment.filter(|d| d.name == name) {
                out.lock().expect("lock").push(d.message);
            }
        }
    });
    seen
}

#[tokio::test]
async fn pp2_across_two_nodes_answers_like_one_node_and_survives_kill_and_hang() {
    let _one = SERIAL.lock().await;
    let v = vllm();
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let expected = reference(dir.path()).await;
    let vllm_bin = v.bin.display().to_string();

    // The worker in its own network namespace when the test can make one; else on loopback.
    let ns = Netns::create("vllm").map_err(|e| eprintln!("no network namespace ({e}): both nodes on loopback")).ok();
    let advertise = ns.as_ref().map(|n| n.outer_ip.clone()).unwrap_or_else(|| "127.0.0.1".into());
    let head = start_head(
        dir.path(),
        "head",
        "0.0.0.0:0",
        &["--fake-gpus", "1x80GiB", "--vllm-bin", &vllm_bin, "--advertise-addr", &advertise],
    );
    let port = head.url.rsplit(':').next().expect("port").to_string();
    let token = dir.path().join("w1.token");
    std::fs::write(&token, format!("{}\n", tessera_tests::JOIN_TOKEN)).expect("token");
    let worker: Vec<String> = [
        tessera_tests::bin("tessera-worker").display().to_string(),
        "--head".into(),
        format!("http://{advertise}:{port}"),
        "--node-name".into(),
        "w1".into(),
        "--state-dir".into(),
        dir.path().join("w1-state").display().to_string(),
        "--fake-gpus".into(),
        "1x80GiB".into(),
        "--token-file".into(),
        token.display().to_string(),
        "--vllm-bin".into(),
        vllm_bin.clone(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
    ]
    .into();
    let _w1 = match &ns {
        Some(n) => {
            let mut args: Vec<String> = ["netns", "exec", &n.name].iter().map(|s| s.to_string()).collect();
            args.extend(worker);
            Daemon::spawn_program("w1", "ip", &args, dir.path())
        }
        None => Daemon::spawn_program("w1", &worker[0], &worker[1..], dir.path()),
    };
    let mut cl = tessera_tests::cluster_client(&head.url).await;
    let w1 = tessera_tests::wait_state(&mut cl, "w1", pb::NodeState::Alive).await;
    let caps = w1.capabilities.clone().expect("the worker says what it can run");
    assert!(caps.vllm_version.starts_with("0."), "vLLM's version: {caps:?}");
    if let Some(n) = &ns {
        assert_eq!(w1.address, n.inner_ip, "w1 reached the head over the veth pair");
    }

    let events = collect_events(head.url.clone(), "pp2");
    let c: Client = deployments_client(&head.url).await;
    // The model in five shards, on the head only: staging gives w1 (stage 1) only the files
    // holding its layers, the output head and the final norm.
    c.clone().create(create_of("pp2", &v.sharded, 1, 2)).await.expect("create");
    let g1 = wait_for_within(&c, "pp2", "running at generation 1", START, running_at(1)).await;
    assert!(g1.ranks.iter().any(|r| r.node == "head") && g1.ranks.iter().any(|r| r.node == "w1"), "{g1:?}");
    let staged = std::fs::read_dir(dir.path().join("w1-state/cache/models"))
        .expect("w1's model cache")
        .next()
        .expect("a staged model")
        .expect("entry")
        .path();
    let shards = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .expect("dir")
            .map(|e| e.expect("e").file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        v.sort();
        v
    };
    let (mine, all) = (shards(&staged), shards(&v.sharded));
    assert!(!mine.is_empty() && mine.len() < all.len(), "w1 holds only its stage's shards: {mine:?} of {all:?}");
    let w1_rank = g1.ranks.iter().find(|r| r.node == "w1").expect("rank on w1").pid;
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{w1_rank}/cmdline")).expect("cmdline"))
        .replace('\0', " ");
    assert!(cmdline.contains(&staged.display().to_string()), "w1's vLLM loads the staged directory: {cmdline}");
    assert_eq!(endpoint(&g1).0, advertise, "the endpoint is node rank 0's address");
    assert_eq!(answer(&g1).await, expected, "PP 2 across two nodes answers like one node");
    if let Some(n) = &ns {
        // The rendezvous crossed the veth pair: node 1's engine bound its interface.
        let rank1 = g1.ranks.iter().find(|r| r.node == "w1").expect("rank on w1").pid;
        let env = std::fs::read(format!("/proc/{rank1}/environ")).expect("environ");
        let env = String::from_utf8_lossy(&env);
        assert!(env.contains(&format!("VLLM_HOST_IP={}", n.inner_ip)), "{env}");
        assert!(env.contains("GLOO_SOCKET_IFNAME=tsvllmb"), "{env}");
    }

    // kill -9 of the headless rank: the group restarts and answers again.
    let rank1 = g1.ranks.iter().find(|r| r.node == "w1").expect("rank on w1").pid;
    kill(Pid::from_raw(rank1 as i32), Signal::SIGKILL).expect("kill -9");
    let g2 = wait_for_within(&c, "pp2", "running at generation 2", START, running_at(2)).await;
    assert_eq!(answer(&g2).await, expected, "answers again after kill -9");

    // SIGSTOP of the headless rank's whole process tree: /health stays 200, requests hang; the
    // liveness checks see it and restart the group.
    let rank1 = g2.ranks.iter().find(|r| r.node == "w1").expect("rank on w1").pid;
    let stopped = tree(rank1);
    for p in &stopped {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGSTOP);
    }
    let (h, p) = endpoint(&g2);
    assert_eq!(http::health(&h, p, Duration::from_secs(5)).await, Ok(()), "/health does not show the hang");
    let g3 = wait_for_within(&c, "pp2", "running at generation 3", START, running_at(3)).await;
    let said = events.lock().expect("lock").clone();
    assert!(
        said.iter().any(|m| m.contains("unhealthy") && m.contains("--stall-timeout")),
        "the restart names the failed check: {said:#?}"
    );
    assert!(stopped.iter().all(|p| !tessera_tests::alive(*p)), "the hung processes are gone");
    assert_eq!(answer(&g3).await, expected, "answers again after a hang");

    // delete: nothing of it is left on either node.
    tessera_tests::deploy::delete_and_wait(&c, "pp2").await;
    let (model, cache) = (v.sharded.display().to_string(), dir.path().display().to_string());
    wait_until("no vllm process left", || async {
        (pids_with(&["vllm", "serve", &model]).is_empty() && pids_with(&["vllm", "serve", &cache]).is_empty())
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn tp2_on_one_node_answers_like_one_rank() {
    let _one = SERIAL.lock().await;
    let v = vllm();
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let expected = reference(dir.path()).await;
    let vllm_bin = v.bin.display().to_string();
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &["--fake-gpus", "2x80GiB", "--vllm-bin", &vllm_bin]);
    let c: Client = deployments_client(&head.url).await;
    // A flag Tessera owns is refused, naming the option to use instead.
    let mut bad = create("tp2", 1, 1);
    bad.engine_args.extend(["--tensor-parallel-size".into(), "2".into()]);
    let e = c.clone().create(bad).await.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("--tensor-parallel-size is set by Tessera") && e.message().contains("--tp N"),
        "{e:?}"
    );

    c.clone().create(create("tp2", 2, 1)).await.expect("create");
    let d = wait_for_within(&c, "tp2", "running at generation 1", START, running_at(1)).await;
    assert_eq!(d.ranks.len(), 2);
    let pid = d.ranks[0].pid;
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline")).replace('\0', " ");
    for planned in [
        "--tensor-parallel-size 2",
        "--gpu-memory-utilization 0.92",
        "--max-model-len 512",
        "--distributed-executor-backend mp",
    ] {
        assert!(cmdline.contains(planned), "what was planned is passed: {planned} in {cmdline}");
    }
    assert_eq!(answer(&d).await, expected, "TP 2 answers like one rank");

    // Through the gateway, by the deployment's name (Tessera adds it to vLLM's served names):
    // the same answer, and a stream passed through to its end.
    let (_gw, addr) = tessera_tests::process::start_gateway(dir.path(), "gateway", &head, &[]);
    let (gh, gp) = addr.rsplit_once(':').expect("host:port");
    let gp: u16 = gp.parse().expect("port");
    let via_gateway = wait_until("the gateway serves tp2", || async move { complete(gh, gp, "tp2").await.ok() }).await;
    assert_eq!(via_gateway, expected, "the gateway passes vLLM's answer on");
    let body = serde_json::json!({"model": "tp2", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": true});
    let (code, sse) = http::call(gh, gp, "POST", "/v1/completions", Some(body.to_string()), Duration::from_secs(120))
        .await
        .expect("streamed through the gateway");
    assert_eq!(code, 200, "{sse}");
    assert!(sse.starts_with("data: ") && sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    tessera_tests::deploy::delete_and_wait(&c, "tp2").await;
    let model = v.model.display().to_string();
    wait_until("no vllm process left", || async { pids_with(&["vllm", "serve", &model]).is_empty().then_some(()) })
        .await;
}
