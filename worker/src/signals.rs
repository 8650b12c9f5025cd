//! Turns SIGTERM and SIGINT into cancellation of the root token. A second signal exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Spawns the signal watcher. Fails only if signal handlers cannot be installed.
pub fn spawn(root: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "shutting down");
        root.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
    Ok(())
}

/// Reaps children nobody waits for (PID 1 inherits every orphan of its namespace), every 200 ms
/// and on SIGCHLD, until `stop`.
pub async fn reap_orphans(stop: CancellationToken) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let mut chld = signal(SignalKind::child()).ok();
    loop {
        while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if s == WaitStatus::StillAlive {
                break;
            }
        }
        let tick = tokio::time::sleep(std::time::Duration::from_millis(200));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick => {}
            _ = async { match chld.as_mut() { Some(c) => { c.recv().await; } None => std::future::pending().await } } => {}
        }
    }
}
