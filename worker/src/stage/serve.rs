//! The node's transfer server: `GET /v1/blobs/<sha256>` with a `Range: bytes=START-[END]` header and
//! `Authorization: Bearer TOKEN`. A token is minted by the head for one staging and is good only
//! for that staging's files, until it ends (or an hour passes). A file this node is still fetching
//! is served as it grows (only checked chunks), so that a chain of nodes streams at once.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::cache::{Cache, Have};

/// How long a token stays good when nothing ends it.
pub const GRANT_TTL: Duration = Duration::from_secs(3600);
/// Most grants held: the oldest go first.
pub const MAX_GRANTS: usize = 256;
/// Most transfers served at once; more are answered 503 (the client tries its next source).
pub const MAX_SERVING: usize = 64;
/// A growing file that does not grow for this long ends the answer early.
pub const STALL: Duration = Duration::from_secs(60);
/// How long a request for a file this node's staging will fetch, but has not started, waits for
/// it to start (the chain's next node asks before this one got to that file).
pub const NOT_YET: Duration = Duration::from_secs(600);
const READ_BYTES: usize = 1 << 20;

/// What a token may read here: file sha256 -> the source path (the model's own file, with its
/// size) or `None` (from the cache).
pub struct Grant {
    pub deployment: String,
    pub uid: String,
    pub generation: u64,
    pub files: HashMap<String, Option<(PathBuf, u64)>>,
    pub expires: Instant,
}

#[derive(Default)]
pub struct Grants {
    /// By the SHA-256 of the token (a lookup does not time the token itself).
    by_token: HashMap<[u8; 32], Grant>,
}

fn token_key(t: &str) -> [u8; 32] {
    Sha256::digest(t.as_bytes()).into()
}

impl Grants {
    pub fn insert(&mut self, token: &str, g: Grant) {
        let now = Instant::now();
        self.by_token.retain(|_, g| g.expires > now);
        if self.by_token.len() >= MAX_GRANTS
            && let Some(k) = self.by_token.iter().min_by_key(|(_, g)| g.expires).map(|(k, _)| *k)
        {
            self.by_token.remove(&k);
        }
        match self.by_token.get_mut(&token_key(token)) {
            Some(old) => {
                old.files.extend(g.files);
                old.expires = g.expires;
            }
            None => {
                self.by_token.insert(token_key(token), g);
            }
        }
    }

    /// Ends the grants of `deployment` below generation `below` (0: every one), and those of any
    /// incarnation but `keep_uid` (when not empty).
    pub fn end(&mut self, deployment: &str, keep_uid: &str, below: u64) {
        self.by_token.retain(|_, g| {
            let stale = below == 0 || g.generation < below || (!keep_uid.is_empty() && g.uid != keep_uid);
            !(g.deployment == deployment && stale)
        });
    }

    /// What `token` may read of `sha`; a use keeps the grant alive (a staging may take hours).
    fn lookup(&mut self, token: &str, sha: &str) -> Option<Option<(PathBuf, u64)>> {
        let now = Instant::now();
        let g = self.by_token.get_mut(&token_key(token)).filter(|g| g.expires > now)?;
        let f = g.files.get(sha).cloned()?;
        g.expires = now + GRANT_TTL;
        Some(f)
    }
}

#[derive(Clone)]
pub struct ServeState {
    pub cache: Arc<Cache>,
    pub grants: Arc<std::sync::Mutex<Grants>>,
    pub serving: Arc<tokio::sync::Semaphore>,
    pub served_bytes: prometheus_client::metrics::counter::Counter,
}

pub fn router(state: ServeState) -> axum::Router {
    axum::Router::new().route("/v1/blobs/{sha}", axum::routing::get(blob)).with_state(state)
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, msg.into()).into_response()
}

/// `bytes=START-` or `bytes=START-END` (inclusive), as (start, end exclusive).
fn parse_range(h: Option<&str>, size: u64) -> Result<(u64, u64), String> {
    let Some(h) = h else { return Ok((0, size)) };
    let spec = h.strip_prefix("bytes=").ok_or_else(|| format!("range {h:?}: only bytes=START-[END]"))?;
    let (a, b) = spec.split_once('-').ok_or_else(|| format!("range {h:?}: only bytes=START-[END]"))?;
    let start: u64 = a.parse().map_err(|_| format!("range {h:?}: bad start"))?;
    let end: u64 = if b.is_empty() { size } else { b.parse::<u64>().map_err(|_| format!("range {h:?}: bad end"))? + 1 };
    if start > end || end > size {
        return Err(format!("range {h:?} is outside the file's {size} bytes"));
    }
    Ok((start, end))
}

async fn blob(State(st): State<ServeState>, Path(sha): Path<String>, headers: HeaderMap) -> Response {
    if sha.len() != 64 || !sha.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
        return err(StatusCode::BAD_REQUEST, "the file is named by its sha256 in lowercase hex");
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let granted = || st.grants.lock().expect("lock").lookup(token, &sha);
    let Some(source) = granted() else {
        return err(StatusCode::UNAUTHORIZED, "no staging of this node grants this token that file");
    };
    let Ok(permit) = st.serving.clone().try_acquire_owned() else {
        return err(StatusCode::SERVICE_UNAVAILABLE, "serving too many transfers; try another source");
    };
    // Where the bytes are: the model's own file (the source), a whole blob, or a file growing here
    // (waiting for this node's staging to get to it, while the grant lasts).
    let waited = Instant::now();
    let (file, size, growing) = loop {
        if let Some((p, size)) = &source {
            match std::fs::File::open(p) {
                Ok(f) => break (f, *size, None),
                Err(e) => return err(StatusCode::NOT_FOUND, format!("cannot open it here: {e}")),
            }
        }
        if let Ok(f) = std::fs::File::open(st.cache.blob(&sha))
            && let Ok(m) = f.metadata()
        {
            break (f, m.len(), None);
        }
        if let Some(rx) = st.cache.growing(&sha)
            && let Ok(f) = std::fs::File::open(st.cache.partial(&sha))
        {
            break (f, u64::MAX, Some(rx));
        }
        if granted().is_none() {
            return err(StatusCode::UNAUTHORIZED, "the staging that granted this file ended");
        }
        if waited.elapsed() > NOT_YET {
            return err(StatusCode::SERVICE_UNAVAILABLE, "this node has not started on that file; try another source");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let full = if growing.is_some() { None } else { Some(size) };
    let range_h = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    // A growing file's size is the one the client asks up to (it knows it from the manifest).
    let (start, end) = match full {
        Some(size) => match parse_range(range_h, size) {
            Ok(r) => r,
            Err(e) => return err(StatusCode::RANGE_NOT_SATISFIABLE, e),
        },
        None => match parse_range(range_h, u64::MAX - 1) {
            Ok((s, e)) if e < u64::MAX - 1 => (s, e),
            Ok(_) => {
                return err(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "a file still arriving here is served by bytes=START-END only",
                );
            }
            Err(e) => return err(StatusCode::RANGE_NOT_SATISFIABLE, e),
        },
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let served = st.served_bytes.clone();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        send_file(file, start, end, growing, tx, &served, &handle);
    });
    let mut resp = Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)));
    *resp.status_mut() = if range_h.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    resp.headers_mut().insert(header::CONTENT_LENGTH, (end - start).into());
    resp
}

/// Reads `[start, end)` of `file` into `tx`; a growing file is read only as far as it is checked.
fn send_file(
    mut file: std::fs::File,
    start: u64,
    end: u64,
    mut growing: Option<tokio::sync::watch::Receiver<Have>>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    served: &prometheus_client::metrics::counter::Counter,
    handle: &tokio::runtime::Handle,
) {
    if file.seek(std::io::SeekFrom::Start(start)).is_err() {
        return;
    }
    let mut pos = start;
    while pos < end {
        // How far may we read?
        let limit = match growing.as_mut() {
            None => end,
            Some(rx) => {
                let have = loop {
                    let h = *rx.borrow_and_update();
                    match h {
                        Have::Whole => break end,
                        Have::Prefix(n) if n > pos => break n.min(end),
                        Have::Stopped(n) => break n.min(end),
                        Have::Prefix(_) => {}
                    }
                    let changed = handle.block_on(async { tokio::time::timeout(STALL, rx.changed()).await });
                    match changed {
                        Ok(Ok(())) => continue,
                        // The fetch ended (finished, the claim dropped) or stalled: serve what is there.
                        Ok(Err(_)) => break file.metadata().map(|m| m.len()).unwrap_or(pos).min(end),
                        Err(_) => return,
                    }
                };
                if have <= pos {
                    return; // stopped short: the client tries its next source
                }
                have
            }
        };
        let n = (limit - pos).min(READ_BYTES as u64) as usize;
        let mut buf = vec![0u8; n];
        if let Err(e) = file.read_exact(&mut buf) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        pos += n as u64;
        served.inc_by(n as u64);
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok((0, 10)));
        assert_eq!(parse_range(Some("bytes=4-"), 10), Ok((4, 10)));
        assert_eq!(parse_range(Some("bytes=4-5"), 10), Ok((4, 6)));
        assert!(parse_range(Some("bytes=4-10"), 10).is_err());
        assert!(parse_range(Some("bytes=-5"), 10).is_err());
        assert!(parse_range(Some("items=1-"), 10).is_err());
    }

    #[test]
    fn grants_are_per_token_file_and_end_with_their_generation() {
        let mut g = Grants::default();
        let files = |s: &str| [(s.to_string(), None)].into_iter().collect();
        g.insert(
            "t1",
            Grant {
                deployment: "a".into(),
                uid: String::new(),
                generation: 1,
                files: files("x"),
                expires: Instant::now() + GRANT_TTL,
            },
        );
        g.insert(
            "t2",
            Grant {
                deployment: "b".into(),
                uid: String::new(),
                generation: 1,
                files: files("y"),
                expires: Instant::now() + GRANT_TTL,
            },
        );
        assert!(g.lookup("t1", "x").is_some());
        assert!(g.lookup("t1", "y").is_none(), "a token reads only its own staging's files");
        assert!(g.lookup("t3", "x").is_none());
        g.end("a", "", 2);
        assert!(g.lookup("t1", "x").is_none());
        assert!(g.lookup("t2", "y").is_some());
    }
}
