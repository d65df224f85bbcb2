//! The one openraft type configuration of Cascade, and short aliases for its types.

use cascade_protocol::command::Envelope;
use cascade_protocol::outcome::Applied;
use std::io::Cursor;

openraft::declare_raft_types!(
    /// Raft types of a Cascade shard: log entries carry a stamped command envelope, applying one
    /// returns its outcome and events.
    pub TypeConfig:
        D = Envelope,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
