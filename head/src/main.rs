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

    /// A directory of deployment files (TOML or YAML, the fields of `tessera deploy`; see `tessera
    /// apply --help`): the head creates what they declare, updates it when a file changes (rolling,
    /// one replica at a time) and deletes it when its file goes away. Deployments made by calls are
    /// not touched
    #[arg(long, env = "TESSERA_DEPLOYMENTS_DIR", value_name = "DIR")]
    deployments: Option<PathBuf>,

    /// Where the head keeps its state. `redb`: a file in DATA_DIR (one head). `etcd://HOST:2379[,HOST:2379...]`
    /// (`etcds://` or --etcd-ca for TLS): an etcd cluster shared by several heads, of which one leads
    /// (holds an etcd lease) and the others stand by and take over when it is gone. Heads on etcd run
    /// no worker (--no-worker): run tessera-worker beside them
    #[arg(long, env = "TESSERA_STORE", default_value = "redb", value_name = "redb|etcd://HOSTS")]
    store: String,

    /// Every key the head writes in etcd starts with this; heads of one cluster share it, clusters
    /// sharing an etcd use different ones
    #[arg(long, env = "TESSERA_ETCD_PREFIX", default_value = "/tessera/", value_name = "PREFIX")]
    etcd_prefix: String,

    /// The leading head's etcd lease: a leader that cannot renew it (dead, frozen, cut off from etcd)
    /// stops acting before it runs out, and a standby takes over when it has. Whole seconds, at least 2
    #[arg(long, env = "TESSERA_LEADER_LEASE", value_parser = parse_positive_duration, default_value = "3s")]
    leader_lease: Duration,

    /// The URL clients and workers use to reach this head, given to them by standbys when this head
    /// leads [default: http(s)://LISTEN, with --advertise-addr or the host name for 0.0.0.0]
    #[arg(long, env = "TESSERA_ADVERTISE_URL", value_name = "URL")]
    advertise_url: Option<String>,

    /// CA (PEM) that signed the etcd members' certificates (TLS to etcd)
    #[arg(long, env = "TESSERA_ETCD_CA", value_name = "PEM")]
    etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's client-cert authentication
    #[arg(long, env = "TESSERA_ETCD_CERT", value_name = "PEM", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,

    /// Key (PEM) of --etcd-cert
    #[arg(long, env = "TESSERA_ETCD_KEY", value_name = "PEM", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,

    /// etcd user (etcd's own authentication); its password is read from --etcd-password-file
    #[arg(long, env = "TESSERA_ETCD_USER", value_name = "NAME", requires = "etcd_password_file")]
    etcd_user: Option<String>,

    /// File holding the password of --etcd-user
    #[arg(long, env = "TESSERA_ETCD_PASSWORD_FILE", value_name = "PATH", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,

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
    let ha = match ha_options(&cli) {
        Ok(h) => h,
        Err(e) => return usage(&e),
    };
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
        // Heads on etcd: the store first (the tokens are shared through it).
        let etcd = match &ha {
            Some(h) => {
                let cfg = h.etcd.clone();
                match tokio::task::spawn_blocking(move || tessera_head::etcd::Etcd::connect(cfg)).await {
                    Ok(Ok(e)) => Some(e),
                    Ok(Err(e)) => {
                        tracing::error!("--store: {e}");
                        return ExitCode::from(1);
                    }
                    Err(e) => {
                        tracing::error!("--store: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            None => None,
        };
        let explicit_tokens =
            cli.join_token_file.is_some() || cli.admin_token_file.is_some() || cli.reader_token_file.is_some();
        // Heads on etcd share the tokens through it; read once leading (a rotation may come
        // between).
        let shares_tokens = etcd.is_some() && !explicit_tokens && !cli.insecure;
        let mut auth = if cli.insecure || shares_tokens {
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
        // Heads on etcd stand by until they lead.
        let mut leading = None;
        let (listener, metrics_listener) = match (&ha, &etcd, metrics_listener) {
            (Some(h), Some(etcd), Some(metrics)) => {
                let server_tls = tls.as_ref().map(|t| t.server.clone());
                let limits = tessera_head::server::conns::ConnLimits {
                    max_connections: cli.max_connections,
                    unauthenticated_timeout: cli.unauthenticated_timeout,
                };
                match stand_by_then_lead(h, etcd, listener, metrics, server_tls, limits, &root).await {
                    Ok(Some((l, m, lead))) => {
                        leading = Some(lead);
                        (l, Some(m))
                    }
                    Ok(None) => return ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e}");
                        return ExitCode::from(1);
                    }
                }
            }
            (_, _, m) => (listener, m),
        };
        if let (true, Some(etcd)) = (shares_tokens, &etcd) {
            match shared_tokens(etcd, &cli.data_dir).await {
                Ok(t) => auth = Some(t),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(1);
                }
            }
        }
        let config = HeadConfig {
            membership,
            data_dir: cli.data_dir,
            worker,
            recovery_window: cli.recovery_window,
            auth,
            tls,
            metrics_listener,
            data_dir_lock: Some(data_dir_lock),
            deployments_dir: cli.deployments.clone(),
            store: leading.as_ref().map(|l: &Leading| (l.store.clone(), l.fence.clone())),
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
        let Some(lead) = leading else {
            return match head.stopped().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::from(1)
                }
            };
        };
        let (hold, hold_stop) = (lead.hold, lead.hold_stop);
        let lost = lead.fence.lost();
        let stopped = head.stopped();
        tokio::pin!(stopped);
        tokio::select! {
            r = &mut stopped => {
                // Hand leadership over at once (revoke the lease) rather than when it runs out.
                hold_stop.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(2), hold).await;
                match r {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e}");
                        ExitCode::from(1)
                    }
                }
            }
            _ = lost.cancelled() => {
                tracing::error!(
                    reason = %lead.fence.why().unwrap_or_default(),
                    "lost leadership: this head stops acting (engines keep running on the workers, which follow the \
                     new leader) and exits with status 75 so that its supervisor starts it again as a standby"
                );
                stop.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(5), stopped).await;
                ExitCode::from(75)
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

/// `--store etcd://...` and the options that go with it.
struct Ha {
    etcd: tessera_head::etcd::EtcdConfig,
    lease: Duration,
    advertise_url: String,
}

/// What a head that won the election holds.
struct Leading {
    fence: std::sync::Arc<tessera_head::leader::Fence>,
    store: std::sync::Arc<tessera_head::store::Store>,
    /// The lease renewal (from the moment the election was won); cancelling `hold_stop` revokes
    /// the lease.
    hold: tokio::task::JoinHandle<()>,
    hold_stop: CancellationToken,
}

fn ha_options(cli: &Cli) -> Result<Option<Ha>, String> {
    if cli.store == "redb" {
        return Ok(None);
    }
    let tls_to_etcd = cli.etcd_ca.is_some() || cli.etcd_cert.is_some();
    let endpoints = tessera_head::etcd::EtcdConfig::parse_store_url(&cli.store, tls_to_etcd)?;
    if !cli.no_worker {
        return Err(format!(
            "--store {}: heads that take over from each other run no worker of their own; add --no-worker and run \
             tessera-worker on this machine (with --head listing every head), so that a head that stops leading does \
             not take its node with it",
            cli.store
        ));
    }
    if cli.reset_state {
        return Err("--reset-state is for the embedded store (redb); an etcd store is managed with etcdctl".into());
    }
    let lease = cli.leader_lease;
    if lease.subsec_nanos() != 0 || lease < Duration::from_secs(2) {
        return Err(format!(
            "--leader-lease {lease:?}: etcd leases are whole seconds; give at least 2s (the default is 3s)"
        ));
    }
    if !cli.etcd_prefix.starts_with('/') || !cli.etcd_prefix.ends_with('/') || cli.etcd_prefix.len() < 2 {
        return Err(format!(
            "--etcd-prefix {:?}: write a path that starts and ends with /, e.g. /tessera/",
            cli.etcd_prefix
        ));
    }
    let user = match (&cli.etcd_user, &cli.etcd_password_file) {
        (Some(u), Some(p)) => {
            let pw = std::fs::read_to_string(p).map_err(|e| format!("--etcd-password-file {}: {e}", p.display()))?;
            Some((u.clone(), pw.trim_end_matches(['\n', '\r']).to_string()))
        }
        _ => None,
    };
    let tls = tessera_common::tls::client_config(
        cli.etcd_ca.as_deref(),
        cli.etcd_cert.as_deref(),
        cli.etcd_key.as_deref(),
        None,
    )
    .map_err(|e| format!("etcd TLS: {e}"))?;
    if tls.is_none() && endpoints.iter().any(|u| u.starts_with("https://")) {
        return Err("--store etcds://...: give --etcd-ca (the CA that signed the etcd members' certificates)".into());
    }
    let scheme = if cli.tls_cert.is_some() { "https" } else { "http" };
    let advertise_url = match &cli.advertise_url {
        Some(u) => {
            if !u.starts_with("http://") && !u.starts_with("https://") {
                return Err(format!("--advertise-url {u:?}: write a URL, e.g. {scheme}://10.0.0.1:7470"));
            }
            u.clone()
        }
        None => {
            let host = match (cli.listen.ip().is_unspecified(), cli.node.advertise_addr) {
                (false, _) => cli.listen.ip().to_string(),
                (true, Some(ip)) => ip.to_string(),
                (true, None) => tessera_worker::state::hostname(),
            };
            if cli.listen.port() == 0 {
                return Err("--store etcd: heads need a fixed --listen port (clients and workers are given it)".into());
            }
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            format!("{scheme}://{host}:{}", cli.listen.port())
        }
    };
    Ok(Some(Ha {
        etcd: tessera_head::etcd::EtcdConfig {
            endpoints,
            prefix: cli.etcd_prefix.clone(),
            tls,
            user,
            call_timeout: (lease / 3).max(Duration::from_millis(500)),
        },
        lease,
        advertise_url,
    }))
}

/// Serves as a standby (the leader's address for every call; /readyz not ready) until this head
/// wins the election, then gives the ports back for the leading head. `None`: stopped meanwhile.
async fn stand_by_then_lead(
    ha: &Ha,
    etcd: &tessera_head::etcd::Etcd,
    listener: tokio::net::TcpListener,
    metrics: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    limits: tessera_head::server::conns::ConnLimits,
    stop: &CancellationToken,
) -> Result<Option<(tokio::net::TcpListener, tokio::net::TcpListener, Leading)>, String> {
    let addr = listener.local_addr().map_err(|e| format!("listener: {e}"))?;
    let metrics_addr = metrics.local_addr().map_err(|e| format!("metrics listener: {e}"))?;
    let (view, view_rx) = tokio::sync::watch::channel(None);
    let standby_stop = CancellationToken::new();
    let grpc = tokio::spawn(tessera_head::server::standby::serve(
        listener,
        tls,
        limits,
        view_rx.clone(),
        standby_stop.clone(),
    ));
    let render: tessera_worker::ops::Render = std::sync::Arc::new(|| {
        Box::pin(async {
            "# HELP tessera_head_leader Whether this head leads (1) or stands by (0).\n# TYPE tessera_head_leader gauge\ntessera_head_leader 0\n# EOF\n".to_string()
        })
    });
    let ops =
        tokio::spawn(tessera_worker::ops::serve(metrics, render, std::sync::Arc::new(|| false), standby_stop.clone()));
    // Say who leads whenever it changes.
    let mut watch_leader = view_rx;
    let announce = tokio::spawn(async move {
        while watch_leader.changed().await.is_ok() {
            let l = watch_leader.borrow().clone();
            match l {
                Some(url) => tracing::info!(leader = %url, "standing by; another head leads"),
                None => tracing::info!("standing by; no head leads now"),
            }
        }
    });
    tracing::info!(me = %ha.advertise_url, store = %etcd.endpoints(), prefix = %ha.etcd.prefix, "campaigning for leadership");
    let won = tessera_head::leader::campaign(etcd, &ha.advertise_url, ha.lease, &view, stop).await;
    standby_stop.cancel();
    announce.abort();
    let Some((lease, fence)) = won else { return Ok(None) };
    // Renew from now on: the lease's time started before the election was won.
    let hold_stop = CancellationToken::new();
    let hold =
        tokio::spawn(tessera_head::leader::hold(etcd.clone(), lease, fence.clone(), ha.lease, hold_stop.clone()));
    tracing::info!(epoch = fence.epoch(), me = %ha.advertise_url, "leading: this head won the election");
    let _ = tokio::time::timeout(Duration::from_secs(2), grpc).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ops).await;
    let ready = async {
        let listener =
            rebind(addr).await.map_err(|e| format!("cannot listen on {addr} again after standing by: {e}"))?;
        let metrics = rebind(metrics_addr).await.map_err(|e| format!("cannot listen on {metrics_addr} again: {e}"))?;
        let (e2, f2) = (etcd.clone(), fence.clone());
        let store = tokio::task::spawn_blocking(move || tessera_head::store::Store::etcd(e2, f2))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((listener, metrics, store))
    };
    match ready.await {
        Ok((listener, metrics, store)) => {
            Ok(Some((listener, metrics, Leading { fence, store: std::sync::Arc::new(store), hold, hold_stop })))
        }
        Err(e) => {
            // Hand leadership over at once rather than when the lease runs out.
            hold_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), hold).await;
            Err(e)
        }
    }
}

/// Binds an address the standby just let go of (retried briefly).
async fn rebind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("bind failed")))
}

/// The tokens heads on one etcd share: read from etcd, or (first head) made and put there, and
/// written into DATA_DIR like a single head's so that local tools find them.
async fn shared_tokens(
    etcd: &tessera_head::etcd::Etcd,
    data_dir: &std::path::Path,
) -> Result<tessera_common::auth::TokenSet, String> {
    use tessera_common::auth::{TokenSet, write_secret};
    use tessera_head::etcd::ops;
    use tessera_head::server::tokens::EtcdTokens;
    let key = format!("{}tokens", etcd.config().prefix).into_bytes();
    let err = |e: tessera_head::etcd::EtcdError| format!("--store: reading the shared tokens: {e}");
    let found = match etcd.get(&key).await.map_err(err)? {
        Some(kv) => kv.value,
        None => {
            let (mine, _) = TokenSet::load_or_create(data_dir)
                .map_err(|e| format!("cannot read or create the tokens in {}: {e}", data_dir.display()))?;
            let value = serde_json::to_vec(&EtcdTokens::of(&mine)).map_err(|e| e.to_string())?;
            let r = etcd
                .txn(tessera_proto::etcd::etcdserverpb::TxnRequest {
                    compare: vec![ops::created_at(key.clone(), 0)],
                    success: vec![ops::put(key.clone(), value.clone(), 0)],
                    failure: vec![ops::get(key.clone())],
                })
                .await
                .map_err(err)?;
            if r.succeeded { value } else { ops::first_kv(&r).map(|kv| kv.value.clone()).unwrap_or_default() }
        }
    };
    let shared: EtcdTokens = serde_json::from_slice(&found)
        .map_err(|e| format!("--store: the shared tokens under {}tokens are damaged: {e}", etcd.config().prefix))?;
    let set = shared.into_set();
    for (path, value) in [
        (TokenSet::join_path(data_dir), &set.join),
        (TokenSet::admin_path(data_dir), &set.admin),
        (TokenSet::reader_path(data_dir), &set.reader),
    ] {
        write_secret(&path, value).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(set)
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("error: {msg}\n\nFor more information, try '--help'.");
    ExitCode::from(2)
}
