//! Remote checks: routed by the shard in the session id, a deadline on every attempt, retries
//! with backoff on the next replica, batches grouped by node.

use crate::config::{ClientConfig, LocalConfig};
use crate::error::Error;
use crate::local::LocalCache;
use crate::topology::{self, Topology};
use cascade_protocol::ids::{SessionId, ShardId};
use cascade_protocol::limits::CHECK_BATCH_LEN_MAX;
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Connections kept at most (one per node address; a cluster never has that many nodes).
pub const CHANNELS_MAX: usize = 256;

/// A handle on the cluster: cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    topology: RwLock<Arc<Topology>>,
    /// When the topology was last learned; a refresh waits for `refresh_min` after it.
    learned_at: Mutex<Instant>,
    refreshing: tokio::sync::Mutex<()>,
    channels: Mutex<HashMap<String, Channel>>,
}

/// The codes worth another attempt (on another replica): the node is down, unreachable, slow,
/// or cannot prove it is fresh.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted | Code::Unknown
    )
}

impl Client {
    /// Learns the cluster from `config.seeds`; fails if none answers within the deadline.
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        if config.seeds.is_empty() {
            return Err(Error::InvalidArgument("seeds: at least one node address is needed".into()));
        }
        if config.attempts == 0 {
            return Err(Error::InvalidArgument("attempts: at least 1".into()));
        }
        let channels = Mutex::new(HashMap::new());
        let topology = topology::discover(&config, |addr| channel(&channels, &config, addr)).await?;
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                topology: RwLock::new(Arc::new(topology)),
                learned_at: Mutex::new(Instant::now()),
                refreshing: tokio::sync::Mutex::new(()),
                channels,
            }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The cluster as last learned.
    pub fn topology(&self) -> Arc<Topology> {
        self.inner.topology.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Learns the cluster again, unless it was learned less than `refresh_min` ago (then
    /// returns at once). Concurrent callers share one refresh. A failed refresh keeps the map.
    pub async fn refresh(&self) {
        let _one = self.inner.refreshing.lock().await;
        if self.inner.learned_at.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
            < self.inner.config.refresh_min
        {
            return;
        }
        let inner = &self.inner;
        match topology::discover(&inner.config, |addr| channel(&inner.channels, &inner.config, addr)).await {
            Ok(t) => *inner.topology.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(t),
            Err(e) => tracing::warn!("cluster map not refreshed: {e}"),
        }
        *inner.learned_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// A channel to `addr` (connected lazily, kept for reuse).
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, Error> {
        channel(&self.inner.channels, &self.inner.config, addr)
    }

    /// One check, on a replica of the session's shard (see [`Topology::candidates`]).
    pub async fn check(&self, check: pb::CheckSessionRequest) -> Result<pb::CheckSessionResponse, Error> {
        let shard = shard_of(&check.session_id)?;
        self.with_retries("CheckSession", |attempt, t| {
            let check = check.clone();
            let node = pick(&t, shard, self.inner.config.region.as_deref(), attempt);
            async move {
                let mut client = CascadeClient::new(self.node_channel(&t, node)?);
                client.check_session(self.request(check)).await.map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Many checks, answered in request order: grouped by the node each shard goes to, at most
    /// 256 per call, calls in parallel; a group whose call fails is retried (on its next
    /// replicas) as a whole. Fails if any group fails every attempt.
    pub async fn check_batch(
        &self,
        checks: Vec<pb::CheckSessionRequest>,
    ) -> Result<Vec<pb::CheckSessionResponse>, Error> {
        let mut shards = Vec::with_capacity(checks.len());
        for (i, c) in checks.iter().enumerate() {
            shards.push(
                shard_of(&c.session_id).map_err(|e| Error::InvalidArgument(format!("checks[{i}]: {e}")))?,
            );
        }
        let t = self.topology();
        let region = self.inner.config.region.as_deref();
        let mut groups: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            groups.entry(pick(&t, *shard, region, 0).unwrap_or(0)).or_default().push(i);
        }
        let calls = groups
            .into_values()
            .flat_map(|idx| idx.chunks(CHECK_BATCH_LEN_MAX).map(<[usize]>::to_vec).collect::<Vec<_>>());
        let calls = calls.map(|idx| {
            let batch: Vec<pb::CheckSessionRequest> = idx.iter().map(|&i| checks[i].clone()).collect();
            let shard = shards[idx[0]];
            async move {
                let answers = self
                    .with_retries("CheckSessionBatch", |attempt, t| {
                        let checks = batch.clone();
                        let node = pick(&t, shard, region, attempt);
                        async move {
                            let mut client = CascadeClient::new(self.node_channel(&t, node)?);
                            let r = client
                                .check_session_batch(self.request(pb::CheckSessionBatchRequest { checks }));
                            r.await.map(|r| r.into_inner().results)
                        }
                    })
                    .await?;
                if answers.len() != idx.len() {
                    return Err(Error::Rpc {
                        rpc: "CheckSessionBatch",
                        code: Code::Internal,
                        message: format!("{} answers to {} checks", answers.len(), idx.len()),
                        attempts: 1,
                    });
                }
                Ok::<_, Error>(idx.into_iter().zip(answers))
            }
        });
        let mut out: Vec<Option<pb::CheckSessionResponse>> = vec![None; checks.len()];
        for part in futures::future::join_all(calls).await {
            for (i, answer) in part? {
                out[i] = Some(answer);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// A local cache fed by `WatchRevocations` from the nodes of this client's cluster map; its
    /// streams start at once (see [`LocalCache::wait_fresh`]) and stop when it is dropped.
    pub fn local_cache(&self, config: LocalConfig) -> LocalCache {
        LocalCache::start(self.clone(), config)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.inner.config.request(message)
    }

    fn node_channel(&self, t: &Topology, node: Option<u64>) -> Result<Channel, Status> {
        let addr = node
            .and_then(|n| t.nodes.get(&n))
            .map(|n| n.addr.as_str())
            .ok_or_else(|| Status::unavailable("no node known"))?;
        self.channel(addr).map_err(|e| Status::unavailable(e.to_string()))
    }

    /// Runs `call(attempt, topology)` until it succeeds, fails with a code not worth
    /// retrying, or the attempts run out; refreshes the cluster map and backs off between
    /// attempts.
    pub(crate) async fn with_retries<T, F, Fut>(&self, rpc: &'static str, mut call: F) -> Result<T, Error>
    where
        F: FnMut(usize, Arc<Topology>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let config = &self.inner.config;
        let mut backoff = config.backoff;
        let mut last = Status::unavailable("not attempted");
        for attempt in 0..config.attempts as usize {
            if attempt > 0 {
                let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(config.backoff_max);
                self.refresh().await;
            }
            let deadline = config.timeout + Duration::from_millis(50);
            let answer = tokio::time::timeout(deadline, call(attempt, self.topology())).await;
            let answer = answer.map(|r| r.map_err(|s| transport_status(s, config.timeout)));
            match answer {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) if retryable(status.code()) => last = status,
                Ok(Err(status)) => {
                    return Err(Error::Rpc {
                        rpc,
                        code: status.code(),
                        message: status.message().to_owned(),
                        attempts: attempt as u32 + 1,
                    })
                }
                Err(_) => {
                    last = Status::deadline_exceeded(format!(
                        "no answer within {} ms",
                        config.timeout.as_millis()
                    ))
                }
            }
        }
        Err(Error::Rpc {
            rpc,
            code: last.code(),
            message: last.message().to_owned(),
            attempts: config.attempts,
        })
    }
}

/// A CANCELLED status seen by this client comes from the transport, not from the caller (who
/// owns the call): tonic reports its own deadline as "Timeout expired", and a connection lost
/// before the answer as "operation was canceled". Report them as what they are.
/// An UNKNOWN status with a source error is a transport failure too (the connection could not
/// be made or broke).
fn transport_status(s: Status, timeout: Duration) -> Status {
    let source = std::error::Error::source(&s).map(|e| {
        let mut chain = e.to_string();
        let mut next = e.source();
        while let Some(e) = next {
            chain = format!("{chain}: {e}");
            next = e.source();
        }
        chain
    });
    match (s.code(), source) {
        (Code::Cancelled, _) if s.message() == "Timeout expired" => {
            Status::deadline_exceeded(format!("no answer within {} ms", timeout.as_millis()))
        }
        (Code::Cancelled, _) => {
            Status::unavailable(format!("connection lost before the answer: {}", s.message()))
        }
        (Code::Unknown, Some(chain)) => Status::unavailable(format!("{}: {chain}", s.message())),
        _ => s,
    }
}

/// The node for `attempt` at a read of `shard`: the candidates in turn.
fn pick(t: &Topology, shard: ShardId, region: Option<&str>, attempt: usize) -> Option<u64> {
    let candidates = t.candidates(shard, region);
    (!candidates.is_empty()).then(|| candidates[attempt % candidates.len()])
}

pub(crate) fn shard_of(session_id: &str) -> Result<ShardId, Error> {
    session_id
        .parse::<SessionId>()
        .map(|id| id.shard)
        .map_err(|e| Error::InvalidArgument(format!("session_id {session_id:?}: {e}")))
}

fn channel(
    channels: &Mutex<HashMap<String, Channel>>,
    config: &ClientConfig,
    addr: &str,
) -> Result<Channel, Error> {
    let mut channels = channels.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = channels.get(addr) {
        return Ok(c.clone());
    }
    let url = topology::normalize_addr(addr);
    let url = match (&config.tls, url.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => url,
    };
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| Error::InvalidArgument(format!("address {addr:?}: {e}")))?
        .connect_timeout(config.timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    if let Some(tls) = &config.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| Error::InvalidArgument(format!("TLS for {addr:?}: {e}")))?;
    }
    let c = endpoint.connect_lazy();
    if channels.len() >= CHANNELS_MAX {
        channels.clear();
    }
    channels.insert(addr.to_owned(), c.clone());
    Ok(c)
}
