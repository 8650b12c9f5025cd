//! The head's durable state: what cannot be rebuilt from worker reports (deployment specs and
//! desired state, generations, restart counters, where each generation was placed), in one redb
//! file, `<data-dir>/state.redb`. Every write commits (fsync) before the call returns.
//!
//! A store written by a newer format, or a corrupt one, stops the head with an error naming the
//! file; it is never silently reset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

pub mod etcd;
use serde::{Deserialize, Serialize};
use tessera_common::plan::partition::Stage;
use tessera_common::plan::placement::RankPlacement;

/// The on-disk format this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
/// Node id -> 1 when an operator drained it (admin state survives head restarts).
const DRAINED: TableDefinition<&str, u64> = TableDefinition::new("drained_nodes");
/// Node id -> 1 when an operator approved it (`--node-approval manual`).
const APPROVED: TableDefinition<&str, u64> = TableDefinition::new("approved_nodes");
/// SHA-256 (hex) of a bootstrap join token -> its record (JSON: expiry, uses left).
const BOOTSTRAP: TableDefinition<&str, &[u8]> = TableDefinition::new("bootstrap_tokens");
/// Node id -> SHA-256 of its credential (the secret itself is only on the node).
const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("node_credentials");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{path}: cannot open the state store: {message}. Restore it from a backup, or start the head once with \
         --reset-state to move it aside and start empty (every deployment is forgotten; engines still running \
         are stopped as unknown)"
    )]
    Open { path: PathBuf, message: String },
    #[error(
        "{path}: written in store format {found}, newer than this tessera-head reads ({FORMAT_VERSION}); run a newer tessera-head rather than lose state"
    )]
    Newer { path: PathBuf, found: u64 },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "{path}: this head no longer leads ({message}); nothing was written. The leading head acts; this one \
         stops acting"
    )]
    Fenced { path: PathBuf, message: String },
    #[error("{path}: the record of deployment {name:?} is corrupt: {message}")]
    Corrupt { path: PathBuf, name: String, message: String },
}

/// One process of a launch, as planned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredProcess {
    pub key: String,
    pub node_id: String,
    pub node: String,
    pub ranks: Vec<u32>,
}

/// Where a generation runs (and which GPUs it holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredLaunch {
    pub gpus: Vec<String>,
    pub placement: Vec<RankPlacement>,
    pub stages: Vec<Stage>,
    pub processes: Vec<StoredProcess>,
    pub master_addr: String,
    pub master_port: u32,
    pub health_port: u32,
}

/// A short-lived join token (`tessera tokens create`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapToken {
    pub expires_unix_ms: u64,
    pub uses_left: u32,
}

/// A deployment as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDeployment {
    pub name: String,
    /// The incarnation (empty in records written before incarnations existed).
    #[serde(default)]
    pub uid: String,
    pub model_path: PathBuf,
    pub tp: u64,
    pub pp: u64,
    /// `vllm`, `command` or `probe`.
    pub engine: String,
    pub engine_args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub max_restarts: u32,
    pub command: String,
    pub per_node: bool,
    pub gpu_memory_utilization: f64,
    pub max_model_len: Option<u64>,
    /// Seconds; 0 in records written before the field existed (the default then applies).
    #[serde(default)]
    pub startup_timeout_s: u32,
    /// As in the API: 0 default, negative off.
    #[serde(default)]
    pub stall_timeout_s: i32,
    #[serde(default)]
    pub canary_interval_s: i32,
    #[serde(default)]
    pub drain_timeout_s: i32,
    /// 0 in records written before revisions existed (revision 1).
    #[serde(default)]
    pub revision: u32,
    /// The spec of the revision before (for a rollback).
    #[serde(default)]
    pub previous: Option<Box<StoredDeployment>>,
    /// Weight staging (false in records written before it existed: they ran without).
    #[serde(default)]
    pub staging: bool,
    /// `--model-from`: the node holding the model, and what it said of it.
    #[serde(default)]
    pub model_from: String,
    #[serde(default)]
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// `deployments-dir` for a deployment declared in the head's `--deployments DIR`.
    #[serde(default)]
    pub managed_by: String,
    #[serde(default)]
    pub described: Option<String>,
    pub generation: u64,
    pub restarts: u32,
    /// Unix milliseconds of the restarts counted against max_restarts.
    pub restart_times_unix_ms: Vec<u64>,
    /// `failed` deployments stay failed after a head restart; everything else is resumed.
    pub failed: Option<String>,
    pub launch: Option<StoredLaunch>,
}

type Opener = Box<dyn Fn() -> Result<Database, String> + Send + Sync>;

/// The tables of the store (redb tables; key prefixes `PREFIX/TABLE/` in etcd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Deployments,
    Drained,
    Approved,
    Bootstrap,
    Credentials,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Deployments => "deployments",
            Table::Drained => "drained_nodes",
            Table::Approved => "approved_nodes",
            Table::Bootstrap => "bootstrap_tokens",
            Table::Credentials => "node_credentials",
        }
    }

    /// A table of marks (a key is there or not; no value).
    fn is_mark(self) -> bool {
        matches!(self, Table::Drained | Table::Approved)
    }

    fn bytes(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Deployments => DEPLOYMENTS,
            Table::Bootstrap => BOOTSTRAP,
            _ => CREDENTIALS,
        }
    }

    fn marks(self) -> TableDefinition<'static, &'static str, u64> {
        if self == Table::Drained { DRAINED } else { APPROVED }
    }
}

/// Where the state lives: the embedded redb file (one head), or etcd (heads that take over from
/// each other).
enum Backend {
    Redb(Redb),
    Etcd(etcd::EtcdStore),
}

pub struct Store {
    backend: Backend,
    /// The file, or `etcd://MEMBERS/PREFIX`, for messages.
    path: PathBuf,
}

struct Redb {
    db: std::sync::RwLock<Database>,
    path: PathBuf,
    /// Opens the database again (after an I/O error, redb refuses every later call until then).
    reopen: Opener,
    /// A write failed: reopen before the next call, so the store recovers once the cause is gone.
    broken: std::sync::atomic::AtomicBool,
}

impl Store {
    /// Opens (or creates) `<dir>/state.redb`. An empty (0-byte), damaged or newer-format file
    /// stops here with an error naming it: it is never taken for an empty store.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("state.redb");
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
            return Err(StoreError::Open {
                path,
                message: "the file is empty (0 bytes): it was truncated, not written by a head".into(),
            });
        }
        let p = path.clone();
        let opener: Opener = Box::new(move || Database::create(&p).map_err(|e| e.to_string()));
        Self::open_with(path, opener)
    }

    /// Opens a store through `opener` (a file, or a test's storage backend).
    pub fn open_with(path: PathBuf, opener: Opener) -> Result<Store, StoreError> {
        let open_err = |message: String| StoreError::Open { path: path.clone(), message };
        let db = guard_panic(&opener).map_err(open_err)?.map_err(open_err)?;
        let redb =
            Redb { db: std::sync::RwLock::new(db), path: path.clone(), reopen: opener, broken: Default::default() };
        let found = redb
            .read(|txn| match txn.open_table(META) {
                Ok(t) => Ok(t.get("format_version").map_err(|e| e.to_string())?.map(|v| v.value())),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(e.to_string()),
            })
            .map_err(|e| open_err(e.to_string()))?;
        match found {
            Some(v) if v > FORMAT_VERSION => return Err(StoreError::Newer { path, found: v }),
            Some(_) => {}
            None => redb
                .write(|txn| {
                    let mut t = txn.open_table(META).map_err(|e| e.to_string())?;
                    t.insert("format_version", FORMAT_VERSION).map_err(|e| e.to_string())?;
                    drop(t);
                    txn.open_table(DEPLOYMENTS).map_err(|e| e.to_string())?;
                    txn.open_table(DRAINED).map_err(|e| e.to_string())?;
                    txn.open_table(CREDENTIALS).map_err(|e| e.to_string())?;
                    Ok(())
                })
                .map_err(|e| open_err(e.to_string()))?,
        }
        let store = Store { backend: Backend::Redb(redb), path: path.clone() };
        store.check_readable().map_err(|e| open_err(e.to_string()))?;
        Ok(store)
    }

    /// The store in etcd, under the client's prefix; writes are fenced by `fence` (only the
    /// leading head's go through). A newer format under the prefix is refused.
    pub fn etcd(client: crate::etcd::Etcd, fence: std::sync::Arc<crate::leader::Fence>) -> Result<Store, StoreError> {
        let path = PathBuf::from(format!("etcd://{}{}", client.endpoints(), client.config().prefix));
        let e = etcd::EtcdStore::open(client, fence, path.clone())?;
        let store = Store { backend: Backend::Etcd(e), path: path.clone() };
        store.check_readable().map_err(|e| StoreError::Open { path, message: e.to_string() })?;
        Ok(store)
    }

    /// Reads everything once: damage shows now, as an error naming the store, not later.
    fn check_readable(&self) -> Result<(), StoreError> {
        self.load()?;
        self.drained()?;
        self.credentials()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io { path: self.path.clone(), message: e.to_string() }
    }

    /// Sets (`Some`) or removes (`None`) one row, durably, before it returns.
    fn set(&self, table: Table, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.set(table, key, value),
            Backend::Etcd(e) => e.set(table, key, value),
        }
    }

    /// Every row of a table by key (values empty in tables of marks).
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.scan(table),
            Backend::Etcd(e) => e.scan(table),
        }
    }

    /// Whether this head may act: always on the embedded store; on etcd, while it leads.
    pub fn leads(&self) -> bool {
        match &self.backend {
            Backend::Redb(_) => true,
            Backend::Etcd(e) => e.leads(),
        }
    }

    /// Heads on etcd: writes `PREFIX/NAME` (what the heads share beside the tables, e.g. the
    /// tokens), fenced like every write; `false` on the embedded store, which shares nothing.
    pub fn put_shared(&self, name: &str, value: &[u8]) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Redb(_) => Ok(false),
            Backend::Etcd(e) => e.put_key(name, value).map(|()| true),
        }
    }

    /// Writes one deployment durably.
    pub fn put(&self, d: &StoredDeployment) -> Result<(), StoreError> {
        let data = serde_json::to_vec(d).map_err(|e| self.io(e))?;
        self.set(Table::Deployments, &d.name, Some(&data))
    }

    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        self.set(Table::Deployments, name, None)
    }

    /// Records whether an operator drained a node.
    pub fn set_drained(&self, node_id: &str, drained: bool) -> Result<(), StoreError> {
        self.set(Table::Drained, node_id, drained.then_some(&[][..]))
    }

    /// Records (or, with `None`, forgets) the hash of a node's credential.
    pub fn set_credential(&self, node_id: &str, hash: Option<&[u8]>) -> Result<(), StoreError> {
        self.set(Table::Credentials, node_id, hash)
    }

    /// Every node credential hash by node id.
    pub fn credentials(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan(Table::Credentials)
    }

    /// Records (or, with `None`, forgets) a bootstrap token by the hex SHA-256 of the token.
    pub fn set_bootstrap(&self, hash: &str, record: Option<&BootstrapToken>) -> Result<(), StoreError> {
        let data = record.map(serde_json::to_vec).transpose().map_err(|e| self.io(e))?;
        self.set(Table::Bootstrap, hash, data.as_deref())
    }

    /// Every bootstrap token record, by hash (damaged records are skipped).
    pub fn bootstrap_tokens(&self) -> Result<Vec<(String, BootstrapToken)>, StoreError> {
        let raw = self.scan(Table::Bootstrap)?;
        Ok(raw.into_iter().filter_map(|(k, v)| Some((k, serde_json::from_slice(&v).ok()?))).collect())
    }

    /// Records (or forgets) an operator's approval of a node.
    pub fn set_approved(&self, node_id: &str, approved: bool) -> Result<(), StoreError> {
        self.set(Table::Approved, node_id, approved.then_some(&[][..]))
    }

    /// Ids of the nodes an operator approved.
    pub fn approved(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.scan(Table::Approved)?.into_iter().map(|(k, _)| k).collect())
    }

    /// Ids of the nodes an operator drained.
    pub fn drained(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.scan(Table::Drained)?.into_iter().map(|(k, _)| k).collect())
    }

    pub fn load(&self) -> Result<Vec<StoredDeployment>, StoreError> {
        let raw = self.scan(Table::Deployments)?;
        raw.into_iter()
            .map(|(name, v)| {
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    name,
                    message: e.to_string(),
                })
            })
            .collect()
    }
}

impl Redb {
    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io { path: self.path.clone(), message: e.to_string() }
    }

    /// After a failed write, opens the database again (redb refuses every call after an I/O
    /// error until it is reopened).
    fn recover(&self) -> Result<(), StoreError> {
        if !self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        let fresh = guard_panic(|| (self.reopen)()).map_err(|e| self.io(e))?.map_err(|e| self.io(e))?;
        *db = fresh;
        self.broken.store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(path = %self.path.display(), "the state store was reopened after an I/O error");
        Ok(())
    }

    /// One write transaction, committed (fsync) before it returns; on any failure nothing of it
    /// is kept and the store is reopened before the next call.
    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), String>) -> Result<(), StoreError> {
        self.recover()?;
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        let r = guard_panic(|| -> Result<(), String> {
            let txn = db.begin_write().map_err(|e| e.to_string())?;
            f(&txn)?;
            txn.commit().map_err(|e| e.to_string())
        });
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) | Err(e) => {
                self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(self.io(e))
            }
        }
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, String>) -> Result<T, StoreError> {
        self.recover()?;
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        match guard_panic(|| -> Result<T, String> {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            f(&txn)
        }) {
            Ok(r) => r.map_err(|e| self.io(e)),
            Err(e) => Err(self.io(e)),
        }
    }

    fn set(&self, table: Table, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        self.write(|txn| {
            if table.is_mark() {
                let mut t = txn.open_table(table.marks()).map_err(|e| e.to_string())?;
                match value {
                    Some(_) => t.insert(key, 1).map(|_| ()),
                    None => t.remove(key).map(|_| ()),
                }
                .map_err(|e| e.to_string())
            } else {
                let mut t = txn.open_table(table.bytes()).map_err(|e| e.to_string())?;
                match value {
                    Some(v) => t.insert(key, v).map(|_| ()),
                    None => t.remove(key).map(|_| ()),
                }
                .map_err(|e| e.to_string())
            }
        })
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if table.is_mark() {
            self.read_all(table.marks(), |k, _| (k.to_string(), Vec::new()))
        } else {
            self.read_all(table.bytes(), |k, v| (k.to_string(), v.to_vec()))
        }
    }

    /// Every row of a table keyed by name (none when the table does not exist yet).
    fn read_all<V: redb::Value + 'static, T>(
        &self,
        def: TableDefinition<&'static str, V>,
        row: impl Fn(&str, V::SelfType<'_>) -> T,
    ) -> Result<Vec<T>, StoreError> {
        self.read(|txn| {
            let t = match txn.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.to_string()),
            };
            let mut out = Vec::new();
            for item in t.iter().map_err(|e| e.to_string())? {
                let (k, v) = item.map_err(|e| e.to_string())?;
                out.push(row(k.value(), v.value()));
            }
            Ok(out)
        })
    }
}

/// Runs `f`, turning a panic inside the storage engine (a damaged file can make redb panic) into
/// an error: the head stops with a message naming the file, never with a panic.
fn guard_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown".into());
        format!("the storage engine failed on damaged data ({what})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(name: &str) -> StoredDeployment {
        StoredDeployment {
            name: name.into(),
            uid: String::new(),
            model_path: "/m".into(),
            tp: 4,
            pp: 2,
            engine: "probe".into(),
            engine_args: vec![],
            env: BTreeMap::new(),
            max_restarts: 5,
            command: String::new(),
            per_node: false,
            gpu_memory_utilization: 0.9,
            max_model_len: None,
            startup_timeout_s: 0,
            stall_timeout_s: 0,
            canary_interval_s: 0,
            drain_timeout_s: 0,
            revision: 0,
            previous: None,
            staging: false,
            model_from: String::new(),
            node_selector: Default::default(),
            managed_by: String::new(),
            described: None,
            generation: 3,
            restarts: 2,
            restart_times_unix_ms: vec![1, 2],
            failed: None,
            launch: None,
        }
    }

    #[test]
    fn deployments_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            s.put(&dep("a")).expect("put");
            s.put(&dep("b")).expect("put");
            s.remove("a").expect("remove");
        }
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.load().expect("load"), vec![dep("b")]);
    }

    #[test]
    fn node_credentials_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            s.set_credential("n1", Some(b"hash-1")).expect("put");
            s.set_credential("n2", Some(b"hash-2")).expect("put");
            s.set_credential("n2", None).expect("forget");
        }
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.credentials().expect("read"), vec![("n1".to_string(), b"hash-1".to_vec())]);
    }

    #[test]
    fn drained_marks_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            s.set_drained("n1", true).expect("drain");
            s.set_drained("n2", true).expect("drain");
            s.set_drained("n2", false).expect("undrain");
        }
        assert_eq!(Store::open(dir.path()).expect("reopen").drained().expect("read"), vec!["n1".to_string()]);
    }

    #[test]
    fn a_newer_or_corrupt_store_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            let Backend::Redb(r) = &s.backend else { unreachable!("a file store") };
            let db = r.db.read().expect("lock");
            let txn = db.begin_write().expect("txn");
            txn.open_table(META).expect("meta").insert("format_version", FORMAT_VERSION + 1).expect("insert");
            txn.commit().expect("commit");
        }
        let e = Store::open(dir.path()).err().expect("newer format refused");
        assert!(matches!(e, StoreError::Newer { .. }), "{e}");
        assert!(e.to_string().contains("state.redb"), "{e}");

        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("state.redb"),
            b"definitely not a database, but long enough to look like one...",
        )
        .expect("write");
        let e = Store::open(dir.path()).err().expect("corrupt refused");
        assert!(e.to_string().contains("state.redb") && e.to_string().contains("cannot open"), "{e}");
    }

    #[test]
    fn an_empty_or_truncated_store_is_an_error_never_a_panic_or_an_empty_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("state.redb"), b"").expect("write");
        let e = Store::open(dir.path()).err().expect("0 bytes refused");
        assert!(e.to_string().contains("empty (0 bytes)") && e.to_string().contains("--reset-state"), "{e}");

        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            for i in 0..50 {
                s.put(&dep(&format!("d{i}"))).expect("put");
            }
        }
        let p = dir.path().join("state.redb");
        let full = std::fs::read(&p).expect("read");
        for cut in [full.len() / 2, full.len() / 3, 4096.min(full.len() - 1)] {
            std::fs::write(&p, &full[..cut]).expect("truncate");
            match Store::open(dir.path()) {
                Err(e) => assert!(e.to_string().contains("state.redb"), "{e}"),
                // redb may repair a torn file; then what it kept must read back.
                Ok(s) => drop(s.load().expect("a repaired store reads")),
            }
        }
        // Flipped bits in the middle of the data.
        let mut flipped = full.clone();
        for b in flipped.iter_mut().skip(full.len() / 2).take(256) {
            *b ^= 0xa5;
        }
        std::fs::write(&p, &flipped).expect("write");
        if let Err(e) = Store::open(dir.path()) {
            assert!(e.to_string().contains("state.redb"), "{e}");
        }
    }

    /// Storage that fails every write while `fail` is set (a full disk), in memory.
    #[derive(Debug, Clone)]
    struct Flaky {
        inner: std::sync::Arc<redb::backends::InMemoryBackend>,
        fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
            self.inner.read(offset, len)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    impl Flaky {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(28)) // ENOSPC
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn after_an_io_error_the_store_recovers_once_the_cause_is_gone() {
        let backend = Flaky { inner: Default::default(), fail: Default::default() };
        let b = backend.clone();
        let opener: Opener =
            Box::new(move || Database::builder().create_with_backend(b.clone()).map_err(|e| e.to_string()));
        let s = Store::open_with("mem/state.redb".into(), opener).expect("open");
        s.put(&dep("a")).expect("put a");
        backend.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = s.put(&dep("b")).expect_err("disk full");
        assert!(e.to_string().contains("state.redb"), "{e}");
        assert!(s.remove("a").is_err(), "still full: the delete is refused, not half done");
        backend.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        s.put(&dep("c")).expect("writes work again once space is back");
        let names: Vec<String> = s.load().expect("load").into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["a", "c"], "nothing of the failed writes was kept, and the refused delete changed nothing");
    }
}
