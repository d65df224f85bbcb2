//! Everything a node touches outside itself, passed in when it starts, so tests and the
//! simulator run the very same node code on a different listener, storage and clock.

use cascade_raft::conn::Conn;
use cascade_raft::host::{RaftHost, Storage};
use cascade_raft::network::Peers;
use futures::stream::{BoxStream, StreamExt};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
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

/// A clock that runs `offset` milliseconds away from another: the drill hook that skews one
/// node's clock without touching the host's (`SetClockOffset`, fault injection only).
pub struct OffsetClock {
    pub inner: Arc<dyn Clock>,
    pub offset_ms: Arc<AtomicI64>,
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> u64 {
        self.inner.now_ms().saturating_add_signed(self.offset_ms.load(Ordering::Relaxed))
    }
}

/// Unguessable random numbers: session ids and refresh-token secrets.
pub trait Entropy: Send + Sync + 'static {
    fn u128(&self) -> u128;
}

/// The operating system's generator (`rand::thread_rng`, a CSPRNG seeded by the OS).
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn u128(&self) -> u128 {
        rand::random()
    }
}

/// The connections a node accepts.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    /// Any stream of connections (the simulator's network).
    Incoming(BoxStream<'static, std::io::Result<Conn>>),
}

impl Listener {
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Incoming(_) => None,
        }
    }

    /// Every accepted connection, as tonic serves them.
    pub fn into_stream(self) -> BoxStream<'static, std::io::Result<Conn>> {
        match self {
            Listener::Tcp(l) => tokio_stream::wrappers::TcpListenerStream::new(l)
                .map(|accepted| accepted.map(Conn::new))
                .boxed(),
            Listener::Incoming(s) => s,
        }
    }
}

/// The outside world of one node.
pub struct Seams {
    /// Where the node serves gRPC (public API, Raft transport, health, reflection).
    pub listener: Listener,
    /// Where the node serves HTTP (introspection, forward-auth, metrics, health), if anywhere.
    pub http_listener: Option<tokio::net::TcpListener>,
    pub storage: Storage,
    pub clock: Arc<dyn Clock>,
    /// The connector to other nodes (one channel per peer); tests cut links through it.
    pub peers: Peers,
    pub entropy: Arc<dyn Entropy>,
    /// Prefix of this node's actor names. ractor's registry is process-wide, so nodes sharing a
    /// process (the simulator, restarting nodes in place) need distinct prefixes.
    pub actor_prefix: String,
    /// Called with the Raft host once it is open (the simulator observes leadership through it).
    pub on_host: Option<Box<dyn FnOnce(Arc<RaftHost>) + Send>>,
}

impl Seams {
    /// Real sockets, real disk under `data_dir`, the system clock.
    pub fn production(listener: tokio::net::TcpListener, data_dir: &Path, node_id: u64) -> Seams {
        Seams {
            listener: Listener::Tcp(listener),
            http_listener: None,
            storage: Storage::Dir(data_dir.to_owned()),
            clock: Arc::new(SystemClock),
            peers: Peers::default(),
            entropy: Arc::new(OsEntropy),
            actor_prefix: format!("n{node_id}"),
            on_host: None,
        }
    }
}

/// A tower layer that sets each response's `Date` header from the node's [`Clock`] (hyper would
/// otherwise read the host's clock: under the simulator, a header that differs between replays
/// changes the bytes on the simulated wire and so the run).
#[derive(Clone)]
pub struct ClockDateLayer(pub Arc<dyn Clock>);

impl<S> tower::Layer<S> for ClockDateLayer {
    type Service = ClockDate<S>;
    fn layer(&self, inner: S) -> ClockDate<S> {
        ClockDate { inner, clock: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct ClockDate<S> {
    inner: S,
    clock: Arc<dyn Clock>,
}

impl<S, B, R> tower::Service<http::Request<B>> for ClockDate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let clock = self.clock.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(clock.now_ms());
            if let Ok(v) = http::HeaderValue::from_str(&httpdate::fmt_http_date(at)) {
                response.headers_mut().insert(http::header::DATE, v);
            }
            Ok(response)
        })
    }
}
