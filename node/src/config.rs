//! Node configuration: a TOML file, overridable by command-line flags. Every field has a default
//! that runs a single local node.

use anyhow::Context;
use cascade_core::limits::{Limits, SessionLimitPolicy};
use serde::{Deserialize, Serialize};
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
    /// Where the Raft log (`wal/`) and the state machines (`sm/`) live.
    pub data_dir: PathBuf,
    /// Number of shards (Raft groups). Fixed for the life of the cluster's data.
    pub shards: u16,
    /// Region label of this node.
    pub region: String,
    /// Log entries after which a shard snapshots and purges its log.
    pub snapshot_every_n_logs: u64,
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
    /// Requests queued or in flight per shard before new ones get RESOURCE_EXHAUSTED.
    pub shard_inflight_max: usize,
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
            data_dir: PathBuf::from("cascade-data"),
            shards: 64,
            region: "local".to_owned(),
            snapshot_every_n_logs: 5_000,
            limits: LimitsConfig::default(),
            user_actors_per_shard_max: 4_096,
            user_idle_ms: 60_000,
            touch_coalesce_ms: 60_000,
            purge_interval_ms: 60_000,
            shard_inflight_max: 4_096,
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
        anyhow::ensure!(self.user_actors_per_shard_max > 0, "user_actors_per_shard_max must be at least 1");
        anyhow::ensure!(self.shard_inflight_max > 0, "shard_inflight_max must be at least 1");
        anyhow::ensure!(self.purge_interval_ms > 0, "purge_interval_ms must be at least 1");
        self.limits.to_limits()?;
        Ok(())
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }
}
