//! `tessera-bench`: measures what BENCHMARKS.md reports, with the real release binaries.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p tessera-tests --bin tessera-bench -- failure --runs 10
//! cargo run --release -p tessera-tests --bin tessera-bench -- idle-rss
//! cargo run --release -p tessera-tests --bin tessera-bench -- plan --runs 20
//! cargo run --release -p tessera-tests --bin tessera-bench -- deploy --runs 10
//! cargo run --release -p tessera-tests --bin tessera-bench -- head-restart --runs 5
//! cargo run --release -p tessera-tests --bin tessera-bench -- head-pause --runs 3
//! cargo run --release -p tessera-tests --bin tessera-bench -- exhaustion
//! cargo run --release -p tessera-tests --bin tessera-bench -- metrics-scrape --runs 1000
//! cargo run --release -p tessera-tests --bin tessera-bench -- bring-up --runs 5
//! ```

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tessera_proto::v1 as pb;
use tessera_tests::process::{Daemon, HeadProc, start_head, start_worker};
use tessera_tests::{cluster_client, wait_state};
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    match args.get(1).map(String::as_str) {
        Some("failure") => failure(runs).await,
        Some("idle-rss") => idle_rss().await,
        Some("plan") => plan_bench(runs),
        Some("deploy") => deploy_bench(runs).await,
        Some("head-restart") => head_restart_bench(runs).await,
        Some("head-pause") => head_pause_bench(runs).await,
        Some("exhaustion") => {
            let n = |k: &str, d: usize| {
                args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(d)
            };
            exhaustion_bench(n("--idle", 1100), n("--streams", 500)).await
        }
        Some("metrics-scrape") => metrics_scrape_bench(runs.max(1000)).await,
        Some("bring-up") => bring_up_bench(runs).await,
        _ => {
            eprintln!(
                "usage: tessera-bench failure [--runs N] | idle-rss | plan [--runs N] | deploy [--runs N] | head-restart [--runs N] | head-pause [--runs N] | metrics-scrape | bring-up"
            );
            std::process::exit(2);
        }
    }
}

/// Time from the signal to the head's `dead` event, for kill -9 and for SIGSTOP.
async fn failure(runs: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let mut client = cluster_client(&head.url).await;
    for (label, sig) in [("kill -9", Signal::SIGKILL), ("SIGSTOP", Signal::SIGSTOP)] {
        let mut times = Vec::new();
        for i in 0..runs {
            let name = format!("w{i}-{}", if sig == Signal::SIGKILL { "kill" } else { "stop" });
            let w = start_worker(dir.path(), &name, &head.url);
            wait_state(&mut client, &name, pb::NodeState::Alive).await;
            // Let a few heartbeats pass so the worker is in its steady state.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let mut events = client.watch_events(pb::WatchEventsRequest { include_current: false }).await?.into_inner();
            let t0 = Instant::now();
            w.signal(sig);
            loop {
                let e = events.next().await.ok_or_else(|| anyhow::anyhow!("stream ended"))??;
                let n = e.node.unwrap_or_default();
                if n.name == name && n.state == pb::NodeState::Dead as i32 {
                    break;
                }
            }
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            times.push(ms);
            eprintln!("{label} run {i}: {ms:.0} ms");
            if sig == Signal::SIGSTOP {
                w.signal(Signal::SIGCONT);
            }
            drop(w);
        }
        let (median, min, max) = summary(&mut times);
        println!("{label:>8} -> dead: median {:.0} ms, min {:.0} ms, max {:.0} ms over {runs} runs", median, min, max);
    }
    Ok(())
}

fn rss_kib(pid: i32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))
}

/// RSS of an idle head (with its in-process worker, 4 fake GPUs) and of an idle worker, after 10 s.
async fn idle_rss() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let w = start_worker(dir.path(), "w1", &head.url);
    let mut client = cluster_client(&head.url).await;
    wait_state(&mut client, "w1", pb::NodeState::Alive).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let h = rss_kib(head.daemon.pid().as_raw())?;
    let wk = rss_kib(w.pid().as_raw())?;
    println!("idle RSS: head {:.1} MiB (with its worker), worker {:.1} MiB", h as f64 / 1024.0, wk as f64 / 1024.0);
    Ok(())
}

/// Planning time on a 10,000-node x 8-GPU inventory (a quarter of the GPUs already reserved,
/// spread over the nodes, so placement has to look).
fn plan_bench(runs: usize) -> anyhow::Result<()> {
    use tessera_common::plan::memory::Weights;
    use tessera_common::plan::placement::Cluster;
    use tessera_common::plan::{PlanRequest, Size, plan};

    let mut cluster = Cluster::uniform(10_000, 8, 80 << 30);
    for (i, n) in cluster.nodes.iter_mut().enumerate() {
        for g in n.gpus.iter_mut().take(i % 3 * 2) {
            g.reserved = true;
        }
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/model-configs/Llama-3.1-70B-Instruct.json");
    let m = tessera_common::model::parse_config(path, &std::fs::read_to_string(path)?)?;
    let w = Weights::estimate(&m);
    for (label, tp, pp) in [
        ("TP 8 x PP 2 (16 GPUs)", Size::Fixed(8), Size::Fixed(2)),
        ("TP 8 x PP 8 (64 GPUs)", Size::Fixed(8), Size::Fixed(8)),
        ("auto x auto", Size::Auto, Size::Auto),
    ] {
        let req = PlanRequest { tp, pp, max_model_len: Some(8192), ..Default::default() };
        let mut times = Vec::new();
        let mut valid = true;
        for _ in 0..runs {
            let t0 = Instant::now();
            let r = plan(&m, &w, &cluster, &req);
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
            valid &= r.valid;
        }
        let (median, _, max) = summary(&mut times);
        println!(
            "plan {label:<22} on 10,000 x 8 GPUs: median {median:.2} ms, max {max:.2} ms over {runs} runs (valid: {valid})"
        );
    }
    Ok(())
}

/// Time from `Create` to `running` for a TP=4 PP=2 probe deployment on a head and two workers (4
/// fake GPUs each), and from `kill -9` of one rank to `running` again at the next generation.
async fn deploy_bench(runs: usize) -> anyhow::Result<()> {
    let (_dir, head, _workers, mut client) = head_and_two_workers().await;
    let mut deps = tessera_tests::deployments_client(&head.url).await;
    let mut up = Vec::new();
    let mut again = Vec::new();
    for i in 0..runs {
        let name = format!("bench-{i}");
        let mut events = client.watch_events(pb::WatchEventsRequest { include_current: false }).await?.into_inner();
        let t0 = Instant::now();
        deps.create(probe_request(name.clone())?).await?;
        let d = wait_running(&mut events, &name, 1).await?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        up.push(ms);
        let victim = d.ranks[5].pid;
        let t1 = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)?;
        wait_running(&mut events, &name, 2).await?;
        let ms2 = t1.elapsed().as_secs_f64() * 1000.0;
        again.push(ms2);
        eprintln!("run {i}: deploy -> running {ms:.0} ms; kill -9 rank 5 -> running at generation 2 {ms2:.0} ms");
        deps.delete(pb::DeleteDeploymentRequest { name: name.clone() }).await?;
        while deps.get(pb::GetDeploymentRequest { name: name.clone() }).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (label, mut v) in [("deploy -> running", up), ("kill -9 of a rank -> running again", again)] {
        let (median, min, max) = summary(&mut v);
        println!("{label:<36} median {:.0} ms, min {:.0} ms, max {:.0} ms over {runs} runs", median, min, max);
    }
    Ok(())
}

async fn wait_running(
    events: &mut tonic::Streaming<pb::Event>,
    name: &str,
    generation: u64,
) -> anyhow::Result<pb::Deployment> {
    loop {
        let e = events.next().await.ok_or_else(|| anyhow::anyhow!("event stream ended"))??;
        if let Some(d) = e.deployment {
            if d.name == name && d.generation == generation && d.state == pb::DeploymentState::Running as i32 {
                return Ok(d);
            }
            if d.name == name && d.state == pb::DeploymentState::Failed as i32 {
                anyhow::bail!("{name} failed: {}", d.message);
            }
        }
    }
}

/// A head and two workers (4 fake GPUs each), all alive, and a cluster client.
async fn head_and_two_workers()
-> (tempfile::TempDir, HeadProc, [Daemon; 2], pb::cluster_client::ClusterClient<tessera_tests::Conn>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let workers = [start_worker(dir.path(), "w1", &head.url), start_worker(dir.path(), "w2", &head.url)];
    let mut client = cluster_client(&head.url).await;
    wait_state(&mut client, "w1", pb::NodeState::Alive).await;
    wait_state(&mut client, "w2", pb::NodeState::Alive).await;
    (dir, head, workers, client)
}

/// A head and two workers with a TP=4 PP=2 probe deployment `steady` running (stage 0 on the
/// head), and its rank pids.
async fn steady_cluster() -> anyhow::Result<(tempfile::TempDir, HeadProc, [Daemon; 2], Vec<u32>)> {
    let (dir, head, workers, mut client) = head_and_two_workers().await;
    let mut deps = tessera_tests::deployments_client(&head.url).await;
    deps.create(probe_request("steady")?).await?;
    let mut events = client.watch_events(pb::WatchEventsRequest { include_current: true }).await?.into_inner();
    let first = wait_running(&mut events, "steady", 1).await?;
    let pids = first.ranks.iter().map(|r| r.pid).collect();
    Ok((dir, head, workers, pids))
}

/// kill -9 of the head with a TP=4 PP=2 probe deployment running (stage 0 on the head), restart:
/// time from the restart to `running` again, and how many processes were restarted (0 expected).
async fn head_restart_bench(runs: usize) -> anyhow::Result<()> {
    let (dir, mut head, _workers, pids) = steady_cluster().await?;
    let listen = head.url.trim_start_matches("http://").to_string();
    let mut times = Vec::new();
    for i in 0..runs {
        head.daemon.signal(Signal::SIGKILL);
        head.daemon.wait();
        let t0 = Instant::now();
        head = start_head(dir.path(), "head", &listen, &[]);
        let mut deps = tessera_tests::deployments_client(&head.url).await;
        let d = loop {
            let d = deps.get(pb::GetDeploymentRequest { name: "steady".into() }).await?.into_inner();
            if d.state == pb::DeploymentState::Running as i32 {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let same = d.ranks.iter().map(|r| r.pid).collect::<Vec<_>>() == pids;
        eprintln!(
            "run {i}: running again {ms:.0} ms after the restart; generation {}, restarts {}, same pids {same}",
            d.generation, d.restarts
        );
        anyhow::ensure!(d.restarts == 0 && d.generation == 1 && same, "a process was restarted");
        times.push(ms);
    }
    let (median, min, max) = summary(&mut times);
    println!(
        "head kill -9 + restart -> running, shard restarts 0: median {:.0} ms, min {:.0} ms, max {:.0} ms over {runs} runs",
        median, min, max
    );
    Ok(())
}

/// SIGSTOP of the head for 10 s with a TP=4 PP=2 probe deployment running (stage 0 on the head),
/// then SIGCONT: nodes declared dead and processes restarted in the 5 s after (0 and 0 expected).
async fn head_pause_bench(runs: usize) -> anyhow::Result<()> {
    let (_dir, head, _workers, pids) = steady_cluster().await?;
    let mut client = cluster_client(&head.url).await;
    let mut deps = tessera_tests::deployments_client(&head.url).await;
    for i in 0..runs {
        let mut events = client.watch_events(pb::WatchEventsRequest { include_current: false }).await?.into_inner();
        head.daemon.signal(Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_secs(10)).await;
        head.daemon.signal(Signal::SIGCONT);
        let t0 = Instant::now();
        let mut dead = 0;
        while let Ok(Some(Ok(e))) =
            tokio::time::timeout(Duration::from_secs(5).saturating_sub(t0.elapsed()), events.next()).await
        {
            dead += usize::from(e.node.is_some_and(|n| n.state == pb::NodeState::Dead as i32));
        }
        let d = deps.get(pb::GetDeploymentRequest { name: "steady".into() }).await?.into_inner();
        let same = d.ranks.iter().map(|r| r.pid).collect::<Vec<_>>() == pids;
        println!(
            "run {i}: head paused 10 s: {dead} node(s) declared dead, {} restart(s), generation {}, same pids {same}",
            d.restarts, d.generation
        );
        anyhow::ensure!(dead == 0 && d.restarts == 0 && same, "the pause cost something");
    }
    Ok(())
}

/// Head RSS and `ListNodes` latency (median of 50) with a head and two workers, then again with
/// 1,100 idle TCP connections and 500 event streams that never read (over small HTTP/2 windows)
/// open, after 400 events were sent to them.
async fn exhaustion_bench(idle_n: usize, streams_n: usize) -> anyhow::Result<()> {
    let (_dir, head, _workers, mut client) = head_and_two_workers().await;
    let pid = head.daemon.pid().as_raw();
    let measure = |client: pb::cluster_client::ClusterClient<tessera_tests::Conn>| async move {
        let mut c = client;
        let mut v = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            c.list_nodes(pb::ListNodesRequest::default()).await?;
            v.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let (median, _, max) = summary(&mut v);
        anyhow::Ok((median, max))
    };
    let (m0, x0) = measure(client.clone()).await?;
    let rss0 = rss_kib(pid)?;
    let addr = head.url.trim_start_matches("http://").to_string();
    let idle: Vec<std::net::TcpStream> = (0..idle_n).filter_map(|_| std::net::TcpStream::connect(&addr).ok()).collect();
    let mut streams = Vec::new();
    let mut refused = 0;
    for conn in 0..10 {
        let ch = tonic::transport::Endpoint::from_shared(head.url.clone())?
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await?;
        let auth = tessera_common::auth::Bearer::new(Some(tessera_tests::ADMIN_TOKEN)).map_err(anyhow::Error::msg)?;
        let mut c = pb::cluster_client::ClusterClient::with_interceptor(ch, auth);
        for _ in 0..streams_n / 10 {
            match c.watch_events(pb::WatchEventsRequest { include_current: true }).await {
                Ok(s) => streams.push(s.into_inner()),
                Err(s) if s.code() == tonic::Code::ResourceExhausted => refused += 1,
                Err(s) => return Err(s.into()),
            }
        }
        let _ = conn;
    }
    for i in 0..400 {
        let req = pb::DrainNodeRequest { node: "w1".into() };
        if i % 2 == 0 {
            client.drain_node(req).await?;
        } else {
            client.undrain_node(req).await?;
        }
    }
    let (m1, x1) = measure(client.clone()).await?;
    let rss1 = rss_kib(pid)?;
    // Past the slow-reader cut-off (5 s) and the unauthenticated timeout (10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (m2, x2) = measure(client.clone()).await?;
    let rss2 = rss_kib(pid)?;
    println!("  12 s later: ListNodes median {m2:.2} ms (max {x2:.2}); head RSS {:.1} MiB", rss2 as f64 / 1024.0);
    println!(
        "exhaustion: {} idle connections, {} event streams not reading ({refused} more refused: per-peer limit)",
        idle.len(),
        streams.len()
    );
    println!(
        "  ListNodes median {m0:.2} ms (max {x0:.2}) -> {m1:.2} ms (max {x1:.2}); head RSS {:.1} MiB -> {:.1} MiB",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0
    );
    Ok(())
}

/// `/metrics` of a head with `nodes` simulated workers (each a real agent with its own gRPC
/// session, 8 fake GPUs): scrape time (median of 20) and size.
async fn metrics_scrape_bench(nodes: usize) -> anyhow::Result<()> {
    use tessera_worker::agent::{Agent, AgentConfig};
    let dir = tempfile::tempdir()?;
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let spec: tessera_common::fake::FakeGpuSpec = "8x80GiB".parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let stop = tokio_util::sync::CancellationToken::new();
    for i in 0..nodes {
        let name = format!("sim-{i:05}");
        let state = tessera_worker::state::StateDir::open(&dir.path().join("sim").join(&name))?;
        let agent = Agent::new(
            AgentConfig {
                head: head.url.clone(),
                node_name: name.clone(),
                labels: Default::default(),
                advertise_address: None,
                is_head: false,
                token: Some(tessera_tests::JOIN_TOKEN.to_string()),
                tls: None,
                inventory: std::sync::Arc::new(tessera_worker::gpu::FakeInventory::new(spec, &name)),
                metrics: None,
                connect_timeout: Duration::from_secs(5),
                leave_timeout: Duration::from_secs(1),
                shards: None,
            },
            state,
        )?;
        tokio::spawn(agent.run(stop.clone()));
    }
    let mut client = cluster_client(&head.url).await;
    let t0 = Instant::now();
    loop {
        let n = client.list_nodes(pb::ListNodesRequest::default()).await?.into_inner().nodes;
        if n.iter().filter(|x| x.state == pb::NodeState::Alive as i32).count() == nodes + 1 {
            break;
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(300), "nodes did not all join");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{nodes} simulated nodes joined in {:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let addr = std::fs::read_to_string(head.data_dir.join("metrics.addr"))?.trim().to_string();
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..20 {
        let t = Instant::now();
        let body = http_get(&addr, "/metrics")?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        size = body.len();
    }
    let (median, _, max) = summary(&mut times);
    let rss = rss_kib(head.daemon.pid().as_raw())?;
    println!(
        "/metrics with {nodes} nodes: median {median:.2} ms, max {max:.2} ms over 20 scrapes, {size} bytes; head RSS {:.1} MiB",
        rss as f64 / 1024.0
    );
    stop.cancel();
    Ok(())
}

fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// From starting a head and two workers (processes) to a TP=4 PP=2 probe deployment `running`.
async fn bring_up_bench(runs: usize) -> anyhow::Result<()> {
    let mut times = Vec::new();
    for i in 0..runs {
        let dir = tempfile::tempdir()?;
        let t0 = Instant::now();
        let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
        let _w1 = start_worker(dir.path(), "w1", &head.url);
        let _w2 = start_worker(dir.path(), "w2", &head.url);
        let mut client = cluster_client(&head.url).await;
        let mut events = client.watch_events(pb::WatchEventsRequest { include_current: false }).await?.into_inner();
        wait_state(&mut client, "w1", pb::NodeState::Alive).await;
        let mut deps = tessera_tests::deployments_client(&head.url).await;
        deps.create(probe_request("up")?).await?;
        wait_running(&mut events, "up", 1).await?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        eprintln!("run {i}: bring-up {ms:.0} ms");
        times.push(ms);
        deps.delete(pb::DeleteDeploymentRequest { name: "up".into() }).await?;
        while deps.get(pb::GetDeploymentRequest { name: "up".into() }).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (median, min, max) = summary(&mut times);
    println!(
        "bring-up (head + 2 workers started -> TP4xPP2 probe running): median {:.0} ms, min {:.0} ms, max {:.0} ms over {runs} runs",
        median, min, max
    );
    Ok(())
}

/// A TP=4 PP=2 probe deployment of the shipped Llama 3.1 8B config.
fn probe_request(name: impl Into<String>) -> anyhow::Result<pb::CreateDeploymentRequest> {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/model-configs/Llama-3.1-8B-Instruct.json");
    Ok(pb::CreateDeploymentRequest {
        name: name.into(),
        model_path: std::fs::canonicalize(model)?.display().to_string(),
        tp: 4,
        pp: 2,
        engine: pb::Engine::Probe as i32,
        ..Default::default()
    })
}

/// Sorts `v` and gives (median, min, max).
fn summary(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}
