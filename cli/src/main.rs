//! `tessera`: the command-line client of a Tessera cluster.

mod client;
mod nodes;
mod plan;
mod table;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tessera_common::env;
use tessera_common::fake::FakeGpuSpec;
use tessera_common::plan::partition::parse_partition;
use tessera_common::plan::placement::Cluster;
use tessera_common::plan::{PlanRequest, Size};

/// Tessera: a small, fast cluster runtime for multi-node LLM serving.
///
/// Talks to a head over gRPC (--head, default http://127.0.0.1:7470). `tessera up` starts a whole
/// local cluster with fake GPUs to try it on one machine.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, max_term_width = 100)]
struct Cli {
    /// URL of the head's gRPC endpoint
    #[arg(long, global = true, env = env::HEAD, default_value = "http://127.0.0.1:7470", value_name = "URL")]
    head: String,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people
    Text,
    /// JSON for programs
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the cluster's nodes: state, address, GPUs, last heartbeat
    Nodes {
        #[arg(short, long, env = env::OUTPUT, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Summary of the cluster: nodes by state, GPUs, failure detection settings
    Status {
        #[arg(short, long, env = env::OUTPUT, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Membership events (joined, state changes, left): the current members, then new events
    Events {
        /// Keep following new events until interrupted
        #[arg(short, long, env = "TESSERA_FOLLOW")]
        follow: bool,
        /// Output format (json: one object per line)
        #[arg(short, long, env = env::OUTPUT, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Check a TP x PP sharding of a model before launching anything: vLLM's divisibility rules,
    /// pipeline stages, memory fit and KV cache size, and the GPU of every rank.
    ///
    /// With --gpus it plans offline against a made-up cluster; otherwise it asks the head to plan
    /// against the live inventory (the head reads --model on its own filesystem). Exit status: 0
    /// valid, 1 invalid (reasons printed), 2 bad usage or an unreadable model.
    Plan {
        /// A Hugging Face model directory (config.json, plus safetensors files for exact weight
        /// sizes) or a config.json
        #[arg(long, env = "TESSERA_MODEL", value_name = "PATH")]
        model: PathBuf,
        /// Tensor parallel size, or auto
        #[arg(
            long,
            env = "TESSERA_TP",
            default_value = "auto",
            value_name = "N|auto"
        )]
        tp: Size,
        /// Pipeline parallel size, or auto
        #[arg(
            long,
            env = "TESSERA_PP",
            default_value = "auto",
            value_name = "N|auto"
        )]
        pp: Size,
        /// Plan offline for NODES nodes of GPUS GPUs with MEMORY each, e.g. 2x8x80GiB
        #[arg(long, env = "TESSERA_GPUS", value_name = "NODESxGPUSxMEM", value_parser = Cluster::parse_spec)]
        gpus: Option<(u32, u32, u64)>,
        /// Fraction of each GPU's memory the engine may use
        #[arg(
            long,
            env = "TESSERA_GPU_MEMORY_UTILIZATION",
            default_value_t = 0.9,
            value_name = "F"
        )]
        gpu_memory_utilization: f64,
        /// Longest sequence to serve [default: the model's max_position_embeddings]
        #[arg(long, env = "TESSERA_MAX_MODEL_LEN", value_name = "N")]
        max_model_len: Option<u64>,
        /// Layers per pipeline stage, e.g. 41,39 (vLLM's VLLM_PP_LAYER_PARTITION)
        #[arg(long, env = "VLLM_PP_LAYER_PARTITION", value_name = "LIST")]
        layer_partition: Option<LayerPartition>,
        /// Refuse placements where a tensor-parallel group spans nodes (otherwise a warning)
        #[arg(long, env = "TESSERA_STRICT")]
        strict: bool,
        #[arg(short, long, env = env::OUTPUT, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Mark a node draining: no new work is placed on it
    Drain {
        /// Node name or id
        node: String,
    },
    /// Clear a node's draining mark
    Undrain {
        /// Node name or id
        node: String,
    },
    /// Start a local cluster (a head and N workers with fake GPUs) and keep it running until Ctrl-C
    Up {
        /// Number of worker processes besides the head
        #[arg(long, env = "TESSERA_WORKERS", default_value_t = 2)]
        workers: u32,
        /// Fake GPUs on each node, head included: COUNTxMEMORY
        #[arg(long, env = env::FAKE_GPUS, default_value = "4x80GiB", value_name = "COUNTxMEM")]
        fake_gpus: FakeGpuSpec,
        /// Where the head listens; port 0 picks a free one
        #[arg(long, env = env::LISTEN, default_value = "127.0.0.1:7470", value_name = "ADDR")]
        listen: SocketAddr,
        /// Directory for the nodes' state and logs [default: $TMPDIR/tessera-up]
        #[arg(long, env = "TESSERA_UP_DIR", value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Directory holding tessera-head and tessera-worker [default: beside this binary, else PATH]
        #[arg(long, env = "TESSERA_BIN_DIR", value_name = "DIR")]
        bin_dir: Option<PathBuf>,
    },
}

/// `--layer-partition 41,39`: one value holding a list (clap would otherwise take a Vec as
/// repeated flags).
#[derive(Debug, Clone)]
struct LayerPartition(Vec<u64>);

impl std::str::FromStr for LayerPartition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_partition(s).map(LayerPartition)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let head = cli.head.clone();
    let result = runtime.block_on(async move {
        match cli.command {
            Cmd::Plan { model, tp, pp, gpus, gpu_memory_utilization, max_model_len, layer_partition, strict, output } => {
                if !(gpu_memory_utilization > 0.0 && gpu_memory_utilization <= 1.0) {
                    eprintln!("error: --gpu-memory-utilization {gpu_memory_utilization} must be more than 0 and at most 1");
                    return Ok(2);
                }
                let layer_partition = layer_partition.map(|p| p.0);
                let request = PlanRequest { tp, pp, gpu_memory_utilization, max_model_len, layer_partition, strict };
                plan::run(&head, plan::PlanArgs { model, request, gpus, output }).await
            }
            Cmd::Nodes { output } => nodes::nodes(&head, output).await.map(|()| 0),
            Cmd::Status { output } => nodes::status(&head, output).await.map(|()| 0),
            Cmd::Events { follow, output } => nodes::events(&head, follow, output).await.map(|()| 0),
            Cmd::Drain { node } => nodes::drain(&head, node, true).await.map(|()| 0),
            Cmd::Undrain { node } => nodes::drain(&head, node, false).await.map(|()| 0),
            Cmd::Up {
                workers,
                fake_gpus,
                listen,
                dir,
                bin_dir,
            } => {
                let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("tessera-up"));
                up::up(up::UpOptions {
                    workers,
                    fake_gpus,
                    listen,
                    dir,
                    bin_dir,
                })
                .await
                .map(|()| 0)
            }
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
