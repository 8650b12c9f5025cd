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
    pub generation: String,
    pub process: String,
    pub state: String,
}

pub struct WorkerMetrics {
    registry: std::sync::Mutex<Registry>,
    gpu_memory_used: Family<GpuLabels, Gauge>,
    gpu_memory_total: Family<GpuLabels, Gauge>,
    gpu_utilization: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    gpu_temperature: Family<GpuLabels, Gauge>,
    gpu_power: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    processes: Family<ProcLabels, Gauge>,
    pub heartbeat_rtt: Histogram,
    pub joined: Gauge,
    /// Weight staging's byte counts (shared with the stager).
    pub stage: crate::stage::StageCounters,
}

impl WorkerMetrics {
    pub fn new() -> Arc<WorkerMetrics> {
        let mut r = Registry::with_prefix("tessera_worker");
        let m = WorkerMetrics {
            registry: std::sync::Mutex::new(Registry::default()),
            gpu_memory_used: Family::default(),
            gpu_memory_total: Family::default(),
            gpu_utilization: Family::default(),
            gpu_temperature: Family::default(),
            gpu_power: Family::default(),
            processes: Family::default(),
            heartbeat_rtt: Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
            joined: Gauge::default(),
            stage: Default::default(),
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
            "Shard processes on this node by deployment, generation, process and state (1 each)",
            m.processes.clone(),
        );
        r.register(
            "heartbeat_rtt_seconds",
            "Round trip of heartbeats to the head and their acknowledgement",
            m.heartbeat_rtt.clone(),
        );
        r.register("joined", "1 while this worker has a session with the head", m.joined.clone());
        *m.registry.lock().expect("lock") = r;
        Arc::new(m)
    }

    /// Reads the GPUs and shard processes now, and renders everything.
    pub fn render(&self, gpus: &dyn GpuInventory, shards: Option<&ShardHost>) -> String {
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
        if let Some(h) = shards {
            for r in h.snapshot() {
                let state = tessera_proto::v1::ProcessState::try_from(r.state)
                    .map(|s| s.as_str_name().trim_start_matches("PROCESS_STATE_").to_ascii_lowercase())
                    .unwrap_or_else(|_| "unknown".into());
                let l = ProcLabels {
                    deployment: r.deployment,
                    generation: r.generation.to_string(),
                    process: r.key,
                    state,
                };
                self.processes.get_or_create(&l).set(1);
            }
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry.lock().expect("lock"));
        out
    }
}
