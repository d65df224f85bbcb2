//! Elections that end: two helpers around openraft 0.9's election timer.
//!
//! **Split votes.** openraft 0.9 draws a replica's election timeout once, when the shard
//! starts, and waits that same time before every election it starts. Two followers that lose
//! their leader at the same moment and happened to draw close timeouts campaign at the same
//! moment; each has voted for itself and refuses the other, and the next round starts at the
//! same distance apart, and the next. A chaos run (leader of a shard cut off for 14 s, 3
//! replicas) saw the two survivors split round after round and no leader until the old one came
//! back. [`Elections`] sees every vote reply a shard receives (through the transport). When a
//! peer refuses because it campaigns for itself in the same term and its log is not ahead of
//! ours, the round is a split: a new election is started after a fresh random delay in
//! `[heartbeat, election_timeout_min)`, unless by then the shard has left that candidacy (won,
//! or voted for someone else). The lower bound leaves time for the grants still in flight; the
//! draw is new every round, so two candidates drift apart instead of staying in step. A refusal
//! from a peer whose log is ahead is left to openraft: it holds back a candidate with the
//! shorter log (`smaller_log_timeout`) so the other can win, and a quick retry would only
//! outbid it. Refusals under a leader lease are not splits.
//!
//! **Campaigns without a quorum.** openraft 0.9 has no pre-vote. A replica cut off from its
//! peers campaigns again and again, raising its term each time; when the link comes back, its
//! higher term reaches the leader (in a vote request or an append-entries reply) and the leader
//! steps down, so healing a partition cost every shard the isolated node followed an election
//! (2-4 s without a leader). [`drive`] pings every peer each heartbeat and lets a shard's
//! replica campaign (openraft's `enable_elect`) only while it reached a quorum of the shard's
//! voters within the last election timeout. This only ever withholds a campaign, so it cannot
//! break safety; an operator's `transfer-leader` is not gated.
//!
//! Randomness comes from [`crate::runtime::ThreadRng`], so the simulator replays it from its seed.

use crate::network::{Peers, ShardTable};
use crate::runtime::ThreadRng;
use crate::typ::NodeId;
use cascade_protocol::ids::ShardId;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::ReadIndexRequest;
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::ServerState;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A node's election helpers, shared by its shards.
#[derive(Clone)]
pub struct Elections {
    inner: Arc<Inner>,
}

struct Inner {
    shards: ShardTable,
    /// The delay before a new election after a split, drawn anew each time (ms).
    retry_ms: Range<u64>,
    /// The latest candidacy of each shard that got a refusal. Bound: one entry per shard.
    candidacies: Mutex<BTreeMap<ShardId, Candidacy>>,
    /// Which shards' replicas here may not campaign, and why. Also guards the calls that
    /// switch openraft's `enable_elect`, so a hold and the drive never undo each other.
    gates: Mutex<Gates>,
}

#[derive(Default)]
struct Gates {
    /// Shards whose replica here may not campaign (no quorum in reach, or held). Bound: the
    /// shards.
    gated: BTreeSet<ShardId>,
    /// Shards held by a leadership transfer until the instant (see [`Elections::hold`]).
    /// Bound: the shards.
    holds: BTreeMap<ShardId, Instant>,
    /// Shards whose replica here was removed from the voters by a membership committed at the
    /// index (see [`Elections::retire`]). Bound: the shards.
    retired: BTreeMap<ShardId, u64>,
}

impl Gates {
    fn held(&self, shard: ShardId, now: Instant) -> bool {
        self.holds.get(&shard).is_some_and(|until| *until > now)
    }

    /// Whether the replica of `shard`, whose membership here was logged at `membership_index`,
    /// is retired: a leader removed it at a membership at least as new as ours.
    fn retired(&self, shard: ShardId, membership_index: u64) -> bool {
        self.retired.get(&shard).is_some_and(|at| membership_index <= *at)
    }
}

/// The index of the membership `raft`'s replica holds (0: none yet).
fn membership_index(raft: &crate::typ::Raft) -> u64 {
    raft.metrics().borrow().membership_config.log_id().map_or(0, |l| l.index)
}

/// The longest a leadership transfer may hold this node's campaigns for a shard.
pub const HOLD_MAX: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Default)]
struct Candidacy {
    term: u64,
    /// A peer's log is ahead of ours: leave this round to openraft.
    greater_log: bool,
    /// A new election is already scheduled for this term.
    scheduled: bool,
}

/// What a refused vote tells a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The peer campaigns (or voted for another candidate) in the same term; its log is not
    /// ahead of ours.
    Split,
    /// The peer's log is ahead of ours.
    GreaterLog,
    /// Anything else: a lease, a higher term, a committed leader.
    Other,
}

/// Classifies the reply to a vote request; `None` when the vote was granted.
pub fn refusal(req: &VoteRequest<NodeId>, resp: &VoteResponse<NodeId>) -> Option<Refusal> {
    if resp.vote_granted {
        return None;
    }
    if resp.last_log_id > req.last_log_id {
        return Some(Refusal::GreaterLog);
    }
    let ours = req.vote.leader_id();
    let theirs = resp.vote.leader_id();
    let split =
        !resp.vote.is_committed() && theirs.term == ours.term && theirs.voted_for() != ours.voted_for();
    Some(if split { Refusal::Split } else { Refusal::Other })
}

impl Elections {
    /// `heartbeat_ms` and `election_timeout_min_ms` bound the delay before a new election.
    pub fn new(shards: ShardTable, heartbeat_ms: u64, election_timeout_min_ms: u64) -> Elections {
        let lo = heartbeat_ms.min(election_timeout_min_ms.saturating_sub(1));
        let retry_ms = lo..election_timeout_min_ms.max(lo + 1);
        Elections {
            inner: Arc::new(Inner {
                shards,
                retry_ms,
                candidacies: Mutex::new(BTreeMap::new()),
                gates: Mutex::new(Gates::default()),
            }),
        }
    }

    /// Whether the replica of `shard` here may campaign (it reached a quorum lately, and no
    /// transfer holds it).
    pub fn may_campaign(&self, shard: ShardId) -> bool {
        !self.inner.gates.lock().unwrap_or_else(|p| p.into_inner()).gated.contains(&shard)
    }

    /// The shard's leader removed this replica of `shard` from the voters, in a membership
    /// committed at `membership_index`: it stops campaigning (the removing entry never reaches
    /// it, so its own membership still names it a voter and its election timer keeps firing).
    /// Ignored if this replica already holds a newer membership; lifted by [`drive`] once it
    /// does (it was added back). Like every gate, this only withholds campaigns.
    pub fn retire(&self, shard: ShardId, membership_index: u64) {
        let Some(raft) = self.inner.shards.get(shard) else { return };
        let mut gates = self.inner.gates.lock().unwrap_or_else(|p| p.into_inner());
        if membership_index < self::membership_index(&raft) {
            return;
        }
        let at = gates.retired.entry(shard).or_insert(membership_index);
        *at = (*at).max(membership_index);
        gates.gated.insert(shard);
        raft.runtime_config().elect(false);
        tracing::info!(shard, membership_index, "removed from the voters: not campaigning");
    }

    /// A leadership transfer asks this replica of `shard` not to start elections of its own for
    /// `span` (at most [`HOLD_MAX`]); [`drive`] lets it campaign again once the hold is over.
    /// An election asked for explicitly (`Elect`) still starts.
    pub fn hold(&self, shard: ShardId, span: Duration) {
        let until = Instant::now() + span.min(HOLD_MAX);
        let mut gates = self.inner.gates.lock().unwrap_or_else(|p| p.into_inner());
        let held = gates.holds.entry(shard).or_insert(until);
        *held = (*held).max(until);
        gates.gated.insert(shard);
        if let Some(raft) = self.inner.shards.get(shard) {
            raft.runtime_config().elect(false);
        }
        tracing::info!(
            shard,
            hold_ms = span.min(HOLD_MAX).as_millis() as u64,
            "campaigns held for a transfer"
        );
    }

    /// Called by the transport with every vote reply of `shard`.
    pub fn observe(&self, shard: ShardId, req: &VoteRequest<NodeId>, resp: &VoteResponse<NodeId>) {
        let Some(refusal) = refusal(req, resp) else { return };
        let term = req.vote.leader_id().term;
        let delay = {
            let mut all = self.inner.candidacies.lock().unwrap_or_else(|p| p.into_inner());
            let c = all.entry(shard).or_default();
            if term < c.term {
                return; // A reply to an older candidacy.
            }
            if term > c.term {
                *c = Candidacy { term, ..Candidacy::default() };
            }
            match refusal {
                Refusal::GreaterLog => {
                    c.greater_log = true;
                    return;
                }
                Refusal::Other => return,
                Refusal::Split if c.greater_log || c.scheduled => return,
                Refusal::Split => c.scheduled = true,
            }
            Duration::from_millis(ThreadRng.gen_range(self.inner.retry_ms.clone()))
        };
        let this = self.clone();
        tokio::spawn(async move { this.campaign_again(shard, term, delay).await });
    }

    async fn campaign_again(&self, shard: ShardId, term: u64, delay: Duration) {
        tokio::time::sleep(delay).await;
        let greater_log = {
            let all = self.inner.candidacies.lock().unwrap_or_else(|p| p.into_inner());
            all.get(&shard).is_some_and(|c| c.term == term && c.greater_log)
        };
        let Some(raft) = self.inner.shards.get(shard) else { return };
        let still_candidate = {
            let m = raft.metrics();
            let m = m.borrow();
            m.state == ServerState::Candidate && m.current_term == term
        };
        if greater_log || !still_candidate || !self.may_campaign(shard) {
            return;
        }
        tracing::info!(shard, term, delay_ms = delay.as_millis() as u64, "split vote: campaigning again");
        if let Err(e) = raft.trigger().elect().await {
            tracing::warn!(shard, error = %e, "could not start an election after a split vote");
        }
    }
}

/// Whether every configuration in `joint` (one, or two during a membership change) has a
/// majority of its voters in `reached`.
pub fn quorum_in_reach(joint: &[BTreeSet<NodeId>], reached: &BTreeSet<NodeId>) -> bool {
    joint.iter().all(|voters| voters.intersection(reached).count() * 2 > voters.len())
}

/// Pings every peer each `tick` and gates campaigns (see the module docs): a replica campaigns
/// only if it reached a quorum of its shard's voters within `reach_window`. Runs until the
/// host stops.
pub async fn drive(elections: Elections, peers: Peers, me: NodeId, tick: Duration, reach_window: Duration) {
    // Last successful ping per peer. Bound: the nodes named in the shards' memberships.
    let mut reached_at: BTreeMap<NodeId, Instant> = BTreeMap::new();
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let shards = elections.inner.shards.all();
        let mut addrs: BTreeMap<NodeId, String> = BTreeMap::new();
        let mut joints = Vec::with_capacity(shards.len());
        for (shard, raft) in &shards {
            let m = raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            for (id, node) in membership.nodes() {
                if *id != me {
                    addrs.insert(*id, node.addr.clone());
                }
            }
            let index = m.membership_config.log_id().map_or(0, |l| l.index);
            joints.push((*shard, raft.clone(), index, membership.get_joint_config().clone()));
        }
        let pings = futures::future::join_all(addrs.into_iter().map(|(id, addr)| {
            let peers = peers.clone();
            async move {
                let Ok(channel) = peers.channel(&addr) else { return (id, false) };
                let mut request = tonic::Request::new(ReadIndexRequest { shards: Vec::new() });
                request.set_timeout(tick);
                (id, RaftTransportClient::new(channel).read_index(request).await.is_ok())
            }
        }))
        .await;
        let now = Instant::now();
        for (id, ok) in pings {
            if ok {
                reached_at.insert(id, now);
            }
        }
        let reached: BTreeSet<NodeId> = reached_at
            .iter()
            .filter(|(_, at)| now.duration_since(**at) <= reach_window)
            .map(|(id, _)| *id)
            .chain(std::iter::once(me))
            .collect();
        let mut gates = elections.inner.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates.holds.retain(|_, until| *until > now);
        for (shard, raft, index, joint) in joints {
            if gates.retired.contains_key(&shard) && !gates.retired(shard, index) {
                gates.retired.remove(&shard);
                tracing::info!(shard, "a newer membership arrived: retirement over");
            }
            let in_reach = quorum_in_reach(&joint, &reached);
            let allow = in_reach && !gates.held(shard, now) && !gates.retired(shard, index);
            let changed = if allow { gates.gated.remove(&shard) } else { gates.gated.insert(shard) };
            if changed {
                raft.runtime_config().elect(allow);
                if allow {
                    tracing::info!(shard, "a quorum of voters is in reach again: campaigns allowed");
                } else {
                    tracing::info!(shard, in_reach, "no quorum of voters in reach, or held: not campaigning");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, Vote};

    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 0), index))
    }

    fn req(term: u64, candidate: NodeId, last: Option<LogId<NodeId>>) -> VoteRequest<NodeId> {
        VoteRequest::new(Vote::new(term, candidate), last)
    }

    #[test]
    fn a_rival_candidate_in_the_same_term_is_a_split() {
        let r = req(4, 2, log(3, 23));
        let resp = VoteResponse::new(Vote::new(4, 3), log(3, 23), false);
        assert_eq!(refusal(&r, &resp), Some(Refusal::Split));
    }

    #[test]
    fn a_longer_log_is_not_a_split() {
        let r = req(4, 2, log(3, 20));
        let resp = VoteResponse::new(Vote::new(4, 3), log(3, 23), false);
        assert_eq!(refusal(&r, &resp), Some(Refusal::GreaterLog));
    }

    #[test]
    fn a_lease_or_a_higher_term_is_not_a_split() {
        let r = req(4, 2, log(3, 23));
        let lease = VoteResponse::new(Vote::new_committed(3, 1), log(3, 23), false);
        assert_eq!(refusal(&r, &lease), Some(Refusal::Other));
        let higher = VoteResponse::new(Vote::new(5, 3), log(3, 23), false);
        assert_eq!(refusal(&r, &higher), Some(Refusal::Other));
        let granted = VoteResponse::new(Vote::new(4, 2), log(3, 23), true);
        assert_eq!(refusal(&r, &granted), None);
    }

    #[test]
    fn campaigns_need_a_majority_of_every_configuration() {
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<NodeId>>();
        let three = vec![set(&[1, 2, 3])];
        assert!(quorum_in_reach(&three, &set(&[1, 2])));
        assert!(!quorum_in_reach(&three, &set(&[1])), "alone: no campaign");
        assert!(!quorum_in_reach(&three, &set(&[1, 4, 5])), "non-voters do not count");
        let joint = vec![set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(!quorum_in_reach(&joint, &set(&[1, 2, 3])), "the new configuration lacks a majority");
        assert!(quorum_in_reach(&joint, &set(&[2, 3, 4])));
        assert!(quorum_in_reach(&[set(&[1])], &set(&[1])), "a single voter always may");
    }

    /// A removed replica stays retired while its membership is no newer than the one that
    /// removed it.
    #[test]
    fn retirement_lasts_until_a_newer_membership() {
        let mut gates = Gates::default();
        gates.retired.insert(3, 10);
        assert!(gates.retired(3, 7), "the removing entry never reached it");
        assert!(gates.retired(3, 10));
        assert!(!gates.retired(3, 11), "added back: a newer membership");
        assert!(!gates.retired(4, 7), "other shards are not retired");
    }

    /// A transfer's hold stops the shard's campaigns here, is capped, and only ever extends.
    #[tokio::test(start_paused = true)]
    async fn a_hold_stops_campaigns_for_its_span() {
        let elections = Elections::new(ShardTable::default(), 50, 300);
        assert!(elections.may_campaign(3));
        elections.hold(3, Duration::from_secs(60));
        assert!(!elections.may_campaign(3));
        assert!(elections.may_campaign(4), "other shards are not held");
        let gates = elections.inner.gates.lock().unwrap_or_else(|p| p.into_inner());
        let until = gates.holds[&3];
        assert!(until <= Instant::now() + HOLD_MAX, "capped at HOLD_MAX");
        assert!(gates.held(3, Instant::now() + HOLD_MAX - Duration::from_millis(1)));
        assert!(!gates.held(3, until), "over at its end");
        drop(gates);
        elections.hold(3, Duration::from_millis(10));
        let gates = elections.inner.gates.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(gates.holds[&3], until, "a shorter hold does not cut a longer one short");
    }
}
