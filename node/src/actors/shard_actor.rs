//! `ShardActor`: one per local replica of a shard. It owns the shard's openraft handle, routes
//! checks to user actors (activating them from storage on demand, passivating idle ones, never
//! holding more than the configured number), forwards state-machine updates to them in apply
//! order, proposes writes, and drives the periodic purge while it leads.
//!
//! A user is activated on its second check within a while (see [`Doorkeeper`]); the first is
//! answered here from storage. Spawning an actor and stopping it again cost more than the check
//! it served, and checks spread over many users (1,000,000 sessions) mostly hit users checked
//! once, not again before they are passivated.

use super::user_actor::{answer, UserActor, UserArgs, UserMsg};
use super::{CheckAnswer, CheckQuery};
use crate::seams::Clock;
use cascade_core::model::UserState;
use cascade_protocol::command::{Command, Envelope};
use cascade_protocol::ids::{ShardId, UserKey};
use cascade_protocol::outcome::{Applied, Outcome, Verdict};
use cascade_raft::routing::propose_local_within;
use cascade_raft::sm::ShardReader;
use cascade_raft::typ::{NodeId, Raft};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Users scanned per purge command.
const PURGE_USERS_PER_COMMAND: u32 = 256;
/// How often idle user actors are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often a leader looks for jobs to drive (a new job also wakes it at once).
const JOB_TICK_INTERVAL: Duration = Duration::from_millis(250);
/// Longest wait for a purge or job step proposed by this actor; past it the outcome is unknown
/// and the next tick (or the next leader) proposes again. Without it a leader cut off from its
/// quorum (which openraft never answers) would keep purges and jobs "running" for good.
const BACKGROUND_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ShardActor;

/// Messages to a shard actor.
pub enum ShardMsg {
    Check(CheckQuery, RpcReplyPort<CheckAnswer>),
    GetUser(UserKey, RpcReplyPort<Option<Arc<UserState>>>),
    /// Published by the state machine after each applied batch, in apply order.
    Applied(Vec<(UserKey, Option<Arc<UserState>>)>),
    Status(RpcReplyPort<ShardStatusInfo>),
    /// Periodic: passivate idle user actors; propose a purge step when leading and due.
    Sweep,
    /// A purge step finished; continue after this user next time.
    PurgeProgress(Option<UserKey>),
    /// Drive the shard's running scan jobs if this replica leads and no driver runs.
    JobTick,
    /// The job driver stopped (nothing left to scan, or leadership lost).
    JobsIdle,
    /// Tests only: fail this actor, to exercise supervision.
    #[cfg(test)]
    Crash,
}

/// What `cascade status` shows per shard.
#[derive(Clone, Debug)]
pub struct ShardStatusInfo {
    pub shard: ShardId,
    pub leader: Option<NodeId>,
    pub role: String,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub live_user_actors: usize,
}

/// Everything a shard actor needs; cloneable so a supervisor can restart it.
#[derive(Clone)]
pub struct ShardArgs {
    pub shard: ShardId,
    pub node_prefix: String,
    pub raft: Raft,
    pub reader: ShardReader,
    pub clock: Arc<dyn Clock>,
    pub user_actors_max: usize,
    pub user_idle_ms: u64,
    pub purge_interval_ms: u64,
    /// Users per job scan step.
    pub job_step_users: u32,
    /// Pause between two rounds of job steps.
    pub job_step_pause_ms: u64,
}

struct LiveUser {
    actor: ActorRef<UserMsg>,
    /// Position in `ShardActorState::lru`.
    last_used: u64,
    /// Clock time of last use, for idle passivation.
    last_used_ms: u64,
}

/// The users checked once lately and not activated, by [`UserKey::hash64`]: two generations of
/// at most `generation_max` hashes each; when the newer is full the older is forgotten. A hash
/// collision only activates a user early.
struct Doorkeeper {
    newer: HashSet<u64>,
    older: HashSet<u64>,
    generation_max: usize,
}

impl Doorkeeper {
    fn new(generation_max: usize) -> Self {
        Doorkeeper { newer: HashSet::new(), older: HashSet::new(), generation_max: generation_max.max(1) }
    }

    /// Whether `hash` was seen in either generation; if not, it is remembered now.
    fn seen_before(&mut self, hash: u64) -> bool {
        if self.newer.contains(&hash) || self.older.contains(&hash) {
            return true;
        }
        if self.newer.len() >= self.generation_max {
            self.older = std::mem::take(&mut self.newer);
        }
        self.newer.insert(hash);
        false
    }
}

pub struct ShardActorState {
    args: ShardArgs,
    /// Users checked once lately: their next check activates them.
    doorkeeper: Doorkeeper,
    /// Live user actors by user.
    users: HashMap<UserKey, LiveUser>,
    /// Users by last use (a logical counter), oldest first, to pick whom to passivate.
    lru: BTreeMap<u64, UserKey>,
    /// Which user an actor id serves, to clean up after a crashed child.
    by_actor: HashMap<ActorId, UserKey>,
    /// Logical use counter.
    tick: u64,
    /// Purge cursor and when the next pass is due.
    purge_after: Option<UserKey>,
    purge_due_ms: u64,
    purge_running: bool,
    /// Whether a job driver task runs.
    jobs_running: bool,
}

impl ShardActorState {
    fn touch(&mut self, key: &UserKey, now_ms: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(live) = self.users.get_mut(key) {
            self.lru.remove(&live.last_used);
            live.last_used = tick;
            live.last_used_ms = now_ms;
            self.lru.insert(tick, key.clone());
        }
    }

    fn passivate(&mut self, key: &UserKey) {
        if let Some(live) = self.users.remove(key) {
            self.lru.remove(&live.last_used);
            self.by_actor.remove(&live.actor.get_id());
            live.actor.stop(Some("passivated".to_owned()));
        }
    }

    /// The live actor of `key`, activating it from storage if needed.
    async fn user_actor(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        key: &UserKey,
    ) -> Result<ActorRef<UserMsg>, ActorProcessingErr> {
        let now_ms = self.args.clock.now_ms();
        if self.users.contains_key(key) {
            self.touch(key, now_ms);
            return Ok(self.users[key].actor.clone());
        }
        while self.users.len() >= self.args.user_actors_max {
            let Some((_, oldest)) = self.lru.pop_first() else { break };
            self.passivate(&oldest);
        }
        // Loaded on this actor's task: every state-machine update published before this point
        // is already in storage, and every later one will be forwarded to the new actor.
        let user = self.args.reader.load_user(key)?.map(Arc::new);
        let args = UserArgs {
            key: key.clone(),
            user,
            reader: self.args.reader.clone(),
            clock: self.args.clock.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, UserActor, args, myself.get_cell()).await?;
        self.tick += 1;
        self.lru.insert(self.tick, key.clone());
        self.by_actor.insert(actor.get_id(), key.clone());
        self.users.insert(
            key.clone(),
            LiveUser { actor: actor.clone(), last_used: self.tick, last_used_ms: now_ms },
        );
        Ok(actor)
    }
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardActorState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ShardMsg>,
        args: ShardArgs,
    ) -> Result<ShardActorState, ActorProcessingErr> {
        myself.send_interval(SWEEP_INTERVAL, || ShardMsg::Sweep);
        myself.send_interval(JOB_TICK_INTERVAL, || ShardMsg::JobTick);
        let purge_due_ms = args.clock.now_ms().saturating_add(args.purge_interval_ms);
        Ok(ShardActorState {
            doorkeeper: Doorkeeper::new(args.user_actors_max),
            args,
            users: HashMap::new(),
            lru: BTreeMap::new(),
            by_actor: HashMap::new(),
            tick: 0,
            purge_after: None,
            purge_due_ms,
            purge_running: false,
            jobs_running: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Check(query, reply) => match state.args.reader.owner_of(&query.session_id)? {
                None => {
                    let applied_index = state.args.reader.applied_index();
                    let _ = reply.send(CheckAnswer { verdict: Verdict::Unknown, user: None, applied_index });
                }
                Some(key) if state.users.contains_key(&key) || state.doorkeeper.seen_before(key.hash64()) => {
                    let actor = state.user_actor(&myself, &key).await?;
                    actor.send_message(UserMsg::Check(query, reply))?;
                }
                Some(key) => {
                    // Read on this actor's task, like an activation: every update published
                    // before this point is already in storage.
                    let user = state.args.reader.load_user(&key)?.map(Arc::new);
                    let args = &state.args;
                    let _ = reply.send(answer(user, &args.reader, args.clock.as_ref(), &query));
                }
            },
            ShardMsg::GetUser(key, reply) => {
                let actor = state.user_actor(&myself, &key).await?;
                actor.send_message(UserMsg::Get(reply))?;
            }
            ShardMsg::Applied(users) => {
                for (key, user) in users {
                    if let Some(live) = state.users.get(&key) {
                        // A dead actor is cleaned up by supervision; its state is in storage.
                        let _ = live.actor.send_message(UserMsg::Update(user));
                    }
                }
            }
            ShardMsg::Status(reply) => {
                let _ = reply.send(status(state));
            }
            ShardMsg::Sweep => sweep(&myself, state),
            #[cfg(test)]
            ShardMsg::Crash => return Err("crash requested by a test".into()),
            ShardMsg::JobTick => drive_jobs(&myself, state),
            ShardMsg::JobsIdle => state.jobs_running = false,
            ShardMsg::PurgeProgress(next) => {
                state.purge_running = false;
                state.purge_after = next.clone();
                if next.is_none() {
                    state.purge_due_ms =
                        state.args.clock.now_ms().saturating_add(state.args.purge_interval_ms);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<ShardMsg>,
        event: SupervisionEvent,
        state: &mut ShardActorState,
    ) -> Result<(), ActorProcessingErr> {
        // A user actor that failed or stopped is forgotten; the next request rebuilds it from
        // storage. The shard actor itself keeps running.
        if let SupervisionEvent::ActorFailed(cell, _) | SupervisionEvent::ActorTerminated(cell, _, _) = event
        {
            if let Some(key) = state.by_actor.remove(&cell.get_id()) {
                if state.users.get(&key).is_some_and(|l| l.actor.get_id() == cell.get_id()) {
                    if let Some(live) = state.users.remove(&key) {
                        state.lru.remove(&live.last_used);
                    }
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<ShardMsg>,
        _state: &mut ShardActorState,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children(None);
        Ok(())
    }
}

fn sweep(myself: &ActorRef<ShardMsg>, state: &mut ShardActorState) {
    let now_ms = state.args.clock.now_ms();
    let idle: Vec<UserKey> = state
        .users
        .iter()
        .filter(|(_, l)| now_ms.saturating_sub(l.last_used_ms) >= state.args.user_idle_ms)
        .map(|(k, _)| k.clone())
        .collect();
    for key in idle {
        state.passivate(&key);
    }
    let leading = state.args.raft.metrics().borrow().current_leader == Some(state.args.raft_node_id());
    let due = state.purge_after.is_some() || now_ms >= state.purge_due_ms;
    if leading && due && !state.purge_running {
        state.purge_running = true;
        let raft = state.args.raft.clone();
        let shard = state.args.shard;
        let after = state.purge_after.clone();
        let envelope = Envelope::new(now_ms, Command::Purge { after, max_users: PURGE_USERS_PER_COMMAND });
        let me = myself.clone();
        tokio::spawn(async move {
            let next = match propose_local_within(&raft, shard, envelope, BACKGROUND_WRITE_TIMEOUT).await {
                Ok(Applied { outcome: Outcome::Purged { next, n_sessions, n_users }, .. }) => {
                    if n_sessions > 0 || n_users > 0 {
                        tracing::info!(shard, n_sessions, n_users, "purged sessions past retention");
                    }
                    next
                }
                Ok(other) => {
                    tracing::warn!(shard, ?other.outcome, "unexpected purge outcome");
                    None
                }
                Err(e) => {
                    tracing::debug!(shard, error = %e, "purge step not applied");
                    None
                }
            };
            let _ = me.send_message(ShardMsg::PurgeProgress(next));
        });
    }
}

/// While this replica leads, propose scan steps for every running filter job, round robin,
/// each from the cursor the replicated record holds (a step proposed twice counts once).
fn drive_jobs(myself: &ActorRef<ShardMsg>, state: &mut ShardActorState) {
    if state.jobs_running {
        return;
    }
    let leading = state.args.raft.metrics().borrow().current_leader == Some(state.args.raft_node_id());
    if !leading {
        return;
    }
    match state.args.reader.jobs() {
        Ok(jobs) if jobs.iter().any(|j| j.scanning()) => {}
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(shard = state.args.shard, error = %e, "reading jobs");
            return;
        }
    }
    state.jobs_running = true;
    let (raft, reader, clock, shard, me) = (
        state.args.raft.clone(),
        state.args.reader.clone(),
        state.args.clock.clone(),
        state.args.shard,
        myself.clone(),
    );
    let max_users = state.args.job_step_users;
    let pause = Duration::from_millis(state.args.job_step_pause_ms);
    tokio::spawn(async move {
        'drive: loop {
            let jobs = match reader.jobs() {
                Ok(jobs) => {
                    jobs.into_iter().filter(|j| j.scanning()).map(|j| (j.id, j.cursor)).collect::<Vec<_>>()
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, "reading jobs");
                    break;
                }
            };
            if jobs.is_empty() {
                break;
            }
            for (job, after) in jobs {
                let command = Command::JobStep { job, after, max_users };
                let envelope = Envelope::new(clock.now_ms(), command);
                if let Err(e) = propose_local_within(&raft, shard, envelope, BACKGROUND_WRITE_TIMEOUT).await {
                    tracing::debug!(shard, error = %e, "job step not applied; the next leader resumes");
                    break 'drive;
                }
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        let _ = me.send_message(ShardMsg::JobsIdle);
    });
}

impl ShardArgs {
    fn raft_node_id(&self) -> NodeId {
        self.raft.metrics().borrow().id
    }
}

fn status(state: &ShardActorState) -> ShardStatusInfo {
    let m = state.args.raft.metrics().borrow().clone();
    ShardStatusInfo {
        shard: state.args.shard,
        leader: m.current_leader,
        role: format!("{:?}", m.state),
        term: m.current_term,
        last_log_index: m.last_log_index.unwrap_or(0),
        applied_index: m.last_applied.map_or(0, |l| l.index),
        snapshot_index: m.snapshot.map_or(0, |l| l.index),
        live_user_actors: state.users.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::Doorkeeper;

    #[test]
    fn the_doorkeeper_remembers_two_generations_at_most() {
        let mut d = Doorkeeper::new(2);
        assert!(!d.seen_before(1));
        assert!(d.seen_before(1));
        assert!(!d.seen_before(2));
        // The newer generation {1, 2} is full: it becomes the older one.
        assert!(!d.seen_before(3));
        assert!(d.seen_before(1));
        assert!(!d.seen_before(4));
        // {3, 4} becomes the older generation; 1 and 2 are forgotten.
        assert!(!d.seen_before(5));
        assert!(!d.seen_before(1));
        assert!(d.newer.len() <= 2 && d.older.len() <= 2);
    }
}
