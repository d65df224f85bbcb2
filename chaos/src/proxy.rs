//! The fault proxy: one TCP proxy per directed inter-node link, so that delay, jitter, loss and
//! (one-way) partitions between "regions" on one machine need no `tc netem` (the CI kernel has
//! none). Every fault is changeable while the cluster runs.
//!
//! A link `a → b` carries every byte travelling from node `a` to node `b`: the requests of
//! connections `a` opens to `b`, and the responses on connections `b` opened to `a`. Blocking
//! `a → b` alone is therefore a one-way partition.
//!
//! How the faults are emulated on a byte stream:
//! - **delay and jitter**: each chunk is released `delay + uniform(0..=jitter)` after it was
//!   read, never before the previous chunk (TCP keeps order);
//! - **loss**: a lost segment costs TCP a retransmission, so a "lost" chunk is released
//!   [`LOSS_PENALTY`] late instead of being dropped (dropping bytes would corrupt the stream);
//! - **partition**: nothing crosses a blocked link. Connections that saw the block are closed
//!   when it lifts, as the peers' keepalive timeouts would have done, so stale bytes never
//!   arrive as a burst after the heal. A connection opened during the block stays silent.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Chunks read but not yet released, per direction of one connection; the reader waits when
/// it is full (backpressure instead of unbounded buffering).
pub const PUMP_QUEUE_CHUNKS: usize = 256;
/// Bytes read at once.
const CHUNK_BYTES: usize = 16 * 1024;
/// The extra delay of a "lost" chunk: Linux's minimum TCP retransmission timeout.
pub const LOSS_PENALTY: Duration = Duration::from_millis(200);
/// How often a held chunk looks whether its link is still blocked.
const BLOCK_POLL: Duration = Duration::from_millis(10);
/// Deadline for connecting to the upstream node.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The faults of one directed link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkFault {
    pub delay_ms: u64,
    pub jitter_ms: u64,
    /// Chunks (of up to 16 KiB) "lost", per thousand.
    pub loss_per_mille: u32,
    pub blocked: bool,
}

/// One directed link's current faults.
#[derive(Default)]
pub struct Link {
    fault: RwLock<LinkFault>,
    /// Bumped every time the link becomes blocked: a connection that saw a block is closed.
    blocks: AtomicU64,
}

impl Link {
    pub fn get(&self) -> LinkFault {
        *self.fault.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, fault: LinkFault) {
        let mut f = self.fault.write().unwrap_or_else(|p| p.into_inner());
        if fault.blocked && !f.blocked {
            self.blocks.fetch_add(1, Ordering::AcqRel);
        }
        *f = fault;
    }

    fn blocked(&self) -> bool {
        self.get().blocked
    }
}

/// Every link of a cluster and the proxies that enforce them.
pub struct Network {
    links: BTreeMap<(u64, u64), Arc<Link>>,
    /// `(from, to)` → the proxy address `from` dials to reach `to`.
    pub proxies: BTreeMap<(u64, u64), SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Network {
    /// A proxy for every ordered pair of `nodes` (id → the node's own address).
    pub async fn start(nodes: &BTreeMap<u64, SocketAddr>, seed: u64) -> std::io::Result<Network> {
        let mut links = BTreeMap::new();
        for &a in nodes.keys() {
            for &b in nodes.keys().filter(|&&b| b != a) {
                links.insert((a, b), Arc::new(Link::default()));
            }
        }
        let mut proxies = BTreeMap::new();
        let mut tasks = Vec::new();
        for (&(a, b), forward) in &links {
            let backward = links.get(&(b, a)).cloned().unwrap_or_default();
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            proxies.insert((a, b), listener.local_addr()?);
            let upstream = nodes[&b];
            let rng_seed = seed ^ (a << 32) ^ b;
            tasks.push(tokio::spawn(serve(listener, upstream, forward.clone(), backward, rng_seed)));
        }
        Ok(Network { links, proxies, tasks })
    }

    pub fn link(&self, from: u64, to: u64) -> Option<&Arc<Link>> {
        self.links.get(&(from, to))
    }

    /// Changes every link for which `pick(from, to)` holds.
    pub fn update(&self, pick: impl Fn(u64, u64) -> bool, change: impl Fn(&mut LinkFault)) {
        for (&(a, b), link) in &self.links {
            if pick(a, b) {
                let mut f = link.get();
                change(&mut f);
                link.set(f);
            }
        }
    }

    /// Unblocks every link and removes loss, leaving the base delay (`base(from, to)`).
    pub fn heal(&self, base: impl Fn(u64, u64) -> LinkFault) {
        for (&(a, b), link) in &self.links {
            link.set(base(a, b));
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Accepts connections for one link until aborted.
async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    forward: Arc<Link>,
    backward: Arc<Link>,
    seed: u64,
) {
    let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(BLOCK_POLL).await;
            continue;
        };
        connections.retain(|c| !c.is_finished());
        let (forward, backward, rng) = (forward.clone(), backward.clone(), rng.clone());
        connections.push(tokio::spawn(async move {
            connection(client, upstream, forward, backward, rng).await;
        }));
    }
}

/// One proxied connection: two pumps, closed together.
async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    forward: Arc<Link>,
    backward: Arc<Link>,
    rng: Arc<Mutex<StdRng>>,
) {
    // A connection opened across a blocked link never reaches the other side.
    if forward.blocked() || backward.blocked() {
        while forward.blocked() || backward.blocked() {
            tokio::time::sleep(BLOCK_POLL).await;
        }
        return;
    }
    let Ok(Ok(server)) = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (kill, killed) = watch::channel(false);
    let kill = Arc::new(kill);
    let there = pump(client_read, server_write, forward, rng.clone(), kill.clone(), killed.clone());
    let back = pump(server_read, client_write, backward, rng, kill, killed);
    let _ = tokio::join!(there, back);
}

/// Copies `from` to `to` under `link`'s faults until EOF, an error, or the connection is
/// killed (by a partition that lifted).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    rng: Arc<Mutex<StdRng>>,
    kill: Arc<watch::Sender<bool>>,
    mut killed: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(PUMP_QUEUE_CHUNKS);
    let blocks_at_start = link.blocks.load(Ordering::Acquire);
    let reader_link = link.clone();
    let mut reader_killed = killed.clone();
    let reader = async move {
        let mut last_release = Instant::now();
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                _ = reader_killed.changed() => break,
            };
            let f = reader_link.get();
            let extra = {
                let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
                let jitter = if f.jitter_ms > 0 { rng.gen_range(0..=f.jitter_ms) } else { 0 };
                let lost = f.loss_per_mille > 0 && rng.gen_range(0..1000) < f.loss_per_mille;
                Duration::from_millis(f.delay_ms + jitter) + if lost { LOSS_PENALTY } else { Duration::ZERO }
            };
            let release = (Instant::now() + extra).max(last_release);
            last_release = release;
            if tx.send((release, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let writer = async {
        while let Some((release, bytes)) = rx.recv().await {
            tokio::time::sleep_until(release).await;
            // Hold while blocked; a connection that lived through a block dies when it lifts.
            while link.blocked() {
                tokio::select! {
                    _ = tokio::time::sleep(BLOCK_POLL) => {}
                    _ = killed.changed() => return,
                }
            }
            if link.blocks.load(Ordering::Acquire) != blocks_at_start {
                let _ = kill.send(true);
                return;
            }
            if to.write_all(&bytes).await.is_err() {
                let _ = kill.send(true);
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn net_to_echo() -> Network {
        let echo = echo_server().await;
        // Node 2 is the echo server; node 1 never serves (no connection goes to it).
        let nodes = BTreeMap::from([(1, "127.0.0.1:9".parse().expect("addr")), (2, echo)]);
        Network::start(&nodes, 7).await.expect("network")
    }

    async fn round_trip(addr: SocketAddr, timeout: Duration) -> Option<Duration> {
        let started = Instant::now();
        let io = async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            (&buf == b"ping").then_some(())
        };
        tokio::time::timeout(timeout, io).await.ok().flatten().map(|()| started.elapsed())
    }

    #[tokio::test]
    async fn delay_applies_per_direction_and_changes_at_runtime() {
        let net = net_to_echo().await;
        let addr = net.proxies[&(1, 2)];
        let fast = round_trip(addr, Duration::from_secs(2)).await.expect("echo");
        assert!(fast < Duration::from_millis(60), "no fault: {fast:?}");
        net.update(|a, b| (a, b) == (1, 2), |f| f.delay_ms = 60);
        net.update(|a, b| (a, b) == (2, 1), |f| f.delay_ms = 40);
        let slow = round_trip(addr, Duration::from_secs(2)).await.expect("echo");
        assert!(slow >= Duration::from_millis(100), "60 ms there + 40 ms back: {slow:?}");
    }

    #[tokio::test]
    async fn a_one_way_block_stops_the_exchange_and_the_heal_restores_new_connections() {
        let net = net_to_echo().await;
        let addr = net.proxies[&(1, 2)];
        // Only the way back is blocked: the request arrives, the answer does not.
        net.update(|a, b| (a, b) == (2, 1), |f| f.blocked = true);
        assert_eq!(round_trip(addr, Duration::from_millis(300)).await, None);
        net.heal(|_, _| LinkFault::default());
        assert!(round_trip(addr, Duration::from_secs(2)).await.is_some(), "healed");
    }

    #[tokio::test]
    async fn a_connection_that_saw_a_block_is_closed_when_it_lifts() {
        let net = net_to_echo().await;
        let addr = net.proxies[&(1, 2)];
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"a").await.expect("write");
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.expect("echo before the block");
        net.update(|_, _| true, |f| f.blocked = true);
        s.write_all(b"b").await.expect("write into the block");
        tokio::time::sleep(Duration::from_millis(50)).await;
        net.heal(|_, _| LinkFault::default());
        let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut one)).await.expect("closed in time");
        assert!(matches!(r, Ok(0) | Err(_)), "the stale byte must not arrive: {r:?}");
    }
}
