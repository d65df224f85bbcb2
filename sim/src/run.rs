//! One simulated run: build the cluster from the scenario, run the clients, inject the faults on
//! schedule, heal, and hand the history to the checkers.

use crate::checkers::{self, Violation};
use crate::clients;
use crate::history::{Event, History, Leadership};
use crate::net;
use crate::rto::{self, FaultRto};
use crate::scenario::{host_of, FaultKind, NodeSpec, Scenario, REVOCATION_BOUND_MS};
use crate::shared;
use cascade_core::planted::{self, Bug};
use cascade_node::config::{ClusterNode, NodeConfig, StaleReads};
use cascade_node::seams::{Clock, Entropy, Seams};
use cascade_raft::host::{MemStorage, RaftHost, Storage};
use cascade_raft::network::Peers;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// The simulation's fixed epoch (2026-01-01T00:00:00Z): wall clocks start here in every run.
pub const EPOCH_MS: u64 = 1_767_225_600_000;
/// Simulated time after which a run is abandoned whatever happens (a hang is a failure too).
const EXTRA_RUN_TIME: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Known bugs to plant in the production code for this run.
    pub bugs: Vec<Bug>,
}

/// Everything a run produced.
pub struct Outcome {
    pub scenario: Scenario,
    pub history: History,
    pub violations: Vec<Violation>,
    pub rto: Vec<FaultRto>,
    /// SHA-256 of the scenario and the whole history: equal hashes, equal runs.
    pub trace_hash: String,
    /// Acknowledged writes missing after the heal (P1; must be 0).
    pub rpo_lost: usize,
    pub sim_ms: u64,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// A node's wall clock: the fixed epoch plus simulated time plus the fault's offset.
struct SimClock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let t = EPOCH_MS + shared::now_ms();
        t.saturating_add_signed(self.offset_ms.load(Ordering::Relaxed))
    }
}

/// Session ids and secrets from the run's seed.
struct SeededEntropy(Mutex<StdRng>);

impl Entropy for SeededEntropy {
    fn u128(&self) -> u128 {
        let mut rng = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())
    }
}

/// What the simulator keeps of one node across crashes.
struct NodeSlot {
    spec: NodeSpec,
    storage: Rc<RefCell<MemStorage>>,
    clock_offset: Arc<AtomicI64>,
    incarnation: Arc<AtomicU64>,
}

fn node_config(scenario: &Scenario, spec: &NodeSpec) -> NodeConfig {
    let mut config = NodeConfig {
        node_id: spec.id,
        advertise: Some(spec.addr()),
        shards: scenario.shards,
        region: spec.region.clone(),
        snapshot_every_n_logs: scenario.snapshot_every_n_logs,
        raft_heartbeat_ms: scenario.heartbeat_ms(),
        raft_election_timeout_ms: 3 * scenario.heartbeat_ms(),
        revocation_bound_ms: REVOCATION_BOUND_MS,
        stale_reads: StaleReads::Forward,
        ..NodeConfig::default()
    };
    config.cluster.nodes = scenario
        .nodes
        .iter()
        .map(|n| ClusterNode { id: n.id, addr: n.addr(), region: n.region.clone() })
        .collect();
    config.cluster.replicas = scenario.replicas;
    config
}

/// Records every (shard, term) in which this node considers itself leader.
fn watch_leadership(host: Arc<RaftHost>, node: u64, leaders: Arc<Mutex<Vec<Leadership>>>) {
    for shard in 0..host.n_shards() {
        let Some(raft) = host.raft(shard) else { continue };
        let leaders = leaders.clone();
        tokio::task::spawn_local(async move {
            let mut rx = raft.metrics();
            let mut last_term = None;
            loop {
                let seen = {
                    let m = rx.borrow_and_update();
                    (m.state.is_leader() && m.current_leader == Some(node)).then_some(m.current_term)
                };
                if let Some(term) = seen.filter(|t| last_term != Some(*t)) {
                    last_term = Some(term);
                    leaders.lock().unwrap_or_else(|p| p.into_inner()).push(Leadership {
                        at_ms: shared::now_ms(),
                        shard,
                        term,
                        node,
                    });
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }
}

fn start_node(
    sim: &mut turmoil::Sim<'_>,
    scenario: &Scenario,
    slot: &NodeSlot,
    leaders: &Arc<Mutex<Vec<Leadership>>>,
) {
    let config = node_config(scenario, &slot.spec);
    let storage = slot.storage.clone();
    let offset = slot.clock_offset.clone();
    let incarnation = slot.incarnation.clone();
    let leaders = leaders.clone();
    let seed = scenario.seed;
    let id = slot.spec.id;
    sim.host(slot.spec.host(), move || {
        let config = config.clone();
        let storage = storage.borrow().clone();
        let offset = offset.clone();
        let leaders = leaders.clone();
        let life = incarnation.fetch_add(1, Ordering::Relaxed) + 1;
        async move {
            let seams = Seams {
                listener: net::listener().await?,
                http_listener: None,
                storage: Storage::Memory(storage),
                clock: Arc::new(SimClock { offset_ms: offset }),
                peers: Peers::with_dialer(net::dialer()),
                entropy: Arc::new(SeededEntropy(Mutex::new(StdRng::seed_from_u64(
                    seed ^ (id << 32) ^ (life << 48),
                )))),
                actor_prefix: format!("sim{seed}-n{id}-{life}"),
                on_host: Some(Box::new(move |host| watch_leadership(host, id, leaders))),
            };
            cascade_node::run(config, seams, std::future::pending())
                .await
                .map_err(|e| format!("{e:#}").into())
        }
    });
}

/// Link latencies of the scenario, plus `extra` on every link of `spiked` (a delay spike).
fn set_latencies(sim: &turmoil::Sim<'_>, scenario: &Scenario, spiked: Option<(u64, u64)>) {
    for (i, a) in scenario.nodes.iter().enumerate() {
        for b in &scenario.nodes[i + 1..] {
            let mut ms = scenario.latency_between(a, b);
            if let Some((node, extra)) = spiked {
                if a.id == node || b.id == node {
                    ms += extra;
                }
            }
            sim.set_link_latency(a.host(), b.host(), Duration::from_millis(ms));
        }
    }
}

/// The leader of `shard` with the highest term seen so far.
fn current_leader(leaders: &Arc<Mutex<Vec<Leadership>>>, shard: u16) -> Option<u64> {
    let leaders = leaders.lock().unwrap_or_else(|p| p.into_inner());
    leaders.iter().filter(|l| l.shard == shard).max_by_key(|l| (l.term, l.at_ms)).map(|l| l.node)
}

/// Applies (`on`) or removes a fault. Returns what it did, for the trace.
fn apply_fault(
    sim: &mut turmoil::Sim<'_>,
    scenario: &Scenario,
    slots: &BTreeMap<u64, NodeSlot>,
    leaders: &Arc<Mutex<Vec<Leadership>>>,
    isolated: &mut BTreeMap<u16, u64>,
    kind: &FaultKind,
    on: bool,
) -> String {
    let others = |ids: &[u64]| -> Vec<String> {
        scenario.nodes.iter().filter(|n| !ids.contains(&n.id)).map(NodeSpec::host).collect()
    };
    match kind {
        FaultKind::Partition { side } => {
            for a in side {
                for b in others(side) {
                    if on {
                        sim.partition(host_of(*a), b.as_str());
                    } else {
                        sim.repair(host_of(*a), b.as_str());
                    }
                }
            }
            format!("partition {side:?} from the rest")
        }
        FaultKind::OneWay { from, to } => {
            if on {
                sim.partition_oneway(host_of(*from), host_of(*to));
            } else {
                sim.repair_oneway(host_of(*from), host_of(*to));
            }
            format!("drop n{from} -> n{to}")
        }
        FaultKind::Loss { a, b, rate_pct } => {
            let rate = if on { f64::from(*rate_pct) / 100.0 } else { 0.0 };
            sim.set_link_fail_rate(host_of(*a), host_of(*b), rate);
            format!("n{a} <-> n{b} fail rate {rate}")
        }
        FaultKind::DelaySpike { node, extra_ms } => {
            set_latencies(sim, scenario, on.then_some((*node, *extra_ms)));
            format!("n{node} links +{extra_ms}ms")
        }
        FaultKind::Crash { nodes, lose_disk, .. } => {
            for id in nodes {
                let Some(slot) = slots.get(id) else { continue };
                if on {
                    sim.crash(slot.spec.host());
                    let storage = slot.storage.borrow().clone();
                    storage.crash();
                    if *lose_disk {
                        let fresh = MemStorage { sync_delay: storage.sync_delay, ..MemStorage::default() };
                        *slot.storage.borrow_mut() = fresh;
                    }
                } else {
                    sim.bounce(slot.spec.host());
                }
            }
            format!("crash {nodes:?} (disk lost: {lose_disk})")
        }
        FaultKind::IsolateLeader { shard } => {
            let leader = if on { current_leader(leaders, *shard) } else { isolated.remove(shard) };
            let Some(leader) = leader else { return format!("shard {shard} has no leader to isolate") };
            if on {
                isolated.insert(*shard, leader);
            }
            for b in others(&[leader]) {
                if on {
                    sim.partition(host_of(leader), b.as_str());
                } else {
                    sim.repair(host_of(leader), b.as_str());
                }
            }
            format!("isolate n{leader}, leader of shard {shard}")
        }
        FaultKind::ClockOffset { node, offset_ms } => {
            if let Some(slot) = slots.get(node) {
                slot.clock_offset.store(if on { *offset_ms } else { 0 }, Ordering::Relaxed);
            }
            format!("n{node} clock {offset_ms:+}ms")
        }
    }
}

/// Runs the scenario of `seed`.
pub fn run(seed: u64, options: &Options) -> anyhow::Result<Outcome> {
    let scenario = Scenario::from_seed(seed);
    planted::plant(&options.bugs);
    cascade_raft::runtime::seed_thread_rng(seed);
    let result = run_scenario(scenario);
    planted::plant(&[]);
    cascade_raft::runtime::unseed_thread_rng();
    result
}

fn run_scenario(scenario: Scenario) -> anyhow::Result<Outcome> {
    let run_ms = scenario.heal_at_ms + scenario.converge_limit_ms;
    let mut sim = turmoil::Builder::new()
        .rng_seed(scenario.seed)
        .epoch(UNIX_EPOCH + Duration::from_millis(EPOCH_MS))
        .simulation_duration(Duration::from_millis(run_ms) + EXTRA_RUN_TIME)
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(3))
        .tcp_capacity(4096)
        .build();
    let history = shared::Shared::default();
    let leaders: Arc<Mutex<Vec<Leadership>>> = Arc::default();
    let sync_delay = Duration::from_millis(scenario.sync_delay_ms);
    let slots: BTreeMap<u64, NodeSlot> = scenario
        .nodes
        .iter()
        .map(|spec| {
            let storage = MemStorage { sync_delay, ..MemStorage::default() };
            let slot = NodeSlot {
                spec: spec.clone(),
                storage: Rc::new(RefCell::new(storage)),
                clock_offset: Arc::default(),
                incarnation: Arc::default(),
            };
            (spec.id, slot)
        })
        .collect();
    for slot in slots.values() {
        start_node(&mut sim, &scenario, slot, &leaders);
    }
    set_latencies(&sim, &scenario, None);
    let workload = scenario.workload();
    let connect: clients::Connector = Arc::new(|id| net::client(&host_of(id)));
    for i in 0..scenario.clients {
        let (w, c, h) = (workload.clone(), connect.clone(), history.clone());
        sim.client(format!("c{i}"), async move {
            clients::workload(w, i, c, h).await;
            Ok(())
        });
    }
    let (w, c, h) = (workload.clone(), connect.clone(), history.clone());
    sim.client("probe", async move {
        clients::probe(w, c, h).await;
        Ok(())
    });
    let (w, c, h) = (workload.clone(), connect.clone(), history.clone());
    sim.client("sentinel", async move {
        clients::sentinel(w, Duration::from_millis(REVOCATION_BOUND_MS), c, h).await;
        Ok(())
    });
    let (w, c, h) = (workload, connect, history.clone());
    sim.client("verifier", async move {
        clients::verifier(w, c, h).await;
        Ok(())
    });

    // (time, fault index, on)
    let mut schedule: Vec<(u64, usize, bool)> = Vec::new();
    for (i, f) in scenario.faults.iter().enumerate() {
        schedule.push((f.at_ms, i, true));
        schedule.push((f.at_ms + f.duration_ms, i, false));
    }
    schedule.sort();
    let mut next = 0;
    let mut isolated = BTreeMap::new();
    let mut node_failure = None;
    // Faults waiting for an acknowledged write: index → (deadline, history ops already seen).
    let mut armed: BTreeMap<usize, (u64, usize)> = BTreeMap::new();
    // When each fault actually started (an armed one starts after its `at_ms`).
    let mut started: BTreeMap<usize, u64> = BTreeMap::new();
    loop {
        let now = u64::try_from(sim.elapsed().as_millis()).unwrap_or(u64::MAX);
        let fired: Vec<usize> = armed
            .iter()
            .filter(|(_, (deadline, seen))| {
                let ops = &history.0.borrow().ops;
                now >= *deadline || ops[*seen..].iter().any(|op| op.kind.is_write() && op.ok())
            })
            .map(|(i, _)| *i)
            .collect();
        for i in fired {
            armed.remove(&i);
            started.insert(i, now);
            let what = apply_fault(
                &mut sim,
                &scenario,
                &slots,
                &leaders,
                &mut isolated,
                &scenario.faults[i].kind,
                true,
            );
            history
                .0
                .borrow_mut()
                .events
                .push(Event { at_ms: now, what: format!("start fault {i}: {what}") });
        }
        while next < schedule.len() && schedule[next].0 <= now {
            let (_, i, on) = schedule[next];
            let fault = &scenario.faults[i];
            if on && matches!(fault.kind, FaultKind::Crash { after_ack: true, .. }) {
                let seen = history.0.borrow().ops.len();
                armed.insert(i, (now + fault.duration_ms / 2, seen));
                let what = format!("arm fault {i}: crash {:?} at the next acknowledged write", fault.kind);
                history.0.borrow_mut().events.push(Event { at_ms: now, what });
                next += 1;
                continue;
            }
            if on {
                started.insert(i, now);
            }
            let what = apply_fault(
                &mut sim,
                &scenario,
                &slots,
                &leaders,
                &mut isolated,
                &scenario.faults[i].kind,
                on,
            );
            let what = format!("{} fault {i}: {what}", if on { "start" } else { "end" });
            history.0.borrow_mut().events.push(Event { at_ms: now, what });
            next += 1;
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                node_failure = Some(e.to_string());
                break;
            }
        }
    }
    let sim_ms = u64::try_from(sim.elapsed().as_millis()).unwrap_or(u64::MAX);
    drop(sim);

    let mut history =
        Rc::try_unwrap(history.0).map_err(|_| anyhow::anyhow!("history still shared"))?.into_inner();
    history.leaders = leaders.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let limits = checkers::RunLimits {
        revocation_bound_ms: crate::scenario::REVOCATION_BOUND_MS,
        heal_at_ms: scenario.heal_at_ms,
        converge_limit_ms: scenario.converge_limit_ms,
    };
    let mut violations = checkers::check_all(limits, &history);
    if let Some(e) = node_failure {
        violations.insert(0, Violation::new("liveness", format!("the simulation stopped: {e}")));
    }
    let rpo_lost = violations.iter().filter(|v| v.checker == checkers::p1_durability::NAME).count();
    let windows: Vec<rto::FaultWindow> = scenario
        .faults
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let at_ms = started.get(&i).copied().unwrap_or(f.at_ms);
            rto::FaultWindow {
                kind: f.kind.name().to_owned(),
                at_ms,
                duration_ms: (f.at_ms + f.duration_ms).saturating_sub(at_ms),
            }
        })
        .collect();
    let rto = rto::per_fault(&windows, scenario.heal_at_ms, &history);
    let trace_hash = trace_hash(&scenario, &history);
    Ok(Outcome { scenario, history, violations, rto, trace_hash, rpo_lost, sim_ms })
}

#[derive(Serialize)]
struct Trace<'a> {
    scenario: &'a Scenario,
    history: &'a History,
}

fn trace_hash(scenario: &Scenario, history: &History) -> String {
    let json = serde_json::to_vec(&Trace { scenario, history }).unwrap_or_default();
    let digest = Sha256::digest(&json);
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}
