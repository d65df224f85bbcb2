//! The cluster as the SDK sees it: nodes, which of them hold a replica of each shard, and who
//! leads it. Learned from `NodeStatus` of the seeds (and, with discovery, of every node they
//! name), each asked concurrently with a deadline.

use crate::config::ClientConfig;
use crate::error::Error;
use cascade_protocol::ids::ShardId;
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use std::collections::{BTreeMap, BTreeSet};
use tonic::transport::Channel;

/// Nodes asked at most while learning the cluster (far above any real cluster).
pub const DISCOVERY_NODES_MAX: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Where this client reaches the node (its advertised address, or the seed address when
    /// discovery is off).
    pub addr: String,
    pub region: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardInfo {
    /// Nodes holding a voting replica that this client can reach by address.
    pub replicas: Vec<u64>,
    /// The node that claims leadership with the highest term, if any.
    pub leader: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub n_shards: u16,
    /// The cluster's revocation bound (P2), in milliseconds.
    pub revocation_bound_ms: u64,
    pub nodes: BTreeMap<u64, NodeInfo>,
    /// Indexed by shard.
    pub shards: Vec<ShardInfo>,
}

impl Topology {
    /// Nodes to try for a read of `shard`, best first: replicas in `region`, the leader, the
    /// other replicas, then every other node (any node forwards).
    pub fn candidates(&self, shard: ShardId, region: Option<&str>) -> Vec<u64> {
        let mut order: Vec<u64> = Vec::with_capacity(self.nodes.len());
        let mut push = |id: u64| {
            if !order.contains(&id) && self.nodes.contains_key(&id) {
                order.push(id);
            }
        };
        let info = self.shards.get(usize::from(shard));
        let replicas = info.map_or(&[][..], |i| i.replicas.as_slice());
        if let Some(region) = region {
            replicas
                .iter()
                .filter(|id| self.nodes.get(id).is_some_and(|n| n.region == region))
                .for_each(|id| push(*id));
        }
        if let Some(leader) = info.and_then(|i| i.leader) {
            push(leader);
        }
        replicas.iter().for_each(|id| push(*id));
        self.nodes.keys().for_each(|id| push(*id));
        order
    }

    /// Whether `node` holds a replica of `shard`.
    pub fn holds(&self, node: u64, shard: ShardId) -> bool {
        self.shards.get(usize::from(shard)).is_some_and(|i| i.replicas.contains(&node))
    }
}

/// `host:port` is accepted for `http://host:port`.
pub fn normalize_addr(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// Learns the cluster. `channel` gives a (lazily connected) channel for an address.
pub async fn discover(
    config: &ClientConfig,
    channel: impl Fn(&str) -> Result<Channel, Error>,
) -> Result<Topology, Error> {
    let seeds: Vec<String> = config.seeds.iter().map(|s| normalize_addr(s)).collect();
    let asked = seeds.iter().map(|addr| ask(config, &channel, addr.clone()));
    let mut answers: Vec<(String, pb::NodeStatusResponse)> = Vec::new();
    let mut last_error = String::from("no seed given");
    for answer in futures::future::join_all(asked).await {
        match answer {
            Ok(a) => answers.push(a),
            Err(e) => last_error = e,
        }
    }
    if answers.is_empty() {
        return Err(Error::Unreachable { seeds: seeds.join(", "), detail: last_error });
    }
    if config.discover {
        let known: BTreeSet<u64> = answers.iter().map(|(_, s)| s.node_id).collect();
        let more: BTreeMap<u64, String> = answers
            .iter()
            .flat_map(|(_, s)| s.nodes.iter())
            .filter(|n| !known.contains(&n.node_id))
            .map(|n| (n.node_id, normalize_addr(&n.addr)))
            .take(DISCOVERY_NODES_MAX)
            .collect();
        let asked = more.into_values().map(|addr| ask(config, &channel, addr));
        answers.extend(futures::future::join_all(asked).await.into_iter().flatten());
    }
    Ok(build(config.discover, &answers))
}

async fn ask(
    config: &ClientConfig,
    channel: &impl Fn(&str) -> Result<Channel, Error>,
    addr: String,
) -> Result<(String, pb::NodeStatusResponse), String> {
    let channel = channel(&addr).map_err(|e| e.to_string())?;
    let request = config.request(pb::NodeStatusRequest {});
    match tokio::time::timeout(config.timeout, CascadeClient::new(channel).node_status(request)).await {
        Ok(Ok(status)) => Ok((addr, status.into_inner())),
        Ok(Err(status)) => Err(format!("{addr}: {:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("{addr}: no answer within {} ms", config.timeout.as_millis())),
    }
}

/// The topology from the answers (address asked, status). With discovery, every node named
/// by an answer is reachable at its advertised address; without, only the nodes that answered,
/// at the address asked.
fn build(discover: bool, answers: &[(String, pb::NodeStatusResponse)]) -> Topology {
    let n_shards = answers.iter().map(|(_, s)| s.n_shards).max().unwrap_or(0);
    let n_shards = u16::try_from(n_shards).unwrap_or(u16::MAX);
    let revocation_bound_ms = answers.iter().map(|(_, s)| s.revocation_bound_ms).max().unwrap_or(0);
    let mut nodes: BTreeMap<u64, NodeInfo> = BTreeMap::new();
    for (addr, s) in answers {
        if discover {
            for n in &s.nodes {
                let info = NodeInfo { addr: normalize_addr(&n.addr), region: n.region.clone() };
                nodes.entry(n.node_id).or_insert(info);
            }
        }
        let addr = if discover && !s.addr.is_empty() { normalize_addr(&s.addr) } else { addr.clone() };
        nodes.insert(s.node_id, NodeInfo { addr, region: s.region.clone() });
    }
    let mut shards = vec![ShardInfo::default(); usize::from(n_shards)];
    let mut terms: Vec<u64> = vec![0; usize::from(n_shards)];
    for (_, s) in answers {
        for st in &s.shards {
            let Some(info) = usize::try_from(st.shard).ok().and_then(|i| shards.get_mut(i)) else { continue };
            let voters: Vec<u64> = if discover { st.voters.clone() } else { vec![s.node_id] };
            for v in voters {
                if nodes.contains_key(&v) && !info.replicas.contains(&v) {
                    info.replicas.push(v);
                }
            }
            let leads = st.role.eq_ignore_ascii_case("leader") && st.leader == s.node_id;
            let term = &mut terms[st.shard as usize];
            if leads && st.term >= *term && nodes.contains_key(&s.node_id) {
                *term = st.term;
                info.leader = Some(s.node_id);
            }
        }
    }
    for info in &mut shards {
        info.replicas.sort_unstable();
    }
    Topology { n_shards, revocation_bound_ms, nodes, shards }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: u64, region: &str, shards: &[(u32, &str, u64)]) -> pb::NodeStatusResponse {
        pb::NodeStatusResponse {
            node_id: id,
            region: region.into(),
            n_shards: 2,
            addr: format!("127.0.0.1:{}", 7000 + id),
            revocation_bound_ms: 500,
            nodes: (1..=3)
                .map(|n| pb::ClusterNode {
                    node_id: n,
                    addr: format!("127.0.0.1:{}", 7000 + n),
                    region: format!("r{n}"),
                })
                .collect(),
            shards: shards
                .iter()
                .map(|&(shard, role, leader)| pb::ShardStatus {
                    shard,
                    role: role.into(),
                    leader,
                    term: 1,
                    voters: vec![1, 2, 3],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn replicas_in_the_region_come_first_then_the_leader() {
        let answers = vec![
            ("http://seed".to_owned(), status(1, "r1", &[(0, "leader", 1), (1, "follower", 2)])),
            ("http://other".to_owned(), status(2, "r2", &[(0, "follower", 1), (1, "leader", 2)])),
        ];
        let t = build(true, &answers);
        assert_eq!(t.nodes.len(), 3);
        assert_eq!(t.nodes[&1].addr, "http://127.0.0.1:7001", "advertised address with discovery");
        assert_eq!(t.shards[0], ShardInfo { replicas: vec![1, 2, 3], leader: Some(1) });
        assert_eq!(t.candidates(0, Some("r3")), vec![3, 1, 2]);
        assert_eq!(t.candidates(1, None), vec![2, 1, 3]);
    }

    #[test]
    fn without_discovery_only_the_seeds_are_used_at_the_address_given() {
        let answers = vec![("http://proxy:1".to_owned(), status(2, "r2", &[(1, "leader", 2)]))];
        let t = build(false, &answers);
        assert_eq!(t.nodes.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(t.nodes[&2].addr, "http://proxy:1");
        assert!(t.holds(2, 1));
        assert!(!t.holds(2, 0), "the seed holds no replica of shard 0");
        assert_eq!(t.candidates(0, None), vec![2], "it still forwards");
    }
}
