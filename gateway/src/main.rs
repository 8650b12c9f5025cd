//! `tessera-gateway`: see the library's documentation and `tessera-gateway --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tessera_gateway::proxy::{ProxyConfig, Shared};
use tessera_gateway::table::Table;
use tessera_gateway::{head_url, router, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// An OpenAI-compatible gateway in front of a Tessera cluster's deployments.
///
/// Serves /v1/models, /v1/completions, /v1/chat/completions and /v1/embeddings, routed by the
/// request's "model" (a deployment's name or one of its --served-model-name), to the replica with
/// the fewest requests in flight among those that are running and pass their health check.
/// Streaming responses (server-sent events) are passed through chunk by chunk. A request whose
/// replica fails before the first byte of its answer is sent to another one (--retries, within
/// --first-byte-timeout). Prometheus metrics at /metrics.
///
/// It needs only the head's reader token (DATA_DIR/reader.token on the head): it reads
/// deployments and can do nothing else. Run as many gateways as you like.
#[derive(Parser, Debug)]
#[command(name = "tessera-gateway", version)]
struct Cli {
    /// The head: host:port or URL (http:// or https://). Heads on one etcd store: all of them,
    /// separated by commas; the gateway reads from the one that leads
    #[arg(long, env = "TESSERA_HEAD", default_value = "http://127.0.0.1:7470")]
    head: String,

    /// File with the head's reader token (or the admin token)
    #[arg(long, env = "TESSERA_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,

    /// Where to serve the OpenAI-compatible API
    #[arg(long, env = "TESSERA_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,

    /// File with an API key clients must send (Authorization: Bearer KEY); none: no check
    #[arg(long, value_name = "PATH")]
    api_key_file: Option<PathBuf>,

    /// How often to read the deployments from the head
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    refresh: Duration,

    /// How often to check each replica's /health
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    health_interval: Duration,

    /// How long a replica whose request failed gets no new requests (a passing health check ends
    /// it sooner)
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    eject_for: Duration,

    /// Other replicas tried when one fails before the first byte of its answer
    #[arg(long, default_value_t = 2)]
    retries: u32,

    /// Deadline for the first byte of an answer, over all tries (a long prompt's prefill counts)
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    first_byte_timeout: Duration,

    /// Largest request body, in bytes
    #[arg(long, default_value_t = 16 << 20)]
    max_body: usize,

    /// Requests in flight at most; more are answered 503 at once
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,

    /// TLS: the CA that signed the head's certificate (for an https head)
    #[arg(long, value_name = "PATH")]
    tls_ca: Option<PathBuf>,

    /// Log filter (tracing's EnvFilter syntax)
    #[arg(long, env = "TESSERA_LOG", default_value = "info")]
    log: String,
}

fn read_secret(path: &std::path::Path, what: &str) -> Result<String, String> {
    tessera_common::auth::read_token_file(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let token = match (&cli.token_file, std::env::var("TESSERA_TOKEN").ok()) {
        (Some(p), _) => Some(read_secret(p, "--token-file")?),
        (None, Some(t)) => Some(t),
        (None, None) => None,
    };
    let api_key = cli.api_key_file.as_deref().map(|p| read_secret(p, "--api-key-file")).transpose()?;
    let head = head_url(&cli.head);
    let tls = tessera_common::tls::client_config(cli.tls_ca.as_deref(), None, None, None)?;
    let bearer = tessera_common::auth::Bearer::new(token.as_deref()).map_err(|e| format!("token: {e}"))?;
    let mut clients = Vec::new();
    for h in tessera_common::head_list(&head)? {
        tessera_common::tls::check_scheme(&h, tls.is_some())?;
        let mut endpoint = tonic::transport::Endpoint::from_shared(h.clone())
            .map_err(|e| format!("--head {h:?}: {e}; write e.g. 10.0.0.1:7470"))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true);
        if let Some(tls) = &tls {
            endpoint =
                endpoint.tls_config(tls.clone()).map_err(|e| format!("TLS: {}", tessera_common::error_chain(&e)))?;
        }
        // Lazy: the gateway starts (and serves what it learns) even while the head is away.
        let channel = endpoint.connect_lazy();
        let client =
            tessera_proto::v1::deployments_client::DeploymentsClient::with_interceptor(channel, bearer.clone())
                .max_decoding_message_size(64 << 20);
        clients.push((h, client));
    }
    let shared = Shared::new(
        Table::new(cli.eject_for),
        ProxyConfig {
            api_key,
            max_body: cli.max_body,
            retries: cli.retries,
            first_byte_timeout: cli.first_byte_timeout,
            max_in_flight: cli.max_in_flight,
            connect_timeout: Duration::from_secs(2),
        },
    );
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (--listen): {e}", cli.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let stop = CancellationToken::new();
    tokio::spawn(watch::deployments(shared.clone(), clients, cli.refresh, stop.clone()));
    tokio::spawn(watch::health(shared.clone(), cli.health_interval, stop.clone()));
    info!(%addr, %head, "gateway serving the OpenAI-compatible API");
    // Tests and scripts read the address when --listen asked for port 0.
    println!("listening on {addr}");
    let shutdown = {
        let stop = stop.clone();
        async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            info!("stopping: no new connections; requests in flight get 30 s to finish");
            stop.cancel();
            // Streams that do not end by then are cut.
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                info!("stopping now: requests were still in flight after 30 s");
                std::process::exit(0);
            });
        }
    };
    axum::serve(listener, router(shared)).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string())
}
