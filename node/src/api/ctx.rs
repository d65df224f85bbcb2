//! What request handlers share: the route to each shard actor with its in-flight bound, the
//! clock, and the node's settings.

use super::status::ApiError;
use crate::actors::shard_actor::{ShardMsg, ShardStatusInfo};
use crate::actors::supervisor::ShardDirectory;
use crate::actors::{CheckAnswer, CheckQuery};
use crate::seams::Clock;
use cascade_core::model::{ShardMeta, UserState};
use cascade_protocol::command::{Command, Envelope};
use cascade_protocol::ids::{ShardId, UserKey};
use cascade_protocol::outcome::Applied;
use cascade_raft::host::RaftHost;
use ractor::rpc::CallResult;
use ractor::RpcReplyPort;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a check may wait for its shard actor.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a write may wait for commit and apply.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct NodeCtx {
    pub node_id: u64,
    pub region: String,
    pub n_shards: u16,
    pub directory: ShardDirectory,
    pub host: Arc<RaftHost>,
    pub clock: Arc<dyn Clock>,
    /// Requests in flight per shard.
    inflight: Vec<Arc<AtomicUsize>>,
    pub inflight_max: usize,
    pub touch_coalesce_ms: u64,
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
        node_id: u64,
        region: String,
        directory: ShardDirectory,
        host: Arc<RaftHost>,
        clock: Arc<dyn Clock>,
        inflight_max: usize,
        touch_coalesce_ms: u64,
    ) -> NodeCtx {
        let n_shards = host.n_shards();
        let inflight = (0..n_shards).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        NodeCtx {
            node_id,
            region,
            n_shards,
            directory,
            host,
            clock,
            inflight,
            inflight_max,
            touch_coalesce_ms,
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

    pub async fn write_envelope(&self, shard: ShardId, envelope: Envelope) -> Result<Applied, ApiError> {
        Ok(self.call(shard, WRITE_TIMEOUT, |r| ShardMsg::Write(envelope, r)).await??)
    }

    pub async fn shard_status(&self, shard: ShardId) -> Result<ShardStatusInfo, ApiError> {
        self.call(shard, CHECK_TIMEOUT, ShardMsg::Status).await
    }

    /// Shard-wide watermarks of a shard as last applied here.
    pub fn meta(&self, shard: ShardId) -> Arc<ShardMeta> {
        self.host.reader(shard).map(|r| r.meta()).unwrap_or_default()
    }
}
