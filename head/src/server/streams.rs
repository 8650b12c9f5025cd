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
    tx: mpsc::Sender<Result<T, Status>>,
    cut: Arc<AtomicBool>,
}

impl<T: Send + 'static> Feed<T> {
    /// Sends one item; false when the stream is over (the client went away, or it did not read
    /// for [`SLOW_READER`] and is cut off).
    pub async fn send(&self, item: Result<T, Status>) -> bool {
        match self.tx.send_timeout(item, SLOW_READER).await {
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

/// A stream that holds at most `capacity` items for its reader, and a slot of `limit` while open.
pub fn bounded<T: Send + 'static>(
    capacity: usize,
    limit: &Arc<Semaphore>,
    what: &'static str,
) -> Result<(Feed<T>, BoxStream<T>), Status> {
    let permit: OwnedSemaphorePermit = limit.clone().try_acquire_owned().map_err(|_| {
        Status::resource_exhausted(format!("too many {what} streams are open on this head; close some and retry"))
    })?;
    let (tx, rx) = mpsc::channel(capacity);
    let cut = Arc::new(AtomicBool::new(false));
    let end = cut.clone();
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).chain(
        futures_util::stream::once(async move {
            let _permit = permit;
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
