//! `tessera`: the command-line client of a Tessera cluster.

mod client;
mod deploy;
mod nodes;
mod output;
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
    /// The head's gRPC endpoint: a URL, or host:port (what DATA_DIR/head.addr holds). Heads sharing
    /// an etcd store: all of them, separated by commas; the CLI talks to the one that leads
    #[arg(long, global = true, env = env::HEAD, default_value = "http://127.0.0.1:7470", value_name = "URL")]
    head: String,

    /// How long a call may take before the CLI gives up and says what did not answer; streams
    /// (events -f, logs -f) notice a dead head with HTTP/2 keepalive pings instead
    #[arg(long, global = true, env = "TESSERA_TIMEOUT", default_value = "10s", value_name = "DURATION",
          value_parser = tessera_common::duration::parse_positive_duration)]
    timeout: std::time::Duration,

    /// The admin token (the head writes it to DATA_DIR/admin.token). Prefer --token-file
    #[arg(long, global = true, env = "TESSERA_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    token: Option<String>,

    /// File holding the admin token
    #[arg(long, global = true, env = "TESSERA_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,

    /// CA certificate (PEM) that signed the head's certificate; needed for an https:// head
    #[arg(long, global = true, env = "TESSERA_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,

    /// Client certificate (PEM), when the head requires client certificates
    #[arg(long, global = true, env = "TESSERA_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,

    /// Key (PEM) of --tls-cert
    #[arg(long, global = true, env = "TESSERA_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people
    Text,
    /// JSON for programs
    Json,
    /// YAML, the same fields as JSON
    Yaml,
    /// The table with more columns (nodes: which deployment holds each GPU)
    Wide,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    Vllm,
    Command,
    Probe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Per {
    Rank,
    Node,
}

#[derive(Debug, Subcommand)]
enum NodesCmd {
    /// Approve a node that joined while the head runs with --node-approval manual: work may be
    /// placed on it from now on
    Approve {
        /// Node name or id
        node: String,
    },
    /// Forget a dead or departed node now (the head forgets them by itself after --forget-after,
    /// 1 h by default). Refused while the node is alive or a deployment holds its GPUs
    Remove {
        /// Node name or id
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCmd {
    /// Make a short-lived join token for bootstrapping nodes: it opens at most --uses sessions
    /// within --ttl, then stops working (joined nodes go on with their own credentials)
    Create {
        /// How long it is valid (e.g. 1h, 30m; at most 30 days)
        #[arg(long, default_value = "1h", value_parser = tessera_common::duration::parse_positive_duration)]
        ttl: std::time::Duration,
        /// How many sessions it may open (one per node that joins with it)
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Make a new join token (written to the head's join token file, printed here); the old one
    /// stops joining nodes at once. Joined nodes keep working: they use their own credentials
    RotateJoin,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the cluster's nodes: state, address, GPUs, last heartbeat (`nodes remove` forgets one)
    #[command(args_conflicts_with_subcommands = true)]
    Nodes {
        #[command(subcommand)]
        cmd: Option<NodesCmd>,
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
        #[arg(long, env = "TESSERA_TP", default_value = "auto", value_name = "N|auto")]
        tp: Size,
        /// Pipeline parallel size, or auto
        #[arg(long, env = "TESSERA_PP", default_value = "auto", value_name = "N|auto")]
        pp: Size,
        /// Plan offline for NODES nodes of GPUS GPUs with MEMORY each, e.g. 2x8x80GiB
        #[arg(long, env = "TESSERA_GPUS", value_name = "NODESxGPUSxMEM", value_parser = Cluster::parse_spec)]
        gpus: Option<(u32, u32, u64)>,
        /// Fraction of each GPU's memory the engine may use
        #[arg(long, env = "TESSERA_GPU_MEMORY_UTILIZATION", default_value_t = tessera_common::plan::DEFAULT_GPU_MEMORY_UTILIZATION, value_name = "F")]
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
        /// KV cache element type, as vLLM's --kv-cache-dtype (auto, bfloat16, float16, fp8, ...)
        #[arg(long, env = "TESSERA_KV_CACHE_DTYPE", value_name = "DTYPE", default_value = "auto")]
        kv_cache_dtype: String,
        #[arg(short, long, env = env::OUTPUT, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Deploy a model: plan TP x PP, launch the engine's processes across nodes, supervise them
    ///
    /// The planner's checks run first (an invalid plan is refused and reserves nothing). Node rank
    /// 0 (pipeline stage 0) goes on the head when it has the GPUs. When any process exits or a node
    /// dies, the whole group is restarted at the next generation, with backoff, up to
    /// --max-restarts times in 10 minutes. Arguments after `--` go to the engine.
    ///
    /// Deploying a NAME that exists rolls it to the spec given (the whole spec, as for a new
    /// deployment), one replica at a time, with no outage; `tessera update` changes only what it
    /// is told.
    Deploy {
        /// Deployment name (a DNS label)
        name: String,
        /// Model directory or config.json, as a path the head and the nodes can read
        #[arg(long, env = "TESSERA_MODEL", value_name = "PATH")]
        model: PathBuf,
        /// Tensor parallel size
        #[arg(long, env = "TESSERA_TP", default_value_t = 1)]
        tp: u32,
        /// Pipeline parallel size
        #[arg(long, env = "TESSERA_PP", default_value_t = 1)]
        pp: u32,
        /// Independent TP x PP groups of the model (1-64), each with its own GPUs, API port and
        /// generation; a failure restarts only its own. `tessera scale` changes it later
        #[arg(long, env = "TESSERA_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        replicas: u32,
        /// An existing NAME is updated to this spec one replica at a time: by default a new replica
        /// starts before an old one drains and stops; with --max-unavailable 1 (no spare GPUs) an
        /// old one stops first
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1))]
        max_unavailable: u32,
        /// vllm: one `vllm serve` per node; command: your template; probe: a wiring check
        #[arg(long, env = "TESSERA_ENGINE", value_enum, default_value_t = EngineArg::Vllm)]
        engine: EngineArg,
        /// Command engine: a shell template; placeholders {model} {tp} {pp} {rank} {tp_rank}
        /// {pp_rank} {ranks} {node_rank} {nnodes} {world_size} {master_addr} {master_port} {args}
        #[arg(long, env = "TESSERA_COMMAND", value_name = "TEMPLATE")]
        command: Option<String>,
        /// Command engine: run the template once per rank or once per node
        #[arg(long, env = "TESSERA_PER", value_enum, default_value_t = Per::Rank)]
        per: Per,
        /// Extra environment for every process, NAME=VALUE (repeatable)
        #[arg(long = "env", value_name = "NAME=VALUE", value_parser = deploy::parse_env)]
        env: Vec<(String, String)>,
        /// Group restarts allowed within 10 minutes before the deployment is failed [default: 5]
        #[arg(long, env = "TESSERA_MAX_RESTARTS")]
        max_restarts: Option<i32>,
        /// Show progress until the deployment is running (exit 0) or failed (exit 1)
        #[arg(long, env = "TESSERA_WAIT")]
        wait: bool,
        /// Fraction of each GPU's memory vLLM may use, planned and passed to vLLM [default: 0.92,
        /// vLLM's own; or --gpu-memory-utilization after `--`]
        #[arg(long, env = "TESSERA_GPU_MEMORY_UTILIZATION", value_name = "F")]
        gpu_memory_utilization: Option<f64>,
        /// Longest sequence to serve, planned and passed to vLLM [default: the model's; or
        /// --max-model-len after `--`]
        #[arg(long, env = "TESSERA_MAX_MODEL_LEN", value_name = "TOKENS")]
        max_model_len: Option<u64>,
        /// How long a generation may take to get ready before it counts as failed (with its last
        /// log lines); vLLM's VLLM_ENGINE_READY_TIMEOUT_S is set to match
        #[arg(long, env = "TESSERA_STARTUP_TIMEOUT", value_name = "DURATION", default_value = "30m",
              value_parser = deploy::parse_secs)]
        startup_timeout: u32,
        /// vllm: restart the group when requests wait while no token is generated for this long,
        /// or when the idle canary request takes longer; `off` turns both off
        #[arg(long, env = "TESSERA_STALL_TIMEOUT", value_name = "DURATION|off", default_value = "30s",
              value_parser = deploy::parse_secs_or_off)]
        stall_timeout: i32,
        /// vllm: send a 1-token completion this often while the engine is idle; `off` for none
        #[arg(long, env = "TESSERA_CANARY_INTERVAL", value_name = "DURATION|off", default_value = "30s",
              value_parser = deploy::parse_secs_or_off)]
        canary_interval: i32,
        /// How long a replica stopped on purpose (delete, scale down) keeps serving the requests in
        /// flight after gateways stop sending it new ones (it stops sooner once its engine is idle);
        /// `off` stops at once
        #[arg(long, env = "TESSERA_DRAIN_TIMEOUT", value_name = "DURATION|off", default_value = "30s",
              value_parser = deploy::parse_secs_or_off)]
        drain_timeout: i32,
        /// How the model reaches the nodes. `on`: it is read on the head only, and each other node
        /// gets (into its cache, checked, resumable) the small files and only the safetensors files
        /// of its pipeline stages, fetched once from the head and passed on between nodes. `off`:
        /// every node has the model at MODEL already (a shared filesystem). `auto`: on for vllm and
        /// command when MODEL is a directory, off for the probe
        #[arg(long, env = "TESSERA_STAGING", value_enum, default_value_t = deploy::StagingArg::Auto)]
        staging: deploy::StagingArg,
        /// The node (name or id) that holds the model at MODEL, when it is not the head: the head
        /// asks it for the model's config to plan, and staging reads the model there. MODEL is then
        /// the absolute path on that node
        #[arg(long, value_name = "NODE")]
        model_from: Option<String>,
        /// Only nodes with these labels (their workers' --labels) run it: KEY=VALUE,... (all must
        /// match); e.g. zone=a,gpu=h100
        #[arg(long, value_name = "K=V,...", default_value = "")]
        node_selector: String,
        #[arg(short, long, env = env::OUTPUT, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Arguments for the engine (after `--`)
        #[arg(last = true, value_name = "ENGINE ARGS")]
        engine_args: Vec<String>,
    },
    /// List deployments
    Deployments {
        #[arg(short, long, env = env::OUTPUT, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Print again whenever a deployment changes (until Ctrl-C, or the head goes away)
        #[arg(short, long)]
        watch: bool,
    },
    /// Show one deployment: state, generation, and every rank's node, GPUs, pid and state
    Get {
        name: String,
        #[arg(short, long, env = env::OUTPUT, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Print again whenever it changes (until Ctrl-C, its deletion, or the head going away)
        #[arg(short, long)]
        watch: bool,
    },
    /// Delete a deployment: stop every process, release its GPUs
    Delete {
        name: String,
        /// Return once the stop is under way, without waiting for the processes to be gone
        #[arg(long)]
        no_wait: bool,
        /// A deployment that does not exist is not an error (exit 0): for scripts that make sure
        /// it is gone
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// Restart a deployment's groups (every replica) at their next generation
    Restart { name: String },
    /// Create or update deployments from files (TOML or YAML), as `tessera deploy` would
    ///
    /// Each file holds one deployment with the fields of `tessera deploy` (name, model, tp, pp,
    /// replicas, engine, args, env, command, per_node, max_restarts, gpu_memory_utilization,
    /// max_model_len, startup_timeout, stall_timeout, canary_interval, drain_timeout, staging,
    /// model_from, node_selector), or several under `deployments`. A relative model path is taken
    /// from the file's directory. A deployment that exists is rolled to the file's spec (one
    /// replica at a time), or left alone when it already matches. Nothing is deleted: for that,
    /// give the head the directory (`tessera-head --deployments DIR`).
    ///
    /// Example (llama.toml):
    ///
    ///   name = "llama"
    ///   model = "/models/Llama-3.1-70B-Instruct"
    ///   tp = 8
    ///   pp = 2
    ///   args = ["--max-num-seqs", "64"]
    ///   env = { HF_HUB_OFFLINE = "1" }
    #[command(verbatim_doc_comment)]
    Apply {
        /// A deployment file (*.toml, *.yaml, *.yml) or a directory of them; may be repeated
        #[arg(short = 'f', long = "file", value_name = "PATH", required = true)]
        files: Vec<PathBuf>,
    },
    /// Change a deployment without an outage: a new revision of its spec, one replica at a time
    ///
    /// Only what is given changes; the rest is the current spec. By default a replica of the new
    /// revision starts before an old one drains and stops (one more group's GPUs needed); with
    /// --max-unavailable 1 an old one stops first. A revision that does not start stops the roll
    /// and the old replicas keep serving; `tessera rollback NAME` goes back.
    Update {
        name: String,
        /// A new model path
        #[arg(long, value_name = "PATH")]
        model: Option<PathBuf>,
        /// Set an environment variable, NAME=VALUE (repeatable)
        #[arg(long = "env", value_name = "NAME=VALUE", value_parser = deploy::parse_env)]
        env: Vec<(String, String)>,
        /// Remove an environment variable (repeatable)
        #[arg(long = "unset-env", value_name = "NAME")]
        unset_env: Vec<String>,
        /// New tensor parallel size
        #[arg(long)]
        tp: Option<u32>,
        /// New pipeline parallel size
        #[arg(long)]
        pp: Option<u32>,
        /// New fraction of each GPU's memory for vLLM
        #[arg(long, value_name = "F")]
        gpu_memory_utilization: Option<f64>,
        /// New longest sequence
        #[arg(long, value_name = "TOKENS")]
        max_model_len: Option<u64>,
        /// Stop an old replica before starting a new one (no spare GPUs)
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1))]
        max_unavailable: u32,
        /// New engine arguments (after `--`), replacing the current ones; none given: unchanged
        #[arg(last = true, value_name = "ENGINE ARGS")]
        engine_args: Vec<String>,
    },
    /// Roll a deployment back to the spec of its revision before the newest, one replica at a time
    Rollback {
        name: String,
        /// Stop an old replica before starting a new one (no spare GPUs)
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1))]
        max_unavailable: u32,
    },
    /// Set a deployment's number of replicas: new ones are planned and started like the first,
    /// removed ones are the highest-numbered; the others are not touched
    Scale {
        name: String,
        /// How many replicas (1-64)
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        replicas: u32,
    },
    /// Print a rank's log (its process's stdout and stderr)
    Logs {
        name: String,
        /// Which rank's process
        #[arg(long, default_value_t = 0)]
        rank: u64,
        /// Which replica
        #[arg(long, default_value_t = 0)]
        replica: u32,
        /// How many lines from the end
        #[arg(long, default_value_t = 100)]
        tail: u32,
        /// Keep printing new output, until the process's generation ends
        #[arg(short, long)]
        follow: bool,
        /// With -f: when the generation ends (the group restarts), go on with the next one's log
        /// (until the deployment is deleted)
        #[arg(long, requires = "follow")]
        follow_restarts: bool,
        /// The log of the generation before the current one (why did it restart?)
        #[arg(long, conflicts_with_all = ["generation", "follow"])]
        previous: bool,
        /// The log of generation N (nodes keep the two newest generations)
        #[arg(long, value_name = "N", conflicts_with = "follow")]
        generation: Option<u64>,
    },
    /// The head's tokens: `tokens rotate-join`
    Tokens {
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// Mark a node draining: no new work is placed on it
    Drain {
        /// Node name or id
        node: String,
        /// Also move what runs there now: every group with a process on the node restarts at its
        /// next generation, planned on the other nodes
        #[arg(long)]
        evict: bool,
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
        /// Also deploy a demo: the probe engine, planned from a real model config (Llama 3.1 8B)
        /// shipped in examples/, TP over each node's GPUs and PP over two nodes
        #[arg(long, env = "TESSERA_UP_DEPLOY")]
        deploy: bool,
        /// Where the OpenAI-compatible gateway (tessera-gateway) listens; port 0 picks a free one
        #[arg(long, env = "TESSERA_UP_GATEWAY_LISTEN", default_value = "127.0.0.1:8080", value_name = "ADDR")]
        gateway_listen: SocketAddr,
        /// Do not start a gateway
        #[arg(long)]
        no_gateway: bool,
    },
    /// Print shell completions, e.g. `tessera completions bash > /etc/bash_completion.d/tessera`
    /// (zsh: into a directory on $fpath as `_tessera`; fish: ~/.config/fish/completions/tessera.fish)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (tessera.1 and one per command, tessera-deploy.1 ...) into DIR; without
    /// --dir, print tessera(1)
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `tessera completions` and `tessera man`: from the command's own definition (clap's companions),
/// so they never disagree with `--help`.
fn self_docs(command: &Cmd) -> Option<ExitCode> {
    use clap::CommandFactory;
    match command {
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "tessera", &mut std::io::stdout());
            Some(ExitCode::SUCCESS)
        }
        Cmd::Man { dir: None } => {
            let r = clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout());
            Some(if r.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Cmd::Man { dir: Some(dir) } => {
            let r = std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(Cli::command(), dir));
            match r {
                Ok(()) => {
                    println!("man pages written to {}", dir.display());
                    Some(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: --dir {}: {e}", dir.display());
                    Some(ExitCode::from(1))
                }
            }
        }
        _ => None,
    }
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
    quiet_on_broken_pipe();
    let cli = Cli::parse();
    if let Some(code) = self_docs(&cli.command) {
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(p)) => match tessera_common::auth::read_token_file(p) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: --token-file {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        (None, None) => None,
    };
    client::set_token(token);
    client::set_timeout(cli.timeout);
    match tessera_common::tls::client_config(
        cli.tls_ca.as_deref(),
        cli.tls_cert.as_deref(),
        cli.tls_key.as_deref(),
        None,
    ) {
        Ok(tls) => client::set_tls(tls),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let head = client::head_url(&cli.head);
    let result = runtime.block_on(async move {
        match cli.command {
            Cmd::Plan {
                model,
                tp,
                pp,
                gpus,
                gpu_memory_utilization,
                max_model_len,
                layer_partition,
                strict,
                kv_cache_dtype,
                output,
            } => {
                if !(gpu_memory_utilization > 0.0 && gpu_memory_utilization <= 1.0) {
                    eprintln!(
                        "error: --gpu-memory-utilization {gpu_memory_utilization} must be more than 0 and at most 1"
                    );
                    return Ok(2);
                }
                let layer_partition = layer_partition.map(|p| p.0);
                let kv_cache_dtype = match tessera_common::plan::kv_cache_dtype(&kv_cache_dtype) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("error: --kv-cache-dtype {e}");
                        return Ok(2);
                    }
                };
                let request = PlanRequest {
                    tp,
                    pp,
                    gpu_memory_utilization,
                    max_model_len,
                    layer_partition,
                    kv_cache_dtype,
                    strict,
                };
                plan::run(&head, plan::PlanArgs { model, request, gpus, output }).await
            }
            Cmd::Deploy {
                name,
                model,
                tp,
                pp,
                replicas,
                max_unavailable,
                engine,
                command,
                per,
                env,
                max_restarts,
                wait,
                gpu_memory_utilization,
                max_model_len,
                startup_timeout,
                stall_timeout,
                canary_interval,
                drain_timeout,
                staging,
                model_from,
                node_selector,
                output,
                engine_args,
            } => {
                let node_selector = match tessera_common::validate::parse_labels(&node_selector) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("error: --node-selector: {}", e.message.replace("--labels", "--node-selector"));
                        return Ok(2);
                    }
                };
                let engine = match engine {
                    EngineArg::Vllm => tessera_proto::v1::Engine::Vllm,
                    EngineArg::Command => tessera_proto::v1::Engine::Command,
                    EngineArg::Probe => tessera_proto::v1::Engine::Probe,
                };
                let args = deploy::DeployArgs {
                    name,
                    model,
                    tp,
                    pp,
                    replicas,
                    max_unavailable,
                    engine,
                    command,
                    per_node: per == Per::Node,
                    env,
                    max_restarts,
                    wait,
                    gpu_memory_utilization,
                    max_model_len,
                    startup_timeout_s: startup_timeout,
                    stall_timeout_s: stall_timeout,
                    canary_interval_s: canary_interval,
                    drain_timeout_s: drain_timeout,
                    staging,
                    model_from,
                    node_selector,
                    engine_args,
                    output,
                };
                deploy::deploy(&head, args).await
            }
            Cmd::Deployments { output, watch } => deploy::watching(&head, None, watch, output).await,
            Cmd::Get { name, output, watch } => deploy::watching(&head, Some(name), watch, output).await,
            Cmd::Delete { name, no_wait, ignore_not_found } => {
                deploy::delete(&head, name, !no_wait, ignore_not_found).await
            }
            Cmd::Restart { name } => deploy::restart(&head, name).await,
            Cmd::Apply { files } => deploy::apply(&head, files).await,
            Cmd::Update {
                name,
                model,
                env,
                unset_env,
                tp,
                pp,
                gpu_memory_utilization,
                max_model_len,
                max_unavailable,
                engine_args,
            } => {
                let u = deploy::UpdateArgs {
                    name,
                    model,
                    env,
                    unset_env,
                    tp,
                    pp,
                    gpu_memory_utilization,
                    max_model_len,
                    max_unavailable,
                    engine_args,
                };
                deploy::update(&head, u).await
            }
            Cmd::Rollback { name, max_unavailable } => deploy::rollback(&head, name, max_unavailable).await,
            Cmd::Scale { name, replicas } => deploy::scale(&head, name, replicas).await,
            Cmd::Logs { name, rank, replica, tail, follow, follow_restarts, previous, generation } => {
                let which = match (previous, generation) {
                    (true, _) => deploy::Which::Previous,
                    (_, Some(n)) => deploy::Which::Generation(n),
                    _ => deploy::Which::Current,
                };
                deploy::logs(&head, deploy::LogsArgs { name, rank, replica, tail, follow, follow_restarts, which })
                    .await
            }
            Cmd::Nodes { cmd: None, output } => nodes::nodes(&head, output).await.map(|()| 0),
            Cmd::Nodes { cmd: Some(NodesCmd::Remove { node }), .. } => nodes::remove(&head, node).await.map(|()| 0),
            Cmd::Nodes { cmd: Some(NodesCmd::Approve { node }), .. } => nodes::approve(&head, node).await.map(|()| 0),
            Cmd::Status { output } => nodes::status(&head, output).await.map(|()| 0),
            Cmd::Events { follow, output } => nodes::events(&head, follow, output).await.map(|()| 0),
            Cmd::Tokens { cmd: TokensCmd::RotateJoin } => nodes::rotate_join(&head).await.map(|()| 0),
            Cmd::Tokens { cmd: TokensCmd::Create { ttl, uses } } => {
                nodes::create_token(&head, ttl, uses).await.map(|()| 0)
            }
            Cmd::Drain { node, evict } => nodes::drain(&head, node, true, evict).await.map(|()| 0),
            Cmd::Undrain { node } => nodes::drain(&head, node, false, false).await.map(|()| 0),
            Cmd::Up { workers, fake_gpus, listen, dir, bin_dir, deploy, gateway_listen, no_gateway } => {
                let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("tessera-up"));
                let gateway = (!no_gateway).then_some(gateway_listen);
                up::up(up::UpOptions { workers, fake_gpus, listen, dir, bin_dir, deploy, gateway }).await.map(|()| 0)
            }
            // Answered before the runtime started (self_docs).
            Cmd::Completions { .. } | Cmd::Man { .. } => Ok(0),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        // The reader went away (`tessera events -f | head`): stop quietly, as other CLIs do.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// `println!` panics when stdout is a closed pipe (`tessera nodes | head -1`): such a panic ends
/// the program quietly with status 0 instead of a panic message and status 101, like other CLIs.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}
