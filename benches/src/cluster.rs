//! A local cluster for the benchmarks: 3 nodes in 3 regions on loopback, each on its own thread
//! with its own tokio runtime and temp data dir, stopped (gracefully, then the dirs removed)
//! when dropped.

use anyhow::Context;
use cascade_node::config::{ClusterNode, NodeConfig};
use cascade_node::seams::Seams;
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

pub const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
/// How long the cluster may take to elect a leader for every shard.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long a node may take to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

struct Node {
    config: NodeConfig,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Node {
    /// Runs a node with `config` on `listener`, on a thread of its own with its own runtime.
    fn spawn(config: NodeConfig, listener: std::net::TcpListener) -> anyhow::Result<Node> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let run_config = config.clone();
        let thread =
            std::thread::Builder::new().name(format!("node-{}", config.node_id)).spawn(move || {
                let rt =
                    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let seams = Seams::production(listener, &run_config.data_dir.clone(), run_config.node_id);
                    cascade_node::run(run_config, seams, async move {
                        let _ = rx.await;
                    })
                    .await
                })
            })?;
        Ok(Node { config, shutdown: Some(tx), thread: Some(thread) })
    }

    /// Signals the node to stop and waits (bounded) for its thread.
    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let Some(thread) = self.thread.take() else { return };
        let deadline = Instant::now() + STOP_DEADLINE;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if thread.is_finished() {
            if let Ok(Err(e)) = thread.join() {
                eprintln!("node {} stopped with an error: {e:#}", self.config.node_id);
            }
        } else {
            eprintln!("node {} did not stop within {STOP_DEADLINE:?}; leaving it", self.config.node_id);
        }
    }
}

pub struct BenchCluster {
    pub addrs: Vec<SocketAddr>,
    pub n_shards: u16,
    nodes: Vec<Node>,
    _dirs: Vec<tempfile::TempDir>,
}

impl BenchCluster {
    /// Starts `n` nodes with `n_shards` shards and waits until every shard has a leader and a
    /// fresh replica on every node.
    pub async fn start(n: usize, n_shards: u16) -> anyhow::Result<BenchCluster> {
        let mut listeners = Vec::new();
        for _ in 0..n {
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a loopback port")?;
            l.set_nonblocking(true)?;
            listeners.push(l);
        }
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
        let members: Vec<ClusterNode> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| ClusterNode {
                id: i as u64 + 1,
                addr: a.to_string(),
                region: REGIONS[i % 3].into(),
            })
            .collect();
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let dir = tempfile::tempdir().context("temp dir")?;
            let mut config = NodeConfig {
                node_id: i as u64 + 1,
                listen: addrs[i],
                data_dir: dir.path().to_path_buf(),
                shards: n_shards,
                region: REGIONS[i % 3].into(),
                ..NodeConfig::default()
            };
            config.cluster.nodes = members.clone();
            nodes.push(Node::spawn(config, listener)?);
            dirs.push(dir);
        }
        let cluster = BenchCluster { addrs, n_shards, nodes, _dirs: dirs };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// A client of node `i` (one HTTP/2 connection).
    pub async fn client(&self, i: usize) -> anyhow::Result<CascadeClient<Channel>> {
        connect(self.addrs[i]).await
    }

    /// Stops node `i` gracefully and starts it again on its data dir; returns how long after
    /// the start it answered VALID, itself, to checks of `ids` (valid sessions, spread over the
    /// shards).
    pub async fn restart(&mut self, i: usize, ids: &[String]) -> anyhow::Result<Duration> {
        let node = &mut self.nodes[i];
        tokio::task::block_in_place(|| node.stop());
        let addr = self.addrs[i];
        let bound = Instant::now();
        let listener = loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if bound.elapsed() < READY_DEADLINE => {
                    eprintln!("  rebinding {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("rebind {addr}")),
            }
        };
        listener.set_nonblocking(true)?;
        let started = Instant::now();
        *node = Node::spawn(node.config.clone(), listener)?;
        let node_id = node.config.node_id;
        let checks: Vec<pb::CheckSessionRequest> = ids
            .iter()
            .map(|id| pb::CheckSessionRequest { session_id: id.clone(), ..Default::default() })
            .collect();
        let mut last = String::from("no answer yet");
        loop {
            anyhow::ensure!(
                started.elapsed() < READY_DEADLINE,
                "node {node_id} not serving after {READY_DEADLINE:?}; last: {last}"
            );
            let answer = match connect(addr).await {
                Ok(mut c) => {
                    c.check_session_batch(pb::CheckSessionBatchRequest { checks: checks.clone() }).await
                }
                Err(e) => {
                    last = format!("connect: {e:#}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            match answer {
                Ok(r) => {
                    // Its own answers: not forwarded to another replica while it catches up.
                    let results = &r.get_ref().results;
                    let own_valid = |r: &&pb::CheckSessionResponse| {
                        r.status() == pb::CheckStatus::Valid
                            && r.freshness.as_ref().is_some_and(|f| f.node_id == node_id)
                    };
                    let served = results.iter().filter(own_valid).count();
                    if served == results.len() {
                        return Ok(started.elapsed());
                    }
                    last =
                        format!("{served} of {} checks VALID and answered by node {node_id}", results.len());
                }
                Err(status) => last = format!("check: {status}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Bytes of every file under the nodes' data dirs.
    pub fn data_bytes(&self) -> u64 {
        fn walk(dir: &std::path::Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    // Allocated blocks: what the files take on disk.
                    Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
                    Err(_) => 0,
                })
                .sum()
        }
        self._dirs.iter().map(|d| walk(d.path())).sum()
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        for i in 0..self.addrs.len() {
            loop {
                anyhow::ensure!(
                    started.elapsed() < READY_DEADLINE,
                    "cluster not ready after {READY_DEADLINE:?}"
                );
                if let Ok(mut c) = self.client(i).await {
                    if let Ok(s) = c.node_status(pb::NodeStatusRequest {}).await {
                        let s = s.into_inner();
                        if s.shards.len() == usize::from(self.n_shards)
                            && s.shards.iter().all(|sh| sh.leader != 0 && sh.fresh)
                        {
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

pub async fn connect(addr: SocketAddr) -> anyhow::Result<CascadeClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // A connection that stops answering is dropped and made again (see load.rs).
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .with_context(|| format!("connect to {addr}"))?;
    Ok(CascadeClient::new(channel).max_decoding_message_size(16 << 20))
}

impl Drop for BenchCluster {
    fn drop(&mut self) {
        // Signal every node first, so they stop together.
        for node in &mut self.nodes {
            if let Some(tx) = node.shutdown.take() {
                let _ = tx.send(());
            }
        }
        for node in &mut self.nodes {
            node.stop();
        }
    }
}
