//! The shim: a small supervisor per engine process, in the manner of containerd's shims.
//!
//! The agent starts `<worker binary> shim --dir DIR`. The shim starts a new session (so it outlives
//! the agent), becomes a child subreaper (so the engine's children and grandchildren stay under
//! it, as vLLM spawns one process per GPU), starts the engine in its own process group with
//! stdout/stderr captured to `output.log` (size-capped, rotated), records the exit code or signal
//! in `state.json`, and talks to its agent over `shim.sock`. Stop = SIGTERM to the engine's group,
//! SIGKILL after the grace period, every descendant included. Without an agent for the orphan
//! timeout it stops its engine and exits, so a dead agent leaves nothing behind.
//!
//! Synchronous on purpose: a handful of threads, no runtime, a small resident footprint.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

use super::spec::{self, ShimCommand, ShimSpec, ShimState};

/// Rotated logs kept besides the current one.
const LOG_KEEP: usize = 2;

struct Shared {
    state: Mutex<ShimState>,
    /// Connected agents by connection number.
    clients: Mutex<Vec<(u64, UnixStream)>>,
    stop: AtomicBool,
    /// When an agent was last connected (or the shim started).
    last_agent: Mutex<Instant>,
    delivered_exit: AtomicBool,
    dir: PathBuf,
    /// When the engine exited (Unix ms), seen by a thread blocked on it: the supervision loop
    /// only polls, and which rank of a group failed first is judged by these times.
    engine_exit_ms: AtomicU64,
}

impl Shared {
    fn log(&self, msg: &str) {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).mode(0o600).open(self.dir.join("shim.log")) {
            let _ = writeln!(f, "{msg}");
        }
    }

    /// Persists the state and sends it to every connected agent.
    fn publish(&self) {
        let state = self.state.lock().expect("state lock").clone();
        let _ = spec::write_json(&spec::state_path(&self.dir), &state);
        let mut line = serde_json::to_vec(&state).expect("state serializes");
        line.push(b'\n');
        let mut clients = self.clients.lock().expect("clients lock");
        clients.retain_mut(|(_, c)| c.write_all(&line).is_ok());
        if state.exited && !clients.is_empty() {
            self.delivered_exit.store(true, Ordering::SeqCst);
        }
        if !clients.is_empty() {
            *self.last_agent.lock().expect("lock") = Instant::now();
        }
    }
}

/// Entry point of `shim --dir DIR`.
pub fn run(dir: &Path) -> ExitCode {
    // A new session: the agent's death (or its terminal's) does not take the shim with it.
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let spec: ShimSpec = match spec::read_json(&spec::spec_path(dir)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shim: cannot read {}: {e}", spec::spec_path(dir).display());
            return ExitCode::from(2);
        }
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(ShimState { shim_pid: std::process::id(), ..Default::default() }),
        clients: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        last_agent: Mutex::new(Instant::now()),
        delivered_exit: AtomicBool::new(false),
        engine_exit_ms: AtomicU64::new(0),
        dir: dir.to_path_buf(),
    });
    let sock = spec::socket_path(dir);
    let _ = std::fs::remove_file(&sock);
    let listener = match UnixListener::bind(&sock) {
        Ok(l) => l,
        Err(e) => {
            shared.log(&format!("cannot bind {}: {e}", sock.display()));
            return ExitCode::from(2);
        }
    };
    {
        let shared = shared.clone();
        std::thread::spawn(move || serve(listener, shared));
    }

    let log = Arc::new(Mutex::new(RotatingLog::open(&spec::log_path(dir), spec.log_max_bytes)));
    let engine = start_engine(&spec, dir, &log, &shared);
    let code = supervise(engine, &spec, &shared);
    let _ = std::fs::remove_file(&sock);
    code
}

fn start_engine(spec: &ShimSpec, dir: &Path, log: &Arc<Mutex<RotatingLog>>, shared: &Arc<Shared>) -> Option<Pid> {
    let Some((program, args)) = spec.argv.split_first() else {
        fail(shared, "empty command");
        return None;
    };
    let mut cmd = Command::new(program);
    // A clean environment: the daemon's allowlisted variables, then the deployment's.
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| tessera_common::env::matches(tessera_common::env::ENGINE_ENV_ALLOW, k)) {
            cmd.env(k, v);
        }
    }
    if let Some(user) = &spec.run_as {
        cmd.uid(user.uid).gid(user.gid).env("HOME", &user.home).env("USER", &user.name).env("LOGNAME", &user.name);
    }
    // Not the daemon's directory (nor anything relative to it).
    cmd.current_dir(spec.run_as.as_ref().map(|u| u.home.as_path()).filter(|h| h.is_dir()).unwrap_or(Path::new("/")));
    // What the engine writes is its own business; the shim's own files are 0600 by their modes.
    tessera_common::files::engine_umask();
    cmd.args(args)
        .envs(&spec.env)
        .env("TESSERA_PROCESS_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    match cmd.spawn() {
        Ok(mut child) => {
            let pid = child.id();
            for out in [
                child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
                child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
            ]
            .into_iter()
            .flatten()
            {
                let log = log.clone();
                std::thread::spawn(move || pump(out, log));
            }
            // The child is reaped by the waitpid loop, not through `child`.
            std::mem::forget(child);
            shared.state.lock().expect("lock").pid = Some(pid);
            shared.log(&format!("started pid {pid}: {:?}", spec.argv));
            shared.publish();
            Some(Pid::from_raw(pid as i32))
        }
        Err(e) => {
            let msg = format!("cannot start {program:?}: {e}");
            if let Ok(mut l) = log.lock() {
                l.write(format!("tessera shim: {msg}\n").as_bytes());
            }
            fail(shared, &msg);
            None
        }
    }
}

fn fail(shared: &Shared, msg: &str) {
    shared.log(msg);
    {
        let mut s = shared.state.lock().expect("lock");
        s.error = Some(msg.to_string());
        s.exit_code = Some(127);
        s.exited = true;
        s.exited_unix_ms = Some(super::spec::unix_ms());
    }
    shared.publish();
}

fn pump(mut from: Box<dyn Read + Send>, log: Arc<Mutex<RotatingLog>>) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut l) = log.lock() {
                    l.write(&buf[..n]);
                }
            }
        }
    }
}

/// Reaps children, applies stop requests and the orphan timeout, until the engine and every
/// descendant are gone and the exit has been told (or nobody is listening).
fn supervise(engine: Option<Pid>, spec: &ShimSpec, shared: &Arc<Shared>) -> ExitCode {
    let (woke, wake) = std::sync::mpsc::channel::<()>();
    if let Some(pid) = engine {
        let shared = shared.clone();
        // WNOWAIT: notice the exit at once without reaping it (the loop below reaps).
        std::thread::spawn(move || {
            if waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT).is_ok() {
                shared.engine_exit_ms.store(spec::unix_ms(), Ordering::SeqCst);
                let _ = woke.send(());
            }
        });
    }
    let grace = Duration::from_secs(spec.stop_grace_s);
    let orphan = Duration::from_secs(spec.orphan_timeout_s.max(1));
    let me = Pid::from_raw(std::process::id() as i32);
    let mut engine_alive = engine.is_some();
    let mut term_sent: Option<Instant> = None;
    let mut killed = false;
    loop {
        // Reap whatever has exited.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if Some(pid) == engine {
                        engine_alive = false;
                        record_exit(shared, Some(code), None);
                    }
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    if Some(pid) == engine {
                        engine_alive = false;
                        record_exit(shared, None, Some(sig as i32));
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        let orphaned = shared.clients.lock().expect("lock").is_empty()
            && shared.last_agent.lock().expect("lock").elapsed() >= orphan;
        if orphaned && !shared.stop.swap(true, Ordering::SeqCst) {
            shared.log(&format!("no agent for {}s: stopping the engine", orphan.as_secs()));
        }
        let stopping = shared.stop.load(Ordering::SeqCst) || !engine_alive;
        // Scanning /proc is the costly part of the loop: only while stopping.
        let descendants = if stopping { children_of(me) } else { Vec::new() };
        if stopping && (engine_alive || !descendants.is_empty()) {
            match term_sent {
                None => {
                    if let Some(pg) = engine {
                        let _ = killpg(pg, Signal::SIGTERM);
                    }
                    for d in &descendants {
                        let _ = kill(*d, Signal::SIGTERM);
                    }
                    term_sent = Some(Instant::now());
                }
                Some(t) if t.elapsed() >= grace => {
                    if !killed {
                        shared.log("grace period over: SIGKILL");
                        killed = true;
                    }
                    if let Some(pg) = engine {
                        let _ = killpg(pg, Signal::SIGKILL);
                    }
                    for d in &descendants {
                        let _ = kill(*d, Signal::SIGKILL);
                    }
                }
                Some(_) => {}
            }
        }
        if !engine_alive && descendants.is_empty() {
            // Only now is the engine entirely gone: say so (once), then leave once told.
            if !shared.state.lock().expect("lock").exited {
                shared.state.lock().expect("lock").exited = true;
                shared.log("every process of the engine is gone");
                shared.publish();
            }
            let delivered = shared.delivered_exit.load(Ordering::SeqCst);
            if delivered || orphaned || engine.is_none() && shared.stop.load(Ordering::SeqCst) {
                return ExitCode::SUCCESS;
            }
        }
        let _ = wake.recv_timeout(Duration::from_millis(if stopping { 20 } else { 100 }));
    }
}

/// The engine itself exited; `exited` is set once its descendants are gone too.
fn record_exit(shared: &Shared, code: Option<i32>, signal: Option<i32>) {
    {
        let mut s = shared.state.lock().expect("lock");
        s.exit_code = code;
        s.signal = signal;
        let seen = shared.engine_exit_ms.load(Ordering::SeqCst);
        s.exited_unix_ms = Some(if seen > 0 { seen } else { super::spec::unix_ms() });
    }
    shared.log(&format!("engine exited: code {code:?} signal {signal:?}"));
    shared.publish();
}

/// Accepts agents: each gets the current state at once, then every change; its lines are commands.
fn serve(listener: UnixListener, shared: Arc<Shared>) {
    for (id, conn) in listener.incoming().enumerate() {
        let id = id as u64;
        let Ok(conn) = conn else { continue };
        let Ok(reader) = conn.try_clone() else { continue };
        shared.clients.lock().expect("lock").push((id, conn));
        shared.publish();
        let shared = shared.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<ShimCommand>(&line) {
                    Ok(ShimCommand::Stop) => {
                        shared.log("stop requested by the agent");
                        shared.stop.store(true, Ordering::SeqCst);
                    }
                    Err(e) => shared.log(&format!("ignored bad command {line:?}: {e}")),
                }
            }
            // The agent went away; the orphan clock runs from now.
            shared.clients.lock().expect("lock").retain(|(c, _)| *c != id);
            *shared.last_agent.lock().expect("lock") = Instant::now();
            shared.log("agent disconnected");
        });
    }
}

/// Pids whose parent is `parent` (from /proc). As a subreaper, the shim adopts every orphaned
/// descendant of its engine, so this finds them all once their own parents are gone.
pub fn children_of(parent: Pid) -> Vec<Pid> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Some((ppid, state)) = ppid_and_state(pid)
            && ppid == parent.as_raw()
            && state != 'Z'
        {
            out.push(Pid::from_raw(pid));
        }
    }
    out
}

/// Parent pid and state letter of `pid`, from /proc/PID/stat.
pub fn ppid_and_state(pid: i32) -> Option<(i32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// `output.log`, rotated to `.1`, `.2` when it passes its cap.
pub struct RotatingLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max: u64,
}

impl RotatingLog {
    pub fn open(path: &Path, max: u64) -> Self {
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path).ok();
        let size = file.as_ref().and_then(|f| f.metadata().ok()).map(|m| m.len()).unwrap_or(0);
        RotatingLog { path: path.to_path_buf(), file, size, max: max.max(4096) }
    }

    pub fn write(&mut self, data: &[u8]) {
        if self.size + data.len() as u64 > self.max {
            self.rotate();
        }
        if let Some(f) = &mut self.file
            && f.write_all(data).is_ok()
        {
            self.size += data.len() as u64;
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        for i in (1..LOG_KEEP).rev() {
            let _ = std::fs::rename(rotated(&self.path, i), rotated(&self.path, i + 1));
        }
        let _ = std::fs::rename(&self.path, rotated(&self.path, 1));
        self.file = OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path).ok();
        self.size = 0;
    }
}

pub fn rotated(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_rotate_at_the_cap_and_keep_two() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("output.log");
        let mut l = RotatingLog::open(&p, 4096);
        for i in 0..10u8 {
            l.write(&[b'a' + i; 3000]);
        }
        assert!(std::fs::metadata(&p).expect("current").len() <= 4096);
        assert!(rotated(&p, 1).exists() && rotated(&p, 2).exists());
        assert!(!rotated(&p, 3).exists(), "only two rotated files are kept");
        let last = std::fs::read(&p).expect("read");
        assert_eq!(last, vec![b'a' + 9; 3000]);
    }

    #[test]
    fn proc_stat_parsing_handles_odd_names() {
        let me = std::process::id() as i32;
        let (ppid, state) = ppid_and_state(me).expect("self");
        assert!(ppid > 0);
        assert!(state == 'R' || state == 'S');
    }
}
