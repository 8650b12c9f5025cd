//! The deployments' state machine driven with plain values: every bug of the redesign issue has a
//! test here, written against the effects the machine returns.

use std::net::IpAddr;
use std::sync::Arc;

use tessera_common::fake::FakeGpuSpec;
use tessera_common::node::JoinInfo;

use super::*;
use crate::deploy::spec::{DEFAULT_DRAIN_TIMEOUT, Engine};

const GIB: u64 = 1 << 30;

fn llama() -> LoadedModel {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/model-configs/Llama-3.1-8B-Instruct.json");
    LoadedModel::of(&tessera_common::model::load_model(&path).expect("model config"))
}

fn spec(name: &str, tp: u64, pp: u64) -> DeploymentSpec {
    let mut s = DeploymentSpec::from_request(&pb::CreateDeploymentRequest {
        name: name.into(),
        model_path: "/models/llama".into(),
        tp: tp as u32,
        pp: pp as u32,
        engine: pb::Engine::Probe as i32,
        max_restarts: 3,
        ..Default::default()
    })
    .expect("valid spec");
    s.engine = Engine::Probe;
    s
}

fn node(i: u128, name: &str, gpus: u32, is_head: bool) -> NodeView {
    let info = JoinInfo {
        node_id: Some(nid(i)),
        name: name.into(),
        labels: Default::default(),
        advertise_address: None,
        inventory: FakeGpuSpec { count: gpus, memory_bytes: 80 * GIB }.inventory(name),
        version: "test".into(),
        is_head,
        machine_fingerprint: name.into(),
        hostname: name.into(),
        capabilities: Default::default(),
    };
    NodeView {
        id: nid(i),
        info: Arc::new(info),
        state: NodeState::Alive,
        draining: false,
        address: IpAddr::from([10, 0, 0, i as u8]),
        last_heartbeat_ago: Duration::ZERO,
        state_reason: "joined".into(),
        state_since_ago: Duration::ZERO,
        joined_ago: Duration::ZERO,
        gpu_memory_used: vec![0; gpus as usize],
    }
}

fn nid(i: u128) -> NodeId {
    NodeId(uuid::Uuid::from_u128(i))
}

/// A machine, a clock, and helpers that play the shell: persists succeed unless told otherwise.
struct H {
    m: Machine,
    now: Instant,
    unix: u64,
    nodes: Vec<NodeView>,
    next_reply: ReplyId,
}

impl H {
    fn new(nodes: Vec<NodeView>) -> H {
        let mut h =
            H { m: Machine::new(Duration::from_secs(10)), now: Instant::now(), unix: 1_000_000, nodes, next_reply: 1 };
        let all = h.nodes.clone();
        h.feed(Input::NodesListed(all));
        h
    }

    fn at(&self) -> At {
        At { now: self.now, unix_ms: self.unix }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.unix += d.as_millis() as u64;
    }

    /// Feeds one input; every write it asks for succeeds. Returns the other effects, in order.
    fn feed(&mut self, input: Input) -> Vec<Effect> {
        let first = self.m.handle(input, self.at());
        self.complete(first)
    }

    fn complete(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        let mut out = Vec::new();
        let mut queue: std::collections::VecDeque<Effect> = effects.into();
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Persist(id, _) => queue.extend(self.m.handle(Input::Persisted(id), self.at())),
                other => out.push(other),
            }
        }
        out
    }

    fn reply(&mut self) -> ReplyId {
        self.next_reply += 1;
        self.next_reply
    }

    fn create(&mut self, s: DeploymentSpec) -> Vec<Effect> {
        let reply = self.reply();
        self.feed(Input::Create { spec: Box::new(s), model: Box::new(llama()), reply })
    }

    fn tick_after(&mut self, d: Duration) -> Vec<Effect> {
        self.advance(d);
        self.feed(Input::Tick)
    }

    fn dep(&self, name: &str) -> pb::Deployment {
        self.m.get(name, self.now).expect("deployment exists")
    }

    /// Plays every worker: reports each launched process RUNNING (ports from node rank 0), then
    /// READY, until nothing more is launched. Returns the effects seen.
    fn run_launches(&mut self, mut effects: Vec<Effect>) -> Vec<Effect> {
        let mut seen = Vec::new();
        loop {
            let launches: Vec<(NodeId, pb::LaunchShards)> = effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Launch(n, l) => Some((*n, l.clone())),
                    _ => None,
                })
                .collect();
            seen.append(&mut effects);
            if launches.is_empty() {
                return seen;
            }
            for (n, l) in launches {
                for p in &l.processes {
                    let r = report(&l, p, pb::ProcessState::Running, if l.pick_ports { 29500 } else { 0 });
                    effects.extend(self.feed(Input::Report { node: n, report: r }));
                }
            }
        }
    }

    /// Reports every process of the current generation READY from its own node.
    fn all_ready(&mut self, launches: &[(NodeId, pb::LaunchShards)]) -> Vec<Effect> {
        let mut out = Vec::new();
        for (n, l) in launches {
            for p in &l.processes {
                out.extend(self.feed(Input::Report { node: *n, report: report(l, p, pb::ProcessState::Ready, 0) }));
            }
        }
        out
    }
}

fn report(l: &pb::LaunchShards, p: &pb::ShardProcess, state: pb::ProcessState, port: u32) -> pb::ShardReport {
    pb::ShardReport {
        deployment: l.deployment.clone(),
        deployment_uid: l.deployment_uid.clone(),
        generation: l.generation,
        key: p.key.clone(),
        ranks: p.ranks.clone(),
        pid: 100,
        state: state as i32,
        master_port: port,
        health_port: if port > 0 { port + 1 } else { 0 },
        ..Default::default()
    }
}

fn exited(l: &pb::LaunchShards, key: &str, code: Option<i32>, signal: Option<i32>, at_ms: u64) -> pb::ShardReport {
    let p = l.processes.iter().find(|p| p.key == key).expect("key in launch");
    pb::ShardReport { exit_code: code, signal, exited_unix_ms: at_ms, ..report(l, p, pb::ProcessState::Exited, 0) }
}

fn launches(effects: &[Effect]) -> Vec<(NodeId, pb::LaunchShards)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Launch(n, l) => Some((*n, l.clone())),
            _ => None,
        })
        .collect()
}

fn emits(effects: &[Effect]) -> Vec<(pb::DeploymentState, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Emit(d) => Some((pb::DeploymentState::try_from(d.state).expect("state"), d.message.clone())),
            _ => None,
        })
        .collect()
}

fn stops(effects: &[Effect]) -> Vec<(NodeId, pb::StopShards)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(n, pb::head_message::Msg::Stop(s)) => Some((*n, s.clone())),
            _ => None,
        })
        .collect()
}

fn replies(effects: &[Effect]) -> Vec<Result<pb::Deployment, DeployError>> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Reply(_, r) => Some(r.clone().map(|d| *d)),
            _ => None,
        })
        .collect()
}

/// A TP 4 x PP 2 probe group on a head and a worker with 4 GPUs each, running.
fn running_pair() -> (H, Vec<(NodeId, pb::LaunchShards)>) {
    let mut h = H::new(vec![node(1, "head", 4, true), node(2, "w1", 4, false)]);
    let created = h.create(spec("p1", 4, 2));
    let effects = h.run_launches(created);
    let ls = launches(&effects);
    assert_eq!(ls.len(), 2, "one launch per node");
    h.all_ready(&ls);
    assert_eq!(h.dep("p1").state, pb::DeploymentState::Running as i32);
    (h, ls)
}

#[test]
fn nothing_is_launched_before_its_generation_is_durable() {
    let mut h = H::new(vec![node(1, "head", 4, true), node(2, "w1", 4, false)]);
    let reply = h.reply();
    let first = h.m.handle(Input::Create { spec: Box::new(spec("p1", 4, 2)), model: Box::new(llama()), reply }, h.at());
    let persist: Vec<&Effect> = first.iter().filter(|e| matches!(e, Effect::Persist(..))).collect();
    assert_eq!(persist.len(), 1, "one write for the record and its first generation: {first:?}");
    assert!(launches(&first).is_empty() && replies(&first).is_empty(), "nothing leaves before the write: {first:?}");
    let Effect::Persist(id, Write::Put(rec)) = persist[0] else { panic!("a put") };
    assert_eq!(rec.generation, 1);
    assert_eq!(rec.launch.as_ref().map(|l| l.gpus.len()), Some(8));
    let after = h.m.handle(Input::Persisted(*id), h.at());
    assert!(matches!(replies(&after).as_slice(), [Ok(_)]), "{after:?}");
    let ls = launches(&after);
    assert_eq!(ls.len(), 1, "node rank 0 first: {after:?}");
    assert_eq!((ls[0].0, ls[0].1.pick_ports, ls[0].1.generation), (nid(1), true, 1));
    assert!(!ls[0].1.deployment_uid.is_empty());
}

#[test]
fn a_failed_write_refuses_the_create_and_holds_nothing() {
    let mut h = H::new(vec![node(1, "head", 4, true), node(2, "w1", 4, false)]);
    let reply = h.reply();
    let first = h.m.handle(Input::Create { spec: Box::new(spec("p1", 4, 2)), model: Box::new(llama()), reply }, h.at());
    let Some(Effect::Persist(id, _)) = first.iter().find(|e| matches!(e, Effect::Persist(..))) else { panic!() };
    let after = h.m.handle(Input::PersistFailed(*id, "No space left on device".into()), h.at());
    let r = replies(&after);
    assert!(matches!(&r[..], [Err(DeployError::Store { message, .. })] if message.contains("No space")), "{after:?}");
    assert!(launches(&after).is_empty());
    assert_eq!(h.m.reservation_counts(), (0, 0));
    assert!(matches!(h.m.get("p1", h.now), Err(DeployError::NotFound(_))));
}

#[test]
fn ranks_wait_for_node_0_ports_then_running_is_one_event() {
    let mut h = H::new(vec![node(1, "head", 4, true), node(2, "w1", 4, false)]);
    let created = h.create(spec("p1", 4, 2));
    assert_eq!(
        emits(&created),
        vec![(pb::DeploymentState::Starting, "generation 1: launching 8 process(es) on 2 node(s)".into())]
    );
    let effects = h.run_launches(created);
    let ls = launches(&effects);
    assert_eq!(ls[1].1.master_port, 29500, "the others get node rank 0's port");
    // Process progress is not an event; the deployment's transition to running is one.
    let ready = h.all_ready(&ls);
    assert_eq!(emits(&ready).len(), 1, "{ready:?}");
    assert_eq!(emits(&ready)[0].0, pb::DeploymentState::Running);
}

#[test]
fn the_first_failure_is_blamed_once_and_counted_once() {
    let (mut h, ls) = running_pair();
    let w1 = &ls[1].1;
    // rank 7 is killed at t=1000; rank 3 (other node) loses its peer and exits at 1005, and its
    // report arrives first.
    let mut effects =
        h.feed(Input::Report { node: nid(1), report: exited(&ls[0].1, "rank-3", Some(1), None, h.unix + 5) });
    assert_eq!(stops(&effects).len(), 2, "the whole generation is stopped at once: {effects:?}");
    assert!(emits(&effects).is_empty(), "the event waits for the settle time");
    effects.extend(h.feed(Input::Report { node: nid(2), report: exited(w1, "rank-7", None, Some(9), h.unix + 2) }));
    // The rest exit because they were told to.
    for k in ["rank-4", "rank-5", "rank-6"] {
        effects.extend(h.feed(Input::Report { node: nid(2), report: exited(w1, k, None, Some(15), h.unix + 50) }));
    }
    effects.extend(h.tick_after(SETTLE));
    let events = emits(&effects);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, pb::DeploymentState::Restarting);
    assert!(events[0].1.starts_with("rank 7 (rank-7 on w1) was killed by signal 9"), "{}", events[0].1);
    assert_eq!(stops(&effects).len(), 2, "no stop repeated");
    // More exits of the old generation change nothing.
    let late = h.feed(Input::Report { node: nid(1), report: exited(&ls[0].1, "rank-0", None, Some(15), h.unix) });
    assert!(emits(&late).is_empty() && stops(&late).is_empty(), "{late:?}");
    // After the backoff: generation 2, written before it is launched, on the same GPUs.
    let before: Vec<String> = h.dep("p1").ranks.iter().map(|r| format!("{}/{:?}", r.node, r.gpu_indices)).collect();
    let relaunch = h.tick_after(BASE_BACKOFF);
    let ls2 = launches(&relaunch);
    assert_eq!((ls2.len(), ls2[0].1.generation), (1, 2), "{relaunch:?}");
    assert_eq!(emits(&relaunch).len(), 1, "{relaunch:?}");
    let after: Vec<String> = h.dep("p1").ranks.iter().map(|r| format!("{}/{:?}", r.node, r.gpu_indices)).collect();
    assert_eq!(before, after);
    assert_eq!(h.dep("p1").restarts, 1);
}

#[test]
fn a_restarting_group_keeps_its_gpus_from_pending_deployments() {
    let mut h = H::new(vec![node(1, "head", 4, true)]);
    let c1 = h.create(spec("p1", 4, 1));
    let ls = launches(&h.run_launches(c1));
    h.all_ready(&ls);
    h.create(spec("p2", 4, 1));
    assert_eq!(h.dep("p2").state, pb::DeploymentState::Pending as i32);
    h.feed(Input::Report { node: nid(1), report: exited(&ls[0].1, "rank-2", None, Some(9), h.unix) });
    // Settling, backing off, and every pending retry in between: p2 never gets p1's GPUs.
    for _ in 0..4 {
        h.tick_after(Duration::from_millis(200));
        assert_eq!(h.dep("p2").state, pb::DeploymentState::Pending as i32);
    }
    h.tick_after(PENDING_RETRY);
    assert_eq!(h.dep("p1").state, pb::DeploymentState::Starting as i32);
    assert_eq!(h.dep("p1").generation, 2);
    assert_eq!(h.dep("p2").state, pb::DeploymentState::Pending as i32);
    assert_eq!(h.m.reservation_counts(), (4, 4));
}

#[test]
fn a_new_deployment_with_an_old_name_is_a_new_incarnation() {
    let (mut h, ls) = running_pair();
    let old_uid = ls[0].1.deployment_uid.clone();
    let reply = h.reply();
    h.feed(Input::Delete { name: "p1".into(), reply });
    let generation = h.dep("p1").generation;
    h.advance(DRAIN_NOTICE);
    let del = h.feed(Input::Load { name: "p1".into(), generation, in_flight: Some(0) });
    assert!(stops(&del).iter().all(|(_, s)| s.below_generation == 0 && s.deployment_uid == old_uid));
    for (n, l) in &ls {
        for p in &l.processes {
            h.feed(Input::Report { node: *n, report: exited(l, &p.key, None, Some(15), h.unix) });
        }
    }
    assert!(h.m.get("p1", h.now).is_err(), "gone once every process confirmed");
    let created = h.create(spec("p1", 4, 2));
    let ls2 = launches(&created);
    assert_eq!(ls2[0].1.generation, 1);
    assert_ne!(ls2[0].1.deployment_uid, old_uid);
    // A late report of the old incarnation, same name and generation, is fenced, not counted.
    let late = h.feed(Input::Report {
        node: nid(1),
        report: report(&ls[0].1, &ls[0].1.processes[0], pb::ProcessState::Ready, 0),
    });
    let s = stops(&late);
    assert_eq!(s.len(), 1, "{late:?}");
    assert_eq!(s[0].1.deployment_uid, ls2[0].1.deployment_uid, "keep the new incarnation, stop the rest");
    assert_eq!(h.dep("p1").ranks[0].state, pb::ProcessState::Starting as i32);
}

#[test]
fn a_delete_whose_write_fails_is_refused_and_changes_nothing() {
    let (mut h, _) = running_pair();
    let reply = h.reply();
    let first = h.m.handle(Input::Delete { name: "p1".into(), reply }, h.at());
    assert!(stops(&first).is_empty(), "nothing is stopped before the record is gone");
    let Some(Effect::Persist(id, Write::Remove(name))) = first.first() else { panic!("{first:?}") };
    assert_eq!(name, "p1");
    let after = h.m.handle(Input::PersistFailed(*id, "I/O error".into()), h.at());
    assert!(matches!(&replies(&after)[..], [Err(DeployError::Store { .. })]), "{after:?}");
    assert!(stops(&after).is_empty());
    assert_eq!(h.dep("p1").state, pb::DeploymentState::Running as i32);
}

#[test]
fn a_launch_too_big_to_deliver_fails_the_deployment_and_frees_its_gpus() {
    let mut h = H::new(vec![node(1, "head", 8, true)]);
    let mut s = spec("big", 8, 1);
    // Past Create's limits (as a record from an older head could be): 8 ranks x 1 MiB of env.
    s.env.insert("BIG".into(), "x".repeat(1 << 20));
    let effects = h.create(s);
    assert!(launches(&effects).is_empty(), "never handed to a worker");
    let d = h.dep("big");
    assert_eq!(d.state, pb::DeploymentState::Failed as i32);
    assert!(d.message.contains("more than the 3145728 a worker accepts"), "{}", d.message);
    assert_eq!(h.m.reservation_counts(), (0, 0));
}

#[test]
fn a_node_that_rejoins_without_its_processes_restarts_the_group() {
    let (mut h, _) = running_pair();
    let mut effects = h.feed(Input::NodeJoined { node: nid(2), running: Vec::new() });
    effects.extend(h.tick_after(SETTLE));
    let events = emits(&effects);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].1.contains("rank-4, rank-5, rank-6, rank-7 on w1 not running"), "{}", events[0].1);
}

#[test]
fn ranks_past_u32_are_not_found_not_rank_0() {
    let (h, _) = running_pair();
    assert!(matches!(h.m.locate("p1", 1 << 32), Err(DeployError::NoSuchRank { rank: 4294967296, .. })));
    assert_eq!(h.m.locate("p1", 0).map(|(n, k)| (n, k.0)), Ok((nid(1), "rank-0".to_string())));
}

#[test]
fn reports_count_only_from_the_node_the_process_was_placed_on() {
    let (mut h, ls) = running_pair();
    // Node 1 claims rank 7 (placed on node 2) exited.
    let forged = h.feed(Input::Report { node: nid(1), report: exited(&ls[1].1, "rank-7", Some(1), None, h.unix) });
    assert!(forged.is_empty(), "{forged:?}");
    h.tick_after(Duration::from_secs(1));
    assert_eq!(h.dep("p1").state, pb::DeploymentState::Running as i32);
}

#[test]
fn a_dead_node_is_blamed_over_the_exits_it_causes() {
    let (mut h, ls) = running_pair();
    let mut effects =
        h.feed(Input::Report { node: nid(1), report: exited(&ls[0].1, "rank-0", Some(1), None, h.unix - 500) });
    let mut dead = node(2, "w1", 4, false);
    dead.state = NodeState::Dead;
    dead.state_reason = "no heartbeat for 3s".into();
    effects.extend(h.feed(Input::NodeChanged(Box::new(dead))));
    effects.extend(h.tick_after(SETTLE));
    let events = emits(&effects);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].1.starts_with("node w1 is dead: no heartbeat for 3s"), "{}", events[0].1);
    // No spare node: it waits for GPUs and holds none meanwhile.
    h.tick_after(Duration::from_secs(1));
    assert_eq!(h.dep("p1").state, pb::DeploymentState::Pending as i32);
    assert_eq!(h.m.reservation_counts(), (0, 0));
}

#[test]
fn a_generation_whose_write_fails_is_not_launched() {
    let (mut h, ls) = running_pair();
    h.feed(Input::Report { node: nid(1), report: exited(&ls[0].1, "rank-0", Some(1), None, h.unix) });
    h.tick_after(SETTLE);
    h.advance(BASE_BACKOFF);
    let first = h.m.handle(Input::Tick, h.at());
    let Some(Effect::Persist(id, Write::Put(rec))) = first.iter().find(|e| matches!(e, Effect::Persist(..))) else {
        panic!("{first:?}")
    };
    assert_eq!(rec.generation, 2);
    assert!(launches(&first).is_empty());
    let after = h.m.handle(Input::PersistFailed(*id, "disk full".into()), h.at());
    assert!(launches(&after).is_empty(), "{after:?}");
    let settled = h.tick_after(SETTLE);
    let events = emits(&settled);
    assert!(
        events
            .iter()
            .any(|(s, m)| *s == pb::DeploymentState::Restarting && m.contains("cannot record generation 2: disk full")),
        "{events:?}"
    );
}

#[test]
fn after_a_head_restart_running_processes_are_adopted_without_a_launch() {
    let (h, ls) = running_pair();
    let rec = record::to_stored(&h.m.deps["p1"], h.at());
    let mut h2 = H::new(h.nodes.clone());
    h2.m.recover(vec![rec], |_: &StoredDeployment| Some(llama()), h2.at());
    assert_eq!(h2.dep("p1").state, pb::DeploymentState::Starting as i32);
    assert_eq!(h2.m.reservation_counts(), (8, 8));
    let mut effects = Vec::new();
    for (n, l) in &ls {
        let running: Vec<pb::ShardReport> =
            l.processes.iter().map(|p| report(l, p, pb::ProcessState::Ready, 0)).collect();
        effects.extend(h2.feed(Input::NodeJoined { node: *n, running }));
    }
    assert!(launches(&effects).is_empty() && stops(&effects).is_empty(), "{effects:?}");
    assert_eq!(h2.dep("p1").state, pb::DeploymentState::Running as i32);
    assert_eq!(h2.dep("p1").generation, 1);
}

#[test]
fn a_deleted_deployment_frees_its_gpus_for_a_pending_one() {
    let mut h = H::new(vec![node(1, "head", 4, true)]);
    let c1 = h.create(spec("p1", 4, 1));
    let ls = launches(&h.run_launches(c1));
    h.create(spec("p2", 4, 1));
    let reply = h.reply();
    h.feed(Input::Delete { name: "p1".into(), reply });
    for p in &ls[0].1.processes {
        h.feed(Input::Report { node: nid(1), report: exited(&ls[0].1, &p.key, None, Some(15), h.unix) });
    }
    assert_eq!(h.dep("p2").state, pb::DeploymentState::Starting as i32);
    assert_eq!(h.m.reservation_counts(), (4, 4));
}

#[test]
fn a_delete_while_starting_waits_only_for_what_was_launched() {
    let mut h = H::new(vec![node(1, "head", 4, true), node(2, "w1", 4, false)]);
    let created = h.create(spec("p1", 4, 2));
    let ls = launches(&created);
    assert_eq!(ls.len(), 1, "only node rank 0 was told so far");
    let reply = h.reply();
    let del = h.feed(Input::Delete { name: "p1".into(), reply });
    let s = stops(&del);
    assert_eq!(s.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![nid(1)], "node 1 was never told to launch");
    assert_eq!(h.dep("p1").state, pb::DeploymentState::Stopping as i32);
    // Node rank 0's processes confirm they are gone: the deployment is, and so are its GPUs.
    let mut effects = Vec::new();
    for p in &ls[0].1.processes {
        effects
            .extend(h.feed(Input::Report { node: nid(1), report: exited(&ls[0].1, &p.key, None, Some(15), h.unix) }));
    }
    assert!(h.m.get("p1", h.now).is_err());
    assert_eq!(emits(&effects).last().map(|e| e.0), Some(pb::DeploymentState::Stopped));
    assert_eq!(h.m.reservation_counts(), (0, 0));
    // A late ports report of the deleted generation launches nothing.
    let late = h.feed(Input::Report {
        node: nid(1),
        report: report(&ls[0].1, &ls[0].1.processes[0], pb::ProcessState::Running, 29500),
    });
    assert!(launches(&late).is_empty(), "{late:?}");
}

#[test]
fn a_node_that_hosts_nothing_of_a_deployment_learns_nothing_from_its_answer() {
    let mut h = H::new(vec![node(1, "head", 4, true), node(3, "nosy", 4, false)]);
    let created = h.create(spec("p1", 4, 1));
    let ls = launches(&h.run_launches(created));
    h.all_ready(&ls);
    let probe = |deployment: &str| pb::ShardReport {
        deployment: deployment.into(),
        generation: 7,
        key: "rank-0".into(),
        state: pb::ProcessState::Running as i32,
        ..Default::default()
    };
    let known = stops(&h.feed(Input::Report { node: nid(3), report: probe("p1") }));
    let unknown = stops(&h.feed(Input::Report { node: nid(3), report: probe("nope") }));
    let strip = |s: &[(NodeId, pb::StopShards)]| {
        s.iter().map(|(n, s)| (*n, s.below_generation, s.deployment_uid.clone(), s.reason.clone())).collect::<Vec<_>>()
    };
    assert_eq!(strip(&known), strip(&unknown), "the same answer for a real and a made-up name");
    assert_eq!(h.dep("p1").state, pb::DeploymentState::Running as i32);
}

#[test]
fn a_relisted_table_after_lagged_events_misses_no_death() {
    let (mut h, _) = running_pair();
    // Events were dropped; the shell reads the whole table again: w1 is dead there (or gone).
    let mut dead = node(2, "w1", 4, false);
    dead.state = NodeState::Dead;
    dead.state_reason = "no heartbeat for 3s".into();
    let mut effects = h.feed(Input::NodesListed(vec![node(1, "head", 4, true), dead]));
    effects.extend(h.tick_after(SETTLE));
    let events = emits(&effects);
    assert!(
        events.iter().any(|(s, m)| *s == pb::DeploymentState::Restarting && m.starts_with("node w1 is dead")),
        "{events:?}"
    );

    let (mut h, _) = running_pair();
    let mut effects = h.feed(Input::NodesListed(vec![node(1, "head", 4, true)]));
    effects.extend(h.tick_after(SETTLE));
    let events = emits(&effects);
    assert!(events.iter().any(|(_, m)| m.contains("is no longer a member")), "{events:?}");
}

fn with_caps(mut n: NodeView, caps: tessera_common::node::Capabilities) -> NodeView {
    let mut info = (*n.info).clone();
    info.capabilities = caps;
    n.info = Arc::new(info);
    n
}

fn no_vllm() -> tessera_common::node::Capabilities {
    tessera_common::node::Capabilities {
        vllm: Err("no `vllm` on PATH".into()),
        command_allowed: false,
        reported: true,
        transfer_port: 0,
    }
}

fn vllm_spec(name: &str, tp: u64) -> DeploymentSpec {
    let mut s = spec(name, tp, 1);
    s.engine = Engine::Vllm;
    s
}

#[test]
fn an_unhealthy_engine_restarts_its_group_with_the_checks_verdict() {
    let (mut h, ls) = running_pair();
    let (n, l) = &ls[0];
    let p = &l.processes[0];
    let r = pb::ShardReport {
        error: "no progress: 1 request(s) running and 0 waiting, but no token produced for 30s".into(),
        log_tail: "INFO serving\n".into(),
        ..report(l, p, pb::ProcessState::Unhealthy, 0)
    };
    let out = h.feed(Input::Report { node: *n, report: r });
    assert_eq!(stops(&out).len(), 2, "the whole group is stopped: {out:?}");
    // A stopped hung rank dies of SIGKILL after the grace: the verdict stays the reason.
    let late = exited(&ls[1].1, &ls[1].1.processes[0].key, None, Some(9), h.unix + 10_000);
    h.feed(Input::Report { node: ls[1].0, report: late });
    let settled = h.tick_after(SETTLE);
    let e = emits(&settled);
    assert_eq!(e.len(), 1, "{settled:?}");
    assert_eq!(e[0].0, pb::DeploymentState::Restarting);
    assert!(e[0].1.starts_with(&format!("{} on head is unhealthy: no progress", p.key)), "{}", e[0].1);
    assert!(e[0].1.contains("last log lines: INFO serving"), "{}", e[0].1);
    assert_eq!(h.dep("p1").restarts, 1);
}

fn permanent_exit(l: &pb::LaunchShards) -> pb::ShardReport {
    pb::ShardReport {
        error: "vllm is not installed on this node: no `vllm` on PATH".into(),
        permanent: true,
        exit_code: Some(127),
        ..report(l, &l.processes[0], pb::ProcessState::Exited, 0)
    }
}

#[test]
fn a_node_that_cannot_start_the_engine_is_left_out_and_the_group_moves() {
    let mut h =
        H::new(vec![with_caps(node(1, "head", 4, true), no_vllm()), node(2, "w1", 4, false), node(3, "w2", 4, false)]);
    let created = h.create(vllm_spec("v1", 4));
    let ls = launches(&created);
    let (n, l) = &ls[0];
    h.feed(Input::Report { node: *n, report: permanent_exit(l) });
    let mut seen = h.tick_after(SETTLE);
    seen.extend(h.tick_after(Duration::from_secs(60)));
    let next = launches(&seen);
    assert_eq!(next.len(), 1, "relaunched once");
    assert_ne!(next[0].0, *n, "not on the node that cannot run it");
    assert_eq!(next[0].1.generation, 2);
}

#[test]
fn an_engine_no_node_can_start_fails_at_once() {
    let mut h = H::new(vec![with_caps(node(1, "head", 4, true), no_vllm()), node(2, "w1", 4, false)]);
    let created = h.create(vllm_spec("v1", 4));
    let ls = launches(&created);
    let (n, l) = &ls[0];
    assert_eq!(*n, nid(2));
    h.feed(Input::Report { node: *n, report: permanent_exit(l) });
    let settled = h.tick_after(SETTLE);
    let d = h.dep("v1");
    assert_eq!(d.state, pb::DeploymentState::Failed as i32, "{settled:?}");
    assert!(
        d.message.contains("no `vllm` on PATH") && d.message.contains("no node can run the vllm engine"),
        "{}",
        d.message
    );
    assert_eq!(d.restarts, 0);
    assert!(launches(&h.tick_after(Duration::from_secs(60))).is_empty(), "never relaunched");
    assert_eq!(h.m.reservation_counts().0, 0, "its GPUs are free");
}

#[test]
fn deployments_are_placed_only_on_nodes_that_can_run_their_engine() {
    // The head cannot run vllm; w1 can: a TP 4 vllm group goes to w1 alone.
    let mut h = H::new(vec![with_caps(node(1, "head", 4, true), no_vllm()), node(2, "w1", 4, false)]);
    let created = h.create(vllm_spec("v1", 4));
    assert!(matches!(replies(&created).as_slice(), [Ok(_)]), "{created:?}");
    let ls = launches(&created);
    assert_eq!(ls.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![nid(2)]);
    // A second one has no capable node with free GPUs: pending, saying which node cannot run it.
    let out = h.create(vllm_spec("v2", 4));
    let d = h.dep("v2");
    assert_eq!(d.state, pb::DeploymentState::Pending as i32, "{out:?}");
    assert!(d.message.contains("1 node(s) that cannot run it: head: no `vllm` on PATH"), "{}", d.message);
    // Probe deployments run anywhere.
    let out = h.create(spec("p1", 4, 1));
    assert_eq!(launches(&out)[0].0, nid(1));
}

#[test]
fn a_deployment_no_node_can_run_is_refused_with_each_nodes_reason() {
    let mut h =
        H::new(vec![with_caps(node(1, "head", 4, true), no_vllm()), with_caps(node(2, "w1", 4, false), no_vllm())]);
    let out = h.create(vllm_spec("v1", 4));
    let r = replies(&out);
    let [Err(DeployError::InvalidPlan(msg))] = r.as_slice() else { panic!("refused: {out:?}") };
    assert!(msg.contains("no node can run the vllm engine: head: no `vllm` on PATH; w1: no `vllm` on PATH"), "{msg}");
    assert_eq!(h.m.reservation_counts(), (0, 0));
}

#[test]
fn a_failed_check_after_a_crash_does_not_hide_the_crash() {
    let (mut h, ls) = running_pair();
    let (n1, l1) = &ls[1];
    let crash = exited(l1, &l1.processes[0].key, Some(1), None, h.unix);
    h.feed(Input::Report { node: *n1, report: crash });
    // Node rank 0's checks fail as the group stops.
    h.advance(Duration::from_millis(100));
    let (n0, l0) = &ls[0];
    let r = pb::ShardReport {
        error: "/health failed 3 times in a row: connection refused".into(),
        ..report(l0, &l0.processes[0], pb::ProcessState::Unhealthy, 0)
    };
    h.feed(Input::Report { node: *n0, report: r });
    let settled = h.tick_after(SETTLE);
    let e = emits(&settled);
    assert!(e[0].1.contains("exited with code 1") && !e[0].1.contains("/health"), "{}", e[0].1);
}

/// The launches of one group, by node.
type Launches = Vec<(NodeId, pb::LaunchShards)>;

/// Replicas 0 and 1 of a TP 2 deployment `m` created and launched on `nodes` (not yet ready):
/// the machine and each replica's launches.
fn two_replicas(nodes: Vec<NodeView>) -> (H, Launches, Launches) {
    let mut h = H::new(nodes);
    let c0 = h.create(spec("m", 2, 1));
    let e0 = h.run_launches(c0);
    let mut s1 = spec("m", 2, 1);
    s1.name = crate::deploy::spec::group_key("m", 1);
    let c1 = h.create(s1);
    let e1 = h.run_launches(c1);
    (h, launches(&e0), launches(&e1))
}

#[test]
fn replicas_are_groups_of_their_own_and_show_under_their_deployment() {
    // Two replicas of TP 2: each its own group, GPUs, launch and generation.
    let (mut h, l0, l1) = two_replicas(vec![node(1, "head", 2, true), node(2, "w1", 2, false)]);
    assert_eq!((l0.len(), l1.len()), (1, 1));
    assert_ne!(l0[0].0, l1[0].0, "each replica on its own GPUs (here: its own node)");
    assert_eq!(l1[0].1.deployment, "m.1", "the group key travels to the worker");
    let env1 = &l1[0].1.processes[0].env;
    assert_eq!(env1.get("TESSERA_DEPLOYMENT").map(String::as_str), Some("m"), "engines see the deployment's name");
    assert_eq!(env1.get("TESSERA_REPLICA").map(String::as_str), Some("1"));
    h.all_ready(&l0);
    h.all_ready(&l1);

    // One deployment with two replicas, replica 0 first; the group key is not a deployment.
    let d = h.dep("m");
    let states: Vec<(u32, i32, u64)> = d.replicas.iter().map(|r| (r.index, r.state, r.generation)).collect();
    let running = pb::DeploymentState::Running as i32;
    assert_eq!(states, [(0, running, 1), (1, running, 1)]);
    assert!(d.replicas.iter().all(|r| !r.endpoint.is_empty()), "each has its endpoint");
    assert_eq!(h.m.list(h.now).iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["m"]);
    assert_eq!(h.m.group_keys("m"), ["m", "m.1"]);
    assert!(h.m.group_keys("m.1").is_empty() && h.m.group_keys("x").is_empty());

    // Replica 1's rank dies: only replica 1 restarts; replica 0 is not touched.
    let report = exited(&l1[0].1, &l1[0].1.processes[0].key.clone(), Some(1), None, h.unix);
    let effects = h.feed(Input::Report { node: l1[0].0, report });
    let st = stops(&effects);
    assert!(!st.is_empty() && st.iter().all(|(n, s)| *n == l1[0].0 && s.deployment == "m.1"), "only its group stops");
    let effects = h.tick_after(SETTLE);
    assert_eq!(emits(&effects).first().map(|e| e.0), Some(pb::DeploymentState::Restarting));
    let d = h.dep("m");
    assert_eq!((d.replicas[0].state, d.replicas[0].generation), (running, 1), "replica 0 serves on");
    assert_eq!(d.replicas[1].state, pb::DeploymentState::Restarting as i32);
    let relaunch = h.tick_after(BASE_BACKOFF);
    let ls2 = launches(&relaunch);
    assert_eq!(ls2.iter().map(|(_, l)| (l.deployment.as_str(), l.generation)).collect::<Vec<_>>(), [("m.1", 2)]);
}

fn check_loads(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::CheckLoad { name, endpoint, .. } => Some((name.clone(), endpoint.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_group_deleted_while_it_fails_stops_at_once_without_a_drain() {
    let (mut h, ls) = running_pair();
    // A rank dies; before the failure settles, a delete comes.
    h.feed(Input::Report { node: nid(2), report: exited(&ls[1].1, "rank-4", None, Some(9), h.unix) });
    let reply = h.reply();
    let effects = h.feed(Input::Delete { name: "p1".into(), reply });
    let r = replies(&effects);
    assert_eq!(r[0].as_ref().map(|d| d.state), Ok(pb::DeploymentState::Stopping as i32), "{r:?}");
    // No restart follows, and no engine is asked for its load.
    let later = h.tick_after(SETTLE + BASE_BACKOFF);
    assert!(launches(&later).is_empty() && check_loads(&later).is_empty(), "{later:?}");
}

#[test]
fn a_deleted_running_group_drains_before_it_stops() {
    let (mut h, _) = running_pair();
    let reply = h.reply();
    let effects = h.feed(Input::Delete { name: "p1".into(), reply });
    let r = replies(&effects);
    assert_eq!(r[0].as_ref().map(|d| d.state), Ok(pb::DeploymentState::Draining as i32), "{r:?}");
    assert!(stops(&effects).is_empty(), "nothing stops while gateways still send");
    assert_eq!(emits(&effects).first().map(|e| e.0), Some(pb::DeploymentState::Draining));
    // During the notice period the engine is not asked; after it, every LOAD_CHECK_EVERY.
    assert!(check_loads(&h.tick_after(Duration::from_millis(500))).is_empty());
    let asked = check_loads(&h.tick_after(DRAIN_NOTICE));
    assert_eq!(asked, [("p1".to_string(), "http://10.0.0.1:29501".to_string())]);
    let generation = h.dep("p1").generation;
    let busy = h.feed(Input::Load { name: "p1".into(), generation, in_flight: Some(2) });
    assert!(stops(&busy).is_empty(), "requests in flight: it waits");
    assert_eq!(check_loads(&h.tick_after(LOAD_CHECK_EVERY)).len(), 1);
    let idle = h.feed(Input::Load { name: "p1".into(), generation, in_flight: Some(0) });
    assert_eq!(stops(&idle).len(), 2, "idle: every node is told to stop");
    assert_eq!(h.dep("p1").state, pb::DeploymentState::Stopping as i32);
    // A second delete while it drains or stops answers with where it is.
    let reply = h.reply();
    assert!(replies(&h.feed(Input::Delete { name: "p1".into(), reply }))[0].is_ok());
}

#[test]
fn a_drain_ends_at_its_deadline_or_when_a_rank_dies_and_off_means_at_once() {
    // No answer from the engine: it stops at the deadline.
    let (mut h, ls) = running_pair();
    let reply = h.reply();
    h.feed(Input::Delete { name: "p1".into(), reply });
    let early = h.tick_after(DEFAULT_DRAIN_TIMEOUT - Duration::from_secs(1));
    assert!(stops(&early).is_empty());
    let late = h.tick_after(Duration::from_secs(1));
    assert_eq!(stops(&late).len(), 2, "the deadline stops it");

    // A rank dies while draining: it stops now and is not restarted.
    let (mut h, ls2) = running_pair();
    let reply = h.reply();
    h.feed(Input::Delete { name: "p1".into(), reply });
    let died = h.feed(Input::Report { node: nid(2), report: exited(&ls2[1].1, "rank-7", None, Some(9), h.unix) });
    assert_eq!(stops(&died).len(), 2, "{died:?}");
    assert!(launches(&h.tick_after(Duration::from_secs(5))).is_empty(), "no restart of a deleted group");
    let _ = ls;

    // --drain-timeout off: a delete stops at once.
    let mut h = H::new(vec![node(1, "head", 4, true), node(2, "w1", 4, false)]);
    let mut s = spec("p2", 4, 2);
    s.drain_timeout = None;
    let created = h.create(s);
    let effects = h.run_launches(created);
    h.all_ready(&launches(&effects));
    let reply = h.reply();
    let effects = h.feed(Input::Delete { name: "p2".into(), reply });
    assert_eq!(stops(&effects).len(), 2);
    assert_eq!(replies(&effects)[0].as_ref().map(|d| d.state), Ok(pb::DeploymentState::Stopping as i32));
}

#[test]
fn a_name_is_free_again_only_when_every_replica_of_it_is_gone() {
    let (mut h, l0, l1) = two_replicas(vec![node(1, "head", 4, true), node(2, "w1", 4, false)]);
    h.all_ready(&l0);
    h.all_ready(&l1);
    // Replica 0 stops at once (drain off), replica 1 drains.
    h.m.deps.get_mut("m").expect("m").spec.drain_timeout = None;
    for key in ["m.1", "m"] {
        let reply = h.reply();
        h.feed(Input::Delete { name: key.into(), reply });
    }
    for (n, l) in &l0 {
        for p in &l.processes {
            h.feed(Input::Report { node: *n, report: exited(l, &p.key, None, Some(15), h.unix) });
        }
    }
    // Replica 0 is gone; the deployment shows what is left, and the name is not free.
    let d = h.dep("m");
    assert_eq!(
        d.replicas.iter().map(|r| (r.index, r.state)).collect::<Vec<_>>(),
        [(1, pb::DeploymentState::Draining as i32)]
    );
    let reply = h.reply();
    let r = replies(&h.feed(Input::Create { spec: Box::new(spec("m", 2, 1)), model: Box::new(llama()), reply }));
    assert_eq!(r, [Err(DeployError::NameBeingDeleted("m".into()))]);
}

#[test]
fn a_record_keeps_the_revision_and_the_spec_before_it() {
    let (mut h, _) = running_pair();
    let mut before = spec("p1", 4, 2);
    before.engine_args = vec!["--token-delay-ms".into(), "5".into()];
    let dep = h.m.deps.get_mut("p1").expect("p1");
    dep.spec.revision = 3;
    dep.spec.previous = Some(Box::new(before));
    let rec = record::to_stored(&h.m.deps["p1"], h.at());
    assert_eq!((rec.name.as_str(), rec.revision, rec.generation), ("p1", 3, 1));
    let back = record::to_spec(&rec).expect("spec");
    assert_eq!(back.revision, 3);
    let prev = back.previous.expect("the revision before is kept");
    assert_eq!(prev.engine_args, ["--token-delay-ms", "5"]);
    assert!(prev.previous.is_none(), "one step of history");
    // Records written before revisions existed read as revision 1 with no history.
    let old = crate::store::StoredDeployment { revision: 0, previous: None, ..rec };
    let s = record::to_spec(&old).expect("spec");
    assert_eq!((s.revision, s.previous.is_none()), (1, true));
}

// ---- weight staging ----

/// A node whose worker has a transfer server (port 7000 + i).
fn staging_node(i: u128, name: &str, gpus: u32, is_head: bool) -> NodeView {
    let mut v = node(i, name, gpus, is_head);
    let mut info = (*v.info).clone();
    info.capabilities.transfer_port = 7000 + i as u16;
    v.info = Arc::new(info);
    v
}

fn model_file(name: &str, size: u64, layers: std::ops::Range<u32>, embedding: bool, last: bool) -> pb::ModelFile {
    pb::ModelFile {
        name: name.into(),
        size_bytes: size,
        sha256: vec![name.len() as u8; 32],
        chunk_bytes: 16 << 20,
        chunk_sha256: vec![vec![1; 32]; size.div_ceil(16 << 20) as usize],
        weights: name.ends_with(".safetensors"),
        layers: layers.collect(),
        embedding,
        last,
        other: false,
    }
}

/// Llama 3.1 8B (32 layers) in two shards, with a config.
fn llama_files() -> Vec<pb::ModelFile> {
    vec![
        model_file("config.json", 900, 0..0, false, false),
        model_file("model-1.safetensors", 100 << 20, 0..17, true, false),
        model_file("model-2.safetensors", 90 << 20, 17..32, false, true),
    ]
}

fn sends<T>(effects: &[Effect], f: impl Fn(&pb::head_message::Msg) -> Option<T>) -> Vec<(NodeId, T)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(n, m) => f(m).map(|x| (*n, x)),
            _ => None,
        })
        .collect()
}

fn stage_models(effects: &[Effect]) -> Vec<(NodeId, pb::StageModel)> {
    sends(effects, |m| match m {
        pb::head_message::Msg::StageModel(s) => Some(s.clone()),
        _ => None,
    })
}

/// Created with staging on a head and a worker (TP 4 x PP 2): the index asked, then given.
fn staged_pair() -> (H, pb::IndexModel, Vec<Effect>) {
    let mut h = H::new(vec![staging_node(1, "head", 4, true), staging_node(2, "w1", 4, false)]);
    let mut s = spec("st", 4, 2);
    s.staging = true;
    let e = h.create(s);
    let asked = sends(&e, |m| match m {
        pb::head_message::Msg::IndexModel(i) => Some(i.clone()),
        _ => None,
    });
    assert_eq!(asked.len(), 1, "{e:?}");
    assert_eq!(asked[0].0, nid(1), "the head's node reads the model");
    assert!(launches(&e).is_empty(), "nothing launches before the model is staged");
    (h, asked[0].1.clone(), e)
}

fn index_of(asked: &pb::IndexModel, files: Vec<pb::ModelFile>) -> Input {
    Input::Staging {
        node: nid(1),
        msg: StagingMsg::Index(Box::new(pb::ModelIndex {
            deployment: asked.deployment.clone(),
            deployment_uid: asked.deployment_uid.clone(),
            generation: asked.generation,
            files,
            done: true,
            ..Default::default()
        })),
    }
}

fn progress(node: NodeId, st: &pb::StageModel, done: u64, finished: bool, error: &str) -> Input {
    Input::Staging {
        node,
        msg: StagingMsg::Progress(Box::new(pb::StageProgress {
            deployment: st.deployment.clone(),
            deployment_uid: st.deployment_uid.clone(),
            generation: st.generation,
            bytes_done: done,
            bytes_needed: 0,
            done: finished,
            error: error.into(),
            ..Default::default()
        })),
    }
}

#[test]
fn a_staged_generation_launches_once_every_node_has_its_stage_files() {
    let (mut h, asked, _) = staged_pair();
    assert_eq!(h.dep("st").state, pb::DeploymentState::Staging as i32);
    assert_eq!(asked.path, "/models/llama");
    // An index from a node that was not asked is ignored.
    let mut from_w1 = index_of(&asked, llama_files());
    if let Input::Staging { node, .. } = &mut from_w1 {
        *node = nid(2);
    }
    assert!(stage_models(&h.feed(from_w1)).is_empty());
    // The source's index: w1 (stage 1: layers 16-31) gets the config and both shards (layer 16
    // is in the first), from the head's transfer server.
    let e = h.feed(index_of(&asked, llama_files()));
    let st = stage_models(&e);
    assert_eq!(st.len(), 1, "{e:?}");
    let (n, st) = st[0].clone();
    assert_eq!(n, nid(2));
    let names: Vec<&str> = st.files.iter().filter_map(|f| f.file.as_ref()).map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["config.json", "model-1.safetensors", "model-2.safetensors"]);
    assert_eq!((st.files[0].sources[0].node.as_str(), st.files[0].sources[0].port), ("head", 7001));
    assert_eq!(st.token.len(), 64);
    assert!(launches(&e).is_empty());
    // Progress shows; the generation launches once w1 is done, node rank 0 first.
    assert!(launches(&h.feed(progress(nid(2), &st, 50 << 20, false, ""))).is_empty());
    let d = h.dep("st");
    let w1 = d.staging_nodes.iter().find(|n| n.node == "w1").expect("w1 shown");
    assert_eq!((w1.bytes_done, w1.bytes_needed, w1.phase.as_str()), (50 << 20, (190 << 20) + 900, "fetching"));
    let e = h.feed(progress(nid(2), &st, 190 << 20, true, ""));
    let first = launches(&e);
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].0, first[0].1.staged_model.as_str()), (nid(1), ""), "the head reads the model in place");
    let all = h.run_launches(e);
    let ls = launches(&all);
    let w1_launch = ls.iter().find(|(n, _)| *n == nid(2)).expect("w1 launched");
    assert_eq!(w1_launch.1.staged_model, st.key, "w1's engine reads the staged directory");
    h.all_ready(&ls);
    assert_eq!(h.dep("st").state, pb::DeploymentState::Running as i32);
}

#[test]
fn a_failed_staging_stops_every_participant_and_restarts_the_group() {
    let (mut h, asked, _) = staged_pair();
    let st = stage_models(&h.feed(index_of(&asked, llama_files())))[0].1.clone();
    // A restarted worker rejoins mid-staging: it is told its part again (it resumes).
    let again = stage_models(&h.feed(Input::NodeJoined { node: nid(2), running: Vec::new() }));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1.key, st.key);
    // It fails: the head's node and w1 stop their part at once; one event names why.
    let e = h.feed(progress(nid(2), &st, 0, true, "the disk is full"));
    let stopped: Vec<NodeId> = stops(&e).into_iter().map(|(n, _)| n).collect();
    assert_eq!(stopped, [nid(1), nid(2)]);
    let e = h.tick_after(SETTLE);
    let ev = emits(&e);
    assert!(ev.iter().any(|(s, m)| *s == pb::DeploymentState::Restarting && m.contains("staging to w1 failed: the disk is full")), "{ev:?}");
    // A bad index (a path in a file name) fails the generation too.
    let (mut h, asked, _) = staged_pair();
    let mut files = llama_files();
    files[0].name = "../../etc/shadow".into();
    h.feed(index_of(&asked, files));
    let ev = emits(&h.tick_after(SETTLE));
    assert!(ev.iter().any(|(s, m)| *s == pb::DeploymentState::Failed && m.contains("not a plain file name")), "{ev:?}");
    assert_eq!(h.m.reservation_counts(), (0, 0), "a failed deployment holds nothing");
}

#[test]
fn a_staging_that_makes_no_progress_fails_its_generation_and_a_source_that_rejoins_is_asked_again() {
    let (mut h, asked, _) = staged_pair();
    // The head's node reconnects while it hashes: it is asked again.
    let e = h.feed(Input::NodeJoined { node: nid(1), running: Vec::new() });
    let again = sends(&e, |m| match m {
        pb::head_message::Msg::IndexModel(i) => Some(i.clone()),
        _ => None,
    });
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1.token, asked.token);
    let st = stage_models(&h.feed(index_of(&asked, llama_files())))[0].1.clone();
    // Progress keeps it alive; then nothing for STAGING_STALL: the generation fails.
    h.advance(STAGING_STALL - Duration::from_secs(1));
    h.feed(progress(nid(2), &st, 10, false, ""));
    assert!(emits(&h.tick_after(Duration::from_secs(2))).is_empty(), "it moved a minute ago");
    assert_eq!(h.m.next_deadline(), Some(h.now - Duration::from_secs(2) + STAGING_STALL));
    let e = h.tick_after(STAGING_STALL);
    assert_eq!(stops(&e).len(), 2, "both nodes stop their part");
    let ev = emits(&h.tick_after(SETTLE));
    assert!(ev.iter().any(|(s, m)| *s == pb::DeploymentState::Restarting && m.contains("no progress")), "{ev:?}");
}

#[test]
fn staging_needs_the_heads_node_and_workers_that_can_receive() {
    // No transfer server on the head's node: refused at create, naming the way out.
    let mut h = H::new(vec![node(1, "head", 4, true), staging_node(2, "w1", 4, false)]);
    let mut s = spec("st", 4, 2);
    s.staging = true;
    s.staging_asked = true;
    let e = h.create(s.clone());
    let r = replies(&e);
    assert!(matches!(&r[0], Err(DeployError::InvalidPlan(m)) if m.contains("--staging off")), "{r:?}");
    // Staging by default (not asked for): off, every node reads the model at its path.
    let mut quiet = s.clone();
    quiet.staging_asked = false;
    let e = h.create(quiet);
    assert!(launches(&e).len() == 1 && replies(&e)[0].is_ok(), "{e:?}");
    assert_eq!(h.dep("st").staging, pb::StagingMode::Off as i32);
    // A worker without one: the generation fails with its name.
    let mut h = H::new(vec![staging_node(1, "head", 4, true), node(2, "old", 4, false)]);
    let e = h.create(s);
    let asked = sends(&e, |m| match m {
        pb::head_message::Msg::IndexModel(i) => Some(i.clone()),
        _ => None,
    });
    h.feed(index_of(&asked[0].1, llama_files()));
    let ev = emits(&h.tick_after(SETTLE));
    assert!(ev.iter().any(|(_, m)| m.contains("old cannot receive a staged model")), "{ev:?}");
}

#[test]
fn a_node_selector_places_only_on_nodes_with_its_labels() {
    let labelled = |i: u128, name: &str, zone: &str| {
        let mut v = node(i, name, 4, i == 1);
        let mut info = (*v.info).clone();
        info.labels = [("zone".to_string(), zone.to_string())].into();
        v.info = Arc::new(info);
        v
    };
    let mut h = H::new(vec![labelled(1, "head", "a"), labelled(2, "w1", "b"), labelled(3, "w2", "a")]);
    let mut s = spec("sel", 4, 2);
    s.node_selector = [("zone".to_string(), "a".to_string())].into();
    let created = h.create(s);
    let e = h.run_launches(created);
    let nodes: std::collections::BTreeSet<NodeId> = launches(&e).iter().map(|(n, _)| *n).collect();
    assert_eq!(nodes, [nid(1), nid(3)].into(), "only zone=a nodes");
    // No node matches: pending, saying so.
    let mut s = spec("none", 4, 1);
    s.node_selector = [("zone".to_string(), "c".to_string())].into();
    h.create(s);
    let d = h.dep("none");
    assert_eq!(d.state, pb::DeploymentState::Pending as i32);
    assert!(d.message.contains("node selector zone=c: 0 schedulable node(s) match"), "{}", d.message);
}
