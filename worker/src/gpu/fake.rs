//! `--fake-gpus`: a fixed, clearly marked inventory.

use tessera_common::fake::FakeGpuSpec;
use tessera_common::node::Inventory;

use super::GpuInventory;

pub struct FakeInventory {
    inventory: Inventory,
}

impl FakeInventory {
    pub fn new(spec: FakeGpuSpec, seed: &str) -> Self {
        FakeInventory { inventory: spec.inventory(seed) }
    }
}

impl GpuInventory for FakeInventory {
    fn inventory(&self) -> Inventory {
        self.inventory.clone()
    }

    fn memory_used(&self) -> Vec<(u32, u64)> {
        self.inventory.gpus.iter().map(|g| (g.index, g.memory_used_bytes)).collect()
    }

    fn telemetry(&self) -> Vec<super::GpuTelemetry> {
        self.inventory
            .gpus
            .iter()
            .map(|g| super::GpuTelemetry {
                index: g.index,
                uuid: g.uuid.clone(),
                memory_used_bytes: g.memory_used_bytes,
                memory_total_bytes: g.memory_total_bytes,
                ..Default::default()
            })
            .collect()
    }
}
