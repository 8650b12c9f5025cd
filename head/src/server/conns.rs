//! The head's connections, bounded: at most `--max-connections` at once (more are closed at
//! once, with a rate-limited log line), and a connection that has not made one authenticated call
//! within `--unauthenticated-timeout` is closed, so idle sockets cannot use up the process's file
//! descriptors and lock everyone out.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
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

/// Which open connections have made an authenticated call (by peer address).
#[derive(Default)]
pub struct Tracker {
    authenticated: Mutex<HashMap<SocketAddr, Arc<AtomicBool>>>,
    refused: AtomicU64,
}

impl Tracker {
    /// The connection from `peer` made an authenticated call: it may stay idle.
    pub fn authenticated(&self, peer: SocketAddr) {
        if let Some(flag) = self.authenticated.lock().expect("lock").get(&peer) {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// One accepted connection: its slot under the limit, and its authentication deadline.
pub struct Conn {
    io: TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    authenticated: Arc<AtomicBool>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    tracker: Arc<Tracker>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.tracker.authenticated.lock().expect("lock").remove(&self.peer);
    }
}

impl Conn {
    /// Past the deadline without an authenticated call: the connection is closed.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        !self.authenticated.load(Ordering::Relaxed) && self.deadline.as_mut().poll(cx).is_ready()
    }
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

/// Connections accepted but not yet readable, waiting to be handed to the server.
const HANDOFF: usize = 256;

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
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(HANDOFF);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
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
            let authenticated = Arc::new(AtomicBool::new(false));
            tracker.authenticated.lock().expect("lock").insert(peer, authenticated.clone());
            let deadline = tokio::time::Instant::now() + limits.unauthenticated_timeout;
            let conn = Conn {
                local: io.local_addr().ok(),
                io,
                peer,
                authenticated,
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                tracker: tracker.clone(),
                _permit: permit,
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                // Data to read, or the peer closed (the server then sees the end at once). `peek`
                // waits out tokio's false readiness, which `readable()` alone would pass on, and
                // consumes nothing.
                let mut one = [0u8; 1];
                if let Ok(Ok(_)) = tokio::time::timeout_at(deadline, conn.io.peek(&mut one)).await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
