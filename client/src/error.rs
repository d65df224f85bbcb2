//! What can go wrong in the SDK, each with enough to act on.

use cascade_protocol::ids::ShardId;
use std::time::Duration;
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Refused before anything was sent (a malformed session id, an empty batch, a bad seed).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No seed answered `NodeStatus`.
    #[error("no seed answered ({seeds}): {detail}")]
    Unreachable { seeds: String, detail: String },
    /// The cluster answered with an error, or every attempt failed.
    #[error("{rpc}: {code:?} after {attempts} attempt(s): {message}")]
    Rpc { rpc: &'static str, code: Code, message: String, attempts: u32 },
    /// The local cache cannot prove it knows every revocation older than the bound for the
    /// session's shard (the check fails closed).
    #[error("local cache stale for shard {shard}: {why} (bound {} ms)", bound.as_millis())]
    Stale { shard: ShardId, why: String, bound: Duration },
    /// The local cache was not fresh for every shard within the time asked.
    #[error("local cache not fresh after {} ms: {detail}", waited.as_millis())]
    NotFresh { waited: Duration, detail: String },
}

impl Error {
    /// The gRPC code of a failed call, if it was one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            Error::Stale { .. } | Error::Unreachable { .. } | Error::NotFresh { .. } => {
                Some(Code::Unavailable)
            }
            Error::InvalidArgument(_) => Some(Code::InvalidArgument),
        }
    }
}
