//! Where a shard's writes go: proposed on the local replica when it leads, otherwise forwarded
//! to the leader over the peer channel (one hop; the leader never forwards again). A write is
//! retried only when it certainly was not proposed (no leader yet, a node that is not the leader
//! refused it, or the connection was never made); anything else is reported as it is, because a
//! timed-out write may still commit.

use crate::network::{Peers, RAFT_MESSAGE_BYTES_MAX};
use crate::typ::{CascadeNode, NodeId, Raft};
use cascade_protocol::codec;
use cascade_protocol::command::Envelope;
use cascade_protocol::ids::ShardId;
use cascade_protocol::outcome::Applied;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::RaftMessage;
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::RwLock;

/// First wait before retrying a write that found no leader; doubles up to `RETRY_BACKOFF_MAX`.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(20);
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(320);

/// Why a proposal produced no outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    /// Certainly not proposed: this replica does not lead the shard.
    #[error("shard {shard} is not led by node {node} (leader: {leader:?})")]
    NotLeader { shard: ShardId, node: NodeId, leader: Option<NodeId> },
    /// Certainly not proposed: the leader could not be reached at all.
    #[error("shard {shard}: leader {leader} at {addr} unreachable: {reason}")]
    Unreachable { shard: ShardId, leader: NodeId, addr: String, reason: String },
    /// The outcome is unknown (the write may or may not commit).
    #[error("shard {shard}: write outcome unknown: {reason}")]
    Unknown { shard: ShardId, reason: String },
    /// No leader could be found or reached before the deadline; nothing was proposed.
    #[error("shard {shard} has no reachable leader after {waited_ms} ms; retry with backoff")]
    NoLeader { shard: ShardId, waited_ms: u64 },
}

impl ProposeError {
    /// Whether the command was certainly not proposed, so trying again cannot apply it twice.
    pub fn retryable(&self) -> bool {
        matches!(self, ProposeError::NotLeader { .. } | ProposeError::Unreachable { .. })
    }
}

/// Per (node, shard): every local proposal holds this gate open (shared) until its outcome; a
/// leader handing the shard over closes it (exclusive) so its log stops growing while the target
/// catches up. openraft 0.9 lets a candidate win only with a log as complete as the leader's, and
/// a candidate that loses still deposes the leader (its higher term reaches it), so a handover
/// under a stream of writes would otherwise cost the shard an election timeout. Keyed by node
/// too because several nodes may share a process (tests, the simulator); one small entry per
/// shard a node has proposed on.
static HANDOVER_GATES: LazyLock<Mutex<Gates>> = LazyLock::new(|| Mutex::new(BTreeMap::new()));

type Gates = BTreeMap<(NodeId, ShardId), Arc<RwLock<()>>>;

/// The handover gate of `shard` on `node` (see [`HANDOVER_GATES`]).
pub fn handover_gate(node: NodeId, shard: ShardId) -> Arc<RwLock<()>> {
    let mut gates = HANDOVER_GATES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    gates.entry((node, shard)).or_default().clone()
}

/// Propose on the local replica and wait until committed and applied. Waits while the shard's
/// leadership is being handed over from here (then answers `NotLeader`).
pub async fn propose_local(raft: &Raft, shard: ShardId, envelope: Envelope) -> Result<Applied, ProposeError> {
    let node = raft.metrics().borrow().id;
    let gate = handover_gate(node, shard);
    let _open = gate.read().await;
    match raft.client_write(envelope).await {
        Ok(resp) => Ok(resp.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(ProposeError::NotLeader { shard, node, leader: f.leader_id })
        }
        Err(e) => Err(ProposeError::Unknown { shard, reason: e.to_string() }),
    }
}

/// [`propose_local`] with a deadline. openraft 0.9 never answers a proposal to a leader that
/// lost its quorum without hearing a higher term, so a caller that must go on (a background
/// task that holds a "running" flag) needs one: past it the outcome is unknown.
pub async fn propose_local_within(
    raft: &Raft,
    shard: ShardId,
    envelope: Envelope,
    timeout: std::time::Duration,
) -> Result<Applied, ProposeError> {
    match tokio::time::timeout(timeout, propose_local(raft, shard, envelope)).await {
        Ok(answer) => answer,
        Err(_) => Err(ProposeError::Unknown {
            shard,
            reason: format!("no outcome within {} ms", timeout.as_millis()),
        }),
    }
}

/// The shard's leader as this replica knows it, with its address.
pub fn leader_of(raft: &Raft) -> Option<(NodeId, CascadeNode)> {
    let m = raft.metrics().borrow().clone();
    let leader = m.current_leader?;
    // A leader that removed itself from the voters keeps naming itself leader in openraft 0.9
    // metrics while its role is no longer Leader: it is not one.
    if leader == m.id && !m.state.is_leader() {
        return None;
    }
    let node = m.membership_config.membership().get_node(&leader)?.clone();
    Some((leader, node))
}

/// Propose on `addr`, which should lead the shard.
pub async fn propose_remote(
    peers: &Peers,
    shard: ShardId,
    leader: NodeId,
    addr: &str,
    envelope: &Envelope,
    timeout: Duration,
) -> Result<Applied, ProposeError> {
    let unreachable =
        |reason: String| ProposeError::Unreachable { shard, leader, addr: addr.to_owned(), reason };
    let channel = peers.channel(addr).map_err(|e| unreachable(e.to_string()))?;
    let payload =
        codec::encode(envelope).map_err(|e| ProposeError::Unknown { shard, reason: e.to_string() })?;
    let mut client = RaftTransportClient::new(channel)
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let mut request = tonic::Request::new(RaftMessage { shard: u32::from(shard), payload });
    request.set_timeout(timeout);
    match client.propose(request).await {
        Ok(reply) => codec::decode::<Result<Applied, ProposeError>>(&reply.into_inner().payload)
            .map_err(|e| ProposeError::Unknown { shard, reason: format!("undecodable reply: {e}") })?,
        // A connection that could not be made means nothing was sent; a deadline or a reset
        // mid-call leaves the outcome unknown.
        Err(status) if never_connected(&status) => Err(unreachable(status.message().to_owned())),
        Err(status) => Err(ProposeError::Unknown { shard, reason: status.to_string() }),
    }
}

/// Propose `envelope` to `shard`, locally or at its leader, retrying with backoff while it is
/// certain nothing was proposed, until `timeout`.
pub async fn write(
    raft: &Raft,
    peers: &Peers,
    shard: ShardId,
    envelope: Envelope,
    timeout: Duration,
) -> Result<Applied, ProposeError> {
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let me = raft.metrics().borrow().id;
    let mut backoff = RETRY_BACKOFF_MIN;
    loop {
        let attempt = match leader_of(raft) {
            Some((leader, _)) if leader == me => {
                tokio::time::timeout_at(deadline, propose_local(raft, shard, envelope.clone()))
                    .await
                    .unwrap_or_else(|_| Err(ProposeError::Unknown { shard, reason: "timed out".to_owned() }))
            }
            Some((leader, node)) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                propose_remote(peers, shard, leader, &node.addr, &envelope, left).await
            }
            None => Err(ProposeError::NotLeader { shard, node: me, leader: None }),
        };
        match attempt {
            Err(e) if e.retryable() => {
                let now = tokio::time::Instant::now();
                if now + backoff >= deadline {
                    tracing::debug!(shard, error = %e, "giving up on write");
                    let waited_ms = u64::try_from((now - start).as_millis()).unwrap_or(u64::MAX);
                    return Err(ProposeError::NoLeader { shard, waited_ms });
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            }
            other => return other,
        }
    }
}

/// Whether a failed call never reached the peer (the TCP connection was not established).
pub(crate) fn never_connected(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut text = status.message().to_owned();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text.contains("tcp connect error") || text.contains("Connection refused")
}
