//! The `tessera-worker` binary: `inventory` without a head, and usage errors.

use std::process::Command;

fn worker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera-worker"));
    c.env_remove("TESSERA_HEAD").env_remove("TESSERA_FAKE_GPUS");
    c
}

#[test]
fn inventory_prints_fake_gpus_as_json_without_a_head() {
    let out = worker()
        .args(["--fake-gpus", "3x24GiB", "--node-name", "n1", "inventory", "-o", "json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["source"], "fake");
    let gpus = v["gpus"].as_array().expect("gpus");
    assert_eq!(gpus.len(), 3);
    assert!(gpus.iter().all(|g| g["fake"] == true && g["memory_total_bytes"] == 24u64 << 30));
    assert_eq!(gpus[0]["nvlink_peers"], serde_json::json!([1, 2]));

    let again = worker()
        .args(["--fake-gpus", "3x24GiB", "--node-name", "n1", "inventory", "-o", "json"])
        .output()
        .expect("run");
    assert_eq!(out.stdout, again.stdout, "fake UUIDs are stable");
}

#[test]
fn inventory_on_a_machine_without_a_driver_reports_no_gpus_and_exits_0() {
    let out = worker().args(["inventory", "-o", "json"]).output().expect("run");
    assert!(out.status.success(), "never crashes without NVML");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    if v["source"] == "none" {
        assert_eq!(v["gpus"].as_array().map(Vec::len), Some(0));
        assert!(v["note"].as_str().is_some_and(|n| n.contains("libnvidia-ml")), "{v}");
    } else {
        assert_eq!(v["source"], "nvml", "a GPU machine reports real GPUs");
    }
}

#[test]
fn running_without_a_head_is_a_usage_error() {
    let out = worker().output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--head URL is required"));
}

#[test]
fn config_file_under_env_under_flags_and_print_config_masks_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("worker.toml");
    std::fs::write(&f, "head = \"http://10.0.0.1:7470\"\nnode-name = \"from-file\"\nlabels = \"zone=a\"\ntoken = \"tsj_supersecret_0123456789\"\n").expect("write");
    let out = worker()
        .args(["--config", &f.display().to_string(), "--node-name", "from-flag", "--print-config"])
        .env("TESSERA_LABELS", "zone=env")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |key: &str| text.lines().find(|l| l.starts_with(&format!("{key} "))).unwrap_or_default().to_string();
    assert!(line("head").contains("\"http://10.0.0.1:7470\"") && line("head").ends_with("# --config"), "{text}");
    assert!(line("node-name").contains("from-flag") && line("node-name").ends_with("# flag"), "{text}");
    assert!(line("labels").contains("zone=env") && line("labels").ends_with("# env"), "{text}");
    assert!(line("token").contains("********"), "{text}");
    assert!(!text.contains("supersecret"), "the secret never shows: {text}");

    std::fs::write(&f, "nod-name = \"x\"\n").expect("write");
    let out = worker().args(["--config", &f.display().to_string()]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key \"nod-name\""));
}
