//! A small etcd v3 client: what the head's etcd store and its leader election need (ranges,
//! transactions, leases), over the project's own generated gRPC code (protox, no system protoc).
//!
//! Calls go to one member at a time; a member that does not answer, or answers that it cannot
//! serve (no raft leader, stopping), is left for the next one in `--store`, so a cluster that lost
//! one member of three goes on. Every call has a deadline. With `--etcd-user`, the client
//! authenticates and signs in again when etcd says the token expired.
//!
//! The client runs on a runtime of its own (one thread): the store's callers are synchronous (the
//! membership state machine writes inside its handler), and [`Etcd::blocking`] lets them wait for
//! an answer without blocking the head's runtime into a deadlock.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tessera_proto::etcd::etcdserverpb as epb;
use tessera_proto::etcd::mvccpb::KeyValue;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How etcd is reached (`--store etcd://...` and the `--etcd-*` options).
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Member URLs (`http://HOST:PORT`, or `https://` with TLS).
    pub endpoints: Vec<String>,
    /// Every key the head writes starts with this (`--etcd-prefix`).
    pub prefix: String,
    pub tls: Option<ClientTlsConfig>,
    /// `--etcd-user` and the password from `--etcd-password-file`.
    pub user: Option<(String, String)>,
    /// Deadline of one call to one member.
    pub call_timeout: Duration,
}

impl EtcdConfig {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]` (also `etcds://` for TLS, or a list of http(s)
    /// URLs after `etcd://`).
    pub fn parse_store_url(url: &str, tls: bool) -> Result<Vec<String>, String> {
        let rest = url
            .strip_prefix("etcd://")
            .or_else(|| url.strip_prefix("etcds://"))
            .ok_or_else(|| format!("--store {url:?}: write `redb` or `etcd://HOST:2379[,HOST:2379...]`"))?;
        let scheme = if tls || url.starts_with("etcds://") { "https" } else { "http" };
        let mut out = Vec::new();
        for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let u = if part.contains("://") { part.to_string() } else { format!("{scheme}://{part}") };
            let host = u.split("://").nth(1).unwrap_or_default();
            if host.is_empty() || !host.contains(':') || host.contains('/') {
                return Err(format!(
                    "--store: {part:?} is not HOST:PORT; write e.g. etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379"
                ));
            }
            out.push(u);
        }
        if out.is_empty() {
            return Err(format!("--store {url:?} names no etcd member; write e.g. etcd://127.0.0.1:2379"));
        }
        if out.len() > 16 {
            return Err(format!("--store names {} etcd members; at most 16", out.len()));
        }
        Ok(out)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd ({endpoints}) did not answer: {message}")]
    Unreachable { endpoints: String, message: String },
    #[error("etcd refused the call: {0}")]
    Refused(String),
    #[error("cannot set up the etcd client: {0}")]
    Setup(String),
}

type Client = tonic::service::interceptor::InterceptedService<Channel, Auth>;

/// Rounds over the members one call makes before it fails.
const ROUNDS: u32 = 3;

/// Adds etcd's auth token (when signed in) to every call.
#[derive(Clone)]
pub struct Auth(Arc<std::sync::RwLock<Option<MetadataValue<tonic::metadata::Ascii>>>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = self.0.read().ok().and_then(|t| t.clone()) {
            req.metadata_mut().insert("token", t);
        }
        Ok(req)
    }
}

struct Inner {
    config: EtcdConfig,
    channels: Vec<Channel>,
    /// The member calls go to first (the last one that answered).
    current: AtomicUsize,
    token: Auth,
}

/// The client's own runtime; dropped without waiting (it may be dropped inside the head's).
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.shutdown_background();
        }
    }
}

impl OwnRuntime {
    fn spawn<F: Future + Send + 'static>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F::Output: Send + 'static,
    {
        self.0.as_ref().expect("runtime until dropped").spawn(f)
    }
}

/// A connection to an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
    runtime: Arc<OwnRuntime>,
}

impl Etcd {
    /// Sets up the client (connections are made on first use) and checks that etcd answers.
    pub fn connect(config: EtcdConfig) -> Result<Etcd, EtcdError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| EtcdError::Setup(format!("runtime: {e}")))?;
        let mut channels = Vec::new();
        {
            let _guard = runtime.enter();
            for url in &config.endpoints {
                let mut ep = Endpoint::from_shared(url.clone())
                    .map_err(|e| EtcdError::Setup(format!("{url:?}: {e}")))?
                    .connect_timeout(config.call_timeout.min(Duration::from_secs(2)))
                    .timeout(config.call_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(2))
                    .keep_alive_timeout(Duration::from_secs(2))
                    .keep_alive_while_idle(true);
                if let Some(tls) = &config.tls {
                    ep = ep.tls_config(tls.clone()).map_err(|e| EtcdError::Setup(format!("TLS: {e}")))?;
                }
                channels.push(ep.connect_lazy());
            }
        }
        let etcd = Etcd {
            inner: Arc::new(Inner { config, channels, current: AtomicUsize::new(0), token: Auth(Arc::default()) }),
            runtime: Arc::new(OwnRuntime(Some(runtime))),
        };
        if etcd.inner.config.user.is_some() {
            let inner = etcd.inner.clone();
            etcd.blocking(async move { inner.authenticate().await })??;
        }
        // One read now: a refusal (authentication on but no --etcd-user, no permission on the
        // prefix) will not go away by retrying, and is said at start. An etcd not up yet is
        // waited for (heads may start before it).
        let inner = etcd.inner.clone();
        let key = format!("{}format_version", etcd.inner.config.prefix).into_bytes();
        match etcd.blocking(async move { inner.range(key, Vec::new()).await })? {
            Err(EtcdError::Refused(m)) => {
                return Err(EtcdError::Refused(format!(
                    "{m}; if etcd's authentication is on, give --etcd-user and --etcd-password-file (a user with \
                     read and write on {})",
                    etcd.inner.config.prefix
                )));
            }
            Err(e) => tracing::warn!(error = %e, "etcd does not answer yet; waiting for it"),
            Ok(_) => {}
        }
        Ok(etcd)
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The members, for messages.
    pub fn endpoints(&self) -> String {
        self.inner.config.endpoints.join(",")
    }

    /// Runs `f` on the client's runtime and waits for it from any thread (also from inside the
    /// head's runtime: the work runs elsewhere).
    pub fn blocking<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> Result<T, EtcdError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        // The deadline inside: past it the work itself is dropped (a write reported as failed is
        // not left going on), covering every round over the members plus signing in again.
        let limit = self.inner.config.call_timeout * (ROUNDS * self.inner.channels.len() as u32 + 2)
            + Duration::from_millis(100 * ROUNDS as u64);
        let endpoints = self.endpoints();
        self.runtime.spawn(async move {
            let r = tokio::time::timeout(limit, f)
                .await
                .map_err(|_| EtcdError::Unreachable { endpoints, message: format!("no answer within {limit:?}") });
            let _ = tx.send(r);
        });
        let wait = || rx.recv().unwrap_or_else(|_| Err(EtcdError::Setup("the etcd client stopped".into())));
        // On the head's multi-threaded runtime, let its other tasks (the lease renewal) go on
        // while this thread waits.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    /// Runs `f` on the client's runtime, awaited from another runtime.
    pub async fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> Result<T, EtcdError> {
        self.runtime.spawn(f).await.map_err(|e| EtcdError::Setup(format!("the etcd client task failed: {e}")))
    }

    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, EtcdError> {
        let inner = self.inner.clone();
        let prefix = prefix.to_vec();
        self.run(async move { inner.range(prefix.clone(), prefix_end(&prefix)).await }).await?
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let inner = self.inner.clone();
        let key = key.to_vec();
        Ok(self.run(async move { inner.range(key, Vec::new()).await }).await??.into_iter().next())
    }

    pub async fn txn(&self, req: epb::TxnRequest) -> Result<epb::TxnResponse, EtcdError> {
        let inner = self.inner.clone();
        self.run(async move { inner.txn(req).await }).await?
    }

    pub fn txn_blocking(&self, req: epb::TxnRequest) -> Result<epb::TxnResponse, EtcdError> {
        let inner = self.inner.clone();
        self.blocking(async move { inner.txn(req).await })?
    }

    pub fn range_prefix_blocking(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, EtcdError> {
        let inner = self.inner.clone();
        let prefix = prefix.to_vec();
        self.blocking(async move { inner.range(prefix.clone(), prefix_end(&prefix)).await })?
    }

    /// A lease of `ttl` (whole seconds, at least 1); its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let inner = self.inner.clone();
        let ttl = ttl.as_secs().max(1) as i64;
        self.run(async move {
            inner
                .call(move |c| {
                    let mut l = epb::lease_client::LeaseClient::new(c);
                    async move { l.lease_grant(epb::LeaseGrantRequest { ttl, id: 0 }).await }
                })
                .await
        })
        .await?
        .and_then(|r| {
            if r.error.is_empty() { Ok(r.id) } else { Err(EtcdError::Refused(format!("lease grant: {}", r.error))) }
        })
    }

    /// Renews a lease once; the TTL etcd gives it now (0 or less: the lease is gone).
    pub async fn keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        let inner = self.inner.clone();
        self.run(async move {
            inner
                .call(move |c| {
                    let mut l = epb::lease_client::LeaseClient::new(c);
                    async move {
                        let mut s = l
                            .lease_keep_alive(tokio_stream::once(epb::LeaseKeepAliveRequest { id }))
                            .await?
                            .into_inner();
                        match s.message().await? {
                            Some(r) => Ok(tonic::Response::new(r.ttl)),
                            None => Err(tonic::Status::unavailable("the keepalive stream ended without an answer")),
                        }
                    }
                })
                .await
        })
        .await?
    }

    /// Ends a lease now (its keys go at once): a head stopping hands leadership over at once.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        let inner = self.inner.clone();
        self.run(async move {
            inner
                .call(move |c| {
                    let mut l = epb::lease_client::LeaseClient::new(c);
                    async move { l.lease_revoke(epb::LeaseRevokeRequest { id }).await }
                })
                .await
                .map(|_| ())
        })
        .await?
    }
}

impl Inner {
    async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some((name, password)) = self.config.user.clone() else { return Ok(()) };
        let r = self
            .call_raw(move |c| {
                let mut a = epb::auth_client::AuthClient::new(c);
                let (name, password) = (name.clone(), password.clone());
                async move { a.authenticate(epb::AuthenticateRequest { name, password }).await }
            })
            .await
            .map_err(|e| match e {
                EtcdError::Refused(m) => EtcdError::Refused(format!(
                    "signing in as --etcd-user {:?}: {m}; check the user and --etcd-password-file",
                    self.config.user.as_ref().map(|u| u.0.as_str()).unwrap_or_default()
                )),
                other => other,
            })?;
        let v: MetadataValue<tonic::metadata::Ascii> =
            r.token.parse().map_err(|_| EtcdError::Refused("etcd sent an auth token that is not ASCII".into()))?;
        if let Ok(mut t) = self.token.0.write() {
            *t = Some(v);
        }
        Ok(())
    }

    /// One call, on each member in turn until one answers; signs in again once when etcd says
    /// the auth token is no longer valid.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // A member lost can start a raft election among the others (a second or two without
        // answers): a few rounds over the members before giving up. Safe for our writes: puts
        // and deletes of whole values, guarded by the leadership compare.
        let mut round = 0;
        loop {
            round += 1;
            match self.call_raw(&f).await {
                Err(EtcdError::Refused(m)) if self.config.user.is_some() && m.contains("invalid auth token") => {
                    self.authenticate().await?;
                }
                Err(EtcdError::Unreachable { .. }) if round < ROUNDS => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    async fn call_raw<T, F, Fut>(&self, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.channels.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let client =
                tonic::service::interceptor::InterceptedService::new(self.channels[idx].clone(), self.token.clone());
            match tokio::time::timeout(self.config.call_timeout, f(client)).await {
                Ok(Ok(r)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Ok(Err(s)) if member_unavailable(&s) => {
                    errors.push(format!("{}: {}", self.config.endpoints[idx], status_text(&s)));
                }
                Ok(Err(s)) => return Err(EtcdError::Refused(format!("{} ({:?})", s.message(), s.code()))),
                Err(_) => errors
                    .push(format!("{}: no answer within {:?}", self.config.endpoints[idx], self.config.call_timeout)),
            }
        }
        Err(EtcdError::Unreachable { endpoints: self.config.endpoints.join(","), message: errors.join("; ") })
    }

    async fn range(&self, key: Vec<u8>, range_end: Vec<u8>) -> Result<Vec<KeyValue>, EtcdError> {
        let mut out = Vec::new();
        let mut from = key.clone();
        loop {
            let req = epb::RangeRequest {
                key: from.clone(),
                range_end: range_end.clone(),
                limit: 1000,
                ..Default::default()
            };
            let r = self
                .call(move |c| {
                    let mut kv = epb::kv_client::KvClient::new(c).max_decoding_message_size(64 << 20);
                    let req = req.clone();
                    async move { kv.range(req).await }
                })
                .await?;
            let more = r.more;
            let last = r.kvs.last().map(|k| k.key.clone());
            out.extend(r.kvs);
            match (more, last, range_end.is_empty()) {
                (true, Some(mut k), false) => {
                    k.push(0);
                    from = k;
                }
                _ => return Ok(out),
            }
        }
    }

    async fn txn(&self, req: epb::TxnRequest) -> Result<epb::TxnResponse, EtcdError> {
        self.call(move |c| {
            let mut kv = epb::kv_client::KvClient::new(c);
            let req = req.clone();
            async move { kv.txn(req).await }
        })
        .await
    }
}

/// A status as one line: its message, the transport error under it, and a hint for TLS refusals.
fn status_text(s: &tonic::Status) -> String {
    let mut t = s.message().to_string();
    if let Some(src) = std::error::Error::source(s) {
        t = format!("{t}: {}", tessera_common::error_chain(src));
    }
    if t.contains("alert") || t.contains("certificate") || t.contains("Certificate") {
        t.push_str(" (TLS: check --etcd-ca, --etcd-cert and --etcd-key against the members' certificates)");
    }
    t
}

/// Errors after which another member may answer (the call did not reach a working raft leader).
fn member_unavailable(s: &tonic::Status) -> bool {
    // A member that is down shows as a connection error (Unavailable) or as the call's deadline
    // passing (Cancelled, "Timeout expired"); a member cut off from its raft leader answers
    // Unavailable or DeadlineExceeded.
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && !s.message().contains("invalid auth token")
}

/// The end of the range of keys starting with `prefix` (etcd's convention).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Transaction building blocks.
pub mod ops {
    use super::epb;

    pub fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> epb::RequestOp {
        epb::RequestOp {
            request: Some(epb::request_op::Request::RequestPut(epb::PutRequest {
                key,
                value,
                lease,
                ..Default::default()
            })),
        }
    }

    pub fn delete(key: Vec<u8>) -> epb::RequestOp {
        epb::RequestOp {
            request: Some(epb::request_op::Request::RequestDeleteRange(epb::DeleteRangeRequest {
                key,
                ..Default::default()
            })),
        }
    }

    pub fn get(key: Vec<u8>) -> epb::RequestOp {
        epb::RequestOp {
            request: Some(epb::request_op::Request::RequestRange(epb::RangeRequest { key, ..Default::default() })),
        }
    }

    /// `key`'s create revision equals `rev` (0: the key does not exist).
    pub fn created_at(key: Vec<u8>, rev: i64) -> epb::Compare {
        epb::Compare {
            result: epb::compare::CompareResult::Equal as i32,
            target: epb::compare::CompareTarget::Create as i32,
            key,
            target_union: Some(epb::compare::TargetUnion::CreateRevision(rev)),
            range_end: Vec::new(),
        }
    }

    /// The first key-value of a range answer inside a transaction's responses.
    pub fn first_kv(r: &epb::TxnResponse) -> Option<&super::KeyValue> {
        r.responses.iter().find_map(|op| match &op.response {
            Some(epb::response_op::Response::ResponseRange(rr)) => rr.kvs.first(),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_are_parsed_with_clear_errors() {
        assert_eq!(
            EtcdConfig::parse_store_url("etcd://127.0.0.1:2379,127.0.0.2:2379", false).expect("ok"),
            vec!["http://127.0.0.1:2379".to_string(), "http://127.0.0.2:2379".to_string()]
        );
        assert_eq!(EtcdConfig::parse_store_url("etcd://h:1", true).expect("ok"), vec!["https://h:1".to_string()]);
        assert_eq!(EtcdConfig::parse_store_url("etcds://h:1", false).expect("ok"), vec!["https://h:1".to_string()]);
        let e = EtcdConfig::parse_store_url("redis://h:1", false).expect_err("scheme");
        assert!(e.contains("etcd://HOST:2379"), "{e}");
        let e = EtcdConfig::parse_store_url("etcd://h", false).expect_err("port");
        assert!(e.contains("\"h\" is not HOST:PORT"), "{e}");
        assert!(EtcdConfig::parse_store_url("etcd://", false).expect_err("empty").contains("names no etcd member"));
    }

    #[test]
    fn prefix_end_is_etcds_range_end() {
        assert_eq!(prefix_end(b"/tessera/"), b"/tessera0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}
