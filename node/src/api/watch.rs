//! `WatchRevocations`: revocations pushed to gateways as they apply, for every shard: those this
//! node holds a replica of are served here, the others relayed from a node that leads them
//! ([`relay`]).
//!
//! Events come from each shard's event log (raft/src/sm.rs), read after the subscriber's
//! cursor (a Raft log index), never from a per-subscriber buffer: a subscriber costs a task, a
//! queue of [`WATCH_QUEUE_MAX`] messages and its cursors, however far behind it is. The task
//! wakes when a batch with events applies ([`WatchHub`]) and every heartbeat (a fifth of the
//! revocation bound), which carries every shard's cursor and whether the replica can prove it
//! is fresh (P2). A subscriber whose queue stays full for [`WATCH_SLOW_CUTOFF`] is cut off with
//! RESOURCE_EXHAUSTED and resumes from its cursors.
//!
//! A shard without a cursor starts with a snapshot: its watermarks and its revoked sessions not
//! yet expired, read page by page while writes go on, then the events after the index read
//! before the snapshot began. An event may repeat what the snapshot already showed; applying a
//! revocation twice changes nothing.

use crate::actors::supervisor::DirectoryObserver;
use crate::api::cascade::reason_to_pb;
use crate::api::ctx::NodeCtx;
use cascade_core::model::ShardMeta;
use cascade_core::model::UserState;
use cascade_protocol::command::{Reason, WatermarkScope};
use cascade_protocol::ids::{ShardId, UserKey};
use cascade_protocol::outcome::RevocationEvent;
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use cascade_raft::sm::{ApplyObserver, EventsError, ShardReader};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Subscribers one node serves at once; more get RESOURCE_EXHAUSTED.
pub const WATCH_SUBSCRIBERS_MAX: usize = 4096;
/// Messages queued per subscriber (one more slot is kept for the status that cuts it off).
pub const WATCH_QUEUE_MAX: usize = 64;
/// Events per message at most (a message never splits the events of one log entry).
pub const WATCH_EVENTS_PER_MESSAGE: usize = 256;
/// How long opening an upstream stream for relayed shards may take.
const RELAY_OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a subscriber's queue may stay full before it is cut off.
pub const WATCH_SLOW_CUTOFF: Duration = Duration::from_secs(2);
/// Users read per storage page while taking a snapshot (the task yields between pages).
const SNAPSHOT_USERS_PAGE: usize = 256;
/// How long a shard's snapshot is handed to subscribers that start after it was taken. A
/// snapshot reads every user of the shard; a fleet of gateways (re)connecting at once shares one
/// read per shard instead of one each. At most one snapshot per shard is kept.
pub const SNAPSHOT_SHARE: Duration = Duration::from_millis(1_000);

/// What the watch streams of a node share: a wake-up when events apply, the subscriber count,
/// and the signal that the node is shutting down.
pub struct WatchHub {
    /// The latest snapshot of each shard; its lock also makes subscribers that start together
    /// wait for one read instead of each taking their own.
    snapshots: std::sync::Mutex<BTreeMap<ShardId, SnapshotSlot>>,
    applied: Notify,
    subscribers: AtomicUsize,
    closing: tokio::sync::watch::Sender<bool>,
    /// Streams per authenticated caller (API key name), at most `per_caller_max` each.
    per_caller: std::sync::Mutex<BTreeMap<String, usize>>,
    per_caller_max: usize,
}

impl Default for WatchHub {
    fn default() -> Self {
        WatchHub::with_caller_max(WATCH_SUBSCRIBERS_MAX)
    }
}

impl WatchHub {
    /// A hub allowing each authenticated caller `per_caller_max` streams.
    pub fn with_caller_max(per_caller_max: usize) -> WatchHub {
        WatchHub {
            snapshots: std::sync::Mutex::default(),
            applied: Notify::new(),
            subscribers: AtomicUsize::new(0),
            closing: tokio::sync::watch::Sender::new(false),
            per_caller: std::sync::Mutex::default(),
            per_caller_max,
        }
    }
}

/// One of a caller's watch streams, counted until dropped.
pub struct CallerSlot {
    hub: Arc<WatchHub>,
    name: String,
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut per = self.hub.per_caller.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.name);
            }
        }
    }
}

impl WatchHub {
    /// A stream slot for caller `name`, refused past `per_caller_max`.
    pub fn caller_slot(hub: &Arc<WatchHub>, name: &str) -> Result<CallerSlot, Status> {
        let mut per = hub.per_caller.lock().unwrap_or_else(|p| p.into_inner());
        let n = per.entry(name.to_owned()).or_insert(0);
        if *n >= hub.per_caller_max {
            return Err(Status::resource_exhausted(format!(
                "key {name:?} already has {} watch streams on this node (auth.watch_streams_per_key_max)",
                hub.per_caller_max
            )));
        }
        *n += 1;
        Ok(CallerSlot { hub: hub.clone(), name: name.to_owned() })
    }

    fn snapshot_slot(&self, shard: ShardId) -> SnapshotSlot {
        let mut slots = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(shard).or_default().clone()
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Ends every stream with UNAVAILABLE (the node is shutting down; a graceful stop waits for
    /// open streams, which would otherwise never end).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }
}

/// The node's state-machine observer: the actors' one, plus a wake-up for watch streams.
pub struct WatchObserver {
    pub directory: DirectoryObserver,
    pub hub: Arc<WatchHub>,
    /// Where revocation lag is measured: this node's clock and metrics.
    pub lag: Option<(Arc<dyn crate::seams::Clock>, Arc<crate::metrics::Metrics>)>,
}

impl ApplyObserver for WatchObserver {
    fn on_applied(
        &self,
        shard: ShardId,
        applied_index: u64,
        users: &[(UserKey, Option<Arc<UserState>>)],
        events: &[RevocationEvent],
    ) {
        self.directory.on_applied(shard, applied_index, users, events);
        if !events.is_empty() {
            self.hub.applied.notify_waiters();
            if let Some((clock, metrics)) = &self.lag {
                let now = clock.now_ms();
                for e in events {
                    let at = match e {
                        RevocationEvent::Session { at_ms, .. } | RevocationEvent::Watermark { at_ms, .. } => {
                            *at_ms
                        }
                    };
                    metrics.revocation_applied(now.saturating_sub(at));
                }
            }
        }
    }
}

pub type WatchStream = ReceiverStream<Result<pb::WatchRevocationsMessage, Status>>;

/// Counts a subscriber for as long as its task runs.
struct Subscribed(Arc<WatchHub>);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a stream stopped: the subscriber left, or it gets a status.
enum Stop {
    Gone,
    Status(Status),
}

/// Validates the request and starts the subscriber's task. Shards this node holds no replica
/// of are relayed: one upstream stream per node that leads some of them, its messages passed
/// through the same queue (`forwarded`: this request is such a relay, which must not relay
/// again).
pub fn watch(
    ctx: Arc<NodeCtx>,
    req: pb::WatchRevocationsRequest,
    forwarded: bool,
    slot: Option<CallerSlot>,
) -> Result<WatchStream, Status> {
    if req.cursors.len() > usize::from(ctx.n_shards) || req.shards.len() > usize::from(ctx.n_shards) {
        return Err(Status::invalid_argument(format!(
            "cursors/shards: {}/{} given, the cluster has {} shards",
            req.cursors.len(),
            req.shards.len(),
            ctx.n_shards
        )));
    }
    let shard_of = |field: &str, shard: u32| -> Result<ShardId, Status> {
        ShardId::try_from(shard)
            .ok()
            .filter(|s| *s < ctx.n_shards)
            .ok_or_else(|| Status::invalid_argument(format!("{field}: no shard {shard}")))
    };
    let mut wanted = BTreeSet::new();
    for &shard in &req.shards {
        if !wanted.insert(shard_of("shards", shard)?) {
            return Err(Status::invalid_argument(format!("shards: shard {shard} given twice")));
        }
    }
    if wanted.is_empty() {
        wanted.extend(0..ctx.n_shards);
    }
    let mut cursors: BTreeMap<ShardId, Option<u64>> = BTreeMap::new();
    for c in &req.cursors {
        let shard = shard_of("cursors", c.shard)?;
        if !wanted.contains(&shard) {
            return Err(Status::invalid_argument(format!("cursors: shard {shard} is not among shards")));
        }
        if cursors.insert(shard, Some(c.index)).is_some() {
            return Err(Status::invalid_argument(format!("cursors: shard {shard} given twice")));
        }
    }
    for shard in wanted {
        cursors.entry(shard).or_insert(None);
    }
    let (local, remote): (BTreeMap<_, _>, BTreeMap<_, _>) =
        cursors.into_iter().partition(|(shard, _)| ctx.is_replica(*shard));
    if forwarded {
        if let Some(shard) = remote.keys().next() {
            return Err(Status::failed_precondition(format!(
                "node {} holds no replica of shard {shard} (relayed request): resubscribe",
                ctx.node_id
            )));
        }
    }
    let hub = ctx.watch.clone();
    if hub.subscribers.fetch_add(1, Ordering::Relaxed) >= WATCH_SUBSCRIBERS_MAX {
        hub.subscribers.fetch_sub(1, Ordering::Relaxed);
        return Err(Status::resource_exhausted(format!(
            "node {} already serves {WATCH_SUBSCRIBERS_MAX} watch subscribers",
            ctx.node_id
        )));
    }
    let mut closing = hub.closing.subscribe();
    let subscribed = Subscribed(hub);
    let (tx, rx) = mpsc::channel(WATCH_QUEUE_MAX + 1);
    tokio::spawn(async move {
        let _subscribed = subscribed;
        let _slot = slot;
        let node = ctx.node_id;
        let served = tokio::select! {
            served = serve(&ctx, local.clone(), &tx), if !local.is_empty() => served,
            relayed = relay(&ctx, &remote, &tx), if !remote.is_empty() => relayed,
            _ = closing.wait_for(|closing| *closing) => Err(Stop::Status(Status::unavailable(format!(
                "node {node} is shutting down: resume with the cursors of the last message received on \
                 another replica"
            )))),
        };
        if let Err(Stop::Status(status)) = served {
            // Data is sent only while two slots are free, so this one always fits.
            let _ = tx.try_send(Err(status));
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Passes through the streams of the nodes that lead `cursors`' shards, until one ends.
async fn relay(ctx: &NodeCtx, cursors: &BTreeMap<ShardId, Option<u64>>, tx: &Tx) -> Result<(), Stop> {
    let mut by_node: BTreeMap<String, pb::WatchRevocationsRequest> = BTreeMap::new();
    for (&shard, cursor) in cursors {
        let raft = ctx.raft(shard).map_err(|e| Stop::Status(e.into()))?;
        let (_, addr) = ctx.leader_route(shard, &raft).await.ok_or_else(|| {
            Stop::Status(Status::unavailable(format!(
                "shard {shard}: no replica found to relay from; resubscribe"
            )))
        })?;
        let req = by_node.entry(addr).or_default();
        req.shards.push(u32::from(shard));
        if let Some(index) = cursor {
            req.cursors.push(pb::ShardCursor { shard: u32::from(shard), index: *index });
        }
    }
    let mut upstreams = Vec::new();
    for (addr, req) in by_node {
        let channel = ctx
            .host
            .peers
            .channel(&addr)
            .map_err(|e| Stop::Status(Status::unavailable(format!("relay from {addr}: {e}"))))?;
        let mut request = tonic::Request::new(req);
        if let Ok(v) = ctx.node_id.to_string().parse() {
            request.metadata_mut().insert(crate::api::ctx::FORWARDED_HEADER, v);
        }
        let opened =
            tokio::time::timeout(RELAY_OPEN_TIMEOUT, CascadeClient::new(channel).watch_revocations(request))
                .await
                .map_err(|_| {
                    Stop::Status(Status::unavailable(format!("relay from {addr}: not opened in time")))
                })?
                .map_err(Stop::Status)?;
        upstreams.push(opened.into_inner());
    }
    let mut merged = futures::stream::select_all(upstreams);
    loop {
        tokio::select! {
            next = merged.next() => match next {
                Some(Ok(msg)) => send(tx, msg).await?,
                Some(Err(status)) => return Err(Stop::Status(status)),
                None => return Err(Stop::Status(Status::unavailable("relayed stream ended; resume with your cursors"))),
            },
            _ = tx.closed() => return Err(Stop::Gone),
        }
    }
}

type Tx = mpsc::Sender<Result<pb::WatchRevocationsMessage, Status>>;

async fn send(tx: &Tx, msg: pb::WatchRevocationsMessage) -> Result<(), Stop> {
    match tokio::time::timeout(WATCH_SLOW_CUTOFF, tx.reserve_many(2)).await {
        Ok(Ok(mut permits)) => {
            if let Some(permit) = permits.next() {
                permit.send(Ok(msg));
            }
            Ok(())
        }
        Ok(Err(_closed)) => Err(Stop::Gone),
        Err(_elapsed) => Err(Stop::Status(Status::resource_exhausted(format!(
            "watch subscriber too slow: its queue of {WATCH_QUEUE_MAX} messages stayed full for {} ms; \
             resume with the cursors of the last message received",
            WATCH_SLOW_CUTOFF.as_millis()
        )))),
    }
}

fn reader(ctx: &NodeCtx, shard: ShardId) -> Result<&ShardReader, Stop> {
    ctx.host
        .reader(shard)
        .ok_or_else(|| Stop::Status(Status::internal(format!("shard {shard} has no reader"))))
}

/// A replica's freshness, read before the events it vouches for are: a proof read first covers
/// at most what was applied then, and every event up to there is read (and sent) after it. Read
/// the other way round, a proof could cover an entry applied between the read of the events
/// and the proof, which the subscriber would then count as seen without having it.
struct Vouch {
    read_at: tokio::time::Instant,
    staleness_ms: Option<u64>,
}

fn vouch(ctx: &NodeCtx, shard: ShardId) -> Vouch {
    Vouch { read_at: tokio::time::Instant::now(), staleness_ms: ctx.staleness_ms(shard) }
}

/// The cursor and freshness of `shard` for the wire, the staleness aged by the time since it
/// was read (a snapshot can take a while).
fn progress(ctx: &NodeCtx, shard: ShardId, index: u64, vouch: &Vouch) -> pb::ShardProgress {
    let aged = u64::try_from(vouch.read_at.elapsed().as_millis()).unwrap_or(u64::MAX);
    let staleness =
        vouch.staleness_ms.map(|s| s.saturating_add(aged)).filter(|s| *s <= ctx.host.freshness.bound_ms);
    pb::ShardProgress {
        shard: u32::from(shard),
        index,
        fresh: staleness.is_some(),
        staleness_bound_ms: staleness.unwrap_or(0),
    }
}

async fn serve(ctx: &NodeCtx, cursors: BTreeMap<ShardId, Option<u64>>, tx: &Tx) -> Result<(), Stop> {
    let mut at: BTreeMap<ShardId, u64> = BTreeMap::new();
    for (shard, cursor) in cursors {
        let index = match cursor {
            Some(index) => index,
            None => snapshot(ctx, shard, tx).await?,
        };
        at.insert(shard, index);
    }
    let heartbeat = Duration::from_millis((ctx.host.freshness.bound_ms / 5).max(10));
    let mut next_heartbeat = tokio::time::Instant::now();
    loop {
        // Registered before reading, so an apply in between still wakes us.
        let applied = ctx.watch.applied.notified();
        tokio::pin!(applied);
        applied.as_mut().enable();
        let vouches: Option<Vec<Vouch>> = (tokio::time::Instant::now() >= next_heartbeat)
            .then(|| at.keys().map(|shard| vouch(ctx, *shard)).collect());
        for (shard, cursor) in at.iter_mut() {
            drain(ctx, *shard, cursor, tx).await?;
        }
        if let Some(vouches) = vouches {
            let progress =
                at.iter().zip(&vouches).map(|((shard, index), v)| progress(ctx, *shard, *index, v)).collect();
            send(tx, message(ctx, Vec::new(), progress, Vec::new())).await?;
            next_heartbeat = tokio::time::Instant::now() + heartbeat;
        }
        tokio::select! {
            _ = &mut applied => {}
            _ = tokio::time::sleep_until(next_heartbeat) => {}
            _ = tx.closed() => return Err(Stop::Gone),
        }
    }
}

/// Sends the events of `shard` after `cursor`, advancing it.
async fn drain(ctx: &NodeCtx, shard: ShardId, cursor: &mut u64, tx: &Tx) -> Result<(), Stop> {
    let reader = reader(ctx, shard)?;
    while *cursor < reader.applied_index() {
        let vouch = vouch(ctx, shard);
        let page = match reader.events_since(*cursor, WATCH_EVENTS_PER_MESSAGE) {
            Ok(page) => page,
            Err(EventsError::Pruned { events_after }) => {
                return Err(Stop::Status(Status::out_of_range(format!(
                    "shard {shard}: cursor {} is older than the events this replica keeps (after index \
                     {events_after}); resubscribe without a cursor for a fresh snapshot",
                    *cursor
                ))))
            }
            Err(e) => return Err(Stop::Status(Status::internal(format!("shard {shard}: {e}")))),
        };
        if page.events.is_empty() {
            *cursor = page.through;
            break;
        }
        let events = page.events.iter().map(|(index, e)| event_to_pb(shard, *index, e)).collect();
        send(tx, message(ctx, events, vec![progress(ctx, shard, page.through, &vouch)], Vec::new())).await?;
        *cursor = page.through;
    }
    Ok(())
}

/// Where a shard's latest snapshot is kept.
type SnapshotSlot = Arc<tokio::sync::Mutex<Option<Arc<ShardSnapshot>>>>;

/// A shard's watermarks and revoked, unexpired sessions as of log index `index`.
struct ShardSnapshot {
    index: u64,
    /// Read before the index: the staleness sent with the snapshot ages from here.
    vouch: Vouch,
    events: Vec<pb::RevocationEvent>,
}

/// Streams the snapshot of `shard`; returns the cursor the events continue from.
async fn snapshot(ctx: &NodeCtx, shard: ShardId, tx: &Tx) -> Result<u64, Stop> {
    let snapshot = shared_snapshot(ctx, shard).await?;
    let mut chunks = snapshot.events.chunks(WATCH_EVENTS_PER_MESSAGE).peekable();
    while let Some(chunk) = chunks.next() {
        if chunks.peek().is_some() {
            send(tx, message(ctx, chunk.to_vec(), Vec::new(), Vec::new())).await?;
        } else {
            snapshot_end(ctx, shard, &snapshot, chunk.to_vec(), tx).await?;
            return Ok(snapshot.index);
        }
    }
    snapshot_end(ctx, shard, &snapshot, Vec::new(), tx).await?;
    Ok(snapshot.index)
}

/// The snapshot's last message: its last events, the cursor, and "snapshot done".
async fn snapshot_end(
    ctx: &NodeCtx,
    shard: ShardId,
    snapshot: &ShardSnapshot,
    events: Vec<pb::RevocationEvent>,
    tx: &Tx,
) -> Result<(), Stop> {
    let progress = vec![progress(ctx, shard, snapshot.index, &snapshot.vouch)];
    send(tx, message(ctx, events, progress, vec![u32::from(shard)])).await
}

/// The shard's latest snapshot if it is younger than [`SNAPSHOT_SHARE`] and the events after
/// it are still kept; otherwise a new one (subscribers asking meanwhile wait for it).
async fn shared_snapshot(ctx: &NodeCtx, shard: ShardId) -> Result<Arc<ShardSnapshot>, Stop> {
    let slot = ctx.watch.snapshot_slot(shard);
    let mut latest = slot.lock().await;
    let reader = reader(ctx, shard)?;
    if let Some(s) = latest.as_ref() {
        if s.vouch.read_at.elapsed() < SNAPSHOT_SHARE && s.index >= reader.events_after() {
            return Ok(s.clone());
        }
    }
    let vouch = vouch(ctx, shard);
    let index = reader.applied_index();
    let now_ms = ctx.clock.now_ms();
    let mut events = meta_watermarks(shard, &reader.meta());
    let mut after: Option<UserKey> = None;
    loop {
        let page = reader
            .users_page(after.as_ref(), SNAPSHOT_USERS_PAGE)
            .map_err(|e| Stop::Status(Status::internal(format!("shard {shard}: snapshot: {e}"))))?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for user in &page {
            user_revocations(shard, user, now_ms, &mut events);
        }
        // Reading a large shard must not hold a runtime thread for long.
        tokio::task::yield_now().await;
    }
    let snapshot = Arc::new(ShardSnapshot { index, vouch, events });
    *latest = Some(snapshot.clone());
    Ok(snapshot)
}

fn message(
    ctx: &NodeCtx,
    events: Vec<pb::RevocationEvent>,
    progress: Vec<pb::ShardProgress>,
    snapshot_done: Vec<u32>,
) -> pb::WatchRevocationsMessage {
    pb::WatchRevocationsMessage { events, progress, snapshot_done, node_id: ctx.node_id }
}

fn watermark_pb(scope: &WatermarkScope, watermark_ms: u64) -> pb::WatermarkEvent {
    let mut w = pb::WatermarkEvent { watermark_ms, ..Default::default() };
    let kind = match scope {
        WatermarkScope::Tenant { tenant } => {
            w.tenant = tenant.clone();
            pb::WatermarkScope::Tenant
        }
        WatermarkScope::Client { tenant, client_id } => {
            w.tenant = tenant.clone();
            w.client_id = client_id.clone();
            pb::WatermarkScope::Client
        }
        WatermarkScope::User { user } => {
            w.tenant = user.tenant.clone();
            w.user_id = user.user_id.clone();
            pb::WatermarkScope::User
        }
        WatermarkScope::Device { user, device_id } => {
            w.tenant = user.tenant.clone();
            w.user_id = user.user_id.clone();
            w.device_id = device_id.clone();
            pb::WatermarkScope::Device
        }
    };
    w.set_scope(kind);
    w
}

fn event(
    shard: ShardId,
    index: u64,
    reason: Reason,
    actor: &str,
    at_ms: u64,
    what: pb::revocation_event::What,
) -> pb::RevocationEvent {
    pb::RevocationEvent {
        shard: u32::from(shard),
        index,
        reason: reason_to_pb(reason) as i32,
        actor: actor.to_owned(),
        at_ms,
        what: Some(what),
    }
}

/// A revocation event of the log, for the wire.
pub fn event_to_pb(shard: ShardId, index: u64, e: &RevocationEvent) -> pb::RevocationEvent {
    use pb::revocation_event::What;
    match e {
        RevocationEvent::Session { session_id, user, reason, actor, at_ms, expires_at_ms } => {
            let what = What::Session(pb::RevokedSessionEvent {
                session_id: session_id.to_string(),
                tenant: user.tenant.clone(),
                user_id: user.user_id.clone(),
                expires_at_ms: *expires_at_ms,
            });
            event(shard, index, *reason, actor, *at_ms, what)
        }
        RevocationEvent::Watermark { scope, watermark_ms, reason, actor, at_ms } => {
            event(shard, index, *reason, actor, *at_ms, What::Watermark(watermark_pb(scope, *watermark_ms)))
        }
    }
}

/// Tenant and client watermarks of a shard, as snapshot events.
fn meta_watermarks(shard: ShardId, meta: &ShardMeta) -> Vec<pb::RevocationEvent> {
    use pb::revocation_event::What;
    let tenants =
        meta.tenants.iter().map(|(tenant, &ms)| (WatermarkScope::Tenant { tenant: tenant.clone() }, ms));
    let clients = meta.clients.iter().flat_map(|(tenant, clients)| {
        clients.iter().map(move |(client_id, &ms)| {
            (WatermarkScope::Client { tenant: tenant.clone(), client_id: client_id.clone() }, ms)
        })
    });
    tenants
        .chain(clients)
        .filter(|(_, ms)| *ms > 0)
        .map(|(scope, ms)| {
            event(shard, 0, Reason::Watermark, "", ms, What::Watermark(watermark_pb(&scope, ms)))
        })
        .collect()
}

/// A user's watermarks and revoked sessions not yet expired, as snapshot events.
fn user_revocations(shard: ShardId, user: &UserState, now_ms: u64, out: &mut Vec<pb::RevocationEvent>) {
    use pb::revocation_event::What;
    if user.watermark_ms > 0 {
        let scope = WatermarkScope::User { user: user.key.clone() };
        let what = What::Watermark(watermark_pb(&scope, user.watermark_ms));
        out.push(event(shard, 0, Reason::Watermark, "", user.watermark_ms, what));
    }
    for device in user.devices.values().filter(|d| d.watermark_ms > 0) {
        let scope = WatermarkScope::Device { user: user.key.clone(), device_id: device.device_id.clone() };
        let what = What::Watermark(watermark_pb(&scope, device.watermark_ms));
        out.push(event(shard, 0, Reason::Watermark, "", device.watermark_ms, what));
    }
    for s in user.sessions.values().filter(|s| s.expires_at_ms > now_ms) {
        let Some(revoked) = &s.revoked else { continue };
        let what = What::Session(pb::RevokedSessionEvent {
            session_id: s.id.to_string(),
            tenant: user.key.tenant.clone(),
            user_id: user.key.user_id.clone(),
            expires_at_ms: s.expires_at_ms,
        });
        out.push(event(shard, 0, revoked.reason, &revoked.actor, revoked.at_ms, what));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> pb::WatchRevocationsMessage {
        pb::WatchRevocationsMessage::default()
    }

    /// A subscriber that stops reading fills its queue and is cut off after the grace time,
    /// and the status that says so still fits in the queue.
    #[tokio::test]
    async fn a_slow_subscriber_is_cut_off_and_told_why() {
        let (tx, mut rx) = mpsc::channel(WATCH_QUEUE_MAX + 1);
        for i in 0..WATCH_QUEUE_MAX {
            assert!(send(&tx, msg()).await.is_ok(), "message {i} fits");
        }
        let started = tokio::time::Instant::now();
        match send(&tx, msg()).await {
            Err(Stop::Status(s)) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted);
                assert!(s.message().contains("resume"), "{}", s.message());
                tx.try_send(Err(s)).expect("the status fits");
            }
            _ => panic!("a full queue must cut the subscriber off"),
        }
        assert!(started.elapsed() >= WATCH_SLOW_CUTOFF);
        for _ in 0..WATCH_QUEUE_MAX {
            assert!(rx.recv().await.expect("queued").is_ok());
        }
        assert!(rx.recv().await.expect("status queued").is_err());
    }
}
