//! Nodes started on this machine: one node in-process for `load --local` and the unit tests
//! ([`LocalNode`]: `cascade_node::run` in a task on a temporary directory and an ephemeral loopback
//! port, stopped by a oneshot), or a cluster of `cascade serve` child processes for `demo`
//! ([`LocalCluster`]: one per region, each with its own temporary data dir and log file, killed
//! and reaped on every exit path).
//!
//! This file must not reach into the node's internals: the in-process node only uses `run`, the
//! config and the seams, exactly as `serve` does; the child processes are plain `cascade serve`
//! invocations. It must not print (callers report) and must not leave a child process behind.

use crate::cli::api::Api;
use anyhow::Context;
use cascade_node::config::NodeConfig;
use cascade_node::seams::Seams;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a local node may take to serve with a leader on every shard.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between readiness probes.
const READY_POLL: Duration = Duration::from_millis(100);
/// How long a local node may take to stop once asked.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Node id of the node `load --local` starts.
pub const LOCAL_NODE_ID: u64 = 1;

/// A running in-process node. Dropping it without [`LocalNode::stop`] aborts the node task.
pub struct LocalNode {
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Its data directory, held so it lives as long as the node, and removed when this value is
    /// dropped.
    _data_dir: tempfile::TempDir,
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
        let seams = Seams::production(listener, data_dir.path(), node_id);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let shutdown = async move {
            // A dropped sender also means "stop".
            let _ = shutdown_rx.await;
        };
        let task = tokio::spawn(cascade_node::run(config, seams, shutdown));
        let mut node =
            LocalNode { addr, _data_dir: data_dir, shards, shutdown: Some(shutdown_tx), task: Some(task) };
        node.wait_ready(timeout).await?;
        Ok(node)
    }

    /// `http://` address for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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

/// Pause between polls of a child process that was asked to exit.
const EXIT_POLL: Duration = Duration::from_millis(20);
/// Log filter of child nodes when `RUST_LOG` is not set: the node's own lines (start, stop,
/// errors) without openraft's per-message chatter, so a log tail shows what matters.
const CHILD_LOG_FILTER: &str = "info,openraft=error";
/// Longest log line kept by [`log_tail`]; longer lines are cut.
const LOG_LINE_MAX_CHARS: usize = 240;

/// One `cascade serve` child process of a [`LocalCluster`]. Dropping it kills (SIGKILL) and reaps
/// the process if it is still running.
pub struct ChildNode {
    /// Node id (`--node-id`).
    pub id: u64,
    /// Region label (`--region`).
    pub region: String,
    /// Where it serves gRPC (`--listen`), for clients and peers alike.
    pub addr: SocketAddr,
    /// Its data directory (`--data-dir`), inside the cluster's temporary directory.
    pub data_dir: PathBuf,
    /// File its stdout and stderr are appended to, across restarts.
    pub log: PathBuf,
    exe: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// How a child process ended when asked to stop.
#[derive(Debug, Clone, Copy)]
pub struct Stopped {
    /// Its exit status.
    pub status: ExitStatus,
    /// From the SIGTERM to its exit (zero if it had exited before).
    pub took: Duration,
    /// It had already exited when it was asked to stop.
    pub already_exited: bool,
}

impl ChildNode {
    /// `http://` address for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Process id of the running process, if one was started and has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The arguments it is started with (after the executable).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Starts the process (again, after [`ChildNode::kill`] or a stop: same flags, same data dir),
    /// appending its output to [`ChildNode::log`]. It logs with `RUST_LOG` if set, else
    /// [`CHILD_LOG_FILTER`].
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "node {} is already running", self.id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open log file {}", self.log.display()))?;
        let err = log.try_clone().with_context(|| format!("duplicate log file {}", self.log.display()))?;
        let mut command = Command::new(&self.exe);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", CHILD_LOG_FILTER);
        }
        let child = command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Its own process group: a Ctrl-C in the terminal reaches only the parent, which then
            // stops every node in order instead of all of them dying at once.
            .process_group(0)
            .spawn()
            .with_context(|| format!("start node {} ({} serve)", self.id, self.exe.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// The exit status if the process has exited (it is then reaped), `None` while it runs or if
    /// none was started.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())?;
        self.child = None;
        Some(status)
    }

    /// Kills the process with SIGKILL (a crash: nothing is flushed or closed) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().with_context(|| format!("node {} is not running", self.id))?;
        if child.try_wait().context("poll child process")?.is_none() {
            child.kill().with_context(|| format!("SIGKILL node {}", self.id))?;
        }
        child.wait().with_context(|| format!("reap node {}", self.id))
    }

    /// Sends SIGTERM if the process is still running (so the pid cannot have been reused);
    /// `false` if it had already exited.
    fn send_term(&mut self) -> anyhow::Result<bool> {
        let child = self.child.as_mut().with_context(|| format!("node {} is not running", self.id))?;
        if child.try_wait().context("poll child process")?.is_some() {
            return Ok(false);
        }
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stdin(Stdio::null())
            .status()
            .context("run `kill -TERM`")?;
        anyhow::ensure!(status.success(), "`kill -TERM {}` failed: {status}", child.id());
        Ok(true)
    }

    /// Waits up to `deadline` for the process to exit after [`ChildNode::send_term`] (which
    /// `signalled` it, or found it exited); past the deadline it is killed (SIGKILL), reaped, and
    /// an error says so.
    async fn wait_exit(&mut self, deadline: Duration, signalled: bool) -> anyhow::Result<Stopped> {
        let started = Instant::now();
        loop {
            let child = self.child.as_mut().with_context(|| format!("node {} is not running", self.id))?;
            if let Some(status) = child.try_wait().context("poll child process")? {
                self.child = None;
                let took = if signalled { started.elapsed() } else { Duration::ZERO };
                return Ok(Stopped { status, took, already_exited: !signalled });
            }
            if started.elapsed() >= deadline {
                let status = self.kill()?;
                anyhow::bail!(
                    "node {} did not exit within {deadline:?} of SIGTERM; killed ({status})",
                    self.id
                );
            }
            tokio::time::sleep(EXIT_POLL).await;
        }
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// A cluster of `cascade serve` child processes on loopback, one per region, sharing one
/// temporary directory (a data dir and a log file per node). Dropping it kills every node still
/// running, then removes the directory.
pub struct LocalCluster {
    /// The nodes, in node-id order (ids 1, 2, …).
    pub nodes: Vec<ChildNode>,
    /// Number of shards of the cluster.
    pub shards: u16,
    // Declared after `nodes`, so it is removed only once every node is gone.
    root: tempfile::TempDir,
}

/// How often a local cluster's nodes balance leaderships: shorter than a production node's, so
/// the demo shows leaderships spreading out again within seconds of a restart.
pub const LEADER_BALANCE_MS: u64 = 2_000;

impl LocalCluster {
    /// Starts one node per region (ids 1, 2, … in that order) on free loopback ports, as a new
    /// cluster of `shards` shards, without waiting for it to serve.
    pub fn start(exe: &Path, regions: &[&str], shards: u16) -> anyhow::Result<LocalCluster> {
        let root = tempfile::Builder::new().prefix("cascade-demo-").tempdir().context("create temp dir")?;
        let addrs = free_loopback_addrs(regions.len())?;
        let peers: Vec<String> = regions
            .iter()
            .zip(&addrs)
            .zip(1u64..)
            .map(|((region, addr), id)| format!("{id}={addr}@{region}"))
            .collect();
        let mut nodes = Vec::with_capacity(regions.len());
        for ((region, addr), id) in regions.iter().zip(&addrs).zip(1u64..) {
            let data_dir = root.path().join(format!("node-{id}"));
            let mut args: Vec<String> = vec![
                "serve".into(),
                "--listen".into(),
                addr.to_string(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--node-id".into(),
                id.to_string(),
                "--shards".into(),
                shards.to_string(),
                "--region".into(),
                (*region).to_owned(),
                "--leader-balance-ms".into(),
                LEADER_BALANCE_MS.to_string(),
            ];
            for peer in &peers {
                args.push("--peer".into());
                args.push(peer.clone());
            }
            let mut node = ChildNode {
                id,
                region: (*region).to_owned(),
                addr: *addr,
                log: root.path().join(format!("node-{id}.log")),
                data_dir,
                exe: exe.to_owned(),
                args,
                child: None,
            };
            // On failure, the nodes already started are killed as `nodes` is dropped.
            node.spawn()?;
            nodes.push(node);
        }
        Ok(LocalCluster { nodes, shards, root })
    }

    /// The temporary directory holding every node's data dir and log.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Sends SIGTERM to every running node, then waits (up to `deadline` in all) for each to
    /// exit; one result per node, in node order. Nodes that were not running are left out.
    pub async fn stop(&mut self, deadline: Duration) -> Vec<(u64, anyhow::Result<Stopped>)> {
        let mut results = Vec::new();
        let mut signalled = Vec::new();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if node.child.is_none() {
                continue;
            }
            match node.send_term() {
                Ok(sent) => signalled.push((i, sent)),
                Err(err) => {
                    // Killed and reaped as a fallback; the error is still reported.
                    let _ = node.kill();
                    results.push((node.id, Err(err)));
                }
            }
        }
        let started = Instant::now();
        for (i, sent) in signalled {
            if let Some(node) = self.nodes.get_mut(i) {
                let left = deadline.saturating_sub(started.elapsed());
                results.push((node.id, node.wait_exit(left, sent).await));
            }
        }
        results.sort_by_key(|(id, _)| *id);
        results
    }
}

/// `n` distinct free ports on 127.0.0.1: each is bound (all at once, so they differ) and released.
fn free_loopback_addrs(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| {
            std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).context("bind 127.0.0.1:0")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners.iter().map(|l| l.local_addr().context("local address of listener")).collect()
}

/// The last `lines` lines of a log file (each cut to a readable length); empty if it cannot be
/// read.
pub fn log_tail(path: &Path, lines: usize) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else { return Vec::new() };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| {
            if line.chars().count() > LOG_LINE_MAX_CHARS {
                let cut: String = line.chars().take(LOG_LINE_MAX_CHARS).collect();
                format!("{cut}…")
            } else {
                (*line).to_owned()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_loopback_addrs_are_distinct() {
        let addrs = free_loopback_addrs(3).expect("three free ports");
        assert_eq!(addrs.len(), 3);
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() != 0));
        assert!(addrs[0] != addrs[1] && addrs[1] != addrs[2] && addrs[0] != addrs[2]);
    }

    #[test]
    fn log_tail_keeps_the_last_lines_and_cuts_long_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("node.log");
        let long = "x".repeat(LOG_LINE_MAX_CHARS + 10);
        std::fs::write(&path, format!("one\ntwo\nthree\n{long}\n")).expect("write log");
        let tail = log_tail(&path, 2);
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0], "three");
        assert_eq!(tail[1].chars().count(), LOG_LINE_MAX_CHARS + 1);
        assert!(log_tail(&dir.path().join("missing.log"), 5).is_empty());
    }

    /// A child stops on SIGTERM and is reaped; it can be started again and killed.
    #[tokio::test]
    async fn a_child_stops_on_sigterm_and_is_reaped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut node = ChildNode {
            id: 7,
            region: "test".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            data_dir: dir.path().to_owned(),
            log: dir.path().join("sleep.log"),
            exe: PathBuf::from("sleep"),
            args: vec!["30".into()],
            child: None,
        };
        node.spawn().expect("spawn sleep");
        assert!(node.pid().is_some());
        assert!(node.exited().is_none());
        let signalled = node.send_term().expect("SIGTERM sent");
        assert!(signalled);
        let stopped = node.wait_exit(Duration::from_secs(5), signalled).await.expect("sleep stops");
        assert!(!stopped.already_exited);
        assert!(!stopped.status.success(), "killed by a signal: {:?}", stopped.status);
        assert!(node.pid().is_none());
        node.spawn().expect("respawn sleep");
        let status = node.kill().expect("kill sleep");
        assert!(!status.success());
    }
}
