//! The head's connections, bounded: at most `--max-connections` at once (more are closed at
//! once, with a rate-limited log line), and a connection that has not made one authenticated call
//! within `--unauthenticated-timeout` is closed, so idle sockets cannot use up the process's file
//! descriptors and lock everyone out.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// Connection limits of the head's gRPC port.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub unauthenticated_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits { max_connections: 16_384, unauthenticated_timeout: Duration::from_secs(10) }
    }
}

/// What the accept loop counts: connections refused at the limit.
#[derive(Default)]
pub struct Tracker {
    refused: AtomicU64,
}

/// In each request's extensions: marks the request's connection as having made an authenticated
/// call, so it may stay idle past its deadline.
#[derive(Clone)]
pub struct Authenticated(Arc<AtomicBool>);

impl Authenticated {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One accepted connection: its slot under the limit, and its authentication deadline.
pub struct Conn {
    io: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    authenticated: Arc<AtomicBool>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// For the requests of this connection (see [`Authenticated`]).
    pub fn authenticated(&self) -> Authenticated {
        Authenticated(self.authenticated.clone())
    }

    /// The head's address of this connection.
    pub fn local(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Past the deadline without an authenticated call: the connection is closed.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        !self.authenticated.load(Ordering::Relaxed) && self.deadline.as_mut().poll(cx).is_ready()
    }
}

/// The connection once it has data to read, or the peer closed (the server then sees the end at
/// once); `None` when its authentication deadline passed first (it is closed). Consumes nothing (a
/// peek, which also waits out tokio's false readiness that `readable()` alone would pass on).
async fn readable_in_time(mut conn: Conn) -> Option<Conn> {
    let readable = std::future::poll_fn(|cx| {
        if conn.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        let mut one = [0u8; 1];
        let mut buf = ReadBuf::new(&mut one);
        match conn.io.poll_peek(cx, &mut buf) {
            Poll::Ready(r) => Poll::Ready(r.is_ok()),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    readable.then_some(conn)
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no authenticated call in time; connection closed",
            )));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo { local_addr: self.local, remote_addr: Some(self.peer) }
    }
}

/// The accepted connections of `listener`, within `limits`. A connection goes to the server (and
/// its HTTP/2 codec, 16 KiB of buffers at the handshake, seen with heaptrack) only once the client
/// has sent something; until then it costs a socket and a small task, and it is closed at its
/// authentication deadline if it never sends.
pub fn incoming(
    listener: TcpListener,
    limits: ConnLimits,
    tracker: Arc<Tracker>,
) -> impl Stream<Item = std::io::Result<Conn>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Unbounded, yet bounded: every connection in it holds one of the `max_connections` slots.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<Conn>>();
    tokio::spawn(async move {
        // The connections not yet readable, each a small future (`poll_peek`, and the
        // connection's own deadline as its timer): a few hundred bytes a connection.
        let mut pending = FuturesUnordered::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                Some(ready) = pending.next(), if !pending.is_empty() => {
                    if let Some(conn) = ready && tx.send(Ok(conn)).is_err() {
                        return;
                    }
                    continue;
                }
                // The server is gone: stop accepting.
                _ = tx.closed() => return,
            };
            let (io, peer) = match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait a little rather than spin.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                let n = tracker.refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || n.is_power_of_two() {
                    warn!(%peer, refused = n, max = limits.max_connections, "connection limit reached; closing new connections");
                }
                drop(io);
                continue;
            };
            let _ = io.set_nodelay(true);
            let deadline = tokio::time::Instant::now() + limits.unauthenticated_timeout;
            let conn = Conn {
                local: io.local_addr().ok(),
                io,
                peer,
                authenticated: Arc::new(AtomicBool::new(false)),
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                _permit: permit,
            };
            pending.push(readable_in_time(conn));
        }
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}
