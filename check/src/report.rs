//! What a chaos run or a drill found, for SREs: JSON (machine-readable), a Markdown summary
//! (terminals) and a self-contained HTML page ([`crate::html`]); and the statistics behind them
//! (timeline, latency per phase) computed from a history.

use crate::checkers::{self, RunLimits, Violation};
use crate::history::{History, Op, OpResult};
use crate::rto::{self, FaultWindow};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Width of a timeline bucket.
pub const BUCKET_MS: u64 = 500;

/// Everything a run measured. All times are milliseconds since the run started, on the
/// harness's one monotonic clock.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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
    /// Fills in everything computed from the history: the checkers' violations (added to those
    /// already found), RTO per fault, RPO, the timeline, latency per phase and the verdict.
    pub fn finish(&mut self, history: &History, limits: RunLimits) {
        self.violations.extend(checkers::check_all(limits, history));
        let windows: Vec<FaultWindow> = self
            .faults
            .iter()
            .map(|f| FaultWindow {
                kind: f.kind.clone(),
                at_ms: f.at_ms,
                duration_ms: f.healed_at_ms.unwrap_or(f.at_ms).saturating_sub(f.at_ms),
            })
            .collect();
        for (f, r) in self.faults.iter_mut().zip(rto::per_fault(&windows, self.heal_at_ms, history)) {
            f.rto_ms = r.rto_ms;
            f.failed_probes = r.failed_probes;
        }
        self.rpo_lost = self.violations.iter().filter(|v| v.checker == checkers::p1_durability::NAME).count();
        self.timeline = timeline(&history.ops, self.duration_ms);
        self.bucket_ms = BUCKET_MS;
        self.phases =
            phases(&history.ops, &self.faults, self.workload_from_ms, self.heal_at_ms, self.duration_ms);
        self.ops = counts(&history.ops);
        self.converged_at_ms = history.converged_at_ms;
        self.verdict = if self.violations.is_empty() { "PASS" } else { "FAIL" }.to_owned();
    }

    pub fn passed(&self) -> bool {
        self.verdict == "PASS"
    }

    /// The summary for terminals.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Run `{}`: {}\n", self.scenario, self.verdict);
        let _ = writeln!(s, "{}\n", self.description);
        let regions: Vec<String> = self.nodes.iter().map(|n| format!("n{}@{}", n.id, n.region)).collect();
        let delays: Vec<String> = self.latency_ms.iter().map(|(k, v)| format!("{k} {v} ms")).collect();
        let delays = if delays.is_empty() {
            String::new()
        } else {
            format!("; one-way delays {} (±{} ms jitter)", delays.join(", "), self.jitter_ms)
        };
        let _ = writeln!(
            s,
            "- {} nodes ({}), {} shards{delays}; seed {}",
            self.nodes.len(),
            regions.join(", "),
            self.shards,
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

fn latency_ms(op: &Op) -> u64 {
    op.complete_ms.saturating_sub(op.invoke_ms)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000, 3).expect("static histogram bounds are valid")
}

fn quantile(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64
    }
}

/// Operations per bucket, by completion time.
pub fn timeline(ops: &[Op], duration_ms: u64) -> Vec<Bucket> {
    let n = usize::try_from(duration_ms / BUCKET_MS + 1).unwrap_or(1);
    let mut hists: Vec<Histogram<u64>> = (0..n).map(|_| histogram()).collect();
    let mut buckets: Vec<Bucket> =
        (0..n).map(|i| Bucket { at_ms: i as u64 * BUCKET_MS, ..Bucket::default() }).collect();
    for op in ops {
        let i = usize::try_from(op.complete_ms / BUCKET_MS).unwrap_or(usize::MAX).min(n - 1);
        match op.result {
            OpResult::Unknown { .. } => buckets[i].unknown += 1,
            OpResult::Refused { .. } => buckets[i].failed += 1,
            _ => {
                buckets[i].ok += 1;
                let _ = hists[i].record(latency_ms(op).max(1));
            }
        }
    }
    for (b, h) in buckets.iter_mut().zip(&hists) {
        b.p50_ms = quantile(h, 0.5);
        b.p99_ms = quantile(h, 0.99);
    }
    buckets
}

/// Latency per phase: steady state before the first fault, each fault's window, after the heal.
pub fn phases(
    ops: &[Op],
    faults: &[FaultRecord],
    from_ms: u64,
    heal_at_ms: u64,
    end_ms: u64,
) -> Vec<PhaseLatency> {
    let mut bounds = vec![("steady".to_owned(), from_ms, faults.first().map_or(heal_at_ms, |f| f.at_ms))];
    for (i, f) in faults.iter().enumerate() {
        let to = faults.get(i + 1).map_or(heal_at_ms, |n| n.at_ms);
        bounds.push((format!("fault {}: {}", i + 1, f.kind), f.at_ms, to));
    }
    bounds.push(("after heal".to_owned(), heal_at_ms, end_ms));
    bounds
        .into_iter()
        .map(|(phase, from, to)| {
            let mut h = histogram();
            let (mut ok, mut failed) = (0, 0);
            for op in ops.iter().filter(|o| o.invoke_ms >= from && o.invoke_ms < to) {
                if op.ok() {
                    ok += 1;
                    let _ = h.record(latency_ms(op).max(1));
                } else {
                    failed += 1;
                }
            }
            PhaseLatency {
                phase,
                from_ms: from,
                to_ms: to,
                ok,
                failed,
                p50_ms: quantile(&h, 0.5),
                p99_ms: quantile(&h, 0.99),
                p999_ms: quantile(&h, 0.999),
                max_ms: if h.is_empty() { 0.0 } else { h.max() as f64 },
            }
        })
        .collect()
}

pub fn counts(ops: &[Op]) -> OpCounts {
    let mut c = OpCounts { total: ops.len(), ..OpCounts::default() };
    for op in ops {
        match op.result {
            OpResult::Refused { .. } => c.refused += 1,
            OpResult::Unknown { .. } => c.unknown += 1,
            _ => c.ok += 1,
        }
        if op.kind.is_write() {
            c.writes += 1;
        } else {
            c.checks += 1;
        }
    }
    c
}

/// Writes report.json, report.md and report.html into `out`.
pub fn write_reports(report: &Report, out: &Path) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    for (name, body) in [
        ("report.json", json),
        ("report.md", report.markdown()),
        ("report.html", crate::html::render(report)),
    ] {
        std::fs::write(out.join(name), body)?;
    }
    Ok(())
}
