//! `apply(view, limits, envelope) -> Applied`: the deterministic state transition of a shard.
//!
//! Every revocation cascades inside the single command that caused it (P3): revoking a session
//! revokes its SSO descendants; a device or user revocation revokes everything bound to it and
//! moves a watermark. Refusals leave the state untouched.

use crate::jobs;
use crate::limits::{Limits, SessionLimitPolicy, REFRESH_GENERATIONS_KEPT, STORED_SESSIONS_PER_USER_FACTOR};
use crate::model::{Device, RefreshFamily, Revoked, Session, UserState};
use crate::validity::{liveness, Liveness};
use crate::view::ShardView;
use cascade_protocol::command::{Command, CreateSession, Envelope, Reason, Revocation, WatermarkScope};
use cascade_protocol::ids::{SessionId, UserKey};
use cascade_protocol::job::{AuditAction, AuditRecord};
use cascade_protocol::outcome::{Applied, Outcome, Refusal, RevocationEvent};

/// Apply one stamped command. The only time used is `max(envelope.now_ms, shard clock)`.
pub fn apply(view: &mut impl ShardView, limits: &Limits, envelope: &Envelope) -> Applied {
    let now = envelope.now_ms.max(view.meta().clock_ms);
    view.meta_mut().clock_ms = now;
    let mut events = Vec::new();
    let mut audit = Vec::new();
    let outcome = match &envelope.command {
        Command::CreateSession(c) => create_session(view, limits, c, now, &mut events),
        Command::Touch { session_id } => {
            with_session(view, *session_id, |user, meta_wm| touch(user, *session_id, meta_wm, now))
        }
        Command::StepUp { session_id, aal, amr } => with_session(view, *session_id, |user, meta_wm| {
            step_up(user, *session_id, meta_wm, *aal, amr, now)
        }),
        Command::RotateRefresh { session_id, generation, secret_sha256, new_secret_sha256 } => {
            with_session(view, *session_id, |user, meta_wm| {
                rotate(
                    user,
                    *session_id,
                    meta_wm,
                    *generation,
                    secret_sha256,
                    new_secret_sha256,
                    now,
                    &mut events,
                )
            })
        }
        Command::RevokeSession { session_id, revocation } => with_session(view, *session_id, |user, _| {
            let revoked =
                revoke_cascade(user, &[*session_id], revocation, revocation.reason, now, &mut events);
            Outcome::Revoked { revoked, at_ms: now }
        }),
        Command::RevokeFamily { session_id, revocation } => {
            with_session(view, *session_id, |user, _| match user.sessions.get(session_id) {
                Some(s) if s.refresh.is_none() => Outcome::Refused(Refusal::NoRefreshFamily),
                _ => {
                    let revoked =
                        revoke_cascade(user, &[*session_id], revocation, revocation.reason, now, &mut events);
                    Outcome::Revoked { revoked, at_ms: now }
                }
            })
        }
        Command::RevokeDevice { user, device_id, revocation } => {
            revoke_device(view, user, device_id, revocation, now, &mut events)
        }
        Command::RevokeUser { user, revocation } => revoke_user(view, user, revocation, now, &mut events),
        Command::SetWatermark { scope, not_before_ms, revocation } => {
            set_watermark(view, scope, *not_before_ms, revocation, now, &mut events)
        }
        Command::Purge { after, max_users } => purge(view, limits, after.as_ref(), *max_users, now),
        Command::StartJob { job, spec } => jobs::start(view, *job, spec, now, &mut events, &mut audit),
        Command::JobStep { job, after, max_users } => {
            jobs::step(view, *job, after.as_ref(), *max_users, now, &mut events, &mut audit)
        }
        Command::JobChunk { job, chunk, targets } => {
            jobs::chunk(view, *job, *chunk, targets, now, &mut events)
        }
        Command::FinishJob { job } => jobs::finish_list(view, *job, now, &mut audit),
        Command::CancelJob { job, actor } => jobs::cancel(view, *job, actor, now, &mut audit),
    };
    if let Some(record) = audit_of(view, &envelope.command, &outcome, now) {
        audit.push(record);
    }
    Applied { outcome, events, audit }
}

/// The audit record of a single revocation (jobs write their own when they finish).
fn audit_of(
    view: &mut impl ShardView,
    command: &Command,
    outcome: &Outcome,
    now: u64,
) -> Option<AuditRecord> {
    let record = |revocation: &Revocation, user: Option<UserKey>, action: AuditAction, sessions: usize| {
        Some(AuditRecord {
            at_ms: now,
            actor: revocation.actor.clone(),
            reason: revocation.reason,
            text: revocation.text.clone(),
            user,
            action,
            sessions: sessions as u64,
        })
    };
    let system = |reason: Reason, text: &str| Revocation::new(reason, "cascade", text);
    match (command, outcome) {
        (Command::RevokeSession { session_id, revocation }, Outcome::Revoked { revoked, .. }) => {
            let user = view.session_owner(session_id);
            record(revocation, user, AuditAction::RevokeSession { session_id: *session_id }, revoked.len())
        }
        (Command::RevokeFamily { session_id, revocation }, Outcome::Revoked { revoked, .. }) => {
            let user = view.session_owner(session_id);
            record(revocation, user, AuditAction::RevokeFamily { session_id: *session_id }, revoked.len())
        }
        (Command::RevokeDevice { user, device_id, revocation }, Outcome::Revoked { revoked, .. }) => record(
            revocation,
            Some(user.clone()),
            AuditAction::RevokeDevice { device_id: device_id.clone() },
            revoked.len(),
        ),
        (Command::RevokeUser { user, revocation }, Outcome::Revoked { revoked, .. }) => {
            record(revocation, Some(user.clone()), AuditAction::RevokeUser, revoked.len())
        }
        (Command::SetWatermark { scope, revocation, .. }, Outcome::WatermarkSet { watermark_ms }) => {
            let user = match scope {
                WatermarkScope::User { user } | WatermarkScope::Device { user, .. } => Some(user.clone()),
                _ => None,
            };
            // How many sessions a watermark covered is not counted here (that would be a scan
            // inside one command); a mass revocation job counts it.
            record(
                revocation,
                user,
                AuditAction::Watermark { scope: scope.clone(), watermark_ms: *watermark_ms },
                0,
            )
        }
        (Command::RotateRefresh { session_id, .. }, Outcome::ReuseDetected { revoked }) => {
            let user = view.session_owner(session_id);
            let why = system(Reason::RefreshTokenReuse, "refresh token presented again after rotation");
            record(&why, user, AuditAction::RefreshReuse { session_id: *session_id }, revoked.len())
        }
        (Command::CreateSession(c), Outcome::Created { evicted, .. }) if !evicted.is_empty() => {
            let why = system(Reason::SessionLimit, "oldest sessions evicted for a new one");
            record(&why, Some(c.user.clone()), AuditAction::SessionLimit, evicted.len())
        }
        _ => None,
    }
}

/// Watermark of tenant/client scope for a session; passed into per-user closures because the
/// view is borrowed while a user is out.
type MetaWatermark<'a> = &'a dyn Fn(&UserState, &Session) -> u64;

/// Run `f` on the user owning `session_id`, putting the user back afterwards.
fn with_session(
    view: &mut impl ShardView,
    session_id: SessionId,
    f: impl FnOnce(&mut UserState, MetaWatermark<'_>) -> Outcome,
) -> Outcome {
    let Some(key) = view.session_owner(&session_id) else {
        return Outcome::Refused(Refusal::SessionNotFound);
    };
    let Some(mut user) = view.take_user(&key) else {
        // The index points at a user that is gone: a store bug, not a caller error.
        debug_assert!(false, "session index points at missing user {key}");
        return Outcome::Refused(Refusal::SessionNotFound);
    };
    // Borrow the shard meta out of the view for the call instead of cloning its maps on every
    // command; `f` only reads it, and it goes back before the view is touched again.
    let meta = std::mem::take(view.meta_mut());
    let outcome = f(&mut user, &|u: &UserState, s: &Session| crate::validity::watermark_of(&meta, u, s));
    *view.meta_mut() = meta;
    view.put_user(user);
    outcome
}

fn is_active(user: &UserState, s: &Session, meta_wm: MetaWatermark<'_>, now: u64) -> bool {
    s.revoked.is_none() && s.created_at_ms > meta_wm(user, s) && now < s.time_expiry_ms()
}

fn touch(user: &mut UserState, id: SessionId, meta_wm: MetaWatermark<'_>, now: u64) -> Outcome {
    let Some(s) = user.sessions.get(&id) else { return Outcome::Refused(Refusal::SessionNotFound) };
    if !is_active(user, s, meta_wm, now) {
        return Outcome::Refused(Refusal::SessionNotActive);
    }
    let device_id = s.device_id.clone();
    let s = user.sessions.get_mut(&id).expect("checked above");
    s.last_seen_ms = now;
    let idle_expires_at_ms = if s.idle_timeout_ms == 0 { 0 } else { now.saturating_add(s.idle_timeout_ms) };
    if let Some(d) = device_id.and_then(|d| user.devices.get_mut(&d)) {
        d.last_seen_ms = now;
    }
    Outcome::Touched { idle_expires_at_ms }
}

fn step_up(
    user: &mut UserState,
    id: SessionId,
    meta_wm: MetaWatermark<'_>,
    aal: u8,
    amr: &[String],
    now: u64,
) -> Outcome {
    let Some(s) = user.sessions.get(&id) else { return Outcome::Refused(Refusal::SessionNotFound) };
    if !is_active(user, s, meta_wm, now) {
        return Outcome::Refused(Refusal::SessionNotActive);
    }
    if aal <= s.aal {
        return Outcome::Refused(Refusal::AalNotHigher { current: s.aal });
    }
    let s = user.sessions.get_mut(&id).expect("checked above");
    s.aal = aal;
    s.amr = amr.to_vec();
    s.last_seen_ms = now;
    Outcome::SteppedUp { aal }
}

#[allow(clippy::too_many_arguments)]
fn rotate(
    user: &mut UserState,
    id: SessionId,
    meta_wm: MetaWatermark<'_>,
    generation: u32,
    secret: &[u8; 32],
    new_secret: &[u8; 32],
    now: u64,
    events: &mut Vec<RevocationEvent>,
) -> Outcome {
    let Some(s) = user.sessions.get(&id) else { return Outcome::Refused(Refusal::SessionNotFound) };
    let Some(family) = &s.refresh else { return Outcome::Refused(Refusal::NoRefreshFamily) };
    if generation == family.generation && &family.secret_sha256 == secret {
        if !is_active(user, s, meta_wm, now) {
            return Outcome::Refused(Refusal::SessionNotActive);
        }
        let s = user.sessions.get_mut(&id).expect("checked above");
        let family = s.refresh.as_mut().expect("checked above");
        family.superseded.push((family.generation, family.secret_sha256));
        if family.superseded.len() > REFRESH_GENERATIONS_KEPT {
            family.superseded.remove(0);
        }
        family.generation += 1;
        family.secret_sha256 = *new_secret;
        s.last_seen_ms = now;
        return Outcome::Rotated { generation: family.generation };
    }
    if family.superseded.iter().any(|(g, h)| *g == generation && h == secret) {
        // RFC 9700 §4.14.2: a superseded refresh token was presented, so it was stolen or
        // replayed; the whole family and its session go.
        let revocation =
            Revocation::new(Reason::RefreshTokenReuse, "cascade", "refresh token reuse detected");
        let revoked = revoke_cascade(user, &[id], &revocation, Reason::RefreshTokenReuse, now, events);
        return Outcome::ReuseDetected { revoked };
    }
    Outcome::Refused(Refusal::InvalidRefreshToken)
}

/// Revoke `roots` and all their descendants that are not revoked yet, in one step. The roots get
/// `root_reason`; descendants get `ParentRevoked`. Returns the newly revoked ids, sorted.
pub(crate) fn revoke_cascade(
    user: &mut UserState,
    roots: &[SessionId],
    revocation: &Revocation,
    root_reason: Reason,
    now: u64,
    events: &mut Vec<RevocationEvent>,
) -> Vec<SessionId> {
    let mut targets: Vec<(SessionId, Reason)> = Vec::new();
    for root in roots {
        for id in user.descendants(*root) {
            let reason = if roots.contains(&id) { root_reason } else { Reason::ParentRevoked };
            if !targets.iter().any(|(t, _)| *t == id) {
                targets.push((id, reason));
            }
        }
    }
    targets.sort();
    if crate::planted::planted(crate::planted::Bug::SkipCascadeChild) {
        // Planted bug: forget the last descendant of the cascade.
        if let Some(pos) = targets.iter().rposition(|(_, r)| *r == Reason::ParentRevoked) {
            targets.remove(pos);
        }
    }
    let mut revoked = Vec::new();
    for (id, reason) in targets {
        let Some(s) = user.sessions.get_mut(&id) else { continue };
        if s.revoked.is_some() {
            continue;
        }
        s.revoked = Some(Revoked {
            at_ms: now,
            reason,
            actor: revocation.actor.clone(),
            text: revocation.text.clone(),
        });
        events.push(RevocationEvent::Session {
            session_id: id,
            user: user.key.clone(),
            reason,
            actor: revocation.actor.clone(),
            at_ms: now,
            expires_at_ms: s.expires_at_ms,
        });
        revoked.push(id);
    }
    revoked
}

fn create_session(
    view: &mut impl ShardView,
    limits: &Limits,
    c: &CreateSession,
    now: u64,
    events: &mut Vec<RevocationEvent>,
) -> Outcome {
    if view.session_owner(&c.session_id).is_some() {
        return Outcome::Refused(Refusal::DuplicateSession);
    }
    let existing = view.take_user(&c.user);
    let existed = existing.is_some();
    let mut user = existing.unwrap_or_else(|| UserState::new(c.user.clone()));
    // As in `with_session`: meta is read-only here and goes back before the view is used.
    let meta = std::mem::take(view.meta_mut());
    let wm = |u: &UserState, s: &Session| crate::validity::watermark_of(&meta, u, s);
    let outcome = create_in_user(&mut user, limits, c, now, &wm, events);
    let keep = existed || matches!(outcome, Outcome::Created { .. });
    let dropped = if matches!(outcome, Outcome::Created { .. }) {
        bound_stored_sessions(&mut user, limits, &wm, now)
    } else {
        Vec::new()
    };
    *view.meta_mut() = meta;
    if keep {
        view.put_user(user);
    }
    for id in dropped {
        view.unindex_session(&id);
    }
    if matches!(outcome, Outcome::Created { .. }) {
        view.index_session(c.session_id, &c.user);
    }
    outcome
}

fn create_in_user(
    user: &mut UserState,
    limits: &Limits,
    c: &CreateSession,
    now: u64,
    meta_wm: MetaWatermark<'_>,
    events: &mut Vec<RevocationEvent>,
) -> Outcome {
    // SSO parent: must be an active session of the same user.
    let mut expires_at_ms = now.saturating_add(c.ttl_ms);
    let mut protected: Vec<SessionId> = Vec::new();
    if let Some(parent_id) = c.parent {
        let Some(parent) = user.sessions.get(&parent_id) else {
            return Outcome::Refused(Refusal::ParentNotFound);
        };
        if !is_active(user, parent, meta_wm, now) {
            return Outcome::Refused(Refusal::ParentNotActive);
        }
        // A child never outlives its parent's absolute expiry.
        expires_at_ms = expires_at_ms.min(parent.expires_at_ms);
        let mut cursor = Some(parent_id);
        while let Some(id) = cursor {
            protected.push(id);
            cursor = user.sessions.get(&id).and_then(|s| s.parent);
        }
    }

    // Device binding and the device limit.
    if let Some(binding) = &c.device {
        let live_devices: Vec<&str> = user
            .sessions
            .values()
            .filter(|s| is_active(user, s, meta_wm, now))
            .filter_map(|s| s.device_id.as_deref())
            .collect();
        let device_live = live_devices.contains(&binding.device_id.as_str());
        match user.devices.get(&binding.device_id) {
            Some(d) if d.jkt != binding.jkt && device_live => {
                return Outcome::Refused(Refusal::DeviceKeyMismatch);
            }
            _ => {}
        }
        if !device_live {
            let mut distinct: Vec<&str> = live_devices.clone();
            distinct.sort_unstable();
            distinct.dedup();
            if distinct.len() as u32 >= limits.devices_per_user_max {
                return Outcome::Refused(Refusal::DeviceLimit { max: limits.devices_per_user_max });
            }
        }
    }

    // Session limit.
    let mut active: Vec<(u64, SessionId)> = user
        .sessions
        .values()
        .filter(|s| is_active(user, s, meta_wm, now))
        .map(|s| (s.created_at_ms, s.id))
        .collect();
    let mut evicted = Vec::new();
    if active.len() as u32 >= limits.sessions_per_user_max {
        match limits.on_session_limit {
            SessionLimitPolicy::Reject => {
                return Outcome::Refused(Refusal::SessionLimit { max: limits.sessions_per_user_max });
            }
            SessionLimitPolicy::EvictOldest => {
                active.sort();
                let revocation =
                    Revocation::new(Reason::SessionLimit, "cascade", "per-user session limit reached");
                let mut n_active = active.len() as u32;
                for (_, id) in active.iter() {
                    if n_active < limits.sessions_per_user_max {
                        break;
                    }
                    if protected.contains(id) {
                        continue;
                    }
                    let still_active =
                        user.sessions.get(id).is_some_and(|s| is_active(user, s, meta_wm, now));
                    if !still_active {
                        continue; // already revoked as a descendant of an earlier eviction
                    }
                    let revoked =
                        revoke_cascade(user, &[*id], &revocation, Reason::SessionLimit, now, events);
                    n_active -= revoked.len() as u32;
                    evicted.extend(revoked);
                }
                if n_active >= limits.sessions_per_user_max {
                    return Outcome::Refused(Refusal::SessionLimit { max: limits.sessions_per_user_max });
                }
            }
        }
    }

    if let Some(binding) = &c.device {
        let d = user.devices.entry(binding.device_id.clone()).or_insert_with(|| Device {
            device_id: binding.device_id.clone(),
            jkt: binding.jkt.clone(),
            first_seen_ms: now,
            last_seen_ms: now,
            watermark_ms: 0,
        });
        d.jkt = binding.jkt.clone();
        d.last_seen_ms = now;
    }
    let session = Session {
        id: c.session_id,
        client_id: c.client_id.clone(),
        device_id: c.device.as_ref().map(|d| d.device_id.clone()),
        jkt: c.device.as_ref().map(|d| d.jkt.clone()),
        aal: c.aal,
        amr: c.amr.clone(),
        created_at_ms: now,
        expires_at_ms,
        idle_timeout_ms: c.idle_timeout_ms,
        last_seen_ms: now,
        parent: c.parent,
        refresh: c.refresh_secret_sha256.map(|h| RefreshFamily {
            generation: 1,
            secret_sha256: h,
            superseded: Vec::new(),
        }),
        metadata: c.metadata.clone(),
        revoked: None,
    };
    user.sessions.insert(c.session_id, session);
    evicted.sort();
    Outcome::Created { session_id: c.session_id, created_at_ms: now, expires_at_ms, evicted }
}

/// Keep at most `sessions_per_user_max × STORED_SESSIONS_PER_USER_FACTOR` stored sessions: drop
/// dead ones (revoked or expired), oldest first, before purge would. Returns the dropped ids.
fn bound_stored_sessions(
    user: &mut UserState,
    limits: &Limits,
    meta_wm: MetaWatermark<'_>,
    now: u64,
) -> Vec<SessionId> {
    let cap = (limits.sessions_per_user_max.saturating_mul(STORED_SESSIONS_PER_USER_FACTOR)) as usize;
    if user.sessions.len() <= cap {
        return Vec::new();
    }
    let mut dead: Vec<(u64, SessionId)> = user
        .sessions
        .values()
        .filter(|s| !is_active(user, s, meta_wm, now))
        .map(|s| (s.created_at_ms, s.id))
        .collect();
    dead.sort();
    let excess = user.sessions.len() - cap;
    let dropped: Vec<SessionId> = dead.into_iter().take(excess).map(|(_, id)| id).collect();
    for id in &dropped {
        user.sessions.remove(id);
    }
    dropped
}

pub(crate) fn revoke_device(
    view: &mut impl ShardView,
    key: &UserKey,
    device_id: &str,
    revocation: &Revocation,
    now: u64,
    events: &mut Vec<RevocationEvent>,
) -> Outcome {
    let Some(mut user) = view.take_user(key) else { return Outcome::Refused(Refusal::UserNotFound) };
    let outcome = match user.devices.get_mut(device_id) {
        None => Outcome::Refused(Refusal::DeviceNotFound),
        Some(d) => {
            let moved = now > d.watermark_ms;
            d.watermark_ms = d.watermark_ms.max(now);
            let watermark_ms = d.watermark_ms;
            let roots: Vec<SessionId> = user
                .sessions
                .values()
                .filter(|s| s.device_id.as_deref() == Some(device_id))
                .map(|s| s.id)
                .collect();
            let revoked = revoke_cascade(&mut user, &roots, revocation, Reason::DeviceRevoked, now, events);
            if moved {
                events.push(RevocationEvent::Watermark {
                    scope: WatermarkScope::Device { user: key.clone(), device_id: device_id.to_owned() },
                    watermark_ms,
                    reason: revocation.reason,
                    actor: revocation.actor.clone(),
                    at_ms: now,
                });
            }
            Outcome::Revoked { revoked, at_ms: now }
        }
    };
    view.put_user(user);
    if matches!(outcome, Outcome::Revoked { .. }) {
        bump_clock_past(view, now);
    }
    outcome
}

pub(crate) fn revoke_user(
    view: &mut impl ShardView,
    key: &UserKey,
    revocation: &Revocation,
    now: u64,
    events: &mut Vec<RevocationEvent>,
) -> Outcome {
    let Some(mut user) = view.take_user(key) else { return Outcome::Refused(Refusal::UserNotFound) };
    let moved = now > user.watermark_ms;
    user.watermark_ms = user.watermark_ms.max(now);
    let roots: Vec<SessionId> = user.sessions.keys().copied().collect();
    let revoked = revoke_cascade(&mut user, &roots, revocation, Reason::UserRevoked, now, events);
    if moved {
        events.push(RevocationEvent::Watermark {
            scope: WatermarkScope::User { user: key.clone() },
            watermark_ms: user.watermark_ms,
            reason: revocation.reason,
            actor: revocation.actor.clone(),
            at_ms: now,
        });
    }
    view.put_user(user);
    bump_clock_past(view, now);
    Outcome::Revoked { revoked, at_ms: now }
}

/// After a watermark at `t`, the shard clock moves to `t + 1` so a session created by a later
/// command in the same millisecond is not caught by it (`created_at <= watermark` is revoked).
fn bump_clock_past(view: &mut impl ShardView, t: u64) {
    let meta = view.meta_mut();
    meta.clock_ms = meta.clock_ms.max(t.saturating_add(1));
}

pub(crate) fn set_watermark(
    view: &mut impl ShardView,
    scope: &WatermarkScope,
    not_before_ms: u64,
    revocation: &Revocation,
    now: u64,
    events: &mut Vec<RevocationEvent>,
) -> Outcome {
    let at = if not_before_ms == 0 { now } else { not_before_ms };
    if at > now {
        return Outcome::Refused(Refusal::WatermarkInFuture);
    }
    let (old, new) = match scope {
        WatermarkScope::Tenant { tenant } => {
            let slot = view.meta_mut().tenants.entry(tenant.clone()).or_insert(0);
            let old = *slot;
            *slot = old.max(at);
            (old, *slot)
        }
        WatermarkScope::Client { tenant, client_id } => {
            let slot = view
                .meta_mut()
                .clients
                .entry(tenant.clone())
                .or_default()
                .entry(client_id.clone())
                .or_insert(0);
            let old = *slot;
            *slot = old.max(at);
            (old, *slot)
        }
        WatermarkScope::User { user } => {
            let Some(mut u) = view.take_user(user) else { return Outcome::Refused(Refusal::UserNotFound) };
            let old = u.watermark_ms;
            u.watermark_ms = old.max(at);
            let new = u.watermark_ms;
            view.put_user(u);
            (old, new)
        }
        WatermarkScope::Device { user, device_id } => {
            let Some(mut u) = view.take_user(user) else { return Outcome::Refused(Refusal::UserNotFound) };
            let res = u.devices.get_mut(device_id).map(|d| {
                let old = d.watermark_ms;
                d.watermark_ms = old.max(at);
                (old, d.watermark_ms)
            });
            view.put_user(u);
            match res {
                Some(r) => r,
                None => return Outcome::Refused(Refusal::DeviceNotFound),
            }
        }
    };
    if new > old {
        events.push(RevocationEvent::Watermark {
            scope: scope.clone(),
            watermark_ms: new,
            reason: revocation.reason,
            actor: revocation.actor.clone(),
            at_ms: now,
        });
    }
    bump_clock_past(view, new);
    Outcome::WatermarkSet { watermark_ms: new }
}

fn purge(
    view: &mut impl ShardView,
    limits: &Limits,
    after: Option<&UserKey>,
    max_users: u32,
    now: u64,
) -> Outcome {
    let keys = view.users_after(after, max_users as usize);
    let next = if keys.len() == max_users as usize { keys.last().cloned() } else { None };
    let meta = view.meta().clone();
    let (mut n_sessions, mut n_users) = (0u64, 0u64);
    for key in keys {
        // Read first: a user with nothing to drop is left as it is, not written again (a pass
        // visits every user of the shard).
        let Some(mut user) = view.get_user(&key) else { continue };
        let doomed: Vec<SessionId> = user
            .sessions
            .values()
            .filter(|s| {
                let dead_since = match liveness(&meta, &user, s, now) {
                    Liveness::Active => return false,
                    Liveness::Revoked(_) => match &s.revoked {
                        Some(r) => r.at_ms,
                        // Revoked by a watermark: its time is not recorded, so wait for expiry.
                        None => s.time_expiry_ms(),
                    },
                    Liveness::Expired => s.time_expiry_ms(),
                };
                dead_since.saturating_add(limits.retention_ms) <= now
            })
            .map(|s| s.id)
            .collect();
        for id in &doomed {
            user.sessions.remove(id);
        }
        let referenced: Vec<String> = user.sessions.values().filter_map(|s| s.device_id.clone()).collect();
        let devices = user.devices.len();
        user.devices.retain(|id, d| {
            referenced.contains(id) || d.last_seen_ms.saturating_add(limits.retention_ms) > now
        });
        let emptied = user.sessions.is_empty() && user.devices.is_empty();
        if doomed.is_empty() && user.devices.len() == devices && !emptied {
            continue;
        }
        let _stored = view.take_user(&key);
        for id in &doomed {
            view.unindex_session(id);
        }
        n_sessions += doomed.len() as u64;
        if emptied {
            // Dropping the user also drops its watermark; that is safe because no session of the
            // user remains and every later session is created after it (the clock only moves
            // forward, past every watermark).
            n_users += 1;
        } else {
            view.put_user(user);
        }
    }
    Outcome::Purged { n_sessions, n_users, next }
}
