//! The one mapping from everything that can go wrong in a request to a gRPC status. Messages say
//! what was wrong and, where it helps, what to do.

use crate::actors::shard_actor::WriteError;
use cascade_protocol::limits::FieldError;
use cascade_protocol::outcome::Refusal;
use tonic::Status;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed, empty or oversized input.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// The state machine refused the command.
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The shard's request bound is reached.
    #[error("shard {shard} is overloaded ({inflight_max} requests in flight); retry with backoff")]
    Busy { shard: u16, inflight_max: usize },
    #[error("shard {shard} did not answer within {timeout_ms} ms")]
    Timeout { shard: u16, timeout_ms: u64 },
    #[error("shard {shard} is not served by this node")]
    NoShard { shard: u16 },
    #[error("tenant or client watermark applied on {applied} of {total} shards: {reason}; it is idempotent, retry it")]
    Partial { applied: usize, total: usize, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

/// Every error → status mapping of the API.
pub fn to_status(e: ApiError) -> Status {
    let msg = e.to_string();
    match e {
        ApiError::Field(_) => Status::invalid_argument(msg),
        ApiError::Refused(r) => match r {
            Refusal::SessionNotFound
            | Refusal::UserNotFound
            | Refusal::DeviceNotFound
            | Refusal::ParentNotFound => Status::not_found(msg),
            Refusal::SessionLimit { .. } | Refusal::DeviceLimit { .. } => Status::resource_exhausted(msg),
            Refusal::DuplicateSession
            | Refusal::SessionNotActive
            | Refusal::ParentNotActive
            | Refusal::DeviceKeyMismatch
            | Refusal::NoRefreshFamily
            | Refusal::InvalidRefreshToken
            | Refusal::AalNotHigher { .. }
            | Refusal::WatermarkInFuture => Status::failed_precondition(msg),
        },
        ApiError::Write(_)
        | ApiError::Timeout { .. }
        | ApiError::NoShard { .. }
        | ApiError::Partial { .. } => Status::unavailable(msg),
        ApiError::Busy { .. } => Status::resource_exhausted(msg),
        ApiError::Internal(_) => Status::internal(msg),
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        to_status(e)
    }
}
