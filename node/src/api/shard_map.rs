//! Where the leaders of the shards this node holds no replica of are. A cluster with more nodes
//! than replicas per shard has such shards on every node; the node's own Raft instance of one
//! knows no leader, so it asks its peers (`NodeStatus`, concurrently, each with a deadline) and
//! keeps the answer for `SHARD_MAP_TTL`. A forward that finds the entry wrong drops it.

use cascade_protocol::ids::ShardId;
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use cascade_raft::network::Peers;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long a leader learned from peers is used before they are asked again.
pub const SHARD_MAP_TTL: Duration = Duration::from_secs(1);
/// Deadline of one peer's `NodeStatus` while looking for a leader.
pub const SHARD_MAP_ASK_TIMEOUT: Duration = Duration::from_millis(500);
/// Peers asked at most per lookup (a bound far above any real cluster).
pub const SHARD_MAP_PEERS_MAX: usize = 64;

/// A shard's leader: node id and address.
pub type Leader = (u64, String);

#[derive(Default)]
pub struct ShardMap {
    entries: Mutex<BTreeMap<ShardId, (Leader, Instant)>>,
}

impl ShardMap {
    /// The leader of `shard`, from the cache or from `peers` (node id → address). `None` when
    /// no peer claims to lead it.
    pub async fn leader(
        &self,
        shard: ShardId,
        peers: &Peers,
        nodes: &BTreeMap<u64, String>,
    ) -> Option<Leader> {
        let now = Instant::now();
        if let Some((leader, at)) = self.lock().get(&shard) {
            if now.duration_since(*at) < SHARD_MAP_TTL {
                return Some(leader.clone());
            }
        }
        let asked = nodes.iter().take(SHARD_MAP_PEERS_MAX).map(|(&id, addr)| ask(peers, id, addr.clone()));
        let answers = futures::future::join_all(asked).await;
        // Every shard any peer leads, by the highest term claimed (an isolated old leader may
        // still claim an older term).
        let mut best: BTreeMap<u32, (u64, Leader)> = BTreeMap::new();
        for status in answers.into_iter().flatten() {
            for s in status
                .shards
                .iter()
                .filter(|s| s.role.eq_ignore_ascii_case("leader") && s.leader == status.node_id)
            {
                let claim = (s.term, (status.node_id, status.addr.clone()));
                if best.get(&s.shard).is_none_or(|(t, _)| s.term > *t) {
                    best.insert(s.shard, claim);
                }
            }
        }
        let mut entries = self.lock();
        for (s, (_, leader)) in &best {
            if let Ok(s) = ShardId::try_from(*s) {
                entries.insert(s, (leader.clone(), now));
            }
        }
        best.remove(&u32::from(shard)).map(|(_, leader)| leader)
    }

    /// Drops what is known about `shard` (its leader moved or did not answer).
    pub fn forget(&self, shard: ShardId) {
        self.lock().remove(&shard);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, (Leader, Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn ask(peers: &Peers, id: u64, addr: String) -> Option<pb::NodeStatusResponse> {
    let channel = peers.channel(&addr).ok()?;
    let mut request = tonic::Request::new(pb::NodeStatusRequest {});
    request.set_timeout(SHARD_MAP_ASK_TIMEOUT);
    let mut client = CascadeClient::new(channel);
    let status = tokio::time::timeout(SHARD_MAP_ASK_TIMEOUT, client.node_status(request))
        .await
        .ok()?
        .ok()?
        .into_inner();
    (status.node_id == id).then_some(status)
}
