//! The probe's small OpenAI-compatible API, for testing what sits in front of an engine (the
//! gateway, failover, rolling updates) without a model: `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions` (both streamed as server-sent events on `"stream": true`) and
//! `/v1/embeddings`, plus `/health`. Answers are deterministic: the same prompt gives the same text
//! on every replica, one "token" per `--token-delay-ms`. Every answer carries `x-probe-pid` (which
//! process answered) and `x-probe-generation`, so tests can see where a request went.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// Tokens a request may ask for at most.
pub const MAX_TOKENS: u64 = 4096;
/// Bytes a request body may have at most.
const MAX_BODY: usize = 1 << 20;

/// What the API serves.
#[derive(Clone)]
pub struct ApiConfig {
    /// The served model name(s): requests for another model get 404, as from vLLM.
    pub models: Vec<String>,
    /// Delay before each generated token.
    pub token_delay: Duration,
    /// `/health`'s body (the probe's world and round-trip times).
    pub health: Arc<dyn Fn() -> String + Send + Sync>,
    /// Generating requests being answered now (`/load`, as vLLM's `server_load`).
    pub in_flight: Arc<AtomicU64>,
}

/// One generating request being answered: counted in `/load` until dropped (for a stream, when
/// its last chunk went out or the client left).
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn new(n: &Arc<AtomicU64>) -> InFlight {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The router for `cfg`.
pub fn router(cfg: ApiConfig) -> Router {
    let cfg = Arc::new(cfg);
    Router::new()
        .route("/health", get(health))
        .route("/load", get(load))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(tag))
        .with_state(cfg)
}

/// Serves `cfg` on `listener` until the process ends.
pub fn serve(listener: std::net::TcpListener, cfg: ApiConfig) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        axum::serve(listener, router(cfg)).await
    })
}

async fn tag(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert("x-probe-pid", HeaderValue::from(std::process::id()));
    if let Ok(g) = std::env::var("TESSERA_GENERATION")
        && let Ok(v) = HeaderValue::from_str(&g)
    {
        h.insert("x-probe-generation", v);
    }
    r
}

async fn health(State(cfg): State<Arc<ApiConfig>>) -> Response {
    json_response(StatusCode::OK, (cfg.health)())
}

async fn load(State(cfg): State<Arc<ApiConfig>>) -> Response {
    json_response(StatusCode::OK, json!({"server_load": cfg.in_flight.load(Ordering::SeqCst)}).to_string())
}

async fn models(State(cfg): State<Arc<ApiConfig>>) -> Response {
    let data: Vec<Value> = cfg
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "tessera-probe"}))
        .collect();
    json_response(StatusCode::OK, json!({"object": "list", "data": data}).to_string())
}

/// An OpenAI-style error (what vLLM answers too).
fn error(status: StatusCode, message: String) -> Response {
    let kind = match status {
        StatusCode::NOT_FOUND => "NotFoundError",
        _ => "BadRequestError",
    };
    json_response(status, json!({"error": {"message": message, "type": kind, "code": status.as_u16()}}).to_string())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// What every generating request has: the model, a prompt, how many tokens, streamed or not.
struct Ask {
    model: String,
    prompt: String,
    max_tokens: u64,
    stream: bool,
}

/// Why a request is refused: the status and the message.
type Refusal = (StatusCode, String);

fn parse(cfg: &ApiConfig, body: &Bytes, prompt_of: impl Fn(&Value) -> Option<String>) -> Result<(Ask, Value), Refusal> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")))?;
    let model = v.get("model").and_then(Value::as_str).unwrap_or_default().to_string();
    if !cfg.models.contains(&model) {
        return Err((StatusCode::NOT_FOUND, format!("The model `{model}` does not exist.")));
    }
    let prompt =
        prompt_of(&v).ok_or_else(|| (StatusCode::BAD_REQUEST, "no prompt (or messages) in the request".to_string()))?;
    let max_tokens =
        v.get("max_tokens").or_else(|| v.get("max_completion_tokens")).and_then(Value::as_u64).unwrap_or(16);
    if max_tokens == 0 || max_tokens > MAX_TOKENS {
        return Err((StatusCode::BAD_REQUEST, format!("max_tokens {max_tokens}: give 1 to {MAX_TOKENS}")));
    }
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok((Ask { model, prompt, max_tokens, stream }, v))
}

const WORDS: [&str; 16] = [
    " alpha", " beta", " gamma", " delta", " eps", " zeta", " eta", " theta", " iota", " kappa", " lambda", " mu",
    " nu", " xi", " omicron", " pi",
];

/// Token `i` of the answer to `prompt`: the same everywhere (FNV-1a of the prompt, then mixed).
pub fn token(prompt: &str, i: u64) -> &'static str {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prompt.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finaliser, so that every bit of the prompt's hash moves the pick.
    let mut x = h.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    WORDS[(x % WORDS.len() as u64) as usize]
}

/// What a streamed chat answer (server-sent events, as vLLM and the probe send them) says: the
/// text of its chunks in order, and whether it ended with `[DONE]`. `None` when a chunk is not a
/// chat chunk.
pub fn chat_stream_text(body: &str) -> Option<(String, bool)> {
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    let done = events.last().is_some_and(|e| e.trim() == "data: [DONE]");
    let chunks = if done { &events[..events.len() - 1] } else { &events[..] };
    let mut text = String::new();
    for e in chunks {
        let v: Value = serde_json::from_str(e.trim().strip_prefix("data: ")?).ok()?;
        text.push_str(v["choices"][0]["delta"]["content"].as_str()?);
    }
    Some((text, done))
}

/// The whole answer to `prompt`, `n` tokens.
pub fn answer(prompt: &str, n: u64) -> String {
    (0..n).map(|i| token(prompt, i)).collect()
}

async fn completions(State(cfg): State<Arc<ApiConfig>>, body: Bytes) -> Response {
    let (ask, _) = match parse(&cfg, &body, |v| match v.get("prompt") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => a.first().and_then(Value::as_str).map(str::to_string),
        _ => None,
    }) {
        Ok(a) => a,
        Err((status, message)) => return error(status, message),
    };
    generate(cfg, ask, false).await
}

async fn chat(State(cfg): State<Arc<ApiConfig>>, body: Bytes) -> Response {
    let (ask, _) = match parse(&cfg, &body, |v| {
        let msgs = v.get("messages")?.as_array()?;
        let last = msgs.last()?;
        last.get("content").and_then(Value::as_str).map(str::to_string)
    }) {
        Ok(a) => a,
        Err((status, message)) => return error(status, message),
    };
    generate(cfg, ask, true).await
}

fn chunk(ask: &Ask, chat: bool, i: u64, text: &str, last: bool) -> Value {
    let finish = if last { json!("length") } else { Value::Null };
    if chat {
        json!({"id": "chatcmpl-probe", "object": "chat.completion.chunk", "created": 0, "model": ask.model,
               "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}], "token_index": i})
    } else {
        json!({"id": "cmpl-probe", "object": "text_completion", "created": 0, "model": ask.model,
               "choices": [{"index": 0, "text": text, "finish_reason": finish}], "token_index": i})
    }
}

async fn generate(cfg: Arc<ApiConfig>, ask: Ask, chat: bool) -> Response {
    let delay = cfg.token_delay;
    let counted = InFlight::new(&cfg.in_flight);
    if ask.stream {
        let ask = Arc::new(ask);
        let events = futures_util::stream::unfold(0u64, move |i| {
            // The stream holds the count until it ends or is dropped.
            let _counted = &counted;
            let ask = ask.clone();
            async move {
                if i > ask.max_tokens {
                    return None;
                }
                if i == ask.max_tokens {
                    return Some((Ok::<_, Infallible>(Bytes::from_static(b"data: [DONE]\n\n")), i + 1));
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let c = chunk(&ask, chat, i, token(&ask.prompt, i), i + 1 == ask.max_tokens);
                Some((Ok(Bytes::from(format!("data: {c}\n\n"))), i + 1))
            }
        });
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(events))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay * ask.max_tokens as u32).await;
    }
    drop(counted);
    let text = answer(&ask.prompt, ask.max_tokens);
    let usage = json!({"prompt_tokens": ask.prompt.split_whitespace().count(), "completion_tokens": ask.max_tokens});
    let body = if chat {
        json!({"id": "chatcmpl-probe", "object": "chat.completion", "created": 0, "model": ask.model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
               "usage": usage})
    } else {
        json!({"id": "cmpl-probe", "object": "text_completion", "created": 0, "model": ask.model,
               "choices": [{"index": 0, "text": text, "finish_reason": "length"}], "usage": usage})
    };
    json_response(StatusCode::OK, body.to_string())
}

async fn embeddings(State(cfg): State<Arc<ApiConfig>>, body: Bytes) -> Response {
    let inputs = |v: &Value| -> Option<Vec<String>> {
        match v.get("input")? {
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
            _ => None,
        }
    };
    let (ask, v) = match parse(&cfg, &body, |v| inputs(v).map(|i| i.join("\n"))) {
        Ok(a) => a,
        Err((status, message)) => return error(status, message),
    };
    let data: Vec<Value> = inputs(&v)
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let e: Vec<f64> = (0..8).map(|k| (token(s, k).len() as f64) / 8.0).collect();
            json!({"object": "embedding", "index": i, "embedding": e})
        })
        .collect();
    json_response(StatusCode::OK, json!({"object": "list", "model": ask.model, "data": data}).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn cfg() -> ApiConfig {
        ApiConfig {
            models: vec!["m".into()],
            token_delay: Duration::ZERO,
            health: Arc::new(|| "{}".into()),
            in_flight: Arc::new(AtomicU64::new(0)),
        }
    }

    async fn call(method: &str, path: &str, body: Value) -> (StatusCode, String) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        let r = router(cfg()).oneshot(req).await.expect("infallible");
        let status = r.status();
        assert!(r.headers().contains_key("x-probe-pid"));
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.expect("body");
        (status, String::from_utf8_lossy(&b).into_owned())
    }

    #[tokio::test]
    async fn answers_are_deterministic_and_streams_carry_the_same_text() {
        let (s, b) = call("POST", "/v1/completions", json!({"model": "m", "prompt": "hi", "max_tokens": 5})).await;
        assert_eq!(s, StatusCode::OK);
        let v: Value = serde_json::from_str(&b).expect("json");
        assert_eq!(v["choices"][0]["text"], answer("hi", 5));
        assert_ne!(answer("hi", 5), answer("ho", 5), "the prompt matters");
        let (s, b) = call(
            "POST",
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true}),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(b.matches("data: ").count(), 6, "5 tokens and [DONE]: {b}");
        assert_eq!(chat_stream_text(&b), Some((answer("hi", 5), true)), "{b}");
    }

    #[tokio::test]
    async fn another_model_is_not_found_and_bad_requests_say_why() {
        let (s, b) = call("POST", "/v1/completions", json!({"model": "other", "prompt": "hi"})).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(b.contains("`other` does not exist"), "{b}");
        let (s, b) = call("POST", "/v1/completions", json!({"model": "m", "prompt": "hi", "max_tokens": 100000})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(b.contains("max_tokens 100000"), "{b}");
        let (s, b) = call("GET", "/v1/models", Value::Null).await;
        assert_eq!(s, StatusCode::OK);
        assert!(b.contains("\"id\":\"m\""), "{b}");
        let (s, b) = call("POST", "/v1/embeddings", json!({"model": "m", "input": ["a", "b"]})).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(serde_json::from_str::<Value>(&b).expect("json")["data"].as_array().map(Vec::len), Some(2));
    }
}
