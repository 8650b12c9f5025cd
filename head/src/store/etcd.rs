//! The store in etcd (`--store etcd://...`): each row is a key `PREFIX/TABLE/KEY` holding the
//! same bytes as the redb row. Every write is one transaction that goes through only while the
//! leadership key still has this head's epoch as its create revision: a deposed head, even one
//! that does not know yet that it was deposed, can never write.

use std::path::PathBuf;
use std::sync::Arc;

use tessera_proto::etcd::etcdserverpb as epb;

use super::{FORMAT_VERSION, StoreError, Table};
use crate::etcd::{Etcd, ops};
use crate::leader::{Fence, leader_key};

pub struct EtcdStore {
    client: Etcd,
    fence: Arc<Fence>,
    path: PathBuf,
}

impl EtcdStore {
    /// Checks (and on first use records) the format under the prefix.
    pub fn open(client: Etcd, fence: Arc<Fence>, path: PathBuf) -> Result<EtcdStore, StoreError> {
        let store = EtcdStore { client, fence, path };
        let key = store.key("format_version");
        let io = |e: crate::etcd::EtcdError| StoreError::Open { path: store.path.clone(), message: e.to_string() };
        let r = store
            .client
            .txn_blocking(epb::TxnRequest {
                compare: vec![ops::created_at(key.clone(), 0)],
                success: vec![ops::put(key.clone(), FORMAT_VERSION.to_string().into_bytes(), 0)],
                failure: vec![ops::get(key)],
            })
            .map_err(io)?;
        if !r.succeeded {
            let found = ops::first_kv(&r).map(|kv| String::from_utf8_lossy(&kv.value).into_owned()).unwrap_or_default();
            match found.trim().parse::<u64>() {
                Ok(v) if v > FORMAT_VERSION => return Err(StoreError::Newer { path: store.path.clone(), found: v }),
                Ok(_) => {}
                Err(_) => {
                    return Err(StoreError::Open {
                        path: store.path.clone(),
                        message: format!(
                            "{}format_version holds {found:?}, not a number: the prefix is used by something else; pick another --etcd-prefix",
                            store.client.config().prefix
                        ),
                    });
                }
            }
        }
        Ok(store)
    }

    pub fn leads(&self) -> bool {
        self.fence.holds()
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.client.config().prefix).into_bytes()
    }

    fn table_prefix(&self, table: Table) -> Vec<u8> {
        self.key(&format!("{}/", table.name()))
    }

    pub fn set(&self, table: Table, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        let mut k = self.table_prefix(table);
        k.extend_from_slice(key.as_bytes());
        self.fenced_write(k, value)
    }

    /// `PREFIX/NAME` outside the tables.
    pub fn put_key(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.fenced_write(self.key(name), Some(value))
    }

    /// One put or delete, only while the leadership key has this head's epoch.
    fn fenced_write(&self, k: Vec<u8>, value: Option<&[u8]>) -> Result<(), StoreError> {
        let fenced = |message: String| StoreError::Fenced { path: self.path.clone(), message };
        if !self.fence.holds() {
            return Err(fenced(self.fence.why().unwrap_or_else(|| "its leadership lease ran out".into())));
        }
        let op = match value {
            Some(v) => ops::put(k, v.to_vec(), 0),
            None => ops::delete(k),
        };
        let prefix = self.client.config().prefix.clone();
        let r = self
            .client
            .txn_blocking(epb::TxnRequest {
                compare: vec![ops::created_at(leader_key(&prefix), self.fence.epoch())],
                success: vec![op],
                failure: vec![],
            })
            .map_err(|e| StoreError::Io { path: self.path.clone(), message: e.to_string() })?;
        if !r.succeeded {
            let why = "the leadership key is no longer this head's (another head leads, or the lease expired)";
            self.fence.lose(why);
            return Err(fenced(why.into()));
        }
        Ok(())
    }

    pub fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = self.table_prefix(table);
        let kvs = self
            .client
            .range_prefix_blocking(&prefix)
            .map_err(|e| StoreError::Io { path: self.path.clone(), message: e.to_string() })?;
        kvs.into_iter()
            .map(|kv| {
                let k = String::from_utf8(kv.key[prefix.len()..].to_vec()).map_err(|_| StoreError::Io {
                    path: self.path.clone(),
                    message: format!("a key under {} is not UTF-8", String::from_utf8_lossy(&prefix)),
                })?;
                Ok((k, kv.value))
            })
            .collect()
    }
}
