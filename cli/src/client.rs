//! Connecting to the head, with errors a person can act on.

use std::time::Duration;

use anyhow::anyhow;
use tessera_proto::v1 as pb;
use tonic::transport::{Channel, Endpoint};

/// The token every call carries: from `--token`/`--token-file`, or (for `up`) the local head's.
static TOKEN: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

pub fn set_token(token: Option<String>) {
    if let Ok(mut t) = TOKEN.write() {
        *t = token;
    }
}

/// TLS towards an https head (from --tls-ca, --tls-cert, --tls-key).
static TLS: std::sync::RwLock<Option<tonic::transport::ClientTlsConfig>> = std::sync::RwLock::new(None);

pub fn set_tls(tls: Option<tonic::transport::ClientTlsConfig>) {
    if let Ok(mut t) = TLS.write() {
        *t = tls;
    }
}

/// How long one call may take (`--timeout`).
static TIMEOUT: std::sync::RwLock<Duration> = std::sync::RwLock::new(Duration::from_secs(10));

pub fn set_timeout(t: Duration) {
    if let Ok(mut x) = TIMEOUT.write() {
        *x = t;
    }
}

fn timeout() -> Duration {
    TIMEOUT.read().map(|t| *t).unwrap_or(Duration::from_secs(10))
}

/// `--head` as a URL: `host:port` (what DATA_DIR/head.addr holds) gets `http://`, or `https://`
/// when TLS is configured.
/// Several heads (heads on one etcd store) are separated by commas; each gets its scheme.
pub fn head_url(head: &str) -> String {
    let tls = TLS.read().ok().is_some_and(|t| t.is_some());
    head.split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(
            |h| if h.contains("://") { h.to_string() } else { format!("{}://{h}", if tls { "https" } else { "http" }) },
        )
        .collect::<Vec<_>>()
        .join(",")
}

pub fn token() -> Option<String> {
    TOKEN.read().ok().and_then(|t| t.clone())
}

/// A connection whose calls carry the bearer token.
pub type Conn = tonic::service::interceptor::InterceptedService<Channel, tessera_common::auth::Bearer>;

pub async fn connect(head: &str) -> anyhow::Result<Conn> {
    connect_with(head, Some(timeout())).await
}

/// A connection for calls that take as long as they take (an update rolls replica by replica);
/// HTTP/2 keepalive still notices a head that went away.
pub async fn connect_untimed(head: &str) -> anyhow::Result<Conn> {
    connect_with(head, None).await
}

async fn connect_with(head: &str, call_timeout: Option<Duration>) -> anyhow::Result<Conn> {
    let channel = connect_channel(head, call_timeout).await?;
    let bearer = tessera_common::auth::Bearer::new(token().as_deref()).map_err(|e| anyhow!("invalid token: {e}"))?;
    Ok(tonic::service::interceptor::InterceptedService::new(channel, bearer))
}

/// One head: connects to it. Several (heads on one etcd store, one leading): asks each in turn
/// whether it serves (the standard health check, which a standby answers NOT_SERVING) and
/// connects to the one that leads.
async fn connect_channel(head: &str, call_timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let heads = tessera_common::head_list(head).map_err(|e| anyhow!(e))?;
    if heads.len() == 1 {
        return connect_one(&heads[0], call_timeout).await;
    }
    let mut why = Vec::new();
    for h in &heads {
        let channel = match connect_one(h, call_timeout).await {
            Ok(c) => c,
            Err(e) => {
                why.push(format!("{h}: {}", e.to_string().split(';').next().unwrap_or_default()));
                continue;
            }
        };
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let check = tonic_health::pb::HealthCheckRequest { service: "tessera.v1.Cluster".into() };
        match tokio::time::timeout(timeout(), health.check(check)).await {
            Ok(Ok(r))
                if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 =>
            {
                return Ok(channel);
            }
            Ok(Ok(_)) => why.push(format!("{h}: a standby")),
            Ok(Err(s)) => why.push(format!("{h}: {}", s.message())),
            Err(_) => why.push(format!("{h}: no answer within {}s", timeout().as_secs_f64())),
        }
    }
    Err(anyhow!(
        "no head leads among {head} ({}); an election takes a few seconds after a leader is lost, retry then",
        why.join("; ")
    ))
}

async fn connect_one(head: &str, call_timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let tls = TLS.read().ok().and_then(|t| t.clone());
    tessera_common::tls::check_scheme(head, tls.is_some()).map_err(|e| anyhow!(e))?;
    let mut endpoint = Endpoint::from_shared(head.to_string())
        .map_err(|e| anyhow!("invalid head URL {head:?}: {e}; write e.g. http://10.0.0.1:7470"))?
        .connect_timeout(Duration::from_secs(3).min(timeout()))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    // Each call's deadline; a stream's only until its first answer, then keepalive pings notice a
    // head that went away.
    if let Some(t) = call_timeout {
        endpoint = endpoint.timeout(t);
    }
    if let Some(tls) = tls {
        endpoint =
            endpoint.tls_config(tls).map_err(|e| anyhow!("TLS settings: {}", tessera_common::error_chain(&e)))?;
    }
    endpoint.connect().await.map_err(|e| {
        anyhow!(
            "cannot reach the head at {head}: {}; is tessera-head running there? (set --head or TESSERA_HEAD)",
            tessera_common::error_chain(&e)
        )
    })
}

pub async fn cluster(head: &str) -> anyhow::Result<pb::cluster_client::ClusterClient<Conn>> {
    // A node list of a big cluster passes gRPC's default 4 MiB (about 4,500 nodes of 8 GPUs).
    Ok(pb::cluster_client::ClusterClient::new(connect(head).await?).max_decoding_message_size(256 << 20))
}

/// A gRPC status as one line: the head's message and the code.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::Cancelled && s.message().contains("Timeout expired") {
        return anyhow!(
            "the head did not answer within {}s (--timeout); is it overloaded or stopped?",
            timeout().as_secs_f64()
        );
    }
    anyhow!("{} ({:?})", s.message(), s.code())
}

pub trait StatusContext<T> {
    fn or_status(self) -> anyhow::Result<T>;
}

impl<T> StatusContext<T> for Result<tonic::Response<T>, tonic::Status> {
    fn or_status(self) -> anyhow::Result<T> {
        self.map(tonic::Response::into_inner).map_err(status_error)
    }
}
