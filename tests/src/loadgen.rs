//! A small HTTP load generator for the gateway benchmark: open-loop (a fixed request rate, as
//! users arrive) and closed-loop (N clients back to back), over hyper's pooled keep-alive client,
//! with streaming responses read to the end and their failures told apart by whether the answer
//! had started.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(hyper_util::rt::TokioExecutor::new()).pool_max_idle_per_host(1024).build(c)
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 200 and the whole body; its latency.
    Ok(Duration),
    /// Failed before any of the answer came back (an error, or a non-200 status).
    FailedBeforeStart(String),
    /// The answer had started (200, some body) and then broke.
    BrokeWhileStreaming(String),
}

/// One completion request to `base` (`http://host:port`) for `model`.
pub async fn complete(c: &HttpClient, base: &str, model: &str, prompt: &str, max_tokens: u32, stream: bool) -> Outcome {
    let body =
        serde_json::json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}).to_string();
    let req = match hyper::Request::post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
    {
        Ok(r) => r,
        Err(e) => return Outcome::FailedBeforeStart(e.to_string()),
    };
    let t0 = Instant::now();
    let resp = match tokio::time::timeout(Duration::from_secs(60), c.request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Outcome::FailedBeforeStart(tessera_common::error_chain(&e)),
        Err(_) => return Outcome::FailedBeforeStart("no answer in 60 s".into()),
    };
    if resp.status() != 200 {
        let status = resp.status();
        let b = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Outcome::FailedBeforeStart(format!("{status}: {}", String::from_utf8_lossy(&b)));
    }
    let mut body = resp.into_body();
    let mut got = 0usize;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(f)) => got += f.data_ref().map_or(0, |d| d.len()),
            Some(Err(e)) if got == 0 => return Outcome::FailedBeforeStart(e.to_string()),
            Some(Err(e)) => return Outcome::BrokeWhileStreaming(e.to_string()),
        }
    }
    Outcome::Ok(t0.elapsed())
}

/// Percentile `p` (0-100) of sorted `v`, in ms.
pub fn percentile(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)].as_secs_f64() * 1000.0
}

/// Requests at `rate` per second for `secs` seconds, each on its own task (open loop).
pub async fn open_loop(c: &HttpClient, base: &str, model: &str, rate: u32, secs: u64) -> Vec<Outcome> {
    let every = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let n = rate as u64 * secs;
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        tick.tick().await;
        let (c, base, model) = (c.clone(), base.to_string(), model.to_string());
        tasks.push(tokio::spawn(async move { complete(&c, &base, &model, &format!("q{i}"), 1, false).await }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Outcome::FailedBeforeStart(e.to_string())));
    }
    out
}
