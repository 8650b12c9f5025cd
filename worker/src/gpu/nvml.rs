//! The real inventory, from NVML (libnvidia-ml.so, loaded at run time by nvml-wrapper).
//!
//! On a machine without the NVIDIA driver, loading fails; the worker logs one line and reports no
//! GPUs (a CPU-only node). Per-field failures (a query the GPU does not support) leave that field
//! empty rather than losing the GPU.

use std::collections::HashMap;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use tessera_common::node::{Gpu, Inventory, InventorySource};
use tracing::{info, warn};

use super::GpuInventory;

/// Links per GPU that NVML knows of (NVML_NVLINK_MAX_LINKS).
const MAX_NVLINKS: u32 = 18;

pub struct NvmlInventory {
    nvml: Option<Nvml>,
    load_error: String,
}

impl NvmlInventory {
    /// Loads NVML. Never fails: without it the inventory is empty and says why.
    pub fn load() -> Self {
        match Nvml::init() {
            Ok(nvml) => NvmlInventory { nvml: Some(nvml), load_error: String::new() },
            Err(e) => {
                let why = match &e {
                    NvmlError::LibloadingError(_) => {
                        "the NVIDIA driver's libnvidia-ml.so could not be loaded (no driver on this machine)"
                            .to_string()
                    }
                    other => format!("NVML init failed: {other}"),
                };
                info!(reason = %why, "no GPUs: reporting this node as CPU-only (use --fake-gpus to pretend)");
                NvmlInventory { nvml: None, load_error: why }
            }
        }
    }

    fn read(nvml: &Nvml) -> Result<Inventory, NvmlError> {
        let count = nvml.device_count()?;
        let mut gpus = Vec::with_capacity(count as usize);
        // NVLink remote ends, by the GPU they start from: (gpu index, remote PCI bus id).
        let mut links: Vec<(u32, String)> = Vec::new();
        for i in 0..count {
            let dev = match nvml.device_by_index(i) {
                Ok(d) => d,
                Err(e) => {
                    warn!(index = i, error = %e, "GPU cannot be opened; left out of the inventory");
                    continue;
                }
            };
            let index = dev.index().unwrap_or(i);
            let mem = dev.memory_info().ok();
            let cc = dev.cuda_compute_capability().ok();
            let pci_bus_id = dev.pci_info().map(|p| p.bus_id).unwrap_or_default();
            for link in 0..MAX_NVLINKS {
                let l = dev.link_wrapper_for(link);
                if l.is_active().unwrap_or(false)
                    && let Ok(remote) = l.remote_pci_info()
                {
                    links.push((index, normalize_bus_id(&remote.bus_id)));
                }
            }
            gpus.push(Gpu {
                index,
                uuid: dev.uuid().unwrap_or_default(),
                name: dev.name().unwrap_or_else(|_| "unknown NVIDIA GPU".into()),
                memory_total_bytes: mem.as_ref().map(|m| m.total).unwrap_or(0),
                memory_used_bytes: mem.as_ref().map(|m| m.used).unwrap_or(0),
                compute_capability: cc.map(|c| (c.major.max(0) as u32, c.minor.max(0) as u32)).unwrap_or((0, 0)),
                numa_node: numa_node(&dev, &pci_bus_id),
                pci_bus_id,
                nvlink_peers: Vec::new(),
                mig_enabled: dev.mig_mode().map(|m| m.current == 1).unwrap_or(false),
                fake: false,
            });
        }
        let bus_to_index: HashMap<String, u32> =
            gpus.iter().map(|g| (normalize_bus_id(&g.pci_bus_id), g.index)).collect();
        let peers = nvlink_peers(&links, &bus_to_index);
        for g in &mut gpus {
            g.nvlink_peers = peers.get(&g.index).cloned().unwrap_or_default();
        }
        let cuda = nvml.sys_cuda_driver_version().map(|v| {
            format!("{}.{}", nvml_wrapper::cuda_driver_version_major(v), nvml_wrapper::cuda_driver_version_minor(v))
        });
        Ok(Inventory {
            gpus,
            driver_version: nvml.sys_driver_version().unwrap_or_default(),
            cuda_driver_version: cuda.unwrap_or_default(),
            source: InventorySource::Nvml,
            note: String::new(),
        })
    }
}

impl GpuInventory for NvmlInventory {
    fn inventory(&self) -> Inventory {
        let Some(nvml) = &self.nvml else {
            return Inventory::empty(self.load_error.clone());
        };
        match Self::read(nvml) {
            Ok(inv) => inv,
            Err(e) => {
                warn!(error = %e, "NVML inventory failed; reporting no GPUs");
                let mut inv = Inventory::empty(format!("NVML query failed: {e}"));
                inv.source = InventorySource::Nvml;
                inv
            }
        }
    }

    fn telemetry(&self) -> Vec<super::GpuTelemetry> {
        self.nvml.as_ref().map(Self::read_telemetry).unwrap_or_default()
    }

    fn memory_used(&self) -> Vec<(u32, u64)> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                Some((d.index().unwrap_or(i), d.memory_info().ok()?.used))
            })
            .collect()
    }
}

impl NvmlInventory {
    fn read_telemetry(nvml: &Nvml) -> Vec<super::GpuTelemetry> {
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok();
                Some(super::GpuTelemetry {
                    index: d.index().unwrap_or(i),
                    uuid: d.uuid().unwrap_or_default(),
                    memory_used_bytes: mem.as_ref().map(|m| m.used).unwrap_or(0),
                    memory_total_bytes: mem.as_ref().map(|m| m.total).unwrap_or(0),
                    utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                    temperature_celsius: d
                        .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                        .ok(),
                    power_milliwatts: d.power_usage().ok(),
                })
            })
            .collect()
    }
}

fn numa_node(dev: &nvml_wrapper::Device<'_>, bus_id: &str) -> Option<i32> {
    if let Ok(n) = dev.numa_node_id() {
        return i32::try_from(n).ok();
    }
    // Older drivers: the kernel knows the PCI device's node ("-1" when there is none).
    let sysfs = format!("/sys/bus/pci/devices/{}/numa_node", sysfs_bus_id(bus_id));
    let n: i32 = std::fs::read_to_string(sysfs).ok()?.trim().parse().ok()?;
    (n >= 0).then_some(n)
}

/// NVML prints "00000000:18:00.0" (8-digit domain); sysfs uses "0000:18:00.0", lowercase.
fn sysfs_bus_id(bus_id: &str) -> String {
    let lower = bus_id.to_ascii_lowercase();
    match lower.split_once(':') {
        Some((domain, rest)) if domain.len() == 8 => format!("{}:{rest}", &domain[4..]),
        _ => lower,
    }
}

fn normalize_bus_id(bus_id: &str) -> String {
    sysfs_bus_id(bus_id.trim_end_matches('\0'))
}

/// Which GPUs reach which over NVLink. A link whose far end is another GPU connects the two; a link
/// whose far end is not a GPU of this node is an NVSwitch, and every GPU with a switch link reaches
/// every other such GPU.
pub(crate) fn nvlink_peers(links: &[(u32, String)], bus_to_index: &HashMap<String, u32>) -> HashMap<u32, Vec<u32>> {
    let mut peers: HashMap<u32, std::collections::BTreeSet<u32>> = HashMap::new();
    let mut switched = std::collections::BTreeSet::new();
    for (from, remote) in links {
        match bus_to_index.get(remote) {
            Some(&to) if to != *from => {
                peers.entry(*from).or_default().insert(to);
                peers.entry(to).or_default().insert(*from);
            }
            Some(_) => {}
            None => {
                switched.insert(*from);
            }
        }
    }
    for &a in &switched {
        for &b in &switched {
            if a != b {
                peers.entry(a).or_default().insert(b);
            }
        }
    }
    peers.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_links_and_switches_make_peers() {
        let bus: HashMap<String, u32> =
            [("0000:18:00.0", 0), ("0000:2a:00.0", 1), ("0000:3a:00.0", 2), ("0000:5d:00.0", 3)]
                .into_iter()
                .map(|(b, i)| (b.to_string(), i))
                .collect();
        // GPU 0 <-> 1 directly; GPUs 2 and 3 through a switch; GPU 0 links to itself oddly (ignored).
        let links = vec![
            (0, "0000:2a:00.0".to_string()),
            (1, "0000:18:00.0".to_string()),
            (2, "0000:c1:00.0".to_string()),
            (3, "0000:c2:00.0".to_string()),
            (0, "0000:18:00.0".to_string()),
        ];
        let p = nvlink_peers(&links, &bus);
        assert_eq!(p[&0], vec![1]);
        assert_eq!(p[&1], vec![0]);
        assert_eq!(p[&2], vec![3]);
        assert_eq!(p[&3], vec![2]);
    }

    #[test]
    fn bus_ids_normalize_to_sysfs_form() {
        assert_eq!(normalize_bus_id("00000000:18:00.0"), "0000:18:00.0");
        assert_eq!(normalize_bus_id("0000:AB:00.0"), "0000:ab:00.0");
    }

    #[test]
    fn without_a_driver_the_inventory_is_empty_and_says_why() {
        // On this machine either NVML loads (a GPU host) or it does not; both must give an answer.
        let inv = NvmlInventory::load().inventory();
        if inv.gpus.is_empty() {
            assert!(!inv.note.is_empty(), "an empty inventory explains itself");
        } else {
            assert_eq!(inv.source, InventorySource::Nvml);
        }
    }
}
