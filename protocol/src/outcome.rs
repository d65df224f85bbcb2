//! What applying a command produced: the outcome returned to the proposer and the revocation
//! events it emitted, plus the verdict of a validity check.

use crate::command::{Reason, WatermarkScope};
use crate::ids::{SessionId, UserKey};
use crate::job::{AuditRecord, Job};
use serde::{Deserialize, Serialize};

/// A domain refusal: the command was valid input but the state does not allow it. Refusals are
/// replicated outcomes (every replica refuses the same way), not errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("session not found")]
    SessionNotFound,
    #[error("user not found")]
    UserNotFound,
    #[error("device not found for this user")]
    DeviceNotFound,
    #[error("session id already exists")]
    DuplicateSession,
    #[error("session is not active (revoked or expired)")]
    SessionNotActive,
    #[error("parent session not found for this user")]
    ParentNotFound,
    #[error("parent session is not active")]
    ParentNotActive,
    #[error("user has reached the limit of {max} sessions")]
    SessionLimit { max: u32 },
    #[error("user has reached the limit of {max} devices with live sessions")]
    DeviceLimit { max: u32 },
    #[error("device is bound to a different key; revoke the device before binding a new key")]
    DeviceKeyMismatch,
    #[error("session has no refresh-token family")]
    NoRefreshFamily,
    #[error("refresh token is not valid for this family")]
    InvalidRefreshToken,
    #[error("aal must be higher than the session's current aal {current}")]
    AalNotHigher { current: u8 },
    #[error("watermark is later than the time the command was stamped")]
    WatermarkInFuture,
    #[error("no such job on this shard")]
    JobNotFound,
    #[error("the shard keeps at most {max} jobs and all of them are running")]
    TooManyJobs { max: u32 },
    #[error("the job is a list job; it takes chunks, not scan steps (or the reverse)")]
    WrongJobKind,
}

/// Result of one applied command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Created {
        session_id: SessionId,
        created_at_ms: u64,
        expires_at_ms: u64,
        /// Sessions revoked to make room under the evict-oldest policy.
        evicted: Vec<SessionId>,
    },
    Touched {
        idle_expires_at_ms: u64,
    },
    SteppedUp {
        aal: u8,
    },
    Rotated {
        generation: u32,
    },
    /// An old refresh-token generation was presented: the family's session and its descendants
    /// are revoked.
    ReuseDetected {
        revoked: Vec<SessionId>,
    },
    /// Sessions newly revoked by this command (empty if all were already revoked).
    Revoked {
        revoked: Vec<SessionId>,
        at_ms: u64,
    },
    /// The watermark in force after the command (watermarks never move back).
    WatermarkSet {
        watermark_ms: u64,
    },
    Purged {
        n_sessions: u64,
        n_users: u64,
        next: Option<UserKey>,
    },
    /// A job's record on this shard after the command.
    Job(Box<Job>),
    Refused(Refusal),
    /// Entries without a command (Raft blank and membership entries).
    Nothing,
}

/// A revocation a gateway must learn of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RevocationEvent {
    /// `expires_at_ms`: the session's absolute expiry, after which a cache may forget it.
    Session {
        session_id: SessionId,
        user: UserKey,
        reason: Reason,
        actor: String,
        at_ms: u64,
        expires_at_ms: u64,
    },
    Watermark {
        scope: WatermarkScope,
        watermark_ms: u64,
        reason: Reason,
        actor: String,
        at_ms: u64,
    },
}

/// What the state machine returns for each applied log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub outcome: Outcome,
    pub events: Vec<RevocationEvent>,
    /// Audit records of the revocations the command made.
    pub audit: Vec<AuditRecord>,
}

impl Applied {
    pub fn nothing() -> Self {
        Applied { outcome: Outcome::Nothing, events: Vec::new(), audit: Vec::new() }
    }
}

/// Verdict of a validity check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Valid,
    Revoked(Reason),
    Expired,
    Unknown,
    DeviceMismatch,
    StepUpRequired,
}
