//! `--fake-gpus COUNTxMEMORY` (e.g. `4x80GiB`): GPUs for machines without any, marked fake.

use std::fmt;
use std::str::FromStr;

use crate::node::{Gpu, Inventory, InventorySource, MAX_GPUS_PER_NODE};
use crate::size::{HumanBytes, parse_size};

/// How many fake GPUs a node has and how much memory each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeGpuSpec {
    pub count: u32,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fake GPU spec {value:?}: {why}; write COUNTxMEMORY, e.g. 4x80GiB")]
pub struct FakeSpecError {
    pub value: String,
    pub why: String,
}

impl FromStr for FakeGpuSpec {
    type Err = FakeSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| FakeSpecError { value: s.to_string(), why };
        let (count, mem) =
            s.trim().split_once(['x', 'X']).ok_or_else(|| err("no 'x' between count and memory".into()))?;
        let count: u32 = count.trim().parse().map_err(|_| err(format!("count {count:?} is not a whole number")))?;
        if count as usize > MAX_GPUS_PER_NODE {
            return Err(err(format!("{count} GPUs; a node has at most {MAX_GPUS_PER_NODE}")));
        }
        // `1x80` is not 80 bytes: a GPU's memory needs its unit.
        if mem.trim().chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(err(format!("memory {:?} has no unit; write e.g. {count}x{}GiB", mem.trim(), mem.trim())));
        }
        let memory_bytes = parse_size(mem).map_err(|e| err(e.to_string()))?;
        if memory_bytes == 0 && count > 0 {
            return Err(err("memory must be more than 0".into()));
        }
        Ok(FakeGpuSpec { count, memory_bytes })
    }
}

impl fmt::Display for FakeGpuSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.count, HumanBytes(self.memory_bytes))
    }
}

impl FakeGpuSpec {
    /// The fake inventory. `seed` (the node's name or id) makes UUIDs stable across restarts and
    /// distinct across nodes. Every GPU is NVLink-connected to every other (a full mesh, as on an
    /// NVSwitch system).
    pub fn inventory(&self, seed: &str) -> Inventory {
        let gpus = (0..self.count)
            .map(|i| {
                let id =
                    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("tessera-fake-gpu/{seed}/{i}").as_bytes());
                Gpu {
                    index: i,
                    uuid: format!("GPU-fake-{id}"),
                    name: format!("Fake GPU {}", HumanBytes(self.memory_bytes)),
                    memory_total_bytes: self.memory_bytes,
                    memory_used_bytes: 0,
                    compute_capability: (9, 0),
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + i),
                    numa_node: Some((i * 2 / self.count.max(1)) as i32),
                    nvlink_peers: (0..self.count).filter(|&p| p != i).collect(),
                    mig_enabled: false,
                    fake: true,
                }
            })
            .collect();
        Inventory {
            gpus,
            driver_version: String::new(),
            cuda_driver_version: String::new(),
            source: InventorySource::Fake,
            note: format!("fake GPUs from --fake-gpus {self}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("4x80GiB".parse(), Ok(FakeGpuSpec { count: 4, memory_bytes: 80 << 30 }));
        assert_eq!("8X141GB".parse(), Ok(FakeGpuSpec { count: 8, memory_bytes: 141_000_000_000 }));
        assert_eq!("0x1GiB".parse::<FakeGpuSpec>().map(|s| s.count), Ok(0));
        for bad in ["4", "x80GiB", "fourx80GiB", "4x", "4x0", "65x80GiB", "1x80"] {
            let e = bad.parse::<FakeGpuSpec>().expect_err(bad);
            assert!(e.to_string().contains("COUNTxMEMORY"), "{e}");
        }
        let e = "1x80".parse::<FakeGpuSpec>().expect_err("no unit").to_string();
        assert!(e.contains("no unit") && e.contains("1x80GiB"), "{e}");
        assert_eq!("2x80G".parse(), Ok(FakeGpuSpec { count: 2, memory_bytes: 80 << 30 }));
        assert_eq!("2x80Gi".parse(), Ok(FakeGpuSpec { count: 2, memory_bytes: 80 << 30 }));
    }

    #[test]
    fn fake_inventory_is_stable_marked_and_meshed() {
        let spec: FakeGpuSpec = "4x80GiB".parse().expect("valid");
        let a = spec.inventory("node-a");
        assert_eq!(a, spec.inventory("node-a"), "same seed, same UUIDs");
        assert_ne!(a.gpus[0].uuid, spec.inventory("node-b").gpus[0].uuid);
        assert_eq!(a.source, InventorySource::Fake);
        assert!(a.gpus.iter().all(|g| g.fake && g.memory_total_bytes == 80 << 30));
        assert_eq!(a.gpus[2].nvlink_peers, vec![0, 1, 3]);
        let uuids: std::collections::HashSet<_> = a.gpus.iter().map(|g| &g.uuid).collect();
        assert_eq!(uuids.len(), 4);
    }
}
