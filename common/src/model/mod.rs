//! What the planner needs to know about a model, read from a Hugging Face model directory.
//!
//! - [`config`]: `config.json` -> [`ModelDesc`] (pure: text in, description or error out).
//! - [`safetensors`]: safetensors headers -> exact weight bytes per layer (pure parsing; the file
//!   reader reads only the 8-byte length and the JSON header, never tensor data).
//! - [`load`]: the thin I/O layer that finds and reads those files.

pub mod config;
pub mod load;
pub mod safetensors;

use serde::Serialize;

pub use config::parse_config;
pub use load::{Model, load_model};

/// Element type of weights and KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Float32,
    Bfloat16,
    Float16,
    Fp8,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::Float32 => 4,
            DType::Bfloat16 | DType::Float16 => 2,
            DType::Fp8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Bfloat16 => "bfloat16",
            DType::Float16 => "float16",
            DType::Fp8 => "fp8",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        Some(match s.trim_start_matches("torch.") {
            "float32" | "fp32" | "float" => DType::Float32,
            "bfloat16" | "bf16" => DType::Bfloat16,
            "float16" | "fp16" | "half" => DType::Float16,
            "float8_e4m3fn" | "fp8" | "float8" => DType::Fp8,
            _ => return None,
        })
    }
}

/// How the checkpoint's linear weights are quantized.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Quantization {
    /// FP8 weights; `block` is `weight_block_size` = [block_n, block_k] when block-wise.
    Fp8 { block: Option<(u64, u64)> },
    /// MXFP4 (4-bit microscaling, 32-element blocks with a shared scale).
    Mxfp4,
    /// GPTQ with `bits` and `group_size` (None for -1: one group per row).
    Gptq { bits: u32, group_size: Option<u64> },
    /// AWQ with `bits` and `group_size`.
    Awq { bits: u32, group_size: Option<u64> },
    /// A method the planner does not model; weights are estimated at the model dtype.
    Other { name: String },
}

impl Quantization {
    /// Bytes per parameter of a quantized linear weight (scales included, approximately).
    pub fn bytes_per_param(&self, dtype: DType) -> f64 {
        match self {
            Quantization::Fp8 { .. } => 1.0,
            Quantization::Mxfp4 => 4.25 / 8.0,
            Quantization::Gptq { bits, group_size } | Quantization::Awq { bits, group_size } => {
                let scales = group_size.map(|g| 4.0 / g as f64).unwrap_or(0.0);
                *bits as f64 / 8.0 + scales
            }
            Quantization::Other { .. } => dtype.bytes() as f64,
        }
    }

    /// Input-dimension group size of GPTQ/AWQ, which per-rank input sizes must divide by.
    pub fn group_size(&self) -> Option<u64> {
        match self {
            Quantization::Gptq { group_size, .. } | Quantization::Awq { group_size, .. } => *group_size,
            _ => None,
        }
    }
}

/// Mixture-of-experts shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Moe {
    pub num_experts: u64,
    pub experts_per_token: Option<u64>,
    /// Per-expert FFN width (`moe_intermediate_size`, else `intermediate_size`).
    pub expert_intermediate_size: u64,
    pub shared_experts: u64,
    /// Layers `0..first_dense_layers` are dense (`first_k_dense_replace`).
    pub first_dense_layers: u64,
    /// Every `step`-th layer is MoE (`moe_layer_freq`, `interleave_moe_layer_step`, `decoder_sparse_step`).
    pub step: u64,
    /// Llama 4 and Qwen count `(layer + 1) % step == 0`; DeepSeek counts `layer % step == 0`.
    pub step_one_based: bool,
    /// True when the config has `moe_intermediate_size` (checked against TP separately).
    pub has_moe_intermediate_size: bool,
}

impl Moe {
    pub fn is_moe_layer(&self, layer: u64) -> bool {
        let step = self.step.max(1);
        let on_step = if self.step_one_based { (layer + 1).is_multiple_of(step) } else { layer.is_multiple_of(step) };
        layer >= self.first_dense_layers && on_step
    }
}

/// Multi-head latent attention (DeepSeek V2/V3 and similar).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mla {
    pub kv_lora_rank: u64,
    pub q_lora_rank: Option<u64>,
    pub qk_rope_head_dim: u64,
    pub qk_nope_head_dim: u64,
    pub v_head_dim: u64,
}

/// A model as the planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelDesc {
    pub architecture: String,
    pub model_type: String,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub num_hidden_layers: u64,
    pub hidden_size: u64,
    pub head_dim: u64,
    /// Dense FFN width (`intermediate_size_mlp` for Llama 4, else `intermediate_size`).
    pub intermediate_size: Option<u64>,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: Option<u64>,
    pub dtype: DType,
    /// True when `torch_dtype` was missing and `dtype` is an assumption.
    pub dtype_assumed: bool,
    pub moe: Option<Moe>,
    pub mla: Option<Mla>,
    pub quantization: Option<Quantization>,
    /// Things the parser assumed or noticed, for the report.
    pub notes: Vec<String>,
}

impl ModelDesc {
    pub fn is_moe(&self) -> bool {
        self.moe.is_some()
    }

    pub fn is_mla(&self) -> bool {
        self.mla.is_some()
    }

    /// Vocabulary padded the way vLLM pads embeddings (a multiple of 64).
    pub fn padded_vocab(&self) -> u64 {
        self.vocab_size.div_ceil(64) * 64
    }
}
