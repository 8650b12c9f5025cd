//! The probe: one process per rank; every rank connects to rank 0 on the master port and rank 0
//! answers `GET /health` once the world is complete. For checking a cluster's wiring.

use tessera_common::ids::ProcKey;
use tessera_proto::v1 as pb;

use super::{LaunchContext, NodeShare, rank_env};

/// The probe's flags a user may give: `--served-model-name NAME` and `--token-delay-ms N`.
pub fn check_args(args: &[String]) -> Result<(), String> {
    use tessera_worker::shard::probe::{MAX_TOKEN_DELAY_MS, USER_FLAGS};
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if !USER_FLAGS.contains(&flag.as_str()) {
            return Err(format!("engine_args: the probe does not take {flag:?}; it takes {}", USER_FLAGS.join(", ")));
        }
        let Some(v) = it.next() else { return Err(format!("engine_args: {flag} needs a value")) };
        match flag.as_str() {
            "--token-delay-ms" if v.parse::<u64>().map_or(true, |ms| ms > MAX_TOKEN_DELAY_MS) => {
                return Err(format!("engine_args: --token-delay-ms {v:?}: give 0 to {MAX_TOKEN_DELAY_MS}"));
            }
            "--exit-code" if v.parse::<u8>().is_err() => {
                return Err(format!("engine_args: --exit-code {v:?}: give 0 to 255"));
            }
            "--served-model-name" if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) => {
                return Err(format!("engine_args: --served-model-name {v:?}: give 1 to 256 printable characters"));
            }
            _ => {}
        }
    }
    Ok(())
}

pub fn processes(ctx: &LaunchContext<'_>, share: &NodeShare) -> Vec<pb::ShardProcess> {
    let world = ctx.spec.tp * ctx.spec.pp;
    share
        .ranks
        .iter()
        .map(|r| {
            let mut args = vec![
                "--rank".to_string(),
                r.rank.to_string(),
                "--world-size".into(),
                world.to_string(),
                "--master-addr".into(),
                ctx.master_addr.to_string(),
                "--master-port".into(),
                "{master_port}".into(),
            ];
            if r.rank == 0 {
                args.extend(["--health-port".to_string(), "{health_port}".to_string()]);
            }
            args.extend(ctx.spec.engine_args.iter().cloned());
            pb::ShardProcess {
                key: ProcKey::rank(r.rank).0,
                ranks: vec![r.rank as u32],
                program: pb::ShardProgram::Probe as i32,
                args,
                env: rank_env(ctx, share, r).into_iter().collect(),
                health_check: r.rank == 0,
                health_port: 0,
                startup_timeout_s: ctx.spec.startup_timeout.as_secs() as u32,
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    #[test]
    fn every_rank_is_a_process_and_rank_0_serves_health() {
        let (mut spec, shares, stages) = fixture::shares();
        spec.engine = crate::deploy::spec::Engine::Probe;
        let ctx = fixture::ctx(&spec, &shares, &stages);
        let p0 = processes(&ctx, &shares[0]);
        let p1 = processes(&ctx, &shares[1]);
        assert_eq!(p0.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["rank-0", "rank-1"]);
        assert!(p0[0].health_check && p0[0].args.contains(&"{health_port}".to_string()));
        assert!(!p1[0].health_check && p1[0].args.contains(&"10.0.0.1".to_string()));
    }

    #[test]
    fn only_the_probes_own_flags_are_taken() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_args(&a(&["--token-delay-ms", "5", "--served-model-name", "m"])).is_ok());
        let e = check_args(&a(&["--rank", "1"])).expect_err("owned");
        assert!(e.contains("does not take \"--rank\""), "{e}");
        let e = check_args(&a(&["--token-delay-ms", "x"])).expect_err("number");
        assert!(e.contains("give 0 to 10000"), "{e}");
        assert!(check_args(&a(&["--served-model-name"])).expect_err("value").contains("needs a value"));
    }
}
