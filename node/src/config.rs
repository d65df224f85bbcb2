//! Node configuration: a TOML file, overridable by command-line flags. Every field has a default
//! that runs a single local node.

use anyhow::Context;
use cascade_core::limits::{Limits, SessionLimitPolicy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Settings of one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique id of this node in its cluster (not 0).
    pub node_id: u64,
    /// Address to serve gRPC on (public API and Raft transport share it).
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this node; defaults to `listen`.
    pub advertise: Option<String>,
    /// Address to serve HTTP on (OAuth introspection and revocation, forward-auth for gateways,
    /// `/metrics`, `/healthz`, `/readyz`); none by default.
    pub http_listen: Option<SocketAddr>,
    /// How the HTTP forward-auth endpoint checks DPoP proofs.
    pub dpop: DpopConfig,
    /// API keys and their roles, and the cluster key; authentication is off when empty.
    pub auth: crate::auth::AuthConfig,
    /// TLS on the gRPC port and between nodes; plaintext when absent.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Where the Raft log (`wal/`), the state machines (`sm/`) and their snapshots (`snapshots/`)
    /// live.
    pub data_dir: PathBuf,
    /// Number of shards (Raft groups). Fixed for the life of the cluster's data.
    pub shards: u16,
    /// Region label of this node.
    pub region: String,
    /// Log entries after which a shard snapshots and purges its log.
    pub snapshot_every_n_logs: u64,
    /// Raft heartbeat period. Also the deadline of every replication round, so it must exceed
    /// the worst round trip between a shard's replicas (across regions: raise it).
    pub raft_heartbeat_ms: u64,
    /// Shortest election timeout (the longest is twice it); at least 3 heartbeats.
    pub raft_election_timeout_ms: u64,
    /// Per-user limits and retention; must be the same on every node of a cluster.
    pub limits: LimitsConfig,
    /// Live user actors per shard; the least recently used one is passivated beyond it.
    pub user_actors_per_shard_max: usize,
    /// A user actor idle this long is passivated (its state stays in storage).
    pub user_idle_ms: u64,
    /// A touch within this long of the last one is answered without a write.
    pub touch_coalesce_ms: u64,
    /// How often a shard leader purges sessions past retention.
    pub purge_interval_ms: u64,
    /// Users a mass revocation job scans per step (one Raft entry each, proposed by the shard's
    /// leader back to back).
    pub job_step_users: u32,
    /// Pause between two rounds of job steps on a shard, in milliseconds: throttles what a
    /// mass revocation costs the cluster (0 = none).
    pub job_step_pause_ms: u64,
    /// Requests queued or in flight per shard before new ones get RESOURCE_EXHAUSTED.
    pub shard_inflight_max: usize,
    /// P2: once a revocation is acknowledged, no check starting this much later answers VALID
    /// for what it revoked. A replica answers only while it can prove freshness within it.
    pub revocation_bound_ms: u64,
    /// What a replica does with a check it cannot prove fresh: `forward` it to the shard's
    /// leader (default) or answer UNAVAILABLE. Either way it never answers stale.
    pub stale_reads: StaleReads,
    /// The cluster this node belongs to.
    pub cluster: ClusterConfig,
    /// Dial some peers through another address: advertised `host:port` → `host:port` to
    /// connect to (a proxy or tunnel; the chaos harness puts a fault proxy on every link).
    /// Peers not listed are dialed at their advertised address.
    pub peer_routes: BTreeMap<String, String>,
    /// Accept `CutLinks` and `SetClockOffset` requests that make this node stop talking to chosen peers (drills and
    /// tests of partitions). Never enable it in production.
    pub fault_injection: bool,
}

/// DPoP (RFC 9449) proof checking at the forward-auth endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpopConfig {
    /// A proof's `iat` may be this far from the node's clock, either way; proof ids (`jti`) are
    /// remembered this long to refuse replays.
    pub iat_window_ms: u64,
    /// Proof ids remembered at once; past it, new proofs are refused (never a replay let through).
    pub replay_cache_max: usize,
    /// Accept a key thumbprint the gateway verified itself in `X-Cascade-Jkt`. Only for gateways
    /// that set (or clear) that header on every request: a client could otherwise claim any key.
    pub trust_jkt_header: bool,
}

impl Default for DpopConfig {
    fn default() -> Self {
        DpopConfig { iat_window_ms: 60_000, replay_cache_max: 100_000, trust_jkt_header: false }
    }
}

/// What to do with a read the local replica cannot prove fresh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StaleReads {
    #[default]
    Forward,
    Unavailable,
}

/// Default of `cluster.leader_balance_ms`.
pub const LEADER_BALANCE_MS_DEFAULT: u64 = 10_000;

/// Cluster formation.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The nodes of a new cluster, this one included; read only when the data dir is fresh.
    /// Empty: this node is a cluster of its own.
    pub nodes: Vec<ClusterNode>,
    /// Start without initializing any shard, to be added to a running cluster with
    /// `cascade cluster add-node`.
    pub join: bool,
    /// Replicas per shard (3 or 5; fewer if the cluster has fewer nodes).
    pub replicas: usize,
    /// How often a node that leads more shards than its share checks whether to hand one to a
    /// caught-up voter leading at least two fewer, so leaderships spread out again after
    /// failovers (a handover is an election: writes to that shard pause for about one round
    /// trip). 0 = never.
    pub leader_balance_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nodes: Vec::new(),
            join: false,
            replicas: 3,
            leader_balance_ms: LEADER_BALANCE_MS_DEFAULT,
        }
    }
}

/// One node of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    pub id: u64,
    /// `host:port` other nodes and clients reach it at.
    pub addr: String,
    pub region: String,
}

impl std::str::FromStr for ClusterNode {
    type Err = String;

    /// `ID=HOST:PORT@REGION`, e.g. `2=10.0.0.2:7400@eu-west`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("expected ID=HOST:PORT@REGION, got {s:?}");
        let (id, rest) = s.split_once('=').ok_or_else(usage)?;
        let (addr, region) = rest.rsplit_once('@').ok_or_else(usage)?;
        let id: u64 =
            id.trim().parse().map_err(|_| format!("node id {id:?} is not a number ({})", usage()))?;
        if id == 0 || addr.is_empty() || region.is_empty() {
            return Err(usage());
        }
        Ok(ClusterNode { id, addr: addr.to_owned(), region: region.to_owned() })
    }
}

/// Per-user limits as written in the config file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub sessions_per_user_max: u32,
    pub devices_per_user_max: u32,
    /// `evict_oldest` (default) or `reject`.
    pub on_session_limit: String,
    pub retention_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        LimitsConfig {
            sessions_per_user_max: l.sessions_per_user_max,
            devices_per_user_max: l.devices_per_user_max,
            on_session_limit: "evict_oldest".to_owned(),
            retention_ms: l.retention_ms,
        }
    }
}

impl LimitsConfig {
    pub fn to_limits(&self) -> anyhow::Result<Limits> {
        let on_session_limit = match self.on_session_limit.as_str() {
            "evict_oldest" => SessionLimitPolicy::EvictOldest,
            "reject" => SessionLimitPolicy::Reject,
            other => anyhow::bail!("limits.on_session_limit must be evict_oldest or reject, got {other:?}"),
        };
        anyhow::ensure!(self.sessions_per_user_max > 0, "limits.sessions_per_user_max must be at least 1");
        anyhow::ensure!(self.devices_per_user_max > 0, "limits.devices_per_user_max must be at least 1");
        Ok(Limits {
            sessions_per_user_max: self.sessions_per_user_max,
            devices_per_user_max: self.devices_per_user_max,
            on_session_limit,
            retention_ms: self.retention_ms,
        })
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            advertise: None,
            http_listen: None,
            dpop: DpopConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            tls: None,
            data_dir: PathBuf::from("cascade-data"),
            shards: 64,
            region: "local".to_owned(),
            snapshot_every_n_logs: 5_000,
            raft_heartbeat_ms: cascade_raft::host::HEARTBEAT_MS_DEFAULT,
            raft_election_timeout_ms: cascade_raft::host::ELECTION_TIMEOUT_MIN_MS_DEFAULT,
            limits: LimitsConfig::default(),
            user_actors_per_shard_max: 4_096,
            user_idle_ms: 60_000,
            touch_coalesce_ms: 60_000,
            purge_interval_ms: 60_000,
            job_step_users: 512,
            job_step_pause_ms: 0,
            shard_inflight_max: 4_096,
            revocation_bound_ms: 500,
            stale_reads: StaleReads::Forward,
            cluster: ClusterConfig::default(),
            peer_routes: BTreeMap::new(),
            fault_injection: false,
        }
    }
}

impl NodeConfig {
    pub fn from_toml_file(path: &Path) -> anyhow::Result<NodeConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parse config {}", path.display()))
    }

    /// Refuse settings that cannot work, with a message naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.node_id != 0, "node_id must not be 0");
        anyhow::ensure!(self.shards > 0, "shards must be at least 1");
        anyhow::ensure!(self.snapshot_every_n_logs > 0, "snapshot_every_n_logs must be at least 1");
        anyhow::ensure!(
            (10..=10_000).contains(&self.raft_heartbeat_ms),
            "raft_heartbeat_ms must be between 10 and 10000, got {}",
            self.raft_heartbeat_ms
        );
        anyhow::ensure!(
            self.raft_election_timeout_ms >= 3 * self.raft_heartbeat_ms
                && self.raft_election_timeout_ms <= 60_000,
            "raft_election_timeout_ms must be at least 3 × raft_heartbeat_ms ({}) and at most 60000, got {}",
            3 * self.raft_heartbeat_ms,
            self.raft_election_timeout_ms
        );
        anyhow::ensure!(self.user_actors_per_shard_max > 0, "user_actors_per_shard_max must be at least 1");
        anyhow::ensure!(self.shard_inflight_max > 0, "shard_inflight_max must be at least 1");
        anyhow::ensure!(self.purge_interval_ms > 0, "purge_interval_ms must be at least 1");
        anyhow::ensure!(
            (1..=65_536).contains(&self.job_step_users),
            "job_step_users must be between 1 and 65536, got {}",
            self.job_step_users
        );
        anyhow::ensure!(
            (50..=60_000).contains(&self.revocation_bound_ms),
            "revocation_bound_ms must be between 50 and 60000, got {}",
            self.revocation_bound_ms
        );
        anyhow::ensure!(
            (1..=7).contains(&self.cluster.replicas),
            "cluster.replicas must be between 1 and 7, got {}",
            self.cluster.replicas
        );
        let mut ids = std::collections::BTreeSet::new();
        for n in &self.cluster.nodes {
            anyhow::ensure!(n.id != 0, "cluster.nodes: node id must not be 0");
            anyhow::ensure!(ids.insert(n.id), "cluster.nodes: node id {} is listed twice", n.id);
        }
        if !self.cluster.nodes.is_empty() && !self.cluster.join {
            let me = self.cluster.nodes.iter().find(|n| n.id == self.node_id);
            anyhow::ensure!(
                me.is_some(),
                "cluster.nodes does not list this node ({}); list it, or set cluster.join to add it to a running cluster",
                self.node_id
            );
        }
        for (from, to) in &self.peer_routes {
            for a in [from, to] {
                anyhow::ensure!(
                    a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                    "peer_routes: {a:?} is not host:port"
                );
            }
        }
        anyhow::ensure!(
            (1_000..=600_000).contains(&self.dpop.iat_window_ms),
            "dpop.iat_window_ms must be between 1000 and 600000, got {}",
            self.dpop.iat_window_ms
        );
        anyhow::ensure!(
            (1..=10_000_000).contains(&self.dpop.replay_cache_max),
            "dpop.replay_cache_max must be between 1 and 10000000, got {}",
            self.dpop.replay_cache_max
        );
        self.auth.validate(self.cluster.nodes.len() > 1)?;
        self.limits.to_limits()?;
        Ok(())
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }
}
