//! Typed identifiers: a node, a deployment's incarnation, a generation, a process key. Strings
//! exist only at the proto edge; everything inside the head and the worker uses these.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A node's id: minted by the head on a node's first join, kept in the worker's state dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct NodeId(pub Uuid);

/// One incarnation of a deployment: minted by `Create`. A deployment deleted and created again
/// under the same name is a different incarnation, so nothing of the old one (a late report, a
/// launch a worker still remembers) can be mistaken for the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct DeploymentUid(pub Uuid);

/// A generation of a deployment's group: every (re)launch gets the next one, and a worker never
/// runs two generations of one incarnation side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Generation(pub u64);

/// A process of a generation: `rank-N` (one process per rank) or `node-N` (one per node).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct ProcKey(pub String);

/// An id that did not parse, naming what it should have been.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not a UUID")]
pub struct BadId {
    pub what: &'static str,
    pub value: String,
}

macro_rules! uuid_id {
    ($t:ident, $what:literal) => {
        impl $t {
            /// A fresh random id.
            pub fn new_random() -> Self {
                $t(Uuid::new_v4())
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
        impl FromStr for $t {
            type Err = BadId;
            fn from_str(s: &str) -> Result<Self, BadId> {
                Uuid::parse_str(s).map($t).map_err(|_| BadId { what: $what, value: s.chars().take(64).collect() })
            }
        }
        impl From<Uuid> for $t {
            fn from(u: Uuid) -> Self {
                $t(u)
            }
        }
    };
}

uuid_id!(NodeId, "node id");
uuid_id!(DeploymentUid, "deployment uid");

impl DeploymentUid {
    /// The empty (nil) uid: records written before incarnations existed.
    pub fn is_nil(&self) -> bool {
        self.0.is_nil()
    }
    /// On the wire: the empty string for nil.
    pub fn to_wire(self) -> String {
        if self.is_nil() { String::new() } else { self.0.to_string() }
    }
    /// From the wire: empty is nil.
    pub fn from_wire(s: &str) -> Result<Self, BadId> {
        if s.is_empty() { Ok(DeploymentUid::default()) } else { s.parse() }
    }
}

impl Generation {
    pub fn next(self) -> Generation {
        Generation(self.0.saturating_add(1))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl ProcKey {
    pub fn rank(rank: u64) -> Self {
        ProcKey(format!("rank-{rank}"))
    }
    pub fn node(node_rank: u64) -> Self {
        ProcKey(format!("node-{node_rank}"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProcKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_are_named() {
        let n = NodeId::new_random();
        assert_eq!(n.to_string().parse::<NodeId>(), Ok(n));
        let e = "nope".parse::<NodeId>().expect_err("not a uuid");
        assert_eq!(e.to_string(), "node id \"nope\" is not a UUID");
        assert_eq!(DeploymentUid::from_wire(""), Ok(DeploymentUid::default()));
        let u = DeploymentUid::new_random();
        assert_eq!(DeploymentUid::from_wire(&u.to_wire()), Ok(u));
        assert_eq!(Generation(u64::MAX).next(), Generation(u64::MAX));
        assert_eq!(serde_json::to_string(&Generation(3)).ok().as_deref(), Some("3"));
        assert_eq!(ProcKey::rank(7).as_str(), "rank-7");
    }
}
