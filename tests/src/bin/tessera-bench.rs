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
//! cargo run --release -p tessera-tests --bin tessera-bench -- vllm --runs 2
//! cargo run --release -p tessera-tests --bin tessera-bench -- gateway
//! cargo run --release -p tessera-tests --bin tessera-bench -- staging egress
//! cargo run --release -p tessera-tests --bin tessera-bench -- staging veth --gib 4
//! cargo run --release -p tessera-tests --bin tessera-bench -- staging big --gib 16
//! ```

#[path = "bench/gateway.rs"]
mod gateway_bench;
#[path = "bench/ha.rs"]
mod ha_bench;
#[path = "bench/staging.rs"]
mod staging_bench;

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
        Some("vllm") => vllm_bench(runs).await,
        Some("gateway") => gateway_bench::gateway_bench().await,
        Some("staging") => staging_bench::staging_bench(&args).await,
        Some("ha") => ha_bench::ha_bench(&args).await,
        Some("copy-recv") => staging_bench::copy_recv(&args[2], &args[3]),
        _ => {
            eprintln!(
                "usage: tessera-bench failure [--runs N] | idle-rss | plan [--runs N] | deploy [--runs N] | head-restart [--runs N] | head-pause [--runs N] | metrics-scrape | bring-up | vllm [--runs N] | gateway | staging egress|veth|big [--gib G] | ha failover|store [--runs N]"
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
/// 400 drain/undrain calls on `w1`: 400 node events and store writes.
async fn churn(client: &mut pb::cluster_client::ClusterClient<tessera_tests::Conn>) -> anyhow::Result<()> {
    for i in 0..400 {
        let req = pb::DrainNodeRequest { node: "w1".into(), evict: false };
        if i % 2 == 0 {
            client.drain_node(req).await?;
        } else {
            client.undrain_node(req).await?;
        }
    }
    Ok(())
}

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
    // The control: the head after the same work (400 drain/undrain events, each written to the
    // store) with no idle connection and no stream open, so that what the store's writes leave in
    // the allocator is not counted against the connections.
    churn(&mut client).await?;
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
    // The same events as in the control run, now with streams that do not read them.
    churn(&mut client).await?;
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
                stage: None,
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

/// Real vLLM (the CPU build, tiny local Llama) at TP 1 x PP 2 on two nodes on loopback:
/// - Tessera's overhead: `Create` -> `running`, minus the same two `vllm serve` processes started
///   by hand -> node 0's `/health` 200, alternated `runs` times in one run;
/// - `kill -9` of the headless rank -> answering again;
/// - SIGSTOP of the headless rank's tree with a request in flight -> restart decided (the
///   `restarting` event) and -> answering again, with the default checks (30 s stall timeout).
async fn vllm_bench(runs: usize) -> anyhow::Result<()> {
    use tessera_tests::vllm::{ENGINE_ARGS, complete, cpu_env, endpoint, tree, vllm};
    use tessera_worker::shard::http;
    let v = vllm();
    let model = v.model.display().to_string();
    let dir = tempfile::tempdir()?;
    let free = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let wait_health = |port: u16| async move {
        while http::health("", port, Duration::from_secs(2)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let bin = v.bin.display().to_string();
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &["--fake-gpus", "1x80GiB", "--vllm-bin", &bin]);
    let _w1 = tessera_tests::start_worker_with(
        dir.path(),
        "w1",
        &head.url,
        &dir.path().join("w1-state"),
        &["--fake-gpus", "1x80GiB", "--vllm-bin", &bin],
    );
    let mut client = cluster_client(&head.url).await;
    wait_state(&mut client, "w1", pb::NodeState::Alive).await;
    let mut deps = tessera_tests::deployments_client(&head.url).await;
    let request = |name: &str| pb::CreateDeploymentRequest {
        name: name.into(),
        model_path: model.clone(),
        tp: 1,
        pp: 2,
        engine: pb::Engine::Vllm as i32,
        engine_args: ENGINE_ARGS.iter().map(|s| s.to_string()).collect(),
        env: cpu_env().into_iter().collect(),
        ..Default::default()
    };
    let running = |deps: &mut pb::deployments_client::DeploymentsClient<tessera_tests::Conn>, name: String, g: u64| {
        let mut deps = deps.clone();
        async move {
            loop {
                if let Ok(d) = deps.get(pb::GetDeploymentRequest { name: name.clone() }).await {
                    let d = d.into_inner();
                    if d.state == pb::DeploymentState::Running as i32 && d.generation == g {
                        return d;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let answering = |d: pb::Deployment, model: String| async move {
        let (h, p) = endpoint(&d);
        while complete(&h, p, &model).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (mut by_hand, mut tessera) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // By hand: what Tessera would run, on loopback.
        let (mp, api) = (free()?, free()?);
        let t0 = Instant::now();
        let mut children = Vec::new();
        for rank in 0..2 {
            let mut a: Vec<String> = [
                "serve",
                &model,
                "--tensor-parallel-size",
                "1",
                "--pipeline-parallel-size",
                "2",
                "--nnodes",
                "2",
                "--node-rank",
                &rank.to_string(),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &mp.to_string(),
                "--distributed-executor-backend",
                "mp",
                "--gpu-memory-utilization",
                "0.92",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if rank == 0 {
                a.extend(["--port".into(), api.to_string(), "--enable-server-load-tracking".into()]);
            } else {
                a.push("--headless".into());
            }
            a.extend(ENGINE_ARGS.iter().map(|s| s.to_string()));
            let log = std::fs::File::create(dir.path().join(format!("hand-{i}-{rank}.log")))?;
            children.push(
                std::process::Command::new(&v.bin)
                    .args(&a)
                    .envs(cpu_env())
                    .env("VLLM_HOST_IP", "127.0.0.1")
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()?,
            );
        }
        wait_health(api).await;
        let hand = t0.elapsed().as_secs_f64();
        for c in &mut children {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
        for c in &mut children {
            let _ = c.wait();
        }
        // Under Tessera.
        let name = format!("v{i}");
        let t0 = Instant::now();
        deps.create(request(&name)).await?;
        running(&mut deps, name.clone(), 1).await;
        let under = t0.elapsed().as_secs_f64();
        eprintln!("run {i}: by hand {hand:.1} s, under Tessera {under:.1} s, overhead {:.2} s", under - hand);
        by_hand.push(hand);
        tessera.push(under);
        if i + 1 < runs {
            deps.delete(pb::DeleteDeploymentRequest { name: name.clone() }).await?;
            while deps.get(pb::GetDeploymentRequest { name: name.clone() }).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let overhead: Vec<f64> = tessera.iter().zip(&by_hand).map(|(t, h)| t - h).collect();
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
    println!(
        "vllm TP1xPP2 ready: by hand {:.1} s, under Tessera {:.1} s (means of {runs}); overhead {:.2} s mean ({:?}), ratio {:.3}",
        mean(&by_hand),
        mean(&tessera),
        mean(&overhead),
        overhead.iter().map(|o| format!("{o:.2}")).collect::<Vec<_>>(),
        mean(&tessera) / mean(&by_hand)
    );

    // kill -9 of the headless rank -> answering again.
    let name = format!("v{}", runs.saturating_sub(1));
    let d = running(&mut deps, name.clone(), 1).await;
    let pid = d.ranks.iter().find(|r| r.node == "w1").map(|r| r.pid).unwrap_or(0);
    let t0 = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL)?;
    let d = running(&mut deps, name.clone(), 2).await;
    answering(d.clone(), model.clone()).await;
    println!("vllm kill -9 of the headless rank -> answering again: {:.1} s", t0.elapsed().as_secs_f64());

    // SIGSTOP of its tree with a request in flight -> restart decided -> answering again.
    let mut events = client.watch_events(pb::WatchEventsRequest { include_current: false }).await?.into_inner();
    let pid = d.ranks.iter().find(|r| r.node == "w1").map(|r| r.pid).unwrap_or(0);
    let stopped = tree(pid);
    let t0 = Instant::now();
    for p in &stopped {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), Signal::SIGSTOP);
    }
    let (h, p) = endpoint(&d);
    let m = model.clone();
    tokio::spawn(async move { complete(&h, p, &m).await });
    let decided = loop {
        let Some(Ok(e)) = events.next().await else { anyhow::bail!("events ended") };
        if let Some(x) = e.deployment.filter(|x| x.name == name && x.message.contains("unhealthy")) {
            break (t0.elapsed().as_secs_f64(), x.message);
        }
    };
    let d = running(&mut deps, name.clone(), 3).await;
    answering(d, model.clone()).await;
    println!(
        "vllm SIGSTOP of the headless rank (a request in flight, --stall-timeout 30s) -> restart decided {:.1} s, answering again {:.1} s; reason: {}",
        decided.0,
        t0.elapsed().as_secs_f64(),
        decided.1
    );
    Ok(())
}
