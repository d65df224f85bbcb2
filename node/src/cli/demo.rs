//! `cascade demo`: starts a 3-node cluster in 3 regions on loopback (`cascade serve` child
//! processes on temporary data dirs), walks through Cascade's promises across it (writes sent to
//! one node, checks answered by the others), kills the leader of a shard mid-run to show the
//! failover time and that no acknowledged write was lost, restarts it, and stops every node
//! cleanly. Each step prints what was done, what came back, and PASS or FAIL against what is
//! promised; exits 1 if any step did not behave as promised, listing which. `--keep` leaves the
//! cluster running until Ctrl-C.
//!
//! This file only drives the public gRPC API, like any client would, and starts, kills and stops
//! the node processes through `local.rs`; it must not reach into a node's internals, must not
//! hide a failed step (every step is judged and reported), and must not wait for state without a
//! deadline.

use crate::cli::api::Api;
use crate::cli::exit::{self, RpcError};
use crate::cli::local::{log_tail, LocalCluster};
use crate::cli::render::{check_status_name, reason_name, rows_table, Record, Val};
use crate::cli::serve::{init_logging, shutdown_signal};
use anyhow::Context;
use cascade_protocol::ids::{RefreshToken, SessionId, UserKey};
use cascade_protocol::pb::{self, CheckStatus, ReasonCode};
use clap::Args;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Flags of `cascade demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the cluster running after the walk-through (until Ctrl-C) and print how to use it.
    #[arg(long)]
    pub keep: bool,
}

const TENANT: &str = "acme";
const USER: &str = "alice";
const CLIENT: &str = "demo-web";
const DEVICE: &str = "laptop";
/// Lifetime of demo sessions.
const TTL_MS: u64 = 8 * 3600 * 1000;

/// One node per region, node ids 1, 2, 3 in this order.
const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
/// Few shards, so the cluster starts quickly.
const SHARDS: u16 = 8;
/// How long the cluster may take until every shard has a leader and every replica is fresh.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between readiness and catch-up probes.
const READY_POLL: Duration = Duration::from_millis(100);
/// Deadline of each call while a node is starting (so a node that is not up yet is skipped fast).
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the survivors may take to accept a write to the shard whose leader was killed, and
/// to agree on its new leader.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between write attempts, and between status polls, during the failover.
const FAILOVER_POLL: Duration = Duration::from_millis(50);
/// Deadline of each write during the failover: a node holds a write until its shard has a
/// leader again, so one call usually spans the whole election.
const FAILOVER_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the restarted node may take to catch up on the shard.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long leaderships may take to spread out again once the killed node is back: a few
/// balancing periods (`LocalCluster`'s nodes run with a short one), each handing one shard over.
const BALANCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between repeated calls while an answer may still be legitimately stale.
const SETTLE_POLL: Duration = Duration::from_millis(20);
/// Log lines shown when a step involving a node fails.
const LOG_TAIL_LINES: usize = 15;
/// Sessions created on the demo shard right before its leader is killed.
const WRITES_BEFORE_KILL: usize = 3;

/// RFC 4648 §5 base64url without padding.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..symbols {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

/// An RFC 7638-shaped thumbprint: SHA-256 of a (made-up) canonical JWK, base64url, 43 chars.
fn thumbprint(jwk: &str) -> String {
    base64url(&Sha256::digest(jwk.as_bytes()))
}

/// Shortens long tokens for display.
fn short(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() > 28 {
        let head: String = chars[..20].iter().collect();
        let tail: String = chars[chars.len() - 6..].iter().collect();
        format!("{head}…{tail}")
    } else {
        text.to_owned()
    }
}

/// Milliseconds of a duration, for printing.
fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("     {line}\n")).collect()
}

/// Prints the last lines of a node's log, indented under the current step.
fn print_log_tail(node_id: u64, log: &Path) {
    let lines = log_tail(log, LOG_TAIL_LINES);
    if lines.is_empty() {
        println!("     (node {node_id}'s log {} is empty or unreadable)", log.display());
        return;
    }
    println!("     last {} lines of node {node_id}'s log ({}):", lines.len(), log.display());
    for line in lines {
        println!("       | {line}");
    }
}

/// `tenant/user` users on `shard` (of `n_shards`) other than the demo user, in a stable order.
fn users_on_shard(shard: u16, n_shards: u16, count: usize) -> Vec<String> {
    (0u32..1_000_000)
        .map(|i| format!("user-{i:03}"))
        .filter(|user| UserKey::new(TENANT, user.as_str()).shard(n_shards) == shard)
        .take(count)
        .collect()
}

/// The shard `shard` of a node status, if the node hosts it.
fn shard_of(r: &pb::NodeStatusResponse, shard: u16) -> Option<&pb::ShardStatus> {
    r.shards.iter().find(|s| s.shard == u32::from(shard))
}

/// A row for one node's view of one shard.
fn shard_row(r: &pb::NodeStatusResponse, s: &pb::ShardStatus) -> Record {
    let voters: Vec<String> = s.voters.iter().map(u64::to_string).collect();
    Record::new()
        .with("node", r.node_id)
        .with("region", r.region.as_str())
        .with("shard", s.shard)
        .with("role", s.role.as_str())
        .with("leader", s.leader)
        .with("term", s.term)
        .with("voters", voters)
        .with("last_log_index", s.last_log_index)
        .with("applied_index", s.applied_index)
        .with("fresh", s.fresh)
        .with("staleness_ms", s.staleness_ms)
}

/// The outcome of calling until the answer is the expected one (see [`settle`]).
struct Settled<T> {
    /// The last answer.
    result: Result<T, RpcError>,
    tries: u32,
    /// From the first call to the end of the last.
    took: Duration,
}

impl<T> Settled<T> {
    /// What to add to the printed answer when it took more than one call.
    fn note(&self, ok: bool, window: Duration) -> String {
        if self.tries <= 1 {
            String::new()
        } else if ok {
            format!(" (after {} tries in {} ms; allowed: {} ms)", self.tries, ms(self.took), ms(window))
        } else {
            format!(
                " (still so after {} tries over {} ms; allowed: {} ms)",
                self.tries,
                ms(self.took),
                ms(window)
            )
        }
    }
}

/// Calls `call` until `done` accepts its answer, as long as a wrong (or failed) answer is still
/// allowed. A replica answers from state that may be up to the revocation bound old (P2), so
/// right after a write another node may not show it yet; an answer is only judged wrong when a
/// call that started more than `window` after the first one still gets it. The last answer is
/// returned either way.
async fn settle<T, F, Fut>(window: Duration, mut call: F, done: impl Fn(&T) -> bool) -> Settled<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RpcError>>,
{
    let first = Instant::now();
    let mut tries = 0;
    loop {
        let started = Instant::now();
        tries += 1;
        let result = call().await;
        let ok = result.as_ref().is_ok_and(&done);
        if ok || started.duration_since(first) > window {
            return Settled { result, tries, took: first.elapsed() };
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// A node the walk talks to.
struct Target {
    id: u64,
    region: String,
    api: Api,
    /// Its log file, shown when a step involving it fails (none for an in-process node).
    log: Option<PathBuf>,
}

/// An acknowledged session and what a check of it must answer now.
#[derive(Clone, Debug)]
struct Acked {
    /// `tenant/user client`, for display.
    owner: String,
    expect: CheckStatus,
}

/// Prints the walk-through and keeps score.
struct Walk {
    nodes: Vec<Target>,
    /// Index in `nodes` of the node writes are sent to.
    writer: usize,
    /// Indexes in `nodes` of the nodes checks are sent to, in turn.
    readers: Vec<usize>,
    next_reader: usize,
    /// The revocation bound (P2) the nodes run with.
    bound: Duration,
    /// Every session whose creation was acknowledged, by id.
    acked: BTreeMap<String, Acked>,
    /// Index in `nodes` of the node last called, whose log is shown if the step fails.
    last_node: Option<usize>,
    /// Step whose failure already showed a log.
    log_shown: usize,
    step: usize,
    failed: Vec<String>,
    title: String,
}

impl Walk {
    fn new() -> Walk {
        Walk {
            nodes: Vec::new(),
            writer: 0,
            readers: Vec::new(),
            next_reader: 0,
            bound: Duration::ZERO,
            acked: BTreeMap::new(),
            last_node: None,
            log_shown: 0,
            step: 0,
            failed: Vec::new(),
            title: String::new(),
        }
    }

    /// Sets the nodes to talk to: writes go to the first, checks to the others in turn (to the
    /// first too when it is alone).
    fn set_nodes(&mut self, nodes: Vec<Target>, bound: Duration) {
        self.readers = if nodes.len() > 1 { (1..nodes.len()).collect() } else { vec![0] };
        self.writer = 0;
        self.next_reader = 0;
        self.nodes = nodes;
        self.bound = bound;
    }

    fn step(&mut self, title: &str) {
        self.step += 1;
        self.title = title.to_owned();
        self.last_node = None;
        println!();
        println!("[{:>2}] {title}", self.step);
    }

    fn did(&self, text: &str) {
        println!("     did   {text}");
    }

    fn got(&self, text: &str) {
        println!("     got   {text}");
    }

    fn judge(&mut self, promise: &str, ok: bool) -> bool {
        if ok {
            println!("     PASS  {promise}");
        } else {
            println!("     FAIL  {promise}");
            self.failed.push(format!("step {} ({}): {promise}", self.step, self.title));
            self.show_log();
        }
        ok
    }

    fn error(&mut self, promise: &str, err: impl std::fmt::Display) {
        self.got(&format!("error: {err}"));
        self.judge(promise, false);
    }

    fn skip(&mut self, why: &str) {
        println!("     FAIL  skipped: {why}");
        self.failed.push(format!("step {} ({}): skipped, {why}", self.step, self.title));
    }

    /// Shows the log of the node last called, once per step.
    fn show_log(&mut self) {
        if self.log_shown == self.step {
            return;
        }
        let Some(target) = self.last_node.and_then(|i| self.nodes.get(i)) else { return };
        let Some(log) = &target.log else { return };
        self.log_shown = self.step;
        print_log_tail(target.id, log);
    }

    /// `node 2 (us-east)`.
    fn name(&self, node: usize) -> String {
        self.nodes
            .get(node)
            .map_or_else(|| format!("node #{node}"), |t| format!("node {} ({})", t.id, t.region))
    }

    fn node_id(&self, node: usize) -> u64 {
        self.nodes.get(node).map_or(0, |t| t.id)
    }

    /// The client of `node`, noted as the node last called.
    fn at(&mut self, node: usize) -> Option<Api> {
        self.last_node = Some(node);
        self.nodes.get(node).map(|t| t.api.clone())
    }

    /// The next node a check goes to.
    fn reader(&mut self) -> usize {
        let node = self.readers.get(self.next_reader % self.readers.len().max(1)).copied().unwrap_or(0);
        self.next_reader += 1;
        node
    }

    /// Who answered a check sent to `asked`, and how fresh the answer is.
    fn answered(&self, asked: usize, f: Option<&pb::Freshness>) -> String {
        let Some(f) = f else { return "no freshness reported".to_owned() };
        let who = if f.node_id == self.node_id(asked) {
            format!("answered by node {} itself", f.node_id)
        } else {
            format!("forwarded to and answered by node {}", f.node_id)
        };
        format!("{who}, applied_index={} staleness≤{} ms", f.applied_index, f.staleness_bound_ms)
    }

    /// Notes acknowledged sessions (creates), and sessions the same answer revoked.
    fn record_created(&mut self, r: &pb::CreateSessionResponse, owner: String) {
        self.acked.insert(r.session_id.clone(), Acked { owner, expect: CheckStatus::Valid });
        self.record_revoked(&r.evicted_session_ids);
    }

    /// Notes that an acknowledged answer revoked these sessions.
    fn record_revoked(&mut self, ids: &[String]) {
        for id in ids {
            if let Some(a) = self.acked.get_mut(id) {
                a.expect = CheckStatus::Revoked;
            }
        }
    }

    /// One check at the next reader, printed and judged against the expected status (and
    /// reason, if given); repeated while a stale answer is allowed.
    async fn check(
        &mut self,
        session_id: &str,
        jkt: &str,
        required_aal: u32,
        expect: CheckStatus,
        expect_reason: Option<ReasonCode>,
        promise: &str,
    ) -> bool {
        let node = self.reader();
        self.check_at(node, session_id, jkt, required_aal, expect, expect_reason, promise).await
    }

    /// One check at `node`, printed and judged like [`Walk::check`].
    #[allow(clippy::too_many_arguments)]
    async fn check_at(
        &mut self,
        node: usize,
        session_id: &str,
        jkt: &str,
        required_aal: u32,
        expect: CheckStatus,
        expect_reason: Option<ReasonCode>,
        promise: &str,
    ) -> bool {
        let jkt_text = if jkt.is_empty() { "none".to_owned() } else { short(jkt) };
        self.did(&format!(
            "CheckSession {session_id} jkt={jkt_text} required_aal={required_aal} at {}",
            self.name(node)
        ));
        let Some(api) = self.at(node) else {
            self.skip("no node to ask");
            return false;
        };
        let request = pb::CheckSessionRequest {
            session_id: session_id.to_owned(),
            jkt: jkt.to_owned(),
            required_aal,
            linearizable: false,
        };
        let matches = |r: &pb::CheckSessionResponse| {
            r.status == expect as i32 && expect_reason.is_none_or(|reason| r.reason == reason as i32)
        };
        let settled = settle(self.bound, || api.check_session(request.clone()), matches).await;
        match &settled.result {
            Ok(r) => {
                let ok = matches(r);
                self.got(&format!(
                    "status={} reason={} aal={}",
                    check_status_name(r.status),
                    reason_name(r.reason),
                    r.aal
                ));
                self.got(&format!(
                    "{}{}",
                    self.answered(node, r.freshness.as_ref()),
                    settled.note(ok, self.bound)
                ));
                self.judge(promise, ok)
            }
            Err(err) => {
                self.error(promise, err);
                false
            }
        }
    }

    /// CreateSession at the writer; the session is noted as acknowledged.
    async fn create(&mut self, request: pb::CreateSessionRequest) -> Option<pb::CreateSessionResponse> {
        let node = self.writer;
        self.create_at(node, request).await
    }

    /// CreateSession at `node`; the session is noted as acknowledged.
    async fn create_at(
        &mut self,
        node: usize,
        request: pb::CreateSessionRequest,
    ) -> Option<pb::CreateSessionResponse> {
        let owner = format!("{}/{} {}", request.tenant, request.user_id, request.client_id);
        let Some(api) = self.at(node) else {
            self.skip("no node to ask");
            return None;
        };
        match api.create_session(request).await {
            Ok(r) => {
                self.record_created(&r, owner);
                Some(r)
            }
            Err(err) => {
                self.error("the session is created", err);
                None
            }
        }
    }

    /// Revoke one session at `node`, printing what was asked and what came back, and record what
    /// was revoked; `None` (judged as a failure of `promise`) if the node refused.
    async fn revoke_at(
        &mut self,
        node: usize,
        session_id: &str,
        reason: ReasonCode,
        text: &str,
        promise: &str,
    ) -> Option<pb::RevokeResponse> {
        self.did(&format!(
            "RevokeSession {session_id} reason={} at {}",
            reason.as_str_name(),
            self.name(node)
        ));
        let api = self.at(node)?;
        let request = pb::RevokeSessionRequest {
            session_id: session_id.to_owned(),
            revocation: Some(pb::Revocation {
                reason: reason as i32,
                text: text.to_owned(),
                actor: "cascade-demo".into(),
            }),
        };
        match api.revoke_session(request).await {
            Ok(r) => {
                self.got(&format!("revoked_session_ids=[{}]", r.revoked_session_ids.join(",")));
                self.record_revoked(&r.revoked_session_ids);
                Some(r)
            }
            Err(err) => {
                self.error(promise, err);
                None
            }
        }
    }
}

/// `cascade demo`.
pub async fn demo(args: DemoArgs, timeout: Duration) -> anyhow::Result<u8> {
    init_logging("warn");
    // Installed first, so Ctrl-C at any point stops the nodes cleanly and removes their data.
    let mut shutdown = Box::pin(shutdown_signal()?);
    let exe = std::env::current_exe().context("find the cascade executable to start nodes with")?;
    println!(
        "Starting a {}-node Cascade cluster on loopback: one `cascade serve` process per region \
         ({}), {SHARDS} shards, temporary data dirs…",
        REGIONS.len(),
        REGIONS.join(", ")
    );
    let mut cluster = LocalCluster::start(&exe, &REGIONS, SHARDS)?;
    println!("Data dirs and logs in {}", cluster.root().display());
    let mut walk = Walk::new();
    let interrupted = tokio::select! {
        () = scenario(&mut walk, &mut cluster, timeout) => false,
        () = &mut shutdown => true,
    };
    if interrupted {
        println!();
        println!("Interrupted during step {}; stopping the cluster…", walk.step);
        for (id, result) in cluster.stop(STOP_TIMEOUT).await {
            match result {
                Ok(stopped) => println!("  node {id} exited: {}", stopped.status),
                Err(err) => println!("  node {id}: {err:#}"),
            }
        }
        return Ok(exit::INTERNAL);
    }

    if args.keep {
        println!();
        report(&walk);
        print_keep_hints(&walk, &cluster);
        shutdown.await;
        println!("Stopping…");
    }
    stop_step(&mut walk, &mut cluster, args.keep).await;
    println!();
    report(&walk);
    if walk.failed.is_empty() {
        Ok(exit::SUCCESS)
    } else {
        Ok(exit::INTERNAL)
    }
}

/// Prints the score: every step passed, or which did not.
fn report(walk: &Walk) {
    if walk.failed.is_empty() {
        println!("All {} steps behaved as promised.", walk.step);
    } else {
        println!("{} of {} steps did NOT behave as promised:", walk.failed.len(), walk.step);
        for failure in &walk.failed {
            println!("  - {failure}");
        }
    }
}

/// How to use the cluster that `--keep` leaves running.
fn print_keep_hints(walk: &Walk, cluster: &LocalCluster) {
    println!();
    println!("The cluster keeps running (Ctrl-C to stop it; its data dirs are removed then).");
    for node in &cluster.nodes {
        let pid = node.pid().map_or_else(|| "not running".to_owned(), |p| format!("pid {p}"));
        println!(
            "  node {}  {:<9} {}  ({pid}, log {})",
            node.id,
            node.region,
            node.url(),
            node.log.display()
        );
    }
    println!();
    for node in &cluster.nodes {
        println!("  cascade --addr {} status", node.url());
    }
    if let Some(first) = cluster.nodes.first() {
        println!();
        println!("  export CASCADE_ADDR={}", first.url());
    }
    let example = walk.acked.keys().next().cloned().unwrap_or_else(|| "<SESSION_ID>".to_owned());
    println!("  cascade cluster status   # every node and shard: leaders, lag, freshness");
    println!("  cascade list --tenant {TENANT} --user {USER}");
    println!("  cascade create --tenant {TENANT} --user bob --client {CLIENT} --refresh --ttl 1h");
    if let Some(last) = cluster.nodes.last() {
        println!("  cascade --addr {} check {example}; echo \"exit $?\"", last.url());
    }
    println!("  cascade revoke session <SESSION_ID> --reason logout");
    println!("  cascade -o json check-batch <SESSION_ID>...");
    println!("  cascade load --sessions 2000 --duration-s 5");
    println!("  cascade propagation --samples 200   # revocation ack → visible on every node");
    println!("  kill -9 <PID>   # a failover drill of your own: any other node keeps answering");
}

/// Everything up to the final stop: start-up, the walk-through, the failover and the restart.
async fn scenario(walk: &mut Walk, cluster: &mut LocalCluster, timeout: Duration) {
    if !start_step(walk, cluster, timeout).await {
        return;
    }
    layout_step(walk, cluster).await;
    println!();
    println!(
        "Writes go to {}, which forwards each to its shard's leader; checks go to the other nodes in turn.",
        walk.name(walk.writer)
    );
    walk_through(walk).await;
    failover(walk, cluster, timeout).await;
}

/// How far a node is from ready: `(shards led and fresh, shards hosted, revocation bound)`.
async fn readiness(api: &Api) -> Result<(usize, usize, u64), String> {
    let r = api.node_status().await.map_err(|e| e.to_string())?;
    let ready = r.shards.iter().filter(|s| s.leader != 0 && s.fresh).count();
    Ok((ready, r.shards.len().max(usize::from(SHARDS)), r.revocation_bound_ms))
}

/// Starts nothing (the processes run already): shows how they were started and waits until every
/// node reports a leader and a fresh replica for every shard; then the walk gets its nodes.
async fn start_step(walk: &mut Walk, cluster: &mut LocalCluster, timeout: Duration) -> bool {
    walk.step(&format!("Start {} nodes in {} regions on loopback", cluster.nodes.len(), REGIONS.len()));
    let root = cluster.root().display().to_string();
    for node in &cluster.nodes {
        let pid = node.pid().map_or_else(|| "-".to_owned(), |p| p.to_string());
        walk.did(&format!(
            "cascade serve --node-id {} --region {} --listen {} --shards {SHARDS} --data-dir {} \
             --peer …  (pid {pid})",
            node.id,
            node.region,
            node.addr,
            node.data_dir.display().to_string().replace(&root, "$TMP")
        ));
    }
    let peers: Vec<String> =
        cluster.nodes.iter().map(|n| format!("--peer {}={}@{}", n.id, n.addr, n.region)).collect();
    walk.did(&format!("each with the same peers: {}", peers.join(" ")));

    let started = Instant::now();
    let mut apis: Vec<Option<Api>> = cluster.nodes.iter().map(|_| None).collect();
    let mut last_progress = String::new();
    let mut bound_ms = 0;
    loop {
        let mut parts = Vec::new();
        let mut all_ready = true;
        for (node, api) in cluster.nodes.iter_mut().zip(apis.iter_mut()) {
            if let Some(status) = node.exited() {
                walk.got(&format!("node {} exited during start-up: {status}", node.id));
                print_log_tail(node.id, &node.log);
                walk.judge("every node starts and serves", false);
                return false;
            }
            if api.is_none() {
                *api = Api::connect(&node.url(), PROBE_TIMEOUT).await.ok();
            }
            let state = match api.as_ref() {
                None => Err("not listening yet".to_owned()),
                Some(api) => readiness(api).await,
            };
            match state {
                Ok((ready, total, bound)) => {
                    bound_ms = bound;
                    all_ready &= ready == total;
                    parts.push(format!("node {}: {ready}/{total} shards led and fresh", node.id));
                }
                Err(why) => {
                    all_ready = false;
                    parts.push(format!("node {}: {why}", node.id));
                }
            }
        }
        let progress = parts.join(", ");
        if progress != last_progress {
            println!("     wait  {:>5} ms  {progress}", ms(started.elapsed()));
            last_progress = progress;
        }
        if all_ready {
            break;
        }
        if started.elapsed() >= READY_TIMEOUT {
            walk.got(&format!("not ready after {} s: {last_progress}", READY_TIMEOUT.as_secs()));
            for node in &cluster.nodes {
                print_log_tail(node.id, &node.log);
            }
            walk.judge("every shard of every node has a leader and a fresh replica", false);
            return false;
        }
        tokio::time::sleep(READY_POLL).await;
    }
    walk.got(&format!(
        "all {} nodes ready after {} ms; revocation bound {bound_ms} ms",
        cluster.nodes.len(),
        ms(started.elapsed())
    ));
    let ready = walk.judge("every shard of every node has a leader and a fresh replica", true);

    let mut targets = Vec::new();
    for node in &cluster.nodes {
        match Api::connect(&node.url(), timeout).await {
            Ok(api) => targets.push(Target {
                id: node.id,
                region: node.region.clone(),
                api,
                log: Some(node.log.clone()),
            }),
            Err(err) => {
                walk.error(&format!("connect to node {}", node.id), format!("{err:#}"));
                return false;
            }
        }
    }
    walk.set_nodes(targets, Duration::from_millis(bound_ms));
    ready
}

/// The cluster as its nodes describe it, and where alice's shard lives.
async fn layout_step(walk: &mut Walk, cluster: &LocalCluster) {
    let home = UserKey::new(TENANT, USER).shard(cluster.shards);
    walk.step(&format!("The cluster: nodes, regions, and the replicas of alice's shard ({home})"));
    let mut statuses = Vec::new();
    for node in 0..walk.nodes.len() {
        walk.did(&format!("NodeStatus at {}", walk.name(node)));
        let Some(api) = walk.at(node) else { continue };
        match api.node_status().await {
            Ok(r) => statuses.push(r),
            Err(err) => walk.error("the node reports its cluster", err),
        }
    }
    let Some(first) = statuses.first() else {
        walk.skip("no node answered");
        return;
    };
    let rows: Vec<Record> = first
        .nodes
        .iter()
        .map(|n| {
            let own = statuses.iter().find(|r| r.node_id == n.node_id);
            let led = own.map_or(0, |r| r.shards.iter().filter(|s| s.leader == r.node_id).count());
            let pid = cluster.nodes.iter().find(|c| c.id == n.node_id).and_then(|c| c.pid()).unwrap_or(0);
            Record::new()
                .with("node", n.node_id)
                .with("region", n.region.as_str())
                .with("addr", n.addr.as_str())
                .with("pid", u64::from(pid))
                .with("shards_led", led as u64)
        })
        .collect();
    walk.got(&format!("{} nodes (as node {} lists them):", first.nodes.len(), first.node_id));
    print!("{}", indent(&rows_table(&rows)));
    let shard_rows: Vec<Record> =
        statuses.iter().filter_map(|r| shard_of(r, home).map(|s| shard_row(r, s))).collect();
    walk.got(&format!("alice's shard {home} on each node:"));
    print!("{}", indent(&rows_table(&shard_rows)));

    let describe = |r: &pb::NodeStatusResponse| {
        let mut nodes: Vec<(u64, String)> = r.nodes.iter().map(|n| (n.node_id, n.region.clone())).collect();
        nodes.sort();
        nodes
    };
    let regions: BTreeSet<&str> = first.nodes.iter().map(|n| n.region.as_str()).collect();
    walk.judge(
        &format!("{} nodes in {} distinct regions, listed alike by every node", REGIONS.len(), REGIONS.len()),
        statuses.len() == REGIONS.len()
            && first.nodes.len() == REGIONS.len()
            && regions.len() == REGIONS.len()
            && statuses.iter().all(|r| describe(r) == describe(first)),
    );
    let all_ids: BTreeSet<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    walk.judge(
        &format!("shard {home} has a voting replica in every region (on every node)"),
        statuses.iter().all(|r| {
            shard_of(r, home).is_some_and(|s| s.voters.iter().copied().collect::<BTreeSet<u64>>() == all_ids)
        }),
    );
    let leaders: BTreeSet<u64> =
        statuses.iter().filter_map(|r| shard_of(r, home)).map(|s| s.leader).collect();
    walk.judge(
        &format!("every node names the same leader for shard {home}"),
        leaders.len() == 1 && !leaders.contains(&0),
    );
}

/// The scripted walk-through of the public API: writes go to the walk's writer, checks to its
/// readers in turn, so on a cluster every write is forwarded to its shard's leader and every
/// check is answered by another node's replica (or forwarded when it cannot prove freshness).
async fn walk_through(walk: &mut Walk) {
    let jkt = thumbprint(r#"{"crv":"P-256","kty":"EC","x":"alice-laptop-demo-x","y":"alice-laptop-demo-y"}"#);
    let other_jkt = thumbprint(r#"{"crv":"P-256","kty":"EC","x":"mallory-x","y":"mallory-y"}"#);
    let writer = walk.writer;
    let region = walk.nodes.get(writer).map_or_else(|| "local".to_owned(), |t| t.region.clone());

    // A device-bound session with a refresh token.
    walk.step("Create a device-bound session for acme/alice on her laptop, with a refresh token");
    walk.did(&format!(
        "CreateSession tenant={TENANT} user={USER} client={CLIENT} device={DEVICE} jkt={jkt} aal=1 \
         amr=pwd ttl=8h refresh at {}",
        walk.name(writer)
    ));
    let created = walk
        .create(pb::CreateSessionRequest {
            tenant: TENANT.into(),
            user_id: USER.into(),
            client_id: CLIENT.into(),
            device_id: DEVICE.into(),
            jkt: jkt.clone(),
            aal: 1,
            amr: vec!["pwd".into()],
            ttl_ms: TTL_MS,
            idle_timeout_ms: 0,
            parent_session_id: String::new(),
            with_refresh_token: true,
            metadata: Some(pb::SessionMetadata {
                ip: "192.0.2.10".into(),
                user_agent: "cascade-demo".into(),
                region: region.clone(),
            }),
        })
        .await;
    let Some(created) = created else {
        walk.skip("nothing else can run without the first session");
        return;
    };
    walk.got(&format!("session_id={} refresh_token={}", created.session_id, short(&created.refresh_token)));
    let refresh_ok = created.refresh_token.parse::<RefreshToken>().is_ok_and(|t| t.generation == 1);
    walk.judge(
        "an opaque session id (cs_ + 36 hex) and a generation-1 refresh token (rt_…)",
        created.session_id.parse::<SessionId>().is_ok() && refresh_ok,
    );
    let sid = created.session_id.clone();

    // Checks: right key, wrong key, higher assurance required.
    walk.step("Check it, presenting the laptop's key");
    walk.check(&sid, &jkt, 0, CheckStatus::Valid, None, "VALID for the bound key").await;

    walk.step("Check it, presenting another key (a stolen cookie replayed elsewhere)");
    walk.check(&sid, &other_jkt, 0, CheckStatus::DeviceMismatch, None, "DEVICE_MISMATCH for a different key")
        .await;

    walk.step("Check it for an action that needs assurance level 2");
    walk.check(
        &sid,
        &jkt,
        2,
        CheckStatus::StepUpRequired,
        None,
        "STEP_UP_REQUIRED while the session is at aal 1",
    )
    .await;

    // Step up, then the same check passes.
    walk.step("Step the session up to aal 2 (alice completed a second factor)");
    walk.did(&format!("StepUpSession {sid} aal=2 amr=pwd,otp at {}", walk.name(writer)));
    let request =
        pb::StepUpSessionRequest { session_id: sid.clone(), aal: 2, amr: vec!["pwd".into(), "otp".into()] };
    let Some(api) = walk.at(writer) else { return };
    match api.step_up_session(request).await {
        Ok(r) => {
            walk.got(&format!("aal={}", r.aal));
            walk.judge("the session is now at aal 2", r.aal == 2);
        }
        Err(err) => walk.error("the session is now at aal 2", err),
    }

    walk.step("Check again, requiring aal 2");
    walk.check(&sid, &jkt, 2, CheckStatus::Valid, None, "VALID at aal 2").await;

    // Refresh-token rotation and reuse detection (RFC 9700).
    walk.step("Rotate the refresh token");
    walk.did(&format!("RotateRefreshToken {} at {}", short(&created.refresh_token), walk.name(writer)));
    let request = pb::RotateRefreshTokenRequest { refresh_token: created.refresh_token.clone() };
    let Some(api) = walk.at(writer) else { return };
    match api.rotate_refresh_token(request).await {
        Ok(r) => {
            walk.got(&format!(
                "refresh_token={} generation={} reuse_detected={}",
                short(&r.refresh_token),
                r.generation,
                r.reuse_detected
            ));
            walk.judge(
                "a new refresh token at generation 2, no reuse",
                r.generation == 2 && !r.reuse_detected && !r.refresh_token.is_empty(),
            );
        }
        Err(err) => walk.error("a new refresh token at generation 2", err),
    }

    walk.step("Present the OLD refresh token again (an attacker replaying a stolen token)");
    walk.did(&format!("RotateRefreshToken {} at {}", short(&created.refresh_token), walk.name(writer)));
    let request = pb::RotateRefreshTokenRequest { refresh_token: created.refresh_token.clone() };
    let Some(api) = walk.at(writer) else { return };
    match api.rotate_refresh_token(request).await {
        Ok(r) => {
            walk.got(&format!(
                "refresh_token={} reuse_detected={} revoked_session_ids=[{}]",
                if r.refresh_token.is_empty() { "(none)".to_owned() } else { short(&r.refresh_token) },
                r.reuse_detected,
                r.revoked_session_ids.join(",")
            ));
            walk.record_revoked(&r.revoked_session_ids);
            walk.judge(
                "reuse detected: no new token, the family's session is revoked",
                r.reuse_detected && r.refresh_token.is_empty() && r.revoked_session_ids.contains(&sid),
            );
        }
        Err(err) => walk.error("reuse detected, the session revoked", err),
    }
    walk.check(
        &sid,
        &jkt,
        0,
        CheckStatus::Revoked,
        Some(ReasonCode::RefreshTokenReuse),
        "REVOKED, REFRESH_TOKEN_REUSE",
    )
    .await;

    // Two more sessions, one an SSO child of the other.
    walk.step("Create two more sessions for alice: an SSO parent and its child");
    let mut more: Vec<String> = Vec::new();
    for client in ["demo-portal", "demo-mail"] {
        // The second session is an SSO child of the first.
        let parent = more.first().cloned().unwrap_or_default();
        let parent_text = if parent.is_empty() { "none".to_owned() } else { parent.clone() };
        walk.did(&format!(
            "CreateSession tenant={TENANT} user={USER} client={client} aal=1 parent={parent_text} at {}",
            walk.name(writer)
        ));
        let request = pb::CreateSessionRequest {
            tenant: TENANT.into(),
            user_id: USER.into(),
            client_id: client.into(),
            aal: 1,
            amr: vec!["pwd".into()],
            ttl_ms: TTL_MS,
            parent_session_id: parent,
            ..Default::default()
        };
        if let Some(r) = walk.create(request).await {
            walk.got(&format!("session_id={}", r.session_id));
            more.push(r.session_id);
        }
    }
    walk.judge("both sessions are created", more.len() == 2);
    for id in &more {
        walk.check(id, "", 0, CheckStatus::Valid, None, "VALID").await;
    }

    // Revoke the user.
    walk.step("Revoke user acme/alice (reason ADMIN)");
    walk.did(&format!(
        "RevokeUser tenant=acme user=alice reason=ADMIN actor=cascade-demo at {}",
        walk.name(writer)
    ));
    let request = pb::RevokeUserRequest {
        tenant: TENANT.into(),
        user_id: USER.into(),
        revocation: Some(pb::Revocation {
            reason: ReasonCode::Admin as i32,
            text: "demo: account takeover drill".into(),
            actor: "cascade-demo".into(),
        }),
    };
    let Some(api) = walk.at(writer) else { return };
    match api.revoke_user(request).await {
        Ok(r) => {
            walk.got(&format!("revoked_session_ids=[{}]", r.revoked_session_ids.join(",")));
            walk.record_revoked(&r.revoked_session_ids);
            walk.judge(
                "both live sessions are revoked in one command",
                more.iter().all(|id| r.revoked_session_ids.contains(id)),
            );
        }
        Err(err) => walk.error("both live sessions are revoked", err),
    }

    // Every one of her sessions is revoked.
    walk.step("Check every one of alice's sessions");
    let mut ids = vec![sid.clone()];
    ids.extend(more.iter().cloned());
    walk.did(&format!("ListUserSessions tenant={TENANT} user={USER} at {}", walk.name(writer)));
    let Some(api) = walk.at(writer) else { return };
    let request = pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: USER.into() };
    let listed = |r: &pb::ListUserSessionsResponse| r.sessions.len() >= 3;
    let settled = settle(walk.bound, || api.list_user_sessions(request.clone()), listed).await;
    match &settled.result {
        Ok(r) => {
            let rows: Vec<Record> = r
                .sessions
                .iter()
                .map(|s| {
                    Record::new()
                        .with("session_id", s.session_id.as_str())
                        .with("client_id", s.client_id.as_str())
                        .with("device_id", s.device_id.as_str())
                        .with("parent_session_id", s.parent_session_id.as_str())
                        .with("status", Val::Enum(check_status_name(s.status)))
                        .with("reason", Val::Enum(reason_name(s.reason)))
                })
                .collect();
            walk.got(&format!(
                "{} sessions, {} device(s){}:",
                r.sessions.len(),
                r.devices.len(),
                settled.note(listed(r), walk.bound)
            ));
            print!("{}", indent(&rows_table(&rows)));
            for s in &r.sessions {
                if !ids.contains(&s.session_id) {
                    ids.push(s.session_id.clone());
                }
            }
            walk.judge("all 3 sessions are listed", listed(r));
        }
        Err(err) => walk.error("alice's sessions are listed", err),
    }
    let reader = walk.reader();
    walk.did(&format!("CheckSessionBatch of {} sessions at {}", ids.len(), walk.name(reader)));
    let checks = ids
        .iter()
        .map(|id| pb::CheckSessionRequest { session_id: id.clone(), ..Default::default() })
        .collect();
    let request = pb::CheckSessionBatchRequest { checks };
    let all_revoked = |r: &pb::CheckSessionBatchResponse| {
        r.results.len() == ids.len() && r.results.iter().all(|res| res.status == CheckStatus::Revoked as i32)
    };
    let Some(api) = walk.at(reader) else { return };
    let settled = settle(walk.bound, || api.check_session_batch(request.clone()), all_revoked).await;
    match &settled.result {
        Ok(r) => {
            for (id, res) in ids.iter().zip(&r.results) {
                walk.got(&format!(
                    "{id}  {} {}  ({})",
                    check_status_name(res.status),
                    reason_name(res.reason),
                    walk.answered(reader, res.freshness.as_ref())
                ));
            }
            if settled.tries > 1 {
                walk.got(settled.note(all_revoked(r), walk.bound).trim());
            }
            walk.judge("every one of her sessions checks REVOKED", all_revoked(r));
        }
        Err(err) => walk.error("every one of her sessions checks REVOKED", err),
    }

    // The revocations reached every node.
    walk.step("Check alice's sessions on every node (the revocations reached every region)");
    for node in 0..walk.nodes.len() {
        walk.did(&format!("CheckSessionBatch of {} sessions at {}", ids.len(), walk.name(node)));
        let Some(api) = walk.at(node) else { continue };
        let settled = settle(walk.bound, || api.check_session_batch(request.clone()), all_revoked).await;
        let promise = format!("every one of her sessions checks REVOKED at node {}", walk.node_id(node));
        match &settled.result {
            Ok(r) => {
                let revoked =
                    r.results.iter().filter(|res| res.status == CheckStatus::Revoked as i32).count();
                let freshness: Vec<&pb::Freshness> =
                    r.results.iter().filter_map(|res| res.freshness.as_ref()).collect();
                let staleness = freshness.iter().map(|f| f.staleness_bound_ms).max().unwrap_or(0);
                let by: BTreeSet<u64> = freshness.iter().map(|f| f.node_id).collect();
                let by: Vec<String> = by.iter().map(|id| format!("node {id}")).collect();
                walk.got(&format!(
                    "{revoked}/{} REVOKED, answered by {}, staleness_bound_ms≤{staleness} (bound {} ms){}",
                    ids.len(),
                    by.join("+"),
                    ms(walk.bound),
                    settled.note(all_revoked(r), walk.bound)
                ));
                walk.judge(&promise, all_revoked(r));
            }
            Err(err) => walk.error(&promise, err),
        }
    }

    // Shard status as every node sees it.
    walk.step("Status of alice's shard on every node");
    let home = sid.parse::<SessionId>().map(|id| id.shard).ok();
    let mut rows = Vec::new();
    let mut leaders = BTreeSet::new();
    for node in 0..walk.nodes.len() {
        walk.did(&format!("NodeStatus at {}", walk.name(node)));
        let Some(api) = walk.at(node) else { continue };
        // Every acknowledged write above (3 creates, a step-up, 2 rotations, a user revocation)
        // is at least one applied log entry on alice's shard.
        let applied =
            |r: &pb::NodeStatusResponse| home.and_then(|h| shard_of(r, h)).map_or(0, |s| s.applied_index);
        let all_led = |r: &pb::NodeStatusResponse| {
            !r.shards.is_empty()
                && r.shards.len() == r.n_shards as usize
                && r.shards.iter().all(|s| s.leader != 0)
        };
        let done = |r: &pb::NodeStatusResponse| all_led(r) && applied(r) >= 7;
        let settled = settle(walk.bound, || api.node_status(), done).await;
        match &settled.result {
            Ok(r) => {
                walk.got(&format!(
                    "node {} region {} with {} shards, {} live user actors, revocation bound {} ms{}",
                    r.node_id,
                    r.region,
                    r.n_shards,
                    r.live_user_actors,
                    r.revocation_bound_ms,
                    settled.note(done(r), walk.bound)
                ));
                if let Some(s) = home.and_then(|h| shard_of(r, h)) {
                    rows.push(shard_row(r, s));
                    leaders.insert(s.leader);
                }
                walk.judge(&format!("node {} reports a leader for every shard", r.node_id), all_led(r));
                walk.judge(
                    &format!(
                        "alice's shard has applied at least the 7 writes made above on node {}",
                        r.node_id
                    ),
                    applied(r) >= 7,
                );
            }
            Err(err) => walk.error("the node reports its shards", err),
        }
    }
    println!("     alice's shard as each node sees it (`cascade status` lists every shard):");
    print!("{}", indent(&rows_table(&rows)));
    walk.judge(
        "every node names the same leader for alice's shard",
        leaders.len() == 1 && !leaders.contains(&0),
    );
}

/// The leader of `shard` as `node` reports it (0 if none or the node cannot say).
async fn leader_at(walk: &mut Walk, node: usize, shard: u16) -> Result<(u64, u64, u64), RpcError> {
    let Some(api) = walk.at(node) else { return Ok((0, 0, 0)) };
    let r = api.node_status().await?;
    Ok(shard_of(&r, shard).map_or((0, 0, 0), |s| (s.leader, s.term, s.applied_index)))
}

/// Checks every acknowledged session at each of `nodes`, prints one table, and judges per node
/// that every one is present with the status it must have (and, with `local`, that the node
/// answered from its own replica).
async fn check_acked(walk: &mut Walk, nodes: &[usize], local: bool) {
    let acked: Vec<(String, Acked)> = walk.acked.iter().map(|(id, a)| (id.clone(), a.clone())).collect();
    let request = pb::CheckSessionBatchRequest {
        checks: acked
            .iter()
            .map(|(id, _)| pb::CheckSessionRequest { session_id: id.clone(), ..Default::default() })
            .collect(),
    };
    let mut rows: Vec<Record> = acked
        .iter()
        .map(|(id, a)| {
            Record::new()
                .with("session_id", id.as_str())
                .with("owner", a.owner.as_str())
                .with("expected", Val::Enum(a.expect.as_str_name().to_owned()))
        })
        .collect();
    let mut verdicts = Vec::new();
    for &node in nodes {
        let id = walk.node_id(node);
        walk.did(&format!(
            "CheckSessionBatch of all {} acknowledged sessions at {}",
            acked.len(),
            walk.name(node)
        ));
        let Some(api) = walk.at(node) else { continue };
        let right = |r: &pb::CheckSessionBatchResponse| {
            r.results.len() == acked.len()
                && r.results.iter().zip(&acked).all(|(res, (_, a))| res.status == a.expect as i32)
        };
        let here = |r: &pb::CheckSessionBatchResponse| {
            r.results.iter().all(|res| res.freshness.as_ref().is_some_and(|f| f.node_id == id))
        };
        let done = |r: &pb::CheckSessionBatchResponse| right(r) && (!local || here(r));
        let settled = settle(walk.bound, || api.check_session_batch(request.clone()), done).await;
        match &settled.result {
            Ok(r) => {
                for (row, res) in rows.iter_mut().zip(&r.results) {
                    let by = res.freshness.as_ref().map_or(0, |f| f.node_id);
                    let cell = format!("{} (by {by})", check_status_name(res.status));
                    *row = std::mem::take(row).with(format!("at_node_{id}"), cell);
                }
                let staleness = r
                    .results
                    .iter()
                    .filter_map(|res| res.freshness.as_ref())
                    .map(|f| f.staleness_bound_ms)
                    .max();
                walk.got(&format!(
                    "{} answers from node {id}, staleness≤{} ms{}",
                    r.results.len(),
                    staleness.unwrap_or(0),
                    settled.note(done(r), walk.bound)
                ));
                verdicts.push((node, Some((right(r), here(r)))));
            }
            Err(err) => {
                walk.got(&format!("error at node {id}: {err}"));
                verdicts.push((node, None));
            }
        }
    }
    print!("{}", indent(&rows_table(&rows)));
    for (node, verdict) in verdicts {
        let id = walk.node_id(node);
        walk.last_node = Some(node);
        let promise = format!(
            "each of the {} acknowledged sessions is on node {id} with its expected status",
            acked.len()
        );
        walk.judge(&promise, verdict.is_some_and(|(right, _)| right));
        if local {
            walk.judge(
                &format!("node {id} answered every check from its own replica"),
                verdict.is_some_and(|(_, here)| here),
            );
        }
    }
}

/// Kills the leader of alice's shard mid-run, measures how long until the shard takes writes
/// again, shows that no acknowledged write was lost (P1) and that revocations still reach every
/// survivor, then restarts the killed node and shows it catch up.
async fn failover(walk: &mut Walk, cluster: &mut LocalCluster, timeout: Duration) {
    let home = UserKey::new(TENANT, USER).shard(cluster.shards);
    let writer = walk.writer;

    // Writes acknowledged right before the failure.
    walk.step(&format!("Acknowledged writes to shard {home} (alice's) right before a failure"));
    let (leader, term_before, _) = match leader_at(walk, writer, home).await {
        Ok(l) if l.0 != 0 => l,
        Ok(_) => {
            walk.skip(&format!("shard {home} has no leader"));
            return;
        }
        Err(err) => {
            walk.error(&format!("node {} reports shard {home}'s leader", walk.node_id(writer)), err);
            return;
        }
    };
    let Some(victim) = walk.nodes.iter().position(|t| t.id == leader) else {
        walk.skip(&format!("the leader of shard {home}, node {leader}, is not one of the demo's nodes"));
        return;
    };
    walk.got(&format!("shard {home} is led by {} in term {term_before}", walk.name(victim)));
    let users = users_on_shard(home, cluster.shards, WRITES_BEFORE_KILL + 1);
    if users.len() < WRITES_BEFORE_KILL + 1 {
        walk.skip(&format!("found no {} users on shard {home}", WRITES_BEFORE_KILL + 1));
        return;
    }
    let mut before: Vec<String> = Vec::new();
    for user in users.iter().take(WRITES_BEFORE_KILL) {
        walk.did(&format!(
            "CreateSession tenant={TENANT} user={user} client=demo-app at {}",
            walk.name(writer)
        ));
        let request = pb::CreateSessionRequest {
            tenant: TENANT.into(),
            user_id: user.clone(),
            client_id: "demo-app".into(),
            aal: 1,
            amr: vec!["pwd".into()],
            ttl_ms: TTL_MS,
            ..Default::default()
        };
        if let Some(r) = walk.create_at(writer, request).await {
            walk.got(&format!("session_id={} (shard {})", r.session_id, shard_text(&r.session_id)));
            before.push(r.session_id);
        }
    }
    let mut revoked_before = false;
    if let Some(id) = before.first().cloned() {
        let revoked = walk
            .revoke_at(
                writer,
                &id,
                ReasonCode::Compromised,
                "demo: revoked right before the failure",
                "the session is revoked",
            )
            .await;
        revoked_before = revoked.is_some_and(|r| r.revoked_session_ids.contains(&id));
    }
    walk.judge(
        &format!(
            "{WRITES_BEFORE_KILL} sessions created on shard {home} and one of them revoked, all acknowledged"
        ),
        before.len() == WRITES_BEFORE_KILL && revoked_before,
    );

    // The failure.
    let survivors: Vec<usize> = (0..walk.nodes.len()).filter(|&i| i != victim).collect();
    walk.step(&format!(
        "Kill {} with SIGKILL, the leader of shard {home}; write to the shard through the survivors",
        walk.name(victim)
    ));
    // Connected before the kill, so the clock measures the cluster, not our connection set-up.
    let mut writers = Vec::new();
    let mut watchers = Vec::new();
    for &s in &survivors {
        let url = cluster.nodes.get(s).map(|n| n.url()).unwrap_or_default();
        match (Api::connect(&url, FAILOVER_WRITE_TIMEOUT).await, Api::connect(&url, PROBE_TIMEOUT).await) {
            (Ok(writer), Ok(watcher)) => {
                writers.push((s, writer));
                watchers.push(watcher);
            }
            (Err(err), _) | (_, Err(err)) => {
                walk.got(&format!("cannot reach survivor {}: {err:#}", walk.name(s)));
            }
        }
    }
    let probe_user = users.get(WRITES_BEFORE_KILL).cloned().unwrap_or_default();
    let request = pb::CreateSessionRequest {
        tenant: TENANT.into(),
        user_id: probe_user.clone(),
        client_id: "demo-failover".into(),
        aal: 1,
        amr: vec!["pwd".into()],
        ttl_ms: TTL_MS,
        ..Default::default()
    };
    let Some(node) = cluster.nodes.get_mut(victim) else { return };
    walk.did(&format!("kill -9 {}", node.pid().map_or_else(|| "?".to_owned(), |p| p.to_string())));
    walk.did(&format!(
        "at once: CreateSession tenant={TENANT} user={probe_user} client=demo-failover at {}, \
         each with a {} s deadline, again every {} ms on a refusal",
        survivors.iter().map(|&s| walk.name(s)).collect::<Vec<_>>().join(" then "),
        FAILOVER_WRITE_TIMEOUT.as_secs(),
        ms(FAILOVER_POLL),
    ));
    walk.did(&format!("meanwhile: NodeStatus at both survivors every {} ms", ms(FAILOVER_POLL)));
    let killed_at = Instant::now();
    match node.kill() {
        Ok(status) => walk.got(&format!("node {leader} is gone: {status}")),
        Err(err) => {
            walk.error(&format!("node {leader} is killed"), format!("{err:#}"));
            return;
        }
    }
    let (written, elected) = tokio::join!(
        write_until_accepted(&writers, &request, killed_at),
        wait_for_new_leader(&watchers, home, leader, killed_at),
    );
    match &elected {
        Ok((l, term, took)) => {
            let name = walk
                .nodes
                .iter()
                .position(|t| t.id == *l)
                .map_or_else(|| format!("node {l}"), |i| walk.name(i));
            walk.got(&format!(
                "both survivors name {name} the leader of shard {home} in term {term} \
                 (node {leader} led in term {term_before}), {} ms after the kill",
                ms(*took)
            ));
        }
        Err(seen) => {
            walk.got(&format!("no agreed new leader after {} s: {seen}", FAILOVER_TIMEOUT.as_secs()))
        }
    }
    for (i, (node, err)) in written.refusals.iter().enumerate().take(3) {
        walk.got(&format!("refused meanwhile ({}) by {}: {err}", i + 1, walk.name(*node)));
    }
    if written.refusals.len() > 3 {
        walk.got(&format!("… and {} more distinct refusals", written.refusals.len() - 3));
    }
    let Some((via, created, took)) = written.accepted else {
        walk.got(&format!(
            "no write accepted within {} s ({} attempts)",
            FAILOVER_TIMEOUT.as_secs(),
            written.attempts
        ));
        for &s in &survivors {
            if let Some(t) = walk.nodes.get(s) {
                if let Some(log) = &t.log {
                    print_log_tail(t.id, log);
                }
            }
        }
        walk.log_shown = walk.step;
        walk.judge(&format!("shard {home} accepts writes again through a survivor"), false);
        walk.judge("both survivors name the same new leader", elected.is_ok());
        return;
    };
    walk.record_created(&created, format!("{TENANT}/{probe_user} demo-failover"));
    walk.got(&format!(
        "session_id={} acknowledged by {} {} ms after the kill (attempt {})",
        created.session_id,
        walk.name(via),
        ms(took),
        written.attempts
    ));
    let leader_ms = elected.as_ref().map_or_else(|_| "-".to_owned(), |(_, _, t)| ms(*t).to_string());
    println!(
        "     ==>   failover time: {} ms from kill -9 of the leader to the first acknowledged write \
         (new leader known after {leader_ms} ms)",
        ms(took)
    );
    walk.judge(
        &format!("shard {home} accepts writes again through a survivor (failover took {} ms)", ms(took)),
        true,
    );
    walk.judge("both survivors name the same new leader", elected.is_ok());

    // P1.
    walk.step("Check every acknowledged session on both survivors (P1: no acknowledged write is lost)");
    check_acked(walk, &survivors, false).await;

    // A revocation after the failover.
    walk.step("Revoke a session after the failover; both survivors answer REVOKED");
    let target =
        before.iter().find(|id| walk.acked.get(*id).is_some_and(|a| a.expect == CheckStatus::Valid)).cloned();
    match (target, survivors.first().copied()) {
        (Some(id), Some(via)) => {
            let promise = "the revocation is acknowledged";
            let revoked = walk
                .revoke_at(via, &id, ReasonCode::Admin, "demo: revoked after the failover", promise)
                .await;
            if let Some(r) = revoked {
                walk.judge(promise, r.revoked_session_ids.contains(&id));
            }
            for &s in &survivors {
                walk.check_at(
                    s,
                    &id,
                    "",
                    0,
                    CheckStatus::Revoked,
                    Some(ReasonCode::Admin),
                    &format!("REVOKED, ADMIN at node {}", walk.node_id(s)),
                )
                .await;
            }
        }
        _ => walk.skip("no acknowledged VALID session left to revoke"),
    }

    restart(walk, cluster, victim, home, timeout).await;
}

/// The first write after a failure: who acknowledged it, its answer, and when (from the kill);
/// every distinct refusal before it, with the node that refused.
struct FirstWrite {
    accepted: Option<(usize, pb::CreateSessionResponse, Duration)>,
    attempts: usize,
    refusals: Vec<(usize, String)>,
}

/// Sends `request` to `writers` in turn until one acknowledges it (a node holds a write while its
/// shard has no leader, up to the call's deadline), pausing between refusals, for at most
/// [`FAILOVER_TIMEOUT`] from `since`.
async fn write_until_accepted(
    writers: &[(usize, Api)],
    request: &pb::CreateSessionRequest,
    since: Instant,
) -> FirstWrite {
    let mut first = FirstWrite { accepted: None, attempts: 0, refusals: Vec::new() };
    while let Some((node, api)) = writers.get(first.attempts % writers.len().max(1)) {
        first.attempts += 1;
        match api.create_session(request.clone()).await {
            Ok(r) => {
                first.accepted = Some((*node, r, since.elapsed()));
                break;
            }
            Err(err) => {
                let text = err.to_string();
                if first.refusals.last().is_none_or(|(n, t)| n != node || *t != text) {
                    first.refusals.push((*node, text));
                }
            }
        }
        if since.elapsed() >= FAILOVER_TIMEOUT {
            break;
        }
        tokio::time::sleep(FAILOVER_POLL).await;
    }
    first
}

/// Polls `watchers` until all of them name the same leader of `shard`, other than `old`: that
/// leader, its term, and when (from `since`); or what they named last, after
/// [`FAILOVER_TIMEOUT`].
async fn wait_for_new_leader(
    watchers: &[Api],
    shard: u16,
    old: u64,
    since: Instant,
) -> Result<(u64, u64, Duration), String> {
    loop {
        let mut named = BTreeSet::new();
        let mut term = 0;
        for api in watchers {
            match api.node_status().await {
                Ok(r) => {
                    let (l, t) = shard_of(&r, shard).map_or((0, 0), |s| (s.leader, s.term));
                    named.insert(l);
                    term = term.max(t);
                }
                Err(_) => {
                    named.insert(0);
                }
            }
        }
        let agreed = named.first().copied().filter(|&l| named.len() == 1 && l != 0 && l != old);
        if let Some(leader) = agreed {
            return Ok((leader, term, since.elapsed()));
        }
        if since.elapsed() >= FAILOVER_TIMEOUT || watchers.is_empty() {
            return Err(format!("the survivors name {named:?} (0 = none)"));
        }
        tokio::time::sleep(FAILOVER_POLL).await;
    }
}

/// The shard number printed in a session id, for display.
fn shard_text(session_id: &str) -> String {
    session_id.parse::<SessionId>().map_or_else(|_| "?".to_owned(), |id| id.shard.to_string())
}

/// Restarts the killed node from its data dir, waits until its replica of `home` has caught up
/// with the leader and is fresh, and checks every acknowledged session on it.
async fn restart(walk: &mut Walk, cluster: &mut LocalCluster, victim: usize, home: u16, timeout: Duration) {
    let id = walk.node_id(victim);
    walk.step(&format!("Restart node {id} from its data dir; it catches up on shard {home}"));
    // What it must reach: the leader's applied index now, as the survivors report it.
    let mut target = 0;
    for s in (0..walk.nodes.len()).filter(|&i| i != victim) {
        if let Ok((_, _, applied)) = leader_at(walk, s, home).await {
            target = target.max(applied);
        }
    }
    let root = cluster.root().display().to_string();
    let Some(node) = cluster.nodes.get_mut(victim) else { return };
    walk.did(&format!("cascade {}", node.args().join(" ").replace(&root, "$TMP")));
    walk.last_node = Some(victim);
    let started = Instant::now();
    if let Err(err) = node.spawn() {
        walk.error(&format!("node {id} starts again"), format!("{err:#}"));
        return;
    }
    walk.got(&format!(
        "node {id} started again (pid {}); waiting until its shard {home} has applied index \
         {target} and is fresh",
        node.pid().map_or_else(|| "?".to_owned(), |p| p.to_string())
    ));
    let url = node.url();
    let mut api: Option<Api> = None;
    let mut last = String::from("not listening yet");
    let caught_up = loop {
        if let Some(status) = node.exited() {
            walk.got(&format!("node {id} exited: {status}"));
            break None;
        }
        if api.is_none() {
            api = Api::connect(&url, PROBE_TIMEOUT).await.ok();
        }
        if let Some(a) = api.as_ref() {
            match a.node_status().await {
                Ok(r) => match shard_of(&r, home) {
                    Some(s) if s.applied_index >= target && s.fresh => break Some((r.clone(), s.clone())),
                    Some(s) => {
                        last = format!(
                            "applied_index {} of {target}, role {}, leader {}, fresh {}",
                            s.applied_index, s.role, s.leader, s.fresh
                        );
                    }
                    None => last = format!("shard {home} not hosted"),
                },
                Err(err) => last = err.to_string(),
            }
        }
        if started.elapsed() >= CATCH_UP_TIMEOUT {
            walk.got(&format!("not caught up after {} s: {last}", CATCH_UP_TIMEOUT.as_secs()));
            break None;
        }
        tokio::time::sleep(READY_POLL).await;
    };
    let Some((r, s)) = caught_up else {
        walk.judge(&format!("node {id} catches up on shard {home}"), false);
        return;
    };
    walk.got(&format!(
        "caught up {} ms after the restart: applied_index {} (leader's was {target}), role {}, \
         leader {}, staleness {} ms",
        ms(started.elapsed()),
        s.applied_index,
        s.role,
        s.leader,
        s.staleness_ms
    ));
    print!("{}", indent(&rows_table(&[shard_row(&r, &s)])));
    walk.judge(
        &format!("node {id}'s replica of shard {home} has every write the leader had applied, and is fresh"),
        true,
    );
    match Api::connect(&url, timeout).await {
        Ok(api) => {
            if let Some(t) = walk.nodes.get_mut(victim) {
                t.api = api;
            }
        }
        Err(err) => {
            walk.error(&format!("connect to node {id}"), format!("{err:#}"));
            return;
        }
    }

    walk.step(&format!("Check every acknowledged session on the restarted node {id}"));
    check_acked(walk, &[victim], true).await;

    leaders_spread(walk, cluster.shards).await;
}

/// Waits until every node names the same leader for every shard and no node leads two more
/// than another: the survivors of the failover hand shards back to the restarted node.
async fn leaders_spread(walk: &mut Walk, shards: u16) {
    walk.step("Leaderships spread out again: the survivors hand shards to the restarted node");
    walk.did(&format!(
        "NodeStatus at every node every {} ms, until no node leads two shards more than another",
        ms(READY_POLL)
    ));
    let started = Instant::now();
    let mut first: Option<String> = None;
    let mut last = String::from("no answer yet");
    loop {
        let mut named: Option<Vec<u64>> = None;
        let mut agreed = true;
        for t in &walk.nodes {
            match t.api.node_status().await {
                Ok(r) => {
                    let leaders: Vec<u64> = r.shards.iter().map(|s| s.leader).collect();
                    if leaders.contains(&0) || named.as_ref().is_some_and(|n| *n != leaders) {
                        agreed = false;
                    }
                    named = Some(leaders);
                }
                Err(err) => {
                    agreed = false;
                    last = format!("node {}: {err}", t.id);
                }
            }
        }
        if let Some(leaders) = named.filter(|_| agreed) {
            let mut led: BTreeMap<u64, usize> = walk.nodes.iter().map(|t| (t.id, 0)).collect();
            for l in leaders {
                *led.entry(l).or_default() += 1;
            }
            last = led.iter().map(|(id, n)| format!("node {id} leads {n}")).collect::<Vec<_>>().join(", ");
            first.get_or_insert_with(|| last.clone());
            let (min, max) = (led.values().min().copied(), led.values().max().copied());
            if let (Some(min), Some(max)) = (min, max) {
                if max - min <= 1 {
                    if let Some(before) = first.as_ref().filter(|f| **f != last) {
                        walk.got(&format!("first seen: {before}"));
                    }
                    walk.got(&format!(
                        "{last} of {shards} shards, {} ms after the check",
                        ms(started.elapsed())
                    ));
                    walk.judge("no node leads two shards more than another", true);
                    return;
                }
            }
        }
        if started.elapsed() >= BALANCE_TIMEOUT {
            walk.got(&format!("after {} s: {last}", BALANCE_TIMEOUT.as_secs()));
            walk.judge("no node leads two shards more than another", false);
            return;
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Stops every node with SIGTERM and judges that each exits cleanly within the deadline. After
/// `--keep` (`kept`), a node that exited before (the operator may have killed it in a drill) is
/// reported but not judged.
async fn stop_step(walk: &mut Walk, cluster: &mut LocalCluster, kept: bool) {
    walk.step("Stop every node: SIGTERM, then wait for it to exit");
    let pids: Vec<String> = cluster.nodes.iter().filter_map(|n| n.pid()).map(|p| p.to_string()).collect();
    walk.did(&format!("kill -TERM {}", pids.join(" ")));
    let expected = cluster.nodes.len();
    let results = cluster.stop(STOP_TIMEOUT).await;
    let stopped = results.len();
    for (id, result) in results {
        walk.last_node = walk.nodes.iter().position(|t| t.id == id);
        let promise = format!("node {id} exits cleanly (status 0) on SIGTERM");
        match result {
            Ok(s) if s.already_exited && kept => {
                walk.got(&format!(
                    "node {id} had exited while the cluster was kept: {} (not judged)",
                    s.status
                ));
            }
            Ok(s) if s.already_exited => {
                walk.got(&format!("node {id} had already exited: {}", s.status));
                walk.judge(&promise, false);
            }
            Ok(s) => {
                walk.got(&format!("node {id} exited after {} ms: {}", ms(s.took), s.status));
                walk.judge(&promise, s.status.success());
            }
            Err(err) => walk.error(&promise, format!("{err:#}")),
        }
        // One log per failing node, not one per step.
        walk.log_shown = 0;
    }
    if !kept {
        walk.judge(&format!("all {expected} nodes were running until asked to stop"), stopped == expected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::local::LocalNode;

    /// RFC 4648 §10 test vectors, in the URL-safe alphabet without padding.
    #[test]
    fn base64url_matches_rfc4648_vectors() {
        for (input, output) in
            [("", ""), ("f", "Zg"), ("fo", "Zm8"), ("foo", "Zm9v"), ("foob", "Zm9vYg"), ("fooba", "Zm9vYmE")]
        {
            assert_eq!(base64url(input.as_bytes()), output);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    /// The walk-through's promises hold on a fresh single node (device binding, step-up,
    /// refresh-token reuse detection per RFC 9700, SSO cascade and user revocation: P3).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_walk_through_step_passes_on_a_fresh_node() {
        let timeout = Duration::from_secs(5);
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let node = LocalNode::start(901, timeout).await.expect("local node starts");
                let api = Api::connect(&node.url(), timeout).await.expect("connect to local node");
                let status = api.node_status().await.expect("node status");
                let mut walk = Walk::new();
                let target = Target { id: status.node_id, region: status.region.clone(), api, log: None };
                walk.set_nodes(vec![target], Duration::from_millis(status.revocation_bound_ms));
                walk_through(&mut walk).await;
                node.stop().await.expect("local node stops cleanly");
                assert!(walk.failed.is_empty(), "failed steps: {:#?}", walk.failed);
                assert_eq!(walk.step, 13);
                assert_eq!(walk.acked.len(), 3);
                assert!(walk.acked.values().all(|a| a.expect == CheckStatus::Revoked), "{:#?}", walk.acked);
            })
            .await;
    }

    /// A thumbprint must satisfy the server's jkt rule (43 base64url chars).
    #[test]
    fn thumbprint_is_a_valid_jkt() {
        let jkt = thumbprint("{}");
        assert!(cascade_protocol::limits::check_jkt("jkt", &jkt).is_ok(), "{jkt}");
    }

    #[test]
    fn users_on_shard_are_distinct_and_on_that_shard() {
        for shard in 0..SHARDS {
            let users = users_on_shard(shard, SHARDS, 4);
            assert_eq!(users.len(), 4);
            assert!(users.iter().all(|u| UserKey::new(TENANT, u.as_str()).shard(SHARDS) == shard));
            assert_eq!(users.iter().collect::<BTreeSet<_>>().len(), 4);
            assert!(!users.iter().any(|u| u == USER));
        }
    }

    /// A wrong answer is retried only within the window; a right one ends the wait at once.
    #[tokio::test]
    async fn settle_retries_only_within_the_window() {
        let calls = std::cell::Cell::new(0u32);
        let call = || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { Ok::<u32, RpcError>(n) }
        };
        let settled = settle(Duration::from_secs(5), call, |n| *n >= 3).await;
        assert_eq!(settled.result.ok(), Some(3));
        assert_eq!(settled.tries, 3);

        calls.set(0);
        let settled = settle(Duration::from_millis(50), call, |_| false).await;
        assert!(settled.tries >= 2, "retried within the window");
        assert!(settled.took >= Duration::from_millis(50), "gave up only past the window");
        assert!(!settled.note(false, Duration::from_millis(50)).is_empty());
    }
}
