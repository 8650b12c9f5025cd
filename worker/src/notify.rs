//! systemd's notify protocol (`Type=notify`): `READY=1` once serving (head) or joined (worker),
//! `STATUS=` lines with a summary, `WATCHDOG=1` at half of `WATCHDOG_USEC`, `STOPPING=1` on
//! shutdown. Datagrams to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); without
//! it every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Notifier { socket: None } };
        let path = path.to_string_lossy().to_string();
        let addr = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        } else {
            std::os::unix::net::SocketAddr::from_pathname(&path)
        };
        let socket = match (UnixDatagram::unbound(), addr) {
            (Ok(s), Ok(a)) => Some((s, a)),
            _ => {
                tracing::warn!(notify_socket = %path, "cannot use NOTIFY_SOCKET; systemd will not hear from this process");
                None
            }
        };
        Notifier { socket }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    fn send(&self, msg: &str) {
        if let Some((s, a)) = &self.socket
            && let Err(e) = s.send_to_addr(msg.as_bytes(), a)
        {
            tracing::debug!(error = %e, "notify message not delivered");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// Half of `WATCHDOG_USEC`, when systemd asked this process (`WATCHDOG_PID`, if set) for pings.
    pub fn watchdog_interval() -> Option<Duration> {
        if let Ok(pid) = std::env::var("WATCHDOG_PID")
            && pid.trim() != std::process::id().to_string()
        {
            return None;
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }

    /// Pings the watchdog until `stop` (nothing to do without `WATCHDOG_USEC`).
    pub fn spawn_watchdog(self: &std::sync::Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(every) = Self::watchdog_interval() else { return };
        let me = self.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = t.tick() => me.watchdog(),
                }
            }
        });
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}
