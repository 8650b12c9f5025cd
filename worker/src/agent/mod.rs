//! The worker agent: joins the head, holds the session, heartbeats, reconnects, leaves.
//!
//! The same agent runs in `tessera-worker` and inside `tessera-head` (the head's own GPUs).

pub mod backoff;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use rand::SeedableRng;
use tessera_common::ids::NodeId;
use tessera_common::node::JoinInfo;
use tessera_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, error, info, warn};

use crate::gpu::GpuInventory;
use crate::state::{StateDir, StateError};
use backoff::Backoff;

/// Everything the agent needs; built by the binaries from their flags.
pub struct AgentConfig {
    /// Head URL, e.g. `http://10.0.0.1:7470`; or several, separated by commas (heads sharing an
    /// etcd store): the agent goes to the one that leads.
    pub head: String,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    pub advertise_address: Option<IpAddr>,
    pub is_head: bool,
    pub inventory: std::sync::Arc<dyn GpuInventory>,
    /// Where the heartbeat round trip and the joined state are recorded.
    pub metrics: Option<std::sync::Arc<crate::metrics::WorkerMetrics>>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How long to wait for the head's `left` answer when leaving.
    pub leave_timeout: Duration,
    /// The join token (or the admin token); `None` against an `--insecure` head.
    pub token: Option<String>,
    /// TLS towards an https head.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Hosts shard processes; `None` for a node that runs no shards (tests of membership alone).
    pub shards: Option<crate::shard::HostConfig>,
    /// Weight staging (the model cache and the transfer server); needs `shards`.
    pub stage: Option<crate::stage::StageConfig>,
}

/// What the agent knows about its membership, for whoever embeds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub node_id: Option<NodeId>,
    /// The node's authoritative address, as the head told it.
    pub address: Option<String>,
    pub joined: bool,
    /// Joins since start (1 after the first).
    pub joins: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the head refused this worker: {0}")]
    Refused(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("model staging: {0}")]
    Stage(String),
    #[error("invalid head URL {url:?}: {why}; write e.g. http://10.0.0.1:7470")]
    BadHeadUrl { url: String, why: String },
}

/// How one session ended.
enum SessionEnd {
    /// We left on purpose (shutdown).
    Left,
    /// Lost the head; try again.
    Lost(String),
    /// The head refused us for a reason retrying will not fix.
    Refused(String),
}

pub struct Agent {
    config: AgentConfig,
    state: StateDir,
    status: watch::Sender<AgentStatus>,
    host: Option<crate::shard::ShardHost>,
    up_rx: Option<mpsc::UnboundedReceiver<pb::WorkerMessage>>,
    /// The head refused this node's credential as the session's bearer: use the join token.
    credential_refused: std::sync::atomic::AtomicBool,
    /// What this node can run, found at start.
    capabilities: tessera_common::node::Capabilities,
    stager: Option<crate::stage::Stager>,
    /// The leading head's URL, as the last standby named it.
    leader_hint: std::sync::Mutex<Option<String>>,
    /// The highest leadership epoch of a head joined (heads on etcd); a head of a lower one is a
    /// deposed leader and is left for the others.
    epoch: std::sync::atomic::AtomicU64,
}

impl Agent {
    pub fn new(config: AgentConfig, state: StateDir) -> Result<Self, AgentError> {
        let heads = tessera_common::head_list(&config.head)
            .map_err(|why| AgentError::BadHeadUrl { url: config.head.clone(), why })?;
        for h in &heads {
            Endpoint::from_shared(h.clone())
                .map_err(|e| AgentError::BadHeadUrl { url: h.clone(), why: e.to_string() })?;
        }
        let node_id = state.node_id()?;
        let (status, _) = watch::channel(AgentStatus { node_id, ..Default::default() });
        let (host, up_rx) = match &config.shards {
            Some(cfg) => {
                let (h, rx) = crate::shard::ShardHost::new(cfg.clone());
                if cfg.echo_logs {
                    h.echo_logs();
                }
                // Shims that outlived an earlier agent are found again before the first join.
                h.adopt();
                (Some(h), Some(rx))
            }
            None => (None, None),
        };
        let mut capabilities = match &config.shards {
            Some(cfg) => crate::shard::capabilities::detect(cfg),
            None => tessera_common::node::Capabilities::default(),
        };
        let stager = match (&host, &config.stage) {
            (Some(h), Some(cfg)) => {
                let h2 = h.clone();
                let counters = config.metrics.as_ref().map(|m| m.stage.clone()).unwrap_or_default();
                let in_use = std::sync::Arc::new(move || h2.models_in_use());
                let s = crate::stage::Stager::start(cfg, h.up_sender(), in_use, counters).map_err(AgentError::Stage)?;
                capabilities.transfer_port = s.port();
                Some(s)
            }
            _ => None,
        };
        Ok(Agent {
            config,
            state,
            status,
            host,
            up_rx,
            credential_refused: Default::default(),
            capabilities,
            stager,
            leader_hint: Default::default(),
            epoch: Default::default(),
        })
    }

    /// The shard host, when this agent hosts shards.
    pub fn shard_host(&self) -> Option<crate::shard::ShardHost> {
        self.host.clone()
    }

    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` (then leaves gracefully) or until the head refuses this worker.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let mut up_rx = self.up_rx.take();
        let mut backoff = Backoff::default();
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let heads = tessera_common::head_list(&self.config.head)
            .map_err(|why| AgentError::BadHeadUrl { url: self.config.head.clone(), why })?;
        let mut endpoints = Vec::new();
        for h in &heads {
            let endpoint = Endpoint::from_shared(h.clone())
                .map_err(|e| AgentError::BadHeadUrl { url: h.clone(), why: e.to_string() })?
                .connect_timeout(self.config.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10));
            endpoints.push(match &self.config.tls {
                Some(tls) => endpoint.tls_config(tls.clone()).map_err(|e| AgentError::BadHeadUrl {
                    url: h.clone(),
                    why: format!("TLS settings: {}", tessera_common::error_chain(&e)),
                })?,
                None => endpoint,
            });
        }
        // Which head to try next; with several, a failed try moves on to the next one (or to the
        // leader a standby named) at once, and only a whole round without a join waits.
        let mut current = 0usize;
        let mut tried_this_round = 0usize;
        let mut failures = 0u32;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let joins_before = self.status.borrow().joins;
            let end = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                c = endpoints[current].connect() => match c {
                    Ok(channel) => self.session(channel, &heads[current], &shutdown, &mut backoff, &mut up_rx).await,
                    Err(e) => SessionEnd::Lost(format!("cannot connect to {}: {}", heads[current], tessera_common::error_chain(&e))),
                },
            };
            self.status.send_modify(|s| s.joined = false);
            if let Some(m) = &self.config.metrics {
                m.joined.set(0);
            }
            match end {
                SessionEnd::Left => return Ok(()),
                SessionEnd::Refused(why) => {
                    error!(reason = %why, "the head refused this worker; not retrying");
                    return Err(AgentError::Refused(why));
                }
                SessionEnd::Lost(why) => {
                    let had_joined = self.status.borrow().joins > joins_before;
                    if had_joined {
                        failures = 0; // this session had joined: a new outage starts here
                        tried_this_round = 0;
                    }
                    if heads.len() > 1 {
                        tried_this_round += 1;
                        let hint = self.leader_hint.lock().unwrap_or_else(|p| p.into_inner()).take();
                        let named =
                            hint.as_deref().and_then(|l| heads.iter().position(|h| h == l.trim_end_matches('/')));
                        if let (Some(l), None) = (&hint, named) {
                            warn!(leader = %l, heads = %self.config.head, "a standby names a leading head that is not in --head; add it");
                        }
                        current = named.unwrap_or((current + 1) % heads.len());
                        // A head that took the session and then dropped it gets the backoff (no
                        // tight join loop); refusals and redirects move on at once, once a round.
                        if !had_joined && tried_this_round < heads.len() + 1 {
                            debug!(reason = %why, next = %heads[current], "trying the next head");
                            continue;
                        }
                        tried_this_round = 0;
                    }
                    failures += 1;
                    // Log the first failure and then every tenth, so a long head outage does not flood.
                    if failures == 1 || failures.is_multiple_of(10) {
                        warn!(reason = %why, up_to = ?backoff.ceiling(), attempts = failures, "lost the head; reconnecting");
                    } else {
                        debug!(reason = %why, up_to = ?backoff.ceiling(), "reconnecting");
                    }
                    if !backoff.wait(&mut rng, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn join_request(&self) -> Result<JoinInfo, StateError> {
        Ok(JoinInfo {
            node_id: self.state.node_id()?,
            name: self.config.node_name.clone(),
            labels: self.config.labels.clone(),
            advertise_address: self.config.advertise_address,
            inventory: self.config.inventory.inventory(),
            version: tessera_common::VERSION.to_string(),
            is_head: self.config.is_head,
            machine_fingerprint: self.state.machine_fingerprint(),
            hostname: crate::state::hostname(),
            capabilities: self.capabilities.clone(),
        })
    }

    async fn session(
        &self,
        channel: Channel,
        head: &str,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        up_rx: &mut Option<mpsc::UnboundedReceiver<pb::WorkerMessage>>,
    ) -> SessionEnd {
        let join = match self.join_request() {
            Ok(j) => j,
            Err(e) => return SessionEnd::Refused(e.to_string()),
        };
        let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(64);
        let mut join_msg = pb::JoinRequest::from(&join);
        join_msg.node_secret = match self.state.node_secret() {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => return SessionEnd::Refused(e.to_string()),
        };
        if let Some(h) = &self.host {
            // What runs here now; reports queued while disconnected are older than this.
            if let Some(rx) = up_rx.as_mut() {
                while rx.try_recv().is_ok() {}
            }
            join_msg.shards = h.snapshot();
        }
        // A node that has its own credential opens its session with it: the join token only
        // bootstraps, and may be rotated or expire without cutting joined nodes off.
        let with_credential =
            !join_msg.node_secret.is_empty() && !self.credential_refused.load(std::sync::atomic::Ordering::Relaxed);
        let token = if with_credential { Some(join_msg.node_secret.clone()) } else { self.config.token.clone() };
        let _ = tx.try_send(pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Join(join_msg)) });
        let bearer = match tessera_common::auth::Bearer::new(token.as_deref()) {
            Ok(b) => b,
            Err(e) => return SessionEnd::Refused(format!("invalid join token: {e}")),
        };
        let mut client = pb::membership_client::MembershipClient::with_interceptor(channel, bearer);
        let opened =
            tokio::time::timeout(self.config.connect_timeout * 5, client.session(ReceiverStream::new(rx))).await;
        let mut inbound = match opened {
            Err(_) => return SessionEnd::Lost("the head did not answer the join in time".into()),
            Ok(Err(status)) => match self.classify_open(status) {
                // A head that does not know the credential (a new store): try the join token next.
                SessionEnd::Refused(why) if with_credential && self.config.token.is_some() => {
                    self.credential_refused.store(true, std::sync::atomic::Ordering::Relaxed);
                    return SessionEnd::Lost(format!(
                        "the head refused this node's credential ({why}); trying the join token"
                    ));
                }
                other => return other,
            },
            Ok(Ok(r)) => r.into_inner(),
        };
        let joined = match inbound.message().await {
            Ok(Some(pb::HeadMessage { msg: Some(pb::head_message::Msg::Joined(j)) })) => j,
            Ok(Some(other)) => {
                return SessionEnd::Lost(format!("expected `joined`, got {other:?}"));
            }
            Ok(None) => {
                return SessionEnd::Lost("the head closed the session during the join".into());
            }
            Err(status) => return classify(status),
        };
        let seen = self.epoch.load(std::sync::atomic::Ordering::Relaxed);
        if joined.leader_epoch < seen {
            return SessionEnd::Lost(format!(
                "{head} leads epoch {}, older than epoch {seen} this node has joined: a deposed leader; trying the others",
                joined.leader_epoch
            ));
        }
        self.epoch.store(joined.leader_epoch, std::sync::atomic::Ordering::Relaxed);
        let node_id = match joined.node_id.parse::<tessera_common::ids::NodeId>() {
            Ok(id) => id,
            Err(_) => {
                return SessionEnd::Lost(format!("the head sent an invalid node id {:?}", joined.node_id));
            }
        };
        // The credential first: a node id without its credential could never join again.
        if !joined.node_secret.is_empty()
            && let Err(e) = self.state.save_node_secret(&joined.node_secret)
        {
            return SessionEnd::Refused(format!("cannot keep the node credential: {e}"));
        }
        if join.node_id != Some(node_id)
            && let Err(e) = self.state.save_node_id(node_id)
        {
            return SessionEnd::Refused(format!("cannot persist the node id: {e}"));
        }
        backoff.reset();
        let interval = Duration::from_millis(joined.heartbeat_interval_ms.max(10));
        let head_timeout = Duration::from_millis(joined.node_timeout_ms.max(100));
        info!(
            node_id = %node_id, address = %joined.address, rejoined = joined.rejoined,
            head = %head, heartbeat = ?interval, "joined the cluster"
        );
        self.status.send_modify(|s| {
            s.node_id = Some(node_id);
            s.address = Some(joined.address.clone());
            s.joined = true;
            s.joins += 1;
        });
        if let Some(m) = &self.config.metrics {
            m.joined.set(1);
        }
        let mut last_sent: Option<(u64, Instant)> = None;

        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut last_heard = Instant::now();
        let mut last_usage: Vec<(u32, u64)> =
            join.inventory.gpus.iter().map(|g| (g.index, g.memory_used_bytes)).collect();
        let usage_every = (Duration::from_secs(5).as_millis() / interval.as_millis().max(1)).max(1) as u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    return self.leave(&tx, &mut inbound).await;
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() >= head_timeout {
                        return SessionEnd::Lost(format!("no word from the head for {head_timeout:?}"));
                    }
                    seq += 1;
                    last_sent = Some((seq, Instant::now()));
                    let mut gpu_usage = Vec::new();
                    if seq.is_multiple_of(usage_every) {
                        let now = self.config.inventory.memory_used();
                        if now != last_usage {
                            gpu_usage = now.iter().map(|&(index, used)| pb::GpuUsage { index, memory_used_bytes: used }).collect();
                            last_usage = now;
                        }
                    }
                    let hb = pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Heartbeat(pb::Heartbeat { seq, gpu_usage })) };
                    if tx.send(hb).await.is_err() {
                        return SessionEnd::Lost("session stream closed".into());
                    }
                }
                Some(up) = recv_up(up_rx) => {
                    if tx.send(up).await.is_err() {
                        return SessionEnd::Lost("session stream closed".into());
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(msg)) => {
                        last_heard = Instant::now();
                        match msg.msg {
                            Some(pb::head_message::Msg::HeartbeatAck(ack)) => {
                                if let (Some(m), Some((sent_seq, at))) = (&self.config.metrics, last_sent)
                                    && ack.seq == sent_seq {
                                        m.heartbeat_rtt.observe(at.elapsed().as_secs_f64());
                                    }
                            }
                            Some(pb::head_message::Msg::Shutdown(s)) => {
                                return SessionEnd::Lost(format!("head shutting down: {}", s.reason));
                            }
                            Some(pb::head_message::Msg::Launch(l)) => match &self.host {
                                Some(h) => h.launch(l),
                                None => warn!(deployment = %l.deployment, "asked to launch shards, but this node hosts none"),
                            },
                            Some(pb::head_message::Msg::Stop(s)) => {
                                if let Some(st) = &self.stager {
                                    st.stop(&s.deployment, &s.deployment_uid, s.below_generation);
                                }
                                if let Some(h) = &self.host {
                                    h.stop(s);
                                }
                            }
                            Some(pb::head_message::Msg::IndexModel(m)) => match &self.stager {
                                Some(st) => st.index(m),
                                None => warn!(deployment = %m.deployment, "asked to index a model, but staging is off on this node"),
                            },
                            Some(pb::head_message::Msg::DescribeModel(m)) => match &self.stager {
                                Some(st) => st.describe(m),
                                None => warn!(path = %m.path, "asked to describe a model, but staging is off on this node"),
                            },
                            Some(pb::head_message::Msg::StageModel(m)) => match &self.stager {
                                Some(st) => st.stage(m),
                                None => warn!(deployment = %m.deployment, "asked to stage a model, but staging is off on this node"),
                            },
                            Some(pb::head_message::Msg::LogRequest(r)) => {
                                if let Some(h) = &self.host {
                                    h.logs(r);
                                }
                            }
                            Some(pb::head_message::Msg::LogCancel(c)) => {
                                if let Some(h) = &self.host {
                                    h.cancel_log(c.request_id);
                                }
                            }
                            other => debug!(?other, "unexpected message from the head ignored"),
                        }
                    }
                    Ok(None) => return SessionEnd::Lost("the head ended the session".into()),
                    Err(status) => return classify(status),
                },
            }
        }
    }

    async fn leave(
        &self,
        tx: &mpsc::Sender<pb::WorkerMessage>,
        inbound: &mut tonic::Streaming<pb::HeadMessage>,
    ) -> SessionEnd {
        let leave = pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::Leave(pb::LeaveRequest { reason: "shutdown".into() })),
        };
        if tx.send(leave).await.is_err() {
            return SessionEnd::Left;
        }
        let acked = tokio::time::timeout(self.config.leave_timeout, async {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::HeadMessage { msg: Some(pb::head_message::Msg::Left(_)) })) => return true,
                    Ok(Some(_)) => continue,
                    _ => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if acked {
            info!("left the cluster");
        } else {
            warn!("the head did not confirm the leave; it will see this node as dead");
        }
        SessionEnd::Left
    }
}

/// The next message the shard host wants sent up; pending forever when there is no host.
async fn recv_up(rx: &mut Option<mpsc::UnboundedReceiver<pb::WorkerMessage>>) -> Option<pb::WorkerMessage> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Statuses that retrying cannot fix end the agent; the rest mean "try again".
impl Agent {
    /// A refused session open; a standby's answer names the leading head, tried next.
    fn classify_open(&self, status: tonic::Status) -> SessionEnd {
        if let Some(leader) = status.metadata().get("tessera-leader").and_then(|v| v.to_str().ok()) {
            *self.leader_hint.lock().unwrap_or_else(|p| p.into_inner()) = Some(leader.to_string());
        }
        classify(status)
    }
}

fn classify(status: tonic::Status) -> SessionEnd {
    use tonic::Code;
    match status.code() {
        Code::AlreadyExists
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition => SessionEnd::Refused(status.message().to_string()),
        _ => SessionEnd::Lost(format!("{}: {}", code_name(status.code()), status.message())),
    }
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}").to_lowercase()
}
