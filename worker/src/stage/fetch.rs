//! The receiving side: one file from its sources into the cache, every chunk checked against the
//! source's hashes (which came from the head over the node's own session, not from the peer).
//! A chunk that fails its check is cut off and fetched again from the next source; a partial file
//! left by a stopped fetch (or a killed worker) is resumed after its last good chunk.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tessera_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::cache::{self, Cache, Have};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No byte for this long from a source: try the next.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts over the sources before the file fails.
const ROUNDS: usize = 3;
/// Times a peer that does not know the token yet is asked again (200 ms apart).
const PEER_RETRIES: usize = 50;

/// `--transfer-max-rate`: what a node fetches, in bytes per second, over all its transfers.
pub struct Limit {
    rate: u64,
    /// When the bytes taken so far may all have arrived.
    next: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Limit {
    pub fn new(rate: u64) -> Limit {
        Limit { rate, next: std::sync::Mutex::new(None) }
    }

    /// Waits until `n` more bytes fit under the rate (0: no limit).
    pub async fn take(&self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let at = {
            let mut next = self.next.lock().expect("lock");
            let now = tokio::time::Instant::now();
            let from = next.filter(|t| *t > now).unwrap_or(now);
            let at = from + Duration::from_secs_f64(n as f64 / self.rate as f64);
            *next = Some(at);
            from
        };
        tokio::time::sleep_until(at).await;
    }
}

/// What a staging has done, for its progress reports.
#[derive(Default)]
pub struct Counters {
    pub done: AtomicU64,
    pub fetched: AtomicU64,
    pub refetched: AtomicU32,
    pub files_done: AtomicU32,
}

/// Checks a file entry from the head: a plain name, a 32-byte hash, chunk hashes that cover it.
pub fn check(f: &pb::ModelFile) -> Result<(), String> {
    let n = &f.name;
    if n.is_empty() || n == "." || n == ".." || n.contains('/') || n.contains('\0') || n.len() > 255 {
        return Err(format!("file name {n:?} is not a plain file name"));
    }
    if f.sha256.len() != 32 || f.chunk_sha256.iter().any(|c| c.len() != 32) {
        return Err(format!("{n}: hashes must be 32-byte SHA-256 values"));
    }
    if f.size_bytes > 1 << 50 || f.chunk_bytes > 1 << 30 {
        return Err(format!("{n}: {} bytes in chunks of {}: too large", f.size_bytes, f.chunk_bytes));
    }
    if f.chunk_bytes == 0 || f.size_bytes.div_ceil(f.chunk_bytes) != f.chunk_sha256.len() as u64 {
        return Err(format!(
            "{n}: {} chunk hashes do not cover {} bytes in chunks of {}",
            f.chunk_sha256.len(),
            f.size_bytes,
            f.chunk_bytes
        ));
    }
    Ok(())
}

/// Fetches one file into the cache (or finds it there).
pub async fn fetch_file(
    cache: &Arc<Cache>,
    token: &str,
    job: &pb::StageFile,
    c: &Arc<Counters>,
    cancel: &CancellationToken,
    limit: &Limit,
) -> Result<(), String> {
    let f = job.file.as_ref().ok_or("a staged file without its description")?;
    let sha = super::index::blob_id(f);
    let size = f.size_bytes;
    // Another staging on this node may be fetching the same file: wait for it.
    let claim = loop {
        if cache.has(&sha, size) {
            cache.touch(&sha);
            c.done.fetch_add(size, Ordering::Relaxed);
            c.files_done.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if let Some(claim) = cache.claim(&sha, 0) {
            break claim;
        }
        if let Some(mut rx) = cache.growing(&sha) {
            tokio::select! {
                _ = cancel.cancelled() => return Err("cancelled".into()),
                _ = async { while !matches!(*rx.borrow_and_update(), Have::Whole | Have::Stopped(_)) { if rx.changed().await.is_err() { break } } } => {}
            }
        }
    };
    let partial = cache.partial(&sha);
    let (cb, chunks) = (f.chunk_bytes, f.chunk_sha256.clone());
    let mut start = tokio::task::spawn_blocking(move || cache::checked_prefix(&partial, cb, &chunks, size))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", f.name))?;
    claim.publish(Have::Prefix(start));
    c.done.fetch_add(start, Ordering::Relaxed);
    let mut last_err = String::new();
    let mut attempt = 0;
    let mut peer_waits = 0;
    while start < size {
        if attempt >= job.sources.len().max(1) * ROUNDS {
            return Err(format!("{}: every source failed; last: {last_err}", f.name));
        }
        let Some(src) = job.sources.get(attempt % job.sources.len().max(1)) else {
            return Err(format!("{}: no source to fetch it from", f.name));
        };
        attempt += 1;
        if attempt > job.sources.len() && attempt % job.sources.len().max(1) == 1 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let r = tokio::select! {
            _ = cancel.cancelled() => return Err("cancelled".into()),
            r = fetch_range(cache, token, f, &sha, src, start, &claim, c, limit) => r,
        };
        // A peer told of this staging a moment after us does not know the token yet: ask it again
        // for a while before going to the next source.
        if let Err((_, why)) = &r
            && why.starts_with("401")
            && attempt < job.sources.len()
            && peer_waits < PEER_RETRIES
        {
            peer_waits += 1;
            attempt -= 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        match r {
            Ok(n) => start = n,
            Err((n, why)) => {
                start = n;
                tracing::warn!(file = %f.name, source = %src.node, error = %why, "fetch from this source failed; trying the next");
                last_err = format!("from {} ({}:{}): {why}", src.node, src.address, src.port);
            }
        }
    }
    let (cache2, sha2) = (cache.clone(), sha.clone());
    tokio::task::spawn_blocking(move || cache::finish(&cache2, &sha2))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: cannot move it into the cache: {e}", f.name))?;
    claim.publish(Have::Whole);
    c.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// One request to one source for `[start, size)`; returns the checked prefix after it (Err with
/// the prefix and why when it ended short).
#[allow(clippy::too_many_arguments)]
async fn fetch_range(
    cache: &Arc<Cache>,
    token: &str,
    f: &pb::ModelFile,
    sha: &str,
    src: &pb::StageSource,
    start: u64,
    claim: &Arc<cache::Claim>,
    c: &Arc<Counters>,
    limit: &Limit,
) -> Result<u64, (u64, String)> {
    let fail = |why: String| (start, why);
    let addr = crate::shard::http::authority(&src.address, src.port as u16);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|_| fail(format!("no connection to {addr} within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| fail(format!("cannot connect to {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let req = Request::get(format!("/v1/blobs/{sha}"))
        .header("host", &addr)
        .header("authorization", format!("Bearer {token}"))
        .header("range", format!("bytes={start}-{}", f.size_bytes - 1))
        .body(Empty::new())
        .map_err(|e| fail(e.to_string()))?;
    // A peer that has not started on the file yet answers once it has (up to serve::NOT_YET).
    let resp = tokio::time::timeout(super::serve::NOT_YET + READ_TIMEOUT, send.send_request(req))
        .await
        .map_err(|_| fail("no answer".into()))?
        .map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        let status = resp.status();
        // A few KiB of the error's text at most: a peer's error body is not read to its end.
        let body = tokio::time::timeout(
            Duration::from_secs(5),
            http_body_util::Limited::new(resp.into_body(), 4096).collect(),
        )
        .await;
        let text = body.ok().and_then(|b| b.ok()).map(|b| String::from_utf8_lossy(&b.to_bytes()).to_string());
        driver.abort();
        return Err(fail(format!("{status}: {}", text.unwrap_or_default().chars().take(200).collect::<String>())));
    }
    // Frames go to a writer thread that writes, checks each chunk and publishes the checked prefix.
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let path = cache.partial(sha);
    let (cb, chunks, size) = (f.chunk_bytes, f.chunk_sha256.clone(), f.size_bytes);
    let held = claim.clone();
    let counters = c.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let publish = |n: u64| held.publish(Have::Prefix(n));
        write_chunks(&path, start, cb, &chunks, size, rx, &publish, &counters.done)
    });
    let mut body = resp.into_body();
    let mut read_err = None;
    loop {
        match tokio::time::timeout(READ_TIMEOUT, body.frame()).await {
            Err(_) => {
                read_err = Some(format!("no data for {READ_TIMEOUT:?}"));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                read_err = Some(e.to_string());
                break;
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    limit.take(data.len() as u64).await;
                    c.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if tx.send(data).await.is_err() {
                        break; // the writer stopped: a bad chunk
                    }
                }
            }
        }
    }
    drop(tx);
    driver.abort();
    let r = writer.await.map_err(|e| fail(e.to_string()))?;
    match r {
        Ok(end) if end == size => Ok(end),
        Ok(end) => Err((end, read_err.unwrap_or_else(|| format!("the answer ended at byte {end} of {size}")))),
        Err(WriteError::Corrupt { chunk, at }) => {
            c.refetched.fetch_add(1, Ordering::Relaxed);
            Err((at, format!("chunk {chunk} does not match its sha256 (a corrupt copy); fetching it again elsewhere")))
        }
        Err(WriteError::Io(at, e)) => Err((at, format!("cannot write the cache: {e}"))),
    }
}

enum WriteError {
    Corrupt { chunk: u64, at: u64 },
    Io(u64, std::io::Error),
}

/// Writes frames from `start` (a chunk boundary), checking each whole chunk; returns the checked
/// prefix (the file is cut back to it).
#[allow(clippy::too_many_arguments)]
fn write_chunks(
    path: &std::path::Path,
    start: u64,
    cb: u64,
    chunks: &[Vec<u8>],
    size: u64,
    mut rx: mpsc::Receiver<Bytes>,
    publish: &dyn Fn(u64),
    checked_bytes: &AtomicU64,
) -> Result<u64, WriteError> {
    let file = std::fs::File::options().write(true).open(path).map_err(|e| WriteError::Io(start, e))?;
    file.set_len(start).map_err(|e| WriteError::Io(start, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    use std::io::Seek;
    w.seek(std::io::SeekFrom::Start(start)).map_err(|e| WriteError::Io(start, e))?;
    let mut good = start;
    let mut pos = start;
    let mut h = Sha256::new();
    let cut = |w: std::io::BufWriter<std::fs::File>, good: u64| -> Result<(), std::io::Error> {
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.set_len(good)
    };
    while let Some(mut data) = rx.blocking_recv() {
        while !data.is_empty() {
            let chunk_end = (good + cb).min(size);
            if pos >= size {
                // More than the file: a broken source.
                let _ = cut(w, good);
                return Err(WriteError::Corrupt { chunk: good / cb, at: good });
            }
            let take = ((chunk_end - pos) as usize).min(data.len());
            let part = data.split_to(take);
            h.update(&part);
            w.write_all(&part).map_err(|e| WriteError::Io(good, e))?;
            pos += take as u64;
            if pos == chunk_end {
                let idx = (good / cb) as usize;
                let ok = chunks.get(idx).is_some_and(|want| h.finalize_reset().as_slice() == want.as_slice());
                if !ok {
                    let _ = cut(w, good);
                    return Err(WriteError::Corrupt { chunk: idx as u64, at: good });
                }
                w.flush().map_err(|e| WriteError::Io(good, e))?;
                checked_bytes.fetch_add(chunk_end - good, Ordering::Relaxed);
                good = chunk_end;
                publish(good);
            }
        }
    }
    cut(w, good).map_err(|e| WriteError::Io(good, e))?;
    Ok(good)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64, cb: u64, chunks: usize) -> pb::ModelFile {
        pb::ModelFile {
            name: name.into(),
            size_bytes: size,
            sha256: vec![0; 32],
            chunk_bytes: cb,
            chunk_sha256: vec![vec![0; 32]; chunks],
            ..Default::default()
        }
    }

    #[test]
    fn entries_from_the_head_are_checked() {
        assert!(check(&file("model.safetensors", 10, 4, 3)).is_ok());
        assert!(check(&file("empty", 0, 4, 0)).is_ok());
        for bad in ["../x", "a/b", "", "..", "."] {
            assert!(check(&file(bad, 10, 4, 3)).is_err(), "{bad:?}");
        }
        assert!(check(&file("x", 10, 4, 2)).expect_err("refused").contains("do not cover"));
        assert!(check(&file("x", 10, 0, 0)).is_err());
    }
}
