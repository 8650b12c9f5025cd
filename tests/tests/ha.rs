//! Heads that take over from each other (`--store etcd://...`), against a real 3-member etcd
//! cluster on loopback: kill -9 of the leading head, a frozen (SIGSTOP) leader that must not act
//! when it wakes, an etcd member lost, a head cut off from etcd in a network namespace. Engines
//! (the probe) run on two workers given every head; none may restart on a failover.

use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;
use tessera_proto::v1 as pb;
use tessera_tests::deploy::{Client, probe, running_at, wait_for};
use tessera_tests::etcd::{EtcdCluster, free_port, leads, start_ha_head, start_ha_head_with, wait_leader};
use tessera_tests::netns::Netns;
use tessera_tests::process::{Reaper, two_workers};
use tessera_tests::{Daemon, deployments_client, start_worker_with, wait_until};

/// Probe engines (and their shims) of this test's workers.
fn engine_pids(tag: &str) -> Vec<u32> {
    let mut v = tessera_tests::process::probes_of(tag);
    v.sort();
    v
}

fn cli(heads: &str, admin: &Path, args: &[&str]) -> std::process::Output {
    Command::new(tessera_tests::bin("tessera"))
        .args(["--head", heads])
        .args(args)
        .env("TESSERA_TOKEN_FILE", admin)
        .output()
        .expect("run tessera")
}

/// An etcd cluster, heads (the first started first, so it leads), two workers given every head.
/// Fields drop in order: workers, their engines, heads, etcd, the directory.
struct Ha {
    _workers: Vec<Daemon>,
    _reaper: Reaper,
    heads: Vec<Option<Daemon>>,
    etcd: EtcdCluster,
    urls: Vec<String>,
    dir: tempfile::TempDir,
}

impl Ha {
    async fn start(n_heads: usize) -> Ha {
        let dir = tempfile::tempdir().expect("tempdir");
        let etcd = EtcdCluster::start(dir.path(), 3);
        let ports: Vec<u16> = (0..n_heads).map(|_| free_port()).collect();
        let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        let mut heads = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            heads.push(Some(start_ha_head(
                dir.path(),
                &format!("h{i}"),
                &format!("127.0.0.1:{p}"),
                &etcd.store_url(),
                None,
            )));
            if i == 0 {
                assert_eq!(wait_leader(&urls[..1]).await, 0);
            }
        }
        let all = urls.join(",");
        let workers = two_workers(dir.path(), &all, &["--orphan-timeout", "3s", "--fake-gpus", "8x80GiB"]);
        let ha = Ha { _reaper: Reaper::new(dir.path()), dir, etcd, heads, urls, _workers: workers };
        tessera_tests::wait_alive(&ha.urls[0], 2).await;
        ha
    }

    fn tag(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn admin(&self) -> std::path::PathBuf {
        self.dir.path().join("h0/admin.token")
    }

    async fn client(&self, i: usize) -> Client {
        deployments_client(&self.urls[i]).await
    }

    fn log(&self, i: usize) -> String {
        self.heads[i].as_ref().map(|d| d.log_text()).unwrap_or_default()
    }
}

async fn restarts(c: &Client, name: &str) -> (u64, u32) {
    let d = c.clone().get(pb::GetDeploymentRequest { name: name.into() }).await.expect("get").into_inner();
    (d.generation, d.restarts)
}

#[tokio::test]
async fn kill_9_of_the_leading_head_a_standby_takes_over_and_no_engine_restarts() {
    let mut ha = Ha::start(2).await;
    let c0 = ha.client(0).await;
    c0.clone().create(probe("m", 4, 2)).await.expect("create");
    wait_for(&c0, "m", "running at generation 1", running_at(1)).await;
    let before = engine_pids(&ha.tag());
    assert_eq!(before.len(), 8, "8 probe ranks");
    // A standby answers with the leader's address.
    let mut on_standby = ha.client(1).await;
    let e = on_standby.list(pb::ListDeploymentsRequest::default()).await.expect_err("a standby does not serve");
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains(&ha.urls[0]), "names the leader: {}", e.message());

    ha.heads[0] = None; // kill -9
    assert_eq!(wait_leader(&ha.urls).await, 1, "the standby leads");
    let c1 = ha.client(1).await;
    // The workers follow the new leader, which adopts the running engines: same generation, no
    // restart, the same processes.
    tessera_tests::wait_alive(&ha.urls[1], 2).await;
    wait_for(&c1, "m", "running, adopted", running_at(1)).await;
    // The CLI given both heads finds the leader and creates through it.
    let all = ha.urls.join(",");
    let out = cli(
        &all,
        &ha.admin(),
        &["deploy", "n", "--model", &tessera_tests::deploy::model(), "--tp", "2", "--engine", "probe"],
    );
    assert!(out.status.success(), "create through the new leader: {}", String::from_utf8_lossy(&out.stderr));
    wait_for(&c1, "n", "running", running_at(1)).await;
    // Past the recovery window (10 s), nothing was restarted.
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    assert_eq!(restarts(&c1, "m").await, (1, 0), "no restart on failover");
    let after: Vec<u32> = engine_pids(&ha.tag());
    assert!(before.iter().all(|p| after.contains(p)), "the same engine processes: {before:?} vs {after:?}");

    // One etcd member of three lost: the head goes on (reads and fenced writes).
    ha.etcd.kill(0);
    c1.clone().delete(pb::DeleteDeploymentRequest { name: "n".into() }).await.expect("delete with 2 of 3 members");
    wait_until("n gone", || {
        let mut c = c1.clone();
        async move { c.get(pb::GetDeploymentRequest { name: "n".into() }).await.is_err().then_some(()) }
    })
    .await;
    c1.clone().create(probe("o", 2, 1)).await.expect("create with 2 of 3 members");
    wait_for(&c1, "o", "running", running_at(1)).await;
    assert!(leads(&ha.urls[1]).await, "still the leader");
    assert!(!ha.log(1).contains("lost leadership"), "{}", ha.log(1));
}

#[tokio::test]
async fn a_frozen_leader_is_replaced_and_does_not_act_when_it_wakes() {
    let mut ha = Ha::start(2).await;
    let c0 = ha.client(0).await;
    c0.clone().create(probe("a", 2, 1)).await.expect("create a");
    c0.clone().create(probe("b", 2, 1)).await.expect("create b");
    wait_for(&c0, "a", "running", running_at(1)).await;
    wait_for(&c0, "b", "running", running_at(1)).await;

    ha.heads[0].as_ref().expect("h0").signal(Signal::SIGSTOP);
    assert_eq!(wait_leader(&ha.urls[1..]).await, 0, "h1 leads while h0 is frozen");
    let c1 = ha.client(1).await;
    tessera_tests::wait_alive(&ha.urls[1], 2).await;
    wait_for(&c1, "b", "adopted", running_at(1)).await;
    // The new leader changes things the frozen one still believes otherwise.
    c1.clone().delete(pb::DeleteDeploymentRequest { name: "a".into() }).await.expect("delete a");
    wait_until("a gone", || {
        let mut c = c1.clone();
        async move { c.get(pb::GetDeploymentRequest { name: "a".into() }).await.is_err().then_some(()) }
    })
    .await;
    let b_pids = engine_pids(&ha.tag());
    assert_eq!(b_pids.len(), 2, "only b's ranks run");

    // h0 wakes: its lease ran out while it was frozen; it must stop without acting.
    ha.heads[0].as_ref().expect("h0").signal(Signal::SIGCONT);
    let status = ha.heads[0].as_mut().expect("h0").wait();
    assert_eq!(status.code(), Some(75), "exits for its supervisor to restart it as a standby:\n{}", ha.log(0));
    assert!(ha.log(0).contains("lost leadership"), "says why:\n{}", ha.log(0));
    // Nothing it believed was written or launched: a stays deleted, b untouched.
    assert!(c1.clone().get(pb::GetDeploymentRequest { name: "a".into() }).await.is_err(), "a stays deleted");
    assert_eq!(restarts(&c1, "b").await, (1, 0));
    assert_eq!(engine_pids(&ha.tag()), b_pids, "no engine started or stopped");
    let keys = ha.etcd.ctl(&["get", "--prefix", "--keys-only", "/tessera/deployments/"]).expect("etcdctl");
    assert!(!keys.contains("/tessera/deployments/a"), "no record of a written back: {keys}");
    // Started again (as a supervisor would), it stands by.
    let port = ha.urls[0].rsplit(':').next().expect("port").to_string();
    ha.heads[0] = Some(start_ha_head(ha.dir.path(), "h0", &format!("127.0.0.1:{port}"), &ha.etcd.store_url(), None));
    wait_until("h0 stands by", || {
        let l = ha.log(0);
        async move { l.contains("standing by; another head leads").then_some(()) }
    })
    .await;
    assert!(leads(&ha.urls[1]).await);
}

#[tokio::test]
async fn a_leader_cut_off_from_etcd_stops_acting_within_its_lease_and_engines_keep_running() {
    let ns = Netns::create("ha").expect("netns (needs root and ip)");
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = Reaper::new(dir.path());
    // etcd serves on loopback and on the veth end in the test's namespace; the head inside the
    // namespace reaches it only over the link the test cuts.
    let etcd = EtcdCluster::start_on(dir.path(), 3, Some(&ns.outer_ip));
    let inner_port = free_port();
    let h0_url = format!("http://{}:{inner_port}", ns.inner_ip);
    let mut h0 = start_ha_head(
        dir.path(),
        "h0",
        &format!("{}:{inner_port}", ns.inner_ip),
        &etcd.store_url_on(&ns.outer_ip),
        Some(&ns.name),
    );
    assert_eq!(wait_leader(std::slice::from_ref(&h0_url)).await, 0);
    let p1 = free_port();
    let h1_url = format!("http://127.0.0.1:{p1}");
    let h1 = start_ha_head(dir.path(), "h1", &format!("127.0.0.1:{p1}"), &etcd.store_url(), None);
    let all = format!("{h0_url},{h1_url}");
    let _workers: Vec<Daemon> = two_workers(dir.path(), &all, &["--orphan-timeout", "3s", "--fake-gpus", "8x80GiB"]);
    tessera_tests::wait_alive(&h0_url, 2).await;
    let c0 = deployments_client(&h0_url).await;
    c0.clone().create(probe("m", 4, 2)).await.expect("create");
    wait_for(&c0, "m", "running", running_at(1)).await;
    let tag = dir.path().display().to_string();
    let before = engine_pids(&tag);
    assert_eq!(before.len(), 8);

    ns.cut();
    // h0 can renew its lease no more: it stops acting (and exits) on its own, saying why.
    let status = h0.wait();
    assert_eq!(status.code(), Some(75), "{}", h0.log_text());
    let log = h0.log_text();
    assert!(log.contains("lost leadership"), "{log}");
    assert!(log.contains("lease ran out"), "{log}");
    // h1 takes over; the workers follow it; the engines were never touched.
    assert_eq!(wait_leader(std::slice::from_ref(&h1_url)).await, 0);
    tessera_tests::wait_alive(&h1_url, 2).await;
    let c1 = deployments_client(&h1_url).await;
    wait_for(&c1, "m", "adopted", running_at(1)).await;
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    assert_eq!(restarts(&c1, "m").await, (1, 0));
    assert_eq!(engine_pids(&tag), before, "the same engines");
    drop(h1);
}

#[tokio::test]
async fn heads_sign_in_to_etcd_and_a_rotated_join_token_holds_on_the_next_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let mut etcd = EtcdCluster::start(dir.path(), 1);
    etcd.enable_auth("s3cret");
    let pw = dir.path().join("etcd.pw");
    std::fs::write(&pw, "s3cret\n").expect("password file");
    let bad = dir.path().join("bad.pw");
    std::fs::write(&bad, "nope\n").expect("password file");
    let auth = |file: &Path| -> Vec<String> {
        vec!["--etcd-user".into(), "root".into(), "--etcd-password-file".into(), file.display().to_string()]
    };
    // A wrong password: the head says so and stops.
    let p = free_port();
    let mut wrong = start_ha_head_with(dir.path(), "hx", &format!("127.0.0.1:{p}"), &etcd.store_url(), &auth(&bad));
    let status = wrong.wait();
    assert_eq!(status.code(), Some(1));
    assert!(wrong.log_text().contains("--etcd-user \"root\""), "{}", wrong.log_text());
    // Without signing in, etcd refuses: said plainly too.
    let mut anon = start_ha_head_with(dir.path(), "hy", &format!("127.0.0.1:{p}"), &etcd.store_url(), &[]);
    assert_eq!(anon.wait().code(), Some(1));

    let ports = [free_port(), free_port()];
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let h0 =
        Some(start_ha_head_with(dir.path(), "h0", &format!("127.0.0.1:{}", ports[0]), &etcd.store_url(), &auth(&pw)));
    assert_eq!(wait_leader(&urls[..1]).await, 0);
    let _h1 = start_ha_head_with(dir.path(), "h1", &format!("127.0.0.1:{}", ports[1]), &etcd.store_url(), &auth(&pw));
    // Rotate the join token on the leader; the next leader must know the new one.
    let all = urls.join(",");
    let out = cli(&all, &dir.path().join("h0/admin.token"), &["tokens", "rotate-join"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fresh = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(fresh.starts_with("tsj_"), "{fresh}");
    drop(h0); // kill -9
    assert_eq!(wait_leader(&urls).await, 1);
    let fresh_file = dir.path().join("fresh.token");
    std::fs::write(&fresh_file, format!("{fresh}\n")).expect("token");
    let state = dir.path().join("w-new-state");
    let _w = start_worker_with(dir.path(), "w-new", &all, &state, &["--token-file", &fresh_file.display().to_string()]);
    tessera_tests::wait_alive(&urls[1], 1).await;
    // The old token joins nobody.
    let mut old = start_worker_with(dir.path(), "w-old", &urls[1], &dir.path().join("w-old-state"), &[]);
    assert_eq!(old.wait().code(), Some(1), "{}", old.log_text());
}

#[tokio::test]
async fn heads_reach_etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let pki = tessera_tests::pki::pki(dir.path());
    let (ca, cert, key) =
        (pki.ca.display().to_string(), pki.client_cert.display().to_string(), pki.client_key.display().to_string());
    let etcd = EtcdCluster::start_tls(dir.path(), 1, pki);
    let store = etcd.store_url().replace("etcd://", "etcds://");
    let p = free_port();
    // Without a client certificate etcd refuses the handshake: the head never leads and says why
    // (it keeps trying: the certificate may be being rolled out).
    let px = free_port();
    let no_cert =
        start_ha_head_with(dir.path(), "hx", &format!("127.0.0.1:{px}"), &store, &["--etcd-ca".into(), ca.clone()]);
    wait_until("the TLS refusal is said", || {
        let log = no_cert.log_text();
        async move { (log.contains("BadCertificate") && log.contains("check --etcd-ca, --etcd-cert")).then_some(()) }
    })
    .await;
    assert!(!leads(&format!("http://127.0.0.1:{px}")).await);
    drop(no_cert);
    // An etcds:// store without the CA is refused before anything starts.
    let mut no_ca = start_ha_head_with(dir.path(), "hy", &format!("127.0.0.1:{p}"), &store, &[]);
    assert_eq!(no_ca.wait().code(), Some(2));
    assert!(no_ca.log_text().contains("--etcd-ca"), "{}", no_ca.log_text());

    let url = format!("http://127.0.0.1:{p}");
    let _h = start_ha_head_with(
        dir.path(),
        "h0",
        &format!("127.0.0.1:{p}"),
        &store,
        &["--etcd-ca".into(), ca, "--etcd-cert".into(), cert, "--etcd-key".into(), key],
    );
    assert_eq!(wait_leader(std::slice::from_ref(&url)).await, 0);
    let c = deployments_client(&url).await;
    // No worker: the deployment waits for GPUs, but its record is in etcd (over TLS).
    c.clone().create(probe("t", 1, 1)).await.expect("create");
    let keys = etcd.ctl(&["get", "--prefix", "--keys-only", "/tessera/deployments/"]).expect("etcdctl");
    assert!(keys.contains("/tessera/deployments/t"), "{keys}");
}
