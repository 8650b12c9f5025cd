//! Authentication: one tower layer in front of every service. The join token opens the workers'
//! membership session; the admin token opens everything. Tokens are compared in constant time;
//! refusals are counted and logged without the token.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tessera_common::auth::{Denied, Role, TokenSet};
use tonic::Status;
use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::warn;

/// The head's tokens, shared with the `Tokens` service that rotates the join token.
pub type SharedTokens = Arc<std::sync::RwLock<TokenSet>>;

/// `None` tokens: `--insecure`, every call is let through.
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Option<SharedTokens>,
    bootstrap: Option<Arc<super::tokens::Bootstrap>>,
    metrics: Option<Arc<crate::metrics::HeadMetrics>>,
}

impl AuthLayer {
    pub fn new(tokens: Option<SharedTokens>, metrics: Option<Arc<crate::metrics::HeadMetrics>>) -> Self {
        AuthLayer { tokens, metrics, bootstrap: None }
    }

    /// Short-lived join tokens are checked too.
    pub fn with_bootstrap(mut self, bootstrap: Arc<super::tokens::Bootstrap>) -> Self {
        self.bootstrap = Some(bootstrap);
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, tokens: self.tokens.clone(), metrics: self.metrics.clone(), bootstrap: self.bootstrap.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<SharedTokens>,
    bootstrap: Option<Arc<super::tokens::Bootstrap>>,
    metrics: Option<Arc<crate::metrics::HeadMetrics>>,
}

/// Every method the head serves (`/package.Service/Method`), from the descriptors it was built
/// with plus the standard health and reflection services.
fn known_methods() -> &'static std::collections::HashSet<String> {
    static KNOWN: std::sync::OnceLock<std::collections::HashSet<String>> = std::sync::OnceLock::new();
    KNOWN.get_or_init(|| {
        use prost::Message;
        let mut known: std::collections::HashSet<String> = [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let set = prost_types::FileDescriptorSet::decode(tessera_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set compiled into this binary decodes");
        for f in &set.file {
            for svc in &f.service {
                for m in &svc.method {
                    known.insert(format!("/{}.{}/{}", f.package(), svc.name(), m.name()));
                }
            }
        }
        known
    })
}

/// The metric label for a path: the method, or `unknown` (a client making up paths must not be
/// able to make up metric series).
pub fn method_label(path: &str) -> &str {
    if known_methods().contains(path) { path } else { "unknown" }
}

/// Counts one RPC by method and code.
fn count(metrics: &Option<Arc<crate::metrics::HeadMetrics>>, method: &str, code: tonic::Code) {
    if let Some(m) = metrics {
        let code = format!("{code:?}");
        m.rpcs.get_or_create(&crate::metrics::RpcLabels { method: method_label(method).to_string(), code }).inc();
    }
}

/// Refusals logged per second at most; the rest are counted and summed up in the next line.
const REFUSAL_LOGS_PER_SECOND: u32 = 10;

/// A once-a-second budget for refusal log lines.
#[derive(Default)]
struct LogBudget {
    window: Option<std::time::Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    /// Whether to log now, and how many were suppressed before (to say so in the line).
    fn take(&mut self, now: std::time::Instant) -> Option<u64> {
        if self.window.is_none_or(|w| now.duration_since(w) >= std::time::Duration::from_secs(1)) {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used >= REFUSAL_LOGS_PER_SECOND {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

static REFUSAL_LOGS: std::sync::Mutex<LogBudget> =
    std::sync::Mutex::new(LogBudget { window: None, used: 0, suppressed: 0 });

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let role = Role::for_path(req.uri().path());
        if let Some(tokens) = &self.tokens {
            let path = req.uri().path().to_string();
            let header = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
            let mut checked = tokens.read().unwrap_or_else(|p| p.into_inner()).check(role, header);
            // A short-lived bootstrap token opens a membership session (one use each).
            if role == Role::Join
                && matches!(checked, Err(Denied::Unauthenticated { missing: false }))
                && let (Some(b), Some(t)) = (&self.bootstrap, header.and_then(tessera_common::auth::bearer_token))
                && b.admit(t, crate::membership::unix_ms())
            {
                checked = Ok(tessera_common::auth::Granted::Join);
            }
            if let Ok(granted) = &checked {
                // The handler learns what let the call in (a node credential must match its node).
                req.extensions_mut().insert(granted.clone());
            }
            if let Err(denied) = checked {
                let status = match denied {
                    Denied::Unauthenticated { missing: true } if role == Role::Join => Status::unauthenticated(
                        "missing bearer token: a worker joins with the join token (--token-file or TESSERA_TOKEN_FILE); the head writes it to DATA_DIR/join.token",
                    ),
                    Denied::Unauthenticated { missing: true } => Status::unauthenticated(
                        "missing bearer token: give the admin token (--token, --token-file or TESSERA_TOKEN); the head writes it to DATA_DIR/admin.token",
                    ),
                    Denied::Unauthenticated { missing: false } => Status::unauthenticated(
                        "invalid token: it matches neither the head's join token nor its admin token",
                    ),
                    Denied::WrongRole if role == Role::Read => Status::permission_denied(format!(
                        "{path} needs the reader or admin token; the join token only lets workers join"
                    )),
                    Denied::WrongRole => Status::permission_denied(format!(
                        "{path} needs the admin token (the join token only lets workers join; the reader token only reads deployments)"
                    )),
                };
                // Counted in tessera_head_auth_refusals_total; logged without the token.
                let refusals = self.metrics.as_ref().map(|m| m.auth_refusals.inc() + 1);
                let budget = REFUSAL_LOGS.lock().map(|mut b| b.take(std::time::Instant::now())).unwrap_or(None);
                if let Some(suppressed) = budget {
                    let method = method_label(&path);
                    warn!(%method, code = ?status.code(), refusals, suppressed, "request refused");
                }
                count(&self.metrics, &path, status.code());
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        // A connection that made an authenticated call (public health checks do not count) may stay.
        if role != Role::Public
            && let Some(conn) = req.extensions().get::<super::conns::Authenticated>()
        {
            conn.mark();
        }
        let path = req.uri().path().to_string();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A trailers-only error response carries its status in the headers.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from_i32)
                .unwrap_or(tonic::Code::Ok);
            count(&metrics, &path, code);
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_paths_share_one_label() {
        assert_eq!(method_label("/tessera.v1.Deployments/Create"), "/tessera.v1.Deployments/Create");
        assert_eq!(method_label("/tessera.v1.Membership/Session"), "/tessera.v1.Membership/Session");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "/grpc.health.v1.Health/Check");
        assert_eq!(method_label("/tessera.v1.Deployments/Create2"), "unknown");
        assert_eq!(method_label("/x/y"), "unknown");
    }

    #[test]
    fn refusal_logs_have_a_budget_per_second() {
        let mut b = LogBudget::default();
        let t = std::time::Instant::now();
        let logged = (0..100).filter(|_| b.take(t).is_some()).count();
        assert_eq!(logged, REFUSAL_LOGS_PER_SECOND as usize);
        assert_eq!(
            b.take(t + std::time::Duration::from_secs(1)),
            Some(90),
            "the next line says how many were not logged"
        );
    }
}
