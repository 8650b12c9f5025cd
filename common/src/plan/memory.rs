//! Per-GPU memory: weights of a stage's share, a runtime reserve that grows with TP, and the KV cache
//! in what is left. The formula and its measured sources are in README.md beside this file.

use serde::Serialize;

use crate::model::safetensors::WeightBytes;
use crate::model::{DType, ModelDesc, Quantization};

/// Memory each GPU of a `tp`-way group keeps for everything that is neither weights nor KV cache,
/// as vLLM subtracts it when it sizes the cache: the activation peak of its profiling run, non-torch
/// memory (NCCL and custom all-reduce buffers, which grow with the group) and CUDA graphs.
///
/// Measured (GiB; "non-KV minus weights" + CUDA graph memory, vLLM v0.19 logs on H100-80GB from
/// llm-d-incubation/llm-d-planner `accuracy/results/v0.19.0`; TP8 from vLLM PR #10511 / issue #10702):
///
/// | model | TP | non-KV minus weights | CUDA graphs | total |
/// |---|---|---|---|---|
/// | Llama-3.1-8B | 1 | 2.14 | 0.91 | 3.05 |
/// | Llama-3.1-8B | 2 | 3.96 | 0.76 | 4.72 |
/// | Llama-3.1-8B | 4 | 4.02 | 0.67 | 4.69 |
/// | Mixtral-8x7B | 2 | 3.28 | 0.93 | 4.21 |
/// | Llama-3.3-70B-FP8 | 2 | 4.06 | 1.79 | 5.85 |
/// | Llama-3.3-70B-FP8 | 4 | 4.18 | 1.66 | 5.84 |
/// | Kimi-Dev-72B | 4 | 4.50 | 1.54 | 6.04 |
/// | Llama-4-Scout | 4 | 5.36 | 1.13 | 6.49 |
/// | Llama-3.1-70B (H200, v0.6.4, #10702) | 8 | non-torch 5.68 + activation ~0.1 | ~1.5 | ~7.3 |
///
/// Fit: TP1 3.25 GiB; TP > 1 5.0 GiB + 0.75 GiB x ceil(log2(TP)) (TP2 5.75, TP4 6.5, TP8 7.25),
/// no more than 0.1 GiB below any row and 0.25 GiB above the largest at its TP. The CUDA context
/// (~0.5 GiB) is not in it: like vLLM, the plan expects it to fit in the `1 - gpu_memory_utilization`
/// headroom. NVSwitch NVLS at TP8 with an older NCCL can take ~2 GiB more (`NCCL_NVLS_ENABLE=0`
/// turns it off); that is not in it either.
pub fn runtime_reserve_bytes(tp: u64) -> u64 {
    const QUARTER_GIB: u64 = 1 << 28;
    if tp <= 1 {
        return 13 * QUARTER_GIB;
    }
    // ceil(log2(tp)) for tp >= 2: the bit length of tp - 1.
    let steps = u64::from(u64::BITS - (tp - 1).leading_zeros());
    20 * QUARTER_GIB + 3 * QUARTER_GIB * steps
}

/// Weight bytes of each part of the model, exact or estimated.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub per_layer: Vec<u64>,
    /// The part of each `per_layer` entry that every tensor-parallel rank holds whole instead of a
    /// `1/tp` share: norms, MoE routers, MLA's A-projections and their FP8 scales.
    pub per_layer_replicated: Vec<u64>,
    pub embedding: u64,
    pub lm_head: u64,
    pub first_other: u64,
    /// Final norm and the like: replicated on every rank of the last stage.
    pub last_other: u64,
    pub exact: bool,
}

impl Weights {
    pub fn exact(w: &WeightBytes) -> Weights {
        let mut per_layer_replicated = w.per_layer_replicated.clone();
        per_layer_replicated.resize(w.per_layer.len(), 0);
        Weights {
            per_layer: w.per_layer.clone(),
            per_layer_replicated,
            embedding: w.embedding,
            lm_head: w.lm_head,
            first_other: w.first_stage_other,
            last_other: w.last_stage_other,
            exact: true,
        }
    }

    /// From the config alone: attention, FFN (dense or MoE) and norms per layer; embeddings and
    /// LM head padded to a multiple of 64 rows. Quantized linear weights use the method's bytes
    /// per parameter, plus float32 `weight_scale_inv` blocks for block-wise FP8; embeddings, LM
    /// head, routers and norms stay at the model dtype. What vLLM replicates on every TP rank (as
    /// in `deepseek_v2.py`: the MLA A-projections, all norms, the MoE router and its correction
    /// bias) goes to `per_layer_replicated` as well.
    pub fn estimate(m: &ModelDesc) -> Weights {
        let dt = m.dtype.bytes() as f64;
        let lin = m.quantization.as_ref().map(|q| q.bytes_per_param(m.dtype)).unwrap_or(dt);
        let block = match &m.quantization {
            Some(Quantization::Fp8 { block: Some((n, k)) }) => Some(((*n).max(1) as f64, (*k).max(1) as f64)),
            _ => None,
        };
        // A quantized linear weight of shape [out, in], with its block scales.
        let linear = |out: f64, inp: f64| {
            let scales = block.map(|(n, k)| (out / n).ceil() * (inp / k).ceil() * 4.0).unwrap_or(0.0);
            out * inp * lin + scales
        };
        let (h, hidden) = (m.num_attention_heads as f64, m.hidden_size as f64);
        // (sharded, replicated) bytes of one layer's attention and its norms.
        let (attn, attn_replicated) = match &m.mla {
            Some(mla) => {
                let qk = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) as f64;
                let kv_lora = mla.kv_lora_rank as f64;
                // kv_a_proj_with_mqa (fused with q_a_proj when there is a q LoRA) and kv_a_layernorm.
                let kv_a = linear(kv_lora + mla.qk_rope_head_dim as f64, hidden) + kv_lora * dt;
                let (q, q_a) = match mla.q_lora_rank {
                    Some(r) => {
                        let r = r as f64;
                        (linear(h * qk, r), linear(r, hidden) + r * dt)
                    }
                    None => (linear(h * qk, hidden), 0.0),
                };
                let kv_b = linear(h * (mla.qk_nope_head_dim + mla.v_head_dim) as f64, kv_lora);
                let o = linear(hidden, h * mla.v_head_dim as f64);
                (q + kv_b + o, q_a + kv_a)
            }
            None => {
                let hd = m.head_dim as f64;
                let kv = m.num_key_value_heads as f64;
                (linear(h * hd, hidden) + 2.0 * linear(kv * hd, hidden) + linear(hidden, h * hd), 0.0)
            }
        };
        let mlp = |width: f64| 2.0 * linear(width, hidden) + linear(hidden, width);
        let dense_ffn = m.intermediate_size.map(|i| mlp(i as f64)).unwrap_or(0.0);
        let norms = 2.0 * hidden * dt;
        let (per_layer, per_layer_replicated) = (0..m.num_hidden_layers)
            .map(|layer| {
                let (ffn, router) = match &m.moe {
                    Some(moe) if moe.is_moe_layer(layer) => {
                        let experts = moe.num_experts as f64;
                        let ffn = (experts + moe.shared_experts as f64) * mlp(moe.expert_intermediate_size as f64);
                        // DeepSeek-V3's sigmoid router carries a float32 bias per expert.
                        let bias = if m.model_type == "deepseek_v3" { experts * 4.0 } else { 0.0 };
                        (ffn, hidden * experts * dt + bias)
                    }
                    _ => (dense_ffn, 0.0),
                };
                let replicated = attn_replicated + router + norms;
                ((attn + ffn + replicated) as u64, replicated as u64)
            })
            .unzip();
        let embedding = m.padded_vocab().saturating_mul(m.hidden_size).saturating_mul(m.dtype.bytes());
        Weights {
            per_layer,
            per_layer_replicated,
            embedding,
            lm_head: if m.tie_word_embeddings { 0 } else { embedding },
            first_other: 0,
            last_other: m.hidden_size.saturating_mul(m.dtype.bytes()),
            exact: false,
        }
    }

    /// Bytes one GPU of stage `s` holds with `tp`-way tensor parallelism: a `1/tp` share of the
    /// sharded weights (rounded up) plus every replicated byte.
    pub fn per_gpu(&self, m: &ModelDesc, counts: &[u64], s: usize, tp: u64) -> u64 {
        let mut replicated = self.replicated(counts, s);
        let layers = sum(&self.per_layer[stage_layers(counts, s)]);
        let mut sharded = layers.saturating_sub(replicated);
        let pp = counts.len();
        if s == 0 {
            sharded = sharded.saturating_add(self.embedding).saturating_add(self.first_other);
        }
        if s == pp - 1 {
            replicated = replicated.saturating_add(self.last_other);
            // Tied embeddings share one tensor on a single stage; with pipelining the last stage
            // loads its own copy for the LM head.
            sharded = sharded.saturating_add(if self.lm_head == 0 && m.tie_word_embeddings && pp > 1 {
                self.embedding
            } else {
                self.lm_head
            });
        }
        sharded.div_ceil(tp.max(1)).saturating_add(replicated)
    }

    /// Replicated bytes of the layers of stage `s`, which [`Weights::per_gpu`] does not divide.
    pub fn replicated(&self, counts: &[u64], s: usize) -> u64 {
        sum(self.per_layer_replicated.get(stage_layers(counts, s)).unwrap_or_default())
    }

    pub fn total(&self) -> u64 {
        sum(&[self.embedding, self.lm_head, self.first_other, self.last_other]).saturating_add(sum(&self.per_layer))
    }
}

/// Indices of the layers of stage `s` when the stages hold `counts` layers each.
fn stage_layers(counts: &[u64], s: usize) -> std::ops::Range<usize> {
    let start = counts[..s].iter().sum::<u64>() as usize;
    start..start + counts[s] as usize
}

/// A sum that saturates: sizes can come from files, and a lying header must not overflow.
fn sum(v: &[u64]) -> u64 {
    v.iter().fold(0u64, |a, &b| a.saturating_add(b))
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
    kv_dtype: Option<DType>,
) -> MemoryReport {
    let budget = (gpu_memory as f64 * utilization) as u64;
    let reserve = runtime_reserve_bytes(tp);
    let by_stage: Vec<u64> = (0..counts.len()).map(|s| w.per_gpu(m, counts, s, tp)).collect();
    let kv_per_token: Vec<u64> =
        counts.iter().map(|&l| kv_bytes_per_token(m, l, kv_heads_per_rank, kv_dtype.unwrap_or(m.dtype))).collect();
    let mut tokens = u64::MAX;
    let mut kv_min = u64::MAX;
    let mut shortfall = 0u64;
    for (s, &wb) in by_stage.iter().enumerate() {
        let need = wb.saturating_add(reserve);
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
        runtime_reserve_bytes: reserve,
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
