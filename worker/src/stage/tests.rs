//! Fetching over real HTTP on loopback: a source, a peer, a receiver, each with its own cache and
//! transfer server.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sha2::{Digest, Sha256};
use tessera_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::cache::{Cache, Have};
use super::fetch::{self, Counters, Limit};
use super::serve::{self, Grant, Grants, ServeState};

const CB: usize = 4096;

struct Node {
    _dir: tempfile::TempDir,
    cache: Arc<Cache>,
    grants: Arc<std::sync::Mutex<Grants>>,
    port: u16,
    served: prometheus_client::metrics::counter::Counter,
}

async fn node() -> Node {
    let dir = tempfile::tempdir().expect("tmp");
    let cache = Cache::open(dir.path().join("cache"), 0).expect("cache");
    let grants = Arc::new(std::sync::Mutex::new(Grants::default()));
    let served = prometheus_client::metrics::counter::Counter::default();
    let state = ServeState {
        cache: cache.clone(),
        grants: grants.clone(),
        serving: Arc::new(tokio::sync::Semaphore::new(4)),
        served_bytes: served.clone(),
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(l, serve::router(state)).await });
    Node { _dir: dir, cache, grants, port, served }
}

fn data() -> Vec<u8> {
    (0..(5 * CB + 100) as u32).map(|i| (i * 7 % 253) as u8).collect()
}

fn file(d: &[u8]) -> pb::ModelFile {
    pb::ModelFile {
        name: "model.safetensors".into(),
        size_bytes: d.len() as u64,
        sha256: Sha256::digest(d).to_vec(),
        chunk_bytes: CB as u64,
        chunk_sha256: d.chunks(CB).map(|c| Sha256::digest(c).to_vec()).collect(),
        ..Default::default()
    }
}

fn grant(n: &Node, sha: &str, path: Option<(std::path::PathBuf, u64)>) {
    let g = Grant {
        deployment: "d".into(),
        uid: String::new(),
        generation: 1,
        files: [(sha.to_string(), path)].into_iter().collect(),
        expires: tokio::time::Instant::now() + serve::GRANT_TTL,
    };
    n.grants.lock().expect("lock").insert("tok", g);
}

fn src(n: &Node, name: &str) -> pb::StageSource {
    pb::StageSource { node: name.into(), address: "127.0.0.1".into(), port: n.port as u32 }
}

#[tokio::test]
async fn a_corrupt_peer_copy_is_detected_and_the_chunk_comes_from_the_source() {
    let d = data();
    let f = file(&d);
    let sha = super::index::blob_id(&f);
    let (source, peer, me) = (node().await, node().await, node().await);
    // The source serves the model's own file; the peer has a copy with one byte flipped in chunk 2.
    let model = source._dir.path().join("model.safetensors");
    std::fs::write(&model, &d).expect("w");
    grant(&source, &sha, Some((model, d.len() as u64)));
    let mut bad = d.clone();
    bad[2 * CB + 10] ^= 1;
    std::fs::write(peer.cache.blob(&sha), &bad).expect("w");
    grant(&peer, &sha, None);
    let job = pb::StageFile { file: Some(f.clone()), sources: vec![src(&peer, "peer"), src(&source, "source")] };
    let c = Arc::new(Counters::default());
    fetch::fetch_file(&me.cache, "tok", &job, &c, &CancellationToken::new(), &Limit::new(0)).await.expect("fetched");
    assert_eq!(std::fs::read(me.cache.blob(&sha)).expect("blob"), d, "the cached copy is the source's");
    assert_eq!(c.refetched.load(Ordering::Relaxed), 1, "one bad chunk");
    assert_eq!(c.done.load(Ordering::Relaxed), d.len() as u64);
    // The two good chunks from the peer were kept: the rest came from the source.
    assert_eq!(source.served.get() as usize, d.len() - 2 * CB);
    assert!(!me.cache.partial(&sha).exists());
}

#[tokio::test]
async fn a_partial_file_resumes_after_its_last_good_chunk_and_a_wrong_token_gets_nothing() {
    let d = data();
    let f = file(&d);
    let sha = super::index::blob_id(&f);
    let (source, me) = (node().await, node().await);
    let model = source._dir.path().join("m");
    std::fs::write(&model, &d).expect("w");
    grant(&source, &sha, Some((model, d.len() as u64)));
    // Two whole chunks and a torn third, as a killed worker leaves them.
    std::fs::write(me.cache.partial(&sha), &d[..2 * CB + 300]).expect("w");
    let job = pb::StageFile { file: Some(f.clone()), sources: vec![src(&source, "source")] };
    let c = Arc::new(Counters::default());
    fetch::fetch_file(&me.cache, "tok", &job, &c, &CancellationToken::new(), &Limit::new(0)).await.expect("fetched");
    assert_eq!(std::fs::read(me.cache.blob(&sha)).expect("blob"), d);
    assert_eq!(c.fetched.load(Ordering::Relaxed) as usize, d.len() - 2 * CB, "only what was missing");

    let other = node().await;
    let c = Arc::new(Counters::default());
    let e = fetch::fetch_file(&other.cache, "not-the-token", &job, &c, &CancellationToken::new(), &Limit::new(0))
        .await
        .expect_err("refused");
    assert!(e.contains("401"), "{e}");
}

#[tokio::test]
async fn a_peer_serves_a_file_while_it_is_still_arriving() {
    let d = data();
    let f = file(&d);
    let sha = super::index::blob_id(&f);
    let (peer, me) = (node().await, node().await);
    grant(&peer, &sha, None);
    // The peer's own fetch, chunk by chunk.
    let claim = peer.cache.claim(&sha, 0).expect("claim");
    let (pc, dd, id) = (peer.cache.clone(), d.clone(), sha.clone());
    let writer = tokio::spawn(async move {
        for end in (CB..=dd.len()).step_by(CB).chain([dd.len()]) {
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            std::fs::write(pc.partial(&id), &dd[..end]).expect("w");
            claim.publish(Have::Prefix(end as u64));
        }
        super::cache::finish(&pc, &id).expect("finish");
        claim.publish(Have::Whole);
    });
    let job = pb::StageFile { file: Some(f.clone()), sources: vec![src(&peer, "peer")] };
    let c = Arc::new(Counters::default());
    fetch::fetch_file(&me.cache, "tok", &job, &c, &CancellationToken::new(), &Limit::new(0)).await.expect("fetched");
    writer.await.expect("writer");
    assert_eq!(std::fs::read(me.cache.blob(&sha)).expect("blob"), d);
    assert_eq!(c.fetched.load(Ordering::Relaxed) as usize, d.len(), "all of it from the peer, once");
}
