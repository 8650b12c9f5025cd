//! `tessera-bench staging`: weight staging with the release binaries, on this machine.
//!
//! - `egress`: a synthetic 16-layer checkpoint in 16 shards on the head; PP N+1 over the head and
//!   N workers (N = 1, 3, 4, 8); what the head's transfer server sent vs. the union of the files
//!   the workers needed (each file should leave the source once), and each node's share at PP 4.
//! - `veth --gib G`: one worker in a network namespace (a veth pair): staging of a G GiB shard vs.
//!   a plain single-stream TCP copy of the same bytes into a file, in the same run.
//! - `big --gib G`: a G GiB checkpoint staged to 3 workers at PP 4 (the head is stage 0): the time,
//!   then again (caches emptied) with a kill -9 of one receiving worker half way, restarted at once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_tests::model::{self, ModelFile, metric};
use tessera_tests::netns::Netns;
use tessera_tests::process::{Daemon, HeadProc, start_head, start_worker_with};
use tessera_tests::{cluster_client, deployments_client, list_nodes};

type Client = pb::deployments_client::DeploymentsClient<tessera_tests::Conn>;

pub async fn staging_bench(args: &[String]) -> anyhow::Result<()> {
    let gib = args
        .iter()
        .position(|a| a == "--gib")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(4);
    match args.get(2).map(String::as_str) {
        Some("egress") => egress().await,
        Some("veth") => veth(gib).await,
        Some("big") => big(gib).await,
        _ => anyhow::bail!("usage: tessera-bench staging egress | veth [--gib G] | big [--gib G]"),
    }
}

/// The receiving side of the plain copy: connect, write everything to OUT in 1 MiB reads (as
/// `nc | dd bs=1M` would), sync, exit.
pub fn copy_recv(addr: &str, out: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    let mut f = std::fs::File::create(out)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])?;
    }
    f.sync_all()?;
    Ok(())
}

fn state(dir: &Path, n: &str) -> PathBuf {
    dir.join(format!("{n}-state"))
}

fn metrics_addr(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("metrics.addr")).map(|s| s.trim().to_string()).unwrap_or_default()
}

async fn wait_nodes(url: &str, n: usize) -> anyhow::Result<()> {
    let mut c = cluster_client(url).await;
    let t = Instant::now();
    loop {
        let nodes = list_nodes(&mut c).await;
        if nodes.len() == n && nodes.iter().all(|x| x.state == pb::NodeState::Alive as i32) {
            return Ok(());
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "{n} nodes did not join");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn request(name: &str, model: &Path, pp: u32) -> pb::CreateDeploymentRequest {
    pb::CreateDeploymentRequest {
        name: name.into(),
        model_path: model.display().to_string(),
        tp: 1,
        pp,
        engine: pb::Engine::Probe as i32,
        staging: pb::StagingMode::On as i32,
        max_restarts: 10,
        ..Default::default()
    }
}

async fn get(c: &Client, name: &str) -> anyhow::Result<pb::Deployment> {
    Ok(c.clone().get(pb::GetDeploymentRequest { name: name.into() }).await?.into_inner())
}

async fn wait(
    c: &Client,
    name: &str,
    limit: Duration,
    pred: impl Fn(&pb::Deployment) -> bool,
) -> anyhow::Result<pb::Deployment> {
    let t = Instant::now();
    loop {
        if let Ok(d) = get(c, name).await
            && pred(&d)
        {
            return Ok(d);
        }
        anyhow::ensure!(t.elapsed() < limit, "{name}: timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn running(d: &pb::Deployment) -> bool {
    d.state == pb::DeploymentState::Running as i32
}

async fn delete(c: &Client, name: &str) -> anyhow::Result<()> {
    c.clone().delete(pb::DeleteDeploymentRequest { name: name.into() }).await?;
    let t = Instant::now();
    while get(c, name).await.is_ok() {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "{name} not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn needed(d: &pb::Deployment, node: &str, files: &[ModelFile]) -> BTreeSet<String> {
    let Some(r) = d.ranks.iter().find(|r| r.node == node) else { return BTreeSet::new() };
    let (first, last) = (r.pp_rank == 0, r.pp_rank + 1 == d.pp as u64);
    files.iter().filter(|f| f.needed_by(r.layer_start, r.layer_end, first, last)).map(|f| f.name.clone()).collect()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn cluster(dir: &Path, workers: usize, head_extra: &[&str], worker_extra: &[&str]) -> (HeadProc, Vec<Daemon>) {
    let mut h = vec!["--fake-gpus", "1x80GiB"];
    h.extend_from_slice(head_extra);
    let head = start_head(dir, "head", "127.0.0.1:0", &h);
    let mut w = vec!["--fake-gpus", "1x80GiB"];
    w.extend_from_slice(worker_extra);
    let ws = (1..=workers)
        .map(|i| start_worker_with(dir, &format!("w{i}"), &head.url, &state(dir, &format!("w{i}")), &w))
        .collect();
    (head, ws)
}

async fn egress() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    let files = model::write(&model_dir, 16, 16, 8 << 20)?;
    let model_bytes: u64 = files.iter().map(|f| f.size).sum();
    println!("model: 16 layers in 16 safetensors shards + 4 small files, {:.1} MiB", mib(model_bytes));
    for n in [1usize, 3, 4, 8] {
        let run = tempfile::tempdir()?;
        let (head, _ws) = cluster(run.path(), n, &[], &[]);
        wait_nodes(&head.url, n + 1).await?;
        let c = deployments_client(&head.url).await;
        c.clone().create(request("eg", &model_dir, n as u32 + 1)).await?;
        let d = wait(&c, "eg", Duration::from_secs(300), running).await?;
        let mut union = BTreeSet::new();
        let mut shares = Vec::new();
        for i in 1..=n {
            let w = format!("w{i}");
            let need = needed(&d, &w, &files);
            let bytes: u64 = files.iter().filter(|f| need.contains(&f.name)).map(|f| f.size).sum();
            shares.push((w, bytes));
            union.extend(need);
        }
        let union_bytes: u64 = files.iter().filter(|f| union.contains(&f.name)).map(|f| f.size).sum();
        let served = metric(&metrics_addr(&head.data_dir), "tessera_worker_stage_served_bytes_total") as u64;
        println!(
            "{n} receiving node(s) (PP {}): the head sent {:.1} MiB for a union of {:.1} MiB needed: {:.3}x (copying the model to each by hand: {:.1} MiB, {}x)",
            n + 1,
            mib(served),
            mib(union_bytes),
            served as f64 / union_bytes as f64,
            mib(model_bytes * n as u64),
            n
        );
        if n == 3 {
            for (w, b) in &shares {
                println!(
                    "  PP 4: {w} holds {:.1} MiB = {:.1}% of the model",
                    mib(*b),
                    100.0 * *b as f64 / model_bytes as f64
                );
            }
        }
        delete(&c, "eg").await?;
    }
    Ok(())
}

async fn veth(gib: u64) -> anyhow::Result<()> {
    let ns = Netns::create("stg").map_err(|e| anyhow::anyhow!("a network namespace is needed (root, ip): {e}"))?;
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    // Two layers in two shards: the worker (stage 1) needs the second shard, G GiB.
    let files = model::write(&model_dir, 2, 2, gib << 30)?;
    let shard = files.iter().find(|f| f.name.starts_with("model-00002")).expect("shard 2").clone();
    println!(
        "one shard of {:.2} GiB over a veth pair into a network namespace",
        shard.size as f64 / (1u64 << 30) as f64
    );
    let advertise = ns.outer_ip.clone();
    let head = start_head(dir.path(), "head", "0.0.0.0:0", &["--fake-gpus", "1x80GiB", "--advertise-addr", &advertise]);
    let port = head.url.rsplit(':').next().unwrap_or_default().to_string();
    let token = dir.path().join("w1.token");
    std::fs::write(&token, format!("{}\n", tessera_tests::JOIN_TOKEN))?;
    let worker_bin = tessera_tests::bin("tessera-worker").display().to_string();
    let args: Vec<String> = [
        "netns",
        "exec",
        &ns.name,
        &worker_bin,
        "--head",
        &format!("http://{advertise}:{port}"),
        "--node-name",
        "w1",
        "--state-dir",
        &state(dir.path(), "w1").display().to_string(),
        "--fake-gpus",
        "1x80GiB",
        "--token-file",
        &token.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _w1 = Daemon::spawn_program("w1", "ip", &args, dir.path());
    wait_nodes(&head.url, 2).await?;
    let c = deployments_client(&head.url).await;
    let mut rates = (Vec::new(), Vec::new());
    for round in 0..3 {
        // Staging: from the first sight of w1 fetching to done.
        let _ = std::fs::remove_dir_all(state(dir.path(), "w1").join("cache"));
        c.clone().create(request("v", &model_dir, 2)).await?;
        let w1 = |d: &pb::Deployment| d.staging_nodes.iter().find(|n| n.node == "w1").map(|n| n.phase.clone());
        wait(&c, "v", Duration::from_secs(600), |d| w1(d).is_some()).await?;
        let t0 = Instant::now();
        wait(&c, "v", Duration::from_secs(600), |d| w1(d).as_deref() == Some("done") || running(d)).await?;
        let staged = t0.elapsed().as_secs_f64();
        delete(&c, "v").await?;
        // The plain copy: the same bytes, one TCP stream into a file in the namespace.
        let out = state(dir.path(), "w1").join("copy.bin");
        let l = std::net::TcpListener::bind((advertise.as_str(), 0))?;
        let addr = l.local_addr()?.to_string();
        let me = std::env::current_exe()?.display().to_string();
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, &me, "copy-recv", &addr, &out.display().to_string()])
            .spawn()?;
        let (mut sock, _) = l.accept()?;
        let t0 = Instant::now();
        let mut f = std::fs::File::open(model_dir.join(&shard.name))?;
        std::io::copy(&mut f, &mut sock)?;
        drop(sock);
        anyhow::ensure!(child.wait()?.success(), "copy-recv failed");
        let copied = t0.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&out);
        let (s, p) = (shard.size as f64 / staged / 1e6, shard.size as f64 / copied / 1e6);
        println!(
            "round {round}: staging {s:.0} MB/s ({staged:.2} s), plain copy {p:.0} MB/s ({copied:.2} s): {:.0}%",
            100.0 * s / p
        );
        rates.0.push(s);
        rates.1.push(p);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (s, p) = (med(&mut rates.0), med(&mut rates.1));
    println!("median: staging {s:.0} MB/s vs plain copy {p:.0} MB/s: {:.0}%", 100.0 * s / p);
    Ok(())
}

async fn big(gib: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    let t = Instant::now();
    let files = model::write(&model_dir, 8, 8, (gib << 30) / 8)?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    println!(
        "checkpoint: {:.2} GiB in 8 shards, written in {:.1} s",
        total as f64 / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64()
    );
    let (head, mut ws) = cluster(dir.path(), 3, &[], &[]);
    wait_nodes(&head.url, 4).await?;
    let c = deployments_client(&head.url).await;
    let staging = |d: &pb::Deployment| d.state == pb::DeploymentState::Staging as i32;
    for kill in [false, true] {
        for i in 1..=3 {
            let _ = std::fs::remove_dir_all(state(dir.path(), &format!("w{i}")).join("cache"));
        }
        let t0 = Instant::now();
        c.clone().create(request("big", &model_dir, 4)).await?;
        let d = wait(&c, "big", Duration::from_secs(1800), |d| {
            d.staging_nodes.iter().any(|n| n.phase == "fetching") || running(d)
        })
        .await?;
        let hashed = t0.elapsed().as_secs_f64();
        let need: u64 = d.staging_nodes.iter().filter(|n| n.phase != "source").map(|n| n.bytes_needed).sum();
        if kill {
            // w3 half way: kill -9 its worker, start it again at once.
            wait(&c, "big", Duration::from_secs(1800), |d| {
                d.staging_nodes.iter().any(|n| n.node == "w3" && n.bytes_done * 2 >= n.bytes_needed) || running(d)
            })
            .await?;
            ws[2].signal(nix::sys::signal::Signal::SIGKILL);
            let _ = ws[2].wait();
            ws[2] =
                start_worker_with(dir.path(), "w3", &head.url, &state(dir.path(), "w3"), &["--fake-gpus", "1x80GiB"]);
        }
        let d = wait(&c, "big", Duration::from_secs(1800), |d| running(d) && !staging(d)).await?;
        let all = t0.elapsed().as_secs_f64();
        let w3 = metric(&metrics_addr(&state(dir.path(), "w3")), "tessera_worker_stage_fetched_bytes_total");
        println!(
            "{}: indexed in {hashed:.1} s (hashes {}), {:.2} GiB staged to 3 nodes, running {all:.1} s after create (generation {}); w3 fetched {:.2} GiB in its last run",
            if kill { "kill -9 of w3 half way" } else { "clean" },
            if kill { "kept from the first run" } else { "computed" },
            need as f64 / (1u64 << 30) as f64,
            d.generation,
            w3 / (1u64 << 30) as f64,
        );
        delete(&c, "big").await?;
    }
    Ok(())
}
