//! `cascade drill …`: a failover drill against a running cluster, for SREs. It finds every node,
//! refuses unless all of them run with fault injection enabled, shows the plan and asks for
//! confirmation (or `--yes`), runs a canary workload (the simulator's and chaos harness's clients,
//! on a tenant of its own), injects the fault through the nodes' hooks, undoes it after
//! `--duration-s` (also on Ctrl-C or an error), and reports RTO, RPO and the promises like the
//! chaos harness does.
//!
//! Faults go through the nodes' own hooks (`CutLinks`, `SetClockOffset`): a drill cannot kill or
//! pause processes on other machines; the chaos harness, which owns its processes, does that.

use crate::cli::api::Api;
use crate::cli::cluster::{gather, NodeReport};
use crate::cli::exit::{self, RpcError, Usage};
use crate::cli::render::Output;
use cascade_check::checkers::{RunLimits, Violation};
use cascade_check::clients::{self, Connector, LiveRecorder, Recorder};
use cascade_check::history::Event;
use cascade_check::report::{FaultRecord, NodeInfo, Report};
use cascade_check::workload::Workload;
use cascade_protocol::pb;
use clap::{Args, Subcommand};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Time for the canary clients to connect before their first operation.
const CANARY_WARMUP_MS: u64 = 500;
/// Attempts to undo the fault on one node before the drill gives up and says how to do it by hand.
const RESTORE_ATTEMPTS: usize = 3;
/// How often the progress line is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long the canary's final reads may take after the convergence limit.
const FINAL_READS_LIMIT: Duration = Duration::from_secs(60);

/// `cascade drill …`: which fault.
#[derive(Debug, Subcommand)]
pub enum DrillCommand {
    /// Cut every node of a region off from the nodes of other regions, both ways.
    IsolateRegion {
        /// Region label, as `cascade cluster status` shows it.
        region: String,
        #[command(flatten)]
        opts: DrillOptions,
    },
    /// Make the current leader of a shard exit at once, as if killed -9 (no clean shutdown).
    ///
    /// The drill cannot restart a process on another machine: the node's supervisor (systemd,
    /// Kubernetes, ...) must. The drill waits up to --duration-s for it to answer again and
    /// reports a violation if it does not.
    KillLeader {
        #[arg(long, value_name = "N")]
        shard: u32,
        #[command(flatten)]
        opts: DrillOptions,
    },
    /// Cut the current leader of a shard off from every other node, both ways.
    IsolateLeader {
        #[arg(long, value_name = "N")]
        shard: u32,
        #[command(flatten)]
        opts: DrillOptions,
    },
    /// One node stops sending to another; the other way still works (a one-way partition).
    CutLink {
        #[arg(long, value_name = "NODE_ID")]
        from: u64,
        #[arg(long, value_name = "NODE_ID")]
        to: u64,
        #[command(flatten)]
        opts: DrillOptions,
    },
    /// Run one node's clock off by --offset-ms (that node's own clock; the host's is untouched).
    ClockOffset {
        #[arg(long, value_name = "NODE_ID")]
        node: u64,
        #[arg(long, value_name = "MS", allow_hyphen_values = true)]
        offset_ms: i64,
        #[command(flatten)]
        opts: DrillOptions,
    },
}

/// Settings every drill shares.
#[derive(Debug, Clone, Args)]
pub struct DrillOptions {
    /// How long the fault lasts before the drill undoes it (seconds).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    duration_s: u64,
    /// Canary traffic before the fault, the baseline (seconds).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=600))]
    baseline_s: u64,
    /// Canary traffic after the undo, to measure recovery (seconds).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    recovery_s: u64,
    /// Concurrent canary clients.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=32))]
    canaries: u64,
    /// Tenant of the canary's sessions (kept apart from real data).
    #[arg(long, default_value = "cascade-drill")]
    tenant: String,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    yes: bool,
    /// Directory for report.{json,md,html} and history.json (default: ./cascade-drill-<time>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

impl DrillCommand {
    fn opts(&self) -> &DrillOptions {
        match self {
            DrillCommand::IsolateRegion { opts, .. }
            | DrillCommand::KillLeader { opts, .. }
            | DrillCommand::IsolateLeader { opts, .. }
            | DrillCommand::CutLink { opts, .. }
            | DrillCommand::ClockOffset { opts, .. } => opts,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            DrillCommand::IsolateRegion { .. } => "isolate-region",
            DrillCommand::KillLeader { .. } => "kill-leader",
            DrillCommand::IsolateLeader { .. } => "isolate-leader",
            DrillCommand::CutLink { .. } => "cut-link",
            DrillCommand::ClockOffset { .. } => "clock-offset",
        }
    }
}

/// A node as the drill uses it.
#[derive(Clone, Debug)]
struct Node {
    id: u64,
    addr: String,
    region: String,
}

/// What the drill will do: on which node, which peer addresses to stop sending to, or whose
/// clock to move.
#[derive(Debug)]
struct Plan {
    target: String,
    cuts: BTreeMap<u64, Vec<String>>,
    clock: Option<(u64, i64)>,
    /// The node told to exit (its supervisor restarts it), with its incarnation before.
    crash: Option<(u64, u64)>,
}

/// Runs the drill; the exit code is 0 when every promise held, 5 when one was broken.
pub async fn drill(command: DrillCommand, addr: &str, out: Output, timeout: Duration) -> anyhow::Result<u8> {
    let api = Api::connect(addr, timeout).await?;
    let first = api.node_status().await?;
    let bound_ms = first.revocation_bound_ms;
    let n_shards = u16::try_from(first.n_shards).unwrap_or(u16::MAX);
    let reports = gather(first, timeout).await;
    let nodes = usable_nodes(&reports)?;
    let plan = plan(&command, &nodes, &reports, n_shards)?;
    let opts = command.opts().clone();
    eprintln!("drill {}: {}", command.kind(), plan.target);
    for (id, addrs) in &plan.cuts {
        eprintln!("  n{id} stops sending to {}", addrs.join(", "));
    }
    if let Some((id, ms)) = plan.clock {
        eprintln!("  n{id}'s clock runs {ms:+} ms off");
    }
    if let Some((id, _)) = plan.crash {
        eprintln!("  n{id} exits at once as if killed -9; its supervisor must restart it (the drill waits up to --duration-s)");
    }
    eprintln!(
        "  for {} s, with {} canary clients on tenant {:?} ({} s baseline, {} s recovery)",
        opts.duration_s, opts.canaries, opts.tenant, opts.baseline_s, opts.recovery_s
    );
    confirm(opts.yes)?;

    let rec = LiveRecorder::start();
    let started_unix_ms = unix_ms();
    let addrs: BTreeMap<u64, String> = nodes.iter().map(|n| (n.id, n.addr.clone())).collect();
    let connect = connector(&addrs)?;
    let ids: Vec<u64> = addrs.keys().copied().collect();
    let mut w = Workload::real_time(&opts.tenant, started_unix_ms, ids, n_shards, opts.canaries as usize);
    let fault_at = CANARY_WARMUP_MS + opts.baseline_s * 1_000;
    w.warmup_ms = CANARY_WARMUP_MS;
    w.stop_at_ms = fault_at + (opts.duration_s + opts.recovery_s) * 1_000;
    let mut tasks = Vec::new();
    for i in 0..w.clients {
        tasks.push(tokio::spawn(clients::workload(w.clone(), i, connect.clone(), rec.clone())));
    }
    tasks.push(tokio::spawn(clients::probe(w.clone(), connect.clone(), rec.clone())));
    let verifier = tokio::spawn(clients::verifier(w.clone(), connect.clone(), rec.clone()));
    let progress = tokio::spawn(progress_line(rec.clone(), command.kind(), fault_at, w.stop_at_ms));

    let mut violations = Vec::new();
    tokio::time::sleep(Duration::from_millis(fault_at.saturating_sub(rec.now_ms()))).await;
    let at_ms = rec.now_ms();
    rec.write(|h| h.events.push(Event { at_ms, what: format!("{}: {}", command.kind(), plan.target) }));
    let injected = inject(&plan, &addrs, timeout).await;
    let mut interrupted = false;
    if let Err(e) = &injected {
        violations.push(Violation::new("harness", format!("injecting the fault failed: {e:#}")));
    } else if let Some((id, before)) = plan.crash {
        let wait = Duration::from_secs(opts.duration_s);
        tokio::select! {
            back = wait_for_restart(&addrs, id, before, wait) => if !back {
                violations.push(Violation::new("harness", format!(
                    "n{id} did not answer again within {} s after the drill made it exit: restart it (its supervisor should have)",
                    opts.duration_s
                )));
            },
            _ = tokio::signal::ctrl_c() => interrupted = true,
        }
    } else {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(opts.duration_s)) => {}
            _ = tokio::signal::ctrl_c() => interrupted = true,
        }
    }
    // Undo whatever was (even partly) applied.
    let restore_errors = restore(&plan, &addrs, timeout).await;
    let healed_at_ms = rec.now_ms();
    rec.write(|h| h.events.push(Event { at_ms: healed_at_ms, what: "undo".to_owned() }));
    for e in &restore_errors {
        violations.push(Violation::new("harness", e.clone()));
    }
    if interrupted {
        eprintln!(
            "\ninterrupted: the fault is undone; the canary measures recovery, Ctrl-C again to stop at once"
        );
    }
    let limit = Duration::from_millis(w.stop_at_ms + w.converge_limit_ms) + FINAL_READS_LIMIT;
    tokio::select! {
        r = tokio::time::timeout(limit, verifier) => if r.is_err() {
            violations.push(Violation::new("liveness", "the canary's final reads did not finish in time"));
        },
        _ = tokio::signal::ctrl_c() => anyhow::bail!("stopped during recovery; the fault was undone ({} restore errors)", restore_errors.len()),
    }
    progress.abort();
    for t in tasks {
        t.abort();
    }
    eprintln!();

    let history = rec.read(Clone::clone);
    let out_dir =
        opts.out.clone().unwrap_or_else(|| PathBuf::from(format!("cascade-drill-{started_unix_ms}")));
    std::fs::create_dir_all(&out_dir).map_err(|e| anyhow::anyhow!("create {}: {e}", out_dir.display()))?;
    let history_path = out_dir.join("history.json");
    std::fs::write(&history_path, serde_json::to_vec(&history)?)
        .map_err(|e| anyhow::anyhow!("write {}: {e}", history_path.display()))?;
    let mut report = Report {
        scenario: format!("drill {}", command.kind()),
        description: format!("{} against the running cluster at {addr}", plan.target),
        seed: started_unix_ms,
        started_unix_ms,
        duration_ms: rec.now_ms(),
        nodes: nodes
            .iter()
            .map(|n| NodeInfo { id: n.id, region: n.region.clone(), addr: n.addr.clone() })
            .collect(),
        shards: n_shards,
        workload_from_ms: w.warmup_ms,
        heal_at_ms: w.stop_at_ms,
        faults: vec![FaultRecord {
            kind: command.kind().to_owned(),
            target: plan.target.clone(),
            at_ms,
            healed_at_ms: Some(healed_at_ms),
            rto_ms: None,
            failed_probes: 0,
        }],
        violations,
        artifacts: BTreeMap::from([("history".to_owned(), history_path.display().to_string())]),
        ..Report::default()
    };
    let limits = RunLimits {
        revocation_bound_ms: bound_ms,
        heal_at_ms: w.stop_at_ms,
        converge_limit_ms: w.converge_limit_ms,
    };
    report.finish(&history, limits);
    cascade_check::report::write_reports(&report, &out_dir)
        .map_err(|e| anyhow::anyhow!("write the reports to {}: {e}", out_dir.display()))?;
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => {
            println!("{}", report.markdown());
            println!("reports: {}/report.{{json,md,html}}", out_dir.display());
        }
    }
    Ok(if report.passed() { exit::SUCCESS } else { exit::NOT_VALID })
}

/// Every node, each of which must have answered and must accept fault injection.
fn usable_nodes(reports: &[NodeReport]) -> anyhow::Result<Vec<Node>> {
    let mut nodes = Vec::new();
    let mut disabled = Vec::new();
    for r in reports {
        let status = r.answer.as_ref().map_err(|e| {
            drill_error(
                tonic::Code::Unavailable,
                format!(
                    "n{} at {} did not answer ({e}); a drill needs every node up to undo its fault",
                    r.node_id, r.addr
                ),
            )
        })?;
        if !status.fault_injection {
            disabled.push(format!("n{}", r.node_id));
        }
        nodes.push(Node { id: r.node_id, addr: r.addr.clone(), region: r.region.clone() });
    }
    if !disabled.is_empty() {
        return Err(drill_error(tonic::Code::FailedPrecondition, format!(
            "drills are disabled on {}: start every node with --enable-fault-injection (fault_injection = true) to allow them",
            disabled.join(", ")
        ))
        .into());
    }
    Ok(nodes)
}

fn plan(
    command: &DrillCommand,
    nodes: &[Node],
    reports: &[NodeReport],
    n_shards: u16,
) -> anyhow::Result<Plan> {
    let by_id: BTreeMap<u64, &Node> = nodes.iter().map(|n| (n.id, n)).collect();
    let node = |id: u64| {
        by_id.get(&id).copied().ok_or_else(|| {
            Usage(format!(
                "no node {id}; nodes: {}",
                by_id.keys().map(|k| format!("n{k}")).collect::<Vec<_>>().join(", ")
            ))
        })
    };
    // Cut every link between `inside` and the rest, both ways.
    let cut_off = |inside: &BTreeSet<u64>| -> BTreeMap<u64, Vec<String>> {
        nodes
            .iter()
            .map(|n| {
                let peers = nodes
                    .iter()
                    .filter(|p| p.id != n.id && inside.contains(&p.id) != inside.contains(&n.id))
                    .map(|p| p.addr.clone())
                    .collect();
                (n.id, peers)
            })
            .collect()
    };
    Ok(match command {
        DrillCommand::IsolateRegion { region, .. } => {
            let inside: BTreeSet<u64> = nodes.iter().filter(|n| &n.region == region).map(|n| n.id).collect();
            if inside.is_empty() {
                let regions: BTreeSet<&str> = nodes.iter().map(|n| n.region.as_str()).collect();
                return Err(Usage(format!(
                    "no node in region {region:?}; regions: {}",
                    regions.into_iter().collect::<Vec<_>>().join(", ")
                ))
                .into());
            }
            let names: Vec<String> = inside.iter().map(|id| format!("n{id}")).collect();
            Plan {
                target: format!("region {region} ({})", names.join(", ")),
                cuts: cut_off(&inside),
                clock: None,
                crash: None,
            }
        }
        DrillCommand::KillLeader { shard, .. } => {
            let leader = shard_leader(reports, *shard, n_shards)?;
            Plan {
                target: format!("n{leader} (leader of shard {shard})"),
                cuts: BTreeMap::new(),
                clock: None,
                crash: Some((leader, incarnation_of(reports, leader))),
            }
        }
        DrillCommand::IsolateLeader { shard, .. } => {
            let leader = shard_leader(reports, *shard, n_shards)?;
            Plan {
                target: format!("n{leader} (leader of shard {shard})"),
                cuts: cut_off(&BTreeSet::from([leader])),
                clock: None,
                crash: None,
            }
        }
        DrillCommand::CutLink { from, to, .. } => {
            let (f, t) = (node(*from)?, node(*to)?);
            if from == to {
                return Err(Usage("--from and --to must be different nodes".to_owned()).into());
            }
            Plan {
                target: format!("n{from} -> n{to}"),
                cuts: BTreeMap::from([(f.id, vec![t.addr.clone()])]),
                clock: None,
                crash: None,
            }
        }
        DrillCommand::ClockOffset { node: id, offset_ms, .. } => {
            node(*id)?;
            Plan {
                target: format!("n{id}, clock {offset_ms:+} ms"),
                cuts: BTreeMap::new(),
                clock: Some((*id, *offset_ms)),
                crash: None,
            }
        }
    })
}

/// The leader of `shard`, or why there is none to aim at.
fn shard_leader(reports: &[NodeReport], shard: u32, n_shards: u16) -> anyhow::Result<u64> {
    if shard >= u32::from(n_shards) {
        return Err(Usage(format!("--shard must be below {n_shards}")).into());
    }
    leader_of(reports, shard).ok_or_else(|| {
        drill_error(
            tonic::Code::Unavailable,
            format!("shard {shard} has no leader right now; nothing to aim at"),
        )
        .into()
    })
}

/// A node's incarnation as it reported it (0 if it did not answer).
fn incarnation_of(reports: &[NodeReport], id: u64) -> u64 {
    reports.iter().find(|r| r.node_id == id).and_then(|r| r.answer.as_ref().ok()).map_or(0, |s| s.incarnation)
}

/// Waits until node `id` answers as a new process (an incarnation other than `before`), within
/// `limit`. A supervisor may restart it faster than a poll could see it gone.
async fn wait_for_restart(addrs: &BTreeMap<u64, String>, id: u64, before: u64, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let probe = Duration::from_millis(500);
    let addr = addrs.get(&id).cloned().unwrap_or_default();
    while tokio::time::Instant::now() < deadline {
        if let Ok(api) = Api::connect(&addr, probe).await {
            if api.node_status().await.is_ok_and(|s| s.node_id == id && s.incarnation != before) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// The node that claims leadership of `shard` in the highest term.
fn leader_of(reports: &[NodeReport], shard: u32) -> Option<u64> {
    reports
        .iter()
        .filter_map(|r| r.answer.as_ref().ok())
        .flat_map(|s| s.shards.iter().map(move |x| (s.node_id, x)))
        .filter(|(id, x)| x.shard == shard && x.role.eq_ignore_ascii_case("leader") && x.leader == *id)
        .max_by_key(|(_, x)| x.term)
        .map(|(id, _)| id)
}

fn confirm(yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Usage("stdin is not a terminal: pass --yes to run the drill".to_owned()).into());
    }
    eprint!("Inject this fault into the running cluster? Type 'yes' to go on: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "yes" {
        return Err(Usage("not confirmed; nothing was changed".to_owned()).into());
    }
    Ok(())
}

fn connector(addrs: &BTreeMap<u64, String>) -> anyhow::Result<Connector> {
    let mut made = BTreeMap::new();
    for (&id, addr) in addrs {
        made.insert(
            id,
            clients::tcp_client(addr).map_err(|e| Usage(format!("node n{id} address {addr:?}: {e}")))?,
        );
    }
    Ok(Arc::new(move |id| {
        made.get(&id).cloned().unwrap_or_else(|| made.values().next().cloned().expect("a cluster has nodes"))
    }))
}

async fn node_api(addrs: &BTreeMap<u64, String>, id: u64, timeout: Duration) -> anyhow::Result<Api> {
    let addr = addrs.get(&id).ok_or_else(|| anyhow::anyhow!("no node n{id}"))?;
    Api::connect(addr, timeout).await
}

async fn inject(plan: &Plan, addrs: &BTreeMap<u64, String>, timeout: Duration) -> anyhow::Result<()> {
    for (&id, cut) in plan.cuts.iter().filter(|(_, c)| !c.is_empty()) {
        node_api(addrs, id, timeout)
            .await?
            .cut_links(pb::CutLinksRequest { addrs: cut.clone(), heal: false })
            .await?;
    }
    if let Some((id, offset_ms)) = plan.clock {
        node_api(addrs, id, timeout).await?.set_clock_offset(pb::SetClockOffsetRequest { offset_ms }).await?;
    }
    if let Some((id, _)) = plan.crash {
        node_api(addrs, id, timeout).await?.crash().await?;
    }
    Ok(())
}

/// Undoes the plan on every node it touched, retrying; returns what could not be undone, with
/// the command that undoes it by hand.
async fn restore(plan: &Plan, addrs: &BTreeMap<u64, String>, timeout: Duration) -> Vec<String> {
    let mut errors = Vec::new();
    for &id in plan.cuts.keys() {
        let mut last = None;
        for _ in 0..RESTORE_ATTEMPTS {
            match node_api(addrs, id, timeout).await {
                Ok(api) => match api.cut_links(pb::CutLinksRequest { addrs: Vec::new(), heal: true }).await {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e.to_string()),
                },
                Err(e) => last = Some(format!("{e:#}")),
            }
        }
        if let Some(e) = last {
            errors.push(format!(
                "could not heal n{id}'s links ({e}); run: cascade --addr {} cluster cut --heal",
                addrs.get(&id).map_or("?", String::as_str)
            ));
        }
    }
    if let Some((id, _)) = plan.clock {
        let reset = async {
            node_api(addrs, id, timeout)
                .await?
                .set_clock_offset(pb::SetClockOffsetRequest { offset_ms: 0 })
                .await
                .map_err(anyhow::Error::from)
        };
        if let Err(e) = reset.await {
            errors.push(format!(
                "could not reset n{id}'s clock ({e:#}); the node's clock stays off until it restarts"
            ));
        }
    }
    errors
}

/// A live progress line on stderr: phase, canary successes and failures in the last second.
async fn progress_line(rec: LiveRecorder, kind: &'static str, fault_at: u64, stop_at: u64) {
    let tty = std::io::stderr().is_terminal();
    let mut last_print = 0;
    loop {
        tokio::time::sleep(PROGRESS_EVERY).await;
        let now = rec.now_ms();
        let phase = if now < fault_at {
            "baseline".to_owned()
        } else if rec.read(|h| h.events.len()) < 2 {
            format!("fault {kind}")
        } else if now < stop_at {
            "recovery".to_owned()
        } else {
            "verifying".to_owned()
        };
        let from = now.saturating_sub(1_000);
        let (ok, failed) = rec.read(|h| h.outcomes_since(from));
        let line = format!(
            "[{:>6.1}s] {phase:<24} canary last 1 s: {ok:>4} ok {failed:>4} failed",
            now as f64 / 1000.0
        );
        if tty {
            eprint!("\r{line}");
        } else if now >= last_print + 5_000 {
            eprintln!("{line}");
            last_print = now;
        }
    }
}

/// A drill precondition that failed, reported like the gRPC status it amounts to.
fn drill_error(code: tonic::Code, message: String) -> RpcError {
    RpcError { rpc: "drill", code, message }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
