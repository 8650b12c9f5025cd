//! `tessera`: the command-line client of a Tessera cluster.

mod client;
mod nodes;
mod table;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tessera_common::env;
use tessera_common::fake::FakeGpuSpec;

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
            Cmd::Nodes { output } => nodes::nodes(&head, output).await,
            Cmd::Status { output } => nodes::status(&head, output).await,
            Cmd::Events { follow, output } => nodes::events(&head, follow, output).await,
            Cmd::Drain { node } => nodes::drain(&head, node, true).await,
            Cmd::Undrain { node } => nodes::drain(&head, node, false).await,
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
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
