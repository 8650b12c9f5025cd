//! Tensor-parallel rules, as vLLM 0.33 enforces them at load time.

use serde::Serialize;

use crate::model::{ModelDesc, Quantization};

/// A broken rule: which one, and a message that says the values and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub rule: String,
    pub message: String,
}

fn v(rule: &str, message: String) -> Violation {
    Violation { rule: rule.to_string(), message }
}

/// Every rule a TP size must pass for this model. Empty when `tp` is valid.
pub fn check_tp(m: &ModelDesc, tp: u64) -> Vec<Violation> {
    let mut out = Vec::new();
    if tp == 0 {
        out.push(v("tensor_parallel_size", "tensor parallel size must be at least 1".into()));
        return out;
    }
    let h = m.num_attention_heads;
    if !h.is_multiple_of(tp) {
        out.push(v(
            "attention_heads",
            format!("Total number of attention heads ({h}) must be divisible by tensor parallel size ({tp})."),
        ));
    }
    if m.mla.is_none() {
        let kv = m.num_key_value_heads;
        if tp >= kv && !tp.is_multiple_of(kv) {
            out.push(v(
                "kv_heads",
                format!(
                    "tensor parallel size ({tp}) is at least the number of KV heads ({kv}), so it must be a multiple of it (each rank then holds one replicated KV head)."
                ),
            ));
        } else if tp < kv && !kv.is_multiple_of(tp) {
            out.push(v(
                "kv_heads",
                format!("Total number of KV heads ({kv}) must be divisible by tensor parallel size ({tp})."),
            ));
        }
    }
    // Expert parallelism is not planned yet: expert FFNs are split by TP like dense ones.
    if let Some(i) = m.intermediate_size
        && i % tp != 0
    {
        out.push(v(
            "intermediate_size",
            format!("intermediate_size ({i}) must be divisible by tensor parallel size ({tp})."),
        ));
    }
    if let Some(moe) = &m.moe {
        let i = moe.expert_intermediate_size;
        if m.intermediate_size != Some(i) && i % tp != 0 {
            out.push(v(
                "moe_intermediate_size",
                format!(
                    "{} ({i}) must be divisible by tensor parallel size ({tp}) without expert parallelism.",
                    expert_width_name(m)
                ),
            ));
        }
    }
    // Per-rank widths of the split linear layers.
    let mut ffn_widths: Vec<(&str, u64)> = Vec::new();
    if let Some(i) = m.intermediate_size {
        ffn_widths.push(("intermediate_size", i));
    }
    if let Some(moe) = &m.moe
        && m.intermediate_size != Some(moe.expert_intermediate_size)
    {
        ffn_widths.push((expert_width_name(m), moe.expert_intermediate_size));
    }
    match &m.quantization {
        Some(Quantization::Fp8 { block: Some((bn, bk)) }) => {
            for (name, width) in &ffn_widths {
                if width % tp != 0 {
                    continue; // reported above
                }
                let per_rank = width / tp;
                if !per_rank.is_multiple_of(*bn) || !per_rank.is_multiple_of(*bk) {
                    out.push(v(
                        "fp8_block",
                        format!(
                            "{name} ({width}) split {tp} ways is {per_rank} per rank, which is not a multiple of the FP8 weight block size [{bn}, {bk}]."
                        ),
                    ));
                }
            }
        }
        Some(q @ (Quantization::Gptq { .. } | Quantization::Awq { .. })) => {
            if let Some(g) = q.group_size() {
                // Row-parallel layers split their input: down_proj (the FFN width), o_proj (heads x head_dim).
                let attn = m.num_attention_heads * m.head_dim;
                for (name, width) in ffn_widths.iter().copied().chain([("attention output (heads x head_dim)", attn)]) {
                    if width % tp != 0 {
                        continue;
                    }
                    let per_rank = width / tp;
                    if !per_rank.is_multiple_of(g) {
                        out.push(v(
                            "quant_group_size",
                            format!(
                                "{name} ({width}) split {tp} ways is {per_rank} per rank, which is not a multiple of the quantization group_size ({g})."
                            ),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    out
}

fn expert_width_name(m: &ModelDesc) -> &'static str {
    match &m.moe {
        Some(moe) if moe.has_moe_intermediate_size => "moe_intermediate_size",
        _ => "intermediate_size (experts)",
    }
}

/// The TP sizes that pass every rule: divisors of the attention head count that also pass the
/// KV, FFN and quantization rules.
pub fn valid_tp_sizes(m: &ModelDesc) -> Vec<u64> {
    (1..=m.num_attention_heads)
        .filter(|&t| m.num_attention_heads.is_multiple_of(t) && check_tp(m, t).is_empty())
        .collect()
}

/// KV heads each rank holds, and how many ranks hold a copy of each (replication).
pub fn kv_heads_per_rank(m: &ModelDesc, tp: u64) -> (u64, u64) {
    if m.mla.is_some() {
        return (1, tp.max(1)); // one latent KV "head", replicated on every rank
    }
    let kv = m.num_key_value_heads;
    if tp >= kv { (1, tp / kv.max(1)) } else { (kv / tp.max(1), 1) }
}

pub fn list(sizes: &[u64]) -> String {
    sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}
