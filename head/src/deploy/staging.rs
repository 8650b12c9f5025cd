//! Weight staging, the head's part: which files each node of a generation needs, who it fetches
//! them from, and how far every node got. Pure functions and plain data, used by the machine.
//!
//! A node needs the model's small files (everything that is not a safetensors file) and each
//! safetensors file holding a tensor of its pipeline stages: decoder layer `n` goes to the stage
//! whose layer range holds it (a layer past the model's count, e.g. DeepSeek's MTP layer, to the
//! last), the token embeddings to the first stage (and to the last when the embeddings are tied),
//! the final norm and output head to the last, and tensors of no known part to every stage.
//!
//! Fan-out: for each file, the nodes that need it form a chain in node-rank order; the first
//! fetches from the source, each other one from the node before it (which serves the file as it
//! arrives), with the source as the fallback. So a file leaves the source once.

use std::collections::BTreeMap;
use std::net::IpAddr;

use sha2::{Digest, Sha256};
use tessera_common::ids::NodeId;
use tessera_common::plan::partition::Stage;
use tessera_proto::v1 as pb;
use tokio::time::Instant;

/// A worker's staging message, for the machine.
#[derive(Debug)]
pub enum StagingMsg {
    Index(Box<pb::ModelIndex>),
    Progress(Box<pb::StageProgress>),
}

/// The largest file and chunk a model may have (1 PiB, 1 GiB): sums of sizes never overflow.
pub const MAX_FILE_BYTES: u64 = 1 << 50;
pub const MAX_CHUNK_BYTES: u64 = 1 << 30;

/// Most files a model may have (the source refuses more, too).
pub const MAX_FILES: usize = 4096;

/// One receiving node's staging.
#[derive(Debug, Clone)]
pub struct NodeStage {
    pub name: String,
    pub key: String,
    pub bytes_needed: u64,
    pub files_needed: u32,
    pub bytes_done: u64,
    pub files_done: u32,
    pub chunks_refetched: u32,
    pub rate: u64,
    pub last: Option<(Instant, u64)>,
    pub done: bool,
    /// What the node was told, to tell it again when it rejoins (a restarted worker resumes).
    pub msg: pb::StageModel,
}

/// The staging of one generation.
#[derive(Debug, Clone)]
pub struct Staging {
    pub token: String,
    pub source: NodeId,
    pub source_name: String,
    /// Hashed / total bytes at the source while it indexes.
    pub hashed: (u64, u64),
    pub indexed: bool,
    pub model_bytes: u64,
    pub nodes: BTreeMap<NodeId, NodeStage>,
    /// Every node has its files: the generation launches.
    pub done: bool,
    /// The last time any node moved (hashed or staged more bytes).
    pub last_progress: Instant,
}

impl Staging {
    pub fn new(source: NodeId, source_name: String, now: Instant) -> Staging {
        use rand::Rng;
        let bytes: [u8; 32] = rand::rng().random();
        Staging {
            token: hex(&bytes),
            source,
            source_name,
            hashed: (0, 0),
            indexed: false,
            model_bytes: 0,
            nodes: BTreeMap::new(),
            done: false,
            last_progress: now,
        }
    }

    /// Nodes taking part now (the source while it indexes or serves, the receivers).
    pub fn participants(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = std::iter::once(self.source).chain(self.nodes.keys().copied()).collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn to_pb(&self) -> Vec<pb::NodeStaging> {
        let mut out = vec![pb::NodeStaging {
            node: self.source_name.clone(),
            node_id: self.source.to_string(),
            phase: if self.indexed { "source" } else { "hashing" }.into(),
            bytes_needed: self.hashed.1,
            bytes_done: self.hashed.0,
            model_bytes: self.model_bytes,
            ..Default::default()
        }];
        out.extend(self.nodes.iter().map(|(id, n)| pb::NodeStaging {
            node: n.name.clone(),
            node_id: id.to_string(),
            phase: if n.done { "done" } else { "fetching" }.into(),
            bytes_needed: n.bytes_needed,
            bytes_done: n.bytes_done,
            files_needed: n.files_needed,
            files_done: n.files_done,
            rate_bytes_per_s: if n.done { 0 } else { n.rate },
            model_bytes: self.model_bytes,
            chunks_refetched: n.chunks_refetched,
        }));
        out
    }

    /// A receiver's report; true when this node just finished.
    pub fn progress(&mut self, node: NodeId, p: &pb::StageProgress, now: Instant) -> bool {
        let Some(n) = self.nodes.get_mut(&node) else { return false };
        let done = p.bytes_done.min(n.bytes_needed);
        if let Some((t, b)) = n.last {
            let dt = now.saturating_duration_since(t).as_secs_f64();
            if dt >= 0.5 {
                let r = done.saturating_sub(b) as f64 / dt;
                n.rate = if n.rate == 0 { r as u64 } else { (0.5 * n.rate as f64 + 0.5 * r) as u64 };
                n.last = Some((now, done));
            }
        } else {
            n.last = Some((now, done));
        }
        n.bytes_done = done;
        n.files_done = p.files_done.min(n.files_needed);
        n.chunks_refetched = p.chunks_refetched;
        let finished = p.done && p.error.is_empty() && !n.done;
        if finished {
            n.done = true;
            n.bytes_done = n.bytes_needed;
            n.files_done = n.files_needed;
        }
        finished
    }

    pub fn all_done(&self) -> bool {
        self.nodes.values().all(|n| n.done)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The name of the model directory holding `files` (name, sha256 hex) in a node's cache.
pub fn model_key(files: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for (n, s) in sorted {
        h.update(n.as_bytes());
        h.update([0]);
        h.update(s.as_bytes());
        h.update([b'\n']);
    }
    hex(&h.finalize())[..32].to_string()
}

/// Checks the source's description of the model (the source is a worker: its bytes are checked
/// like any other worker's).
pub fn check_index(files: &[pb::ModelFile]) -> Result<(), String> {
    if files.len() > MAX_FILES {
        return Err(format!("the model has {} files; at most {MAX_FILES}", files.len()));
    }
    let mut names = std::collections::HashSet::new();
    for f in files {
        let n = &f.name;
        if n.is_empty() || n == "." || n == ".." || n.contains('/') || n.contains('\0') || n.len() > 255 {
            return Err(format!("file name {n:?} is not a plain file name"));
        }
        if !names.insert(n.as_str()) {
            return Err(format!("file {n:?} is listed twice"));
        }
        if f.sha256.len() != 32 || f.chunk_sha256.iter().any(|c| c.len() != 32) {
            return Err(format!("{n}: hashes must be 32-byte SHA-256 values"));
        }
        if f.size_bytes > MAX_FILE_BYTES || f.chunk_bytes > MAX_CHUNK_BYTES {
            return Err(format!("{n}: {} bytes in chunks of {}: too large", f.size_bytes, f.chunk_bytes));
        }
        if f.chunk_bytes == 0 || f.size_bytes.div_ceil(f.chunk_bytes) != f.chunk_sha256.len() as u64 {
            return Err(format!("{n}: the chunk hashes do not cover the file"));
        }
    }
    Ok(())
}

/// Whether a node hosting `stages` (pp ranks) needs `f`.
pub fn needs(f: &pb::ModelFile, stages: &[&Stage], pp: u64, layers: u64, tied: bool) -> bool {
    if !f.weights || f.other {
        return true;
    }
    let first = stages.iter().any(|s| s.pp_rank == 0);
    let last = stages.iter().any(|s| s.pp_rank + 1 == pp);
    if f.embedding && (first || (tied && last)) {
        return true;
    }
    if f.last && last {
        return true;
    }
    f.layers.iter().any(|&l| {
        let l = l as u64;
        if l >= layers { last } else { stages.iter().any(|s| s.layer_start <= l && l < s.layer_end) }
    })
}

/// A receiving node of a generation.
pub struct Receiver {
    pub id: NodeId,
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    /// The pipeline stages of its ranks.
    pub pp_ranks: Vec<u64>,
}

/// Each receiver's files, with their sources (the chain), and the model directory's key.
pub fn assign(
    files: &[pb::ModelFile],
    stages: &[Stage],
    layers: u64,
    tied: bool,
    source: &pb::StageSource,
    receivers: &[Receiver],
) -> Vec<(NodeId, String, Vec<pb::StageFile>)> {
    let pp = stages.len() as u64;
    let mut out: Vec<(NodeId, String, Vec<pb::StageFile>)> = Vec::new();
    // Per file: the last node of its chain so far.
    let mut tail: Vec<Option<pb::StageSource>> = vec![None; files.len()];
    for r in receivers {
        let mine: Vec<&Stage> = stages.iter().filter(|s| r.pp_ranks.contains(&s.pp_rank)).collect();
        let me = pb::StageSource { node: r.name.clone(), address: r.address.to_string(), port: r.port as u32 };
        let mut list = Vec::new();
        for (i, f) in files.iter().enumerate() {
            if !needs(f, &mine, pp, layers, tied) {
                continue;
            }
            let mut sources: Vec<pb::StageSource> = tail[i].iter().cloned().collect();
            sources.push(source.clone());
            tail[i] = Some(me.clone());
            list.push(pb::StageFile { file: Some(f.clone()), sources });
        }
        let names: Vec<(String, String)> =
            list.iter().filter_map(|s| s.file.as_ref()).map(|f| (f.name.clone(), hex(&f.sha256))).collect();
        out.push((r.id, model_key(&names), list));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(name: &str, layers: &[u32], embedding: bool, last: bool) -> pb::ModelFile {
        pb::ModelFile {
            name: name.into(),
            size_bytes: 100,
            sha256: vec![name.len() as u8; 32],
            chunk_bytes: 100,
            chunk_sha256: vec![vec![0; 32]],
            weights: true,
            layers: layers.to_vec(),
            embedding,
            last,
            other: false,
        }
    }

    fn small(name: &str) -> pb::ModelFile {
        pb::ModelFile {
            weights: false,
            layers: vec![],
            embedding: false,
            last: false,
            ..weights(name, &[], false, false)
        }
    }

    fn stages(bounds: &[(u64, u64)]) -> Vec<Stage> {
        bounds
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| Stage { pp_rank: i as u64, layer_start: a, layer_end: b, num_layers: b - a })
            .collect()
    }

    fn recv(i: u128, pp: &[u64]) -> Receiver {
        Receiver {
            id: NodeId(uuid::Uuid::from_u128(i)),
            name: format!("n{i}"),
            address: "127.0.0.1".parse().expect("ip"),
            port: 9000 + i as u16,
            pp_ranks: pp.to_vec(),
        }
    }

    fn names(v: &[pb::StageFile]) -> Vec<&str> {
        v.iter().map(|s| s.file.as_ref().map(|f| f.name.as_str()).unwrap_or("")).collect()
    }

    #[test]
    fn each_stage_gets_its_layers_the_small_files_and_the_ends() {
        // 8 layers in 4 files, PP 4 (2 layers a stage); embeddings in the first file, norm and
        // head in the last; the layers straddle the files' bounds.
        let files = vec![
            small("config.json"),
            weights("m-1.safetensors", &[0, 1, 2], true, false),
            weights("m-2.safetensors", &[3, 4], false, false),
            weights("m-3.safetensors", &[5, 6], false, false),
            weights("m-4.safetensors", &[7], false, true),
            small("tokenizer.json"),
        ];
        let st = stages(&[(0, 2), (2, 4), (4, 6), (6, 8)]);
        let src = pb::StageSource { node: "head".into(), address: "127.0.0.1".into(), port: 1 };
        let rs = [recv(1, &[1]), recv(2, &[2]), recv(3, &[3])];
        let a = assign(&files, &st, 8, false, &src, &rs);
        assert_eq!(names(&a[0].2), ["config.json", "m-1.safetensors", "m-2.safetensors", "tokenizer.json"]);
        assert_eq!(names(&a[1].2), ["config.json", "m-2.safetensors", "m-3.safetensors", "tokenizer.json"]);
        assert_eq!(names(&a[2].2), ["config.json", "m-3.safetensors", "m-4.safetensors", "tokenizer.json"]);
        // Chains: the first node that needs a file fetches it from the source; the next from it.
        let srcs = |n: usize, f: &str| -> Vec<String> {
            a[n].2
                .iter()
                .find(|s| s.file.as_ref().is_some_and(|x| x.name == f))
                .map(|s| s.sources.iter().map(|x| x.node.clone()).collect())
                .unwrap_or_default()
        };
        assert_eq!(srcs(0, "config.json"), ["head"]);
        assert_eq!(srcs(1, "config.json"), ["n1", "head"]);
        assert_eq!(srcs(2, "config.json"), ["n2", "head"]);
        assert_eq!(srcs(1, "m-2.safetensors"), ["n1", "head"]);
        assert_eq!(srcs(1, "m-3.safetensors"), ["head"]);
        assert_eq!(srcs(2, "m-3.safetensors"), ["n2", "head"]);
        // Different file sets, different directories.
        assert_ne!(a[0].1, a[1].1);
    }

    #[test]
    fn tied_embeddings_go_to_the_last_stage_and_unknown_tensors_everywhere() {
        let mut other = weights("vision.safetensors", &[], false, false);
        other.other = true;
        let files =
            [weights("emb.safetensors", &[], true, false), other, weights("mtp.safetensors", &[9], false, false)];
        let st = stages(&[(0, 4), (4, 8)]);
        let last: Vec<&Stage> = st.iter().filter(|s| s.pp_rank == 1).collect();
        let first: Vec<&Stage> = st.iter().filter(|s| s.pp_rank == 0).collect();
        assert!(needs(&files[0], &last, 2, 8, true));
        assert!(!needs(&files[0], &last, 2, 8, false));
        assert!(needs(&files[0], &first, 2, 8, false));
        assert!(needs(&files[1], &first, 2, 8, false) && needs(&files[1], &last, 2, 8, false));
        // A layer past the model's count (an MTP layer) is the last stage's.
        assert!(needs(&files[2], &last, 2, 8, false) && !needs(&files[2], &first, 2, 8, false));
        // One stage, one file: everything goes.
        let one = stages(&[(0, 8)]);
        let all: Vec<&Stage> = one.iter().collect();
        assert!(files.iter().all(|f| needs(f, &all, 1, 8, false)));
    }

    #[test]
    fn the_index_from_a_worker_is_checked() {
        assert!(check_index(&[small("config.json")]).is_ok());
        assert!(check_index(&[small("../etc/passwd")]).is_err());
        assert!(check_index(&[small("a"), small("a")]).expect_err("refused").contains("twice"));
        let mut f = small("x");
        f.chunk_sha256.clear();
        assert!(check_index(&[f]).expect_err("refused").contains("cover"));
        assert_eq!(model_key(&[("a".into(), "1".into())]).len(), 32);
    }
}
