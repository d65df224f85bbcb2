//! gRPC services of a node. Handlers validate input, build commands and carry them to shard
//! actors; every error becomes a `tonic::Status` in one place, [`status::to_status`].

pub mod cascade;
pub mod cluster;
pub mod ctx;
pub mod jobs;
pub mod shard_map;
pub mod status;
pub mod watch;
