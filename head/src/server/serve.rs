//! The head's gRPC server: tonic's services on hyper's HTTP/2 connections, set up here instead of
//! by `tonic::transport::Server` for one setting tonic does not expose: the send buffer of each
//! stream. hyper's default (400 KiB a stream) let a client that opens streams and never reads
//! park that much of the head's memory in each; here it is [`MAX_SEND_BUF`]. Everything else is
//! what tonic's server does: TLS (rustls, HTTP/2 by ALPN, a handshake deadline), the peer's
//! address in each request (`Request::remote_addr`), errors turned into gRPC statuses, and a
//! graceful stop (GOAWAY, then the calls in flight finish).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::TcpConnectInfo;
use tower::{Service, ServiceExt};
use tracing::debug;

use super::conns::{Authenticated, Conn};

pub use crate::MAX_STREAMS_PER_CONNECTION;
/// What one stream may hold of encoded messages the peer has not taken yet. A WatchEvents or log
/// stream whose reader stops then waits on its own bounded queue (and is cut off when that is
/// full) instead of filling this buffer.
pub const MAX_SEND_BUF: usize = 64 * 1024;
/// A TLS handshake must end within this.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 settings of the head's port: bounded streams, headers, reset floods and buffers, and
/// keepalive pings so a dead peer is noticed.
fn http2() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(Some(64))
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_send_buf_size(MAX_SEND_BUF);
    b
}

/// Serves `svc` on every connection of `incoming` (TLS first when `tls` is set) until `stop`;
/// then stops accepting, asks each connection to finish (GOAWAY) and returns once all have.
pub async fn serve<S>(
    incoming: impl Stream<Item = std::io::Result<Conn>>,
    tls: Option<Arc<ServerConfig>>,
    svc: S,
    stop: CancellationToken,
) where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let builder = Arc::new(http2());
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    // Each connection holds a receiver; `closed()` on the sender says when all have ended.
    let (going_away, watcher) = tokio::sync::watch::channel(false);
    {
        let mut incoming = std::pin::pin!(incoming);
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => break,
                c = incoming.next() => match c {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        debug!(error = %e, "accept");
                        continue;
                    }
                    None => break,
                },
            };
            let info =
                (TcpConnectInfo { local_addr: conn.local(), remote_addr: Some(conn.peer()) }, conn.authenticated());
            let (svc, builder, tls, watcher) = (svc.clone(), builder.clone(), tls.clone(), watcher.clone());
            tokio::spawn(async move {
                match tls {
                    None => connection(conn, info, svc, &builder, watcher).await,
                    Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                        Ok(Ok(io)) => connection(io, info, svc, &builder, watcher).await,
                        Ok(Err(e)) => debug!(peer = ?info.0.remote_addr, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(peer = ?info.0.remote_addr, "TLS handshake timed out"),
                    },
                }
            });
        }
    }
    drop(watcher);
    let _ = going_away.send(true);
    going_away.closed().await;
}

/// One connection, served until it ends or, once the server stops, until its calls have finished.
async fn connection<IO, S>(
    io: IO,
    info: (TcpConnectInfo, Authenticated),
    svc: S,
    builder: &hyper::server::conn::http2::Builder<TokioExecutor>,
    mut going_away: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let peer = info.0.remote_addr;
    let svc = tower::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(info.0.clone());
        req.extensions_mut().insert(info.1.clone());
        svc.clone().oneshot(req.map(Body::new))
    });
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    let mut conn = std::pin::pin!(conn);
    let mut asked = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(?peer, error = %e, "connection ended");
                }
                return;
            }
            changed = going_away.changed(), if !asked => {
                asked = true;
                if changed.is_err() || *going_away.borrow() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
