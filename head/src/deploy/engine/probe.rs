//! The probe: one process per rank; every rank connects to rank 0 on the master port and rank 0
//! answers `GET /health` once the world is complete. For checking a cluster's wiring.

use tessera_common::ids::ProcKey;
use tessera_proto::v1 as pb;

use super::{LaunchContext, NodeShare, rank_env};

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
}
