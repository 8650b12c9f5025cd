//! `tessera-gateway` in front of a real cluster: a head and two workers as processes, the probe
//! engine's OpenAI-compatible API behind it, the gateway as its own process with only the reader
//! token.

use std::time::Duration;

use serde_json::{Value, json};
use tessera_proto::v1 as pb;
use tessera_tests::deploy::{Cluster, delete_and_wait, probe, running_at, wait_for};
use tessera_tests::{Daemon, wait_until};
use tessera_worker::shard::http::call_auth;
use tessera_worker::shard::probe::api::{answer, chat_stream_text};

/// A gateway in front of `c`'s head (see [`tessera_tests::process::start_gateway`]).
fn start_gateway(c: &Cluster, name: &str, extra: &[&str]) -> (Daemon, String) {
    tessera_tests::process::start_gateway(c.dir.path(), name, &c.head, extra)
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
    assert_eq!(chat_stream_text(&body), Some((answer("hi", 5), true)), "passed through to [DONE]: {body}");

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

/// Successful (200, whole answer) and failed requests of one client loop; with `streams`, every
/// other request is streamed (and must end with `[DONE]`).
async fn load(addr: String, streams: bool, stop: tokio_util::sync::CancellationToken) -> (u32, Vec<String>) {
    let (mut ok, mut failed) = (0, Vec::new());
    let mut i = 0u32;
    while !stop.is_cancelled() {
        i += 1;
        let stream = streams && i.is_multiple_of(2);
        let body = json!({"model": "r", "prompt": format!("p{i}"), "max_tokens": 8, "stream": stream});
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let p = port.parse().expect("port");
        let r =
            call_auth(host, p, "POST", "/v1/completions", Some(body.to_string()), None, Duration::from_secs(30)).await;
        match r {
            Ok((200, b)) if stream && b.ends_with("data: [DONE]\n\n") => ok += 1,
            Ok((200, b)) if !stream && text_of(&b) == answer(&format!("p{i}"), 8) => ok += 1,
            Ok((code, b)) => failed.push(format!("{code}: {b}")),
            Err(e) => failed.push(e),
        }
    }
    (ok, failed)
}

/// Runs `clients` loops of [`load`] while `during` runs; all their results.
async fn under_load<F: std::future::Future>(
    addr: &str,
    clients: usize,
    streams: bool,
    during: F,
) -> (u32, Vec<String>) {
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks: Vec<_> = (0..clients).map(|_| tokio::spawn(load(addr.to_string(), streams, stop.clone()))).collect();
    during.await;
    stop.cancel();
    let (mut ok, mut failed) = (0, Vec::new());
    for t in tasks {
        let (o, f) = t.await.expect("client");
        ok += o;
        failed.extend(f);
    }
    (ok, failed)
}

fn counter(metrics: &str, prefix: &str) -> u64 {
    metrics.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_load_and_a_killed_replica_costs_no_request() {
    let c = Cluster::start(&[]).await;
    let dc = c.client().await;
    let mut req = probe("r", 1, 1);
    req.replicas = 2;
    req.engine_args = ["--token-delay-ms", "5"].iter().map(|s| s.to_string()).collect();
    dc.clone().create(req).await.expect("create");
    let all_running = |n: usize, generation1: u64| {
        move |d: &pb::Deployment| {
            d.replicas.len() == n
                && d.replicas.iter().all(|r| r.state == pb::DeploymentState::Running as i32)
                && d.replicas.get(1).is_none_or(|r| r.generation == generation1)
        }
    };
    let d = wait_for(&dc, "r", "two replicas running", all_running(2, 1)).await;
    assert_ne!(d.replicas[0].endpoint, d.replicas[1].endpoint, "each replica its own API");
    let (_gw, addr) = start_gateway(&c, "gateway-replicas", &[]);
    wait_until("the gateway routes to both replicas", || {
        let addr = addr.clone();
        async move {
            for i in 0..4 {
                let b = json!({"model": "r", "prompt": format!("w{i}"), "max_tokens": 1});
                http(&addr, "POST", "/v1/completions", Some(b), None).await;
            }
            let (_, m) = http(&addr, "GET", "/metrics", None, None).await;
            (counter(&m, r#"tessera_gateway_requests_total{deployment="r",replica="0",code="200"}"#) > 0
                && counter(&m, r#"tessera_gateway_requests_total{deployment="r",replica="1",code="200"}"#) > 0)
                .then_some(())
        }
    })
    .await;

    // Four clients keep sending; replica 1's engine is killed while they do.
    let victim = d.replicas[1].ranks[0].pid as i32;
    let (ok, failed) = under_load(&addr, 4, false, async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), nix::sys::signal::Signal::SIGKILL).expect("kill");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    })
    .await;
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), failed.len() as u32 + ok);
    assert!(ok > 20, "the load ran: {ok} requests");
    // Requests were in flight on replica 1 when it died: they went to replica 0 instead.
    let (_, m) = http(&addr, "GET", "/metrics", None, None).await;
    assert!(counter(&m, r#"tessera_gateway_request_errors_total{deployment="r",replica="1""#) > 0, "{m}");
    assert!(counter(&m, r#"tessera_gateway_retries_total{deployment="r",replica="0"}"#) > 0, "{m}");

    // Only replica 1 restarted; it serves again at generation 2; replica 0 was not touched.
    let d = wait_for(&dc, "r", "replica 1 running again at generation 2", all_running(2, 2)).await;
    assert_eq!((d.replicas[0].generation, d.replicas[0].restarts), (1, 0), "replica 0 untouched");

    // Scale down to 1 (the highest goes, after draining) and up to 3 (new ones start like the
    // first), under streamed and plain requests: not one fails, streams included.
    let mut seen_draining = false;
    let (ok, failed) = under_load(&addr, 4, true, async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let d = dc.clone().scale(pb::ScaleDeploymentRequest { name: "r".into(), replicas: 1 }).await.expect("scale");
        let d = d.into_inner();
        assert_eq!(d.replicas.len(), 2, "replica 1 drains: {:?}", d.replicas);
        seen_draining = d.replicas[1].state == pb::DeploymentState::Draining as i32;
        wait_for(&dc, "r", "one replica", |d| d.replicas.len() == 1).await;
        dc.clone().scale(pb::ScaleDeploymentRequest { name: "r".into(), replicas: 3 }).await.expect("scale up");
        wait_for(&dc, "r", "three replicas running", |d| {
            d.replicas.len() == 3 && d.replicas.iter().all(|r| r.state == pb::DeploymentState::Running as i32)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(800)).await;
    })
    .await;
    assert!(seen_draining, "a replica removed by a scale-down drains first");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed while scaling: {failed:?}",
        failed.len(),
        failed.len() as u32 + ok
    );
    assert!(ok > 20, "the load ran: {ok} requests");
    let d = dc.clone().get(pb::GetDeploymentRequest { name: "r".into() }).await.expect("get").into_inner();
    assert_eq!(d.replicas.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 1, 2]);
    let e = dc.clone().scale(pb::ScaleDeploymentRequest { name: "r".into(), replicas: 0 }).await.expect_err("0");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("delete the deployment"), "{}", e.message());
    delete_and_wait(&dc, "r").await;
    wait_until("every replica's processes gone", || async { c.shard_pids().is_empty().then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_and_its_rollback_fail_no_request_and_a_bad_revision_stops_the_roll() {
    let c = Cluster::start(&[]).await;
    let dc = c.client().await;
    let args = |delay: &str| ["--token-delay-ms", delay].iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut req = probe("r", 1, 1);
    req.replicas = 2;
    req.engine_args = args("5");
    dc.clone().create(req.clone()).await.expect("create");
    let two_running = |revision: u32| {
        move |d: &pb::Deployment| {
            let live: Vec<_> = d.replicas.iter().filter(|r| r.state == pb::DeploymentState::Running as i32).collect();
            live.len() == 2 && live.iter().all(|r| r.revision == revision)
        }
    };
    wait_for(&dc, "r", "two replicas running", two_running(1)).await;
    let (_gw, addr) = start_gateway(&c, "gateway-roll", &[]);
    wait_until("the gateway serves r", || {
        let addr = addr.clone();
        async move {
            let (code, _) = http(
                &addr,
                "POST",
                "/v1/completions",
                Some(json!({"model": "r", "prompt": "x", "max_tokens": 1})),
                None,
            )
            .await;
            (code == 200).then_some(())
        }
    })
    .await;
    let update = |spec: pb::CreateDeploymentRequest| pb::UpdateDeploymentRequest {
        spec: Some(spec),
        max_surge: 0,
        max_unavailable: 0,
    };

    // Update (a new replica first, then an old one drains), under streamed and plain requests.
    let mut new = req.clone();
    new.engine_args = args("3");
    let (ok, failed) = under_load(&addr, 4, true, async {
        let d = dc.clone().update(update(new.clone())).await.expect("update").into_inner();
        assert_eq!(d.revision, 2);
    })
    .await;
    assert!(failed.is_empty(), "{} of {} failed during the update: {failed:?}", failed.len(), failed.len() as u32 + ok);
    assert!(ok > 20, "the load ran: {ok}");
    let d = wait_for(&dc, "r", "two replicas of revision 2", two_running(2)).await;
    assert_eq!(d.engine_args, args("3"), "the new spec runs");
    // The same spec again changes nothing.
    let d = dc.clone().update(update(new.clone())).await.expect("same spec").into_inner();
    assert_eq!(d.revision, 2);

    // Rollback: the spec of revision 1, as revision 3, with max_unavailable 1 this time.
    let (ok, failed) = under_load(&addr, 4, true, async {
        let r = pb::RollbackDeploymentRequest { name: "r".into(), max_surge: 0, max_unavailable: 1 };
        let d = dc.clone().rollback(r).await.expect("rollback").into_inner();
        assert_eq!(d.revision, 3);
    })
    .await;
    assert!(
        failed.is_empty(),
        "{} of {} failed during the rollback: {failed:?}",
        failed.len(),
        failed.len() as u32 + ok
    );
    let d = wait_for(&dc, "r", "two replicas of revision 3", two_running(3)).await;
    assert_eq!(d.engine_args, args("5"), "revision 1's spec runs again");

    // A revision that does not start stops the roll; the old replicas keep serving.
    let mut bad = req.clone();
    bad.engine_args = ["--exit-code".to_string(), "3".to_string()].into();
    let e = dc.clone().update(update(bad)).await.expect_err("a revision that cannot start");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("revision 4 of r did not start") && e.message().contains("keep serving"),
        "{}",
        e.message()
    );
    let d = wait_for(&dc, "r", "the failed replica removed", |d| d.replicas.len() == 2).await;
    assert!(two_running(3)(&d), "{:?}", d.replicas);
    let (code, _) =
        http(&addr, "POST", "/v1/completions", Some(json!({"model": "r", "prompt": "y", "max_tokens": 2})), None).await;
    assert_eq!(code, 200);
}
