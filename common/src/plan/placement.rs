//! Placement: every rank of a TP x PP world on a concrete GPU. A pure function of the inventory.
//!
//! vLLM without Ray runs one process per node, each node holding `world / nnodes` consecutive
//! ranks (rank = pp_rank * tp + tp_rank). So placement picks `nnodes` and the nodes, then the GPUs
//! on each. The rules, in order: TP groups stay inside a node; as few nodes as possible; the head
//! hosts node rank 0 when it can; on a node, each TP group on NVLink-connected GPUs when there is a
//! choice; among equal choices the node with the fewest free GPUs that suffice (keeps big nodes
//! whole), then by name. Same input, same answer; a reserved GPU is never chosen.

use std::collections::HashSet;

use serde::Serialize;

use crate::size::HumanBytes;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterGpu {
    pub index: u32,
    pub uuid: String,
    pub memory_total_bytes: u64,
    /// Bit `i` set: GPU index `i` of the same node is an NVLink peer (indices are below 64, the
    /// most GPUs a node may have). A mask, not a list: a 10,000-node inventory is 80,000 of these.
    pub nvlink_peers: u64,
    /// Already held by a deployment.
    pub reserved: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub id: String,
    pub name: String,
    pub is_head: bool,
    /// Alive and not draining: new work may go here.
    pub schedulable: bool,
    pub gpus: Vec<ClusterGpu>,
}

impl ClusterNode {
    fn free(&self) -> usize {
        if self.schedulable { self.gpus.iter().filter(|g| !g.reserved).count() } else { 0 }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
}

impl Cluster {
    /// `nodes` identical nodes of `gpus` GPUs with `memory` bytes each, fully NVLinked; the first
    /// is the head. This is what `tessera plan --gpus 2x8x80GiB` plans against.
    pub fn uniform(nodes: u32, gpus: u32, memory: u64) -> Cluster {
        Cluster {
            nodes: (0..nodes)
                .map(|n| ClusterNode {
                    id: format!("node-{n}"),
                    name: format!("node-{n}"),
                    is_head: n == 0,
                    schedulable: true,
                    gpus: (0..gpus)
                        .map(|i| ClusterGpu {
                            index: i,
                            uuid: format!("GPU-node{n}-{i}"),
                            memory_total_bytes: memory,
                            nvlink_peers: peer_mask((0..gpus).filter(|&p| p != i)),
                            reserved: false,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Parses `NODESxGPUSxMEMORY` (`2x8x80GiB`) for [`Cluster::uniform`].
    pub fn parse_spec(s: &str) -> Result<(u32, u32, u64), String> {
        let err = |why: &str| format!("invalid --gpus {s:?}: {why}; write NODESxGPUSxMEMORY, e.g. 2x8x80GiB");
        let parts: Vec<&str> = s.trim().splitn(3, ['x', 'X']).collect();
        let [nodes, gpus, mem] = parts.as_slice() else {
            return Err(err("three parts are needed"));
        };
        let nodes: u32 = nodes.trim().parse().map_err(|_| err("the node count is not a whole number"))?;
        let gpus: u32 = gpus.trim().parse().map_err(|_| err("the GPU count is not a whole number"))?;
        if nodes == 0 || gpus == 0 || nodes > 100_000 || gpus > 64 {
            return Err(err("nodes must be 1-100000 and GPUs per node 1-64"));
        }
        let mem = crate::size::parse_size(mem).map_err(|e| err(&e.to_string()))?;
        if mem == 0 {
            return Err(err("memory must be more than 0"));
        }
        Ok((nodes, gpus, mem))
    }

    pub fn free_gpus(&self) -> usize {
        self.nodes.iter().map(ClusterNode::free).sum()
    }

    /// Most free GPUs on one schedulable node.
    pub fn max_free_per_node(&self) -> usize {
        self.nodes.iter().map(ClusterNode::free).max().unwrap_or(0)
    }

    /// Smallest memory among free GPUs of schedulable nodes (a conservative figure for sizing).
    pub fn min_free_gpu_memory(&self) -> Option<u64> {
        self.nodes
            .iter()
            .filter(|n| n.schedulable)
            .flat_map(|n| n.gpus.iter().filter(|g| !g.reserved))
            .map(|g| g.memory_total_bytes)
            .min()
    }
}

/// The mask of peer GPU indices (indices of 64 or more are ignored: no node has that many).
pub fn peer_mask(peers: impl IntoIterator<Item = u32>) -> u64 {
    peers.into_iter().filter(|&p| p < 64).fold(0u64, |m, p| m | (1u64 << p))
}

fn has_peer(mask: u64, index: u32) -> bool {
    index < 64 && mask & (1u64 << index) != 0
}

/// Where one rank runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RankPlacement {
    pub rank: u64,
    pub tp_rank: u64,
    pub pp_rank: u64,
    pub node: String,
    pub node_id: String,
    pub node_rank: u64,
    pub gpu_index: u32,
    pub gpu_uuid: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub ranks: Vec<RankPlacement>,
    pub nnodes: u64,
    pub gpus_per_node: u64,
    /// True when a TP group spans nodes (allowed only without strict placement).
    pub tp_spans_nodes: bool,
    /// Smallest memory among the chosen GPUs.
    pub gpu_memory_bytes: u64,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{0}")]
    Insufficient(String),
}

/// Places `tp * pp` ranks. `strict`: never let a TP group span nodes.
pub fn place(cluster: &Cluster, tp: u64, pp: u64, strict: bool) -> Result<Placement, PlacementError> {
    let world = tp * pp;
    if world == 0 {
        return Err(PlacementError::Insufficient("tensor and pipeline parallel sizes must be at least 1".into()));
    }
    let free: Vec<usize> = cluster.nodes.iter().map(ClusterNode::free).collect();
    let divisors: Vec<u64> = (1..=world).filter(|k| world.is_multiple_of(*k)).collect();
    // First TP-inside-a-node layouts, fewest nodes first; then (unless strict) layouts where a TP
    // group spans nodes.
    for spanning in [false, true] {
        if spanning && strict {
            break;
        }
        for &k in &divisors {
            let g = world / k;
            if g.is_multiple_of(tp) == spanning {
                continue;
            }
            if let Some(nodes) = pick_nodes(cluster, &free, k as usize, g as usize) {
                return Ok(assign(cluster, &nodes, tp, g, spanning));
            }
        }
    }
    Err(PlacementError::Insufficient(shortfall(cluster, &free, tp, world, strict)))
}

/// The `k` nodes for `g` GPUs each, node rank 0 first; `None` if fewer than `k` can host `g`.
fn pick_nodes(cluster: &Cluster, free: &[usize], k: usize, g: usize) -> Option<Vec<usize>> {
    let mut eligible: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| free[i] >= g).collect();
    if eligible.len() < k {
        return None;
    }
    let key = |&i: &usize| {
        let n = &cluster.nodes[i];
        (!n.is_head, free[i], n.name.as_str(), n.id.as_str())
    };
    if eligible.len() > k {
        eligible.select_nth_unstable_by(k - 1, |a, b| key(a).cmp(&key(b)));
        eligible.truncate(k);
    }
    eligible.sort_by(|a, b| key(a).cmp(&key(b)));
    Some(eligible)
}

fn assign(cluster: &Cluster, nodes: &[usize], tp: u64, g: u64, spanning: bool) -> Placement {
    let mut ranks = Vec::with_capacity((g as usize) * nodes.len());
    let mut warnings = Vec::new();
    let mut min_mem = u64::MAX;
    let group = if spanning { g } else { tp };
    for (node_rank, &ni) in nodes.iter().enumerate() {
        let node = &cluster.nodes[ni];
        let (gpus, linked) = choose_gpus(node, g as usize, group as usize);
        if !linked && group > 1 {
            warnings.push(format!(
                "node {}: no {group} free GPUs all connected by NVLink; a TP group there talks over PCIe (slower)",
                node.name
            ));
        }
        for (j, gpu) in gpus.iter().enumerate() {
            let rank = node_rank as u64 * g + j as u64;
            min_mem = min_mem.min(gpu.memory_total_bytes);
            ranks.push(RankPlacement {
                rank,
                tp_rank: rank % tp,
                pp_rank: rank / tp,
                node: node.name.clone(),
                node_id: node.id.clone(),
                node_rank: node_rank as u64,
                gpu_index: gpu.index,
                gpu_uuid: gpu.uuid.clone(),
            });
        }
    }
    if spanning {
        warnings.push(format!(
            "tensor parallel size {tp} is more than the {g} GPUs per node this placement uses: each TP group spans nodes and all-reduces over the network (slow); use --strict to refuse, or fewer TP ranks and more pipeline stages"
        ));
    }
    Placement {
        ranks,
        nnodes: nodes.len() as u64,
        gpus_per_node: g,
        tp_spans_nodes: spanning,
        gpu_memory_bytes: if min_mem == u64::MAX { 0 } else { min_mem },
        warnings,
    }
}

/// `g` free GPUs of `node` in rank order, in groups of `group` that are NVLink cliques when the node
/// has them; the flag says whether every group is one.
fn choose_gpus(node: &ClusterNode, g: usize, group: usize) -> (Vec<&ClusterGpu>, bool) {
    let mut remaining: Vec<&ClusterGpu> = node.gpus.iter().filter(|x| !x.reserved).collect();
    remaining.sort_by_key(|x| x.index);
    let mut out = Vec::with_capacity(g);
    let mut all_linked = true;
    let group = group.max(1);
    for _ in 0..g.div_ceil(group) {
        let want = group.min(g - out.len());
        let picked = clique(&remaining, want).unwrap_or_else(|| {
            all_linked = false;
            (0..want).collect()
        });
        let chosen: HashSet<usize> = picked.iter().copied().collect();
        out.extend(picked.iter().map(|&i| remaining[i]));
        remaining = remaining.into_iter().enumerate().filter(|(i, _)| !chosen.contains(i)).map(|(_, x)| x).collect();
    }
    (out, all_linked)
}

/// Positions in `gpus` of `want` GPUs that all reach each other over NVLink: greedy from each
/// start in index order, so the answer is deterministic and favours low indices.
fn clique(gpus: &[&ClusterGpu], want: usize) -> Option<Vec<usize>> {
    if want <= 1 {
        return (gpus.len() >= want).then(|| (0..want).collect());
    }
    let linked =
        |a: &ClusterGpu, b: &ClusterGpu| has_peer(a.nvlink_peers, b.index) && has_peer(b.nvlink_peers, a.index);
    for start in 0..gpus.len() {
        let mut chosen = vec![start];
        for c in 0..gpus.len() {
            if chosen.len() == want {
                break;
            }
            if c != start && chosen.iter().all(|&x| linked(gpus[x], gpus[c])) {
                chosen.push(c);
            }
        }
        if chosen.len() == want {
            chosen.sort_unstable();
            return Some(chosen);
        }
    }
    None
}

/// "need 16 GPUs as 2 nodes x 8; free: node-a 8, node-b 4, node-c 4"
fn shortfall(cluster: &Cluster, free: &[usize], tp: u64, world: u64, strict: bool) -> String {
    let largest = cluster.nodes.iter().filter(|n| n.schedulable).map(|n| n.gpus.len() as u64).max().unwrap_or(0);
    let layouts: Vec<u64> = (1..=world).filter(|k| world.is_multiple_of(*k)).collect();
    let need = layouts
        .iter()
        .find(|&&k| (world / k).is_multiple_of(tp) && world / k <= largest.max(1))
        .or_else(|| if strict { None } else { layouts.iter().find(|&&k| world / k <= largest.max(1)) })
        .map(|&k| {
            let g = world / k;
            format!("need {world} GPUs as {k} node{} x {g}", if k == 1 { "" } else { "s" })
        })
        .unwrap_or_else(|| {
            format!("need {world} GPUs with each TP group of {tp} inside one node, but no node has {tp} GPUs")
        });
    let mut nodes: Vec<(usize, &ClusterNode)> =
        cluster.nodes.iter().enumerate().filter(|(_, n)| n.schedulable).collect();
    nodes.sort_by(|(a, x), (b, y)| free[*b].cmp(&free[*a]).then_with(|| x.name.cmp(&y.name)));
    let shown: Vec<String> = nodes.iter().take(8).map(|(i, n)| format!("{} {}", n.name, free[*i])).collect();
    let mut s = if shown.is_empty() {
        format!("{need}; no schedulable node has GPUs (nodes must be alive and not draining)")
    } else {
        format!("{need}; free: {}", shown.join(", "))
    };
    if nodes.len() > 8 {
        s.push_str(&format!(" and {} more nodes with fewer", nodes.len() - 8));
    }
    let unschedulable = cluster.nodes.iter().filter(|n| !n.schedulable && !n.gpus.is_empty()).count();
    if unschedulable > 0 {
        s.push_str(&format!(" ({unschedulable} node(s) with GPUs are dead, left or draining)"));
    }
    s
}

/// A short line for reports: "2 nodes x 8 GPUs (80GiB each)".
pub fn describe(p: &Placement) -> String {
    format!(
        "{} node{} x {} GPU{} ({} each)",
        p.nnodes,
        if p.nnodes == 1 { "" } else { "s" },
        p.gpus_per_node,
        if p.gpus_per_node == 1 { "" } else { "s" },
        HumanBytes(p.gpu_memory_bytes)
    )
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
