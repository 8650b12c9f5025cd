//! Deployments declared in files: `tessera apply -f` and the head's `--deployments DIR`, with the
//! real binaries (a head and two workers, the probe engine).

use std::path::Path;
use std::process::Command;

use tessera_proto::v1 as pb;
use tessera_tests::deploy::{Client, model, running_at, wait_for};
use tessera_tests::process::{Reaper, start_head, two_workers};
use tessera_tests::{Daemon, deployments_client, wait_until};

fn tessera(head: &str, admin: &Path, args: &[&str]) -> std::process::Output {
    Command::new(tessera_tests::bin("tessera"))
        .args(["--head", head])
        .args(args)
        .env("TESSERA_TOKEN_FILE", admin)
        .output()
        .expect("run tessera")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn workers(dir: &Path, head: &str) -> Vec<Daemon> {
    two_workers(dir, head, &["--orphan-timeout", "3s"])
}

async fn get(c: &Client, name: &str) -> Option<pb::Deployment> {
    c.clone().get(pb::GetDeploymentRequest { name: name.into() }).await.ok().map(|r| r.into_inner())
}

#[tokio::test]
async fn apply_creates_then_rolls_changed_files_and_leaves_matching_ones_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = Reaper::new(dir.path());
    let head = start_head(dir.path(), "head", "127.0.0.1:0", &["--orphan-timeout", "3s"]);
    let _w = workers(dir.path(), &head.url);
    tessera_tests::wait_alive(&head.url, 3).await;
    let admin = head.data_dir.join("admin.token");
    let files = dir.path().join("deployments");
    std::fs::create_dir_all(&files).expect("dir");
    let m = model();
    std::fs::write(files.join("a.toml"), format!("name = \"a\"\nmodel = \"{m}\"\ntp = 2\nengine = \"probe\"\n"))
        .expect("a.toml");
    std::fs::write(files.join("b.yaml"), format!("name: b\nmodel: {m}\ntp: 1\nengine: probe\nenv:\n  K: v\n"))
        .expect("b.yaml");
    let f = files.display().to_string();
    let out = tessera(&head.url, &admin, &["apply", "-f", &f]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("a: created") && text(&out).contains("b: created"), "{}", text(&out));
    let c = deployments_client(&head.url).await;
    wait_for(&c, "a", "running", running_at(1)).await;
    wait_for(&c, "b", "running", running_at(1)).await;
    assert_eq!(get(&c, "b").await.expect("b").env.get("K").map(String::as_str), Some("v"));
    // JSON says null where there is no value, never "" or 0.
    let out = tessera(&head.url, &admin, &["get", "a", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for absent in ["command", "max_model_len", "managed_by", "model_from"] {
        assert!(v[absent].is_null(), "{absent}: {v}");
    }
    assert!(v["endpoint"].is_string() && v["master_port"].is_u64() && v["ranks"][0]["pid"].is_u64(), "{v}");

    // The same files again: nothing changes.
    let out = tessera(&head.url, &admin, &["apply", "-f", &f]);
    assert!(text(&out).contains("a: unchanged") && text(&out).contains("b: unchanged"), "{}", text(&out));
    // A changed file rolls its deployment to a new revision.
    std::fs::write(files.join("b.yaml"), format!("name: b\nmodel: {m}\ntp: 1\nengine: probe\nenv:\n  K: w\n"))
        .expect("b.yaml");
    let out = tessera(&head.url, &admin, &["apply", "-f", &files.join("b.yaml").display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("b: updated to revision 2"), "{}", text(&out));
    assert_eq!(get(&c, "b").await.expect("b").env.get("K").map(String::as_str), Some("w"));

    // A typo is refused with the file and the field named; nothing is applied.
    std::fs::write(files.join("c.toml"), format!("name = \"c\"\nmodel = \"{m}\"\nreplica = 2\n")).expect("c.toml");
    let out = tessera(&head.url, &admin, &["apply", "-f", &f]);
    assert!(!out.status.success());
    assert!(text(&out).contains("c.toml") && text(&out).contains("replica"), "{}", text(&out));
    assert!(get(&c, "c").await.is_none());
}

#[tokio::test]
async fn the_heads_deployments_dir_is_kept_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _reaper = Reaper::new(dir.path());
    let files = dir.path().join("deployments");
    std::fs::create_dir_all(&files).expect("dir");
    let m = model();
    std::fs::write(files.join("a.toml"), format!("name = \"a\"\nmodel = \"{m}\"\ntp = 2\nengine = \"probe\"\n"))
        .expect("a.toml");
    let head = start_head(
        dir.path(),
        "head",
        "127.0.0.1:0",
        &["--orphan-timeout", "3s", "--deployments", &files.display().to_string()],
    );
    let _w = workers(dir.path(), &head.url);
    let c = deployments_client(&head.url).await;
    // At start: what the directory declares is created (once GPUs are there).
    let a = wait_for(&c, "a", "running from its file", |d| d.state == pb::DeploymentState::Running as i32).await;
    assert_eq!(a.managed_by, "deployments-dir");
    // The LeaderWorkerSet example's probes, against this cluster: the group has joined (3 nodes),
    // the model answers.
    let port = a.endpoint.trim_end_matches('/').rsplit(':').next().expect("port").to_string();
    let head_port = head.url.rsplit(':').next().expect("port").to_string();
    let admin = head.data_dir.join("admin.token").display().to_string();
    let check = |what: &str, group: &str| {
        let bin_dir = tessera_tests::bin("tessera").parent().expect("dir").display().to_string();
        Command::new("sh")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/container/lws-check.sh"))
            .arg(what)
            .env("PATH", format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default()))
            .env("TESSERA_API_PORT", &port)
            .env("TESSERA_HEAD_PORT", &head_port)
            .env("TESSERA_ADMIN_TOKEN_FILE", &admin)
            .env("LWS_GROUP_SIZE", group)
            .env_remove("TESSERA_HEAD")
            .output()
            .expect("run lws-check")
    };
    let ok = check("model-answers", "3");
    assert!(ok.status.success(), "{}", text(&ok));
    tessera_tests::wait_alive(&head.url, 3).await;
    assert!(check("group-joined", "3").status.success(), "{}", text(&check("group-joined", "3")));
    let short = check("group-joined", "4");
    assert_eq!(short.status.code(), Some(1));
    assert!(text(&short).contains("3 of 4 nodes alive"), "{}", text(&short));
    // A deployment made by a call is never touched.
    c.clone()
        .create(pb::CreateDeploymentRequest {
            name: "mine".into(),
            model_path: m.clone(),
            tp: 1,
            pp: 1,
            engine: pb::Engine::Probe as i32,
            ..Default::default()
        })
        .await
        .expect("create");
    // A new file creates; a changed one rolls.
    std::fs::write(files.join("b.yaml"), format!("name: b\nmodel: {m}\nengine: probe\n")).expect("b.yaml");
    wait_for(&c, "b", "created from its new file", running_at(1)).await;
    std::fs::write(
        files.join("a.toml"),
        format!("name = \"a\"\nmodel = \"{m}\"\ntp = 2\nengine = \"probe\"\nenv = {{ K = \"v\" }}\n"),
    )
    .expect("a.toml");
    wait_for(&c, "a", "rolled to revision 2", |d| d.revision == 2 && d.env.get("K").is_some_and(|v| v == "v")).await;
    // A file broken by an edit changes nothing (and is said once in the head's log).
    std::fs::write(files.join("b.yaml"), "name: b\nmodel: [\n").expect("b.yaml");
    wait_until("the broken file is reported", || {
        let log = head.daemon.log_text();
        async move { (log.contains("b.yaml") && log.contains("deployments dir")).then_some(()) }
    })
    .await;
    assert!(get(&c, "b").await.is_some(), "a broken file deletes nothing");
    // A deployment deleted by hand comes back; a file removed deletes what it declared.
    c.clone().delete(pb::DeleteDeploymentRequest { name: "a".into() }).await.expect("delete a");
    wait_until("a comes back", || {
        let c = c.clone();
        async move { get(&c, "a").await.filter(|d| d.state == pb::DeploymentState::Running as i32).map(|_| ()) }
    })
    .await;
    std::fs::remove_file(files.join("b.yaml")).expect("rm");
    wait_until("b is deleted with its file", || {
        let c = c.clone();
        async move { get(&c, "b").await.is_none().then_some(()) }
    })
    .await;
    assert!(get(&c, "mine").await.is_some(), "not declared in the directory: left alone");
}
