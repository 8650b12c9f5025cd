//! The node's model cache: content-addressed files, shared by every deployment.
//!
//! ```text
//! CACHE/blobs/<sha256>      complete, checked files (read-only once there)
//! CACHE/partial/<sha256>    files being fetched: a prefix of whole checked chunks (resumed)
//! CACHE/models/<key>/NAME   a model directory for engines: links to ../../blobs/<sha256>
//! ```
//! A blob's mtime is its last use (a staging that needed it): eviction under `--cache-max-bytes`
//! removes the least recently used blobs that no model directory of a running process or of a
//! staging in progress links to.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// How much of a file a node holds: checked bytes (a prefix), or the whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Have {
    Prefix(u64),
    Whole,
    /// The fetch stopped (error or cancel) at this prefix.
    Stopped(u64),
}

pub struct Cache {
    pub root: PathBuf,
    /// 0: no limit but the disk's free space.
    pub max_bytes: u64,
    /// Files being fetched here now: how much is checked, for peers that fetch from this node.
    growing: Mutex<HashMap<String, watch::Sender<Have>>>,
}

impl Cache {
    pub fn open(root: PathBuf, max_bytes: u64) -> std::io::Result<Arc<Cache>> {
        let c = Cache { root, max_bytes, growing: Mutex::new(HashMap::new()) };
        c.ensure_dirs()?;
        Ok(Arc::new(c))
    }

    /// Makes the cache's directories (again, when an operator emptied the cache).
    pub fn ensure_dirs(&self) -> std::io::Result<()> {
        let root = &self.root;
        for d in ["blobs", "partial", "models"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        // Engines may run as another user (--engine-user): they read the models and blobs.
        use std::os::unix::fs::PermissionsExt;
        for d in ["", "blobs", "models"] {
            let _ = std::fs::set_permissions(root.join(d), std::fs::Permissions::from_mode(0o755));
        }
        Ok(())
    }

    pub fn blob(&self, sha: &str) -> PathBuf {
        self.root.join("blobs").join(sha)
    }

    pub fn partial(&self, sha: &str) -> PathBuf {
        self.root.join("partial").join(sha)
    }

    pub fn model_dir(&self, key: &str) -> PathBuf {
        self.root.join("models").join(key)
    }

    /// Whether the whole blob is here (with the right size).
    pub fn has(&self, sha: &str, size: u64) -> bool {
        std::fs::metadata(self.blob(sha)).is_ok_and(|m| m.len() == size)
    }

    /// The progress of a file being fetched here, if it is.
    pub fn growing(&self, sha: &str) -> Option<watch::Receiver<Have>> {
        self.growing.lock().expect("lock").get(sha).map(|s| s.subscribe())
    }

    /// Claims the fetch of `sha`: `None` when another staging on this node fetches it already (wait
    /// on [`Cache::growing`] instead). The claim lasts until every clone of it is dropped (the
    /// writer thread holds one: a cancelled fetch's writer finishes before anyone else may start).
    pub fn claim(self: &Arc<Self>, sha: &str, start: u64) -> Option<Arc<Claim>> {
        let mut g = self.growing.lock().expect("lock");
        if g.contains_key(sha) {
            return None;
        }
        let (tx, _) = watch::channel(Have::Prefix(start));
        g.insert(sha.to_string(), tx.clone());
        Some(Arc::new(Claim { cache: self.clone(), sha: sha.to_string(), tx }))
    }

    /// Marks a blob used now (eviction goes by least recent use).
    pub fn touch(&self, sha: &str) {
        if let Ok(f) = std::fs::File::options().append(true).open(self.blob(sha)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Bytes in blobs and partial files.
    pub fn used_bytes(&self) -> u64 {
        ["blobs", "partial"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.root.join(d)).ok())
            .flatten()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    /// Makes room for `need` more bytes under `max_bytes` (and on the disk), removing the least
    /// recently used blobs not in `keep` and model directories not in `keep_models`. Err says why
    /// it cannot.
    pub fn make_room(&self, need: u64, keep: &HashSet<String>, keep_models: &HashSet<String>) -> Result<u64, String> {
        let free = free_bytes(&self.root).unwrap_or(u64::MAX);
        let over = |used: u64| -> u64 {
            let by_max = if self.max_bytes > 0 { (used + need).saturating_sub(self.max_bytes) } else { 0 };
            // Leave 1 GiB of the disk free beside the cache.
            let by_disk = (need + (1 << 30)).saturating_sub(free);
            by_max.max(by_disk)
        };
        let used = self.used_bytes();
        let mut to_free = over(used);
        if to_free == 0 {
            return Ok(0);
        }
        // Model directories of nothing running go first (links only), then blobs by age.
        if let Ok(rd) = std::fs::read_dir(self.root.join("models")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !keep_models.contains(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let linked = self.linked_blobs();
        let mut blobs: Vec<(std::time::SystemTime, String, u64)> = std::fs::read_dir(self.root.join("blobs"))
            .map_err(|e| e.to_string())?
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, e.file_name().to_string_lossy().to_string(), m.len()))
            })
            .filter(|(_, sha, _)| !keep.contains(sha) && !linked.contains(sha))
            .collect();
        blobs.sort();
        let mut freed = 0;
        for (_, sha, len) in blobs {
            if to_free == 0 {
                break;
            }
            if std::fs::remove_file(self.blob(&sha)).is_ok() {
                tracing::info!(blob = %sha, bytes = len, "evicted from the model cache (least recently used)");
                freed += len;
                to_free = to_free.saturating_sub(len);
            }
        }
        if to_free > 0 {
            let limit = if self.max_bytes > 0 {
                format!("--cache-max-bytes {}", self.max_bytes)
            } else {
                format!("the disk's free space ({free} bytes)")
            };
            return Err(format!(
                "the model cache at {} cannot take {need} more bytes: {limit} leaves {to_free} bytes short after evicting every file no running deployment uses; raise the limit, free disk space, or delete deployments",
                self.root.display()
            ));
        }
        Ok(freed)
    }

    /// Blobs linked from the model directories that exist.
    fn linked_blobs(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        let Ok(rd) = std::fs::read_dir(self.root.join("models")) else { return out };
        for d in rd.flatten() {
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                if let Ok(t) = std::fs::read_link(f.path())
                    && let Some(n) = t.file_name()
                {
                    out.insert(n.to_string_lossy().to_string());
                }
            }
        }
        out
    }

    /// Makes the model directory `key` of `files` (name, sha256), all in blobs: links to the
    /// blobs, except a safetensors index (`*.safetensors.index.json`), which is written with only
    /// the tensors of the files that are here (vLLM refuses an index naming files it cannot find).
    pub fn make_model_dir(&self, key: &str, files: &[(String, String)]) -> Result<PathBuf, String> {
        let dir = self.model_dir(key);
        let complete = files.iter().all(|(n, sha)| {
            if is_index(n) {
                dir.join(n).is_file()
            } else {
                std::fs::read_link(dir.join(n)).is_ok_and(|t| t.ends_with(sha))
            }
        });
        if complete {
            return Ok(dir);
        }
        let tmp = self.root.join("models").join(format!(".{key}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let names: HashSet<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        for (name, sha) in files {
            if is_index(name)
                && let Some(text) = filtered_index(&self.blob(sha), &names)
            {
                std::fs::write(tmp.join(name), text).map_err(|e| format!("{}: {e}", tmp.join(name).display()))?;
                continue;
            }
            std::os::unix::fs::symlink(Path::new("../../blobs").join(sha), tmp.join(name))
                .map_err(|e| format!("{}: {e}", tmp.join(name).display()))?;
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(dir)
    }
}

fn is_index(name: &str) -> bool {
    name.ends_with(".safetensors.index.json")
}

/// A safetensors index with only the entries of its `weight_map` whose file is in `present`;
/// `None` when it is not an index this understands (it is then linked as it is).
fn filtered_index(path: &Path, present: &HashSet<&str>) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let mut v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let map = v.get_mut("weight_map")?.as_object_mut()?;
    map.retain(|_, f| f.as_str().is_some_and(|f| present.contains(f)));
    serde_json::to_string_pretty(&v).ok()
}

/// Free bytes on the filesystem holding `p`.
fn free_bytes(p: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(p).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// The fetch of one file, held by one staging of this node; peers see its checked prefix.
pub struct Claim {
    cache: Arc<Cache>,
    sha: String,
    tx: watch::Sender<Have>,
}

impl Claim {
    pub fn publish(&self, h: Have) {
        self.tx.send_replace(h);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let last = *self.tx.borrow();
        if let Have::Prefix(n) = last {
            self.tx.send_replace(Have::Stopped(n));
        }
        self.cache.growing.lock().expect("lock").remove(&self.sha);
    }
}

/// The length of the longest prefix of `path` made of whole chunks that match `chunks` (or of the
/// whole file when the last chunk matches); the rest is cut off.
pub fn checked_prefix(path: &Path, chunk_bytes: u64, chunks: &[Vec<u8>], size: u64) -> std::io::Result<u64> {
    let mut f = std::fs::File::options().read(true).write(true).create(true).truncate(false).open(path)?;
    let len = f.metadata()?.len();
    let mut good = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for want in chunks {
        let this = chunk_bytes.min(size - good);
        if good + this > len {
            break;
        }
        let mut h = Sha256::new();
        let mut left = this;
        f.seek(std::io::SeekFrom::Start(good))?;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            left -= n as u64;
        }
        if left > 0 || h.finalize().as_slice() != want.as_slice() {
            break;
        }
        good += this;
    }
    if len != good {
        f.set_len(good)?;
    }
    f.flush()?;
    Ok(good)
}

/// Moves a complete partial file into the blobs.
pub fn finish(cache: &Cache, sha: &str) -> std::io::Result<()> {
    let p = cache.partial(sha);
    std::fs::File::open(&p)?.sync_all()?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&p, cache.blob(sha))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks_of(data: &[u8], cb: usize) -> Vec<Vec<u8>> {
        data.chunks(cb).map(|c| Sha256::digest(c).to_vec()).collect()
    }

    #[test]
    fn checked_prefix_keeps_whole_good_chunks_only() {
        let d = tempfile::tempdir().expect("tmp");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let chunks = chunks_of(&data, 4096);
        let p = d.path().join("f");
        // Two whole chunks and part of a third.
        std::fs::write(&p, &data[..9000]).expect("w");
        assert_eq!(checked_prefix(&p, 4096, &chunks, data.len() as u64).expect("check"), 8192);
        assert_eq!(std::fs::metadata(&p).expect("m").len(), 8192);
        // A corrupt second chunk: only the first stays.
        let mut bad = data.clone();
        bad[5000] ^= 1;
        std::fs::write(&p, &bad).expect("w");
        assert_eq!(checked_prefix(&p, 4096, &chunks, data.len() as u64).expect("check"), 4096);
        // The whole file, its short last chunk included.
        std::fs::write(&p, &data).expect("w");
        assert_eq!(checked_prefix(&p, 4096, &chunks, data.len() as u64).expect("check"), data.len() as u64);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_unlinked_blobs() {
        let d = tempfile::tempdir().expect("tmp");
        let c = Cache::open(d.path().join("cache"), 3000).expect("open");
        for (i, sha) in ["a", "b", "c"].iter().enumerate() {
            std::fs::write(c.blob(sha), vec![0u8; 1000]).expect("w");
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            std::fs::File::options().append(true).open(c.blob(sha)).expect("o").set_modified(t).expect("t");
        }
        // "a" is the oldest but a model directory that runs links it: "b" goes.
        c.make_model_dir("m1", &[("x".into(), "a".into())]).expect("dir");
        let keep_models: HashSet<String> = ["m1".to_string()].into();
        assert_eq!(c.make_room(900, &HashSet::new(), &keep_models).expect("room"), 1000);
        assert!(c.blob("a").exists() && !c.blob("b").exists() && c.blob("c").exists());
        // Nothing else may go: "a" is linked, "c" is kept for the staging at hand.
        let keep: HashSet<String> = ["c".to_string()].into();
        let e = c.make_room(2500, &keep, &keep_models).expect_err("full");
        assert!(e.contains("--cache-max-bytes 3000"), "{e}");
    }

    #[test]
    fn a_staged_index_names_only_the_files_that_are_here() {
        let d = tempfile::tempdir().expect("tmp");
        let c = Cache::open(d.path().join("cache"), 0).expect("open");
        let index =
            r#"{"metadata": {"total_size": 3}, "weight_map": {"a.w": "m-1.safetensors", "b.w": "m-2.safetensors"}}"#;
        std::fs::write(c.blob("idx"), index).expect("w");
        std::fs::write(c.blob("two"), b"x").expect("w");
        let files =
            [("model.safetensors.index.json".to_string(), "idx".to_string()), ("m-2.safetensors".into(), "two".into())];
        let dir = c.make_model_dir("k", &files).expect("dir");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).expect("index"))
                .expect("json");
        assert_eq!(v["weight_map"], serde_json::json!({"b.w": "m-2.safetensors"}));
        assert_eq!(v["metadata"]["total_size"], 3);
        assert!(std::fs::read_link(dir.join("m-2.safetensors")).is_ok(), "weights are links to the blobs");
        // Made once: a second call finds it complete.
        assert_eq!(c.make_model_dir("k", &files).expect("again"), dir);
    }
}
