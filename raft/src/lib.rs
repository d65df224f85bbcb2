//! openraft integration for Cascade: the node-wide group-commit log, the sled-backed state
//! machine, the multi-raft host and the tonic transport. Knows nothing of HTTP, CLI or actors.

pub mod batch;
pub mod conn;
pub mod disk;
pub mod elections;
pub mod freshness;
pub mod host;
pub mod kv;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod placement;
pub mod routing;
pub mod runtime;
pub mod sm;
pub mod transfer;
pub mod typ;
pub mod wal;
