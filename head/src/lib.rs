//! The Tessera head: cluster membership with fast failure detection, over gRPC.
//!
//! The head is also a worker: unless told not to, it runs the same worker agent in-process, which
//! joins over loopback like any other worker and registers the head's own GPUs (`is_head`).
//!
//! # Layout
//! - [`datadir`]: one head per data dir (a lock taken before anything in it is touched).
//! - [`deploy`]: deployments: plan, reserve, launch, supervise, group restart.
//! - [`membership`]: the node table, the failure detector and membership events (one owner task).
//! - [`store`]: the durable state (redb, or etcd for heads that take over from each other):
//!   deployments, generations, placements, node credentials, tokens.
//! - [`etcd`]: a small etcd v3 client (protox-generated, no system protoc).
//! - [`ui`]: the status page (`/ui` on the metrics port) and its JSON.
//! - [`leader`]: leadership among heads on etcd: the lease clock and the fence acting parts check.
//! - [`server`]: the gRPC services (`Membership` for workers; `Cluster` and `Planner` for clients).
//! - [`Head`]: wiring and ordered shutdown.

pub mod datadir;
pub mod deploy;
pub mod etcd;
pub mod leader;
pub mod membership;
pub mod metrics;
pub mod server;
pub mod store;
pub mod ui;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_worker::agent::{Agent, AgentConfig, AgentStatus};
use tessera_worker::state::StateDir;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use deploy::Deployments;
use membership::{Membership, MembershipConfig};

/// HTTP/2 streams one connection may have open at once (a worker's session is one).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The head's in-process worker.
pub struct LocalWorker {
    pub node_name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub advertise_address: Option<IpAddr>,
    pub inventory: Arc<dyn tessera_worker::gpu::GpuInventory>,
    /// How it hosts shards (its state dir is set to `<data_dir>/worker`); `None`: it hosts none.
    pub shards: Option<tessera_worker::shard::HostConfig>,
    /// Weight staging on the head's own node (the source of staged models); `None`: off.
    pub stage: Option<tessera_worker::stage::StageConfig>,
}

/// Everything the head needs, typed.
pub struct HeadConfig {
    pub membership: MembershipConfig,
    /// Durable state; the in-process worker keeps its node id in `<data_dir>/worker`.
    pub data_dir: PathBuf,
    /// `None` with `--no-worker`.
    pub worker: Option<LocalWorker>,
    /// After a restart, how long workers have to report their running processes before missing
    /// ones are restarted.
    pub recovery_window: Duration,
    /// The join and admin tokens; `None` is `--insecure` (no authentication).
    pub auth: Option<tessera_common::auth::TokenSet>,
    /// TLS: how the head serves, and how its own worker reaches it over loopback (`localhost`).
    pub tls: Option<HeadTls>,
    /// Where to serve /metrics, /healthz and /readyz (`--metrics-listen`); `None`: nowhere.
    pub metrics_listener: Option<TcpListener>,
    /// Connection limits of the gRPC port.
    pub conn_limits: server::conns::ConnLimits,
    /// Where a rotated join token is written (`--join-token-file`, else `DATA_DIR/join.token`).
    pub join_token_path: Option<PathBuf>,
    /// The state store and this head's leadership: `None` opens the embedded store in `data_dir`
    /// (one head, no election); `Some` is a store the caller opened (etcd) and the fence of the
    /// leadership this head won.
    pub store: Option<(Arc<store::Store>, Arc<leader::Fence>)>,
    /// `--deployments DIR`: deployments declared in files, kept as written.
    pub deployments_dir: Option<PathBuf>,
    /// The data dir's lock, when the caller took it already (before writing tokens into it);
    /// `None`: `Head::start` takes it.
    pub data_dir_lock: Option<datadir::DataDirLock>,
}

/// The head's TLS settings.
pub struct HeadTls {
    pub server: std::sync::Arc<tokio_rustls::rustls::ServerConfig>,
    /// For the in-process worker: trusts the head's CA, names `localhost`, and presents the head's
    /// certificate when client certificates are required.
    pub own_worker: tonic::transport::ClientTlsConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Worker(#[from] tessera_worker::agent::AgentError),
    #[error(transparent)]
    State(#[from] tessera_worker::state::StateError),
    #[error("cannot read the listener's address: {0}")]
    Listener(std::io::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    DataDirInUse(#[from] datadir::DataDirError),
}

/// A running head. Dropping it does not stop it; cancel the token given to [`Head::start`].
pub struct Head {
    pub addr: SocketAddr,
    pub membership: Membership,
    pub deployments: Deployments,
    /// Status of the in-process worker, when there is one.
    pub local_worker: Option<watch::Receiver<AgentStatus>>,
    task: tokio::task::JoinHandle<Result<(), HeadError>>,
}

impl Head {
    /// Starts serving on `listener` until `shutdown` is cancelled. The in-process worker (if any)
    /// joins through the same listener over loopback.
    pub async fn start(
        listener: TcpListener,
        config: HeadConfig,
        shutdown: CancellationToken,
    ) -> Result<Head, HeadError> {
        config.membership.validate().map_err(HeadError::Config)?;
        let data_dir_lock = match config.data_dir_lock {
            Some(l) => l,
            None => datadir::lock(&config.data_dir)?,
        };
        let addr = listener.local_addr().map_err(HeadError::Listener)?;
        let instance_id = uuid::Uuid::new_v4().to_string();

        let membership_token = CancellationToken::new();
        let seq = Arc::new(AtomicU64::new(1));
        let (store, fence) = match config.store {
            Some((s, f)) => (s, f),
            None => (Arc::new(store::Store::open(&config.data_dir)?), Arc::new(leader::Fence::always())),
        };
        let store_for_tokens = store.clone();
        let (membership, membership_task) =
            Membership::spawn_durable(config.membership, membership_token.clone(), seq.clone(), Some(store.clone()));
        let deployments_token = CancellationToken::new();
        let deployments = Deployments::spawn(
            membership.clone(),
            seq,
            store,
            config.recovery_window,
            fence.clone(),
            deployments_token.clone(),
        )?;

        let metrics = metrics::HeadMetrics::new();
        metrics.leader_epoch.set(fence.epoch());
        metrics.follow(membership.clone(), deployments.clone());
        let ops_token = CancellationToken::new();
        // The head's own worker: its GPUs and shard processes are on the head's /metrics too.
        let local_metrics = tessera_worker::metrics::WorkerMetrics::new();
        let local_inventory = config.worker.as_ref().map(|w| w.inventory.clone());
        let local_host: Arc<std::sync::OnceLock<tessera_worker::shard::ShardHost>> = Arc::default();
        if let Some(listener) = config.metrics_listener {
            let (m, d, mm) = (membership.clone(), deployments.clone(), metrics.clone());
            let (lm, li, lh) = (local_metrics.clone(), local_inventory.clone(), local_host.clone());
            let render: tessera_worker::ops::Render = Arc::new(move || {
                let (m, d, mm) = (m.clone(), d.clone(), mm.clone());
                let (lm, li, lh) = (lm.clone(), li.clone(), lh.clone());
                Box::pin(async move {
                    let head = mm.render(&m, &d).await;
                    let Some(inv) = li else { return head };
                    let local = tokio::task::spawn_blocking(move || lm.render(inv.as_ref(), lh.get()))
                        .await
                        .unwrap_or_default();
                    // One exposition: the head's part without its end marker, then the worker's.
                    format!("{}{local}", head.trim_end_matches("# EOF\n"))
                })
            });
            // Ready: the store is open and the server is up (both true once start() returns).
            let ready: tessera_worker::ops::Ready = Arc::new(|| true);
            let page = ui::router(membership.clone(), deployments.clone(), ops_token.clone());
            tokio::spawn(tessera_worker::ops::serve_with(listener, render, ready, page, ops_token.clone()));
        }
        let session = server::session::MembershipService {
            membership: membership.clone(),
            deployments: deployments.clone(),
            head_instance_id: instance_id.clone(),
            fence: fence.clone(),
        };
        let cluster = server::cluster::ClusterService {
            membership: membership.clone(),
            deployments: deployments.clone(),
            head_instance_id: instance_id.clone(),
            started: tokio::time::Instant::now(),
            event_streams: server::streams::StreamLimits::new(
                server::cluster::MAX_EVENT_STREAMS,
                server::cluster::MAX_EVENT_STREAMS_PER_PEER,
            ),
        };
        let conns = Arc::new(server::conns::Tracker::default());
        let incoming = server::conns::incoming(listener, config.conn_limits, conns.clone());
        let server_stop = CancellationToken::new();
        if config.auth.is_none() {
            warn!(
                "--insecure: authentication is OFF; anyone who reaches this port can deploy and run processes. Use it only on isolated test networks"
            );
        }
        let join_token = config.auth.as_ref().map(|t| t.join.clone());
        let tokens: Option<server::auth::SharedTokens> =
            config.auth.clone().map(|t| Arc::new(std::sync::RwLock::new(t)));
        let bootstrap = Arc::new(server::tokens::Bootstrap::load(store_for_tokens.clone()));
        let join_token_path = config
            .join_token_path
            .clone()
            .unwrap_or_else(|| tessera_common::auth::TokenSet::join_path(&config.data_dir));
        // The standard gRPC health service and server reflection (grpcurl works without the .proto).
        let (health, health_service) = tonic_health::server::health_reporter();
        for svc in [
            "tessera.v1.Membership",
            "tessera.v1.Cluster",
            "tessera.v1.Planner",
            "tessera.v1.Deployments",
            "tessera.v1.Tokens",
            "",
        ] {
            health.set_service_status(svc, tonic_health::ServingStatus::Serving).await;
        }
        // v1 and v1alpha (older grpcurl and Python's grpcio-reflection speak v1alpha), listing the
        // health service too.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().map_err(|e| HeadError::Config(format!("reflection: {e}")))?;
        let reflection_v1alpha =
            reflection().build_v1alpha().map_err(|e| HeadError::Config(format!("reflection: {e}")))?;
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(pb::membership_server::MembershipServer::new(session))
            .add_service(pb::cluster_server::ClusterServer::new(cluster))
            .add_service(pb::tokens_server::TokensServer::new(server::tokens::TokensService {
                tokens: tokens.clone(),
                bootstrap: bootstrap.clone(),
                join_token_path,
                store: store_for_tokens.clone(),
            }))
            .add_service(pb::planner_server::PlannerServer::new(server::planner::PlannerService {
                membership: membership.clone(),
            }))
            .add_service(pb::deployments_server::DeploymentsServer::new(server::deployments::DeploymentsService {
                deployments: deployments.clone(),
                log_streams: server::streams::StreamLimits::new(
                    server::deployments::MAX_LOG_STREAMS,
                    server::deployments::MAX_LOG_STREAMS_PER_PEER,
                ),
            }))
            .prepare();
        // Routes and the auth layer answer every error as a gRPC status (their error is Infallible).
        let svc = tower::Layer::layer(
            &server::auth::AuthLayer::new(tokens, Some(metrics.clone())).with_bootstrap(bootstrap),
            routes,
        );
        let server =
            server::serve::serve(incoming, config.tls.as_ref().map(|t| t.server.clone()), svc, server_stop.clone());
        let server_task = tokio::spawn(server);

        // Deployments declared in files (--deployments DIR), applied by the leading head.
        if let Some(dir) = config.deployments_dir.clone() {
            let svc = Arc::new(server::deployments::DeploymentsService {
                deployments: deployments.clone(),
                log_streams: server::streams::StreamLimits::new(1, 1),
            });
            tokio::spawn(server::declared::run(dir, svc, Duration::from_secs(2), ops_token.clone()));
        }

        // The in-process worker: a real agent over a real loopback connection.
        let agent_token = CancellationToken::new();
        let (local_worker, agent_task) = match config.worker {
            Some(w) => {
                let state = StateDir::open(&config.data_dir.join("worker"))?;
                let agent = Agent::new(
                    AgentConfig {
                        head: match &config.tls {
                            Some(_) => format!("https://localhost:{}", addr.port()),
                            None => format!("http://{}", loopback_for(addr)),
                        },
                        tls: config.tls.as_ref().map(|t| t.own_worker.clone()),
                        node_name: w.node_name,
                        labels: w.labels,
                        advertise_address: w.advertise_address,
                        is_head: true,
                        token: join_token.clone(),
                        inventory: w.inventory,
                        metrics: Some(local_metrics.clone()),
                        connect_timeout: Duration::from_secs(2),
                        leave_timeout: Duration::from_secs(1),
                        shards: w.shards.map(|mut h| {
                            h.state_dir = config.data_dir.join("worker");
                            h
                        }),
                        stage: w.stage,
                    },
                    state,
                )?;
                if let Some(h) = agent.shard_host() {
                    let _ = local_host.set(h);
                }
                let status = agent.status();
                let task = tokio::spawn(agent.run(agent_token.clone()));
                (Some(status), Some(task))
            }
            None => (None, None),
        };

        write_addr_file(&config.data_dir, addr);
        info!(%addr, instance_id = %instance_id, data_dir = %config.data_dir.display(), "head serving");

        let task = tokio::spawn(async move {
            // The data dir stays this head's until it has stopped.
            let _data_dir_lock = data_dir_lock;
            shutdown.cancelled().await;
            info!("head stopping: local worker leaves, sessions close, server drains");
            // 1. The head's own node leaves the cluster properly (left, not dead).
            agent_token.cancel();
            if let Some(t) = agent_task {
                match tokio::time::timeout(Duration::from_secs(2), t).await {
                    Ok(Ok(Err(e))) => warn!(error = %e, "in-process worker ended with an error"),
                    Err(_) => warn!("in-process worker did not stop within 2s"),
                    _ => {}
                }
            }
            // 2. Every worker session is told the head is going away (their shards keep running).
            deployments_token.cancel();
            membership_token.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), membership_task).await;
            ops_token.cancel();
            // 3. The server stops accepting and drains what is left, under a deadline.
            server_stop.cancel();
            match tokio::time::timeout(Duration::from_secs(2), server_task).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(join)) => Err(HeadError::Config(format!("server task failed: {join}"))),
                Err(_) => {
                    warn!("gRPC server did not drain within 2s; closing anyway");
                    Ok(())
                }
            }
        });
        Ok(Head { addr, membership, deployments, local_worker, task })
    }

    /// Waits until the head has stopped (after its shutdown token was cancelled).
    pub async fn stopped(self) -> Result<(), HeadError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(HeadError::Config(format!("head task failed: {e}"))),
        }
    }
}

/// Where a local client reaches a listener: its own IP, or loopback when it listens on all.
pub fn loopback_for(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// `<data_dir>/head.addr`: the address the head listens on, for scripts and `tessera up` when the
/// port was chosen by the kernel (`--listen 127.0.0.1:0`).
fn write_addr_file(dir: &Path, addr: SocketAddr) {
    let tmp = dir.join("head.addr.tmp");
    let dst = dir.join("head.addr");
    let r = std::fs::write(&tmp, format!("{}\n", loopback_for(addr))).and_then(|_| std::fs::rename(&tmp, &dst));
    if let Err(e) = r {
        warn!(path = %dst.display(), error = %e, "cannot write the address file");
    }
}
