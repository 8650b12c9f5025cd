//! Files that hold secrets (tokens, deployment specs with their env, engine logs) are the daemon
//! user's alone: the daemons run with umask 077, their data and state dirs are 0700, and a token
//! file that others can read is warned about.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Sets the process umask to 077: every file and directory it creates is its user's alone.
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Sets the umask engines should start with (022): what they write is theirs to share.
pub fn engine_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
}

/// Raises the soft limit of open files to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    }
    Some(hard.max(soft))
}

/// Creates `dir` (and its parents) if needed and makes it 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// A warning when `path` (a secret) can be read by its group or by others.
pub fn shared_secret_warning(path: &Path) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!("{} holds a secret but is mode {mode:03o}: other users may read it; chmod 600 it", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dirs_and_shared_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("a/b");
        private_dir(&d).expect("create");
        assert_eq!(std::fs::metadata(&d).expect("meta").permissions().mode() & 0o777, 0o700);
        let f = d.join("token");
        std::fs::write(&f, "x").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(shared_secret_warning(&f).is_some_and(|w| w.contains("mode 644")));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(shared_secret_warning(&f), None);
    }
}
