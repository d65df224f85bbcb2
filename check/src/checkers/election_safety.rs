//! Raft election safety: at most one leader per shard and term.

use super::Violation;
use crate::history::History;
use std::collections::{BTreeMap, BTreeSet};

pub const NAME: &str = "election safety";

pub fn check(history: &History) -> Vec<Violation> {
    let mut by_term: BTreeMap<(u16, u64), BTreeSet<u64>> = BTreeMap::new();
    for l in &history.leaders {
        by_term.entry((l.shard, l.term)).or_default().insert(l.node);
    }
    by_term
        .into_iter()
        .filter(|(_, nodes)| nodes.len() > 1)
        .map(|((shard, term), nodes)| {
            Violation::new(NAME, format!("shard {shard} term {term} had leaders {nodes:?}"))
        })
        .collect()
}
