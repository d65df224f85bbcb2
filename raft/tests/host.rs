//! The multi-raft host end to end: snapshots are built and the log purged behind them, and every
//! acknowledged write survives a restart, including a power loss on the in-memory twins (P1).

use cascade_core::limits::Limits;
use cascade_protocol::command::{Command, CreateSession, Envelope, SessionMetadata};
use cascade_protocol::ids::{SessionId, UserKey};
use cascade_protocol::outcome::Outcome;
use cascade_raft::host::{HostConfig, MemStorage, RaftHost, Storage};
use cascade_raft::network::Peers;
use std::time::Duration;

const SHARDS: u16 = 4;

fn config(snapshot_every_n_logs: u64) -> HostConfig {
    HostConfig::single(1, "127.0.0.1:1", SHARDS, Limits::default(), snapshot_every_n_logs)
}

async fn leaders(host: &RaftHost) {
    for shard in 0..SHARDS {
        let raft = host.raft(shard).expect("shard exists");
        raft.wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.current_leader == Some(1), "leader")
            .await
            .expect("single-node shard elects itself");
    }
}

/// Create one session for each user in `users`; returns the acknowledged (user, session) pairs.
async fn create_sessions(
    host: &RaftHost,
    users: std::ops::Range<u32>,
    now_ms: u64,
) -> Vec<(UserKey, SessionId)> {
    let mut acked = Vec::new();
    for i in users {
        let user = UserKey::new("acme", format!("user{i}"));
        let shard = user.shard(SHARDS);
        let session_id = SessionId { shard, nonce: u128::from(i) + 1 };
        let command = Command::CreateSession(Box::new(CreateSession {
            session_id,
            user: user.clone(),
            client_id: "web".into(),
            device: None,
            aal: 1,
            amr: vec![],
            ttl_ms: 3_600_000,
            idle_timeout_ms: 0,
            parent: None,
            refresh_secret_sha256: None,
            metadata: SessionMetadata::default(),
        }));
        let raft = host.raft(shard).expect("shard exists");
        let resp = raft.client_write(Envelope::new(now_ms, command)).await.expect("write commits");
        assert!(matches!(resp.data.outcome, Outcome::Created { .. }), "{:?}", resp.data.outcome);
        acked.push((user, session_id));
    }
    acked
}

fn assert_all_present(host: &RaftHost, acked: &[(UserKey, SessionId)]) {
    for (user, session_id) in acked {
        let reader = host.reader(user.shard(SHARDS)).expect("reader");
        assert_eq!(reader.owner_of(session_id).expect("read index").as_ref(), Some(user), "{session_id}");
        let state = reader.load_user(user).expect("read user").expect("user present");
        assert!(state.sessions.contains_key(session_id), "{session_id} lost");
    }
}

/// Snapshots are built and the log behind them purged; a restart from snapshot + log tail keeps
/// every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_restart_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = RaftHost::open(config(20), Storage::Dir(dir.path().to_owned()), Peers::default(), None)
        .await
        .expect("open");
    leaders(&host).await;
    let acked = create_sessions(&host, 0..200, 1_700_000_000_000).await;
    let mut snapshotted = 0;
    for shard in 0..SHARDS {
        let raft = host.raft(shard).expect("shard");
        let m = raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= 20), "snapshot")
            .await
            .expect("a shard with 50 writes and a 20-entry policy snapshots");
        if m.purged.is_some() {
            snapshotted += 1;
        }
    }
    assert_eq!(snapshotted, SHARDS, "every shard purged its log behind a snapshot");
    host.shutdown().await.expect("shutdown");
    drop(host);

    let host = RaftHost::open(config(20), Storage::Dir(dir.path().to_owned()), Peers::default(), None)
        .await
        .expect("reopen");
    leaders(&host).await;
    assert_all_present(&host, &acked);
    // And it keeps taking writes after the restart.
    let more = create_sessions(&host, 200..205, 1_700_000_001_000).await;
    assert_all_present(&host, &more);
    host.shutdown().await.expect("shutdown");
}

/// P1: a power loss (every unsynced byte of log and state machine dropped) loses no
/// acknowledged write: the log was synced before the acknowledgement and is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_keeps_acknowledged_writes() {
    let storage = MemStorage::default();
    let host = RaftHost::open(config(1_000), Storage::Memory(storage.clone()), Peers::default(), None)
        .await
        .expect("open");
    leaders(&host).await;
    let acked = create_sessions(&host, 0..60, 1_700_000_000_000).await;
    let syncs = host.wal_syncs();
    assert!(syncs > 0, "the log was synced");
    // Power loss: the state-machine trees were never synced (no snapshot yet), so only the log
    // can bring the writes back.
    storage.crash();
    drop(host);
    let host = RaftHost::open(config(1_000), Storage::Memory(storage.clone()), Peers::default(), None)
        .await
        .expect("reopen");
    leaders(&host).await;
    for shard in 0..SHARDS {
        let raft = host.raft(shard).expect("shard");
        let last = raft.metrics().borrow().last_log_index.unwrap_or(0);
        raft.wait(Some(Duration::from_secs(10)))
            .applied_index(Some(last), "replayed")
            .await
            .expect("log replays into the state machine");
    }
    assert_all_present(&host, &acked);
    host.shutdown().await.expect("shutdown");
}
