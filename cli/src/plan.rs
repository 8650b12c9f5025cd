//! `tessera plan`: is this TP x PP valid for the model, does it fit, where does each rank go.

use std::path::PathBuf;

use tessera_common::model;
use tessera_common::plan::memory::Weights;
use tessera_common::plan::placement::Cluster;
use tessera_common::plan::{self, PlanReport, PlanRequest, Size};
use tessera_common::size::HumanBytes;
use tessera_proto::v1 as pb;

use crate::Output;
use crate::client;

pub struct PlanArgs {
    pub model: PathBuf,
    pub request: PlanRequest,
    pub gpus: Option<(u32, u32, u64)>,
    pub output: Output,
}

/// Exit statuses: 0 valid, 1 invalid (reasons printed), 2 bad input (a model that cannot be read).
pub async fn run(head: &str, args: PlanArgs) -> anyhow::Result<u8> {
    let report = match args.gpus {
        Some((nodes, gpus, mem)) => {
            let m = match model::load_model(&args.model) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            };
            let weights = m.weights.as_ref().map(Weights::exact).unwrap_or_else(|| Weights::estimate(&m.desc));
            plan::plan(&m.desc, &weights, &Cluster::uniform(nodes, gpus, mem), &args.request)
        }
        None => {
            let path = std::path::absolute(&args.model)?;
            let r = &args.request;
            let size = |s: Size| match s {
                Size::Auto => 0,
                Size::Fixed(n) => n as u32,
            };
            let mut c = pb::planner_client::PlannerClient::new(client::connect(head).await?);
            let req = pb::PlanRequest {
                model_path: path.display().to_string(),
                tp: size(r.tp),
                pp: size(r.pp),
                gpu_memory_utilization: r.gpu_memory_utilization,
                max_model_len: r.max_model_len.unwrap_or(0),
                layer_partition: r.layer_partition.clone().unwrap_or_default(),
                strict: r.strict,
                kv_cache_dtype: r.kv_cache_dtype.map(|d| d.name().to_string()).unwrap_or_default(),
            };
            match c.plan(req).await {
                Ok(r) => PlanReport::from(r.into_inner()),
                Err(s) if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound) => {
                    eprintln!("error: {}", s.message());
                    return Ok(2);
                }
                Err(s) => return Err(client::status_error(s)),
            }
        }
    };
    match args.output {
        Output::Json | Output::Yaml => crate::output::print(args.output, &serde_json::to_value(&report)?),
        Output::Text | Output::Wide => {
            print!("{}", render(&report, &args.model.display().to_string(), args.gpus.is_some()))
        }
    }
    Ok(if report.valid { 0 } else { 1 })
}

fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The report a person reads in ten seconds: verdict, stages, memory, placement.
pub fn render(r: &PlanReport, model: &str, offline: bool) -> String {
    let mut o = String::new();
    let m = &r.model;
    let shape = if r.tp > 0 {
        format!("TP {} x PP {} = {}", r.tp, r.pp, plural(r.world_size, "GPU"))
    } else {
        "no shape".into()
    };
    let nodes = if r.nnodes > 0 { format!(" on {}", plural(r.nnodes, "node")) } else { String::new() };
    let verdict = if r.valid { "VALID" } else { "INVALID" };
    o.push_str(&format!("{verdict}  {model} ({}): {shape}{nodes}\n", m.architecture));
    for e in &r.errors {
        o.push_str(&format!("  error [{}] {}\n", e.rule, e.message));
    }
    for w in &r.warnings {
        o.push_str(&format!("  warning: {w}\n"));
    }
    let attn = if m.is_mla {
        format!("{} heads, MLA (one latent KV head per rank)", m.num_attention_heads)
    } else if r.kv_heads_per_rank > 0 {
        let rep = if r.kv_head_replication > 1 {
            format!(", each replicated {}x", r.kv_head_replication)
        } else {
            String::new()
        };
        format!(
            "{} heads / {} KV heads ({} per rank{rep})",
            m.num_attention_heads, m.num_key_value_heads, r.kv_heads_per_rank
        )
    } else {
        format!("{} heads / {} KV heads", m.num_attention_heads, m.num_key_value_heads)
    };
    let kind = match (m.is_moe, m.num_experts) {
        (true, Some(e)) => format!("MoE {e} experts"),
        _ => "dense".into(),
    };
    let quant = m.quantization.as_ref().map(|q| format!(", {q}")).unwrap_or_default();
    let assumed = if m.dtype_assumed { " (assumed)" } else { "" };
    o.push_str(&format!(
        "\nmodel      {attn}, {}, {kind}, {}{assumed}{quant}\n",
        plural(m.num_hidden_layers, "layer"),
        m.dtype
    ));
    o.push_str(&format!("valid TP   {}\n", r.valid_tp_sizes.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")));
    if !r.stages.is_empty() {
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|s| {
                if s.num_layers == 0 {
                    format!("{}: no layers", s.pp_rank)
                } else {
                    format!("{}: layers {}-{} ({})", s.pp_rank, s.layer_start, s.layer_end - 1, s.num_layers)
                }
            })
            .collect();
        o.push_str(&format!("stages     {}\n", stages.join("   ")));
    }
    if let Some(mem) = &r.memory {
        let usable = (mem.gpu_memory_bytes as f64 * mem.gpu_memory_utilization) as u64;
        o.push_str(&format!(
            "memory     weights {}/GPU ({}) + {} reserve of {} usable ({} x {}{})\n",
            HumanBytes(mem.weight_bytes_per_gpu),
            mem.weights_source,
            HumanBytes(mem.runtime_reserve_bytes),
            HumanBytes(usable),
            mem.gpu_memory_utilization,
            HumanBytes(mem.gpu_memory_bytes),
            if offline { "" } else { ", live inventory" }
        ));
        let len = match mem.max_model_len {
            Some(l) if mem.kv_cache_tokens >= l => {
                format!("max-model-len {l} fits {}x", mem.kv_cache_tokens / l.max(1))
            }
            Some(l) => format!("max-model-len {l} does NOT fit"),
            None => "max-model-len unknown".into(),
        };
        o.push_str(&format!(
            "kv cache   {}/GPU = {} tokens ({len})\n",
            HumanBytes(mem.kv_cache_bytes_per_gpu),
            mem.kv_cache_tokens
        ));
    }
    if !r.placement.is_empty() {
        o.push_str("placement\n");
        let mut i = 0;
        while i < r.placement.len() {
            let node = &r.placement[i];
            let same: Vec<_> = r.placement[i..].iter().take_while(|p| p.node_rank == node.node_rank).collect();
            let last = same.last().map(|p| p.rank).unwrap_or(node.rank);
            let gpus: Vec<String> = same.iter().map(|p| p.gpu_index.to_string()).collect();
            let mut stages: Vec<u64> = same.iter().map(|p| p.pp_rank).collect();
            stages.dedup();
            let stages: Vec<String> = stages.iter().map(u64::to_string).collect();
            o.push_str(&format!(
                "  node rank {}  {:<16} ranks {}-{} on GPUs {}  (stage {})\n",
                node.node_rank,
                node.node,
                node.rank,
                last,
                gpus.join(","),
                stages.join(",")
            ));
            i += same.len();
        }
    }
    if !r.alternatives.is_empty() {
        o.push_str("alternatives (fewest GPUs first)\n");
        for a in &r.alternatives {
            let mark = if a.tp == r.tp && a.pp == r.pp && r.valid { "*" } else { " " };
            o.push_str(&format!(
                " {mark} --tp {} --pp {}   {} on {}, {}/GPU of weights, {} KV tokens\n",
                a.tp,
                a.pp,
                plural(a.world_size, "GPU"),
                plural(a.nnodes, "node"),
                HumanBytes(a.weight_bytes_per_gpu),
                a.kv_cache_tokens
            ));
        }
    }
    o
}
