//! One chaos run: start the cluster, wait until it serves, run the shared clients (workload,
//! probe, verifier) while the schedule injects and undoes faults, heal, wait for convergence,
//! then check the history and write the report.

use crate::cluster::{node_status, Cluster, ClusterSpec};
use crate::nemesis::{self, Scenario};
use anyhow::Context;
use cascade_check::checkers::{RunLimits, Violation};
use cascade_check::clients::{self, Connector, LiveRecorder, Recorder};
use cascade_check::history::{Event, History, Leadership};
use cascade_check::report::{self, FaultRecord, NodeInfo, Report};
use cascade_check::workload::Workload;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// P2's bound in the nodes' default configuration.
pub const REVOCATION_BOUND_MS: u64 = 500;
/// How long a fresh cluster may take to elect every shard's leader.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// Time for the clients to connect before their first operation.
const WARMUP_MS: u64 = 1_000;
/// How often the leader sampler asks every node for its role (election safety).
const LEADER_SAMPLE: Duration = Duration::from_millis(250);
/// The final reads get this long after the convergence limit before the run gives up on them.
const FINAL_READS_LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub scenario: Scenario,
    /// The `cascade` binary the nodes run.
    pub bin: PathBuf,
    /// Where node dirs, logs, the history and the reports go.
    pub out: PathBuf,
    pub seed: u64,
    /// Print progress lines to stderr.
    pub progress: bool,
    /// Bugs the nodes commit on purpose (see `cascade_core::planted`).
    pub planted_bugs: Vec<String>,
}

fn progress(opts: &RunOptions, rec: &LiveRecorder, line: &str) {
    if opts.progress {
        eprintln!("[{:>6.1}s] {line}", rec.now_ms() as f64 / 1000.0);
    }
}

/// Runs the scenario and writes `report.json`, `report.md`, `report.html` and `history.json`
/// under `opts.out`. An `Err` means the harness itself could not run (no binary, the cluster
/// never formed); broken promises are a report with verdict FAIL.
pub async fn run(opts: &RunOptions) -> anyhow::Result<Report> {
    let sc = &opts.scenario;
    let nodes_dir = opts.out.join("nodes");
    anyhow::ensure!(
        !nodes_dir.exists(),
        "{} already holds a run (its nodes would start on stale data); remove it or pick another --out",
        opts.out.display()
    );
    std::fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let mut spec = ClusterSpec::three_regions(sc.nodes, sc.shards, opts.seed);
    spec.planted_bugs = opts.planted_bugs.clone();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    let mut cluster = Cluster::start(spec.clone(), &opts.bin, &nodes_dir).await?;
    let rec = LiveRecorder::start();
    progress(opts, &rec, &format!("started {} nodes: {}", sc.nodes, cluster.describe()));

    let addrs: BTreeMap<u64, SocketAddr> = cluster.nodes.values().map(|n| (n.id, n.addr)).collect();
    let connect: Connector = {
        let addrs = addrs.clone();
        Arc::new(move |id| crate::cluster::client_of(addrs[&id]))
    };
    let mut workload = Workload::real_time(clients::TENANT, opts.seed, cluster.ids(), sc.shards, sc.clients);
    workload.converge_limit_ms = sc.converge_limit_ms;
    if let Some(mix) = &sc.mix {
        workload.mix = mix.clone();
    }
    wait_ready(&workload, &connect, &mut cluster).await.map_err(|e| e.context(logs_hint(&opts.out)))?;
    // The schedule is relative to the start of the workload.
    let workload_from_ms = rec.now_ms() + WARMUP_MS;
    let heal_at_ms = workload_from_ms + sc.heal_at_ms();
    workload.warmup_ms = workload_from_ms;
    workload.stop_at_ms = heal_at_ms;
    progress(
        opts,
        &rec,
        &format!("every shard has a leader; workload from {workload_from_ms} ms, heal at {heal_at_ms} ms"),
    );

    let mut tasks = Vec::new();
    for i in 0..sc.clients {
        tasks.push(tokio::spawn(clients::workload(workload.clone(), i, connect.clone(), rec.clone())));
    }
    tasks.push(tokio::spawn(clients::probe(workload.clone(), connect.clone(), rec.clone())));
    let verifier = tokio::spawn(clients::verifier(workload.clone(), connect.clone(), rec.clone()));
    let sampler = tokio::spawn(sample_leaders(addrs.clone(), rec.clone()));

    let mut violations = Vec::new();
    let mut faults = Vec::new();
    for (i, step) in sc.steps.iter().enumerate() {
        sleep_until(&rec, workload_from_ms + step.at_ms).await;
        note_crashes(&mut cluster, &rec, &mut violations);
        let at_ms = rec.now_ms();
        let applied = nemesis::apply(&mut cluster, &step.nemesis).await;
        let applied = match applied {
            Ok(a) => a,
            Err(e) => {
                violations.push(Violation::new(
                    "harness",
                    format!("fault {} {}: {e:#}", i + 1, step.nemesis.name()),
                ));
                continue;
            }
        };
        let what = format!("fault {} {}: {}", i + 1, step.nemesis.name(), applied.target);
        progress(opts, &rec, &format!("{what} (for {} ms)", step.duration_ms));
        rec.write(|h| h.events.push(Event { at_ms, what: what.clone() }));
        sleep_until(&rec, at_ms + step.duration_ms).await;
        let healed = nemesis::undo(&mut cluster, &applied.undo).await;
        let healed_at_ms = rec.now_ms();
        if let Err(e) = healed {
            violations.push(Violation::new("harness", format!("undo fault {}: {e:#}", i + 1)));
        }
        progress(opts, &rec, &format!("fault {} undone; {}", i + 1, rate_line(&rec, 2_000)));
        rec.write(|h| h.events.push(Event { at_ms: healed_at_ms, what: format!("undo fault {}", i + 1) }));
        faults.push(FaultRecord {
            kind: step.nemesis.name().to_owned(),
            target: applied.target,
            at_ms,
            healed_at_ms: Some(healed_at_ms),
            rto_ms: None,
            failed_probes: 0,
        });
    }
    sleep_until(&rec, heal_at_ms).await;
    note_crashes(&mut cluster, &rec, &mut violations);
    if let Err(e) = nemesis::heal_all(&mut cluster).await {
        violations.push(Violation::new("harness", format!("final heal: {e:#}")));
    }
    rec.write(|h| h.events.push(Event { at_ms: heal_at_ms, what: "heal".to_owned() }));
    progress(opts, &rec, "healed; waiting for convergence and final reads");

    let limit = Duration::from_millis(sc.converge_limit_ms) + FINAL_READS_LIMIT;
    if tokio::time::timeout(limit + Duration::from_secs(5), verifier).await.is_err() {
        violations.push(Violation::new("liveness", "the final reads did not finish in time"));
    }
    sampler.abort();
    for t in tasks {
        t.abort();
    }
    note_crashes(&mut cluster, &rec, &mut violations);
    let duration_ms = rec.now_ms();
    let history = rec.read(History::clone);
    drop(cluster);

    let history_path = opts.out.join("history.json");
    std::fs::write(&history_path, serde_json::to_vec(&history).context("history to JSON")?)
        .with_context(|| format!("write {}", history_path.display()))?;
    let mut report = Report {
        scenario: sc.name.to_owned(),
        description: sc.description.to_owned(),
        seed: opts.seed,
        started_unix_ms,
        duration_ms,
        nodes: addrs
            .iter()
            .map(|(&id, a)| NodeInfo { id, region: spec.region_of(id).to_owned(), addr: a.to_string() })
            .collect(),
        shards: sc.shards,
        latency_ms: spec.latency_ms.clone(),
        jitter_ms: spec.jitter_ms,
        workload_from_ms,
        heal_at_ms,
        faults,
        violations,
        artifacts: BTreeMap::from([
            ("history".to_owned(), history_path.display().to_string()),
            ("node logs".to_owned(), opts.out.join("nodes").join("n*/node.log").display().to_string()),
        ]),
        ..Report::default()
    };
    let limits = RunLimits {
        revocation_bound_ms: REVOCATION_BOUND_MS,
        heal_at_ms,
        converge_limit_ms: sc.converge_limit_ms,
    };
    report.finish(&history, limits);
    report::write_reports(&report, &opts.out)
        .with_context(|| format!("write the reports to {}", opts.out.display()))?;
    Ok(report)
}

fn logs_hint(out: &Path) -> String {
    format!("node logs: {}", out.join("nodes").join("n*/node.log").display())
}

async fn sleep_until(rec: &LiveRecorder, at_ms: u64) {
    tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(rec.now_ms()))).await;
}

/// Waits until every shard has a leader its voters follow.
async fn wait_ready(w: &Workload, connect: &Connector, cluster: &mut Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_LIMIT;
    let mut why = String::new();
    while Instant::now() < deadline {
        let crashed = cluster.exited();
        anyhow::ensure!(crashed.is_empty(), "nodes exited while the cluster formed: {crashed:?}");
        match clients::converged_now(w, connect).await {
            Ok(()) => return Ok(()),
            Err(e) => why = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("the cluster did not form within {READY_LIMIT:?}: {why}")
}

/// A node that exited without being killed by the harness is a crash: a violation.
fn note_crashes(cluster: &mut Cluster, rec: &LiveRecorder, violations: &mut Vec<Violation>) {
    for (id, status) in cluster.exited() {
        let at = rec.now_ms();
        violations.push(Violation::new("crash", format!("n{id} exited on its own at {at} ms: {status}")));
        // Keep the run going: the node comes back, as an operator's supervisor would do it.
        let _ = cluster.start_node(id);
    }
}

/// Records which node claims leadership of which shard in which term, every `LEADER_SAMPLE`.
async fn sample_leaders(addrs: BTreeMap<u64, SocketAddr>, rec: LiveRecorder) {
    let mut seen: BTreeMap<(u32, u64, u64), ()> = BTreeMap::new();
    loop {
        for (&id, &addr) in &addrs {
            let Ok(status) = node_status(addr).await else { continue };
            for s in status.shards.iter().filter(|s| s.role.eq_ignore_ascii_case("leader")) {
                if seen.insert((s.shard, s.term, id), ()).is_none() {
                    let at_ms = rec.now_ms();
                    let shard = u16::try_from(s.shard).unwrap_or(u16::MAX);
                    rec.write(|h| h.leaders.push(Leadership { at_ms, shard, term: s.term, node: id }));
                }
            }
        }
        tokio::time::sleep(LEADER_SAMPLE).await;
    }
}

/// `ok/s, failed/s` over the last `window_ms`, for progress lines.
fn rate_line(rec: &LiveRecorder, window_ms: u64) -> String {
    let now = rec.now_ms();
    let from = now.saturating_sub(window_ms);
    let (ok, failed) = rec.read(|h| h.outcomes_since(from));
    let per_s = |n: u64| n as f64 * 1000.0 / window_ms as f64;
    format!("last {:.0} s: {:.0} ok/s, {:.0} failed/s", window_ms as f64 / 1000.0, per_s(ok), per_s(failed))
}
