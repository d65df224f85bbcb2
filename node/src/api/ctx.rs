//! What request handlers share: the route to each shard actor with its in-flight bound, the
//! freshness gate of reads (P2), write routing to the shard's leader, forwarding of reads the
//! local replica cannot answer, the clock, and the node's settings.

use super::shard_map::ShardMap;
use super::status::ApiError;
use crate::actors::shard_actor::{ShardMsg, ShardStatusInfo};
use crate::actors::supervisor::ShardDirectory;
use crate::actors::{CheckAnswer, CheckQuery};
use crate::config::{NodeConfig, StaleReads};
use crate::seams::{Clock, Entropy};
use cascade_core::model::{ShardMeta, UserState};
use cascade_protocol::command::{Command, Envelope};
use cascade_protocol::ids::{ShardId, UserKey};
use cascade_protocol::limits::FieldError;
use cascade_protocol::outcome::Applied;
use cascade_protocol::pb::cascade_client::CascadeClient;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::HandOverRequest;
use cascade_raft::host::RaftHost;
use cascade_raft::network::{PeerChannel, PeerError};
use cascade_raft::routing::{self, ProposeError};
use cascade_raft::transfer;
use cascade_raft::typ::Raft;
use ractor::rpc::CallResult;
use ractor::RpcReplyPort;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Metadata key marking a request forwarded by another node: it is answered here or refused,
/// never forwarded again.
pub const FORWARDED_HEADER: &str = "x-cascade-forwarded-by";

/// How long a check may wait for its shard actor.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a write may wait for commit and apply.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leadership transfer may take, retries included.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two attempts of a transfer, this node waits this long to hear of the new leader.
pub const TRANSFER_RETRY_PAUSE: Duration = Duration::from_millis(300);
/// A transfer gives up after this many attempts whose target did not catch up with the log:
/// each held the shard's writes back for up to `transfer::HANDOVER_DRAIN`, and a target that is
/// down would stall writes for the whole `TRANSFER_TIMEOUT`.
pub const TRANSFER_LAGGING_MAX: u32 = 2;

pub struct NodeCtx {
    pub node_id: u64,
    pub region: String,
    pub addr: String,
    pub n_shards: u16,
    pub stale_reads: StaleReads,
    pub fault_injection: bool,
    /// Replicas per shard wanted when nodes are added or removed.
    pub replicas: usize,
    pub directory: ShardDirectory,
    pub host: Arc<RaftHost>,
    pub clock: Arc<dyn Clock>,
    /// How far `clock` runs from the host's clock (fault injection's `SetClockOffset`).
    pub clock_offset_ms: Arc<AtomicI64>,
    /// Where session ids and refresh secrets come from.
    pub entropy: Arc<dyn Entropy>,
    /// Requests in flight per shard.
    inflight: Vec<Arc<AtomicUsize>>,
    pub inflight_max: usize,
    pub touch_coalesce_ms: u64,
    /// Leaders of shards this node holds no replica of, learned from peers.
    pub shard_map: ShardMap,
    /// Random per process start (NodeStatus): tells a restarted node from one that never left.
    pub incarnation: u64,
    /// The cluster's nodes as configured (besides those in local shard memberships).
    configured_nodes: std::collections::BTreeMap<u64, String>,
    /// Shared by the node's `WatchRevocations` streams.
    pub watch: Arc<crate::api::watch::WatchHub>,
}

/// Holds one unit of a shard's in-flight bound until dropped.
struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl NodeCtx {
    pub fn new(
        config: &NodeConfig,
        directory: ShardDirectory,
        host: Arc<RaftHost>,
        clock: Arc<dyn Clock>,
        entropy: Arc<dyn Entropy>,
    ) -> NodeCtx {
        let n_shards = host.n_shards();
        let inflight = (0..n_shards).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        // The low 64 bits of a random 128-bit draw.
        let incarnation = entropy.u128() as u64;
        NodeCtx {
            node_id: config.node_id,
            region: config.region.clone(),
            addr: config.advertise_addr(),
            n_shards,
            stale_reads: config.stale_reads,
            fault_injection: config.fault_injection,
            replicas: config.cluster.replicas,
            directory,
            host,
            clock,
            clock_offset_ms: Arc::default(),
            entropy,
            inflight,
            inflight_max: config.shard_inflight_max,
            touch_coalesce_ms: config.touch_coalesce_ms,
            shard_map: ShardMap::default(),
            incarnation,
            configured_nodes: config.cluster.nodes.iter().map(|n| (n.id, n.addr.clone())).collect(),
            watch: Arc::default(),
        }
    }

    pub fn raft(&self, shard: ShardId) -> Result<Raft, ApiError> {
        self.host.raft(shard).ok_or(ApiError::NoShard { shard })
    }

    /// How stale the local replica of `shard` may be, if it can prove it is within the bound.
    pub fn staleness_ms(&self, shard: ShardId) -> Option<u64> {
        if cascade_core::planted::planted(cascade_core::planted::Bug::StaleLeaderRead) && self.leads(shard) {
            // Planted bug: take the leader role as proof of freshness.
            return Some(0);
        }
        self.host.freshness.staleness_ms(shard)
    }

    /// The refusal of a read this replica cannot prove fresh (P2: never a stale answer).
    pub fn stale(&self, shard: ShardId) -> ApiError {
        ApiError::Stale { shard, bound_ms: self.host.freshness.bound_ms }
    }

    /// Whether this node currently leads `shard` (by its own metrics; proves nothing about
    /// freshness, see freshness.rs).
    pub fn leads(&self, shard: ShardId) -> bool {
        self.host.raft(shard).is_some_and(|r| {
            let metrics = r.metrics();
            let m = metrics.borrow();
            m.current_leader == Some(self.node_id) && m.state.is_leader()
        })
    }

    /// Wait until this node, as leader, has confirmed with a quorum that it is current and has
    /// applied everything committed (a linearizable read point).
    /// A leader restored at startup reads at least its floor (see `Freshness::leader_floor`).
    pub async fn linearize(&self, shard: ShardId) -> Result<(), ApiError> {
        let raft = self.raft(shard)?;
        if transfer::is_quiet(self.node_id, shard) {
            // Handing the shard over; confirming the leadership now would keep it.
            return Err(self.stale(shard));
        }
        let floor = {
            let m = raft.metrics().borrow().clone();
            m.state.is_leader().then(|| {
                self.host.freshness.leader_floor(shard, m.current_term, m.last_log_index.unwrap_or(0))
            })
        };
        let read = async {
            raft.ensure_linearizable().await.map_err(|e| e.to_string())?;
            if let Some(floor) = floor {
                raft.wait(Some(CHECK_TIMEOUT))
                    .applied_index_at_least(Some(floor), "the leader's floor")
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        match tokio::time::timeout(CHECK_TIMEOUT, read).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(ApiError::Linearize { shard, reason }),
            Err(_) => Err(ApiError::Timeout {
                shard,
                timeout_ms: u64::try_from(CHECK_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// Whether this node holds a replica (voter or learner) of `shard`.
    pub fn is_replica(&self, shard: ShardId) -> bool {
        self.host.raft(shard).is_some_and(|r| {
            let metrics = r.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            let member = membership.voter_ids().chain(membership.learner_ids()).any(|id| id == self.node_id);
            member
        })
    }

    /// Every other node this node knows of: in any local shard's membership, or configured.
    fn peer_nodes(&self) -> std::collections::BTreeMap<u64, String> {
        let mut nodes = self.configured_nodes.clone();
        for shard in 0..self.n_shards {
            if let Some(raft) = self.host.raft(shard) {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                for (id, node) in m.membership_config.membership().nodes() {
                    nodes.insert(*id, node.addr.clone());
                }
            }
        }
        nodes.remove(&self.node_id);
        nodes
    }

    /// The leader of `shard` and its address: as the local replica knows it, or, on a node
    /// without a replica, as the peers report it.
    pub(crate) async fn leader_route(&self, shard: ShardId, raft: &Raft) -> Option<(u64, String)> {
        match routing::leader_of(raft) {
            Some((leader, node)) => Some((leader, node.addr)),
            None if !self.is_replica(shard) => {
                self.shard_map.leader(shard, &self.host.peers, &self.peer_nodes()).await
            }
            None => None,
        }
    }

    /// Run `call` against the public API of `shard`'s leader, marked as forwarded, with a
    /// deadline. Fails if the leader is unknown, is this node, or cannot be reached.
    pub async fn forward<Req, Resp, F, Fut>(
        &self,
        shard: ShardId,
        req: Req,
        call: F,
    ) -> Result<Resp, ApiError>
    where
        F: FnOnce(CascadeClient<PeerChannel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let raft = self.raft(shard)?;
        let Some((leader, addr)) = self.leader_route(shard, &raft).await else {
            return Err(self.stale(shard));
        };
        if leader == self.node_id {
            return Err(self.stale(shard));
        }
        // A client's request is worth one dial: wait out a reconnect backoff (at most
        // RECONNECT_BACKOFF_MAX, below the request's deadline) rather than refuse at once; right
        // after the leader restarted, the backoff from while it was down may not be over yet.
        let channel = match self.host.peers.channel(&addr) {
            Err(PeerError::BackingOff { retry_in_ms, .. }) => {
                // `retry_in_ms` is rounded down: one more millisecond is past the backoff.
                tokio::time::sleep(Duration::from_millis(retry_in_ms.saturating_add(1))).await;
                self.host.peers.channel(&addr)
            }
            other => other,
        }
        .map_err(|e| ApiError::Forward { shard, leader, reason: e.to_string() })?;
        let mut request = tonic::Request::new(req);
        request.set_timeout(CHECK_TIMEOUT);
        if let Ok(v) = self.node_id.to_string().parse() {
            request.metadata_mut().insert(FORWARDED_HEADER, v);
        }
        match call(CascadeClient::new(channel), request).await {
            Ok(resp) => {
                self.host.peers.answered(&addr);
                Ok(resp.into_inner())
            }
            Err(status) => {
                self.shard_map.forget(shard);
                Err(ApiError::Remote(status))
            }
        }
    }

    fn permit(&self, shard: ShardId) -> Result<Permit, ApiError> {
        let counter = self.inflight.get(usize::from(shard)).ok_or(ApiError::NoShard { shard })?;
        let before = counter.fetch_add(1, Ordering::AcqRel);
        let permit = Permit(counter.clone());
        if before >= self.inflight_max {
            return Err(ApiError::Busy { shard, inflight_max: self.inflight_max });
        }
        Ok(permit)
    }

    async fn call<T: Send + 'static>(
        &self,
        shard: ShardId,
        timeout: Duration,
        msg: impl FnOnce(RpcReplyPort<T>) -> ShardMsg,
    ) -> Result<T, ApiError> {
        let _permit = self.permit(shard)?;
        let actor = self.directory.get(shard).ok_or(ApiError::NoShard { shard })?;
        match actor.call(msg, Some(timeout)).await {
            Ok(CallResult::Success(v)) => Ok(v),
            Ok(CallResult::Timeout) => Err(ApiError::Timeout {
                shard,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
            Ok(CallResult::SenderError) => {
                Err(ApiError::Internal(format!("shard {shard} dropped the request")))
            }
            Err(e) => Err(ApiError::Internal(format!("shard {shard} actor unreachable: {e}"))),
        }
    }

    pub async fn check(&self, query: CheckQuery) -> Result<CheckAnswer, ApiError> {
        self.call(query.session_id.shard, CHECK_TIMEOUT, |r| ShardMsg::Check(query, r)).await
    }

    pub async fn user(&self, key: &UserKey) -> Result<Option<Arc<UserState>>, ApiError> {
        let shard = key.shard(self.n_shards);
        let key = key.clone();
        self.call(shard, CHECK_TIMEOUT, |r| ShardMsg::GetUser(key, r)).await
    }

    /// Stamp `command` with this node's clock and propose it to `shard`.
    pub async fn write(&self, shard: ShardId, command: Command) -> Result<Applied, ApiError> {
        let envelope = Envelope::new(self.clock.now_ms(), command);
        self.write_envelope(shard, envelope).await
    }

    /// Propose on the shard's leader, wherever it is, and wait for the outcome.
    pub async fn write_envelope(&self, shard: ShardId, envelope: Envelope) -> Result<Applied, ApiError> {
        let _permit = self.permit(shard)?;
        let raft = self.raft(shard)?;
        if self.is_replica(shard) {
            return Ok(routing::write(&raft, &self.host.peers, shard, envelope, WRITE_TIMEOUT).await?);
        }
        Ok(self.write_via_peers(shard, &raft, envelope).await?)
    }

    /// A write on a node without a replica of `shard`: proposed at the leader its peers report,
    /// retried with backoff only while nothing was certainly proposed (as `routing::write`).
    async fn write_via_peers(
        &self,
        shard: ShardId,
        raft: &Raft,
        envelope: Envelope,
    ) -> Result<Applied, ProposeError> {
        let start = tokio::time::Instant::now();
        let deadline = start + WRITE_TIMEOUT;
        let mut backoff = routing::RETRY_BACKOFF_MIN;
        loop {
            let attempt = match self.leader_route(shard, raft).await {
                Some((leader, addr)) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    routing::propose_remote(&self.host.peers, shard, leader, &addr, &envelope, left).await
                }
                None => Err(ProposeError::NotLeader { shard, node: self.node_id, leader: None }),
            };
            match attempt {
                Err(e) if e.retryable() => {
                    self.shard_map.forget(shard);
                    let now = tokio::time::Instant::now();
                    if now + backoff >= deadline {
                        let waited_ms = u64::try_from((now - start).as_millis()).unwrap_or(u64::MAX);
                        return Err(ProposeError::NoLeader { shard, waited_ms });
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(routing::RETRY_BACKOFF_MAX);
                }
                other => return other,
            }
        }
    }

    pub async fn shard_status(&self, shard: ShardId) -> Result<ShardStatusInfo, ApiError> {
        self.call(shard, CHECK_TIMEOUT, ShardMsg::Status).await
    }

    /// Make `to` the leader of `shard`, retrying until it leads or `TRANSFER_TIMEOUT` passes.
    /// The shard's leader hands over (see [`transfer::hand_over`]): here if this node leads it,
    /// otherwise asked through the Raft transport. A candidate that stood on a follower's word
    /// alone could lag the leader and lose, deposing it without replacing it.
    pub async fn transfer_leader(&self, shard: ShardId, to: u64) -> Result<(u64, u64), ApiError> {
        let raft = self.raft(shard)?;
        let fail = |reason: String| ApiError::Transfer { shard, reason };
        transfer::voter_addr(&raft, shard, to).map_err(|e| FieldError::new("to_node", e.to_string()))?;
        let start = tokio::time::Instant::now();
        let deadline = start + TRANSFER_TIMEOUT;
        let took = || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut last_error = String::from("the shard has no leader");
        let mut lagging = 0;
        while tokio::time::Instant::now() < deadline {
            let leader = raft.metrics().borrow().current_leader;
            let attempt = match leader {
                Some(l) if l == to => return Ok((to, took())),
                Some(l) if l == self.node_id => {
                    transfer::hand_over(&raft, &self.host.peers, shard, to).await.map_err(|e| {
                        let lagged = matches!(e, transfer::TransferError::Lagging { .. });
                        (e.to_string(), lagged)
                    })
                }
                Some(l) => self.remote_hand_over(&raft, shard, l, to, deadline).await,
                None => Err((String::from("the shard has no leader"), false)),
            };
            if let Err((e, lagged)) = attempt {
                tracing::info!(shard, to, leader, error = %e, "leadership transfer attempt failed");
                last_error = e;
                lagging += u32::from(lagged);
                if lagging >= TRANSFER_LAGGING_MAX {
                    return Err(fail(format!("gave up after {lagging} attempts: {last_error}")));
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let waited = raft
                .wait(Some(TRANSFER_RETRY_PAUSE.min(left)))
                .metrics(|m| m.current_leader == Some(to), "transfer")
                .await;
            if waited.is_ok() {
                return Ok((to, took()));
            }
        }
        Err(fail(format!("node {to} did not become the leader within {TRANSFER_TIMEOUT:?}: {last_error}")))
    }

    /// One handover attempt from this node, which should lead `shard` (see
    /// [`transfer::hand_over`]); leader balancing makes exactly one.
    pub async fn hand_over(&self, shard: ShardId, to: u64) -> Result<u64, ApiError> {
        let raft = self.raft(shard)?;
        let start = tokio::time::Instant::now();
        transfer::hand_over(&raft, &self.host.peers, shard, to)
            .await
            .map_err(|e| ApiError::Transfer { shard, reason: e.to_string() })?;
        Ok(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Ask `leader`, the shard's leader as this node last heard, to hand it over to `to`, by
    /// `deadline`. The error says whether the target had not caught up with the log.
    async fn remote_hand_over(
        &self,
        raft: &Raft,
        shard: ShardId,
        leader: u64,
        to: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), (String, bool)> {
        let addr = transfer::voter_addr(raft, shard, leader).map_err(|e| (e.to_string(), false))?.addr;
        let channel = self.host.peers.channel(&addr).map_err(|e| (e.to_string(), false))?;
        let mut request = tonic::Request::new(HandOverRequest { shard: u32::from(shard), to_node: to });
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        request.set_timeout((transfer::handover_max(raft) + CHECK_TIMEOUT).min(left));
        RaftTransportClient::new(channel)
            .hand_over(request)
            .await
            .map(|_| ())
            .map_err(|s| (format!("leader {leader}: {}", s.message()), s.code() == tonic::Code::Aborted))
    }

    /// Shard-wide watermarks of a shard as last applied here.
    pub fn meta(&self, shard: ShardId) -> Arc<ShardMeta> {
        self.host.reader(shard).map(|r| r.meta()).unwrap_or_default()
    }
}
