//! How a node starts and stops: `run(config, seams, shutdown)` is the only way.

use crate::actors::shard_actor::ShardArgs;
use crate::actors::supervisor::{DirectoryObserver, NodeSupervisor, ShardDirectory, SupervisorArgs};
use crate::api::cascade::CascadeService;
use crate::api::ctx::NodeCtx;
use crate::api::watch::{WatchHub, WatchObserver};
use crate::auth::{AuthLayer, Policy};
use crate::config::NodeConfig;
use crate::http::HttpState;
use crate::metrics::{Api, Metrics, MetricsLayer};
use crate::seams::{Clock, ClockDateLayer, OffsetClock, Seams};
use anyhow::Context;
use cascade_protocol::pb::cascade_server::CascadeServer;
use cascade_protocol::raft_pb::raft_transport_server::RaftTransportServer;
use cascade_raft::host::{HostConfig, RaftHost};
use cascade_raft::network::{TransportServer, RAFT_MESSAGE_BYTES_MAX};
use cascade_raft::typ::CascadeNode;
use futures::FutureExt;
use ractor::Actor;
use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

/// How long a stopping node waits for HTTP requests in flight.
const HTTP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest public API request (batches of checks are far below it).
const API_MESSAGE_BYTES_MAX: usize = 4 << 20;

/// Run a node until `shutdown` resolves: open storage, start every shard, the actor tree and the
/// gRPC services on `seams.listener`; then stop accepting, stop the actors and Raft, and flush.
pub async fn run(
    config: NodeConfig,
    seams: Seams,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let limits = config.limits.to_limits()?;
    let directory = ShardDirectory::default();
    let watch = Arc::new(WatchHub::with_caller_max(config.auth.watch_streams_per_key_max));
    let host_config = HostConfig {
        node_id: config.node_id,
        node: CascadeNode { addr: config.advertise_addr(), region: config.region.clone() },
        initial_nodes: config
            .cluster
            .nodes
            .iter()
            .map(|n| (n.id, CascadeNode { addr: n.addr.clone(), region: n.region.clone() }))
            .collect(),
        join: config.cluster.join,
        replicas: config.cluster.replicas,
        revocation_bound_ms: config.revocation_bound_ms,
        n_shards: config.shards,
        limits,
        snapshot_every_n_logs: config.snapshot_every_n_logs,
        heartbeat_ms: config.raft_heartbeat_ms,
        election_timeout_min_ms: config.raft_election_timeout_ms,
    };
    let clock_offset_ms = Arc::new(AtomicI64::new(0));
    let clock: Arc<dyn Clock> =
        Arc::new(OffsetClock { inner: seams.clock, offset_ms: clock_offset_ms.clone() });
    let metrics = Arc::new(Metrics::default());
    let observer = Arc::new(WatchObserver {
        directory: DirectoryObserver(directory.clone()),
        hub: watch.clone(),
        lag: Some((clock.clone(), metrics.clone())),
    });
    let mut peers = seams.peers;
    if let Some(key) = &config.auth.cluster_key {
        peers.set_cluster_key(key).map_err(anyhow::Error::msg)?;
    }
    let server_tls = match &config.tls {
        Some(tls) => {
            let (server, client) = crate::tls::load(tls)?;
            peers.set_tls(client);
            Some(server)
        }
        None => None,
    };
    let host = Arc::new(RaftHost::open(host_config, seams.storage, peers, Some(observer)).await?);
    if let Some(on_host) = seams.on_host {
        on_host(host.clone());
    }

    let node_prefix = seams.actor_prefix;
    let shards = (0..config.shards)
        .map(|shard| -> anyhow::Result<ShardArgs> {
            Ok(ShardArgs {
                shard,
                node_prefix: node_prefix.clone(),
                raft: host.raft(shard).context("shard missing from host")?,
                reader: host.reader(shard).context("shard reader missing from host")?.clone(),
                clock: clock.clone(),
                user_actors_max: config.user_actors_per_shard_max,
                user_idle_ms: config.user_idle_ms,
                purge_interval_ms: config.purge_interval_ms,
                job_step_users: config.job_step_users,
                job_step_pause_ms: config.job_step_pause_ms,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (supervisor, supervisor_done) = Actor::spawn(
        Some(format!("{node_prefix}-supervisor")),
        NodeSupervisor,
        SupervisorArgs { shards, directory: directory.clone() },
    )
    .await
    .context("start actors")?;

    let mut ctx = NodeCtx::new(&config, directory, host.clone(), clock, seams.entropy);
    ctx.clock_offset_ms = clock_offset_ms;
    ctx.watch = watch.clone();
    let ctx = Arc::new(ctx);
    let balancer = (config.cluster.leader_balance_ms > 0).then(|| {
        tokio::spawn(balance_leaders(ctx.clone(), Duration::from_millis(config.cluster.leader_balance_ms)))
    });
    let auth = Policy::new(&config.auth, metrics.clone());
    if auth.is_none() {
        tracing::warn!(
            node = config.node_id,
            "authentication is off: any caller may call any API (configure [auth])"
        );
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CascadeServer<CascadeService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cascade_protocol::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("build reflection service")?;
    let api = CascadeServer::new(CascadeService { ctx: ctx.clone() })
        .max_decoding_message_size(API_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(API_MESSAGE_BYTES_MAX);
    let transport = RaftTransportServer::new(TransportServer {
        shards: host.shards.clone(),
        freshness: host.freshness.clone(),
        votes_from: host.votes_from,
        peers: host.peers.clone(),
        elections: host.elections.clone(),
    })
    .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
    .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let hub = watch.clone();
    let shutdown = async move {
        shutdown.await;
        hub.close();
    }
    .shared();
    let http_tls = match (&config.tls, &seams.http_listener) {
        (Some(tls), Some(_)) => Some(crate::http::tls::acceptor(tls)?),
        _ => None,
    };
    let http = seams.http_listener.map(|listener| {
        let state = Arc::new(HttpState::new(ctx.clone(), metrics.clone(), config.dpop.clone(), auth.clone()));
        tracing::info!(node = config.node_id, addr = ?listener.local_addr().ok(), tls = http_tls.is_some(), "serving HTTP");
        tokio::spawn(crate::http::serve(listener, http_tls, state, shutdown.clone()))
    });
    let local = seams.listener.local_addr();
    tracing::info!(node = config.node_id, addr = ?local, shards = config.shards, "serving");
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls).context("TLS configuration")?;
    }
    let served = builder
        .http2_keepalive_interval(Some(cascade_raft::network::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(cascade_raft::network::KEEPALIVE_TIMEOUT))
        .layer(MetricsLayer { metrics, api: Api::Grpc })
        .layer(ClockDateLayer(ctx.clock.clone()))
        .layer(AuthLayer(auth))
        .add_service(api)
        .add_service(transport)
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(seams.listener.into_stream(), shutdown)
        .await;

    tracing::info!(node = config.node_id, "shutting down");
    if let Some(mut http) = http {
        // Graceful: requests in flight finish; a connection left open cannot hold the node up.
        match tokio::time::timeout(HTTP_DRAIN_TIMEOUT, &mut http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task failed"),
            Err(_) => {
                http.abort();
                let _ = http.await;
                tracing::warn!("HTTP connections still open after {HTTP_DRAIN_TIMEOUT:?}; closed");
            }
        }
    }
    if let Some(balancer) = balancer {
        balancer.abort();
        let _ = balancer.await;
    }
    supervisor.stop(Some("node shutdown".to_owned()));
    let _ = supervisor_done.await;
    host.shutdown().await?;
    served.context("grpc server")?;
    Ok(())
}

/// Every `every`, hand one shard's leadership over if this node leads more than its share
/// (`NodeCtx::balance_leaders_once`). Runs until aborted.
async fn balance_leaders(ctx: Arc<NodeCtx>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = ctx.balance_leaders_once().await {
            tracing::warn!(node = ctx.node_id, error = %e, "leader balancing round failed");
        }
    }
}

#[cfg(test)]
mod tests {
    /// `run` must be spawnable on a multi-threaded runtime (tests and embedders use `tokio::spawn`).
    #[test]
    fn run_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let dir = tempfile::tempdir().expect("tempdir");
        let seams = crate::seams::Seams::production(listener, dir.path(), 1);
        let fut = super::run(crate::config::NodeConfig::default(), seams, std::future::pending());
        assert_send(&fut);
    }
}
