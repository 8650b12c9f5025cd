//! Environment variable names. Every flag of every binary can also be set as `TESSERA_<FLAG>`;
//! the names are collected here so that they are documented and spelled once.

/// Head URL for the CLI and workers (`--head`).
pub const HEAD: &str = "TESSERA_HEAD";
/// gRPC listen address of the head (`--listen`).
pub const LISTEN: &str = "TESSERA_LISTEN";
/// Head data directory (`--data-dir`).
pub const DATA_DIR: &str = "TESSERA_DATA_DIR";
/// Worker state directory (`--state-dir`).
pub const STATE_DIR: &str = "TESSERA_STATE_DIR";
/// Node name (`--node-name`).
pub const NODE_NAME: &str = "TESSERA_NODE_NAME";
/// Advertise address (`--advertise-addr`).
pub const ADVERTISE_ADDR: &str = "TESSERA_ADVERTISE_ADDR";
/// Node labels, `k=v,k=v` (`--labels`).
pub const LABELS: &str = "TESSERA_LABELS";
/// Fake GPUs, `COUNTxMEMORY` (`--fake-gpus`).
pub const FAKE_GPUS: &str = "TESSERA_FAKE_GPUS";
/// Log format, `text` or `json` (`--log-format`).
pub const LOG_FORMAT: &str = "TESSERA_LOG_FORMAT";
/// Log filter in `RUST_LOG` syntax (`--log-level`).
pub const LOG_LEVEL: &str = "TESSERA_LOG_LEVEL";
/// Heartbeat interval the head asks of workers (`--heartbeat-interval`).
pub const HEARTBEAT_INTERVAL: &str = "TESSERA_HEARTBEAT_INTERVAL";
/// Silence after which the head declares a node dead (`--node-timeout`).
pub const NODE_TIMEOUT: &str = "TESSERA_NODE_TIMEOUT";
/// Time a worker whose session broke has to reconnect before it is dead (`--reconnect-grace`).
pub const RECONNECT_GRACE: &str = "TESSERA_RECONNECT_GRACE";
/// Run the head without its in-process worker (`--no-worker`).
pub const NO_WORKER: &str = "TESSERA_NO_WORKER";
/// Output format of CLI commands (`-o/--output`).
pub const OUTPUT: &str = "TESSERA_OUTPUT";

/// What an engine keeps of its daemon's environment: nothing but these names (an entry ending in
/// `*` is a prefix). In particular no `TESSERA_*` (a worker's token) reaches an engine.
pub const ENGINE_ENV_ALLOW: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "TERM",
    "CUDA_*",
    "NCCL_*",
    "NVIDIA_*",
    "GLOO_*",
    "UCX_*",
    "FI_*",
    "HF_*",
    "HUGGING_FACE_*",
    "TRANSFORMERS_*",
    "VLLM_*",
    "TORCH_*",
    "PYTORCH_*",
    "TRITON_*",
    "OMP_*",
    "MKL_*",
    "LD_LIBRARY_PATH",
    "VIRTUAL_ENV",
    "CONDA_*",
];

/// Variables that make a loader or an interpreter run code of their choosing (`LD_PRELOAD`,
/// `PYTHONSTARTUP`, `BROWSER`, `BASH_ENV` ...): a deployment's `--env` may set them only on
/// workers that allow arbitrary commands anyway (`--allow-command`).
pub const ENGINE_ENV_HOOKS: &[&str] = &[
    "LD_*",
    "PYTHON*",
    "BROWSER",
    "BASH_ENV",
    "ENV",
    "PERL5*",
    "PERLLIB",
    "PERL_*",
    "NODE_OPTIONS",
    "NODE_PATH",
    "RUBYOPT",
    "RUBYLIB",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "MALLOC_*",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "RES_OPTIONS",
    "IFS",
    "PS4",
    "PROMPT_COMMAND",
    "SHELLOPTS",
    "BASHOPTS",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "GIT_*",
    "SSH_ASKPASS",
    "OPENSSL_CONF",
    "OPENSSL_ENGINES",
];

/// Whether `name` matches a list of names and `PREFIX*` entries.
pub fn matches(list: &[&str], name: &str) -> bool {
    list.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => *p == name,
    })
}

#[cfg(test)]
mod engine_env_tests {
    use super::*;

    #[test]
    fn allow_and_hook_lists() {
        assert!(matches(ENGINE_ENV_ALLOW, "PATH") && matches(ENGINE_ENV_ALLOW, "CUDA_HOME"));
        assert!(!matches(ENGINE_ENV_ALLOW, "TESSERA_TOKEN") && !matches(ENGINE_ENV_ALLOW, "PATHX"));
        for hook in ["LD_PRELOAD", "PYTHONWARNINGS", "BROWSER", "BASH_ENV", "PERL5OPT", "NODE_OPTIONS"] {
            assert!(matches(ENGINE_ENV_HOOKS, hook), "{hook}");
        }
        assert!(!matches(ENGINE_ENV_HOOKS, "HF_TOKEN") && !matches(ENGINE_ENV_HOOKS, "VLLM_HOST_IP"));
    }
}
