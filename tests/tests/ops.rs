//! Metrics, health and readiness endpoints of the real daemons.

use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_tests::model::http_get as get;
use tessera_tests::process::{start_head, start_worker};
use tessera_tests::{cluster_client, wait_state, wait_until};

fn addr_file(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).expect("metrics.addr written").trim().to_string()
}

#[tokio::test]
async fn head_and_worker_serve_metrics_health_and_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let w = start_worker(dir.path(), "w1", &head.url);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    let head_ops = addr_file(&head.data_dir.join("metrics.addr"));
    let worker_ops = addr_file(&dir.path().join("w1-state/metrics.addr"));

    assert_eq!(get(&head_ops, "/healthz").0, 200);
    assert_eq!(get(&head_ops, "/readyz").0, 200);
    assert_eq!(get(&worker_ops, "/healthz").0, 200);
    // Ready once joined (it is).
    wait_until("worker ready", || {
        let ok = get(&worker_ops, "/readyz").0 == 200;
        async move { ok.then_some(()) }
    })
    .await;

    let (code, text) = get(&head_ops, "/metrics");
    assert_eq!(code, 200);
    for line in [
        "tessera_head_membership_nodes{state=\"alive\"} 2",
        "tessera_head_gpus 8",
        "tessera_head_gpus_fake 8",
        "tessera_head_gpus_reserved 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(text.contains("# HELP tessera_head_rpc_requests RPCs by method and gRPC status code"), "{text}");
    assert!(text.contains("method=\"/tessera.v1.Cluster/ListNodes\",code=\"Ok\""), "{text}");
    assert!(text.contains("tessera_head_membership_joins_total"), "{text}");
    assert!(text.contains("tessera_worker_gpu_memory_total_bytes{uuid=\"GPU-fake-"), "the head's own GPUs: {text}");
    assert_eq!(text.matches("# EOF").count(), 1, "one exposition");
    // Build and process metrics, once (the head's own worker does not repeat them).
    let version = format!("tessera_head_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    assert!(text.contains(&version), "{text}");
    assert!(!text.contains("tessera_worker_build_info"), "{text}");
    let value = |t: &str, name: &str| -> f64 {
        t.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    };
    assert!(value(&text, "tessera_head_process_resident_memory_bytes ") > 1e6, "{text}");
    assert!(value(&text, "tessera_head_process_open_fds ") >= 3.0, "{text}");
    assert!(value(&text, "tessera_head_process_start_time_seconds ") > 1.7e9, "{text}");
    assert!(text.contains("tessera_head_process_cpu_seconds_total"), "{text}");

    // A refused call is counted.
    let mut anon = pb::cluster_client::ClusterClient::new(tessera_tests::conn_with(&head.url, None).await);
    assert!(anon.list_nodes(pb::ListNodesRequest::default()).await.is_err());
    let (_, text) = get(&head_ops, "/metrics");
    assert!(text.contains("tessera_head_auth_refusals_total 1"), "{text}");

    let (code, text) = get(&worker_ops, "/metrics");
    assert_eq!(code, 200);
    assert!(text.contains("tessera_worker_joined 1"), "{text}");
    assert!(text.contains("tessera_worker_build_info{version="), "{text}");
    assert!(text.contains("tessera_worker_process_resident_memory_bytes"), "{text}");
    assert!(text.contains("tessera_worker_gpu_memory_total_bytes{uuid=\"GPU-fake-"), "{text}");
    assert!(text.contains("index=\"3\""), "every GPU is labelled: {text}");
    wait_until("a heartbeat round trip was measured", || {
        let (_, t) = get(&worker_ops, "/metrics");
        let measured =
            t.lines().any(|l| l.starts_with("tessera_worker_heartbeat_rtt_seconds_count") && !l.ends_with(" 0"));
        async move { measured.then_some(()) }
    })
    .await;

    // A dead worker is seen in the head's counters.
    drop(w);
    wait_state(&mut c, "w1", pb::NodeState::Dead).await;
    let (_, text) = get(&head_ops, "/metrics");
    assert!(text.contains("tessera_head_membership_failure_detections_total{state=\"dead\"} 1"), "{text}");
    assert!(text.contains("tessera_head_membership_nodes{state=\"dead\"} 1"), "{text}");
}

#[tokio::test]
async fn grpc_health_and_reflection_answer_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let anon = tessera_tests::conn_with(&head.url, None).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(anon.clone());
    for service in ["", "tessera.v1.Deployments"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await
            .expect("health check needs no token")
            .into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(anon);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.expect("reflection").into_inner();
    let resp = stream.message().await.expect("answer").expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected {resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "tessera.v1.Cluster",
        "tessera.v1.Deployments",
        "tessera.v1.Planner",
        "tessera.v1.Membership",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
    // v1alpha too (older grpcurl, Python's grpcio-reflection).
    use tonic_reflection::pb::v1alpha as alpha;
    let anon = tessera_tests::conn_with(&head.url, None).await;
    let mut refl = alpha::server_reflection_client::ServerReflectionClient::new(anon);
    let req = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.expect("v1alpha").into_inner();
    let resp = stream.message().await.expect("answer").expect("one message");
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("unexpected {resp:?}")
    };
    assert!(list.service.iter().any(|s| s.name == "tessera.v1.Deployments"), "{list:?}");
}

/// Reads datagrams from a notify socket until `want` has been seen in one of them.
fn wait_message(sock: &std::os::unix::net::UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let deadline = std::time::Instant::now() + tessera_tests::HANG;
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|m| m.contains(want)) {
        assert!(std::time::Instant::now() < deadline, "no {want:?} among {seen:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
}

#[test]
fn systemd_notify_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let data = dir.path().join("head");
    tessera_tests::write_tokens(&data);
    let env = vec![("NOTIFY_SOCKET", sock_path.display().to_string()), ("WATCHDOG_USEC", "400000".to_string())];
    let mut head = tessera_tests::Daemon::spawn_env(
        "head",
        "tessera-head",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.display().to_string(),
            "--fake-gpus",
            "1x80GiB",
            "--node-name",
            "head",
        ]
        .map(String::from),
        &env,
        dir.path(),
    );
    let mut seen = Vec::new();
    wait_message(&sock, "READY=1", &mut seen);
    assert!(seen.iter().any(|m| m.contains("STATUS=serving on 127.0.0.1:")), "{seen:?}");
    wait_message(&sock, "WATCHDOG=1", &mut seen);
    wait_message(&sock, "nodes alive", &mut seen);
    head.signal(nix::sys::signal::Signal::SIGTERM);
    wait_message(&sock, "STOPPING=1", &mut seen);
    assert!(head.wait().success());
    // READY comes once, before anything else is announced.
    assert_eq!(seen.iter().filter(|m| m.contains("READY=1")).count(), 1);
}

#[test]
fn a_workers_ready_comes_once_it_has_joined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &[]);
    let sock_path = dir.path().join("w.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let token = dir.path().join("join.token");
    std::fs::write(&token, format!("{}\n", tessera_tests::JOIN_TOKEN)).expect("token");
    let mut w = tessera_tests::Daemon::spawn_env(
        "w1",
        "tessera-worker",
        &[
            "--head",
            &head.url,
            "--node-name",
            "w1",
            "--state-dir",
            &dir.path().join("w1").display().to_string(),
            "--fake-gpus",
            "1x80GiB",
            "--token-file",
            &token.display().to_string(),
        ]
        .map(String::from),
        &[("NOTIFY_SOCKET", sock_path.display().to_string())],
        dir.path(),
    );
    let mut seen = Vec::new();
    wait_message(&sock, "READY=1", &mut seen);
    let ready = seen.iter().find(|m| m.contains("READY=1")).expect("ready");
    assert!(ready.contains("STATUS=joined as node "), "{ready}");
    w.signal(nix::sys::signal::Signal::SIGTERM);
    wait_message(&sock, "STOPPING=1", &mut seen);
    assert!(w.wait().success());
}
