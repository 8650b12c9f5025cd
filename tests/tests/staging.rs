//! Weight staging end to end with the real binaries: a model directory on the head only, a PP 3
//! probe deployment over the head and two workers (one fake GPU each); each worker's cache gets
//! exactly its stage's files, the head sends each file once, and a worker killed mid-transfer
//! resumes after its last good chunk (a corrupted chunk is fetched again).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tessera_proto::v1 as pb;
use tessera_tests::deploy::{delete_and_wait, running_at, wait_for, wait_for_within};
use tessera_tests::model::{self, ModelFile, metric};
use tessera_tests::process::start_head;
use tessera_tests::{Daemon, HeadProc, start_worker_with};

struct Staged {
    dir: tempfile::TempDir,
    head: HeadProc,
    workers: Vec<Daemon>,
    model: PathBuf,
    files: Vec<ModelFile>,
}

const CHUNK: u64 = 16 << 20;

async fn cluster(worker_extra: &[&str], layer_bytes: u64) -> Staged {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = tessera_tests::process::Reaper::new(dir.path());
    let model = dir.path().join("model");
    let files = model::write(&model, 8, 4, layer_bytes).expect("model");
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &["--fake-gpus", "1x80GiB", "--orphan-timeout", "3s"]);
    let mut extra = vec!["--fake-gpus", "1x80GiB", "--orphan-timeout", "3s"];
    extra.extend_from_slice(worker_extra);
    let workers = ["w1", "w2"]
        .iter()
        .map(|n| start_worker_with(dir.path(), n, &head.url, &state(dir.path(), n), &extra))
        .collect();
    let s = Staged { dir, head, workers, model, files };
    tessera_tests::wait_alive(&s.head.url, 3).await;
    s
}

fn state(dir: &Path, n: &str) -> PathBuf {
    dir.join(format!("{n}-state"))
}

fn request(model: &Path) -> pb::CreateDeploymentRequest {
    pb::CreateDeploymentRequest {
        name: "staged".into(),
        model_path: model.display().to_string(),
        tp: 1,
        pp: 3,
        engine: pb::Engine::Probe as i32,
        staging: pb::StagingMode::On as i32,
        ..Default::default()
    }
}

/// The files a worker needs, from its ranks' layer ranges.
fn expected(d: &pb::Deployment, node: &str, files: &[ModelFile]) -> BTreeSet<String> {
    let r = d.ranks.iter().find(|r| r.node == node).expect("a rank on the node");
    let (first, last) = (r.pp_rank == 0, r.pp_rank + 1 == d.pp as u64);
    files.iter().filter(|f| f.needed_by(r.layer_start, r.layer_end, first, last)).map(|f| f.name.clone()).collect()
}

fn metrics_addr(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("metrics.addr")).expect("metrics.addr").trim().to_string()
}

#[tokio::test]
async fn each_node_gets_only_its_stage_files_and_every_file_leaves_the_head_once() {
    let s = cluster(&[], 3 << 20).await;
    let mut c = tessera_tests::deployments_client(&s.head.url).await;
    let created = c.create(request(&s.model)).await.expect("create").into_inner();
    assert_eq!(created.staging, pb::StagingMode::On as i32);
    let d = wait_for(&c, "staged", "running at generation 1", running_at(1)).await;
    assert_eq!(d.ranks[0].node, "head", "stage 0 on the head, which reads the model where it is");
    let model_bytes: u64 = s.files.iter().map(|f| f.size).sum();
    let mut union = BTreeSet::new();
    for w in ["w1", "w2"] {
        let want = expected(&d, w, &s.files);
        let models = state(s.dir.path(), w).join("cache/models");
        let dirs: Vec<PathBuf> =
            std::fs::read_dir(&models).expect("models dir").map(|e| e.expect("e").path()).collect();
        assert_eq!(dirs.len(), 1, "one model directory on {w}: {dirs:?}");
        let got: BTreeSet<String> = std::fs::read_dir(&dirs[0])
            .expect("read")
            .map(|e| e.expect("e").file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(got, want, "{w} holds exactly its stage's files");
        assert!(got.len() < s.files.len(), "{w} does not hold the whole model");
        for f in &got {
            let a = std::fs::read(dirs[0].join(f)).expect("staged");
            if f == "model.safetensors.index.json" {
                // Rewritten to name only the shards that are here (vLLM checks that they exist).
                let v: serde_json::Value = serde_json::from_slice(&a).expect("index");
                let named: BTreeSet<&str> =
                    v["weight_map"].as_object().expect("map").values().filter_map(|f| f.as_str()).collect();
                let shards: BTreeSet<&str> =
                    got.iter().map(String::as_str).filter(|n| n.ends_with(".safetensors")).collect();
                assert_eq!(named, shards, "{w}'s index names exactly its shards");
                continue;
            }
            assert!(a == std::fs::read(s.model.join(f)).expect("src"), "{w}: {f} is the head's file");
        }
        let st = d.staging_nodes.iter().find(|n| n.node == w).expect("staging shown for the node");
        let need: u64 = s.files.iter().filter(|f| want.contains(&f.name)).map(|f| f.size).sum();
        assert_eq!(
            (st.phase.as_str(), st.bytes_done, st.bytes_needed, st.model_bytes),
            ("done", need, need, model_bytes)
        );
        union.extend(want);
    }
    let src = d.staging_nodes.iter().find(|n| n.node == "head").expect("the source shown");
    assert_eq!(src.phase, "source");
    // Each file left the head once: what the head served is the union of what the workers needed
    // (w2's copies of the files both need came from w1).
    let union_bytes: u64 = s.files.iter().filter(|f| union.contains(&f.name)).map(|f| f.size).sum();
    let served = metric(&metrics_addr(&s.head.data_dir), "tessera_worker_stage_served_bytes_total") as u64;
    assert_eq!(served, union_bytes, "the head's egress");
    let w1_served = metric(&metrics_addr(&state(s.dir.path(), "w1")), "tessera_worker_stage_served_bytes_total");
    assert!(w1_served > 0.0, "w2 fetched from w1");
    // The probe got the staged directory in place of the model path.
    delete_and_wait(&c, "staged").await;
    drop(s.workers);
}

/// The prefix of `data` made of whole chunks that match the model's own bytes.
fn good_prefix(partial: &[u8], original: &[u8]) -> u64 {
    let mut good = 0;
    for (a, b) in partial.chunks(CHUNK as usize).zip(original.chunks(CHUNK as usize)) {
        if a.len() != b.len() || a != b {
            break;
        }
        good += a.len() as u64;
    }
    good
}

#[tokio::test]
async fn a_worker_killed_mid_transfer_resumes_after_its_last_good_chunk() {
    // 8 layers of 24 MiB in 4 shards (~48 MiB, three chunks, each); the workers fetch at 12 MiB/s.
    let mut s = cluster(&["--transfer-max-rate", "12MiB"], 24 << 20).await;
    let mut c = tessera_tests::deployments_client(&s.head.url).await;
    c.create(request(&s.model)).await.expect("create");
    // w2 holds more than a chunk of some file, and not all of it: kill -9 its worker.
    let cache = state(s.dir.path(), "w2").join("cache");
    let partial = cache.join("partial");
    wait_for_within(&c, "staged", "w2 fetching", std::time::Duration::from_secs(60), |d| {
        let lens: Vec<u64> = std::fs::read_dir(&partial)
            .map(|r| r.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).collect())
            .unwrap_or_default();
        d.state == pb::DeploymentState::Staging as i32 && lens.iter().any(|&n| n > CHUNK + (1 << 20))
    })
    .await;
    let d = c.get(pb::GetDeploymentRequest { name: "staged".into() }).await.expect("get").into_inner();
    let w2_need = d.staging_nodes.iter().find(|n| n.node == "w2").map(|n| n.bytes_needed).expect("w2");
    s.workers[1].signal(nix::sys::signal::Signal::SIGKILL);
    let _ = s.workers[1].wait();
    // What survives: whole blobs and partial files. The second chunk of the largest partial file
    // is corrupted on disk: it and what follows must be fetched again.
    let cache = state(s.dir.path(), "w2").join("cache");
    let mut partials: Vec<(PathBuf, u64)> = std::fs::read_dir(cache.join("partial"))
        .expect("partial dir")
        .map(|e| e.expect("e").path())
        .map(|p| (p.clone(), std::fs::metadata(&p).expect("m").len()))
        .collect();
    partials.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    assert!(!partials.is_empty(), "a partial file was left");
    let (victim, len) = partials[0].clone();
    assert!(len > CHUNK, "more than a chunk of {} arrived", victim.display());
    let mut bytes = std::fs::read(&victim).expect("read");
    bytes[(CHUNK + 100) as usize] ^= 0xff;
    std::fs::write(&victim, &bytes).expect("corrupt");
    // The surviving bytes that are right (the test knows every file's content, and so its name in
    // the cache: a hash of its chunk hashes).
    let by_sha: std::collections::HashMap<String, Vec<u8>> = s
        .files
        .iter()
        .map(|f| std::fs::read(s.model.join(&f.name)).expect("src"))
        .map(|b| {
            let cb = tessera_worker::stage::index::chunk_bytes(b.len() as u64);
            let f = pb::ModelFile {
                size_bytes: b.len() as u64,
                chunk_bytes: cb,
                chunk_sha256: b.chunks(cb as usize).map(|c| Sha256::digest(c).to_vec()).collect(),
                ..Default::default()
            };
            (tessera_worker::stage::index::blob_id(&f), b)
        })
        .collect();
    let mut resumed = 0;
    for e in std::fs::read_dir(cache.join("blobs")).expect("blobs") {
        resumed += std::fs::metadata(e.expect("e").path()).expect("m").len();
    }
    for (p, _) in &partials {
        let sha = p.file_name().expect("name").to_string_lossy().to_string();
        resumed += good_prefix(&std::fs::read(p).expect("read"), &by_sha[&sha]);
    }
    assert!(resumed > 0 && resumed < w2_need, "something, not everything, survived: {resumed} of {w2_need}");

    // w2 comes back (no rate limit now): the group runs, w2 having fetched only what it lacked.
    let w2 = start_worker_with(
        s.dir.path(),
        "w2",
        &s.head.url,
        &state(s.dir.path(), "w2"),
        &["--fake-gpus", "1x80GiB", "--orphan-timeout", "3s"],
    );
    s.workers[1] = w2;
    let d = wait_for_within(&c, "staged", "running again", std::time::Duration::from_secs(120), |d| {
        d.state == pb::DeploymentState::Running as i32
    })
    .await;
    let fetched = metric(&metrics_addr(&state(s.dir.path(), "w2")), "tessera_worker_stage_fetched_bytes_total") as u64;
    assert_eq!(fetched, w2_need - resumed, "w2 fetched only what it did not have (the corrupt chunk again)");
    let want = expected(&d, "w2", &s.files);
    let models = cache.join("models");
    let dir = std::fs::read_dir(&models).expect("models").next().expect("one").expect("e").path();
    for f in want.iter().filter(|f| f.ends_with(".safetensors")) {
        assert!(std::fs::read(dir.join(f)).expect("staged") == std::fs::read(s.model.join(f)).expect("src"), "{f}");
    }
    delete_and_wait(&c, "staged").await;
}

#[tokio::test]
async fn a_model_on_a_worker_is_planned_from_what_it_says_and_staged_from_there() {
    let s = cluster(&[], 1 << 20).await;
    let mut c = tessera_tests::deployments_client(&s.head.url).await;
    // Named wrong, or a path that node cannot read: refused, naming the value.
    let mut req = request(&s.model);
    req.model_from = "nope".into();
    let e = c.create(req.clone()).await.expect_err("no such node");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("\"nope\""), "{e:?}");
    req.model_from = "w1".into();
    req.model_path = "/nonexistent/model".into();
    let e = c.create(req.clone()).await.expect_err("unreadable");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("w1 cannot read the model at /nonexistent/model"), "{e:?}");

    req.model_path = s.model.display().to_string();
    c.create(req).await.expect("create");
    let d = wait_for(&c, "staged", "running at generation 1", running_at(1)).await;
    assert_eq!(d.model_from, "w1");
    let src = d.staging_nodes.first().expect("the source");
    assert_eq!((src.node.as_str(), src.phase.as_str()), ("w1", "source"));
    // The head's node (stage 0) got its files from w1; w2 from w1 or the head.
    let head_dir = s.head.data_dir.join("worker/cache/models");
    let staged = std::fs::read_dir(&head_dir).expect("the head's cache").count();
    assert_eq!(staged, 1, "the head's node staged its stage's files");
    let served = |dir: &Path| metric(&metrics_addr(dir), "tessera_worker_stage_served_bytes_total");
    assert!(served(&state(s.dir.path(), "w1")) > 0.0, "w1 served the model");
    delete_and_wait(&c, "staged").await;
}
