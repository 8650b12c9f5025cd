//! Server streams (events, logs) with bounded buffers: a reader that does not keep up is cut off
//! with `RESOURCE_EXHAUSTED` instead of making the head buffer for it, and the number of such
//! streams open at once is bounded too.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

/// How long a stream's buffer may stay full before its reader is cut off.
pub const SLOW_READER: Duration = Duration::from_secs(5);

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The sending side of a bounded stream.
pub struct Feed<T> {
    /// Boxed: a queue's slots are allocated in blocks, and a `Status` is large.
    tx: mpsc::Sender<Box<Result<T, Status>>>,
    cut: Arc<AtomicBool>,
}

impl<T: Send + 'static> Feed<T> {
    /// Sends one item; false when the stream is over (the client went away, or it did not read
    /// for [`SLOW_READER`] and is cut off).
    pub async fn send(&self, item: Result<T, Status>) -> bool {
        match self.tx.send_timeout(Box::new(item), SLOW_READER).await {
            Ok(()) => true,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                self.cut.store(true, Ordering::SeqCst);
                false
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        }
    }

    /// The client went away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Streams open per peer address.
type PeerCounts = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// How many streams of one kind may be open at once, in all and from one peer address (a peer
/// that does not read costs the head what HTTP/2 buffers for it).
pub struct StreamLimits {
    total: Arc<Semaphore>,
    per_peer: PeerCounts,
    max_per_peer: usize,
}

impl StreamLimits {
    pub fn new(total: usize, max_per_peer: usize) -> Self {
        StreamLimits { total: Arc::new(Semaphore::new(total)), per_peer: Default::default(), max_per_peer }
    }
}

/// One open stream's places under its limits; given back when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    peer: Option<(std::net::IpAddr, PeerCounts)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((ip, map)) = &self.peer {
            let mut m = map.lock().expect("lock");
            if let Some(n) = m.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(ip);
                }
            }
        }
    }
}

/// A stream that holds at most `capacity` items for its reader, and a place under `limits` (for
/// `peer`) while open. Items are queued as `T` and turned into what the client gets (`U`) when it
/// takes them, so a queue can hold shared events (an `Arc`) rather than a copy each.
pub fn bounded<T: Into<U> + Send + 'static, U: Send + 'static>(
    capacity: usize,
    limits: &StreamLimits,
    peer: Option<std::net::IpAddr>,
    what: &'static str,
) -> Result<(Feed<T>, BoxStream<U>), Status> {
    let permit: OwnedSemaphorePermit = limits.total.clone().try_acquire_owned().map_err(|_| {
        Status::resource_exhausted(format!("too many {what} streams are open on this head; close some and retry"))
    })?;
    let peer = match peer {
        None => None,
        Some(ip) => {
            let mut m = limits.per_peer.lock().expect("lock");
            let n = m.entry(ip).or_insert(0);
            if *n >= limits.max_per_peer {
                return Err(Status::resource_exhausted(format!(
                    "{} {what} streams are open from {ip} already (at most {}); close some and retry",
                    *n, limits.max_per_peer
                )));
            }
            *n += 1;
            Some((ip, limits.per_peer.clone()))
        }
    };
    let slot = Slot { _permit: permit, peer };
    let (tx, rx) = mpsc::channel::<Box<Result<T, Status>>>(capacity);
    let cut = Arc::new(AtomicBool::new(false));
    let end = cut.clone();
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|item: Box<Result<T, Status>>| (*item).map(Into::into))
        .chain(
            futures_util::stream::once(async move {
                let _slot = slot;
                end.load(Ordering::SeqCst).then(|| {
                    Err(Status::resource_exhausted(format!(
                        "this {what} stream was not read for {}s and was cut off; read faster, or watch again",
                        SLOW_READER.as_secs()
                    )))
                })
            })
            .filter_map(std::future::ready),
        );
    Ok((Feed { tx, cut }, Box::pin(stream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_are_bounded_in_all_and_per_peer() {
        let limits = StreamLimits::new(3, 2);
        let a: std::net::IpAddr = [10, 0, 0, 1].into();
        let b: std::net::IpAddr = [10, 0, 0, 2].into();
        let s1 = bounded::<u32, u32>(4, &limits, Some(a), "test").expect("first");
        let _s2 = bounded::<u32, u32>(4, &limits, Some(a), "test").expect("second");
        let e = bounded::<u32, u32>(4, &limits, Some(a), "test").err().expect("third from one peer");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("from 10.0.0.1"), "{}", e.message());
        let _s3 = bounded::<u32, u32>(4, &limits, Some(b), "test").expect("another peer");
        let e = bounded::<u32, u32>(4, &limits, None, "test").err().expect("the total");
        assert!(e.message().contains("too many test streams"), "{}", e.message());
        // A stream gives its places back when it is over.
        drop(s1);
        let _again = bounded::<u32, u32>(4, &limits, Some(a), "test").expect("a place again");
    }

    #[tokio::test]
    async fn a_reader_that_does_not_read_is_cut_off() {
        tokio::time::pause();
        let limits = StreamLimits::new(1, 1);
        let (feed, mut stream) = bounded::<u32, u32>(2, &limits, None, "test").expect("open");
        assert!(feed.send(Ok(1)).await && feed.send(Ok(2)).await);
        assert!(!feed.send(Ok(3)).await, "full for SLOW_READER: cut off");
        drop(feed);
        let items: Vec<Result<u32, Status>> = stream.by_ref().collect().await;
        assert_eq!(items.len(), 3);
        assert_eq!(items[2].as_ref().err().map(|s| s.code()), Some(tonic::Code::ResourceExhausted));
    }
}
