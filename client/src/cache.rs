//! The local cache's state: per shard, the watermarks and the revoked sessions not yet
//! expired, fed by `WatchRevocations` messages, and how fresh it is. Pure: time is passed in, so
//! every rule here is unit-tested without a cluster.
//!
//! Revocations only ever add: a watermark never moves back and a revoked session stays revoked.
//! So a snapshot received again is merged into what is held, an event received twice changes
//! nothing, and what the cache held when it was last proven fresh stays a correct view as of
//! then while a stream is re-established.

use crate::error::Error;
use cascade_protocol::ids::{shard_of_user, SessionId, ShardId};
use cascade_protocol::pb;
use cascade_protocol::pb::revocation_event::What;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::Duration;
use tokio::time::Instant;

/// What a gateway knows about a session from a token it has verified (signature, issuer,
/// audience): the claims a local check needs. `created_at_ms` is when the **session** was
/// created (as returned by `CreateSession`), not when this token was minted: watermarks are
/// compared with it.
#[derive(Clone, Copy, Debug)]
pub struct Claims<'a> {
    pub session_id: &'a str,
    pub tenant: &'a str,
    pub user_id: &'a str,
    pub client_id: &'a str,
    /// The device the session is bound to, if any.
    pub device_id: Option<&'a str>,
    /// The key thumbprint the session is bound to (`cnf.jkt`), if any.
    pub jkt: Option<&'a str>,
    /// The assurance level of the session.
    pub aal: u32,
    pub created_at_ms: u64,
    /// The session's absolute expiry.
    pub expires_at_ms: u64,
}

/// The answer to a check, local or remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Revoked(pb::ReasonCode),
    Expired,
    /// The cluster does not know the session (remote checks only).
    Unknown,
    DeviceMismatch,
    StepUpRequired,
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid)
    }

    /// The verdict of a remote check's answer.
    pub fn of(r: &pb::CheckSessionResponse) -> Verdict {
        match r.status() {
            pb::CheckStatus::Valid => Verdict::Valid,
            pb::CheckStatus::Revoked => Verdict::Revoked(r.reason()),
            pb::CheckStatus::Expired => Verdict::Expired,
            pb::CheckStatus::DeviceMismatch => Verdict::DeviceMismatch,
            pb::CheckStatus::StepUpRequired => Verdict::StepUpRequired,
            pb::CheckStatus::Unknown | pb::CheckStatus::Unspecified => Verdict::Unknown,
        }
    }
}

/// A local answer and how stale it may be: every revocation acknowledged by the cluster more
/// than `staleness` ago is reflected in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAnswer {
    pub verdict: Verdict,
    pub staleness: Duration,
}

/// What the cache holds for one shard, for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardCacheStatus {
    pub shard: ShardId,
    /// A snapshot of the shard has been received in full.
    pub synced: bool,
    /// Raft log index through which every event has been received.
    pub cursor: Option<u64>,
    /// Within the bound: how stale the shard may be.
    pub staleness: Option<Duration>,
    pub revoked: usize,
    pub watermarks: usize,
    /// Over `max_entries`: not trusted any more.
    pub overflow: bool,
}

/// The maps a check reads. foldhash, not SipHash: a check hashes a session id and, when the
/// tenant has watermarks, its user and client ids, and SipHash was a third of a check's time.
/// Keys come from the cluster's revocation events, never from the checks themselves.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
struct UserMarks {
    watermark_ms: u64,
    devices: Map<String, u64>,
}

/// A tenant's watermarks: its own, and those of its clients, users and users' devices.
#[derive(Default)]
struct TenantMarks {
    watermark_ms: u64,
    clients: Map<String, u64>,
    users: Map<String, UserMarks>,
}

#[derive(Default)]
struct ShardState {
    revoked: Map<SessionId, (pb::ReasonCode, u64)>,
    tenants: Map<String, TenantMarks>,
    watermarks: usize,
    cursor: Option<u64>,
    synced: bool,
    /// Every revocation acknowledged before this instant is held.
    fresh_as_of: Option<Instant>,
    overflow: bool,
}

/// The value of `key` in `map`, made (and counted in `added`) if missing.
fn slot<'m, V: Default>(map: &'m mut Map<String, V>, key: &str, added: &mut usize) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), V::default());
        *added += 1;
    }
    map.get_mut(key).expect("inserted above")
}

impl ShardState {
    /// Applies one event; returns the entries it added (every map entry counts, containers
    /// included, so the bound holds whatever the shape of the data).
    fn apply(&mut self, e: &pb::RevocationEvent) -> usize {
        let mut added = 0;
        match &e.what {
            Some(What::Session(s)) => {
                let Ok(id) = s.session_id.parse::<SessionId>() else { return 0 };
                let reason = pb::ReasonCode::try_from(e.reason).unwrap_or(pb::ReasonCode::ReasonUnspecified);
                added += usize::from(self.revoked.insert(id, (reason, s.expires_at_ms)).is_none());
            }
            Some(What::Watermark(w)) => {
                let scope = w.scope();
                if scope == pb::WatermarkScope::Unspecified {
                    return 0;
                }
                let tenant = slot(&mut self.tenants, &w.tenant, &mut added);
                let mark = match scope {
                    pb::WatermarkScope::Client => slot(&mut tenant.clients, &w.client_id, &mut added),
                    pb::WatermarkScope::User => {
                        &mut slot(&mut tenant.users, &w.user_id, &mut added).watermark_ms
                    }
                    pb::WatermarkScope::Device => {
                        let user = slot(&mut tenant.users, &w.user_id, &mut added);
                        slot(&mut user.devices, &w.device_id, &mut added)
                    }
                    pb::WatermarkScope::Tenant | pb::WatermarkScope::Unspecified => &mut tenant.watermark_ms,
                };
                *mark = (*mark).max(w.watermark_ms);
                self.watermarks += added;
            }
            None => {}
        }
        added
    }

    /// The highest watermark over the claims' tenant, client, user and device. Maps are
    /// tested for emptiness before they are hashed into: most checks find none.
    fn watermark(&self, c: &Claims<'_>) -> u64 {
        fn get<'m, V>(map: &'m Map<String, V>, key: &str) -> Option<&'m V> {
            if map.is_empty() {
                None
            } else {
                map.get(key)
            }
        }
        let Some(tenant) = get(&self.tenants, c.tenant) else { return 0 };
        let client = get(&tenant.clients, c.client_id).copied().unwrap_or(0);
        let user = get(&tenant.users, c.user_id);
        let device = user.zip(c.device_id).and_then(|(u, d)| get(&u.devices, d)).copied().unwrap_or(0);
        tenant.watermark_ms.max(client).max(user.map_or(0, |u| u.watermark_ms)).max(device)
    }

    fn staleness(&self, now: Instant) -> Option<Duration> {
        self.fresh_as_of.map(|at| now.saturating_duration_since(at))
    }
}

/// Every shard's state, each behind its own lock (checks take a read lock on one shard).
pub(crate) struct CacheState {
    shards: Vec<RwLock<ShardState>>,
    pub(crate) bound: Duration,
    max_entries: usize,
    entries: AtomicUsize,
}

impl CacheState {
    pub(crate) fn new(n_shards: u16, bound: Duration, max_entries: usize) -> CacheState {
        CacheState {
            shards: (0..n_shards).map(|_| RwLock::new(ShardState::default())).collect(),
            bound,
            max_entries,
            entries: AtomicUsize::new(0),
        }
    }

    pub(crate) fn n_shards(&self) -> u16 {
        self.shards.len() as u16
    }

    fn write(&self, shard: ShardId) -> Option<std::sync::RwLockWriteGuard<'_, ShardState>> {
        self.shards.get(usize::from(shard)).map(|s| s.write().unwrap_or_else(|p| p.into_inner()))
    }

    fn read(&self, shard: ShardId) -> Option<std::sync::RwLockReadGuard<'_, ShardState>> {
        self.shards.get(usize::from(shard)).map(|s| s.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies a message received at `received`: its events, the snapshots it completes, then
    /// the cursors and freshness it reports (which vouch for the events before them).
    pub(crate) fn apply(&self, m: &pb::WatchRevocationsMessage, received: Instant) {
        for e in &m.events {
            let Some(mut s) = u16::try_from(e.shard).ok().and_then(|shard| self.write(shard)) else {
                continue;
            };
            if s.overflow {
                continue;
            }
            let added = s.apply(e);
            if self.entries.fetch_add(added, Ordering::Relaxed) + added > self.max_entries {
                s.overflow = true;
                tracing::error!(
                    "local cache: more than {} revocations and watermarks; shard {} is no longer trusted \
                     (raise LocalConfig::max_entries)",
                    self.max_entries,
                    e.shard
                );
            }
        }
        for &shard in &m.snapshot_done {
            if let Some(mut s) = u16::try_from(shard).ok().and_then(|shard| self.write(shard)) {
                s.synced = true;
            }
        }
        for p in &m.progress {
            let Some(mut s) = u16::try_from(p.shard).ok().and_then(|shard| self.write(shard)) else {
                continue;
            };
            if !s.synced {
                continue;
            }
            s.cursor = s.cursor.max(Some(p.index));
            if p.fresh {
                let as_of =
                    received.checked_sub(Duration::from_millis(p.staleness_bound_ms)).unwrap_or(received);
                s.fresh_as_of = s.fresh_as_of.max(Some(as_of));
            }
        }
    }

    /// Where a stream for `shard` resumes: its cursor once a snapshot was received in full.
    pub(crate) fn cursor(&self, shard: ShardId) -> Option<u64> {
        self.read(shard).filter(|s| s.synced).and_then(|s| s.cursor)
    }

    /// The next stream for `shard` starts with a snapshot (its cursor was refused).
    pub(crate) fn resync(&self, shard: ShardId) {
        if let Some(mut s) = self.write(shard) {
            s.synced = false;
            s.cursor = None;
        }
    }

    /// Forgets revoked sessions whose absolute expiry plus `grace` is before `now_ms`.
    pub(crate) fn prune(&self, now_ms: u64, grace: Duration) -> usize {
        let grace = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let mut pruned = 0;
        for shard in 0..self.n_shards() {
            let Some(mut s) = self.write(shard) else { continue };
            let before = s.revoked.len();
            s.revoked.retain(|_, (_, expires)| expires.saturating_add(grace) >= now_ms);
            pruned += before - s.revoked.len();
        }
        self.entries.fetch_sub(pruned, Ordering::Relaxed);
        pruned
    }

    /// A local check of `c` at `now_ms` (the gateway's clock, for expiry) and `now` (monotonic,
    /// for freshness). `presented_jkt`: the thumbprint of the key the caller proved possession
    /// of; `required_aal`: 0 for none.
    pub(crate) fn check(
        &self,
        c: &Claims<'_>,
        presented_jkt: Option<&str>,
        required_aal: u32,
        now_ms: u64,
        now: Instant,
    ) -> Result<LocalAnswer, Error> {
        let id: SessionId = c
            .session_id
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("session_id {:?}: {e}", c.session_id)))?;
        let n = self.n_shards();
        if id.shard >= n || shard_of_user(c.tenant, c.user_id, n) != id.shard {
            return Err(Error::InvalidArgument(format!(
                "claims: session {} is not on the shard of user {}/{} among {n} shards",
                c.session_id, c.tenant, c.user_id
            )));
        }
        let s = self.read(id.shard).expect("shard checked above");
        let stale = |why: String| Error::Stale { shard: id.shard, why, bound: self.bound };
        if s.overflow {
            return Err(stale("more revocations than max_entries".into()));
        }
        let staleness = match s.staleness(now) {
            None => return Err(stale("no fresh heartbeat received yet".into())),
            Some(d) if d > self.bound => {
                return Err(stale(format!("last fresh heartbeat vouches for {} ms ago", d.as_millis())))
            }
            Some(d) => d,
        };
        let verdict = if let Some((reason, _)) = s.revoked.get(&id) {
            Verdict::Revoked(*reason)
        } else if c.created_at_ms <= s.watermark(c) {
            Verdict::Revoked(pb::ReasonCode::Watermark)
        } else if now_ms >= c.expires_at_ms {
            Verdict::Expired
        } else if c.jkt.is_some_and(|bound| presented_jkt != Some(bound)) {
            Verdict::DeviceMismatch
        } else if required_aal > c.aal {
            Verdict::StepUpRequired
        } else {
            Verdict::Valid
        };
        Ok(LocalAnswer { verdict, staleness })
    }

    pub(crate) fn status(&self, now: Instant) -> Vec<ShardCacheStatus> {
        (0..self.n_shards())
            .filter_map(|shard| {
                let s = self.read(shard)?;
                Some(ShardCacheStatus {
                    shard,
                    synced: s.synced,
                    cursor: s.cursor,
                    staleness: s.staleness(now).filter(|d| *d <= self.bound),
                    revoked: s.revoked.len(),
                    watermarks: s.watermarks,
                    overflow: s.overflow,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: u16 = 4;
    const BOUND: Duration = Duration::from_millis(500);

    fn sid(tenant: &str, user: &str, nonce: u128) -> String {
        SessionId { shard: shard_of_user(tenant, user, N), nonce }.to_string()
    }

    fn claims<'a>(session_id: &'a str, user: &'a str) -> Claims<'a> {
        Claims {
            session_id,
            tenant: "acme",
            user_id: user,
            client_id: "web",
            device_id: Some("laptop"),
            jkt: None,
            aal: 1,
            created_at_ms: 1_000,
            expires_at_ms: 10_000,
        }
    }

    fn shard(user: &str) -> u32 {
        u32::from(shard_of_user("acme", user, N))
    }

    fn event(shard: u32, what: What) -> pb::RevocationEvent {
        pb::RevocationEvent {
            shard,
            index: 0,
            reason: pb::ReasonCode::Admin as i32,
            what: Some(what),
            ..Default::default()
        }
    }

    fn watermark(user: &str, scope: pb::WatermarkScope, ms: u64) -> pb::RevocationEvent {
        let mut w = pb::WatermarkEvent {
            tenant: "acme".into(),
            client_id: "web".into(),
            user_id: user.into(),
            device_id: "laptop".into(),
            watermark_ms: ms,
            ..Default::default()
        };
        w.set_scope(scope);
        event(shard(user), What::Watermark(w))
    }

    /// A snapshot of every shard, done, vouched fresh `staleness_ms` ago at `at`.
    fn synced(cache: &CacheState, events: Vec<pb::RevocationEvent>, at: Instant, staleness_ms: u64) {
        let all: Vec<u32> = (0..u32::from(N)).collect();
        let progress = all
            .iter()
            .map(|&shard| pb::ShardProgress {
                shard,
                index: 7,
                fresh: true,
                staleness_bound_ms: staleness_ms,
            })
            .collect();
        cache.apply(&pb::WatchRevocationsMessage { events, progress, snapshot_done: all, node_id: 1 }, at);
    }

    #[test]
    fn every_kind_of_revocation_turns_a_session_invalid() {
        let now = Instant::now();
        let a = sid("acme", "alice", 1);
        let cache = CacheState::new(N, BOUND, 100);
        synced(&cache, vec![], now, 0);
        assert_eq!(cache.check(&claims(&a, "alice"), None, 0, 2_000, now).unwrap().verdict, Verdict::Valid);
        let cases = [
            (
                event(
                    shard("alice"),
                    What::Session(pb::RevokedSessionEvent {
                        session_id: a.clone(),
                        expires_at_ms: 10_000,
                        ..Default::default()
                    }),
                ),
                Verdict::Revoked(pb::ReasonCode::Admin),
            ),
            (
                watermark("alice", pb::WatermarkScope::Tenant, 1_000),
                Verdict::Revoked(pb::ReasonCode::Watermark),
            ),
            (
                watermark("alice", pb::WatermarkScope::Client, 1_000),
                Verdict::Revoked(pb::ReasonCode::Watermark),
            ),
            (
                watermark("alice", pb::WatermarkScope::User, 1_000),
                Verdict::Revoked(pb::ReasonCode::Watermark),
            ),
            (
                watermark("alice", pb::WatermarkScope::Device, 1_000),
                Verdict::Revoked(pb::ReasonCode::Watermark),
            ),
        ];
        for (e, expected) in cases {
            let cache = CacheState::new(N, BOUND, 100);
            synced(&cache, vec![e.clone()], now, 0);
            assert_eq!(
                cache.check(&claims(&a, "alice"), None, 0, 2_000, now).unwrap().verdict,
                expected,
                "{e:?}"
            );
        }
        // A watermark before the session's creation leaves it valid, and one on another device too.
        let cache = CacheState::new(N, BOUND, 100);
        synced(&cache, vec![watermark("alice", pb::WatermarkScope::User, 999)], now, 0);
        let mut other_device = claims(&a, "alice");
        other_device.device_id = Some("phone");
        cache.apply(
            &pb::WatchRevocationsMessage {
                events: vec![watermark("alice", pb::WatermarkScope::Device, 5_000)],
                ..Default::default()
            },
            now,
        );
        assert_eq!(
            cache.check(&claims(&a, "alice"), None, 0, 2_000, now).unwrap().verdict,
            Verdict::Revoked(pb::ReasonCode::Watermark)
        );
        assert_eq!(cache.check(&other_device, None, 0, 2_000, now).unwrap().verdict, Verdict::Valid);
        // Other users' watermarks, in the same tenant and on the same shard, leave it valid.
        let cache = CacheState::new(N, BOUND, 100);
        let others: Vec<_> = (0..100)
            .map(|n| format!("user-{n}"))
            .filter(|u| shard(u) == shard("alice"))
            .take(3)
            .map(|u| watermark(&u, pb::WatermarkScope::User, 5_000))
            .collect();
        assert_eq!(others.len(), 3);
        synced(&cache, others, now, 0);
        assert_eq!(cache.check(&claims(&a, "alice"), None, 0, 2_000, now).unwrap().verdict, Verdict::Valid);
    }

    #[test]
    fn expiry_device_binding_and_assurance_are_judged_from_the_claims() {
        let now = Instant::now();
        let a = sid("acme", "alice", 1);
        let cache = CacheState::new(N, BOUND, 100);
        synced(&cache, vec![], now, 0);
        let mut c = claims(&a, "alice");
        assert_eq!(cache.check(&c, None, 0, 10_000, now).unwrap().verdict, Verdict::Expired);
        c.jkt = Some("key-1");
        assert_eq!(cache.check(&c, Some("key-2"), 0, 2_000, now).unwrap().verdict, Verdict::DeviceMismatch);
        assert_eq!(cache.check(&c, None, 0, 2_000, now).unwrap().verdict, Verdict::DeviceMismatch);
        assert_eq!(cache.check(&c, Some("key-1"), 2, 2_000, now).unwrap().verdict, Verdict::StepUpRequired);
        assert_eq!(cache.check(&c, Some("key-1"), 1, 2_000, now).unwrap().verdict, Verdict::Valid);
    }

    #[test]
    fn a_shard_is_trusted_only_while_its_last_fresh_heartbeat_is_within_the_bound() {
        let t0 = Instant::now();
        let a = sid("acme", "alice", 1);
        let cache = CacheState::new(N, BOUND, 100);
        let check = |at: Instant| cache.check(&claims(&a, "alice"), None, 0, 2_000, at);
        assert!(matches!(check(t0), Err(Error::Stale { .. })), "nothing received yet");
        // Progress before the snapshot is done vouches for nothing.
        let progress =
            vec![pb::ShardProgress { shard: shard("alice"), index: 3, fresh: true, staleness_bound_ms: 0 }];
        cache.apply(&pb::WatchRevocationsMessage { progress: progress.clone(), ..Default::default() }, t0);
        assert!(matches!(check(t0), Err(Error::Stale { .. })), "snapshot not done");
        synced(&cache, vec![], t0, 100);
        let answer = check(t0 + Duration::from_millis(50)).unwrap();
        assert_eq!(answer.staleness, Duration::from_millis(150), "server staleness plus time since receipt");
        assert!(check(t0 + Duration::from_millis(400)).is_ok());
        assert!(
            matches!(check(t0 + Duration::from_millis(401)), Err(Error::Stale { .. })),
            "beyond the bound"
        );
        // A heartbeat that is not fresh does not extend trust; a fresh one does.
        let unfresh =
            vec![pb::ShardProgress { shard: shard("alice"), index: 9, fresh: false, staleness_bound_ms: 0 }];
        cache.apply(
            &pb::WatchRevocationsMessage { progress: unfresh, ..Default::default() },
            t0 + Duration::from_millis(300),
        );
        assert!(check(t0 + Duration::from_millis(401)).is_err());
        cache.apply(
            &pb::WatchRevocationsMessage { progress, ..Default::default() },
            t0 + Duration::from_millis(300),
        );
        assert!(check(t0 + Duration::from_millis(800)).is_ok());
        assert_eq!(cache.cursor(shard("alice") as u16), Some(9), "the highest cursor seen");
    }

    #[test]
    fn claims_that_do_not_match_the_session_shard_are_refused() {
        let now = Instant::now();
        let cache = CacheState::new(N, BOUND, 100);
        synced(&cache, vec![], now, 0);
        let a = sid("acme", "alice", 1);
        let wrong = (0..100).map(|i| format!("u{i}")).find(|u| shard(u) != shard("alice")).unwrap();
        let err = cache.check(&claims(&a, &wrong), None, 0, 2_000, now).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let err = cache.check(&claims("cs_nope", "alice"), None, 0, 2_000, now).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn beyond_max_entries_a_shard_fails_closed_and_expired_revocations_are_pruned() {
        let now = Instant::now();
        let cache = CacheState::new(N, BOUND, 3);
        let revoked = |nonce: u128, expires_at_ms: u64| {
            event(
                shard("alice"),
                What::Session(pb::RevokedSessionEvent {
                    session_id: sid("acme", "alice", nonce),
                    expires_at_ms,
                    ..Default::default()
                }),
            )
        };
        synced(&cache, vec![revoked(1, 5_000), revoked(2, 9_000), revoked(2, 9_000)], now, 0);
        assert_eq!(cache.prune(5_000 + 999, Duration::from_secs(1)), 0, "within the grace");
        assert_eq!(cache.prune(6_001, Duration::from_secs(1)), 1);
        let s = sid("acme", "alice", 3);
        assert!(cache.check(&claims(&s, "alice"), None, 0, 2_000, now).is_ok());
        synced(&cache, vec![revoked(3, 9_000), revoked(4, 9_000), revoked(5, 9_000)], now, 0);
        let err = cache.check(&claims(&s, "alice"), None, 0, 2_000, now).unwrap_err();
        assert!(matches!(&err, Error::Stale { why, .. } if why.contains("max_entries")), "{err}");
    }
}
