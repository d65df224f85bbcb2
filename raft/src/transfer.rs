//! Leadership transfer of one shard, run on its leader. openraft 0.9 has no transfer of its own:
//! the target is asked to stand, and wins with the old leader's vote (followers refuse votes
//! while they hear from a leader). A candidate whose log is behind the leader's loses, and its
//! higher term still deposes the leader, so the leader first stops its log from growing and
//! waits until the target has all of it.

use crate::network::Peers;
use crate::routing::handover_gate;
use crate::typ::{CascadeNode, NodeId, Raft};
use cascade_protocol::ids::ShardId;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::ElectRequest;
use std::time::Duration;

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
    elect(peers, shard, to, &target.addr).await?;
    raft.wait(Some(TRANSFER_ATTEMPT))
        .metrics(|m| m.current_leader == Some(to), "transfer")
        .await
        .map(|_| ())
        .map_err(|_| TransferError::Lost { to })
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
