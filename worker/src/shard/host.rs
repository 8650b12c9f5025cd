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
use tracing::{debug, info, warn};

use super::http;
use super::liveness::{self, Effect, Input, Liveness};
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
    /// The model cache's `models/` directory, where `{staged_model}` points.
    pub models_dir: Option<PathBuf>,
    /// `--engine-logs both`: engines' output also goes to the daemon's stdout.
    pub echo_logs: bool,
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
    /// Told to stop: its checks end (a stopping engine is not a sick one).
    stopping: bool,
    /// The staged model directory (its key) the process reads, kept from eviction while it lives.
    model: String,
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
        // `{staged_model}`: the model directory staging made in this node's cache.
        let staged = self.staged_dir(&l.staged_model);
        let subst = |s: &str| -> String {
            let s = subst(s, master_port, health_port);
            match &staged {
                Ok(Some(dir)) => s.replace("{staged_model}", &dir.display().to_string()),
                _ => s,
            }
        };
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
            let ready = staged.clone().map(|_| ());
            let argv = match ready.and_then(|()| self.program(&p)).and_then(|prog| self.check_env(&p).map(|()| prog)) {
                Ok(prog) => {
                    let mut v = prog;
                    v.extend(p.args.iter().map(|a| subst(a)));
                    v
                }
                Err(why) => {
                    // Not installed, not allowed, refused env: no restart can change that.
                    warn!(deployment = %l.deployment, key = %p.key, %why, "cannot launch");
                    report.state = pb::ProcessState::Exited as i32;
                    report.exit_code = Some(127);
                    report.error = why.clone();
                    report.log_tail = why;
                    report.permanent = staged.is_ok();
                    report.exited_unix_ms = spec::unix_ms();
                    self.procs.lock().expect("lock").insert(
                        key,
                        Proc {
                            dir,
                            last: report.clone(),
                            cmd: None,
                            exited: true,
                            stopping: false,
                            model: String::new(),
                        },
                    );
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
                env: {
                    let mut env = p.env.iter().map(|(k, v)| (k.clone(), subst(v))).collect::<BTreeMap<_, _>>();
                    socket_ifname(&mut env, &p.socket_ifname_of);
                    env
                },
                stop_grace_s: grace.as_secs(),
                orphan_timeout_s: self.cfg.orphan_timeout.as_secs().max(1),
                log_max_bytes: self.cfg.log_max_bytes,
                staged_model: l.staged_model.clone(),
                health_port: health,
                master_port: Some(master_port),
                run_as: self.cfg.engine_user.clone(),
                health_host: p.health_host.clone(),
                startup_timeout_s: p.startup_timeout_s as u64,
                liveness: p.liveness.as_ref().filter(|l| l.stall_timeout_ms > 0).map(|l| spec::LivenessSpec {
                    stall_timeout_ms: l.stall_timeout_ms as u64,
                    canary_interval_ms: l.canary_interval_ms as u64,
                    model: l.model.clone(),
                    check_interval_ms: (l.check_interval_ms as u64).max(100),
                    api_key: l.api_key.clone(),
                }),
            };
            if let Err(e) = std::fs::create_dir_all(&dir)
                .and_then(|_| spec::write_json(&spec::spec_path(&dir), &shim_spec))
                .and_then(|_| self.give_dir_to_engine(&dir))
            {
                report.state = pb::ProcessState::Exited as i32;
                report.exit_code = Some(127);
                report.error = format!("cannot write {}: {e}", dir.display());
                report.exited_unix_ms = spec::unix_ms();
                self.procs.lock().expect("lock").insert(
                    key,
                    Proc { dir, last: report.clone(), cmd: None, exited: true, stopping: false, model: String::new() },
                );
                let _ = self.up.send(shard_msg(report));
                continue;
            }
            self.procs.lock().expect("lock").insert(
                key.clone(),
                Proc {
                    dir: dir.clone(),
                    last: report.clone(),
                    cmd: None,
                    exited: false,
                    stopping: false,
                    model: l.staged_model.clone(),
                },
            );
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
                    self.attach(key, dir, Watch::of(&shim_spec, health));
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
    /// The model directory `key` names (None for no key); Err when it is not there.
    fn staged_dir(&self, key: &str) -> Result<Option<PathBuf>, String> {
        if key.is_empty() {
            return Ok(None);
        }
        let Some(root) = &self.cfg.models_dir else {
            return Err("this node has no model cache (staging is off on its worker)".into());
        };
        if key.len() != 32 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("staged model key {key:?} is not 32 hex digits"));
        }
        let dir = root.join(key);
        if !dir.is_dir() {
            return Err(format!("the staged model {} is not in this node's cache", dir.display()));
        }
        Ok(Some(dir))
    }

    /// Model directories (keys) that live processes read.
    pub fn models_in_use(&self) -> std::collections::HashSet<String> {
        self.procs
            .lock()
            .expect("lock")
            .values()
            .filter(|p| !p.exited && !p.model.is_empty())
            .map(|p| p.model.clone())
            .collect()
    }

    /// Copies every process's output to this daemon's stdout, a line at a time, each prefixed with
    /// `[DEPLOYMENT gGENERATION KEY]`, so that engine output reaches journald and `kubectl logs`
    /// (`--engine-logs both`). The files stay (`tessera logs` and failure messages read them).
    pub fn echo_logs(&self) {
        let host = self.clone();
        tokio::spawn(async move {
            let mut seen: HashMap<PathBuf, (u64, Vec<u8>)> = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let procs: Vec<(PathBuf, String)> = host
                    .procs
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(|(k, p)| (p.dir.clone(), format!("[{} g{} {}]", k.deployment, k.generation, k.key)))
                    .collect();
                let mut state = std::mem::take(&mut seen);
                seen = tokio::task::spawn_blocking(move || {
                    echo_new_lines(&procs, &mut state);
                    state
                })
                .await
                .unwrap_or_default();
            }
        });
    }

    /// Where this host's messages to the head go (shared with staging).
    pub fn up_sender(&self) -> mpsc::UnboundedSender<pb::WorkerMessage> {
        self.up.clone()
    }

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
        if !hooks.is_empty() {
            return Err(format!(
                "env {} can make the engine run other code and is refused on this worker; drop it, or start the worker with --allow-command",
                hooks.join(", ")
            ));
        }
        // vLLM flags that load code or open files by name: the same rule as the env hooks.
        if p.program == pb::ShardProgram::Vllm as i32
            && let Some(flag) = p.args.iter().find(|a| {
                let name = a.split('=').next().unwrap_or("").replace('_', "-");
                VLLM_CODE_FLAGS.iter().any(|f| name == *f || (name.len() > 4 && f.starts_with(name.as_str())))
            })
        {
            return Err(format!(
                "engine arg {flag} can make vLLM load other code or read files by name and is refused on this worker; drop it, or start the worker with --allow-command"
            ));
        }
        Ok(())
    }

    fn program(&self, p: &pb::ShardProcess) -> Result<Vec<String>, String> {
        match pb::ShardProgram::try_from(p.program).unwrap_or(pb::ShardProgram::Unspecified) {
            pb::ShardProgram::Probe => Ok(vec![self.cfg.exe.display().to_string(), "probe".into()]),
            pb::ShardProgram::Vllm => Ok(vec![super::capabilities::vllm_bin(&self.cfg)?.display().to_string()]),
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
    fn attach(&self, key: Key, dir: PathBuf, watch: Watch) {
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
                        host.watch(key.clone(), dir.clone(), watch.clone());
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
    /// for probe ranks other than 0, once the rendezvous is done and the round trip is known;
    /// then, for an engine with liveness checks, keeps checking it (see [`super::liveness`]).
    /// A failed check or a missed start-up deadline reports UNHEALTHY with why.
    fn watch(&self, key: Key, dir: PathBuf, w: Watch) {
        let host = self.clone();
        tokio::spawn(async move {
            let now = tokio::time::Instant::now();
            let mut m = Liveness::new(w.config(), now);
            let mut ready = w.health_port.is_none();
            let mut reported = false;
            let mut rtt: Option<u64> = None;
            let (canary_tx, mut canary_rx) = mpsc::channel::<Input>(1);
            // Gone, or being stopped on purpose: nothing to judge any more.
            let watched = || host.procs.lock().expect("lock").get(&key).is_some_and(|p| !p.exited && !p.stopping);
            let mut input: Option<Input> = None;
            loop {
                if !watched() {
                    return;
                }
                // Every effect's answer goes back in before the next effect runs, and the effects
                // it causes run too.
                let mut queue: std::collections::VecDeque<Effect> =
                    m.step(input.take(), tokio::time::Instant::now()).into();
                while let Some(effect) = queue.pop_front() {
                    let port = w.health_port.unwrap_or(0);
                    let answer = match effect {
                        Effect::CheckHealth => Input::Health(http::health(&w.health_host, port, CHECK_TIMEOUT).await),
                        Effect::ScrapeMetrics => {
                            let sample =
                                match http::call(&w.health_host, port, "GET", "/metrics", None, CHECK_TIMEOUT).await {
                                    Ok((200, text)) => liveness::parse_metrics(&text),
                                    _ => None,
                                };
                            // The API server's own count of requests it holds (vLLM's stats
                            // freeze with a hung engine).
                            let in_flight =
                                match http::call(&w.health_host, port, "GET", "/load", None, CHECK_TIMEOUT).await {
                                    Ok((200, text)) => liveness::parse_load(&text).unwrap_or(0.0),
                                    _ => 0.0,
                                };
                            Input::Metrics(sample.map(|s| liveness::Sample { in_flight, ..s }))
                        }
                        Effect::SendCanary(limit) => {
                            let (h, model, key, tx) =
                                (w.health_host.clone(), w.model.clone(), w.api_key.clone(), canary_tx.clone());
                            tokio::spawn(async move {
                                let _ = tx.send(canary(&h, port, &model, key.as_deref(), limit).await).await;
                            });
                            continue;
                        }
                        Effect::Unhealthy(why) => {
                            if watched() {
                                host.unhealthy(&key, &dir, why);
                            }
                            return;
                        }
                    };
                    if !watched() {
                        return;
                    }
                    queue.extend(m.step(Some(answer), tokio::time::Instant::now()));
                }
                if !reported {
                    if w.wait_rtt && rtt.is_none() {
                        rtt = probe_rtt(&dir);
                    }
                    if let (false, Some(port)) = (ready, w.health_port) {
                        ready = http::health(&w.health_host, port, Duration::from_secs(1)).await.is_ok();
                    }
                    if ready && (!w.wait_rtt || rtt.is_some()) {
                        reported = true;
                        host.update(&key, |p| {
                            if !p.exited {
                                p.last.state = pb::ProcessState::Ready as i32;
                                p.last.rtt_us = rtt;
                            }
                        });
                        input = Some(Input::Ready);
                        if w.liveness {
                            continue;
                        }
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let until =
                    m.next_deadline().unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    Some(answer) = canary_rx.recv() => input = Some(answer),
                    // Notice an exit without waiting a whole check interval.
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
    }

    /// Records an UNHEALTHY verdict with the last log lines; the head decides what follows.
    fn unhealthy(&self, key: &Key, dir: &Path, why: String) {
        warn!(deployment = %key.deployment, generation = key.generation, key = %key.key, %why, "engine unhealthy");
        let tail = tail_lines(&spec::log_path(dir), 20);
        self.update(key, |p| {
            if !p.exited && !p.stopping {
                p.last.state = pb::ProcessState::Unhealthy as i32;
                p.last.error = why;
                p.last.log_tail = tail;
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
                p.stopping = true;
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
            self.procs.lock().expect("lock").insert(
                key.clone(),
                Proc {
                    dir: dir.clone(),
                    last: report,
                    cmd: None,
                    exited: false,
                    stopping: false,
                    model: s.staged_model.clone(),
                },
            );
            info!(deployment = %s.deployment, generation = s.generation, key = %s.key, pid = ?st.pid, "adopted a running shim");
            self.attach(key, dir, Watch::of(&s, s.health_port));
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
            .filter(|(k, _)| r.generation == 0 || k.generation == r.generation)
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
            let why = if r.generation == 0 {
                format!("no process {} of deployment {} on this node", r.key, r.deployment)
            } else {
                format!(
                    "generation {} of process {} of deployment {} is not kept on this node (nodes keep the two newest generations, and the rank may have run elsewhere then)",
                    r.generation, r.key, r.deployment
                )
            };
            send(Vec::new(), true, why);
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
                // A follow ends with its process: once it exited (or its dir is gone), what is
                // left of the log is sent, then the end.
                let st: Option<ShimState> = spec::read_json(&spec::state_path(&dir)).ok();
                let ended = !dir.exists() || st.is_some_and(|s| s.exited);
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
                    continue; // more may be there: read it before ending
                }
                if ended {
                    send(Vec::new(), true, String::new());
                    return;
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

/// Longest line echoed (longer ones are cut), and most read per process per pass.
const ECHO_LINE: usize = 16 << 10;
const ECHO_READ: u64 = 1 << 20;

/// One pass of [`ShardHost::echo_logs`]: the new complete lines of each process's log, prefixed.
/// `seen` holds each log's read position and its unfinished last line.
fn echo_new_lines(procs: &[(PathBuf, String)], seen: &mut HashMap<PathBuf, (u64, Vec<u8>)>) {
    use std::io::{Read, Seek, Write};
    let live: std::collections::HashSet<&PathBuf> = procs.iter().map(|(d, _)| d).collect();
    seen.retain(|d, _| live.contains(d));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (dir, prefix) in procs {
        let path = spec::log_path(dir);
        let Ok(len) = std::fs::metadata(&path).map(|m| m.len()) else { continue };
        // A process first seen with a long log (adopted after a restart of this agent) is echoed
        // from its end, not from its beginning again.
        let (pos, carry) =
            seen.entry(dir.clone()).or_insert_with(|| (if len > 64 << 10 { len } else { 0 }, Vec::new()));
        if len < *pos {
            *pos = 0; // rotated
        }
        if len == *pos {
            continue;
        }
        let Ok(mut f) = std::fs::File::open(&path) else { continue };
        if f.seek(std::io::SeekFrom::Start(*pos)).is_err() {
            continue;
        }
        let mut buf = Vec::new();
        let n = f.take(ECHO_READ).read_to_end(&mut buf).unwrap_or(0);
        *pos += n as u64;
        carry.extend_from_slice(&buf[..n]);
        while let Some(i) = carry.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = carry.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            let cut: String = text.chars().take(ECHO_LINE).collect();
            let _ = writeln!(out, "{prefix} {}", cut.trim_end_matches('\r'));
        }
        if carry.len() > ECHO_LINE {
            let text = String::from_utf8_lossy(carry).chars().take(ECHO_LINE).collect::<String>();
            let _ = writeln!(out, "{prefix} {text}");
            carry.clear();
        }
    }
    let _ = out.flush();
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

/// vLLM flags that import code or expose files given by name (as an abbreviation too): allowed
/// only where the command engine is (`--allow-command`).
const VLLM_CODE_FLAGS: &[&str] = &[
    "--tool-parser-plugin",
    "--reasoning-parser-plugin",
    "--middleware",
    "--worker-extension-cls",
    "--logits-processors",
    "--allowed-local-media-path",
];

/// How long one health or metrics call may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What to watch of one process: its health endpoint and the checks of a ready engine.
#[derive(Debug, Clone)]
struct Watch {
    health_port: Option<u16>,
    health_host: String,
    wait_rtt: bool,
    startup_timeout: Option<Duration>,
    liveness: bool,
    check_interval: Duration,
    stall_timeout: Duration,
    canary_interval: Option<Duration>,
    model: String,
    api_key: Option<String>,
}

impl Watch {
    fn of(s: &ShimSpec, health_port: Option<u16>) -> Watch {
        let l = s.liveness.as_ref().filter(|_| health_port.is_some());
        Watch {
            health_port,
            health_host: s.health_host.clone(),
            wait_rtt: is_probe_member(s),
            startup_timeout: (s.startup_timeout_s > 0).then(|| Duration::from_secs(s.startup_timeout_s)),
            liveness: l.is_some(),
            check_interval: Duration::from_millis(l.map(|l| l.check_interval_ms).unwrap_or(1000)),
            stall_timeout: Duration::from_millis(l.map(|l| l.stall_timeout_ms).unwrap_or(0)),
            canary_interval: l
                .filter(|l| l.canary_interval_ms > 0)
                .map(|l| Duration::from_millis(l.canary_interval_ms)),
            model: l.map(|l| l.model.clone()).unwrap_or_default(),
            api_key: l.map(|l| l.api_key.clone()).filter(|k| !k.is_empty()),
        }
    }

    fn config(&self) -> liveness::Config {
        liveness::Config {
            startup_timeout: self.startup_timeout,
            checks: self.liveness.then_some(liveness::Checks {
                interval: self.check_interval,
                stall_timeout: self.stall_timeout,
                canary_interval: self.canary_interval,
            }),
        }
    }
}

/// The canary: a 1-token greedy completion, which must answer 200 within `limit`. An answer that
/// says nothing about the engine (401 without the right API key, 404/400 for a model without
/// completions) makes the canary unusable rather than the engine unhealthy.
async fn canary(host: &str, port: u16, model: &str, api_key: Option<&str>, limit: Duration) -> Input {
    let body = serde_json::json!({"model": model, "prompt": "ping", "max_tokens": 1, "temperature": 0}).to_string();
    match http::call_auth(host, port, "POST", "/v1/completions", Some(body), api_key, limit).await {
        Ok((200 | 429, _)) => Input::Canary(Ok(())),
        Ok((code @ 400..=499, body)) => {
            Input::CanaryUnusable(format!("POST /v1/completions answered {code}: {}", http::first_line(&body)))
        }
        Ok((code, body)) => {
            Input::Canary(Err(format!("POST /v1/completions answered {code}: {}", http::first_line(&body))))
        }
        Err(e) => Input::Canary(Err(e)),
    }
}

/// Sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface holding `addr` (the node's
/// advertised address), unless the engine's env has them: the rendezvous then uses the interface
/// the placement chose, not whichever the libraries find first.
fn socket_ifname(env: &mut BTreeMap<String, String>, addr: &str) {
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else { return };
    let Some(name) = interface_of(ip) else {
        debug!(%addr, "no local interface holds the advertised address; GLOO/NCCL pick theirs");
        return;
    };
    for var in ["GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"] {
        env.entry(var.into()).or_insert_with(|| name.clone());
    }
}

/// The name of the local interface with address `ip`.
fn interface_of(ip: std::net::IpAddr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|i| {
        let a = i.address?;
        let matches = match ip {
            std::net::IpAddr::V4(v4) => a.as_sockaddr_in().is_some_and(|s| s.ip() == v4),
            std::net::IpAddr::V6(v6) => a.as_sockaddr_in6().is_some_and(|s| s.ip() == v6),
        };
        matches.then_some(i.interface_name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_flags_that_load_code_need_allow_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = |allow_command| HostConfig {
            state_dir: dir.path().into(),
            exe: "/bin/true".into(),
            vllm_bin: None,
            allow_command,
            orphan_timeout: Duration::from_secs(1),
            log_max_bytes: 1,
            engine_user: None,
            models_dir: None,
            echo_logs: false,
        };
        let p = |args: &[&str]| pb::ShardProcess {
            program: pb::ShardProgram::Vllm as i32,
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let (host, _rx) = ShardHost::new(cfg(false));
        for bad in [&["--middleware", "evil.mod"][..], &["--tool_parser_plugin=/tmp/x.py"], &["--worker-ext", "m.C"]] {
            let e = host.check_env(&p(bad)).expect_err("refused");
            assert!(e.contains("refused on this worker") && e.contains("--allow-command"), "{e}");
        }
        assert!(host.check_env(&p(&["--enforce-eager", "--max-num-seqs", "8"])).is_ok());
        let (allowed, _rx) = ShardHost::new(cfg(true));
        assert!(allowed.check_env(&p(&["--middleware", "m"])).is_ok());
    }

    #[test]
    fn socket_interfaces_follow_the_advertised_address_unless_set() {
        let mut env = BTreeMap::new();
        socket_ifname(&mut env, "127.0.0.1");
        assert_eq!(env.get("GLOO_SOCKET_IFNAME").map(String::as_str), Some("lo"));
        assert_eq!(env.get("NCCL_SOCKET_IFNAME").map(String::as_str), Some("lo"));
        let mut env = BTreeMap::from([("GLOO_SOCKET_IFNAME".to_string(), "eth9".to_string())]);
        socket_ifname(&mut env, "127.0.0.1");
        assert_eq!(env.get("GLOO_SOCKET_IFNAME").map(String::as_str), Some("eth9"), "the user's wins");
        let mut env = BTreeMap::new();
        socket_ifname(&mut env, "192.0.2.77");
        assert!(env.is_empty(), "an address no interface holds sets nothing");
    }

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
            models_dir: None,
            echo_logs: false,
        };
        let (host, _rx) = ShardHost::new(cfg);
        let add = |uid: &str, generation: u64, exited: bool| {
            let p = spec::process_dir(dir.path(), "llama", uid, generation, "rank-0");
            std::fs::create_dir_all(&p).expect("mkdir");
            let key = Key { deployment: "llama".into(), uid: uid.into(), generation, key: "rank-0".into() };
            host.procs.lock().expect("lock").insert(
                key,
                Proc {
                    dir: p,
                    last: pb::ShardReport::default(),
                    cmd: None,
                    exited,
                    stopping: false,
                    model: String::new(),
                },
            );
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
