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
use crate::scenario::Scenario;
use serde::Serialize;

/// A broken property, with enough detail to start debugging from.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub checker: &'static str,
    pub detail: String,
}

impl Violation {
    pub fn new(checker: &'static str, detail: impl Into<String>) -> Violation {
        Violation { checker, detail: detail.into() }
    }
}

/// Every checker, in a fixed order.
pub fn check_all(scenario: &Scenario, history: &History) -> Vec<Violation> {
    let model = model::Model::build(history);
    let mut v = Vec::new();
    v.extend(liveness::check(scenario, history));
    v.extend(p1_durability::check(&model, history));
    v.extend(p2_revocation_bound::check(&model, history, crate::scenario::REVOCATION_BOUND_MS));
    v.extend(p3_cascade::check(&model, history));
    v.extend(election_safety::check(history));
    v.extend(phantom::check(&model, history));
    v
}
