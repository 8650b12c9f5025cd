//! Real daemons as child processes, for what only processes show: signals, kill -9, exit codes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Path of a workspace binary (`tessera-head`, `tessera-worker`, `tessera`), built by
/// `cargo test --workspace` next to the test executables.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Test executables live in target/<profile>/deps, other binaries in target/<profile>.
    let here = exe.parent().expect("exe dir");
    let dir = if here.ends_with("deps") { here.parent().expect("target dir") } else { here };
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (it builds every binary), or `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A running daemon; SIGKILLed and reaped when dropped, so a failing test leaves nothing behind.
pub struct Daemon {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// A Tessera daemon. Its metrics endpoint takes a free port unless the args name one, so that
    /// tests running side by side do not fight over the default ports.
    pub fn spawn(name: &str, binary: &str, args: &[String], log_dir: &Path) -> Daemon {
        let mut args = args.to_vec();
        if !args.iter().any(|a| a == "--metrics-listen") {
            args.extend(["--metrics-listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        Self::spawn_program(name, &bin(binary).display().to_string(), &args, log_dir)
    }

    /// A Tessera daemon with extra environment variables.
    pub fn spawn_env(name: &str, binary: &str, args: &[String], env: &[(&str, String)], log_dir: &Path) -> Daemon {
        let mut args = args.to_vec();
        if !args.iter().any(|a| a == "--metrics-listen") {
            args.extend(["--metrics-listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        Self::spawn_inner(name, &bin(binary).display().to_string(), &args, env, log_dir)
    }

    /// Any program (e.g. `ip netns exec NS tessera-worker ...`), with the same log and cleanup.
    pub fn spawn_program(name: &str, program: &str, args: &[String], log_dir: &Path) -> Daemon {
        Self::spawn_inner(name, program, args, &[], log_dir)
    }

    fn spawn_inner(name: &str, program: &str, args: &[String], env: &[(&str, String)], log_dir: &Path) -> Daemon {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .env_remove("TESSERA_HEAD")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Daemon { name: name.to_string(), child: Some(child), log }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    pub fn signal(&self, s: Signal) {
        kill(self.pid(), s).unwrap_or_else(|e| panic!("kill -{s} {}: {e}", self.name));
    }

    /// Waits for exit (with the hang deadline) and returns the status.
    pub fn wait(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + crate::HANG;
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                self.child = None;
                return s;
            }
            if Instant::now() > deadline {
                panic!("{} did not exit within {:?}; log:\n{}", self.name, crate::HANG, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `tessera-head` process on an ephemeral port, with its data dir.
pub struct HeadProc {
    pub daemon: Daemon,
    pub url: String,
    pub data_dir: PathBuf,
}

/// Fast failure-detection settings are not used: tests run the defaults users get.
pub fn start_head(dir: &Path, name: &str, listen: &str, extra: &[&str]) -> HeadProc {
    let data_dir = dir.join(name);
    let _ = std::fs::remove_file(data_dir.join("head.addr"));
    crate::write_tokens(&data_dir);
    let mut args: Vec<String> = vec![
        "--listen".into(),
        listen.into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--node-name".into(),
        "head".into(),
    ];
    if !extra.contains(&"--fake-gpus") {
        args.extend(["--fake-gpus".into(), "4x80GiB".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut daemon = Daemon::spawn(name, "tessera-head", &args, dir);
    let addr_file = data_dir.join("head.addr");
    let deadline = Instant::now() + crate::HANG;
    let addr = loop {
        if let Ok(s) = std::fs::read_to_string(&addr_file)
            && s.ends_with('\n')
        {
            break s.trim().to_string();
        }
        if let Some(status) = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("head exited early ({status}):\n{}", daemon.log_text());
        }
        assert!(Instant::now() < deadline, "head did not start; log:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(10));
    };
    HeadProc { daemon, url: format!("http://{addr}"), data_dir }
}

/// A `tessera-gateway` on an ephemeral loopback port in front of `head` (with its reader token,
/// reading the deployments and checking replicas every 200 ms), logging under `dir`; and its
/// address once it says it listens.
pub fn start_gateway(dir: &Path, name: &str, head: &HeadProc, extra: &[&str]) -> (Daemon, String) {
    let reader = head.data_dir.join("reader.token");
    let mut args: Vec<String> = [
        "--head",
        head.url.trim_start_matches("http://"),
        "--token-file",
        &reader.display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--refresh",
        "200ms",
        "--health-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut d = Daemon::spawn_program(name, &bin("tessera-gateway").display().to_string(), &args, dir);
    let deadline = Instant::now() + crate::HANG;
    loop {
        let log = d.log_text();
        if let Some(addr) = log.lines().find_map(|l| l.strip_prefix("listening on ")) {
            return (d, addr.trim().to_string());
        }
        if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("gateway exited ({status}):\n{log}");
        }
        assert!(Instant::now() < deadline, "gateway did not start:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `tessera-worker` with fake GPUs and its own state dir under `dir`.
pub fn start_worker(dir: &Path, name: &str, head_url: &str) -> Daemon {
    start_worker_in(dir, name, head_url, &dir.join(format!("{name}-state")))
}

pub fn start_worker_in(dir: &Path, name: &str, head_url: &str, state_dir: &Path) -> Daemon {
    start_worker_with(dir, name, head_url, state_dir, &[])
}

/// A worker with extra flags (`--allow-command`, `--orphan-timeout 3s`, `--vllm-bin ...`).
pub fn start_worker_with(dir: &Path, name: &str, head_url: &str, state_dir: &Path, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = vec![
        "--head".into(),
        head_url.into(),
        "--node-name".into(),
        name.into(),
        "--state-dir".into(),
        state_dir.display().to_string(),
    ];
    if !extra.contains(&"--fake-gpus") {
        args.extend(["--fake-gpus".into(), "4x80GiB".into()]);
    }
    let token_file = dir.join("worker-join.token");
    if !token_file.exists() {
        std::fs::write(&token_file, format!("{}\n", crate::JOIN_TOKEN)).expect("token file");
    }
    if !extra.contains(&"--token") && !extra.contains(&"--token-file") {
        args.extend(["--token-file".to_string(), token_file.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::spawn(name, "tessera-worker", &args, dir)
}

/// Workers `w1` and `w2` of `head` (one URL, or several heads comma-separated), each with its
/// own state dir under `dir`, and the same extra flags.
pub fn two_workers(dir: &Path, head: &str, extra: &[&str]) -> Vec<Daemon> {
    ["w1", "w2"].iter().map(|n| start_worker_with(dir, n, head, &dir.join(format!("{n}-state")), extra)).collect()
}

/// Makes sure a Debian package's `command` is there: when it is missing, installs `packages` with
/// apt-get (once per test binary; tests run as root, as CI does), then checks again. `Err` says
/// what is missing and how to install it.
pub fn ensure_command(command: &str, packages: &[&str]) -> Result<(), String> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let have = || {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {command}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have() {
        return Ok(());
    }
    eprintln!("{command} is missing: installing {} with apt-get", packages.join(" "));
    let run = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut install = vec!["install", "-y", "-qq"];
    install.extend_from_slice(packages);
    if !run(&install) {
        run(&["update", "-qq"]);
        run(&install);
    }
    if have() {
        Ok(())
    } else {
        Err(format!(
            "{command} is not installed and apt-get could not install it: apt-get install {}",
            packages.join(" ")
        ))
    }
}

/// Whether `pid` has any /proc entry (a zombie counts: it is still in the process table).
pub fn in_proc(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether a process's environment mentions `needle` (engines carry TESSERA_PROCESS_DIR, which
/// names their worker's state dir).
pub fn environ_has(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).map(|e| String::from_utf8_lossy(&e).contains(needle)).unwrap_or(false)
}

/// Whether a process is alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()).is_some_and(|st| st != "Z"))
        .unwrap_or(false)
}

/// Pids of live processes whose command line contains every one of `needles`.
/// Kills, when dropped, the engine processes a test's workers started under `tag` (the test's
/// directory, which holds their state dirs): shims (whose command line names their dir) and the
/// engines under them (whose environment does). Engines outlive their worker on purpose (the
/// shims wait `--orphan-timeout` for an agent to come back); a test's end must not leave them
/// running, holding ports and GPUs the next test wants.
pub struct Reaper {
    pub tag: String,
}

impl Reaper {
    pub fn new(dir: &Path) -> Reaper {
        Reaper { tag: dir.display().to_string() }
    }

    /// The shims and engines of this test.
    pub fn pids(&self) -> Vec<u32> {
        engines_of(&self.tag)
    }
}

/// Probe engines whose environment names `tag` (their process dir is under a test's directory).
pub fn probes_of(tag: &str) -> Vec<u32> {
    pids_with(&[" probe --rank"]).into_iter().filter(|p| environ_has(*p, tag)).collect()
}

/// Shims and engines (probes, `sh -c` commands) of the workers under `tag`.
pub fn engines_of(tag: &str) -> Vec<u32> {
    let mut v = pids_with(&["shim --dir", tag]);
    v.extend(probes_of(tag));
    v.extend(pids_with(&["sh -c"]).into_iter().filter(|p| environ_has(*p, tag)));
    v
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

pub fn pids_with(needles: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if needles.iter().all(|n| cmd.contains(n)) && alive(pid) {
                out.push(pid);
            }
        }
    }
    out.sort_unstable();
    out
}
