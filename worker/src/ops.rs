//! The operations endpoint shared by the daemons: `GET /metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (head: serving; worker: joined).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Renders the metrics text at scrape time.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;
/// Whether the daemon is ready.
pub type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct Ops {
    render: Render,
    ready: Ready,
}

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, render: Render, ready: Ready, shutdown: CancellationToken) {
    serve_with(listener, render, ready, Router::new(), shutdown).await
}

/// [`serve`] with more routes (the head's status page).
pub async fn serve_with(
    listener: TcpListener,
    render: Render,
    ready: Ready,
    more: Router,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Ops { render, ready })
        .merge(more);
    let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
}

async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    let body = (ops.render)().await;
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    if (ops.ready)() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

/// Binds the `--metrics-listen` address, with an error that says what to do.
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot listen for metrics on {addr}: {e}; pick another --metrics-listen (port 0 picks a free one)")
    })
}

/// Writes the bound address to `path` (for scripts and tests when port 0 was asked for).
pub fn write_addr(listener: &TcpListener, path: &std::path::Path) {
    if let Ok(addr) = listener.local_addr() {
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, format!("{addr}\n")).and_then(|_| std::fs::rename(&tmp, path)).is_ok() {
            tracing::info!(%addr, "metrics, /healthz and /readyz served");
        }
    }
}
