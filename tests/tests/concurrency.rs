//! 50 concurrent creates and deletes with overlapping names while nodes fail: afterwards every GPU
//! is reserved by at most one rank, and the reserved count equals what live deployments hold.

use std::collections::HashMap;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_tests::{TestCluster, deployments_client, wait_until};

fn model() -> String {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/model-configs/Llama-3.1-8B-Instruct.json")
        .canonicalize()
        .expect("model")
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_and_deletes_never_double_book_a_gpu() {
    let mut cluster = TestCluster::start(3).await;
    let url = cluster.url.clone();
    let mut cl = tessera_tests::cluster_client(&url).await;
    for n in ["head", "worker-1", "worker-2", "worker-3"] {
        tessera_tests::wait_state(&mut cl, n, pb::NodeState::Alive).await;
    }
    let m = model();
    let created_ok = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let url = url.clone();
        let m = m.clone();
        let created_ok = created_ok.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = deployments_client(&url).await;
            let name = format!("d{}", i % 7);
            let (tp, pp) = [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)][(i % 5) as usize];
            let req = pb::CreateDeploymentRequest {
                name: name.clone(),
                model_path: m,
                tp,
                pp,
                engine: pb::Engine::Probe as i32,
                ..Default::default()
            };
            match c.create(req).await {
                Ok(_) => {
                    created_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(s) => assert_eq!(s.code(), tonic::Code::AlreadyExists, "{}", s.message()),
            }
            if i % 3 == 0 {
                tokio::time::sleep(Duration::from_millis((i % 4) as u64 * 20)).await;
                match c.delete(pb::DeleteDeploymentRequest { name }).await {
                    Ok(_) => {}
                    Err(s) => assert_eq!(s.code(), tonic::Code::NotFound, "{}", s.message()),
                }
            }
        }));
        if i == 20 {
            // A node fails in the middle of it (its agent vanishes without leaving).
            let w = cluster.workers.remove(0);
            w.task.abort();
        }
        if i == 35 {
            cluster.add_worker("worker-4").await;
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    // The failed node is declared dead, and deployments on it restart elsewhere or wait.

    tessera_tests::wait_state(&mut cl, "worker-1", pb::NodeState::Dead).await;
    let head = cluster.head.as_ref().expect("head");
    let deps = head.deployments.clone();
    // Let restarts, deletes and pending launches settle, then check the books.
    wait_until("reservations settle and balance", || {
        let deps = deps.clone();
        async move {
            let (reserved, held) = deps.reservation_counts().await.ok()?;
            let list = deps.list().await.ok()?;
            let settled = list.iter().all(|d| {
                matches!(
                    pb::DeploymentState::try_from(d.state),
                    Ok(pb::DeploymentState::Running | pb::DeploymentState::Pending | pb::DeploymentState::Failed)
                )
            });
            (settled && reserved == held).then_some(())
        }
    })
    .await;
    let list = deps.list().await.expect("list");
    let mut owner: HashMap<String, String> = HashMap::new();
    let mut held = 0;
    for d in list.iter().filter(|d| d.state == pb::DeploymentState::Running as i32) {
        for r in &d.ranks {
            held += 1;
            let key = format!("{}/{:?}", r.node_id, r.gpu_indices);
            if let Some(other) = owner.insert(key.clone(), format!("{} rank {}", d.name, r.rank)) {
                panic!("GPU {key} is held by {other} and by {} rank {}", d.name, r.rank);
            }
        }
    }
    let (reserved, _) = deps.reservation_counts().await.expect("counts");
    assert_eq!(reserved, held, "reserved GPUs equal the ranks of running deployments");
    assert!(created_ok.load(std::sync::atomic::Ordering::Relaxed) >= 7, "the churn really created deployments");
    cluster.stop().await;
}
