//! Nemeses: the faults the harness injects into a running cluster, each with its undo, and the
//! named scenarios that compose them on a schedule.

use crate::cluster::Cluster;
use anyhow::Context;
use cascade_check::workload::Mix;
use cascade_protocol::pb;
use std::time::Duration;

/// One fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Nemesis {
    /// kill -9 the leader of a shard; restarted with its data dir.
    KillLeader { shard: u16 },
    /// kill -9 one node; restarted with its data dir.
    KillNode { node: u64 },
    /// kill -9 every node of a region; restarted with their data dirs.
    KillRegion { region: &'static str },
    /// kill -9 every node at once; all restarted with their data dirs.
    KillAll,
    /// SIGSTOP the leader of a shard; SIGCONT.
    PauseLeader { shard: u16 },
    /// Cut a region off from the others, both ways.
    PartitionRegion { region: &'static str },
    /// Cut the leader of a shard off from every other node, both ways.
    IsolateLeader { shard: u16 },
    /// `from` cannot reach `to`; `to` still reaches `from`.
    OneWay { from: u64, to: u64 },
    /// Every inter-region link loses chunks (each costing a retransmission timeout).
    Loss { per_mille: u32 },
    /// Every inter-region link gets slower.
    DelaySpike { extra_ms: u64 },
    /// kill -9 a node and remove its data dir; it restarts empty and rejoins by snapshot.
    WipeRestart { node: u64 },
    /// One node's clock runs off by `offset_ms` (the node's admin hook, not the host clock).
    ClockOffset { node: u64, offset_ms: i64 },
}

impl Nemesis {
    pub fn name(&self) -> &'static str {
        match self {
            Nemesis::KillLeader { .. } => "kill-leader",
            Nemesis::KillNode { .. } => "kill-node",
            Nemesis::KillRegion { .. } => "kill-region",
            Nemesis::KillAll => "kill-all",
            Nemesis::PauseLeader { .. } => "pause-leader",
            Nemesis::PartitionRegion { .. } => "partition-region",
            Nemesis::IsolateLeader { .. } => "isolate-leader",
            Nemesis::OneWay { .. } => "one-way",
            Nemesis::Loss { .. } => "loss",
            Nemesis::DelaySpike { .. } => "delay-spike",
            Nemesis::WipeRestart { .. } => "wipe-restart",
            Nemesis::ClockOffset { .. } => "clock-offset",
        }
    }
}

/// What undoes an applied fault.
#[derive(Clone, Debug)]
pub enum Undo {
    Restart(Vec<u64>),
    /// Remove the data dir, then restart.
    WipeAndRestart(u64),
    Resume(u64),
    HealNetwork,
    ResetClock(u64),
}

/// An applied fault: what it hit, and how to undo it.
#[derive(Clone, Debug)]
pub struct Applied {
    pub target: String,
    pub undo: Undo,
}

/// Injects `nemesis` into `cluster`.
pub async fn apply(cluster: &mut Cluster, nemesis: &Nemesis) -> anyhow::Result<Applied> {
    let spec = cluster.spec.clone();
    Ok(match *nemesis {
        Nemesis::KillLeader { shard } => {
            let leader = leader(cluster, shard).await?;
            cluster.kill(leader)?;
            Applied {
                target: format!("n{leader} (leader of shard {shard})"),
                undo: Undo::Restart(vec![leader]),
            }
        }
        Nemesis::KillNode { node } => {
            cluster.kill(node)?;
            Applied { target: format!("n{node}"), undo: Undo::Restart(vec![node]) }
        }
        Nemesis::KillRegion { region } => {
            let ids: Vec<u64> = cluster.nodes.values().filter(|n| n.region == region).map(|n| n.id).collect();
            for &id in &ids {
                cluster.kill(id)?;
            }
            Applied { target: format!("region {region} ({})", names(&ids)), undo: Undo::Restart(ids) }
        }
        Nemesis::KillAll => {
            let ids = cluster.ids();
            for &id in &ids {
                cluster.kill(id)?;
            }
            Applied { target: format!("every node ({})", names(&ids)), undo: Undo::Restart(ids) }
        }
        Nemesis::PauseLeader { shard } => {
            let leader = leader(cluster, shard).await?;
            cluster.signal_pause(leader, true)?;
            Applied { target: format!("n{leader} (leader of shard {shard})"), undo: Undo::Resume(leader) }
        }
        Nemesis::PartitionRegion { region } => {
            let inside = |id: u64| spec.region_of(id) == region;
            cluster.net.update(|a, b| inside(a) != inside(b), |f| f.blocked = true);
            Applied { target: format!("region {region}"), undo: Undo::HealNetwork }
        }
        Nemesis::IsolateLeader { shard } => {
            let leader = leader(cluster, shard).await?;
            cluster.net.update(|a, b| a == leader || b == leader, |f| f.blocked = true);
            Applied { target: format!("n{leader} (leader of shard {shard})"), undo: Undo::HealNetwork }
        }
        Nemesis::OneWay { from, to } => {
            cluster.net.update(|a, b| (a, b) == (from, to), |f| f.blocked = true);
            Applied { target: format!("n{from} -> n{to}"), undo: Undo::HealNetwork }
        }
        Nemesis::Loss { per_mille } => {
            cluster
                .net
                .update(|a, b| spec.region_of(a) != spec.region_of(b), |f| f.loss_per_mille = per_mille);
            Applied {
                target: format!("inter-region links, {per_mille}‰ of chunks"), undo: Undo::HealNetwork
            }
        }
        Nemesis::DelaySpike { extra_ms } => {
            cluster.net.update(|a, b| spec.region_of(a) != spec.region_of(b), |f| f.delay_ms += extra_ms);
            Applied { target: format!("inter-region links, +{extra_ms} ms"), undo: Undo::HealNetwork }
        }
        Nemesis::WipeRestart { node } => {
            cluster.kill(node)?;
            Applied { target: format!("n{node}"), undo: Undo::WipeAndRestart(node) }
        }
        Nemesis::ClockOffset { node, offset_ms } => {
            set_clock_offset(cluster, node, offset_ms).await?;
            Applied { target: format!("n{node}, {offset_ms:+} ms"), undo: Undo::ResetClock(node) }
        }
    })
}

/// Undoes an applied fault.
pub async fn undo(cluster: &mut Cluster, undo: &Undo) -> anyhow::Result<()> {
    match undo {
        Undo::Restart(ids) => {
            for &id in ids {
                cluster.start_node(id)?;
            }
        }
        Undo::WipeAndRestart(id) => {
            cluster.wipe(*id)?;
            cluster.start_node(*id)?;
        }
        Undo::Resume(id) => cluster.signal_pause(*id, false)?,
        Undo::HealNetwork => {
            let spec = cluster.spec.clone();
            cluster.net.heal(|a, b| spec.base_link(a, b));
        }
        Undo::ResetClock(id) => set_clock_offset(cluster, *id, 0).await?,
    }
    Ok(())
}

/// Undoes everything, whatever is still applied: the final heal.
pub async fn heal_all(cluster: &mut Cluster) -> anyhow::Result<()> {
    let spec = cluster.spec.clone();
    cluster.net.heal(|a, b| spec.base_link(a, b));
    for id in cluster.ids() {
        if cluster.node(id)?.running() {
            cluster.signal_pause(id, false)?;
        } else {
            cluster.start_node(id)?;
        }
    }
    Ok(())
}

async fn leader(cluster: &Cluster, shard: u16) -> anyhow::Result<u64> {
    // Right after a restart a shard may be between leaders: give it a few election timeouts.
    for _ in 0..20 {
        if let Some(id) = cluster.leader_of(shard).await {
            return Ok(id);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("shard {shard} has no leader to aim at")
}

async fn set_clock_offset(cluster: &Cluster, node: u64, offset_ms: i64) -> anyhow::Result<()> {
    let mut req = tonic::Request::new(pb::SetClockOffsetRequest { offset_ms });
    req.set_timeout(Duration::from_secs(2));
    cluster
        .client(node)?
        .set_clock_offset(req)
        .await
        .with_context(|| format!("set the clock offset of n{node}"))?;
    Ok(())
}

fn names(ids: &[u64]) -> String {
    ids.iter().map(|id| format!("n{id}")).collect::<Vec<_>>().join(", ")
}

/// One step of a schedule: inject `nemesis` at `at_ms` after the workload started, undo it
/// `duration_ms` later.
#[derive(Clone, Debug)]
pub struct Step {
    pub at_ms: u64,
    pub duration_ms: u64,
    pub nemesis: Nemesis,
}

/// A named composition of faults.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    pub nodes: usize,
    pub shards: u16,
    pub clients: usize,
    /// The operation mix, when not the default one (`Workload::real_time`).
    pub mix: Option<Mix>,
    pub steps: Vec<Step>,
    /// Quiet time after the last step before the heal (a healed partition or a resumed node
    /// can still cost a shard an election: see the report's RTO of the last fault).
    pub settle_ms: u64,
    /// How long after the heal the cluster has to converge.
    pub converge_limit_ms: u64,
}

impl Scenario {
    /// When every fault is healed, relative to the start of the workload.
    pub fn heal_at_ms(&self) -> u64 {
        self.steps.iter().map(|s| s.at_ms + s.duration_ms).max().unwrap_or(0) + self.settle_ms
    }
}

fn step(at_s: u64, duration_s: u64, nemesis: Nemesis) -> Step {
    Step { at_ms: at_s * 1_000, duration_ms: duration_s * 1_000, nemesis }
}

/// Every named scenario. `smoke` is the one CI runs.
pub fn scenarios() -> Vec<Scenario> {
    let base = |name, description, nodes, steps| Scenario {
        name,
        description,
        nodes,
        shards: 4,
        clients: 4,
        mix: None,
        steps,
        settle_ms: 6_000,
        converge_limit_ms: 30_000,
    };
    vec![
        base(
            "smoke",
            "CI smoke: kill -9 a shard leader, partition a region, pause a leader, on 3 nodes in 3 regions.",
            3,
            vec![
                step(3, 6, Nemesis::KillLeader { shard: 0 }),
                step(15, 6, Nemesis::PartitionRegion { region: "eu" }),
                step(27, 5, Nemesis::PauseLeader { shard: 1 }),
            ],
        ),
        base(
            "full",
            "Every nemesis in turn on 5 nodes in 3 regions: leader kill, region partition, pause, leader isolation, \
             one-way partition, loss, delay spike, clock offset, region kill, restart without data dir, whole-cluster kill -9.",
            5,
            vec![
                step(3, 3, Nemesis::KillLeader { shard: 0 }),
                step(12, 4, Nemesis::PartitionRegion { region: "eu" }),
                step(22, 3, Nemesis::PauseLeader { shard: 1 }),
                step(31, 4, Nemesis::IsolateLeader { shard: 2 }),
                step(41, 4, Nemesis::OneWay { from: 1, to: 2 }),
                step(51, 4, Nemesis::Loss { per_mille: 100 }),
                step(61, 4, Nemesis::DelaySpike { extra_ms: 150 }),
                step(71, 4, Nemesis::ClockOffset { node: 3, offset_ms: 30_000 }),
                step(81, 4, Nemesis::KillRegion { region: "us" }),
                step(92, 3, Nemesis::WipeRestart { node: 2 }),
                step(103, 4, Nemesis::KillAll),
            ],
        ),
        base("kill-leader", "kill -9 the leader of shard 0, restart it after 3 s.", 3, vec![step(3, 3, Nemesis::KillLeader { shard: 0 })]),
        base("partition-region", "Cut region eu off for 5 s.", 3, vec![step(3, 5, Nemesis::PartitionRegion { region: "eu" })]),
        base("kill-all", "kill -9 every node at once, restart them after 3 s.", 3, vec![step(3, 3, Nemesis::KillAll)]),
        base("pause", "SIGSTOP the leader of shard 0 for 4 s.", 3, vec![step(3, 4, Nemesis::PauseLeader { shard: 0 })]),
        base("isolate-leader", "Cut the leader of shard 0 off from every node for 5 s.", 3, vec![step(3, 5, Nemesis::IsolateLeader { shard: 0 })]),
        base("wipe-restart", "kill -9 n2, remove its data dir, restart it empty.", 3, vec![step(3, 2, Nemesis::WipeRestart { node: 2 })]),
        Scenario {
            clients: 10,
            // One shard: every session lives where the fault is, so every revocation the new
            // leader acknowledges is bait for a check at the cut-off one. With 4 shards a CI
            // run once saw too few of them to catch the planted bug.
            shards: 1,
            // Mostly checks, enough revocations to check against: the bait.
            mix: Some(Mix {
                create: 15,
                create_child: 0,
                check: 70,
                check_family: 0,
                revoke_session: 15,
                revoke_device: 0,
                revoke_user: 0,
                watermark_user: 0,
            }),
            ..base(
                "stale-read-bait",
                "One shard; cut its leader off for 14 s while 10 clients revoke and check: a leader that answers \
                 without a freshness proof (planted bug stale-leader-read) serves revoked sessions as VALID.",
                3,
                vec![step(8, 14, Nemesis::IsolateLeader { shard: 0 })],
            )
        },
        base("clock-offset", "Run n3's clock 30 s fast for 5 s.", 3, vec![step(3, 5, Nemesis::ClockOffset { node: 3, offset_ms: 30_000 })]),
    ]
}

/// The scenario called `name`.
pub fn scenario(name: &str) -> anyhow::Result<Scenario> {
    let all = scenarios();
    let names: Vec<&str> = all.iter().map(|s| s.name).collect();
    all.into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no scenario {name:?}; there are: {}", names.join(", ")))
}
