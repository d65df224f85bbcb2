//! Everything a node touches outside itself, passed in when it starts, so tests and the
//! simulator run the very same node code on a different listener, storage and clock.

use cascade_raft::host::Storage;
use cascade_raft::network::Peers;
use std::path::Path;
use std::sync::Arc;

/// Wall-clock time in milliseconds since the Unix epoch. Used to stamp commands (the state
/// machine never reads it) and to evaluate checks.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The host's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// The outside world of one node.
pub struct Seams {
    /// Where the node serves gRPC (public API, Raft transport, health, reflection).
    pub listener: tokio::net::TcpListener,
    pub storage: Storage,
    pub clock: Arc<dyn Clock>,
    /// The connector to other nodes (one channel per peer); tests cut links through it.
    pub peers: Peers,
}

impl Seams {
    /// Real sockets, real disk under `data_dir`, the system clock.
    pub fn production(listener: tokio::net::TcpListener, data_dir: &Path) -> Seams {
        Seams {
            listener,
            storage: Storage::Dir(data_dir.to_owned()),
            clock: Arc::new(SystemClock),
            peers: Peers::default(),
        }
    }
}
