//! Deployments end to end with the real binaries: a head (4 fake GPUs) and two workers (4 each),
//! and helpers to create probe deployments and wait for their states.

use std::path::PathBuf;

use tessera_proto::v1 as pb;

use crate::process::{HeadProc, start_head};
use crate::{Daemon, start_worker_with, wait_until};

pub type Client = pb::deployments_client::DeploymentsClient<crate::Conn>;

pub fn model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/model-configs/Llama-3.1-8B-Instruct.json")
        .canonicalize()
        .expect("model config")
        .display()
        .to_string()
}

pub struct Cluster {
    /// Dropped first: the daemons go, then their engines (see [`crate::process::Reaper`]).
    pub workers: Vec<Daemon>,
    pub head: HeadProc,
    _reaper: crate::process::Reaper,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// A head and two workers, with a short orphan timeout so leftovers die quickly.
    pub async fn start(extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut head_args = vec!["--orphan-timeout", "3s"];
        head_args.extend_from_slice(extra);
        let head = start_head(dir.path(), "head", "127.0.0.1:0", &head_args);
        let mut worker_args = vec!["--orphan-timeout", "3s"];
        worker_args.extend_from_slice(extra);
        let workers = ["w1", "w2"]
            .iter()
            .map(|n| start_worker_with(dir.path(), n, &head.url, &dir.path().join(format!("{n}-state")), &worker_args))
            .collect();
        let c = Cluster { _reaper: crate::process::Reaper::new(dir.path()), dir, head, workers };
        crate::wait_alive(&c.head.url, 3).await;
        c
    }

    pub async fn client(&self) -> Client {
        crate::deployments_client(&self.head.url).await
    }

    pub fn tag(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Shim and engine processes of this cluster's deployments.
    pub fn shard_pids(&self) -> Vec<u32> {
        crate::process::engines_of(&self.tag())
    }
}

pub fn probe(name: &str, tp: u32, pp: u32) -> pb::CreateDeploymentRequest {
    pb::CreateDeploymentRequest {
        name: name.into(),
        model_path: model(),
        tp,
        pp,
        engine: pb::Engine::Probe as i32,
        ..Default::default()
    }
}

/// Polls `name` until `pred` holds; on a hang, the panic says what the deployment last was.
pub async fn wait_for(c: &Client, name: &str, what: &str, pred: impl Fn(&pb::Deployment) -> bool) -> pb::Deployment {
    wait_for_within(c, name, what, crate::HANG, pred).await
}

/// [`wait_for`] with another deadline (a real vLLM takes minutes to start on 2 cores).
pub async fn wait_for_within(
    c: &Client,
    name: &str,
    what: &str,
    limit: std::time::Duration,
    pred: impl Fn(&pb::Deployment) -> bool,
) -> pb::Deployment {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = None;
    loop {
        let mut cl = c.clone();
        if let Ok(d) = cl.get(pb::GetDeploymentRequest { name: name.into() }).await.map(|r| r.into_inner()) {
            if pred(&d) {
                return d;
            }
            last = Some(d);
        }
        if tokio::time::Instant::now() > deadline {
            let seen = last.map(|d| format!("generation {}, state {}, {:?}", d.generation, d.state, d.message));
            panic!("timed out after {limit:?} waiting for: {name}: {what}; last seen: {seen:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub fn running_at(generation: u64) -> impl Fn(&pb::Deployment) -> bool {
    move |d| d.state == pb::DeploymentState::Running as i32 && d.generation == generation
}

/// Deletes `name` and waits until the head no longer knows it (every process confirmed gone).
pub async fn delete_and_wait(c: &Client, name: &str) {
    let mut cl = c.clone();
    cl.delete(pb::DeleteDeploymentRequest { name: name.into() }).await.expect("delete");
    wait_until(&format!("{name} gone"), || {
        let mut c = c.clone();
        async move {
            matches!(c.get(pb::GetDeploymentRequest { name: name.into() }).await, Err(s) if s.code() == tonic::Code::NotFound)
                .then_some(())
        }
    })
    .await;
}
