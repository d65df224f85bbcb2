//! `cascade serve`: load the configuration (TOML file, then flags), bind the listener, and run a
//! node until SIGINT or SIGTERM, then stop it cleanly.
//!
//! This file must not build any part of the node itself: it only calls `cascade_node::run`.

use anyhow::Context;
use cascade_node::config::{ClusterNode, NodeConfig};
use cascade_node::seams::Seams;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Flags of `cascade serve`; each one overrides the same setting of the TOML file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (every setting has a default).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address to serve HTTP on: OAuth introspection and revocation, forward-auth, metrics and
    /// health (off unless set here or in the file).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// Directory for the Raft log and state machines.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Unique id of this node in its cluster (not 0).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub node_id: Option<u64>,
    /// Number of shards; fixed for the life of the cluster's data.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub shards: Option<u16>,
    /// Region label of this node.
    #[arg(long, value_name = "NAME")]
    pub region: Option<String>,
    /// Address other nodes and clients reach this node at (default: --listen).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// A node of a new cluster, this one included; repeat for each (replaces the file's
    /// cluster.nodes). Only read when the data dir is fresh.
    #[arg(long = "peer", value_name = "ID=HOST:PORT@REGION")]
    pub peers: Vec<ClusterNode>,
    /// Start without initializing any shard, to be added with `cascade cluster add-node`.
    #[arg(long)]
    pub join: bool,
    /// Revocation bound (P2) in milliseconds.
    #[arg(long, value_name = "MS")]
    pub revocation_bound_ms: Option<u64>,
    /// How often a node leading more than its share of shards hands one over (0 = never).
    #[arg(long, value_name = "MS")]
    pub leader_balance_ms: Option<u64>,
    /// Let an operator cut this node's links to peers (`cascade cluster cut`), for drills and
    /// tests. Off by default.
    #[arg(long)]
    pub enable_fault_injection: bool,
}

impl ServeArgs {
    /// The configuration to run with: defaults, then the file, then the flags.
    pub fn config(&self) -> anyhow::Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_toml_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(http) = self.http_listen {
            config.http_listen = Some(http);
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(node_id) = self.node_id {
            config.node_id = node_id;
        }
        if let Some(shards) = self.shards {
            config.shards = shards;
        }
        if let Some(region) = &self.region {
            config.region = region.clone();
        }
        if let Some(advertise) = &self.advertise {
            config.advertise = Some(advertise.clone());
        }
        if !self.peers.is_empty() {
            config.cluster.nodes = self.peers.clone();
        }
        if self.join {
            config.cluster.join = true;
        }
        if let Some(bound) = self.revocation_bound_ms {
            config.revocation_bound_ms = bound;
        }
        if let Some(every) = self.leader_balance_ms {
            config.cluster.leader_balance_ms = every;
        }
        if self.enable_fault_injection {
            config.fault_injection = true;
        }
        Ok(config)
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `default_filter`). Safe to call twice.
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed before this returns, so a
/// signal that arrives during start-up is not lost (nor does it kill the process uncleanly).
pub fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}

/// `cascade serve`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<u8> {
    init_logging("info");
    let config = args.config()?;
    let planted =
        cascade_core::planted::plant_from_env().map_err(|e| anyhow::anyhow!(crate::cli::exit::Usage(e)))?;
    if !planted.is_empty() {
        tracing::warn!(bugs = ?planted, "PLANTED BUGS ARE ON: this node misbehaves on purpose (chaos testing only)");
    }
    let shutdown = shutdown_signal()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    tracing::info!(
        node = config.node_id,
        listen = %config.listen,
        data_dir = %config.data_dir.display(),
        shards = config.shards,
        "starting"
    );
    let mut seams = Seams::production(listener, &config.data_dir, config.node_id);
    if let Some(http) = config.http_listen {
        let listener =
            tokio::net::TcpListener::bind(http).await.with_context(|| format!("listen (HTTP) on {http}"))?;
        seams.http_listener = Some(listener);
    }
    seams.peers = cascade_raft::network::Peers::with_routes(config.peer_routes.clone());
    cascade_node::run(config, seams, shutdown).await?;
    tracing::info!("stopped cleanly");
    Ok(crate::cli::exit::SUCCESS)
}
