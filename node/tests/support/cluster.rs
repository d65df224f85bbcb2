//! An in-process cluster on loopback: several nodes in one test process, each with its own
//! listener, data dir and peer connector (so a test can cut its links), started and stopped
//! one by one. Nodes share the test's runtime; each has a distinct node id (ractor's registry is
//! process-wide).

use super::{connect, free_loopback_addr, poll_until, test_config, Client, READY_DEADLINE, STATE_DEADLINE};
use cascade_node::config::{ClusterNode, NodeConfig};
use cascade_node::seams::Seams;
use cascade_protocol::ids::UserKey;
use cascade_protocol::pb;
use cascade_raft::network::Peers;
use std::net::SocketAddr;

/// One member of a [`TestCluster`].
pub struct Member {
    pub id: u64,
    pub addr: SocketAddr,
    pub region: String,
    pub config: NodeConfig,
    pub peers: Peers,
    pub dir: tempfile::TempDir,
    running: Option<Running>,
}

struct Running {
    shutdown: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Member {
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Start (or restart, on the same data dir and port) this node.
    pub async fn start(&mut self) {
        assert!(self.running.is_none(), "node {} already running", self.id);
        let listener = poll_until(&format!("port {} free again", self.addr), STATE_DEADLINE, || async {
            tokio::net::TcpListener::bind(self.addr).await.ok()
        })
        .await;
        let mut seams = Seams::production(listener, &self.config.data_dir, self.config.node_id);
        seams.peers = self.peers.clone();
        if let Some(http) = self.config.http_listen {
            let listener = poll_until(&format!("HTTP port {http} free again"), STATE_DEADLINE, || async {
                tokio::net::TcpListener::bind(http).await.ok()
            })
            .await;
            seams.http_listener = Some(listener);
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = self.config.clone();
        let task = tokio::spawn(async move {
            cascade_node::run(config, seams, async move {
                let _ = rx.await;
            })
            .await
        });
        self.running = Some(Running { shutdown: tx, task });
    }

    /// Graceful stop, waiting for `run` to return.
    pub async fn stop(&mut self) {
        let Some(running) = self.running.take() else { return };
        let _ = running.shutdown.send(());
        let joined = tokio::time::timeout(STATE_DEADLINE, running.task)
            .await
            .unwrap_or_else(|_| panic!("node {} did not stop within {STATE_DEADLINE:?}", self.id));
        joined.expect("node task panicked").expect("node run returned an error");
    }

    pub async fn client(&self) -> Client {
        connect(self.addr).await
    }

    pub async fn status(&self) -> pb::NodeStatusResponse {
        self.client().await.node_status(pb::NodeStatusRequest {}).await.expect("node status").into_inner()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.shutdown.send(());
            running.task.abort();
        }
    }
}

/// Nodes of one cluster, by position (node `i` has region `REGIONS[i % 3]`).
pub struct TestCluster {
    pub members: Vec<Member>,
    pub n_shards: u16,
}

pub const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

impl TestCluster {
    /// Start `n` nodes forming a new cluster of `n_shards` shards, and wait until every shard has a
    /// leader and a fresh replica on every node.
    pub async fn start(n: usize, n_shards: u16) -> TestCluster {
        Self::start_with(n, n_shards, |_| {}).await
    }

    /// As [`TestCluster::start`], with `tweak` applied to every node's configuration.
    pub async fn start_with(n: usize, n_shards: u16, tweak: impl Fn(&mut NodeConfig)) -> TestCluster {
        let mut members: Vec<Member> = (0..n).map(|i| Self::member(i, n_shards)).collect();
        for m in &mut members {
            tweak(&mut m.config);
        }
        let nodes: Vec<ClusterNode> = members
            .iter()
            .map(|m| ClusterNode { id: m.id, addr: m.addr.to_string(), region: m.region.clone() })
            .collect();
        for m in &mut members {
            m.config.cluster.nodes = nodes.clone();
        }
        for m in &mut members {
            m.start().await;
        }
        let cluster = TestCluster { members, n_shards };
        cluster.wait_ready().await;
        cluster
    }

    /// A member not started yet, with a fresh data dir and address; region by position.
    pub fn member(position: usize, n_shards: u16) -> Member {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = free_loopback_addr();
        let region = REGIONS[position % REGIONS.len()].to_owned();
        let mut config = test_config(dir.path());
        config.listen = addr;
        config.shards = n_shards;
        config.region = region.clone();
        Member { id: config.node_id, addr, region, config, peers: Peers::default(), dir, running: None }
    }

    /// Wait until every running node reports a leader and a fresh replica for every shard it
    /// holds.
    pub async fn wait_ready(&self) {
        for m in self.members.iter().filter(|m| m.is_running()) {
            let client = m.client().await;
            let n = self.n_shards;
            poll_until(&format!("node {} ready", m.id), READY_DEADLINE, || {
                let mut client = client.clone();
                async move {
                    let s = client.node_status(pb::NodeStatusRequest {}).await.ok()?.into_inner();
                    let ok = s.shards.len() == usize::from(n)
                        && s.shards
                            .iter()
                            .all(|sh| !sh.voters.contains(&s.node_id) || (sh.leader != 0 && sh.fresh));
                    ok.then_some(())
                }
            })
            .await;
        }
    }

    pub fn by_id(&mut self, id: u64) -> &mut Member {
        self.members.iter_mut().find(|m| m.id == id).expect("member with that id")
    }

    /// The leader of `shard` as the first running node reports it.
    pub async fn leader_of(&self, shard: u16) -> u64 {
        let m = self.members.iter().find(|m| m.is_running()).expect("a running node");
        let client = m.client().await;
        poll_until(&format!("a leader for shard {shard}"), READY_DEADLINE, || {
            let mut client = client.clone();
            async move {
                let s = client.node_status(pb::NodeStatusRequest {}).await.ok()?.into_inner();
                let leader = s.shards.get(usize::from(shard))?.leader;
                (leader != 0).then_some(leader)
            }
        })
        .await
    }

    /// Cut every link between `id` and the other nodes, both ways.
    pub fn isolate(&self, id: u64) {
        let me = self.members.iter().find(|m| m.id == id).expect("member");
        for other in self.members.iter().filter(|m| m.id != id) {
            me.peers.cut(&other.addr.to_string());
            other.peers.cut(&me.addr.to_string());
        }
    }

    pub fn heal(&self) {
        for m in &self.members {
            m.peers.heal();
        }
    }
}

/// A user id of `tenant` whose sessions live on `shard`.
pub fn user_on_shard(tenant: &str, prefix: &str, shard: u16, n_shards: u16) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|u| UserKey::new(tenant, u).shard(n_shards) == shard)
        .expect("some user id hashes to every shard")
}
