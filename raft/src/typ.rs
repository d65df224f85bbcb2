//! The one openraft type configuration of Cascade, and short aliases for its types.

use cascade_protocol::command::Envelope;
use cascade_protocol::outcome::Applied;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Cursor;

/// What a shard's membership records about each replica's node: where to reach it and which
/// region it is in (placement keeps a shard's replicas in distinct regions).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CascadeNode {
    /// `host:port` of the node's gRPC listener (public API and Raft transport).
    pub addr: String,
    /// Region label, e.g. `eu-west`.
    pub region: String,
}

impl fmt::Display for CascadeNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.addr, self.region)
    }
}

openraft::declare_raft_types!(
    /// Raft types of a Cascade shard: log entries carry a stamped command envelope, applying one
    /// returns its outcome and events.
    pub TypeConfig:
        D = Envelope,
        R = Applied,
        NodeId = u64,
        Node = CascadeNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::runtime::CascadeRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, CascadeNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, CascadeNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
