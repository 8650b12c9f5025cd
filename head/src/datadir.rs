//! The head's data dir is one head's: a lock (`DATA_DIR/lock`, flock, holding the owner's pid) is
//! taken before anything in it is read or written, so a second head on the same dir stops at once
//! and touches nothing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "data dir {path} is in use by {holder} (lock {lock} is held); stop that head first, or give this one another --data-dir"
    )]
    InUse { path: PathBuf, lock: PathBuf, holder: String },
    #[error("cannot use data dir {path}: {source}; pass --data-dir DIR with a directory this user can write")]
    Io { path: PathBuf, source: std::io::Error },
}

/// The held lock; dropping it releases the data dir.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: Flock<File>,
}

/// Creates the data dir (0700) if needed and locks it for this process.
pub fn lock(dir: &Path) -> Result<DataDirLock, DataDirError> {
    let io = |source| DataDirError::Io { path: dir.to_path_buf(), source };
    tessera_common::files::private_dir(dir).map_err(io)?;
    let lock_path = dir.join("lock");
    let file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&lock_path).map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut held) => {
            let _ = held.set_len(0);
            let _ = held.rewind();
            let _ = writeln!(held, "{}", std::process::id());
            Ok(DataDirLock { _lock: held })
        }
        Err((mut file, _)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let holder = match pid.trim() {
                "" => "another process".to_string(),
                p => format!("pid {p}"),
            };
            Err(DataDirError::InUse { path: dir.to_path_buf(), lock: lock_path, holder })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_head_per_data_dir_and_the_refusal_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = lock(dir.path()).expect("first head");
        let e = lock(dir.path()).expect_err("second head");
        let text = e.to_string();
        assert!(text.contains(&format!("in use by pid {}", std::process::id())), "{text}");
        assert!(!text.contains("move it aside"), "{text}");
        drop(first);
        lock(dir.path()).expect("free again once the first head is gone");
    }
}
