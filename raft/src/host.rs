//! The multi-raft host: one node-wide WAL (group commit across shards), one sled database with a
//! tree per shard, and an openraft group per shard, all sharing one channel per peer.

use crate::disk::{Disk, FileDisk, MemDisk};
use crate::elections::{self, Elections};
use crate::freshness::{self, Freshness};
use crate::kv::{KvTree, MemTree, SledTree};
use crate::network::{NetworkFactory, Peers, ShardTable};
use crate::placement::{self, Nodes, ShardPlacement};
use crate::sm::{ApplyObserver, ShardReader, ShardStateMachine};
use crate::typ::{CascadeNode, NodeId, Raft, TypeConfig};
use crate::wal::{Wal, WalConfig, WriterMode};
use anyhow::Context;
use cascade_core::limits::Limits;
use cascade_protocol::ids::ShardId;
use openraft::error::{InitializeError, RaftError};
use openraft::SnapshotPolicy;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long a replica that is not a shard's preferred leader waits, on a fresh cluster, before
/// initializing the shard itself (with the same membership, which openraft allows) in case the
/// preferred leader never came up.
pub const BOOTSTRAP_GRACE: Duration = Duration::from_secs(3);

/// A node that starts on empty storage grants no vote for this many maximal election timeouts:
/// if it lost its disk, any election it voted in before is over by then, so it cannot vote
/// twice in one term.
pub const VOTE_QUARANTINE_TIMEOUTS: u64 = 2;

/// Opens the state-machine tree of a shard.
type TreeOpener = Box<dyn FnMut(ShardId) -> anyhow::Result<Arc<dyn KvTree>> + Send>;

/// Where a node keeps its state.
#[derive(Clone)]
pub enum Storage {
    /// Production: `<dir>/wal` (the Raft log), `<dir>/sm` (sled: state machines) and
    /// `<dir>/snapshots` (a file per shard).
    Dir(PathBuf),
    /// The in-memory twins, for tests and the simulator; crash them to lose unsynced writes.
    Memory(MemStorage),
}

/// In-memory storage of one node; clones share the same data, so a node can be "restarted" on
/// what survived.
#[derive(Clone, Default)]
pub struct MemStorage {
    pub wal: MemDisk,
    pub trees: Arc<std::sync::Mutex<BTreeMap<ShardId, MemTree>>>,
    /// How long each log sync takes; the log is written but not durable meanwhile. The log's
    /// writer runs as a task (not a thread) on this storage, so it follows a simulated clock.
    pub sync_delay: Duration,
}

impl MemStorage {
    fn tree(&self, shard: ShardId) -> MemTree {
        self.trees.lock().unwrap_or_else(|p| p.into_inner()).entry(shard).or_default().clone()
    }

    /// Lose every unsynced write, as a power loss would.
    pub fn crash(&self) {
        let _ = self.wal.crash();
        for t in self.trees.lock().unwrap_or_else(|p| p.into_inner()).values() {
            t.crash();
        }
    }
}

/// Settings of the host.
#[derive(Clone)]
pub struct HostConfig {
    pub node_id: NodeId,
    /// How peers reach this node (`host:port` of its gRPC listener) and its region.
    pub node: CascadeNode,
    /// The nodes of a new cluster (this one included). Empty: a cluster of this node alone.
    /// Only read when the storage is fresh.
    pub initial_nodes: Nodes,
    /// Start without initializing any shard: the node waits to be added by a running cluster.
    pub join: bool,
    /// Replicas per shard (3 or 5), capped by the number of nodes.
    pub replicas: usize,
    /// P2: a replica answers checks only while it can prove freshness within this bound.
    pub revocation_bound_ms: u64,
    pub n_shards: u16,
    pub limits: Limits,
    /// Log entries after which a shard takes a snapshot and purges its log.
    pub snapshot_every_n_logs: u64,
    /// Leader heartbeat period, which is also openraft's deadline for every append-entries
    /// and leadership-confirmation round: it must exceed the worst round trip between replicas.
    pub heartbeat_ms: u64,
    /// Followers start an election after a random timeout in `[min, 2 × min)`.
    pub election_timeout_min_ms: u64,
}

/// Heartbeat period for replicas on one site or close regions.
pub const HEARTBEAT_MS_DEFAULT: u64 = 100;

/// Snapshot bytes one log entry may cost. A shard is snapshotted once the entries since its last
/// snapshot reach `max(snapshot_every_n_logs, last snapshot's bytes / SNAPSHOT_BYTES_PER_ENTRY)`:
/// a snapshot rewrites the whole shard, so a fixed interval makes the bytes written grow with
/// writes × state (measured: 19 GB written while loading 280,000 sessions with every 5,000
/// entries); this keeps them proportional to the writes.
pub const SNAPSHOT_BYTES_PER_ENTRY: u64 = 256;
/// Entries after which a shard is snapshotted whatever its size (unless `snapshot_every_n_logs`
/// is larger). The WAL keeps every entry since the last snapshot in memory: without a cap, a shard
/// of 62,500 sessions kept about 60,000 of them, and 48 shard replicas in one process kept
/// gigabytes. At 20,000, a shard of that size is rewritten about 3 times more often.
pub const SNAPSHOT_LOGS_MAX: u64 = 20_000;
/// How often sled writes the state machines' dirty pages out. Nothing relies on it for
/// durability (the WAL is the record; a snapshot syncs the tree before the log behind it goes),
/// and each flush rewrites every dirty page: with writes spread over many users, about the whole
/// tree.
const SM_FLUSH_EVERY_MS: Option<u64> = Some(1_000);
/// How often the snapshot policy looks at the shards.
const SNAPSHOT_CHECK: Duration = Duration::from_millis(200);
/// Shortest election timeout by default (3 heartbeats).
pub const ELECTION_TIMEOUT_MIN_MS_DEFAULT: u64 = 300;

impl HostConfig {
    /// A node that is a cluster of its own (every shard has one replica, on it).
    pub fn single(
        node_id: NodeId,
        addr: &str,
        n_shards: u16,
        limits: Limits,
        snapshot_every_n_logs: u64,
    ) -> Self {
        HostConfig {
            node_id,
            node: CascadeNode { addr: addr.to_owned(), region: "local".to_owned() },
            initial_nodes: Nodes::new(),
            join: false,
            replicas: placement::REPLICAS_DEFAULT,
            revocation_bound_ms: 500,
            n_shards,
            limits,
            snapshot_every_n_logs,
            heartbeat_ms: HEARTBEAT_MS_DEFAULT,
            election_timeout_min_ms: ELECTION_TIMEOUT_MIN_MS_DEFAULT,
        }
    }

    fn raft_config(&self) -> anyhow::Result<Arc<openraft::Config>> {
        let config = openraft::Config {
            cluster_name: "cascade".to_owned(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_min_ms * 2,
            install_snapshot_timeout: 2_000,
            // `snapshots` below decides (openraft's policy knows only a fixed interval).
            snapshot_policy: SnapshotPolicy::Never,
            // Keep a tail behind each snapshot so a briefly lagging follower catches up from
            // the log instead of a full snapshot.
            max_in_snapshot_log_to_keep: self.snapshot_every_n_logs / 4,
            snapshot_max_chunk_size: 4 << 20,
            ..Default::default()
        };
        Ok(Arc::new(config.validate().context("invalid raft config")?))
    }
}

/// Everything Raft on one node.
pub struct RaftHost {
    pub node_id: NodeId,
    pub node: CascadeNode,
    pub shards: ShardTable,
    /// Channels to peers, shared by Raft traffic, freshness requests and write forwarding.
    pub peers: Peers,
    pub freshness: Arc<Freshness>,
    /// This node's election helpers (a transfer holds campaigns through them).
    pub elections: Elections,
    readers: Vec<ShardReader>,
    wal: Wal<TypeConfig>,
    n_shards: u16,
    /// Background tasks (freshness driver, delayed bootstrap), stopped on shutdown.
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Vote requests are refused before this (storage was empty at start; see `open`).
    pub votes_from: tokio::time::Instant,
}

impl RaftHost {
    /// Open (or create) the node's storage and start a Raft group for every shard. On a fresh
    /// cluster, each shard's preferred leader initializes it with the replicas placement chose
    /// (see [`placement::initial`]); a node given no cluster becomes the single member of every
    /// shard; a joining node initializes nothing.
    pub async fn open(
        config: HostConfig,
        storage: Storage,
        peers: Peers,
        observer: Option<Arc<dyn ApplyObserver>>,
    ) -> anyhow::Result<RaftHost> {
        anyhow::ensure!(config.n_shards > 0, "a node needs at least one shard");
        let bootstrap = bootstrap_plan(&config)?;
        let raft_config = config.raft_config()?;
        let (wal, mut tree_of): (Wal<TypeConfig>, TreeOpener) = match &storage {
            Storage::Dir(dir) => {
                let wal_dir = dir.join("wal");
                let sm_dir = dir.join("sm");
                let snapshots_dir = dir.join("snapshots");
                for d in [&wal_dir, &snapshots_dir] {
                    std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
                }
                let disk = FileDisk::open(&wal_dir).with_context(|| format!("open {}", wal_dir.display()))?;
                let wal = open_wal(disk, WriterMode::Thread)?;
                let db = sled::Config::new()
                    .path(&sm_dir)
                    .cache_capacity(256 << 20)
                    .flush_every_ms(SM_FLUSH_EVERY_MS)
                    .open()
                    .with_context(|| format!("open sled database {}", sm_dir.display()))?;
                (
                    wal,
                    Box::new(move |shard| {
                        let tree = SledTree::open(&db, &sm_dir, &snapshots_dir, &format!("shard-{shard}"))?;
                        Ok(Arc::new(tree) as Arc<dyn KvTree>)
                    }),
                )
            }
            Storage::Memory(mem) => {
                let wal = open_wal(mem.wal.clone(), WriterMode::Task { sync_delay: mem.sync_delay })?;
                let mem = mem.clone();
                (wal, Box::new(move |shard| Ok(Arc::new(mem.tree(shard)) as Arc<dyn KvTree>)))
            }
        };
        // Empty storage: a new cluster, or a node that lost its disk. The latter may have voted
        // in a term it no longer remembers; granting another vote in that term could elect two
        // leaders. Refuse votes until every election of that era is over.
        let votes_from = if wal.shards().is_empty() {
            tokio::time::Instant::now()
                + Duration::from_millis(raft_config.election_timeout_max * VOTE_QUARANTINE_TIMEOUTS)
        } else {
            tokio::time::Instant::now()
        };
        let shards = ShardTable::default();
        let elections = Elections::new(shards.clone(), config.heartbeat_ms, config.election_timeout_min_ms);
        let mut readers = Vec::with_capacity(usize::from(config.n_shards));
        for shard in 0..config.n_shards {
            let tree = tree_of(shard)?;
            let sm = ShardStateMachine::open(shard, tree, config.limits, observer.clone())
                .with_context(|| format!("open state machine of shard {shard}"))?;
            readers.push(sm.reader());
            let network = NetworkFactory { shard, peers: peers.clone(), elections: Some(elections.clone()) };
            let log = wal.log_store(u32::from(shard));
            let raft = Raft::new(config.node_id, raft_config.clone(), network, log, sm)
                .await
                .with_context(|| format!("start raft for shard {shard}"))?;
            shards.insert(shard, raft);
        }
        let freshness = Arc::new(Freshness::new(readers.clone(), config.revocation_bound_ms));
        let mut tasks = Vec::new();
        if let Some((nodes, plan)) = bootstrap {
            for p in plan {
                let Some(raft) = shards.get(p.shard) else { continue };
                if raft.is_initialized().await? || !p.replicas.contains(&config.node_id) {
                    continue;
                }
                let members = p.members(&nodes);
                if p.preferred_leader() == Some(config.node_id) {
                    initialize(&raft, p.shard, members).await?;
                } else {
                    tasks.push(tokio::spawn(async move {
                        tokio::time::sleep(BOOTSTRAP_GRACE).await;
                        if matches!(raft.is_initialized().await, Ok(false)) {
                            if let Err(e) = initialize(&raft, p.shard, members).await {
                                tracing::warn!(shard = p.shard, error = %e, "late bootstrap failed");
                            }
                        }
                    }));
                }
            }
        }
        // A tick of a fifth of the bound keeps answers well inside it (see freshness.rs).
        let tick = Duration::from_millis((config.revocation_bound_ms / 5).max(10));
        // A round is openraft's own heartbeat round, which gives up after `heartbeat_ms`; waiting
        // longer is useless, and a slow round holds up the next tick for every shard.
        let round_timeout = Duration::from_millis(config.heartbeat_ms).max(tick);
        // Ping each heartbeat; a peer counts as reached for one longest election timeout, so a
        // replica stops campaigning before its first election timer (lease + timeout) fires.
        tasks.push(tokio::spawn(elections::drive(
            elections.clone(),
            peers.clone(),
            config.node_id,
            Duration::from_millis(config.heartbeat_ms),
            Duration::from_millis(raft_config.election_timeout_max),
        )));
        tasks.push(tokio::spawn(snapshots(shards.clone(), readers.clone(), config.snapshot_every_n_logs)));
        tasks.push(tokio::spawn(freshness::drive(
            shards.clone(),
            peers.clone(),
            freshness.clone(),
            tick,
            round_timeout,
        )));
        Ok(RaftHost {
            node_id: config.node_id,
            node: config.node,
            shards,
            peers,
            freshness,
            elections,
            readers,
            wal,
            n_shards: config.n_shards,
            tasks: std::sync::Mutex::new(tasks),
            votes_from,
        })
    }

    pub fn n_shards(&self) -> u16 {
        self.n_shards
    }

    pub fn raft(&self, shard: ShardId) -> Option<Raft> {
        self.shards.get(shard)
    }

    pub fn reader(&self, shard: ShardId) -> Option<&ShardReader> {
        self.readers.get(usize::from(shard))
    }

    /// Number of fdatasync calls the WAL has made (group commit makes this far smaller than the
    /// number of appends).
    pub fn wal_syncs(&self) -> u64 {
        self.wal.syncs()
    }

    /// Stop the background tasks (waiting until each is gone, so nothing they hold outlives
    /// this call), every shard, then the WAL writer.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        let tasks: Vec<_> = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // An aborted task is dropped at its next poll; awaiting it waits for that.
            let _ = task.await;
        }
        for (shard, raft) in self.shards.all() {
            raft.shutdown().await.map_err(|e| anyhow::anyhow!("shutdown shard {shard}: {e}"))?;
        }
        self.wal.shutdown().await.context("shutdown wal")?;
        Ok(())
    }
}

/// Entries applied since a shard's last snapshot that trigger its next one: `every_n_logs`, or
/// more for a large shard (see [`SNAPSHOT_BYTES_PER_ENTRY`]), up to [`SNAPSHOT_LOGS_MAX`].
pub fn snapshot_threshold(every_n_logs: u64, snapshot_bytes: u64) -> u64 {
    (snapshot_bytes / SNAPSHOT_BYTES_PER_ENTRY).min(SNAPSHOT_LOGS_MAX).max(every_n_logs)
}

/// Triggers a shard's snapshot once the entries applied since its last one reach
/// [`snapshot_threshold`]. A trigger while one is being built is ignored by openraft.
async fn snapshots(shards: ShardTable, readers: Vec<ShardReader>, every_n_logs: u64) {
    let mut tick = tokio::time::interval(SNAPSHOT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (shard, raft) in shards.all() {
            let (applied, snapshot) = {
                let m = raft.metrics();
                let m = m.borrow();
                (m.last_applied.map_or(0, |l| l.index), m.snapshot.map_or(0, |l| l.index))
            };
            let bytes = readers.get(usize::from(shard)).map_or(0, ShardReader::snapshot_bytes);
            if applied.saturating_sub(snapshot) >= snapshot_threshold(every_n_logs, bytes) {
                // Err only when the shard is shutting down; the next tick sees it gone.
                let _ = raft.trigger().snapshot().await;
            }
        }
    }
}

/// The nodes and per-shard placement to initialize a fresh cluster with, or `None` to join.
fn bootstrap_plan(config: &HostConfig) -> anyhow::Result<Option<(Nodes, Vec<ShardPlacement>)>> {
    if config.join {
        return Ok(None);
    }
    let nodes = if config.initial_nodes.is_empty() {
        BTreeMap::from([(config.node_id, config.node.clone())])
    } else {
        config.initial_nodes.clone()
    };
    match nodes.get(&config.node_id) {
        Some(me) if me.addr == config.node.addr => {}
        Some(me) => anyhow::bail!(
            "node {} is listed at {} in the cluster's initial nodes but advertises {}",
            config.node_id,
            me.addr,
            config.node.addr
        ),
        None => anyhow::bail!(
            "node {} is not among the cluster's initial nodes; start it with join to add it to a running cluster",
            config.node_id
        ),
    }
    anyhow::ensure!(config.replicas >= 1, "replicas must be at least 1");
    let plan = placement::initial(config.n_shards, &nodes, config.replicas);
    Ok(Some((nodes, plan)))
}

async fn initialize(
    raft: &Raft,
    shard: ShardId,
    members: BTreeMap<NodeId, CascadeNode>,
) -> anyhow::Result<()> {
    match raft.initialize(members).await {
        Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("initialize shard {shard}: {e}")),
    }
}

fn open_wal(disk: impl Disk, writer: WriterMode) -> anyhow::Result<Wal<TypeConfig>> {
    Wal::open(disk, WalConfig { writer, ..WalConfig::default() }).context("open raft log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_threshold_grows_with_the_shard_up_to_its_cap() {
        assert_eq!(snapshot_threshold(5_000, 0), 5_000);
        assert_eq!(snapshot_threshold(5_000, 256 * 12_000), 12_000);
        assert_eq!(snapshot_threshold(5_000, 256 * 1_000_000), SNAPSHOT_LOGS_MAX);
        // An operator's larger interval is kept.
        assert_eq!(snapshot_threshold(50_000, 256 * 1_000_000), 50_000);
    }
}
