//! The planner's view of the cluster, kept up to date from membership events (never rebuilt from a
//! full list per `Create`): which nodes are schedulable, their GPUs, and which GPUs deployments
//! hold.

use std::collections::HashMap;
use std::net::IpAddr;

use tessera_common::ids::NodeId;
use tessera_common::node::{Capabilities, NodeState};
use tessera_common::plan::placement::{Cluster, ClusterGpu, ClusterNode, peer_mask};

use super::spec::Engine;
use crate::membership::NodeView;

/// What the deployments need of a node besides its GPUs.
#[derive(Debug, Clone)]
pub struct NodeMeta {
    pub id: NodeId,
    pub name: String,
    pub address: IpAddr,
    pub state: NodeState,
    pub is_head: bool,
    pub labels: std::collections::BTreeMap<String, String>,
    pub capabilities: Capabilities,
    /// Engines whose launch failed here for good, with why: kept until the node goes away (a
    /// restarted worker says afresh what it can run).
    pub unusable: Vec<(Engine, String)>,
}

impl NodeMeta {
    /// Why the node cannot run `engine`, if it cannot.
    pub fn cannot_run(&self, engine: Engine) -> Option<String> {
        if let Some((_, why)) = self.unusable.iter().find(|(e, _)| *e == engine) {
            return Some(why.clone());
        }
        let c = &self.capabilities;
        match engine {
            Engine::Vllm => c.vllm_missing().map(str::to_string),
            Engine::Command => c.command_missing().map(str::to_string),
            Engine::Probe => None,
        }
    }
}

#[derive(Default)]
pub struct Inventory {
    cluster: Cluster,
    meta: Vec<NodeMeta>,
    index: HashMap<NodeId, usize>,
    /// GPU uuid -> (node position, GPU position).
    gpus: HashMap<String, (usize, usize)>,
}

/// The planner's view of a membership table: alive, undrained nodes are schedulable.
pub fn cluster_of(nodes: &[NodeView]) -> Cluster {
    Cluster { nodes: nodes.iter().map(cluster_node).collect() }
}

fn cluster_node(n: &NodeView) -> ClusterNode {
    ClusterNode {
        id: n.id.to_string(),
        name: n.info.name.clone(),
        is_head: n.info.is_head,
        schedulable: n.state == NodeState::Alive,
        gpus: n
            .info
            .inventory
            .gpus
            .iter()
            .map(|g| ClusterGpu {
                index: g.index,
                uuid: g.uuid.clone(),
                memory_total_bytes: g.memory_total_bytes,
                nvlink_peers: peer_mask(g.nvlink_peers.iter().copied()),
                reserved: false,
            })
            .collect(),
    }
}

impl Inventory {
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The head's own node, when it is alive (it holds the models that staging sends).
    pub fn head_node(&self) -> Option<&NodeMeta> {
        self.meta.iter().find(|m| m.is_head && matches!(m.state, NodeState::Alive | NodeState::Draining))
    }

    /// The node that holds a deployment's model, when it is alive: the head's own, or the one
    /// `--model-from` names (by name or id).
    pub fn source_of(&self, model_from: &str) -> Option<&NodeMeta> {
        if model_from.is_empty() {
            return self.head_node();
        }
        self.meta.iter().find(|m| {
            (m.name == model_from || m.id.to_string() == model_from)
                && matches!(m.state, NodeState::Alive | NodeState::Draining)
        })
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeMeta> {
        self.index.get(&id).map(|&i| &self.meta[i])
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeMeta> {
        self.meta.iter()
    }

    /// Adds or updates a node; `reserved` says which of its GPUs deployments hold. Returns its
    /// previous state.
    pub fn upsert(&mut self, v: &NodeView, reserved: impl Fn(&str) -> bool) -> Option<NodeState> {
        let id = v.id;
        let meta = NodeMeta {
            id,
            name: v.info.name.clone(),
            address: v.address,
            state: v.state,
            is_head: v.info.is_head,
            labels: v.info.labels.clone(),
            capabilities: v.info.capabilities.clone(),
            unusable: match v.state {
                NodeState::Dead | NodeState::Left => Vec::new(),
                _ => self.index.get(&id).map(|&i| self.meta[i].unusable.clone()).unwrap_or_default(),
            },
        };
        let existed = self.index.contains_key(&id);
        let pos = match self.index.get(&id) {
            Some(&i) => i,
            None => {
                self.cluster.nodes.push(ClusterNode {
                    id: String::new(),
                    name: String::new(),
                    is_head: false,
                    schedulable: false,
                    gpus: Vec::new(),
                });
                self.meta.push(meta.clone());
                self.index.insert(id, self.meta.len() - 1);
                self.meta.len() - 1
            }
        };
        let previous = std::mem::replace(&mut self.meta[pos], meta).state;
        let same_gpus = self.cluster.nodes[pos].gpus.len() == v.info.inventory.gpus.len()
            && self.cluster.nodes[pos].gpus.iter().zip(&v.info.inventory.gpus).all(|(a, b)| a.uuid == b.uuid);
        if same_gpus {
            let n = &mut self.cluster.nodes[pos];
            n.schedulable = v.state == NodeState::Alive;
            n.name.clone_from(&v.info.name);
        } else {
            for g in &self.cluster.nodes[pos].gpus {
                self.gpus.remove(&g.uuid);
            }
            let mut node = cluster_node(v);
            for (gi, g) in node.gpus.iter_mut().enumerate() {
                g.reserved = reserved(&g.uuid);
                self.gpus.insert(g.uuid.clone(), (pos, gi));
            }
            self.cluster.nodes[pos] = node;
        }
        existed.then_some(previous)
    }

    /// Forgets a node (its GPUs with it).
    pub fn remove(&mut self, id: NodeId) {
        let Some(pos) = self.index.remove(&id) else { return };
        for g in &self.cluster.nodes[pos].gpus {
            self.gpus.remove(&g.uuid);
        }
        self.cluster.nodes.swap_remove(pos);
        self.meta.swap_remove(pos);
        if pos < self.meta.len() {
            // The last node moved into `pos`.
            let moved = self.meta[pos].id;
            self.index.insert(moved, pos);
            for (gi, g) in self.cluster.nodes[pos].gpus.iter().enumerate() {
                self.gpus.insert(g.uuid.clone(), (pos, gi));
            }
        }
    }

    /// The node that has GPU `uuid`.
    pub fn node_of_gpu(&self, uuid: &str) -> Option<NodeId> {
        self.gpus.get(uuid).map(|&(n, _)| self.meta[n].id)
    }

    pub fn set_reserved(&mut self, uuid: &str, reserved: bool) {
        if let Some(&(n, g)) = self.gpus.get(uuid) {
            self.cluster.nodes[n].gpus[g].reserved = reserved;
        }
    }

    /// Runs `f` on the cluster with `gpus` shown free (a deployment planning again over its own
    /// reservation), then puts the flags back.
    pub fn with_free<R>(&mut self, gpus: &[String], f: impl FnOnce(&Cluster) -> R) -> R {
        let changed: Vec<(usize, usize)> = gpus
            .iter()
            .filter_map(|u| self.gpus.get(u).copied())
            .filter(|&(n, g)| self.cluster.nodes[n].gpus[g].reserved)
            .collect();
        for &(n, g) in &changed {
            self.cluster.nodes[n].gpus[g].reserved = false;
        }
        let r = f(&self.cluster);
        for &(n, g) in &changed {
            self.cluster.nodes[n].gpus[g].reserved = true;
        }
        r
    }

    /// Runs `f` with the nodes that cannot run `engine` shown unschedulable (the planner places
    /// only on capable nodes), then puts the flags back.
    pub fn for_engine<R>(&mut self, engine: Engine, f: impl FnOnce(&mut Self) -> R) -> R {
        self.for_nodes(engine, &std::collections::BTreeMap::new(), f)
    }

    /// [`Inventory::for_engine`], also without the nodes that lack a label of `selector`.
    pub fn for_nodes<R>(
        &mut self,
        engine: Engine,
        selector: &std::collections::BTreeMap<String, String>,
        f: impl FnOnce(&mut Self) -> R,
    ) -> R {
        let masked: Vec<usize> = (0..self.meta.len())
            .filter(|&i| {
                self.cluster.nodes[i].schedulable
                    && (self.meta[i].cannot_run(engine).is_some() || !selects(selector, &self.meta[i].labels))
            })
            .collect();
        for &i in &masked {
            self.cluster.nodes[i].schedulable = false;
        }
        let r = f(self);
        for &i in &masked {
            self.cluster.nodes[i].schedulable = true;
        }
        r
    }

    /// `node` cannot run `engine` after all (its launch said so): until it joins again (and says
    /// what it can run then), the planner does not place that engine there.
    pub fn mark_incapable(&mut self, node: NodeId, engine: Engine, why: String) {
        let Some(&i) = self.index.get(&node) else { return };
        let m = &mut self.meta[i];
        if !m.unusable.iter().any(|(e, _)| *e == engine) {
            m.unusable.push((engine, why));
        }
    }

    /// Schedulable nodes that have every label of `selector`.
    pub fn selected(&self, selector: &std::collections::BTreeMap<String, String>) -> usize {
        (0..self.meta.len())
            .filter(|&i| self.cluster.nodes[i].schedulable && selects(selector, &self.meta[i].labels))
            .count()
    }

    /// Alive nodes that cannot run `engine`, with why (sorted by name), and how many can.
    pub fn incapable(&self, engine: Engine) -> (Vec<String>, usize) {
        let mut why = Vec::new();
        let mut capable = 0;
        for (i, m) in self.meta.iter().enumerate() {
            if !self.cluster.nodes[i].schedulable {
                continue;
            }
            match m.cannot_run(engine) {
                Some(w) => why.push(format!("{}: {w}", m.name)),
                None => capable += 1,
            }
        }
        why.sort();
        (why, capable)
    }

    /// Runs `f` on the cluster as if nothing were reserved: can this ever fit?
    pub fn with_all_free<R>(&mut self, f: impl FnOnce(&Cluster) -> R) -> R {
        let all: Vec<String> = self.gpus.keys().cloned().collect();
        self.with_free(&all, f)
    }

    /// A cluster of only `gpus` (free) on their nodes, when every one of them is on a schedulable
    /// node: planning on it keeps a restarting group where it was.
    pub fn only(&self, gpus: &[String]) -> Option<Cluster> {
        let mut nodes: Vec<ClusterNode> = Vec::new();
        let mut pos_of: HashMap<usize, usize> = HashMap::new();
        for u in gpus {
            let &(n, g) = self.gpus.get(u)?;
            let src = &self.cluster.nodes[n];
            if !src.schedulable {
                return None;
            }
            let at = *pos_of.entry(n).or_insert_with(|| {
                nodes.push(ClusterNode {
                    id: src.id.clone(),
                    name: src.name.clone(),
                    is_head: src.is_head,
                    schedulable: true,
                    gpus: Vec::new(),
                });
                nodes.len() - 1
            });
            let mut gpu = src.gpus[g].clone();
            gpu.reserved = false;
            nodes[at].gpus.push(gpu);
        }
        for n in &mut nodes {
            n.gpus.sort_by_key(|g| g.index);
        }
        Some(Cluster { nodes })
    }
}

/// Whether `labels` has every `key=value` of `selector`.
pub fn selects(
    selector: &std::collections::BTreeMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
