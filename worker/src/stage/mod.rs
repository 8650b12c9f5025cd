//! Weight staging on a node: the model is read on one node (the source) and every other node of a
//! generation fetches, into its own content-addressed cache, only the files its pipeline stages
//! need, from the source or from a peer that has them already (see `proto/.../cluster.proto`).
//!
//! # Layout
//! - [`index`]: the source's side: which files a model has, their hashes (kept), what each holds.
//! - [`cache`]: the cache: blobs by sha256, partial files, model directories of links, eviction.
//! - [`serve`]: the transfer server (HTTP with range requests, per-staging bearer tokens).
//! - [`fetch`]: one file from its sources, every chunk checked, resumed after its last good chunk.

pub mod cache;
pub mod fetch;
pub mod index;
pub mod serve;
#[cfg(test)]
mod tests;

/// A model's `config.json` text and its weight sizes (JSON; empty without safetensors files).
fn describe(path: &std::path::Path) -> Result<(String, String), String> {
    use std::io::Read;
    let model = tessera_common::model::load_model(path).map_err(|e| e.to_string())?;
    let config = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    let f = tessera_common::model::load::open_regular(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut text = String::new();
    f.take(tessera_common::model::load::MAX_CONFIG_BYTES).read_to_string(&mut text).map_err(|e| e.to_string())?;
    let weights = match &model.weights {
        Some(w) => serde_json::to_string(w).map_err(|e| e.to_string())?,
        None => String::new(),
    };
    Ok((text, weights))
}

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tessera_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use cache::Cache;
use index::HashCache;
use serve::{Grant, Grants, ServeState};

/// The largest index sent to the head (sessions carry messages of at most 4 MiB).
pub const MAX_INDEX_BYTES: usize = 3 << 20;

/// Files fetched at once by one staging.
pub const PARALLEL_FILES: usize = 4;
/// How often progress goes to the head.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Byte counts for the worker's metrics.
#[derive(Clone, Default, Debug)]
pub struct StageCounters {
    pub served: prometheus_client::metrics::counter::Counter,
    pub fetched: prometheus_client::metrics::counter::Counter,
    pub refetched: prometheus_client::metrics::counter::Counter,
}

/// Settings, from the worker's flags.
#[derive(Debug, Clone)]
pub struct StageConfig {
    /// `--cache-dir`.
    pub cache_dir: PathBuf,
    /// `--cache-max-bytes` (0: no limit but the disk).
    pub max_bytes: u64,
    /// `--transfer-listen`.
    pub listen: SocketAddr,
    /// Where the source keeps its hashes.
    pub state_dir: PathBuf,
    /// `--transfer-max-rate`: bytes per second this node fetches at most (0: no limit).
    pub max_rate: u64,
}

struct Task {
    uid: String,
    generation: u64,
    cancel: CancellationToken,
    /// The model directory it makes (a staging), and its files: kept from eviction.
    key: String,
    blobs: Vec<String>,
    /// It ran to its end (its last report went out).
    finished: Arc<std::sync::atomic::AtomicBool>,
}

/// Model directories that live processes use (their keys): kept from eviction.
pub type InUse = Arc<dyn Fn() -> HashSet<String> + Send + Sync>;

#[derive(Clone)]
pub struct Stager {
    cache: Arc<Cache>,
    hashes: Arc<HashCache>,
    grants: Arc<Mutex<Grants>>,
    /// By (deployment, is the source's indexing).
    tasks: Arc<Mutex<HashMap<(String, bool), Task>>>,
    up: mpsc::UnboundedSender<pb::WorkerMessage>,
    port: u16,
    counters: StageCounters,
    in_use: InUse,
    limit: Arc<fetch::Limit>,
    /// Eviction and the making of model directories, one at a time.
    evict: Arc<Mutex<()>>,
}

impl Stager {
    /// Opens the cache and starts the transfer server. Must run inside the runtime.
    pub fn start(
        cfg: &StageConfig,
        up: mpsc::UnboundedSender<pb::WorkerMessage>,
        in_use: InUse,
        counters: StageCounters,
    ) -> Result<Stager, String> {
        let cache = Cache::open(cfg.cache_dir.clone(), cfg.max_bytes)
            .map_err(|e| format!("--cache-dir {}: {e}", cfg.cache_dir.display()))?;
        let _ = std::fs::create_dir_all(cfg.state_dir.join("stage"));
        let hashes = Arc::new(HashCache::open(cfg.state_dir.join("stage").join("hashes.json")));
        let listener = std::net::TcpListener::bind(cfg.listen)
            .map_err(|e| format!("--transfer-listen {}: cannot listen: {e}", cfg.listen))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let grants = Arc::new(Mutex::new(Grants::default()));
        let state = ServeState {
            cache: cache.clone(),
            grants: grants.clone(),
            serving: Arc::new(tokio::sync::Semaphore::new(serve::MAX_SERVING)),
            served_bytes: counters.served.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, serve::router(state)).await {
                warn!(error = %e, "the transfer server stopped");
            }
        });
        info!(port, cache = %cfg.cache_dir.display(), "model transfer server listening");
        Ok(Stager {
            cache,
            hashes,
            grants,
            tasks: Default::default(),
            up,
            port,
            counters,
            in_use,
            limit: Arc::new(fetch::Limit::new(cfg.max_rate)),
            evict: Default::default(),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts a task, replacing (cancelling) the deployment's older one; `None` when the same
    /// incarnation and generation runs already (the head told this node again after a session
    /// blip: the running task goes on).
    fn begin(
        &self,
        deployment: &str,
        index: bool,
        uid: &str,
        generation: u64,
        key: &str,
        blobs: Vec<String>,
    ) -> Option<(CancellationToken, Arc<std::sync::atomic::AtomicBool>)> {
        let mut tasks = self.tasks.lock().expect("lock");
        let k = (deployment.to_string(), index);
        let running = |t: &Task| {
            t.uid == uid
                && t.generation == generation
                && !t.cancel.is_cancelled()
                && !t.finished.load(Ordering::Relaxed)
        };
        if tasks.get(&k).is_some_and(running) {
            return None;
        }
        // A finished one is done again (from the cache: at once), so that its report, which may
        // have been lost with the session, goes out again.
        let cancel = CancellationToken::new();
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = Task {
            uid: uid.to_string(),
            generation,
            cancel: cancel.clone(),
            key: key.to_string(),
            blobs,
            finished: finished.clone(),
        };
        if let Some(old) = tasks.insert(k, task) {
            old.cancel.cancel();
        }
        Some((cancel, finished))
    }

    /// A task that failed is forgotten (the head stages the next generation afresh); one that
    /// finished stays until the head stops it, keeping its files from eviction meanwhile.
    fn failed(&self, deployment: &str, index: bool, cancel: &CancellationToken) {
        let mut t = self.tasks.lock().expect("lock");
        let k = (deployment.to_string(), index);
        if !cancel.is_cancelled() && t.get(&k).is_some_and(|t| !t.cancel.is_cancelled()) {
            t.remove(&k);
        }
    }

    /// Stops stagings and ends grants of `deployment`: every incarnation but `keep_uid` (when not
    /// empty), and generations below `below` (0: all).
    pub fn stop(&self, deployment: &str, keep_uid: &str, below: u64) {
        let mut t = self.tasks.lock().expect("lock");
        t.retain(|(d, _), task| {
            let stop = d == deployment
                && (below == 0 || task.generation < below || (!keep_uid.is_empty() && task.uid != keep_uid));
            if stop {
                task.cancel.cancel();
            }
            !stop
        });
        self.grants.lock().expect("lock").end(deployment, keep_uid, below);
    }

    /// The source's part: hash the model, answer with its files, serve them to the token.
    pub fn index(&self, m: pb::IndexModel) {
        let Some((cancel, finished)) = self.begin(&m.deployment, true, &m.deployment_uid, m.generation, "", Vec::new())
        else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let total = Arc::new(AtomicU64::new(0));
            let hashed = Arc::new(AtomicU64::new(0));
            let (hashes, path) = (me.hashes.clone(), PathBuf::from(&m.path));
            let (t2, h2) = (total.clone(), hashed.clone());
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stop2 = stop.clone();
            let mut job = tokio::task::spawn_blocking(move || index::index(&hashes, &path, &t2, &h2, &stop2));
            let msg = |files: Vec<pb::ModelFile>, done: bool, error: String| pb::ModelIndex {
                deployment: m.deployment.clone(),
                deployment_uid: m.deployment_uid.clone(),
                generation: m.generation,
                files,
                done,
                error,
                bytes_hashed: hashed.load(Ordering::Relaxed),
                bytes_total: total.load(Ordering::Relaxed),
            };
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.tick().await;
            let result = loop {
                tokio::select! {
                    _ = cancel.cancelled() => { stop.store(true, Ordering::Relaxed); return; }
                    _ = tick.tick() => me.send(pb::worker_message::Msg::ModelIndex(msg(Vec::new(), false, String::new()))),
                    r = &mut job => break r.map_err(|e| e.to_string()).and_then(|r| r),
                }
            };
            let ok = result.is_ok();
            let reply = match result {
                Ok(files) => {
                    let grant = Grant {
                        deployment: m.deployment.clone(),
                        uid: m.deployment_uid.clone(),
                        generation: m.generation,
                        files: files
                            .iter()
                            .map(|(f, p)| (index::blob_id(f), Some((p.clone(), f.size_bytes))))
                            .collect(),
                        expires: Instant::now() + serve::GRANT_TTL,
                    };
                    let reply = msg(files.iter().map(|(f, _)| f.clone()).collect(), true, String::new());
                    let size = prost::Message::encoded_len(&reply);
                    if size > MAX_INDEX_BYTES {
                        let why = format!(
                            "the model's index (file list and chunk hashes) is {size} bytes, more than the {MAX_INDEX_BYTES} a session message may carry; stage it in parts or use --staging off"
                        );
                        msg(Vec::new(), true, why)
                    } else {
                        me.grants.lock().expect("lock").insert(&m.token, grant);
                        info!(deployment = %m.deployment, files = files.len(), "model indexed; serving it to the staging's nodes");
                        reply
                    }
                }
                Err(e) => {
                    warn!(deployment = %m.deployment, error = %e, "cannot index the model");
                    msg(Vec::new(), true, e)
                }
            };
            if !cancel.is_cancelled() {
                me.send(pb::worker_message::Msg::ModelIndex(reply));
            }
            finished.store(true, Ordering::Relaxed);
            if !ok {
                me.failed(&m.deployment, true, &cancel);
            }
        });
    }

    /// A receiver's part: fetch the files, make the model directory, report progress.
    pub fn stage(&self, m: pb::StageModel) {
        let blobs = m.files.iter().filter_map(|f| f.file.as_ref()).map(index::blob_id).collect();
        let Some((cancel, finished)) = self.begin(&m.deployment, false, &m.deployment_uid, m.generation, &m.key, blobs)
        else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let counters = Arc::new(fetch::Counters::default());
            let needed: u64 = m.files.iter().filter_map(|f| f.file.as_ref()).map(|f| f.size_bytes).sum();
            let progress = |done: bool, error: String| pb::StageProgress {
                deployment: m.deployment.clone(),
                deployment_uid: m.deployment_uid.clone(),
                generation: m.generation,
                bytes_done: counters.done.load(Ordering::Relaxed).min(needed),
                bytes_needed: needed,
                files_done: counters.files_done.load(Ordering::Relaxed),
                files_needed: m.files.len() as u32,
                done,
                error,
                bytes_fetched: counters.fetched.load(Ordering::Relaxed),
                chunks_refetched: counters.refetched.load(Ordering::Relaxed),
            };
            let work = me.stage_files(&m, &counters, &cancel);
            tokio::pin!(work);
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.tick().await;
            let result = loop {
                tokio::select! {
                    _ = tick.tick() => me.send(pb::worker_message::Msg::StageProgress(progress(false, String::new()))),
                    r = &mut work => break r,
                }
            };
            me.counters.fetched.inc_by(counters.fetched.load(Ordering::Relaxed));
            me.counters.refetched.inc_by(counters.refetched.load(Ordering::Relaxed) as u64);
            if cancel.is_cancelled() {
                return;
            }
            finished.store(true, Ordering::Relaxed);
            match result {
                Ok(dir) => {
                    info!(deployment = %m.deployment, generation = m.generation, dir = %dir.display(), bytes = needed, "model staged");
                    me.send(pb::worker_message::Msg::StageProgress(progress(true, String::new())));
                }
                Err(e) => {
                    warn!(deployment = %m.deployment, generation = m.generation, error = %e, "staging failed");
                    me.send(pb::worker_message::Msg::StageProgress(progress(true, e)));
                    me.failed(&m.deployment, false, &cancel);
                }
            }
        });
    }

    async fn stage_files(
        &self,
        m: &pb::StageModel,
        c: &Arc<fetch::Counters>,
        cancel: &CancellationToken,
    ) -> Result<PathBuf, String> {
        if m.key.len() != 32 || !m.key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("model directory key {:?} is not 32 hex digits", m.key));
        }
        let mut names = HashSet::new();
        for f in &m.files {
            let file = f.file.as_ref().ok_or("a staged file without its description")?;
            fetch::check(file)?;
            if !names.insert(file.name.clone()) {
                return Err(format!("file {:?} is listed twice", file.name));
            }
        }
        let shas: Vec<(String, String)> =
            m.files.iter().filter_map(|f| f.file.as_ref()).map(|f| (f.name.clone(), index::blob_id(f))).collect();
        self.cache.ensure_dirs().map_err(|e| format!("the model cache at {}: {e}", self.cache.root.display()))?;
        // Peers may fetch these from here as they arrive.
        let grant = Grant {
            deployment: m.deployment.clone(),
            uid: m.deployment_uid.clone(),
            generation: m.generation,
            files: shas.iter().map(|(_, s)| (s.clone(), None)).collect(),
            expires: Instant::now() + serve::GRANT_TTL,
        };
        self.grants.lock().expect("lock").insert(&m.token, grant);
        // Room in the cache for what is not there yet.
        let need: u64 = m
            .files
            .iter()
            .filter_map(|f| f.file.as_ref())
            .filter(|f| !self.cache.has(&index::blob_id(f), f.size_bytes))
            .map(|f| f.size_bytes)
            .sum();
        // Kept from eviction: the files of every staging this node has (running, or finished and
        // not stopped yet: its generation may still be launching) and of every live process.
        let mut keep: HashSet<String> = shas.iter().map(|(_, s)| s.clone()).collect();
        let mut keep_models = (self.in_use)();
        for t in self.tasks.lock().expect("lock").values() {
            keep.extend(t.blobs.iter().cloned());
            keep_models.insert(t.key.clone());
        }
        let (cache, lock) = (self.cache.clone(), self.evict.clone());
        tokio::task::spawn_blocking(move || {
            let _one = lock.lock().expect("lock");
            cache.make_room(need, &keep, &keep_models)
        })
        .await
        .map_err(|e| e.to_string())??;
        let jobs: Vec<_> = m
            .files
            .iter()
            .map(|f| {
                let (cache, token, f, c, cancel, limit) =
                    (self.cache.clone(), m.token.clone(), f.clone(), c.clone(), cancel.clone(), self.limit.clone());
                async move { fetch::fetch_file(&cache, &token, &f, &c, &cancel, &limit).await }
            })
            .collect();
        let results: Vec<Result<(), String>> =
            futures_util::stream::iter(jobs).buffer_unordered(PARALLEL_FILES).collect().await;
        if let Some(e) = results.into_iter().find_map(|r| r.err()) {
            return Err(e);
        }
        let (cache, lock) = (self.cache.clone(), self.evict.clone());
        let key = m.key.clone();
        let sizes: Vec<u64> = m.files.iter().filter_map(|f| f.file.as_ref()).map(|f| f.size_bytes).collect();
        tokio::task::spawn_blocking(move || {
            let _one = lock.lock().expect("lock");
            // Every file must still be there (nothing evicted it meanwhile) before it is linked.
            if let Some((n, _)) = shas.iter().zip(&sizes).find(|((_, id), size)| !cache.has(id, **size)).map(|(f, _)| f)
            {
                return Err(format!("{n} left the cache before its model directory was made; staging again"));
            }
            cache.make_model_dir(&key, &shas)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The head asks for a model it cannot read (`--model-from` this node): its config as it is,
    /// and the weight sizes from its safetensors headers.
    pub fn describe(&self, m: pb::DescribeModel) {
        let me = self.clone();
        tokio::spawn(async move {
            let path = PathBuf::from(&m.path);
            let r =
                tokio::task::spawn_blocking(move || describe(&path)).await.map_err(|e| e.to_string()).and_then(|r| r);
            let mut out = pb::ModelDescription { request_id: m.request_id, ..Default::default() };
            match r {
                Ok((config, weights)) => {
                    out.config_json = config;
                    out.weights_json = weights;
                }
                Err(e) => out.error = e,
            }
            me.send(pb::worker_message::Msg::ModelDescription(out));
        });
    }

    fn send(&self, msg: pb::worker_message::Msg) {
        let _ = self.up.send(pb::WorkerMessage { msg: Some(msg) });
    }
}
