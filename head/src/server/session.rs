//! The worker-facing `Membership.Session` stream: join, heartbeats, leave.

use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tessera_common::node::JoinInfo;
use tessera_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::deploy::Deployments;
use crate::deploy::staging::StagingMsg;
use crate::membership::{Admitted, ConnInfo, JoinError, Membership};

/// Join refusals as gRPC codes.
impl From<JoinError> for Status {
    fn from(e: JoinError) -> Self {
        match e {
            JoinError::NodeIdConflict { .. } | JoinError::NameConflict { .. } => Status::already_exists(e.to_string()),
            JoinError::GpuConflict { .. } => Status::invalid_argument(e.to_string()),
            JoinError::NameReserved { .. } => Status::already_exists(e.to_string()),
            JoinError::BadCredential { .. } => Status::permission_denied(e.to_string()),
            JoinError::PreviousStillConnected | JoinError::CannotRecord(_) => Status::unavailable(e.to_string()),
            JoinError::ShuttingDown => Status::unavailable(e.to_string()),
        }
    }
}

/// How long a new session may take to send its join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued towards one worker before heartbeat acks are dropped.
const SESSION_QUEUE: usize = 64;

pub struct MembershipService {
    pub membership: Membership,
    pub deployments: Deployments,
    pub head_instance_id: String,
    /// This head's leadership (always held on the embedded store).
    pub fence: std::sync::Arc<crate::leader::Fence>,
}

type HeadStream = Pin<Box<dyn Stream<Item = Result<pb::HeadMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::membership_server::Membership for MembershipService {
    type SessionStream = HeadStream;

    async fn session(&self, request: Request<Streaming<pb::WorkerMessage>>) -> Result<Response<HeadStream>, Status> {
        // A head that no longer leads takes no node (the worker tries the other heads).
        if !self.fence.holds() {
            return Err(super::standby::redirect(None));
        }
        let peer = request
            .remote_addr()
            .map(|a| canonical(a.ip()))
            .ok_or_else(|| Status::failed_precondition("session over a transport without peer addresses"))?;
        let local = request.local_addr().map(|a| canonical(a.ip()));
        let granted = request.extensions().get::<tessera_common::auth::Granted>().cloned();
        let mut inbound = request.into_inner();

        let first = tokio::time::timeout(JOIN_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no join message within 10s of opening the session"))??
            .ok_or_else(|| Status::invalid_argument("session closed before its join message"))?;
        let Some(pb::worker_message::Msg::Join(mut join)) = first.msg else {
            return Err(Status::invalid_argument("the first message of a session must be `join`"));
        };
        if join.shards.len() > 4096 {
            return Err(Status::invalid_argument(format!("join.shards: {} reports; at most 4096", join.shards.len())));
        }
        let shards = std::mem::take(&mut join.shards);
        let secret = std::mem::take(&mut join.node_secret);
        if secret.len() > 512 {
            return Err(Status::invalid_argument("join.node_secret: longer than 512 bytes"));
        }
        let mut secret = (!secret.is_empty()).then_some(secret);
        // A session opened with a node credential (not the join token) can only be that node's.
        let credential_only = match granted {
            Some(tessera_common::auth::Granted::NodeCredential(bearer)) => {
                if join.node_id.is_empty() || secret.as_ref().is_some_and(|s| *s != bearer) {
                    return Err(Status::permission_denied(
                        "a node credential opens only its own node's session: send the node id and the same credential, or use the join token",
                    ));
                }
                secret = Some(bearer);
                true
            }
            _ => false,
        };
        let info = JoinInfo::try_from(join)?;

        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let admitted =
            self.membership.join(info, secret, credential_only, ConnInfo { peer, local }, tx.clone()).await?;
        let cfg = self.membership.config();
        let joined = pb::Joined {
            node_id: admitted.node_id.to_string(),
            observed_address: peer.to_string(),
            address: admitted.address.to_string(),
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
            node_timeout_ms: cfg.node_timeout.as_millis() as u64,
            head_instance_id: self.head_instance_id.clone(),
            rejoined: admitted.rejoined,
            node_secret: admitted.new_secret.clone().unwrap_or_default(),
            leader_epoch: self.fence.epoch().max(0) as u64,
        };
        // The channel is fresh, so this cannot be full.
        let _ = tx.try_send(Ok(msg(pb::head_message::Msg::Joined(joined))));
        // What the node already runs is reconciled against the deployments (kept, or stopped).
        self.deployments.node_joined(admitted.node_id, shards).await;
        tokio::spawn(pump(self.membership.clone(), self.deployments.clone(), admitted, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Reads one session's inbound messages until it ends.
async fn pump(
    membership: Membership,
    deployments: Deployments,
    admitted: Admitted,
    mut inbound: Streaming<pb::WorkerMessage>,
    tx: mpsc::Sender<Result<pb::HeadMessage, Status>>,
) {
    let Admitted { node_id, session_id, liveness, .. } = admitted;
    let why = loop {
        let next = tokio::select! {
            next = inbound.next() => next,
            // The head closed this session (replaced, declared dead, shutting down).
            _ = tx.closed() => break "closed by the head".to_string(),
        };
        match next {
            Some(Ok(m)) => match m.msg {
                Some(pb::worker_message::Msg::Heartbeat(hb)) => {
                    liveness.touch();
                    if !hb.gpu_usage.is_empty() {
                        let usage = hb.gpu_usage.iter().map(|u| (u.index, u.memory_used_bytes)).collect();
                        membership.report_usage(node_id, usage).await;
                    }
                    // A full queue means the worker is not reading; it will time out by itself.
                    let _ = tx.try_send(Ok(msg(pb::head_message::Msg::HeartbeatAck(pb::HeartbeatAck { seq: hb.seq }))));
                }
                Some(pb::worker_message::Msg::Shard(report)) => deployments.report(node_id, report).await,
                Some(pb::worker_message::Msg::LogData(data)) => deployments.log_data(node_id, data).await,
                Some(pb::worker_message::Msg::ModelIndex(m)) => {
                    deployments.staging(node_id, StagingMsg::Index(Box::new(m))).await
                }
                Some(pb::worker_message::Msg::ModelDescription(d)) => deployments.described(node_id, d),
                Some(pb::worker_message::Msg::StageProgress(p)) => {
                    deployments.staging(node_id, StagingMsg::Progress(Box::new(p))).await
                }
                Some(pb::worker_message::Msg::Leave(leave)) => {
                    membership.leave(node_id, session_id, leave.reason).await;
                    let _ = tx.send(Ok(msg(pb::head_message::Msg::Left(pb::Left {})))).await;
                    return;
                }
                Some(pb::worker_message::Msg::Join(_)) => {
                    let _ = tx
                        .send(Err(Status::invalid_argument("`join` may only be the first message of a session")))
                        .await;
                    break "protocol error: second join".to_string();
                }
                None => debug!(%node_id, "empty worker message ignored"),
            },
            Some(Err(status)) => break format!("stream error: {}", status.message()),
            None => break "stream ended without leave".to_string(),
        }
    };
    warn!(%node_id, session_id, why = %why, "session ended");
    membership.session_closed(node_id, session_id, why).await;
}

fn msg(m: pb::head_message::Msg) -> pb::HeadMessage {
    pb::HeadMessage { msg: Some(m) }
}

/// `::ffff:10.0.0.1` (an IPv4 peer on a dual-stack socket) is shown as `10.0.0.1`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
