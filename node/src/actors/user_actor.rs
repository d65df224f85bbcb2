//! `UserActor`: the cache of one active user's state. It serializes that user's checks with the
//! updates the state machine publishes, so a check that arrives after a write was acknowledged
//! sees the write. It never changes state itself: every change comes from the Raft log.

use super::{CheckAnswer, CheckQuery};
use crate::seams::Clock;
use cascade_core::model::UserState;
use cascade_core::validity::evaluate;
use cascade_protocol::ids::UserKey;
use cascade_raft::sm::ShardReader;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;

pub struct UserActor;

/// Messages to a user actor.
pub enum UserMsg {
    Check(CheckQuery, RpcReplyPort<CheckAnswer>),
    /// The user's whole state, for listings and touch coalescing.
    Get(RpcReplyPort<Option<Arc<UserState>>>),
    /// New state published by the state machine (`None`: the user was purged).
    Update(Option<Arc<UserState>>),
}

/// Start-up arguments: the state loaded from storage by the shard actor.
pub struct UserArgs {
    pub key: UserKey,
    pub user: Option<Arc<UserState>>,
    pub reader: ShardReader,
    pub clock: Arc<dyn Clock>,
}

pub struct UserActorState {
    /// Whose state this is.
    pub key: UserKey,
    /// Latest applied state of the user; `None` if the user does not exist (yet).
    pub user: Option<Arc<UserState>>,
    /// Shard-wide watermarks and the applied index come from here.
    pub reader: ShardReader,
    /// Time for evaluating expiry.
    pub clock: Arc<dyn Clock>,
}

impl Actor for UserActor {
    type Msg = UserMsg;
    type State = UserActorState;
    type Arguments = UserArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<UserMsg>,
        args: UserArgs,
    ) -> Result<UserActorState, ActorProcessingErr> {
        Ok(UserActorState { key: args.key, user: args.user, reader: args.reader, clock: args.clock })
    }

    async fn handle(
        &self,
        _myself: ActorRef<UserMsg>,
        msg: UserMsg,
        state: &mut UserActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            UserMsg::Check(query, reply) => {
                let _ = reply.send(answer(state.user.clone(), &state.reader, state.clock.as_ref(), &query));
            }
            UserMsg::Get(reply) => {
                let _ = reply.send(state.user.clone());
            }
            UserMsg::Update(user) => state.user = user,
        }
        Ok(())
    }
}

/// The answer to `q` from `user`'s state (`None`: no such user) and the shard's watermarks.
pub fn answer(
    user: Option<Arc<UserState>>,
    reader: &ShardReader,
    clock: &dyn Clock,
    q: &CheckQuery,
) -> CheckAnswer {
    let meta = reader.meta();
    let verdict = evaluate(
        &meta,
        user.as_deref(),
        &q.session_id,
        q.jkt.as_deref(),
        q.required_aal,
        // Never evaluate before the shard's own clock: a session is never younger than "now".
        clock.now_ms().max(meta.clock_ms),
    );
    CheckAnswer { verdict, user, applied_index: reader.applied_index() }
}
