//! The OpenAI-compatible front: a request's `model` picks the deployment, the table picks the
//! replica, and the response (streamed or not) is passed through chunk by chunk. A request whose
//! replica fails before the first byte of the response body reached the client (cannot connect,
//! resets, answers 5xx, or says nothing until the deadline) is sent to another replica, a bounded
//! number of times within one deadline; once bytes went to the client, a failure ends the response
//! (and is counted).

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::metrics::{ErrorLabels, Metrics, ReplicaLabels, RequestLabels};
use crate::table::{NoReplica, Outcome, ReplicaId, Table};

/// What the proxy needs to know.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Clients must send `Authorization: Bearer KEY` (None: no check).
    pub api_key: Option<String>,
    /// Largest request body.
    pub max_body: usize,
    /// Replicas tried after the first one failed.
    pub retries: u32,
    /// Deadline for the first byte of the response, over all tries.
    pub first_byte_timeout: Duration,
    /// Requests in flight through this gateway at most; more get 503 at once.
    pub max_in_flight: usize,
    /// How long to try to connect to a replica.
    pub connect_timeout: Duration,
}

pub struct Shared {
    pub table: Mutex<Table>,
    pub metrics: Metrics,
    pub config: ProxyConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    slots: Arc<Semaphore>,
}

impl Shared {
    pub fn new(table: Table, config: ProxyConfig) -> Arc<Shared> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Arc::new(Shared {
            table: Mutex::new(table),
            metrics: Metrics::default(),
            slots: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            config,
            client,
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A health check of a replica (`GET /health`, 2 s): healthy or not.
    pub async fn check(&self, endpoint: &str) -> bool {
        let Ok(req) = Request::get(format!("{endpoint}/health")).body(Full::new(Bytes::new())) else { return false };
        match tokio::time::timeout(Duration::from_secs(2), self.client.request(req)).await {
            Ok(Ok(r)) => {
                let ok = r.status().is_success();
                let _ = tokio::time::timeout(Duration::from_secs(2), r.into_body().collect()).await;
                ok
            }
            _ => false,
        }
    }
}

/// An OpenAI-style error body.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let kind = match status {
        StatusCode::NOT_FOUND => "NotFoundError",
        StatusCode::UNAUTHORIZED => "AuthenticationError",
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "BadRequestError",
        _ => "ServiceUnavailableError",
    };
    let body = json!({"error": {"message": message.into(), "type": kind, "code": status.as_u16()}}).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Whether `headers` carry the gateway's API key.
fn authorized(cfg: &ProxyConfig, headers: &HeaderMap) -> bool {
    let Some(key) = &cfg.api_key else { return true };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| tessera_common::auth::bearer_token(v.as_bytes()))
        .is_some_and(|t| tessera_common::auth::constant_time_eq(t, key.as_bytes()))
}

/// `GET /v1/models`: the models with a replica that takes requests now.
pub async fn models(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response<Body> {
    if !authorized(&s.config, &headers) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong API key: send Authorization: Bearer KEY");
    }
    let data: Vec<Value> = s
        .table()
        .models(Instant::now())
        .into_iter()
        .map(|(m, d)| json!({"id": m, "object": "model", "created": 0, "owned_by": "tessera", "deployment": d}))
        .collect();
    let body = json!({"object": "list", "data": data}).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Hop-by-hop headers, which a proxy does not pass on (RFC 9110 7.6.1), and what it sets itself.
const SKIP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    header::CONTENT_LENGTH,
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, drop_auth: bool) {
    for (k, v) in from {
        if SKIP.contains(k) || k.as_str() == "keep-alive" || k.as_str() == "proxy-connection" {
            continue;
        }
        if drop_auth && k == header::AUTHORIZATION {
            continue;
        }
        to.append(k.clone(), v.clone());
    }
}

/// How long a client may take to send its request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// `POST /v1/completions`, `/v1/chat/completions`, `/v1/embeddings`: routed by `model`.
pub async fn forward(State(s): State<Arc<Shared>>, req: Request<Body>) -> Response<Body> {
    let started = Instant::now();
    if !authorized(&s.config, req.headers()) {
        count(&s, "", "", StatusCode::UNAUTHORIZED);
        return error(StatusCode::UNAUTHORIZED, "missing or wrong API key: send Authorization: Bearer KEY");
    }
    let Ok(slot) = s.slots.clone().try_acquire_owned() else {
        count(&s, "", "", StatusCode::SERVICE_UNAVAILABLE);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the gateway has {} requests in flight (--max-in-flight); retry shortly", s.config.max_in_flight),
        );
    };
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, s.config.max_body)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            // A body over the limit, or a client that went away while sending it.
            let too_big = std::error::Error::source(&e).is_some_and(|c| c.is::<http_body_util::LengthLimitError>());
            let (code, why) = if too_big {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {} bytes (--max-body)", s.config.max_body),
                )
            } else {
                (StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"))
            };
            count(&s, "", "", code);
            return error(code, why);
        }
        Err(_) => {
            count(&s, "", "", StatusCode::REQUEST_TIMEOUT);
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body took more than {}s", BODY_TIMEOUT.as_secs()),
            );
        }
    };
    let model = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => match v.get("model").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => {
                count(&s, "", "", StatusCode::BAD_REQUEST);
                return error(
                    StatusCode::BAD_REQUEST,
                    "the request has no \"model\": name a deployment (GET /v1/models lists them)",
                );
            }
        },
        Err(e) => {
            count(&s, "", "", StatusCode::BAD_REQUEST);
            return error(StatusCode::BAD_REQUEST, format!("the request body is not JSON: {e}"));
        }
    };
    let path =
        parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| parts.uri.path().to_string());
    let deadline = tokio::time::Instant::now() + s.config.first_byte_timeout;
    let mut tried = BTreeSet::new();
    let mut last_error = String::new();
    let mut deployment = String::new();
    for attempt in 0..=s.config.retries {
        let picked = s.table().pick(&model, &tried, Instant::now());
        let (id, endpoint) = match picked {
            Ok(p) => p,
            Err(NoReplica::UnknownModel) => {
                count(&s, "", "", StatusCode::NOT_FOUND);
                return error(
                    StatusCode::NOT_FOUND,
                    format!("The model `{model}` does not exist (GET /v1/models lists the models served)."),
                );
            }
            Err(NoReplica::NoneReady { deployment }) => {
                count(&s, &deployment, "", StatusCode::SERVICE_UNAVAILABLE);
                let why = if tried.is_empty() { String::new() } else { format!("; the last try failed: {last_error}") };
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no replica of deployment {deployment} can take a request now{why}"),
                );
            }
        };
        // From here until dropped, the request counts in flight for this replica.
        let mut picked = Picked::new(s.clone(), id.clone());
        deployment = id.deployment.clone();
        if attempt > 0 {
            s.metrics.retries.get_or_create(&labels(&id)).inc();
        }
        // A 5xx is passed on, not retried, when no other replica could take the request.
        let mut others = tried.clone();
        others.insert(id.clone());
        let last = attempt == s.config.retries || !s.table().has_other(&model, &others, Instant::now());
        match try_replica(&s, &endpoint, &parts.method, &path, &parts.headers, body.clone(), deadline, last).await {
            Ok((status, headers, first, rest)) => {
                let ttfb = started.elapsed();
                s.metrics.ttfb.get_or_create(&labels(&id)).observe(ttfb.as_secs_f64());
                let mut resp = Response::builder().status(status);
                if let Some(h) = resp.headers_mut() {
                    copy_headers(&headers, h, false);
                    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
                        h.insert("x-tessera-replica", v);
                    }
                }
                let tracked = Tracked { first, rest, done: Some(Done { picked, started, status, _slot: slot }) };
                return resp
                    .body(Body::new(tracked))
                    .unwrap_or_else(|_| error(StatusCode::BAD_GATEWAY, "bad response"));
            }
            Err((kind, e)) => {
                warn!(replica = %id, %endpoint, kind, error = %e, "request to a replica failed before the first byte; trying another");
                s.metrics
                    .errors
                    .get_or_create(&ErrorLabels {
                        deployment: id.deployment.clone(),
                        replica: id.replica.clone(),
                        kind: kind.into(),
                    })
                    .inc();
                // A replica that answered 5xx works (the request may be at fault): not taken out.
                if kind != "upstream_5xx" {
                    picked.outcome = Outcome::Failed;
                }
                drop(picked);
                last_error = format!("{id}: {e}");
                tried.insert(id);
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    count(&s, &deployment, "", StatusCode::BAD_GATEWAY);
    error(
        StatusCode::BAD_GATEWAY,
        format!("{} replica(s) of {deployment} failed before answering; the last: {last_error}", tried.len()),
    )
}

fn labels(id: &ReplicaId) -> ReplicaLabels {
    ReplicaLabels { deployment: id.deployment.clone(), replica: id.replica.clone() }
}

fn count(s: &Shared, deployment: &str, replica: &str, code: StatusCode) {
    s.metrics
        .requests
        .get_or_create(&RequestLabels { deployment: deployment.into(), replica: replica.into(), code: code.as_u16() })
        .inc();
}

/// A request given to a replica by [`Table::pick`]: in flight (in the table and the gauge) until
/// dropped, however the request ends: answered, failed, or its client gone.
struct Picked {
    shared: Arc<Shared>,
    id: ReplicaId,
    outcome: Outcome,
}

impl Picked {
    fn new(shared: Arc<Shared>, id: ReplicaId) -> Picked {
        shared.metrics.in_flight.get_or_create(&labels(&id)).inc();
        Picked { shared, id, outcome: Outcome::Answered }
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.shared.metrics.in_flight.get_or_create(&labels(&self.id)).dec();
        self.shared.table().done(&self.id, self.outcome, Instant::now());
    }
}

type Head = (StatusCode, HeaderMap, Option<Frame<Bytes>>, Option<Incoming>);

/// One try: the response's status, headers and first body frame (so that a failure before it can
/// be retried), or why it failed. `last`: a 5xx is passed on rather than retried.
#[allow(clippy::too_many_arguments)]
async fn try_replica(
    s: &Shared,
    endpoint: &str,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    deadline: tokio::time::Instant,
    last: bool,
) -> Result<Head, (&'static str, String)> {
    let mut req = Request::builder().method(method.clone()).uri(format!("{endpoint}{path}"));
    if let Some(h) = req.headers_mut() {
        copy_headers(headers, h, s.config.api_key.is_some());
    }
    let req = req.body(Full::new(body)).map_err(|e| ("request", e.to_string()))?;
    let resp = match tokio::time::timeout_at(deadline, s.client.request(req)).await {
        Err(_) => return Err(("timeout", "no answer before the deadline".into())),
        Ok(Err(e)) => return Err(("connect", tessera_common::error_chain(&e))),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if status.is_server_error() && !last {
        return Err(("upstream_5xx", format!("answered {status}")));
    }
    let (parts, mut incoming) = resp.into_parts();
    let first = match tokio::time::timeout_at(deadline, incoming.frame()).await {
        Err(_) => return Err(("timeout", "no response body before the deadline".into())),
        Ok(Some(Err(e))) => return Err(("reset_before_first_byte", tessera_common::error_chain(&e))),
        Ok(Some(Ok(f))) => Some(f),
        Ok(None) => None,
    };
    let rest = if first.is_some() { Some(incoming) } else { None };
    Ok((parts.status, parts.headers, first, rest))
}

/// What is recorded once a response has ended.
struct Done {
    picked: Picked,
    started: Instant,
    status: StatusCode,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// A response body passed through: the first frame (already read), then the replica's. Counts the
/// request down when it ends, however it ends (also when the client goes away).
struct Tracked {
    first: Option<Frame<Bytes>>,
    rest: Option<Incoming>,
    done: Option<Done>,
}

impl Tracked {
    fn finish(&mut self, broke: Option<&hyper::Error>) {
        let Some(mut d) = self.done.take() else { return };
        let id = d.picked.id.clone();
        let shared = d.picked.shared.clone();
        shared.metrics.latency.get_or_create(&labels(&id)).observe(d.started.elapsed().as_secs_f64());
        count(&shared, &id.deployment, &id.replica, d.status);
        if let Some(e) = broke {
            info!(replica = %id, error = %e, "a replica failed while streaming a response; the client got part of it");
            shared
                .metrics
                .errors
                .get_or_create(&ErrorLabels {
                    deployment: id.deployment.clone(),
                    replica: id.replica.clone(),
                    kind: "reset_while_streaming".into(),
                })
                .inc();
            d.picked.outcome = Outcome::Failed;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish(None);
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        let Some(rest) = self.rest.as_mut() else {
            self.finish(None);
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Ready(None) => {
                self.rest = None;
                self.finish(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.rest = None;
                self.finish(Some(&e));
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }
}
