//! `tessera-bench gateway`: the gateway's overhead and what a client sees when replicas die or
//! are scaled (issue 13). Included by `tessera-bench.rs`.

use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_tests::loadgen::{self, Outcome};

/// Polls `name` until `pred` holds (60 s at most).
async fn wait_dep(
    c: &mut pb::deployments_client::DeploymentsClient<tessera_tests::Conn>,
    name: &str,
    pred: impl Fn(&pb::Deployment) -> bool,
) -> anyhow::Result<pb::Deployment> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(d) = c.get(pb::GetDeploymentRequest { name: name.into() }).await {
            let d = d.into_inner();
            if pred(&d) {
                return Ok(d);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "{name}: timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn all_running(n: usize) -> impl Fn(&pb::Deployment) -> bool {
    move |d| d.replicas.len() == n && d.replicas.iter().all(|r| r.state == pb::DeploymentState::Running as i32)
}

/// CPU seconds `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: u64 =
        f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0) + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

struct Tally {
    ok: usize,
    before_start: Vec<String>,
    while_streaming: usize,
}

fn tally(outcomes: &[Outcome]) -> Tally {
    let mut t = Tally { ok: 0, before_start: Vec::new(), while_streaming: 0 };
    for o in outcomes {
        match o {
            Outcome::Ok(_) => t.ok += 1,
            Outcome::FailedBeforeStart(e) => t.before_start.push(e.clone()),
            Outcome::BrokeWhileStreaming(_) => t.while_streaming += 1,
        }
    }
    t
}

/// `clients` loops sending requests (every other one streamed) until `stop`.
async fn closed_loop(
    base: String,
    model: &'static str,
    clients: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Outcome> {
    let c = loadgen::client();
    let tasks: Vec<_> = (0..clients)
        .map(|k| {
            let (c, base, stop) = (c.clone(), base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                let mut i = 0u32;
                while !stop.is_cancelled() {
                    i += 1;
                    out.push(loadgen::complete(&c, &base, model, &format!("c{k}-{i}"), 8, i.is_multiple_of(2)).await);
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

pub async fn gateway_bench() -> anyhow::Result<()> {
    let (dir, head, _workers, _client) = super::head_and_two_workers().await;
    let mut deps = tessera_tests::deployments_client(&head.url).await;
    let mut req = super::probe_request("g")?;
    (req.tp, req.pp, req.replicas) = (1, 1, 2);
    deps.create(req).await?;
    let d = wait_dep(&mut deps, "g", all_running(2)).await?;
    let (gw, addr) = tessera_tests::process::start_gateway(dir.path(), "gateway", &head, &[]);
    let gateway = format!("http://{addr}");
    let c = loadgen::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(loadgen::complete(&c, &gateway, "g", "warm", 1, false).await, Outcome::Ok(_)) {
        anyhow::ensure!(Instant::now() < deadline, "the gateway does not serve g");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let direct = d.replicas[0].endpoint.clone();
    println!(
        "gateway overhead: probe engine (1 token, no delay), 500 requests/s open loop for 10 s, keep-alive client"
    );
    for round in 1..=2 {
        for (label, base) in [("direct to replica 0", direct.as_str()), ("through the gateway", gateway.as_str())] {
            let out = loadgen::open_loop(&c, base, "g", 500, 10).await;
            let mut lat: Vec<Duration> =
                out.iter().filter_map(|o| if let Outcome::Ok(d) = o { Some(*d) } else { None }).collect();
            lat.sort();
            let t = tally(&out);
            println!(
                "  round {round}, {label}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} ok, {} failed",
                loadgen::percentile(&lat, 50.0),
                loadgen::percentile(&lat, 99.0),
                loadgen::percentile(&lat, 100.0),
                t.ok,
                t.before_start.len() + t.while_streaming
            );
        }
    }
    // Throughput per gateway CPU-second: 32 clients back to back for 5 s.
    let pid = gw.child.as_ref().map(|c| c.id()).unwrap_or(0);
    let (cpu0, t0) = (cpu_secs(pid), Instant::now());
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(closed_loop(gateway.clone(), "g", 32, stop.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let out = run.await?;
    let (cpu, wall) = (cpu_secs(pid) - cpu0, t0.elapsed().as_secs_f64());
    let t = tally(&out);
    println!(
        "closed loop, 32 clients, 5 s (8 tokens, half streamed): {:.0} requests/s; the gateway used {:.2} CPU s per s -> {:.0} requests per gateway CPU-second; {} failed",
        t.ok as f64 / wall,
        cpu / wall,
        t.ok as f64 / cpu.max(1e-9),
        t.before_start.len() + t.while_streaming
    );

    // kill -9 of a replica's engine under load.
    let mut req = super::probe_request("k")?;
    (req.tp, req.pp, req.replicas) = (1, 1, 2);
    req.engine_args = vec!["--token-delay-ms".into(), "5".into()];
    deps.create(req).await?;
    let k = wait_dep(&mut deps, "k", all_running(2)).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(closed_loop(gateway.clone(), "k", 8, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(k.replicas[1].ranks[0].pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    let t = tally(&run.await?);
    println!(
        "kill -9 of replica 1 under 8 clients (8 tokens at 5 ms, half streamed): {} ok, {} failed before their answer started {:?}, {} broke while streaming",
        t.ok,
        t.before_start.len(),
        t.before_start.iter().take(3).collect::<Vec<_>>(),
        t.while_streaming
    );

    // Scale 1 -> 3 -> 1 under load.
    deps.scale(pb::ScaleDeploymentRequest { name: "k".into(), replicas: 1 }).await?;
    wait_dep(&mut deps, "k", all_running(1)).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(closed_loop(gateway.clone(), "k", 8, stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    deps.scale(pb::ScaleDeploymentRequest { name: "k".into(), replicas: 3 }).await?;
    wait_dep(&mut deps, "k", all_running(3)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    deps.scale(pb::ScaleDeploymentRequest { name: "k".into(), replicas: 1 }).await?;
    wait_dep(&mut deps, "k", all_running(1)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let t = tally(&run.await?);
    println!(
        "scale 1 -> 3 -> 1 under 8 clients: {} ok, {} failed before their answer started {:?}, {} broke while streaming",
        t.ok,
        t.before_start.len(),
        t.before_start.iter().take(3).collect::<Vec<_>>(),
        t.while_streaming
    );
    // A rolling update of 2 replicas under load (a new one first, then an old one drains).
    deps.scale(pb::ScaleDeploymentRequest { name: "k".into(), replicas: 2 }).await?;
    wait_dep(&mut deps, "k", all_running(2)).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut spec = super::probe_request("k")?;
    (spec.tp, spec.pp) = (1, 1);
    spec.engine_args = vec!["--token-delay-ms".into(), "4".into()];
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(closed_loop(gateway.clone(), "k", 8, stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    let d = deps.update(pb::UpdateDeploymentRequest { spec: Some(spec), max_surge: 1, max_unavailable: 0 }).await?;
    let took = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let t = tally(&run.await?);
    println!(
        "rolling update of 2 replicas under 8 clients (took {:.1} s, now revision {}): {} ok, {} failed before their answer started {:?}, {} broke while streaming",
        took.as_secs_f64(),
        d.into_inner().revision,
        t.ok,
        t.before_start.len(),
        t.before_start.iter().take(3).collect::<Vec<_>>(),
        t.while_streaming
    );
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    Ok(())
}
