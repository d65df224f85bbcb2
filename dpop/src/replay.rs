//! The per-process replay cache of proof ids.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{DpopError, Verified};

/// Replay cache of proof ids: remembers (jkt, jti) until iat + window has passed, holds at most
/// `capacity` entries.
///
/// Use the same window as [`Policy::iat_window_ms`](crate::Policy::iat_window_ms), so that a proof
/// is remembered for as long as [`verify`](crate::verify) would accept it. The cache lives in one
/// process; several processes behind a load balancer each need to see all proofs of a key, or a
/// shared store.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    window_ms: u64,
    entries: Mutex<Entries>,
}

/// A proof id: (jkt, jti).
type Key = (String, String);

/// The entries, indexed by key and by expiry.
#[derive(Debug, Default)]
struct Entries {
    expiry_of: HashMap<Key, u64>,
    by_expiry: BTreeSet<(u64, Key)>,
}

impl ReplayCache {
    /// Creates an empty cache that holds at most `capacity` ids, each for `window_ms` after its iat.
    pub fn new(capacity: usize, window_ms: u64) -> Self {
        ReplayCache { capacity, window_ms, entries: Mutex::new(Entries::default()) }
    }

    /// Records the proof id of `v`.
    ///
    /// Returns `Ok(())` the first time a (jkt, jti) is seen within the window,
    /// [`DpopError::Replayed`] after, and [`DpopError::ReplayCacheFull`] when the cache is full of
    /// unexpired entries: a live entry is never dropped to make room. A proof whose iat + window
    /// has already passed is refused with [`DpopError::IatTooOld`], since it could not be
    /// remembered. Expired entries are dropped as `now_ms` advances.
    pub fn check_and_insert(&self, v: &Verified, now_ms: u64) -> Result<(), DpopError> {
        let expires_ms = v.iat_ms.saturating_add(self.window_ms);
        if expires_ms < now_ms {
            return Err(DpopError::IatTooOld {
                age_ms: now_ms.saturating_sub(v.iat_ms),
                window_ms: self.window_ms,
            });
        }
        let mut entries = self.lock();
        entries.prune(now_ms);
        let key = (v.jkt.clone(), v.jti.clone());
        if entries.expiry_of.contains_key(&key) {
            return Err(DpopError::Replayed);
        }
        if entries.expiry_of.len() >= self.capacity {
            return Err(DpopError::ReplayCacheFull { capacity: self.capacity });
        }
        // Map first: should the second insert fail, the id stays refused rather than forgotten.
        entries.expiry_of.insert(key.clone(), expires_ms);
        entries.by_expiry.insert((expires_ms, key));
        Ok(())
    }

    /// The number of entries held, including expired ones not yet dropped.
    pub fn len(&self) -> usize {
        self.lock().expiry_of.len()
    }

    /// Whether the cache holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Locks the entries. A poisoned lock is used as is: updates are ordered so that an
    /// interrupted one can only keep an id too long, never forget it.
    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Entries {
    /// Drops every entry whose expiry is before `now_ms`.
    fn prune(&mut self, now_ms: u64) {
        while let Some((expires_ms, _)) = self.by_expiry.first() {
            if *expires_ms >= now_ms {
                break;
            }
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.expiry_of.remove(&key);
            }
        }
    }
}
