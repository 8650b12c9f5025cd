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

/// `None` tokens: `--insecure`, every call is let through.
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenSet>>,
    metrics: Option<Arc<crate::metrics::HeadMetrics>>,
}

impl AuthLayer {
    pub fn new(tokens: Option<TokenSet>, metrics: Option<Arc<crate::metrics::HeadMetrics>>) -> Self {
        AuthLayer { tokens: tokens.map(Arc::new), metrics }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, tokens: self.tokens.clone(), metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<TokenSet>>,
    metrics: Option<Arc<crate::metrics::HeadMetrics>>,
}

/// Counts one RPC by method and code.
fn count(metrics: &Option<Arc<crate::metrics::HeadMetrics>>, method: &str, code: tonic::Code) {
    if let Some(m) = metrics {
        let code = format!("{code:?}");
        m.rpcs.get_or_create(&crate::metrics::RpcLabels { method: method.to_string(), code }).inc();
    }
}

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

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            let path = req.uri().path().to_string();
            let role = Role::for_path(&path);
            let header = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
            if let Err(denied) = tokens.check(role, header) {
                let status = match denied {
                    Denied::Unauthenticated { missing: true } => Status::unauthenticated(
                        "missing bearer token: give the admin token (--token, --token-file or TESSERA_TOKEN); the head writes it to DATA_DIR/admin.token",
                    ),
                    Denied::Unauthenticated { missing: false } => Status::unauthenticated(
                        "invalid token: it matches neither the head's join token nor its admin token",
                    ),
                    Denied::WrongRole => Status::permission_denied(format!(
                        "{path} needs the admin token; the join token only lets workers join"
                    )),
                };
                // Counted in tessera_head_auth_refusals_total; logged without the token.
                let refusals = self.metrics.as_ref().map(|m| m.auth_refusals.inc() + 1);
                warn!(method = %path, code = ?status.code(), refusals, "request refused");
                count(&self.metrics, &path, status.code());
                return Box::pin(async move { Ok(status.into_http()) });
            }
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
