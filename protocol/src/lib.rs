//! Cascade wire types. The gRPC API generated from `proto/`, and the replicated command, outcome
//! and event types that go into the Raft log, encoded with bincode 2 behind a format version.
//!
//! This crate must not depend on tokio, sled, openraft or ractor: it is shared by servers, clients
//! and tools alike.

pub mod codec;
pub mod command;
pub mod ids;
pub mod job;
pub mod limits;
pub mod outcome;

/// Generated code for `proto/cascade.proto` (public API).
pub mod pb {
    tonic::include_proto!("cascade.v1");
}

/// Generated code for `proto/raft.proto` (inter-node transport).
pub mod raft_pb {
    tonic::include_proto!("cascade.raft.v1");
}

/// Encoded file descriptor set of both protos, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cascade_descriptor");
