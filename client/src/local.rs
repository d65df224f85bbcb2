//! The local cache (DESIGN §5): `WatchRevocations` streams covering every shard feed
//! [`CacheState`], and checks are answered in-process from it.
//!
//! A supervisor task keeps one stream per node it chose, each for the shards that node serves
//! (a replica in the client's region first, see [`crate::Topology::candidates`]). A stream that
//! ends, errs, or stays silent for `idle_timeout` is opened again for its shards, resuming from
//! their cursors, on the next replica in turn, after a backoff that grows while streams fail
//! without delivering anything. Meanwhile those shards age: once their last fresh heartbeat is
//! older than the bound, checks on them fail closed or go remote. Dropping the cache stops
//! every task.

use crate::cache::{CacheState, Claims, LocalAnswer, ShardCacheStatus, Verdict};
use crate::config::{LocalConfig, OnStale};
use crate::error::Error;
use crate::remote::Client;
use cascade_protocol::ids::ShardId;
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tonic::{Code, Status};

/// Used when the cluster does not report its revocation bound.
const DEFAULT_BOUND: Duration = Duration::from_millis(500);
/// How long a shard no reachable node serves waits before the cluster map is asked again.
const UNSERVED_RETRY: Duration = Duration::from_secs(1);

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The cache, reflecting every revocation acknowledged more than `staleness` ago.
    Local { staleness: Duration },
    /// A remote check (the cache was stale and [`OnStale::Remote`] is set).
    Remote,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub verdict: Verdict,
    pub source: Source,
}

/// Counters of the cache's streams.
#[derive(Default, Debug)]
pub struct Stats {
    pub streams_opened: AtomicU64,
    pub stream_failures: AtomicU64,
    pub messages: AtomicU64,
    pub events: AtomicU64,
}

struct Inner {
    client: Client,
    config: LocalConfig,
    state: CacheState,
    stats: Stats,
}

/// A local cache of the cluster's revocations. See the crate documentation.
pub struct LocalCache {
    inner: Arc<Inner>,
    tasks: Vec<AbortHandle>,
}

impl Drop for LocalCache {
    fn drop(&mut self) {
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl LocalCache {
    pub(crate) fn start(client: Client, config: LocalConfig) -> LocalCache {
        let topology = client.topology();
        let bound = config.bound.unwrap_or(match topology.revocation_bound_ms {
            0 => DEFAULT_BOUND,
            ms => Duration::from_millis(ms),
        });
        let state = CacheState::new(topology.n_shards, bound, config.max_entries);
        let inner = Arc::new(Inner { client, config, state, stats: Stats::default() });
        let supervisor = tokio::spawn(supervise(inner.clone())).abort_handle();
        let pruner = tokio::spawn(prune(inner.clone())).abort_handle();
        LocalCache { inner, tasks: vec![supervisor, pruner] }
    }

    /// The bound a shard must be fresh within to be trusted.
    pub fn bound(&self) -> Duration {
        self.inner.state.bound
    }

    /// Checks `claims` from the cache alone, judging expiry by this host's clock. Fails with
    /// [`Error::Stale`] when the session's shard is not proven fresh within the bound.
    pub fn check_local(
        &self,
        claims: &Claims<'_>,
        presented_jkt: Option<&str>,
        required_aal: u32,
    ) -> Result<LocalAnswer, Error> {
        self.inner.state.check(claims, presented_jkt, required_aal, wall_ms(), Instant::now())
    }

    /// Checks `claims` from the cache; when it is stale, fails closed or asks the cluster, as
    /// configured ([`LocalConfig::on_stale`]).
    pub async fn check(
        &self,
        claims: &Claims<'_>,
        presented_jkt: Option<&str>,
        required_aal: u32,
    ) -> Result<Answer, Error> {
        match self.check_local(claims, presented_jkt, required_aal) {
            Ok(a) => Ok(Answer { verdict: a.verdict, source: Source::Local { staleness: a.staleness } }),
            Err(Error::Stale { .. }) if self.inner.config.on_stale == OnStale::Remote => {
                let request = pb::CheckSessionRequest {
                    session_id: claims.session_id.to_owned(),
                    jkt: presented_jkt.unwrap_or_default().to_owned(),
                    required_aal,
                    linearizable: false,
                };
                let r = self.inner.client.check(request).await?;
                Ok(Answer { verdict: Verdict::of(&r), source: Source::Remote })
            }
            Err(e) => Err(e),
        }
    }

    /// Every shard's state in the cache.
    pub fn status(&self) -> Vec<ShardCacheStatus> {
        self.inner.state.status(Instant::now())
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Waits until every shard is fresh within the bound, or fails after `timeout` naming the
    /// shards that are not.
    pub async fn wait_fresh(&self, timeout: Duration) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            let stale: Vec<ShardCacheStatus> =
                self.status().into_iter().filter(|s| s.staleness.is_none() || s.overflow).collect();
            if stale.is_empty() {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                let detail = stale
                    .iter()
                    .map(|s| format!("shard {} (synced {}, cursor {:?})", s.shard, s.synced, s.cursor))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Error::NotFresh { waited: started.elapsed(), detail });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn prune(inner: Arc<Inner>) {
    let mut ticks = tokio::time::interval(inner.config.prune_every);
    loop {
        ticks.tick().await;
        let pruned = inner.state.prune(wall_ms(), inner.config.expiry_grace);
        if pruned > 0 {
            tracing::debug!("local cache: {pruned} expired revocations forgotten");
        }
    }
}

/// How a stream ended: the error, and whether it delivered anything first.
struct Ended {
    shards: Vec<ShardId>,
    result: Result<(), Status>,
    delivered: bool,
}

async fn supervise(inner: Arc<Inner>) {
    let all: BTreeSet<ShardId> = (0..inner.state.n_shards()).collect();
    // Per shard: streams failed so far (picks the next replica) and failed in a row without
    // delivering (sets the backoff).
    let mut rotation: HashMap<ShardId, usize> = HashMap::new();
    let mut failing: HashMap<ShardId, u32> = HashMap::new();
    let mut tasks: JoinSet<Ended> = JoinSet::new();
    let mut covering: HashMap<tokio::task::Id, Vec<ShardId>> = HashMap::new();
    let mut uncovered = all.clone();
    loop {
        if !uncovered.is_empty() {
            let shards = std::mem::take(&mut uncovered);
            let delay = shards
                .iter()
                .map(|s| backoff(&inner, failing.get(s).copied().unwrap_or(0)))
                .max()
                .unwrap_or_default();
            for (node, shards) in plan(&inner, &shards, &rotation) {
                let id = tasks.spawn(stream(inner.clone(), node, shards.clone(), delay)).id();
                covering.insert(id, shards);
            }
        }
        let Some(done) = tasks.join_next_with_id().await else { return };
        let (id, ended) = match done {
            Ok((id, ended)) => (id, ended),
            Err(e) => {
                // A stream task that panicked: its shards are watched again from their cursors.
                tracing::error!("local cache: a watch stream task failed: {e}");
                let shards = covering.remove(&e.id()).unwrap_or_default();
                (
                    e.id(),
                    Ended { shards, result: Err(Status::internal("stream task failed")), delivered: false },
                )
            }
        };
        covering.remove(&id);
        inner.stats.stream_failures.fetch_add(1, Ordering::Relaxed);
        let status = ended.result.err().unwrap_or_else(|| Status::unavailable("stream ended"));
        tracing::warn!(
            "local cache: watch stream for shards {:?} ended: {:?} {}",
            ended.shards,
            status.code(),
            status.message()
        );
        if status.code() == Code::OutOfRange {
            // Cursors older than the node keeps: start those shards over with a snapshot
            // (merged into what is held, which stays valid meanwhile).
            ended.shards.iter().for_each(|s| inner.state.resync(*s));
        }
        for s in &ended.shards {
            *rotation.entry(*s).or_default() += 1;
            let f = failing.entry(*s).or_default();
            *f = if ended.delivered { 1 } else { f.saturating_add(1) };
        }
        inner.client.refresh().await;
        uncovered.extend(ended.shards);
    }
}

fn backoff(inner: &Inner, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let config = inner.client.config();
    let base = config.backoff.saturating_mul(1 << failures.min(16).saturating_sub(1)).min(config.backoff_max);
    base + base.mul_f64(rand::random::<f64>() * 0.5)
}

/// Which node streams which shards: for each shard, the next of its replicas in candidate
/// order. Shards no known node holds are given to no node (`None`): they are retried later.
fn plan(
    inner: &Inner,
    shards: &BTreeSet<ShardId>,
    rotation: &HashMap<ShardId, usize>,
) -> BTreeMap<Option<u64>, Vec<ShardId>> {
    let t = inner.client.topology();
    let region = inner.client.config().region.as_deref();
    let mut plan: BTreeMap<Option<u64>, Vec<ShardId>> = BTreeMap::new();
    for &shard in shards {
        let holders: Vec<u64> =
            t.candidates(shard, region).into_iter().filter(|n| t.holds(*n, shard)).collect();
        let node = (!holders.is_empty())
            .then(|| holders[rotation.get(&shard).copied().unwrap_or(0) % holders.len()]);
        plan.entry(node).or_default().push(shard);
    }
    plan
}

/// One stream for `shards` from `node`, until it fails; every message is applied as it
/// arrives (no queue: a slow cache slows the stream, and the node cuts it off if it lags).
async fn stream(inner: Arc<Inner>, node: Option<u64>, shards: Vec<ShardId>, delay: Duration) -> Ended {
    tokio::time::sleep(delay).await;
    let mut delivered = false;
    let result = run_stream(&inner, node, &shards, &mut delivered).await;
    Ended { shards, result, delivered }
}

async fn run_stream(
    inner: &Inner,
    node: Option<u64>,
    shards: &[ShardId],
    delivered: &mut bool,
) -> Result<(), Status> {
    let Some(node) = node else {
        tokio::time::sleep(UNSERVED_RETRY).await;
        return Err(Status::unavailable(format!("no reachable node holds a replica of shards {shards:?}")));
    };
    let t = inner.client.topology();
    let addr =
        t.nodes.get(&node).map(|n| n.addr.clone()).ok_or_else(|| Status::unavailable("node left the map"))?;
    let channel = inner.client.channel(&addr).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let request = pb::WatchRevocationsRequest {
        cursors: shards
            .iter()
            .filter_map(|&s| {
                inner.state.cursor(s).map(|index| pb::ShardCursor { shard: u32::from(s), index })
            })
            .collect(),
        shards: shards.iter().map(|s| u32::from(*s)).collect(),
    };
    let open_timeout = inner.client.config().timeout;
    let mut client = CascadeClient::new(channel);
    let mut request = inner.client.config().request(request);
    // A stream has no deadline: the open is bounded here, the stream by its idle timeout.
    request.metadata_mut().remove("grpc-timeout");
    let mut messages = match tokio::time::timeout(open_timeout, client.watch_revocations(request)).await {
        Ok(r) => r?.into_inner(),
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "{addr}: stream not opened within {open_timeout:?}"
            )))
        }
    };
    inner.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    let idle = inner.config.idle_timeout;
    loop {
        match tokio::time::timeout(idle, messages.message()).await {
            Ok(Ok(Some(m))) => {
                inner.state.apply(&m, Instant::now());
                *delivered = true;
                inner.stats.messages.fetch_add(1, Ordering::Relaxed);
                inner.stats.events.fetch_add(m.events.len() as u64, Ordering::Relaxed);
            }
            Ok(Ok(None)) => return Err(Status::unavailable(format!("{addr}: stream ended"))),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded(format!("{addr}: no message for {idle:?}"))),
        }
    }
}
