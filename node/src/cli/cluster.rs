//! `cascade cluster …`: operator commands about the whole cluster. `status` asks every node for
//! its `NodeStatus` and merges the answers into one view (nodes, shards, a summary line);
//! `transfer-leader`, `add-node`, `remove-node` and `cut` each make one call to `--addr`.
//!
//! This file asks and prints. It must not change anything the operator did not ask for (no
//! retried membership changes, no automatic transfers or heals), must not decide placement or
//! leadership itself (the servers do), and must not treat a node that does not answer `status`
//! as a failure of the command: it is reported, and reflected in the exit code.

use crate::cli::api::Api;
use crate::cli::exit;
use crate::cli::render::{self, rows_table, Output, Record, Val};
use cascade_protocol::pb;
use clap::Subcommand;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// Least deadline of `transfer-leader`: the server tries for up to 10 s before giving up.
const TRANSFER_DEADLINE_MIN: Duration = Duration::from_secs(15);
/// Least deadline of `add-node` and `remove-node`: a new replica catches up shard by shard.
const MEMBERSHIP_DEADLINE_MIN: Duration = Duration::from_secs(600);
/// Most nodes `status` will ask (a bound on discovery, far above any real cluster).
const STATUS_NODES_MAX: usize = 1024;

/// `cascade cluster …`: what to do.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Every node and shard at a glance (exit 4 if a node is unreachable or a shard has no leader).
    ///
    /// Asks every node --addr knows of (and every node those know of) for its status and prints
    /// a nodes table, a shards table and a summary line. Nodes are asked concurrently, each with
    /// --timeout-ms; a node that does not answer is shown as unreachable, not as a failure. Exit
    /// 0 when every node answered and every shard has a leader, else 4.
    #[command(after_help = exit::HELP)]
    Status,
    /// Move a shard's leadership to another of its voters.
    ///
    /// Waits until the new leader is elected. The deadline is at least 15 s (the server gives
    /// up after about 10 s).
    #[command(after_help = exit::HELP)]
    TransferLeader {
        /// Shard whose leadership moves.
        #[arg(long, value_name = "N")]
        shard: u32,
        /// Node id of a voter of the shard, to become its leader.
        #[arg(long = "to", value_name = "NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
        to: u64,
    },
    /// Add a node (started with `cascade serve --join`) and move replicas onto it.
    ///
    /// Replicas move one shard at a time; prints the shards whose voters changed. Each new
    /// replica catches up before it votes, so this can take minutes: the deadline is at least
    /// 600 s.
    #[command(after_help = exit::HELP)]
    AddNode {
        /// Id of the new node (not 0; as given to its --node-id).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// Address the other nodes reach the new node at (its --advertise or --listen).
        #[arg(long, value_name = "HOST:PORT")]
        node_addr: String,
        /// Region label of the new node (as given to its --region).
        #[arg(long, value_name = "NAME")]
        region: String,
    },
    /// Remove a node, moving its replicas to the other nodes.
    ///
    /// Replicas move one shard at a time; prints the shards whose voters changed. The deadline
    /// is at least 600 s. Stop the node afterwards.
    #[command(after_help = exit::HELP)]
    RemoveNode {
        /// Id of the node to remove.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Drills and tests only (needs --enable-fault-injection): cut or heal --addr's links to peers.
    ///
    /// Makes the node at --addr stop sending to the given peers (with --heal, every link is
    /// restored first) and prints the links now cut; with neither flag it only prints them.
    /// Works only on a node started with `cascade serve --enable-fault-injection`, for drills and
    /// tests; any other node refuses (FAILED_PRECONDITION, exit 3).
    #[command(after_help = exit::HELP)]
    Cut {
        /// Peer address (HOST:PORT, as the cluster lists it) to stop sending to; repeat for each.
        #[arg(long = "peer", value_name = "HOST:PORT")]
        peers: Vec<String>,
        /// Restore every link of the node first (then cut the given peers, if any).
        #[arg(long)]
        heal: bool,
    },
}

/// Runs one `cascade cluster` command against `api` (connected to `addr`).
pub async fn run(api: &Api, addr: &str, out: Output, command: ClusterCommand) -> anyhow::Result<u8> {
    match command {
        ClusterCommand::Status => status(api, addr, out).await,
        ClusterCommand::TransferLeader { shard, to } => transfer_leader(api, out, shard, to).await,
        ClusterCommand::AddNode { id, node_addr, region } => {
            let api = api.with_timeout(api.timeout().max(MEMBERSHIP_DEADLINE_MIN));
            eprintln!(
                "adding node {id} ({node_addr}, region {region}) through {addr}: replicas catch up shard \
                 by shard, this can take minutes (deadline {} s)…",
                api.timeout().as_secs()
            );
            let r = api.add_node(pb::AddNodeRequest { node_id: id, addr: node_addr, region }).await?;
            print_moves(out, &r);
            Ok(exit::SUCCESS)
        }
        ClusterCommand::RemoveNode { id } => {
            let api = api.with_timeout(api.timeout().max(MEMBERSHIP_DEADLINE_MIN));
            eprintln!(
                "removing node {id} through {addr}: its replicas move shard by shard, this can take \
                 minutes (deadline {} s)…",
                api.timeout().as_secs()
            );
            let r = api.remove_node(pb::RemoveNodeRequest { node_id: id }).await?;
            print_moves(out, &r);
            Ok(exit::SUCCESS)
        }
        ClusterCommand::Cut { peers, heal } => {
            let r = api.cut_links(pb::CutLinksRequest { addrs: peers, heal }).await?;
            render::emit(out, &Record::new().with("cut", r.cut));
            Ok(exit::SUCCESS)
        }
    }
}

/// `cascade cluster transfer-leader`.
async fn transfer_leader(api: &Api, out: Output, shard: u32, to: u64) -> anyhow::Result<u8> {
    let api = api.with_timeout(api.timeout().max(TRANSFER_DEADLINE_MIN));
    let r = api.transfer_leader(pb::TransferLeaderRequest { shard, to_node: to }).await?;
    let rec = Record::new().with("shard", shard).with("leader", r.leader).with("took_ms", r.took_ms);
    render::emit(out, &rec);
    Ok(exit::SUCCESS)
}

/// Prints the answer of `add-node` or `remove-node`.
fn print_moves(out: Output, r: &pb::MembershipChangeResponse) {
    match out {
        Output::Json => {
            let moves: Vec<Value> = r
                .moves
                .iter()
                .map(|m| {
                    json!({
                        "shard": m.shard,
                        "voters_before": m.voters_before,
                        "voters_after": m.voters_after,
                    })
                })
                .collect();
            println!("{}", json!({"moves": moves, "took_ms": r.took_ms}));
        }
        Output::Table => {
            let rows: Vec<Record> = r
                .moves
                .iter()
                .map(|m| {
                    Record::new()
                        .with("shard", m.shard)
                        .with("before", ids(&m.voters_before))
                        .with("after", ids(&m.voters_after))
                })
                .collect();
            if rows.is_empty() {
                println!("no shard's voters changed");
            } else {
                println!("moves ({}):", rows.len());
                print!("{}", rows_table(&rows));
            }
            println!("took_ms  {}", r.took_ms);
        }
    }
}

/// `1,2,3`, or `-` for none.
fn ids(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "-".to_owned();
    }
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// `cascade cluster status`.
async fn status(api: &Api, addr: &str, out: Output) -> anyhow::Result<u8> {
    let first = api.node_status().await?;
    let bound_ms = first.revocation_bound_ms;
    let reports = gather(first, api.timeout()).await;
    let view = ClusterView::build(&reports);
    match out {
        Output::Json => println!("{}", view.to_json(addr, bound_ms)),
        Output::Table => print!("{}", view.to_table()),
    }
    Ok(if view.summary.healthy() { exit::SUCCESS } else { exit::UNREACHABLE })
}

/// A node as the cluster lists it, and what it answered (or why it did not).
#[derive(Debug)]
pub(crate) struct NodeReport {
    pub node_id: u64,
    pub addr: String,
    pub region: String,
    pub answer: Result<pb::NodeStatusResponse, String>,
}

/// Asks every node `first` lists, then every node those list, and so on, concurrently in
/// rounds; `first` is the answer of the node the command was pointed at.
pub(crate) async fn gather(first: pb::NodeStatusResponse, timeout: Duration) -> Vec<NodeReport> {
    // node id → (addr, region) as first listed.
    let mut known: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let mut answers: BTreeMap<u64, Result<pb::NodeStatusResponse, String>> = BTreeMap::new();
    list_nodes(&mut known, &first);
    answers.insert(first.node_id, Ok(first));
    loop {
        let pending: Vec<(u64, String)> = known
            .iter()
            .filter(|(id, _)| !answers.contains_key(id))
            .map(|(id, (addr, _))| (*id, addr.clone()))
            .collect();
        if pending.is_empty() {
            break;
        }
        let asked = futures::future::join_all(pending.iter().map(|(id, addr)| ask(*id, addr, timeout))).await;
        for ((id, _), answer) in pending.into_iter().zip(asked) {
            if let Ok(r) = &answer {
                list_nodes(&mut known, r);
            }
            answers.insert(id, answer);
        }
    }
    known
        .into_iter()
        .map(|(node_id, (addr, region))| {
            let answer = answers.remove(&node_id).unwrap_or_else(|| Err("not asked".to_owned()));
            // A node's own word on its region wins over how others list it.
            let region = answer.as_ref().map_or(region, |r| r.region.clone());
            NodeReport { node_id, addr, region, answer }
        })
        .collect()
}

/// Adds the nodes `r` lists (and `r`'s node itself) to `known`, up to `STATUS_NODES_MAX`.
fn list_nodes(known: &mut BTreeMap<u64, (String, String)>, r: &pb::NodeStatusResponse) {
    let listed = r.nodes.iter().map(|n| (n.node_id, &n.addr, &n.region));
    for (id, addr, region) in listed.chain([(r.node_id, &r.addr, &r.region)]) {
        if id != 0 && (known.len() < STATUS_NODES_MAX || known.contains_key(&id)) {
            known.entry(id).or_insert_with(|| (addr.clone(), region.clone()));
        }
    }
}

/// One node's status, as a one-line error when it cannot be had.
async fn ask(id: u64, addr: &str, timeout: Duration) -> Result<pb::NodeStatusResponse, String> {
    let api = Api::connect(addr, timeout).await.map_err(|e| format!("{e:#}"))?;
    let r = api.node_status().await.map_err(|e| e.to_string())?;
    if r.node_id != id {
        return Err(format!("the node at {addr} answers as node {}, not {id}", r.node_id));
    }
    Ok(r)
}

/// One voter of a shard, as it reported itself.
#[derive(Debug, Clone, PartialEq)]
struct Replica {
    node_id: u64,
    /// `None` when the node did not answer.
    applied_index: Option<u64>,
    fresh: bool,
    /// Set only when fresh.
    staleness_ms: Option<u64>,
    /// Entries behind the leader, from the leader's report.
    lag: Option<u64>,
}

/// One shard, merged from every answer.
#[derive(Debug, Clone, PartialEq)]
struct ShardView {
    shard: u32,
    /// 0 = no leader known.
    leader: u64,
    /// Whether the leader itself answered and claims the shard; otherwise the leader, if any,
    /// is known only from its followers.
    leader_answered: bool,
    term: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    /// Most entries any replica is behind the leader (`None`: the leader did not answer).
    max_lag: Option<u64>,
    replicas: Vec<Replica>,
}

/// One node, merged with what the shards say about it.
#[derive(Debug, Clone, PartialEq)]
struct NodeView {
    node_id: u64,
    addr: String,
    region: String,
    /// Why the node gave no status; `None` when it answered.
    error: Option<String>,
    /// Shards it leads.
    led: usize,
    /// Shards it is a voter of.
    replicas: usize,
    /// Of those, the ones it reports fresh (0 when it did not answer).
    fresh: usize,
    live_user_actors: Option<u64>,
}

impl NodeView {
    fn health(&self) -> String {
        if self.error.is_some() {
            "unreachable".to_owned()
        } else if self.fresh < self.replicas {
            format!("{} not fresh", self.replicas - self.fresh)
        } else {
            "ok".to_owned()
        }
    }
}

/// The figures of the summary line.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    nodes: usize,
    regions: usize,
    unreachable: Vec<u64>,
    shards: usize,
    without_leader: Vec<u32>,
    /// Shards led by each node, in node id order.
    leaders_per_node: Vec<usize>,
    /// Most any replica of any shard is behind its leader, over the shards whose leader answered.
    max_lag: Option<u64>,
    /// Shards whose lag is unknown (their leader did not answer, or there is none).
    lag_unknown: usize,
    /// Voter replicas that are not fresh or did not answer.
    not_fresh: usize,
}

impl Summary {
    /// Every node answered and every shard has a leader.
    fn healthy(&self) -> bool {
        self.unreachable.is_empty() && self.without_leader.is_empty()
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn join<T: ToString>(items: &[T], sep: &str) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(sep)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", plural(self.nodes, "node"), plural(self.regions, "region"))?;
        if !self.unreachable.is_empty() {
            write!(f, " ({} unreachable: {})", self.unreachable.len(), join(&self.unreachable, ","))?;
        }
        write!(f, ", {}, ", plural(self.shards, "shard"))?;
        if self.without_leader.is_empty() {
            f.write_str("all led")?;
        } else {
            write!(
                f,
                "{} without a leader ({})",
                self.without_leader.len(),
                join(&self.without_leader, ",")
            )?;
        }
        write!(f, ", leaders per node {}", join(&self.leaders_per_node, "/"))?;
        match self.max_lag {
            Some(lag) if self.lag_unknown == 0 => write!(f, ", max lag {lag}")?,
            Some(lag) => write!(f, ", max lag {lag} ({} unknown)", plural(self.lag_unknown, "shard"))?,
            None => f.write_str(", max lag unknown")?,
        }
        if self.not_fresh > 0 {
            write!(f, ", {} not fresh", plural(self.not_fresh, "replica"))?;
        }
        Ok(())
    }
}

/// The cluster as its nodes describe it.
#[derive(Debug, Clone, PartialEq)]
struct ClusterView {
    nodes: Vec<NodeView>,
    shards: Vec<ShardView>,
    summary: Summary,
}

impl ClusterView {
    /// Merges the reports. A shard's leader is the answering node that claims it (names itself
    /// and has the leader role) at the highest term; failing that, the leader its followers name
    /// at the highest term, if that node did not answer (one that answered without claiming it
    /// is not the leader). Voters, learners and lag come from the leader's report, else from a
    /// report naming the leader, else from the highest-term report that has voters.
    fn build(reports: &[NodeReport]) -> ClusterView {
        let answered: Vec<(u64, &pb::NodeStatusResponse)> =
            reports.iter().filter_map(|r| r.answer.as_ref().ok().map(|a| (r.node_id, a))).collect();
        let n_shards = answered.iter().map(|(_, a)| a.n_shards).max().unwrap_or(0);
        let entry = |id: u64, shard: u32| -> Option<&pb::ShardStatus> {
            let (_, a) = answered.iter().find(|(n, _)| *n == id)?;
            a.shards.iter().find(|s| s.shard == shard)
        };
        let mut shards = Vec::new();
        for shard in 0..n_shards {
            let entries: Vec<(u64, &pb::ShardStatus)> = answered
                .iter()
                .filter_map(|(id, a)| a.shards.iter().find(|s| s.shard == shard).map(|s| (*id, s)))
                .collect();
            let claim = entries.iter().filter(|(id, s)| claims(*id, s)).max_by_key(|(_, s)| s.term);
            let (leader, leader_answered, source) = match claim {
                Some((id, s)) => (*id, true, Some(*s)),
                None => {
                    let hearsay = entries
                        .iter()
                        .filter(|(_, s)| s.leader != 0 && !answered.iter().any(|(id, _)| *id == s.leader))
                        .max_by_key(|(_, s)| s.term)
                        .map_or(0, |(_, s)| s.leader);
                    // The leader's followers describe the shard best; without one, the highest
                    // term (a replica removed from the shard may campaign at ever higher terms
                    // with its old voters, so followers of a known leader come first).
                    let source = entries
                        .iter()
                        .filter(|(_, s)| !s.voters.is_empty())
                        .max_by_key(|(_, s)| (hearsay != 0 && s.leader == hearsay, s.term));
                    (hearsay, false, source.map(|(_, s)| *s))
                }
            };
            let lag_of = |node: u64| -> Option<u64> {
                let s = source.filter(|_| leader_answered)?;
                s.replication.iter().find(|p| p.node_id == node).map(|p| p.lag)
            };
            let max_lag = source
                .filter(|_| leader_answered)
                .map(|s| s.replication.iter().map(|p| p.lag).max().unwrap_or(0));
            let voters = source.map(|s| s.voters.clone()).unwrap_or_default();
            let replicas = voters
                .iter()
                .map(|&node_id| {
                    let own = entry(node_id, shard);
                    let fresh = own.is_some_and(|s| s.fresh);
                    Replica {
                        node_id,
                        applied_index: own.map(|s| s.applied_index),
                        fresh,
                        staleness_ms: own.filter(|_| fresh).map(|s| s.staleness_ms),
                        lag: lag_of(node_id),
                    }
                })
                .collect();
            shards.push(ShardView {
                shard,
                leader,
                leader_answered,
                term: source.map_or(0, |s| s.term),
                voters,
                learners: source.map(|s| s.learners.clone()).unwrap_or_default(),
                max_lag,
                replicas,
            });
        }
        let nodes: Vec<NodeView> = reports
            .iter()
            .map(|r| {
                let holds: Vec<&ShardView> =
                    shards.iter().filter(|s| s.voters.contains(&r.node_id)).collect();
                let fresh = holds
                    .iter()
                    .filter(|s| s.replicas.iter().any(|p| p.node_id == r.node_id && p.fresh))
                    .count();
                NodeView {
                    node_id: r.node_id,
                    addr: r.addr.clone(),
                    region: r.region.clone(),
                    error: r.answer.as_ref().err().cloned(),
                    led: shards.iter().filter(|s| s.leader == r.node_id).count(),
                    replicas: holds.len(),
                    fresh,
                    live_user_actors: r.answer.as_ref().ok().map(|a| a.live_user_actors),
                }
            })
            .collect();
        let known_lags: Vec<u64> = shards.iter().filter_map(|s| s.max_lag).collect();
        let summary = Summary {
            nodes: nodes.len(),
            regions: nodes.iter().map(|n| n.region.as_str()).collect::<BTreeSet<_>>().len(),
            unreachable: nodes.iter().filter(|n| n.error.is_some()).map(|n| n.node_id).collect(),
            shards: shards.len(),
            without_leader: shards.iter().filter(|s| s.leader == 0).map(|s| s.shard).collect(),
            leaders_per_node: nodes.iter().map(|n| n.led).collect(),
            max_lag: known_lags.iter().copied().max(),
            lag_unknown: shards.len() - known_lags.len(),
            not_fresh: shards.iter().flat_map(|s| &s.replicas).filter(|p| !p.fresh).count(),
        };
        ClusterView { nodes, shards, summary }
    }

    fn region_of(&self, id: u64) -> Option<&str> {
        self.nodes.iter().find(|n| n.node_id == id).map(|n| n.region.as_str())
    }

    /// `2@eu`, or `2` when the node's region is unknown.
    fn label(&self, id: u64) -> String {
        match self.region_of(id) {
            Some(region) if !region.is_empty() => format!("{id}@{region}"),
            _ => id.to_string(),
        }
    }

    fn labels(&self, ids: &[u64]) -> String {
        ids.iter().map(|&id| self.label(id)).collect::<Vec<_>>().join(",")
    }

    /// Two tables, the nodes that did not answer and why, and the summary line.
    fn to_table(&self) -> String {
        let nodes: Vec<Record> = self
            .nodes
            .iter()
            .map(|n| {
                let answered = n.error.is_none();
                Record::new()
                    .with("node", n.node_id)
                    .with("region", n.region.as_str())
                    .with("addr", n.addr.as_str())
                    .with("health", n.health())
                    .with("leads", n.led as u64)
                    .with("replicas", n.replicas as u64)
                    .with(
                        "fresh",
                        if answered { format!("{}/{}", n.fresh, n.replicas) } else { String::new() },
                    )
                    .with("live_user_actors", n.live_user_actors.map_or(Val::from(""), Val::from))
            })
            .collect();
        let mut hearsay = false;
        let shards: Vec<Record> = self
            .shards
            .iter()
            .map(|s| {
                let leader = match (s.leader, s.leader_answered) {
                    (0, _) => "none".to_owned(),
                    (id, true) => self.label(id),
                    (id, false) => {
                        hearsay = true;
                        format!("{}?", self.label(id))
                    }
                };
                let applied: Vec<u64> = s.replicas.iter().filter_map(|p| p.applied_index).collect();
                let staleness: Vec<u64> = s.replicas.iter().filter_map(|p| p.staleness_ms).collect();
                let fresh = s.replicas.iter().filter(|p| p.fresh).count();
                Record::new()
                    .with("shard", s.shard)
                    .with("leader", leader)
                    .with("term", s.term)
                    .with("voters", self.labels(&s.voters))
                    .with("learners", self.labels(&s.learners))
                    .with("max_lag", s.max_lag.map_or(Val::from(""), Val::from))
                    .with("applied", range(&applied))
                    .with("fresh", format!("{fresh}/{}", s.voters.len()))
                    .with("staleness_ms", range(&staleness))
            })
            .collect();
        let mut out = format!("nodes ({}):\n{}", nodes.len(), rows_table(&nodes));
        out.push_str(&format!("\nshards ({}):\n{}", shards.len(), rows_table(&shards)));
        if hearsay {
            out.push_str("  (? = named by its followers; the leader itself did not answer)\n");
        }
        if self.shards.iter().all(|s| s.voters.is_empty()) {
            out.push_str("  (no node reports any shard's voters: is --addr a --join node not added yet?)\n");
        }
        let down: Vec<&NodeView> = self.nodes.iter().filter(|n| n.error.is_some()).collect();
        if !down.is_empty() {
            out.push_str("\nunreachable:\n");
            for n in down {
                let error = n.error.as_deref().unwrap_or_default();
                out.push_str(&format!("  node {} ({}): {error}\n", n.node_id, n.addr));
            }
        }
        out.push_str(&format!("\n{}\n", self.summary));
        out
    }

    /// One JSON document: who was asked, the summary, nodes and shards.
    fn to_json(&self, addr: &str, revocation_bound_ms: u64) -> Value {
        let s = &self.summary;
        let leaders_per_node: Vec<Value> =
            self.nodes.iter().map(|n| json!({"node_id": n.node_id, "leads": n.led})).collect();
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "node_id": n.node_id,
                    "region": n.region,
                    "addr": n.addr,
                    "reachable": n.error.is_none(),
                    "health": n.health(),
                    "error": n.error,
                    "leads": n.led,
                    "replicas": n.replicas,
                    "fresh": n.fresh,
                    "live_user_actors": n.live_user_actors,
                })
            })
            .collect();
        let shards: Vec<Value> = self
            .shards
            .iter()
            .map(|sh| {
                let replicas: Vec<Value> = sh
                    .replicas
                    .iter()
                    .map(|p| {
                        json!({
                            "node_id": p.node_id,
                            "region": self.region_of(p.node_id),
                            "answered": p.applied_index.is_some(),
                            "applied_index": p.applied_index,
                            "fresh": p.fresh,
                            "staleness_ms": p.staleness_ms,
                            "lag": p.lag,
                        })
                    })
                    .collect();
                json!({
                    "shard": sh.shard,
                    "leader": (sh.leader != 0).then_some(sh.leader),
                    "leader_region": self.region_of(sh.leader),
                    "leader_answered": sh.leader_answered,
                    "term": sh.term,
                    "voters": sh.voters,
                    "learners": sh.learners,
                    "max_lag": sh.max_lag,
                    "replicas": replicas,
                })
            })
            .collect();
        json!({
            "addr": addr,
            "revocation_bound_ms": revocation_bound_ms,
            "healthy": s.healthy(),
            "summary": {
                "text": s.to_string(),
                "nodes": s.nodes,
                "regions": s.regions,
                "unreachable": s.unreachable,
                "shards": s.shards,
                "without_leader": s.without_leader,
                "leaders_per_node": leaders_per_node,
                "max_lag": s.max_lag,
                "lag_unknown": s.lag_unknown,
                "replicas_not_fresh": s.not_fresh,
            },
            "nodes": nodes,
            "shards": shards,
        })
    }
}

/// Whether node `id` reports that it leads the shard now. Its `leader` field alone is not
/// enough: a leader that removed itself from the shard keeps naming itself as a learner.
fn claims(id: u64, s: &pb::ShardStatus) -> bool {
    s.leader == id && s.role.eq_ignore_ascii_case("leader")
}

/// `7` when every value is 7, `5..7` for a spread, empty (printed `-`) for none.
fn range(values: &[u64]) -> String {
    match (values.iter().min(), values.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => lo.to_string(),
        (Some(lo), Some(hi)) => format!("{lo}..{hi}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard as node `me` reports it; `leader` 0 = none known.
    fn shard(me: u64, shard: u32, leader: u64, term: u64, applied: u64) -> pb::ShardStatus {
        let replication = if leader == me {
            [1, 2, 3]
                .iter()
                .map(|&n| pb::ReplicaProgress { node_id: n, matched_index: applied, lag: 0 })
                .collect()
        } else {
            Vec::new()
        };
        pb::ShardStatus {
            shard,
            leader,
            role: if leader == me { "Leader" } else { "Follower" }.to_owned(),
            term,
            last_log_index: applied,
            applied_index: applied,
            snapshot_index: 0,
            live_user_actors: 1,
            voters: vec![1, 2, 3],
            fresh: true,
            staleness_ms: if leader == me { 0 } else { 5 },
            replication,
            learners: Vec::new(),
        }
    }

    fn nodes() -> Vec<pb::ClusterNode> {
        (1..=3)
            .map(|n| pb::ClusterNode { node_id: n, addr: format!("h:{n}"), region: format!("r{n}") })
            .collect()
    }

    /// Node `me` of a 3-node, 4-shard cluster where shard s is led by node `leaders[s]`.
    fn status(me: u64, leaders: &[u64]) -> pb::NodeStatusResponse {
        let shards: Vec<pb::ShardStatus> =
            leaders.iter().enumerate().map(|(s, &l)| shard(me, s as u32, l, 2, 10)).collect();
        pb::NodeStatusResponse {
            node_id: me,
            region: format!("r{me}"),
            n_shards: leaders.len() as u32,
            live_user_actors: shards.iter().map(|s| s.live_user_actors).sum(),
            shards,
            nodes: nodes(),
            addr: format!("h:{me}"),
            revocation_bound_ms: 1000,
            fault_injection: false,
            incarnation: 1,
        }
    }

    fn report(me: u64, answer: Result<pb::NodeStatusResponse, String>) -> NodeReport {
        NodeReport { node_id: me, addr: format!("h:{me}"), region: format!("r{me}"), answer }
    }

    const LEADERS: [u64; 4] = [1, 2, 3, 1];

    #[test]
    fn healthy_cluster_summary() {
        let reports: Vec<NodeReport> = (1..=3).map(|me| report(me, Ok(status(me, &LEADERS)))).collect();
        let view = ClusterView::build(&reports);
        let s = &view.summary;
        assert!(s.healthy());
        assert_eq!(s.leaders_per_node, vec![2, 1, 1]);
        assert_eq!(
            s.to_string(),
            "3 nodes in 3 regions, 4 shards, all led, leaders per node 2/1/1, max lag 0"
        );
        assert_eq!(view.nodes[0].replicas, 4);
        assert_eq!(view.nodes[0].health(), "ok");
        assert_eq!(view.shards[1].leader, 2);
        assert!(view.shards[1].leader_answered);
        assert_eq!(view.shards[1].replicas.len(), 3);
        let table = view.to_table();
        assert!(table.contains("2@r2,3@r3"), "{table}");
        assert!(table.ends_with("max lag 0\n"), "{table}");
        let json = view.to_json("h:1", 1000);
        assert_eq!(json["healthy"], true);
        assert_eq!(json["shards"][2]["leader"], 3);
        assert_eq!(json["shards"][2]["leader_region"], "r3");
        assert_eq!(json["nodes"][0]["leads"], 2);
    }

    /// An unreachable node is reported, its shards keep the leader its followers name, and lag
    /// is unknown where the leader did not answer.
    #[test]
    fn unreachable_node_makes_the_cluster_unhealthy() {
        let reports = vec![
            report(1, Ok(status(1, &LEADERS))),
            report(2, Ok(status(2, &LEADERS))),
            report(3, Err("cannot reach".to_owned())),
        ];
        let view = ClusterView::build(&reports);
        let s = &view.summary;
        assert!(!s.healthy());
        assert_eq!(s.unreachable, vec![3]);
        assert!(s.without_leader.is_empty());
        assert_eq!(view.shards[2].leader, 3);
        assert!(!view.shards[2].leader_answered);
        assert_eq!(view.shards[2].max_lag, None);
        assert_eq!(s.lag_unknown, 1);
        assert_eq!(s.not_fresh, 4, "node 3's replica of each shard did not answer");
        assert_eq!(view.nodes[2].health(), "unreachable");
        assert_eq!(
            s.to_string(),
            "3 nodes in 3 regions (1 unreachable: 3), 4 shards, all led, leaders per node 2/1/1, \
             max lag 0 (1 shard unknown), 4 replicas not fresh"
        );
        let table = view.to_table();
        assert!(table.contains("3@r3?"), "{table}");
        assert!(table.contains("node 3 (h:3): cannot reach"), "{table}");
    }

    /// A follower naming a leader that answered without claiming the shard is out of date.
    #[test]
    fn shard_without_leader() {
        let mut one = status(1, &LEADERS);
        one.shards[1].leader = 2; // stale: node 2 no longer claims it
        let mut two = status(2, &LEADERS);
        two.shards[1] = shard(2, 1, 0, 3, 10);
        let mut three = status(3, &LEADERS);
        three.shards[1] = shard(3, 1, 0, 3, 10);
        let reports = vec![report(1, Ok(one)), report(2, Ok(two)), report(3, Ok(three))];
        let view = ClusterView::build(&reports);
        assert_eq!(view.summary.without_leader, vec![1]);
        assert!(!view.summary.healthy());
        assert_eq!(view.shards[1].term, 3);
        assert_eq!(view.summary.leaders_per_node, vec![2, 0, 1]);
        assert!(view.summary.to_string().contains("1 without a leader (1)"), "{}", view.summary);
    }

    /// Of two nodes claiming a shard, the one at the higher term leads; lag comes from it.
    #[test]
    fn highest_term_claim_wins() {
        let mut one = status(1, &LEADERS);
        one.shards[1] = shard(1, 1, 1, 2, 10); // old leader, term 2
        let mut two = status(2, &LEADERS);
        two.shards[1] = shard(2, 1, 2, 3, 12);
        if let Some(p) = two.shards[1].replication.iter_mut().find(|p| p.node_id == 3) {
            p.lag = 7;
        }
        let reports = vec![report(1, Ok(one)), report(2, Ok(two)), report(3, Ok(status(3, &LEADERS)))];
        let view = ClusterView::build(&reports);
        assert_eq!(view.shards[1].leader, 2);
        assert_eq!(view.shards[1].max_lag, Some(7));
        assert_eq!(view.summary.max_lag, Some(7));
        assert_eq!(view.shards[1].replicas.iter().find(|p| p.node_id == 3).and_then(|p| p.lag), Some(7));
    }

    /// A leader that removed itself from a shard still names itself, as a learner: not a claim.
    /// Its old voters, at a higher term, must not hide the new ones its followers report.
    #[test]
    fn removed_leader_naming_itself_does_not_lead() {
        let mut one = status(1, &LEADERS);
        one.shards[3].role = "Learner".to_owned();
        one.shards[3].replication.clear();
        one.shards[3].term = 9;
        let mut two = status(2, &LEADERS);
        two.shards[3] = shard(2, 3, 0, 3, 10);
        two.shards[3].voters = vec![2, 3, 4];
        let reports = vec![report(1, Ok(one)), report(2, Ok(two)), report(3, Err("down".to_owned()))];
        let view = ClusterView::build(&reports);
        assert_eq!(view.shards[3].leader, 0, "{:?}", view.shards[3]);
        assert_eq!(view.summary.without_leader, vec![3]);
        assert_eq!(view.nodes[0].led, 1, "node 1 still leads shard 0");
        // When followers name a leader that did not answer, their voters win over a higher-term
        // report by a campaigning replica that still has the old voters.
        let mut two = status(2, &LEADERS);
        two.shards[3].leader = 3;
        two.shards[3].voters = vec![2, 3, 4];
        let mut one = status(1, &LEADERS);
        one.shards[3] = shard(1, 3, 0, 9, 10);
        one.shards[3].role = "Candidate".to_owned();
        let reports = vec![report(1, Ok(one)), report(2, Ok(two)), report(3, Err("down".to_owned()))];
        let view = ClusterView::build(&reports);
        assert_eq!(view.shards[3].leader, 3);
        assert_eq!(view.shards[3].voters, vec![2, 3, 4]);
    }

    #[test]
    fn not_fresh_replicas_are_counted_per_node() {
        let mut two = status(2, &LEADERS);
        two.shards[0].fresh = false;
        let reports =
            vec![report(1, Ok(status(1, &LEADERS))), report(2, Ok(two)), report(3, Ok(status(3, &LEADERS)))];
        let view = ClusterView::build(&reports);
        assert!(view.summary.healthy());
        assert_eq!(view.nodes[1].fresh, 3);
        assert_eq!(view.nodes[1].health(), "1 not fresh");
        assert_eq!(view.summary.not_fresh, 1);
        assert_eq!(view.shards[0].replicas[1].staleness_ms, None);
    }

    #[test]
    fn discovery_lists_nodes_once_and_skips_id_zero() {
        let mut known = BTreeMap::new();
        let mut r = status(1, &LEADERS);
        r.nodes.push(pb::ClusterNode { node_id: 0, addr: "h:0".into(), region: "r0".into() });
        r.nodes.push(pb::ClusterNode { node_id: 2, addr: "other:2".into(), region: "x".into() });
        list_nodes(&mut known, &r);
        assert_eq!(known.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(known[&2].0, "h:2", "first listing wins");
    }

    #[test]
    fn ranges_and_ids() {
        assert_eq!(range(&[]), "");
        assert_eq!(range(&[4, 4]), "4");
        assert_eq!(range(&[5, 3, 4]), "3..5");
        assert_eq!(ids(&[]), "-");
        assert_eq!(ids(&[1, 2]), "1,2");
    }
}
