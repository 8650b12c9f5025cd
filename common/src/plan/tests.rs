//! Table tests over every real config in examples/model-configs, with expected values worked out by
//! hand from vLLM's rules (see README.md beside this file).

use std::path::PathBuf;

use super::placement::Cluster;
use super::*;
use crate::model::{ModelDesc, parse_config};

fn config(name: &str) -> ModelDesc {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/model-configs").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    parse_config(&p.display().to_string(), &text).unwrap_or_else(|e| panic!("{e}"))
}

const ALL: [&str; 8] = [
    "Llama-3.1-8B-Instruct",
    "Llama-3.1-70B-Instruct",
    "granite-3.3-8b-instruct",
    "Mixtral-8x7B-v0.1",
    "Qwen2.5-7B-Instruct",
    "Phi-3-mini-4k-instruct",
    "Llama-4-Scout-17B-16E-Instruct",
    "DeepSeek-V3",
];

#[test]
fn every_config_parses_to_the_published_shape() {
    // (name, heads, kv heads, layers, head_dim, moe experts, mla)
    type Shape = (&'static str, u64, u64, u64, u64, Option<u64>, bool);
    let want: [Shape; 8] = [
        ("Llama-3.1-8B-Instruct", 32, 8, 32, 128, None, false),
        ("Llama-3.1-70B-Instruct", 64, 8, 80, 128, None, false),
        ("granite-3.3-8b-instruct", 32, 8, 40, 128, None, false),
        ("Mixtral-8x7B-v0.1", 32, 8, 32, 128, Some(8), false),
        ("Qwen2.5-7B-Instruct", 28, 4, 28, 128, None, false),
        ("Phi-3-mini-4k-instruct", 32, 32, 32, 96, None, false),
        ("Llama-4-Scout-17B-16E-Instruct", 40, 8, 48, 128, Some(16), false),
        ("DeepSeek-V3", 128, 128, 61, 56, Some(256), true),
    ];
    for (name, h, kv, l, hd, experts, mla) in want {
        let m = config(name);
        assert_eq!(
            (
                m.num_attention_heads,
                m.num_key_value_heads,
                m.num_hidden_layers,
                m.head_dim,
                m.moe.as_ref().map(|x| x.num_experts),
                m.is_mla()
            ),
            (h, kv, l, hd, experts, mla),
            "{name}"
        );
    }
    let scout = config("Llama-4-Scout-17B-16E-Instruct");
    assert_eq!(scout.architecture, "Llama4ForConditionalGeneration");
    assert!(scout.notes.iter().any(|n| n.contains("text_config")));
    assert_eq!(scout.intermediate_size, Some(16384), "dense layers use intermediate_size_mlp");
    assert_eq!(scout.moe.as_ref().map(|x| x.expert_intermediate_size), Some(8192));
    let ds = config("DeepSeek-V3");
    assert_eq!(ds.quantization, Some(crate::model::Quantization::Fp8 { block: Some((128, 128)) }));
    assert_eq!(
        ds.moe.as_ref().map(|x| (x.first_dense_layers, x.shared_experts, x.expert_intermediate_size)),
        Some((3, 1, 2048))
    );
    assert!(config("granite-3.3-8b-instruct").tie_word_embeddings);
}

#[test]
fn valid_tp_sizes_per_model() {
    let want: [(&str, &[u64]); 8] = [
        ("Llama-3.1-8B-Instruct", &[1, 2, 4, 8, 16, 32]),
        ("Llama-3.1-70B-Instruct", &[1, 2, 4, 8, 16, 32, 64]),
        ("granite-3.3-8b-instruct", &[1, 2, 4, 8, 16, 32]),
        ("Mixtral-8x7B-v0.1", &[1, 2, 4, 8, 16, 32]),
        // 28 heads: 7 and 14 fail the KV rule (4 KV heads), 28 fails intermediate_size 18944.
        ("Qwen2.5-7B-Instruct", &[1, 2, 4]),
        ("Phi-3-mini-4k-instruct", &[1, 2, 4, 8, 16, 32]),
        // 40 heads: 5, 10, 20 fail the KV rule (8 KV heads), 40 fails intermediate_size_mlp 16384.
        ("Llama-4-Scout-17B-16E-Instruct", &[1, 2, 4, 8]),
        // 128 heads, MLA: from 32 up, 18432/tp and 2048/tp are not multiples of the 128 FP8 block.
        ("DeepSeek-V3", &[1, 2, 4, 8, 16]),
    ];
    for (name, sizes) in want {
        assert_eq!(rules::valid_tp_sizes(&config(name)), sizes, "{name}");
    }
}

#[test]
fn invalid_tp_messages_match_vllm_and_list_the_valid_sizes() {
    let m = config("granite-3.3-8b-instruct");
    let r = plan(
        &m,
        &memory::Weights::estimate(&m),
        &Cluster::uniform(1, 8, 80 << 30),
        &PlanRequest { tp: Size::Fixed(3), ..Default::default() },
    );
    assert!(!r.valid);
    assert_eq!(r.errors[0].rule, "attention_heads");
    assert_eq!(
        r.errors[0].message,
        "Total number of attention heads (32) must be divisible by tensor parallel size (3). Valid tensor parallel sizes for this model: 1, 2, 4, 8, 16, 32."
    );
    assert!(r.placement.is_empty(), "nothing is placed for an invalid shape");

    let q = config("Qwen2.5-7B-Instruct");
    let r = plan(
        &q,
        &memory::Weights::estimate(&q),
        &Cluster::uniform(1, 8, 80 << 30),
        &PlanRequest { tp: Size::Fixed(8), ..Default::default() },
    );
    let rules_hit: Vec<&str> = r.errors.iter().map(|e| e.rule.as_str()).collect();
    assert_eq!(rules_hit, ["attention_heads"], "8 is a multiple of the 4 KV heads: only the head rule fails");
    assert!(r.errors[0].message.ends_with("Valid tensor parallel sizes for this model: 1, 2, 4."));

    let ds = config("DeepSeek-V3");
    let errs = rules::check_tp(&ds, 32);
    assert!(errs.iter().all(|e| e.rule == "fp8_block"), "{errs:?}");
    assert!(errs[0].message.contains("576 per rank") && errs[0].message.contains("[128, 128]"), "{}", errs[0].message);
}

#[test]
fn stage_partitions_for_pp_2_3_4_8() {
    let want: [(&str, [&[u64]; 4]); 6] = [
        ("Llama-3.1-8B-Instruct", [&[16, 16], &[11, 11, 10], &[8, 8, 8, 8], &[4; 8]]),
        ("Llama-3.1-70B-Instruct", [&[40, 40], &[27, 27, 26], &[20; 4], &[10; 8]]),
        ("granite-3.3-8b-instruct", [&[20, 20], &[13, 14, 13], &[10; 4], &[5; 8]]),
        ("Qwen2.5-7B-Instruct", [&[14, 14], &[9, 10, 9], &[7; 4], &[3, 3, 3, 4, 4, 4, 4, 3]]),
        ("Llama-4-Scout-17B-16E-Instruct", [&[24, 24], &[16; 3], &[12; 4], &[6; 8]]),
        ("DeepSeek-V3", [&[31, 30], &[20, 21, 20], &[15, 15, 16, 15], &[7, 7, 8, 8, 8, 8, 8, 7]]),
    ];
    for (name, parts) in want {
        let m = config(name);
        for (pp, expect) in [2u64, 3, 4, 8].into_iter().zip(parts) {
            assert_eq!(partition::layer_counts(m.num_hidden_layers, pp).expect("valid"), expect, "{name} pp={pp}");
        }
    }
}

#[test]
fn kv_heads_per_rank_split_or_replicate() {
    let l8 = config("Llama-3.1-8B-Instruct");
    let got: Vec<(u64, u64)> = [1, 2, 4, 8, 16].iter().map(|&t| rules::kv_heads_per_rank(&l8, t)).collect();
    assert_eq!(got, [(8, 1), (4, 1), (2, 1), (1, 1), (1, 2)]);
    assert_eq!(rules::kv_heads_per_rank(&config("Qwen2.5-7B-Instruct"), 2), (2, 1));
    assert_eq!(rules::kv_heads_per_rank(&config("Phi-3-mini-4k-instruct"), 8), (4, 1));
    assert_eq!(rules::kv_heads_per_rank(&config("DeepSeek-V3"), 8), (1, 8), "MLA: one latent head, replicated");
}

#[test]
fn estimated_weights_match_published_parameter_counts() {
    // (name, published parameters, bytes per parameter of the bulk of the weights)
    for (name, params, bytes) in [
        ("Llama-3.1-8B-Instruct", 8.03e9, 2.0),
        ("Llama-3.1-70B-Instruct", 70.55e9, 2.0),
        ("Mixtral-8x7B-v0.1", 46.7e9, 2.0),
        ("Qwen2.5-7B-Instruct", 7.62e9, 2.0),
        ("Phi-3-mini-4k-instruct", 3.82e9, 2.0),
    ] {
        let m = config(name);
        let total = memory::Weights::estimate(&m).total() as f64;
        let want = params * bytes;
        assert!((total - want).abs() / want < 0.03, "{name}: estimated {total:.3e} bytes, published ~{want:.3e}");
    }
    // DeepSeek-V3: 671B parameters in FP8 (1 byte) with bf16 embeddings.
    let ds = config("DeepSeek-V3");
    let total = memory::Weights::estimate(&ds).total() as f64;
    assert!((650e9..700e9).contains(&total), "DeepSeek-V3 estimated {total:.3e} bytes");
}

#[test]
fn llama_70b_tp8_pp2_on_two_nodes_fits_with_stage_0_on_the_head() {
    let m = config("Llama-3.1-70B-Instruct");
    let w = memory::Weights::estimate(&m);
    let req = PlanRequest { tp: Size::Fixed(8), pp: Size::Fixed(2), ..Default::default() };
    let r = plan(&m, &w, &Cluster::uniform(2, 8, 80 << 30), &req);
    assert!(r.valid, "{:?}", r.errors);
    assert_eq!((r.world_size, r.nnodes, r.kv_heads_per_rank), (16, 2, 1));
    assert_eq!(r.stages.iter().map(|s| (s.layer_start, s.layer_end)).collect::<Vec<_>>(), [(0, 40), (40, 80)]);
    let mem = r.memory.as_ref().expect("memory");
    assert_eq!(mem.weights_source, "estimated");
    assert!(mem.fits);
    // ~141 GB of weights over 16 GPUs: about 8.8 GB each (plus embedding / LM head on the ends).
    assert!((8_000_000_000..10_500_000_000).contains(&mem.weight_bytes_per_gpu), "{}", mem.weight_bytes_per_gpu);
    // KV per token per rank: 2 x 40 layers x 1 head x 128 x 2 bytes = 20480.
    assert_eq!(mem.kv_bytes_per_token_by_stage, vec![20480, 20480]);
    assert!(mem.kv_cache_tokens >= 131072);
    assert!(r.placement[..8].iter().all(|p| p.node == "node-0" && p.pp_rank == 0));
    assert!(r.placement[8..].iter().all(|p| p.node == "node-1" && p.pp_rank == 1));
}

#[test]
fn too_big_for_the_gpus_says_by_how_much_and_what_would_fit() {
    let m = config("Llama-3.1-70B-Instruct");
    let w = memory::Weights::estimate(&m);
    let r = plan(
        &m,
        &w,
        &Cluster::uniform(2, 8, 80 << 30),
        &PlanRequest { max_model_len: Some(8192), ..Default::default() },
    );
    assert!(!r.valid);
    let e = r.errors.iter().find(|e| e.rule == "memory").expect("memory error");
    assert!(
        e.message.contains("does not fit: the weights need") && e.message.contains("more than 0.92 of a 80GiB GPU"),
        "{}",
        e.message
    );
    assert!(e.message.contains("Would fit: --tp 2 --pp 1 (2 GPUs on 1 node)"), "{}", e.message);
    assert!(r.memory.as_ref().expect("memory").shortfall_bytes_per_gpu > 60_000_000_000);
}

#[test]
fn a_huge_context_that_the_kv_cache_cannot_hold_is_reported() {
    let m = config("Llama-4-Scout-17B-16E-Instruct");
    let w = memory::Weights::estimate(&m);
    let r = plan(&m, &w, &Cluster::uniform(1, 8, 80 << 30), &PlanRequest { tp: Size::Fixed(8), ..Default::default() });
    let e = r.errors.iter().find(|e| e.rule == "memory").expect("10M tokens do not fit");
    assert!(e.message.contains("fewer than one sequence of max-model-len 10485760"), "{}", e.message);
    let r = plan(
        &m,
        &w,
        &Cluster::uniform(1, 8, 80 << 30),
        &PlanRequest { tp: Size::Fixed(8), max_model_len: Some(65536), ..Default::default() },
    );
    assert!(r.valid, "{:?}", r.errors);
}

#[test]
fn auto_picks_the_fewest_gpus_on_one_node_and_ranks_alternatives() {
    let m = config("Llama-3.1-70B-Instruct");
    let w = memory::Weights::estimate(&m);
    let req = PlanRequest { tp: Size::Auto, pp: Size::Auto, max_model_len: Some(8192), ..Default::default() };
    let r = plan(&m, &w, &Cluster::uniform(2, 8, 80 << 30), &req);
    assert!(r.valid, "{:?}", r.errors);
    assert_eq!((r.tp, r.pp, r.nnodes), (2, 1, 1), "141 GB fits on 2 x 80 GiB");
    assert_eq!(r.alternatives[0].tp, 2);
    assert!(r.alternatives.windows(2).all(|a| a[0].world_size <= a[1].world_size));

    // Long context: needs more GPUs for the KV cache.
    let req = PlanRequest { tp: Size::Auto, pp: Size::Fixed(1), ..Default::default() };
    let r = plan(&m, &w, &Cluster::uniform(2, 8, 80 << 30), &req);
    assert!(r.valid, "{:?}", r.errors);
    assert_eq!(r.pp, 1);
    assert!(r.tp >= 4, "131072 tokens of KV need more than 2 GPUs: got {}", r.tp);

    // Nothing fits: a clear error.
    let ds = config("DeepSeek-V3");
    let r = plan(
        &ds,
        &memory::Weights::estimate(&ds),
        &Cluster::uniform(1, 8, 80 << 30),
        &PlanRequest { tp: Size::Auto, pp: Size::Auto, ..Default::default() },
    );
    assert!(!r.valid);
    assert_eq!(r.errors[0].rule, "auto");
    assert!(r.errors[0].message.contains("8 free"), "{}", r.errors[0].message);
}

#[test]
fn layer_partition_override_is_checked() {
    let m = config("Llama-3.1-8B-Instruct");
    let w = memory::Weights::estimate(&m);
    let c = Cluster::uniform(1, 8, 80 << 30);
    let r = plan(
        &m,
        &w,
        &c,
        &PlanRequest { pp: Size::Fixed(2), layer_partition: Some(vec![20, 12]), ..Default::default() },
    );
    assert!(r.valid, "{:?}", r.errors);
    assert_eq!(r.stages.iter().map(|s| s.num_layers).collect::<Vec<_>>(), [20, 12]);
    let r = plan(
        &m,
        &w,
        &c,
        &PlanRequest { pp: Size::Fixed(2), layer_partition: Some(vec![20, 13]), ..Default::default() },
    );
    assert_eq!(r.errors[0].rule, "layer_partition");
    assert!(r.errors[0].message.contains("sums to 33"), "{}", r.errors[0].message);
    let r = plan(&m, &w, &c, &PlanRequest { pp: Size::Fixed(33), ..Default::default() });
    assert_eq!(r.errors[0].rule, "pipeline_parallel_size");
}

#[test]
fn every_model_plans_without_panicking_for_many_shapes() {
    for name in ALL {
        let m = config(name);
        let w = memory::Weights::estimate(&m);
        for (nodes, gpus) in [(1, 1), (1, 8), (2, 8), (4, 4)] {
            for tp in [1, 2, 3, 4, 8, 16] {
                for pp in [1, 2, 3, 4, 8] {
                    let r = plan(
                        &m,
                        &w,
                        &Cluster::uniform(nodes, gpus, 80 << 30),
                        &PlanRequest { tp: Size::Fixed(tp), pp: Size::Fixed(pp), ..Default::default() },
                    );
                    assert_eq!(r.valid, r.errors.is_empty());
                    if r.valid {
                        assert_eq!(r.placement.len() as u64, tp * pp, "{name} {tp}x{pp}");
                    }
                }
            }
        }
    }
}

#[test]
fn qwen_tp_6_fails_the_kv_rule() {
    let q = config("Qwen2.5-7B-Instruct");
    let errs = rules::check_tp(&q, 6);
    assert!(
        errs.iter().any(|e| e.rule == "kv_heads" && e.message.contains("(6)") && e.message.contains("(4)")),
        "{errs:?}"
    );
    let errs = rules::check_tp(&q, 14);
    assert_eq!(errs.iter().map(|e| e.rule.as_str()).collect::<Vec<_>>(), ["kv_heads", "intermediate_size"]);
}

const GIB: f64 = (1u64 << 30) as f64;

#[test]
fn runtime_reserve_grows_with_tp_and_follows_the_measured_figures() {
    let want: [(u64, f64); 8] = [(1, 3.25), (2, 5.75), (3, 6.5), (4, 6.5), (5, 7.25), (8, 7.25), (16, 8.0), (64, 9.5)];
    for (tp, gib) in want {
        assert_eq!(memory::runtime_reserve_bytes(tp), (gib * GIB) as u64, "tp {tp}");
    }
    assert_eq!(memory::runtime_reserve_bytes(0), memory::runtime_reserve_bytes(1));
    for tp in 1..=128u64 {
        assert!(memory::runtime_reserve_bytes(tp + 1) >= memory::runtime_reserve_bytes(tp), "tp {tp}");
    }
    // (tp, GiB) from vLLM logs, as in runtime_reserve_bytes's doc: the fit is within 0.1 GiB
    // below any of them and at most 0.25 GiB above the largest at each TP.
    let measured: [(u64, f64); 9] =
        [(1, 3.05), (2, 4.72), (4, 4.69), (2, 4.21), (2, 5.85), (4, 5.84), (4, 6.04), (4, 6.49), (8, 7.3)];
    for (tp, gib) in measured {
        let fit = memory::runtime_reserve_bytes(tp) as f64 / GIB;
        assert!(fit >= gib - 0.1, "tp {tp}: fit {fit} GiB, measured {gib} GiB");
        let top = measured.iter().filter(|m| m.0 == tp).map(|m| m.1).fold(0.0, f64::max);
        assert!(fit - top <= 0.25, "tp {tp}: fit {fit} GiB, largest measured {top} GiB");
    }
    // The report carries the reserve it used.
    let m = config("Llama-3.1-70B-Instruct");
    for tp in [1, 2, 4, 8] {
        let r = memory::memory(&m, &memory::Weights::estimate(&m), &[80], tp, 1, 80 << 30, 0.92, None, None);
        assert_eq!(r.runtime_reserve_bytes, memory::runtime_reserve_bytes(tp));
    }
}

/// KV tokens with the TP-dependent reserve over KV tokens with the old flat 2 GiB.
fn kv_ratio_to_flat_2_gib(name: &str, tp: u64) -> f64 {
    let m = config(name);
    let w = memory::Weights::estimate(&m);
    let util = PlanRequest::default().gpu_memory_utilization;
    let r = memory::memory(
        &m,
        &w,
        &[m.num_hidden_layers],
        tp,
        rules::kv_heads_per_rank(&m, tp).0,
        80 << 30,
        util,
        None,
        None,
    );
    let budget = ((80u64 << 30) as f64 * util) as u64;
    let old = (budget - r.weight_bytes_per_gpu - (2 << 30)) / r.kv_bytes_per_token_by_stage[0];
    r.kv_cache_tokens as f64 / old as f64
}

#[test]
fn the_tp_reserve_costs_70b_tp4_a_tenth_of_its_kv_cache_and_8b_tp1_two_percent() {
    // 70B TP4: 4.5 GiB more reserve out of ~38.7 GiB of cache.
    let r = kv_ratio_to_flat_2_gib("Llama-3.1-70B-Instruct", 4);
    assert!((0.87..0.91).contains(&r), "70B TP4 keeps {r} of its KV tokens");
    let r = kv_ratio_to_flat_2_gib("Llama-3.1-70B-Instruct", 8);
    assert!((0.89..0.92).contains(&r), "70B TP8 keeps {r} of its KV tokens");
    let r = kv_ratio_to_flat_2_gib("Mixtral-8x7B-v0.1", 2);
    assert!((0.85..0.89).contains(&r), "Mixtral TP2 keeps {r} of its KV tokens");
    // 8B TP1: 1.25 GiB more out of ~56.6 GiB.
    let r = kv_ratio_to_flat_2_gib("Llama-3.1-8B-Instruct", 1);
    assert!((0.97..0.99).contains(&r), "8B TP1 keeps {r} of its KV tokens");
}

// DeepSeek-V3: hidden 7168, q_lora_rank 1536, kv_lora_rank 512, qk_rope_head_dim 64, FP8 weights in
// 128 x 128 blocks with a float32 scale each, bf16 norms and router, 256 routed experts.
/// q_a_proj [1536, 7168] + kv_a_proj_with_mqa [576, 7168] in FP8: vLLM's fused_qkv_a_proj.
const DS_FUSED_A: u64 = 7168 * (1536 + 512 + 64);
/// Their scales: ceil(1536/128) x 56 + ceil(576/128) x 56 floats.
const DS_FUSED_A_SCALES: u64 = (12 * 56 + 5 * 56) * 4;
/// input and post-attention norms, q_a_layernorm, kv_a_layernorm.
const DS_NORMS: u64 = 2 * 7168 * 2 + 1536 * 2 + 512 * 2;
/// The router gate [256, 7168] in bf16 and its float32 e_score_correction_bias.
const DS_ROUTER: u64 = 256 * 7168 * 2 + 256 * 4;

#[test]
fn deepseek_v3_keeps_the_mla_a_projection_norms_and_router_whole_on_every_rank() {
    let m = config("DeepSeek-V3");
    let w = memory::Weights::estimate(&m);
    assert_eq!(w.per_layer_replicated.len(), 61);
    assert_eq!(w.per_layer_replicated[0], DS_FUSED_A + DS_FUSED_A_SCALES + DS_NORMS, "dense layer 0");
    assert_eq!(w.per_layer_replicated[3], DS_FUSED_A + DS_FUSED_A_SCALES + DS_NORMS + DS_ROUTER, "MoE layer 3");
    assert_eq!(DS_FUSED_A + DS_FUSED_A_SCALES, 15_142_624);

    // TP8 x PP2: stage 1 holds layers 31..61, all MoE, plus the final norm and the LM head.
    let counts = [31, 30];
    let stage1: u64 = w.per_layer[31..].iter().sum::<u64>() + w.lm_head + w.last_other;
    let replicated = 30 * (DS_FUSED_A + DS_FUSED_A_SCALES + DS_NORMS + DS_ROUTER) + 7168 * 2;
    assert_eq!(w.replicated(&counts, 1) + w.last_other, replicated);
    let per_gpu = w.per_gpu(&m, &counts, 1, 8);
    // Dividing everything by 8 would leave out 7/8 of the replicated bytes (~495 MB, 1.1%).
    assert_eq!(per_gpu, (stage1 - replicated).div_ceil(8) + replicated);
    let missing = per_gpu - stage1.div_ceil(8);
    assert!(missing.abs_diff(replicated * 7 / 8) <= 1, "{missing} vs {}", replicated * 7 / 8);
    assert!((0.010..0.015).contains(&(missing as f64 / per_gpu as f64)), "{missing} of {per_gpu}");

    // The plan reports the larger figure.
    let req = PlanRequest { tp: Size::Fixed(8), pp: Size::Fixed(2), ..Default::default() };
    let r = plan(&m, &w, &Cluster::uniform(2, 8, 80 << 30), &req);
    let mem = r.memory.as_ref().expect("memory");
    assert_eq!(mem.weight_bytes_per_gpu_by_stage[1], per_gpu);
    assert_eq!(mem.runtime_reserve_bytes, memory::runtime_reserve_bytes(8));
}

#[test]
fn fp8_block_scales_are_counted_with_their_weights() {
    let m = config("DeepSeek-V3");
    let mut unscaled = m.clone();
    unscaled.quantization = Some(crate::model::Quantization::Fp8 { block: None });
    let (w, u) = (memory::Weights::estimate(&m), memory::Weights::estimate(&unscaled));
    // Attention: q_a [1536, 7168] 12x56, kv_a [576, 7168] 5x56, q_b [128x192, 1536] 192x12,
    // kv_b [128x256, 512] 256x4, o [7168, 128x128] 56x128 blocks.
    let attn = 12 * 56 + 5 * 56 + 192 * 12 + 256 * 4 + 56 * 128;
    // Dense FFN of 18432: gate and up [18432, 7168], down [7168, 18432]: 144 x 56 blocks each.
    assert_eq!(w.per_layer[0] - u.per_layer[0], (attn + 3 * 144 * 56) * 4);
    // MoE: 256 routed + 1 shared experts of 2048: three 16 x 56 block grids each.
    assert_eq!(w.per_layer[3] - u.per_layer[3], (attn + 257 * 3 * 16 * 56) * 4);
    // Only the A-projections' scales are replicated.
    assert_eq!(w.per_layer_replicated[3] - u.per_layer_replicated[3], DS_FUSED_A_SCALES);
    // Unquantized models have no scales.
    let l = config("Llama-3.1-8B-Instruct");
    assert_eq!(memory::Weights::estimate(&l).total(), 16_060_522_496);
}

#[test]
fn exact_weights_divide_only_the_sharded_tensors_by_tp() {
    use crate::model::safetensors::{TensorInfo, WeightBytes};
    let t = |name: &str, bytes: u64| TensorInfo { name: name.into(), dtype: "F8_E4M3".into(), bytes };
    let tensors = [
        t("model.layers.0.self_attn.q_a_proj.weight", 1000),
        t("model.layers.0.self_attn.q_a_proj.weight_scale_inv", 8),
        t("model.layers.0.self_attn.q_b_proj.weight", 4000),
        t("model.layers.0.self_attn.q_b_proj.weight_scale_inv", 32),
        t("model.layers.0.input_layernorm.weight", 100),
        t("model.layers.1.mlp.gate.weight", 500),
        t("model.layers.1.mlp.gate.e_score_correction_bias", 12),
        t("model.layers.1.mlp.experts.0.down_proj.weight", 8000),
        t("model.embed_tokens.weight", 1600),
        t("model.norm.weight", 100),
        t("lm_head.weight", 1600),
    ];
    let w = memory::Weights::exact(&WeightBytes::from_tensors(2, &tensors));
    assert_eq!(w.per_layer, [5140, 8512]);
    assert_eq!(w.per_layer_replicated, [1108, 512]);
    let m = config("DeepSeek-V3");
    // One stage, TP4: (4032 + 8000 + 1600 + 1600) / 4 sharded, 1108 + 512 + 100 whole.
    assert_eq!(w.per_gpu(&m, &[2], 0, 4), 15232 / 4 + 1720);
    // Two stages, TP2: layer 0 and the embedding, layer 1, the norm and the LM head.
    assert_eq!(w.per_gpu(&m, &[1, 1], 0, 2), (4032 + 1600) / 2 + 1108);
    assert_eq!(w.per_gpu(&m, &[1, 1], 1, 2), (8000 + 1600) / 2 + 512 + 100);
}

#[test]
fn per_gpu_weights_shrink_with_tp_but_never_below_the_replicated_bytes() {
    for name in ALL {
        let m = config(name);
        let w = memory::Weights::estimate(&m);
        assert!(w.per_layer.iter().zip(&w.per_layer_replicated).all(|(a, r)| r <= a), "{name}");
        for pp in [1, 2, 4] {
            let counts = partition::layer_counts(m.num_hidden_layers, pp).expect("valid");
            for s in 0..counts.len() {
                let mut last = u64::MAX;
                for tp in [1, 2, 4, 8, 16] {
                    let b = w.per_gpu(&m, &counts, s, tp);
                    assert!(b <= last, "{name} pp {pp} stage {s} tp {tp}");
                    assert!(b >= w.replicated(&counts, s), "{name} pp {pp} stage {s} tp {tp}");
                    last = b;
                }
            }
        }
    }
}
