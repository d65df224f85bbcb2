//! What the clients of a run do: the operation mix and the timing, shared by the simulator
//! (virtual time) and the chaos harness (real processes). The clients themselves are in
//! [`crate::clients`].

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The clients' side of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Workload {
    pub seed: u64,
    /// Tenant of every user the clients touch (a drill keeps its canary apart from real data).
    pub tenant: String,
    pub node_ids: Vec<u64>,
    pub shards: u16,
    /// Concurrent workload clients.
    pub clients: usize,
    /// Pause between a client's operations.
    pub think_ms: u64,
    /// Users the clients create sessions for.
    pub users: u32,
    pub mix: Mix,
    /// When the cluster is expected to have formed and the clients start (ms on the run's clock).
    pub warmup_ms: u64,
    /// When the clients stop (the heal): convergence must follow.
    pub stop_at_ms: u64,
    /// How long after `stop_at_ms` the cluster has to converge.
    pub converge_limit_ms: u64,
    /// Deadline of one client operation (partitions drop traffic silently), and of one probe
    /// round on a shard.
    pub op_timeout_ms: u64,
    /// Deadline of one probe attempt on one node; a round tries the nodes in turn.
    pub probe_attempt_ms: u64,
}

impl Workload {
    /// Clients for a real cluster on real time (the chaos harness, drills): a write crosses
    /// regions twice (forwarded to the leader, replicated to a quorum), ~200 ms with 35-70 ms
    /// between regions, more while a shard elects a leader. The caller sets `warmup_ms` and
    /// `stop_at_ms` once the cluster serves.
    pub fn real_time(tenant: &str, seed: u64, node_ids: Vec<u64>, shards: u16, clients: usize) -> Workload {
        Workload {
            seed,
            tenant: tenant.to_owned(),
            node_ids,
            shards,
            clients,
            think_ms: 20,
            users: 12,
            mix: Mix {
                create: 25,
                create_child: 10,
                check: 40,
                check_family: 10,
                revoke_session: 8,
                revoke_device: 4,
                revoke_user: 3,
                watermark_user: 2,
            },
            warmup_ms: 0,
            stop_at_ms: 0,
            converge_limit_ms: 30_000,
            op_timeout_ms: 2_000,
            probe_attempt_ms: 800,
        }
    }

    pub fn op_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.op_timeout_ms)
    }
}

/// Relative weights of client operations.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Mix {
    pub create: u32,
    pub create_child: u32,
    pub check: u32,
    pub check_family: u32,
    pub revoke_session: u32,
    pub revoke_device: u32,
    pub revoke_user: u32,
    /// User watermarks (`SetWatermark`, scope user, not-before = now).
    #[serde(default)]
    pub watermark_user: u32,
}

impl Mix {
    pub fn total(&self) -> u32 {
        self.create
            + self.create_child
            + self.check
            + self.check_family
            + self.revoke_session
            + self.revoke_device
            + self.revoke_user
            + self.watermark_user
    }

    /// Picks an operation by the mix.
    pub fn draw(&self, rng: &mut impl Rng) -> OpChoice {
        let m = self;
        let mut x = rng.gen_range(0..m.total().max(1));
        for (weight, op) in [
            (m.create, OpChoice::Create),
            (m.create_child, OpChoice::CreateChild),
            (m.check, OpChoice::Check),
            (m.check_family, OpChoice::CheckFamily),
            (m.revoke_session, OpChoice::RevokeSession),
            (m.revoke_device, OpChoice::RevokeDevice),
            (m.revoke_user, OpChoice::RevokeUser),
            (m.watermark_user, OpChoice::WatermarkUser),
        ] {
            if x < weight {
                return op;
            }
            x -= weight;
        }
        OpChoice::Check
    }
}

/// One kind of client operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpChoice {
    Create,
    CreateChild,
    Check,
    CheckFamily,
    RevokeSession,
    RevokeDevice,
    RevokeUser,
    WatermarkUser,
}
