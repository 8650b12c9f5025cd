//! Safetensors headers: exact weight bytes per layer without reading any tensor data.
//!
//! A safetensors file is an 8-byte little-endian header length N, N bytes of JSON describing every
//! tensor (`dtype`, `shape`, `data_offsets`), then the data. Only the first 8 + N bytes are read.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

/// The safetensors format's own header limit: a length above it is a lie or a corrupt file.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub bytes: u64,
}

/// Parses the JSON header. `data_len` (the file size minus the header), when known, bounds the
/// offsets so that a header cannot claim more data than the file has.
pub fn parse_header(json: &[u8], data_len: Option<u64>) -> Result<Vec<TensorInfo>, String> {
    let v: Value = serde_json::from_slice(json).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let Value::Object(map) = v else {
        return Err("header is not a JSON object".into());
    };
    let mut out = Vec::with_capacity(map.len());
    for (name, t) in map {
        if name == "__metadata__" {
            continue;
        }
        let dtype = t.get("dtype").and_then(Value::as_str).ok_or_else(|| format!("tensor {name:?}: dtype missing"))?;
        let offsets = t
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| format!("tensor {name:?}: data_offsets must be [start, end]"))?;
        let (start, end) = match (offsets[0].as_u64(), offsets[1].as_u64()) {
            (Some(s), Some(e)) if e >= s => (s, e),
            _ => {
                return Err(format!("tensor {name:?}: data_offsets {offsets:?} are not a range"));
            }
        };
        if let Some(len) = data_len
            && end > len
        {
            return Err(format!("tensor {name:?}: data_offsets end {end} is past the file's {len} data bytes"));
        }
        let shape =
            t.get("shape").and_then(Value::as_array).ok_or_else(|| format!("tensor {name:?}: shape missing"))?;
        if let Some(size) = dtype_size(dtype) {
            let mut elems: u128 = 1;
            for d in shape {
                let d =
                    d.as_u64().ok_or_else(|| format!("tensor {name:?}: shape {shape:?} is not a list of integers"))?;
                elems = elems.saturating_mul(d as u128);
            }
            if elems.saturating_mul(size as u128) != (end - start) as u128 {
                return Err(format!(
                    "tensor {name:?}: shape {shape:?} of {dtype} needs {} bytes but data_offsets span {}",
                    elems.saturating_mul(size as u128),
                    end - start
                ));
            }
        }
        out.push(TensorInfo { name, dtype: dtype.to_string(), bytes: end - start });
    }
    Ok(out)
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "I8" | "U8" | "BOOL" => 1,
        _ => return None, // packed sub-byte types (F4 ...): trust the offsets
    })
}

/// Reads only the header of a safetensors file.
pub fn read_header(path: &Path) -> Result<Vec<TensorInfo>, String> {
    let mut f = super::load::open_regular(path)?;
    let file_len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| "shorter than the 8-byte header length".to_string())?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return Err(format!("header length {n} exceeds the format's limit of {MAX_HEADER_BYTES} bytes"));
    }
    if n > file_len - 8 {
        return Err(format!("header length {n} is longer than the file ({file_len} bytes)"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| format!("cannot read the {n}-byte header: {e}"))?;
    parse_header(&header, Some(file_len - 8 - n))
}

/// Where a tensor belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Layer(u64),
    Embedding,
    LmHead,
    /// Final norm and similar: on the last stage.
    Last,
    /// Vision towers, projectors and the rest: on the first stage.
    First,
}

/// Attributes a tensor to a part of the model by its name.
pub fn classify(name: &str) -> Part {
    let segs: Vec<&str> = name.split('.').collect();
    for w in segs.windows(2) {
        if matches!(w[0], "layers" | "h" | "blocks" | "layer")
            && let Ok(n) = w[1].parse::<u64>()
        {
            // Vision encoders have layers too; they are not decoder layers.
            if name.contains("vision") || name.contains("visual") {
                return Part::First;
            }
            return Part::Layer(n);
        }
    }
    let lower = name.to_ascii_lowercase();
    if lower.contains("lm_head") || name == "output.weight" {
        Part::LmHead
    } else if ["embed_tokens", "wte", "tok_embeddings", "word_embeddings"].iter().any(|e| lower.contains(e))
        && !lower.contains("vision")
    {
        Part::Embedding
    } else if lower.contains("norm") && !lower.contains("vision") {
        Part::Last
    } else {
        Part::First
    }
}

/// True for a decoder-layer tensor that vLLM keeps whole on every tensor-parallel rank instead of
/// splitting: layer norms (`input_layernorm`, `post_attention_layernorm`, `q_a_layernorm`,
/// `kv_a_layernorm`, `q_norm`, ...), MoE routers (`mlp.gate`, `block_sparse_moe.gate`,
/// `feed_forward.router`, with DeepSeek-V3's `e_score_correction_bias`) and MLA's low-rank
/// A-projections (`q_a_proj` and `kv_a_proj_with_mqa`, which vLLM fuses into a replicated
/// `fused_qkv_a_proj`), FP8 scales (`weight_scale_inv`, `weight_scale`) included.
pub fn is_replicated(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    if ["fused_qkv_a_proj", "q_a_proj", "kv_a_proj_with_mqa", "e_score_correction_bias"]
        .iter()
        .any(|p| lower.contains(p))
    {
        return true;
    }
    // The module is the segment before the parameter's own name (`weight`, `bias`, scales).
    let module = lower.rsplit('.').nth(1).unwrap_or("");
    module.ends_with("norm") || module.starts_with("ln_") || matches!(module, "gate" | "router")
}

/// Exact weight bytes, attributed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WeightBytes {
    /// Bytes of each decoder layer `0..num_hidden_layers`.
    pub per_layer: Vec<u64>,
    /// The part of each `per_layer` entry that every tensor-parallel rank holds whole
    /// ([`is_replicated`]).
    pub per_layer_replicated: Vec<u64>,
    pub embedding: u64,
    pub lm_head: u64,
    pub first_stage_other: u64,
    pub last_stage_other: u64,
    /// Layers past `num_hidden_layers` (e.g. DeepSeek's multi-token-prediction layer), not loaded
    /// for serving.
    pub unused: u64,
    pub files: usize,
    pub tensors: usize,
}

impl WeightBytes {
    pub fn from_tensors<'a>(layers: u64, tensors: impl IntoIterator<Item = &'a TensorInfo>) -> Self {
        let mut w = WeightBytes {
            per_layer: vec![0; layers as usize],
            per_layer_replicated: vec![0; layers as usize],
            ..Default::default()
        };
        for t in tensors {
            w.tensors += 1;
            if let Part::Layer(n) = classify(&t.name)
                && n < layers
                && is_replicated(&t.name)
            {
                let r = &mut w.per_layer_replicated[n as usize];
                *r = r.saturating_add(t.bytes);
            }
            let slot = match classify(&t.name) {
                Part::Layer(n) if n < layers => &mut w.per_layer[n as usize],
                Part::Layer(_) => &mut w.unused,
                Part::Embedding => &mut w.embedding,
                Part::LmHead => &mut w.lm_head,
                Part::Last => &mut w.last_stage_other,
                Part::First => &mut w.first_stage_other,
            };
            // Sizes come from files: a lying header must not overflow the sums.
            *slot = slot.saturating_add(t.bytes);
        }
        w
    }

    pub fn total(&self) -> u64 {
        [self.embedding, self.lm_head, self.first_stage_other, self.last_stage_other]
            .iter()
            .chain(&self.per_layer)
            .fold(0u64, |a, &b| a.saturating_add(b))
    }
}

/// Names of the files a `model.safetensors.index.json` points to, in order.
pub fn index_files(index_json: &str) -> Result<Vec<String>, String> {
    let v: Value = serde_json::from_str(index_json).map_err(|e| format!("not valid JSON: {e}"))?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or("weight_map is missing")?;
    let files: std::collections::BTreeSet<String> = map
        .values()
        .map(|f| f.as_str().map(str::to_string).ok_or("weight_map values must be file names"))
        .collect::<Result<_, _>>()?;
    for f in &files {
        if f.contains('/') || f.contains("..") {
            return Err(format!("weight_map names {f:?}, which is not a file in the model directory"));
        }
    }
    Ok(files.into_iter().collect())
}

/// Helper for tests and tools: a valid safetensors file's bytes for `tensors` (name, dtype, shape).
pub fn build_file(tensors: &[(&str, &str, &[u64])]) -> Vec<u8> {
    let mut header = BTreeMap::new();
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let n: u64 = shape.iter().product::<u64>() * dtype_size(dtype).unwrap_or(1);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let json = serde_json::to_vec(&header).expect("a map of strings serializes");
    let mut out = Vec::with_capacity(8 + json.len() + offset as usize);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(out.len() + offset as usize, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_tensor_names() {
        assert_eq!(classify("model.layers.12.self_attn.q_proj.weight"), Part::Layer(12));
        assert_eq!(classify("transformer.h.3.mlp.c_fc.weight"), Part::Layer(3));
        assert_eq!(classify("language_model.model.layers.0.mlp.experts.gate_up_proj"), Part::Layer(0));
        assert_eq!(classify("model.embed_tokens.weight"), Part::Embedding);
        assert_eq!(classify("lm_head.weight"), Part::LmHead);
        assert_eq!(classify("model.norm.weight"), Part::Last);
        assert_eq!(classify("vision_model.model.layers.3.mlp.fc1.weight"), Part::First);
        assert_eq!(classify("multi_modal_projector.linear_1.weight"), Part::First);
    }

    #[test]
    fn replicated_tensors_are_the_norms_routers_and_mla_a_projections() {
        for name in [
            "model.layers.3.self_attn.q_a_proj.weight",
            "model.layers.3.self_attn.q_a_proj.weight_scale_inv",
            "model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
            "model.layers.3.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
            "model.layers.3.self_attn.fused_qkv_a_proj.weight",
            "model.layers.3.self_attn.q_a_layernorm.weight",
            "model.layers.3.self_attn.kv_a_layernorm.weight",
            "model.layers.3.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight",
            "model.layers.3.mlp.gate.weight",
            "model.layers.3.mlp.gate.e_score_correction_bias",
            "model.layers.3.block_sparse_moe.gate.weight",
            "language_model.model.layers.3.feed_forward.router.weight",
            "model.layers.3.self_attn.q_norm.weight",
        ] {
            assert!(is_replicated(name), "{name}");
        }
        for name in [
            "model.layers.3.self_attn.q_b_proj.weight",
            "model.layers.3.self_attn.q_b_proj.weight_scale_inv",
            "model.layers.3.self_attn.kv_b_proj.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.3.self_attn.o_proj.weight",
            "model.layers.3.mlp.gate_proj.weight",
            "model.layers.3.mlp.gate_up_proj.weight",
            "model.layers.3.mlp.experts.7.gate_proj.weight",
            "model.layers.3.mlp.shared_experts.down_proj.weight",
            "model.layers.3.block_sparse_moe.experts.0.w1.weight",
        ] {
            assert!(!is_replicated(name), "{name}");
        }
    }

    #[test]
    fn exact_bytes_from_a_real_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        let bytes = build_file(&[
            ("model.embed_tokens.weight", "BF16", &[128, 64]),
            ("model.layers.0.self_attn.q_proj.weight", "BF16", &[64, 64]),
            ("model.layers.0.input_layernorm.weight", "BF16", &[64]),
            ("model.layers.1.mlp.down_proj.weight", "F8_E4M3", &[64, 256]),
            ("model.layers.1.mlp.down_proj.weight_scale_inv", "F32", &[1, 2]),
            ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "F8_E4M3", &[32, 64]),
            ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv", "F32", &[1, 1]),
            ("model.layers.2.mtp.weight", "BF16", &[8]),
            ("model.norm.weight", "BF16", &[64]),
            ("lm_head.weight", "BF16", &[128, 64]),
        ]);
        std::fs::write(&path, &bytes).expect("write");
        let tensors = read_header(&path).expect("header");
        let w = WeightBytes::from_tensors(2, &tensors);
        assert_eq!(w.embedding, 128 * 64 * 2);
        assert_eq!(w.per_layer, vec![64 * 64 * 2 + 128, 64 * 256 + 8 + 32 * 64 + 4]);
        assert_eq!(w.per_layer_replicated, vec![128, 32 * 64 + 4], "the norm; the A-projection and its scale");
        assert_eq!(w.unused, 16, "layer 2 is past num_hidden_layers");
        assert_eq!(w.last_stage_other, 128);
        assert_eq!(w.lm_head, 128 * 64 * 2);
        assert_eq!(w.total(), 128 * 64 * 2 * 2 + 64 * 64 * 2 + 128 + 64 * 256 + 8 + 32 * 64 + 4 + 128);
    }

    #[test]
    fn lying_headers_are_errors_not_allocations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.safetensors");
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        std::fs::write(&p, &huge).expect("write");
        assert!(read_header(&p).expect_err("huge").contains("exceeds"));

        let mut long = 1000u64.to_le_bytes().to_vec();
        long.extend_from_slice(b"{}");
        std::fs::write(&p, &long).expect("write");
        assert!(read_header(&p).expect_err("past end").contains("longer than the file"));

        std::fs::write(&p, [1u8, 2]).expect("write");
        assert!(read_header(&p).expect_err("short").contains("8-byte"));

        let bad = br#"{"t": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 100]}}"#;
        assert!(parse_header(bad, Some(1000)).expect_err("shape mismatch").contains("needs 8 bytes"));
        assert!(parse_header(bad, Some(50)).expect_err("past data").contains("past the file"));
        let rev = br#"{"t": {"dtype": "BF16", "shape": [0], "data_offsets": [10, 0]}}"#;
        assert!(parse_header(rev, None).is_err());
    }

    #[test]
    fn index_lists_files_and_refuses_paths() {
        let idx = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;
        assert_eq!(
            index_files(idx).expect("ok"),
            vec!["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        );
        assert!(index_files(r#"{"weight_map": {"a": "../etc/passwd"}}"#).is_err());
        assert!(index_files(r#"{}"#).is_err());
    }
}
