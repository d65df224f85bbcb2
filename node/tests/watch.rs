//! `WatchRevocations` on a real 3-node cluster on loopback: a snapshot of what was revoked
//! before, events pushed from any node's revocations, heartbeats that say a replica is fresh,
//! and a stream resumed on another node after the serving one stops, neither repeating nor skipping
//! an event.

mod support;

use cascade_protocol::pb;
use std::collections::BTreeMap;
use std::time::Instant;
use support::cluster::{user_on_shard, TestCluster};
use support::*;
use tonic::Streaming;

const N_SHARDS: u16 = 4;
/// The nodes' revocation bound (the default).
const REVOCATION_BOUND_MS: u64 = 500;

/// What a subscriber has seen so far.
#[derive(Default)]
struct Seen {
    /// Revoked session ids, with the index they came with (0: from a snapshot).
    sessions: BTreeMap<String, u64>,
    /// Tenant watermarks seen, per shard.
    tenant_watermarks: BTreeMap<(u32, String), u64>,
    cursors: BTreeMap<u32, u64>,
    snapshot_done: Vec<u32>,
    /// Shards whose last heartbeat said the replica is fresh.
    fresh: BTreeMap<u32, bool>,
    messages: usize,
}

impl Seen {
    fn take(&mut self, msg: pb::WatchRevocationsMessage) {
        self.messages += 1;
        for e in msg.events {
            match e.what {
                Some(pb::revocation_event::What::Session(s)) => {
                    let again = self.sessions.insert(s.session_id.clone(), e.index);
                    assert!(again.is_none(), "session {} delivered twice", s.session_id);
                }
                Some(pb::revocation_event::What::Watermark(w)) if w.scope() == pb::WatermarkScope::Tenant => {
                    self.tenant_watermarks.insert((e.shard, w.tenant), w.watermark_ms);
                }
                _ => {}
            }
        }
        for p in msg.progress {
            let before = self.cursors.insert(p.shard, p.index).unwrap_or(0);
            assert!(p.index >= before, "shard {} cursor went back from {before} to {}", p.shard, p.index);
            self.fresh.insert(p.shard, p.fresh);
        }
        self.snapshot_done.extend(msg.snapshot_done);
    }

    fn cursors(&self) -> Vec<pb::ShardCursor> {
        self.cursors.iter().map(|(&shard, &index)| pb::ShardCursor { shard, index }).collect()
    }
}

/// Reads the stream into `seen` until `done` holds.
async fn read_until(
    stream: &mut Streaming<pb::WatchRevocationsMessage>,
    seen: &mut Seen,
    what: &str,
    done: impl Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + STATE_DEADLINE;
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {STATE_DEADLINE:?}"))
            .unwrap_or_else(|s| panic!("stream failed waiting for {what}: {s}"))
            .unwrap_or_else(|| panic!("stream ended waiting for {what}"));
        seen.take(msg);
    }
}

async fn revoke(client: &Client, session_id: &str) {
    let req = pb::RevokeSessionRequest {
        session_id: session_id.to_owned(),
        revocation: revocation(pb::ReasonCode::Compromised),
    };
    client.clone().revoke_session(req).await.expect("revoke");
}

async fn watch(client: &Client, cursors: Vec<pb::ShardCursor>) -> Streaming<pb::WatchRevocationsMessage> {
    client
        .clone()
        .watch_revocations(pb::WatchRevocationsRequest { cursors, shards: vec![] })
        .await
        .expect("watch")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_snapshots_pushes_and_resumes_without_gaps_or_repeats() {
    let mut cluster = TestCluster::start(3, N_SHARDS).await;
    let mut clients = Vec::new();
    for m in &cluster.members {
        clients.push(m.client().await);
    }
    let tenant = "acme";
    let user = |shard| user_on_shard(tenant, "w", shard, N_SHARDS);

    // Before anyone watches: a revoked session and a tenant watermark.
    let early = create(&mut clients[0].clone(), create_req(tenant, &user(0), "web")).await;
    revoke(&clients[0], &early.session_id).await;
    let mark = pb::SetWatermarkRequest {
        scope: pb::WatermarkScope::Tenant as i32,
        tenant: "gone".to_owned(),
        revocation: revocation(pb::ReasonCode::Compromised),
        ..Default::default()
    };
    clients[0].clone().set_watermark(mark).await.expect("watermark");

    // The snapshot, from another node, has both; every shard reports fresh. (Past the bound,
    // so the other node's replica has applied both: a snapshot shows what its replica holds.)
    after_ms(now_ms() + REVOCATION_BOUND_MS + 100).await;
    let mut stream = watch(&clients[1], Vec::new()).await;
    let mut seen = Seen::default();
    read_until(&mut stream, &mut seen, "the snapshot of every shard", |s| {
        s.snapshot_done.len() == N_SHARDS as usize
    })
    .await;
    assert!(seen.sessions.contains_key(&early.session_id), "revoked session missing from the snapshot");
    for shard in 0..u32::from(N_SHARDS) {
        assert!(
            seen.tenant_watermarks.contains_key(&(shard, "gone".to_owned())),
            "shard {shard}: no watermark"
        );
    }
    read_until(&mut stream, &mut seen, "a fresh heartbeat of every shard", |s| {
        s.fresh.len() == N_SHARDS as usize && s.fresh.values().all(|f| *f)
    })
    .await;

    // A revocation through the third node is pushed to the second's subscriber.
    let first = create(&mut clients[2].clone(), create_req(tenant, &user(1), "web")).await;
    let second = create(&mut clients[2].clone(), create_req(tenant, &user(2), "web")).await;
    let acked = Instant::now();
    revoke(&clients[2], &first.session_id).await;
    read_until(&mut stream, &mut seen, "the pushed revocation", |s| {
        s.sessions.contains_key(&first.session_id)
    })
    .await;
    println!(
        "pushed to a subscriber on another node {} ms after the revoke call started",
        acked.elapsed().as_millis()
    );
    assert!(seen.sessions[&first.session_id] > 0, "a live event carries its log index");
    // Cursors past the event, from a heartbeat.
    let shard1 = 1u32;
    let event_index = seen.sessions[&first.session_id];
    read_until(&mut stream, &mut seen, "a cursor past the event", |s| {
        s.cursors.get(&shard1).is_some_and(|c| *c >= event_index)
    })
    .await;
    // The serving node goes down. While nobody listens: another revocation. Resuming from the
    // cursors on another node (cursors are Raft log indexes, the same on every replica)
    // delivers it, and only it.
    cluster.members[1].stop().await;
    match tokio::time::timeout(STATE_DEADLINE, stream.message()).await {
        Ok(Ok(Some(_))) => {} // a message already in flight; the stream ends after it
        Ok(Ok(None)) | Ok(Err(_)) => {}
        Err(_) => panic!("the stream of a stopped node neither ended nor failed"),
    }
    drop(stream);
    revoke(&clients[0], &second.session_id).await;
    let mut resumed = Seen { cursors: seen.cursors.clone(), ..Seen::default() };
    let mut stream = watch(&clients[2], seen.cursors()).await;
    read_until(&mut stream, &mut resumed, "the revocation made while away", |s| {
        s.sessions.contains_key(&second.session_id)
    })
    .await;
    assert!(resumed.snapshot_done.is_empty(), "a resumed stream starts no snapshot");
    assert!(!resumed.sessions.contains_key(&first.session_id), "an event before the cursor came again");
    assert!(!resumed.sessions.contains_key(&early.session_id), "a snapshot session came again");
}

/// Cursors that name no shard, or a shard twice, are refused with the field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_refuses_bad_cursors() {
    let node = TestNode::start().await;
    let client = node.client.clone();
    let bad = |cursors: Vec<pb::ShardCursor>| {
        let client = client.clone();
        async move {
            client
                .clone()
                .watch_revocations(pb::WatchRevocationsRequest { cursors, shards: vec![] })
                .await
                .map(|_| ())
        }
    };
    let msg = expect_code(
        bad(vec![pb::ShardCursor { shard: 999, index: 0 }]).await,
        tonic::Code::InvalidArgument,
        "shard 999",
    );
    assert!(msg.contains("cursors"), "{msg}");
    let twice = vec![pb::ShardCursor { shard: 0, index: 0 }, pb::ShardCursor { shard: 0, index: 3 }];
    let msg = expect_code(bad(twice).await, tonic::Code::InvalidArgument, "shard twice");
    assert!(msg.contains("twice"), "{msg}");
}

/// On a 4-node cluster (3 replicas per shard) a node lacks some shards; watching it still
/// covers every shard: those it holds no replica of are relayed from a node that does, snapshot
/// and pushed events alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_node_without_a_replica_relays_the_missing_shards() {
    let cluster = TestCluster::start(4, N_SHARDS).await;
    let mut watcher = None;
    for m in &cluster.members {
        let status = m.status().await;
        let missing: Vec<u32> =
            status.shards.iter().filter(|s| !s.voters.contains(&m.id)).map(|s| s.shard).collect();
        if !missing.is_empty() {
            watcher = Some((m.client().await, missing));
            break;
        }
    }
    let (client, missing) = watcher.expect("with 4 nodes and 3 replicas some node lacks a shard");
    let mut stream = watch(&client, Vec::new()).await;
    let mut seen = Seen::default();
    read_until(&mut stream, &mut seen, "the snapshot of every shard", |s| {
        s.snapshot_done.len() == N_SHARDS as usize
    })
    .await;
    read_until(&mut stream, &mut seen, "a fresh heartbeat of every shard", |s| {
        s.fresh.len() == N_SHARDS as usize && s.fresh.values().all(|f| *f)
    })
    .await;
    // A revocation on a shard the watched node does not hold is pushed through it.
    let shard = u16::try_from(missing[0]).expect("shard number");
    let user = user_on_shard("acme", "relay", shard, N_SHARDS);
    let writer = cluster.members[0].client().await;
    let s = create(&mut writer.clone(), create_req("acme", &user, "web")).await;
    revoke(&writer, &s.session_id).await;
    read_until(&mut stream, &mut seen, "the relayed revocation", |seen| {
        seen.sessions.contains_key(&s.session_id)
    })
    .await;
}

/// Subscribers that start within a moment of each other share one snapshot per shard. One that
/// gets a snapshot taken before a revocation must still receive that revocation (as an event
/// after the snapshot's cursor), exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_snapshot_is_followed_by_what_applied_after_it() {
    let node = TestNode::start_with(|c| c.shards = N_SHARDS).await;
    let client = node.client.clone();
    let tenant = "acme";
    let mut pending = Vec::new();
    for shard in 0..N_SHARDS {
        let user = user_on_shard(tenant, "shared", shard, N_SHARDS);
        pending.push(create(&mut client.clone(), create_req(tenant, &user, "web")).await.session_id);
    }
    // The first subscriber's snapshots (none of the sessions is revoked yet).
    let mut first = watch(&client, Vec::new()).await;
    let mut seen_first = Seen::default();
    read_until(&mut first, &mut seen_first, "the first snapshot", |s| {
        s.snapshot_done.len() == N_SHARDS as usize
    })
    .await;
    // Revocations on every shard, then a second subscriber at once (within the sharing window,
    // unless this machine is very slow; either way it must see each revocation once).
    for sid in &pending {
        revoke(&client, sid).await;
    }
    let mut second = watch(&client, Vec::new()).await;
    let mut seen_second = Seen::default();
    read_until(&mut second, &mut seen_second, "every revocation on the second stream", |s| {
        pending.iter().all(|sid| s.sessions.contains_key(sid))
    })
    .await;
    let from_events = pending.iter().filter(|sid| seen_second.sessions[*sid] > 0).count();
    println!("{from_events} of {} revocations came as events after a shared snapshot", pending.len());
    // The first stream gets them too, as events.
    read_until(&mut first, &mut seen_first, "every revocation on the first stream", |s| {
        pending.iter().all(|sid| s.sessions.contains_key(sid))
    })
    .await;
    assert!(pending.iter().all(|sid| seen_first.sessions[sid] > 0), "the first stream had them as events");
}
