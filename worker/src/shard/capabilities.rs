//! What this node can run, found once at start and sent with every join: vLLM's version (or why
//! it is missing) and whether the command engine is allowed. The head places deployments only on
//! nodes that can run their engine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_common::node::Capabilities;

use super::HostConfig;

/// How long asking vLLM's interpreter for its version may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(15);

/// The `vllm` executable this worker runs: `--vllm-bin`, else the first on PATH.
pub fn vllm_bin(cfg: &HostConfig) -> Result<PathBuf, String> {
    match &cfg.vllm_bin {
        Some(b) if b.is_file() => Ok(b.clone()),
        Some(b) => Err(format!("--vllm-bin {}: no such file; install vLLM there or name the right path", b.display())),
        None => find_on_path("vllm").ok_or_else(|| {
            "vllm is not installed on this node: no `vllm` on PATH; install vLLM or start the worker with --vllm-bin PATH"
                .to_string()
        }),
    }
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|c| c.is_file()))
}

/// Finds what this node can run (blocks up to [`VERSION_TIMEOUT`]).
pub fn detect(cfg: &HostConfig) -> Capabilities {
    let vllm = vllm_bin(cfg).map(|bin| version(&bin).unwrap_or_else(|| "unknown".into()));
    Capabilities { vllm, command_allowed: cfg.allow_command, reported: true, transfer_port: 0 }
}

/// vLLM's version, read from its package metadata by the interpreter its `vllm` script names
/// (fast: vLLM itself is not imported). `None` when the script is not a Python entry point.
fn version(bin: &Path) -> Option<String> {
    // The first line only (a shebang is short; the file may be a large binary).
    let mut head = Vec::with_capacity(512);
    use std::io::Read;
    std::fs::File::open(bin).ok()?.take(512).read_to_end(&mut head).ok()?;
    let first = head.split(|&b| b == b'\n').next()?;
    let shebang = std::str::from_utf8(first).ok()?.strip_prefix("#!")?.trim();
    let mut words = shebang.split_whitespace();
    let mut python = words.next()?.to_string();
    if python.ends_with("/env") {
        // `#!/usr/bin/env python3`, `#!/usr/bin/env -S python3 -u`
        python = words.find(|w| !w.starts_with('-'))?.to_string();
    }
    if !python.contains("python") {
        return None;
    }
    let mut child = Command::new(&python)
        .args(["-c", "import importlib.metadata as m; print(m.version('vllm'))"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + VERSION_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mut out = String::new();
    child.stdout.take()?.take(256).read_to_string(&mut out).ok()?;
    let v = out.trim();
    (!v.is_empty()).then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn cfg(vllm_bin: Option<PathBuf>, allow_command: bool) -> HostConfig {
        HostConfig {
            state_dir: "/nonexistent".into(),
            exe: "/bin/true".into(),
            vllm_bin,
            allow_command,
            orphan_timeout: Duration::from_secs(1),
            log_max_bytes: 1,
            engine_user: None,
            models_dir: None,
            echo_logs: false,
        }
    }

    #[test]
    fn a_missing_vllm_says_why_and_the_command_engine_follows_the_flag() {
        let c = detect(&cfg(Some("/nonexistent/vllm".into()), false));
        assert!(c.vllm.as_ref().expect_err("missing").contains("--vllm-bin /nonexistent/vllm: no such file"));
        assert!(!c.command_allowed && c.reported);
        assert!(detect(&cfg(None, true)).command_allowed);
    }

    #[test]
    fn the_version_comes_from_the_interpreter_the_script_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A stand-in interpreter that answers like Python asked for vLLM's version.
        let py = dir.path().join("python3");
        std::fs::write(&py, "#!/bin/sh\necho 0.33.0\n").expect("write");
        std::fs::set_permissions(&py, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let bin = dir.path().join("vllm");
        std::fs::write(&bin, format!("#!{}\nimport vllm\n", py.display())).expect("write");
        assert_eq!(detect(&cfg(Some(bin.clone()), false)).vllm, Ok("0.33.0".into()));
        // Not a Python entry point: found, version unknown.
        std::fs::write(&bin, "#!/bin/sh\nexec true\n").expect("write");
        assert_eq!(detect(&cfg(Some(bin), false)).vllm, Ok("unknown".into()));
    }
}
