//! Membership changes of one shard, run on its leader: new voters join as learners and catch up
//! first, then one joint-consensus change (openraft's `change_membership`) installs the new voter
//! set. Which nodes should be voters is decided by `placement`, not here.

use crate::typ::{CascadeNode, NodeId, Raft};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How long a new replica may take to catch up (by log or snapshot) before the change is
/// abandoned; nothing changes in the membership until it has.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a membership change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("node {node} does not lead this shard (leader: {leader:?})")]
    NotLeader { node: NodeId, leader: Option<NodeId> },
    #[error("a shard needs at least one voter")]
    NoVoters,
    #[error("node {node} did not catch up within {CATCH_UP_TIMEOUT:?}")]
    CatchUpTimeout { node: NodeId },
    #[error("{0}")]
    Raft(String),
}

/// Make `voters` the voting replicas of the shard `raft` leads.
pub async fn change_voters(
    raft: &Raft,
    voters: BTreeMap<NodeId, CascadeNode>,
) -> Result<(), MembershipError> {
    if voters.is_empty() {
        return Err(MembershipError::NoVoters);
    }
    let m = raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        return Err(MembershipError::NotLeader { node: m.id, leader: m.current_leader });
    }
    let current: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
    for (id, node) in voters.iter().filter(|(id, _)| !current.contains(id)) {
        // Blocking: returns once the learner is within openraft's replication lag threshold.
        match tokio::time::timeout(CATCH_UP_TIMEOUT, raft.add_learner(*id, node.clone(), true)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(MembershipError::Raft(format!("add learner {id}: {e}"))),
            Err(_) => return Err(MembershipError::CatchUpTimeout { node: *id }),
        }
    }
    let ids: BTreeSet<NodeId> = voters.keys().copied().collect();
    if ids != current {
        // `retain = false`: removed voters leave the membership entirely.
        raft.change_membership(ids, false)
            .await
            .map_err(|e| MembershipError::Raft(format!("change membership: {e}")))?;
    }
    Ok(())
}
