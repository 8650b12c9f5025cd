//! The sharding planner: is TP x PP valid for this model (vLLM's rules), which layers go to which
//! stage, does it fit in memory, and which GPU runs each rank. Pure: no I/O, no clock.
//!
//! - [`rules`]: tensor-parallel rules and KV-head sharding.
//! - [`partition`]: pipeline stages (`get_pp_indices`).
//! - [`memory`]: weights per GPU, runtime reserve, KV cache capacity.
//! - [`placement`]: ranks onto GPUs of a cluster inventory.
//!
//! See README.md beside this file for the rules and their sources.

pub mod memory;
pub mod partition;
pub mod placement;
pub mod rules;
mod wire;

use serde::Serialize;

use crate::model::{DType, ModelDesc, Quantization};
use crate::size::HumanBytes;
use memory::{MemoryReport, Weights};
use partition::Stage;
use placement::{Cluster, Placement, RankPlacement};
pub use rules::Violation;

/// A TP or PP size: fixed, or chosen by the planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Fixed(u64),
    Auto,
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Size::Auto);
        }
        match s.parse::<u64>() {
            Ok(n) if (1..=4096).contains(&n) => Ok(Size::Fixed(n)),
            _ => Err(format!("invalid size {s:?}: write a whole number from 1 to 4096, or auto")),
        }
    }
}

/// vLLM 0.33's default `--gpu-memory-utilization`.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.92;

/// `--kv-cache-dtype` values vLLM accepts, and the element type each stores (None: the model's).
pub const KV_CACHE_DTYPES: &[(&str, Option<DType>)] = &[
    ("auto", None),
    ("bfloat16", Some(DType::Bfloat16)),
    ("float16", Some(DType::Float16)),
    ("half", Some(DType::Float16)),
    ("float32", Some(DType::Float32)),
    ("fp8", Some(DType::Fp8)),
    ("fp8_e4m3", Some(DType::Fp8)),
    ("fp8_e5m2", Some(DType::Fp8)),
    ("fp8_inc", Some(DType::Fp8)),
    ("fp8_ds_mla", Some(DType::Fp8)),
    ("fp8_per_token_head", Some(DType::Fp8)),
    ("int8_per_token_head", Some(DType::Fp8)),
    // Sub-byte caches are planned at one byte per element: capacity is underestimated, never
    // overestimated.
    ("int4_per_token_head", Some(DType::Fp8)),
    ("nvfp4", Some(DType::Fp8)),
    ("nvfp4_4over6", Some(DType::Fp8)),
    ("nvfp4_ds_mla", Some(DType::Fp8)),
    ("turboquant_3bit_nc", Some(DType::Fp8)),
    ("turboquant_4bit_nc", Some(DType::Fp8)),
    ("turboquant_k3v4_nc", Some(DType::Fp8)),
    ("turboquant_k8v4", Some(DType::Fp8)),
    ("ultraquant_4bit", Some(DType::Fp8)),
];

/// Reads a `--kv-cache-dtype` value; the error names the value and the accepted ones.
pub fn kv_cache_dtype(v: &str) -> Result<Option<DType>, String> {
    match KV_CACHE_DTYPES.iter().find(|(name, _)| *name == v) {
        Some((_, d)) => Ok(*d),
        None => {
            let names: Vec<&str> = KV_CACHE_DTYPES.iter().map(|(n, _)| *n).collect();
            Err(format!("{v:?} is not a KV cache dtype vLLM knows: one of {}", names.join(", ")))
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRequest {
    pub tp: Size,
    pub pp: Size,
    /// Fraction of each GPU's memory vLLM may use (`--gpu-memory-utilization`).
    pub gpu_memory_utilization: f64,
    /// Longest sequence to serve; default: the model's `max_position_embeddings`.
    pub max_model_len: Option<u64>,
    /// Explicit layers per stage (`--layer-partition`, `VLLM_PP_LAYER_PARTITION`).
    pub layer_partition: Option<Vec<u64>>,
    /// KV cache element type (`--kv-cache-dtype`); default: the model's dtype.
    pub kv_cache_dtype: Option<DType>,
    /// Refuse placements where a TP group spans nodes.
    pub strict: bool,
}

impl Default for PlanRequest {
    fn default() -> Self {
        PlanRequest {
            tp: Size::Fixed(1),
            pp: Size::Fixed(1),
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            max_model_len: None,
            layer_partition: None,
            kv_cache_dtype: None,
            strict: false,
        }
    }
}

/// The model facts a report shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    pub architecture: String,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub num_hidden_layers: u64,
    pub hidden_size: u64,
    pub head_dim: u64,
    pub vocab_size: u64,
    pub max_position_embeddings: Option<u64>,
    pub is_moe: bool,
    pub num_experts: Option<u64>,
    pub is_mla: bool,
    pub dtype: String,
    pub dtype_assumed: bool,
    pub quantization: Option<String>,
    pub notes: Vec<String>,
}

impl ModelSummary {
    fn of(m: &ModelDesc) -> Self {
        ModelSummary {
            architecture: m.architecture.clone(),
            num_attention_heads: m.num_attention_heads,
            num_key_value_heads: m.num_key_value_heads,
            num_hidden_layers: m.num_hidden_layers,
            hidden_size: m.hidden_size,
            head_dim: m.head_dim,
            vocab_size: m.vocab_size,
            max_position_embeddings: m.max_position_embeddings,
            is_moe: m.is_moe(),
            num_experts: m.moe.as_ref().map(|x| x.num_experts),
            is_mla: m.is_mla(),
            dtype: m.dtype.name().to_string(),
            dtype_assumed: m.dtype_assumed,
            quantization: m.quantization.as_ref().map(|q| match q {
                Quantization::Fp8 { block: Some((n, k)) } => format!("fp8 (blocks {n}x{k})"),
                Quantization::Fp8 { block: None } => "fp8".into(),
                Quantization::Mxfp4 => "mxfp4".into(),
                Quantization::Gptq { bits, group_size } => {
                    format!("gptq {bits}-bit, group {}", group_size.map(|g| g.to_string()).unwrap_or("none".into()))
                }
                Quantization::Awq { bits, group_size } => {
                    format!("awq {bits}-bit, group {}", group_size.map(|g| g.to_string()).unwrap_or("none".into()))
                }
                Quantization::Other { name } => {
                    format!("{name} (not modelled: weights estimated at the model dtype)")
                }
            }),
            notes: m.notes.clone(),
        }
    }
}

/// Another TP x PP that would work, for "auto" and for "does not fit" answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alternative {
    pub tp: u64,
    pub pp: u64,
    pub world_size: u64,
    pub nnodes: u64,
    pub kv_cache_tokens: u64,
    pub weight_bytes_per_gpu: u64,
}

/// The planner's answer. Its JSON form is `tessera plan -o json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanReport {
    pub valid: bool,
    pub errors: Vec<Violation>,
    pub warnings: Vec<String>,
    pub tp: u64,
    pub pp: u64,
    pub world_size: u64,
    pub nnodes: u64,
    pub valid_tp_sizes: Vec<u64>,
    pub kv_heads_per_rank: u64,
    pub kv_head_replication: u64,
    pub model: ModelSummary,
    pub stages: Vec<Stage>,
    pub memory: Option<MemoryReport>,
    pub placement: Vec<RankPlacement>,
    /// With `auto`: the ranked choices (the chosen one first). Otherwise, when the request does not
    /// fit: what would.
    pub alternatives: Vec<Alternative>,
}

/// Plans `model` on `cluster`. Never fails: an invalid request is a report with `valid: false`
/// and errors that say why.
pub fn plan(model: &ModelDesc, weights: &Weights, cluster: &Cluster, req: &PlanRequest) -> PlanReport {
    let valid_tp = rules::valid_tp_sizes(model);
    let mut warnings: Vec<String> = model.notes.clone();
    let max_model_len = req.max_model_len.or(model.max_position_embeddings);
    if max_model_len.is_none() {
        warnings.push(
            "the model has no max_position_embeddings and no --max-model-len was given: KV cache fit is not checked"
                .into(),
        );
    }
    if !(req.gpu_memory_utilization > 0.0 && req.gpu_memory_utilization <= 1.0) {
        return invalid(
            model,
            &valid_tp,
            0,
            0,
            Violation {
                rule: "gpu_memory_utilization".into(),
                message: format!(
                    "--gpu-memory-utilization {} must be more than 0 and at most 1",
                    req.gpu_memory_utilization
                ),
            },
        );
    }

    let ranked = if req.tp == Size::Auto || req.pp == Size::Auto {
        auto_candidates(model, weights, cluster, req, &valid_tp, max_model_len)
    } else {
        Vec::new()
    };
    let (tp, pp) = match (req.tp, req.pp) {
        (Size::Fixed(t), Size::Fixed(p)) => (t, p),
        _ => match ranked.first() {
            Some(a) => (a.tp, a.pp),
            None => {
                let mut r = invalid(
                    model,
                    &valid_tp,
                    0,
                    0,
                    Violation {
                        rule: "auto".into(),
                        message: format!(
                            "no tensor x pipeline parallel size fits this model on the free GPUs ({} free, at most {} on one node){}",
                            cluster.free_gpus(),
                            cluster.max_free_per_node(),
                            cluster
                                .min_free_gpu_memory()
                                .map(|m| format!(", {} each", HumanBytes(m)))
                                .unwrap_or_default()
                        ),
                    },
                );
                r.warnings = warnings;
                return r;
            }
        },
    };

    let mut errors: Vec<Violation> = rules::check_tp(model, tp);
    if errors.iter().any(|e| {
        matches!(
            e.rule.as_str(),
            "attention_heads"
                | "kv_heads"
                | "intermediate_size"
                | "moe_intermediate_size"
                | "fp8_block"
                | "quant_group_size"
        )
    }) && let Some(first) = errors.first_mut()
    {
        first.message.push_str(&format!(" Valid tensor parallel sizes for this model: {}.", rules::list(&valid_tp)));
    }
    let counts = match &req.layer_partition {
        Some(given) => partition::check_override(given, model.num_hidden_layers, pp),
        None => partition::layer_counts(model.num_hidden_layers, pp),
    };
    let counts = match counts {
        Ok(c) => {
            if c.contains(&0) {
                warnings.push("a pipeline stage holds no layers; it will only pass activations on".into());
            }
            c
        }
        Err(e) => {
            let rule = if req.layer_partition.is_some() { "layer_partition" } else { "pipeline_parallel_size" };
            errors.push(Violation { rule: rule.into(), message: e.to_string() });
            Vec::new()
        }
    };
    let (kv_per_rank, replication) = rules::kv_heads_per_rank(model, tp.max(1));

    // Place, if the shape itself is valid; then size memory on the GPUs actually chosen.
    let mut placement: Option<Placement> = None;
    if errors.is_empty() {
        match placement::place(cluster, tp, pp, req.strict) {
            Ok(p) => {
                warnings.extend(p.warnings.iter().cloned());
                placement = Some(p);
            }
            Err(e) => errors.push(Violation { rule: "placement".into(), message: e.to_string() }),
        }
    }
    let gpu_memory = placement.as_ref().map(|p| p.gpu_memory_bytes).or_else(|| cluster.min_free_gpu_memory());
    // Memory is only meaningful for a shape vLLM would accept.
    let shape_ok = rules::check_tp(model, tp).is_empty();
    let memory = match (gpu_memory, counts.is_empty() || !shape_ok) {
        (Some(mem), false) => Some(memory::memory(
            model,
            weights,
            &counts,
            tp,
            kv_per_rank,
            mem,
            req.gpu_memory_utilization,
            max_model_len,
            req.kv_cache_dtype,
        )),
        _ => None,
    };
    let mut alternatives = ranked.clone();
    if let Some(m) = &memory
        && !m.fits
    {
        let mut msg = if m.shortfall_bytes_per_gpu > 0 {
            format!(
                "does not fit: the weights need {} per GPU plus a {} runtime reserve, {} more than {} of a {} GPU",
                HumanBytes(m.weight_bytes_per_gpu),
                HumanBytes(m.runtime_reserve_bytes),
                HumanBytes(m.shortfall_bytes_per_gpu),
                req.gpu_memory_utilization,
                HumanBytes(m.gpu_memory_bytes)
            )
        } else {
            let len = max_model_len.unwrap_or(0);
            format!(
                "does not fit: the KV cache holds {} tokens, fewer than one sequence of max-model-len {len} ({} short); lower --max-model-len to at most {}, or use more GPUs",
                m.kv_cache_tokens,
                len.saturating_sub(m.kv_cache_tokens),
                m.kv_cache_tokens
            )
        };
        if alternatives.is_empty() {
            let all = PlanRequest { tp: Size::Auto, pp: Size::Auto, ..req.clone() };
            alternatives = auto_candidates(model, weights, cluster, &all, &valid_tp, max_model_len);
        }
        match alternatives.first() {
            Some(_) => msg.push_str(&format!(
                ". Would fit: {}",
                alternatives
                    .iter()
                    .take(3)
                    .map(|a| format!(
                        "--tp {} --pp {} ({} GPUs on {} node{})",
                        a.tp,
                        a.pp,
                        a.world_size,
                        a.nnodes,
                        if a.nnodes == 1 { "" } else { "s" }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => msg.push_str(". No TP x PP fits on the free GPUs of this cluster"),
        }
        errors.push(Violation { rule: "memory".into(), message: msg });
    }

    let placed = placement.as_ref();
    PlanReport {
        valid: errors.is_empty(),
        errors,
        warnings,
        tp,
        pp,
        world_size: tp * pp,
        nnodes: placed.map(|p| p.nnodes).unwrap_or(0),
        valid_tp_sizes: valid_tp,
        kv_heads_per_rank: kv_per_rank,
        kv_head_replication: replication,
        model: ModelSummary::of(model),
        stages: partition::stages(&counts),
        memory,
        placement: placed.map(|p| p.ranks.clone()).unwrap_or_default(),
        alternatives,
    }
}

fn invalid(model: &ModelDesc, valid_tp: &[u64], tp: u64, pp: u64, v: Violation) -> PlanReport {
    PlanReport {
        valid: false,
        errors: vec![v],
        warnings: Vec::new(),
        tp,
        pp,
        world_size: tp * pp,
        nnodes: 0,
        valid_tp_sizes: valid_tp.to_vec(),
        kv_heads_per_rank: 0,
        kv_head_replication: 0,
        model: ModelSummary::of(model),
        stages: Vec::new(),
        memory: None,
        placement: Vec::new(),
        alternatives: Vec::new(),
    }
}

/// Most alternatives a report lists.
const MAX_ALTERNATIVES: usize = 5;

/// Every valid TP x PP (within what the request fixes) that fits in memory and can be placed with
/// TP inside a node, ranked: fewest GPUs, then fewest nodes, then fewer pipeline stages, then
/// the most KV cache.
fn auto_candidates(
    model: &ModelDesc,
    weights: &Weights,
    cluster: &Cluster,
    req: &PlanRequest,
    valid_tp: &[u64],
    max_model_len: Option<u64>,
) -> Vec<Alternative> {
    let free = cluster.free_gpus() as u64;
    let per_node = cluster.max_free_per_node() as u64;
    let Some(mem) = cluster.min_free_gpu_memory() else {
        return Vec::new();
    };
    let tps: Vec<u64> = match req.tp {
        Size::Fixed(t) => vec![t],
        Size::Auto => valid_tp.iter().copied().filter(|&t| t <= per_node).collect(),
    };
    let pps: Vec<u64> = match req.pp {
        Size::Fixed(p) => vec![p],
        Size::Auto => (1..=model.num_hidden_layers.min(64)).collect(),
    };
    let mut sized: Vec<(u64, u64, MemoryReport)> = Vec::new();
    for &tp in &tps {
        if !rules::check_tp(model, tp).is_empty() {
            continue;
        }
        let (kv, _) = rules::kv_heads_per_rank(model, tp);
        for &pp in &pps {
            if tp * pp > free || pp > model.num_hidden_layers {
                continue;
            }
            let Ok(counts) = partition::layer_counts(model.num_hidden_layers, pp) else {
                continue;
            };
            let m = memory::memory(
                model,
                weights,
                &counts,
                tp,
                kv,
                mem,
                req.gpu_memory_utilization,
                max_model_len,
                req.kv_cache_dtype,
            );
            if m.fits {
                sized.push((tp, pp, m));
            }
        }
    }
    // Rank before placing, then place in rank order until enough alternatives are found.
    sized.sort_by_key(|(tp, pp, m)| {
        (tp * pp, (tp * pp).div_ceil(per_node.max(1)), *pp, std::cmp::Reverse(m.kv_cache_tokens))
    });
    let mut out = Vec::new();
    for (tp, pp, m) in sized {
        if let Ok(p) = placement::place(cluster, tp, pp, true) {
            out.push(Alternative {
                tp,
                pp,
                world_size: tp * pp,
                nnodes: p.nnodes,
                kv_cache_tokens: m.kv_cache_tokens,
                weight_bytes_per_gpu: m.weight_bytes_per_gpu,
            });
            if out.len() == MAX_ALTERNATIVES {
                break;
            }
        }
    }
    out.sort_by_key(|a| (a.world_size, a.nnodes, a.pp, std::cmp::Reverse(a.kv_cache_tokens)));
    out
}

#[cfg(test)]
mod tests;
