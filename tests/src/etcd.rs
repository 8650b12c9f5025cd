//! A real etcd cluster for tests (`etcd` and `etcdctl` from Debian's etcd-server and etcd-client):
//! members on loopback ports (and, when asked, also on an address of a network namespace's link
//! that the test made), each a child process with its own data dir, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::Daemon;

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub daemon: Option<Daemon>,
    args: Vec<String>,
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    dir: PathBuf,
    /// An extra address the members also serve clients on (a veth end in the test's namespace).
    pub extra_ip: Option<String>,
    /// `user:password` for etcdctl once etcd's authentication is on.
    pub user: Option<String>,
    /// Clients must use TLS with a client certificate from this PKI.
    pub tls: Option<crate::pki::Pki>,
}

/// A free loopback port (the kernel's pick; released before the member binds it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Whether this machine has etcd and etcdctl, installed from Debian's packages when missing.
pub fn installed() -> bool {
    crate::process::ensure_command("etcd", &["etcd-server", "etcd-client"])
        .and_then(|()| crate::process::ensure_command("etcdctl", &["etcd-client"]))
        .inspect_err(|e| eprintln!("{e}"))
        .is_ok()
}

impl EtcdCluster {
    /// `n` members on loopback, started and healthy.
    pub fn start(dir: &Path, n: usize) -> EtcdCluster {
        Self::start_on(dir, n, None)
    }

    /// `n` members, also serving clients on `extra_ip` (same port).
    pub fn start_on(dir: &Path, n: usize, extra_ip: Option<&str>) -> EtcdCluster {
        Self::start_with(dir, n, extra_ip, None)
    }

    /// `n` members whose clients must speak TLS and present a certificate signed by `pki`'s CA.
    pub fn start_tls(dir: &Path, n: usize, pki: crate::pki::Pki) -> EtcdCluster {
        Self::start_with(dir, n, None, Some(pki))
    }

    fn start_with(dir: &Path, n: usize, extra_ip: Option<&str>, tls: Option<crate::pki::Pki>) -> EtcdCluster {
        let scheme = if tls.is_some() { "https" } else { "http" };
        assert!(installed(), "etcd is not installed: apt-get install etcd-server etcd-client (.ci/run does this)");
        let peers: Vec<(String, u16, u16)> = (0..n).map(|i| (format!("m{i}"), free_port(), free_port())).collect();
        let initial =
            peers.iter().map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}")).collect::<Vec<_>>().join(",");
        let token = format!("tessera-test-{}-{}", std::process::id(), free_port());
        let mut members = Vec::new();
        for (name, client, peer) in &peers {
            let data = dir.join(format!("etcd-{name}"));
            let mut listen = format!("{scheme}://127.0.0.1:{client}");
            if let Some(ip) = extra_ip {
                listen.push_str(&format!(",{scheme}://{ip}:{client}"));
            }
            let mut args: Vec<String> = [
                "--name",
                name,
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &listen,
                "--advertise-client-urls",
                &format!("{scheme}://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                &token,
                "--initial-cluster-state",
                "new",
                "--log-level",
                "warn",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if let Some(p) = &tls {
                for (k, v) in
                    [("--cert-file", &p.server_cert), ("--key-file", &p.server_key), ("--trusted-ca-file", &p.ca)]
                {
                    args.extend([k.to_string(), v.display().to_string()]);
                }
                args.push("--client-cert-auth".into());
            }
            let daemon = Daemon::spawn_program(&format!("etcd-{name}"), "etcd", &args, dir);
            members.push(Member { name: name.clone(), client_port: *client, daemon: Some(daemon), args });
        }
        let c =
            EtcdCluster { members, dir: dir.to_path_buf(), extra_ip: extra_ip.map(str::to_string), user: None, tls };
        c.wait_healthy();
        c
    }

    /// `etcd://127.0.0.1:P1,...` for `--store`.
    pub fn store_url(&self) -> String {
        self.store_url_on("127.0.0.1")
    }

    pub fn store_url_on(&self, ip: &str) -> String {
        format!(
            "etcd://{}",
            self.members.iter().map(|m| format!("{ip}:{}", m.client_port)).collect::<Vec<_>>().join(",")
        )
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs etcdctl against the members that are up; its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let up: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.daemon.is_some())
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect();
        let mut cmd = Command::new("etcdctl");
        if let Some(p) = &self.tls {
            for (k, v) in [("--cacert", &p.ca), ("--cert", &p.client_cert), ("--key", &p.client_key)] {
                cmd.arg(format!("{k}={}", v.display()));
            }
        }
        if let Some(u) = &self.user {
            cmd.arg(format!("--user={u}"));
        }
        let out = cmd
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", up.join(",")))
            .arg("--command-timeout=5s")
            .args(args)
            .output()
            .map_err(|e| format!("etcdctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Waits until every running member answers healthy (etcdctl exits 0 only then).
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + crate::HANG;
        loop {
            let r = self.ctl(&["endpoint", "health"]);
            if r.is_ok() {
                return;
            }
            if Instant::now() > deadline {
                let logs: String =
                    self.members.iter().filter_map(|m| m.daemon.as_ref()).map(|d| d.log_text()).collect();
                panic!("etcd did not become healthy ({r:?}; endpoints {}):\n{logs}", self.endpoints());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Turns etcd's authentication on with a `root` user of this password (etcdctl then signs in).
    pub fn enable_auth(&mut self, password: &str) {
        self.ctl(&["user", "add", &format!("root:{password}"), "--interactive=false"]).expect("user add");
        self.ctl(&["auth", "enable"]).expect("auth enable");
        self.user = Some(format!("root:{password}"));
    }

    /// kill -9 of one member.
    pub fn kill(&mut self, i: usize) {
        self.members[i].daemon = None;
    }

    /// Starts a killed member again (same data dir: it rejoins).
    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        let args: Vec<String> = m.args.iter().map(|a| if a == "new" { "existing".into() } else { a.clone() }).collect();
        m.daemon = Some(Daemon::spawn_program(&format!("etcd-{}", m.name), "etcd", &args, &self.dir));
    }
}

pub fn start_ha_head_with(dir: &Path, name: &str, listen: &str, store: &str, extra: &[String]) -> Daemon {
    start_ha_head_in(dir, name, listen, store, None, extra)
}

/// A head on etcd, on a fixed port, with no worker of its own.
pub fn start_ha_head(dir: &Path, name: &str, listen: &str, store: &str, netns: Option<&str>) -> Daemon {
    start_ha_head_in(dir, name, listen, store, netns, &[])
}

pub fn start_ha_head_in(
    dir: &Path,
    name: &str,
    listen: &str,
    store: &str,
    netns: Option<&str>,
    extra: &[String],
) -> Daemon {
    let data_dir = dir.join(name);
    crate::write_tokens(&data_dir);
    let mut args: Vec<String> = vec![
        "--listen".into(),
        listen.into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--no-worker".into(),
        "--store".into(),
        store.into(),
        "--metrics-listen".into(),
        format!("{}:0", listen.rsplit_once(':').expect("host:port").0),
    ];
    args.extend(extra.iter().cloned());
    match netns {
        None => Daemon::spawn(name, "tessera-head", &args, dir),
        Some(ns) => {
            let mut full: Vec<String> = vec!["netns".into(), "exec".into(), ns.into()];
            full.push(crate::bin("tessera-head").display().to_string());
            full.append(&mut args);
            Daemon::spawn_program(name, "ip", &full, dir)
        }
    }
}

/// Whether the head at `url` leads: its health check for the tessera services says SERVING (a
/// standby says NOT_SERVING).
pub async fn leads(url: &str) -> bool {
    let Ok(ch) = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect_timeout(std::time::Duration::from_secs(1))
        .timeout(std::time::Duration::from_secs(2))
        .connect()
        .await
    else {
        return false;
    };
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    h.check(tonic_health::pb::HealthCheckRequest { service: "tessera.v1.Cluster".into() })
        .await
        .is_ok_and(|r| r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

pub async fn wait_leader(urls: &[String]) -> usize {
    crate::wait_until("a head leads", || async {
        for (i, u) in urls.iter().enumerate() {
            if leads(u).await {
                return Some(i);
            }
        }
        None
    })
    .await
}
