//! A node started in-process on a temporary directory and an ephemeral loopback port, for `demo`
//! and `load --local`: started with `cascade_node::run` in a task, stopped by a oneshot.
//!
//! This file must not reach into the node's internals: it only uses `run`, the config and the
//! seams, exactly as `serve` does.

use crate::cli::api::Api;
use anyhow::Context;
use cascade_node::config::NodeConfig;
use cascade_node::seams::Seams;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a local node may take to serve with a leader on every shard.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between readiness probes.
const READY_POLL: Duration = Duration::from_millis(100);
/// How long a local node may take to stop once asked.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Node id of the node `demo` and `load --local` start.
pub const LOCAL_NODE_ID: u64 = 1;

/// A running in-process node. Dropping it without [`LocalNode::stop`] aborts the node task.
pub struct LocalNode {
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Its data directory, removed when this value is dropped.
    pub data_dir: tempfile::TempDir,
    /// Number of shards it hosts.
    pub shards: u16,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl LocalNode {
    /// Starts a single node with the default configuration on `127.0.0.1:0` and a fresh temporary
    /// data directory, and waits until it answers with a leader on every shard. Two local nodes in
    /// one process need distinct `node_id`s (actor names are process-wide).
    pub async fn start(node_id: u64, timeout: Duration) -> anyhow::Result<LocalNode> {
        let data_dir =
            tempfile::Builder::new().prefix("cascade-").tempdir().context("create temp data dir")?;
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("bind 127.0.0.1:0")?;
        let addr = listener.local_addr().context("local address of listener")?;
        let config = NodeConfig {
            node_id,
            listen: addr,
            data_dir: data_dir.path().to_owned(),
            ..NodeConfig::default()
        };
        let shards = config.shards;
        let seams = Seams::production(listener, data_dir.path());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let shutdown = async move {
            // A dropped sender also means "stop".
            let _ = shutdown_rx.await;
        };
        let task = tokio::spawn(cascade_node::run(config, seams, shutdown));
        let mut node = LocalNode { addr, data_dir, shards, shutdown: Some(shutdown_tx), task: Some(task) };
        node.wait_ready(timeout).await?;
        Ok(node)
    }

    /// `http://` address for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        self.data_dir.path()
    }

    /// Polls NodeStatus until every shard reports a leader, failing fast if the node task ends.
    async fn wait_ready(&mut self, call_timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(task) = self.task.as_mut() {
                if task.is_finished() {
                    let task = self.task.take().context("node task vanished")?;
                    return match task.await {
                        Ok(Ok(())) => Err(anyhow::anyhow!("the local node stopped during start-up")),
                        Ok(Err(err)) => Err(err.context("the local node failed to start")),
                        Err(join) => Err(anyhow::anyhow!("the local node task failed: {join}")),
                    };
                }
            }
            let problem = match self.probe(call_timeout).await {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("the local node was not ready after {READY_TIMEOUT:?}: {problem}");
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    async fn probe(&self, call_timeout: Duration) -> Result<(), String> {
        let api = Api::connect(&self.url(), call_timeout).await.map_err(|e| format!("{e:#}"))?;
        let status = api.node_status().await.map_err(|e| e.to_string())?;
        let without_leader = status.shards.iter().filter(|s| s.leader == 0).count();
        if status.shards.is_empty() {
            return Err("no shards reported".to_owned());
        }
        if without_leader > 0 {
            return Err(format!("{without_leader} of {} shards have no leader", status.shards.len()));
        }
        Ok(())
    }

    /// Asks the node to stop and waits for it to finish; its error, if any, is returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(STOP_TIMEOUT, task).await {
            Ok(Ok(result)) => result.context("the local node stopped with an error"),
            Ok(Err(join)) => Err(anyhow::anyhow!("the local node task failed: {join}")),
            Err(_) => anyhow::bail!("the local node did not stop within {STOP_TIMEOUT:?}"),
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
