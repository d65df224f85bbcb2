//! `NodeSupervisor`: starts one shard actor per local replica and restarts any that fails, keeping
//! the [`ShardDirectory`] (what the API and the state-machine observer use to reach shard actors)
//! pointing at the live one.

use super::shard_actor::{ShardActor, ShardArgs, ShardMsg};
use cascade_core::model::UserState;
use cascade_protocol::ids::{ShardId, UserKey};
use cascade_protocol::outcome::RevocationEvent;
use cascade_raft::sm::ApplyObserver;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Restarts of one shard actor before the supervisor gives up (and the node stops serving that
/// shard loudly rather than flapping).
const SHARD_RESTARTS_MAX: u32 = 16;
/// How long a stopping supervisor waits for its shard actors to stop.
const CHILDREN_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The current shard actor of every local shard.
#[derive(Clone, Default)]
pub struct ShardDirectory {
    actors: Arc<RwLock<HashMap<ShardId, ActorRef<ShardMsg>>>>,
}

impl ShardDirectory {
    pub fn get(&self, shard: ShardId) -> Option<ActorRef<ShardMsg>> {
        self.actors.read().unwrap_or_else(|p| p.into_inner()).get(&shard).cloned()
    }

    fn set(&self, shard: ShardId, actor: ActorRef<ShardMsg>) {
        self.actors.write().unwrap_or_else(|p| p.into_inner()).insert(shard, actor);
    }
}

/// Forwards state-machine updates to the shard actor, which forwards them to live user actors.
pub struct DirectoryObserver(pub ShardDirectory);

impl ApplyObserver for DirectoryObserver {
    fn on_applied(
        &self,
        shard: ShardId,
        _applied_index: u64,
        users: &[(UserKey, Option<Arc<UserState>>)],
        _events: &[RevocationEvent],
    ) {
        if users.is_empty() {
            return;
        }
        if let Some(actor) = self.0.get(shard) {
            // If the actor is gone, its replacement starts with no cached users and loads them
            // from storage, which already holds this update.
            let _ = actor.send_message(ShardMsg::Applied(users.to_vec()));
        }
    }
}

pub struct NodeSupervisor;

pub struct SupervisorArgs {
    pub shards: Vec<ShardArgs>,
    pub directory: ShardDirectory,
}

pub struct SupervisorState {
    /// Arguments to restart each shard actor with.
    args: HashMap<ShardId, ShardArgs>,
    /// Which shard a child actor serves.
    by_actor: HashMap<ActorId, ShardId>,
    restarts: HashMap<ShardId, u32>,
    directory: ShardDirectory,
}

async fn start_shard(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    args: ShardArgs,
) -> Result<(), ActorProcessingErr> {
    let shard = args.shard;
    let name = format!("{}-shard-{shard}", args.node_prefix);
    let (actor, _) = Actor::spawn_linked(Some(name), ShardActor, args, myself.get_cell()).await?;
    state.by_actor.insert(actor.get_id(), shard);
    state.directory.set(shard, actor);
    Ok(())
}

/// The supervisor takes no requests; it only supervises.
pub enum SupervisorMsg {}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut state = SupervisorState {
            args: HashMap::new(),
            by_actor: HashMap::new(),
            restarts: HashMap::new(),
            directory: args.directory,
        };
        for shard_args in args.shards {
            state.args.insert(shard_args.shard, shard_args.clone());
            start_shard(&myself, &mut state, shard_args).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = event {
            let Some(shard) = state.by_actor.remove(&cell.get_id()) else { return Ok(()) };
            cell.stop_children(None);
            let n = state.restarts.entry(shard).or_insert(0);
            *n += 1;
            if *n > SHARD_RESTARTS_MAX {
                tracing::error!(shard, error = %err, "shard actor keeps failing; not restarting it");
                return Ok(());
            }
            tracing::warn!(shard, error = %err, restart = *n, "shard actor failed; restarting");
            if let Some(args) = state.args.get(&shard).cloned() {
                start_shard(&myself, state, args).await?;
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<SupervisorMsg>,
        _state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // Wait until every shard actor has stopped (and left ractor's process-wide registry), so a
        // node restarted in the same process can take the same names.
        myself.stop_children_and_wait(Some("node shutdown".to_owned()), Some(CHILDREN_STOP_WAIT)).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::shard_actor::{ShardArgs, ShardMsg};
    use crate::seams::SystemClock;
    use cascade_raft::host::{HostConfig, MemStorage, RaftHost, Storage};
    use cascade_raft::network::Peers;
    use std::time::{Duration, Instant};

    /// A failed shard actor is replaced by the supervisor, and the replacement serves the shard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_shard_actor_is_restarted() {
        let directory = ShardDirectory::default();
        let config = HostConfig::single(77, "127.0.0.1:1", 1, Default::default(), 1_000);
        let observer = Arc::new(DirectoryObserver(directory.clone()));
        let host =
            RaftHost::open(config, Storage::Memory(MemStorage::default()), Peers::default(), Some(observer))
                .await
                .expect("open");
        let shard = ShardArgs {
            shard: 0,
            node_prefix: "n77".into(),
            raft: host.raft(0).expect("shard"),
            reader: host.reader(0).expect("reader").clone(),
            clock: Arc::new(SystemClock),
            user_actors_max: 4,
            user_idle_ms: 60_000,
            purge_interval_ms: 60_000,
            job_step_users: 512,
            job_step_pause_ms: 0,
        };
        let args = SupervisorArgs { shards: vec![shard], directory: directory.clone() };
        let (supervisor, done) =
            Actor::spawn(Some("n77-supervisor".into()), NodeSupervisor, args).await.expect("spawn");
        let first = directory.get(0).expect("shard actor started");
        first.send_message(ShardMsg::Crash).expect("send");
        let deadline = Instant::now() + Duration::from_secs(10);
        let replacement = loop {
            if let Some(a) = directory.get(0).filter(|a| a.get_id() != first.get_id()) {
                break a;
            }
            assert!(Instant::now() < deadline, "shard actor was not restarted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let status = replacement.call(ShardMsg::Status, Some(Duration::from_secs(5))).await.expect("call");
        assert!(matches!(status, ractor::rpc::CallResult::Success(s) if s.shard == 0));
        supervisor.stop(None);
        let _ = done.await;
        host.shutdown().await.expect("shutdown");
    }
}
