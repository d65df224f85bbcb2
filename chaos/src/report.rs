//! What a chaos run found, for SREs: JSON (machine-readable), a Markdown summary (terminals) and
//! a self-contained HTML page ([`crate::html`]).

use cascade_check::checkers::Violation;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Everything a run measured. All times are milliseconds since the run started, on the
/// harness's one monotonic clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    /// Wall-clock start (ms since the Unix epoch), for humans only.
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    pub nodes: Vec<NodeInfo>,
    pub shards: u16,
    /// One-way delay injected between regions, `a<->b` → ms (jitter on top).
    pub latency_ms: BTreeMap<String, u64>,
    pub jitter_ms: u64,
    /// When the workload started and when every fault was healed.
    pub workload_from_ms: u64,
    pub heal_at_ms: u64,
    pub faults: Vec<FaultRecord>,
    /// Client operations per time bucket.
    pub timeline: Vec<Bucket>,
    pub bucket_ms: u64,
    /// Latency of client operations per phase (before, during each fault, after).
    pub phases: Vec<PhaseLatency>,
    pub ops: OpCounts,
    /// Acknowledged writes missing after the heal (P1); RPO is 0 only when this is 0.
    pub rpo_lost: usize,
    /// When the cluster converged after the heal, if it did.
    pub converged_at_ms: Option<u64>,
    pub violations: Vec<Violation>,
    /// `PASS` or `FAIL`.
    pub verdict: String,
    /// Where the history and node logs of this run are.
    pub artifacts: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub region: String,
    pub addr: String,
}

/// One injected fault and how the cluster recovered from it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRecord {
    /// `kill-leader`, `partition-region`, `pause`, ...
    pub kind: String,
    /// What it hit, e.g. `n2 (leader of shard 0)` or `region eu`.
    pub target: String,
    pub at_ms: u64,
    /// When the harness undid it (restart, heal, SIGCONT); `None` if nothing needed undoing.
    pub healed_at_ms: Option<u64>,
    /// Fault start → start of sustained probe success on every shard. `None`: not recovered
    /// before the next fault or the heal.
    pub rto_ms: Option<u64>,
    /// Probe writes that failed between the fault and recovery.
    pub failed_probes: usize,
}

/// Operations that completed within `[at_ms, at_ms + bucket_ms)`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bucket {
    pub at_ms: u64,
    pub ok: u64,
    /// Refused or failed reads and refused writes.
    pub failed: u64,
    /// Writes whose outcome is unknown (timeouts, lost connections).
    pub unknown: u64,
    /// Latency of the bucket's successful operations (ms); 0 when there were none.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseLatency {
    /// `steady`, `fault 1: kill-leader`, `after heal`, ...
    pub phase: String,
    pub from_ms: u64,
    pub to_ms: u64,
    pub ok: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OpCounts {
    pub total: usize,
    pub ok: usize,
    pub refused: usize,
    pub unknown: usize,
    pub checks: usize,
    pub writes: usize,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.verdict == "PASS"
    }

    /// The summary for terminals.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Chaos run `{}`: {}\n", self.scenario, self.verdict);
        let _ = writeln!(s, "{}\n", self.description);
        let regions: Vec<String> = self.nodes.iter().map(|n| format!("n{}@{}", n.id, n.region)).collect();
        let delays: Vec<String> = self.latency_ms.iter().map(|(k, v)| format!("{k} {v} ms")).collect();
        let _ = writeln!(
            s,
            "- {} nodes ({}), {} shards; one-way delays {} (±{} ms jitter); seed {}",
            self.nodes.len(),
            regions.join(", "),
            self.shards,
            delays.join(", "),
            self.jitter_ms,
            self.seed
        );
        let _ = writeln!(
            s,
            "- {} operations: {} ok, {} refused, {} unknown ({} checks, {} writes) in {:.1} s",
            self.ops.total,
            self.ops.ok,
            self.ops.refused,
            self.ops.unknown,
            self.ops.checks,
            self.ops.writes,
            self.duration_ms as f64 / 1000.0
        );
        let _ = writeln!(
            s,
            "- RPO: {} acknowledged writes lost; converged after heal: {}\n",
            self.rpo_lost,
            self.converged_at_ms
                .map_or("no".to_owned(), |t| format!("in {} ms", t.saturating_sub(self.heal_at_ms)))
        );
        let _ = writeln!(s, "| # | fault | target | at | healed | RTO | failed probes |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for (i, f) in self.faults.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} s | {} | {} | {} |",
                i + 1,
                f.kind,
                f.target,
                f.at_ms as f64 / 1000.0,
                f.healed_at_ms.map_or("-".to_owned(), |t| format!("{:.1} s", t as f64 / 1000.0)),
                f.rto_ms.map_or("not recovered".to_owned(), |r| format!("{r} ms")),
                f.failed_probes
            );
        }
        let _ = writeln!(s, "\n| phase | ok | failed | p50 | p99 | p99.9 | max |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for p in &self.phases {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                p.phase, p.ok, p.failed, p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms
            );
        }
        if !self.violations.is_empty() {
            let _ = writeln!(s, "\n## Violations\n");
            for v in &self.violations {
                let _ = writeln!(s, "- **{}**: {}", v.checker, v.detail);
            }
        }
        if !self.artifacts.is_empty() {
            let _ = writeln!(s);
            for (k, v) in &self.artifacts {
                let _ = writeln!(s, "- {k}: `{v}`");
            }
        }
        s
    }
}
