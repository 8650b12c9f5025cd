//! Network namespaces that a test creates (and removes): a namespace holding one end of a veth
//! pair, the other end in the test's namespace, each with its own address. Needs root and
//! `ip netns` (iproute2).

use std::process::{Command, Stdio};

/// A namespace with one end of a veth pair; the other end stays in the test's namespace.
pub struct Netns {
    pub name: String,
    /// The veth end in the test's namespace, and its address.
    pub outer: String,
    pub outer_ip: String,
    /// The address inside the namespace.
    pub inner_ip: String,
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// A namespace `tessera-TAG-PID` with addresses from 10.251.0.0/16 (distinct per test binary
    /// and tag; TAG at most 4 characters).
    pub fn create(tag: &str) -> Result<Netns, String> {
        let id = std::process::id() % 10_000;
        let salt = tag.bytes().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
        let subnet = (std::process::id().wrapping_add(salt)) % 200 + 20;
        let n = Netns {
            name: format!("tessera-{tag}-{id}"),
            outer: format!("ts{tag}a{id}"),
            outer_ip: format!("10.251.{subnet}.1"),
            inner_ip: format!("10.251.{subnet}.2"),
        };
        let inner = format!("ts{tag}b{id}");
        let _ = ip(&["netns", "del", &n.name]);
        ip(&["netns", "add", &n.name])?;
        ip(&["link", "add", &n.outer, "type", "veth", "peer", "name", &inner])?;
        ip(&["link", "set", &inner, "netns", &n.name])?;
        ip(&["addr", "add", &format!("{}/30", n.outer_ip), "dev", &n.outer])?;
        ip(&["link", "set", &n.outer, "up"])?;
        ip(&["-n", &n.name, "addr", "add", &format!("{}/30", n.inner_ip), "dev", &inner])?;
        ip(&["-n", &n.name, "link", "set", &inner, "up"])?;
        ip(&["-n", &n.name, "link", "set", "lo", "up"])?;
        Ok(n)
    }

    pub fn cut(&self) {
        ip(&["link", "set", &self.outer, "down"]).expect("cut the link");
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.outer, "up"]).expect("heal the link");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.outer]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
