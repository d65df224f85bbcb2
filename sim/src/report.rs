//! How a run is shown: the human-readable report and the one-line JSON summary `sweep` reads.

use crate::rto::FaultRto;
use crate::run::Outcome;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// What `sweep` needs of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub seed: u64,
    pub passed: bool,
    pub trace_hash: String,
    pub violations: Vec<String>,
    /// Names of the checkers that found something.
    pub failed_checkers: Vec<String>,
    pub rto: Vec<RtoLine>,
    pub rpo_lost: usize,
    pub sim_ms: u64,
    pub ops: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RtoLine {
    pub kind: String,
    pub rto_ms: Option<u64>,
}

pub fn summary(o: &Outcome) -> Summary {
    let mut failed_checkers: Vec<String> = o.violations.iter().map(|v| v.checker.to_owned()).collect();
    failed_checkers.dedup();
    Summary {
        seed: o.scenario.seed,
        passed: o.passed(),
        trace_hash: o.trace_hash.clone(),
        violations: o.violations.iter().map(|v| format!("{}: {}", v.checker, v.detail)).collect(),
        failed_checkers,
        rto: o.rto.iter().map(|r| RtoLine { kind: r.kind.to_owned(), rto_ms: r.rto_ms }).collect(),
        rpo_lost: o.rpo_lost,
        sim_ms: o.sim_ms,
        ops: o.history.ops.len(),
    }
}

/// Violations shown per run before the rest are only counted.
const VIOLATIONS_SHOWN_MAX: usize = 20;

pub fn text(o: &Outcome, bugs: &str) -> String {
    let h = &o.history;
    let mut s = String::new();
    let _ = writeln!(s, "{}", o.scenario);
    if !bugs.is_empty() {
        let _ = writeln!(s, "  planted bugs: {bugs}");
    }
    let acked = h.ops.iter().filter(|op| op.kind.is_write() && op.ok()).count();
    let unknown =
        h.ops.iter().filter(|op| matches!(op.result, crate::history::OpResult::Unknown { .. })).count();
    let checks = h.ops.iter().filter(|op| !op.kind.is_write()).count();
    let _ = writeln!(
        s,
        "ran {} ms simulated: {} ops ({acked} writes acknowledged, {unknown} unknown, {checks} checks), {} leader terms",
        o.sim_ms,
        h.ops.len(),
        h.leaders.len()
    );
    for e in &h.events {
        let _ = writeln!(s, "  {:>6} ms  {}", e.at_ms, e.what);
    }
    match h.converged_at_ms {
        Some(t) => {
            let _ = writeln!(s, "converged {} ms after the heal", t.saturating_sub(o.scenario.heal_at_ms));
        }
        None => {
            let _ = writeln!(s, "did not converge");
        }
    }
    for r in &o.rto {
        let _ = writeln!(s, "RTO fault {} ({}): {}", r.fault, r.kind, rto_text(r));
    }
    let _ = writeln!(s, "RPO: {} acknowledged writes lost", o.rpo_lost);
    let _ = writeln!(s, "trace {}", o.trace_hash);
    for v in o.violations.iter().take(VIOLATIONS_SHOWN_MAX) {
        let _ = writeln!(s, "VIOLATION {}: {}", v.checker, v.detail);
    }
    if o.violations.len() > VIOLATIONS_SHOWN_MAX {
        let _ = writeln!(s, "... and {} more violations", o.violations.len() - VIOLATIONS_SHOWN_MAX);
    }
    let _ = write!(
        s,
        "verdict: {}",
        if o.passed() { "PASS".to_owned() } else { format!("FAIL ({} violations)", o.violations.len()) }
    );
    s
}

fn rto_text(r: &FaultRto) -> String {
    match r.rto_ms {
        Some(0) => "no outage".to_owned(),
        Some(ms) => format!("{ms} ms ({} probe rounds failed)", r.failed_probes),
        None => format!("not recovered before the next phase ({} probe rounds failed)", r.failed_probes),
    }
}
