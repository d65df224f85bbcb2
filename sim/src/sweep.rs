//! Many seeds, each in its own process (the simulator keeps process-wide state: ractor's
//! registry, the planted-bug switch), a few at a time. Reports failures with the command that
//! reproduces each, the RTO distribution per fault kind, and optionally whether each seed
//! replays to the same trace hash.

use crate::report::Summary;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub seeds: Range<u64>,
    pub jobs: usize,
    /// Run every k-th seed twice and compare trace hashes (0: never).
    pub determinism_every: u64,
    pub bugs: Vec<String>,
    /// Stop at the first seed where this checker reports a violation, and count that as success.
    pub expect: Option<String>,
}

pub struct SweepResult {
    pub runs: Vec<Summary>,
    pub nondeterministic: Vec<(u64, String, String)>,
    pub crashed: Vec<(u64, String)>,
    pub wall_s: f64,
    pub found_expected: Option<u64>,
}

fn run_child(exe: &PathBuf, seed: u64, bugs: &[String]) -> Result<Summary, String> {
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--seed", &seed.to_string(), "--summary-json"]);
    for b in bugs {
        cmd.args(["--bug", b]);
    }
    let out = cmd.output().map_err(|e| format!("spawn {}: {e}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    match line {
        Some(l) => serde_json::from_str(l).map_err(|e| format!("bad summary from seed {seed}: {e}")),
        None => Err(format!(
            "seed {seed}: no summary (exit {:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        )),
    }
}

pub fn sweep(options: &SweepOptions) -> anyhow::Result<SweepResult> {
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let queue: Arc<Mutex<Range<u64>>> = Arc::new(Mutex::new(options.seeds.clone()));
    let results: Arc<Mutex<SweepResult>> = Arc::new(Mutex::new(SweepResult {
        runs: Vec::new(),
        nondeterministic: Vec::new(),
        crashed: Vec::new(),
        wall_s: 0.0,
        found_expected: None,
    }));
    let total = options.seeds.end.saturating_sub(options.seeds.start);
    let workers: Vec<_> = (0..options.jobs.max(1))
        .map(|_| {
            let (queue, results, exe, options) =
                (queue.clone(), results.clone(), exe.clone(), options.clone());
            std::thread::spawn(move || loop {
                if results.lock().unwrap_or_else(|p| p.into_inner()).found_expected.is_some() {
                    return;
                }
                let Some(seed) = queue.lock().unwrap_or_else(|p| p.into_inner()).next() else { return };
                let first = run_child(&exe, seed, &options.bugs);
                let replay = (options.determinism_every > 0
                    && (seed - options.seeds.start) % options.determinism_every == 0)
                    .then(|| run_child(&exe, seed, &options.bugs));
                let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
                match first {
                    Ok(summary) => {
                        if let Some(Ok(again)) = &replay {
                            if again.trace_hash != summary.trace_hash {
                                r.nondeterministic.push((
                                    seed,
                                    summary.trace_hash.clone(),
                                    again.trace_hash.clone(),
                                ));
                            }
                        }
                        if let Some(Err(e)) = replay {
                            r.crashed.push((seed, e));
                        }
                        if let Some(expect) = &options.expect {
                            if summary.failed_checkers.iter().any(|c| c == expect) {
                                r.found_expected = Some(seed);
                            }
                        }
                        r.runs.push(summary);
                    }
                    Err(e) => r.crashed.push((seed, e)),
                }
                let done = r.runs.len() + r.crashed.len();
                let failed = r.runs.iter().filter(|s| !s.passed).count() + r.crashed.len();
                let elapsed = started.elapsed().as_secs_f64();
                eprint!(
                    "\r  {done}/{total} seeds, {failed} failing, {:.2} seeds/s   ",
                    done as f64 / elapsed.max(0.001)
                );
                let _ = std::io::stderr().flush();
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    eprintln!();
    let mut result = Arc::try_unwrap(results)
        .map_err(|_| anyhow::anyhow!("sweep workers still running"))?
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    result.runs.sort_by_key(|s| s.seed);
    result.crashed.sort();
    result.nondeterministic.sort();
    result.wall_s = started.elapsed().as_secs_f64();
    Ok(result)
}

/// RTO percentiles per fault kind, over every recovered fault.
pub fn rto_table(runs: &[Summary]) -> String {
    let mut by_kind: BTreeMap<&str, (Histogram<u64>, usize)> = BTreeMap::new();
    for r in runs {
        for line in &r.rto {
            let Ok(h) = Histogram::new(3) else { continue };
            let entry = by_kind.entry(line.kind.as_str()).or_insert((h, 0));
            match line.rto_ms {
                Some(ms) => {
                    let _ = entry.0.record(ms);
                }
                None => entry.1 += 1,
            }
        }
    }
    let mut s = String::from("| fault kind | faults | RTO p50 ms | RTO p99 ms | RTO max ms | not recovered in phase |\n|---|---|---|---|---|---|\n");
    for (kind, (h, unrecovered)) in by_kind {
        s.push_str(&format!(
            "| {kind} | {} | {} | {} | {} | {unrecovered} |\n",
            h.len() + unrecovered as u64,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        ));
    }
    s
}
