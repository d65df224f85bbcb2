//! A whole run, derived from its seed alone: the cluster, the network, the workload and the
//! faults (swarm testing: each seed enables a random subset of fault kinds, so rare
//! combinations get runs of their own instead of being drowned in a uniform mix).

pub use cascade_check::workload::Mix;
use cascade_check::workload::Workload;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

/// Region labels; a scenario uses the first 3 (or fewer).
pub const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];
/// The port every simulated node serves on.
pub const NODE_PORT: u16 = 7000;
/// The P2 bound every node runs with.
pub const REVOCATION_BOUND_MS: u64 = 500;

#[derive(Clone, Debug, Serialize)]
pub struct NodeSpec {
    pub id: u64,
    pub region: String,
}

impl NodeSpec {
    /// Host name in the simulated network.
    pub fn host(&self) -> String {
        host_of(self.id)
    }

    pub fn addr(&self) -> String {
        format!("{}:{NODE_PORT}", self.host())
    }
}

pub fn host_of(id: u64) -> String {
    format!("n{id}")
}

/// One fault, active from `at_ms` for `duration_ms` of simulated time.
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    pub at_ms: u64,
    pub duration_ms: u64,
    pub kind: FaultKind,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FaultKind {
    /// The nodes of `side` cannot talk to the others (both directions).
    Partition { side: Vec<u64> },
    /// Messages from `from` to `to` are dropped; the other direction works.
    OneWay { from: u64, to: u64 },
    /// Connections between `a` and `b` break at random (turmoil's link failures).
    Loss { a: u64, b: u64, rate_pct: u32 },
    /// Every link of `node` gets `extra_ms` more latency.
    DelaySpike { node: u64, extra_ms: u64 },
    /// `nodes` lose power at once: unsynced writes are gone; with `lose_disk` nothing survives.
    /// They restart when the fault ends. With `after_ack`, the power goes at the first moment a
    /// client has a write acknowledged after `at_ms` (within half the fault's duration): the
    /// instant a write is most likely to be acknowledged but not yet synced everywhere.
    Crash { nodes: Vec<u64>, lose_disk: bool, after_ack: bool },
    /// The leader of `shard` (at the moment the fault starts) is cut off from every other
    /// node, while clients can still reach it.
    IsolateLeader { shard: u16 },
    /// `node`'s wall clock (the one that stamps commands) is off by `offset_ms`.
    ClockOffset { node: u64, offset_ms: i64 },
}

impl FaultKind {
    /// Name used to aggregate RTO per kind.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Partition { .. } => "partition",
            FaultKind::OneWay { .. } => "one-way",
            FaultKind::Loss { .. } => "loss",
            FaultKind::DelaySpike { .. } => "delay-spike",
            FaultKind::Crash { lose_disk: true, .. } => "crash-disk-loss",
            FaultKind::Crash { after_ack: true, .. } => "crash-after-ack",
            FaultKind::Crash { nodes, .. } if nodes.len() > 1 => "crash-many",
            FaultKind::Crash { .. } => "crash",
            FaultKind::IsolateLeader { .. } => "isolate-leader",
            FaultKind::ClockOffset { .. } => "clock-offset",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub seed: u64,
    pub nodes: Vec<NodeSpec>,
    pub shards: u16,
    pub replicas: usize,
    /// One-way latency between two regions, in ms (same region: `intra_region_ms`).
    pub latency_ms: BTreeMap<String, u64>,
    pub intra_region_ms: u64,
    /// How long a log sync takes (the window in which a write is written but not durable).
    pub sync_delay_ms: u64,
    pub snapshot_every_n_logs: u64,
    pub clients: usize,
    /// Pause between a client's operations.
    pub think_ms: u64,
    pub users: u32,
    pub mix: Mix,
    /// Fault kinds this seed may draw from.
    pub enabled: Vec<&'static str>,
    pub faults: Vec<Fault>,
    /// When the cluster is expected to have formed and the workload starts.
    pub warmup_ms: u64,
    /// When every fault is healed, the workload stops and convergence must follow.
    pub heal_at_ms: u64,
    /// How long after the heal the cluster has to converge (liveness).
    pub converge_limit_ms: u64,
}

const FAULT_KINDS: [&str; 10] = [
    "partition",
    "one-way",
    "loss",
    "delay-spike",
    "crash",
    "crash-many",
    "crash-disk-loss",
    "crash-after-ack",
    "isolate-leader",
    "clock-offset",
];

impl Scenario {
    pub fn from_seed(seed: u64) -> Scenario {
        let mut rng = StdRng::seed_from_u64(seed);
        let n_nodes: u64 = rng.gen_range(3..=7);
        let n_regions = REGIONS.len().min(n_nodes as usize);
        let nodes: Vec<NodeSpec> = (1..=n_nodes)
            .map(|id| NodeSpec { id, region: REGIONS[(id as usize - 1) % n_regions].to_owned() })
            .collect();
        let replicas = if n_nodes >= 5 && rng.gen_bool(0.3) { 5 } else { 3 };
        let mut latency_ms = BTreeMap::new();
        for (i, a) in REGIONS[..n_regions].iter().enumerate() {
            for b in &REGIONS[i + 1..n_regions] {
                latency_ms.insert(format!("{a}<->{b}"), rng.gen_range(5..=60));
            }
        }
        let intra_region_ms = rng.gen_range(1..=3);

        // Swarm testing: each fault kind is in this seed's mix with probability 1/2.
        let mut enabled: Vec<&'static str> =
            FAULT_KINDS.iter().copied().filter(|_| rng.gen_bool(0.5)).collect();
        if enabled.is_empty() {
            enabled.push(FAULT_KINDS.choose(&mut rng).copied().unwrap_or("crash"));
        }
        let warmup_ms = 5_000;
        let shards = rng.gen_range(2..=4);
        let n_faults = rng.gen_range(1..=4);
        let mut faults = Vec::new();
        let mut at_ms = warmup_ms + rng.gen_range(500..2_000);
        let ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
        for _ in 0..n_faults {
            let name = *enabled.choose(&mut rng).unwrap_or(&"crash");
            // An isolated leader must stay cut off well past a new election (openraft's follower
            // timeout is 9-12 heartbeats here) for revocations acknowledged by the new leader to
            // meet checks at the old one: shorter isolations never tested P2.
            let duration_ms = if name == "isolate-leader" {
                rng.gen_range(5_000..=9_000)
            } else {
                rng.gen_range(1_000..=5_000)
            };
            let kind = draw_fault(&mut rng, name, &ids, &nodes, shards);
            faults.push(Fault { at_ms, duration_ms, kind });
            // Faults follow each other with a recovery gap, so each one's RTO is its own.
            at_ms += duration_ms + rng.gen_range(2_000..=4_000);
        }
        let heal_at_ms = at_ms;
        Scenario {
            seed,
            nodes,
            shards,
            replicas,
            latency_ms,
            intra_region_ms,
            // A third of the seeds get a slow disk (a sync slower than a round trip between
            // replicas): only then can a leader acknowledge a write its own log has not synced,
            // which is what the P1 checker must be able to see (the planted ack-before-flush).
            sync_delay_ms: if rng.gen_bool(0.33) { rng.gen_range(40..=150) } else { rng.gen_range(2..=30) },
            snapshot_every_n_logs: *[50, 200, 5_000].choose(&mut rng).unwrap_or(&5_000),
            clients: rng.gen_range(2..=6),
            think_ms: rng.gen_range(1..=30),
            users: rng.gen_range(4..=16),
            mix: Mix {
                create: rng.gen_range(10..=30),
                create_child: rng.gen_range(0..=15),
                check: rng.gen_range(20..=50),
                check_family: rng.gen_range(0..=20),
                revoke_session: rng.gen_range(2..=10),
                revoke_device: rng.gen_range(0..=4),
                revoke_user: rng.gen_range(0..=3),
                watermark_user: rng.gen_range(0..=2),
            },
            enabled,
            faults,
            warmup_ms,
            heal_at_ms,
            converge_limit_ms: 30_000,
        }
    }

    /// The Raft heartbeat for this network: openraft uses it as the deadline of every
    /// replication round, so it must exceed the worst round trip between replicas plus two log
    /// syncs (a follower's append waits for the group commit in progress, then its own).
    pub fn heartbeat_ms(&self) -> u64 {
        let worst_one_way = self.latency_ms.values().copied().max().unwrap_or(0).max(self.intra_region_ms);
        (2 * worst_one_way + 2 * self.sync_delay_ms + 30).max(100)
    }

    pub fn node(&self, id: u64) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// One-way latency between two nodes.
    pub fn latency_between(&self, a: &NodeSpec, b: &NodeSpec) -> u64 {
        if a.region == b.region {
            return self.intra_region_ms;
        }
        let key = |x: &str, y: &str| format!("{x}<->{y}");
        self.latency_ms
            .get(&key(&a.region, &b.region))
            .or_else(|| self.latency_ms.get(&key(&b.region, &a.region)))
            .copied()
            .unwrap_or(self.intra_region_ms)
    }
}

fn draw_fault(rng: &mut StdRng, name: &str, ids: &[u64], nodes: &[NodeSpec], shards: u16) -> FaultKind {
    let pick = |rng: &mut StdRng| *ids.choose(rng).unwrap_or(&1);
    let minority = (ids.len() - 1) / 2;
    match name {
        "partition" => {
            // Either a whole region or a random minority.
            let side: Vec<u64> = if rng.gen_bool(0.5) {
                let region = &nodes[rng.gen_range(0..nodes.len())].region;
                nodes.iter().filter(|n| &n.region == region).map(|n| n.id).collect()
            } else {
                let mut s = ids.to_vec();
                s.shuffle(rng);
                s.truncate(rng.gen_range(1..=minority.max(1)));
                s
            };
            let mut side = side;
            side.sort_unstable();
            FaultKind::Partition { side }
        }
        "one-way" => {
            let from = pick(rng);
            let mut to = pick(rng);
            while to == from {
                to = pick(rng);
            }
            FaultKind::OneWay { from, to }
        }
        "loss" => {
            let a = pick(rng);
            let mut b = pick(rng);
            while b == a {
                b = pick(rng);
            }
            FaultKind::Loss { a, b, rate_pct: rng.gen_range(1..=20) }
        }
        "delay-spike" => FaultKind::DelaySpike { node: pick(rng), extra_ms: rng.gen_range(50..=400) },
        "crash-many" => {
            // A majority or every node at once: only synced writes may survive.
            let mut s = ids.to_vec();
            s.shuffle(rng);
            if rng.gen_bool(0.5) {
                s.truncate(minority + 1);
            }
            s.sort_unstable();
            FaultKind::Crash { nodes: s, lose_disk: false, after_ack: false }
        }
        // Every node, at the moment a write is acknowledged: an acknowledged write must be
        // durable on a majority by then (P1).
        "crash-after-ack" => FaultKind::Crash { nodes: ids.to_vec(), lose_disk: false, after_ack: true },
        "crash" => FaultKind::Crash { nodes: vec![pick(rng)], lose_disk: false, after_ack: false },
        "crash-disk-loss" => FaultKind::Crash { nodes: vec![pick(rng)], lose_disk: true, after_ack: false },
        "isolate-leader" => FaultKind::IsolateLeader { shard: rng.gen_range(0..shards) },
        _ => {
            let offset_ms = rng.gen_range(100..=5_000) * if rng.gen_bool(0.5) { 1 } else { -1 };
            FaultKind::ClockOffset { node: pick(rng), offset_ms }
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut nodes = String::new();
        for n in &self.nodes {
            let _ = write!(nodes, " n{}@{}", n.id, n.region);
        }
        writeln!(f, "seed {}", self.seed)?;
        writeln!(f, "  nodes ({}):{nodes}", self.nodes.len())?;
        writeln!(
            f,
            "  shards {} × {} replicas, revocation bound {REVOCATION_BOUND_MS} ms",
            self.shards, self.replicas
        )?;
        let lat: Vec<String> = self.latency_ms.iter().map(|(k, v)| format!("{k} {v}ms")).collect();
        writeln!(f, "  latency: intra-region {}ms, {}", self.intra_region_ms, lat.join(", "))?;
        writeln!(
            f,
            "  disk: sync {}ms, snapshot every {} entries",
            self.sync_delay_ms, self.snapshot_every_n_logs
        )?;
        let m = &self.mix;
        writeln!(
            f,
            "  workload: {} clients, {} users, think {}ms, mix create {} child {} check {} family {} revoke session {} device {} user {} watermark {}",
            self.clients,
            self.users,
            self.think_ms,
            m.create,
            m.create_child,
            m.check,
            m.check_family,
            m.revoke_session,
            m.revoke_device,
            m.revoke_user,
            m.watermark_user
        )?;
        writeln!(f, "  fault kinds enabled: {}", self.enabled.join(", "))?;
        for fault in &self.faults {
            writeln!(
                f,
                "  fault at {:>6}ms for {:>5}ms: {}",
                fault.at_ms,
                fault.duration_ms,
                serde_json::to_string(&fault.kind).unwrap_or_default()
            )?;
        }
        write!(f, "  heal at {}ms, converge within {}ms", self.heal_at_ms, self.converge_limit_ms)
    }
}

impl Scenario {
    /// What the simulated clients do, from the scenario.
    pub fn workload(&self) -> Workload {
        Workload {
            seed: self.seed,
            tenant: cascade_check::clients::TENANT.to_owned(),
            node_ids: self.nodes.iter().map(|n| n.id).collect(),
            shards: self.shards,
            clients: self.clients,
            think_ms: self.think_ms,
            users: self.users,
            mix: self.mix.clone(),
            warmup_ms: self.warmup_ms,
            stop_at_ms: self.heal_at_ms,
            converge_limit_ms: self.converge_limit_ms,
            op_timeout_ms: 1_000,
            probe_attempt_ms: 300,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_scenario() {
        for seed in 0..50 {
            let a = Scenario::from_seed(seed).to_string();
            let b = Scenario::from_seed(seed).to_string();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn scenarios_stay_within_their_ranges() {
        for seed in 0..200 {
            let s = Scenario::from_seed(seed);
            assert!((3..=7).contains(&s.nodes.len()), "seed {seed}");
            assert!(!s.faults.is_empty() && !s.enabled.is_empty(), "seed {seed}");
            assert!(s.faults.windows(2).all(|w| w[0].at_ms + w[0].duration_ms < w[1].at_ms), "seed {seed}");
            assert!(s.replicas <= s.nodes.len());
        }
    }
}
