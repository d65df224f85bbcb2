//! The actor tree: [`supervisor::NodeSupervisor`] → one [`shard_actor::ShardActor`] per local
//! replica → one [`user_actor::UserActor`] per active user. Actors hold caches and serialize
//! work; the durable state is in the shard's storage, so any actor can be rebuilt from it.

pub mod shard_actor;
pub mod supervisor;
pub mod user_actor;

use cascade_core::model::UserState;
use cascade_protocol::ids::SessionId;
use cascade_protocol::outcome::Verdict;
use std::sync::Arc;

/// A validity question.
#[derive(Clone, Debug)]
pub struct CheckQuery {
    pub session_id: SessionId,
    pub jkt: Option<String>,
    /// 0 = no requirement.
    pub required_aal: u8,
}

/// The answer to a [`CheckQuery`], with the facts a gateway needs about the session.
#[derive(Clone, Debug)]
pub struct CheckAnswer {
    pub verdict: Verdict,
    pub user: Option<Arc<UserState>>,
    /// Applied log index of the replica that answered.
    pub applied_index: u64,
}
