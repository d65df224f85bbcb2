//! Leadership transfer of one shard, run on its leader. openraft 0.9 has no transfer of its own:
//! the target is asked to stand, and wins with the old leader's vote (followers refuse votes
//! while they hear from a leader). A candidate whose log is behind the leader's loses, and its
//! higher term still deposes the leader, so the leader first stops its log from growing and
//! waits until the target has all of it.
//!
//! With more than 3 voters the old leader's vote and the target's own are not a majority: the
//! other voters must grant theirs, and each refuses for a leader lease
//! (`election_timeout_max`) after it last heard from the leader. So the leader asks every other
//! voter but the target to hold its own campaigns (`Hold`, so that none stands against it), stops its
//! heartbeats, lets the leases run out, and only then asks the target to stand. The shard's
//! writes wait one lease longer than with 3 voters.

use crate::network::Peers;
use crate::routing::handover_gate;
use crate::typ::{CascadeNode, NodeId, Raft};
use cascade_protocol::ids::ShardId;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::{ElectRequest, HoldRequest};
use std::collections::BTreeSet;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// Voters whose election the old leader's vote and the target's own decide.
pub const VOTERS_WON_BY_HANDOVER: usize = 3;
/// A hold outlasts the leases and the election by this much.
const HOLD_SLACK: Duration = Duration::from_millis(500);

/// A leader handing a shard over waits this long for the writes in flight on it to finish, and
/// then as long again for the target to have every entry of its log, before asking the target
/// to stand; writes to the shard wait meanwhile.
pub const HANDOVER_DRAIN: Duration = Duration::from_millis(1_000);
/// How long the target is given to win once asked to stand.
pub const TRANSFER_ATTEMPT: Duration = Duration::from_millis(900);
/// Deadline of the request asking the target to stand.
pub const ELECT_RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a handover takes on the leader: the two drains, the request and the election. A node
/// asking the leader for one waits this long (plus network time) for its answer.
pub const HANDOVER_MAX: Duration = HANDOVER_DRAIN
    .saturating_add(HANDOVER_DRAIN)
    .saturating_add(ELECT_RPC_TIMEOUT)
    .saturating_add(TRANSFER_ATTEMPT);

/// Longest a handover of the shard `raft` replicates takes on its leader: [`HANDOVER_MAX`], plus,
/// with more than 3 voters, the holds and the wait for the leader leases to run out.
pub fn handover_max(raft: &Raft) -> Duration {
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    HANDOVER_MAX.saturating_add(ELECT_RPC_TIMEOUT).saturating_add(lease).saturating_add(lease)
}

/// Why a handover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("node {node} does not lead shard {shard} (leader: {leader:?})")]
    NotLeader { node: NodeId, shard: ShardId, leader: Option<NodeId> },
    #[error("node {to} is not a voter of shard {shard} (voters: {voters:?})")]
    NotVoter { to: NodeId, shard: ShardId, voters: Vec<NodeId> },
    #[error("writes in flight on shard {shard} did not finish within {HANDOVER_DRAIN:?}")]
    Drain { shard: ShardId },
    #[error(
        "node {to} did not catch up with the log (index {last:?}, it has {has:?}) within {HANDOVER_DRAIN:?}"
    )]
    Lagging { to: NodeId, last: Option<u64>, has: Option<u64> },
    #[error("asking node {to} to stand: {reason}")]
    Elect { to: NodeId, reason: String },
    #[error("node {to} did not win the election within {TRANSFER_ATTEMPT:?}")]
    Lost { to: NodeId },
    #[error("voter {voter} did not hold its campaigns: {reason}")]
    Hold { voter: NodeId, reason: String },
}

/// The address of voter `to` of the shard `raft` replicates.
pub fn voter_addr(raft: &Raft, shard: ShardId, to: NodeId) -> Result<CascadeNode, TransferError> {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    match membership.get_node(&to) {
        Some(node) if membership.voter_ids().any(|v| v == to) => Ok(node.clone()),
        _ => Err(TransferError::NotVoter { to, shard, voters: membership.voter_ids().collect() }),
    }
}

/// Hand the leadership of `shard`, which `raft` leads, to voter `to`: hold the shard's writes
/// back, wait until `to` has every entry of the log, then have it stand. One attempt: a target
/// that cannot catch up within [`HANDOVER_DRAIN`] is not asked (asking would depose this leader
/// without electing it).
pub async fn hand_over(raft: &Raft, peers: &Peers, shard: ShardId, to: NodeId) -> Result<(), TransferError> {
    let node = raft.metrics().borrow().id;
    let leading = |raft: &Raft| {
        let m = raft.metrics().borrow().clone();
        (m.current_leader == Some(node) && m.state.is_leader(), m.current_leader)
    };
    if let (false, leader) = leading(raft) {
        return Err(TransferError::NotLeader { node, shard, leader });
    }
    let target = voter_addr(raft, shard, to)?;
    if to == node {
        return Ok(());
    }
    let gate = handover_gate(node, shard);
    let _closed = tokio::time::timeout(HANDOVER_DRAIN, gate.write())
        .await
        .map_err(|_| TransferError::Drain { shard })?;
    let last = raft.metrics().borrow().last_log_index;
    let matched = |m: &openraft::RaftMetrics<NodeId, CascadeNode>| {
        m.replication.as_ref().and_then(|r| r.get(&to).copied().flatten()).map(|l| l.index)
    };
    raft.wait(Some(HANDOVER_DRAIN))
        .metrics(|m| m.current_leader == Some(node) && matched(m) >= last, "target caught up")
        .await
        .map_err(|_| TransferError::Lagging { to, last, has: matched(&raft.metrics().borrow()) })?;
    let voters = raft.metrics().borrow().membership_config.membership().voter_ids().collect::<Vec<_>>();
    let wide = voters.len() > VOTERS_WON_BY_HANDOVER;
    // Heartbeats stop while the leases run out, and start again whatever happens next.
    let _beating = wide.then(|| Heartbeats::stop(raft, node, shard));
    if wide {
        let lease = Duration::from_millis(raft.config().election_timeout_max);
        let span = lease + ELECT_RPC_TIMEOUT + TRANSFER_ATTEMPT + HOLD_SLACK;
        // The target is not held: should its own timer fire first, its campaign is the one
        // wanted, and if asking it fails it still stands on its own.
        let others = voters.iter().filter(|v| **v != node && **v != to);
        let holds = others.map(|v| hold(raft, peers, shard, *v, span));
        futures::future::try_join_all(holds).await?;
        // The last append-entries went out before the holds: a lease after them, every voter
        // may grant a vote again.
        tokio::time::sleep(lease + Duration::from_millis(raft.config().heartbeat_interval)).await;
    }
    elect(peers, shard, to, &target.addr).await?;
    raft.wait(Some(TRANSFER_ATTEMPT))
        .metrics(|m| m.current_leader == Some(to), "transfer")
        .await
        .map(|_| ())
        .map_err(|_| TransferError::Lost { to })
}

/// Ask `voter` not to campaign for `shard` for `span`.
async fn hold(
    raft: &Raft,
    peers: &Peers,
    shard: ShardId,
    voter: NodeId,
    span: Duration,
) -> Result<(), TransferError> {
    let failed = |reason: String| TransferError::Hold { voter, reason };
    let addr = voter_addr(raft, shard, voter).map_err(|e| failed(e.to_string()))?.addr;
    let channel = peers.channel(&addr).map_err(|e| failed(e.to_string()))?;
    let hold_ms = u32::try_from(span.as_millis()).unwrap_or(u32::MAX);
    let mut request = tonic::Request::new(HoldRequest { shard: u32::from(shard), hold_ms });
    request.set_timeout(ELECT_RPC_TIMEOUT);
    RaftTransportClient::new(channel)
        .hold(request)
        .await
        .map(|_| ())
        .map_err(|s| failed(s.message().to_owned()))
}

/// Shards whose leader, on the node named, is letting the voters' leader leases run out for a
/// handover: nothing may confirm its leadership meanwhile (openraft's read-index check sends
/// append-entries, which renew the leases). Keyed by node as the simulator runs several nodes
/// in one process. Bound: the shards being handed over.
static QUIET: LazyLock<Mutex<BTreeSet<(NodeId, ShardId)>>> = LazyLock::new(|| Mutex::new(BTreeSet::new()));

/// Whether `node`, leading `shard`, must not confirm its leadership now (see [`QUIET`]):
/// freshness proofs and linearizable reads wait until the handover is over.
pub fn is_quiet(node: NodeId, shard: ShardId) -> bool {
    QUIET.lock().unwrap_or_else(|p| p.into_inner()).contains(&(node, shard))
}

/// A leader's heartbeats and leadership confirmations, off until dropped.
struct Heartbeats<'a> {
    raft: &'a Raft,
    key: (NodeId, ShardId),
}

impl<'a> Heartbeats<'a> {
    fn stop(raft: &'a Raft, node: NodeId, shard: ShardId) -> Heartbeats<'a> {
        QUIET.lock().unwrap_or_else(|p| p.into_inner()).insert((node, shard));
        raft.runtime_config().heartbeat(false);
        Heartbeats { raft, key: (node, shard) }
    }
}

impl Drop for Heartbeats<'_> {
    fn drop(&mut self) {
        self.raft.runtime_config().heartbeat(true);
        QUIET.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// Ask node `to` at `addr` to start an election for `shard` now.
pub async fn elect(peers: &Peers, shard: ShardId, to: NodeId, addr: &str) -> Result<(), TransferError> {
    let failed = |reason: String| TransferError::Elect { to, reason };
    let channel = peers.channel(addr).map_err(|e| failed(e.to_string()))?;
    let mut request = tonic::Request::new(ElectRequest { shard: u32::from(shard) });
    request.set_timeout(ELECT_RPC_TIMEOUT);
    RaftTransportClient::new(channel)
        .elect(request)
        .await
        .map(|_| ())
        .map_err(|s| failed(s.message().to_owned()))
}
