//! openraft's storage conformance suite (`Suite::test_all`) against Cascade's real log store
//! (node-wide WAL) and state machine, on disk (file WAL + sled) and on the in-memory twins.
#![allow(clippy::result_large_err)] // openraft's StorageError is what its builder trait returns.

use cascade_core::limits::Limits;
use cascade_raft::disk::{FileDisk, MemDisk};
use cascade_raft::kv::{KvTree, MemTree, SledTree};
use cascade_raft::log_store::LogStore;
use cascade_raft::sm::ShardStateMachine;
use cascade_raft::typ::{StorageError, TypeConfig};
use cascade_raft::wal::{Wal, WalConfig};
use openraft::testing::{StoreBuilder, Suite};
use std::sync::Arc;

fn storage_err(e: impl std::fmt::Display) -> StorageError {
    openraft::StorageIOError::write(openraft::AnyError::error(e.to_string())).into()
}

/// Log store on a file WAL, state machine on sled, both in a fresh temp dir per test.
struct OnDisk;

impl StoreBuilder<TypeConfig, LogStore<TypeConfig>, ShardStateMachine, tempfile::TempDir> for OnDisk {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore<TypeConfig>, ShardStateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(storage_err)?;
        let disk = FileDisk::open(dir.path().join("wal")).map_err(storage_err)?;
        let wal: Wal<TypeConfig> = Wal::open(disk, WalConfig::default()).map_err(storage_err)?;
        let sm_dir = dir.path().join("sm");
        let db = sled::open(&sm_dir).map_err(storage_err)?;
        let tree = SledTree::open(&db, &sm_dir, dir.path(), "shard-3").map_err(storage_err)?;
        let tree: Arc<dyn KvTree> = Arc::new(tree);
        let sm = ShardStateMachine::open(3, tree, Limits::default(), None)?;
        Ok((dir, wal.log_store(3), sm))
    }
}

/// The in-memory twins.
struct InMemory;

impl StoreBuilder<TypeConfig, LogStore<TypeConfig>, ShardStateMachine> for InMemory {
    async fn build(&self) -> Result<((), LogStore<TypeConfig>, ShardStateMachine), StorageError> {
        let wal: Wal<TypeConfig> = Wal::open(MemDisk::new(), WalConfig::default()).map_err(storage_err)?;
        let tree: Arc<dyn KvTree> = Arc::new(MemTree::default());
        let sm = ShardStateMachine::open(0, tree, Limits::default(), None)?;
        Ok(((), wal.log_store(0), sm))
    }
}

/// The on-disk log store and state machine meet openraft's storage contract.
#[test]
fn suite_on_disk() {
    Suite::test_all(OnDisk).expect("on-disk stores pass the suite");
}

/// The in-memory twins meet the same contract, so the simulator tests what production runs.
#[test]
fn suite_in_memory() {
    Suite::test_all(InMemory).expect("in-memory stores pass the suite");
}
