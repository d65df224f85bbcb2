//! A cluster of real `cascade serve` processes on loopback, one fault proxy on every
//! inter-node link, and the process-level faults: kill -9, SIGSTOP/SIGCONT, restart with or
//! without the data dir. Every child is killed when the cluster is dropped, and dies with the
//! harness even if the harness itself is killed (`PR_SET_PDEATHSIG`).

use crate::proxy::{LinkFault, Network};
use anyhow::Context;
use cascade_node::config::{ClusterNode, NodeConfig};
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Environment variable with the `RUST_LOG` filter of the node processes (default `warn`),
/// e.g. `info,openraft=info` to see elections in `nodes/n*/node.log`.
pub const NODE_LOG_ENV: &str = "CASCADE_CHAOS_NODE_LOG";
use std::time::Duration;
use tonic::transport::Channel;

/// The regions of a chaos cluster, in the order nodes are placed in them.
pub const REGIONS: [&str; 3] = ["us", "eu", "ap"];

/// How the cluster is laid out and timed.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub shards: u16,
    /// One-way delay between two regions (`a<->b` → ms); within a region: `intra_region_ms`.
    pub latency_ms: BTreeMap<String, u64>,
    pub intra_region_ms: u64,
    pub jitter_ms: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    pub seed: u64,
    /// Start the nodes with fault injection (CutLinks, SetClockOffset) enabled.
    pub fault_injection: bool,
    /// Bugs the nodes commit on purpose (`CASCADE_PLANTED_BUGS`), to prove the checkers catch them.
    pub planted_bugs: Vec<String>,
}

impl ClusterSpec {
    /// Three regions 35-70 ms apart (one way), like a real multi-region deployment.
    pub fn three_regions(nodes: usize, shards: u16, seed: u64) -> ClusterSpec {
        let latency_ms = BTreeMap::from([
            ("us<->eu".to_owned(), 35),
            ("eu<->ap".to_owned(), 70),
            ("us<->ap".to_owned(), 55),
        ]);
        // openraft's heartbeat is also the deadline of every replication round: it must exceed
        // the worst round trip (2 × 70 ms + jitter) with room for a slow debug build. A follower
        // campaigns only after openraft's leader lease (the longest election timeout) plus an
        // election timeout: 3-4 × the shortest election timeout after the leader's last word.
        ClusterSpec {
            nodes,
            shards,
            latency_ms,
            intra_region_ms: 1,
            jitter_ms: 5,
            heartbeat_ms: 250,
            election_timeout_ms: 750,
            seed,
            fault_injection: true,
            planted_bugs: Vec::new(),
        }
    }

    pub fn region_of(&self, id: u64) -> &'static str {
        REGIONS[(id as usize - 1) % REGIONS.len()]
    }

    /// The base (fault-free) state of the link `from → to`.
    pub fn base_link(&self, from: u64, to: u64) -> LinkFault {
        let (a, b) = (self.region_of(from), self.region_of(to));
        let delay_ms = if a == b {
            self.intra_region_ms
        } else {
            self.latency_ms
                .get(&format!("{a}<->{b}"))
                .or_else(|| self.latency_ms.get(&format!("{b}<->{a}")))
                .copied()
                .unwrap_or(self.intra_region_ms)
        };
        LinkFault { delay_ms, jitter_ms: self.jitter_ms, loss_per_mille: 0, blocked: false }
    }
}

/// One node process.
pub struct NodeProc {
    pub id: u64,
    pub region: &'static str,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// Restarts so far (each appends to the same log).
    pub starts: u32,
}

impl NodeProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub net: Network,
    bin: PathBuf,
}

impl Cluster {
    /// Writes every node's config under `root` and starts the proxies and the nodes.
    pub async fn start(spec: ClusterSpec, bin: &Path, root: &Path) -> anyhow::Result<Cluster> {
        anyhow::ensure!(
            bin.is_file(),
            "no cascade binary at {} (build it: cargo build -p cascade-node)",
            bin.display()
        );
        let ids: Vec<u64> = (1..=spec.nodes as u64).collect();
        // Held until the nodes start, so the proxies (or anyone) cannot take these ports.
        let mut reserved = Vec::new();
        let mut addrs: BTreeMap<u64, SocketAddr> = BTreeMap::new();
        for &id in &ids {
            let (listener, addr) = free_port()?;
            reserved.push(listener);
            addrs.insert(id, addr);
        }
        let net = Network::start(&addrs, spec.seed).await.context("start the fault proxies")?;
        net.heal(|a, b| spec.base_link(a, b));
        let members: Vec<ClusterNode> = ids
            .iter()
            .map(|&id| ClusterNode {
                id,
                addr: addrs[&id].to_string(),
                region: spec.region_of(id).to_owned(),
            })
            .collect();
        let mut nodes = BTreeMap::new();
        for &id in &ids {
            let dir = root.join(format!("n{id}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let mut config = NodeConfig {
                node_id: id,
                listen: addrs[&id],
                data_dir: dir.join("data"),
                shards: spec.shards,
                region: spec.region_of(id).to_owned(),
                raft_heartbeat_ms: spec.heartbeat_ms,
                raft_election_timeout_ms: spec.election_timeout_ms,
                fault_injection: spec.fault_injection,
                ..NodeConfig::default()
            };
            config.cluster.nodes = members.clone();
            config.cluster.replicas = 3;
            for &peer in ids.iter().filter(|&&p| p != id) {
                config.peer_routes.insert(addrs[&peer].to_string(), net.proxies[&(id, peer)].to_string());
            }
            config.validate().context("chaos node config")?;
            let config_path = dir.join("cascade.toml");
            std::fs::write(&config_path, toml::to_string(&config).context("config to TOML")?)
                .with_context(|| format!("write {}", config_path.display()))?;
            let proc = NodeProc {
                id,
                region: spec.region_of(id),
                addr: addrs[&id],
                log_path: dir.join("node.log"),
                config_path,
                dir,
                child: None,
                starts: 0,
            };
            nodes.insert(id, proc);
        }
        let mut cluster = Cluster { spec, nodes, net, bin: bin.to_owned() };
        drop(reserved);
        for id in ids {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&self, id: u64) -> anyhow::Result<&NodeProc> {
        self.nodes.get(&id).with_context(|| format!("no node n{id}"))
    }

    /// Starts (or restarts) node `id` from its config; its data dir is whatever is on disk.
    /// Its log filter is `warn`, or the value of [`NODE_LOG_ENV`].
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        let planted = self.spec.planted_bugs.join(",");
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node n{id}"))?;
        anyhow::ensure!(node.child.is_none(), "n{id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .with_context(|| format!("open {}", node.log_path.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&node.config_path)
            .env("RUST_LOG", std::env::var(NODE_LOG_ENV).unwrap_or_else(|_| "warn".to_owned()))
            .env(cascade_core::planted::ENV, planted)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log handle")?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child when
        // the harness dies, so no node outlives a crashed or killed harness.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("spawn {} for n{id}", bin.display()))?;
        node.child = Some(child);
        node.starts += 1;
        Ok(())
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node n{id}"))?;
        if let Some(mut child) = node.child.take() {
            // A stopped process dies of SIGKILL as well.
            child.kill().with_context(|| format!("kill n{id}"))?;
            child.wait().with_context(|| format!("reap n{id}"))?;
        }
        Ok(())
    }

    /// Removes a (killed) node's data dir: it restarts empty and must rejoin by snapshot.
    pub fn wipe(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id)?;
        anyhow::ensure!(!node.running(), "n{id} must be stopped before its data dir is removed");
        let data = node.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data).with_context(|| format!("remove {}", data.display()))?;
        }
        Ok(())
    }

    /// SIGSTOP (`pause = true`) or SIGCONT.
    pub fn signal_pause(&self, id: u64, pause: bool) -> anyhow::Result<()> {
        let pid = self.node(id)?.pid().with_context(|| format!("n{id} is not running"))?;
        let signal = if pause { libc::SIGSTOP } else { libc::SIGCONT };
        let pid = libc::pid_t::try_from(pid).context("pid")?;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        anyhow::ensure!(rc == 0, "signal n{id}: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// Whether any node exited on its own (a crash, not one of ours), with its exit status.
    pub fn exited(&mut self) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for (id, node) in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    out.push((*id, status.to_string()));
                    node.child = None;
                }
            }
        }
        out
    }

    /// A public-API client of node `id` (direct, not through the proxies: the faults are
    /// between nodes).
    pub fn client(&self, id: u64) -> anyhow::Result<CascadeClient<Channel>> {
        Ok(client_of(self.node(id)?.addr))
    }

    /// The leader of `shard` as the nodes report it (the highest term any node claims).
    pub async fn leader_of(&self, shard: u16) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for node in self.nodes.values().filter(|n| n.running()) {
            let Ok(status) = node_status(node.addr).await else { continue };
            for s in status.shards.iter().filter(|s| s.shard == u32::from(shard)) {
                if s.role.eq_ignore_ascii_case("leader") && best.is_none_or(|(t, _)| s.term > t) {
                    best = Some((s.term, node.id));
                }
            }
        }
        best.map(|(_, id)| id)
    }

    /// The one-line description of the layout, for reports.
    pub fn describe(&self) -> String {
        let nodes: Vec<String> =
            self.nodes.values().map(|n| format!("n{}@{} {}", n.id, n.region, n.addr)).collect();
        nodes.join(", ")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A public-API client of the node at `addr` (see [`cascade_check::clients::tcp_client`]).
pub fn client_of(addr: SocketAddr) -> CascadeClient<Channel> {
    cascade_check::clients::tcp_client(&addr.to_string()).expect("a socket address is a valid URI")
}

/// NodeStatus with a deadline.
pub async fn node_status(addr: SocketAddr) -> Result<pb::NodeStatusResponse, tonic::Status> {
    let mut req = tonic::Request::new(pb::NodeStatusRequest {});
    req.set_timeout(Duration::from_secs(1));
    match tokio::time::timeout(Duration::from_secs(1), client_of(addr).node_status(req)).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("node status")),
    }
}

/// A loopback port for a node, bound (the caller holds it until the node starts) and never
/// handed out twice by this process, so clusters started side by side in one test binary do
/// not collide. Another process could still take it between the release and the node's bind;
/// the node then fails to start and the harness reports it.
fn free_port() -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    for _ in 0..64 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
        let addr = l.local_addr().context("local addr")?;
        if HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner()).insert(addr.port()) {
            return Ok((l, addr));
        }
    }
    anyhow::bail!("no fresh loopback port after 64 tries")
}
