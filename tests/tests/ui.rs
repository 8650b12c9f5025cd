//! The head's status page, loaded by a real browser: headless Chromium (Debian's `chromium`,
//! installed by .ci/run) renders `/ui` against a live cluster, and the test reads what it shows.

use std::process::Command;

use tessera_tests::deploy::{Cluster, probe, running_at, wait_for};
use tessera_tests::model::http_get;

/// The page as Chromium rendered it after its script ran (`--dump-dom`).
fn render(url: &str) -> String {
    tessera_tests::process::ensure_command("chromium", &["chromium"]).expect("chromium");
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("chromium is not installed: apt-get install chromium (.ci/run does this)");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of one table of the rendered page (tags dropped).
fn table(dom: &str, id: &str) -> String {
    let start = dom.find(&format!("<table id=\"{id}\"")).unwrap_or_else(|| panic!("no table {id} in:\n{dom}"));
    let end = start + dom[start..].find("</table>").expect("table end");
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom[start..end].chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn a_browser_shows_nodes_gpus_deployments_and_events_of_a_live_cluster() {
    let c = Cluster::start(&[]).await;
    let deps = c.client().await;
    let mut req = probe("llama", 4, 2);
    req.env.insert("HF_TOKEN".into(), "hf_secret_never_shown".into());
    deps.clone().create(req).await.expect("create");
    let d = wait_for(&deps, "llama", "running", running_at(1)).await;
    let metrics = std::fs::read_to_string(c.head.data_dir.join("metrics.addr")).expect("metrics.addr");
    let metrics = metrics.trim();

    // The JSON the page reads: no env, no secrets.
    let (code, json) = http_get(metrics, "/ui/status.json");
    assert_eq!(code, 200, "{json}");
    assert!(!json.contains("hf_secret_never_shown"), "a deployment's env is never shown: {json}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["deployments"][0]["state"], "running", "{v}");

    let dom = render(&format!("http://{metrics}/ui"));
    assert!(!dom.contains("hf_secret_never_shown"));
    let nodes = table(&dom, "nodes");
    for n in ["head (head)", "w1", "w2"] {
        assert!(nodes.contains(n), "node {n} shown: {nodes}");
    }
    assert!(nodes.contains("alive"), "{nodes}");
    // Each GPU with its deployment: all 12 GPUs, 8 of them held by llama.
    assert_eq!(nodes.matches(" llama").count(), 8, "{nodes}");
    assert_eq!(nodes.matches(" free").count(), 4, "{nodes}");
    let deployments = table(&dom, "deployments");
    assert!(deployments.contains("llama running 4 x 2 1 (0 restarts)"), "{deployments}");
    assert!(deployments.contains(&d.endpoint), "endpoint shown: {deployments}");
    let events = table(&dom, "events");
    assert!(events.contains("deployment_changed llama running"), "{events}");
    assert!(events.contains("node_joined w1"), "{events}");

    // A rank killed: the page shows the restart at the next generation.
    let victim = d.ranks[5].pid;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL).expect("kill");
    wait_for(&deps, "llama", "restarted", running_at(2)).await;
    let deployments = table(&render(&format!("http://{metrics}/ui")), "deployments");
    assert!(deployments.contains("llama running 4 x 2 2 (1 restarts)"), "{deployments}");
}
