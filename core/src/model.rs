//! The replicated state of a shard: users, their devices and sessions, and the shard-wide
//! watermarks. Plain data with serde, so stores can persist it and snapshots can carry it.

use cascade_protocol::command::{Reason, SessionMetadata};
use cascade_protocol::ids::{SessionId, UserKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A refresh-token family (one per session that asked for one), per RFC 9700 rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshFamily {
    /// Generation of the only token that may be presented next.
    pub generation: u32,
    /// SHA-256 of that token's secret.
    pub secret_sha256: [u8; 32],
    /// (generation, secret hash) of superseded tokens, newest last, at most
    /// [`crate::limits::REFRESH_GENERATIONS_KEPT`]: presenting one of them is reuse.
    pub superseded: Vec<(u32, [u8; 32])>,
}

/// An explicit revocation mark on a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub at_ms: u64,
    pub reason: Reason,
    pub actor: String,
    pub text: String,
}

/// One user session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    pub client_id: String,
    /// Device the session is bound to; `jkt` is copied so a check needs no device lookup.
    pub device_id: Option<String>,
    pub jkt: Option<String>,
    pub aal: u8,
    pub amr: Vec<String>,
    pub created_at_ms: u64,
    /// Absolute expiry.
    pub expires_at_ms: u64,
    /// 0 = no idle timeout.
    pub idle_timeout_ms: u64,
    /// Last create or touch; the idle window runs from here.
    pub last_seen_ms: u64,
    /// SSO parent (same user).
    pub parent: Option<SessionId>,
    pub refresh: Option<RefreshFamily>,
    pub metadata: SessionMetadata,
    pub revoked: Option<Revoked>,
}

impl Session {
    /// When the session stops being valid by time alone: the earlier of absolute expiry and idle
    /// expiry.
    pub fn time_expiry_ms(&self) -> u64 {
        if self.idle_timeout_ms == 0 {
            self.expires_at_ms
        } else {
            self.expires_at_ms.min(self.last_seen_ms.saturating_add(self.idle_timeout_ms))
        }
    }
}

/// A device that has held a session of the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub device_id: String,
    /// RFC 7638 thumbprint of the device key.
    pub jkt: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Sessions of this device created at or before this time are invalid.
    pub watermark_ms: u64,
}

/// Everything stored for one user. Bounded: at most `sessions_per_user_max ×
/// STORED_SESSIONS_PER_USER_FACTOR` sessions and the devices they reference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserState {
    pub key: UserKey,
    pub sessions: BTreeMap<SessionId, Session>,
    pub devices: BTreeMap<String, Device>,
    /// Sessions of this user created at or before this time are invalid.
    pub watermark_ms: u64,
}

impl UserState {
    pub fn new(key: UserKey) -> Self {
        UserState { key, sessions: BTreeMap::new(), devices: BTreeMap::new(), watermark_ms: 0 }
    }

    /// Sessions whose ancestor chain contains `root`, `root` included, in id order.
    pub fn descendants(&self, root: SessionId) -> Vec<SessionId> {
        let mut out = vec![root];
        let mut frontier = vec![root];
        // Each pass scans the user's sessions once; the user's session count is bounded, and
        // `out` never holds an id twice because parent chains are acyclic (a parent exists before
        // its child is created).
        while let Some(parent) = frontier.pop() {
            for s in self.sessions.values() {
                if s.parent == Some(parent) && !out.contains(&s.id) {
                    out.push(s.id);
                    frontier.push(s.id);
                }
            }
        }
        out.sort();
        out
    }
}

/// Shard-wide state that is not per user.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Tenant watermarks.
    pub tenants: BTreeMap<String, u64>,
    /// Client watermarks, by tenant then client_id (nested so a check looks up without
    /// allocating).
    pub clients: BTreeMap<String, BTreeMap<String, u64>>,
    /// The shard's own clock: the largest time any applied command carried, bumped past every
    /// watermark it set. Commands apply at `max(stamped, clock_ms)`, so time never runs
    /// backwards in the state machine even when a new leader's clock is behind the old one's.
    pub clock_ms: u64,
}

impl ShardMeta {
    /// The latest watermark of tenant or client scope that applies to a session.
    pub fn watermark_for(&self, tenant: &str, client_id: &str) -> u64 {
        let t = self.tenants.get(tenant).copied().unwrap_or(0);
        let c = self.clients.get(tenant).and_then(|m| m.get(client_id)).copied().unwrap_or(0);
        t.max(c)
    }
}
