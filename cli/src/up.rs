//! `tessera up`: a whole cluster on one machine (a head and N workers as real processes, with fake
//! GPUs), for trying Tessera without GPUs. Ctrl-C stops every process it started.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tessera_common::fake::FakeGpuSpec;
use tessera_proto::v1 as pb;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, sleep};

use crate::client::{self, StatusContext};
use crate::nodes::nodes_table;

pub struct UpOptions {
    pub workers: u32,
    pub fake_gpus: FakeGpuSpec,
    pub listen: SocketAddr,
    pub dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    /// Deploy a demo (probe engine, planned from a real model config) once the nodes are up.
    pub deploy: bool,
    /// Where the gateway listens (None: no gateway).
    pub gateway: Option<SocketAddr>,
}

/// The demo's model: a real published config (Llama 3.1 8B: 32 heads, 8 KV heads, 32 layers),
/// shipped in examples/ and written into the cluster's directory so `up` works from anywhere.
const DEMO_CONFIG: &str = include_str!("../../examples/model-configs/Llama-3.1-8B-Instruct.json");

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

pub async fn up(opts: UpOptions) -> anyhow::Result<()> {
    let bins = BinDir::find(opts.bin_dir.as_deref())?;
    let logs = opts.dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let head_dir = opts.dir.join("head");
    fs::create_dir_all(&head_dir).with_context(|| format!("cannot create {}", head_dir.display()))?;
    let _ = fs::remove_file(head_dir.join("head.addr"));

    let mut procs: Vec<Proc> = Vec::new();
    let result = run(&opts, &bins, &logs, &head_dir, &mut procs).await;
    if let Some(url) = fs::read_to_string(head_dir.join("head.addr")).ok().map(|a| format!("http://{}", a.trim())) {
        delete_all(&url).await;
    }
    stop_all(&mut procs).await;
    result
}

async fn run(
    opts: &UpOptions,
    bins: &BinDir,
    logs: &Path,
    head_dir: &Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<()> {
    let spec = opts.fake_gpus.to_string();
    let head = spawn(
        "head",
        bins.path("tessera-head"),
        &[
            "--listen",
            &opts.listen.to_string(),
            "--data-dir",
            &head_dir.display().to_string(),
            "--node-name",
            "head",
            "--fake-gpus",
            &spec,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        logs,
    )?;
    procs.push(head);
    let addr = wait_for_addr(&head_dir.join("head.addr"), &mut procs[0]).await?;
    let url = format!("http://{addr}");
    // The head made its tokens: workers join with the join token, `up` itself acts as admin.
    let join_token = head_dir.join("join.token");
    let admin_token = head_dir.join("admin.token");
    if client::token().is_none() {
        let t = tessera_common::auth::read_token_file(&admin_token)
            .with_context(|| format!("cannot read the head's admin token {}", admin_token.display()))?;
        client::set_token(Some(t));
    }
    for i in 1..=opts.workers {
        let name = format!("worker-{i}");
        let state = opts.dir.join(&name);
        let p = spawn(
            &name,
            bins.path("tessera-worker"),
            &[
                "--head",
                &url,
                "--state-dir",
                &state.display().to_string(),
                "--node-name",
                &name,
                "--fake-gpus",
                &spec,
                "--token-file",
                &join_token.display().to_string(),
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            logs,
        )?;
        procs.push(p);
    }
    let nodes = wait_for_nodes(&url, opts.workers as usize + 1, procs).await?;
    let gateway = match opts.gateway {
        None => None,
        Some(listen) => {
            let reader_token = head_dir.join("reader.token");
            let p = spawn(
                "gateway",
                bins.path("tessera-gateway"),
                &["--head", &url, "--token-file", &reader_token.display().to_string(), "--listen", &listen.to_string()],
                logs,
            )?;
            procs.push(p);
            let n = procs.len() - 1;
            Some(wait_for_gateway(&mut procs[n]).await?)
        }
    };

    println!("Tessera is up: a head and {} worker(s), each with fake GPUs {spec}.\n", opts.workers);
    print!("{}", nodes_table(&nodes));
    println!("\nhead     {url}");
    if let Some(g) = &gateway {
        println!("gateway  http://{g}   (OpenAI-compatible: /v1/models, /v1/completions, /v1/chat/completions)");
    }
    println!("logs     {}", logs.display());
    let flag = if url == "http://127.0.0.1:7470" { String::new() } else { format!(" --head {url}") };
    let demo = if opts.deploy { Some(deploy_demo(opts, &url, nodes.len() as u32).await?) } else { None };
    // The commands run as printed: `tessera` when PATH finds this very binary, else its full path.
    let t = self_command();
    println!("\nTry, in another terminal (the admin token is in {}):", admin_token.display());
    println!("  export TESSERA_TOKEN_FILE={}", admin_token.display());
    println!("  {t}{flag} nodes");
    println!("  {t}{flag} status");
    println!("  {t}{flag} events -f");
    if let Some(d) = &demo {
        println!("  {t}{flag} get demo");
        println!("  {t}{flag} logs demo --rank 0");
        if let Some(r) = d.ranks.last() {
            println!("  kill -9 {}   # rank {} dies; the whole group restarts at generation 2", r.pid, r.rank);
        }
        if let Some(g) = &gateway {
            println!(
                "  curl -s http://{g}/v1/completions -H 'content-type: application/json' -d '{{\"model\": \"demo\", \"prompt\": \"hello\", \"max_tokens\": 8}}'"
            );
        }
        println!("  {t}{flag} delete demo");
    }
    println!(
        "  kill -9 {}   # a worker dies; watch it go dead within about a second",
        procs.iter().rev().find(|p| p.name.starts_with("worker-")).and_then(|p| p.child.id()).unwrap_or(0)
    );
    println!("\nPress Ctrl-C to stop everything.");

    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = check.tick() => {
                if let Some(status) = procs[0].child.try_wait()? {
                    bail!("the head exited ({status}); see {}", procs[0].log.display());
                }
                for p in procs.iter_mut().skip(1) {
                    if let Some(status) = p.child.try_wait()? {
                        eprintln!("{} exited ({status}); see {}", p.name, p.log.display());
                        p.name.push_str(" (exited)");
                    }
                }
                procs.retain(|p| !p.name.ends_with("(exited)"));
            }
        }
    }
    println!("\nstopping...");
    Ok(())
}

fn spawn(name: &str, bin: PathBuf, args: &[&str], logs: &Path) -> anyhow::Result<Proc> {
    let log = logs.join(format!("{name}.log"));
    let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Own process group: a Ctrl-C at the terminal reaches `up` alone, which then stops each
        // child in order (workers leave, then the head).
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {}: build the daemons beside tessera (cargo build --release --workspace --bins) or pass --bin-dir",
                bin.display()
            )
        })?;
    Ok(Proc { name: name.to_string(), child, log })
}

/// Deploys `demo` with the probe engine: TP over each node's GPUs (at most 4), PP over up to two
/// nodes, and waits until it runs.
async fn deploy_demo(opts: &UpOptions, url: &str, nodes: u32) -> anyhow::Result<pb::Deployment> {
    let model_dir = opts.dir.join("models/Llama-3.1-8B-Instruct");
    fs::create_dir_all(&model_dir).with_context(|| format!("cannot create {}", model_dir.display()))?;
    fs::write(model_dir.join("config.json"), DEMO_CONFIG)?;
    let gpus = opts.fake_gpus.count;
    let tp = [4u32, 2, 1].into_iter().find(|&t| t <= gpus).unwrap_or(1);
    let pp = nodes.min(2);
    let model = std::path::absolute(&model_dir)?;
    let mut c = pb::deployments_client::DeploymentsClient::new(client::connect(url).await?);
    let req = pb::CreateDeploymentRequest {
        name: "demo".into(),
        model_path: model.display().to_string(),
        tp,
        pp,
        engine: pb::Engine::Probe as i32,
        ..Default::default()
    };
    match c.create(req).await {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => return Err(client::status_error(s)),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let d = loop {
        let d = c.get(pb::GetDeploymentRequest { name: "demo".into() }).await.or_status()?;
        if d.state == pb::DeploymentState::Running as i32 {
            break d;
        }
        if d.state == pb::DeploymentState::Failed as i32 || Instant::now() > deadline {
            bail!("the demo deployment did not start: {}", d.message);
        }
        sleep(Duration::from_millis(50)).await;
    };
    println!(
        "\ndeployed demo: {} (probe engine), TP {tp} x PP {pp} = {} ranks on {} node(s), generation {}:",
        model.display(),
        d.ranks.len(),
        d.nnodes,
        d.generation
    );
    for r in &d.ranks {
        println!(
            "  rank {:<2} tp {} pp {} layers {:>2}-{:<2} on {:<10} GPU {}  pid {}",
            r.rank,
            r.tp_rank,
            r.pp_rank,
            r.layer_start,
            r.layer_end.saturating_sub(1),
            r.node,
            r.gpu_indices.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            r.pid
        );
    }
    Ok(d)
}

/// Deletes every deployment (their engines would otherwise outlive the agents until the orphan
/// timeout), waiting up to 20 s for them to be gone.
async fn delete_all(url: &str) {
    let Ok(ch) = client::connect(url).await else { return };
    let mut c = pb::deployments_client::DeploymentsClient::new(ch);
    let Ok(list) = c.list(pb::ListDeploymentsRequest {}).await else { return };
    let names: Vec<String> = list.into_inner().deployments.into_iter().map(|d| d.name).collect();
    for n in &names {
        let _ = c.delete(pb::DeleteDeploymentRequest { name: n.clone() }).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match c.list(pb::ListDeploymentsRequest {}).await {
            Ok(l) if l.get_ref().deployments.is_empty() => return,
            Ok(_) => sleep(Duration::from_millis(50)).await,
            Err(_) => return,
        }
    }
    eprintln!("some deployments were still stopping after 20s");
}

/// The gateway's address once it says where it listens (its log's `listening on ADDR`).
async fn wait_for_gateway(p: &mut Proc) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = fs::read_to_string(&p.log).unwrap_or_default();
        if let Some(a) = log.lines().find_map(|l| l.strip_prefix("listening on ")) {
            return Ok(a.trim().to_string());
        }
        if let Some(status) = p.child.try_wait()? {
            bail!(
                "the gateway exited ({status}) (is its port taken? use --gateway-listen or --no-gateway):\n{}",
                tail(&p.log, 10)
            );
        }
        if Instant::now() > deadline {
            bail!("the gateway did not start within 20 s; see {}", p.log.display());
        }
        sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_addr(path: &Path, head: &mut Proc) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(s) = fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return Ok(s.trim().to_string());
        }
        if let Some(status) = head.child.try_wait()? {
            bail!("the head exited during start-up ({status}):\n{}", tail(&head.log, 15));
        }
        if Instant::now() > deadline {
            bail!("the head did not start within 15s; see {}", head.log.display());
        }
        sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_nodes(url: &str, want: usize, procs: &mut [Proc]) -> anyhow::Result<Vec<pb::Node>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = client::cluster(url).await?;
    loop {
        let nodes = c.list_nodes(pb::ListNodesRequest::default()).await.or_status()?.nodes;
        let alive = nodes.iter().filter(|n| n.state == pb::NodeState::Alive as i32).count();
        if alive >= want {
            return Ok(nodes);
        }
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited during start-up ({status}):\n{}", p.name, tail(&p.log, 15));
            }
        }
        if Instant::now() > deadline {
            bail!(
                "only {alive} of {want} nodes joined within 20s; logs are in {}",
                procs[0].log.parent().map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Workers first (they leave while the head still listens), then the head. SIGTERM, then SIGKILL
/// after 5 s.
async fn stop_all(procs: &mut [Proc]) {
    let (head, workers) = match procs.split_first_mut() {
        Some((h, w)) => (Some(h), w),
        None => (None, &mut [][..]),
    };
    for p in workers.iter() {
        if let Some(pid) = p.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for p in workers.iter_mut() {
        stop_wait(p).await;
    }
    if let Some(h) = head {
        if let Some(pid) = h.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        stop_wait(h).await;
    }
}

async fn stop_wait(p: &mut Proc) {
    if tokio::time::timeout(Duration::from_secs(5), p.child.wait()).await.is_err() {
        eprintln!("{} did not stop within 5s; killing it", p.name);
        let _ = p.child.kill().await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Where the daemons' binaries are: `--bin-dir`, else beside this `tessera`, else on PATH.
struct BinDir(Option<PathBuf>);

impl BinDir {
    fn find(explicit: Option<&Path>) -> anyhow::Result<BinDir> {
        if let Some(d) = explicit {
            if !d.join("tessera-head").exists() {
                return Err(anyhow!("--bin-dir {}: no tessera-head there", d.display()));
            }
            return Ok(BinDir(Some(d.to_path_buf())));
        }
        let beside = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
        Ok(BinDir(beside.filter(|d| d.join("tessera-head").exists() && d.join("tessera-worker").exists())))
    }

    fn path(&self, name: &str) -> PathBuf {
        match &self.0 {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }
}

/// How to run this binary from a shell: `tessera` when the first `tessera` on PATH is this file,
/// else its full path.
fn self_command() -> String {
    let me = std::env::current_exe().ok().and_then(|p| p.canonicalize().ok());
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("tessera"))
            .find(|p| p.is_file())
            .and_then(|p| p.canonicalize().ok())
    });
    match (me, on_path) {
        (Some(me), Some(found)) if me == found => "tessera".into(),
        (Some(me), _) => me.display().to_string(),
        (None, _) => "tessera".into(),
    }
}
