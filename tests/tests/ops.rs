//! Metrics, health and readiness endpoints of the real daemons.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_tests::process::{start_head, start_worker};
use tessera_tests::{cluster_client, wait_state, wait_until};

/// GET over plain HTTP/1.1; returns (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

fn addr_file(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).expect("metrics.addr written").trim().to_string()
}

#[tokio::test]
async fn head_and_worker_serve_metrics_health_and_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
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

    // A refused call is counted.
    let mut anon = pb::cluster_client::ClusterClient::new(tessera_tests::conn_with(&head.url, None).await);
    assert!(anon.list_nodes(pb::ListNodesRequest {}).await.is_err());
    let (_, text) = get(&head_ops, "/metrics");
    assert!(text.contains("tessera_head_auth_refusals_total 1"), "{text}");

    let (code, text) = get(&worker_ops, "/metrics");
    assert_eq!(code, 200);
    assert!(text.contains("tessera_worker_joined 1"), "{text}");
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
    for s in ["tessera.v1.Cluster", "tessera.v1.Deployments", "tessera.v1.Planner", "tessera.v1.Membership"] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
}
