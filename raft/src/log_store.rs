//! openraft log storage (storage-v2 API) of one shard, backed by the node-wide [`Wal`].
//!
//! A [`LogStore`] is a thin, cheaply cloned view: the shard id plus a handle to the shared WAL.
//! It holds no state of its own and must not do any I/O itself; durability and ordering are the
//! WAL's job. Its only work is translating between openraft's API and the WAL's, including
//! turning WAL failures into openraft storage errors.

use std::fmt::Debug;
use std::ops::RangeBounds;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};

use crate::wal::{ShardId, Wal, WalError, WalTypes};

/// The Raft log and vote of one shard, stored in the node-wide [`Wal`].
pub struct LogStore<C: WalTypes> {
    wal: Wal<C>,
    shard: ShardId,
}

impl<C: WalTypes> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore { wal: self.wal.clone(), shard: self.shard }
    }
}

impl<C: WalTypes> Debug for LogStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("shard", &self.shard).finish_non_exhaustive()
    }
}

impl<C: WalTypes> LogStore<C> {
    /// The log store of `shard` in `wal`; see also [`Wal::log_store`].
    pub fn new(wal: Wal<C>, shard: ShardId) -> LogStore<C> {
        LogStore { wal, shard }
    }

    /// The shard this store belongs to.
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The WAL this store writes to.
    pub fn wal(&self) -> &Wal<C> {
        &self.wal
    }
}

/// Maps a WAL failure to the openraft error for `subject`/`verb`.
fn storage_error(subject: ErrorSubject<u64>, verb: ErrorVerb, error: &WalError) -> StorageError<u64> {
    StorageIOError::new(subject, verb, AnyError::new(error)).into()
}

impl<C: WalTypes> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<u64>> {
        // Served from memory, which already holds entries whose append has not been synced yet.
        self.wal
            .entries(self.shard, range)
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, &e))
    }

    /// What replication sends: only entries consecutive from `start` (see
    /// `Wal::consecutive_entries`).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, StorageError<u64>> {
        self.wal
            .consecutive_entries(self.shard, start, end)
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, &e))
    }
}

impl<C: WalTypes> RaftLogStorage<C> for LogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<u64>> {
        Ok(self.wal.log_state(self.shard))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.wal
            .save_vote(self.shard, vote)
            .await
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, &e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.wal.read_vote(self.shard))
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError<u64>> {
        self.wal
            .save_committed(self.shard, committed)
            .await
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Write, &e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.wal.read_committed(self.shard))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<C::Entry> = entries.into_iter().collect();
        self.wal
            .append(self.shard, entries, move |result| callback.log_io_completed(result))
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.wal
            .truncate(self.shard, log_id.index)
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.wal
            .purge(self.shard, log_id)
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use openraft::storage::{RaftLogStorageExt, RaftStateMachine, Snapshot};
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{BasicNode, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};
    use tempfile::TempDir;

    use super::*;
    use crate::disk::{FileDisk, MemDisk};
    use crate::wal::test_support::{entry, log_id, TestConfig};
    use crate::wal::WalConfig;

    /// Shard the suite runs on; not 0, so shard ids are really passed through.
    const SUITE_SHARD: ShardId = 3;

    #[derive(Default)]
    struct SmState {
        last_applied: Option<LogId<u64>>,
        membership: StoredMembership<u64, BasicNode>,
        snapshot: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
        snapshots_built: u64,
    }

    /// Minimal state machine for the conformance suite: it only remembers what openraft
    /// itself reads back (last applied, membership, snapshot).
    #[derive(Clone, Default)]
    struct TestSm {
        state: Arc<Mutex<SmState>>,
    }

    impl TestSm {
        fn state(&self) -> std::sync::MutexGuard<'_, SmState> {
            self.state.lock().expect("test state machine lock")
        }
    }

    impl RaftSnapshotBuilder<TestConfig> for TestSm {
        async fn build_snapshot(&mut self) -> Result<Snapshot<TestConfig>, StorageError<u64>> {
            let mut state = self.state();
            state.snapshots_built += 1;
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
                snapshot_id: format!("snapshot-{}", state.snapshots_built),
            };
            let data = format!("{:?}", state.last_applied).into_bytes();
            state.snapshot = Some((meta.clone(), data.clone()));
            Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
        }
    }

    impl RaftStateMachine<TestConfig> for TestSm {
        type SnapshotBuilder = Self;

        async fn applied_state(
            &mut self,
        ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
            let state = self.state();
            Ok((state.last_applied, state.membership.clone()))
        }

        async fn apply<I>(&mut self, entries: I) -> Result<Vec<String>, StorageError<u64>>
        where
            I: IntoIterator<Item = openraft::Entry<TestConfig>> + OptionalSend,
            I::IntoIter: OptionalSend,
        {
            let mut state = self.state();
            let mut replies = Vec::new();
            for entry in entries {
                state.last_applied = Some(entry.log_id);
                if let EntryPayload::Membership(membership) = entry.payload {
                    state.membership = StoredMembership::new(Some(entry.log_id), membership);
                }
                replies.push(String::new());
            }
            Ok(replies)
        }

        async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
            self.clone()
        }

        async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
            Ok(Box::new(Cursor::new(Vec::new())))
        }

        async fn install_snapshot(
            &mut self,
            meta: &SnapshotMeta<u64, BasicNode>,
            snapshot: Box<Cursor<Vec<u8>>>,
        ) -> Result<(), StorageError<u64>> {
            let mut state = self.state();
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            state.snapshot = Some((meta.clone(), snapshot.into_inner()));
            Ok(())
        }

        async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TestConfig>>, StorageError<u64>> {
            Ok(self.state().snapshot.as_ref().map(|(meta, data)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(data.clone())),
            }))
        }
    }

    fn open_error(e: impl std::error::Error + 'static) -> StorageError<u64> {
        StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, AnyError::new(&e)).into()
    }

    /// Builds stores on a fresh temporary directory; the guard keeps the directory alive.
    struct FileBuilder;

    impl StoreBuilder<TestConfig, LogStore<TestConfig>, TestSm, (TempDir, Wal<TestConfig>)> for FileBuilder {
        async fn build(
            &self,
        ) -> Result<((TempDir, Wal<TestConfig>), LogStore<TestConfig>, TestSm), StorageError<u64>> {
            let dir = tempfile::tempdir().map_err(open_error)?;
            let disk = FileDisk::open(dir.path()).map_err(open_error)?;
            let wal = Wal::open(disk, WalConfig::default()).map_err(open_error)?;
            let store = wal.log_store(SUITE_SHARD);
            Ok(((dir, wal), store, TestSm::default()))
        }
    }

    /// Builds stores on a fresh in-memory disk.
    struct MemBuilder;

    impl StoreBuilder<TestConfig, LogStore<TestConfig>, TestSm, Wal<TestConfig>> for MemBuilder {
        async fn build(&self) -> Result<(Wal<TestConfig>, LogStore<TestConfig>, TestSm), StorageError<u64>> {
            let wal = Wal::open(MemDisk::new(), WalConfig::default()).map_err(open_error)?;
            let store = wal.log_store(SUITE_SHARD);
            Ok((wal, store, TestSm::default()))
        }
    }

    #[test]
    fn openraft_suite_on_file_disk() -> anyhow::Result<()> {
        Suite::test_all(FileBuilder)?;
        Ok(())
    }

    #[test]
    fn openraft_suite_on_mem_disk() -> anyhow::Result<()> {
        Suite::test_all(MemBuilder)?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_flushed_and_save_vote_wait_for_the_sync() -> anyhow::Result<()> {
        let disk = MemDisk::new();
        let wal = Wal::<TestConfig>::open(disk.clone(), WalConfig::default())?;
        let mut store = wal.log_store(7);
        store.blocking_append([entry(1, 1, "acked")]).await?;
        store.save_vote(&Vote::new(1, 1)).await?;

        disk.pause_syncs(true);
        let mut appender = store.clone();
        let append = tokio::spawn(async move { appender.blocking_append([entry(1, 2, "unsynced")]).await });
        // The entry becomes readable as soon as append() returns, long before the sync.
        let mut reader = store.get_log_reader().await;
        let deadline = Instant::now() + Duration::from_secs(2);
        while reader.try_get_log_entries(2..3).await?.is_empty() {
            assert!(Instant::now() < deadline, "appended entry never became readable");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut voter = store.clone();
        let vote = tokio::spawn(async move { voter.save_vote(&Vote::new(2, 1)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!append.is_finished(), "LogFlushed fired before the sync");
        assert!(!vote.is_finished(), "save_vote returned before the sync");

        let reopened = Wal::<TestConfig>::open(disk.crash(), WalConfig::default())?;
        let mut after = reopened.log_store(7);
        assert_eq!(after.read_vote().await?, Some(Vote::new(1, 1)));
        let ids: Vec<u64> = after.try_get_log_entries(..).await?.iter().map(|e| e.log_id.index).collect();
        assert_eq!(ids, vec![1]);
        assert_eq!(after.get_log_state().await?.last_log_id, Some(log_id(1, 1)));
        reopened.shutdown().await?;

        // The pre-crash writer wakes up on a dead disk: both waiters fail, neither succeeds.
        disk.pause_syncs(false);
        assert!(append.await?.is_err());
        assert!(vote.await?.is_err());
        wal.shutdown().await?;
        Ok(())
    }

    #[tokio::test]
    async fn wal_failures_become_storage_errors() -> anyhow::Result<()> {
        let wal = Wal::<TestConfig>::open(MemDisk::new(), WalConfig::default())?;
        let mut store = wal.log_store(1);
        wal.shutdown().await?;
        assert!(matches!(store.save_vote(&Vote::new(1, 1)).await, Err(StorageError::IO { .. })));
        assert!(store.blocking_append([entry(1, 1, "x")]).await.is_err());
        assert!(store.truncate(log_id(1, 1)).await.is_err());
        assert!(store.purge(log_id(1, 1)).await.is_err());
        Ok(())
    }
}
