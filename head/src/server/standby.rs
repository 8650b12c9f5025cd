//! What a standby head serves on its gRPC port (`--store etcd://...` while another head leads):
//! the standard health service (the process is up: `""` SERVING; the tessera services NOT_SERVING)
//! and, for every other call, `UNAVAILABLE` naming the leader, with its address in the
//! `tessera-leader` metadata so that clients and workers given several heads go there.

use std::convert::Infallible;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http;
use tower::ServiceExt;

use super::conns::{ConnLimits, Tracker, incoming};

/// The metadata key a standby puts the leader's address in.
pub const LEADER_METADATA: &str = "tessera-leader";

/// The services a leading head serves (NOT_SERVING on a standby).
pub const SERVICES: [&str; 5] = [
    "tessera.v1.Membership",
    "tessera.v1.Cluster",
    "tessera.v1.Planner",
    "tessera.v1.Deployments",
    "tessera.v1.Tokens",
];

/// The answer to any call a standby does not serve.
pub fn redirect(leader: Option<&str>) -> tonic::Status {
    match leader {
        Some(url) => {
            let mut s = tonic::Status::unavailable(format!(
                "this head is a standby; the leading head is {url}: call it there (clients and workers given \
                 several heads with --head URL1,URL2,... follow the leader by themselves)"
            ));
            if let Ok(v) = url.parse() {
                s.metadata_mut().insert(LEADER_METADATA, v);
            }
            s
        }
        None => tonic::Status::unavailable(
            "this head is a standby and no head leads now (an election is under way, or etcd cannot be reached); \
             retry in a few seconds",
        ),
    }
}

/// The leader's address carried by a standby's answer, if any.
pub fn leader_of(status: &tonic::Status) -> Option<String> {
    status.metadata().get(LEADER_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Serves as a standby on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    limits: ConnLimits,
    leader: watch::Receiver<Option<String>>,
    stop: CancellationToken,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    for svc in SERVICES {
        health.set_service_status(svc, tonic_health::ServingStatus::NotServing).await;
    }
    let svc = tower::service_fn(move |req: http::Request<Body>| {
        let health = health_service.clone();
        let leader = leader.borrow().clone();
        async move {
            if req.uri().path().starts_with("/grpc.health.v1.Health/") {
                return Ok::<_, Infallible>(match health.oneshot(req).await {
                    Ok(r) => r,
                    Err(e) => match e {},
                });
            }
            Ok(redirect(leader.as_deref()).into_http())
        }
    });
    let conns = incoming(listener, limits, Arc::new(Tracker::default()));
    super::serve::serve(conns, tls, svc, stop).await;
}
