//! The multi-raft host: one node-wide WAL (group commit across shards), one sled database with a
//! tree per shard, and an openraft group per shard, all sharing one channel per peer.

use crate::disk::{Disk, FileDisk, MemDisk};
use crate::kv::{KvTree, MemTree, SledTree};
use crate::network::{NetworkFactory, Peers, ShardTable};
use crate::sm::{ApplyObserver, ShardReader, ShardStateMachine};
use crate::typ::{NodeId, Raft, TypeConfig};
use crate::wal::{Wal, WalConfig};
use anyhow::Context;
use cascade_core::limits::Limits;
use cascade_protocol::ids::ShardId;
use openraft::{BasicNode, SnapshotPolicy};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Opens the state-machine tree of a shard.
type TreeOpener = Box<dyn FnMut(ShardId) -> anyhow::Result<Arc<dyn KvTree>> + Send>;

/// Where a node keeps its state.
#[derive(Clone)]
pub enum Storage {
    /// Production: `<dir>/wal` (the Raft log) and `<dir>/sm` (sled: state machines, snapshots).
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
    /// Address peers reach this node's Raft transport at (`host:port`).
    pub advertise_addr: String,
    pub n_shards: u16,
    pub limits: Limits,
    /// Log entries after which a shard takes a snapshot and purges its log.
    pub snapshot_every_n_logs: u64,
}

impl HostConfig {
    fn raft_config(&self) -> anyhow::Result<Arc<openraft::Config>> {
        let config = openraft::Config {
            cluster_name: "cascade".to_owned(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            install_snapshot_timeout: 2_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_n_logs),
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
    pub shards: ShardTable,
    readers: Vec<ShardReader>,
    wal: Wal<TypeConfig>,
    n_shards: u16,
}

impl RaftHost {
    /// Open (or create) the node's storage, start every shard and, on first start, make this node
    /// the single member of every shard.
    pub async fn open(
        config: HostConfig,
        storage: Storage,
        observer: Option<Arc<dyn ApplyObserver>>,
    ) -> anyhow::Result<RaftHost> {
        anyhow::ensure!(config.n_shards > 0, "a node needs at least one shard");
        let raft_config = config.raft_config()?;
        let (wal, mut tree_of): (Wal<TypeConfig>, TreeOpener) = match &storage {
            Storage::Dir(dir) => {
                let wal_dir = dir.join("wal");
                let sm_dir = dir.join("sm");
                std::fs::create_dir_all(&wal_dir).with_context(|| format!("create {}", wal_dir.display()))?;
                let disk = FileDisk::open(&wal_dir).with_context(|| format!("open {}", wal_dir.display()))?;
                let wal = open_wal(disk)?;
                let db = sled::Config::new()
                    .path(&sm_dir)
                    .cache_capacity(256 << 20)
                    .flush_every_ms(Some(1000))
                    .open()
                    .with_context(|| format!("open sled database {}", sm_dir.display()))?;
                (
                    wal,
                    Box::new(move |shard| {
                        let tree = SledTree::open(&db, &sm_dir, &format!("shard-{shard}"))?;
                        Ok(Arc::new(tree) as Arc<dyn KvTree>)
                    }),
                )
            }
            Storage::Memory(mem) => {
                let wal = open_wal(mem.wal.clone())?;
                let mem = mem.clone();
                (wal, Box::new(move |shard| Ok(Arc::new(mem.tree(shard)) as Arc<dyn KvTree>)))
            }
        };
        let peers = Peers::default();
        let shards = ShardTable::default();
        let mut readers = Vec::with_capacity(usize::from(config.n_shards));
        for shard in 0..config.n_shards {
            let tree = tree_of(shard)?;
            let sm = ShardStateMachine::open(shard, tree, config.limits, observer.clone())
                .with_context(|| format!("open state machine of shard {shard}"))?;
            readers.push(sm.reader());
            let network = NetworkFactory { shard, peers: peers.clone() };
            let log = wal.log_store(u32::from(shard));
            let raft = Raft::new(config.node_id, raft_config.clone(), network, log, sm)
                .await
                .with_context(|| format!("start raft for shard {shard}"))?;
            if !raft.is_initialized().await? {
                let members =
                    BTreeMap::from([(config.node_id, BasicNode { addr: config.advertise_addr.clone() })]);
                raft.initialize(members).await.with_context(|| format!("initialize shard {shard}"))?;
            }
            shards.insert(shard, raft);
        }
        Ok(RaftHost { node_id: config.node_id, shards, readers, wal, n_shards: config.n_shards })
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

    /// Stop every shard, then the WAL writer.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        for (shard, raft) in self.shards.all() {
            raft.shutdown().await.map_err(|e| anyhow::anyhow!("shutdown shard {shard}: {e}"))?;
        }
        self.wal.shutdown().await.context("shutdown wal")?;
        Ok(())
    }
}

fn open_wal(disk: impl Disk) -> anyhow::Result<Wal<TypeConfig>> {
    Wal::open(disk, WalConfig::default()).context("open raft log")
}
