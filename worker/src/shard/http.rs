//! The few HTTP calls a worker makes to its engines (health, metrics, the canary), over hyper's
//! HTTP/1.1 client: one connection per call, a deadline for the whole call, a bounded body.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Most bytes of an answer read (vLLM's /metrics is ~100 KiB).
pub const MAX_BODY: usize = 4 << 20;

/// `host:port` for a URL authority (IPv6 in brackets); an empty host is loopback.
pub fn authority(host: &str, port: u16) -> String {
    match host {
        "" => format!("127.0.0.1:{port}"),
        h if h.contains(':') => format!("[{h}]:{port}"),
        h => format!("{h}:{port}"),
    }
}

/// One request; `Ok((status, body))`, or what went wrong in words.
pub async fn call(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    json: Option<String>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    call_auth(host, port, method, path, json, None, timeout).await
}

/// [`call`] with a bearer token.
// One plain input each; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn call_auth(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    json: Option<String>,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let auth = authority(host, port);
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(&auth).await.map_err(|e| format!("cannot connect to {auth}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("{auth}: {e}"))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", &auth);
        if json.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        let req = req.body(Full::new(Bytes::from(json.unwrap_or_default()))).map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| format!("{method} {path}: {e}"));
        let out = match resp {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = Limited::new(resp.into_body(), MAX_BODY)
                    .collect()
                    .await
                    .map_err(|e| format!("{method} {path}: reading the answer: {e}"))?
                    .to_bytes();
                Ok((status, String::from_utf8_lossy(&body).into_owned()))
            }
            Err(e) => Err(e),
        };
        driver.abort();
        out
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err(format!("{method} http://{auth}{path}: no answer within {}", fmt(timeout))))
}

fn fmt(d: Duration) -> String {
    tessera_common::duration::format_duration(d)
}

/// `GET /health` answers 200.
pub async fn health(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    match call(host, port, "GET", "/health", None, timeout).await? {
        (200, _) => Ok(()),
        (code, body) => Err(format!("GET /health answered {code}: {}", first_line(&body))),
    }
}

/// The first line of a body, at most 200 characters, for messages.
pub fn first_line(body: &str) -> String {
    body.lines().next().unwrap_or("").chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_answer_with_status_and_body_and_fail_in_words() {
        let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" })).route(
            "/v1/completions",
            axum::routing::post(|body: String| async move { (axum::http::StatusCode::IM_A_TEAPOT, body) }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(l, app).await });
        let t = Duration::from_secs(5);
        assert_eq!(health("", port, t).await, Ok(()));
        assert_eq!(
            call("127.0.0.1", port, "POST", "/v1/completions", Some("{\"a\":1}".into()), t).await,
            Ok((418, "{\"a\":1}".into()))
        );
        assert!(health("", port, t).await.is_ok());
        let e = call("", 1, "GET", "/health", None, t).await.expect_err("nothing listens on port 1");
        assert!(e.contains("cannot connect to 127.0.0.1:1"), "{e}");
        // A server that accepts and never answers: the deadline says so.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = silent.local_addr().expect("addr").port();
        let e = call("", p, "GET", "/health", None, Duration::from_millis(200)).await.expect_err("no answer");
        assert!(e.contains("no answer within"), "{e}");
    }
}
