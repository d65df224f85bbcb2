//! RTO per fault: from the fault's start to the first moment after which the probe's writes
//! succeed on every shard for a sustained window (on the history's clock: virtual time in the
//! simulator, real time in the chaos harness).

use crate::history::{History, OpKind, OpResult};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Success must hold this long (on every shard) to count as recovered.
pub const SUSTAINED_MS: u64 = 1_000;

/// One injected fault: what and when (ms on the history's clock).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultWindow {
    pub kind: String,
    pub at_ms: u64,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRto {
    pub fault: usize,
    pub kind: String,
    pub at_ms: u64,
    pub duration_ms: u64,
    /// `None`: not recovered before the next fault (or the heal).
    pub rto_ms: Option<u64>,
    /// Probe writes that failed between the fault and recovery.
    pub failed_probes: usize,
}

/// RTO of each of `faults` (in time order); a fault's window ends at the next fault's start, the
/// last one's at `heal_at_ms`.
pub fn per_fault(faults: &[FaultWindow], heal_at_ms: u64, history: &History) -> Vec<FaultRto> {
    // Probe rounds: shard -> round -> (invoke_ms of the round's first attempt, complete_ms of
    // its last, succeeded).
    let mut by_round: BTreeMap<u16, BTreeMap<u32, (u64, u64, bool)>> = BTreeMap::new();
    for op in &history.ops {
        let OpKind::Probe { shard, round, .. } = op.kind else { continue };
        let ok = matches!(op.result, OpResult::Created { .. });
        let r =
            by_round.entry(shard).or_default().entry(round).or_insert((op.invoke_ms, op.complete_ms, false));
        r.0 = r.0.min(op.invoke_ms);
        r.1 = r.1.max(op.complete_ms);
        r.2 |= ok;
    }
    let rounds: BTreeMap<u16, Vec<(u64, u64, bool)>> =
        by_round.into_iter().map(|(shard, r)| (shard, r.into_values().collect())).collect();
    faults
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let end = faults.get(i + 1).map_or(heal_at_ms, |n| n.at_ms);
            let mut recovered_at = Some(f.at_ms);
            let mut failed = 0;
            for list in rounds.values() {
                // Rounds that started after the fault and ended before the next phase (a round
                // still running when the next fault hits says nothing about this one).
                let window: Vec<(u64, bool)> = list
                    .iter()
                    .filter(|(t, done, _)| *t >= f.at_ms && *done < end)
                    .map(|&(t, _, ok)| (t, ok))
                    .collect();
                failed += window.iter().filter(|(_, ok)| !ok).count();
                // No failure: unaffected. Otherwise the first success after the last failure, if
                // the success lasts (or lasts until the window ends).
                let shard_recovered = match window.iter().rposition(|(_, ok)| !ok) {
                    None => Some(f.at_ms),
                    Some(p) => window.get(p + 1).map(|(t, _)| *t).filter(|&t| {
                        let last_t = window.last().map_or(t, |(lt, _)| *lt);
                        last_t >= t + SUSTAINED_MS.min(end.saturating_sub(t + 250))
                    }),
                };
                recovered_at = match (recovered_at, shard_recovered) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
            }
            FaultRto {
                fault: i,
                kind: f.kind.clone(),
                at_ms: f.at_ms,
                duration_ms: f.duration_ms,
                rto_ms: recovered_at.map(|t| t.saturating_sub(f.at_ms)),
                failed_probes: failed,
            }
        })
        .collect()
}
