//! `tessera-worker`: the daemon on every GPU node.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tessera_common::duration::parse_positive_duration;
use tessera_common::env;
use tessera_common::size::HumanBytes;
use tessera_worker::agent::{Agent, AgentConfig};
use tessera_worker::args::{LogArgs, NodeArgs, ShardArgs, StateArgs, TlsArgs, TokenArgs};
use tessera_worker::state::StateDir;
use tessera_worker::{gpu, signals, telemetry};
use tokio_util::sync::CancellationToken;

/// The Tessera worker: reports this machine's GPUs to the head and hosts model shards.
///
/// Run it on every GPU node with --head pointing at the head. It joins, heartbeats, and reconnects
/// forever (capped exponential backoff with jitter) when the head is away, keeping its node id in
/// --state-dir. SIGTERM or SIGINT make it leave the cluster gracefully and exit 0.
#[derive(Debug, Parser)]
#[command(name = "tessera-worker", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// URL of the head's gRPC endpoint, e.g. http://10.0.0.1:7470. Heads sharing an etcd store:
    /// all of them, separated by commas; the worker goes to the one that leads
    #[arg(long, env = env::HEAD, value_name = "URL")]
    head: Option<String>,

    #[command(flatten)]
    node: NodeArgs,

    #[command(flatten)]
    state: StateArgs,

    #[command(flatten)]
    shards: ShardArgs,

    #[command(flatten)]
    token: TokenArgs,

    #[command(flatten)]
    tls: TlsArgs,

    #[command(flatten)]
    log: LogArgs,

    /// Where to serve /metrics (Prometheus), /healthz and /readyz; port 0 picks a free one
    #[arg(long, env = "TESSERA_METRICS_LISTEN", default_value = "0.0.0.0:7472", value_name = "ADDR")]
    metrics_listen: std::net::SocketAddr,

    /// How long one attempt to connect to the head may take
    #[arg(long, env = "TESSERA_CONNECT_TIMEOUT", value_parser = parse_positive_duration, default_value = "2s")]
    connect_timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this machine's GPU inventory (NVML, or fake with --fake-gpus) and exit; needs no head
    Inventory {
        /// Output format
        #[arg(short, long, env = env::OUTPUT, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    // Everything the daemon writes (tokens, state, specs with their env, logs) is its user's alone.
    tessera_common::files::private_umask();
    tessera_common::files::raise_nofile();
    // `shim --dir DIR` and `probe ...`: the modes this binary runs in under a deployment.
    if let Some(code) = tessera_worker::shard::run_hidden_mode() {
        return code;
    }
    let (cli, matches, command) = tessera_worker::config::parse::<Cli>();
    if tessera_worker::config::print_if_asked(&matches, &command) {
        return ExitCode::SUCCESS;
    }
    let parts = match cli.node.to_parts() {
        Ok(p) => p,
        Err(e) => return usage(&e.to_string()),
    };
    if let Some(Command::Inventory { output }) = cli.command {
        let inv = gpu::detect(parts.fake_gpus, &parts.node_name).inventory();
        match output {
            Output::Json => match serde_json::to_string_pretty(&inv) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("error: cannot encode the inventory: {e}");
                    return ExitCode::from(1);
                }
            },
            Output::Text => print_inventory(&inv),
        }
        return ExitCode::SUCCESS;
    }
    let token = match cli.token.resolve() {
        Ok(t) => t,
        Err(e) => return usage(&e),
    };
    let Some(head) = cli.head.clone() else {
        return usage(
            "--head URL is required to run the worker (or set TESSERA_HEAD); e.g. --head http://10.0.0.1:7470",
        );
    };
    let tls = match cli.tls.client_config() {
        Ok(t) => t,
        Err(e) => return usage(&e),
    };
    let heads = match tessera_common::head_list(&head) {
        Ok(h) => h,
        Err(e) => return usage(&e),
    };
    for h in &heads {
        if let Err(e) = tessera_common::tls::check_scheme(h, tls.is_some()) {
            return usage(&e);
        }
    }
    if let Err(e) = telemetry::init(cli.log.log_format, &cli.log.log_level) {
        return usage(&e);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let state = match StateDir::open(&cli.state.state_dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(1);
            }
        };
        let shards = match cli.shards.host_config(state.path()) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(1);
            }
        };
        let metrics_listener = match tessera_worker::ops::bind(cli.metrics_listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(1);
            }
        };
        tessera_worker::ops::write_addr(&metrics_listener, &state.path().join("metrics.addr"));
        let inventory = gpu::detect(parts.fake_gpus, &parts.node_name);
        let metrics = tessera_worker::metrics::WorkerMetrics::for_daemon();
        let config = AgentConfig {
            token,
            tls,
            shards: Some(shards),
            stage: Some(cli.shards.stage_config(state.path())),
            head,
            metrics: Some(metrics.clone()),
            inventory: inventory.clone(),
            node_name: parts.node_name,
            labels: parts.labels,
            advertise_address: parts.advertise_addr,
            is_head: false,
            connect_timeout: cli.connect_timeout,
            leave_timeout: Duration::from_secs(2),
        };
        let agent = match Agent::new(config, state) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        };
        let root = CancellationToken::new();
        if let Err(e) = signals::spawn(root.clone()) {
            tracing::error!("cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
        let host = agent.shard_host();
        let host_for_stop = agent.shard_host();
        let status = agent.status();
        let render: tessera_worker::ops::Render = Arc::new(move || {
            let (metrics, inventory, host) = (metrics.clone(), inventory.clone(), host.clone());
            Box::pin(async move {
                tokio::task::spawn_blocking(move || metrics.render(inventory.as_ref(), host.as_ref()))
                    .await
                    .unwrap_or_default()
            })
        });
        let ready: tessera_worker::ops::Ready = Arc::new(move || status.borrow().joined);
        tokio::spawn(tessera_worker::ops::serve(metrics_listener, render, ready, root.child_token()));
        // systemd: READY=1 once joined, STATUS= as the session comes and goes, WATCHDOG, STOPPING.
        let notifier = Arc::new(tessera_worker::notify::Notifier::from_env());
        if notifier.enabled() {
            notifier.spawn_watchdog(root.child_token());
            let (n, mut st, stop) = (notifier.clone(), agent.status(), root.clone());
            tokio::spawn(async move {
                let mut was_ready = false;
                loop {
                    let s = st.borrow_and_update().clone();
                    let line = match (&s.node_id, s.joined) {
                        (Some(id), true) => format!("joined as node {id}"),
                        _ => "connecting to the head".to_string(),
                    };
                    if s.joined && !was_ready {
                        n.ready(&line);
                        was_ready = true;
                    } else {
                        n.status(&line);
                    }
                    tokio::select! {
                        // The stop first: when the agent ends, its status ends with it, and
                        // STOPPING=1 must still be said.
                        biased;
                        _ = stop.cancelled() => {
                            n.stopping();
                            return;
                        }
                        r = st.changed() => if r.is_err() {
                            if stop.is_cancelled() {
                                n.stopping();
                            }
                            return;
                        },
                    }
                }
            });
        }
        // As PID 1 (a container's entrypoint) this process adopts every orphan: reap them.
        let pid1 = std::process::id() == 1;
        if pid1 {
            tokio::spawn(tessera_worker::signals::reap_orphans(root.child_token()));
        }
        let result = agent.run(root).await;
        if pid1 {
            // The container goes away with this process: take the shards down first.
            if let Some(h) = host_for_stop {
                h.stop_all(Duration::from_secs(15)).await;
            }
        }
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(1)
            }
        }
    })
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("error: {msg}\n\nFor more information, try '--help'.");
    ExitCode::from(2)
}

fn print_inventory(inv: &tessera_common::node::Inventory) {
    if inv.gpus.is_empty() {
        println!("no GPUs ({})", if inv.note.is_empty() { "none found" } else { &inv.note });
        return;
    }
    if !inv.driver_version.is_empty() {
        println!("driver {}  CUDA {}", inv.driver_version, inv.cuda_driver_version);
    }
    if inv.source == tessera_common::node::InventorySource::Fake {
        println!("FAKE GPUs ({})", inv.note);
    }
    println!(
        "{:<5} {:<28} {:>10} {:>10} {:<4} {:<16} {:<4} {:<4} NVLINK PEERS",
        "GPU", "NAME", "MEMORY", "USED", "CC", "PCI", "NUMA", "MIG"
    );
    for g in &inv.gpus {
        let name = if g.fake { format!("{} (fake)", g.name) } else { g.name.clone() };
        let peers = if g.nvlink_peers.is_empty() {
            "-".to_string()
        } else {
            g.nvlink_peers.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        };
        println!(
            "{:<5} {:<28} {:>10} {:>10} {:<4} {:<16} {:<4} {:<4} {}",
            g.index,
            name,
            HumanBytes(g.memory_total_bytes).to_string(),
            HumanBytes(g.memory_used_bytes).to_string(),
            format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
            g.pci_bus_id,
            g.numa_node.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            if g.mig_enabled { "on" } else { "off" },
            peers
        );
        println!("      {}", g.uuid);
    }
}
