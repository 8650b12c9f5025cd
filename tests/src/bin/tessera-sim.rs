//! `tessera-sim`: many simulated workers against a real `tessera-head` process, to measure how the
//! head holds up at scale. Each simulated node is a real membership session (join with 8 fake
//! GPUs, heartbeats at the interval the head asks for) multiplexed over a pool of HTTP/2
//! connections; the head's CPU and RSS are read from /proc (the simulator never measures itself).
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/tessera-sim --nodes 10000 --steady 30 --fail-fraction 0.01 --creates 100 --json sim.json
//! ```
//!
//! Scenarios, in order: join storm (time until every node is alive), steady state (head CPU and
//! RSS over `--steady` seconds), node failures (a fraction of nodes drop their session, another
//! fraction go silent; time until the head declares each dead).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tessera_common::fake::FakeGpuSpec;
use tessera_proto::v1 as pb;
use tessera_tests::etcd::{EtcdCluster, free_port, start_ha_head, wait_leader};
use tessera_tests::process::{HeadProc, start_head};
use tessera_tests::{JOIN_TOKEN, cluster_client, conn_with};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

struct Args {
    nodes: usize,
    steady: u64,
    fail_fraction: f64,
    per_connection: usize,
    creates: usize,
    json: Option<String>,
    /// Two heads on a real 3-member etcd (one leads); the restart scenario becomes a kill -9 of
    /// the leader, and the steady state also counts etcd writes.
    ha: bool,
}

fn args() -> Args {
    let a: Vec<String> = std::env::args().collect();
    let get = |k: &str| a.iter().position(|x| x == k).and_then(|i| a.get(i + 1)).cloned();
    Args {
        nodes: get("--nodes").and_then(|v| v.parse().ok()).unwrap_or(1000),
        steady: get("--steady").and_then(|v| v.parse().ok()).unwrap_or(20),
        fail_fraction: get("--fail-fraction").and_then(|v| v.parse().ok()).unwrap_or(0.01),
        per_connection: get("--per-connection").and_then(|v| v.parse().ok()).unwrap_or(100),
        creates: get("--creates").and_then(|v| v.parse().ok()).unwrap_or(100),
        json: get("--json"),
        ha: a.iter().any(|x| x == "--ha"),
    }
}

/// A connection made on first use (a standby's port is busy being handed over at times).
fn lazy_conn(url: &str) -> tessera_tests::Conn {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string()).expect("url").connect_lazy();
    tonic::service::interceptor::InterceptedService::new(
        ch,
        tessera_common::auth::Bearer::new(Some(JOIN_TOKEN)).expect("token"),
    )
}

/// etcd's current revision (every write adds one).
fn etcd_revision(e: &EtcdCluster) -> i64 {
    let out = e.ctl(&["endpoint", "status", "-w", "json"]).unwrap_or_default();
    out.split("\"revision\":")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or(0)
}

/// How a simulated node behaves now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Silent,
    Dropped,
}

struct SimNode {
    silent: AtomicBool,
    drop: AtomicBool,
}

/// CPU seconds (user + system) and RSS of a process, from /proc.
fn proc_usage(pid: i32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ
    let cpu = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    (cpu / ticks, rss)
}

/// One simulated node: joins, heartbeats, and (like the real agent) rejoins after the head went
/// away. `drop` ends it for good (its session breaks); `silent` stops its heartbeats.
async fn run_node(channels: Vec<tessera_tests::Conn>, name: String, sim: Arc<SimNode>, spec: FakeGpuSpec) {
    let inventory: pb::Inventory = (&spec.inventory(&name)).into();
    // With several heads (--ha), a session that ends moves on to the next head, as the agent does.
    let mut current = 0;
    // Like the agent: the node id and credential from the first join, presented on every rejoin.
    let mut ident: Option<(String, String)> = None;
    loop {
        if sim.drop.load(Ordering::Relaxed) {
            return;
        }
        session(channels[current].clone(), &name, &sim, inventory.clone(), &mut ident).await;
        current = (current + 1) % channels.len();
        if sim.drop.load(Ordering::Relaxed) {
            return;
        }
        let jitter = rand_ms(&name) % 200;
        tokio::time::sleep(Duration::from_millis(100 + jitter)).await;
    }
}

fn rand_ms(name: &str) -> u64 {
    name.bytes().fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64))
}

async fn session(
    channel: tessera_tests::Conn,
    name: &str,
    sim: &SimNode,
    inventory: pb::Inventory,
    ident: &mut Option<(String, String)>,
) {
    let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(8);
    let (node_id, node_secret) = ident.clone().unwrap_or_default();
    let join = pb::JoinRequest {
        node_id,
        node_secret,
        name: name.to_string(),
        inventory: Some(inventory),
        version: "sim".into(),
        machine_fingerprint: format!("sim:{name}"),
        hostname: "sim".into(),
        ..Default::default()
    };
    let _ = tx.send(pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Join(join)) }).await;
    let mut client = pb::membership_client::MembershipClient::new(channel);
    let Ok(resp) = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await else { return };
    let mut inbound = resp.into_inner();
    let Some(Ok(first)) = inbound.next().await else { return };
    let Some(pb::head_message::Msg::Joined(j)) = first.msg else { return };
    if !j.node_secret.is_empty() {
        *ident = Some((j.node_id.clone(), j.node_secret.clone()));
    }
    let mut tick = tokio::time::interval(Duration::from_millis(j.heartbeat_interval_ms.max(10)));
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if sim.drop.load(Ordering::Relaxed) {
                    return; // the stream and its sender drop: the session breaks
                }
                if sim.silent.load(Ordering::Relaxed) {
                    continue;
                }
                seq += 1;
                let hb = pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Heartbeat(pb::Heartbeat { seq, gpu_usage: vec![] })) };
                if tx.send(hb).await.is_err() {
                    return;
                }
            }
            m = inbound.next() => if m.is_none() || matches!(m, Some(Err(_))) { return },
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args();
    let dir = tempfile::tempdir()?;
    // --ha: a 3-member etcd and two heads on it (h0 leads, h1 stands by).
    let etcd = a.ha.then(|| EtcdCluster::start(dir.path(), 3));
    let (head, mut standby) = match &etcd {
        None => (start_head(dir.path(), "head", "127.0.0.1:0", &["--no-worker"]), None),
        Some(e) => {
            let ports = [free_port(), free_port()];
            let url = |p: u16| format!("http://127.0.0.1:{p}");
            let h0 = start_ha_head(dir.path(), "h0", &format!("127.0.0.1:{}", ports[0]), &e.store_url(), None);
            wait_leader(&[url(ports[0])]).await;
            let h1 = start_ha_head(dir.path(), "h1", &format!("127.0.0.1:{}", ports[1]), &e.store_url(), None);
            let head = HeadProc { daemon: h0, url: url(ports[0]), data_dir: dir.path().join("h0") };
            (head, Some((h1, url(ports[1]))))
        }
    };
    let pid = head.daemon.pid().as_raw();
    let spec: FakeGpuSpec = "8x80GiB".parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut report: Vec<(String, String)> = Vec::new();
    let (cpu0, rss0) = proc_usage(pid);
    report.push(("head RSS before (MiB)".into(), format!("{:.1}", rss0 as f64 / 1024.0)));

    // Join storm.
    let conns = a.nodes.div_ceil(a.per_connection.max(1));
    let mut pool = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut per_head = vec![conn_with(&head.url, Some(JOIN_TOKEN)).await];
        if let Some((_, url)) = &standby {
            per_head.push(lazy_conn(url));
        }
        pool.push(per_head);
    }
    let sims: Vec<Arc<SimNode>> = (0..a.nodes)
        .map(|_| Arc::new(SimNode { silent: AtomicBool::new(false), drop: AtomicBool::new(false) }))
        .collect();
    let mut admin = cluster_client(&head.url).await;
    let mut events = admin.watch_events(pb::WatchEventsRequest { include_current: false }).await?.into_inner();
    let t0 = Instant::now();
    for (i, sim) in sims.iter().enumerate() {
        tokio::spawn(run_node(pool[i % conns].clone(), format!("sim-{i:05}"), sim.clone(), spec));
    }
    let mut joined = 0;
    while joined < a.nodes {
        match tokio::time::timeout(Duration::from_secs(120), events.next()).await {
            Ok(Some(Ok(e))) if e.kind == pb::EventKind::NodeJoined as i32 => joined += 1,
            Ok(Some(Ok(_))) => {}
            _ => anyhow::bail!("join storm stalled at {joined}/{} nodes", a.nodes),
        }
    }
    let storm = t0.elapsed();
    report.push((format!("join storm: {} nodes alive (s)", a.nodes), format!("{:.2}", storm.as_secs_f64())));

    // Steady state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (c1, _) = proc_usage(pid);
    let rev0 = etcd.as_ref().map(etcd_revision);
    let s0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.steady)).await;
    let (c2, rss) = proc_usage(pid);
    if let (Some(e), Some(r0)) = (&etcd, rev0) {
        let writes = etcd_revision(e) - r0;
        report.push((
            "steady state: etcd writes (per second)".into(),
            format!(
                "{:.2} ({writes} in {:.0} s)",
                writes as f64 / s0.elapsed().as_secs_f64(),
                s0.elapsed().as_secs_f64()
            ),
        ));
    }
    let cores = (c2 - c1) / s0.elapsed().as_secs_f64();
    report.push(("steady state: head CPU (cores)".into(), format!("{cores:.3}")));
    report.push(("steady state: head RSS (MiB)".into(), format!("{:.1}", rss as f64 / 1024.0)));
    let _ = cpu0;

    // Deploy: plan and reserve 64-GPU deployments (TP 8 x PP 8) against the whole inventory, one
    // after the other (each sees the reservations of the ones before).
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/model-configs/Llama-3.1-70B-Instruct.json");
    let model = std::fs::canonicalize(model)?.display().to_string();
    let mut deps = tessera_tests::deployments_client(&head.url).await;
    let mut create_ms = Vec::new();
    let creates = a.creates.clamp(1, a.nodes * 8 / 64);
    for i in 0..creates {
        let t = Instant::now();
        let d = deps
            .create(pb::CreateDeploymentRequest {
                name: format!("sim-deploy-{i}"),
                model_path: model.clone(),
                tp: 8,
                pp: 8,
                engine: pb::Engine::Probe as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        create_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(d.ranks.len() == 64, "placed {} ranks: {}", d.ranks.len(), d.message);
    }
    create_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| create_ms[((create_ms.len() as f64 * p).ceil() as usize).clamp(1, create_ms.len()) - 1];
    report.push((
        "create (plan + reserve) TP 8 x PP 8, 64 GPUs (ms)".into(),
        format!("median {:.1}, p99 {:.1}, max {:.1} over {creates}", pct(0.5), pct(0.99), pct(1.0)),
    ));

    // Failures: a fraction drop their session, another fraction go silent.
    let n_fail = ((a.nodes as f64 * a.fail_fraction).ceil() as usize).max(1).min(a.nodes / 2);
    let mut acted: HashMap<String, (Mode, Instant)> = HashMap::new();
    for (i, sim) in sims.iter().enumerate().take(2 * n_fail) {
        let name = format!("sim-{i:05}");
        if i % 2 == 0 {
            sim.drop.store(true, Ordering::Relaxed);
            acted.insert(name, (Mode::Dropped, Instant::now()));
        } else {
            sim.silent.store(true, Ordering::Relaxed);
            acted.insert(name, (Mode::Silent, Instant::now()));
        }
    }
    let mut dropped = Vec::new();
    let mut silent = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while dropped.len() + silent.len() < acted.len() && Instant::now() < deadline {
        let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_secs(10), events.next()).await else { break };
        let Some(node) = e.node else { continue };
        if node.state != pb::NodeState::Dead as i32 {
            continue;
        }
        if let Some((mode, at)) = acted.get(&node.name) {
            let ms = at.elapsed().as_secs_f64() * 1000.0;
            match mode {
                Mode::Dropped => dropped.push(ms),
                Mode::Silent => silent.push(ms),
            }
        }
    }
    for (label, mut v) in [("dropped session -> dead (ms)", dropped), ("silent -> dead (ms)", silent)] {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            report.push((label.into(), "none seen".into()));
        } else {
            report.push((
                format!("{label}, {} nodes", v.len()),
                format!("median {:.0}, max {:.0}", v[v.len() / 2], v[v.len() - 1]),
            ));
        }
    }

    // Heads on etcd: kill -9 of the leader; the standby takes over and every live node rejoins it.
    let live = a.nodes - acted.len();
    if let Some((h1, url1)) = standby.take() {
        let mut head = head;
        let t = Instant::now();
        head.daemon.signal(nix::sys::signal::Signal::SIGKILL);
        head.daemon.wait();
        wait_leader(std::slice::from_ref(&url1)).await;
        let led = t.elapsed();
        let mut admin = cluster_client(&url1).await;
        loop {
            let n = admin.list_nodes(pb::ListNodesRequest::default()).await?.into_inner().nodes;
            if n.iter().filter(|x| x.state == pb::NodeState::Alive as i32).count() >= live {
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "nodes did not rejoin the new leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        report.push(("leader kill -9 -> standby leads (s)".into(), format!("{:.2}", led.as_secs_f64())));
        report.push((
            format!("leader kill -9 -> {live} nodes rejoined the new leader (s)"),
            format!("{:.2}", t.elapsed().as_secs_f64()),
        ));
        let (_, rss2) = proc_usage(h1.pid().as_raw());
        report.push(("new leader RSS (MiB)".into(), format!("{:.1}", rss2 as f64 / 1024.0)));
        return finish(&a, conns, report);
    }
    // Head restart: kill -9, start again on the same port and data dir; every live node rejoins.
    let listen = head.url.trim_start_matches("http://").to_string();
    let mut head = head;
    head.daemon.signal(nix::sys::signal::Signal::SIGKILL);
    head.daemon.wait();
    let t = Instant::now();
    let head2 = start_head(dir.path(), "head", &listen, &["--no-worker"]);
    let mut admin = cluster_client(&head2.url).await;
    loop {
        let n = admin.list_nodes(pb::ListNodesRequest::default()).await?.into_inner().nodes;
        if n.iter().filter(|x| x.state == pb::NodeState::Alive as i32).count() >= live {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "nodes did not rejoin the restarted head");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.push((
        format!("head kill -9 + restart: {live} nodes rejoined (s)"),
        format!("{:.2}", t.elapsed().as_secs_f64()),
    ));
    let (_, rss2) = proc_usage(head2.daemon.pid().as_raw());
    report.push(("restarted head RSS (MiB)".into(), format!("{:.1}", rss2 as f64 / 1024.0)));
    finish(&a, conns, report)
}

fn finish(a: &Args, conns: usize, report: Vec<(String, String)>) -> anyhow::Result<()> {
    println!("tessera-sim: {} nodes x 8 fake GPUs, {} HTTP/2 connections", a.nodes, conns);
    for (k, v) in &report {
        println!("  {k:<48} {v}");
    }
    if let Some(path) = &a.json {
        let obj: serde_json::Map<String, serde_json::Value> =
            report.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        std::fs::write(path, serde_json::to_string_pretty(&serde_json::json!({"nodes": a.nodes, "results": obj}))?)?;
    }
    Ok(())
}
