//! `vllm serve` arguments a deployment gives (`--engine-args`), read on Create: the ones that
//! change the plan are taken into it, the ones Tessera sets from the placement are refused with
//! the Tessera option to use instead, the rest pass through unchanged.
//!
//! vLLM's parser takes `--flag value` and `--flag=value`, and `_` for `-` in long names
//! (`--max_model_len`); so does this one.

use tessera_common::model::DType;
use tessera_common::plan;

/// Flags Tessera sets itself, and what to use instead. Long names without `--`, as vLLM spells
/// them; short aliases with their single dash.
const OWNED: &[(&[&str], &str)] = &[
    (&["--tensor-parallel-size", "-tp"], "the TP size is planned and checked by Tessera: use `tessera deploy --tp N`"),
    (
        &["--pipeline-parallel-size", "-pp"],
        "the PP size is planned and checked by Tessera: use `tessera deploy --pp N`",
    ),
    (&["--nnodes", "-n"], "the node count follows from the placement"),
    (&["--node-rank", "-r"], "each node's rank follows from the placement"),
    (&["--master-addr"], "the rendezvous is node rank 0's address, chosen by the placement"),
    (&["--master-port"], "Tessera picks a free rendezvous port on node rank 0 for every generation"),
    (&["--headless"], "Tessera runs nodes past rank 0 headless"),
    (&["--api-server-count", "-asc"], "Tessera runs one API server per deployment and checks its health"),
    (&["--data-parallel-size", "-dp"], "data parallelism is not managed by Tessera yet: deploy several deployments"),
    (&["--data-parallel-size-local", "-dpl"], "data parallelism is not managed by Tessera yet"),
    (&["--data-parallel-rank", "-dpn"], "data parallelism is not managed by Tessera yet"),
    (&["--data-parallel-start-rank", "-dpr"], "data parallelism is not managed by Tessera yet"),
    (&["--data-parallel-address", "-dpa"], "data parallelism is not managed by Tessera yet"),
    (&["--data-parallel-rpc-port", "-dpp"], "data parallelism is not managed by Tessera yet"),
    (&["--data-parallel-backend", "-dpb"], "data parallelism is not managed by Tessera yet"),
    (&["--data-parallel-hybrid-lb", "-dph"], "data parallelism is not managed by Tessera yet"),
    (&["--data-parallel-external-lb", "-dpe"], "data parallelism is not managed by Tessera yet"),
    (&["--device-ids"], "each node's GPUs are chosen by the placement (CUDA_VISIBLE_DEVICES)"),
    (
        &["--distributed-executor-backend"],
        "Tessera launches one process per node and runs vLLM with its multiprocessing backend (mp)",
    ),
    (&["--model"], "the model is the deployment's model path: use `tessera deploy --model PATH`"),
    (
        &["--config"],
        "vLLM would read flags from that file unchecked: pass them as engine args, where Tessera checks them",
    ),
    (
        &["--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs", "--ssl-cert-reqs"],
        "Tessera's health and liveness checks speak plain HTTP to the engine: terminate TLS in front of it",
    ),
];

/// Flags Tessera reads into the plan (or uses for its checks) besides the owned ones: vLLM accepts
/// unambiguous abbreviations of long flags, so an abbreviation of one of these (or of an owned
/// one) is refused, to be written in full.
const READ: &[&str] = &[
    "--max-model-len",
    "--gpu-memory-utilization",
    "--kv-cache-dtype",
    "--port",
    "--host",
    "--served-model-name",
    "--api-key",
];

/// What the engine args say that Tessera uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VllmArgs {
    /// `--port`: the API port, when the user fixed it (else Tessera picks one).
    pub port: Option<u16>,
    /// `--host`: the address the API binds, when given.
    pub host: Option<String>,
    pub max_model_len: Option<u64>,
    pub gpu_memory_utilization: Option<f64>,
    /// `--kv-cache-dtype` other than `auto`.
    pub kv_cache_dtype: Option<DType>,
    /// The first `--served-model-name`, the name requests use (else the model path).
    pub served_model_name: Option<String>,
    /// The first `--api-key`: the canary presents it.
    pub api_key: Option<String>,
    /// The arguments to pass on: everything but the planned flags (`--max-model-len`,
    /// `--gpu-memory-utilization`), which the launch sets from the plan.
    pub rest: Vec<String>,
}

/// A flag's canonical spelling: `--max_model_len` is `--max-model-len`.
fn canonical(flag: &str) -> String {
    match flag.strip_prefix("--") {
        Some(long) => format!("--{}", long.replace('_', "-")),
        None => flag.to_string(),
    }
}

fn bad(flag: &str, value: &str, rule: &str) -> String {
    format!("engine_args: {flag} {value:?}: {rule}")
}

/// Reads `args` (what follows `vllm serve MODEL`).
pub fn parse(args: &[String]) -> Result<VllmArgs, String> {
    let mut out = VllmArgs::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if !arg.starts_with('-') || arg == "-" {
            return Err(format!(
                "engine_args: {arg:?} is not a flag: the model is the deployment's model path, and every engine argument is a --flag (with its value)"
            ));
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (canonical(f), Some(v.to_string())),
            None => (canonical(arg), None),
        };
        if let Some((names, instead)) = OWNED.iter().find(|(names, _)| names.contains(&flag.as_str())) {
            return Err(format!("engine_args: {} is set by Tessera ({instead}); remove it", names[0]));
        }
        // `-tp4`, `-n2`: argparse reads an owned short alias with its value attached.
        if !flag.starts_with("--")
            && flag.parse::<f64>().is_err()
            && let Some((names, instead)) =
                OWNED.iter().find(|(names, _)| names.iter().any(|n| !n.starts_with("--") && flag.starts_with(n)))
        {
            return Err(format!(
                "engine_args: {arg} is {} as vLLM reads it, which is set by Tessera ({instead}); remove it",
                names[0]
            ));
        }
        // `--tensor-parallel 4`: vLLM takes unambiguous abbreviations.
        if flag.starts_with("--")
            && let Some(full) = OWNED
                .iter()
                .flat_map(|(names, _)| names.iter())
                .chain(READ)
                .find(|n| n.starts_with("--") && n.len() > flag.len() && n.starts_with(flag.as_str()))
        {
            return Err(format!(
                "engine_args: {flag} abbreviates {full}, which Tessera reads or sets: write {full} in full"
            ));
        }
        if flag.starts_with("--data-parallel") || flag.starts_with("--no-data-parallel") {
            return Err(format!(
                "engine_args: {flag} is set by Tessera (data parallelism is not managed by Tessera yet); remove it"
            ));
        }
        let value = |i: &mut usize| -> Result<String, String> {
            if let Some(v) = &inline {
                return Ok(v.clone());
            }
            match args.get(*i) {
                Some(v) if !v.starts_with("--") => {
                    *i += 1;
                    Ok(v.clone())
                }
                _ => Err(format!("engine_args: {flag} needs a value")),
            }
        };
        match flag.as_str() {
            "--max-model-len" => {
                let v = value(&mut i)?;
                out.max_model_len = parse_len(&v).map_err(|rule| bad(&flag, &v, &rule))?;
            }
            "--gpu-memory-utilization" => {
                let v = value(&mut i)?;
                match v.parse::<f64>() {
                    Ok(f) if f > 0.0 && f <= 1.0 => out.gpu_memory_utilization = Some(f),
                    _ => return Err(bad(&flag, &v, "must be a fraction more than 0 and at most 1, e.g. 0.92")),
                }
            }
            "--kv-cache-dtype" => {
                let v = value(&mut i)?;
                out.kv_cache_dtype = plan::kv_cache_dtype(&v).map_err(|e| format!("engine_args: {flag} {e}"))?;
                out.rest.extend([flag.clone(), v]);
            }
            "--port" => {
                let v = value(&mut i)?;
                match v.parse::<u16>() {
                    Ok(p) if p > 0 => out.port = Some(p),
                    _ => {
                        return Err(bad(
                            &flag,
                            &v,
                            "must be a TCP port from 1 to 65535 (or leave it out: Tessera picks a free one)",
                        ));
                    }
                }
                out.rest.extend([flag.clone(), v]);
            }
            "--host" => {
                let v = value(&mut i)?;
                out.host = Some(v.clone());
                out.rest.extend([flag.clone(), v]);
            }
            "--served-model-name" | "--api-key" => {
                // One or more values; the first is the one requests (and the canary) use.
                let first = value(&mut i)?;
                if flag == "--api-key" {
                    out.api_key = Some(first.clone());
                } else {
                    out.served_model_name = Some(first.clone());
                }
                out.rest.extend([flag.clone(), first]);
                if inline.is_none() {
                    while let Some(v) = args.get(i).filter(|v| !v.starts_with('-')) {
                        out.rest.push(v.clone());
                        i += 1;
                    }
                }
            }
            _ => {
                // Passed through as given, with its values (every word up to the next flag: some
                // flags take several, e.g. --lora-modules a=/x b=/y).
                out.rest.push(arg.clone());
                if inline.is_none() {
                    while let Some(v) = args.get(i).filter(|v| !v.starts_with('-') || v.parse::<f64>().is_ok()) {
                        out.rest.push(v.clone());
                        i += 1;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `--max-model-len`: a number of tokens, with vLLM's suffixes (`k`/`m`/`g` are powers of 1000,
/// `K`/`M`/`G` of 1024, `25.6k` is 25,600); `auto` and `-1` leave it to vLLM (planned as the
/// model's own length).
fn parse_len(v: &str) -> Result<Option<u64>, String> {
    if v == "auto" || v == "-1" {
        return Ok(None);
    }
    let (number, mult) = match v.char_indices().last() {
        Some((i, 'k')) => (&v[..i], 1e3),
        Some((i, 'K')) => (&v[..i], 1024.0),
        Some((i, 'm')) => (&v[..i], 1e6),
        Some((i, 'M')) => (&v[..i], 1_048_576.0),
        Some((i, 'g')) => (&v[..i], 1e9),
        Some((i, 'G')) => (&v[..i], 1_073_741_824.0),
        _ => (v, 1.0),
    };
    let plain = !number.is_empty() && number.chars().all(|c| c.is_ascii_digit() || c == '.');
    match number.parse::<f64>() {
        Ok(n) if plain && n * mult >= 1.0 && n * mult < 1e15 => Ok(Some((n * mult) as u64)),
        _ => Err("must be a number of tokens, e.g. 8192, 8k or 32K (or auto)".into()),
    }
}

/// `VLLM_PP_LAYER_PARTITION`: layers per pipeline stage, comma-separated.
pub fn layer_partition(v: &str) -> Result<Vec<u64>, String> {
    v.split(',').map(|s| s.trim().parse::<u64>()).collect::<Result<Vec<_>, _>>().map_err(|_| {
        format!("env: VLLM_PP_LAYER_PARTITION {v:?}: must be layer counts per stage, comma-separated (e.g. 20,12)")
    })
}

/// `args` with `name` among the served model names: appended to the user's
/// `--served-model-name` values, or, when there are none, `--served-model-name DEFAULT NAME`
/// (vLLM's own default, the model path, stays the first, the name responses carry).
pub fn with_served_name(args: &[String], default: &str, name: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 3);
    let mut found = false;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let mut values = if let Some(v) = a.strip_prefix("--served-model-name=") {
            vec![v.to_string()]
        } else if a == "--served-model-name" {
            let mut v = Vec::new();
            while let Some(x) = args.get(i).filter(|x| !x.starts_with('-')) {
                v.push(x.clone());
                i += 1;
            }
            v
        } else {
            out.push(a.clone());
            continue;
        };
        found = true;
        if !values.iter().any(|v| v == name) {
            values.push(name.to_string());
        }
        out.push("--served-model-name".into());
        out.extend(values);
    }
    if !found {
        out.extend(["--served-model-name".to_string(), default.to_string()]);
        if default != name {
            out.push(name.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_deployment_name_is_always_a_served_name() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            with_served_name(&v(&["--dtype", "float32"]), "/m", "d"),
            v(&["--dtype", "float32", "--served-model-name", "/m", "d"])
        );
        assert_eq!(
            with_served_name(&v(&["--served-model-name", "a", "b", "--dtype", "x"]), "/m", "d"),
            v(&["--served-model-name", "a", "b", "d", "--dtype", "x"])
        );
        assert_eq!(with_served_name(&v(&["--served-model-name=a"]), "/m", "d"), v(&["--served-model-name", "a", "d"]));
        assert_eq!(with_served_name(&v(&["--served-model-name", "d"]), "/m", "d"), v(&["--served-model-name", "d"]));
    }
    use super::*;

    fn p(args: &[&str]) -> Result<VllmArgs, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_tessera_owns_are_refused_naming_the_flag_and_what_to_use() {
        for (args, flag, hint) in [
            (vec!["-tp", "4"], "--tensor-parallel-size", "--tp N"),
            (vec!["--tensor_parallel_size=4"], "--tensor-parallel-size", "--tp N"),
            (vec!["--pipeline-parallel-size", "2"], "--pipeline-parallel-size", "--pp N"),
            (vec!["--nnodes", "2"], "--nnodes", "placement"),
            (vec!["--node-rank=1"], "--node-rank", "placement"),
            (vec!["--master-addr", "10.0.0.1"], "--master-addr", "rank 0"),
            (vec!["--master-port", "29500"], "--master-port", "free rendezvous port"),
            (vec!["--headless"], "--headless", "headless"),
            (vec!["--api-server-count", "4"], "--api-server-count", "one API server"),
            (vec!["--data-parallel-size", "2"], "--data-parallel-size", "data parallel"),
            (vec!["-dp", "2"], "--data-parallel-size", "data parallel"),
            (vec!["--data-parallel-address", "x"], "--data-parallel-address", "data parallel"),
            (vec!["--data-parallel-supervisor-port", "1"], "--data-parallel-supervisor-port", "data parallel"),
            (vec!["-n", "2"], "--nnodes", "placement"),
            (vec!["--device-ids", "0,1"], "--device-ids", "CUDA_VISIBLE_DEVICES"),
            (vec!["--distributed-executor-backend", "ray"], "--distributed-executor-backend", "(mp)"),
            (vec!["--model", "/x"], "--model", "--model PATH"),
            (vec!["--config", "x.yaml"], "--config", "unchecked"),
            (vec!["--ssl-keyfile", "k.pem"], "--ssl-keyfile", "terminate TLS"),
            (vec!["-tp4"], "--tensor-parallel-size", "--tp N"),
            (vec!["-n2"], "--nnodes", "placement"),
        ] {
            let e = p(&args).expect_err("refused");
            assert!(e.contains(flag) && e.contains(hint) && e.contains("remove it"), "{args:?}: {e}");
        }
    }

    #[test]
    fn planned_flags_are_read_and_taken_out_of_what_passes_through() {
        let a =
            p(&["--max_model_len", "8k", "--gpu-memory-utilization=0.8", "--kv-cache-dtype", "fp8", "--enforce-eager"])
                .expect("valid");
        assert_eq!(a.max_model_len, Some(8000));
        assert_eq!(a.gpu_memory_utilization, Some(0.8));
        assert_eq!(a.kv_cache_dtype, Some(DType::Fp8));
        assert_eq!(a.rest, vec!["--kv-cache-dtype", "fp8", "--enforce-eager"]);
        assert_eq!(p(&["--max-model-len", "32K"]).expect("valid").max_model_len, Some(32768));
        assert_eq!(p(&["--max-model-len", "25.6k"]).expect("valid").max_model_len, Some(25600));
        assert!(p(&["--max-model-len", "1e9"]).is_err() && p(&["--max-model-len", "k"]).is_err());
        assert_eq!(p(&["--max-model-len", "auto"]).expect("valid").max_model_len, None);
        assert_eq!(p(&["--kv-cache-dtype", "auto"]).expect("valid").kv_cache_dtype, None);
    }

    #[test]
    fn bad_values_name_the_flag_the_value_and_the_rule() {
        for (args, want) in [
            (vec!["--max-model-len", "lots"], "--max-model-len \"lots\": must be a number of tokens"),
            (vec!["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization \"1.5\": must be a fraction"),
            (
                vec!["--kv-cache-dtype", "int3"],
                "--kv-cache-dtype \"int3\" is not a KV cache dtype vLLM knows: one of auto",
            ),
            (vec!["--port", "0"], "--port \"0\": must be a TCP port"),
            (vec!["--port"], "--port needs a value"),
            (vec!["/models/x"], "\"/models/x\" is not a flag"),
        ] {
            let e = p(&args).expect_err("refused");
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn abbreviations_of_what_tessera_reads_or_sets_are_refused() {
        for (arg, full) in [
            ("--tensor-parallel", "--tensor-parallel-size"),
            ("--max-model", "--max-model-len"),
            ("--gpu-memory", "--gpu-memory-utilization"),
        ] {
            let e = p(&[arg, "1"]).expect_err("refused");
            assert!(e.contains(&format!("{arg} abbreviates {full}")) && e.contains("in full"), "{e}");
        }
    }

    #[test]
    fn flags_with_several_values_and_dash_values_pass_through() {
        let a = p(&["--lora-modules", "a=/x", "b=/y", "--cuda-graph-sizes", "1", "2", "4", "-O3", "--seed", "-1"])
            .expect("valid");
        assert_eq!(
            a.rest,
            vec!["--lora-modules", "a=/x", "b=/y", "--cuda-graph-sizes", "1", "2", "4", "-O3", "--seed", "-1"]
        );
    }

    #[test]
    fn port_host_and_served_name_are_read_and_passed_on() {
        let a = p(&["--port", "9000", "--host=10.1.2.3", "--served-model-name", "llama", "ll", "--dtype", "bfloat16"])
            .expect("valid");
        assert_eq!(
            (a.port, a.host.as_deref(), a.served_model_name.as_deref()),
            (Some(9000), Some("10.1.2.3"), Some("llama"))
        );
        assert_eq!(
            a.rest,
            vec!["--port", "9000", "--host", "10.1.2.3", "--served-model-name", "llama", "ll", "--dtype", "bfloat16"]
        );
    }

    #[test]
    fn layer_partitions_are_counts() {
        assert_eq!(layer_partition("20, 12"), Ok(vec![20, 12]));
        assert!(layer_partition("20;12").expect_err("bad").contains("VLLM_PP_LAYER_PARTITION"));
    }
}
