//! The head's durable state: what cannot be rebuilt from worker reports (deployment specs and
//! desired state, generations, restart counters, where each generation was placed), in one redb
//! file, `<data-dir>/state.redb`. Every write commits (fsync) before the call returns.
//!
//! A store written by a newer format, or a corrupt one, stops the head with an error naming the
//! file; it is never silently reset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tessera_common::plan::partition::Stage;
use tessera_common::plan::placement::RankPlacement;

/// The on-disk format this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DEPLOYMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("deployments");
/// Node id -> 1 when an operator drained it (admin state survives head restarts).
const DRAINED: TableDefinition<&str, u64> = TableDefinition::new("drained_nodes");
/// Node id -> SHA-256 of its credential (the secret itself is only on the node).
const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("node_credentials");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{path}: cannot open the state store: {message}; if the file is damaged, move it aside (the head will start empty and forget its deployments)"
    )]
    Open { path: PathBuf, message: String },
    #[error(
        "{path}: written in store format {found}, newer than this tessera-head reads ({FORMAT_VERSION}); run a newer tessera-head rather than lose state"
    )]
    Newer { path: PathBuf, found: u64 },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
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
    pub generation: u64,
    pub restarts: u32,
    /// Unix milliseconds of the restarts counted against max_restarts.
    pub restart_times_unix_ms: Vec<u64>,
    /// `failed` deployments stay failed after a head restart; everything else is resumed.
    pub failed: Option<String>,
    pub launch: Option<StoredLaunch>,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) `<dir>/state.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("state.redb");
        let p2 = path.clone();
        let open_err = move |e: &dyn std::fmt::Display| StoreError::Open { path: p2.clone(), message: e.to_string() };
        let db = Database::create(&path).map_err(|e| open_err(&e))?;
        let store = Store { db, path };
        let found = {
            let txn = store.db.begin_read().map_err(|e| open_err(&e))?;
            match txn.open_table(META) {
                Ok(t) => t.get("format_version").map_err(|e| open_err(&e))?.map(|v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(open_err(&e)),
            }
        };
        match found {
            Some(v) if v > FORMAT_VERSION => return Err(StoreError::Newer { path: store.path.clone(), found: v }),
            Some(_) => {}
            None => {
                let txn = store.db.begin_write().map_err(|e| open_err(&e))?;
                {
                    let mut t = txn.open_table(META).map_err(|e| open_err(&e))?;
                    t.insert("format_version", FORMAT_VERSION).map_err(|e| open_err(&e))?;
                    txn.open_table(DEPLOYMENTS).map_err(|e| open_err(&e))?;
                    txn.open_table(DRAINED).map_err(|e| open_err(&e))?;
                }
                txn.commit().map_err(|e| open_err(&e))?;
            }
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io { path: self.path.clone(), message: e.to_string() }
    }

    /// Writes one deployment durably.
    pub fn put(&self, d: &StoredDeployment) -> Result<(), StoreError> {
        let data = serde_json::to_vec(d).map_err(|e| self.io(e))?;
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut t = txn.open_table(DEPLOYMENTS).map_err(|e| self.io(e))?;
            t.insert(d.name.as_str(), data.as_slice()).map_err(|e| self.io(e))?;
        }
        txn.commit().map_err(|e| self.io(e))
    }

    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut t = txn.open_table(DEPLOYMENTS).map_err(|e| self.io(e))?;
            t.remove(name).map_err(|e| self.io(e))?;
        }
        txn.commit().map_err(|e| self.io(e))
    }

    /// Records whether an operator drained a node.
    pub fn set_drained(&self, node_id: &str, drained: bool) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut t = txn.open_table(DRAINED).map_err(|e| self.io(e))?;
            if drained {
                t.insert(node_id, 1).map_err(|e| self.io(e))?;
            } else {
                t.remove(node_id).map_err(|e| self.io(e))?;
            }
        }
        txn.commit().map_err(|e| self.io(e))
    }

    /// Records (or, with `None`, forgets) the hash of a node's credential.
    pub fn set_credential(&self, node_id: &str, hash: Option<&[u8]>) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut t = txn.open_table(CREDENTIALS).map_err(|e| self.io(e))?;
            match hash {
                Some(h) => t.insert(node_id, h).map(|_| ()).map_err(|e| self.io(e))?,
                None => t.remove(node_id).map(|_| ()).map_err(|e| self.io(e))?,
            }
        }
        txn.commit().map_err(|e| self.io(e))
    }

    /// Every node credential hash by node id.
    pub fn credentials(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = match txn.open_table(CREDENTIALS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.io(e))? {
            let (k, v) = item.map_err(|e| self.io(e))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Ids of the nodes an operator drained.
    pub fn drained(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = match txn.open_table(DRAINED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.io(e))? {
            let (k, _) = item.map_err(|e| self.io(e))?;
            out.push(k.value().to_string());
        }
        Ok(out)
    }

    pub fn load(&self) -> Result<Vec<StoredDeployment>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = txn.open_table(DEPLOYMENTS).map_err(|e| self.io(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.io(e))? {
            let (k, v) = item.map_err(|e| self.io(e))?;
            let d: StoredDeployment = serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                name: k.value().to_string(),
                message: e.to_string(),
            })?;
            out.push(d);
        }
        Ok(out)
    }
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
            let txn = s.db.begin_write().expect("txn");
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
}
