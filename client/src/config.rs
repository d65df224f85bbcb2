//! What a gateway tunes: where the cluster is, deadlines, retries, and what the local cache does
//! when it cannot prove it is fresh.

use std::time::Duration;

/// How a [`crate::Client`] reaches the cluster.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Nodes to learn the cluster from (`host:port` or `http://host:port`); at least one.
    pub seeds: Vec<String>,
    /// Learn every node from the seeds and talk to each directly (default). Off: only the seeds
    /// are used, under the addresses given (a gateway that reaches the cluster through a proxy
    /// or a load balancer); a shard no seed holds is then served by forwarding, and cannot be
    /// cached locally.
    pub discover: bool,
    /// Replicas in this region are tried first (None: leaders first).
    pub region: Option<String>,
    /// Deadline of each attempt of a call (sent to the server as `grpc-timeout`).
    pub timeout: Duration,
    /// Attempts per call, the first included (at least 1). Retried: UNAVAILABLE, deadline
    /// exceeded, and transport failures; each retry goes to another replica when there is one.
    pub attempts: u32,
    /// Pause before the second attempt; doubled after each further one up to `backoff_max`,
    /// with up to 50% random jitter added.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// The cluster map (nodes, replicas, leaders) is refreshed after a failed attempt, but not
    /// more often than this.
    pub refresh_min: Duration,
    /// API key presented on every call (`authorization: Bearer <key>`), for clusters with
    /// authentication on; a gateway's key needs the `gateway` role.
    pub api_key: Option<String>,
    /// TLS to every node (`https://`), e.g. `ClientTlsConfig::new().ca_certificate(ca)`, with
    /// `.identity(..)` for clusters that require client certificates. None: plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ClientConfig {
    pub fn new<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> ClientConfig {
        ClientConfig {
            seeds: seeds.into_iter().map(Into::into).collect(),
            discover: true,
            region: None,
            timeout: Duration::from_millis(500),
            attempts: 3,
            backoff: Duration::from_millis(20),
            backoff_max: Duration::from_millis(500),
            refresh_min: Duration::from_millis(200),
            api_key: None,
            tls: None,
        }
    }

    /// `message` as a request with this configuration's deadline and API key.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(value) = self.api_key.as_ref().and_then(|k| format!("Bearer {k}").parse().ok()) {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }
}

/// What a local check does when the cache cannot prove it is fresh for the session's shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnStale {
    /// Refuse: the check returns [`crate::Error::Stale`] (the gateway answers 503 or 401).
    #[default]
    FailClosed,
    /// Ask the cluster with a remote check (which itself fails closed when the cluster cannot
    /// answer within the bound).
    Remote,
}

/// How a [`crate::LocalCache`] behaves.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// A shard is trusted while every revocation acknowledged more than this long ago is known
    /// to the cache. None: the cluster's revocation bound (its P2 promise).
    pub bound: Option<Duration>,
    pub on_stale: OnStale,
    /// Revoked sessions and watermarks held at most, over all shards. A shard whose events
    /// would go beyond it stops being trusted (fails closed or asks remotely) until the cache
    /// is rebuilt with a larger bound: forgetting a revocation is never an option.
    pub max_entries: usize,
    /// A revoked session is forgotten this long after its absolute expiry (the check refuses
    /// it as expired by then), which covers a gateway clock behind the cluster's.
    pub expiry_grace: Duration,
    /// How often expired revocations are pruned.
    pub prune_every: Duration,
    /// A stream with no message for this long (heartbeats come every fifth of the bound) is
    /// dropped and opened again, on another replica when there is one.
    pub idle_timeout: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            bound: None,
            on_stale: OnStale::FailClosed,
            max_entries: 4_000_000,
            expiry_grace: Duration::from_secs(60),
            prune_every: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(1),
        }
    }
}
