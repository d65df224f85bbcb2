//! How `apply` reaches a shard's storage without doing I/O itself. The state machine store
//! implements [`ShardView`] over sled (with a write-back overlay); [`MemShard`] implements it in
//! memory for tests, property tests and the simulator.

use crate::model::{ShardMeta, UserState};
use cascade_protocol::ids::{SessionId, UserKey};
use cascade_protocol::job::{Job, JobId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;

/// Storage seen by `apply`. Users are taken out and put back whole, which keeps the borrow
/// story simple and tells a store exactly which users a command changed.
pub trait ShardView {
    fn meta(&self) -> &ShardMeta;
    fn meta_mut(&mut self) -> &mut ShardMeta;
    /// Remove and return a user's state for modification; `put_user` must follow if it is kept.
    fn take_user(&mut self, key: &UserKey) -> Option<UserState>;
    /// Store a user's state (after `take_user`, or a new user).
    fn put_user(&mut self, user: UserState);
    /// The user owning a session, from the session index.
    fn session_owner(&mut self, id: &SessionId) -> Option<UserKey>;
    fn index_session(&mut self, id: SessionId, owner: &UserKey);
    fn unindex_session(&mut self, id: &SessionId);
    /// Up to `limit` user keys strictly after `after`, in key order (purge scans with this).
    fn users_after(&mut self, after: Option<&UserKey>, limit: usize) -> Vec<UserKey>;
    /// A copy of a user's state for reading only: nothing is marked changed.
    fn get_user(&mut self, key: &UserKey) -> Option<UserState>;
    /// The shard's record of a mass revocation job.
    fn job(&mut self, id: JobId) -> Option<Job>;
    fn put_job(&mut self, job: Job);
    fn remove_job(&mut self, id: JobId);
    /// Every job the shard keeps (at most [`crate::limits::JOBS_KEPT_MAX`]), by id.
    fn jobs(&mut self) -> Vec<Job>;
}

/// A whole shard in memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemShard {
    pub meta: ShardMeta,
    pub users: BTreeMap<UserKey, UserState>,
    pub session_index: BTreeMap<SessionId, UserKey>,
    pub jobs: BTreeMap<JobId, Job>,
}

impl MemShard {
    /// The user owning a session, without modifying anything (checks use this).
    pub fn user_of(&self, id: &SessionId) -> Option<&UserState> {
        self.session_index.get(id).and_then(|k| self.users.get(k))
    }
}

impl ShardView for MemShard {
    fn meta(&self) -> &ShardMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ShardMeta {
        &mut self.meta
    }
    fn take_user(&mut self, key: &UserKey) -> Option<UserState> {
        self.users.remove(key)
    }
    fn put_user(&mut self, user: UserState) {
        self.users.insert(user.key.clone(), user);
    }
    fn session_owner(&mut self, id: &SessionId) -> Option<UserKey> {
        self.session_index.get(id).cloned()
    }
    fn index_session(&mut self, id: SessionId, owner: &UserKey) {
        self.session_index.insert(id, owner.clone());
    }
    fn unindex_session(&mut self, id: &SessionId) {
        self.session_index.remove(id);
    }
    fn users_after(&mut self, after: Option<&UserKey>, limit: usize) -> Vec<UserKey> {
        let lower = match after {
            Some(k) => Bound::Excluded(k.clone()),
            None => Bound::Unbounded,
        };
        self.users.range((lower, Bound::Unbounded)).take(limit).map(|(k, _)| k.clone()).collect()
    }
    fn get_user(&mut self, key: &UserKey) -> Option<UserState> {
        self.users.get(key).cloned()
    }
    fn job(&mut self, id: JobId) -> Option<Job> {
        self.jobs.get(&id).cloned()
    }
    fn put_job(&mut self, job: Job) {
        self.jobs.insert(job.id, job);
    }
    fn remove_job(&mut self, id: JobId) {
        self.jobs.remove(&id);
    }
    fn jobs(&mut self) -> Vec<Job> {
        self.jobs.values().cloned().collect()
    }
}
