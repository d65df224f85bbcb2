//! Property tests for the invariants of the session model, over random command sequences on a
//! small universe of users, devices and sessions (so collisions and cascades actually happen).

mod support;

use cascade_core::limits::{Limits, SessionLimitPolicy};
use cascade_core::model::ShardMeta;
use cascade_core::validity::evaluate;
use cascade_core::view::MemShard;
use cascade_protocol::command::{Command, Reason, Revocation, WatermarkScope};
use cascade_protocol::ids::SessionId;
use cascade_protocol::outcome::{Outcome, Verdict};
use proptest::prelude::*;
use support::*;

const T0: u64 = 1_700_000_000_000;
const USERS: [&str; 3] = ["alice", "bob", "carol"];

fn rev() -> Revocation {
    Revocation::new(Reason::Compromised, "prop", "")
}

fn arb_command() -> impl Strategy<Value = Command> {
    let id = 1u128..12;
    let u = 0usize..USERS.len();
    prop_oneof![
        4 => (id.clone(), u.clone(), proptest::option::of(0u8..3), proptest::option::of(1u128..12))
            .prop_map(|(i, u, d, p)| create(i, USERS[u], d, p)),
        1 => id.clone().prop_map(|i| Command::Touch { session_id: sid(i) }),
        1 => (id.clone(), 1u8..=3).prop_map(|(i, aal)| Command::StepUp { session_id: sid(i), aal, amr: vec![] }),
        1 => (id.clone(), 1u32..4, any::<bool>()).prop_map(|(i, g, right)| Command::RotateRefresh {
            session_id: sid(i),
            generation: g,
            secret_sha256: if right { [i as u8; 32] } else { [0xEE; 32] },
            new_secret_sha256: [i as u8; 32],
        }),
        2 => id.clone().prop_map(|i| Command::RevokeSession { session_id: sid(i), revocation: rev() }),
        1 => id.clone().prop_map(|i| Command::RevokeFamily { session_id: sid(i), revocation: rev() }),
        1 => (u.clone(), 0u8..3).prop_map(|(u, d)| Command::RevokeDevice {
            user: user(USERS[u]), device_id: format!("dev{d}"), revocation: rev() }),
        1 => u.clone().prop_map(|u| Command::RevokeUser { user: user(USERS[u]), revocation: rev() }),
        1 => (0u8..4, u.clone(), 0u64..5_000).prop_map(|(scope, u, back)| Command::SetWatermark {
            scope: match scope {
                0 => WatermarkScope::Tenant { tenant: "acme".into() },
                1 => WatermarkScope::Client { tenant: "acme".into(), client_id: "web".into() },
                2 => WatermarkScope::User { user: user(USERS[u]) },
                _ => WatermarkScope::Device { user: user(USERS[u]), device_id: "dev1".into() },
            },
            // 0 = now; otherwise some time in the past (possibly before older watermarks).
            not_before_ms: if back == 0 { 0 } else { T0.saturating_sub(back) },
            revocation: rev(),
        }),
        1 => (proptest::option::of(u), 1u32..3).prop_map(|(u, n)| Command::Purge {
            after: u.map(|u| user(USERS[u])), max_users: n }),
    ]
}

/// Steps: a command and how far time moves before it (sometimes backwards, like a new leader
/// with a slower clock).
fn arb_steps() -> impl Strategy<Value = Vec<(i64, Command)>> {
    proptest::collection::vec((-2_000i64..600_000, arb_command()), 1..60)
}

fn limits(small: bool) -> Limits {
    if small {
        Limits {
            sessions_per_user_max: 3,
            devices_per_user_max: 2,
            on_session_limit: SessionLimitPolicy::EvictOldest,
            retention_ms: 3_600_000,
        }
    } else {
        Limits { retention_ms: 3_600_000, ..Limits::default() }
    }
}

fn all_ids() -> impl Iterator<Item = SessionId> {
    (1u128..12).map(sid)
}

fn watermarks(meta: &ShardMeta, s: &MemShard) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = meta.tenants.iter().map(|(k, v)| (format!("t/{k}"), *v)).collect();
    for (t, m) in &meta.clients {
        out.extend(m.iter().map(|(c, v)| (format!("c/{t}/{c}"), *v)));
    }
    for u in s.users.values() {
        out.push((format!("u/{}", u.key), u.watermark_ms));
        out.extend(u.devices.values().map(|d| (format!("d/{}/{}", u.key, d.device_id), d.watermark_ms)));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// P2/P3: once a check says REVOKED, that session never again checks VALID (it may only be
    /// purged to UNKNOWN), whatever commands and times follow.
    #[test]
    fn revoked_never_valid_again(small in any::<bool>(), steps in arb_steps()) {
        let limits = limits(small);
        let mut shard = MemShard::default();
        let mut now = T0;
        let mut revoked: Vec<SessionId> = Vec::new();
        let mut trace = Vec::new();
        for (dt, cmd) in steps {
            now = now.saturating_add_signed(dt);
            let a = cascade_core::apply(&mut shard, &limits, &cascade_protocol::command::Envelope::new(now, cmd.clone()));
            trace.push(format!("{dt} {} {:?}", cmd.kind(), a.outcome));
            let t = shard.meta.clock_ms;
            for id in all_ids() {
                // Check with the bound key and every AAL requirement: none may say VALID.
                let u = shard.user_of(&id);
                let key = u.and_then(|u| u.sessions.get(&id)).and_then(|s| s.jkt.clone());
                let v = evaluate(&shard.meta, u, &id, key.as_deref(), 0, t);
                if v == Verdict::Unknown {
                    // Purged. The test's id universe is tiny, so an id can be created again; real
                    // ids are 128 random bits drawn outside the state machine and never reused.
                    revoked.retain(|r| *r != id);
                } else if revoked.contains(&id) {
                    prop_assert!(v != Verdict::Valid, "{id} was revoked, now {v:?}\n{}", trace.join("\n"));
                } else if matches!(v, Verdict::Revoked(_)) {
                    revoked.push(id);
                }
            }
        }
    }

    /// P3: after RevokeSession, the session and every descendant (by parent links) are revoked,
    /// and the events name exactly the newly revoked sessions.
    #[test]
    fn cascade_reaches_every_descendant(small in any::<bool>(), steps in arb_steps(), target in 1u128..12) {
        let limits = limits(small);
        let mut shard = MemShard::default();
        let mut now = T0;
        for (dt, cmd) in steps {
            now = now.saturating_add_signed(dt.max(0));
            cascade_core::apply(&mut shard, &limits, &cascade_protocol::command::Envelope::new(now, cmd));
        }
        let before = shard.clone();
        let applied = cascade_core::apply(
            &mut shard,
            &limits,
            &cascade_protocol::command::Envelope::new(now + 1, Command::RevokeSession { session_id: sid(target), revocation: rev() }),
        );
        if let Some(owner) = before.user_of(&sid(target)) {
            let t = shard.meta.clock_ms;
            let u = shard.user_of(&sid(target)).expect("user still there");
            for d in owner.descendants(sid(target)) {
                let v = evaluate(&shard.meta, Some(u), &d, u.sessions[&d].jkt.as_deref(), 0, t);
                prop_assert!(matches!(v, Verdict::Revoked(_)), "descendant {d} of {} is {v:?}", sid(target));
            }
            let Outcome::Revoked { revoked, .. } = applied.outcome else { panic!("{:?}", applied.outcome) };
            let from_events: Vec<SessionId> = applied.events.iter().filter_map(|e| match e {
                cascade_protocol::outcome::RevocationEvent::Session { session_id, .. } => Some(*session_id),
                _ => None,
            }).collect();
            prop_assert_eq!(revoked, from_events);
        }
    }

    /// Watermarks (tenant, client, user, device) only move forward.
    #[test]
    fn watermarks_only_move_forward(small in any::<bool>(), steps in arb_steps()) {
        let limits = limits(small);
        let mut shard = MemShard::default();
        let mut now = T0;
        for (dt, cmd) in steps {
            now = now.saturating_add_signed(dt);
            let before = watermarks(&shard.meta, &shard);
            cascade_core::apply(&mut shard, &limits, &cascade_protocol::command::Envelope::new(now, cmd));
            let after = watermarks(&shard.meta, &shard);
            for (k, v) in before {
                if let Some((_, w)) = after.iter().find(|(k2, _)| *k2 == k) {
                    prop_assert!(*w >= v, "{k} moved back from {v} to {w}");
                }
            }
        }
    }

    /// P5: validity is a function of (state, now) only, and applying the same log twice gives the
    /// same state, outcomes and events.
    #[test]
    fn deterministic(small in any::<bool>(), steps in arb_steps(), probe in 0u64..40_000_000) {
        let limits = limits(small);
        let (mut a, mut b) = (MemShard::default(), MemShard::default());
        let mut now = T0;
        for (dt, cmd) in steps {
            now = now.saturating_add_signed(dt);
            let env = cascade_protocol::command::Envelope::new(now, cmd);
            let ra = cascade_core::apply(&mut a, &limits, &env);
            let rb = cascade_core::apply(&mut b, &limits, &env);
            prop_assert_eq!(ra, rb);
        }
        prop_assert_eq!(&a, &b);
        let at = T0 + probe;
        let copy = a.clone();
        for id in all_ids() {
            prop_assert_eq!(
                evaluate(&a.meta, a.user_of(&id), &id, Some(&jkt(1)), 2, at),
                evaluate(&copy.meta, copy.user_of(&id), &id, Some(&jkt(1)), 2, at)
            );
        }
    }

    /// Per-user limits hold after every command, and the session index matches the users.
    #[test]
    fn limits_and_index_hold(steps in arb_steps()) {
        let limits = limits(true);
        let mut shard = MemShard::default();
        let mut now = T0;
        for (dt, cmd) in steps {
            now = now.saturating_add_signed(dt);
            cascade_core::apply(&mut shard, &limits, &cascade_protocol::command::Envelope::new(now, cmd));
            let t = shard.meta.clock_ms;
            for u in shard.users.values() {
                let active = u.sessions.keys().filter(|id| {
                    matches!(evaluate(&shard.meta, Some(u), id, u.sessions[id].jkt.as_deref(), 0, t), Verdict::Valid)
                }).count();
                prop_assert!(active as u32 <= limits.sessions_per_user_max);
                for id in u.sessions.keys() {
                    prop_assert_eq!(shard.session_index.get(id), Some(&u.key));
                }
            }
            prop_assert_eq!(shard.session_index.len(), shard.users.values().map(|u| u.sessions.len()).sum::<usize>());
        }
    }
}
