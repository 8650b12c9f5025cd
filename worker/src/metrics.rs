//! The worker's metrics: its GPUs (from NVML at scrape time), its shard processes, and the
//! heartbeat round trip to the head. Names `tessera_worker_<thing>_<unit>`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::gpu::GpuInventory;
use crate::shard::ShardHost;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub uuid: String,
    pub index: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcLabels {
    pub deployment: String,
    pub process: String,
    pub state: String,
}

/// A process without its state: its generation is a value, not a label (a label would make a
/// new series at every restart).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcKeyLabels {
    pub deployment: String,
    pub process: String,
}

pub struct WorkerMetrics {
    registry: std::sync::Mutex<Registry>,
    gpu_memory_used: Family<GpuLabels, Gauge>,
    gpu_memory_total: Family<GpuLabels, Gauge>,
    gpu_utilization: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    gpu_temperature: Family<GpuLabels, Gauge>,
    gpu_power: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    processes: Family<ProcLabels, Gauge>,
    generations: Family<ProcKeyLabels, Gauge>,
    pub heartbeat_rtt: Histogram,
    pub joined: Gauge,
    /// Weight staging's byte counts (shared with the stager).
    pub stage: crate::stage::StageCounters,
    /// The daemon's own build and process metrics (the worker binary; not the head's own worker,
    /// whose process is the head's).
    process: Option<Arc<ProcessMetrics>>,
}

impl WorkerMetrics {
    pub fn new() -> Arc<WorkerMetrics> {
        Self::build(false)
    }

    /// For the `tessera-worker` daemon: with `tessera_worker_build_info` and its process metrics.
    pub fn for_daemon() -> Arc<WorkerMetrics> {
        Self::build(true)
    }

    fn build(process: bool) -> Arc<WorkerMetrics> {
        let mut r = Registry::with_prefix("tessera_worker");
        let m = WorkerMetrics {
            registry: std::sync::Mutex::new(Registry::default()),
            gpu_memory_used: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_utilization: Family::default(),
            gpu_temperature: Family::default(),
            gpu_power: Family::default(),
            processes: Family::default(),
            generations: Family::default(),
            heartbeat_rtt: Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
            joined: Gauge::default(),
            stage: Default::default(),
            process: None,
        };
        r.register(
            "stage_served_bytes",
            "Model bytes this node's transfer server sent to other nodes (weight staging)",
            m.stage.served.clone(),
        );
        r.register("stage_fetched_bytes", "Model bytes this node fetched from other nodes", m.stage.fetched.clone());
        r.register(
            "stage_refetched_chunks",
            "Chunks that failed their sha256 check when fetched and were fetched again",
            m.stage.refetched.clone(),
        );
        r.register("gpu_memory_used_bytes", "GPU memory in use, per GPU (NVML)", m.gpu_memory_used.clone());
        r.register("gpu_memory_total_bytes", "GPU memory installed, per GPU", m.gpu_memory_total.clone());
        r.register(
            "gpu_utilization_ratio",
            "Fraction of time a kernel ran in the last sample period (NVML), 0-1",
            m.gpu_utilization.clone(),
        );
        r.register("gpu_temperature_celsius", "GPU core temperature (NVML)", m.gpu_temperature.clone());
        r.register("gpu_power_watts", "GPU power draw (NVML)", m.gpu_power.clone());
        r.register(
            "shard_processes",
            "Shard processes on this node by deployment, process and state (1 each)",
            m.processes.clone(),
        );
        r.register(
            "shard_generation",
            "The generation of each shard process on this node (the newest, when several)",
            m.generations.clone(),
        );
        r.register(
            "heartbeat_rtt_seconds",
            "Round trip of heartbeats to the head and their acknowledgement",
            m.heartbeat_rtt.clone(),
        );
        r.register("joined", "1 while this worker has a session with the head", m.joined.clone());
        let mut m = m;
        if process {
            m.process = Some(ProcessMetrics::register(&mut r));
        }
        *m.registry.lock().expect("lock") = r;
        Arc::new(m)
    }

    /// Reads the GPUs and shard processes now, and renders everything.
    pub fn render(&self, gpus: &dyn GpuInventory, shards: Option<&ShardHost>) -> String {
        if let Some(p) = &self.process {
            p.update();
        }
        self.gpu_memory_used.clear();
        self.gpu_utilization.clear();
        self.gpu_temperature.clear();
        self.gpu_power.clear();
        for t in gpus.telemetry() {
            let l = GpuLabels { uuid: t.uuid.clone(), index: t.index.to_string() };
            self.gpu_memory_used.get_or_create(&l).set(t.memory_used_bytes as i64);
            self.gpu_memory_total.get_or_create(&l).set(t.memory_total_bytes as i64);
            if let Some(u) = t.utilization_percent {
                self.gpu_utilization.get_or_create(&l).set(u as f64 / 100.0);
            }
            if let Some(c) = t.temperature_celsius {
                self.gpu_temperature.get_or_create(&l).set(c as i64);
            }
            if let Some(mw) = t.power_milliwatts {
                self.gpu_power.get_or_create(&l).set(mw as f64 / 1000.0);
            }
        }
        self.processes.clear();
        self.generations.clear();
        if let Some(h) = shards {
            for r in h.snapshot() {
                let state = tessera_proto::v1::ProcessState::try_from(r.state)
                    .map(|s| s.as_str_name().trim_start_matches("PROCESS_STATE_").to_ascii_lowercase())
                    .unwrap_or_else(|_| "unknown".into());
                let g = self
                    .generations
                    .get_or_create(&ProcKeyLabels { deployment: r.deployment.clone(), process: r.key.clone() });
                g.set(g.get().max(r.generation.min(i64::MAX as u64) as i64));
                let l = ProcLabels { deployment: r.deployment, process: r.key, state };
                self.processes.get_or_create(&l).inc();
            }
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().expect("lock"));
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// A daemon's own metrics (registered under its prefix): `build_info{version}` (1), and from
/// `/proc/self` at scrape time its CPU seconds, resident memory, open and allowed file
/// descriptors, threads and start time.
pub struct ProcessMetrics {
    cpu: prometheus_client::metrics::counter::Counter<f64, AtomicU64>,
    cpu_seen: std::sync::Mutex<f64>,
    rss: Gauge,
    fds: Gauge,
    max_fds: Gauge,
    threads: Gauge,
    start: Gauge<f64, AtomicU64>,
}

impl ProcessMetrics {
    pub fn register(r: &mut Registry) -> Arc<ProcessMetrics> {
        let build: Family<BuildLabels, Gauge> = Family::default();
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION").to_string() }).set(1);
        r.register("build_info", "1, labelled with the version of this daemon", build);
        let m = ProcessMetrics {
            cpu: Default::default(),
            cpu_seen: std::sync::Mutex::new(0.0),
            rss: Gauge::default(),
            fds: Gauge::default(),
            max_fds: Gauge::default(),
            threads: Gauge::default(),
            start: Gauge::default(),
        };
        r.register("process_cpu_seconds", "CPU time of this process (user and system)", m.cpu.clone());
        r.register("process_resident_memory_bytes", "Resident memory of this process", m.rss.clone());
        r.register("process_open_fds", "Open file descriptors of this process", m.fds.clone());
        r.register("process_max_fds", "The file descriptor limit of this process", m.max_fds.clone());
        r.register("process_threads", "Threads of this process", m.threads.clone());
        r.register("process_start_time_seconds", "When this process started, Unix seconds", m.start.clone());
        Arc::new(m)
    }

    /// Reads `/proc/self` now.
    pub fn update(&self) {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some((_, rest)) = stat.rsplit_once(')')
        {
            // Fields after the command name: state is field 3; utime 14, stime 15, threads 20,
            // starttime 22 (1-based over the whole line).
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i - 3).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
            let cpu = (num(14) + num(15)) / ticks;
            let mut seen = self.cpu_seen.lock().expect("lock");
            if cpu > *seen {
                self.cpu.inc_by(cpu - *seen);
                *seen = cpu;
            }
            self.threads.set(num(20) as i64);
            let boot = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| {
                    s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok()))
                })
                .unwrap_or(0.0);
            self.start.set(boot + num(22) / ticks);
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
                .unwrap_or(0);
            self.rss.set(kib * 1024);
        }
        self.fds.set(std::fs::read_dir("/proc/self/fd").map(|d| d.count() as i64).unwrap_or(0));
        if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            self.max_fds.set(soft.min(i64::MAX as u64) as i64);
        }
    }
}
