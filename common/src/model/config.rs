//! `config.json` -> [`ModelDesc`], accepting the field aliases vLLM accepts.

use serde_json::{Map, Value};

use super::{DType, Mla, ModelDesc, Moe, Quantization};
use crate::model::load::ModelError;

/// Largest value any count or size field may have; bounds hostile input (a lying config cannot
/// make the planner allocate or loop without bound).
const MAX_FIELD: u64 = 1 << 40;
/// Most layers a config may declare.
const MAX_LAYERS: u64 = 100_000;

/// Parses the text of a config.json. `file` names the file in errors.
pub fn parse_config(file: &str, text: &str) -> Result<ModelDesc, ModelError> {
    let root: Value = serde_json::from_str(text).map_err(|e| ModelError::Json {
        file: file.to_string(),
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let Value::Object(root) = root else {
        return Err(ModelError::invalid(file, "(top level)", "is not a JSON object"));
    };
    let mut notes = Vec::new();
    // Multimodal wrappers (Llama 4, Llava, Gemma 3 ...) nest the language model.
    let (lm, prefix) = match ["text_config", "language_config", "llm_config"].iter().find_map(|k| match root.get(*k) {
        Some(Value::Object(o)) if o.contains_key("num_attention_heads") || o.contains_key("hidden_size") => {
            Some((o, *k))
        }
        _ => None,
    }) {
        Some((o, k)) => {
            notes.push(format!("language model read from `{k}`"));
            (o, format!("{k}."))
        }
        None => (&root, String::new()),
    };
    let f = Fields { file, lm, root: &root, prefix: &prefix };

    let architecture = root
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .map(str::to_string)
        .or_else(|| f.str_any(&["model_type"]))
        .unwrap_or_else(|| "unknown".into());
    let model_type = f.str_any(&["model_type"]).unwrap_or_default();

    let heads = f.required(&["num_attention_heads", "n_head", "num_heads", "n_heads"])?;
    let hidden = f.required(&["hidden_size", "d_model", "n_embd", "dim"])?;
    let layers = f.required(&["num_hidden_layers", "n_layer", "num_layers", "n_layers"])?;
    if heads == 0 {
        return Err(ModelError::invalid(file, &f.name("num_attention_heads"), "is 0"));
    }
    if layers == 0 || layers > MAX_LAYERS {
        return Err(ModelError::invalid(
            file,
            &f.name("num_hidden_layers"),
            &format!("{layers} is out of range 1..={MAX_LAYERS}"),
        ));
    }
    let kv = match f.uint_any(&["num_key_value_heads", "n_head_kv", "num_kv_heads"])? {
        Some(kv) => kv,
        None => match f.uint_any(&["multi_query_group_num"])? {
            Some(g) if f.bool_any(&["multi_query_attention"]).unwrap_or(true) => g,
            _ => {
                notes.push(format!("num_key_value_heads missing: assumed equal to num_attention_heads ({heads})"));
                heads
            }
        },
    };
    if kv == 0 || kv > heads {
        return Err(ModelError::invalid(
            file,
            &f.name("num_key_value_heads"),
            &format!("{kv} must be between 1 and num_attention_heads ({heads})"),
        ));
    }
    let head_dim = match f.uint_any(&["head_dim", "attention_head_dim"])? {
        Some(d) if d > 0 => d,
        _ => {
            if hidden % heads != 0 {
                return Err(ModelError::invalid(
                    file,
                    &f.name("head_dim"),
                    &format!("is missing and hidden_size {hidden} does not divide by num_attention_heads {heads}"),
                ));
            }
            hidden / heads
        }
    };
    let vocab = f.required(&["vocab_size", "padded_vocab_size", "n_vocab"])?;

    let mla = match f.uint_any(&["kv_lora_rank"])? {
        Some(kv_lora_rank) => {
            let rope = f.uint_any(&["qk_rope_head_dim"])?.unwrap_or(64);
            let nope = f.uint_any(&["qk_nope_head_dim"])?.unwrap_or(128);
            Some(Mla {
                kv_lora_rank,
                q_lora_rank: f.uint_any(&["q_lora_rank"])?,
                qk_rope_head_dim: rope,
                qk_nope_head_dim: nope,
                v_head_dim: f.uint_any(&["v_head_dim"])?.unwrap_or(nope),
            })
        }
        None => None,
    };

    let experts = f.uint_any(&["num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts"])?;
    let expert_inter = f.uint_any(&["moe_intermediate_size"])?;
    let inter = f.uint_any(&["intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim"])?;
    let dense_inter = f.uint_any(&["intermediate_size_mlp"])?.or(inter);
    let moe = match experts {
        Some(n) if n > 1 => {
            let width =
                expert_inter.or(inter).ok_or_else(|| ModelError::missing(file, &f.name("moe_intermediate_size")))?;
            let llama4_style = f.uint_any(&["interleave_moe_layer_step", "decoder_sparse_step"])?;
            Some(Moe {
                num_experts: n,
                experts_per_token: f.uint_any(&["num_experts_per_tok", "moe_topk", "top_k"])?,
                expert_intermediate_size: width,
                // Llama 4's MoE layers carry one shared expert without saying so in the config.
                shared_experts: f
                    .uint_any(&["n_shared_experts", "num_shared_experts"])?
                    .unwrap_or(if model_type == "llama4" || model_type == "llama4_text" { 1 } else { 0 }),
                first_dense_layers: f.uint_any(&["first_k_dense_replace"])?.unwrap_or(0),
                step: llama4_style.or(f.uint_any(&["moe_layer_freq"])?).unwrap_or(1).max(1),
                step_one_based: llama4_style.is_some(),
                has_moe_intermediate_size: expert_inter.is_some(),
            })
        }
        _ => None,
    };

    let (dtype, dtype_assumed) = match f.str_any(&["torch_dtype", "dtype"]) {
        Some(s) => match DType::parse(&s) {
            Some(d) => (d, false),
            None => {
                notes.push(format!("torch_dtype {s:?} not recognised: assumed bfloat16"));
                (DType::Bfloat16, true)
            }
        },
        None => {
            notes.push("torch_dtype missing: assumed bfloat16".into());
            (DType::Bfloat16, true)
        }
    };

    let quantization = match root.get("quantization_config").or_else(|| lm.get("quantization_config")) {
        Some(Value::Object(q)) => Some(parse_quantization(file, q)?),
        Some(Value::Null) | None => None,
        Some(_) => {
            return Err(ModelError::invalid(file, "quantization_config", "is not an object"));
        }
    };

    Ok(ModelDesc {
        architecture,
        model_type,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        num_hidden_layers: layers,
        hidden_size: hidden,
        head_dim,
        intermediate_size: dense_inter,
        vocab_size: vocab,
        tie_word_embeddings: f.bool_any(&["tie_word_embeddings"]).unwrap_or(false),
        max_position_embeddings: f.uint_any(&[
            "max_position_embeddings",
            "n_positions",
            "max_sequence_length",
            "seq_length",
        ])?,
        dtype,
        dtype_assumed,
        moe,
        mla,
        quantization,
        notes,
    })
}

fn parse_quantization(file: &str, q: &Map<String, Value>) -> Result<Quantization, ModelError> {
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("").to_ascii_lowercase();
    let uint = |k: &str| q.get(k).and_then(Value::as_u64);
    let group = |k: &str| match q.get(k).and_then(Value::as_i64) {
        Some(g) if g > 0 => Some(g as u64),
        _ => None,
    };
    Ok(match method.as_str() {
        "fp8" => {
            let block = match q.get("weight_block_size") {
                Some(Value::Array(a)) if a.len() == 2 => {
                    let n = a[0].as_u64().filter(|&v| v > 0);
                    let k = a[1].as_u64().filter(|&v| v > 0);
                    match (n, k) {
                        (Some(n), Some(k)) => Some((n, k)),
                        _ => {
                            return Err(ModelError::invalid(
                                file,
                                "quantization_config.weight_block_size",
                                "must be two positive integers",
                            ));
                        }
                    }
                }
                Some(Value::Null) | None => None,
                Some(_) => {
                    return Err(ModelError::invalid(
                        file,
                        "quantization_config.weight_block_size",
                        "must be [block_n, block_k]",
                    ));
                }
            };
            Quantization::Fp8 { block }
        }
        "mxfp4" => Quantization::Mxfp4,
        "gptq" => Quantization::Gptq { bits: uint("bits").unwrap_or(4) as u32, group_size: group("group_size") },
        "awq" => Quantization::Awq {
            bits: uint("bits").or(uint("w_bit")).unwrap_or(4) as u32,
            group_size: group("group_size").or(group("q_group_size")),
        },
        "" => {
            return Err(ModelError::missing(file, "quantization_config.quant_method"));
        }
        other => Quantization::Other { name: other.to_string() },
    })
}

/// Field lookup in the language-model object, falling back to the top level.
struct Fields<'a> {
    file: &'a str,
    lm: &'a Map<String, Value>,
    root: &'a Map<String, Value>,
    prefix: &'a str,
}

impl Fields<'_> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.lm.get(key).filter(|v| !v.is_null()).or_else(|| self.root.get(key).filter(|v| !v.is_null()))
    }

    fn uint_any(&self, keys: &[&str]) -> Result<Option<u64>, ModelError> {
        for k in keys {
            if let Some(v) = self.get(k) {
                let n = v.as_u64().ok_or_else(|| {
                    ModelError::invalid(self.file, &self.name(k), &format!("{v} is not a non-negative integer"))
                })?;
                if n > MAX_FIELD {
                    return Err(ModelError::invalid(self.file, &self.name(k), &format!("{n} is implausibly large")));
                }
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    fn required(&self, keys: &[&str]) -> Result<u64, ModelError> {
        self.uint_any(keys)?.ok_or_else(|| ModelError::missing(self.file, &self.name(keys[0])))
    }

    fn str_any(&self, keys: &[&str]) -> Option<String> {
        keys.iter().find_map(|k| self.get(k).and_then(Value::as_str).map(str::to_string))
    }

    fn bool_any(&self, keys: &[&str]) -> Option<bool> {
        keys.iter().find_map(|k| self.get(k).and_then(Value::as_bool))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_defaults() {
        let d = parse_config("c.json", r#"{"n_head": 16, "n_embd": 2048, "n_layer": 24, "n_vocab": 50000}"#)
            .expect("valid");
        assert_eq!((d.num_attention_heads, d.num_key_value_heads, d.head_dim), (16, 16, 128));
        assert!(d.dtype_assumed);
        assert!(d.notes.iter().any(|n| n.contains("torch_dtype missing")));
        assert!(d.notes.iter().any(|n| n.contains("num_key_value_heads missing")));

        let d = parse_config("c.json", r#"{"num_attention_heads": 32, "hidden_size": 4096, "num_layers": 28,
            "multi_query_group_num": 2, "multi_query_attention": true, "padded_vocab_size": 65024, "torch_dtype": "float16"}"#)
            .expect("chatglm-like");
        assert_eq!(d.num_key_value_heads, 2);
        assert_eq!(d.dtype, DType::Float16);
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = parse_config("m/config.json", r#"{"hidden_size": 10, "num_hidden_layers": 2, "vocab_size": 5}"#)
            .expect_err("missing");
        assert_eq!(e.to_string(), "m/config.json: num_attention_heads is missing");
        let e = parse_config("m/config.json", r#"{"num_attention_heads": "many"}"#).expect_err("type");
        assert!(e.to_string().contains("num_attention_heads") && e.to_string().contains("\"many\""), "{e}");
        let e = parse_config("m/config.json", "{\"a\": ").expect_err("malformed");
        assert!(e.to_string().starts_with("m/config.json: invalid JSON at line 1"), "{e}");
        let e = parse_config("c", r#"{"num_attention_heads": 8, "num_key_value_heads": 16, "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 1}"#)
            .expect_err("kv > heads");
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
        let e = parse_config(
            "c",
            r#"{"num_attention_heads": 8, "hidden_size": 64, "num_hidden_layers": 99999999999, "vocab_size": 1}"#,
        )
        .expect_err("huge");
        assert!(e.to_string().contains("num_hidden_layers"), "{e}");
        let e = parse_config("c", "[1,2]").expect_err("array");
        assert!(e.to_string().contains("not a JSON object"), "{e}");
    }

    #[test]
    fn quantization_methods() {
        let base = r#""num_attention_heads": 8, "hidden_size": 1024, "num_hidden_layers": 2, "vocab_size": 100"#;
        let q =
            |qc: &str| parse_config("c", &format!("{{{base}, \"quantization_config\": {qc}}}")).map(|d| d.quantization);
        assert_eq!(
            q(r#"{"quant_method":"fp8","weight_block_size":[128,128]}"#).expect("fp8"),
            Some(Quantization::Fp8 { block: Some((128, 128)) })
        );
        assert_eq!(
            q(r#"{"quant_method":"gptq","bits":4,"group_size":128}"#).expect("gptq"),
            Some(Quantization::Gptq { bits: 4, group_size: Some(128) })
        );
        assert_eq!(
            q(r#"{"quant_method":"gptq","bits":8,"group_size":-1}"#).expect("gptq"),
            Some(Quantization::Gptq { bits: 8, group_size: None })
        );
        assert_eq!(
            q(r#"{"quant_method":"awq","w_bit":4,"q_group_size":64}"#).expect("awq"),
            Some(Quantization::Awq { bits: 4, group_size: Some(64) })
        );
        assert_eq!(q(r#"{"quant_method":"mxfp4"}"#).expect("mxfp4"), Some(Quantization::Mxfp4));
        assert!(q(r#"{"quant_method":"fp8","weight_block_size":[0,128]}"#).is_err());
        assert!(q(r#"{"bits":4}"#).expect_err("no method").to_string().contains("quant_method"));
    }
}
