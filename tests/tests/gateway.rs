//! `tessera-gateway` in front of a real cluster: a head and two workers as processes, the probe
//! engine's OpenAI-compatible API behind it, the gateway as its own process with only the reader
//! token.

use std::time::Duration;

use serde_json::{Value, json};
use tessera_proto::v1 as pb;
use tessera_tests::deploy::{Cluster, delete_and_wait, probe, running_at, wait_for};
use tessera_tests::{Daemon, bin, wait_until};
use tessera_worker::shard::http::call_auth;
use tessera_worker::shard::probe::api::answer;

/// A gateway on an ephemeral loopback port; its address once it says it listens.
fn start_gateway(c: &Cluster, name: &str, extra: &[&str]) -> (Daemon, String) {
    let reader = c.head.data_dir.join("reader.token");
    let mut args: Vec<String> = [
        "--head",
        c.head.url.trim_start_matches("http://"),
        "--token-file",
        &reader.display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--refresh",
        "200ms",
        "--health-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut d = Daemon::spawn_program(name, &bin("tessera-gateway").display().to_string(), &args, c.dir.path());
    let deadline = std::time::Instant::now() + tessera_tests::HANG;
    loop {
        let log = d.log_text();
        if let Some(addr) = log.lines().find_map(|l| l.strip_prefix("listening on ")) {
            return (d, addr.trim().to_string());
        }
        if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("gateway exited ({status}):\n{log}");
        }
        assert!(std::time::Instant::now() < deadline, "gateway did not start:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn http(addr: &str, method: &str, path: &str, body: Option<Value>, key: Option<&str>) -> (u16, String) {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    call_auth(
        host,
        port.parse().expect("port"),
        method,
        path,
        body.map(|b| b.to_string()),
        key,
        Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn text_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("no text in {body}")).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_routes_by_model_streams_and_reads_with_the_reader_token_only() {
    let c = Cluster::start(&[]).await;
    let dc = c.client().await;
    let mut req = probe("m", 1, 1);
    req.engine_args = ["--served-model-name", "alias", "--token-delay-ms", "2"].iter().map(|s| s.to_string()).collect();
    req.env = [("SECRET_TOKEN".to_string(), "hunter2".to_string())].into();
    dc.clone().create(req).await.expect("create");
    wait_for(&dc, "m", "running", running_at(1)).await;
    let (_gw, addr) = start_gateway(&c, "gateway", &[]);

    // The model is listed under both names once the gateway has seen it running and healthy.
    wait_until("the gateway lists the model", || {
        let addr = addr.clone();
        async move {
            let (code, body) = http(&addr, "GET", "/v1/models", None, None).await;
            (code == 200 && body.contains("\"id\":\"m\"") && body.contains("\"id\":\"alias\"")).then_some(())
        }
    })
    .await;

    // Plain and streamed answers pass through, the same as the replica's own.
    let (code, body) =
        http(&addr, "POST", "/v1/completions", Some(json!({"model": "m", "prompt": "hello", "max_tokens": 6})), None)
            .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(text_of(&body), answer("hello", 6));
    let (code, body) = http(
        &addr,
        "POST",
        "/v1/completions",
        Some(json!({"model": "alias", "prompt": "hello", "max_tokens": 6})),
        None,
    )
    .await;
    assert_eq!((code, text_of(&body)), (200, answer("hello", 6)), "the served name routes too");
    let (code, body) = http(
        &addr,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true})),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    assert_eq!(events.last().copied(), Some("data: [DONE]"), "{body}");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e.trim_start_matches("data: ")).expect("chunk");
            v["choices"][0]["delta"]["content"].as_str().expect("content").to_string()
        })
        .collect();
    assert_eq!(text, answer("hi", 5));

    // Mistakes get OpenAI-style errors that say what to do.
    let (code, body) =
        http(&addr, "POST", "/v1/completions", Some(json!({"model": "nope", "prompt": "x"})), None).await;
    assert_eq!(code, 404);
    assert!(body.contains("`nope` does not exist") && body.contains("/v1/models"), "{body}");
    let (code, body) = http(&addr, "POST", "/v1/completions", Some(json!({"prompt": "x"})), None).await;
    assert_eq!(code, 400);
    assert!(body.contains("no \\\"model\\\""), "{body}");

    // Counted per deployment and replica.
    let (_, metrics) = http(&addr, "GET", "/metrics", None, None).await;
    assert!(
        metrics.contains(r#"tessera_gateway_requests_total{deployment="m",replica="0",code="200"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains("tessera_gateway_time_to_first_byte_seconds_bucket"), "{metrics}");

    // The reader token reads deployments without their env, and can do nothing else.
    let reader = tessera_tests::conn_with(&c.head.url, Some(tessera_tests::READER_TOKEN)).await;
    let mut rc = pb::deployments_client::DeploymentsClient::new(reader.clone());
    let d = rc.get(pb::GetDeploymentRequest { name: "m".into() }).await.expect("reader may get").into_inner();
    assert!(d.env.is_empty(), "the env is not for readers: {:?}", d.env);
    let admin_view = dc.clone().get(pb::GetDeploymentRequest { name: "m".into() }).await.expect("get").into_inner();
    assert_eq!(admin_view.env.get("SECRET_TOKEN").map(String::as_str), Some("hunter2"));
    let e = rc.create(probe("x", 1, 1)).await.expect_err("a reader cannot deploy");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("needs the admin token"), "{}", e.message());
    let e = rc.delete(pb::DeleteDeploymentRequest { name: "m".into() }).await.expect_err("nor delete");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = pb::cluster_client::ClusterClient::new(reader).list_nodes(pb::ListNodesRequest::default()).await;
    assert_eq!(e.expect_err("nor list nodes").code(), tonic::Code::PermissionDenied);

    // A deleted deployment leaves the gateway.
    delete_and_wait(&dc, "m").await;
    wait_until("the model is gone from the gateway", || {
        let addr = addr.clone();
        async move {
            let (code, _) =
                http(&addr, "POST", "/v1/completions", Some(json!({"model": "m", "prompt": "x"})), None).await;
            (code == 404).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_required_when_the_gateway_has_one() {
    let c = Cluster::start(&[]).await;
    let key = c.dir.path().join("gateway.key");
    std::fs::write(&key, "sk_test_gateway_key_0123456789\n").expect("key");
    let (_gw, addr) = start_gateway(&c, "gateway-key", &["--api-key-file", &key.display().to_string()]);
    let (code, body) = http(&addr, "GET", "/v1/models", None, None).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let (code, _) = http(&addr, "GET", "/v1/models", None, Some("sk_wrong_key_0000000000000")).await;
    assert_eq!(code, 401);
    let (code, body) = http(&addr, "GET", "/v1/models", None, Some("sk_test_gateway_key_0123456789")).await;
    assert_eq!(code, 200, "{body}");
}
