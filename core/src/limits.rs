//! Per-user limits and retention. These are part of the replicated semantics: every replica of a
//! shard must run with the same values, so they are cluster-wide settings, not per-node tuning.

use serde::{Deserialize, Serialize};

/// What happens when a user already has `sessions_per_user_max` active sessions and creates one
/// more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionLimitPolicy {
    /// Refuse the new session (RESOURCE_EXHAUSTED).
    Reject,
    /// Revoke the oldest active session (never the new session's SSO parent chain), with reason
    /// `SessionLimit` and its cascade, then create the new one. This is the default: a user
    /// logging in on one more browser expects to get in.
    EvictOldest,
}

/// Limits that keep every user's state bounded (P6), and how long dead sessions are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Active (not revoked, not expired) sessions per user.
    pub sessions_per_user_max: u32,
    /// Devices with at least one active session, per user. Reaching it refuses the new device
    /// (RESOURCE_EXHAUSTED): evicting a device silently would surprise its owner.
    pub devices_per_user_max: u32,
    pub on_session_limit: SessionLimitPolicy,
    /// Revoked and expired sessions stay queryable (a check answers REVOKED or EXPIRED, not
    /// UNKNOWN) for this long, then a purge removes them.
    pub retention_ms: u64,
}

/// Refresh-token generations whose hashes are kept for reuse detection. Presenting a generation
/// older than this is refused as an invalid token instead of triggering revocation.
pub const REFRESH_GENERATIONS_KEPT: usize = 16;

/// Jobs a shard keeps, running or finished. Starting one more drops the job that finished
/// first; when all are running, the start is refused.
pub const JOBS_KEPT_MAX: usize = 256;

/// Bound on stored sessions per user, active or dead, so purge lag cannot grow a user without
/// limit: dead sessions beyond it are dropped oldest first.
pub const STORED_SESSIONS_PER_USER_FACTOR: u32 = 4;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sessions_per_user_max: 100,
            devices_per_user_max: 20,
            on_session_limit: SessionLimitPolicy::EvictOldest,
            retention_ms: 7 * 24 * 3600 * 1000,
        }
    }
}
