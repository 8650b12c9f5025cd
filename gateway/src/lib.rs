//! `tessera-gateway`: the OpenAI-compatible front of a Tessera cluster. It reads the deployments
//! from the head with the reader token (nothing else), keeps a routing table ([`table`]), checks
//! each replica's health, and forwards requests by their `model` ([`proxy`]), with Prometheus
//! metrics at `/metrics` ([`metrics`]). Run as many as you like, anywhere that reaches the head and
//! the replicas; they share nothing.
//!
//! # Layout
//! - [`table`]: the routing state machine (synchronous, tested on made-up time).
//! - [`proxy`]: the HTTP handlers (axum on hyper) and the forwarding with retries.
//! - [`watch`]: the loops that feed the table: the head's deployments, replica health checks.
//! - [`metrics`]: what is counted.

pub mod metrics;
pub mod proxy;
pub mod table;
pub mod watch;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

/// The gateway's HTTP routes on `shared`.
pub fn router(shared: Arc<proxy::Shared>) -> Router {
    Router::new()
        .route("/v1/models", get(proxy::models))
        .route("/v1/completions", post(proxy::forward))
        .route("/v1/chat/completions", post(proxy::forward))
        .route("/v1/embeddings", post(proxy::forward))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async {
            proxy::error(
                axum::http::StatusCode::NOT_FOUND,
                "not a route of the gateway: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /metrics, /healthz",
            )
        })
        // Bodies are read by the handler under `--max-body`, not axum's default 2 MB.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(shared)
}

async fn metrics(
    axum::extract::State(s): axum::extract::State<Arc<proxy::Shared>>,
) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.metrics.render(),
    )
}

/// `host:port` or a URL: the head's gRPC URL (`http://` unless given).
/// `--head` as URLs (several, comma-separated, for heads on one etcd store): `host:port` gets
/// `http://`.
pub fn head_url(head: &str) -> String {
    head.split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| if h.contains("://") { h.to_string() } else { format!("http://{h}") })
        .collect::<Vec<_>>()
        .join(",")
}
