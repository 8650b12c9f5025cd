//! Hosting model shards: the shim that supervises each engine process, the probe engine, and the
//! agent-side host that launches, watches, fences and stops them.

pub mod capabilities;
pub mod host;
pub mod http;
pub mod liveness;
pub mod probe;
pub mod shim;
pub mod spec;

pub use host::{HostConfig, ShardHost};

/// Runs a hidden mode of a Tessera binary (`shim --dir DIR`, `probe ...`) if argv asks for one.
/// Both `tessera-worker` and `tessera-head` (whose in-process worker hosts stage 0) call this first.
pub fn run_hidden_mode() -> Option<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("shim") => {
            let dir = match (args.get(2).map(String::as_str), args.get(3)) {
                (Some("--dir"), Some(d)) => std::path::PathBuf::from(d),
                _ => {
                    eprintln!("usage: shim --dir DIR");
                    return Some(std::process::ExitCode::from(2));
                }
            };
            Some(shim::run(&dir))
        }
        Some("probe") => Some(probe::run(&args[2..])),
        _ => None,
    }
}
