//! Where requests go: the replicas of each deployment, which of them may take requests, and how
//! many each has in flight. A synchronous state machine (inputs and the time in, decisions out),
//! driven by the gateway's async shell and tested here on made-up time.
//!
//! A replica takes new requests when the head says it is running and not draining, its last health
//! check passed, and it is not ejected. A replica whose request failed (before any byte went back)
//! or whose health check failed is ejected at once; it comes back after `eject_for`, or sooner
//! when a health check passes. Among the replicas that may take a request, the one with the fewest
//! in flight gets it (ties: the one that has been idle longest, then by id).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// One replica: a deployment's group, known by the head's name for it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId {
    pub deployment: String,
    /// The replica's name within its deployment (`0`, `1`, ...).
    pub replica: String,
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.deployment, self.replica)
    }
}

/// What the head says about one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: ReplicaId,
    /// `http://host:port` of its OpenAI-compatible API.
    pub endpoint: String,
    /// Running: it may take requests.
    pub ready: bool,
    /// Being stopped on purpose: no new requests, the ones in flight finish.
    pub draining: bool,
}

/// What the head says about one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentView {
    pub name: String,
    /// The names a request's `model` may use for it (the deployment's name, and its
    /// `--served-model-name`s).
    pub models: Vec<String>,
    pub replicas: Vec<Target>,
}

#[derive(Debug, Clone)]
struct Replica {
    target: Target,
    in_flight: u32,
    /// Health: `None` until the first check.
    healthy: Option<bool>,
    ejected_until: Option<Instant>,
    last_done: Option<Instant>,
}

impl Replica {
    fn takes_requests(&self, now: Instant) -> bool {
        self.target.ready
            && !self.target.draining
            && self.healthy != Some(false)
            && self.ejected_until.is_none_or(|t| t <= now)
    }
}

/// How a forwarded request ended, as far as the replica is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (whatever the status, the replica works).
    Answered,
    /// It could not be reached, reset the connection or failed with a server error before the
    /// first byte: taken out at once.
    Failed,
}

/// Why no replica was picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoReplica {
    /// No deployment serves this model.
    UnknownModel,
    /// The deployment exists but none of its replicas may take a request now.
    NoneReady { deployment: String },
}

/// The routing table.
#[derive(Debug)]
pub struct Table {
    eject_for: Duration,
    /// Model name -> deployment name.
    models: BTreeMap<String, String>,
    deployments: BTreeMap<String, Vec<ReplicaId>>,
    replicas: BTreeMap<ReplicaId, Replica>,
}

impl Table {
    pub fn new(eject_for: Duration) -> Table {
        Table { eject_for, models: BTreeMap::new(), deployments: BTreeMap::new(), replicas: BTreeMap::new() }
    }

    /// The head's current view replaces the last one. A replica that stays (same id and
    /// endpoint) keeps its in-flight count, health and ejection; one whose endpoint changed (a new
    /// generation elsewhere) starts afresh.
    pub fn update(&mut self, view: Vec<DeploymentView>) {
        let mut replicas = BTreeMap::new();
        self.models.clear();
        self.deployments.clear();
        // A deployment's own name always routes to it; a served name only when no deployment is
        // called that and no other deployment claimed it first.
        for d in &view {
            self.models.insert(d.name.clone(), d.name.clone());
        }
        for d in view {
            for m in &d.models {
                self.models.entry(m.clone()).or_insert_with(|| d.name.clone());
            }
            let mut ids = Vec::new();
            for t in d.replicas {
                let r = match self.replicas.remove(&t.id) {
                    Some(mut r) if r.target.endpoint == t.endpoint => {
                        r.target = t;
                        r
                    }
                    Some(old) => Replica {
                        // Requests in flight to the old endpoint still end and are counted down.
                        in_flight: old.in_flight,
                        ..fresh(t)
                    },
                    None => fresh(t),
                };
                ids.push(r.target.id.clone());
                replicas.insert(r.target.id.clone(), r);
            }
            self.deployments.insert(d.name, ids);
        }
        self.replicas = replicas;
    }

    /// Picks the replica for a request for `model`, skipping `tried`; counts it in flight.
    pub fn pick(
        &mut self,
        model: &str,
        tried: &BTreeSet<ReplicaId>,
        now: Instant,
    ) -> Result<(ReplicaId, String), NoReplica> {
        let deployment = self.models.get(model).ok_or(NoReplica::UnknownModel)?;
        let ids = self.deployments.get(deployment).ok_or(NoReplica::UnknownModel)?;
        let best = ids
            .iter()
            .filter(|id| !tried.contains(*id))
            .filter_map(|id| self.replicas.get(id).map(|r| (id, r)))
            .filter(|(_, r)| r.takes_requests(now))
            .min_by_key(|(id, r)| (r.in_flight, r.last_done, (*id).clone()))
            .map(|(id, _)| id.clone())
            .ok_or_else(|| NoReplica::NoneReady { deployment: deployment.clone() })?;
        let r = self.replicas.get_mut(&best).expect("picked from the table");
        r.in_flight += 1;
        Ok((best, r.target.endpoint.clone()))
    }

    /// Whether a replica of `model`'s deployment other than those in `tried` could take a request.
    pub fn has_other(&self, model: &str, tried: &BTreeSet<ReplicaId>, now: Instant) -> bool {
        let Some(ids) = self.models.get(model).and_then(|d| self.deployments.get(d)) else { return false };
        ids.iter().any(|id| !tried.contains(id) && self.replicas.get(id).is_some_and(|r| r.takes_requests(now)))
    }

    /// A request picked with [`Table::pick`] is over (its response ended, or it failed).
    pub fn done(&mut self, id: &ReplicaId, outcome: Outcome, now: Instant) {
        let eject_for = self.eject_for;
        if let Some(r) = self.replicas.get_mut(id) {
            r.in_flight = r.in_flight.saturating_sub(1);
            r.last_done = Some(now);
            if outcome == Outcome::Failed {
                r.ejected_until = Some(now + eject_for);
            }
        }
    }

    /// A health check of `id` ended: a failure takes it out; a pass brings it back at once.
    pub fn health(&mut self, id: &ReplicaId, healthy: bool) {
        if let Some(r) = self.replicas.get_mut(id) {
            r.healthy = Some(healthy);
            if healthy {
                r.ejected_until = None;
            }
        }
    }

    /// Every replica the head says is ready (to health-check): id and endpoint.
    pub fn to_check(&self) -> Vec<(ReplicaId, String)> {
        self.replicas
            .values()
            .filter(|r| r.target.ready)
            .map(|r| (r.target.id.clone(), r.target.endpoint.clone()))
            .collect()
    }

    /// The model names that have a replica ready now, with their deployment (for `/v1/models`).
    pub fn models(&self, now: Instant) -> Vec<(String, String)> {
        self.models
            .iter()
            .filter(|(_, d)| {
                self.deployments.get(*d).is_some_and(|ids| {
                    ids.iter().any(|id| self.replicas.get(id).is_some_and(|r| r.takes_requests(now)))
                })
            })
            .map(|(m, d)| (m.clone(), d.clone()))
            .collect()
    }

    /// Requests in flight to `id`.
    pub fn in_flight(&self, id: &ReplicaId) -> u32 {
        self.replicas.get(id).map_or(0, |r| r.in_flight)
    }
}

fn fresh(t: Target) -> Replica {
    Replica { target: t, in_flight: 0, healthy: None, ejected_until: None, last_done: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(d: &str, r: &str) -> ReplicaId {
        ReplicaId { deployment: d.into(), replica: r.into() }
    }

    fn view(name: &str, replicas: &[(&str, &str, bool, bool)]) -> DeploymentView {
        DeploymentView {
            name: name.into(),
            models: vec![name.into(), format!("{name}-alias")],
            replicas: replicas
                .iter()
                .map(|(r, e, ready, draining)| Target {
                    id: id(name, r),
                    endpoint: e.to_string(),
                    ready: *ready,
                    draining: *draining,
                })
                .collect(),
        }
    }

    #[test]
    fn least_outstanding_wins_and_ties_go_to_the_longest_idle() {
        let t0 = Instant::now();
        let mut t = Table::new(Duration::from_secs(10));
        t.update(vec![view("m", &[("0", "http://a", true, false), ("1", "http://b", true, false)])]);
        let none = BTreeSet::new();
        let (a, _) = t.pick("m", &none, t0).expect("one");
        let (b, _) = t.pick("m-alias", &none, t0).expect("two");
        assert_ne!(a, b, "the second request goes to the idle replica");
        t.done(&a, Outcome::Answered, t0 + Duration::from_millis(5));
        let (c, _) = t.pick("m", &none, t0).expect("three");
        assert_eq!(c, a, "the replica with fewer in flight");
        t.done(&b, Outcome::Answered, t0 + Duration::from_millis(6));
        t.done(&c, Outcome::Answered, t0 + Duration::from_millis(7));
        let (d, _) = t.pick("m", &none, t0).expect("four");
        assert_eq!(d, b, "equal in flight: the one idle for longer");
        assert_eq!(t.pick("nope", &none, t0), Err(NoReplica::UnknownModel));
    }

    #[test]
    fn a_failed_replica_is_out_at_once_and_back_after_eject_for_or_a_passing_check() {
        let t0 = Instant::now();
        let mut t = Table::new(Duration::from_secs(10));
        t.update(vec![view("m", &[("0", "http://a", true, false), ("1", "http://b", true, false)])]);
        let none = BTreeSet::new();
        let (a, _) = t.pick("m", &none, t0).expect("pick");
        t.done(&a, Outcome::Failed, t0);
        for _ in 0..3 {
            let (x, _) = t.pick("m", &none, t0 + Duration::from_secs(1)).expect("the other");
            assert_ne!(x, a);
            t.done(&x, Outcome::Answered, t0);
        }
        // A retry skips what it tried; with both out there is nothing left.
        let (b, _) = t.pick("m", &none, t0).expect("b");
        t.done(&b, Outcome::Failed, t0);
        assert_eq!(
            t.pick("m", &none, t0 + Duration::from_secs(1)),
            Err(NoReplica::NoneReady { deployment: "m".into() })
        );
        assert!(t.models(t0).is_empty(), "no model is listed without a replica that takes requests");
        // Back after eject_for, or at once when its health check passes.
        assert!(t.pick("m", &none, t0 + Duration::from_secs(10)).is_ok());
        t.health(&b, true);
        let tried: BTreeSet<ReplicaId> = [a.clone()].into();
        assert_eq!(t.pick("m", &tried, t0 + Duration::from_secs(1)).map(|p| p.0), Ok(b.clone()));
        // A failing health check takes a replica out until one passes.
        t.health(&b, false);
        assert!(t.pick("m", &tried, t0 + Duration::from_secs(60)).is_err());
    }

    #[test]
    fn a_deployments_own_name_wins_over_another_ones_served_name() {
        let t0 = Instant::now();
        let mut t = Table::new(Duration::from_secs(10));
        let mut a = view("a", &[("0", "http://a", true, false)]);
        a.models.push("b".into());
        t.update(vec![a, view("b", &[("0", "http://b", true, false)])]);
        let none = BTreeSet::new();
        assert_eq!(t.pick("b", &none, t0).map(|p| p.0), Ok(id("b", "0")), "\"b\" is deployment b");
        // has_other: whether a retry could go elsewhere.
        let tried: BTreeSet<ReplicaId> = [id("b", "0")].into();
        assert!(!t.has_other("b", &tried, t0));
        assert!(t.has_other("b", &none, t0));
    }

    #[test]
    fn draining_and_not_ready_replicas_get_nothing_new_and_counts_survive_updates() {
        let t0 = Instant::now();
        let mut t = Table::new(Duration::from_secs(10));
        t.update(vec![view("m", &[("0", "http://a", true, false), ("1", "http://b", false, false)])]);
        let none = BTreeSet::new();
        let (a, _) = t.pick("m", &none, t0).expect("a");
        assert_eq!(a, id("m", "0"));
        t.update(vec![view("m", &[("0", "http://a", true, true), ("1", "http://b", true, false)])]);
        assert_eq!(t.in_flight(&a), 1, "an update keeps what is in flight");
        for _ in 0..3 {
            assert_eq!(t.pick("m", &none, t0).map(|p| p.0), Ok(id("m", "1")), "draining gets nothing new");
        }
        t.done(&a, Outcome::Answered, t0);
        assert_eq!(t.in_flight(&a), 0);
        // A deployment that goes away takes its models with it.
        t.update(vec![]);
        assert_eq!(t.pick("m", &none, t0), Err(NoReplica::UnknownModel));
        assert_eq!(t.to_check(), vec![]);
    }
}
