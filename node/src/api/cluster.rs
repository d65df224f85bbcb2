//! Cluster membership for operators: add or remove a node. The node that receives the request
//! learns every shard's voters from the shards' leaders (any node may be asked, including one
//! that holds no replica of some shards), computes the new placement with
//! `cascade_raft::placement::rebalance`, and asks each affected shard's leader to change its
//! voters, one shard at a time, so at most one shard is in joint consensus at once.

use super::ctx::{NodeCtx, CHECK_TIMEOUT};
use super::status::ApiError;
use cascade_protocol::ids::ShardId;
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::{ChangeVotersRequest, VoterNode};
use cascade_raft::membership::CATCH_UP_TIMEOUT;
use cascade_raft::placement::{self, Nodes, ShardLeadership, ShardPlacement};
use cascade_raft::typ::CascadeNode;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Attempts to reach a shard's leader for one change (leaders move during elections).
const CHANGE_ATTEMPTS_MAX: usize = 20;
const CHANGE_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// What the cluster looks like from its nodes' status reports.
struct View {
    nodes: Nodes,
    /// Per shard: (term, leader, voters) from the replica reporting the highest term.
    shards: BTreeMap<ShardId, (u64, u64, Vec<u64>)>,
    /// Per shard: the nodes that answered and whose replica proves freshness (caught up with a
    /// leader within the revocation bound).
    fresh: BTreeMap<ShardId, BTreeSet<u64>>,
}

impl NodeCtx {
    /// Add `node` (started with `--join`) or remove the node `remove`, moving replicas.
    pub async fn change_nodes(
        &self,
        add: Option<(u64, CascadeNode)>,
        remove: Option<u64>,
    ) -> Result<pb::MembershipChangeResponse, ApiError> {
        let start = tokio::time::Instant::now();
        let view = self.cluster_view().await?;
        let mut nodes = view.nodes.clone();
        if let Some((id, node)) = &add {
            if let Some(existing) = nodes.get(id) {
                if existing != node {
                    return Err(ApiError::MembershipRefused(format!(
                        "node {id} is already in the cluster as {existing}; remove it first"
                    )));
                }
            }
            nodes.insert(*id, node.clone());
        }
        if let Some(id) = remove {
            if nodes.remove(&id).is_none() {
                return Err(ApiError::MembershipRefused(format!("node {id} is not in the cluster")));
            }
            if nodes.is_empty() {
                return Err(ApiError::MembershipRefused("cannot remove the last node".to_owned()));
            }
        }
        let current: Vec<ShardPlacement> = (0..self.n_shards)
            .map(|shard| ShardPlacement {
                shard,
                replicas: view.shards.get(&shard).map(|(_, _, v)| v.clone()).unwrap_or_default(),
            })
            .collect();
        if let Some(missing) = current.iter().find(|p| p.replicas.is_empty()) {
            return Err(ApiError::Membership(format!(
                "no leader reported the voters of shard {}; wait until every shard has a leader",
                missing.shard
            )));
        }
        let target = placement::rebalance(&current, &nodes, self.replicas);
        let mut moves = Vec::new();
        for (before, after) in current.iter().zip(&target) {
            let mut b = before.replicas.clone();
            let mut a = after.replicas.clone();
            b.sort_unstable();
            a.sort_unstable();
            if a == b {
                continue;
            }
            tracing::info!(shard = after.shard, before = ?b, after = ?a, "changing voters");
            self.change_voters(after.shard, &after.members(&nodes)).await?;
            moves.push(pb::ShardMove { shard: u32::from(after.shard), voters_before: b, voters_after: a });
        }
        Ok(pb::MembershipChangeResponse {
            moves,
            took_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// One round of leader balancing: when this node leads more than its share of shards (after
    /// failovers moved leaderships onto it), learn the cluster's view and hand one shard to a
    /// caught-up voter that leads at least two fewer (`placement::leader_handover`). Returns the
    /// move made.
    pub async fn balance_leaders_once(&self) -> Result<Option<(ShardId, u64)>, ApiError> {
        let mut nodes = BTreeSet::new();
        let mut led = 0usize;
        for shard in 0..self.n_shards {
            let raft = self.raft(shard)?;
            let m = raft.metrics().borrow().clone();
            nodes.extend(m.membership_config.membership().nodes().map(|(id, _)| *id));
            if m.current_leader == Some(self.node_id) && self.staleness_ms(shard).is_some() {
                led += 1;
            }
        }
        // Whenever leaderships are uneven by two or more, the node leading the most leads more
        // than the floor of an even share: only such nodes look further.
        if nodes.is_empty() || led <= usize::from(self.n_shards) / nodes.len() {
            return Ok(None);
        }
        let view = self.cluster_view().await?;
        let shards: Vec<ShardLeadership> = (0..self.n_shards)
            .map(|shard| {
                let (leader, voters) = match view.shards.get(&shard) {
                    Some((_, leader, voters)) => (Some(*leader), voters.clone()),
                    None => (None, Vec::new()),
                };
                let fresh = view.fresh.get(&shard);
                // Shards of more than 3 voters cost a longer handover (see transfer.rs), but
                // are balanced too.
                let eligible =
                    voters.into_iter().filter(|id| fresh.is_some_and(|f| f.contains(id))).collect();
                ShardLeadership { shard, leader, eligible }
            })
            .collect();
        let Some((shard, to)) = placement::leader_handover(&view.nodes, &shards, self.node_id) else {
            return Ok(None);
        };
        tracing::info!(shard, from = self.node_id, to, led, "handing leadership over to balance leaders");
        let took_ms = self.hand_over(shard, to).await?;
        tracing::info!(shard, to, took_ms, "leadership handed over");
        Ok(Some((shard, to)))
    }

    /// What `NodeStatus` reports about this node.
    pub async fn local_status(&self) -> Result<pb::NodeStatusResponse, ApiError> {
        let mut shards = Vec::with_capacity(usize::from(self.n_shards));
        let mut live = 0u64;
        let mut nodes = std::collections::BTreeMap::new();
        for shard in 0..self.n_shards {
            let s = self.shard_status(shard).await?;
            let m = self.raft(shard)?.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            for (id, node) in membership.nodes() {
                nodes.insert(*id, node.clone());
            }
            let voters: Vec<u64> = membership.voter_ids().collect();
            let learners: Vec<u64> = membership.learner_ids().collect();
            let last = m.last_log_index.unwrap_or(0);
            let replication = m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, matched)| {
                            let matched_index = matched.map_or(0, |l| l.index);
                            pb::ReplicaProgress {
                                node_id: *id,
                                matched_index,
                                lag: last.saturating_sub(matched_index),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let staleness = self.staleness_ms(shard);
            live += s.live_user_actors as u64;
            shards.push(pb::ShardStatus {
                shard: u32::from(s.shard),
                leader: s.leader.unwrap_or(0),
                role: s.role,
                term: s.term,
                last_log_index: s.last_log_index,
                applied_index: s.applied_index,
                snapshot_index: s.snapshot_index,
                live_user_actors: s.live_user_actors as u64,
                voters,
                fresh: staleness.is_some(),
                staleness_ms: staleness.unwrap_or(0),
                replication,
                learners,
            });
        }
        Ok(pb::NodeStatusResponse {
            node_id: self.node_id,
            region: self.region.clone(),
            n_shards: u32::from(self.n_shards),
            shards,
            live_user_actors: live,
            nodes: nodes
                .into_iter()
                .map(|(node_id, n)| pb::ClusterNode { node_id, addr: n.addr, region: n.region })
                .collect(),
            addr: self.addr.clone(),
            revocation_bound_ms: self.host.freshness.bound_ms,
            fault_injection: self.fault_injection,
            incarnation: self.incarnation,
        })
    }

    /// Every node's status, merged: the node list, and each shard's voters as its leader sees them.
    async fn cluster_view(&self) -> Result<View, ApiError> {
        let mut nodes = Nodes::new();
        for shard in 0..self.n_shards {
            let raft = self.raft(shard)?;
            for (id, node) in raft.metrics().borrow().membership_config.membership().nodes() {
                nodes.insert(*id, node.clone());
            }
        }
        let mut view = View { nodes: nodes.clone(), shards: BTreeMap::new(), fresh: BTreeMap::new() };
        for (id, node) in &nodes {
            let status = match self.node_status_of(*id, node).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(node = id, error = %e, "node status unavailable");
                    continue;
                }
            };
            for n in status.nodes {
                view.nodes.entry(n.node_id).or_insert(CascadeNode { addr: n.addr, region: n.region });
            }
            for s in status.shards.iter().filter(|s| s.fresh) {
                let Ok(shard) = ShardId::try_from(s.shard) else { continue };
                view.fresh.entry(shard).or_default().insert(*id);
            }
            for s in status.shards.iter().filter(|s| s.leader == *id && s.role == "Leader") {
                let Ok(shard) = ShardId::try_from(s.shard) else { continue };
                let newer = view.shards.get(&shard).is_none_or(|(term, _, _)| s.term > *term);
                if newer {
                    view.shards.insert(shard, (s.term, s.leader, s.voters.clone()));
                }
            }
        }
        Ok(view)
    }

    async fn node_status_of(&self, id: u64, node: &CascadeNode) -> Result<pb::NodeStatusResponse, String> {
        if id == self.node_id {
            // Answer from the local replicas without a network hop.
            return self.local_status().await.map_err(|e| e.to_string());
        }
        let channel = self.host.peers.channel(&node.addr).map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(pb::NodeStatusRequest {});
        request.set_timeout(CHECK_TIMEOUT);
        CascadeClient::new(channel)
            .node_status(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_owned())
    }

    /// Ask the shard's leader to make `voters` its voters, following leadership changes.
    async fn change_voters(
        &self,
        shard: ShardId,
        voters: &BTreeMap<u64, CascadeNode>,
    ) -> Result<(), ApiError> {
        let request = ChangeVotersRequest {
            shard: u32::from(shard),
            voters: voters
                .iter()
                .map(|(id, n)| VoterNode { node_id: *id, addr: n.addr.clone(), region: n.region.clone() })
                .collect(),
        };
        let mut last = String::from("no leader known");
        for _ in 0..CHANGE_ATTEMPTS_MAX {
            let leader = self.leader_addr(shard).await;
            if let Some(addr) = leader {
                match self.host.peers.channel(&addr) {
                    Ok(channel) => {
                        let mut req = tonic::Request::new(request.clone());
                        req.set_timeout(CATCH_UP_TIMEOUT + Duration::from_secs(10));
                        match RaftTransportClient::new(channel).change_voters(req).await {
                            Ok(_) => return Ok(()),
                            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                                last = s.message().to_owned()
                            }
                            Err(s) => {
                                return Err(ApiError::Membership(format!("shard {shard}: {}", s.message())))
                            }
                        }
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(CHANGE_RETRY_PAUSE).await;
        }
        Err(ApiError::Membership(format!("shard {shard}: could not reach its leader: {last}")))
    }

    /// The leader of `shard` as this node or, if it holds no replica, as the cluster reports.
    async fn leader_addr(&self, shard: ShardId) -> Option<String> {
        if let Some((_, node)) = self.raft(shard).ok().as_ref().and_then(cascade_raft::routing::leader_of) {
            return Some(node.addr);
        }
        let view = self.cluster_view().await.ok()?;
        let (_, leader, _) = view.shards.get(&shard)?;
        view.nodes.get(leader).map(|n| n.addr.clone())
    }
}
