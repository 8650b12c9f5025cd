//! The worker's state directory: its node id, and a lock so that one directory serves one worker.
//!
//! Files: `node-id` (the UUID the head assigned, written atomically), `lock` (held with flock for
//! the life of the process).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use tessera_common::ids::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state dir {path}: {source}; pass --state-dir DIR with a directory this user can write")]
    Create { path: PathBuf, source: std::io::Error },
    #[error(
        "state dir {path} is in use by another running worker (lock {lock} is held); give each worker its own --state-dir"
    )]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {content:?} is not a node id (a UUID); delete the file to join as a new node")]
    BadNodeId { path: PathBuf, content: String },
}

/// An open, locked state directory.
pub struct StateDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    pub fn open(path: &Path) -> Result<Self, StateError> {
        tessera_common::files::private_dir(path)
            .map_err(|source| StateError::Create { path: path.to_path_buf(), source })?;
        let path = fs::canonicalize(path).map_err(|source| StateError::Io { path: path.to_path_buf(), source })?;
        let lock_path = path.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StateError::Io { path: lock_path.clone(), source })?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| StateError::Locked { path: path.clone(), lock: lock_path })?;
        Ok(StateDir { path, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn node_id_path(&self) -> PathBuf {
        self.path.join("node-id")
    }

    /// The node id from an earlier join, if any.
    pub fn node_id(&self) -> Result<Option<NodeId>, StateError> {
        let p = self.node_id_path();
        match fs::read_to_string(&p) {
            Ok(s) => s
                .trim()
                .parse::<NodeId>()
                .map(Some)
                .map_err(|_| StateError::BadNodeId { path: p, content: s.chars().take(64).collect() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path: p, source }),
        }
    }

    /// Persists the node id: write a temp file, fsync, rename, so a crash never leaves half a file.
    pub fn save_node_id(&self, id: NodeId) -> Result<(), StateError> {
        self.save("node-id", &id.to_string())
    }

    /// The node's credential from the head (`node.secret`), if it has one.
    pub fn node_secret(&self) -> Result<Option<String>, StateError> {
        let p = self.path.join("node.secret");
        match fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path: p, source }),
        }
    }

    /// Keeps the node's credential (0600: only this worker's user may read it).
    pub fn save_node_secret(&self, secret: &str) -> Result<(), StateError> {
        self.save("node.secret", secret)
    }

    /// Writes `name` atomically (temp file 0600, fsync, rename, fsync of the dir).
    fn save(&self, name: &str, value: &str) -> Result<(), StateError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.path.join(name);
        let tmp = self.path.join(format!("{name}.tmp"));
        let io = |source| StateError::Io { path: tmp.clone(), source };
        let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp).map_err(io)?;
        writeln!(f, "{value}").map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &p).map_err(|source| StateError::Io { path: p.clone(), source })?;
        if let Ok(dir) = File::open(&self.path) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Identifies this machine and this state dir: the same worker always sends the same value; a
    /// copy of the dir on another machine (or in another path) sends another.
    pub fn machine_fingerprint(&self) -> String {
        format!("{}:{}", machine_id(), self.path.display())
    }
}

/// `/etc/machine-id` where it exists (systemd hosts, most containers), else the host name.
pub fn machine_id() -> String {
    for p in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        if let Ok(s) = fs::read_to_string(p) {
            let s = s.trim();
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    hostname()
}

pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".to_string())
}

/// A valid node name made from the host name: lowercased, other characters replaced by '-'.
pub fn default_node_name() -> String {
    let h: String = hostname()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(63)
        .collect();
    let h = h.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_string();
    if h.is_empty() { "node".to_string() } else { h }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_persists_and_the_dir_is_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        assert_eq!(s.node_id().expect("read"), None);
        let id = NodeId::new_random();
        s.save_node_id(id).expect("save");
        assert_eq!(s.node_id().expect("read"), Some(id));

        let second = StateDir::open(dir.path());
        assert!(matches!(second, Err(StateError::Locked { .. })), "one worker per state dir");
        drop(s);
        let again = StateDir::open(dir.path()).expect("lock released with the first");
        assert_eq!(again.node_id().expect("read"), Some(id));
    }

    #[test]
    fn a_corrupt_node_id_is_an_error_that_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("node-id"), "garbage").expect("write");
        let s = StateDir::open(dir.path()).expect("open");
        let e = s.node_id().expect_err("corrupt").to_string();
        assert!(e.contains("node-id") && e.contains("garbage"), "{e}");
    }

    #[test]
    fn fingerprint_differs_by_path() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let sa = StateDir::open(a.path()).expect("open");
        let sb = StateDir::open(b.path()).expect("open");
        assert_ne!(sa.machine_fingerprint(), sb.machine_fingerprint());
        assert!(tessera_common::validate::node_name("n", &default_node_name()).is_ok());
    }
}
