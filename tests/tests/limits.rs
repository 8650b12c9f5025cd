//! Bounded resources, with the real head: idle connections cannot lock clients out, a stream that
//! is not read is cut off, and a model path that would block a thread is refused at once.

use std::io::Read;
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_tests::{cluster_client, start_head, start_worker, wait_state, wait_until};

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[tokio::test]
async fn idle_unauthenticated_connections_are_closed_and_cannot_lock_clients_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(
        dir.path(),
        "head",
        "127.0.0.1:0",
        &["--no-worker", "--max-connections", "40", "--unauthenticated-timeout", "1s"],
    );
    let a = addr(&head.url);
    // 60 sockets that connect and never say anything: 40 fit, 20 are closed at once.
    let mut idle: Vec<std::net::TcpStream> = (0..60)
        .map(|_| {
            let s = std::net::TcpStream::connect(&a).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
            s
        })
        .collect();
    let t0 = Instant::now();
    let mut closed = 0;
    for s in &mut idle {
        let mut buf = [0u8; 64];
        // The server either closes at once (over the limit) or after the unauthenticated timeout;
        // an HTTP/2 settings frame may come first.
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
            }
        }
    }
    assert_eq!(closed, 60, "every idle connection is closed by the head");
    assert!(t0.elapsed() < Duration::from_secs(15), "within the timeout, not the read timeout");
    // And a real client works.
    let mut c = cluster_client(&head.url).await;
    let status = c.get_status(pb::GetStatusRequest::default()).await.expect("a client gets in");
    assert!(status.into_inner().head_instance_id.len() > 10);
}

#[tokio::test]
async fn an_event_stream_that_is_not_read_is_cut_off_with_resource_exhausted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &["--no-worker"]);
    let _w1 = start_worker(dir.path(), "w1", &head.url);
    let mut c = cluster_client(&head.url).await;
    wait_state(&mut c, "w1", pb::NodeState::Alive).await;
    // A reader that takes what it is sent only 64 KiB at a time (it controls its HTTP/2 windows).
    let ch = tonic::transport::Endpoint::from_shared(head.url.clone())
        .expect("url")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect");
    let auth = tessera_common::auth::Bearer::new(Some(tessera_tests::ADMIN_TOKEN)).expect("token");
    let mut slow = pb::cluster_client::ClusterClient::with_interceptor(ch, auth);
    let mut stream =
        slow.watch_events(pb::WatchEventsRequest { include_current: false }).await.expect("watch").into_inner();
    // Events it does not read: drain and undrain, again and again.
    for i in 0..1500 {
        let req = pb::DrainNodeRequest { node: "w1".into(), evict: false };
        if i % 2 == 0 { c.drain_node(req).await } else { c.undrain_node(req).await }.expect("drain");
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut got = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the stream ended without saying why after {got} events"),
            Err(s) => break s,
        }
    };
    assert_eq!(end.code(), tonic::Code::ResourceExhausted, "{}", end.message());
    assert!(end.message().contains("was not read for 5s"), "{}", end.message());
    assert!(got < 1500, "the head did not buffer every event for it ({got})");
}

#[tokio::test]
async fn a_fifo_or_a_device_as_model_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &["--no-worker"]);
    let fifo = dir.path().join("model.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let mut planner = tessera_tests::planner_client(&head.url).await;
    for path in [fifo.display().to_string(), "/dev/zero".to_string()] {
        let t0 = Instant::now();
        let e = planner
            .plan(pb::PlanRequest { model_path: path.clone(), ..Default::default() })
            .await
            .expect_err("refused");
        assert!(e.message().contains("not a regular file"), "{path}: {}", e.message());
        assert!(t0.elapsed() < Duration::from_secs(10), "no thread waits for a writer");
    }
    // The head still plans real models.
    let real =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/model-configs/Llama-3.1-8B-Instruct.json");
    wait_until("a real plan", || {
        let mut p = planner.clone();
        let model_path = real.canonicalize().expect("path").display().to_string();
        async move { p.plan(pb::PlanRequest { model_path, tp: 1, pp: 1, ..Default::default() }).await.ok().map(|_| ()) }
    })
    .await;
}
