//! PlanReport <-> tessera.v1.PlanReport, so that a plan made by the head and one made offline by
//! the CLI are rendered by the same code.

use tessera_proto::v1 as pb;

use super::memory::MemoryReport;
use super::partition::Stage;
use super::placement::RankPlacement;
use super::{Alternative, ModelSummary, PlanReport, Violation};

impl From<&PlanReport> for pb::PlanReport {
    fn from(r: &PlanReport) -> Self {
        pb::PlanReport {
            valid: r.valid,
            errors: r
                .errors
                .iter()
                .map(|e| pb::PlanViolation { rule: e.rule.clone(), message: e.message.clone() })
                .collect(),
            warnings: r.warnings.clone(),
            tp: r.tp,
            pp: r.pp,
            world_size: r.world_size,
            nnodes: r.nnodes,
            valid_tp_sizes: r.valid_tp_sizes.clone(),
            kv_heads_per_rank: r.kv_heads_per_rank,
            kv_head_replication: r.kv_head_replication,
            model: Some(pb::ModelSummary {
                architecture: r.model.architecture.clone(),
                num_attention_heads: r.model.num_attention_heads,
                num_key_value_heads: r.model.num_key_value_heads,
                num_hidden_layers: r.model.num_hidden_layers,
                hidden_size: r.model.hidden_size,
                head_dim: r.model.head_dim,
                vocab_size: r.model.vocab_size,
                max_position_embeddings: r.model.max_position_embeddings,
                is_moe: r.model.is_moe,
                num_experts: r.model.num_experts,
                is_mla: r.model.is_mla,
                dtype: r.model.dtype.clone(),
                dtype_assumed: r.model.dtype_assumed,
                quantization: r.model.quantization.clone(),
                notes: r.model.notes.clone(),
            }),
            stages: r
                .stages
                .iter()
                .map(|s| pb::PlanStage {
                    pp_rank: s.pp_rank,
                    layer_start: s.layer_start,
                    layer_end: s.layer_end,
                    num_layers: s.num_layers,
                })
                .collect(),
            memory: r.memory.as_ref().map(|m| pb::MemoryReport {
                weights_source: m.weights_source.clone(),
                weight_bytes_total: m.weight_bytes_total,
                gpu_memory_bytes: m.gpu_memory_bytes,
                gpu_memory_utilization: m.gpu_memory_utilization,
                runtime_reserve_bytes: m.runtime_reserve_bytes,
                weight_bytes_per_gpu: m.weight_bytes_per_gpu,
                weight_bytes_per_gpu_by_stage: m.weight_bytes_per_gpu_by_stage.clone(),
                kv_cache_bytes_per_gpu: m.kv_cache_bytes_per_gpu,
                kv_bytes_per_token_by_stage: m.kv_bytes_per_token_by_stage.clone(),
                kv_cache_tokens: m.kv_cache_tokens,
                max_model_len: m.max_model_len,
                fits: m.fits,
                shortfall_bytes_per_gpu: m.shortfall_bytes_per_gpu,
            }),
            placement: r.placement.iter().map(pb::RankPlacement::from).collect(),
            alternatives: r
                .alternatives
                .iter()
                .map(|a| pb::PlanAlternative {
                    tp: a.tp,
                    pp: a.pp,
                    world_size: a.world_size,
                    nnodes: a.nnodes,
                    kv_cache_tokens: a.kv_cache_tokens,
                    weight_bytes_per_gpu: a.weight_bytes_per_gpu,
                })
                .collect(),
        }
    }
}

impl From<&RankPlacement> for pb::RankPlacement {
    fn from(p: &RankPlacement) -> Self {
        pb::RankPlacement {
            rank: p.rank,
            tp_rank: p.tp_rank,
            pp_rank: p.pp_rank,
            node: p.node.clone(),
            node_id: p.node_id.clone(),
            node_rank: p.node_rank,
            gpu_index: p.gpu_index,
            gpu_uuid: p.gpu_uuid.clone(),
        }
    }
}

impl From<&pb::RankPlacement> for RankPlacement {
    fn from(p: &pb::RankPlacement) -> Self {
        RankPlacement {
            rank: p.rank,
            tp_rank: p.tp_rank,
            pp_rank: p.pp_rank,
            node: p.node.clone(),
            node_id: p.node_id.clone(),
            node_rank: p.node_rank,
            gpu_index: p.gpu_index,
            gpu_uuid: p.gpu_uuid.clone(),
        }
    }
}

impl From<pb::PlanReport> for PlanReport {
    fn from(r: pb::PlanReport) -> Self {
        let m = r.model.unwrap_or_default();
        PlanReport {
            valid: r.valid,
            errors: r.errors.into_iter().map(|e| Violation { rule: e.rule, message: e.message }).collect(),
            warnings: r.warnings,
            tp: r.tp,
            pp: r.pp,
            world_size: r.world_size,
            nnodes: r.nnodes,
            valid_tp_sizes: r.valid_tp_sizes,
            kv_heads_per_rank: r.kv_heads_per_rank,
            kv_head_replication: r.kv_head_replication,
            model: ModelSummary {
                architecture: m.architecture,
                num_attention_heads: m.num_attention_heads,
                num_key_value_heads: m.num_key_value_heads,
                num_hidden_layers: m.num_hidden_layers,
                hidden_size: m.hidden_size,
                head_dim: m.head_dim,
                vocab_size: m.vocab_size,
                max_position_embeddings: m.max_position_embeddings,
                is_moe: m.is_moe,
                num_experts: m.num_experts,
                is_mla: m.is_mla,
                dtype: m.dtype,
                dtype_assumed: m.dtype_assumed,
                quantization: m.quantization,
                notes: m.notes,
            },
            stages: r
                .stages
                .into_iter()
                .map(|s| Stage {
                    pp_rank: s.pp_rank,
                    layer_start: s.layer_start,
                    layer_end: s.layer_end,
                    num_layers: s.num_layers,
                })
                .collect(),
            memory: r.memory.map(|m| MemoryReport {
                weights_source: m.weights_source,
                weight_bytes_total: m.weight_bytes_total,
                gpu_memory_bytes: m.gpu_memory_bytes,
                gpu_memory_utilization: m.gpu_memory_utilization,
                runtime_reserve_bytes: m.runtime_reserve_bytes,
                weight_bytes_per_gpu: m.weight_bytes_per_gpu,
                weight_bytes_per_gpu_by_stage: m.weight_bytes_per_gpu_by_stage,
                kv_cache_bytes_per_gpu: m.kv_cache_bytes_per_gpu,
                kv_bytes_per_token_by_stage: m.kv_bytes_per_token_by_stage,
                kv_cache_tokens: m.kv_cache_tokens,
                max_model_len: m.max_model_len,
                fits: m.fits,
                shortfall_bytes_per_gpu: m.shortfall_bytes_per_gpu,
            }),
            placement: r.placement.iter().map(RankPlacement::from).collect(),
            alternatives: r
                .alternatives
                .into_iter()
                .map(|a| Alternative {
                    tp: a.tp,
                    pp: a.pp,
                    world_size: a.world_size,
                    nnodes: a.nnodes,
                    kv_cache_tokens: a.kv_cache_tokens,
                    weight_bytes_per_gpu: a.weight_bytes_per_gpu,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::placement::Cluster;
    use super::super::*;

    #[test]
    fn a_report_survives_the_wire() {
        let m = crate::model::parse_config(
            "c",
            r#"{"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "num_hidden_layers": 32,
                "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 8192}"#,
        )
        .expect("config");
        let r = plan(
            &m,
            &memory::Weights::estimate(&m),
            &Cluster::uniform(2, 4, 80 << 30),
            &PlanRequest { tp: Size::Fixed(4), pp: Size::Fixed(2), ..Default::default() },
        );
        assert!(r.valid, "{:?}", r.errors);
        let back = PlanReport::from(tessera_proto::v1::PlanReport::from(&r));
        assert_eq!(back, r);
    }
}
