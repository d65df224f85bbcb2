//! The one mapping from everything that can go wrong in a request to a gRPC status. Messages say
//! what was wrong and, where it helps, what to do.

use cascade_protocol::limits::FieldError;
use cascade_protocol::outcome::Refusal;
use cascade_raft::routing::ProposeError;
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
    Propose(#[from] ProposeError),
    /// P2: the local replica cannot prove it is fresh and may not forward.
    #[error("replica of shard {shard} on this node cannot prove its state is within the revocation bound ({bound_ms} ms); retry on another node or later")]
    Stale { shard: u16, bound_ms: u64 },
    #[error("shard {shard}: cannot forward to leader {leader}: {reason}")]
    Forward { shard: u16, leader: u64, reason: String },
    #[error("shard {shard}: cannot confirm leadership for a linearizable read: {reason}; retry")]
    Linearize { shard: u16, reason: String },
    /// The node a request was forwarded to answered with this status; it is passed on as is.
    #[error("{}", .0.message())]
    Remote(Status),
    #[error("membership change failed: {0}")]
    Membership(String),
    #[error("membership change refused: {0}")]
    MembershipRefused(String),
    #[error("transfer of shard {shard}'s leadership failed: {reason}")]
    Transfer { shard: u16, reason: String },
    /// The shard's request bound is reached.
    #[error("shard {shard} is overloaded ({inflight_max} requests in flight); retry with backoff")]
    Busy { shard: u16, inflight_max: usize },
    #[error("shard {shard} did not answer within {timeout_ms} ms")]
    Timeout { shard: u16, timeout_ms: u64 },
    #[error("shard {shard} is not served by this node")]
    NoShard { shard: u16 },
    #[error("tenant or client watermark applied on {applied} of {total} shards: {reason}; it is idempotent, retry it")]
    Partial { applied: usize, total: usize, reason: String },
    #[error("job {job_id} started on {applied} of {total} shards: {reason}; retry with this job_id (shards that have it are left as they are)")]
    PartialJob { job_id: String, applied: usize, total: usize, reason: String },
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
            | Refusal::ParentNotFound
            | Refusal::JobNotFound => Status::not_found(msg),
            Refusal::SessionLimit { .. } | Refusal::DeviceLimit { .. } | Refusal::TooManyJobs { .. } => {
                Status::resource_exhausted(msg)
            }
            Refusal::DuplicateSession
            | Refusal::SessionNotActive
            | Refusal::ParentNotActive
            | Refusal::DeviceKeyMismatch
            | Refusal::NoRefreshFamily
            | Refusal::InvalidRefreshToken
            | Refusal::AalNotHigher { .. }
            | Refusal::WatermarkInFuture
            | Refusal::WrongJobKind => Status::failed_precondition(msg),
        },
        ApiError::Remote(status) => status,
        ApiError::Propose(_)
        | ApiError::Stale { .. }
        | ApiError::Forward { .. }
        | ApiError::Linearize { .. }
        | ApiError::Transfer { .. }
        | ApiError::Membership(_)
        | ApiError::Timeout { .. }
        | ApiError::NoShard { .. }
        | ApiError::Partial { .. }
        | ApiError::PartialJob { .. } => Status::unavailable(msg),
        ApiError::Busy { .. } => Status::resource_exhausted(msg),
        ApiError::MembershipRefused(_) => Status::failed_precondition(msg),
        ApiError::Internal(_) => Status::internal(msg),
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        to_status(e)
    }
}
