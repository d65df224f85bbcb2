//! Is a session valid, for this device, at this assurance level, at this time? A pure function of
//! (state, now): the same inputs always give the same verdict.

use crate::model::{Session, ShardMeta, UserState};
use cascade_protocol::command::Reason;
use cascade_protocol::outcome::Verdict;

/// Life state of a session at a time, ignoring device and assurance requirements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Active,
    Revoked(Reason),
    Expired,
}

/// The latest watermark that applies to a session (tenant, client, user, device).
pub fn watermark_of(meta: &ShardMeta, user: &UserState, s: &Session) -> u64 {
    let device_wm = s.device_id.as_ref().and_then(|d| user.devices.get(d)).map_or(0, |d| d.watermark_ms);
    meta.watermark_for(&user.key.tenant, &s.client_id).max(user.watermark_ms).max(device_wm)
}

/// Revoked (explicitly or by a watermark) beats expired: a revoked session says why.
pub fn liveness(meta: &ShardMeta, user: &UserState, s: &Session, now_ms: u64) -> Liveness {
    if let Some(r) = &s.revoked {
        return Liveness::Revoked(r.reason);
    }
    if s.created_at_ms <= watermark_of(meta, user, s) {
        return Liveness::Revoked(Reason::Watermark);
    }
    if now_ms >= s.time_expiry_ms() {
        return Liveness::Expired;
    }
    Liveness::Active
}

/// The verdict for a check of `s` presenting key thumbprint `jkt` and requiring `required_aal`
/// (0 = no requirement). A session bound to a device is valid only with that device's key.
pub fn verdict(
    meta: &ShardMeta,
    user: &UserState,
    s: &Session,
    jkt: Option<&str>,
    required_aal: u8,
    now_ms: u64,
) -> Verdict {
    match liveness(meta, user, s, now_ms) {
        Liveness::Revoked(reason) => Verdict::Revoked(reason),
        Liveness::Expired => Verdict::Expired,
        Liveness::Active => {
            if let Some(bound) = &s.jkt {
                if jkt != Some(bound.as_str()) {
                    return Verdict::DeviceMismatch;
                }
            }
            if required_aal > s.aal {
                return Verdict::StepUpRequired;
            }
            Verdict::Valid
        }
    }
}

/// Check a session id against a user's state (None when the user is unknown).
pub fn evaluate(
    meta: &ShardMeta,
    user: Option<&UserState>,
    session_id: &cascade_protocol::ids::SessionId,
    jkt: Option<&str>,
    required_aal: u8,
    now_ms: u64,
) -> Verdict {
    match user.and_then(|u| u.sessions.get(session_id).map(|s| (u, s))) {
        None => Verdict::Unknown,
        Some((u, s)) => verdict(meta, u, s, jkt, required_aal, now_ms),
    }
}
