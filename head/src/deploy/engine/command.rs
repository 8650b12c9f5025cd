//! The command engine: a shell template per rank, or per node (`--per node`), with torchrun's
//! variables. Workers run it only with `--allow-command`.

use tessera_common::ids::ProcKey;
use tessera_common::plan::placement::RankPlacement;
use tessera_proto::v1 as pb;

use super::{LaunchContext, NodeShare, rank_env, torchrun_env};

/// `s` as one word for `sh -c`: single quotes, with each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The template with its placeholders filled; `{args}` is the engine args, each shell-quoted, so
/// that an argument is one word and never a command.
fn fill(ctx: &LaunchContext<'_>, share: &NodeShare, rank: Option<&RankPlacement>) -> String {
    let s = ctx.spec;
    let ranks: Vec<String> = share.ranks.iter().map(|r| r.rank.to_string()).collect();
    let args: Vec<String> = s.engine_args.iter().map(|a| shell_quote(a)).collect();
    let mut t = s
        .command
        .replace("{model}", &shell_quote(&share.model))
        .replace("{tp}", &s.tp.to_string())
        .replace("{pp}", &s.pp.to_string())
        .replace("{world_size}", &(s.tp * s.pp).to_string())
        .replace("{ranks}", &ranks.join(","))
        .replace("{node_rank}", &share.node_rank.to_string())
        .replace("{nnodes}", &ctx.nodes.len().to_string())
        .replace("{master_addr}", &ctx.master_addr.to_string())
        .replace("{args}", &args.join(" "));
    if let Some(r) = rank {
        t = t
            .replace("{rank}", &r.rank.to_string())
            .replace("{tp_rank}", &r.tp_rank.to_string())
            .replace("{pp_rank}", &r.pp_rank.to_string());
    }
    t
}

pub fn processes(ctx: &LaunchContext<'_>, share: &NodeShare) -> Vec<pb::ShardProcess> {
    if ctx.spec.per_node {
        let first = &share.ranks[0];
        let mut env = torchrun_env(ctx, share, first.rank, 0);
        env.insert("CUDA_VISIBLE_DEVICES".into(), share.gpu_list());
        let (ls, _) = ctx.layers(first.pp_rank);
        let (_, le) = ctx.layers(share.ranks.last().map(|r| r.pp_rank).unwrap_or(first.pp_rank));
        env.insert("TESSERA_LAYER_START".into(), ls.to_string());
        env.insert("TESSERA_LAYER_END".into(), le.to_string());
        return vec![pb::ShardProcess {
            key: ProcKey::node(share.node_rank).0,
            ranks: share.ranks.iter().map(|r| r.rank as u32).collect(),
            program: pb::ShardProgram::Shell as i32,
            args: vec![fill(ctx, share, None)],
            env: env.into_iter().collect(),
            health_check: false,
            health_port: 0,
            startup_timeout_s: ctx.spec.startup_timeout.as_secs() as u32,
            ..Default::default()
        }];
    }
    share
        .ranks
        .iter()
        .map(|r| pb::ShardProcess {
            key: ProcKey::rank(r.rank).0,
            ranks: vec![r.rank as u32],
            program: pb::ShardProgram::Shell as i32,
            args: vec![fill(ctx, share, Some(r))],
            env: rank_env(ctx, share, r).into_iter().collect(),
            health_check: false,
            health_port: 0,
            startup_timeout_s: ctx.spec.startup_timeout.as_secs() as u32,
            ..Default::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    #[test]
    fn each_rank_gets_torchrun_variables() {
        let (spec, shares, stages) = fixture::shares();
        let ctx = fixture::ctx(&spec, &shares, &stages);
        let procs = processes(&ctx, &shares[1]);
        assert_eq!(procs.len(), 2);
        let p = &procs[1];
        assert_eq!(p.key, "rank-3");
        assert_eq!(p.args, vec!["run '{staged_model}' rank=3 tp=1 pp=1 node=1/2 at 10.0.0.1".to_string()]);
        let env = |k: &str| p.env.get(k).cloned().unwrap_or_default();
        for (k, v) in [
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "{master_port}"),
            ("CUDA_VISIBLE_DEVICES", "1"),
            ("TESSERA_DEPLOYMENT", "llama"),
            ("TESSERA_GENERATION", "7"),
            ("TESSERA_TP_RANK", "1"),
            ("TESSERA_PP_RANK", "1"),
            ("TESSERA_LAYER_START", "16"),
            ("TESSERA_LAYER_END", "32"),
        ] {
            assert_eq!(env(k), v, "{k}");
        }
    }

    #[test]
    fn per_node_commands_hold_the_node_gpus() {
        let (mut spec, shares, stages) = fixture::shares();
        spec.per_node = true;
        let ctx = fixture::ctx(&spec, &shares, &stages);
        let p = &processes(&ctx, &shares[0])[0];
        assert_eq!((p.key.as_str(), p.ranks.clone()), ("node-0", vec![0, 1]));
        assert_eq!(p.env.get("CUDA_VISIBLE_DEVICES").map(String::as_str), Some("2,3"));
        assert_eq!(p.env.get("TESSERA_LAYER_END").map(String::as_str), Some("16"));
    }

    #[test]
    fn args_are_quoted_so_that_none_becomes_a_command() {
        let (mut spec, shares, stages) = fixture::shares();
        spec.command = "echo {args}".into();
        spec.engine_args = vec!["a; touch X".into(), "it's".into(), "--flag=1".into(), String::new()];
        let ctx = fixture::ctx(&spec, &shares, &stages);
        let p = &processes(&ctx, &shares[0])[0];
        assert_eq!(p.args[0], r#"echo 'a; touch X' 'it'\''s' --flag=1 ''"#);
        let out = std::process::Command::new("/bin/sh").arg("-c").arg(&p.args[0]).output().expect("sh runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a; touch X it's --flag=1 \n");
    }
}
