//! Nodes, GPUs and inventories as the rest of Tessera sees them, and their proto conversions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tessera_proto::v1 as pb;

use crate::validate::{self, FieldError};

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub compute_capability: (u32, u32),
    pub pci_bus_id: String,
    pub numa_node: Option<i32>,
    /// Indices of the GPUs on the same node that an active NVLink reaches.
    pub nvlink_peers: Vec<u32>,
    pub mig_enabled: bool,
    /// Made up by `--fake-gpus`.
    pub fake: bool,
}

/// Where an inventory came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InventorySource {
    Nvml,
    Fake,
    /// No GPU driver on this machine: a CPU-only node.
    None,
}

impl InventorySource {
    pub fn as_str(self) -> &'static str {
        match self {
            InventorySource::Nvml => "nvml",
            InventorySource::Fake => "fake",
            InventorySource::None => "none",
        }
    }
}

/// A node's GPU inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
    pub driver_version: String,
    pub cuda_driver_version: String,
    pub source: InventorySource,
    /// Why the inventory is empty or partial.
    pub note: String,
}

impl Inventory {
    pub fn empty(note: impl Into<String>) -> Self {
        Inventory {
            gpus: Vec::new(),
            driver_version: String::new(),
            cuda_driver_version: String::new(),
            source: InventorySource::None,
            note: note.into(),
        }
    }

    pub fn memory_total_bytes(&self) -> u64 {
        self.gpus.iter().fold(0u64, |a, g| a.saturating_add(g.memory_total_bytes))
    }
}

/// The most GPUs one node may report; far above any real machine, it bounds hostile input.
pub const MAX_GPUS_PER_NODE: usize = 64;

impl From<&Gpu> for pb::Gpu {
    fn from(g: &Gpu) -> Self {
        pb::Gpu {
            index: g.index,
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            memory_total_bytes: g.memory_total_bytes,
            memory_used_bytes: g.memory_used_bytes,
            compute_capability_major: g.compute_capability.0,
            compute_capability_minor: g.compute_capability.1,
            pci_bus_id: g.pci_bus_id.clone(),
            numa_node: g.numa_node,
            nvlink_peers: g.nvlink_peers.clone(),
            mig_enabled: g.mig_enabled,
            fake: g.fake,
        }
    }
}

impl From<&Inventory> for pb::Inventory {
    fn from(i: &Inventory) -> Self {
        pb::Inventory {
            gpus: i.gpus.iter().map(pb::Gpu::from).collect(),
            driver_version: i.driver_version.clone(),
            cuda_driver_version: i.cuda_driver_version.clone(),
            source: i.source.as_str().to_string(),
            note: i.note.clone(),
        }
    }
}

impl TryFrom<pb::Inventory> for Inventory {
    type Error = FieldError;

    fn try_from(p: pb::Inventory) -> Result<Self, FieldError> {
        if p.gpus.len() > MAX_GPUS_PER_NODE {
            return Err(FieldError::new(
                "inventory.gpus",
                format!("{} GPUs reported; at most {MAX_GPUS_PER_NODE} per node", p.gpus.len()),
            ));
        }
        let source = match p.source.as_str() {
            "nvml" => InventorySource::Nvml,
            "fake" => InventorySource::Fake,
            "none" | "" => InventorySource::None,
            other => {
                return Err(FieldError::new("inventory.source", format!("{other:?} is not one of nvml, fake, none")));
            }
        };
        let count = p.gpus.len() as u32;
        let mut gpus = Vec::with_capacity(p.gpus.len());
        let mut seen = std::collections::HashSet::new();
        let mut uuids = std::collections::HashSet::new();
        for (i, g) in p.gpus.into_iter().enumerate() {
            let field = |f: &str| format!("inventory.gpus[{i}].{f}");
            if !seen.insert(g.index) {
                return Err(FieldError::new(field("index"), format!("index {} appears twice", g.index)));
            }
            validate::max_len(&field("uuid"), &g.uuid, 128)?;
            if g.uuid.is_empty() {
                return Err(FieldError::new(field("uuid"), "is empty; every GPU needs its UUID"));
            }
            if !uuids.insert(g.uuid.clone()) {
                return Err(FieldError::new(field("uuid"), format!("{} appears twice on this node", g.uuid)));
            }
            validate::max_len(&field("name"), &g.name, 256)?;
            validate::max_len(&field("pci_bus_id"), &g.pci_bus_id, 64)?;
            if g.memory_used_bytes > g.memory_total_bytes {
                return Err(FieldError::new(
                    field("memory_used_bytes"),
                    format!("{} exceeds memory_total_bytes {}", g.memory_used_bytes, g.memory_total_bytes),
                ));
            }
            if g.nvlink_peers.len() > MAX_GPUS_PER_NODE {
                return Err(FieldError::new(field("nvlink_peers"), "more peers than GPUs a node may have"));
            }
            if let Some(bad) = g.nvlink_peers.iter().find(|&&p| p >= count.max(MAX_GPUS_PER_NODE as u32)) {
                return Err(FieldError::new(field("nvlink_peers"), format!("peer index {bad} is out of range")));
            }
            gpus.push(Gpu {
                index: g.index,
                uuid: g.uuid,
                name: g.name,
                memory_total_bytes: g.memory_total_bytes,
                memory_used_bytes: g.memory_used_bytes,
                compute_capability: (g.compute_capability_major, g.compute_capability_minor),
                pci_bus_id: g.pci_bus_id,
                numa_node: g.numa_node,
                nvlink_peers: g.nvlink_peers,
                mig_enabled: g.mig_enabled,
                fake: g.fake,
            });
        }
        validate::max_len("inventory.driver_version", &p.driver_version, 64)?;
        validate::max_len("inventory.cuda_driver_version", &p.cuda_driver_version, 64)?;
        validate::max_len("inventory.note", &p.note, 1024)?;
        Ok(Inventory {
            gpus,
            driver_version: p.driver_version,
            cuda_driver_version: p.cuda_driver_version,
            source,
            note: p.note,
        })
    }
}

/// A node's state as shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Alive,
    Suspect,
    Dead,
    Left,
    Draining,
    /// Alive, but not approved by an operator yet (`--node-approval manual`).
    PendingApproval,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Alive => "alive",
            NodeState::Suspect => "suspect",
            NodeState::Dead => "dead",
            NodeState::Left => "left",
            NodeState::Draining => "draining",
            NodeState::PendingApproval => "pending-approval",
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<NodeState> for pb::NodeState {
    fn from(s: NodeState) -> Self {
        match s {
            NodeState::Alive => pb::NodeState::Alive,
            NodeState::Suspect => pb::NodeState::Suspect,
            NodeState::Dead => pb::NodeState::Dead,
            NodeState::Left => pb::NodeState::Left,
            NodeState::Draining => pb::NodeState::Draining,
            NodeState::PendingApproval => pb::NodeState::PendingApproval,
        }
    }
}

impl TryFrom<pb::NodeState> for NodeState {
    type Error = FieldError;
    fn try_from(s: pb::NodeState) -> Result<Self, FieldError> {
        Ok(match s {
            pb::NodeState::Alive => NodeState::Alive,
            pb::NodeState::Suspect => NodeState::Suspect,
            pb::NodeState::Dead => NodeState::Dead,
            pb::NodeState::Left => NodeState::Left,
            pb::NodeState::Draining => NodeState::Draining,
            pb::NodeState::PendingApproval => NodeState::PendingApproval,
            pb::NodeState::Unspecified => {
                return Err(FieldError::new("state", "unspecified node state"));
            }
        })
    }
}

/// What a worker says about itself when it joins, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinInfo {
    pub node_id: Option<crate::ids::NodeId>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub advertise_address: Option<std::net::IpAddr>,
    pub inventory: Inventory,
    pub version: String,
    pub is_head: bool,
    pub machine_fingerprint: String,
    pub hostname: String,
    pub capabilities: Capabilities,
}

/// The engines a node can run (its worker says so when it joins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// vLLM's version, or why vllm cannot run there.
    pub vllm: Result<String, String>,
    pub command_allowed: bool,
    /// False for a worker that predates capabilities: every engine is assumed.
    pub reported: bool,
    /// The node's model transfer server's port (0: it cannot take part in staging).
    pub transfer_port: u16,
}

impl Default for Capabilities {
    /// What a worker that says nothing is assumed to run: everything.
    fn default() -> Self {
        Capabilities { vllm: Ok(String::new()), command_allowed: true, reported: false, transfer_port: 0 }
    }
}

impl Capabilities {
    /// Longest vLLM version and reason kept from a worker.
    const MAX_VERSION: usize = 64;
    const MAX_REASON: usize = 512;

    /// From the wire: a worker's strings are bounded and stripped of control characters.
    pub fn from_pb(c: Option<&pb::Capabilities>) -> Capabilities {
        let Some(c) = c else { return Capabilities::default() };
        let clean = |s: &str, max: usize| -> String { s.chars().filter(|c| !c.is_control()).take(max).collect() };
        let vllm = if !c.vllm_version.is_empty() {
            Ok(clean(&c.vllm_version, Self::MAX_VERSION))
        } else if c.vllm_missing.is_empty() {
            Err("the node did not say why vllm cannot run there".into())
        } else {
            Err(clean(&c.vllm_missing, Self::MAX_REASON))
        };
        let transfer_port = u16::try_from(c.transfer_port).unwrap_or(0);
        Capabilities { vllm, command_allowed: c.command_allowed, reported: true, transfer_port }
    }

    pub fn to_pb(&self) -> Option<pb::Capabilities> {
        self.reported.then(|| pb::Capabilities {
            vllm_version: self.vllm.clone().unwrap_or_default(),
            vllm_missing: self.vllm.clone().err().unwrap_or_default(),
            command_allowed: self.command_allowed,
            transfer_port: self.transfer_port as u32,
        })
    }

    /// Why the node cannot run vllm, if it cannot.
    pub fn vllm_missing(&self) -> Option<&str> {
        self.vllm.as_ref().err().map(String::as_str)
    }

    /// Why the node cannot run the command engine, if it cannot.
    pub fn command_missing(&self) -> Option<&'static str> {
        (!self.command_allowed)
            .then_some("the worker does not allow the command engine (start it with --allow-command)")
    }
}

impl TryFrom<pb::JoinRequest> for JoinInfo {
    type Error = FieldError;

    fn try_from(p: pb::JoinRequest) -> Result<Self, FieldError> {
        let node_id = if p.node_id.is_empty() {
            None
        } else {
            Some(
                uuid::Uuid::parse_str(&p.node_id)
                    .map(crate::ids::NodeId)
                    .map_err(|e| FieldError::new("join.node_id", format!("{:?} is not a UUID: {e}", p.node_id)))?,
            )
        };
        validate::node_name("join.name", &p.name)?;
        validate::labels("join.labels", &p.labels)?;
        let advertise_address = if p.advertise_address.is_empty() {
            None
        } else {
            Some(p.advertise_address.parse().map_err(|_| {
                FieldError::new("join.advertise_address", format!("{:?} is not an IP address", p.advertise_address))
            })?)
        };
        validate::max_len("join.version", &p.version, 64)?;
        validate::max_len("join.machine_fingerprint", &p.machine_fingerprint, 512)?;
        validate::max_len("join.hostname", &p.hostname, 255)?;
        let inventory =
            p.inventory.map(Inventory::try_from).transpose()?.unwrap_or_else(|| Inventory::empty("no inventory sent"));
        Ok(JoinInfo {
            node_id,
            name: p.name,
            labels: p.labels.into_iter().collect(),
            advertise_address,
            inventory,
            version: p.version,
            is_head: p.is_head,
            machine_fingerprint: p.machine_fingerprint,
            hostname: p.hostname,
            capabilities: Capabilities::from_pb(p.capabilities.as_ref()),
        })
    }
}

impl From<&JoinInfo> for pb::JoinRequest {
    fn from(j: &JoinInfo) -> Self {
        pb::JoinRequest {
            node_id: j.node_id.map(|u| u.to_string()).unwrap_or_default(),
            name: j.name.clone(),
            labels: j.labels.clone().into_iter().collect(),
            advertise_address: j.advertise_address.map(|a| a.to_string()).unwrap_or_default(),
            inventory: Some((&j.inventory).into()),
            version: j.version.clone(),
            is_head: j.is_head,
            machine_fingerprint: j.machine_fingerprint.clone(),
            hostname: j.hostname.clone(),
            shards: Vec::new(),
            node_secret: String::new(),
            capabilities: j.capabilities.to_pb(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> pb::Gpu {
        pb::Gpu { index, uuid: format!("GPU-{index}"), memory_total_bytes: 80 << 30, ..Default::default() }
    }

    #[test]
    fn inventory_round_trips_through_proto() {
        let inv = Inventory {
            gpus: vec![Gpu {
                index: 0,
                uuid: "GPU-x".into(),
                name: "H100".into(),
                memory_total_bytes: 80 << 30,
                memory_used_bytes: 1 << 30,
                compute_capability: (9, 0),
                pci_bus_id: "00000000:18:00.0".into(),
                numa_node: Some(1),
                nvlink_peers: vec![],
                mig_enabled: false,
                fake: false,
            }],
            driver_version: "550.54.15".into(),
            cuda_driver_version: "12.4".into(),
            source: InventorySource::Nvml,
            note: String::new(),
        };
        let back = Inventory::try_from(pb::Inventory::from(&inv)).expect("valid");
        assert_eq!(back, inv);
    }

    #[test]
    fn inventory_rejects_duplicate_indices_and_bad_memory() {
        let dup = pb::Inventory { gpus: vec![gpu(0), gpu(0)], source: "fake".into(), ..Default::default() };
        let e = Inventory::try_from(dup).expect_err("duplicate");
        assert_eq!(e.field, "inventory.gpus[1].index");

        let mut g = gpu(0);
        g.memory_used_bytes = g.memory_total_bytes + 1;
        let e = Inventory::try_from(pb::Inventory { gpus: vec![g], ..Default::default() }).expect_err("used > total");
        assert_eq!(e.field, "inventory.gpus[0].memory_used_bytes");

        let many = pb::Inventory { gpus: (0..65).map(gpu).collect(), ..Default::default() };
        assert_eq!(Inventory::try_from(many).expect_err("too many").field, "inventory.gpus");

        let mut twin = gpu(1);
        twin.uuid = "GPU-0".into();
        let e =
            Inventory::try_from(pb::Inventory { gpus: vec![gpu(0), twin], ..Default::default() }).expect_err("uuid");
        assert_eq!(e.field, "inventory.gpus[1].uuid");
        let mut nameless = gpu(0);
        nameless.uuid.clear();
        let e = Inventory::try_from(pb::Inventory { gpus: vec![nameless], ..Default::default() }).expect_err("empty");
        assert_eq!(e.field, "inventory.gpus[0].uuid");
    }

    #[test]
    fn memory_totals_saturate() {
        let mut inv = Inventory::empty("");
        for i in 0..3 {
            inv.gpus.push(Gpu {
                index: i,
                uuid: format!("GPU-{i}"),
                name: String::new(),
                memory_total_bytes: u64::MAX,
                memory_used_bytes: 0,
                compute_capability: (0, 0),
                pci_bus_id: String::new(),
                numa_node: None,
                nvlink_peers: vec![],
                mig_enabled: false,
                fake: true,
            });
        }
        assert_eq!(inv.memory_total_bytes(), u64::MAX);
    }

    #[test]
    fn join_validates_each_field_by_name() {
        let ok = pb::JoinRequest { name: "node-a".into(), ..Default::default() };
        assert!(JoinInfo::try_from(ok.clone()).is_ok());

        let cases: Vec<(pb::JoinRequest, &str)> = vec![
            (pb::JoinRequest { node_id: "nope".into(), ..ok.clone() }, "join.node_id"),
            (pb::JoinRequest { name: "".into(), ..ok.clone() }, "join.name"),
            (pb::JoinRequest { name: "Bad Name!".into(), ..ok.clone() }, "join.name"),
            (pb::JoinRequest { advertise_address: "10.0.0.300".into(), ..ok.clone() }, "join.advertise_address"),
            (pb::JoinRequest { labels: [("".to_string(), "v".to_string())].into(), ..ok.clone() }, "join.labels"),
        ];
        for (req, field) in cases {
            let e = JoinInfo::try_from(req).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }
}
