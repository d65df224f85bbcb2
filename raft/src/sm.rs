//! The state machine of one shard: applies committed entries with `cascade_core::apply` over a
//! [`KvTree`], builds and installs snapshots, and publishes what changed to an observer (the
//! node's user actors) before `apply` returns, so a client that saw its write acknowledged reads
//! it back.
//!
//! Durability: each `apply` call writes one batch (users, session index, shard meta, last
//! applied, membership; all of it or after a crash none, see [`KvTree::apply_batch`]) without
//! syncing; the Raft log is the durable record and is replayed
//! from `last_applied` after a crash. A snapshot syncs the tree before it is reported built, so
//! openraft purges only log entries whose effects are on disk.

// openraft's `StorageError` is the error type its storage traits require; boxing it in helpers
// would only move the allocation around.
#![allow(clippy::result_large_err)]

use crate::kv::{KvTree, Write};
use crate::typ::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use cascade_core::limits::Limits;
use cascade_core::model::{ShardMeta, UserState};
use cascade_core::view::ShardView;
use cascade_protocol::codec;
use cascade_protocol::command::FORMAT_VERSION;
use cascade_protocol::ids::{SessionId, ShardId, UserKey};
use cascade_protocol::job::{AuditRecord, Job, JobId};
use cascade_protocol::outcome::{Applied, RevocationEvent};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Cursor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

const KEY_META: &[u8] = b"m/meta";
const KEY_APPLIED: &[u8] = b"m/applied";
const KEY_MEMBERSHIP: &[u8] = b"m/membership";
/// Where data dirs of earlier versions keep their snapshot, in the tree (moved to
/// [`KvTree::store_snapshot`] when opened): first next to `m/applied`, then after every key.
const KEYS_SNAP_IN_TREE: [(&[u8], &[u8]); 2] =
    [(b"m/snap_meta", b"m/snap_data"), (b"z/snap_meta", b"z/snap_data")];
/// Mass revocation jobs by id (at most `cascade_core::limits::JOBS_KEPT_MAX`).
const PREFIX_JOB: &[u8] = b"j/";
/// The audit trail by (time, log index, position): replicated, and carried by snapshots.
const PREFIX_AUDIT: &[u8] = b"a/";
/// Audit records older than this (by the shard's clock) are deleted.
pub const AUDIT_RETENTION_MS: u64 = 90 * 24 * 3600 * 1000;
/// Audit records deleted per applied batch at most, besides as many as the batch added.
const AUDIT_PRUNE_PER_BATCH: usize = 256;
/// Keys read per storage scan of the audit trail.
const AUDIT_SCAN_PAGE: usize = 512;
const PREFIX_USER: &[u8] = b"u/";
const PREFIX_SESSION: &[u8] = b"s/";
/// Revocation events by (log index, position in the entry): what `WatchRevocations` streams.
const PREFIX_EVENT: &[u8] = b"e/";
/// Local to this replica: every event with a log index above this is in the tree (older ones
/// were pruned, or precede a snapshot this replica installed).
const KEY_EVENTS_AFTER: &[u8] = b"m/events_after";
/// Revocation events are kept for this many log entries behind the applied index, per shard; a
/// subscriber further behind starts again from a snapshot.
pub const EVENT_LOG_WINDOW: u64 = 100_000;
/// Event keys pruned per applied batch at most, besides as many as the batch added.
const EVENT_PRUNE_PER_BATCH: usize = 256;
/// Keys read per storage scan when streaming events.
const EVENT_SCAN_PAGE: usize = 512;
/// Users read per scan page when building a snapshot.
const SNAPSHOT_SCAN_PAGE: usize = 4096;

/// Key of a user's state: `u/` + tenant + 0x00 + user_id. Ids never contain 0x00, so byte order
/// equals `UserKey` order and scans are deterministic across backends.
pub fn user_key_bytes(key: &UserKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + key.tenant.len() + 1 + key.user_id.len());
    k.extend_from_slice(PREFIX_USER);
    k.extend_from_slice(key.tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(key.user_id.as_bytes());
    k
}

fn session_key_bytes(id: &SessionId) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + 2 + 16);
    k.extend_from_slice(PREFIX_SESSION);
    k.extend_from_slice(&id.shard.to_be_bytes());
    k.extend_from_slice(&id.nonce.to_be_bytes());
    k
}

/// Told about every applied batch, after it is written and before `apply` returns.
pub trait ApplyObserver: Send + Sync + 'static {
    /// `users` holds the final state of every user the batch changed (`None` = removed).
    fn on_applied(
        &self,
        shard: ShardId,
        applied_index: u64,
        users: &[(UserKey, Option<Arc<UserState>>)],
        events: &[RevocationEvent],
    );
}

/// Read access to a shard's applied state, shared with the node for checks.
#[derive(Clone)]
pub struct ShardReader {
    tree: Arc<dyn KvTree>,
    shared: Arc<Shared>,
}

struct Shared {
    meta: RwLock<Arc<ShardMeta>>,
    applied_index: AtomicU64,
    events_after: AtomicU64,
    /// Size of the last snapshot this replica built or installed (0 until one is, after a
    /// restart too: the stored one is not read at start-up, only its header and meta).
    snapshot_bytes: AtomicU64,
    /// The last log id of the stored snapshot, if one is stored; held while one is stored.
    stored_snapshot: Mutex<Option<Option<LogId>>>,
}

fn job_key(id: JobId) -> Vec<u8> {
    let mut k = PREFIX_JOB.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn audit_key(at_ms: u64, index: u64, position: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(PREFIX_AUDIT.len() + 20);
    k.extend_from_slice(PREFIX_AUDIT);
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k.extend_from_slice(&position.to_be_bytes());
    k
}

fn audit_time(key: &[u8]) -> Option<u64> {
    audit_key_parts(key).map(|(at_ms, _, _)| at_ms)
}

/// (time, log index, position) of an audit key.
fn audit_key_parts(key: &[u8]) -> Option<(u64, u64, u32)> {
    let rest = key.strip_prefix(PREFIX_AUDIT)?;
    if rest.len() != 20 {
        return None;
    }
    let at_ms = u64::from_be_bytes(rest[..8].try_into().ok()?);
    let index = u64::from_be_bytes(rest[8..16].try_into().ok()?);
    let position = u32::from_be_bytes(rest[16..].try_into().ok()?);
    Some((at_ms, index, position))
}

fn event_key(index: u64, position: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(PREFIX_EVENT.len() + 12);
    k.extend_from_slice(PREFIX_EVENT);
    k.extend_from_slice(&index.to_be_bytes());
    k.extend_from_slice(&position.to_be_bytes());
    k
}

fn event_index(key: &[u8]) -> Option<u64> {
    let bytes = key.strip_prefix(PREFIX_EVENT)?.get(..8)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Revocation events of a shard after a cursor (see [`ShardReader::events_since`]).
#[derive(Debug)]
pub struct EventPage {
    /// Events in log order, each with the index of the entry that produced it.
    pub events: Vec<(u64, RevocationEvent)>,
    /// The subscriber has now seen every event up to this log index.
    pub through: u64,
}

/// Why events after a cursor cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("events up to log index {events_after} are no longer kept on this replica")]
    Pruned { events_after: u64 },
    #[error("reading revocation events: {0}")]
    Io(#[from] io::Error),
}

impl ShardReader {
    /// Shard-wide watermarks and clock as of the last applied batch.
    pub fn meta(&self) -> Arc<ShardMeta> {
        self.shared.meta.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn applied_index(&self) -> u64 {
        self.shared.applied_index.load(Ordering::Acquire)
    }

    pub fn load_user(&self, key: &UserKey) -> io::Result<Option<UserState>> {
        match self.tree.get(&user_key_bytes(key))? {
            None => Ok(None),
            Some(bytes) => codec::decode(&bytes).map(Some).map_err(io::Error::other),
        }
    }

    pub fn owner_of(&self, id: &SessionId) -> io::Result<Option<UserKey>> {
        match self.tree.get(&session_key_bytes(id))? {
            None => Ok(None),
            Some(bytes) => codec::decode(&bytes).map(Some).map_err(io::Error::other),
        }
    }

    /// Bytes of the last snapshot this replica built or installed since it started (0: none).
    pub fn snapshot_bytes(&self) -> u64 {
        self.shared.snapshot_bytes.load(Ordering::Relaxed)
    }

    /// Every event with a log index above this is kept here (a cursor below it is too old).
    pub fn events_after(&self) -> u64 {
        self.shared.events_after.load(Ordering::Acquire)
    }

    /// The revocation events after log index `cursor`, in log order: about `limit` of them
    /// (never part of an entry's events), up to the applied index.
    pub fn events_since(&self, cursor: u64, limit: usize) -> Result<EventPage, EventsError> {
        // Applied first: every event at or below it is already written.
        let applied = self.applied_index();
        let check_kept = |reader: &ShardReader| match reader.events_after() {
            kept if cursor < kept => Err(EventsError::Pruned { events_after: kept }),
            _ => Ok(()),
        };
        check_kept(self)?;
        let mut events = Vec::new();
        let mut from = event_key(cursor, u32::MAX);
        let mut through = applied;
        'scan: loop {
            let page = self.tree.scan(PREFIX_EVENT, Some(&from), EVENT_SCAN_PAGE)?;
            let full = page.len() == EVENT_SCAN_PAGE;
            for (key, value) in page {
                let index = event_index(&key).ok_or_else(|| io::Error::other("malformed event key"))?;
                if index > applied {
                    break 'scan;
                }
                let last = events.last().map(|(i, _)| *i);
                if events.len() >= limit && last != Some(index) {
                    through = last.unwrap_or(cursor);
                    break 'scan;
                }
                events.push((index, codec::decode(&value).map_err(io::Error::other)?));
                from = key;
            }
            if !full {
                break;
            }
        }
        // Pruning may have run meanwhile: only what is still guaranteed counts.
        check_kept(self)?;
        Ok(EventPage { events, through: through.max(cursor) })
    }

    /// Every job this shard keeps, by id.
    pub fn jobs(&self) -> io::Result<Vec<Job>> {
        let page = self.tree.scan(PREFIX_JOB, None, cascade_core::limits::JOBS_KEPT_MAX * 2)?;
        page.into_iter().map(|(_, v)| codec::decode(&v).map_err(io::Error::other)).collect()
    }

    pub fn job(&self, id: JobId) -> io::Result<Option<Job>> {
        match self.tree.get(&job_key(id))? {
            None => Ok(None),
            Some(bytes) => codec::decode(&bytes).map(Some).map_err(io::Error::other),
        }
    }

    /// Audit records with `from_ms <= at_ms <= until_ms` that `keep` accepts, oldest first, at
    /// most `limit`; and whether more matching ones may follow.
    pub fn audit(
        &self,
        from_ms: u64,
        until_ms: u64,
        limit: usize,
        keep: impl Fn(&AuditRecord) -> bool,
    ) -> io::Result<(Vec<AuditRecord>, bool)> {
        let mut out = Vec::new();
        // Every key of time >= from_ms sorts after this one (it is their strict prefix).
        let mut after = PREFIX_AUDIT.to_vec();
        after.extend_from_slice(&from_ms.to_be_bytes());
        loop {
            let page = self.tree.scan(PREFIX_AUDIT, Some(&after), AUDIT_SCAN_PAGE)?;
            let full = page.len() == AUDIT_SCAN_PAGE;
            for (key, value) in page {
                if audit_time(&key).is_none_or(|t| t > until_ms) {
                    return Ok((out, false));
                }
                let record: AuditRecord = codec::decode(&value).map_err(io::Error::other)?;
                if keep(&record) {
                    if out.len() == limit {
                        return Ok((out, true));
                    }
                    out.push(record);
                }
                after = key;
            }
            if !full {
                return Ok((out, false));
            }
        }
    }

    /// Up to `limit` users after `after`, in key order (for watch snapshots).
    pub fn users_page(&self, after: Option<&UserKey>, limit: usize) -> io::Result<Vec<UserState>> {
        let after = after.map(user_key_bytes);
        self.tree
            .scan(PREFIX_USER, after.as_deref(), limit)?
            .into_iter()
            .map(|(_, v)| codec::decode(&v).map_err(io::Error::other))
            .collect()
    }
}

/// Contents of a snapshot: the whole shard. The session index is rebuilt from the users.
#[derive(Serialize, Deserialize)]
pub struct SnapshotBody {
    meta: ShardMeta,
    users: Vec<UserState>,
    jobs: Vec<Job>,
    /// Audit records with their keys' (index, position).
    audit: Vec<(u64, u32, AuditRecord)>,
}

impl SnapshotBody {
    /// Decode a snapshot's bytes as a peer sent them (untrusted: bounded, never panics).
    pub fn decode(bytes: &[u8]) -> Result<SnapshotBody, codec::CodecError> {
        codec::decode(bytes)
    }

    /// Users in the snapshot.
    pub fn users(&self) -> usize {
        self.users.len()
    }
}

/// openraft's state machine for one shard.
pub struct ShardStateMachine {
    shard: ShardId,
    tree: Arc<dyn KvTree>,
    limits: Limits,
    applied: Option<LogId>,
    membership: StoredMembership,
    meta: ShardMeta,
    shared: Arc<Shared>,
    observer: Option<Arc<dyn ApplyObserver>>,
    /// See [`KEY_EVENTS_AFTER`].
    events_after: u64,
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e)
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e)
}

fn get_decoded<T: serde::de::DeserializeOwned>(
    tree: &dyn KvTree,
    key: &[u8],
) -> Result<Option<T>, StorageError> {
    match tree.get(key).map_err(read_err)? {
        None => Ok(None),
        Some(b) => codec::decode(&b).map(Some).map_err(read_err),
    }
}

fn encoded<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    codec::encode(value).map_err(write_err)
}

impl ShardStateMachine {
    /// Open the state machine of `shard` on `tree`, resuming from what the tree holds.
    pub fn open(
        shard: ShardId,
        tree: Arc<dyn KvTree>,
        limits: Limits,
        observer: Option<Arc<dyn ApplyObserver>>,
    ) -> Result<Self, StorageError> {
        move_snapshot_keys(&*tree)?;
        let stored: Option<SnapshotMeta> = match tree.load_snapshot_meta().map_err(read_err)? {
            Some(meta) => Some(codec::decode(&meta).map_err(read_err)?),
            None => None,
        };
        let applied: Option<LogId> = get_decoded::<Option<LogId>>(&*tree, KEY_APPLIED)?.flatten();
        let membership = get_decoded(&*tree, KEY_MEMBERSHIP)?.unwrap_or_default();
        let meta: ShardMeta = get_decoded(&*tree, KEY_META)?.unwrap_or_default();
        let events_after: u64 = get_decoded(&*tree, KEY_EVENTS_AFTER)?.unwrap_or(0);
        let shared = Arc::new(Shared {
            meta: RwLock::new(Arc::new(meta.clone())),
            applied_index: AtomicU64::new(applied.map_or(0, |l| l.index)),
            events_after: AtomicU64::new(events_after),
            snapshot_bytes: AtomicU64::new(0),
            stored_snapshot: Mutex::new(stored.as_ref().map(|m| m.last_log_id)),
        });
        let mut sm = ShardStateMachine {
            shard,
            tree,
            limits,
            applied,
            membership,
            meta,
            shared,
            observer,
            events_after,
        };
        if let Some(meta) = stored.filter(|m| m.last_log_id > applied) {
            // An install a crash cut short: the snapshot is stored first, its state after.
            let (_, data) =
                sm.tree.load_snapshot().map_err(read_err)?.ok_or_else(|| read_err("snapshot vanished"))?;
            sm.install(&meta, data, false)?;
        }
        Ok(sm)
    }

    pub fn reader(&self) -> ShardReader {
        ShardReader { tree: self.tree.clone(), shared: self.shared.clone() }
    }

    fn publish(&self) {
        *self.shared.meta.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(self.meta.clone());
        self.shared.applied_index.store(self.applied.map_or(0, |l| l.index), Ordering::Release);
        self.shared.events_after.store(self.events_after, Ordering::Release);
    }

    /// Deletes (some of) the events older than [`EVENT_LOG_WINDOW`] entries; `extra` more keys
    /// than the batch budget may go, so pruning keeps up with what a batch adds.
    fn prune_events(&mut self, writes: &mut Vec<Write>, extra: usize) -> Result<(), StorageError> {
        let applied = self.applied.map_or(0, |l| l.index);
        let threshold = applied.saturating_sub(EVENT_LOG_WINDOW);
        if threshold == 0 {
            return Ok(());
        }
        let old = |key: &[u8]| event_index(key).is_some_and(|i| i <= threshold);
        self.delete_oldest(PREFIX_EVENT, EVENT_PRUNE_PER_BATCH + extra, old, writes)?;
        // Whatever is left at or below the threshold is pruned by later batches; nothing above
        // it is touched, so the promise holds from here on.
        if threshold > self.events_after {
            self.events_after = threshold;
            writes.push((KEY_EVENTS_AFTER.to_vec(), Some(encoded(&threshold)?)));
        }
        Ok(())
    }

    /// Deletes (some of) the audit records older than [`AUDIT_RETENTION_MS`] by the shard clock.
    fn prune_audit(&self, writes: &mut Vec<Write>, extra: usize) -> Result<(), StorageError> {
        let threshold = self.meta.clock_ms.saturating_sub(AUDIT_RETENTION_MS);
        if threshold == 0 {
            return Ok(());
        }
        let old = |key: &[u8]| audit_time(key).is_some_and(|t| t < threshold);
        self.delete_oldest(PREFIX_AUDIT, AUDIT_PRUNE_PER_BATCH + extra, old, writes)
    }

    /// Deletes up to `budget` of the first keys under `prefix` while `old` holds for them. Runs
    /// on every applied batch, so it reads one key first and a page only when that one is old.
    fn delete_oldest(
        &self,
        prefix: &[u8],
        budget: usize,
        old: impl Fn(&[u8]) -> bool,
        writes: &mut Vec<Write>,
    ) -> Result<(), StorageError> {
        let first = self.tree.scan(prefix, None, 1).map_err(read_err)?;
        if !first.first().is_some_and(|(key, _)| old(key)) {
            return Ok(());
        }
        for (key, _) in self.tree.scan(prefix, None, budget).map_err(read_err)? {
            if !old(&key) {
                break;
            }
            writes.push((key, None));
        }
        Ok(())
    }

    fn pointer_writes(&self) -> Result<Vec<Write>, StorageError> {
        Ok(vec![
            (KEY_META.to_vec(), Some(encoded(&self.meta)?)),
            (KEY_APPLIED.to_vec(), Some(encoded(&self.applied)?)),
            (KEY_MEMBERSHIP.to_vec(), Some(encoded(&self.membership)?)),
        ])
    }

    /// The encoded snapshot body of the whole shard: what encoding [`SnapshotBody`] (users in
    /// key order) gives, built from the stored users' bytes as they are. A struct is encoded as
    /// its fields in order and a list as its length, then its elements; the users' values were
    /// encoded by the same codec, so they are copied, not decoded and encoded again (decoded,
    /// a shard's users took several times their bytes, and decoding them held up the state
    /// machine's task). The test `raw_snapshot_body_equals_the_encoded_body` holds it to that.
    /// The values are not checked here: a value this replica cannot decode would fail the
    /// replica's own reads of that user first, and fails the snapshot's install on a follower
    /// (`SnapshotBody::decode`), never a check.
    fn read_body_bytes(&self) -> Result<Vec<u8>, StorageError> {
        let mut users = Vec::new();
        let count = self.scan_all(PREFIX_USER, |_, v| {
            users.extend_from_slice(v);
            Ok(())
        })?;
        let mut body = encoded(&self.meta)?;
        body.extend_from_slice(&encoded(&count)?);
        body.extend_from_slice(&users);
        drop(users);
        let (jobs, audit) = self.read_jobs_and_audit()?;
        body.extend_from_slice(&encoded(&jobs)?);
        body.extend_from_slice(&encoded(&audit)?);
        Ok(body)
    }

    /// Read the whole shard (users in key order) into a snapshot body.
    #[cfg(test)]
    fn read_body(&self) -> Result<SnapshotBody, StorageError> {
        let mut users = Vec::new();
        self.scan_all(PREFIX_USER, |_, v| {
            users.push(codec::decode::<UserState>(v).map_err(read_err)?);
            Ok(())
        })?;
        let (jobs, audit) = self.read_jobs_and_audit()?;
        Ok(SnapshotBody { meta: self.meta.clone(), users, jobs, audit })
    }

    /// The shard's jobs, and its audit records with their keys' (index, position).
    #[allow(clippy::type_complexity)]
    fn read_jobs_and_audit(&self) -> Result<(Vec<Job>, Vec<(u64, u32, AuditRecord)>), StorageError> {
        let jobs = self.reader().jobs().map_err(read_err)?;
        let mut audit = Vec::new();
        self.scan_all(PREFIX_AUDIT, |k, v| {
            let (_, index, position) = audit_key_parts(k).ok_or_else(|| read_err("malformed audit key"))?;
            audit.push((index, position, codec::decode::<AuditRecord>(v).map_err(read_err)?));
            Ok(())
        })?;
        Ok((jobs, audit))
    }

    /// `writes` (the deletes of the replica's state), then the pointers, users, sessions, jobs
    /// and audit records of an installed snapshot `body` (the pointers already set from it).
    fn snapshot_writes(
        &self,
        mut writes: Vec<Write>,
        body: &SnapshotBody,
    ) -> Result<Vec<Write>, StorageError> {
        writes.extend(self.pointer_writes()?);
        writes.push((KEY_EVENTS_AFTER.to_vec(), Some(encoded(&self.events_after)?)));
        for user in &body.users {
            for id in user.sessions.keys() {
                writes.push((session_key_bytes(id), Some(encoded(&user.key)?)));
            }
            writes.push((user_key_bytes(&user.key), Some(encoded(user)?)));
        }
        for job in &body.jobs {
            writes.push((job_key(job.id), Some(encoded(job)?)));
        }
        for (index, position, record) in &body.audit {
            writes.push((audit_key(record.at_ms, *index, *position), Some(encoded(record)?)));
        }
        Ok(writes)
    }

    /// Calls `each` with every key and value under `prefix`, in key order, reading
    /// [`SNAPSHOT_SCAN_PAGE`] at a time; returns how many there were.
    fn scan_all(
        &self,
        prefix: &[u8],
        mut each: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
    ) -> Result<u64, StorageError> {
        let mut count = 0u64;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.tree.scan(prefix, after.as_deref(), SNAPSHOT_SCAN_PAGE).map_err(read_err)?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            for (k, v) in &page {
                each(k, v)?;
            }
            count += page.len() as u64;
            if page.len() < SNAPSHOT_SCAN_PAGE {
                break;
            }
        }
        Ok(count)
    }
}

/// `ShardView` over the tree with a write-back overlay for one `apply` call. Read errors are
/// remembered and fail the whole call (a replica that cannot read its state must stop, not
/// guess).
struct OverlayView<'a> {
    tree: &'a dyn KvTree,
    meta: ShardMeta,
    users: BTreeMap<UserKey, Option<UserState>>,
    index: BTreeMap<SessionId, Option<UserKey>>,
    jobs: BTreeMap<JobId, Option<Job>>,
    error: Option<StorageError>,
}

impl OverlayView<'_> {
    fn fail(&mut self, e: StorageError) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

impl ShardView for OverlayView<'_> {
    fn meta(&self) -> &ShardMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ShardMeta {
        &mut self.meta
    }
    fn take_user(&mut self, key: &UserKey) -> Option<UserState> {
        if let Some(slot) = self.users.get_mut(key) {
            return slot.take();
        }
        match get_decoded::<UserState>(self.tree, &user_key_bytes(key)) {
            Ok(found) => {
                if found.is_some() {
                    self.users.insert(key.clone(), None);
                }
                found
            }
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }
    fn put_user(&mut self, user: UserState) {
        self.users.insert(user.key.clone(), Some(user));
    }
    fn session_owner(&mut self, id: &SessionId) -> Option<UserKey> {
        if let Some(slot) = self.index.get(id) {
            return slot.clone();
        }
        match get_decoded(self.tree, &session_key_bytes(id)) {
            Ok(found) => found,
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }
    fn index_session(&mut self, id: SessionId, owner: &UserKey) {
        self.index.insert(id, Some(owner.clone()));
    }
    fn unindex_session(&mut self, id: &SessionId) {
        self.index.insert(*id, None);
    }
    fn users_after(&mut self, after: Option<&UserKey>, limit: usize) -> Vec<UserKey> {
        let after_bytes = after.map(user_key_bytes);
        let stored = match self.tree.scan(PREFIX_USER, after_bytes.as_deref(), limit) {
            Ok(page) => page,
            Err(e) => {
                self.fail(read_err(e));
                return Vec::new();
            }
        };
        let mut keys: Vec<UserKey> = Vec::with_capacity(stored.len());
        for (_, v) in stored {
            match codec::decode::<UserState>(&v) {
                Ok(u) => keys.push(u.key),
                Err(e) => {
                    self.fail(read_err(e));
                    return Vec::new();
                }
            }
        }
        // Merge the overlay: users created in this batch exist, users removed do not.
        for (k, v) in &self.users {
            let in_range = after.is_none_or(|a| k > a);
            if in_range && v.is_some() && !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        keys.retain(|k| !matches!(self.users.get(k), Some(None)));
        keys.sort();
        keys.truncate(limit);
        keys
    }
    fn get_user(&mut self, key: &UserKey) -> Option<UserState> {
        if let Some(slot) = self.users.get(key) {
            return slot.clone();
        }
        match get_decoded::<UserState>(self.tree, &user_key_bytes(key)) {
            Ok(found) => found,
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }
    fn job(&mut self, id: JobId) -> Option<Job> {
        if let Some(slot) = self.jobs.get(&id) {
            return slot.clone();
        }
        match get_decoded::<Job>(self.tree, &job_key(id)) {
            Ok(found) => found,
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }
    fn put_job(&mut self, job: Job) {
        self.jobs.insert(job.id, Some(job));
    }
    fn remove_job(&mut self, id: JobId) {
        self.jobs.insert(id, None);
    }
    fn jobs(&mut self) -> Vec<Job> {
        let page = match self.tree.scan(PREFIX_JOB, None, cascade_core::limits::JOBS_KEPT_MAX * 2) {
            Ok(page) => page,
            Err(e) => {
                self.fail(read_err(e));
                return Vec::new();
            }
        };
        let mut jobs: BTreeMap<JobId, Job> = BTreeMap::new();
        for (_, v) in page {
            match codec::decode::<Job>(&v) {
                Ok(j) => {
                    jobs.insert(j.id, j);
                }
                Err(e) => {
                    self.fail(read_err(e));
                    return Vec::new();
                }
            }
        }
        for (id, slot) in &self.jobs {
            match slot {
                Some(j) => jobs.insert(*id, j.clone()),
                None => jobs.remove(id),
            };
        }
        jobs.into_values().collect()
    }
}

impl RaftStateMachine<TypeConfig> for ShardStateMachine {
    type SnapshotBuilder = ShardSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut view = OverlayView {
            tree: &*self.tree,
            meta: self.meta.clone(),
            users: BTreeMap::new(),
            index: BTreeMap::new(),
            jobs: BTreeMap::new(),
            error: None,
        };
        let mut results = Vec::new();
        let mut events = Vec::new();
        let mut event_writes: Vec<Write> = Vec::new();
        let mut audit_writes: Vec<Write> = Vec::new();
        for entry in entries {
            self.applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => results.push(Applied::nothing()),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    results.push(Applied::nothing());
                }
                EntryPayload::Normal(envelope) => {
                    if envelope.version != FORMAT_VERSION {
                        // Fatal for this replica: applying an entry it cannot understand would
                        // diverge from the others.
                        return Err(read_err(format!(
                            "log entry {} has format version {}, this build supports {}",
                            entry.log_id, envelope.version, FORMAT_VERSION
                        )));
                    }
                    let applied = cascade_core::apply(&mut view, &self.limits, &envelope);
                    for (position, event) in applied.events.iter().enumerate() {
                        let position = u32::try_from(position).unwrap_or(u32::MAX);
                        event_writes.push((event_key(entry.log_id.index, position), Some(encoded(event)?)));
                    }
                    for (position, record) in applied.audit.iter().enumerate() {
                        let position = u32::try_from(position).unwrap_or(u32::MAX);
                        let key = audit_key(record.at_ms, entry.log_id.index, position);
                        audit_writes.push((key, Some(encoded(record)?)));
                    }
                    events.extend(applied.events.iter().cloned());
                    results.push(applied);
                }
            }
        }
        if let Some(e) = view.error.take() {
            return Err(e);
        }
        let OverlayView { meta, users, index, jobs, .. } = view;
        self.meta = meta;
        let mut writes = self.pointer_writes()?;
        let mut changed = Vec::with_capacity(users.len());
        for (key, state) in users {
            let value = state.as_ref().map(encoded).transpose()?;
            writes.push((user_key_bytes(&key), value));
            changed.push((key, state.map(Arc::new)));
        }
        for (id, owner) in index {
            writes.push((session_key_bytes(&id), owner.as_ref().map(encoded).transpose()?));
        }
        for (id, job) in jobs {
            writes.push((job_key(id), job.as_ref().map(encoded).transpose()?));
        }
        let added = event_writes.len();
        writes.append(&mut event_writes);
        self.prune_events(&mut writes, added)?;
        let added = audit_writes.len();
        writes.append(&mut audit_writes);
        self.prune_audit(&mut writes, added)?;
        // Readers are told the events pruned here are gone before the batch deletes them, so a
        // page read meanwhile is refused rather than served with holes.
        self.shared.events_after.store(self.events_after, Ordering::Release);
        self.tree.apply_batch(writes).map_err(write_err)?;
        self.publish();
        if let Some(observer) = &self.observer {
            observer.on_applied(self.shard, self.applied.map_or(0, |l| l.index), &changed, &events);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Read the state now, on the state machine's task, so the snapshot is consistent with
        // `applied` even if building it takes a while.
        let body = self.read_body_bytes();
        ShardSnapshotBuilder {
            tree: self.tree.clone(),
            shared: self.shared.clone(),
            applied: self.applied,
            membership: self.membership.clone(),
            body,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        self.install(meta, snapshot.into_inner(), true)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let Some((meta, data)) = self.tree.load_snapshot().map_err(read_err)? else { return Ok(None) };
        let meta: SnapshotMeta = codec::decode(&meta).map_err(read_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

impl ShardStateMachine {
    /// Replace the replica's state with the snapshot's. `fresh`: a snapshot just received, to
    /// store and announce; otherwise the stored one, whose install a crash cut short (`open`).
    fn install(&mut self, meta: &SnapshotMeta, data: Vec<u8>, fresh: bool) -> Result<(), StorageError> {
        let body = SnapshotBody::decode(&data)
            .map_err(|e| io_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e))?;
        // The snapshot is stored before its state is written: a crash in between leaves it
        // newer than the applied index, and opening the tree finishes the install. The other
        // way round, openraft, seeing the applied index past its log, would purge the log past
        // the stored snapshot.
        if fresh {
            store_snapshot(&*self.tree, &self.shared, meta, &data, false)?;
        }
        let data_len = data.len() as u64;
        drop(data);
        // Deletes of the replica's state and the snapshot's state go in one batch: a crash in
        // between must not leave the state cleared under the old applied index.
        let mut writes = Vec::new();
        for prefix in [PREFIX_USER, PREFIX_SESSION, PREFIX_EVENT, PREFIX_JOB, PREFIX_AUDIT] {
            self.scan_all(prefix, |k, _| {
                writes.push((k.to_vec(), None));
                Ok(())
            })?;
        }
        let old = (self.meta.clone(), self.applied, self.membership.clone(), self.events_after);
        self.meta = body.meta.clone();
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        // A snapshot carries state, not history: events before it are not on this replica.
        // Readers are told before the batch deletes them.
        self.events_after = self.applied.map_or(0, |l| l.index);
        self.shared.events_after.store(self.events_after, Ordering::Release);
        let written = self
            .snapshot_writes(writes, &body)
            .and_then(|writes| self.tree.apply_batch(writes).map_err(write_err));
        if let Err(e) = written {
            // The replica keeps the pointers it had (and refuses the pruned events' cursors).
            // openraft stops the shard on a storage error; opening the tree again finishes the
            // install from the stored snapshot.
            (self.meta, self.applied, self.membership, self.events_after) = old;
            return Err(e);
        }
        self.shared.snapshot_bytes.store(data_len, Ordering::Relaxed);
        self.tree.sync().map_err(write_err)?;
        self.publish();
        if let (true, Some(observer)) = (fresh, &self.observer) {
            // Every cached user may be stale now: tell the observer about all of them.
            let users: Vec<_> = body.users.into_iter().map(|u| (u.key.clone(), Some(Arc::new(u)))).collect();
            observer.on_applied(self.shard, self.applied.map_or(0, |l| l.index), &users, &[]);
        }
        Ok(())
    }
}

/// Store `meta` and `data` as the shard's snapshot, unless `built` (a build, which runs in a task
/// of its own) and a snapshot at or past it is stored already (an install that finished first):
/// the stored snapshot never goes back. Returns whether it was stored.
fn store_snapshot(
    tree: &dyn KvTree,
    shared: &Shared,
    meta: &SnapshotMeta,
    data: &[u8],
    built: bool,
) -> Result<bool, StorageError> {
    let mut stored = shared.stored_snapshot.lock().unwrap_or_else(|p| p.into_inner());
    if built && stored.is_some_and(|at| at >= meta.last_log_id) {
        return Ok(false);
    }
    tree.store_snapshot(&encoded(meta)?, data).map_err(write_err)?;
    *stored = Some(meta.last_log_id);
    Ok(true)
}

/// Moves a snapshot that an earlier version kept in the tree to [`KvTree::store_snapshot`]:
/// stored first, then deleted from the tree (a crash in between moves it again).
fn move_snapshot_keys(tree: &dyn KvTree) -> Result<(), StorageError> {
    for (meta_key, data_key) in KEYS_SNAP_IN_TREE {
        let Some(meta) = tree.get(meta_key).map_err(read_err)? else { continue };
        let data = tree.get(data_key).map_err(read_err)?.unwrap_or_default();
        tree.store_snapshot(&meta, &data).map_err(write_err)?;
        tree.apply_batch(vec![(meta_key.to_vec(), None), (data_key.to_vec(), None)]).map_err(write_err)?;
    }
    Ok(())
}

/// Builds a snapshot from the state read when it was created.
pub struct ShardSnapshotBuilder {
    tree: Arc<dyn KvTree>,
    shared: Arc<Shared>,
    applied: Option<LogId>,
    membership: StoredMembership,
    body: Result<Vec<u8>, StorageError>,
}

impl RaftSnapshotBuilder<TypeConfig> for ShardSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let data = std::mem::replace(&mut self.body, Ok(Vec::new()))?;
        let snapshot_id = match self.applied {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".to_owned(),
        };
        let meta =
            SnapshotMeta { last_log_id: self.applied, last_membership: self.membership.clone(), snapshot_id };
        // The state machine's writes up to `applied` become durable first, then the snapshot,
        // before openraft is told the snapshot exists and may purge the log behind it.
        self.tree.sync().map_err(write_err)?;
        store_snapshot(&*self.tree, &self.shared, &meta, &data, true)?;
        self.shared.snapshot_bytes.store(data.len() as u64, Ordering::Relaxed);
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemTree;
    use cascade_protocol::command::{Command, Envelope, Reason, Revocation, WatermarkScope};
    use openraft::{CommittedLeaderId, EntryPayload};

    fn watermark(index: u64, tenant: &str) -> Entry {
        let command = Command::SetWatermark {
            scope: WatermarkScope::Tenant { tenant: tenant.to_owned() },
            not_before_ms: 1_000 + index,
            revocation: Revocation::new(Reason::Compromised, "responder", "test"),
        };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Envelope::new(2_000 + index, command)),
        }
    }

    fn blank(index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn tenant_of(e: &RevocationEvent) -> String {
        match e {
            RevocationEvent::Watermark { scope: WatermarkScope::Tenant { tenant }, .. } => tenant.clone(),
            other => panic!("unexpected event {other:?}"),
        }
    }

    /// Events are kept by log index and read back after a cursor, in order, without the ones
    /// the cursor already covers; a page never splits an entry and says how far it got.
    #[tokio::test]
    async fn events_are_read_after_a_cursor() {
        let tree: Arc<dyn KvTree> = Arc::new(MemTree::default());
        let mut sm = ShardStateMachine::open(0, tree, Limits::default(), None).expect("open");
        sm.apply(vec![blank(1), watermark(2, "a"), blank(3), watermark(4, "b"), watermark(5, "c")])
            .await
            .expect("apply");
        let reader = sm.reader();
        let all = reader.events_since(0, 100).expect("read");
        let got: Vec<(u64, String)> = all.events.iter().map(|(i, e)| (*i, tenant_of(e))).collect();
        assert_eq!(got, vec![(2, "a".to_owned()), (4, "b".to_owned()), (5, "c".to_owned())]);
        assert_eq!(all.through, 5);
        let after = reader.events_since(2, 100).expect("read");
        assert_eq!(after.events.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![4, 5]);
        let page = reader.events_since(0, 1).expect("read");
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.through, 2, "a full page stops at the entry it ended on");
        let rest = reader.events_since(page.through, 100).expect("read");
        assert_eq!(rest.events.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![4, 5]);
        assert!(reader.events_since(5, 100).expect("read").events.is_empty());
    }

    /// Events older than the window are pruned, and a cursor that old is refused, not served
    /// with a gap.
    #[tokio::test]
    async fn old_events_are_pruned_and_old_cursors_refused() {
        let tree: Arc<dyn KvTree> = Arc::new(MemTree::default());
        let mut sm = ShardStateMachine::open(0, tree.clone(), Limits::default(), None).expect("open");
        sm.apply(vec![watermark(1, "a"), watermark(2, "b")]).await.expect("apply");
        let far = EVENT_LOG_WINDOW + 2;
        sm.apply(vec![watermark(far, "c")]).await.expect("apply");
        let reader = sm.reader();
        assert_eq!(reader.events_after(), 2);
        match reader.events_since(1, 100) {
            Err(EventsError::Pruned { events_after: 2 }) => {}
            other => panic!("expected Pruned, got {other:?}"),
        }
        let kept = reader.events_since(2, 100).expect("read");
        assert_eq!(kept.events.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![far]);
        assert_eq!(tree.scan(PREFIX_EVENT, None, 10).expect("scan").len(), 1, "old keys deleted");
        // The promise survives a restart.
        let reopened = ShardStateMachine::open(0, tree, Limits::default(), None).expect("reopen");
        assert_eq!(reopened.reader().events_after(), 2);
    }

    /// A data dir of an earlier version, whose snapshot sits in the tree under either of the
    /// keys earlier versions used, keeps it: moved out of the tree when opened.
    #[tokio::test]
    async fn a_snapshot_kept_in_the_tree_is_moved_when_opened() {
        for (meta_key, data_key) in KEYS_SNAP_IN_TREE {
            let tree = Arc::new(MemTree::default());
            let mut sm = ShardStateMachine::open(0, tree.clone(), Limits::default(), None).expect("open");
            sm.apply(vec![watermark(1, "a"), watermark(2, "b")]).await.expect("apply");
            let built = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
            let data = built.snapshot.into_inner();
            // As an earlier version kept it, with no snapshot stored apart.
            let old = MemTree::default();
            old.apply_batch(
                tree.scan(b"", None, usize::MAX).unwrap().into_iter().map(|(k, v)| (k, Some(v))).collect(),
            )
            .unwrap();
            old.apply_batch(vec![
                (meta_key.to_vec(), Some(encoded(&built.meta).unwrap())),
                (data_key.to_vec(), Some(data.clone())),
            ])
            .unwrap();
            assert_eq!(old.load_snapshot().unwrap(), None);
            let old = Arc::new(old);
            let mut sm = ShardStateMachine::open(0, old.clone(), Limits::default(), None).expect("reopen");
            let current =
                sm.get_current_snapshot().await.expect("read").expect("the snapshot is still there");
            assert_eq!(current.meta, built.meta);
            assert_eq!(current.snapshot.into_inner(), data);
            assert!(old.get(meta_key).unwrap().is_none() && old.get(data_key).unwrap().is_none());
        }
    }

    /// Jobs and the audit trail are replicated state: a replica that installs a snapshot gets
    /// them, and the audit trail reads back by time and by predicate.
    #[tokio::test]
    async fn jobs_and_audit_travel_in_snapshots() {
        use cascade_protocol::job::{AuditAction, JobSelector, JobSpec, SessionFilter};
        let entry = |index: u64, command: Command| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Envelope::new(10_000 + index, command)),
        };
        let spec = JobSpec {
            selector: JobSelector::Filter(SessionFilter { aal_below: Some(2), ..Default::default() }),
            revocation: Revocation::new(Reason::Compromised, "responder", "wave"),
            dry_run: false,
        };
        let mut sm =
            ShardStateMachine::open(0, Arc::new(MemTree::default()), Limits::default(), None).expect("open");
        sm.apply(vec![
            watermark(1, "a"),
            entry(2, Command::StartJob { job: 42, spec: Box::new(spec) }),
            entry(3, Command::JobStep { job: 42, after: None, max_users: 10 }),
            watermark(4, "b"),
        ])
        .await
        .expect("apply");
        let reader = sm.reader();
        let job = reader.job(42).expect("read").expect("job kept");
        assert_eq!(job.state, cascade_protocol::job::JobState::Done);
        let (all, more) = reader.audit(0, u64::MAX, 10, |_| true).expect("audit");
        assert!(!more);
        assert_eq!(all.len(), 3, "two watermarks and the job: {all:?}");
        let (jobs_only, _) =
            reader.audit(0, u64::MAX, 10, |r| matches!(r.action, AuditAction::Job { .. })).expect("audit");
        assert_eq!(jobs_only.len(), 1);
        let (first, more) = reader.audit(0, u64::MAX, 1, |_| true).expect("audit");
        assert_eq!((first.len(), more), (1, true));
        let late = all[2].at_ms;
        let same_ms = all.iter().filter(|r| r.at_ms == late).count();
        assert_eq!(reader.audit(late, late, 10, |_| true).expect("audit").0.len(), same_ms);
        assert!(reader.audit(late + 1, u64::MAX, 10, |_| true).expect("audit").0.is_empty());

        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let mut fresh =
            ShardStateMachine::open(0, Arc::new(MemTree::default()), Limits::default(), None).expect("open");
        fresh.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
        let copy = fresh.reader();
        assert_eq!(copy.job(42).expect("read"), Some(job));
        assert_eq!(copy.audit(0, u64::MAX, 10, |_| true).expect("audit").0, all);
    }
    /// A tree whose batches fail while `fail_batches` is set, and whose snapshot stores fail
    /// while `fail_store` is (a disk that stopped taking writes).
    #[derive(Default)]
    struct FailingTree {
        inner: Arc<MemTree>,
        fail_batches: std::sync::atomic::AtomicBool,
        fail_store: std::sync::atomic::AtomicBool,
    }

    fn failed(flag: &std::sync::atomic::AtomicBool) -> io::Result<()> {
        match flag.load(Ordering::SeqCst) {
            true => Err(io::Error::other("the disk stopped taking writes")),
            false => Ok(()),
        }
    }

    impl KvTree for FailingTree {
        fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
            self.inner.get(key)
        }
        fn apply_batch(&self, writes: Vec<Write>) -> io::Result<()> {
            failed(&self.fail_batches)?;
            self.inner.apply_batch(writes)
        }
        fn scan(
            &self,
            prefix: &[u8],
            after: Option<&[u8]>,
            limit: usize,
        ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
            self.inner.scan(prefix, after, limit)
        }
        fn sync(&self) -> io::Result<()> {
            self.inner.sync()
        }
        fn store_snapshot(&self, meta: &[u8], body: &[u8]) -> io::Result<()> {
            failed(&self.fail_store)?;
            self.inner.store_snapshot(meta, body)
        }
        fn load_snapshot(&self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
            self.inner.load_snapshot()
        }
        fn load_snapshot_meta(&self) -> io::Result<Option<Vec<u8>>> {
            self.inner.load_snapshot_meta()
        }
    }

    fn audit_of(sm: &ShardStateMachine) -> Vec<AuditRecord> {
        sm.reader().audit(0, u64::MAX, 10, |_| true).expect("audit").0
    }

    /// A source shard at index 3 with its snapshot, and a replica at index 1 on a failing tree.
    async fn install_setup() -> (ShardStateMachine, Snapshot, Arc<FailingTree>, ShardStateMachine) {
        let mut source =
            ShardStateMachine::open(0, Arc::new(MemTree::default()), Limits::default(), None).expect("open");
        source.apply(vec![watermark(1, "a"), watermark(2, "b"), watermark(3, "c")]).await.expect("apply");
        let snapshot = source.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let tree = Arc::new(FailingTree::default());
        let mut replica = ShardStateMachine::open(0, tree.clone(), Limits::default(), None).expect("open");
        replica.apply(vec![watermark(1, "x")]).await.expect("apply");
        assert_eq!(audit_of(&replica).len(), 1);
        (source, snapshot, tree, replica)
    }

    /// When storing a received snapshot fails, nothing else is written: the replica (and what a
    /// restart reads) is as it was.
    #[tokio::test]
    async fn a_snapshot_that_cannot_be_stored_leaves_the_replica_as_it_was() {
        let (_, snapshot, tree, mut replica) = install_setup().await;
        let before = audit_of(&replica);
        tree.fail_store.store(true, Ordering::SeqCst);
        assert!(replica.install_snapshot(&snapshot.meta, snapshot.snapshot).await.is_err());
        tree.fail_store.store(false, Ordering::SeqCst);
        assert_eq!(replica.applied_state().await.expect("applied").0.map(|l| l.index), Some(1));
        assert_eq!(audit_of(&replica), before);
        let mut reopened =
            ShardStateMachine::open(0, tree.inner.clone(), Limits::default(), None).expect("reopen");
        assert_eq!(reopened.applied_state().await.expect("applied").0.map(|l| l.index), Some(1));
        assert_eq!(audit_of(&reopened), before);
        assert_eq!(reopened.get_current_snapshot().await.expect("read").map(|s| s.meta), None);
    }

    /// The snapshot is stored before its state is written. When writing the state fails (or a
    /// crash stops it), the live replica keeps its pointers, not a state cleared under its old
    /// applied index; opened again, it finishes the install from the stored snapshot, so the
    /// stored snapshot is never newer than the applied index for openraft to see.
    #[tokio::test]
    async fn an_install_cut_short_is_finished_when_opened() {
        let (source, snapshot, tree, mut replica) = install_setup().await;
        let before = audit_of(&replica);
        tree.fail_batches.store(true, Ordering::SeqCst);
        let meta = snapshot.meta.clone();
        assert!(replica.install_snapshot(&snapshot.meta, snapshot.snapshot).await.is_err());
        tree.fail_batches.store(false, Ordering::SeqCst);
        assert_eq!(replica.applied_state().await.expect("applied").0.map(|l| l.index), Some(1));
        assert_eq!(audit_of(&replica), before, "the live replica keeps its state");
        tree.inner.crash();
        let mut reopened =
            ShardStateMachine::open(0, tree.inner.clone(), Limits::default(), None).expect("reopen");
        assert_eq!(reopened.applied_state().await.expect("applied").0, meta.last_log_id);
        assert_eq!(audit_of(&reopened), audit_of(&source), "the snapshot's state, whole");
        assert_eq!(reopened.reader().events_after(), 3);
        let stored = reopened.get_current_snapshot().await.expect("read").expect("stored");
        assert_eq!(stored.meta, meta);
    }

    /// A build runs in a task of its own and may finish after an install of a newer snapshot:
    /// it does not replace that one.
    #[tokio::test]
    async fn a_build_never_replaces_a_newer_stored_snapshot() {
        let (_, snapshot, _tree, mut replica) = install_setup().await;
        let mut builder = replica.get_snapshot_builder().await;
        let meta = snapshot.meta.clone();
        replica.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
        let late = builder.build_snapshot().await.expect("a late build still answers");
        assert_eq!(late.meta.last_log_id.map(|l| l.index), Some(1));
        let stored = replica.get_current_snapshot().await.expect("read").expect("stored");
        assert_eq!(stored.meta, meta, "the installed snapshot stays");
        replica.apply(vec![watermark(4, "d")]).await.expect("apply");
        let newer = replica.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let stored = replica.get_current_snapshot().await.expect("read").expect("stored");
        assert_eq!((stored.meta.last_log_id.map(|l| l.index), stored.meta), (Some(4), newer.meta));
    }

    /// The snapshot body built from the stored users' bytes is the encoding of the decoded
    /// body, across a page boundary of the scan and past 250 users (the list's length then takes
    /// more than one byte), with jobs and audit records after the users.
    #[tokio::test]
    async fn raw_snapshot_body_equals_the_encoded_body() {
        use cascade_protocol::command::{CreateSession, SessionMetadata};
        use cascade_protocol::ids::{SessionId, UserKey};
        let mut sm =
            ShardStateMachine::open(0, Arc::new(MemTree::default()), Limits::default(), None).expect("open");
        let empty = sm.read_body().expect("read");
        assert_eq!(sm.read_body_bytes().expect("raw"), encoded(&empty).expect("encode"));
        let users = SNAPSHOT_SCAN_PAGE as u64 + 300;
        let entries: Vec<Entry> = (1..=users)
            .map(|i| {
                let command = Command::CreateSession(Box::new(CreateSession {
                    session_id: SessionId { shard: 0, nonce: u128::from(i) },
                    user: UserKey::new("acme", format!("user{i}")),
                    client_id: "web".into(),
                    device: None,
                    aal: 1,
                    amr: vec!["pwd".into()],
                    ttl_ms: 3_600_000,
                    idle_timeout_ms: 0,
                    parent: None,
                    refresh_secret_sha256: None,
                    metadata: SessionMetadata::default(),
                }));
                Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
                    payload: EntryPayload::Normal(Envelope::new(1_000 + i, command)),
                }
            })
            .collect();
        sm.apply(entries).await.expect("apply");
        sm.apply(vec![watermark(users + 1, "acme")]).await.expect("apply");
        let body = sm.read_body().expect("read");
        assert_eq!(body.users() as u64, users);
        assert!(!body.audit.is_empty(), "the watermark is audited");
        let raw = sm.read_body_bytes().expect("raw");
        assert_eq!(raw, encoded(&body).expect("encode"));
        assert_eq!(SnapshotBody::decode(&raw).expect("decodes").users() as u64, users);
    }
}
