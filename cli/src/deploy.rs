//! `tessera deploy`, `deployments`, `get`, `delete`, `restart`, `logs`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::anyhow;
use serde_json::{Value, json};
use tessera_common::size::HumanBytes;
use tessera_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::Output;
use crate::client::{self, StatusContext};
use crate::table::Table;

pub struct DeployArgs {
    pub name: String,
    pub model: std::path::PathBuf,
    pub tp: u32,
    pub pp: u32,
    pub replicas: u32,
    /// An update: stop an old replica before starting a new one (no spare GPUs).
    pub max_unavailable: u32,
    pub engine: pb::Engine,
    pub command: Option<String>,
    pub per_node: bool,
    pub env: Vec<(String, String)>,
    pub max_restarts: Option<i32>,
    pub wait: bool,
    pub gpu_memory_utilization: Option<f64>,
    pub max_model_len: Option<u64>,
    pub startup_timeout_s: u32,
    /// Negative: off.
    pub stall_timeout_s: i32,
    pub canary_interval_s: i32,
    /// Negative: no drain.
    pub drain_timeout_s: i32,
    pub staging: StagingArg,
    pub model_from: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub engine_args: Vec<String>,
    pub output: Output,
}

/// `--startup-timeout`: a duration (30m, 1h), in whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StagingArg {
    Auto,
    On,
    Off,
}

impl StagingArg {
    fn to_pb(self) -> pb::StagingMode {
        match self {
            StagingArg::Auto => pb::StagingMode::Unspecified,
            StagingArg::On => pb::StagingMode::On,
            StagingArg::Off => pb::StagingMode::Off,
        }
    }
}

pub fn parse_secs(s: &str) -> Result<u32, String> {
    let d = tessera_common::duration::parse_positive_duration(s)?;
    u32::try_from(d.as_secs().max(1)).map_err(|_| format!("{s}: too long"))
}

/// `--stall-timeout`, `--canary-interval`: a duration, or `off` (-1 on the wire).
pub fn parse_secs_or_off(s: &str) -> Result<i32, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(-1);
    }
    let d = tessera_common::duration::parse_positive_duration(s).map_err(|e| format!("{e}, or off"))?;
    i32::try_from(d.as_secs().max(1)).map_err(|_| format!("{s}: too long"))
}

async fn client(head: &str) -> anyhow::Result<pb::deployments_client::DeploymentsClient<client::Conn>> {
    Ok(pb::deployments_client::DeploymentsClient::new(client::connect(head).await?))
}

/// For an update, which answers once every replica was replaced (minutes with a real model).
async fn long_client(head: &str) -> anyhow::Result<pb::deployments_client::DeploymentsClient<client::Conn>> {
    Ok(pb::deployments_client::DeploymentsClient::new(client::connect_untimed(head).await?))
}

pub fn state_name(s: i32) -> &'static str {
    match pb::DeploymentState::try_from(s).unwrap_or(pb::DeploymentState::Unspecified) {
        pb::DeploymentState::Pending => "pending",
        pb::DeploymentState::Starting => "starting",
        pb::DeploymentState::Running => "running",
        pb::DeploymentState::Restarting => "restarting",
        pb::DeploymentState::Failed => "failed",
        pb::DeploymentState::Stopping => "stopping",
        pb::DeploymentState::Stopped => "stopped",
        pb::DeploymentState::Draining => "draining",
        pb::DeploymentState::Staging => "staging",
        pb::DeploymentState::Unspecified => "unknown",
    }
}

fn process_state(s: i32) -> &'static str {
    match pb::ProcessState::try_from(s).unwrap_or(pb::ProcessState::Unspecified) {
        pb::ProcessState::Starting => "starting",
        pb::ProcessState::Running => "running",
        pb::ProcessState::Ready => "ready",
        pb::ProcessState::Exited => "exited",
        pb::ProcessState::Stopped => "stopped",
        pb::ProcessState::Unhealthy => "unhealthy",
        pb::ProcessState::Unspecified => "-",
    }
}

fn engine_name(e: i32) -> &'static str {
    match pb::Engine::try_from(e).unwrap_or(pb::Engine::Unspecified) {
        pb::Engine::Vllm => "vllm",
        pb::Engine::Command => "command",
        pb::Engine::Probe => "probe",
        pb::Engine::Unspecified => "?",
    }
}

/// A string field as JSON: `null` when empty (no value), not `""`.
pub fn some(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The JSON shape of a deployment (`get -o json`).
pub fn deployment_json(d: &pb::Deployment) -> Value {
    let ranks: Vec<Value> = d
        .ranks
        .iter()
        .map(|r| {
            json!({
                "rank": r.rank,
                "tp_rank": r.tp_rank,
                "pp_rank": r.pp_rank,
                "node": r.node,
                "node_id": r.node_id,
                "node_rank": r.node_rank,
                "gpu_indices": r.gpu_indices,
                "pid": (r.pid != 0).then_some(r.pid),
                "state": process_state(r.state),
                "exit_code": r.exit_code,
                "signal": r.signal,
                "layer_start": r.layer_start,
                "layer_end": r.layer_end,
                "rtt_us": r.rtt_us,
            })
        })
        .collect();
    let env: BTreeMap<&String, &String> = d.env.iter().collect();
    let staging_nodes: Vec<Value> = d
        .staging_nodes
        .iter()
        .map(|n| {
            json!({
                "node": n.node,
                "node_id": n.node_id,
                "phase": n.phase,
                "bytes_done": n.bytes_done,
                "bytes_needed": n.bytes_needed,
                "files_done": n.files_done,
                "files_needed": n.files_needed,
                "rate_bytes_per_s": n.rate_bytes_per_s,
                "model_bytes": n.model_bytes,
                "chunks_refetched": n.chunks_refetched,
            })
        })
        .collect();
    let staging = match pb::StagingMode::try_from(d.staging).unwrap_or(pb::StagingMode::Unspecified) {
        pb::StagingMode::On => "on",
        _ => "off",
    };
    json!({
        "name": d.name,
        "state": state_name(d.state),
        "staging": staging,
        "staging_nodes": staging_nodes,
        "model_from": (!d.model_from.is_empty()).then_some(&d.model_from),
        "node_selector": d.node_selector.iter().collect::<BTreeMap<_, _>>(),
        "message": some(&d.message),
        "generation": d.generation,
        "restarts": d.restarts,
        "max_restarts": d.max_restarts,
        "tp": d.tp,
        "pp": d.pp,
        "nnodes": d.nnodes,
        "engine": engine_name(d.engine),
        "model_path": d.model_path,
        "master_addr": some(&d.master_addr),
        "master_port": (d.master_port != 0).then_some(d.master_port),
        "health_url": some(&d.health_url),
        "endpoint": some(&d.endpoint),
        "max_model_len": (d.max_model_len != 0).then_some(d.max_model_len),
        "managed_by": some(&d.managed_by),
        "startup_timeout_s": d.startup_timeout_s,
        "stall_timeout_s": (d.stall_timeout_s >= 0).then_some(d.stall_timeout_s),
        "canary_interval_s": (d.canary_interval_s >= 0).then_some(d.canary_interval_s),
        "drain_timeout_s": (d.drain_timeout_s >= 0).then_some(d.drain_timeout_s),
        "engine_args": d.engine_args,
        "env": env,
        "command": some(&d.command),
        "state_since_ms_ago": d.state_since_ms_ago,
        "ranks": ranks,
        "revision": d.revision,
        "replicas": d.replicas.iter().map(|r| json!({
            "index": r.index,
            "revision": r.revision,
            "state": state_name(r.state),
            "message": some(&r.message),
            "generation": r.generation,
            "restarts": r.restarts,
            "endpoint": (!r.endpoint.is_empty()).then_some(&r.endpoint),
            "state_since_ms_ago": r.state_since_ms_ago,
        })).collect::<Vec<_>>(),
    })
}

pub async fn deploy(head: &str, a: DeployArgs) -> anyhow::Result<u8> {
    if a.model_from.is_some() && !a.model.is_absolute() {
        eprintln!(
            "error: --model {}: with --model-from give the model's absolute path on that node",
            a.model.display()
        );
        return Ok(2);
    }
    let model = std::path::absolute(&a.model)?;
    let req = pb::CreateDeploymentRequest {
        name: a.name.clone(),
        model_path: model.display().to_string(),
        tp: a.tp,
        pp: a.pp,
        engine: a.engine as i32,
        engine_args: a.engine_args,
        env: a.env.into_iter().collect(),
        max_restarts: a.max_restarts.map(|n| if n == 0 { -1 } else { n }).unwrap_or(0),
        command: a.command.unwrap_or_default(),
        per_node: a.per_node,
        gpu_memory_utilization: a.gpu_memory_utilization.unwrap_or(0.0),
        max_model_len: a.max_model_len.unwrap_or(0),
        startup_timeout_s: a.startup_timeout_s,
        stall_timeout_s: a.stall_timeout_s,
        canary_interval_s: a.canary_interval_s,
        replicas: a.replicas,
        drain_timeout_s: a.drain_timeout_s,
        staging: a.staging.to_pb() as i32,
        model_from: a.model_from.clone().unwrap_or_default(),
        node_selector: a.node_selector.clone().into_iter().collect(),
        managed_by: String::new(),
    };
    // Watch before creating, so no event of the new deployment is missed.
    let mut events = if a.wait {
        let mut c = client::cluster(head).await?;
        Some(c.watch_events(pb::WatchEventsRequest { include_current: false }).await.or_status()?)
    } else {
        None
    };
    let mut c = client(head).await?;
    let d = match c.create(req.clone()).await {
        Ok(r) => r.into_inner(),
        // The name exists: the same command with a changed spec is a rolling update.
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            eprintln!("{} exists: rolling it to this spec, one replica at a time...", a.name);
            let (max_surge, max_unavailable) = if a.max_unavailable > 0 { (0, 1) } else { (1, 0) };
            let update = pb::UpdateDeploymentRequest { spec: Some(req), max_surge, max_unavailable };
            let mut c = long_client(head).await?;
            return match c.update(update).await {
                Ok(r) => {
                    let d = r.into_inner();
                    println!("{}: every replica runs revision {}", d.name, d.revision);
                    print_summary(&d, a.output);
                    Ok(0)
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    eprintln!("error: {}", s.message());
                    Ok(1)
                }
                Err(s) => Err(client::status_error(s)),
            };
        }
        Err(s) if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound) => {
            eprintln!("error: {}", s.message());
            return Ok(2);
        }
        Err(s) => return Err(client::status_error(s)),
    };
    let Some(events) = events.as_mut() else {
        print_summary(&d, a.output);
        return Ok(0);
    };
    let tty = std::io::stdout().is_terminal() && matches!(a.output, Output::Text | Output::Wide);
    let mut last_line = String::new();
    let mut current = d;
    loop {
        let line = progress_line(&current, tty);
        if line != last_line {
            if tty {
                print!("\r\x1b[2K{line}");
            } else if matches!(a.output, Output::Text | Output::Wide) {
                println!("{line}");
            }
            std::io::stdout().flush()?;
            last_line = line;
        }
        // With replicas: running once every one is; failed once any is.
        let states: Vec<i32> = if current.replicas.is_empty() {
            vec![current.state]
        } else {
            current.replicas.iter().map(|r| r.state).collect()
        };
        let all = |s: pb::DeploymentState| states.iter().all(|x| *x == s as i32);
        let any = |s: pb::DeploymentState| states.contains(&(s as i32));
        let verdict = if all(pb::DeploymentState::Running) {
            pb::DeploymentState::Running
        } else if any(pb::DeploymentState::Failed) {
            pb::DeploymentState::Failed
        } else {
            pb::DeploymentState::try_from(current.state).unwrap_or(pb::DeploymentState::Unspecified)
        };
        match verdict {
            pb::DeploymentState::Running => {
                if tty {
                    println!();
                }
                print_summary(&current, a.output);
                return Ok(0);
            }
            pb::DeploymentState::Failed | pb::DeploymentState::Stopped => {
                if tty {
                    println!();
                }
                print_summary(&current, a.output);
                return Ok(1);
            }
            _ => {}
        }
        let group = format!("{}.", a.name);
        // While staging, the progress is read every second (no event per byte).
        let staging = current.state == pb::DeploymentState::Staging as i32;
        let next = loop {
            let ev = if staging {
                match tokio::time::timeout(Duration::from_secs(1), events.next()).await {
                    Ok(e) => e,
                    Err(_) => break c.get(pb::GetDeploymentRequest { name: a.name.clone() }).await.or_status()?,
                }
            } else {
                events.next().await
            };
            match ev {
                Some(Ok(e)) => {
                    // An event of any replica (named NAME or NAME.N): the whole deployment again.
                    if e.deployment.is_some_and(|x| x.name == a.name || x.name.starts_with(&group)) {
                        break c.get(pb::GetDeploymentRequest { name: a.name.clone() }).await.or_status()?;
                    }
                }
                Some(Err(s)) => return Err(client::status_error(s)),
                None => return Err(anyhow!("the head closed the event stream")),
            }
        };
        current = next;
    }
}

fn progress_line(d: &pb::Deployment, tty: bool) -> String {
    if d.state == pb::DeploymentState::Staging as i32 {
        let receivers = d.staging_nodes.iter().filter(|n| n.phase == "fetching" || n.phase == "done");
        let (done, needed) = receivers.fold((0u64, 0u64), |(a, b), n| (a + n.bytes_done, b + n.bytes_needed));
        let rate: u64 = d.staging_nodes.iter().map(|n| n.rate_bytes_per_s).sum();
        let bar = if tty {
            let filled = (done.min(needed) * 20).checked_div(needed).unwrap_or(0) as usize;
            format!("[{}{}] ", "#".repeat(filled), ".".repeat(20 - filled))
        } else {
            String::new()
        };
        let rate = if rate > 0 { format!(" at {}/s", HumanBytes(rate)) } else { String::new() };
        return format!(
            "{bar}{} staging: {} of {} staged{rate}: {}",
            d.name,
            HumanBytes(done),
            HumanBytes(needed),
            d.message
        );
    }
    let total = d.ranks.len().max(1);
    let ready = d.ranks.iter().filter(|r| r.state == pb::ProcessState::Ready as i32).count();
    let launched = d.ranks.iter().filter(|r| r.pid > 0).count();
    let bar = if tty {
        let width = 20;
        let filled = ready * width / total;
        format!("[{}{}] ", "#".repeat(filled), ".".repeat(width - filled))
    } else {
        String::new()
    };
    let replicas = if d.replicas.len() > 1 { format!(" [{} replicas running]", ready_of(d)) } else { String::new() };
    format!(
        "{bar}{} {}: generation {}, {launched}/{} ranks launched, {ready}/{} ready{replicas}: {}",
        d.name,
        state_name(d.state),
        d.generation,
        d.ranks.len(),
        d.ranks.len(),
        d.message
    )
}

fn print_summary(d: &pb::Deployment, output: Output) {
    match output {
        Output::Json | Output::Yaml => crate::output::print(output, &deployment_json(d)),
        Output::Text | Output::Wide => {
            println!("{} is {} (generation {}): {}", d.name, state_name(d.state), d.generation, d.message);
        }
    }
}

/// `get NAME` or `deployments`, once, or again after every change of it (`-w`).
pub async fn watching(head: &str, name: Option<String>, watch: bool, output: Output) -> anyhow::Result<u8> {
    let show = |name: Option<String>| async move {
        match name {
            Some(n) => get(head, n, output).await,
            None => list(head, output).await,
        }
    };
    if !watch {
        return show(name).await;
    }
    // Subscribe first, so that no change between the first print and the watch is missed.
    let mut c = client::cluster(head).await?;
    let mut events = c.watch_events(pb::WatchEventsRequest { include_current: false }).await.or_status()?;
    let code = show(name.clone()).await?;
    if code != 0 {
        return Ok(code);
    }
    let group = name.as_ref().map(|n| format!("{n}."));
    loop {
        match events.next().await {
            Some(Ok(e)) => {
                let Some(d) = e.deployment else { continue };
                let ours = match (&name, &group) {
                    (Some(n), Some(g)) => d.name == *n || d.name.starts_with(g.as_str()),
                    _ => true,
                };
                if !ours {
                    continue;
                }
                if let Some(n) = &name {
                    let gone = client(head).await?.get(pb::GetDeploymentRequest { name: n.clone() }).await;
                    if matches!(&gone, Err(s) if s.code() == tonic::Code::NotFound) {
                        println!("\n{n}: deleted");
                        return Ok(0);
                    }
                }
                println!();
                show(name.clone()).await?;
            }
            Some(Err(s)) => return Err(client::status_error(s)),
            None => anyhow::bail!("the head at {head} ended the event stream (it stopped or restarted)"),
        }
    }
}

pub async fn list(head: &str, output: Output) -> anyhow::Result<u8> {
    let mut c = client(head).await?;
    let ds = c.list(pb::ListDeploymentsRequest {}).await.or_status()?.deployments;
    match output {
        Output::Json | Output::Yaml => {
            crate::output::print(output, &Value::Array(ds.iter().map(deployment_json).collect()))
        }
        Output::Text if ds.is_empty() => println!("no deployments"),
        Output::Text | Output::Wide => {
            let mut t = Table::new(&[
                "NAME", "STATE", "READY", "GEN", "RESTARTS", "TPxPP", "ENGINE", "NODES", "ENDPOINT", "MESSAGE",
            ]);
            for d in &ds {
                t.row(vec![
                    d.name.clone(),
                    state_name(d.state).into(),
                    ready_of(d),
                    d.generation.to_string(),
                    d.restarts.to_string(),
                    format!("{}x{}", d.tp, d.pp),
                    engine_name(d.engine).into(),
                    d.nnodes.to_string(),
                    if d.endpoint.is_empty() { "-".into() } else { d.endpoint.clone() },
                    d.message.chars().take(80).collect(),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(0)
}

/// Replicas running / replicas, e.g. `2/3`.
fn ready_of(d: &pb::Deployment) -> String {
    let running = d.replicas.iter().filter(|r| r.state == pb::DeploymentState::Running as i32).count();
    format!("{running}/{}", d.replicas.len().max(1))
}

pub async fn get(head: &str, name: String, output: Output) -> anyhow::Result<u8> {
    let mut c = client(head).await?;
    let d = c.get(pb::GetDeploymentRequest { name }).await.or_status()?;
    match output {
        Output::Json | Output::Yaml => crate::output::print(output, &deployment_json(&d)),
        Output::Text | Output::Wide => {
            println!("name        {}", d.name);
            println!(
                "state       {} (generation {}, {} restart(s), max {} in 10 min)",
                state_name(d.state),
                d.generation,
                d.restarts,
                d.max_restarts
            );
            println!("message     {}", d.message);
            if d.model_from.is_empty() {
                println!("model       {}", d.model_path);
            } else {
                println!("model       {} (on {})", d.model_path, d.model_from);
            }
            println!("shape       TP {} x PP {} on {} node(s), engine {}", d.tp, d.pp, d.nnodes, engine_name(d.engine));
            if !d.node_selector.is_empty() {
                let mut pairs: Vec<String> = d.node_selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                pairs.sort();
                println!("nodes       with labels {}", pairs.join(","));
            }
            if !d.endpoint.is_empty() {
                println!("endpoint    {}", d.endpoint);
            }
            if d.master_port > 0 {
                println!("rendezvous  {}:{}", d.master_addr, d.master_port);
            }
            if !d.health_url.is_empty() {
                println!("health      {}", d.health_url);
            }
            if !d.staging_nodes.is_empty() {
                println!("staging     the model from {} (each node gets its stages' files):", d.staging_nodes[0].node);
                let mut t =
                    Table::new(&["NODE", "PHASE", "STAGED", "NEEDED", "OF MODEL", "FILES", "RATE", "REFETCHED"]);
                for n in &d.staging_nodes {
                    let of_model = if n.model_bytes > 0 {
                        format!("{:.0}%", 100.0 * n.bytes_needed as f64 / n.model_bytes as f64)
                    } else {
                        "-".into()
                    };
                    t.row(vec![
                        n.node.clone(),
                        n.phase.clone(),
                        HumanBytes(n.bytes_done).to_string(),
                        HumanBytes(n.bytes_needed).to_string(),
                        if n.phase == "source" || n.phase == "hashing" { "-".into() } else { of_model },
                        if n.files_needed > 0 { format!("{}/{}", n.files_done, n.files_needed) } else { "-".into() },
                        if n.rate_bytes_per_s > 0 {
                            format!("{}/s", HumanBytes(n.rate_bytes_per_s))
                        } else {
                            "-".into()
                        },
                        n.chunks_refetched.to_string(),
                    ]);
                }
                print!("{}", t.render());
            }
            if d.replicas.len() > 1 {
                println!("replicas    {} running", ready_of(&d));
                let mut t = Table::new(&["REPLICA", "REV", "STATE", "GEN", "RESTARTS", "ENDPOINT", "MESSAGE"]);
                for r in &d.replicas {
                    t.row(vec![
                        r.index.to_string(),
                        r.revision.to_string(),
                        state_name(r.state).into(),
                        r.generation.to_string(),
                        r.restarts.to_string(),
                        if r.endpoint.is_empty() { "-".into() } else { r.endpoint.clone() },
                        r.message.chars().take(80).collect(),
                    ]);
                }
                print!("{}", t.render());
                println!("\nreplica 0's ranks (`tessera logs NAME --replica N` for another's):");
            }
            let mut t = Table::new(&["RANK", "TP", "PP", "LAYERS", "NODE", "GPUS", "PID", "STATE", "EXIT", "RTT"]);
            for r in &d.ranks {
                let exit = match (r.exit_code, r.signal) {
                    (_, Some(s)) => format!("signal {s}"),
                    (Some(c), None) => c.to_string(),
                    _ => "-".into(),
                };
                t.row(vec![
                    r.rank.to_string(),
                    r.tp_rank.to_string(),
                    r.pp_rank.to_string(),
                    format!("{}-{}", r.layer_start, r.layer_end.saturating_sub(1)),
                    r.node.clone(),
                    r.gpu_indices.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
                    if r.pid > 0 { r.pid.to_string() } else { "-".into() },
                    process_state(r.state).into(),
                    exit,
                    r.rtt_us.map(|u| format!("{u}us")).unwrap_or_else(|| "-".into()),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(0)
}

/// `tessera apply -f`: each deployment of the files created, rolled to its file, or left alone.
pub async fn apply(head: &str, paths: Vec<std::path::PathBuf>) -> anyhow::Result<u8> {
    use tessera_common::manifest;
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(manifest::files_in(&p).map_err(|e| anyhow!(e))?);
        } else {
            files.push(p);
        }
    }
    let mut reqs = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for f in &files {
        for m in manifest::read_file(f).map_err(|e| anyhow!(e))? {
            if let Some(other) = seen.insert(m.name.clone(), f.clone()) {
                eprintln!("error: {}: deployment {:?} is also in {}", f.display(), m.name, other.display());
                return Ok(2);
            }
            reqs.push(m.to_request("").map_err(|e| anyhow!("{}: {e}", f.display()))?);
        }
    }
    if reqs.is_empty() {
        eprintln!("error: no deployment in the files given");
        return Ok(2);
    }
    let mut c = client(head).await?;
    let mut failed = false;
    for req in reqs {
        let name = req.name.clone();
        let before = c.get(pb::GetDeploymentRequest { name: name.clone() }).await;
        let result = match before {
            Err(s) if s.code() == tonic::Code::NotFound => c.create(req).await.map(|_| "created".to_string()),
            Err(s) => Err(s),
            Ok(d) => {
                let was = d.into_inner().revision;
                let update = pb::UpdateDeploymentRequest { spec: Some(req), max_surge: 1, max_unavailable: 0 };
                long_client(head).await?.update(update).await.map(|r| {
                    let now = r.into_inner().revision;
                    if now == was { "unchanged".to_string() } else { format!("updated to revision {now}") }
                })
            }
        };
        match result {
            Ok(what) => println!("{name}: {what}"),
            Err(s) => {
                eprintln!("error: {name}: {}", s.message());
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

pub async fn delete(head: &str, name: String, wait: bool, ignore_not_found: bool) -> anyhow::Result<u8> {
    let mut c = client(head).await?;
    match c.delete(pb::DeleteDeploymentRequest { name: name.clone() }).await {
        Ok(_) => {}
        Err(s) if ignore_not_found && s.code() == tonic::Code::NotFound => {
            println!("{name}: not found (nothing to delete)");
            return Ok(0);
        }
        Err(s) => return Err(client::status_error(s)),
    }
    if !wait {
        println!("{name}: stopping");
        return Ok(0);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match c.get(pb::GetDeploymentRequest { name: name.clone() }).await {
            Err(s) if s.code() == tonic::Code::NotFound => {
                println!("{name}: deleted; every process stopped");
                return Ok(0);
            }
            Err(s) => return Err(client::status_error(s)),
            Ok(_) if tokio::time::Instant::now() > deadline => {
                return Err(anyhow!("{name} is still stopping after 60s; check `tessera get {name}`"));
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub async fn restart(head: &str, name: String) -> anyhow::Result<u8> {
    let mut c = client(head).await?;
    let d = c.restart(pb::RestartDeploymentRequest { name }).await.or_status()?;
    println!("{}: {}", d.name, d.message);
    Ok(0)
}

pub struct UpdateArgs {
    pub name: String,
    pub model: Option<std::path::PathBuf>,
    pub env: Vec<(String, String)>,
    pub unset_env: Vec<String>,
    pub tp: Option<u32>,
    pub pp: Option<u32>,
    pub gpu_memory_utilization: Option<f64>,
    pub max_model_len: Option<u64>,
    pub max_unavailable: u32,
    pub engine_args: Vec<String>,
}

/// The spec `d` runs, as a Create request (what an update starts from).
fn spec_of(d: &pb::Deployment) -> pb::CreateDeploymentRequest {
    pb::CreateDeploymentRequest {
        name: d.name.clone(),
        model_path: d.model_path.clone(),
        tp: d.tp,
        pp: d.pp,
        engine: d.engine,
        engine_args: d.engine_args.clone(),
        env: d.env.clone(),
        // The API's "none" is negative; a deployment shows 0 for it.
        max_restarts: if d.max_restarts == 0 { -1 } else { d.max_restarts },
        command: d.command.clone(),
        per_node: d.per_node,
        gpu_memory_utilization: d.gpu_memory_utilization,
        max_model_len: d.max_model_len,
        startup_timeout_s: d.startup_timeout_s,
        stall_timeout_s: d.stall_timeout_s,
        canary_interval_s: d.canary_interval_s,
        replicas: 0,
        drain_timeout_s: d.drain_timeout_s,
        staging: d.staging,
        model_from: d.model_from.clone(),
        node_selector: d.node_selector.clone(),
        managed_by: d.managed_by.clone(),
    }
}

pub async fn update(head: &str, a: UpdateArgs) -> anyhow::Result<u8> {
    let mut c = long_client(head).await?;
    let d = c.get(pb::GetDeploymentRequest { name: a.name.clone() }).await.or_status()?;
    let mut spec = spec_of(&d);
    if let Some(m) = a.model {
        spec.model_path = std::path::absolute(&m)?.display().to_string();
    }
    for (k, v) in a.env {
        spec.env.insert(k, v);
    }
    for k in a.unset_env {
        if spec.env.remove(&k).is_none() {
            eprintln!("warning: {} has no env {k} to unset", a.name);
        }
    }
    spec.tp = a.tp.unwrap_or(spec.tp);
    spec.pp = a.pp.unwrap_or(spec.pp);
    spec.gpu_memory_utilization = a.gpu_memory_utilization.unwrap_or(spec.gpu_memory_utilization);
    spec.max_model_len = a.max_model_len.unwrap_or(spec.max_model_len);
    if !a.engine_args.is_empty() {
        spec.engine_args = a.engine_args;
    }
    let (max_surge, max_unavailable) = if a.max_unavailable > 0 { (0, 1) } else { (1, 0) };
    let before = d.revision;
    match c.update(pb::UpdateDeploymentRequest { spec: Some(spec), max_surge, max_unavailable }).await {
        Ok(r) => {
            let d = r.into_inner();
            if d.revision == before {
                println!("{}: unchanged (revision {})", d.name, d.revision);
            } else {
                println!("{}: every replica runs revision {} (was {before})", d.name, d.revision);
            }
            Ok(0)
        }
        Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument) => {
            eprintln!("error: {}", s.message());
            Ok(if s.code() == tonic::Code::InvalidArgument { 2 } else { 1 })
        }
        Err(s) => Err(client::status_error(s)),
    }
}

pub async fn rollback(head: &str, name: String, max_unavailable: u32) -> anyhow::Result<u8> {
    let mut c = long_client(head).await?;
    let (max_surge, max_unavailable) = if max_unavailable > 0 { (0, 1) } else { (1, 0) };
    match c.rollback(pb::RollbackDeploymentRequest { name, max_surge, max_unavailable }).await {
        Ok(r) => {
            let d = r.into_inner();
            println!(
                "{}: rolled back; every replica runs revision {} (the spec of the one before)",
                d.name, d.revision
            );
            Ok(0)
        }
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            eprintln!("error: {}", s.message());
            Ok(1)
        }
        Err(s) => Err(client::status_error(s)),
    }
}

pub async fn scale(head: &str, name: String, replicas: u32) -> anyhow::Result<u8> {
    let mut c = client(head).await?;
    let d = c.scale(pb::ScaleDeploymentRequest { name, replicas }).await.or_status()?;
    println!("{}: {} replica(s), {} running", d.name, d.replicas.len(), ready_of(&d));
    Ok(0)
}

pub struct LogsArgs {
    pub name: String,
    pub rank: u64,
    pub replica: u32,
    pub tail: u32,
    pub follow: bool,
    pub follow_restarts: bool,
    pub which: Which,
}

/// Which generation's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Current,
    Previous,
    Generation(u64),
}

/// The generation the replica runs now.
async fn generation_of(head: &str, name: &str, replica: u32) -> Result<u64, tonic::Status> {
    let d = client(head)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?
        .get(pb::GetDeploymentRequest { name: name.into() })
        .await?
        .into_inner();
    Ok(d.replicas.iter().find(|r| r.index == replica).map(|r| r.generation).unwrap_or(d.generation))
}

pub async fn logs(head: &str, a: LogsArgs) -> anyhow::Result<u8> {
    let generation = match a.which {
        Which::Current => 0,
        Which::Generation(n) => n,
        Which::Previous => {
            let now = generation_of(head, &a.name, a.replica).await.map_err(client::status_error)?;
            if now <= 1 {
                eprintln!("error: {} runs generation {now}: there is no earlier one", a.name);
                return Ok(1);
            }
            now - 1
        }
    };
    let mut tail = a.tail;
    loop {
        let seen = if a.follow_restarts { generation_of(head, &a.name, a.replica).await.ok() } else { None };
        let mut c = client(head).await?;
        let req = pb::LogsRequest {
            name: a.name.clone(),
            rank: a.rank,
            replica: a.replica,
            tail,
            follow: a.follow,
            generation,
        };
        // After a restart the new generation's process may not be up on its node yet: a few tries.
        let mut tries = if tail == 100_000 { 20 } else { 1 };
        let mut out = std::io::stdout();
        loop {
            tries -= 1;
            let r: Result<(), tonic::Status> = async {
                let mut s = c.logs(req.clone()).await?.into_inner();
                while let Some(chunk) = s.next().await {
                    let chunk = chunk?;
                    out.write_all(&chunk.data).map_err(|e| tonic::Status::internal(e.to_string()))?;
                    out.flush().map_err(|e| tonic::Status::internal(e.to_string()))?;
                }
                Ok(())
            }
            .await;
            match r {
                Ok(()) => break,
                Err(s) if tries > 0 && s.code() != tonic::Code::NotFound => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(s) => return Err(client::status_error(s)),
            }
        }
        let Some(seen) = seen else { return Ok(0) };
        // The generation ended: wait for the next one (or the deployment's end).
        eprintln!("--- {} generation {seen} ended; waiting for the next ---", a.name);
        loop {
            match generation_of(head, &a.name, a.replica).await {
                Ok(g) if g > seen => break,
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {
                    eprintln!("--- {} was deleted ---", a.name);
                    return Ok(0);
                }
                Err(s) => return Err(client::status_error(s)),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // A new generation's log from its start.
        tail = 100_000;
        // Its process may not have started on its node yet.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `K=V` for `--env`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("invalid --env {s:?}: write NAME=VALUE"))
}
