//! The container entrypoint picks the role from TESSERA_ROLE or LeaderWorkerSet's variables.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn run(env: &[(&str, &str)]) -> (i32, String, String) {
    let bin = tempfile::tempdir().expect("tempdir");
    for name in ["tessera-head", "tessera-worker"] {
        let p = bin.path().join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho \"{name} $* HEAD=${{TESSERA_HEAD:-}} NAME=${{TESSERA_NODE_NAME:-}}\"\n"),
        )
        .expect("stub");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/container/entrypoint.sh");
    let mut c = Command::new("sh");
    c.arg(script).env_clear().env("PATH", path);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run entrypoint");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn roles_from_tessera_role_and_from_leaderworkerset() {
    let (code, out, _) = run(&[("TESSERA_ROLE", "head")]);
    assert_eq!((code, out.as_str()), (0, "tessera-head --data-dir /var/lib/tessera/head HEAD= NAME="));

    let (code, out, _) = run(&[("LWS_WORKER_INDEX", "0"), ("LWS_LEADER_ADDRESS", "llama-0.llama")]);
    assert_eq!(code, 0);
    assert!(out.starts_with("tessera-head "), "index 0 is the head: {out}");

    let (code, out, _) = run(&[("LWS_WORKER_INDEX", "1"), ("LWS_LEADER_ADDRESS", "llama-0.llama")]);
    assert_eq!(
        (code, out.as_str()),
        (0, "tessera-worker --state-dir /var/lib/tessera/worker HEAD=http://llama-0.llama:7470 NAME=worker-1")
    );

    let (_, out, _) = run(&[("LWS_WORKER_INDEX", "2"), ("LWS_LEADER_ADDRESS", "l0"), ("TESSERA_TLS_CA", "/ca.pem")]);
    assert!(out.contains("HEAD=https://l0:7470"), "TLS makes it https: {out}");

    let (code, _, err) = run(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("set TESSERA_ROLE"), "{err}");
    let (code, _, err) = run(&[("TESSERA_ROLE", "worker")]);
    assert_eq!(code, 2);
    assert!(err.contains("needs TESSERA_HEAD"), "{err}");
}

/// The LeaderWorkerSet example holds together (no Kubernetes here to apply it to): its ConfigMap
/// holds a deployment file the head accepts, mounted where `TESSERA_DEPLOYMENTS_DIR` points; the
/// head's data dir is on the volume claim; the Service selects the head pod; the probes are the
/// image's `tessera-lws-check` (tested against a live cluster in tests/tests/declared.rs).
#[test]
fn the_leaderworkerset_example_deploys_from_its_configmap() {
    use serde::Deserialize;
    use serde_yaml_ng::Value;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/kubernetes/lws-vllm-tp8-pp2.yaml");
    let text = std::fs::read_to_string(path).expect("example");
    let docs: Vec<Value> =
        serde_yaml_ng::Deserializer::from_str(&text).map(|d| Value::deserialize(d).expect("valid YAML")).collect();
    let kind = |k: &str| docs.iter().find(|d| d["kind"].as_str() == Some(k)).unwrap_or_else(|| panic!("no {k}"));
    // The deployment file in the ConfigMap parses and makes a valid request.
    let cm = kind("ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = cm["data"].as_mapping().expect("data").iter().next().expect("one file");
    let name = file.0.as_str().expect("file name");
    std::fs::write(dir.path().join(name), file.1.as_str().expect("contents")).expect("write");
    let ms = tessera_common::manifest::read_file(&dir.path().join(name)).expect("the head accepts the file");
    let req = ms[0].to_request("deployments-dir").expect("request");
    assert_eq!((req.tp, req.pp), (8, 2));
    // The head pod: deployments dir mounted where the env says, data on the claim, LWS probes.
    let lws = kind("LeaderWorkerSet");
    let leader = &lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"];
    let c = &leader["containers"][0];
    let env_dir = c["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"].as_str() == Some("TESSERA_DEPLOYMENTS_DIR"))
        .and_then(|e| e["value"].as_str())
        .expect("TESSERA_DEPLOYMENTS_DIR");
    let mounts = c["volumeMounts"].as_sequence().expect("mounts");
    let mount_of =
        |vol: &str| mounts.iter().find(|m| m["name"].as_str() == Some(vol)).and_then(|m| m["mountPath"].as_str());
    assert_eq!(mount_of("deployments"), Some(env_dir));
    assert_eq!(mount_of("head-data"), Some("/var/lib/tessera/head"));
    let volumes = leader["volumes"].as_sequence().expect("volumes");
    let claim = volumes.iter().find(|v| v["name"].as_str() == Some("head-data")).expect("head-data volume");
    assert_eq!(claim["persistentVolumeClaim"]["claimName"], kind("PersistentVolumeClaim")["metadata"]["name"]);
    assert_eq!(c["readinessProbe"]["exec"]["command"][1], Value::from("model-answers"));
    assert_eq!(c["startupProbe"]["exec"]["command"][1], Value::from("group-joined"));
    // The Service sends to the head pod's vLLM port.
    let svc = kind("Service");
    assert_eq!(
        svc["spec"]["selector"]["role"],
        lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]["role"]
    );
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], Value::from(8000));
    // The image has the probe script.
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/container/Dockerfile"))
        .expect("Dockerfile");
    assert!(dockerfile.contains("lws-check.sh /usr/local/bin/tessera-lws-check"));
}
