//! Checkers over a run's history, one file per property. Each returns the violations it found;
//! a run passes when there are none.
//!
//! The client oracle: an acknowledged write happened; a refused one did not; an unknown one
//! (timeout, lost connection, unavailable) may or may not have happened, and no checker may
//! assume either.

pub mod election_safety;
pub mod liveness;
pub mod model;
pub mod p1_durability;
pub mod p2_revocation_bound;
pub mod p3_cascade;
pub mod phantom;

use crate::history::History;
use serde::{Deserialize, Serialize};

/// A broken property, with enough detail to start debugging from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Violation {
    pub checker: String,
    pub detail: String,
}

impl Violation {
    pub fn new(checker: &'static str, detail: impl Into<String>) -> Violation {
        Violation { checker: checker.to_owned(), detail: detail.into() }
    }
}

/// What the checkers need to know about the run besides its history.
#[derive(Clone, Copy, Debug)]
pub struct RunLimits {
    /// The revocation bound P2 promises (ms).
    pub revocation_bound_ms: u64,
    /// When every fault was healed (ms on the history's clock).
    pub heal_at_ms: u64,
    /// How long after the heal the cluster had to converge (ms).
    pub converge_limit_ms: u64,
}

/// Every checker, in a fixed order.
pub fn check_all(limits: RunLimits, history: &History) -> Vec<Violation> {
    let model = model::Model::build(history);
    let mut v = Vec::new();
    v.extend(liveness::check(limits, history));
    v.extend(p1_durability::check(&model, history));
    v.extend(p2_revocation_bound::check(&model, history, limits.revocation_bound_ms));
    v.extend(p3_cascade::check(&model, history));
    v.extend(election_safety::check(history));
    v.extend(phantom::check(&model, history));
    v
}
