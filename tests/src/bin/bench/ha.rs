//! `tessera-bench ha failover|store`: heads on a real 3-member etcd on loopback.
//!
//! - `failover`: two heads (one leads), two workers, a TP 4 x PP 2 probe deployment; kill -9 of
//!   the leading head, then: time until the standby accepts a `Create`, until both workers are
//!   alive on it, and (after the recovery window) the engines restarted (goal: none).
//! - `store`: the same cluster on `--store redb` and on etcd: `Create` call latency, create ->
//!   running, kill -9 of a rank -> running again (a group restart writes the store twice).

use std::time::{Duration, Instant};

use super::wait_running;
use nix::sys::signal::Signal;
use tessera_proto::v1 as pb;
use tessera_tests::etcd::{EtcdCluster, free_port, start_ha_head, wait_leader};
use tessera_tests::process::{Daemon, start_head, two_workers};
use tessera_tests::{cluster_client, deployments_client, wait_alive};

fn probe(name: &str, tp: u32, pp: u32) -> pb::CreateDeploymentRequest {
    pb::CreateDeploymentRequest {
        name: name.into(),
        model_path: tessera_tests::deploy::model(),
        tp,
        pp,
        engine: pb::Engine::Probe as i32,
        ..Default::default()
    }
}

fn workers(dir: &std::path::Path, heads: &str) -> Vec<Daemon> {
    two_workers(dir, heads, &["--fake-gpus", "8x80GiB", "--orphan-timeout", "30s"])
}

pub async fn ha_bench(args: &[String]) -> anyhow::Result<()> {
    let runs =
        args.iter().position(|a| a == "--runs").and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(5);
    match args.get(2).map(String::as_str) {
        Some("failover") => failover(runs).await,
        Some("store") => store(runs).await,
        _ => anyhow::bail!("usage: tessera-bench ha failover|store [--runs N]"),
    }
}

async fn failover(runs: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = EtcdCluster::start(dir.path(), 3);
    let ports = [free_port(), free_port()];
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let mut heads: Vec<Option<Daemon>> = vec![None, None];
    heads[0] = Some(start_ha_head(dir.path(), "h0", &format!("127.0.0.1:{}", ports[0]), &etcd.store_url(), None));
    wait_leader(&urls[..1]).await;
    heads[1] = Some(start_ha_head(dir.path(), "h1", &format!("127.0.0.1:{}", ports[1]), &etcd.store_url(), None));
    let _w = workers(dir.path(), &urls.join(","));
    wait_alive(&urls[0], 2).await;
    let c = deployments_client(&urls[0]).await;
    c.clone().create(probe("m", 4, 2)).await?;
    tessera_tests::deploy::wait_for(&c, "m", "running", tessera_tests::deploy::running_at(1)).await;
    let (mut accept, mut rejoin) = (Vec::new(), Vec::new());
    let mut leader = 0;
    for run in 0..runs {
        let standby = 1 - leader;
        // Let the standby settle (it polls the leadership key) before the kill.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t0 = Instant::now();
        heads[leader] = None; // kill -9
        // Lazy: the standby gives its port back for a moment when it takes over.
        let ch = tonic::transport::Endpoint::from_shared(urls[standby].clone())?.connect_lazy();
        let bearer = tessera_common::auth::Bearer::new(Some(tessera_tests::ADMIN_TOKEN)).map_err(anyhow::Error::msg)?;
        let mut cs = pb::deployments_client::DeploymentsClient::with_interceptor(ch, bearer);
        let name = format!("after-{run}");
        loop {
            match cs.create(probe(&name, 1, 1)).await {
                Ok(_) => break,
                Err(_) => ch_sleep().await,
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "the standby never accepted a Create");
        }
        let a = t0.elapsed().as_secs_f64() * 1000.0;
        wait_alive(&urls[standby], 2).await;
        let r = t0.elapsed().as_secs_f64() * 1000.0;
        accept.push(a);
        rejoin.push(r);
        // Past the recovery window: the deployment was adopted, not restarted.
        tokio::time::sleep(Duration::from_secs(11)).await;
        let d = cs.get(pb::GetDeploymentRequest { name: "m".into() }).await?.into_inner();
        eprintln!(
            "run {run}: kill -9 of the leader -> Create accepted by the standby {a:.0} ms; both workers alive on it {r:.0} ms; m at generation {} with {} restarts",
            d.generation, d.restarts
        );
        anyhow::ensure!(d.generation == 1 && d.restarts == 0, "an engine restarted on failover");
        cs.delete(pb::DeleteDeploymentRequest { name }).await?;
        // The killed head comes back as a standby.
        heads[leader] = Some(start_ha_head(
            dir.path(),
            &format!("h{leader}"),
            &format!("127.0.0.1:{}", ports[leader]),
            &etcd.store_url(),
            None,
        ));
        leader = standby;
    }
    for (label, mut v) in
        [("kill -9 of the leader -> standby accepts Create", accept), ("-> both workers alive on it", rejoin)]
    {
        v.sort_by(f64::total_cmp);
        println!(
            "{label:<48} median {:.0} ms, min {:.0} ms, max {:.0} ms over {runs} runs (--leader-lease 3s); engine restarts: 0",
            v[v.len() / 2],
            v[0],
            v[v.len() - 1]
        );
    }
    Ok(())
}

async fn ch_sleep() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn store(runs: usize) -> anyhow::Result<()> {
    for backend in ["redb", "etcd"] {
        let dir = tempfile::tempdir()?;
        let etcd = (backend == "etcd").then(|| EtcdCluster::start(dir.path(), 3));
        let (head, url) = match &etcd {
            None => {
                let h = start_head(dir.path(), "head", "127.0.0.1:0", &["--no-worker"]);
                let url = h.url.clone();
                (h.daemon, url)
            }
            Some(e) => {
                let p = free_port();
                let url = format!("http://127.0.0.1:{p}");
                let d = start_ha_head(dir.path(), "head", &format!("127.0.0.1:{p}"), &e.store_url(), None);
                wait_leader(std::slice::from_ref(&url)).await;
                (d, url)
            }
        };
        let _w = workers(dir.path(), &url);
        wait_alive(&url, 2).await;
        let mut deps = deployments_client(&url).await;
        let mut client = cluster_client(&url).await;
        let (mut call, mut up, mut again) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            let name = format!("bench-{i}");
            let mut events = client.watch_events(pb::WatchEventsRequest { include_current: false }).await?.into_inner();
            let t0 = Instant::now();
            deps.create(probe(&name, 4, 2)).await?;
            call.push(t0.elapsed().as_secs_f64() * 1000.0);
            let d = wait_running(&mut events, &name, 1).await?;
            up.push(t0.elapsed().as_secs_f64() * 1000.0);
            let t1 = Instant::now();
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.ranks[5].pid as i32), Signal::SIGKILL)?;
            wait_running(&mut events, &name, 2).await?;
            again.push(t1.elapsed().as_secs_f64() * 1000.0);
            deps.delete(pb::DeleteDeploymentRequest { name: name.clone() }).await?;
            while deps.get(pb::GetDeploymentRequest { name: name.clone() }).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for (label, mut v) in
            [("Create call", call), ("create -> running", up), ("kill -9 of a rank -> running again", again)]
        {
            v.sort_by(f64::total_cmp);
            println!(
                "{backend:<5} {label:<36} median {:.1} ms, min {:.1} ms, max {:.1} ms over {runs} runs",
                v[v.len() / 2],
                v[0],
                v[v.len() - 1]
            );
        }
        drop(head);
    }
    Ok(())
}
