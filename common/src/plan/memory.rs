//! Per-GPU memory: weights of a stage's share, a runtime reserve, and the KV cache in what is left.

use serde::Serialize;

use crate::model::safetensors::WeightBytes;
use crate::model::{DType, ModelDesc};

/// Memory each GPU keeps for everything that is not weights or KV cache: the CUDA context and
/// PyTorch's allocator slack (~0.5 GiB), NCCL communicator buffers (~0.3 GiB), CUDA graphs
/// (~0.5 GiB) and the activation peak of a prefill chunk (~0.7 GiB at vLLM's default batch token
/// budget). 2 GiB is a deliberately conservative figure; vLLM measures the real value when it
/// profiles, so a plan that fits here fits there.
pub const RUNTIME_RESERVE_BYTES: u64 = 2 << 30;

/// Weight bytes of each part of the model, exact or estimated.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub per_layer: Vec<u64>,
    pub embedding: u64,
    pub lm_head: u64,
    pub first_other: u64,
    pub last_other: u64,
    pub exact: bool,
}

impl Weights {
    pub fn exact(w: &WeightBytes) -> Weights {
        Weights {
            per_layer: w.per_layer.clone(),
            embedding: w.embedding,
            lm_head: w.lm_head,
            first_other: w.first_stage_other,
            last_other: w.last_stage_other,
            exact: true,
        }
    }

    /// From the config alone: attention, FFN (dense or MoE) and norms per layer; embeddings and
    /// LM head padded to a multiple of 64 rows. Quantized linear weights use the method's bytes
    /// per parameter; embeddings, LM head and norms stay at the model dtype.
    pub fn estimate(m: &ModelDesc) -> Weights {
        let dt = m.dtype.bytes() as f64;
        let lin = m.quantization.as_ref().map(|q| q.bytes_per_param(m.dtype)).unwrap_or(dt);
        let (h, hidden) = (m.num_attention_heads as f64, m.hidden_size as f64);
        let attn = match &m.mla {
            Some(mla) => {
                let qk = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) as f64;
                let q = match mla.q_lora_rank {
                    Some(r) => hidden * r as f64 + r as f64 * h * qk,
                    None => hidden * h * qk,
                };
                let kv_a = hidden * (mla.kv_lora_rank + mla.qk_rope_head_dim) as f64;
                let kv_b = mla.kv_lora_rank as f64 * h * (mla.qk_nope_head_dim + mla.v_head_dim) as f64;
                let o = h * mla.v_head_dim as f64 * hidden;
                q + kv_a + kv_b + o
            }
            None => {
                let hd = m.head_dim as f64;
                let kv = m.num_key_value_heads as f64;
                hidden * h * hd + 2.0 * hidden * kv * hd + h * hd * hidden
            }
        };
        let dense_ffn = m.intermediate_size.map(|i| 3.0 * hidden * i as f64).unwrap_or(0.0);
        let per_layer = (0..m.num_hidden_layers)
            .map(|layer| {
                let ffn = match &m.moe {
                    Some(moe) if moe.is_moe_layer(layer) => {
                        let e = moe.expert_intermediate_size as f64;
                        (moe.num_experts + moe.shared_experts) as f64 * 3.0 * hidden * e
                    }
                    _ => dense_ffn,
                };
                let router = match &m.moe {
                    Some(moe) if moe.is_moe_layer(layer) => hidden * moe.num_experts as f64 * dt,
                    _ => 0.0,
                };
                ((attn + ffn) * lin + router + 2.0 * hidden * dt) as u64
            })
            .collect();
        let embedding = m.padded_vocab().saturating_mul(m.hidden_size).saturating_mul(m.dtype.bytes());
        Weights {
            per_layer,
            embedding,
            lm_head: if m.tie_word_embeddings { 0 } else { embedding },
            first_other: 0,
            last_other: m.hidden_size.saturating_mul(m.dtype.bytes()),
            exact: false,
        }
    }

    /// Bytes one GPU of stage `s` holds with `tp`-way tensor parallelism.
    pub fn per_gpu(&self, m: &ModelDesc, counts: &[u64], s: usize, tp: u64) -> u64 {
        let start: u64 = counts[..s].iter().sum();
        let layers: u64 =
            self.per_layer[start as usize..(start + counts[s]) as usize].iter().fold(0u64, |a, &b| a.saturating_add(b));
        let mut bytes = layers;
        let pp = counts.len();
        if s == 0 {
            bytes = bytes.saturating_add(self.embedding).saturating_add(self.first_other);
        }
        if s == pp - 1 {
            bytes = bytes.saturating_add(self.last_other);
            // Tied embeddings share one tensor on a single stage; with pipelining the last stage
            // loads its own copy for the LM head.
            bytes = bytes.saturating_add(if self.lm_head == 0 && m.tie_word_embeddings && pp > 1 {
                self.embedding
            } else {
                self.lm_head
            });
        }
        bytes.div_ceil(tp.max(1))
    }

    pub fn total(&self) -> u64 {
        [self.embedding, self.lm_head, self.first_other, self.last_other]
            .iter()
            .chain(&self.per_layer)
            .fold(0u64, |a, &b| a.saturating_add(b))
    }
}

/// KV cache bytes per token on one rank of a stage with `layers` layers.
pub fn kv_bytes_per_token(m: &ModelDesc, layers: u64, kv_heads_per_rank: u64, kv_dtype: DType) -> u64 {
    let b = kv_dtype.bytes();
    match &m.mla {
        Some(mla) => layers.saturating_mul(mla.kv_lora_rank.saturating_add(mla.qk_rope_head_dim)).saturating_mul(b),
        None => {
            2u64.saturating_mul(layers).saturating_mul(kv_heads_per_rank).saturating_mul(m.head_dim).saturating_mul(b)
        }
    }
}

/// The memory picture of one plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryReport {
    /// `safetensors` (exact) or `estimated` (from the config).
    pub weights_source: String,
    pub weight_bytes_total: u64,
    pub gpu_memory_bytes: u64,
    pub gpu_memory_utilization: f64,
    pub runtime_reserve_bytes: u64,
    /// Largest per-GPU weight share over the stages.
    pub weight_bytes_per_gpu: u64,
    pub weight_bytes_per_gpu_by_stage: Vec<u64>,
    /// Smallest per-GPU KV cache over the stages (0 if the weights do not fit).
    pub kv_cache_bytes_per_gpu: u64,
    pub kv_bytes_per_token_by_stage: Vec<u64>,
    /// Tokens of KV cache the deployment holds (the smallest stage decides).
    pub kv_cache_tokens: u64,
    pub max_model_len: Option<u64>,
    pub fits: bool,
    /// Bytes per GPU missing on the tightest stage, when the weights alone do not fit.
    pub shortfall_bytes_per_gpu: u64,
}

/// Computes the memory picture for `tp` x `counts.len()` on GPUs of `gpu_memory` bytes.
// Each argument is one plain input of the formula; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn memory(
    m: &ModelDesc,
    w: &Weights,
    counts: &[u64],
    tp: u64,
    kv_heads_per_rank: u64,
    gpu_memory: u64,
    utilization: f64,
    max_model_len: Option<u64>,
) -> MemoryReport {
    let budget = (gpu_memory as f64 * utilization) as u64;
    let by_stage: Vec<u64> = (0..counts.len()).map(|s| w.per_gpu(m, counts, s, tp)).collect();
    let kv_per_token: Vec<u64> = counts.iter().map(|&l| kv_bytes_per_token(m, l, kv_heads_per_rank, m.dtype)).collect();
    let mut tokens = u64::MAX;
    let mut kv_min = u64::MAX;
    let mut shortfall = 0u64;
    for (s, &wb) in by_stage.iter().enumerate() {
        let need = wb.saturating_add(RUNTIME_RESERVE_BYTES);
        let kv = budget.saturating_sub(need);
        if need > budget {
            shortfall = shortfall.max(need - budget);
        }
        kv_min = kv_min.min(kv);
        if let Some(t) = kv.checked_div(kv_per_token[s]) {
            tokens = tokens.min(t);
        }
    }
    if tokens == u64::MAX {
        tokens = 0;
    }
    let fits = shortfall == 0 && tokens > 0 && max_model_len.is_none_or(|l| tokens >= l);
    MemoryReport {
        weights_source: if w.exact { "safetensors" } else { "estimated" }.to_string(),
        weight_bytes_total: w.total(),
        gpu_memory_bytes: gpu_memory,
        gpu_memory_utilization: utilization,
        runtime_reserve_bytes: RUNTIME_RESERVE_BYTES,
        weight_bytes_per_gpu: by_stage.iter().copied().max().unwrap_or(0),
        weight_bytes_per_gpu_by_stage: by_stage,
        kv_cache_bytes_per_gpu: if kv_min == u64::MAX { 0 } else { kv_min },
        kv_bytes_per_token_by_stage: kv_per_token,
        kv_cache_tokens: tokens,
        max_model_len,
        fits,
        shortfall_bytes_per_gpu: shortfall,
    }
}
