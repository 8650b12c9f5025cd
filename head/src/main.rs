//! `tessera-head`: the head daemon (membership, failure detection, and its own GPUs as a worker).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tessera_common::duration::parse_positive_duration;
use tessera_common::env;
use tessera_head::membership::MembershipConfig;
use tessera_head::{Head, HeadConfig, HeadTls, LocalWorker};
use tessera_worker::args::{LogArgs, NodeArgs, ShardArgs};
use tessera_worker::{gpu, signals, telemetry};
use tokio_util::sync::CancellationToken;

/// The Tessera head: cluster membership, failure detection and placement, over gRPC.
///
/// The head is also a worker: it reports its own GPUs and hosts pipeline stage 0 (node rank 0)
/// unless --no-worker is given. It accepts the worker's node options (--fake-gpus, --node-name,
/// --advertise-addr, --labels) for that in-process worker.
#[derive(Debug, Parser)]
#[command(name = "tessera-head", version, max_term_width = 100)]
struct Cli {
    /// gRPC listen address. Port 0 picks a free port, written to DATA_DIR/head.addr
    #[arg(long, env = env::LISTEN, default_value = "0.0.0.0:7470", value_name = "ADDR")]
    listen: SocketAddr,

    /// Where to serve /metrics (Prometheus), /healthz and /readyz; port 0 picks a free one
    #[arg(long, env = "TESSERA_METRICS_LISTEN", default_value = "0.0.0.0:7471", value_name = "ADDR")]
    metrics_listen: SocketAddr,

    /// Directory for the head's durable state (and its in-process worker's node id)
    #[arg(long, env = env::DATA_DIR, default_value = "/var/lib/tessera/head", value_name = "DIR")]
    data_dir: PathBuf,

    /// How often workers send heartbeats (the head tells them)
    #[arg(long, env = env::HEARTBEAT_INTERVAL, value_parser = parse_positive_duration, default_value = "500ms")]
    heartbeat_interval: Duration,

    /// A node whose heartbeats stop (process frozen, host or link lost) is dead after this long
    #[arg(long, env = env::NODE_TIMEOUT, value_parser = parse_positive_duration, default_value = "3s")]
    node_timeout: Duration,

    /// A node whose session breaks (process died, connection reset) is dead unless it reconnects
    /// within this long
    #[arg(long, env = env::RECONNECT_GRACE, value_parser = parse_positive_duration, default_value = "1s")]
    reconnect_grace: Duration,

    /// After a restart, how long workers have to reconnect and report their running processes
    /// before the head judges anything (processes still missing then are restarted)
    #[arg(long, env = "TESSERA_RECOVERY_WINDOW", value_parser = parse_positive_duration, default_value = "10s")]
    recovery_window: Duration,

    /// `manual`: a node joining for the first time waits in `pending-approval` (no work is placed
    /// on it) until `tessera nodes approve NODE`; the head's own worker is always approved. `auto`:
    /// every node that joins with the join token may be used
    #[arg(long, env = "TESSERA_NODE_APPROVAL", value_enum, default_value_t = Approval::Auto)]
    node_approval: Approval,

    /// At most this many connections at once (each worker holds one); more are closed at once
    #[arg(long, env = "TESSERA_MAX_CONNECTIONS", default_value_t = 16_384, value_name = "N")]
    max_connections: usize,

    /// A connection that has made no authenticated call this long after it opened is closed (idle
    /// sockets cannot use up the head's file descriptors)
    #[arg(long, env = "TESSERA_UNAUTHENTICATED_TIMEOUT", value_parser = parse_positive_duration, default_value = "10s")]
    unauthenticated_timeout: Duration,

    /// Move a damaged DATA_DIR/state.redb aside (to state.redb.reset-UNIXMS) and start with an empty
    /// store: every deployment is forgotten, and engines that still run are stopped as unknown.
    /// Only for a store that cannot be opened and has no backup
    #[arg(long, env = "TESSERA_RESET_STATE")]
    reset_state: bool,

    /// Forget nodes that have been dead or left this long (unless a deployment holds their GPUs),
    /// so that a churning cluster does not grow the node table for ever; `tessera nodes remove`
    /// forgets one at once. A forgotten node that comes back joins as new
    #[arg(long, env = "TESSERA_FORGET_AFTER", value_parser = parse_positive_duration, default_value = "1h")]
    forget_after: Duration,

    /// File with the join token (workers present it to join). Default: DATA_DIR/join.token,
    /// generated (0600) on first start
    #[arg(long, env = "TESSERA_JOIN_TOKEN_FILE", value_name = "PATH")]
    join_token_file: Option<PathBuf>,

    /// File with the admin token (needed for everything but joining). Default: DATA_DIR/admin.token,
    /// generated (0600) on first start
    #[arg(long, env = "TESSERA_ADMIN_TOKEN_FILE", value_name = "PATH")]
    admin_token_file: Option<PathBuf>,

    /// File with the reader token: it reads deployments (List, Get; without their env and command)
    /// and nothing else, for gateways (`tessera-gateway --token-file`). Default:
    /// DATA_DIR/reader.token, generated (0600) on first start
    #[arg(long, env = "TESSERA_READER_TOKEN_FILE", value_name = "PATH")]
    reader_token_file: Option<PathBuf>,

    /// Turn authentication off. Anyone who reaches the port can then deploy and run processes:
    /// only for isolated test networks (a warning is logged at every start)
    #[arg(long, env = "TESSERA_INSECURE")]
    insecure: bool,

    /// Serve TLS with this certificate (PEM). It must also name `localhost`: the head's own worker
    /// connects over loopback
    #[arg(long, env = "TESSERA_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// Key (PEM) of --tls-cert
    #[arg(long, env = "TESSERA_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (mTLS). The head's own certificate must be
    /// signed by it too: its in-process worker presents it
    #[arg(long, env = "TESSERA_TLS_CLIENT_CA", value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// CA that signed --tls-cert, for the head's own worker to trust [default: --tls-cert itself,
    /// right for a self-signed certificate]
    #[arg(long, env = "TESSERA_TLS_CA", value_name = "PEM", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,

    /// Do not run a worker in the head: the head's GPUs are not used
    #[arg(long, env = env::NO_WORKER)]
    no_worker: bool,

    #[command(flatten)]
    node: NodeArgs,

    #[command(flatten)]
    shards: ShardArgs,

    #[command(flatten)]
    log: LogArgs,
}

/// `--node-approval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Approval {
    Auto,
    Manual,
}

fn main() -> ExitCode {
    // Everything the daemon writes (tokens, state, specs with their env, logs) is its user's alone.
    tessera_common::files::private_umask();
    // Thousands of workers are thousands of sockets: the soft limit goes up to the hard one.
    tessera_common::files::raise_nofile();
    // The in-process worker's shims and probes run this binary in those modes.
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
    let membership = MembershipConfig {
        heartbeat_interval: cli.heartbeat_interval,
        node_timeout: cli.node_timeout,
        reconnect_grace: cli.reconnect_grace,
        forget_after: cli.forget_after,
        manual_approval: cli.node_approval == Approval::Manual,
    };
    if let Err(e) = membership.validate() {
        return usage(&e);
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
    // Before anything in the data dir is read or written (tokens, addresses, the store).
    let data_dir_lock = match tessera_head::datadir::lock(&cli.data_dir) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    if cli.reset_state {
        let store = cli.data_dir.join("state.redb");
        if store.exists() {
            let aside = cli.data_dir.join(format!("state.redb.reset-{}", tessera_head::membership::unix_ms()));
            if let Err(e) = std::fs::rename(&store, &aside) {
                tracing::error!("--reset-state: cannot move {} aside: {e}", store.display());
                return ExitCode::from(1);
            }
            tracing::warn!(
                "--reset-state: moved {} to {}; starting with an empty store (every deployment is forgotten)",
                store.display(),
                aside.display()
            );
        }
    }
    let code = runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(cli.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(
                    "cannot listen on {}: {e}; pick another address with --listen (port 0 picks a free port)",
                    cli.listen
                );
                return ExitCode::from(1);
            }
        };
        let shards = match cli.shards.host_config(&cli.data_dir.join("worker")) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(1);
            }
        };
        let worker = (!cli.no_worker).then(|| LocalWorker {
            shards: Some(shards),
            stage: Some(cli.shards.stage_config(&cli.data_dir.join("worker"))),
            inventory: gpu::detect(parts.fake_gpus, &parts.node_name),
            node_name: parts.node_name,
            labels: parts.labels,
            advertise_address: parts.advertise_addr,
        });
        let root = CancellationToken::new();
        if let Err(e) = signals::spawn(root.clone()) {
            tracing::error!("cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
        let auth = if cli.insecure {
            None
        } else {
            match tokens(
                &cli.data_dir,
                cli.join_token_file.as_deref(),
                cli.admin_token_file.as_deref(),
                cli.reader_token_file.as_deref(),
            ) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(1);
                }
            }
        };
        let tls = match (&cli.tls_cert, &cli.tls_key) {
            (Some(cert), Some(key)) => {
                let server = tessera_common::tls::server_config(cert, key, cli.tls_client_ca.as_deref());
                let ca = cli.tls_ca.clone().unwrap_or_else(|| cert.clone());
                let identity = cli.tls_client_ca.as_ref().map(|_| (cert.as_path(), key.as_path()));
                let own = tessera_common::tls::client_config(
                    Some(&ca),
                    identity.map(|i| i.0),
                    identity.map(|i| i.1),
                    Some("localhost"),
                );
                match (server, own) {
                    (Ok(server), Ok(Some(own_worker))) => Some(HeadTls { server, own_worker }),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::error!("{e}");
                        return ExitCode::from(2);
                    }
                    (Ok(_), Ok(None)) => None,
                }
            }
            _ => None,
        };
        let metrics_listener = match tessera_worker::ops::bind(cli.metrics_listen).await {
            Ok(l) => {
                let _ = std::fs::create_dir_all(&cli.data_dir);
                tessera_worker::ops::write_addr(&l, &cli.data_dir.join("metrics.addr"));
                Some(l)
            }
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(1);
            }
        };
        let config = HeadConfig {
            membership,
            data_dir: cli.data_dir,
            worker,
            recovery_window: cli.recovery_window,
            auth,
            tls,
            metrics_listener,
            data_dir_lock: Some(data_dir_lock),
            join_token_path: cli.join_token_file.clone(),
            conn_limits: tessera_head::server::conns::ConnLimits {
                max_connections: cli.max_connections,
                unauthenticated_timeout: cli.unauthenticated_timeout,
            },
        };
        let stop = root.clone();
        let head = match Head::start(listener, config, root).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(1);
            }
        };
        // systemd: READY=1 now that the store is open and the server listens; a STATUS= summary
        // every 5 s; WATCHDOG=1 when asked; STOPPING=1 on shutdown.
        let notifier = std::sync::Arc::new(tessera_worker::notify::Notifier::from_env());
        if notifier.enabled() {
            notifier.spawn_watchdog(stop.child_token());
            notifier.ready(&format!("serving on {}", head.addr));
            let (n, m, d, stop) = (notifier.clone(), head.membership.clone(), head.deployments.clone(), stop.clone());
            tokio::spawn(async move {
                let mut t = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            n.stopping();
                            return;
                        }
                        _ = t.tick() => {
                            let nodes = m.list().await;
                            let alive = nodes.iter().filter(|v| v.state == tessera_common::node::NodeState::Alive).count();
                            let deps = d.list().await.unwrap_or_default();
                            let running = deps.iter().filter(|x| x.state == tessera_proto::v1::DeploymentState::Running as i32).count();
                            n.status(&format!("{alive}/{} nodes alive, {running}/{} deployments running", nodes.len(), deps.len()));
                        }
                    }
                }
            });
        }
        match head.stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(1)
            }
        }
    });
    // A model read stuck on a hung mount must not keep the process from exiting.
    runtime.shutdown_timeout(Duration::from_secs(2));
    code
}

/// The tokens: from the given files, else from (or generated into) the data dir.
fn tokens(
    data_dir: &std::path::Path,
    join_file: Option<&std::path::Path>,
    admin_file: Option<&std::path::Path>,
    reader_file: Option<&std::path::Path>,
) -> Result<tessera_common::auth::TokenSet, String> {
    use tessera_common::auth::{TokenSet, read_token_file};
    let (mut set, created) = TokenSet::load_or_create(data_dir)
        .map_err(|e| format!("cannot read or create the tokens in {}: {e}", data_dir.display()))?;
    if created {
        tracing::info!(
            join = %TokenSet::join_path(data_dir).display(),
            admin = %TokenSet::admin_path(data_dir).display(),
            reader = %TokenSet::reader_path(data_dir).display(),
            "generated the tokens (mode 0600): give workers the join token, clients the admin token, gateways the reader token"
        );
    }
    if let Some(p) = join_file {
        set.join = read_token_file(p).map_err(|e| format!("--join-token-file: {e}"))?;
    }
    if let Some(p) = admin_file {
        set.admin = read_token_file(p).map_err(|e| format!("--admin-token-file: {e}"))?;
    }
    if let Some(p) = reader_file {
        set.reader = read_token_file(p).map_err(|e| format!("--reader-token-file: {e}"))?;
    }
    if set.join == set.admin {
        return Err("the join and admin tokens must differ, or a worker could deploy".into());
    }
    if set.reader == set.admin || set.reader == set.join {
        return Err("the reader token must differ from the join and admin tokens".into());
    }
    Ok(set)
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("error: {msg}\n\nFor more information, try '--help'.");
    ExitCode::from(2)
}
