//! The `tessera` binary end to end: errors people see, and `tessera up` as the README runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tessera() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.env_remove("TESSERA_HEAD").env_remove("TESSERA_OUTPUT");
    c
}

#[test]
fn an_unreachable_head_is_a_clear_error_with_exit_1() {
    // Port 1 on loopback: nothing listens there.
    let out = tessera().args(["--head", "http://127.0.0.1:1", "nodes"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the head at http://127.0.0.1:1"), "{err}");
    assert!(err.contains("TESSERA_HEAD"), "says how to point elsewhere: {err}");
}

#[test]
fn completions_and_man_pages_come_from_the_commands_themselves() {
    let out = tessera().args(["completions", "bash"]).output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("complete -F") && text.contains("--staging") && text.contains("deploy"), "bash completions");
    for shell in ["zsh", "fish"] {
        let out = tessera().args(["completions", shell]).output().expect("run");
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("model-from"), "{shell}");
    }
    let out = tessera().args(["man"]).output().expect("man");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(".ie"), "roff");
    let dir = tempfile::tempdir().expect("tmp");
    let out = tessera().args(["man", "--dir"]).arg(dir.path()).output().expect("man --dir");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = std::fs::read_to_string(dir.path().join("tessera-deploy.1")).expect("a page per command");
    assert!(page.contains("staging"), "{page}");
}

#[test]
fn bad_usage_exits_2() {
    let out = tessera().args(["up", "--fake-gpus", "lots"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("COUNTxMEMORY"));
}

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; only count running processes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

/// Pids of processes whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmd).contains(needle)
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// One raw HTTP/1.1 exchange with `addr` (the request says `Connection: close`).
fn http(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(request.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn a_head_that_never_answers_is_a_clear_error_within_the_timeout() {
    // Accepts, reads nothing, answers nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let _hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().take(4) {
            held.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let t0 = Instant::now();
    // host:port, as DATA_DIR/head.addr holds it, is a head URL too.
    let out = tessera()
        .args(["--head", &addr, "--timeout", "1s", "--token", "tsa_test_admin_token_0123456789", "status"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("did not answer within 1s (--timeout)"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(8), "gave up in time: {:?}", t0.elapsed());
    let out = tessera().args(["--timeout", "soon", "status"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "a bad --timeout is a usage error");
}

/// When an assertion fails, `up` is stopped anyway (Ctrl-C, which stops what it started), then
/// whatever still runs from its directory is killed: a failed test leaves nothing behind.
struct StopOnPanic {
    pid: i32,
    dir: String,
}

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(15);
        while alive(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in pids_mentioning(&self.dir) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

#[test]
fn up_starts_a_local_cluster_that_nodes_lists_and_ctrl_c_stops_it_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_s = dir.path().display().to_string();
    let mut up = tessera()
        .args([
            "up",
            "--workers",
            "2",
            "--fake-gpus",
            "2x40GiB",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            &dir_s,
            "--deploy",
            "--gateway-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn up");
    let _cleanup = StopOnPanic { pid: up.id() as i32, dir: dir_s.clone() };
    let stdout = up.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut url = None;
    let mut gateway = None;
    let mut deployed = false;
    let mut banner = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("up prints its banner");
        banner.push(line.clone());
        if let Some(u) = line.strip_prefix("head   ") {
            url = Some(u.trim().to_string());
        }
        if let Some(g) = line.strip_prefix("gateway  http://") {
            gateway = g.split_whitespace().next().map(str::to_string);
        }
        if line.starts_with("deployed demo:") {
            assert!(line.contains("TP 2 x PP 2 = 4 ranks on 2 node(s)"), "{line}");
            deployed = true;
        }
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    let url = url.expect("head URL printed");
    // The follow-up commands run as printed: `tessera` is not on PATH here, so its full path.
    let nodes_cmd = banner.iter().find(|l| l.trim_end().ends_with(" nodes")).expect("a nodes command printed");
    let program = nodes_cmd.split_whitespace().next().expect("program");
    assert!(std::path::Path::new(program).is_file(), "runs as printed: {nodes_cmd}");
    // The demo answers through the gateway `up` started (once the gateway has seen it running).
    let gateway = gateway.expect("gateway address printed");
    let body = r#"{"model": "demo", "prompt": "hello", "max_tokens": 4}"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let a = http(
            &gateway,
            &format!(
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        if a.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("\"text_completion\""), "{answer}");
    let admin = dir.path().join("head/admin.token");
    let tessera = || {
        let mut c = tessera();
        c.env("TESSERA_TOKEN_FILE", &admin);
        c
    };
    // Without the token the head refuses, and says what to do.
    let denied = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["--head", &url, "nodes"])
        .env_remove("TESSERA_TOKEN_FILE")
        .env_remove("TESSERA_TOKEN")
        .output()
        .expect("nodes");
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("missing bearer token"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    assert!(deployed, "--deploy deploys the demo before the banner ends");
    let get = tessera().args(["--head", &url, "get", "demo", "-o", "json"]).output().expect("get");
    let demo: serde_json::Value = serde_json::from_slice(&get.stdout).expect("json");
    assert_eq!(demo["state"], "running");
    assert_eq!(demo["ranks"][0]["node"], "head", "stage 0 on the head");
    for key in ["name", "state", "message", "generation", "restarts", "tp", "pp", "ranks"] {
        assert!(demo.get(key).is_some(), "missing {key}");
    }
    for key in ["rank", "tp_rank", "pp_rank", "node", "gpu_indices", "pid", "state", "exit_code"] {
        assert!(demo["ranks"][0].get(key).is_some(), "missing ranks[].{key}");
    }
    let yaml = tessera().args(["--head", &url, "get", "demo", "-o", "yaml"]).output().expect("get -o yaml");
    let yaml = String::from_utf8_lossy(&yaml.stdout);
    assert!(yaml.contains("\nstate: \"running\"\n") && yaml.contains("\nranks:\n  - "), "{yaml}");

    // A reader that went away (`tessera nodes | head -1`): no panic, no message, status 0.
    for args in [&["nodes"][..], &["get", "demo"], &["status"], &["deployments"], &["events"]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = tessera().args(["--head", &url]).args(args).stdout(writer).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.is_empty(), "{args:?} into a closed pipe: {:?} {err}", out.status);
    }

    // Events with their time: RFC 3339 in JSON (null, not "", where there is no reason), the
    // time of day in text.
    let out = tessera().args(["--head", &url, "events", "-o", "json"]).output().expect("events");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let e: serde_json::Value = serde_json::from_str(line).expect("a JSON event a line");
        let t = e["time"].as_str().unwrap_or_else(|| panic!("no time: {line}"));
        assert!(t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
        assert_ne!(e["reason"], "", "{e}");
    }
    let out = tessera().args(["--head", &url, "events"]).output().expect("events");
    let first = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
    assert!(first.as_bytes().get(2) == Some(&b':') && first.as_bytes().get(5) == Some(&b':'), "a time column: {first}");

    // Deleting what is not there: an error naming it, unless --ignore-not-found.
    let out = tessera().args(["--head", &url, "delete", "nope"]).output().expect("delete");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\""), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tessera().args(["--head", &url, "delete", "nope", "--ignore-not-found"]).output().expect("delete");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    let out = tessera().args(["--head", &url, "nodes", "-o", "json"]).output().expect("nodes");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let nodes = nodes.as_array().expect("array");
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        for key in ["id", "name", "state", "address", "is_head", "labels", "last_heartbeat_ms_ago", "gpus"] {
            assert!(n.get(key).is_some(), "missing {key} in {n}");
        }
        assert_eq!(n["state"], "alive");
        let gpus = n["gpus"].as_array().expect("gpus");
        assert_eq!(gpus.len(), 2);
        for g in gpus {
            for key in ["index", "uuid", "name", "memory_total_bytes", "memory_used_bytes", "nvlink_peers", "fake"] {
                assert!(g.get(key).is_some(), "missing gpus[].{key} in {g}");
            }
            assert_eq!(g["fake"], true);
            assert_eq!(g["memory_total_bytes"], 40u64 << 30);
        }
    }
    assert_eq!(nodes.iter().filter(|n| n["is_head"] == true).count(), 1);

    let text = tessera().args(["--head", &url, "status"]).output().expect("status");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("3 (3 alive)") && text.contains("6 of them fake"), "{text}");
    assert!(text.contains("4 reserved by deployments, 2 free"), "the demo holds 4 of the 6 GPUs: {text}");
    let wide = tessera().args(["--head", &url, "nodes", "-o", "wide"]).output().expect("nodes -o wide");
    let wide = String::from_utf8_lossy(&wide.stdout);
    assert_eq!(wide.lines().filter(|l| l.trim_end().ends_with(" demo")).count(), 4, "which GPU the demo holds: {wide}");

    // Planning against the live cluster: 3 nodes x 2 GPUs, TP 2 x PP 3, stage 0 on the head.
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/model-configs/Llama-3.1-8B-Instruct.json");
    let plan = tessera()
        .args([
            "--head",
            url.trim_start_matches("http://"),
            "plan",
            "--model",
            model,
            "--tp",
            "2",
            "--pp",
            "3",
            "-o",
            "json",
        ])
        .output()
        .expect("plan");
    assert_eq!(plan.status.code(), Some(0), "{}", String::from_utf8_lossy(&plan.stderr));
    let p: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("json");
    assert_eq!(p["nnodes"], 3);
    assert_eq!(p["placement"][0]["node"], "head");

    // `get -w` prints again as the deployment changes (here: through the update below).
    let mut watcher = tessera()
        .args(["--head", &url, "get", "demo", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("get -w");
    let watched = watcher.stdout.take().expect("stdout");
    let (wtx, wrx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(watched).lines().map_while(Result::ok) {
            let _ = wtx.send(line);
        }
    });

    // An update of what is given only (here: the engine args), stopping the old replica first
    // (no GPUs for another group of TP 2 x PP 2); get shows the new revision.
    let out = tessera()
        .args(["--head", &url, "update", "demo", "--max-unavailable", "1", "--", "--token-delay-ms", "1"])
        .output()
        .expect("update");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("every replica runs revision 2 (was 1)"), "{text}");
    let got = tessera().args(["--head", &url, "get", "demo", "-o", "json"]).output().expect("get");
    let d: serde_json::Value = serde_json::from_slice(&got.stdout).expect("json");
    assert_eq!((d["revision"].as_u64(), d["tp"].as_u64()), (Some(2), Some(2)), "{d}");
    assert_eq!(d["engine_args"], serde_json::json!(["--token-delay-ms", "1"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut blocks = 0;
    while blocks < 2 {
        let line = wrx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("get -w prints again");
        blocks += usize::from(line.starts_with("name        demo"));
    }
    let _ = watcher.kill();
    let _ = watcher.wait();

    let up_pid = up.id() as i32;
    let children: Vec<i32> = pids_mentioning(&dir_s).into_iter().filter(|&p| p != up_pid).collect();
    assert_eq!(children.len(), 3 + 1 + 4, "a head, two workers, a gateway and the demo's four shims run: {children:?}");
    // Following events while the head goes away: it says so and exits non-zero.
    let mut follow = tessera()
        .args(["--head", &url, "events", "-f"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("events -f");
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = up.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "up did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "up exits 0 on Ctrl-C: {status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let followed = loop {
        if let Some(s) = follow.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "events -f did not notice the head went away");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut follow.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert_eq!(followed.code(), Some(1), "events -f when the head goes away: {err}");
    assert!(err.contains("head"), "says what happened: {err}");
    let left: Vec<i32> = children.into_iter().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let worker_log = std::fs::read_to_string(dir.path().join("logs/worker-1.log")).expect("worker log");
    assert!(worker_log.contains("left the cluster"), "workers left gracefully:\n{worker_log}");
}
