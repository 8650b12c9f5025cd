//! Authentication: one tower layer in front of every service. The join token opens the workers'
//! membership session; the admin token opens everything. Tokens are compared in constant time;
//! refusals are counted and logged without the token.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    pub failures: Arc<AtomicU64>,
}

impl AuthLayer {
    pub fn new(tokens: Option<TokenSet>) -> Self {
        AuthLayer { tokens: tokens.map(Arc::new), failures: Arc::new(AtomicU64::new(0)) }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, tokens: self.tokens.clone(), failures: self.failures.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<TokenSet>>,
    failures: Arc<AtomicU64>,
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
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
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
                warn!(method = %path, code = ?status.code(), refusals = n, "request refused");
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}
