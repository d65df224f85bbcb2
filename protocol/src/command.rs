//! Replicated commands: what goes into the Raft log. The leader stamps `now_ms` into every
//! envelope, so applying a command never reads a clock.

use crate::ids::{SessionId, UserKey};
use crate::job::{JobId, JobSpec, Target};
use serde::{Deserialize, Serialize};

/// Version of the log entry format. Bump on any incompatible change to [`Command`] or the types it
/// carries; a replica refuses entries of a version it does not know instead of misreading them.
pub const FORMAT_VERSION: u8 = 1;

/// One replicated command with the time the leader stamped on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Log entry format, [`FORMAT_VERSION`] when written by this build.
    pub version: u8,
    /// Milliseconds since the Unix epoch, stamped by the node that proposed the command. The state
    /// machine uses this and only this as "now".
    pub now_ms: u64,
    pub command: Command,
}

impl Envelope {
    pub fn new(now_ms: u64, command: Command) -> Self {
        Envelope { version: FORMAT_VERSION, now_ms, command }
    }
}

/// Why something was revoked. Carried into every revocation and its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reason {
    Unspecified,
    Logout,
    Admin,
    Compromised,
    RefreshTokenReuse,
    SessionLimit,
    Policy,
    ParentRevoked,
    DeviceRevoked,
    UserRevoked,
    Watermark,
}

/// Who revoked, why, in words. The time comes from the envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub reason: Reason,
    /// Free text for the audit trail, at most [`crate::limits::TEXT_LEN_MAX`] bytes.
    pub text: String,
    /// The caller, at most [`crate::limits::ACTOR_LEN_MAX`] bytes.
    pub actor: String,
}

impl Revocation {
    pub fn new(reason: Reason, actor: impl Into<String>, text: impl Into<String>) -> Self {
        Revocation { reason, text: text.into(), actor: actor.into() }
    }
}

/// A device binding: the device and the RFC 7638 thumbprint of its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBinding {
    pub device_id: String,
    pub jkt: String,
}

/// Free-form request metadata kept with a session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMetadata {
    pub ip: String,
    pub user_agent: String,
    pub region: String,
}

/// Create a session. The id and the refresh secret's hash are drawn by the proposing node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSession {
    pub session_id: SessionId,
    pub user: UserKey,
    pub client_id: String,
    pub device: Option<DeviceBinding>,
    /// Authenticator assurance level, 1..=3.
    pub aal: u8,
    pub amr: Vec<String>,
    pub ttl_ms: u64,
    /// 0 means no idle timeout.
    pub idle_timeout_ms: u64,
    /// SSO parent; must be an active session of the same user.
    pub parent: Option<SessionId>,
    /// SHA-256 of the first refresh-token secret, if the session gets a refresh family.
    pub refresh_secret_sha256: Option<[u8; 32]>,
    pub metadata: SessionMetadata,
}

/// What a watermark applies to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WatermarkScope {
    Tenant { tenant: String },
    Client { tenant: String, client_id: String },
    User { user: UserKey },
    Device { user: UserKey, device_id: String },
}

/// Every state change of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateSession(Box<CreateSession>),
    /// Extend the idle window of a session to now.
    Touch {
        session_id: SessionId,
    },
    /// Raise a session's assurance level after the user re-authenticated.
    StepUp {
        session_id: SessionId,
        aal: u8,
        amr: Vec<String>,
    },
    /// Present a refresh token of `generation`; rotate to `generation + 1` with a new secret, or
    /// detect reuse of an old generation.
    RotateRefresh {
        session_id: SessionId,
        generation: u32,
        secret_sha256: [u8; 32],
        new_secret_sha256: [u8; 32],
    },
    /// Revoke a session and, in the same entry, every SSO descendant.
    RevokeSession {
        session_id: SessionId,
        revocation: Revocation,
    },
    /// Revoke a session's refresh-token family, which revokes the session and its descendants.
    RevokeFamily {
        session_id: SessionId,
        revocation: Revocation,
    },
    /// Revoke a device: every session bound to it, and a device watermark.
    RevokeDevice {
        user: UserKey,
        device_id: String,
        revocation: Revocation,
    },
    /// Revoke a user: every session, and a user watermark.
    RevokeUser {
        user: UserKey,
        revocation: Revocation,
    },
    /// Move a watermark forward: sessions created at or before `not_before_ms` in its scope
    /// are invalid. Tenant and client watermarks are proposed to every shard.
    SetWatermark {
        scope: WatermarkScope,
        not_before_ms: u64,
        revocation: Revocation,
    },
    /// Remove sessions that have been revoked or expired for longer than the retention, scanning
    /// at most `max_users` users after `after` (in key order).
    Purge {
        after: Option<UserKey>,
        max_users: u32,
    },
    /// Start a mass revocation job on this shard (a no-op if it already runs here). A job whose
    /// selector is a watermark revokes everything at once, here.
    StartJob {
        job: JobId,
        spec: Box<JobSpec>,
    },
    /// Scan at most `max_users` users after `after` for a running filter job. Applied only when
    /// `after` is the job's cursor, so a step proposed twice (a retry across a leader change)
    /// counts once.
    JobStep {
        job: JobId,
        after: Option<UserKey>,
        max_users: u32,
    },
    /// Revoke the users and devices of chunk `chunk` of a list job; chunks at or below the last
    /// one applied are ignored, so a caller that resends after a failure never double counts.
    JobChunk {
        job: JobId,
        chunk: u64,
        targets: Vec<Target>,
    },
    /// A list job's caller sent its last chunk.
    FinishJob {
        job: JobId,
    },
    /// Stop a running job here; what it already revoked stays revoked.
    CancelJob {
        job: JobId,
        actor: String,
    },
}

impl Command {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateSession(_) => "create_session",
            Command::Touch { .. } => "touch",
            Command::StepUp { .. } => "step_up",
            Command::RotateRefresh { .. } => "rotate_refresh",
            Command::RevokeSession { .. } => "revoke_session",
            Command::RevokeFamily { .. } => "revoke_family",
            Command::RevokeDevice { .. } => "revoke_device",
            Command::RevokeUser { .. } => "revoke_user",
            Command::SetWatermark { .. } => "set_watermark",
            Command::Purge { .. } => "purge",
            Command::StartJob { .. } => "start_job",
            Command::JobStep { .. } => "job_step",
            Command::JobChunk { .. } => "job_chunk",
            Command::FinishJob { .. } => "finish_job",
            Command::CancelJob { .. } => "cancel_job",
        }
    }
}
