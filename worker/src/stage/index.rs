//! The source side: what a model directory holds, hashed once.
//!
//! Every regular file at the top of the directory is part of the model except other weight
//! formats beside safetensors (`*.bin`, `*.pt`, `*.pth`, `*.gguf`: vLLM loads the safetensors when
//! there are any) and hidden files; subdirectories (`original/`, ...) are left out. Each file gets a
//! SHA-256 of the whole and one per chunk, kept in `hashes.json` by path, size and mtime, so that a
//! model is read in full only the first time. A safetensors file also says what it holds (from its
//! header): which decoder layers, the embeddings, the final norm and output head, or anything else.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tessera_common::model::safetensors::{self, Part};
use tessera_proto::v1 as pb;

/// The smallest chunk; larger models get larger chunks so that the hashes of one file stay under
/// [`MAX_CHUNKS`].
pub const MIN_CHUNK_BYTES: u64 = 16 << 20;
pub const MAX_CHUNKS: u64 = 8192;
/// A model directory with more files than this is refused (real ones have a few hundred at most).
pub const MAX_FILES: usize = 4096;

/// Chunk size for a file of `size` bytes: 16 MiB, or more (a multiple of 1 MiB) for files over
/// 128 GiB.
pub fn chunk_bytes(size: u64) -> u64 {
    let per = size.div_ceil(MAX_CHUNKS).div_ceil(1 << 20) << 20;
    per.max(MIN_CHUNK_BYTES)
}

/// A file's name in the cache: a SHA-256 over its size, chunk size and chunk hashes. A node checks
/// every chunk it receives against those hashes, so what it keeps under this name is what the name
/// says, whoever sent the list (a whole-file hash from a source would bind nothing: the chunks are
/// what is checked).
pub fn blob_id(f: &pb::ModelFile) -> String {
    let mut h = Sha256::new();
    h.update(b"tessera-blob-v1\0");
    h.update(f.size_bytes.to_le_bytes());
    h.update(f.chunk_bytes.to_le_bytes());
    for c in &f.chunk_sha256 {
        h.update(c);
    }
    hex(&h.finalize())
}

/// Hex of a hash, as the cache names files.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A file's hashes, as kept in `hashes.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Hashed {
    size: u64,
    mtime_ns: i128,
    sha256: String,
    chunk_bytes: u64,
    chunks: Vec<String>,
}

/// Hashes kept across indexings (the source node's `stage/hashes.json`).
pub struct HashCache {
    path: PathBuf,
    entries: Mutex<BTreeMap<PathBuf, Hashed>>,
}

impl HashCache {
    pub fn open(path: PathBuf) -> HashCache {
        let entries = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        HashCache { path, entries: Mutex::new(entries) }
    }

    fn get(&self, p: &Path, size: u64, mtime_ns: i128) -> Option<Hashed> {
        let e = self.entries.lock().expect("lock");
        e.get(p).filter(|h| h.size == size && h.mtime_ns == mtime_ns && h.chunk_bytes == chunk_bytes(size)).cloned()
    }

    fn put(&self, p: PathBuf, h: Hashed) {
        let mut e = self.entries.lock().expect("lock");
        e.insert(p, h);
        // Forget files that are gone, then write atomically.
        e.retain(|p, _| p.exists());
        if let Ok(bytes) = serde_json::to_vec(&*e) {
            let tmp = self.path.with_extension("tmp");
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, &self.path);
            }
        }
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

/// The files of the model at `dir` that staging sends, with their sizes.
pub fn list(dir: &Path) -> Result<Vec<(String, u64)>, String> {
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory; staging sends a model directory", dir.display()));
    }
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let Ok(name) = e.file_name().into_string() else { continue };
        if name.starts_with('.') {
            continue;
        }
        // Follow links (Hugging Face's cache links every file into its blobs).
        let Ok(m) = std::fs::metadata(e.path()) else { continue };
        if m.is_file() {
            files.push((name, m.len()));
            if files.len() > MAX_FILES {
                return Err(format!("{} has more than {MAX_FILES} files; is it a model directory?", dir.display()));
            }
        }
    }
    let has_safetensors = files.iter().any(|(n, _)| n.ends_with(".safetensors"));
    if has_safetensors {
        files.retain(|(n, _)| ![".bin", ".pt", ".pth", ".gguf"].iter().any(|x| n.ends_with(x)));
    }
    files.sort();
    Ok(files)
}

/// Hashes one file (or takes its hashes from the cache). `progress` counts the bytes read.
fn hash_file(cache: &HashCache, path: &Path, progress: &AtomicU64, stop: &AtomicBool) -> Result<Hashed, String> {
    let f = tessera_common::model::load::open_regular(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let m = f.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    let (size, mt) = (m.len(), mtime_ns(&m));
    if let Some(h) = cache.get(path, size, mt) {
        progress.fetch_add(size, Ordering::Relaxed);
        return Ok(h);
    }
    let cb = chunk_bytes(size);
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut chunk = Sha256::new();
    let mut in_chunk = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut total = 0u64;
    loop {
        let want = buf.len().min((cb - in_chunk) as usize);
        if stop.load(Ordering::Relaxed) {
            return Err("cancelled".into());
        }
        let n = r.read(&mut buf[..want]).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        chunk.update(&buf[..n]);
        in_chunk += n as u64;
        total += n as u64;
        progress.fetch_add(n as u64, Ordering::Relaxed);
        if in_chunk == cb {
            chunks.push(hex(&std::mem::take(&mut chunk).finalize()));
            in_chunk = 0;
        }
    }
    if in_chunk > 0 {
        chunks.push(hex(&chunk.finalize()));
    }
    if total != size {
        return Err(format!("{} changed while it was read ({size} bytes, then {total})", path.display()));
    }
    let h = Hashed { size, mtime_ns: mt, sha256: hex(&whole.finalize()), chunk_bytes: cb, chunks };
    // The file must not have changed under us.
    if std::fs::metadata(path).map(|m| (m.len(), mtime_ns(&m))).ok() == Some((size, mt)) {
        cache.put(path.to_path_buf(), h.clone());
    }
    Ok(h)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

/// What a safetensors file holds, from its header.
fn parts(path: &Path, f: &mut pb::ModelFile) -> Result<(), String> {
    let tensors = safetensors::read_header(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut layers = std::collections::BTreeSet::new();
    for t in &tensors {
        match safetensors::classify(&t.name) {
            Part::Layer(n) => {
                layers.insert(u32::try_from(n).unwrap_or(u32::MAX));
            }
            Part::Embedding => f.embedding = true,
            Part::LmHead | Part::Last => f.last = true,
            Part::First => f.other = true,
        }
    }
    f.layers = layers.into_iter().collect();
    f.weights = true;
    Ok(())
}

/// Describes and hashes the model at `dir`. `progress` counts bytes read; `total` is set first.
pub fn index(
    cache: &HashCache,
    dir: &Path,
    total: &AtomicU64,
    progress: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Vec<(pb::ModelFile, PathBuf)>, String> {
    let files = list(dir)?;
    total.store(files.iter().map(|(_, s)| s).sum(), Ordering::Relaxed);
    let mut out = Vec::with_capacity(files.len());
    for (name, _) in files {
        let path = dir.join(&name);
        let h = hash_file(cache, &path, progress, stop)?;
        let mut f = pb::ModelFile {
            name: name.clone(),
            size_bytes: h.size,
            sha256: unhex(&h.sha256),
            chunk_bytes: h.chunk_bytes,
            chunk_sha256: h.chunks.iter().map(|c| unhex(c)).collect(),
            ..Default::default()
        };
        if name.ends_with(".safetensors") {
            parts(&path, &mut f)?;
        }
        out.push((f, path));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_bound_the_hash_list() {
        assert_eq!(chunk_bytes(0), MIN_CHUNK_BYTES);
        assert_eq!(chunk_bytes(100 << 30), MIN_CHUNK_BYTES);
        let big = 700u64 << 30;
        assert!(big.div_ceil(chunk_bytes(big)) <= MAX_CHUNKS);
        assert_eq!(chunk_bytes(big) % (1 << 20), 0);
    }

    #[test]
    fn index_lists_hashes_and_parts_and_reuses_hashes() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::write(d.path().join("config.json"), b"{}").expect("w");
        std::fs::write(d.path().join("pytorch_model.bin"), b"x").expect("w");
        std::fs::write(d.path().join(".hidden"), b"x").expect("w");
        std::fs::create_dir(d.path().join("original")).expect("mkdir");
        let st = safetensors::build_file(&[
            ("model.layers.3.mlp.up_proj.weight", "BF16", &[4, 4]),
            ("model.embed_tokens.weight", "BF16", &[8, 4]),
            ("lm_head.weight", "BF16", &[8, 4]),
        ]);
        std::fs::write(d.path().join("model-00001-of-00001.safetensors"), &st).expect("w");
        let state = tempfile::tempdir().expect("tmp");
        let cache = HashCache::open(state.path().join("hashes.json"));
        let (t, p) = (AtomicU64::new(0), AtomicU64::new(0));
        let files = index(&cache, d.path(), &t, &p, &AtomicBool::new(false)).expect("index");
        let names: Vec<&str> = files.iter().map(|(f, _)| f.name.as_str()).collect();
        assert_eq!(names, ["config.json", "model-00001-of-00001.safetensors"]);
        let w = &files[1].0;
        assert_eq!((w.layers.clone(), w.embedding, w.last, w.other, w.weights), (vec![3], true, true, false, true));
        assert_eq!(hex(&files[0].0.sha256), hex(&Sha256::digest(b"{}")));
        assert_eq!(files[0].0.chunk_sha256.len(), 1);
        assert_eq!(p.load(Ordering::Relaxed), 2 + st.len() as u64);
        // The hashes are kept by path, size and mtime: a file changed behind the same size and
        // mtime is not read again (what the cache is for), one with a new mtime is.
        let cache = HashCache::open(state.path().join("hashes.json"));
        let path = d.path().join("model-00001-of-00001.safetensors");
        let mtime = std::fs::metadata(&path).expect("m").modified().expect("mtime");
        let mut changed = st.clone();
        let n = changed.len();
        changed[n - 1] ^= 0xff;
        std::fs::write(&path, &changed).expect("w");
        std::fs::File::options().append(true).open(&path).expect("o").set_modified(mtime).expect("t");
        let again = index(&cache, d.path(), &t, &AtomicU64::new(0), &AtomicBool::new(false)).expect("index");
        assert_eq!(again[1].0, files[1].0, "taken from the kept hashes");
        std::fs::File::options()
            .append(true)
            .open(&path)
            .expect("o")
            .set_modified(mtime + std::time::Duration::from_secs(1))
            .expect("t");
        let third = index(&cache, d.path(), &t, &AtomicU64::new(0), &AtomicBool::new(false)).expect("index");
        assert_eq!(hex(&third[1].0.sha256), hex(&Sha256::digest(&changed)), "hashed again");
    }
}
