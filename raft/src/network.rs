//! Inter-node Raft transport over tonic. One HTTP/2 channel per peer address carries every
//! shard's traffic (the shard travels in each message); every RPC has a deadline, because a
//! partition drops traffic silently. Append-entries of all shards to a peer share batch calls
//! (see `batch`). A snapshot travels as one client stream of chunks
//! (`StreamSnapshot`), installed by the receiver when the stream ends.

use crate::batch::{reply_of, AppendQueues, CallFailure, APPEND_BATCH_MAX};
use crate::conn::{lazy_channel, Dialer};
use crate::elections::Elections;
use crate::freshness::Freshness;
use crate::routing::{propose_local, ProposeError};
use crate::typ::{CascadeNode, NodeId, Raft, TypeConfig};
use cascade_protocol::codec;
use cascade_protocol::command::Envelope;
use cascade_protocol::ids::ShardId;
use cascade_protocol::outcome::Applied;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::raft_transport_server::RaftTransport;
use cascade_protocol::raft_pb::{
    ChangeVotersRequest, ChangeVotersResponse, ElectRequest, ElectResponse, HandOverRequest,
    HandOverResponse, HoldRequest, HoldResponse, RaftBatch, RaftBatchReply, RaftMessage, ReadIndexProof,
    ReadIndexRequest, ReadIndexResponse, RetireRequest, RetireResponse, SnapshotChunk,
};
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, Snapshot, SnapshotMeta, Vote};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// How long to wait for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// HTTP/2 pings on every peer connection, so a connection that silently stopped delivering
/// (a peer lost power, a partition ate its packets) is dropped and re-established instead of
/// timing out every RPC forever.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(1_000);
/// How long a ping may go unanswered before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(1_000);
/// After a connection to a peer could not be made, calls to it fail at once for this long
/// (doubling with each further failure, up to `RECONNECT_BACKOFF_MAX`) instead of dialing it
/// again for every shard's every RPC; the first call after the pause dials again. Any answer
/// from the peer ends the backoff.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(1_000);
/// Largest message a peer may send us (snapshot chunks are far below this).
pub const RAFT_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Data bytes per message of a streamed snapshot.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Deadline of telling a removed replica to stop campaigning (`Retire`).
pub const RETIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// A streamed snapshot is given openraft's per-RPC deadline (`install_snapshot_timeout`) for
/// every this many bytes (the same pace as its chunk-per-call transport with 4 MiB chunks).
pub const SNAPSHOT_BYTES_PER_TTL: usize = 4 << 20;
/// Largest snapshot a peer may stream to us (it is held in memory until installed).
pub const SNAPSHOT_BYTES_MAX: usize = 4 << 30;

/// Why a peer cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("link to {addr} is cut (fault injection)")]
    Cut { addr: String },
    #[error("bad peer address {addr}: {source}")]
    Address { addr: String, source: tonic::transport::Error },
    #[error("TLS to peer {addr}: {source}")]
    Tls { addr: String, source: tonic::transport::Error },
    #[error("peer {addr} refused connections; dialing it again in {retry_in_ms} ms")]
    BackingOff { addr: String, retry_in_ms: u64 },
}

/// Reconnection backoff of one peer address.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    retry_at: tokio::time::Instant,
    delay: Duration,
}

/// Metadata key of the cluster key nodes present to each other.
pub const CLUSTER_KEY_HEADER: &str = "x-cascade-cluster-key";

/// Adds the cluster key (when the cluster has one) to every request to a peer.
#[derive(Clone, Default)]
pub struct PeerAuth(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for PeerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(key) = &self.0 {
            request.metadata_mut().insert(CLUSTER_KEY_HEADER, key.clone());
        }
        Ok(request)
    }
}

/// A channel to a peer: requests on it carry the cluster key.
pub type PeerChannel = tonic::service::interceptor::InterceptedService<Channel, PeerAuth>;

/// The channels to every peer, shared by all shards of a node (and by request forwarding).
#[derive(Clone, Default)]
pub struct Peers {
    channels: Arc<Mutex<BTreeMap<String, PeerChannel>>>,
    /// Added to every request to a peer.
    auth: PeerAuth,
    /// TLS to peers (verifying them against the cluster CA, presenting this node's certificate).
    tls: Option<tonic::transport::ClientTlsConfig>,
    /// Addresses this node must not talk to: a test or drill hook that cuts links. Empty in
    /// normal operation.
    cut: Arc<RwLock<BTreeSet<String>>>,
    /// How to open a stream to a peer; `None`: TCP.
    dialer: Option<Dialer>,
    /// Peer address → the address actually dialed for it (a proxy, a tunnel). Peers not in it
    /// are dialed at their own address.
    routes: Arc<BTreeMap<String, String>>,
    /// Append-entries waiting to share a call to their peer (see `batch`).
    pub appends: AppendQueues,
    /// Peers whose last connection attempt failed (see `RECONNECT_BACKOFF_MIN`); one entry per
    /// peer address at most.
    backoff: Arc<Mutex<BTreeMap<String, Backoff>>>,
}

impl Peers {
    /// Peers reached through `dialer` instead of TCP (the simulator's network).
    pub fn with_dialer(dialer: Dialer) -> Peers {
        Peers { dialer: Some(dialer), ..Peers::default() }
    }

    /// Reach the peers listed in `routes` (advertised `host:port` → `host:port` to dial) through
    /// the given addresses, e.g. a fault proxy per link in the chaos harness.
    pub fn with_routes(routes: BTreeMap<String, String>) -> Peers {
        Peers { routes: Arc::new(routes), ..Peers::default() }
    }

    /// Present `key` to every peer (the cluster key). Call before the first channel is made.
    pub fn set_cluster_key(&mut self, key: &str) -> Result<(), String> {
        let value = key.parse().map_err(|_| "the cluster key must be printable ASCII".to_owned())?;
        self.auth = PeerAuth(Some(value));
        Ok(())
    }

    /// Talk to peers over TLS with `tls` (each peer's certificate is checked for the host of its
    /// advertised address). Call before the first channel is made.
    pub fn set_tls(&mut self, tls: tonic::transport::ClientTlsConfig) {
        self.tls = Some(tls);
    }

    /// Stop all traffic from this node to `addr` until [`Peers::heal`].
    pub fn cut(&self, addr: &str) {
        self.cut.write().unwrap_or_else(|p| p.into_inner()).insert(addr.to_owned());
    }

    /// The addresses currently cut.
    pub fn cut_links(&self) -> Vec<String> {
        self.cut.read().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Restore every cut link.
    pub fn heal(&self) {
        self.cut.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// A connection to `addr` could not be made: back off from it (see `RECONNECT_BACKOFF_MIN`).
    pub fn connect_failed(&self, addr: &str) {
        let now = tokio::time::Instant::now();
        let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let delay =
            backoff.get(addr).map_or(RECONNECT_BACKOFF_MIN, |b| (b.delay * 2).min(RECONNECT_BACKOFF_MAX));
        backoff.insert(addr.to_owned(), Backoff { retry_at: now + delay, delay });
    }

    /// `addr` answered: no backoff from it.
    pub fn answered(&self, addr: &str) {
        let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        if !backoff.is_empty() {
            backoff.remove(addr);
        }
    }

    /// The channel to `addr` (`host:port`), created lazily and reconnected by tonic when a call
    /// finds it broken; refused while backing off from a peer that refused connections.
    pub fn channel(&self, addr: &str) -> Result<PeerChannel, PeerError> {
        if self.cut.read().unwrap_or_else(|p| p.into_inner()).contains(addr) {
            return Err(PeerError::Cut { addr: addr.to_owned() });
        }
        if let Some(b) = self.backoff.lock().unwrap_or_else(|p| p.into_inner()).get(addr) {
            let left = b.retry_at.saturating_duration_since(tokio::time::Instant::now());
            if !left.is_zero() {
                let retry_in_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                return Err(PeerError::BackingOff { addr: addr.to_owned(), retry_in_ms });
            }
        }
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let dial = self.routes.get(addr).map_or(addr, String::as_str);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{dial}"))
            .map_err(|source| PeerError::Address { addr: dial.to_owned(), source })?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            // The certificate names the advertised address, whatever address is dialed.
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
            endpoint = endpoint
                .tls_config(tls.clone().domain_name(host))
                .map_err(|source| PeerError::Tls { addr: addr.to_owned(), source })?;
        }
        let channel = match &self.dialer {
            Some(dial) => lazy_channel(endpoint, addr, Arc::clone(dial)),
            None => endpoint.connect_lazy(),
        };
        let channel = tonic::service::interceptor::InterceptedService::new(channel, self.auth.clone());
        map.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// openraft's network factory for one shard.
pub struct NetworkFactory {
    pub shard: ShardId,
    pub peers: Peers,
    /// Sees the shard's vote replies (see [`Elections`]).
    pub elections: Option<Elections>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &CascadeNode) -> PeerConnection {
        PeerConnection {
            shard: self.shard,
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
            elections: self.elections.clone(),
        }
    }
}

/// A shard's view of one peer.
pub struct PeerConnection {
    shard: ShardId,
    target: NodeId,
    addr: String,
    peers: Peers,
    elections: Option<Elections>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, CascadeNode, RaftError<NodeId, E>>>;

impl PeerConnection {
    async fn call<Req, Resp, E>(&self, kind: RpcKind, req: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let msg = RaftMessage { shard: u32::from(self.shard), payload };
        let reply = match kind {
            RpcKind::Append => self.peers.appends.call(&self.peers, &self.addr, msg, option.hard_ttl()).await,
            RpcKind::Vote | RpcKind::Snapshot => self.unary(kind, msg, option.hard_ttl()).await,
        };
        let reply = match self.outcome(reply) {
            Ok(r) => r,
            Err(Failed::Unreachable(e)) => return Err(RPCError::Unreachable(e)),
            Err(Failed::Network(e)) => return Err(RPCError::Network(e)),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            codec::decode(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl PeerConnection {
    /// One call of its own (append-entries go through the peer's batch queue instead).
    async fn unary(
        &self,
        kind: RpcKind,
        msg: RaftMessage,
        timeout: Duration,
    ) -> Result<RaftMessage, CallFailure> {
        let channel = self.peers.channel(&self.addr).map_err(|e| CallFailure::Peer(e.to_string()))?;
        let mut client = RaftTransportClient::new(channel)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        let mut request = Request::new(msg);
        request.set_timeout(timeout);
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
        };
        reply.map(Response::into_inner).map_err(CallFailure::Status)
    }

    /// Note what a call's outcome says about the peer (see `RECONNECT_BACKOFF_MIN`).
    fn outcome(&self, reply: Result<RaftMessage, CallFailure>) -> Result<RaftMessage, Failed> {
        match reply {
            Ok(r) => {
                self.peers.answered(&self.addr);
                Ok(r)
            }
            Err(CallFailure::Peer(reason)) => {
                Err(Failed::Unreachable(Unreachable::new(&std::io::Error::other(reason))))
            }
            Err(CallFailure::Status(status)) if status.code() == tonic::Code::Unavailable => {
                if crate::routing::never_connected(&status) {
                    self.peers.connect_failed(&self.addr);
                } else {
                    self.peers.answered(&self.addr);
                }
                Err(Failed::Unreachable(Unreachable::new(&status)))
            }
            Err(CallFailure::Status(status)) => Err(Failed::Network(NetworkError::new(&status))),
            Err(CallFailure::Local(status)) if status.code() == tonic::Code::Unavailable => {
                Err(Failed::Unreachable(Unreachable::new(&status)))
            }
            Err(CallFailure::Local(status)) => Err(Failed::Network(NetworkError::new(&status))),
        }
    }
}

/// `data` as a stream of chunks of [`SNAPSHOT_CHUNK_BYTES`] for `shard`, `header` in the first.
fn snapshot_chunks(shard: u32, header: Vec<u8>, data: Vec<u8>) -> impl futures::Stream<Item = SnapshotChunk> {
    let n_chunks = data.len().div_ceil(SNAPSHOT_CHUNK_BYTES).max(1);
    let mut header = Some(header);
    futures::stream::iter((0..n_chunks).map(move |i| {
        let from = i * SNAPSHOT_CHUNK_BYTES;
        let to = (from + SNAPSHOT_CHUNK_BYTES).min(data.len());
        SnapshotChunk {
            shard,
            header: header.take().unwrap_or_default(),
            data: data.get(from..to).unwrap_or_default().to_vec(),
        }
    }))
}

/// Why a call to a peer failed, before its answer was read.
enum Failed {
    Unreachable(Unreachable),
    Network(NetworkError),
}

#[derive(Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(RpcKind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(RpcKind::Snapshot, &rpc, &option).await
    }

    /// The whole snapshot in one `StreamSnapshot` call (openraft's default sends one call per
    /// chunk), with openraft's deadline for every [`SNAPSHOT_BYTES_PER_TTL`] bytes.
    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let header = codec::encode(&(&vote, &snapshot.meta)).map_err(|e| NetworkError::new(&e))?;
        let data = snapshot.snapshot.into_inner();
        let ttls = u32::try_from(data.len().div_ceil(SNAPSHOT_BYTES_PER_TTL).max(1)).unwrap_or(u32::MAX);
        let channel = self.peers.channel(&self.addr).map_err(|e| Unreachable::new(&e))?;
        let mut client = RaftTransportClient::new(channel)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
        let mut request = Request::new(snapshot_chunks(u32::from(self.shard), header, data));
        request.set_timeout(option.hard_ttl().saturating_mul(ttls));
        let reply = tokio::select! {
            reply = client.stream_snapshot(request) => reply,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let reply = match self.outcome(reply.map(Response::into_inner).map_err(CallFailure::Status)) {
            Ok(r) => r,
            Err(Failed::Unreachable(e)) => return Err(StreamingError::Unreachable(e)),
            Err(Failed::Network(e)) => return Err(StreamingError::Network(e)),
        };
        let result: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> =
            codec::decode(&reply.payload).map_err(|e| NetworkError::new(&e))?;
        result.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        let resp = self.call(RpcKind::Vote, &rpc, &option).await?;
        if let Some(elections) = &self.elections {
            elections.observe(self.shard, &rpc, &resp);
        }
        Ok(resp)
    }
}

/// The shards this node hosts, looked up by the transport server. Filled as shards start.
#[derive(Clone, Default)]
pub struct ShardTable {
    rafts: Arc<RwLock<BTreeMap<ShardId, Raft>>>,
}

impl ShardTable {
    pub fn insert(&self, shard: ShardId, raft: Raft) {
        self.rafts.write().unwrap_or_else(|p| p.into_inner()).insert(shard, raft);
    }

    pub fn get(&self, shard: ShardId) -> Option<Raft> {
        self.rafts.read().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned()
    }

    pub fn all(&self) -> Vec<(ShardId, Raft)> {
        self.rafts.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(s, r)| (*s, r.clone())).collect()
    }
}

/// The tonic service peers call.
pub struct TransportServer {
    pub shards: ShardTable,
    pub freshness: Arc<Freshness>,
    /// Votes are refused before this instant (see `RaftHost::votes_from`).
    pub votes_from: tokio::time::Instant,
    /// This node's channels to its peers (a handover asks the target to stand through them).
    pub peers: Peers,
    /// This node's election helpers (`Hold` goes to them).
    pub elections: Elections,
}

impl TransportServer {
    async fn append_one(&self, msg: RaftMessage) -> Result<RaftMessage, Status> {
        let raft = self.shard(&msg)?;
        let req: AppendEntriesRequest<TypeConfig> = decode_request(&msg)?;
        consecutive(&req).map_err(|e| {
            tracing::error!(shard = msg.shard, leader = %req.vote, error = %e, "append-entries refused");
            Status::invalid_argument(e)
        })?;
        reply(msg.shard, &raft.append_entries(req).await).map(Response::into_inner)
    }

    fn shard(&self, msg: &RaftMessage) -> Result<Raft, Status> {
        self.hosted(msg.shard).map(|(_, raft)| raft)
    }

    /// Shard `shard` of a request, and its replica here.
    fn hosted(&self, shard: u32) -> Result<(ShardId, Raft), Status> {
        let id = ShardId::try_from(shard)
            .map_err(|_| Status::invalid_argument(format!("shard {shard} out of range")))?;
        let raft =
            self.shards.get(id).ok_or_else(|| Status::not_found(format!("shard {id} is not hosted here")))?;
        Ok((id, raft))
    }
}

fn decode_request<T: DeserializeOwned>(msg: &RaftMessage) -> Result<T, Status> {
    codec::decode(&msg.payload).map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))
}

/// Entries of an append-entries request must follow its `prev_log_id` one index after another:
/// openraft appends them without looking (a debug build asserts), so a request from a faulty or
/// hostile peer could otherwise leave a gap in the log.
fn consecutive(req: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    let first = req.prev_log_id.map_or(0, |p| p.index + 1);
    for (expected, entry) in (first..).zip(&req.entries) {
        if entry.log_id.index != expected {
            return Err(format!(
                "append-entries entries are not consecutive: prev_log_id {}, expected index {expected}, got {} ({} entries from {})",
                req.prev_log_id.map_or_else(|| "none".to_owned(), |p| p.to_string()),
                entry.log_id,
                req.entries.len(),
                req.entries.first().map_or_else(String::new, |e| e.log_id.to_string()),
            ));
        }
    }
    Ok(())
}

fn reply<T: Serialize>(shard: u32, value: &T) -> Result<Response<RaftMessage>, Status> {
    let payload = codec::encode(value).map_err(|e| Status::internal(format!("encode raft reply: {e}")))?;
    Ok(Response::new(RaftMessage { shard, payload }))
}

#[tonic::async_trait]
impl RaftTransport for TransportServer {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.append_one(request.into_inner()).await.map(Response::new)
    }

    async fn append_entries_batch(
        &self,
        request: Request<RaftBatch>,
    ) -> Result<Response<RaftBatchReply>, Status> {
        let batch = request.into_inner();
        if batch.messages.len() > APPEND_BATCH_MAX {
            return Err(Status::invalid_argument(format!(
                "{} append-entries in one batch; at most {APPEND_BATCH_MAX}",
                batch.messages.len()
            )));
        }
        let answers = futures::future::join_all(batch.messages.into_iter().map(|m| self.append_one(m))).await;
        Ok(Response::new(RaftBatchReply { replies: answers.into_iter().map(reply_of).collect() }))
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        if tokio::time::Instant::now() < self.votes_from {
            return Err(Status::unavailable("started on empty storage: not voting yet"));
        }
        let msg = request.into_inner();
        let raft = self.shard(&msg)?;
        let req: VoteRequest<NodeId> = decode_request(&msg)?;
        let requested = req.vote.to_string();
        let resp = raft.vote(req).await;
        tracing::debug!(
            shard = msg.shard,
            requested,
            granted = ?resp.as_ref().map(|r| (r.vote_granted, r.vote.to_string())),
            "vote"
        );
        reply(msg.shard, &resp)
    }

    async fn install_snapshot(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let raft = self.shard(&msg)?;
        let req: InstallSnapshotRequest<TypeConfig> = decode_request(&msg)?;
        reply(msg.shard, &raft.install_snapshot(req).await)
    }

    async fn stream_snapshot(
        &self,
        request: Request<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut chunks = request.into_inner();
        let first =
            chunks.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let (_, raft) = self.hosted(first.shard)?;
        let (vote, meta): (Vote<NodeId>, SnapshotMeta<NodeId, CascadeNode>) = codec::decode(&first.header)
            .map_err(|e| Status::invalid_argument(format!("snapshot header: {e}")))?;
        let mut data = first.data;
        while let Some(chunk) = chunks.message().await? {
            if chunk.shard != first.shard || !chunk.header.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk for shard {} with a {}-byte header in the stream of shard {}",
                    chunk.shard,
                    chunk.header.len(),
                    first.shard
                )));
            }
            if data.len().saturating_add(chunk.data.len()) > SNAPSHOT_BYTES_MAX {
                return Err(Status::resource_exhausted(format!(
                    "snapshot larger than {SNAPSHOT_BYTES_MAX} bytes (SNAPSHOT_BYTES_MAX)"
                )));
            }
            data.extend_from_slice(&chunk.data);
        }
        if data.len() > SNAPSHOT_BYTES_MAX {
            return Err(Status::resource_exhausted(format!(
                "snapshot larger than {SNAPSHOT_BYTES_MAX} bytes"
            )));
        }
        let snapshot = Snapshot { meta, snapshot: Box::new(Cursor::new(data)) };
        reply(first.shard, &raft.install_full_snapshot(vote, snapshot).await)
    }

    async fn propose(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let msg = request.into_inner();
        let raft = self.shard(&msg)?;
        let envelope: Envelope = decode_request(&msg)?;
        let shard = ShardId::try_from(msg.shard).unwrap_or(ShardId::MAX);
        // Never forwarded again from here: a node that is not the leader says so and the
        // proposing node retries with what it learns.
        let result: Result<Applied, ProposeError> = propose_local(&raft, shard, envelope).await;
        reply(msg.shard, &result)
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let req = request.into_inner();
        if req.shards.len() > usize::from(u16::MAX) {
            return Err(Status::invalid_argument("too many shards in one read-index request"));
        }
        let proofs = req
            .shards
            .iter()
            .map(|&s| {
                let proof = ShardId::try_from(s).ok().and_then(|shard| {
                    let raft = self.shards.get(shard)?;
                    let leading = {
                        let metrics = raft.metrics();
                        let m = metrics.borrow();
                        m.current_leader == Some(m.id) && m.state.is_leader()
                    };
                    leading.then(|| self.freshness.leader_proof(shard)).flatten()
                });
                match proof {
                    Some((read_index, age_ms)) => ReadIndexProof { shard: s, ok: true, read_index, age_ms },
                    None => ReadIndexProof { shard: s, ok: false, read_index: 0, age_ms: 0 },
                }
            })
            .collect();
        Ok(Response::new(ReadIndexResponse { proofs }))
    }

    async fn elect(&self, request: Request<ElectRequest>) -> Result<Response<ElectResponse>, Status> {
        let shard = request.into_inner().shard;
        let (_, raft) = self.hosted(shard)?;
        raft.trigger().elect().await.map_err(|e| Status::unavailable(format!("shard {shard}: {e}")))?;
        Ok(Response::new(ElectResponse {}))
    }

    async fn hold(&self, request: Request<HoldRequest>) -> Result<Response<HoldResponse>, Status> {
        let r = request.into_inner();
        let (shard, _) = self.hosted(r.shard)?;
        self.elections.hold(shard, Duration::from_millis(u64::from(r.hold_ms)));
        Ok(Response::new(HoldResponse {}))
    }

    async fn retire(&self, request: Request<RetireRequest>) -> Result<Response<RetireResponse>, Status> {
        let r = request.into_inner();
        let (shard, _) = self.hosted(r.shard)?;
        self.elections.retire(shard, r.membership_index);
        Ok(Response::new(RetireResponse {}))
    }

    async fn hand_over(
        &self,
        request: Request<HandOverRequest>,
    ) -> Result<Response<HandOverResponse>, Status> {
        let r = request.into_inner();
        let (shard, raft) = self.hosted(r.shard)?;
        match crate::transfer::hand_over(&raft, &self.peers, shard, r.to_node).await {
            Ok(()) => Ok(Response::new(HandOverResponse {})),
            Err(e @ crate::transfer::TransferError::NotLeader { .. }) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(e @ crate::transfer::TransferError::NotVoter { .. }) => {
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e @ crate::transfer::TransferError::Lagging { .. }) => Err(Status::aborted(e.to_string())),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn change_voters(
        &self,
        request: Request<ChangeVotersRequest>,
    ) -> Result<Response<ChangeVotersResponse>, Status> {
        Ok(Response::new(self.change_voters_impl(request.into_inner()).await?))
    }
}

impl TransportServer {
    /// Tell the voters of `before` that the shard's current membership dropped to stop
    /// campaigning (see `Elections::retire`). Best effort: one call each with a deadline; a
    /// removed node that is down is told nothing (it was most likely removed for being down).
    async fn retire_removed(
        &self,
        raft: &Raft,
        shard: u32,
        before: &openraft::Membership<NodeId, CascadeNode>,
    ) {
        let (me, after, index) = {
            let m = raft.metrics().borrow().clone();
            let after: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
            (m.id, after, m.membership_config.log_id().map_or(0, |l| l.index))
        };
        let removed = before.voter_ids().filter(|id| !after.contains(id));
        let calls = removed.filter_map(|id| before.get_node(&id).map(|n| (id, n.addr.clone()))).map(|(id, addr)| async move {
            if id == me {
                if let Ok(s) = ShardId::try_from(shard) {
                    self.elections.retire(s, index);
                }
                return;
            }
            let Ok(channel) = self.peers.channel(&addr) else { return };
            let mut request = Request::new(RetireRequest { shard, membership_index: index });
            request.set_timeout(RETIRE_TIMEOUT);
            if let Err(s) = RaftTransportClient::new(channel).retire(request).await {
                tracing::info!(shard, node = id, error = %s.message(), "could not tell a removed replica to stop campaigning");
            }
        });
        futures::future::join_all(calls).await;
    }

    async fn change_voters_impl(&self, r: ChangeVotersRequest) -> Result<ChangeVotersResponse, Status> {
        let (_, raft) = self.hosted(r.shard)?;
        let voters = r
            .voters
            .into_iter()
            .map(|v| (v.node_id, CascadeNode { addr: v.addr, region: v.region }))
            .collect();
        let before = raft.metrics().borrow().membership_config.membership().clone();
        match crate::membership::change_voters(&raft, voters).await {
            Ok(()) => {
                self.retire_removed(&raft, r.shard, &before).await;
                Ok(ChangeVotersResponse {})
            }
            Err(e @ crate::membership::MembershipError::NotLeader { .. }) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(e) => Err(Status::unavailable(format!("shard {}: {e}", r.shard))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{consecutive, PeerError, Peers, RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN};
    use crate::typ::{Entry, TypeConfig};
    use openraft::raft::AppendEntriesRequest;
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};

    fn request(prev: Option<u64>, indexes: &[u64]) -> AppendEntriesRequest<TypeConfig> {
        let log_id = |index| LogId::new(CommittedLeaderId::new(4, 1), index);
        AppendEntriesRequest {
            vote: Vote::new_committed(4, 1),
            prev_log_id: prev.map(log_id),
            entries: indexes
                .iter()
                .map(|i| Entry { log_id: log_id(*i), payload: EntryPayload::Blank })
                .collect(),
            leader_commit: None,
        }
    }

    /// A request whose entries do not follow its prev_log_id (a leader that read a range purged
    /// under it sent one) is refused before openraft appends it with a gap.
    #[test]
    fn append_entries_must_follow_prev_log_id() {
        assert!(consecutive(&request(Some(88), &[89, 90, 91])).is_ok());
        assert!(consecutive(&request(None, &[0, 1])).is_ok());
        assert!(consecutive(&request(Some(88), &[])).is_ok());
        let gap = consecutive(&request(Some(88), &[141, 142])).expect_err("a gap");
        assert!(gap.contains("expected index 89"), "{gap}");
        assert!(consecutive(&request(Some(88), &[89, 91])).is_err());
        assert!(consecutive(&request(None, &[1])).is_err());
    }

    fn backing_off_ms(peers: &Peers, addr: &str) -> Option<u64> {
        match peers.channel(addr) {
            Err(PeerError::BackingOff { retry_in_ms, .. }) => Some(retry_in_ms),
            _ => None,
        }
    }

    /// A peer that refused a connection is not dialed again before a pause that doubles with
    /// each failure, up to the maximum; an answer ends it.
    #[tokio::test(start_paused = true)]
    async fn a_peer_refusing_connections_is_dialed_again_after_a_growing_pause() {
        let peers = Peers::default();
        let addr = "127.0.0.1:9";
        assert!(peers.channel(addr).is_ok());
        peers.connect_failed(addr);
        assert_eq!(backing_off_ms(&peers, addr), Some(50));
        tokio::time::advance(RECONNECT_BACKOFF_MIN).await;
        assert!(peers.channel(addr).is_ok(), "dialed again once the pause is over");
        peers.connect_failed(addr);
        assert_eq!(backing_off_ms(&peers, addr), Some(100));
        for _ in 0..10 {
            peers.connect_failed(addr);
        }
        assert_eq!(backing_off_ms(&peers, addr), Some(RECONNECT_BACKOFF_MAX.as_millis() as u64));
        assert!(peers.channel("127.0.0.1:10").is_ok(), "other peers are not affected");
        peers.answered(addr);
        assert!(peers.channel(addr).is_ok());
    }

    /// What tonic reports for a port nobody listens on counts as "never connected" (the call
    /// that starts a backoff, and a forwarded write that may be retried).
    #[tokio::test]
    async fn a_refused_connection_is_recognized() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let peers = Peers::default();
        let channel = peers.channel(&addr).expect("channel");
        let mut client = cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient::new(channel);
        let status = client
            .append_entries(cascade_protocol::raft_pb::RaftMessage { shard: 0, payload: Vec::new() })
            .await
            .expect_err("nobody listens");
        assert!(crate::routing::never_connected(&status), "{status:?}");
    }
}
