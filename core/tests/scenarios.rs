//! Every command kind through `apply`, with the outcome and the events it must produce.

mod support;

use cascade_core::limits::{Limits, SessionLimitPolicy};
use cascade_core::model::{ShardMeta, UserState};
use cascade_core::validity::evaluate;
use cascade_core::view::{MemShard, ShardView};
use cascade_protocol::command::{Command, Envelope, Reason, Revocation, WatermarkScope};
use cascade_protocol::ids::{SessionId, UserKey};
use cascade_protocol::job::{Job, JobId};
use cascade_protocol::outcome::{Outcome, Refusal, RevocationEvent, Verdict};
use support::*;

const T0: u64 = 1_700_000_000_000;

fn rev() -> Revocation {
    Revocation::new(Reason::Admin, "ops@acme", "test")
}

/// DESIGN §2: a session bound to a device is valid only with that device's key; AAL gates step-up.
#[test]
fn create_check_device_binding_and_step_up() {
    let mut s = MemShard::default();
    let a = run(&mut s, T0, create(1, "alice", Some(1), None));
    assert!(matches!(a.outcome, Outcome::Created { .. }), "{a:?}");
    let u = s.user_of(&sid(1));
    assert_eq!(evaluate(&s.meta, u, &sid(1), Some(&jkt(1)), 0, T0 + 1), Verdict::Valid);
    assert_eq!(evaluate(&s.meta, u, &sid(1), Some(&jkt(2)), 0, T0 + 1), Verdict::DeviceMismatch);
    assert_eq!(evaluate(&s.meta, u, &sid(1), None, 0, T0 + 1), Verdict::DeviceMismatch);
    assert_eq!(evaluate(&s.meta, u, &sid(1), Some(&jkt(1)), 2, T0 + 1), Verdict::StepUpRequired);
    assert_eq!(evaluate(&s.meta, u, &sid(999), None, 0, T0 + 1), Verdict::Unknown);

    let up = run(&mut s, T0 + 2, Command::StepUp { session_id: sid(1), aal: 2, amr: vec!["otp".into()] });
    assert_eq!(up.outcome, Outcome::SteppedUp { aal: 2 });
    let u = s.user_of(&sid(1));
    assert_eq!(evaluate(&s.meta, u, &sid(1), Some(&jkt(1)), 2, T0 + 3), Verdict::Valid);
    let down = run(&mut s, T0 + 4, Command::StepUp { session_id: sid(1), aal: 1, amr: vec![] });
    assert_eq!(down.outcome, Outcome::Refused(Refusal::AalNotHigher { current: 2 }));
}

/// Absolute expiry and idle timeout, and touch extending the idle window.
#[test]
fn expiry_idle_and_touch() {
    let mut s = MemShard::default();
    run(&mut s, T0, create(1, "alice", None, None));
    assert_eq!(check(&s, sid(1), T0 + HOUR_MS - 1), Verdict::Valid);
    assert_eq!(check(&s, sid(1), T0 + HOUR_MS), Verdict::Expired);
    let t = run(&mut s, T0 + HOUR_MS / 2, Command::Touch { session_id: sid(1) });
    assert_eq!(t.outcome, Outcome::Touched { idle_expires_at_ms: T0 + HOUR_MS / 2 + HOUR_MS });
    assert_eq!(check(&s, sid(1), T0 + HOUR_MS), Verdict::Valid);
    // Absolute expiry wins over touches.
    for i in 1..16 {
        run(&mut s, T0 + i * HOUR_MS / 2, Command::Touch { session_id: sid(1) });
    }
    assert_eq!(check(&s, sid(1), T0 + 8 * HOUR_MS), Verdict::Expired);
    let late = run(&mut s, T0 + 9 * HOUR_MS, Command::Touch { session_id: sid(1) });
    assert_eq!(late.outcome, Outcome::Refused(Refusal::SessionNotActive));
}

/// P3: revoking a session revokes its SSO descendants in the same command, with events.
#[test]
fn revoke_session_cascades_to_sso_children() {
    let mut s = MemShard::default();
    run(&mut s, T0, create(1, "alice", None, None));
    run(&mut s, T0 + 1, create(2, "alice", None, Some(1)));
    run(&mut s, T0 + 2, create(3, "alice", None, Some(2)));
    run(&mut s, T0 + 3, create(4, "alice", None, None));
    let a = run(&mut s, T0 + 10, Command::RevokeSession { session_id: sid(1), revocation: rev() });
    assert_eq!(a.outcome, Outcome::Revoked { revoked: vec![sid(1), sid(2), sid(3)], at_ms: T0 + 10 });
    assert_eq!(a.events.len(), 3);
    assert_eq!(check(&s, sid(1), T0 + 11), Verdict::Revoked(Reason::Admin));
    assert_eq!(check(&s, sid(2), T0 + 11), Verdict::Revoked(Reason::ParentRevoked));
    assert_eq!(check(&s, sid(3), T0 + 11), Verdict::Revoked(Reason::ParentRevoked));
    assert_eq!(check(&s, sid(4), T0 + 11), Verdict::Valid);
    // Idempotent: a second revoke revokes nothing new and emits nothing.
    let again = run(&mut s, T0 + 12, Command::RevokeSession { session_id: sid(1), revocation: rev() });
    assert_eq!(again.outcome, Outcome::Revoked { revoked: vec![], at_ms: T0 + 12 });
    assert!(again.events.is_empty());
    // A revoked parent cannot get new children.
    let child = run(&mut s, T0 + 13, create(5, "alice", None, Some(1)));
    assert_eq!(child.outcome, Outcome::Refused(Refusal::ParentNotActive));
}

/// RFC 9700 §4.14.2: rotation, then reuse of a superseded token revokes the family and session.
#[test]
fn refresh_rotation_and_reuse_detection() {
    let mut s = MemShard::default();
    run(&mut s, T0, create(7, "alice", None, None));
    run(&mut s, T0 + 1, create(8, "alice", None, Some(7)));
    let rotate = |generation, secret: u8, new: u8| Command::RotateRefresh {
        session_id: sid(7),
        generation,
        secret_sha256: [secret; 32],
        new_secret_sha256: [new; 32],
    };
    assert_eq!(run(&mut s, T0 + 2, rotate(1, 7, 70)).outcome, Outcome::Rotated { generation: 2 });
    assert_eq!(run(&mut s, T0 + 3, rotate(2, 70, 71)).outcome, Outcome::Rotated { generation: 3 });
    // A wrong secret for the current generation is refused and revokes nothing.
    assert_eq!(
        run(&mut s, T0 + 4, rotate(3, 99, 72)).outcome,
        Outcome::Refused(Refusal::InvalidRefreshToken)
    );
    assert_eq!(check(&s, sid(7), T0 + 5), Verdict::Valid);
    // Replaying generation 1 is reuse.
    let reuse = run(&mut s, T0 + 6, rotate(1, 7, 73));
    assert_eq!(reuse.outcome, Outcome::ReuseDetected { revoked: vec![sid(7), sid(8)] });
    assert_eq!(check(&s, sid(7), T0 + 7), Verdict::Revoked(Reason::RefreshTokenReuse));
    assert_eq!(check(&s, sid(8), T0 + 7), Verdict::Revoked(Reason::ParentRevoked));
    // The current token no longer rotates either.
    assert_eq!(run(&mut s, T0 + 8, rotate(3, 71, 74)).outcome, Outcome::Refused(Refusal::SessionNotActive));
}

/// P3: a device revocation revokes everything bound to it in one entry and moves its watermark.
#[test]
fn revoke_device_and_user() {
    let mut s = MemShard::default();
    run(&mut s, T0, create(1, "alice", Some(1), None));
    run(&mut s, T0 + 1, create(2, "alice", Some(1), None));
    run(&mut s, T0 + 2, create(3, "alice", Some(2), None));
    let d = run(
        &mut s,
        T0 + 10,
        Command::RevokeDevice { user: user("alice"), device_id: "dev1".into(), revocation: rev() },
    );
    assert_eq!(d.outcome, Outcome::Revoked { revoked: vec![sid(1), sid(2)], at_ms: T0 + 10 });
    assert!(d.events.iter().any(|e| matches!(e, RevocationEvent::Watermark { .. })));
    assert_eq!(check(&s, sid(3), T0 + 11), Verdict::Valid);
    // The device can log in again afterwards (the watermark only covers older sessions).
    run(&mut s, T0 + 10, create(4, "alice", Some(1), None));
    assert_eq!(check(&s, sid(4), T0 + 12), Verdict::Valid);

    let u = run(&mut s, T0 + 20, Command::RevokeUser { user: user("alice"), revocation: rev() });
    assert_eq!(u.outcome, Outcome::Revoked { revoked: vec![sid(3), sid(4)], at_ms: T0 + 20 });
    for id in 1..=4 {
        assert!(matches!(check(&s, sid(id), T0 + 21), Verdict::Revoked(_)));
    }
    let missing = run(&mut s, T0 + 22, Command::RevokeUser { user: user("nobody"), revocation: rev() });
    assert_eq!(missing.outcome, Outcome::Refused(Refusal::UserNotFound));
}

/// Watermarks per tenant, client, user and device: O(1) commands that invalidate older sessions,
/// never move back, and never lie in the future.
#[test]
fn watermarks() {
    let mut s = MemShard::default();
    run(&mut s, T0, create(1, "alice", Some(1), None));
    run(&mut s, T0 + 5, create(2, "bob", None, None));
    let set = |scope, at| Command::SetWatermark { scope, not_before_ms: at, revocation: rev() };
    let tenant = WatermarkScope::Tenant { tenant: "acme".into() };
    assert_eq!(
        run(&mut s, T0 + 10, set(tenant.clone(), T0 + 2)).outcome,
        Outcome::WatermarkSet { watermark_ms: T0 + 2 }
    );
    assert_eq!(check(&s, sid(1), T0 + 11), Verdict::Revoked(Reason::Watermark));
    assert_eq!(check(&s, sid(2), T0 + 11), Verdict::Valid);
    // Moving back is a no-op that reports the watermark in force.
    assert_eq!(
        run(&mut s, T0 + 12, set(tenant.clone(), T0 + 1)).outcome,
        Outcome::WatermarkSet { watermark_ms: T0 + 2 }
    );
    assert_eq!(
        run(&mut s, T0 + 13, set(tenant, T0 + 99)).outcome,
        Outcome::Refused(Refusal::WatermarkInFuture)
    );
    // Client scope, then a session created in the same millisecond as a watermark survives it.
    let client = WatermarkScope::Client { tenant: "acme".into(), client_id: "web".into() };
    run(&mut s, T0 + 20, set(client, 0));
    assert_eq!(check(&s, sid(2), T0 + 21), Verdict::Revoked(Reason::Watermark));
    run(&mut s, T0 + 20, create(3, "bob", None, None));
    assert_eq!(check(&s, sid(3), T0 + 21), Verdict::Valid);
    let missing = run(&mut s, T0 + 30, set(WatermarkScope::User { user: user("nobody") }, 0));
    assert_eq!(missing.outcome, Outcome::Refused(Refusal::UserNotFound));
}

/// Per-user limits: evict-oldest revokes the oldest session (with its cascade); reject refuses;
/// the device limit refuses a new device.
#[test]
fn per_user_limits() {
    let mut s = MemShard::default();
    let evict = Limits { sessions_per_user_max: 2, devices_per_user_max: 2, ..Limits::default() };
    run_with(&mut s, &evict, T0, create(1, "alice", None, None));
    run_with(&mut s, &evict, T0 + 1, create(2, "alice", None, None));
    let third = run_with(&mut s, &evict, T0 + 2, create(3, "alice", None, None));
    match third.outcome {
        Outcome::Created { evicted, .. } => assert_eq!(evicted, vec![sid(1)]),
        other => panic!("expected created, got {other:?}"),
    }
    assert_eq!(check(&s, sid(1), T0 + 3), Verdict::Revoked(Reason::SessionLimit));

    let reject = Limits { on_session_limit: SessionLimitPolicy::Reject, ..evict };
    let fourth = run_with(&mut s, &reject, T0 + 4, create(4, "alice", None, None));
    assert_eq!(fourth.outcome, Outcome::Refused(Refusal::SessionLimit { max: 2 }));
    assert_eq!(check(&s, sid(4), T0 + 5), Verdict::Unknown);

    let mut s = MemShard::default();
    let roomy = Limits { sessions_per_user_max: 10, devices_per_user_max: 2, ..Limits::default() };
    run_with(&mut s, &roomy, T0, create(1, "bob", Some(1), None));
    run_with(&mut s, &roomy, T0, create(2, "bob", Some(2), None));
    run_with(&mut s, &roomy, T0, create(3, "bob", Some(2), None));
    let third_device = run_with(&mut s, &roomy, T0, create(4, "bob", Some(3), None));
    assert_eq!(third_device.outcome, Outcome::Refused(Refusal::DeviceLimit { max: 2 }));
}

/// A device id already bound to a live key cannot be re-bound to another key.
#[test]
fn device_key_mismatch_is_refused() {
    let mut s = MemShard::default();
    run(&mut s, T0, create(1, "alice", Some(1), None));
    let mut other = create(2, "alice", Some(1), None);
    if let Command::CreateSession(c) = &mut other {
        c.device.as_mut().unwrap().jkt = jkt(9);
    }
    assert_eq!(run(&mut s, T0 + 1, other).outcome, Outcome::Refused(Refusal::DeviceKeyMismatch));
    assert_eq!(
        run(&mut s, T0 + 2, create(1, "bob", None, None)).outcome,
        Outcome::Refused(Refusal::DuplicateSession)
    );
}

/// Storage does not grow forever: dead sessions go after the retention, by stamped time only.
#[test]
fn purge_after_retention() {
    let limits = Limits { retention_ms: HOUR_MS, ..Limits::default() };
    let mut s = MemShard::default();
    run_with(&mut s, &limits, T0, create(1, "alice", Some(1), None));
    run_with(&mut s, &limits, T0, create(2, "alice", None, None));
    run_with(&mut s, &limits, T0, create(3, "bob", None, None));
    run_with(&mut s, &limits, T0 + 10, Command::RevokeSession { session_id: sid(1), revocation: rev() });
    let purge = |after| Command::Purge { after, max_users: 1 };
    // Before retention: nothing goes.
    let p = run_with(&mut s, &limits, T0 + 20, purge(None));
    assert_eq!(p.outcome, Outcome::Purged { n_sessions: 0, n_users: 0, next: Some(user("alice")) });
    // After retention: the revoked session goes (alice still has session 2), paging by user.
    let p = run_with(&mut s, &limits, T0 + 10 + HOUR_MS, purge(None));
    assert_eq!(p.outcome, Outcome::Purged { n_sessions: 1, n_users: 0, next: Some(user("alice")) });
    assert_eq!(check(&s, sid(1), T0 + 10 + HOUR_MS), Verdict::Unknown);
    // Much later every session has expired past retention: users disappear entirely.
    let late = T0 + 8 * HOUR_MS + HOUR_MS;
    run_with(&mut s, &limits, late, purge(None));
    let p = run_with(&mut s, &limits, late, purge(Some(user("alice"))));
    assert_eq!(p.outcome, Outcome::Purged { n_sessions: 1, n_users: 1, next: Some(user("bob")) });
    assert!(s.users.is_empty(), "{:?}", s.users.keys().collect::<Vec<_>>());
    assert!(s.session_index.is_empty());
}

/// A shard that records which users `apply` took out to change.
struct Recorded {
    shard: MemShard,
    taken: Vec<UserKey>,
}

impl ShardView for Recorded {
    fn meta(&self) -> &ShardMeta {
        self.shard.meta()
    }
    fn meta_mut(&mut self) -> &mut ShardMeta {
        self.shard.meta_mut()
    }
    fn take_user(&mut self, key: &UserKey) -> Option<UserState> {
        self.taken.push(key.clone());
        self.shard.take_user(key)
    }
    fn put_user(&mut self, user: UserState) {
        self.shard.put_user(user)
    }
    fn session_owner(&mut self, id: &SessionId) -> Option<UserKey> {
        self.shard.session_owner(id)
    }
    fn index_session(&mut self, id: SessionId, owner: &UserKey) {
        self.shard.index_session(id, owner)
    }
    fn unindex_session(&mut self, id: &SessionId) {
        self.shard.unindex_session(id)
    }
    fn users_after(&mut self, after: Option<&UserKey>, limit: usize) -> Vec<UserKey> {
        self.shard.users_after(after, limit)
    }
    fn get_user(&mut self, key: &UserKey) -> Option<UserState> {
        self.shard.get_user(key)
    }
    fn job(&mut self, id: JobId) -> Option<Job> {
        self.shard.job(id)
    }
    fn put_job(&mut self, job: Job) {
        self.shard.put_job(job)
    }
    fn remove_job(&mut self, id: JobId) {
        self.shard.remove_job(id)
    }
    fn jobs(&mut self) -> Vec<Job> {
        self.shard.jobs()
    }
}

/// A purge pass visits every user, but only a user with something past retention is written
/// again: stores write what `apply` took out, and a pass rewriting the whole shard would cost
/// as much as loading it.
#[test]
fn purge_writes_only_users_it_changes() {
    let limits = Limits { retention_ms: HOUR_MS, ..Limits::default() };
    let mut s = Recorded { shard: MemShard::default(), taken: Vec::new() };
    let apply = |s: &mut Recorded, now, cmd| cascade_core::apply(s, &limits, &Envelope::new(now, cmd));
    apply(&mut s, T0, create(1, "alice", Some(1), None));
    apply(&mut s, T0, create(2, "bob", None, None));
    apply(&mut s, T0, create(3, "carol", None, None));
    apply(&mut s, T0 + 10, Command::RevokeSession { session_id: sid(2), revocation: rev() });
    let before = s.shard.clone();
    s.taken.clear();
    let purge = Command::Purge { after: None, max_users: 16 };
    let p = apply(&mut s, T0 + 20, purge.clone());
    assert_eq!(p.outcome, Outcome::Purged { n_sessions: 0, n_users: 0, next: None });
    assert!(s.taken.is_empty(), "nothing was due, yet {:?} were taken", s.taken);
    assert_eq!((&s.shard.users, &s.shard.session_index), (&before.users, &before.session_index));
    // Past retention, bob's revoked session goes and bob with it; alice and carol are not
    // touched.
    let p = apply(&mut s, T0 + 10 + HOUR_MS, purge);
    assert_eq!(p.outcome, Outcome::Purged { n_sessions: 1, n_users: 1, next: None });
    assert_eq!(s.taken, vec![user("bob")]);
    let kept: Vec<&UserKey> = s.shard.users.keys().collect();
    assert_eq!(kept, vec![&user("alice"), &user("carol")]);
    assert_eq!(check(&s.shard, sid(2), T0 + 10 + HOUR_MS), Verdict::Unknown);
}

/// P5: time never runs backwards inside the state machine, even if a new leader's clock does.
#[test]
fn shard_clock_is_monotonic() {
    let mut s = MemShard::default();
    run(&mut s, T0 + 1000, create(1, "alice", None, None));
    let a = run(&mut s, T0, create(2, "alice", None, None));
    match a.outcome {
        Outcome::Created { created_at_ms, .. } => assert_eq!(created_at_ms, T0 + 1000),
        other => panic!("{other:?}"),
    }
}
