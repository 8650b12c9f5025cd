//! [`TestCluster`]: a head and N worker agents in one process, over real loopback gRPC.

use std::time::Duration;

use tessera_common::fake::FakeGpuSpec;
use tessera_head::membership::MembershipConfig;
use tessera_head::{Head, HeadConfig, LocalWorker};
use tessera_worker::agent::{Agent, AgentConfig, AgentError, AgentStatus};
use tessera_worker::gpu::FakeInventory;
use tessera_worker::state::StateDir;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestWorker {
    pub name: String,
    pub token: CancellationToken,
    pub status: watch::Receiver<AgentStatus>,
    pub task: JoinHandle<Result<(), AgentError>>,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub head: Option<Head>,
    pub head_token: CancellationToken,
    pub url: String,
    pub workers: Vec<TestWorker>,
    pub config: MembershipConfig,
    pub spec: FakeGpuSpec,
}

impl TestCluster {
    /// A head (with its own in-process worker named "head") and `n` workers named `worker-1..n`,
    /// each with 4 fake 80 GiB GPUs.
    pub async fn start(n: usize) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec: FakeGpuSpec = "4x80GiB".parse().expect("spec");
        let config = MembershipConfig::default();
        let (head, head_token, url) = start_head(&dir, config, spec, "127.0.0.1:0").await;
        let mut c = TestCluster { dir, head: Some(head), head_token, url, workers: Vec::new(), config, spec };
        for i in 1..=n {
            c.add_worker(&format!("worker-{i}")).await;
        }
        c
    }

    pub async fn add_worker(&mut self, name: &str) {
        let state = StateDir::open(&self.dir.path().join(name)).expect("state dir");
        let agent = Agent::new(
            AgentConfig {
                head: self.url.clone(),
                node_name: name.to_string(),
                labels: [("role".to_string(), "test".to_string())].into(),
                advertise_address: None,
                is_head: false,
                token: Some(crate::JOIN_TOKEN.to_string()),
                tls: None,
                inventory: std::sync::Arc::new(FakeInventory::new(self.spec, name)),
                metrics: None,
                connect_timeout: Duration::from_secs(2),
                leave_timeout: Duration::from_secs(2),
                shards: Some(host_config(&self.dir.path().join(name))),
                stage: Some(stage_config(&self.dir.path().join(name))),
            },
            state,
        )
        .expect("agent");
        let token = CancellationToken::new();
        let status = agent.status();
        let task = tokio::spawn(agent.run(token.clone()));
        self.workers.push(TestWorker { name: name.to_string(), token, status, task });
    }

    /// Stops the head (gracefully) and starts a new one on the same port and data dir.
    pub async fn restart_head(&mut self) {
        let port: u16 = self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in url");
        self.head_token.cancel();
        if let Some(h) = self.head.take() {
            h.stopped().await.expect("head stopped cleanly");
        }
        let (head, token, url) = start_head(&self.dir, self.config, self.spec, &format!("127.0.0.1:{port}")).await;
        assert_eq!(url, self.url);
        self.head = Some(head);
        self.head_token = token;
    }

    pub async fn stop(mut self) {
        for w in &self.workers {
            w.token.cancel();
        }
        for w in self.workers.drain(..) {
            w.task.await.expect("worker task").expect("worker ended cleanly");
        }
        self.head_token.cancel();
        if let Some(h) = self.head.take() {
            h.stopped().await.expect("head stopped cleanly");
        }
    }
}

async fn start_head(
    dir: &tempfile::TempDir,
    config: MembershipConfig,
    spec: FakeGpuSpec,
    listen: &str,
) -> (Head, CancellationToken, String) {
    // A just-released port can linger briefly; retry the bind for a moment.
    let mut tries = 0;
    let listener = loop {
        match TcpListener::bind(listen).await {
            Ok(l) => break l,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind {listen}: {e}"),
        }
    };
    let token = CancellationToken::new();
    let head = Head::start(
        listener,
        HeadConfig {
            data_dir_lock: None,
            deployments_dir: None,
            store: None,
            conn_limits: Default::default(),
            join_token_path: None,
            tls: None,
            metrics_listener: None,
            auth: Some(tessera_common::auth::TokenSet {
                join: crate::JOIN_TOKEN.to_string(),
                admin: crate::ADMIN_TOKEN.to_string(),
                reader: crate::READER_TOKEN.to_string(),
            }),
            recovery_window: Duration::from_secs(10),
            membership: config,
            data_dir: dir.path().join("head"),
            worker: Some(LocalWorker {
                node_name: "head".into(),
                labels: Default::default(),
                advertise_address: None,
                inventory: std::sync::Arc::new(FakeInventory::new(spec, "head")),
                shards: Some(host_config(&dir.path().join("head/worker"))),
                stage: Some(stage_config(&dir.path().join("head/worker"))),
            }),
        },
        token.clone(),
    )
    .await
    .expect("head starts");
    let url = format!("http://{}", head.addr);
    (head, token, url)
}

/// Shards of in-process workers run under the real `tessera-worker` binary's shim and probe modes.
pub fn host_config(state_dir: &std::path::Path) -> tessera_worker::shard::HostConfig {
    tessera_worker::shard::HostConfig {
        state_dir: state_dir.to_path_buf(),
        exe: crate::bin("tessera-worker"),
        vllm_bin: None,
        allow_command: true,
        orphan_timeout: Duration::from_secs(5),
        log_max_bytes: 1 << 20,
        engine_user: None,
        models_dir: Some(state_dir.join("cache/models")),
        echo_logs: false,
    }
}

/// Weight staging of in-process workers: the cache in the state dir, the server on loopback.
pub fn stage_config(state_dir: &std::path::Path) -> tessera_worker::stage::StageConfig {
    tessera_worker::stage::StageConfig {
        cache_dir: state_dir.join("cache"),
        max_bytes: 0,
        listen: "127.0.0.1:0".parse().expect("addr"),
        state_dir: state_dir.to_path_buf(),
        max_rate: 0,
    }
}
