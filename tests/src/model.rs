//! Synthetic sharded checkpoints for staging tests and benchmarks: a Llama-shaped `config.json`,
//! a tokenizer-sized file, and `shards` safetensors files (with `model.safetensors.index.json`)
//! holding `layers` decoder layers, the embeddings in the first shard and the final norm and
//! output head in the last. Tensor data is a cheap deterministic pattern (distinct per file), so
//! a corrupt or misplaced byte shows.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One file of a synthetic model.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub name: String,
    pub size: u64,
    /// Decoder layers with tensors in it (empty for the small files).
    pub layers: Vec<u64>,
    pub embedding: bool,
    pub last: bool,
}

impl ModelFile {
    /// Whether a node hosting layers `[start, end)` (first / last stage as said) needs it.
    pub fn needed_by(&self, start: u64, end: u64, first: bool, last: bool) -> bool {
        !self.name.ends_with(".safetensors")
            || (self.embedding && first)
            || (self.last && last)
            || self.layers.iter().any(|l| (start..end).contains(l))
    }
}

/// Writes the model into `dir` (created); each decoder layer holds one BF16 tensor of
/// `layer_bytes` (rounded to rows of 2 KiB). Returns its files.
pub fn write(dir: &Path, layers: u64, shards: u64, layer_bytes: u64) -> std::io::Result<Vec<ModelFile>> {
    std::fs::create_dir_all(dir)?;
    let hidden = 1024u64;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2048,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 4096,
        "max_position_embeddings": 2048,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": false,
    });
    let mut files = Vec::new();
    let mut small = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        std::fs::write(dir.join(name), bytes)?;
        files.push(ModelFile {
            name: name.into(),
            size: bytes.len() as u64,
            layers: vec![],
            embedding: false,
            last: false,
        });
        Ok(())
    };
    small("config.json", config.to_string().as_bytes())?;
    small("generation_config.json", br#"{"bos_token_id": 1, "eos_token_id": 2}"#)?;
    let tok: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    small("tokenizer.json", &tok)?;
    let rows = (layer_bytes / (hidden * 2)).max(1);
    let mut weight_map = BTreeMap::new();
    let per = layers.div_ceil(shards);
    for s in 0..shards {
        let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let mut tensors: Vec<(String, Vec<u64>)> = Vec::new();
        if s == 0 {
            tensors.push(("model.embed_tokens.weight".into(), vec![4096, hidden]));
        }
        let ls: Vec<u64> = (s * per..((s + 1) * per).min(layers)).collect();
        for l in &ls {
            tensors.push((format!("model.layers.{l}.mlp.up_proj.weight"), vec![rows, hidden]));
            tensors.push((format!("model.layers.{l}.input_layernorm.weight"), vec![hidden]));
        }
        if s + 1 == shards {
            tensors.push(("model.norm.weight".into(), vec![hidden]));
            tensors.push(("lm_head.weight".into(), vec![4096, hidden]));
        }
        for (t, _) in &tensors {
            weight_map.insert(t.clone(), name.clone());
        }
        let size = write_safetensors(&dir.join(&name), &tensors, s)?;
        files.push(ModelFile { name, size, layers: ls, embedding: s == 0, last: s + 1 == shards });
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    let size = std::fs::metadata(dir.join("model.safetensors.index.json"))?.len();
    files.push(ModelFile {
        name: "model.safetensors.index.json".into(),
        size,
        layers: vec![],
        embedding: false,
        last: false,
    });
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Streams a safetensors file of BF16 tensors filled with a pattern seeded by `seed`.
fn write_safetensors(path: &PathBuf, tensors: &[(String, Vec<u64>)], seed: u64) -> std::io::Result<u64> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let n = shape.iter().product::<u64>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n] }),
        );
        offset += n;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = offset;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(8 + h.len() as u64 + offset)
}

/// GET over plain HTTP/1.1 on loopback; (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// A metric's value (the sum over its label sets) from a daemon's `/metrics` at `addr`.
pub fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
