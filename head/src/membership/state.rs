//! The node table and the failure detector's state machine. Owned by one task; no locks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tessera_common::duration::format_duration;
use tessera_common::ids::NodeId;
use tessera_common::node::{JoinInfo, NodeState};
use tessera_proto::v1 as pb;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Admitted, ConnInfo, JoinError, Liveness, MembershipConfig, NodeError, SessionTx, shown_state};

/// A node as seen at one instant, for listing and events.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: NodeId,
    pub info: Arc<JoinInfo>,
    pub state: NodeState,
    pub draining: bool,
    pub address: IpAddr,
    pub last_heartbeat_ago: Duration,
    pub state_reason: String,
    pub state_since_ago: Duration,
    pub joined_ago: Duration,
    /// Current GPU memory use by GPU index (the inventory's values, updated by heartbeats).
    pub gpu_memory_used: Vec<u64>,
}

impl From<&NodeView> for pb::Node {
    fn from(v: &NodeView) -> Self {
        let mut inventory = pb::Inventory::from(&v.info.inventory);
        for (g, used) in inventory.gpus.iter_mut().zip(&v.gpu_memory_used) {
            g.memory_used_bytes = *used;
        }
        pb::Node {
            id: v.id.to_string(),
            name: v.info.name.clone(),
            state: pb::NodeState::from(v.state) as i32,
            address: v.address.to_string(),
            is_head: v.info.is_head,
            labels: v.info.labels.clone().into_iter().collect(),
            last_heartbeat_ms_ago: v.last_heartbeat_ago.as_millis() as u64,
            inventory: Some(inventory),
            version: v.info.version.clone(),
            hostname: v.info.hostname.clone(),
            state_reason: v.state_reason.clone(),
            state_since_ms_ago: v.state_since_ago.as_millis() as u64,
            draining: v.draining,
            capabilities: v.info.capabilities.to_pb(),
            joined_ms_ago: v.joined_ago.as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Joined {
        rejoined: bool,
    },
    StateChanged,
    Left,
    /// Forgotten: removed by an operator, or dead/left for `--forget-after`.
    Removed,
}

/// A membership event.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: u64,
    pub unix_ms: u64,
    pub kind: EventKind,
    pub node: NodeView,
    pub previous: Option<NodeState>,
    pub reason: String,
}

impl From<&Event> for pb::Event {
    fn from(e: &Event) -> Self {
        let (kind, rejoined) = match e.kind {
            EventKind::Joined { rejoined } => (pb::EventKind::NodeJoined, rejoined),
            EventKind::StateChanged => (pb::EventKind::NodeStateChanged, false),
            EventKind::Left => (pb::EventKind::NodeLeft, false),
            EventKind::Removed => (pb::EventKind::NodeRemoved, false),
        };
        pb::Event {
            seq: e.seq,
            unix_ms: e.unix_ms,
            kind: kind as i32,
            node: Some((&e.node).into()),
            previous_state: e.previous.map(pb::NodeState::from).unwrap_or(pb::NodeState::Unspecified) as i32,
            reason: e.reason.clone(),
            rejoined,
            deployment: None,
        }
    }
}

struct Session {
    id: u64,
    tx: SessionTx,
}

struct Entry {
    id: NodeId,
    /// Work may go here (always, unless the head runs with `--node-approval manual`).
    approved: bool,
    info: Arc<JoinInfo>,
    /// `alive`, `suspect`, `dead` or `left`; draining is kept apart in `draining`.
    health: NodeState,
    draining: bool,
    address: IpAddr,
    /// The address was not set by the operator; it may be refined (see `learn_head_address`).
    address_auto: bool,
    reason: String,
    since: Instant,
    joined: Instant,
    /// The newest liveness stamp, kept after the session is gone.
    liveness: Arc<Liveness>,
    session: Option<Session>,
    /// When the session closed without a leave; the reconnect grace runs from here.
    closed_at: Option<Instant>,
    gpu_memory_used: Vec<u64>,
}

pub struct Table {
    config: MembershipConfig,
    epoch: Instant,
    nodes: HashMap<NodeId, Entry>,
    next_session: u64,
    seq: Arc<std::sync::atomic::AtomicU64>,
    /// Shared by every subscriber: a slot costs a pointer, not an event.
    events: broadcast::Sender<Arc<Event>>,
    /// Where drain marks are kept, and the recorded marks of nodes that have not rejoined yet.
    store: Option<Arc<crate::store::Store>>,
    drained_unjoined: std::collections::HashSet<NodeId>,
    /// When the detector last ran: a long gap is the head's own stall, not the nodes' silence.
    last_detect: Option<Instant>,
    /// GPU uuid -> the node that reports it.
    gpu_owner: HashMap<String, NodeId>,
    /// Nodes whose GPUs deployments hold (never forgotten).
    pinned: std::collections::HashSet<NodeId>,
    /// SHA-256 of each node's credential.
    credentials: HashMap<NodeId, Vec<u8>>,
    /// Nodes an operator approved (`--node-approval manual`).
    approved: std::collections::HashSet<NodeId>,
    last_forget: Option<Instant>,
}

impl Table {
    pub fn new(config: MembershipConfig, epoch: Instant, seq: Arc<std::sync::atomic::AtomicU64>) -> Self {
        let (events, _) = broadcast::channel(4096);
        Table {
            config,
            epoch,
            nodes: HashMap::new(),
            next_session: 1,
            seq,
            events,
            store: None,
            drained_unjoined: Default::default(),
            last_detect: None,
            gpu_owner: HashMap::new(),
            pinned: Default::default(),
            credentials: HashMap::new(),
            approved: Default::default(),
            last_forget: None,
        }
    }

    pub fn set_store(
        &mut self,
        store: Arc<crate::store::Store>,
        drained: std::collections::HashSet<NodeId>,
        credentials: HashMap<NodeId, Vec<u8>>,
        approved: std::collections::HashSet<NodeId>,
    ) {
        self.store = Some(store);
        self.drained_unjoined = drained;
        self.credentials = credentials;
        self.approved = approved;
    }

    /// Queues a message on a node's open session.
    pub fn send(&self, node_id: NodeId, msg: pb::HeadMessage) -> bool {
        // A head that no longer leads delivers nothing (checked here, at delivery: a command
        // queued before the lease ran out must not reach a worker after).
        if self.store.as_ref().is_some_and(|s| !s.leads()) {
            return false;
        }
        match self.nodes.get(&node_id).and_then(|e| e.session.as_ref()) {
            Some(s) => s.tx.try_send(Ok(msg)).is_ok(),
            None => false,
        }
    }

    pub fn config(&self) -> MembershipConfig {
        self.config
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    pub fn join(
        &mut self,
        info: JoinInfo,
        secret: Option<&str>,
        credential_only: bool,
        conn: ConnInfo,
        tx: SessionTx,
        now: Instant,
    ) -> Result<Admitted, JoinError> {
        let live = |e: &Entry| matches!(e.health, NodeState::Alive | NodeState::Suspect);
        // Which entry is this worker? Only its node id says so, and only with the node's credential.
        // Only the head's own worker (over loopback) is the head's node: staging reads models there.
        let mut info = info;
        if info.is_head && !conn.peer.is_loopback() {
            warn!(name = %info.name, peer = %conn.peer, "a node joining from elsewhere claims to be the head's own; it is not");
            info.is_head = false;
        }
        let existing = info.node_id.filter(|id| self.nodes.contains_key(id));
        let mut issue = true;
        if let Some(id) = info.node_id {
            // A node the head has no credential for (it joined before credentials existed) gets
            // one now; one it has a credential for must present it.
            if let Some(hash) = self.credentials.get(&id) {
                let ok = secret.is_some_and(|s| tessera_common::auth::constant_time_eq(&credential_hash(s), hash));
                if !ok {
                    warn!(node_id = %id, claimant = %info.machine_fingerprint, "join with a node id but not its credential refused");
                    return Err(JoinError::BadCredential { node_id: id });
                }
                issue = false;
            } else if credential_only {
                // Without the join token, only a credential the head knows opens a session.
                warn!(node_id = %id, "session with a node credential the head does not know refused");
                return Err(JoinError::BadCredential { node_id: id });
            }
            // A copy of a live node's state dir on another machine (credential and all) is refused.
            if let Some(e) = existing.map(|id| &self.nodes[&id])
                && live(e)
                && e.info.machine_fingerprint != info.machine_fingerprint
            {
                warn!(node_id = %id, claimant = %info.machine_fingerprint, "join with a node id held by another machine refused");
                return Err(JoinError::NodeIdConflict { node_id: id });
            }
        }
        let mut stale: Vec<(NodeId, &'static str)> = Vec::new();
        // A worker without its id file (a lost or wiped state dir) is a new node; the old entry of
        // the same machine and state dir goes, once its session is gone (the state dir is locked,
        // so a live one is the previous worker on its way out).
        if info.node_id.is_none()
            && !info.machine_fingerprint.is_empty()
            && let Some(old) = self.nodes.values().find(|e| e.info.machine_fingerprint == info.machine_fingerprint)
        {
            if live(old) {
                return Err(JoinError::PreviousStillConnected);
            }
            stale.push((old.id, "the same machine and state dir joined again as a new node"));
        }
        // Names identify nodes for people: a live node's name cannot be taken, nor the name of a
        // departed node that has a credential (it may come back) until it is removed or forgotten.
        if let Some(other) = self
            .nodes
            .values()
            .find(|e| e.info.name == info.name && Some(e.id) != existing && !stale.iter().any(|(s, _)| *s == e.id))
        {
            if live(other) {
                return Err(JoinError::NameConflict { name: info.name.clone() });
            }
            if self.credentials.contains_key(&other.id) {
                return Err(JoinError::NameReserved { name: info.name.clone() });
            }
            stale.push((other.id, "a new node took its name"));
        }
        // A GPU belongs to one node: a live other node with one of these GPUs refuses the join; a
        // departed one is forgotten (the same machine back under another id).
        for g in &info.inventory.gpus {
            let Some(&owner) = self.gpu_owner.get(&g.uuid) else { continue };
            if Some(owner) == existing || stale.iter().any(|(s, _)| *s == owner) {
                continue;
            }
            match self.nodes.get(&owner) {
                Some(o) if live(o) => {
                    warn!(gpu = %g.uuid, owner = %owner, name = %info.name, "join with a GPU another live node reports refused");
                    return Err(JoinError::GpuConflict { uuid: g.uuid.clone() });
                }
                _ => stale.push((owner, "a new node reports its GPUs")),
            }
        }
        // Everything is checked: from here on the join happens.
        let new_id = existing.or(info.node_id).unwrap_or_else(NodeId::new_random);
        let new_secret = if issue {
            let secret = tessera_common::auth::generate("tsn");
            let hash = credential_hash(&secret);
            if let Some(store) = &self.store {
                store
                    .set_credential(&new_id.to_string(), Some(&hash))
                    .map_err(|e| JoinError::CannotRecord(e.to_string()))?;
            }
            self.credentials.insert(new_id, hash);
            Some(secret)
        } else {
            None
        };
        for (old, why) in stale {
            info!(node_id = %old, name = %info.name, why, "forgetting a departed node");
            self.forget(old, why, now);
        }

        let (address, address_auto) = match info.advertise_address {
            Some(a) => (a, false),
            None => (conn.peer, true),
        };
        if !conn.peer.is_loopback()
            && let Some(local) = conn.local
        {
            self.learn_head_address(local, now);
        }
        let session_id = self.next_session;
        self.next_session += 1;
        let liveness = Arc::new(Liveness::new(self.epoch));
        let session = Session { id: session_id, tx };
        let gpu_memory_used = info.inventory.gpus.iter().map(|g| g.memory_used_bytes).collect();
        let info = Arc::new(info);
        if let Some(id) = existing {
            let old: Vec<String> = self.nodes[&id].info.inventory.gpus.iter().map(|g| g.uuid.clone()).collect();
            for u in old {
                self.gpu_owner.remove(&u);
            }
        }
        for g in &info.inventory.gpus {
            self.gpu_owner.insert(g.uuid.clone(), new_id);
        }

        let (node_id, rejoined, previous) = match existing {
            Some(id) => {
                let e = self.nodes.get_mut(&id).expect("existing id was found above");
                if let Some(old) = e.session.take() {
                    let _ =
                        old.tx.try_send(Err(tonic::Status::aborted("replaced by a newer session of the same node")));
                }
                let previous = shown_state(e.health, e.draining, e.approved);
                e.info = info;
                e.health = NodeState::Alive;
                e.address = address;
                e.address_auto = address_auto;
                e.reason = "rejoined".into();
                e.since = now;
                e.liveness = liveness.clone();
                e.session = Some(session);
                e.closed_at = None;
                e.gpu_memory_used = gpu_memory_used;
                (id, true, Some(previous))
            }
            None => {
                let id = new_id;
                // An operator's drain mark outlives a head restart.
                let draining = self.drained_unjoined.remove(&id);
                // The head's own worker (over loopback) needs no approval; others do when asked for.
                let own = info.is_head && conn.peer.is_loopback();
                let approved = !self.config.manual_approval || own || self.approved.contains(&id);
                if !approved {
                    info!(node_id = %id, name = %info.name, "new node waits for approval: tessera nodes approve {}", info.name);
                }
                self.nodes.insert(
                    id,
                    Entry {
                        id,
                        approved,
                        info,
                        health: NodeState::Alive,
                        draining,
                        address,
                        address_auto,
                        reason: "joined".into(),
                        since: now,
                        joined: now,
                        liveness: liveness.clone(),
                        session: Some(session),
                        closed_at: None,
                        gpu_memory_used,
                    },
                );
                (id, false, None)
            }
        };
        let e = &self.nodes[&node_id];
        info!(
            node_id = %node_id, name = %e.info.name, %address, gpus = e.info.inventory.gpus.len(),
            is_head = e.info.is_head, rejoined, "node joined"
        );
        let reason = if rejoined { "rejoined" } else { "joined" };
        self.emit(node_id, EventKind::Joined { rejoined }, previous, reason.to_string(), now);
        Ok(Admitted { node_id, session_id, address, rejoined, liveness, new_secret })
    }

    pub fn set_pinned(&mut self, nodes: std::collections::HashSet<NodeId>) {
        self.pinned = nodes;
    }

    /// An operator approves a node that joined under `--node-approval manual`.
    pub fn approve(&mut self, node: &str, now: Instant) -> Result<NodeView, NodeError> {
        let id = self.resolve(node)?;
        if !self.nodes[&id].approved {
            if let Some(store) = &self.store {
                store.set_approved(&id.to_string(), true).map_err(|e| NodeError::CannotRecord(e.to_string()))?;
            }
            self.approved.insert(id);
            let e = self.nodes.get_mut(&id).expect("resolved id exists");
            let previous = shown_state(e.health, e.draining, e.approved);
            e.approved = true;
            e.since = now;
            info!(node_id = %id, name = %e.info.name, "node approved by an operator");
            self.emit(id, EventKind::StateChanged, Some(previous), "approved by an operator".into(), now);
        }
        Ok(self.view(&self.nodes[&id], now))
    }

    /// An operator forgets a dead or departed node.
    pub fn remove(&mut self, node: &str, now: Instant) -> Result<NodeView, NodeError> {
        let id = self.resolve(node)?;
        let e = &self.nodes[&id];
        if matches!(e.health, NodeState::Alive | NodeState::Suspect) {
            return Err(NodeError::Live(node.to_string(), shown_state(e.health, e.draining, e.approved)));
        }
        if self.pinned.contains(&id) {
            return Err(NodeError::Pinned(node.to_string()));
        }
        let view = self.view(e, now);
        info!(node_id = %id, name = %e.info.name, "node removed by an operator");
        self.forget(id, "removed by an operator", now);
        Ok(view)
    }

    /// Forgets nodes dead or left for `forget_after` that hold no GPUs of a deployment, so that a
    /// churning cluster does not grow the table (and `ListNodes`) for ever.
    fn forget_departed(&mut self, now: Instant) {
        // Once a second is plenty for an hour-long rule, and keeps the detector's tick cheap.
        if self.last_forget.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        self.last_forget = Some(now);
        let after = self.config.forget_after;
        let old: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|e| matches!(e.health, NodeState::Dead | NodeState::Left))
            .filter(|e| now.saturating_duration_since(e.since) >= after && !self.pinned.contains(&e.id))
            .map(|e| e.id)
            .collect();
        for id in old {
            let reason = format!("{} for {}", self.nodes[&id].health, format_duration(after));
            info!(node_id = %id, %reason, "forgetting a departed node");
            self.forget(id, &format!("forgotten: {reason}"), now);
        }
    }

    /// Removes a node from the table, with its GPUs and its credential, and says so (a `Removed`
    /// event: the deployments forget it too).
    fn forget(&mut self, id: NodeId, why: &str, now: Instant) {
        if let Some(e) = self.nodes.get(&id) {
            let state = shown_state(e.health, e.draining, e.approved);
            self.emit(id, EventKind::Removed, Some(state), why.to_string(), now);
        }
        if self.credentials.remove(&id).is_some()
            && let Some(store) = &self.store
            && let Err(e) = store.set_credential(&id.to_string(), None)
        {
            warn!(node_id = %id, error = %e, "cannot forget the node's credential");
        }
        if self.approved.remove(&id)
            && let Some(store) = &self.store
            && let Err(e) = store.set_approved(&id.to_string(), false)
        {
            warn!(node_id = %id, error = %e, "cannot forget the node's approval");
        }
        if let Some(e) = self.nodes.remove(&id) {
            for g in &e.info.inventory.gpus {
                if self.gpu_owner.get(&g.uuid) == Some(&id) {
                    self.gpu_owner.remove(&g.uuid);
                }
            }
        }
    }

    /// The head's own node was registered with the loopback address it connected from; once a
    /// remote worker reaches the head on a real interface, that interface's address is the one
    /// other nodes can use, so the head node takes it (unless the operator set one).
    fn learn_head_address(&mut self, local: IpAddr, now: Instant) {
        let Some(head) = self.nodes.values_mut().find(|e| e.info.is_head && e.address_auto && e.address.is_loopback())
        else {
            return;
        };
        if local.is_loopback() || local.is_unspecified() {
            return;
        }
        info!(node_id = %head.id, address = %local, "head node address learned from a remote worker's connection");
        head.address = local;
        let id = head.id;
        let state = shown_state(head.health, head.draining, head.approved);
        self.emit(id, EventKind::StateChanged, Some(state), format!("address is now {local}"), now);
    }

    pub fn usage(&mut self, node_id: NodeId, usage: &[(u32, u64)]) {
        if let Some(e) = self.nodes.get_mut(&node_id) {
            for &(index, used) in usage {
                if let Some(pos) = e.info.inventory.gpus.iter().position(|g| g.index == index) {
                    e.gpu_memory_used[pos] = used;
                }
            }
        }
    }

    pub fn leave(&mut self, node_id: NodeId, session_id: u64, reason: &str, now: Instant) {
        let Some(e) = self.nodes.get_mut(&node_id) else {
            return;
        };
        if e.session.as_ref().map(|s| s.id) != Some(session_id) {
            return; // a stale session of a node that has since rejoined
        }
        e.session = None;
        e.closed_at = None;
        let previous = shown_state(e.health, e.draining, e.approved);
        e.health = NodeState::Left;
        e.reason = format!("left: {reason}");
        e.since = now;
        info!(node_id = %node_id, name = %e.info.name, reason, "node left");
        let reason = e.reason.clone();
        self.emit(node_id, EventKind::Left, Some(previous), reason, now);
    }

    pub fn closed(&mut self, node_id: NodeId, session_id: u64, why: &str, now: Instant) {
        let Some(e) = self.nodes.get_mut(&node_id) else {
            return;
        };
        if e.session.as_ref().map(|s| s.id) != Some(session_id) {
            return;
        }
        e.session = None;
        if !matches!(e.health, NodeState::Alive | NodeState::Suspect) {
            return;
        }
        e.closed_at = Some(now);
        let previous = shown_state(e.health, e.draining, e.approved);
        let grace = format_duration(self.config.reconnect_grace);
        e.reason = format!("session closed ({why}); dead unless it reconnects within {grace}");
        if e.health != NodeState::Suspect {
            e.health = NodeState::Suspect;
            e.since = now;
            warn!(node_id = %node_id, name = %e.info.name, why, "session closed; node suspect");
            let reason = e.reason.clone();
            self.emit(node_id, EventKind::StateChanged, Some(previous), reason, now);
        }
    }

    /// The failure detector: one pass over the table.
    pub fn detect(&mut self, now: Instant) {
        let cfg = self.config;
        if let Some(gap) = self.last_detect.map(|t| now.saturating_duration_since(t))
            && gap >= cfg.stall_after()
        {
            self.resume_after_stall(gap, now);
        }
        self.last_detect = Some(now);
        self.forget_departed(now);
        let mut changes = Vec::new();
        for e in self.nodes.values_mut() {
            if !matches!(e.health, NodeState::Alive | NodeState::Suspect) {
                continue;
            }
            let previous = shown_state(e.health, e.draining, e.approved);
            if let Some(closed) = e.closed_at {
                if now.saturating_duration_since(closed) >= cfg.reconnect_grace {
                    e.health = NodeState::Dead;
                    e.reason =
                        format!("session closed and no reconnect within {}", format_duration(cfg.reconnect_grace));
                    e.closed_at = None;
                    e.since = now;
                    changes.push((e.id, previous, e.reason.clone()));
                }
                continue;
            }
            let silence = now.saturating_duration_since(e.liveness.last());
            if silence >= cfg.node_timeout {
                e.health = NodeState::Dead;
                e.reason = format!("no heartbeat for {}", format_duration(round_ms(silence)));
                e.since = now;
                if let Some(s) = e.session.take() {
                    // Close the silent session: if the worker wakes up it must rejoin, not resume.
                    let _ = s.tx.try_send(Err(tonic::Status::unavailable(format!(
                        "node declared dead after no heartbeat for {}; rejoin",
                        format_duration(cfg.node_timeout)
                    ))));
                }
                changes.push((e.id, previous, e.reason.clone()));
            } else if silence >= cfg.suspect_after() && e.health == NodeState::Alive {
                e.health = NodeState::Suspect;
                e.reason = format!("heartbeat late: none for {}", format_duration(round_ms(silence)));
                e.since = now;
                changes.push((e.id, previous, e.reason.clone()));
            } else if silence < cfg.suspect_after() && e.health == NodeState::Suspect {
                e.health = NodeState::Alive;
                e.reason = "heartbeats resumed".into();
                e.since = now;
                changes.push((e.id, previous, e.reason.clone()));
            }
        }
        for (id, previous, reason) in changes {
            let level_dead = self.nodes.get(&id).is_some_and(|e| e.health == NodeState::Dead);
            if level_dead {
                warn!(node_id = %id, reason = %reason, "node dead");
            } else {
                info!(node_id = %id, reason = %reason, "node state changed");
            }
            self.emit(id, EventKind::StateChanged, Some(previous), reason, now);
        }
    }

    /// The head did not run for `gap`: what the workers sent meanwhile is still waiting to be
    /// read, so every node's clock starts again from now instead of counting the head's own
    /// stall as their silence (a crash and restart of the head restarts nothing either).
    fn resume_after_stall(&mut self, gap: Duration, now: Instant) {
        let mut n = 0;
        for e in self.nodes.values_mut().filter(|e| matches!(e.health, NodeState::Alive | NodeState::Suspect)) {
            e.liveness.touch_at(now);
            if e.closed_at.is_some() {
                e.closed_at = Some(now);
            }
            n += 1;
        }
        warn!(
            stalled = %format_duration(round_ms(gap)),
            nodes = n,
            "the head did not run for a while (frozen, stopped or starved); every node's heartbeat clock restarts now"
        );
    }

    pub fn set_draining(&mut self, node: &str, draining: bool, now: Instant) -> Result<NodeView, NodeError> {
        let id = self.resolve(node)?;
        let e = self.nodes.get_mut(&id).expect("resolved id exists");
        if e.draining != draining {
            if let Some(store) = &self.store
                && let Err(err) = store.set_drained(&id.to_string(), draining)
            {
                warn!(node_id = %id, error = %err, "cannot record the drain mark");
            }
            let previous = shown_state(e.health, e.draining, e.approved);
            e.draining = draining;
            let reason = if draining { "drained by an operator" } else { "undrained by an operator" };
            if previous != shown_state(e.health, e.draining, e.approved) {
                e.since = now;
            }
            info!(node_id = %id, draining, "node admin state changed");
            self.emit(id, EventKind::StateChanged, Some(previous), reason.into(), now);
        }
        Ok(self.view(&self.nodes[&id], now))
    }

    fn resolve(&self, node: &str) -> Result<NodeId, NodeError> {
        if let Ok(id) = node.parse::<NodeId>()
            && self.nodes.contains_key(&id)
        {
            return Ok(id);
        }
        let matches: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|e| e.info.name == node || (node.len() >= 8 && e.id.to_string().starts_with(node)))
            .map(|e| e.id)
            .collect();
        match matches.as_slice() {
            [id] => Ok(*id),
            [] => Err(NodeError::NotFound(node.to_string())),
            _ => Err(NodeError::Ambiguous(node.to_string())),
        }
    }

    /// Every node, the head first, then by name.
    pub fn views(&self, now: Instant) -> Vec<NodeView> {
        let mut v: Vec<NodeView> = self.nodes.values().map(|e| self.view(e, now)).collect();
        v.sort_by(|a, b| (!a.info.is_head, &a.info.name, a.id).cmp(&(!b.info.is_head, &b.info.name, b.id)));
        v
    }

    fn view(&self, e: &Entry, now: Instant) -> NodeView {
        NodeView {
            id: e.id,
            info: e.info.clone(),
            state: shown_state(e.health, e.draining, e.approved),
            draining: e.draining,
            address: e.address,
            last_heartbeat_ago: now.saturating_duration_since(e.liveness.last()),
            state_reason: e.reason.clone(),
            state_since_ago: now.saturating_duration_since(e.since),
            joined_ago: now.saturating_duration_since(e.joined),
            gpu_memory_used: e.gpu_memory_used.clone(),
        }
    }

    fn emit(&mut self, id: NodeId, kind: EventKind, previous: Option<NodeState>, reason: String, now: Instant) {
        let Some(e) = self.nodes.get(&id) else { return };
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let event = Event { seq, unix_ms: super::unix_ms(), kind, node: self.view(e, now), previous, reason };
        let _ = self.events.send(Arc::new(event)); // no subscribers is fine
    }

    /// Tells every open session that the head is going away, and ends them.
    pub fn shutdown(&mut self, reason: &str) {
        for e in self.nodes.values_mut() {
            if let Some(s) = e.session.take() {
                let _ = s.tx.try_send(Ok(pb::HeadMessage {
                    msg: Some(pb::head_message::Msg::Shutdown(pb::HeadShutdown { reason: reason.to_string() })),
                }));
            }
        }
    }
}

/// What the head keeps of a node credential: its SHA-256.
pub fn credential_hash(secret: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).to_vec()
}

/// The order of `views` (the head first, then by name, then by id), and the key a `ListNodes`
/// page token holds.
pub fn page_key(v: &NodeView) -> (bool, String, NodeId) {
    (!v.info.is_head, v.info.name.clone(), v.id)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
