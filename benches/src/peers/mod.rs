//! The systems Cascade is compared with (Redis as a denylist, etcd as a replicated session
//! store), started by `benches/peers.sh` on loopback and stopped when [`Peers`] is dropped.

pub mod etcd;
pub mod redis;

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/peers.sh");

pub struct Peers {
    dir: PathBuf,
    /// Redis with its default durability (RDB snapshots, no AOF).
    pub redis: SocketAddr,
    /// Redis with `appendonly yes`, `appendfsync always`.
    pub redis_always: SocketAddr,
    /// The 3 members of the etcd cluster.
    pub etcd: Vec<SocketAddr>,
    pub versions: serde_json::Value,
}

impl Peers {
    /// Runs `peers.sh start` (installing the packages if missing) with a fresh data directory.
    pub fn start() -> anyhow::Result<Peers> {
        let dir = std::env::temp_dir().join(format!("cascade-bench-peers-{}", std::process::id()));
        eprintln!(
            "peers: starting redis (default and appendfsync always) and a 3-member etcd in {}",
            dir.display()
        );
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("start")
            .arg(&dir)
            .output()
            .with_context(|| format!("run {SCRIPT}"))?;
        if !out.status.success() {
            let _ = Command::new("bash").arg(SCRIPT).arg("stop").arg(&dir).status();
            bail!("{SCRIPT} start failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        let env: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        let get = |k: &str| env.get(k).with_context(|| format!("{SCRIPT} did not print {k}"));
        let peers = Peers {
            redis: get("REDIS")?.parse()?,
            redis_always: get("REDIS_ALWAYS")?.parse()?,
            etcd: get("ETCD")?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            versions: serde_json::json!({
                "redis": get("REDIS_VERSION")?,
                "etcd": get("ETCD_VERSION")?,
            }),
            dir,
        };
        Ok(peers)
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        match Command::new("bash").arg(SCRIPT).arg("stop").arg(&self.dir).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("peers: {SCRIPT} stop {} failed: {other:?}", self.dir.display()),
        }
    }
}
