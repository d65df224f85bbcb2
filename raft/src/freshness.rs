//! Freshness proofs for P2: a replica answers a check only when it can prove its state includes
//! every write acknowledged more than `revocation_bound` ago.
//!
//! A **proof** is `(at_ms, read_index)` on this node's monotonic clock: every write acknowledged
//! anywhere before `at_ms` has a log index ≤ `read_index`. Once the local state machine has
//! applied `read_index`, the replica is *fresh as of* `at_ms`, and a check starting at `now` may
//! be answered locally while `now - at_ms ≤ bound` (it then reports `now - at_ms` as its
//! staleness bound).
//!
//! - The **leader** obtains proofs from openraft's `get_read_log_id` (a heartbeat round that a
//!   quorum acknowledges): started at `at`, it returns an index covering every write committed
//!   before `at`. A leader cut off from its quorum gets no new proofs, so it stops answering
//!   within the bound even though openraft 0.9 still calls it leader.
//! - A **follower** asks the leader for its latest proof and its age: sent at `t0` (follower
//!   clock), answered with `age` (leader clock), the proof is at least as recent as `t0 - age`.
//!   This assumes the two clocks run at the same rate (not that they agree), the usual lease
//!   assumption.
//!
//! This file keeps proofs; `drive` (below) obtains them. It must not read the wall clock.

use crate::network::{Peers, ShardTable};
use crate::sm::ShardReader;
use crate::typ::NodeId;
use cascade_protocol::ids::ShardId;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::ReadIndexRequest;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Proofs waiting for the state machine to reach their index, per shard. Older ones are
/// dropped first; a newer proof supersedes them anyway once applied.
pub const PENDING_PROOFS_MAX: usize = 8;

/// A freshness proof: every write acknowledged before `at_ms` has index ≤ `read_index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proof {
    pub at_ms: u64,
    pub read_index: u64,
}

#[derive(Default)]
struct ShardFreshness {
    /// Latest time (monotonic ms) as of which the applied state is proven complete.
    fresh_as_of_ms: Option<u64>,
    /// Proofs whose index is not applied yet, oldest first.
    pending: VecDeque<Proof>,
    /// Latest proof this node obtained as leader (handed to followers that ask).
    leader_proof: Option<Proof>,
    /// `(term, index)`: the last log index this node held when it was first seen leading the
    /// shard in `term` (see [`Freshness::leader_floor`]).
    leader_floor: Option<(u64, u64)>,
}

/// Freshness of every local replica of a node.
pub struct Freshness {
    shards: Vec<Mutex<ShardFreshness>>,
    readers: Vec<ShardReader>,
    /// Answers older than this are refused (`revocation_bound`).
    pub bound_ms: u64,
    epoch: tokio::time::Instant,
}

impl Freshness {
    pub fn new(readers: Vec<ShardReader>, bound_ms: u64) -> Freshness {
        Freshness {
            shards: readers.iter().map(|_| Mutex::default()).collect(),
            readers,
            bound_ms,
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Monotonic milliseconds since this tracker was made (tokio's clock, so simulated time
    /// works too).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn shard(&self, shard: ShardId) -> Option<std::sync::MutexGuard<'_, ShardFreshness>> {
        self.shards.get(usize::from(shard)).map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Record a proof for `shard` (from our own leadership or from the leader).
    pub fn record(&self, shard: ShardId, proof: Proof) {
        let applied = self.applied_index(shard);
        let Some(mut s) = self.shard(shard) else { return };
        if proof.read_index <= applied {
            s.fresh_as_of_ms = s.fresh_as_of_ms.max(Some(proof.at_ms));
            return;
        }
        if s.pending.len() >= PENDING_PROOFS_MAX {
            s.pending.pop_front();
        }
        s.pending.push_back(proof);
    }

    /// Record a proof obtained as the shard's leader.
    pub fn record_leader(&self, shard: ShardId, proof: Proof) {
        if let Some(mut s) = self.shard(shard) {
            s.leader_proof = Some(proof);
        }
        self.record(shard, proof);
    }

    /// The leader's latest proof with its age now, for a follower that asks.
    pub fn leader_proof(&self, shard: ShardId) -> Option<(u64, u64)> {
        let now = self.now_ms();
        let proof = self.shard(shard)?.leader_proof?;
        Some((proof.read_index, now.saturating_sub(proof.at_ms)))
    }

    /// Forget leader proofs (this node stopped leading the shard).
    pub fn clear_leader(&self, shard: ShardId) {
        if let Some(mut s) = self.shard(shard) {
            s.leader_proof = None;
            s.leader_floor = None;
        }
    }

    /// The least read index a leader proof may carry: the leader's last log index when this node
    /// was first seen leading the shard in `term` (`last_log_index` is what it holds now).
    /// openraft's read index is `max(committed, the leader's no-op entry)`, but a leader that
    /// restarts still leading its term (openraft 0.9 restores it at startup) appends no no-op,
    /// and its committed index comes from storage, where it may lag what was acknowledged before
    /// the crash; its log holds every acknowledged entry. (The simulator found followers
    /// answering VALID for a session revoked just before a whole-cluster crash: seeds 221, 435.)
    pub fn leader_floor(&self, shard: ShardId, term: u64, last_log_index: u64) -> u64 {
        let Some(mut s) = self.shard(shard) else { return last_log_index };
        match s.leader_floor {
            Some((t, floor)) if t == term => floor,
            _ => {
                s.leader_floor = Some((term, last_log_index));
                last_log_index
            }
        }
    }

    fn applied_index(&self, shard: ShardId) -> u64 {
        self.readers.get(usize::from(shard)).map_or(0, ShardReader::applied_index)
    }

    /// How stale an answer from the local replica of `shard` could be right now, if within the
    /// bound; `None` means it cannot prove freshness and must not answer.
    pub fn staleness_ms(&self, shard: ShardId) -> Option<u64> {
        let now = self.now_ms();
        let applied = self.applied_index(shard);
        let mut s = self.shard(shard)?;
        // Every pending proof whose index is applied now counts; the newest of them wins.
        let satisfied = s.pending.iter().filter(|p| p.read_index <= applied).map(|p| p.at_ms).max();
        if satisfied.is_some() {
            s.fresh_as_of_ms = s.fresh_as_of_ms.max(satisfied);
            s.pending.retain(|p| p.read_index > applied);
        }
        let age = now.saturating_sub(s.fresh_as_of_ms?);
        (age <= self.bound_ms).then_some(age)
    }
}

/// Obtain proofs every `interval` until the task is dropped: as leader, by a quorum-acknowledged
/// heartbeat round per led shard; as follower, by one read-index request per leader node for all
/// the shards it leads. Every wait is bounded by `round_timeout` (the host uses the Raft heartbeat),
/// so a partition delays ticks but never stalls them; a round may take longer than a tick when
/// replicas are a long round trip apart.
pub async fn drive(
    shards: ShardTable,
    peers: Peers,
    freshness: Arc<Freshness>,
    interval: Duration,
    round_timeout: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        tick(&shards, &peers, &freshness, round_timeout).await;
    }
}

async fn tick(shards: &ShardTable, peers: &Peers, freshness: &Arc<Freshness>, round_timeout: Duration) {
    let mut led = Vec::new();
    let mut followed: BTreeMap<String, Vec<ShardId>> = BTreeMap::new();
    for (shard, raft) in shards.all() {
        let m = raft.metrics().borrow().clone();
        let me: NodeId = m.id;
        match m.current_leader {
            // A handover is letting the leases run out: no read-index round (see transfer.rs).
            Some(l) if l == me && m.state.is_leader() && crate::transfer::is_quiet(me, shard) => {}
            Some(l) if l == me && m.state.is_leader() => {
                let floor = freshness.leader_floor(shard, m.current_term, m.last_log_index.unwrap_or(0));
                led.push((shard, raft, floor));
            }
            Some(l) if l == me => freshness.clear_leader(shard),
            Some(l) => {
                freshness.clear_leader(shard);
                if let Some(node) = m.membership_config.membership().get_node(&l) {
                    followed.entry(node.addr.clone()).or_default().push(shard);
                }
            }
            None => freshness.clear_leader(shard),
        }
    }
    let leaders = futures::future::join_all(led.into_iter().map(|(shard, raft, floor)| {
        let freshness = freshness.clone();
        async move {
            let at_ms = freshness.now_ms();
            if let Ok(Ok((read, _applied))) =
                tokio::time::timeout(round_timeout, raft.get_read_log_id()).await
            {
                let read_index = read.map_or(0, |l| l.index).max(floor);
                freshness.record_leader(shard, Proof { at_ms, read_index });
            }
        }
    }));
    let followers = futures::future::join_all(followed.into_iter().map(|(addr, shards)| {
        let freshness = freshness.clone();
        async move {
            let Ok(channel) = peers.channel(&addr) else { return };
            let at_ms = freshness.now_ms();
            let mut request = tonic::Request::new(ReadIndexRequest {
                shards: shards.iter().map(|s| u32::from(*s)).collect(),
            });
            request.set_timeout(round_timeout);
            let Ok(reply) = RaftTransportClient::new(channel).read_index(request).await else { return };
            for p in reply.into_inner().proofs.into_iter().filter(|p| p.ok) {
                let Ok(shard) = ShardId::try_from(p.shard) else { continue };
                if shards.contains(&shard) {
                    let proof = Proof { at_ms: at_ms.saturating_sub(p.age_ms), read_index: p.read_index };
                    freshness.record(shard, proof);
                }
            }
        }
    }));
    futures::future::join(leaders, followers).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemTree;
    use crate::sm::ShardStateMachine;

    fn tracker(bound_ms: u64) -> Freshness {
        let sm = ShardStateMachine::open(0, Arc::new(MemTree::default()), Default::default(), None)
            .expect("open state machine");
        Freshness::new(vec![sm.reader()], bound_ms)
    }

    /// P2: no proof, no answer; a proof counts only once its index is applied.
    #[tokio::test]
    async fn a_proof_counts_only_once_applied() {
        let f = tracker(60_000);
        assert_eq!(f.staleness_ms(0), None, "no proof yet");
        f.record(0, Proof { at_ms: f.now_ms(), read_index: 3 });
        assert_eq!(f.staleness_ms(0), None, "index 3 is not applied (applied is 0)");
        f.record(0, Proof { at_ms: f.now_ms(), read_index: 0 });
        assert!(f.staleness_ms(0).is_some(), "an applied proof makes the replica fresh");
        assert_eq!(f.staleness_ms(1), None, "unknown shard");
    }

    /// P2: a proof older than the bound does not count, however it was obtained.
    #[tokio::test]
    async fn a_proof_older_than_the_bound_expires() {
        let f = tracker(1);
        f.record_leader(0, Proof { at_ms: 0, read_index: 0 });
        let start = std::time::Instant::now();
        while f.now_ms() < 3 {
            assert!(start.elapsed() < Duration::from_secs(5), "monotonic clock does not advance");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(f.staleness_ms(0), None);
        let (read_index, age_ms) = f.leader_proof(0).expect("leader proof kept for followers");
        assert_eq!(read_index, 0);
        assert!(age_ms >= 3, "the age handed to followers grows: {age_ms}");
        f.clear_leader(0);
        assert_eq!(f.leader_proof(0), None);
    }

    /// P2: a leader's floor is its last log index when first seen leading a term; it holds for
    /// the term and is taken again in a new term or after it stopped leading.
    #[tokio::test]
    async fn the_leader_floor_is_taken_once_per_term() {
        let f = tracker(60_000);
        assert_eq!(f.leader_floor(0, 5, 64), 64, "first seen leading term 5 with 64 entries");
        assert_eq!(f.leader_floor(0, 5, 90), 64, "the same term keeps its floor");
        assert_eq!(f.leader_floor(0, 6, 95), 95, "a new term takes a new floor");
        f.clear_leader(0);
        assert_eq!(f.leader_floor(0, 6, 99), 99, "leading again after stepping down");
    }

    /// Pending proofs are bounded.
    #[tokio::test]
    async fn pending_proofs_are_bounded() {
        let f = tracker(60_000);
        for i in 0..(PENDING_PROOFS_MAX as u64 * 2) {
            f.record(0, Proof { at_ms: i, read_index: 100 + i });
        }
        assert_eq!(f.shard(0).expect("shard").pending.len(), PENDING_PROOFS_MAX);
    }
}
