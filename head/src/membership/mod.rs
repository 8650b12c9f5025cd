//! Cluster membership: who is in the cluster, in which state, and the failure detector.
//!
//! One task owns the node table ([`state::Table`]); everything else holds a cheap [`Membership`]
//! handle and talks to it over a channel. Heartbeats do not go through that channel: each session
//! stamps its node's [`Liveness`] atomically, and the detector reads the stamps on each tick, so
//! that heartbeat cost stays flat as the cluster grows. See `README.md` beside this file for the
//! state machine and its timing.

mod state;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tessera_common::ids::NodeId;
use tessera_common::node::{JoinInfo, NodeState};
use tessera_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use state::{Event, EventKind, NodeView, page_key};

/// Timing of the failure detector.
#[derive(Debug, Clone, Copy)]
pub struct MembershipConfig {
    /// How often workers send heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a node with an open session is dead.
    pub node_timeout: Duration,
    /// Time a node whose session closed has to open a new one before it is dead.
    pub reconnect_grace: Duration,
    /// A node dead or left this long is forgotten, unless deployments hold its GPUs.
    pub forget_after: Duration,
    /// `--node-approval manual`: new nodes wait for `tessera nodes approve` before work goes there.
    pub manual_approval: bool,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            heartbeat_interval: Duration::from_millis(500),
            node_timeout: Duration::from_secs(3),
            reconnect_grace: Duration::from_secs(1),
            forget_after: Duration::from_secs(3600),
            manual_approval: false,
        }
    }
}

impl MembershipConfig {
    /// Silence after which an alive node is shown `suspect`: two missed heartbeats, but never
    /// later than half the node timeout.
    pub fn suspect_after(&self) -> Duration {
        (self.heartbeat_interval * 2).min(self.node_timeout / 2)
    }

    /// How often the detector looks at the table: a small fraction of the shortest deadline, so a
    /// verdict comes at most this late.
    pub fn tick(&self) -> Duration {
        let shortest = self.heartbeat_interval.min(self.reconnect_grace).min(self.node_timeout);
        (shortest / 10).clamp(Duration::from_millis(5), Duration::from_millis(50))
    }

    /// A gap this long between two detector passes means the head itself did not run (a frozen
    /// VM, a stalled disk, SIGSTOP): nodes are not judged on that time.
    pub fn stall_after(&self) -> Duration {
        (self.tick() * 10).max(self.heartbeat_interval)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_zero() || self.node_timeout.is_zero() {
            return Err("heartbeat interval and node timeout must be more than 0".into());
        }
        if self.node_timeout < self.heartbeat_interval * 2 {
            return Err(format!(
                "--node-timeout {:?} must be at least twice --heartbeat-interval {:?}, or one late heartbeat kills a node",
                self.node_timeout, self.heartbeat_interval
            ));
        }
        Ok(())
    }
}

/// Last time a node was heard from, stamped lock-free by its session.
#[derive(Debug)]
pub struct Liveness {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Liveness {
    fn new(epoch: Instant) -> Self {
        let l = Liveness { epoch, last_ms: AtomicU64::new(0) };
        l.touch();
        l
    }

    /// Records a heartbeat now.
    pub fn touch(&self) {
        self.touch_at(Instant::now());
    }

    /// Records a heartbeat at `t` (never moving the stamp back).
    pub fn touch_at(&self, t: Instant) {
        let ms = t.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Messages from the head to one worker session; an `Err` closes the session with that status.
pub type SessionTx = mpsc::Sender<Result<pb::HeadMessage, tonic::Status>>;

/// What a session needs after its join was accepted.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub node_id: NodeId,
    pub session_id: u64,
    pub address: IpAddr,
    pub rejoined: bool,
    pub liveness: Arc<Liveness>,
    /// A credential issued to the node now (it must keep it); `None` when it presented its own.
    pub new_secret: Option<String>,
}

/// Why a join was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    // Nothing about the other node (its address, fingerprint or id) is told to the claimant.
    #[error(
        "node id {node_id} is held by another machine; this worker has a copy of that machine's state dir: \
         delete the node-id file in this worker's --state-dir so that it joins as a new node"
    )]
    NodeIdConflict { node_id: NodeId },
    #[error("node name {name:?} is already used by a live node; give this worker another --node-name")]
    NameConflict { name: String },
    #[error(
        "node name {name:?} belongs to a departed node that may come back; if this is that machine with a new \
         state dir, run `tessera nodes remove {name}` first (or wait for --forget-after), else give this worker another --node-name"
    )]
    NameReserved { name: String },
    #[error(
        "node {node_id}: missing or wrong node credential; a worker keeps it in its --state-dir (node.secret). \
         If that file is lost, delete the node-id file too so that the worker joins as a new node"
    )]
    BadCredential { node_id: NodeId },
    #[error(
        "the previous worker of this machine and state dir is still connected (or within its reconnect grace); \
         this worker will join as a new node once it is gone"
    )]
    PreviousStillConnected,
    #[error("cannot record the node's credential: {0}")]
    CannotRecord(String),
    #[error(
        "inventory: GPU {uuid} is already reported by another live node; two nodes cannot have one GPU \
         (a copied inventory, or two workers on one machine)"
    )]
    GpuConflict { uuid: String },
    #[error("the head is shutting down")]
    ShuttingDown,
}

/// Lookup failures for admin calls.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("no node with id or name {0:?}; `tessera nodes` lists them")]
    NotFound(String),
    #[error("node name {0:?} matches several nodes; use the node id")]
    Ambiguous(String),
    #[error("node {0:?} is {1}; only dead or departed nodes can be removed: stop its worker (or drain it) first")]
    Live(String, NodeState),
    #[error("node {0:?} still holds GPUs of a deployment; delete or move the deployment first")]
    Pinned(String),
    #[error("cannot record the change: {0}")]
    CannotRecord(String),
    #[error("the head is shutting down")]
    ShuttingDown,
}

/// Where a session connection came from and arrived at.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: IpAddr,
    /// The head's own address on that connection.
    pub local: Option<IpAddr>,
}

enum Command {
    Join {
        info: Box<JoinInfo>,
        secret: Option<String>,
        credential_only: bool,
        conn: ConnInfo,
        tx: SessionTx,
        reply: oneshot::Sender<Result<Admitted, JoinError>>,
    },
    Usage {
        node_id: NodeId,
        usage: Vec<(u32, u64)>,
    },
    Leave {
        node_id: NodeId,
        session_id: u64,
        reason: String,
        reply: oneshot::Sender<()>,
    },
    Closed {
        node_id: NodeId,
        session_id: u64,
        why: String,
    },
    List {
        reply: oneshot::Sender<Vec<NodeView>>,
    },
    Subscribe {
        reply: oneshot::Sender<(Vec<NodeView>, broadcast::Receiver<Arc<Event>>)>,
    },
    Drain {
        node: String,
        draining: bool,
        reply: oneshot::Sender<Result<NodeView, NodeError>>,
    },
    Send {
        node_id: NodeId,
        msg: pb::HeadMessage,
        reply: oneshot::Sender<bool>,
    },
    Remove {
        node: String,
        reply: oneshot::Sender<Result<NodeView, NodeError>>,
    },
    Approve {
        node: String,
        reply: oneshot::Sender<Result<NodeView, NodeError>>,
    },
    Pinned {
        nodes: std::collections::HashSet<NodeId>,
    },
}

/// Handle to the membership task. Cheap to clone.
#[derive(Clone)]
pub struct Membership {
    tx: mpsc::Sender<Command>,
    config: MembershipConfig,
}

impl Membership {
    /// Starts the membership task; it runs until `shutdown` is cancelled, then closes every session
    /// with a `shutdown` message so that workers reconnect to the next head.
    pub fn spawn(config: MembershipConfig, shutdown: CancellationToken) -> (Membership, tokio::task::JoinHandle<()>) {
        Self::spawn_with_seq(config, shutdown, Arc::new(AtomicU64::new(1)))
    }

    /// Like [`Membership::spawn`], numbering events from `seq`, a counter shared with the other
    /// event sources of the head so that one stream has one order.
    pub fn spawn_with_seq(
        config: MembershipConfig,
        shutdown: CancellationToken,
        seq: Arc<AtomicU64>,
    ) -> (Membership, tokio::task::JoinHandle<()>) {
        Self::spawn_durable(config, shutdown, seq, None)
    }

    /// Like [`Membership::spawn_with_seq`], keeping operators' drain marks in `store` (and
    /// applying the recorded ones to nodes as they rejoin).
    pub fn spawn_durable(
        config: MembershipConfig,
        shutdown: CancellationToken,
        seq: Arc<AtomicU64>,
        store: Option<Arc<crate::store::Store>>,
    ) -> (Membership, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(1024);
        let mut table = state::Table::new(config, Instant::now(), seq);
        if let Some(store) = store {
            let drained = store.drained().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the drained nodes; none are drained");
                Vec::new()
            });
            let approved = store.approved().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the approved nodes; nodes wait for approval again");
                Vec::new()
            });
            let credentials = store.credentials().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the node credentials; nodes get new ones as they rejoin");
                Vec::new()
            });
            table.set_store(
                store,
                drained.iter().filter_map(|i| i.parse::<NodeId>().ok()).collect(),
                credentials.into_iter().filter_map(|(k, v)| Some((k.parse::<NodeId>().ok()?, v))).collect(),
                approved.iter().filter_map(|i| i.parse::<NodeId>().ok()).collect(),
            );
        }
        let task = tokio::spawn(run(table, rx, shutdown));
        (Membership { tx, config }, task)
    }

    pub fn config(&self) -> MembershipConfig {
        self.config
    }

    /// A worker's join: `secret` is the node credential it presents (if it has one);
    /// `credential_only` when the session was opened with it instead of the join token (then the
    /// head must know that credential).
    pub async fn join(
        &self,
        info: JoinInfo,
        secret: Option<String>,
        credential_only: bool,
        conn: ConnInfo,
        tx: SessionTx,
    ) -> Result<Admitted, JoinError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Join { info: Box::new(info), secret, credential_only, conn, tx, reply })
            .await
            .map_err(|_| JoinError::ShuttingDown)?;
        rx.await.map_err(|_| JoinError::ShuttingDown)?
    }

    pub async fn report_usage(&self, node_id: NodeId, usage: Vec<(u32, u64)>) {
        let _ = self.tx.send(Command::Usage { node_id, usage }).await;
    }

    /// Graceful leave: the node becomes `left`. Returns once recorded.
    pub async fn leave(&self, node_id: NodeId, session_id: u64, reason: String) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Leave { node_id, session_id, reason, reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The session's stream ended without a leave.
    pub async fn session_closed(&self, node_id: NodeId, session_id: u64, why: String) {
        let _ = self.tx.send(Command::Closed { node_id, session_id, why }).await;
    }

    pub async fn list(&self) -> Vec<NodeView> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::List { reply }).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The current nodes and a receiver of every event after them, with no gap between the two.
    pub async fn subscribe(&self) -> Option<(Vec<NodeView>, broadcast::Receiver<Arc<Event>>)> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Subscribe { reply }).await.ok()?;
        rx.await.ok()
    }

    /// Sends a message down a node's session; false if the node has no open session.
    pub async fn send(&self, node_id: NodeId, msg: pb::HeadMessage) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Send { node_id, msg, reply }).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Forgets a dead or departed node (an operator's `tessera nodes remove`).
    pub async fn remove(&self, node: String) -> Result<NodeView, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Remove { node, reply }).await.map_err(|_| NodeError::ShuttingDown)?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Approves a node that joined under `--node-approval manual`.
    pub async fn approve(&self, node: String) -> Result<NodeView, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Approve { node, reply }).await.map_err(|_| NodeError::ShuttingDown)?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// The nodes whose GPUs deployments hold: they are never forgotten.
    pub async fn set_pinned(&self, nodes: std::collections::HashSet<NodeId>) {
        let _ = self.tx.send(Command::Pinned { nodes }).await;
    }

    pub async fn set_draining(&self, node: String, draining: bool) -> Result<NodeView, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Drain { node, draining, reply }).await.map_err(|_| NodeError::ShuttingDown)?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }
}

async fn run(mut table: state::Table, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(table.config().tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            cmd = rx.recv() => match cmd {
                Some(cmd) => handle(&mut table, cmd),
                None => break,
            },
            _ = tick.tick() => table.detect(Instant::now()),
        }
    }
    table.shutdown("head shutting down");
}

fn handle(table: &mut state::Table, cmd: Command) {
    let now = Instant::now();
    match cmd {
        Command::Join { info, secret, credential_only, conn, tx, reply } => {
            let _ = reply.send(table.join(*info, secret.as_deref(), credential_only, conn, tx, now));
        }
        Command::Usage { node_id, usage } => table.usage(node_id, &usage),
        Command::Leave { node_id, session_id, reason, reply } => {
            table.leave(node_id, session_id, &reason, now);
            let _ = reply.send(());
        }
        Command::Closed { node_id, session_id, why } => table.closed(node_id, session_id, &why, now),
        Command::List { reply } => {
            let _ = reply.send(table.views(now));
        }
        Command::Subscribe { reply } => {
            let _ = reply.send((table.views(now), table.subscribe()));
        }
        Command::Drain { node, draining, reply } => {
            let _ = reply.send(table.set_draining(&node, draining, now));
        }
        Command::Send { node_id, msg, reply } => {
            let _ = reply.send(table.send(node_id, msg));
        }
        Command::Remove { node, reply } => {
            let _ = reply.send(table.remove(&node, now));
        }
        Command::Approve { node, reply } => {
            let _ = reply.send(table.approve(&node, now));
        }
        Command::Pinned { nodes } => table.set_pinned(nodes),
    }
}

/// Wall-clock milliseconds since the Unix epoch, for events.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Node state for display: an unapproved node shows `pending-approval` and the admin `draining`
/// mark shows while the node is alive.
pub fn shown_state(health: NodeState, draining: bool, approved: bool) -> NodeState {
    match health {
        NodeState::Alive if !approved => NodeState::PendingApproval,
        NodeState::Alive if draining => NodeState::Draining,
        h => h,
    }
}

#[cfg(test)]
mod tests;
