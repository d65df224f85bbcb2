//! Replica and leader placement: which nodes hold each shard, and which of them should lead it.
//! Pure functions of the node list (ids, regions) so every node computes the same answer.
//!
//! Rules, in order: a shard's replicas are in distinct regions where enough regions exist; the
//! replicas of all shards are spread evenly over nodes; preferred leaders are spread evenly over
//! nodes and regions. Rebalancing keeps every replica it can, so adding or removing one node moves
//! as few replicas as possible.

use crate::typ::{CascadeNode, NodeId};
use cascade_protocol::ids::ShardId;
use std::collections::{BTreeMap, BTreeSet};

/// Replicas per shard when enough nodes exist.
pub const REPLICAS_DEFAULT: usize = 3;

/// The nodes of a cluster, by id.
pub type Nodes = BTreeMap<NodeId, CascadeNode>;

/// Where one shard lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlacement {
    pub shard: ShardId,
    /// Voting replicas, preferred leader first.
    pub replicas: Vec<NodeId>,
}

impl ShardPlacement {
    pub fn preferred_leader(&self) -> Option<NodeId> {
        self.replicas.first().copied()
    }

    /// The membership to hand to openraft: every replica with its address and region.
    pub fn members(&self, nodes: &Nodes) -> BTreeMap<NodeId, CascadeNode> {
        self.replicas.iter().filter_map(|id| nodes.get(id).map(|n| (*id, n.clone()))).collect()
    }
}

/// Placement of every shard on a fresh cluster.
pub fn initial(n_shards: u16, nodes: &Nodes, n_replicas: usize) -> Vec<ShardPlacement> {
    let mut load = Load::default();
    (0..n_shards)
        .map(|shard| {
            let replicas = choose(&[], nodes, n_replicas, &mut load);
            ShardPlacement { shard, replicas: load.order_leader_first(replicas, nodes) }
        })
        .collect()
}

/// New replica sets for shards currently on `current`, given the nodes that now exist: keeps
/// every replica still on a node of `nodes` (dropping extras from crowded regions first) and adds
/// replicas on the least loaded nodes of regions the shard is missing.
pub fn rebalance(current: &[ShardPlacement], nodes: &Nodes, n_replicas: usize) -> Vec<ShardPlacement> {
    let mut load = Load::default();
    for p in current {
        for id in p.replicas.iter().filter(|id| nodes.contains_key(id)) {
            *load.replicas.entry(*id).or_default() += 1;
        }
    }
    current
        .iter()
        .map(|p| {
            for id in p.replicas.iter().filter(|id| nodes.contains_key(id)) {
                if let Some(n) = load.replicas.get_mut(id) {
                    *n = n.saturating_sub(1);
                }
            }
            let mut replicas = choose(&p.replicas, nodes, n_replicas, &mut load);
            level(&mut replicas, nodes, &mut load);
            ShardPlacement { shard: p.shard, replicas: load.order_leader_first(replicas, nodes) }
        })
        .collect()
}

/// Even out load: move a replica to a node holding at least two fewer replicas, in the same
/// region or in a region the shard does not use yet (so region diversity never drops). This is
/// what gives a newly added node its share.
fn level(replicas: &mut [NodeId], nodes: &Nodes, load: &mut Load) {
    let region = |id: &NodeId| nodes.get(id).map(|n| n.region.clone()).unwrap_or_default();
    for i in 0..replicas.len() {
        let from = replicas[i];
        let from_load = load.replicas.get(&from).copied().unwrap_or(0);
        let others: BTreeSet<String> = replicas.iter().filter(|id| **id != from).map(&region).collect();
        let to = nodes
            .keys()
            .filter(|id| {
                !replicas.contains(id) && (region(id) == region(&from) || !others.contains(&region(id)))
            })
            .min_by_key(|id| (load.replicas.get(id).copied().unwrap_or(0), **id))
            .copied();
        if let Some(to) = to {
            if load.replicas.get(&to).copied().unwrap_or(0) + 1 < from_load {
                replicas[i] = to;
                *load.replicas.entry(from).or_default() -= 1;
                *load.replicas.entry(to).or_default() += 1;
            }
        }
    }
}

/// Who leads one shard now, and which of its voters could take over (reachable and caught up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLeadership {
    pub shard: ShardId,
    pub leader: Option<NodeId>,
    pub eligible: Vec<NodeId>,
}

/// One step toward leaderships spread evenly over nodes (after failovers leave them piled up):
/// the shard `me` should hand over and to which voter, or `None`. `me` hands over only to an
/// eligible voter leading at least two shards fewer than it does, so each step narrows the
/// spread and two nodes never hand a shard back and forth. Among candidates: the fewest
/// leaderships on the node, then in its region, then the lowest shard and node ids.
pub fn leader_handover(nodes: &Nodes, shards: &[ShardLeadership], me: NodeId) -> Option<(ShardId, NodeId)> {
    let region = |id: &NodeId| nodes.get(id).map(|n| n.region.as_str()).unwrap_or_default();
    let mut led: BTreeMap<NodeId, usize> = nodes.keys().map(|id| (*id, 0)).collect();
    let mut region_led: BTreeMap<&str, usize> = BTreeMap::new();
    for leader in shards.iter().filter_map(|s| s.leader) {
        *led.entry(leader).or_default() += 1;
        *region_led.entry(region(&leader)).or_default() += 1;
    }
    let mine = led.get(&me).copied().unwrap_or(0);
    shards
        .iter()
        .filter(|s| s.leader == Some(me))
        .flat_map(|s| s.eligible.iter().map(move |to| (s.shard, *to)))
        .filter(|(_, to)| *to != me && nodes.contains_key(to))
        .filter(|(_, to)| led.get(to).copied().unwrap_or(0) + 2 <= mine)
        .min_by_key(|(shard, to)| {
            (led.get(to).copied().unwrap_or(0), region_led.get(region(to)).copied().unwrap_or(0), *shard, *to)
        })
}

/// How many replicas and preferred leaderships each node has been given so far.
#[derive(Default)]
struct Load {
    replicas: BTreeMap<NodeId, usize>,
    leaders: BTreeMap<NodeId, usize>,
    region_leaders: BTreeMap<String, usize>,
}

impl Load {
    /// Put the replica that should lead first: the fewest leaderships in its region, then on
    /// its node, then the smallest id.
    fn order_leader_first(&mut self, mut replicas: Vec<NodeId>, nodes: &Nodes) -> Vec<NodeId> {
        let region = |id: &NodeId| nodes.get(id).map(|n| n.region.clone()).unwrap_or_default();
        let best = replicas
            .iter()
            .enumerate()
            .min_by_key(|(_, id)| {
                (
                    self.region_leaders.get(&region(id)).copied().unwrap_or(0),
                    self.leaders.get(id).copied().unwrap_or(0),
                    **id,
                )
            })
            .map(|(i, _)| i);
        if let Some(i) = best {
            let leader = replicas.remove(i);
            *self.leaders.entry(leader).or_default() += 1;
            *self.region_leaders.entry(region(&leader)).or_default() += 1;
            replicas.insert(0, leader);
        }
        replicas
    }
}

fn choose(current: &[NodeId], nodes: &Nodes, n_replicas: usize, load: &mut Load) -> Vec<NodeId> {
    let region = |id: &NodeId| nodes.get(id).map(|n| n.region.as_str()).unwrap_or("");
    let mut kept: Vec<NodeId> = Vec::new();
    for id in current.iter().filter(|id| nodes.contains_key(id)) {
        if !kept.contains(id) {
            kept.push(*id);
        }
    }
    // Too many (or crowded regions): drop replicas sharing a region first, the most loaded first.
    while kept.len() > n_replicas {
        let crowded = |id: &NodeId| kept.iter().filter(|k| region(k) == region(id)).count();
        let drop = kept
            .iter()
            .enumerate()
            .max_by_key(|(_, id)| (crowded(id), load.replicas.get(id).copied().unwrap_or(0), **id))
            .map(|(i, _)| i);
        if let Some(i) = drop {
            kept.remove(i);
        }
    }
    while kept.len() < n_replicas {
        let used: BTreeSet<&str> = kept.iter().map(&region).collect();
        let next = nodes
            .keys()
            .filter(|id| !kept.contains(id))
            .min_by_key(|id| (used.contains(region(id)), load.replicas.get(id).copied().unwrap_or(0), **id));
        let Some(next) = next.copied() else { break };
        kept.push(next);
    }
    // A region represented twice while another region with a free node is unused: swap.
    for i in 0..kept.len() {
        let dup = kept.iter().filter(|k| region(k) == region(&kept[i])).count() > 1;
        if !dup {
            continue;
        }
        let used: BTreeSet<&str> = kept.iter().map(&region).collect();
        let better = nodes
            .keys()
            .filter(|id| !kept.contains(id) && !used.contains(region(id)))
            .min_by_key(|id| (load.replicas.get(id).copied().unwrap_or(0), **id))
            .copied();
        if let Some(better) = better {
            kept[i] = better;
        }
    }
    for id in &kept {
        *load.replicas.entry(*id).or_default() += 1;
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(spec: &[(NodeId, &str)]) -> Nodes {
        spec.iter()
            .map(|(id, region)| {
                (*id, CascadeNode { addr: format!("127.0.0.1:{}", 7400 + id), region: (*region).to_owned() })
            })
            .collect()
    }

    fn regions(p: &ShardPlacement, nodes: &Nodes) -> BTreeSet<String> {
        p.replicas.iter().map(|id| nodes[id].region.clone()).collect()
    }

    /// Three nodes in three regions: every shard on all three, one per region; leaders 22/21/21.
    #[test]
    fn three_regions_spread_replicas_and_leaders() {
        let n = nodes(&[(1, "eu"), (2, "us"), (3, "ap")]);
        let placement = initial(64, &n, 3);
        let mut leaders = BTreeMap::<NodeId, usize>::new();
        for p in &placement {
            assert_eq!(regions(p, &n).len(), 3, "{p:?}");
            *leaders.entry(p.preferred_leader().expect("leader")).or_default() += 1;
        }
        let (min, max) = (leaders.values().min().copied(), leaders.values().max().copied());
        assert!(max.unwrap_or(0) - min.unwrap_or(0) <= 1, "{leaders:?}");
    }

    /// Six nodes in three regions: replicas and leaders balanced over nodes, regions distinct.
    #[test]
    fn six_nodes_balance() {
        let n = nodes(&[(1, "eu"), (2, "eu"), (3, "us"), (4, "us"), (5, "ap"), (6, "ap")]);
        let placement = initial(64, &n, 3);
        let mut replicas = BTreeMap::<NodeId, usize>::new();
        let mut leaders = BTreeMap::<NodeId, usize>::new();
        for p in &placement {
            assert_eq!(regions(p, &n).len(), 3, "{p:?}");
            for id in &p.replicas {
                *replicas.entry(*id).or_default() += 1;
            }
            *leaders.entry(p.replicas[0]).or_default() += 1;
        }
        assert_eq!(replicas.len(), 6);
        assert!(replicas.values().all(|c| (31..=33).contains(c)), "{replicas:?}");
        assert!(leaders.values().all(|c| (10..=11).contains(c)), "{leaders:?}");
    }

    /// A node in a new region takes a share of the replicas; every shard keeps 3 regions.
    #[test]
    fn node_in_new_region_takes_a_share() {
        let three = nodes(&[(1, "eu"), (2, "us"), (3, "ap")]);
        let before = initial(30, &three, 3);
        let four = nodes(&[(1, "eu"), (2, "us"), (3, "ap"), (4, "sa")]);
        let after = rebalance(&before, &four, 3);
        let on = |id: NodeId| after.iter().filter(|p| p.replicas.contains(&id)).count();
        assert!((21..=24).contains(&on(4)), "node 4 holds {}", on(4));
        for p in &after {
            assert_eq!(regions(p, &four).len(), 3, "{p:?}");
        }
    }

    /// Fewer regions than replicas: still three replicas, on distinct nodes.
    #[test]
    fn two_regions_still_three_replicas() {
        let n = nodes(&[(1, "eu"), (2, "eu"), (3, "us")]);
        for p in initial(8, &n, 3) {
            let distinct: BTreeSet<_> = p.replicas.iter().collect();
            assert_eq!(distinct.len(), 3);
            assert_eq!(regions(&p, &n).len(), 2);
        }
    }

    /// One node: a single replica per shard.
    #[test]
    fn single_node() {
        let n = nodes(&[(1, "local")]);
        for p in initial(4, &n, 3) {
            assert_eq!(p.replicas, vec![1]);
        }
    }

    /// Adding a node in a new region moves few replicas; removing one replaces only its replicas
    /// and keeps regions distinct.
    #[test]
    fn rebalance_moves_little() {
        let three = nodes(&[(1, "eu"), (2, "us"), (3, "ap")]);
        let before = initial(32, &three, 3);
        // Node 3 leaves, node 4 (same region) replaces it.
        let replaced = nodes(&[(1, "eu"), (2, "us"), (4, "ap")]);
        let after = rebalance(&before, &replaced, 3);
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(regions(a, &replaced).len(), 3, "{a:?}");
            let kept = a.replicas.iter().filter(|id| b.replicas.contains(id)).count();
            assert_eq!(kept, 2, "only node 3's replica moves: {b:?} -> {a:?}");
            assert!(a.replicas.contains(&4));
        }
        // A fourth node in an existing region takes half of that region's replicas, and only
        // replicas of that region move.
        let four = nodes(&[(1, "eu"), (2, "us"), (3, "ap"), (4, "ap")]);
        let after = rebalance(&before, &four, 3);
        let on = |id: NodeId| after.iter().filter(|p| p.replicas.contains(&id)).count();
        assert_eq!((on(3), on(4)), (16, 16));
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(regions(a, &four).len(), 3, "{a:?}");
            assert!(a.replicas.contains(&1) && a.replicas.contains(&2), "{b:?} -> {a:?}");
        }
    }

    fn leadership(shard: ShardId, leader: NodeId, eligible: &[NodeId]) -> ShardLeadership {
        ShardLeadership { shard, leader: Some(leader), eligible: eligible.to_vec() }
    }

    /// After failovers one node leads everything: it hands shards to the least loaded eligible
    /// voters one step at a time until no node leads two more than another, then stops.
    #[test]
    fn leaderships_piled_on_one_node_spread_out_and_settle() {
        let three = nodes(&[(1, "a"), (2, "b"), (3, "c")]);
        let mut shards: Vec<ShardLeadership> = (0..6).map(|s| leadership(s, 1, &[1, 2, 3])).collect();
        let mut steps = 0;
        loop {
            let moved = (1..=3).find_map(|me| leader_handover(&three, &shards, me));
            let Some((shard, to)) = moved else { break };
            shards[usize::from(shard)].leader = Some(to);
            steps += 1;
            assert!(steps <= 6, "no convergence: {shards:?}");
        }
        let mut led = BTreeMap::new();
        for s in &shards {
            *led.entry(s.leader.expect("leader")).or_insert(0) += 1;
        }
        assert_eq!(led.values().copied().collect::<Vec<_>>(), vec![2, 2, 2], "{shards:?}");
        assert_eq!(steps, 4);
    }

    #[test]
    fn handover_only_to_eligible_voters_with_two_fewer() {
        let three = nodes(&[(1, "a"), (2, "b"), (3, "c")]);
        // 2, 1, 0 leaderships: node 1 hands to node 3, not to node 2 (only one fewer).
        let shards =
            vec![leadership(0, 1, &[1, 2, 3]), leadership(1, 1, &[1, 2, 3]), leadership(2, 2, &[1, 2, 3])];
        assert_eq!(leader_handover(&three, &shards, 1), Some((0, 3)));
        assert_eq!(leader_handover(&three, &shards, 2), None);
        // Node 3 unreachable or behind: not eligible, nothing moves.
        let behind = vec![leadership(0, 1, &[1, 2]), leadership(1, 1, &[1, 2]), leadership(2, 2, &[1, 2, 3])];
        assert_eq!(leader_handover(&three, &behind, 1), None);
        // 2, 1, 1: balanced enough.
        let even = vec![
            leadership(0, 1, &[1, 2, 3]),
            leadership(1, 1, &[1, 2, 3]),
            leadership(2, 2, &[1, 2, 3]),
            leadership(3, 3, &[1, 2, 3]),
        ];
        assert!((1..=3).all(|me| leader_handover(&three, &even, me).is_none()));
        // A shard without a leader counts for nobody.
        let leaderless = vec![ShardLeadership { shard: 0, leader: None, eligible: vec![1, 2, 3] }];
        assert!((1..=3).all(|me| leader_handover(&three, &leaderless, me).is_none()));
    }

    /// Ties go to the region with fewer leaderships.
    #[test]
    fn handover_prefers_the_region_with_fewer_leaderships() {
        let four = nodes(&[(1, "a"), (2, "b"), (3, "b"), (4, "c")]);
        let shards = vec![
            leadership(0, 1, &[1, 2, 4]),
            leadership(1, 1, &[1, 2, 4]),
            leadership(2, 1, &[1, 2, 4]),
            leadership(3, 3, &[1, 3, 4]),
        ];
        assert_eq!(leader_handover(&four, &shards, 1), Some((0, 4)));
    }
}
