//! GPU inventory: the real one from NVML, or a fake one for machines without GPUs.
//!
//! Both sit behind [`GpuInventory`]; the agent does not know which it has.

mod fake;
mod nvml;

pub use fake::FakeInventory;
pub use nvml::NvmlInventory;

use tessera_common::node::Inventory;

/// A source of GPU inventory.
pub trait GpuInventory: Send + Sync + 'static {
    /// The full inventory, read now.
    fn inventory(&self) -> Inventory;

    /// Current memory use per GPU index, for heartbeats. Cheap enough to call every few seconds.
    fn memory_used(&self) -> Vec<(u32, u64)>;

    /// Live readings for metrics (what the GPU does not report is `None`).
    fn telemetry(&self) -> Vec<GpuTelemetry>;
}

/// One GPU's live readings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuTelemetry {
    pub index: u32,
    pub uuid: String,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub utilization_percent: Option<u32>,
    pub temperature_celsius: Option<u32>,
    pub power_milliwatts: Option<u32>,
}

/// The inventory for this process: fake when `--fake-gpus` was given, else NVML (or an empty, CPU-only
/// inventory with one logged line when NVML cannot be loaded).
pub fn detect(fake: Option<tessera_common::fake::FakeGpuSpec>, seed: &str) -> std::sync::Arc<dyn GpuInventory> {
    match fake {
        Some(spec) => std::sync::Arc::new(FakeInventory::new(spec, seed)),
        None => std::sync::Arc::new(NvmlInventory::load()),
    }
}
