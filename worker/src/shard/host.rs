//! The agent's side of hosting shards: launches shims, keeps a connection to each, reports their
//! processes' states up the session, answers log requests, and fences stale generations.
//!
//! The table of processes outlives sessions: shims keep running while the head is away, and a
//! new session starts with a snapshot of them. A restarted agent finds its shims again from the
//! state directory ([`ShardHost::adopt`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::spec::{self, ShimCommand, ShimSpec, ShimState};

/// Settings of the shard host, from the worker's flags.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub state_dir: PathBuf,
    /// The binary that has the `shim` and `probe` modes (this one).
    pub exe: PathBuf,
    /// `--vllm-bin`; else `vllm` is looked up on PATH.
    pub vllm_bin: Option<PathBuf>,
    /// `--allow-command`: run the command engine's shell templates.
    pub allow_command: bool,
    /// `--orphan-timeout`: a shim without its agent this long stops its engine.
    pub orphan_timeout: Duration,
    /// Largest `output.log` before rotation.
    pub log_max_bytes: u64,
    /// `--engine-user`: engines run as this user.
    pub engine_user: Option<spec::EngineUser>,
}

/// A process: deployment name, incarnation, generation, process key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    deployment: String,
    uid: String,
    generation: u64,
    key: String,
}

impl Key {
    /// Fencing: is this process superseded when `uid`'s generation `below` of its deployment runs?
    /// Any other incarnation of the same name always is; `below == u64::MAX` means every one.
    fn superseded(&self, deployment: &str, uid: &str, below: u64) -> bool {
        self.deployment == deployment && (self.uid != uid || self.generation < below)
    }
}

struct Proc {
    dir: PathBuf,
    last: pb::ShardReport,
    cmd: Option<mpsc::UnboundedSender<ShimCommand>>,
    exited: bool,
}

#[derive(Clone)]
pub struct ShardHost {
    cfg: Arc<HostConfig>,
    procs: Arc<Mutex<HashMap<Key, Proc>>>,
    up: mpsc::UnboundedSender<pb::WorkerMessage>,
    logs: Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>>,
}

fn shard_msg(r: pb::ShardReport) -> pb::WorkerMessage {
    pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Shard(r)) }
}

impl ShardHost {
    /// The host, and the receiver of everything it wants to tell the head.
    pub fn new(cfg: HostConfig) -> (ShardHost, mpsc::UnboundedReceiver<pb::WorkerMessage>) {
        let (up, rx) = mpsc::unbounded_channel();
        let host = ShardHost { cfg: Arc::new(cfg), procs: Default::default(), up, logs: Default::default() };
        (host, rx)
    }

    /// Every process this worker knows, as of now, for a join.
    pub fn snapshot(&self) -> Vec<pb::ShardReport> {
        self.procs.lock().expect("lock").values().map(|p| p.last.clone()).collect()
    }

    fn update(&self, key: &Key, f: impl FnOnce(&mut Proc)) {
        let report = {
            let mut procs = self.procs.lock().expect("lock");
            let Some(p) = procs.get_mut(key) else { return };
            f(p);
            p.last.clone()
        };
        let _ = self.up.send(shard_msg(report));
    }

    /// Starts a generation's processes, after stopping (and waiting out) older generations.
    pub fn launch(&self, l: pb::LaunchShards) {
        let host = self.clone();
        tokio::spawn(async move { host.launch_inner(l).await });
    }

    async fn launch_inner(&self, l: pb::LaunchShards) {
        let grace = Duration::from_secs(l.stop_grace_s.max(1) as u64);
        // Fencing: nothing of an older generation may run beside the new one.
        self.stop_matching(&l.deployment, &l.deployment_uid, l.generation, "superseded by a newer generation");
        self.wait_stopped(&l.deployment, &l.deployment_uid, l.generation, grace + Duration::from_secs(5)).await;

        let (master_port, health_port) =
            if l.pick_ports { free_ports().unwrap_or((0, 0)) } else { (l.master_port as u16, l.health_port as u16) };
        for p in l.processes {
            let key = Key {
                deployment: l.deployment.clone(),
                uid: l.deployment_uid.clone(),
                generation: l.generation,
                key: p.key.clone(),
            };
            if self.procs.lock().expect("lock").contains_key(&key) {
                continue; // already launched (a repeated message)
            }
            let dir = spec::process_dir(&self.cfg.state_dir, &l.deployment, &l.deployment_uid, l.generation, &p.key);
            let mut report = pb::ShardReport {
                deployment: l.deployment.clone(),
                deployment_uid: l.deployment_uid.clone(),
                generation: l.generation,
                key: p.key.clone(),
                ranks: p.ranks.clone(),
                state: pb::ProcessState::Starting as i32,
                master_port: master_port as u32,
                health_port: health_port as u32,
                ..Default::default()
            };
            let argv = match self.program(&p).and_then(|prog| self.check_env(&p).map(|()| prog)) {
                Ok(prog) => {
                    let mut v = prog;
                    v.extend(p.args.iter().map(|a| subst(a, master_port, health_port)));
                    v
                }
                Err(why) => {
                    warn!(deployment = %l.deployment, key = %p.key, %why, "cannot launch");
                    report.state = pb::ProcessState::Exited as i32;
                    report.exit_code = Some(127);
                    report.error = why.clone();
                    report.log_tail = why;
                    report.exited_unix_ms = spec::unix_ms();
                    self.procs
                        .lock()
                        .expect("lock")
                        .insert(key, Proc { dir, last: report.clone(), cmd: None, exited: true });
                    let _ = self.up.send(shard_msg(report));
                    continue;
                }
            };
            let health = if p.health_check {
                Some(if p.health_port > 0 { p.health_port as u16 } else { health_port })
            } else {
                None
            };
            let shim_spec = ShimSpec {
                deployment: l.deployment.clone(),
                deployment_uid: l.deployment_uid.clone(),
                generation: l.generation,
                key: p.key.clone(),
                ranks: p.ranks.clone(),
                argv,
                env: p
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), subst(v, master_port, health_port)))
                    .collect::<BTreeMap<_, _>>(),
                stop_grace_s: grace.as_secs(),
                orphan_timeout_s: self.cfg.orphan_timeout.as_secs().max(1),
                log_max_bytes: self.cfg.log_max_bytes,
                health_port: health,
                master_port: Some(master_port),
                run_as: self.cfg.engine_user.clone(),
            };
            if let Err(e) = std::fs::create_dir_all(&dir)
                .and_then(|_| spec::write_json(&spec::spec_path(&dir), &shim_spec))
                .and_then(|_| self.give_dir_to_engine(&dir))
            {
                report.state = pb::ProcessState::Exited as i32;
                report.exit_code = Some(127);
                report.error = format!("cannot write {}: {e}", dir.display());
                report.exited_unix_ms = spec::unix_ms();
                self.procs
                    .lock()
                    .expect("lock")
                    .insert(key, Proc { dir, last: report.clone(), cmd: None, exited: true });
                let _ = self.up.send(shard_msg(report));
                continue;
            }
            self.procs
                .lock()
                .expect("lock")
                .insert(key.clone(), Proc { dir: dir.clone(), last: report.clone(), cmd: None, exited: false });
            let _ = self.up.send(shard_msg(report));
            match tokio::process::Command::new(&self.cfg.exe)
                .arg("shim")
                .arg("--dir")
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(mut child) => {
                    // Reap the shim when it exits (it is our child until we die).
                    tokio::spawn(async move {
                        let _ = child.wait().await;
                    });
                    info!(deployment = %l.deployment, generation = l.generation, key = %p.key, "shim started");
                    let wait_rtt = is_probe_member(&shim_spec);
                    self.attach(key, dir, health, wait_rtt);
                }
                Err(e) => {
                    self.update(&key, |pr| {
                        pr.exited = true;
                        pr.last.state = pb::ProcessState::Exited as i32;
                        pr.last.exit_code = Some(127);
                        pr.last.error = format!("cannot start the shim {}: {e}", self.cfg.exe.display());
                        pr.last.exited_unix_ms = spec::unix_ms();
                    });
                }
            }
        }
        self.prune(&l.deployment, &l.deployment_uid);
    }

    /// Generations of a deployment whose processes (and logs) are kept: the two newest.
    pub const KEEP_GENERATIONS: usize = 2;

    /// Forgets the exited processes of `deployment` older than its [`Self::KEEP_GENERATIONS`]
    /// newest generations (the current incarnation's first), with their directories: a deployment
    /// that restarts for a week does not fill the disk or the metrics with dead generations.
    fn prune(&self, deployment: &str, current_uid: &str) {
        let mut procs = self.procs.lock().expect("lock");
        let mut gens: Vec<(bool, u64, String)> = procs
            .keys()
            .filter(|k| k.deployment == deployment)
            .map(|k| (k.uid == current_uid, k.generation, k.uid.clone()))
            .collect();
        gens.sort();
        gens.dedup();
        gens.reverse();
        let keep: std::collections::HashSet<(String, u64)> =
            gens.into_iter().take(Self::KEEP_GENERATIONS).map(|(_, g, u)| (u, g)).collect();
        let old: Vec<Key> = procs
            .iter()
            .filter(|(k, p)| k.deployment == deployment && p.exited && !keep.contains(&(k.uid.clone(), k.generation)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in old {
            if let Some(p) = procs.remove(&k) {
                let _ = std::fs::remove_dir_all(&p.dir);
                if let Some(generation_dir) = p.dir.parent() {
                    // Only once every process of that generation is gone from it.
                    let _ = std::fs::remove_dir(generation_dir);
                }
                info!(deployment = %k.deployment, generation = k.generation, key = %k.key, "old generation forgotten");
            }
        }
    }

    /// With `--engine-user`, the engine may write into its own process dir (the probe's round trip,
    /// its own files); nothing above it.
    fn give_dir_to_engine(&self, dir: &Path) -> std::io::Result<()> {
        match &self.cfg.engine_user {
            Some(u) => std::os::unix::fs::chown(dir, Some(u.uid), Some(u.gid)),
            None => Ok(()),
        }
    }

    /// A deployment's env may not hook loaders or interpreters (`LD_PRELOAD`, `PYTHONSTARTUP`,
    /// `BROWSER` ...) unless this worker runs arbitrary commands anyway (`--allow-command`).
    fn check_env(&self, p: &pb::ShardProcess) -> Result<(), String> {
        if self.cfg.allow_command {
            return Ok(());
        }
        let mut hooks: Vec<&str> = p
            .env
            .keys()
            .map(String::as_str)
            .filter(|k| tessera_common::env::matches(tessera_common::env::ENGINE_ENV_HOOKS, k))
            .collect();
        hooks.sort();
        match hooks.as_slice() {
            [] => Ok(()),
            _ => Err(format!(
                "env {} can make the engine run other code and is refused on this worker; drop it, or start the worker with --allow-command",
                hooks.join(", ")
            )),
        }
    }

    fn program(&self, p: &pb::ShardProcess) -> Result<Vec<String>, String> {
        match pb::ShardProgram::try_from(p.program).unwrap_or(pb::ShardProgram::Unspecified) {
            pb::ShardProgram::Probe => Ok(vec![self.cfg.exe.display().to_string(), "probe".into()]),
            pb::ShardProgram::Vllm => {
                let bin = match &self.cfg.vllm_bin {
                    Some(b) => b.clone(),
                    None => find_on_path("vllm").ok_or_else(|| {
                        "vllm is not installed on this node: no `vllm` on PATH; install vLLM or start the worker with --vllm-bin PATH".to_string()
                    })?,
                };
                Ok(vec![bin.display().to_string()])
            }
            pb::ShardProgram::Shell => {
                if !self.cfg.allow_command {
                    return Err("the command engine is not allowed on this worker: start it with --allow-command to run shell templates".into());
                }
                Ok(vec!["/bin/sh".into(), "-c".into()])
            }
            pb::ShardProgram::Unspecified => Err("unknown shard program".into()),
        }
    }

    /// Connects to a shim's socket and follows it until it ends.
    fn attach(&self, key: Key, dir: PathBuf, health: Option<u16>, wait_rtt: bool) {
        let host = self.clone();
        tokio::spawn(async move {
            let sock = spec::socket_path(&dir);
            let mut stream = None;
            for _ in 0..250 {
                if let Ok(s) = UnixStream::connect(&sock).await {
                    stream = Some(s);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let Some(stream) = stream else {
                // The shim never came up (or is long gone): use what its state file says.
                let st: ShimState = spec::read_json(&spec::state_path(&dir)).unwrap_or_default();
                let exited_at = st.exited_unix_ms.unwrap_or_else(spec::unix_ms);
                host.finish(
                    &key,
                    &dir,
                    (st.exit_code.or(Some(127)), st.signal, exited_at),
                    st.error.unwrap_or_else(|| "the shim did not start".into()),
                );
                return;
            };
            let (rd, mut wr) = stream.into_split();
            let (tx, mut rx) = mpsc::unbounded_channel::<ShimCommand>();
            let stopped_early = {
                let mut procs = host.procs.lock().expect("lock");
                match procs.get_mut(&key) {
                    Some(p) => {
                        p.cmd = Some(tx.clone());
                        p.last.state == pb::ProcessState::Stopped as i32
                    }
                    None => false,
                }
            };
            if stopped_early {
                let _ = tx.send(ShimCommand::Stop);
            }
            tokio::spawn(async move {
                while let Some(cmd) = rx.recv().await {
                    let mut line = serde_json::to_vec(&cmd).expect("command serializes");
                    line.push(b'\n');
                    if wr.write_all(&line).await.is_err() {
                        return;
                    }
                }
            });
            let mut lines = BufReader::new(rd).lines();
            let mut health_started = false;
            let mut last = ShimState::default();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(st) = serde_json::from_str::<ShimState>(&line) else { continue };
                last = st.clone();
                if st.exited {
                    // Report the exit once the shim itself is gone (its socket closes as it exits),
                    // so that "exited" means nothing of the process is left.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Ok(Some(_)) = lines.next_line().await {}
                    })
                    .await;
                    let exited_at = st.exited_unix_ms.unwrap_or_else(spec::unix_ms);
                    host.finish(&key, &dir, (st.exit_code, st.signal, exited_at), st.error.clone().unwrap_or_default());
                    return;
                }
                if let Some(pid) = st.pid {
                    host.update(&key, |p| {
                        if p.last.state == pb::ProcessState::Starting as i32 {
                            p.last.state = pb::ProcessState::Running as i32;
                        }
                        p.last.pid = pid;
                    });
                    if !health_started {
                        health_started = true;
                        host.watch_ready(key.clone(), dir.clone(), health, wait_rtt);
                    }
                }
            }
            // The socket closed without an exit: the shim died.
            let exited_at = last.exited_unix_ms.unwrap_or_else(spec::unix_ms);
            host.finish(&key, &dir, (last.exit_code, last.signal, exited_at), "the shim exited unexpectedly".into());
        });
    }

    /// Records an exit: (exit code, signal, when in Unix ms).
    fn finish(&self, key: &Key, dir: &Path, exit: (Option<i32>, Option<i32>, u64), error: String) {
        let tail = tail_lines(&spec::log_path(dir), 20);
        self.update(key, |p| {
            p.exited = true;
            p.cmd = None;
            p.last.state = pb::ProcessState::Exited as i32;
            p.last.exit_code = exit.0;
            p.last.signal = exit.1;
            p.last.exited_unix_ms = exit.2;
            p.last.error = error;
            p.last.log_tail = tail;
        });
    }

    /// Reports READY once the process's health endpoint answers 200 (at once without one) and,
    /// for probe ranks other than 0, once the rendezvous is done and the round trip is known.
    fn watch_ready(&self, key: Key, dir: PathBuf, health: Option<u16>, wait_rtt: bool) {
        let host = self.clone();
        tokio::spawn(async move {
            let mut ready = health.is_none();
            let mut rtt: Option<u64> = None;
            loop {
                let alive = host.procs.lock().expect("lock").get(&key).is_some_and(|p| !p.exited);
                if !alive {
                    return;
                }
                if wait_rtt && rtt.is_none() {
                    rtt = probe_rtt(&dir);
                }
                if let (false, Some(port)) = (ready, health) {
                    ready = http_ok(port).await;
                }
                if ready && (!wait_rtt || rtt.is_some()) {
                    host.update(&key, |p| {
                        if !p.exited {
                            p.last.state = pb::ProcessState::Ready as i32;
                            p.last.rtt_us = rtt;
                        }
                    });
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    /// Stops processes of `deployment` of another incarnation than `deployment_uid`, or with a
    /// generation below `below_generation` (all when 0).
    pub fn stop(&self, s: pb::StopShards) {
        self.stop_matching(
            &s.deployment,
            &s.deployment_uid,
            if s.below_generation == 0 { u64::MAX } else { s.below_generation },
            &s.reason,
        );
    }

    fn stop_matching(&self, deployment: &str, uid: &str, below: u64, reason: &str) {
        let mut procs = self.procs.lock().expect("lock");
        for (k, p) in procs.iter_mut() {
            if k.superseded(deployment, uid, below) && !p.exited {
                info!(deployment = %k.deployment, uid = %k.uid, generation = k.generation, key = %k.key, reason, "stopping");
                match &p.cmd {
                    Some(tx) => {
                        let _ = tx.send(ShimCommand::Stop);
                    }
                    None => p.last.state = pb::ProcessState::Stopped as i32, // stop as soon as attached
                }
            }
        }
    }

    async fn wait_stopped(&self, deployment: &str, uid: &str, below: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let busy =
                self.procs.lock().expect("lock").iter().any(|(k, p)| k.superseded(deployment, uid, below) && !p.exited);
            if !busy || tokio::time::Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Finds shims left by an earlier agent in the state dir and reconnects to them.
    pub fn adopt(&self) -> usize {
        let root = self.cfg.state_dir.join("shards");
        let mut found = 0;
        for dir in walk3(&root) {
            let Ok(s) = spec::read_json::<ShimSpec>(&spec::spec_path(&dir)) else { continue };
            let st: ShimState = spec::read_json(&spec::state_path(&dir)).unwrap_or_default();
            if st.exited || !spec::socket_path(&dir).exists() {
                continue;
            }
            let key = Key {
                deployment: s.deployment.clone(),
                uid: s.deployment_uid.clone(),
                generation: s.generation,
                key: s.key.clone(),
            };
            let report = pb::ShardReport {
                deployment: s.deployment.clone(),
                deployment_uid: s.deployment_uid.clone(),
                generation: s.generation,
                key: s.key.clone(),
                ranks: s.ranks.clone(),
                pid: st.pid.unwrap_or(0),
                state: pb::ProcessState::Running as i32,
                master_port: s.master_port.unwrap_or(0) as u32,
                health_port: s.health_port.unwrap_or(0) as u32,
                ..Default::default()
            };
            self.procs
                .lock()
                .expect("lock")
                .insert(key.clone(), Proc { dir: dir.clone(), last: report, cmd: None, exited: false });
            info!(deployment = %s.deployment, generation = s.generation, key = %s.key, pid = ?st.pid, "adopted a running shim");
            let wait_rtt = is_probe_member(&s);
            self.attach(key, dir, s.health_port, wait_rtt);
            found += 1;
        }
        found
    }

    /// Streams a process's log tail (and, with follow, what it writes next) as `LogData`.
    pub fn logs(&self, r: pb::LogRequest) {
        let dir = self
            .procs
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, _)| k.deployment == r.deployment && k.key == r.key)
            .max_by_key(|(k, _)| k.generation)
            .map(|(_, p)| p.dir.clone());
        let up = self.up.clone();
        let id = r.request_id;
        let send = move |data: Vec<u8>, done: bool, error: String| {
            let _ = up.send(pb::WorkerMessage {
                msg: Some(pb::worker_message::Msg::LogData(pb::LogData { request_id: id, data, done, error })),
            });
        };
        let Some(dir) = dir else {
            send(Vec::new(), true, format!("no process {} of deployment {} on this node", r.key, r.deployment));
            return;
        };
        let logs = self.logs.clone();
        let task = tokio::spawn(async move {
            let path = spec::log_path(&dir);
            let tail = tail_lines(&path, r.tail_lines.max(1) as usize);
            let mut pos = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            send(tail.into_bytes(), !r.follow, String::new());
            if !r.follow {
                return;
            }
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if len < pos {
                    pos = 0; // rotated
                }
                if len > pos
                    && let Ok(mut f) = tokio::fs::File::open(&path).await
                {
                    let _ = f.seek(std::io::SeekFrom::Start(pos)).await;
                    let mut buf = Vec::new();
                    let _ = (&mut f).take(1 << 20).read_to_end(&mut buf).await;
                    pos += buf.len() as u64;
                    send(buf, false, String::new());
                }
            }
        });
        logs.lock().expect("lock").insert(id, task.abort_handle());
    }

    pub fn cancel_log(&self, id: u64) {
        if let Some(h) = self.logs.lock().expect("lock").remove(&id) {
            h.abort();
        }
    }

    /// Stops every process of every deployment and waits (up to `limit`) until they are gone: for
    /// a worker that is PID 1 of a container, whose shards go away with it.
    pub async fn stop_all(&self, limit: Duration) {
        let deployments: std::collections::BTreeSet<String> =
            self.procs.lock().expect("lock").keys().map(|k| k.deployment.clone()).collect();
        for d in &deployments {
            self.stop_matching(d, "", u64::MAX, "the worker is stopping (PID 1)");
        }
        let deadline = tokio::time::Instant::now() + limit;
        while self.procs.lock().expect("lock").values().any(|p| !p.exited) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A probe rank's round trip to its master: from the file it writes in its process dir, else
/// (an engine running as `--engine-user` cannot reach that dir) from the line it prints.
fn probe_rtt(dir: &Path) -> Option<u64> {
    if let Some(us) = std::fs::read_to_string(dir.join("probe-rtt-us")).ok().and_then(|s| s.trim().parse().ok()) {
        return Some(us);
    }
    let tail = tail_lines(&spec::log_path(dir), 20);
    tail.lines()
        .rev()
        .find(|l| l.contains("joined the world: round trip to the master"))
        .and_then(|l| l.trim().strip_suffix(" us"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
}

/// A probe rank other than 0: ready once it has joined the world.
fn is_probe_member(s: &ShimSpec) -> bool {
    s.argv.get(1).is_some_and(|a| a == "probe") && !s.ranks.contains(&0)
}

fn subst(s: &str, master: u16, health: u16) -> String {
    s.replace("{master_port}", &master.to_string()).replace("{health_port}", &health.to_string())
}

/// Two distinct ports that are free on this host now (both bound at once, then released for the
/// engine to take): the rendezvous and the health endpoint.
fn free_ports() -> Option<(u16, u16)> {
    let a = std::net::TcpListener::bind(("0.0.0.0", 0)).ok()?;
    let b = std::net::TcpListener::bind(("0.0.0.0", 0)).ok()?;
    Some((a.local_addr().ok()?.port(), b.local_addr().ok()?.port()))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|c| c.is_file()))
}

/// The last `n` lines of a log (looking into the rotated file when the current one is short).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let mut data = std::fs::read(path).unwrap_or_default();
    if data.iter().filter(|&&b| b == b'\n').count() < n
        && let Ok(mut older) = std::fs::read(super::shim::rotated(path, 1))
    {
        older.extend_from_slice(&data);
        data = older;
    }
    let text = String::from_utf8_lossy(&data);
    let lines: Vec<&str> = text.lines().collect();
    let mut s = lines[lines.len().saturating_sub(n)..].join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

/// `shards/<deployment>/<generation>/<key>` directories.
fn walk3(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let sub = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p).map(|r| r.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect()).unwrap_or_default()
    };
    for d in sub(root) {
        for g in sub(&d) {
            out.extend(sub(&g));
        }
    }
    out.sort();
    out
}

/// `GET /health` on 127.0.0.1:port answers 200.
async fn http_ok(port: u16) -> bool {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n").await.ok()?;
        let mut buf = [0u8; 32];
        let n = s.read(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        Some(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(1), fut).await.ok().flatten().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_rtt_comes_from_its_file_or_its_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(probe_rtt(dir.path()), None);
        std::fs::write(
            spec::log_path(dir.path()),
            "probe rank 1/4 starting\nrank 1 joined the world: round trip to the master 127.0.0.1:4000 17 us\n",
        )
        .expect("write");
        assert_eq!(probe_rtt(dir.path()), Some(17));
        std::fs::write(dir.path().join("probe-rtt-us"), "9").expect("write");
        assert_eq!(probe_rtt(dir.path()), Some(9));
    }

    #[test]
    fn placeholders_are_replaced() {
        assert_eq!(subst("--master-port {master_port} --h {health_port}", 29500, 8000), "--master-port 29500 --h 8000");
    }

    #[test]
    fn tail_reads_into_the_rotated_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("output.log");
        std::fs::write(super::super::shim::rotated(&p, 1), "a\nb\nc\n").expect("write");
        std::fs::write(&p, "d\n").expect("write");
        assert_eq!(tail_lines(&p, 3), "b\nc\nd\n");
        assert_eq!(tail_lines(&p, 1), "d\n");
        assert_eq!(tail_lines(&dir.path().join("none"), 5), "");
    }
}

#[cfg(test)]
mod fencing_tests {
    use super::*;

    #[test]
    fn only_the_two_newest_generations_are_kept_with_their_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = HostConfig {
            state_dir: dir.path().to_path_buf(),
            exe: "/bin/false".into(),
            vllm_bin: None,
            allow_command: false,
            orphan_timeout: Duration::from_secs(1),
            log_max_bytes: 1 << 20,
            engine_user: None,
        };
        let (host, _rx) = ShardHost::new(cfg);
        let add = |uid: &str, generation: u64, exited: bool| {
            let p = spec::process_dir(dir.path(), "llama", uid, generation, "rank-0");
            std::fs::create_dir_all(&p).expect("mkdir");
            let key = Key { deployment: "llama".into(), uid: uid.into(), generation, key: "rank-0".into() };
            host.procs
                .lock()
                .expect("lock")
                .insert(key, Proc { dir: p, last: pb::ShardReport::default(), cmd: None, exited });
        };
        add("old", 9, true);
        for g in 1..=4 {
            add("new", g, g < 4);
        }
        host.prune("llama", "new");
        let mut kept: Vec<(String, u64)> =
            host.procs.lock().expect("lock").keys().map(|k| (k.uid.clone(), k.generation)).collect();
        kept.sort();
        assert_eq!(kept, vec![("new".to_string(), 3), ("new".to_string(), 4)]);
        let dep_dir = dir.path().join("shards/llama");
        let mut left: Vec<String> = std::fs::read_dir(&dep_dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, vec!["new-g3", "new-g4"]);
    }

    fn k(uid: &str, generation: u64) -> Key {
        Key { deployment: "llama".into(), uid: uid.into(), generation, key: "rank-0".into() }
    }

    #[test]
    fn other_incarnations_are_always_superseded_and_older_generations_of_this_one() {
        // A deleted deployment's processes are stale for the new incarnation, whatever their generation.
        assert!(k("old", 5).superseded("llama", "new", 1));
        assert!(k("new", 1).superseded("llama", "new", 2));
        assert!(!k("new", 2).superseded("llama", "new", 2));
        assert!(!k("new", 1).superseded("other", "new", 9));
        // Stop everything (below 0 on the wire is u64::MAX here).
        assert!(k("new", 7).superseded("llama", "new", u64::MAX));
        // An empty uid (stop by name) matches every incarnation.
        assert!(k("new", 7).superseded("llama", "", 0));
    }
}
