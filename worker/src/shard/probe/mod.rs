//! The probe engine: checks a cluster's wiring with a real TCP rendezvous before a long model load.
//!
//! Rank 0 listens on the master port; every other rank connects (retrying until rank 0 is up),
//! says hello, and measures its round-trip time to the master. The world is complete when all
//! ranks have checked in; rank 0 then answers `GET /health` on the health port with every rank's
//! round-trip time, and a small deterministic OpenAI-compatible API ([`api`]) on the same port.
//! Like a collective, the world breaks if a member goes: a rank whose connection to the master
//! drops exits non-zero. It runs until stopped.

pub mod api;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Arguments of `probe` (parsed by hand: this runs as `<binary> probe ...` under a shim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeArgs {
    pub rank: u32,
    pub world_size: u32,
    pub master_addr: String,
    pub master_port: u16,
    pub health_port: Option<u16>,
    /// The model names the API serves: `--served-model-name`'s, and the deployment's name.
    pub model_names: Vec<String>,
    /// Delay before each generated token (`--token-delay-ms`).
    pub token_delay: Duration,
}

/// Flags of the probe a user may give (`tessera deploy --engine probe NAME -- FLAGS`).
/// `--exit-code N` makes every rank exit with N at once: a start that fails, for tests.
pub const USER_FLAGS: [&str; 3] = ["--served-model-name", "--token-delay-ms", "--exit-code"];
/// The longest per-token delay.
pub const MAX_TOKEN_DELAY_MS: u64 = 10_000;

impl ProbeArgs {
    pub fn parse(args: &[String]) -> Result<ProbeArgs, String> {
        const KNOWN: [&str; 5] = ["--rank", "--world-size", "--master-addr", "--master-port", "--health-port"];
        let mut m = BTreeMap::new();
        let mut names = Vec::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            if !KNOWN.contains(&k.as_str()) && !USER_FLAGS.contains(&k.as_str()) {
                return Err(format!("unknown flag {k:?}: the probe takes {}", USER_FLAGS.join(", ")));
            }
            let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
            if k == "--served-model-name" {
                names.push(v.clone());
            }
            m.insert(k.trim_start_matches("--").to_string(), v.clone());
        }
        names.extend(std::env::var("TESSERA_DEPLOYMENT").ok());
        if names.is_empty() {
            names.push("probe".into());
        }
        names.dedup();
        let get = |k: &str| m.get(k).cloned().ok_or_else(|| format!("--{k} is required"));
        let num = |k: &str| -> Result<u64, String> { get(k)?.parse().map_err(|_| format!("--{k} must be a number")) };
        Ok(ProbeArgs {
            rank: num("rank")? as u32,
            world_size: num("world-size")? as u32,
            master_addr: get("master-addr")?,
            master_port: num("master-port")? as u16,
            health_port: m.get("health-port").and_then(|v| v.parse().ok()).filter(|&p: &u16| p > 0),
            model_names: names,
            token_delay: Duration::from_millis(match m.get("token-delay-ms") {
                None => 0,
                Some(_) => {
                    let ms = num("token-delay-ms")?;
                    if ms > MAX_TOKEN_DELAY_MS {
                        return Err(format!("--token-delay-ms {ms}: at most {MAX_TOKEN_DELAY_MS}"));
                    }
                    ms
                }
            }),
        })
    }
}

pub fn run(args: &[String]) -> ExitCode {
    let a = match ProbeArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("probe: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(code) = args.iter().position(|x| x == "--exit-code").and_then(|i| args.get(i + 1)) {
        eprintln!("probe: exiting with {code} as asked (--exit-code)");
        return ExitCode::from(code.parse::<u8>().unwrap_or(1));
    }
    let generation = std::env::var("TESSERA_GENERATION").unwrap_or_else(|_| "?".into());
    println!(
        "probe rank {}/{} starting (generation {generation}); master {}:{}",
        a.rank, a.world_size, a.master_addr, a.master_port
    );
    let result = if a.rank == 0 { master(&a) } else { member(&a) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe rank {}: {e}", a.rank);
            ExitCode::from(1)
        }
    }
}

fn master(a: &ProbeArgs) -> Result<(), String> {
    let listener = TcpListener::bind(("0.0.0.0", a.master_port))
        .map_err(|e| format!("cannot listen on port {}: {e}", a.master_port))?;
    let rtts: Arc<Mutex<BTreeMap<u32, u64>>> = Arc::new(Mutex::new(BTreeMap::from([(0, 0)])));
    let (lost_tx, lost_rx) = std::sync::mpsc::channel::<String>();
    let mut joined = 1u32;
    while joined < a.world_size {
        let (conn, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let _ = conn.set_nodelay(true);
        let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
        let mut writer = conn;
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let Some(rank) = line.trim().strip_prefix("HELLO ").and_then(|r| r.parse::<u32>().ok()) else {
            eprintln!("ignored a stranger from {peer}: {line:?}");
            continue;
        };
        writer.write_all(b"WELCOME\n").map_err(|e| e.to_string())?;
        // Echo pings, then learn the measured RTT.
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err(format!("rank {rank} left during the handshake"));
            }
            let l = line.trim();
            if l == "PING" {
                writer.write_all(b"PONG\n").map_err(|e| e.to_string())?;
            } else if let Some(us) = l.strip_prefix("RTT ").and_then(|v| v.parse::<u64>().ok()) {
                rtts.lock().expect("lock").insert(rank, us);
                println!("rank {rank} checked in from {peer}: round trip {us} us");
                break;
            }
        }
        joined += 1;
        let lost = lost_tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while matches!(reader.get_mut().read(&mut buf), Ok(n) if n > 0) {}
            let _ = lost.send(format!("rank {rank} left the world"));
            drop(writer);
        });
    }
    println!("world complete: {} ranks", a.world_size);
    if let Some(port) = a.health_port {
        let listener =
            TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("cannot listen on health port {port}: {e}"))?;
        let rtts = rtts.clone();
        let world = a.world_size;
        let cfg = api::ApiConfig {
            models: a.model_names.clone(),
            token_delay: a.token_delay,
            health: Arc::new(move || health_body(world, &rtts)),
            in_flight: Default::default(),
        };
        std::thread::spawn(move || {
            if let Err(e) = api::serve(listener, cfg) {
                eprintln!("probe: the API stopped: {e}");
                std::process::exit(1);
            }
        });
        println!("health and the OpenAI-compatible API (models {:?}) on port {port}", a.model_names);
    }
    let _ = std::io::stdout().flush();
    // A member leaving breaks the world, as it would a collective.
    match lost_rx.recv() {
        Ok(why) => Err(why),
        Err(_) => loop {
            std::thread::park();
        },
    }
}

/// `/health`'s body: the world's size and each rank's round-trip time to the master.
fn health_body(world: u32, rtts: &Mutex<BTreeMap<u32, u64>>) -> String {
    let r = rtts.lock().unwrap_or_else(|p| p.into_inner());
    let ranks: Vec<String> = r.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{\"world_size\":{world},\"rtt_us\":{{{}}}}}", ranks.join(","))
}

fn member(a: &ProbeArgs) -> Result<(), String> {
    let addr = format!("{}:{}", a.master_addr, a.master_port);
    let deadline = Instant::now() + Duration::from_secs(120);
    let conn = loop {
        match TcpStream::connect(&addr) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("cannot reach the master at {addr}: {e}")),
        }
    };
    let _ = conn.set_nodelay(true);
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let mut writer = conn;
    writeln!(writer, "HELLO {}", a.rank).map_err(|e| e.to_string())?;
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.trim() != "WELCOME" {
        return Err(format!("the master answered {line:?}"));
    }
    let mut best = u64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        writer.write_all(b"PING\n").map_err(|e| e.to_string())?;
        line.clear();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        best = best.min(t.elapsed().as_micros() as u64);
    }
    writeln!(writer, "RTT {best}").map_err(|e| e.to_string())?;
    println!("rank {} joined the world: round trip to the master {addr} {best} us", a.rank);
    if let Ok(dir) = std::env::var("TESSERA_PROCESS_DIR") {
        let _ = std::fs::write(std::path::Path::new(&dir).join("probe-rtt-us"), best.to_string());
    }
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 64];
    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    Err(format!("lost the master at {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_its_arguments() {
        let args: Vec<String> =
            ["--rank", "3", "--world-size", "8", "--master-addr", "10.0.0.1", "--master-port", "29500"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let a = ProbeArgs::parse(&args).expect("valid");
        assert_eq!((a.rank, a.world_size, a.master_port, a.health_port), (3, 8, 29500, None));
        assert!(ProbeArgs::parse(&args[..6]).expect_err("no port").contains("--master-port"));
        let mut more = args.clone();
        more.extend(["--token-delay-ms".into(), "5".into(), "--served-model-name".into(), "m".into()]);
        let a = ProbeArgs::parse(&more).expect("valid");
        assert_eq!((a.token_delay, a.model_names[0].as_str()), (Duration::from_millis(5), "m"));
        more.extend(["--tokens".into(), "1".into()]);
        assert!(ProbeArgs::parse(&more).expect_err("unknown").contains("unknown flag \"--tokens\""));
    }
}
