//! What every client did and saw, on the run's one clock (simulated time in the simulator, one
//! monotonic clock in the chaos harness), plus what the nodes reported about leadership. The
//! checkers read only this.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Status of one checked session, as the node answered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub session: String,
    /// `VALID`, `REVOKED`, `UNKNOWN`, ... (the proto enum name).
    pub status: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum OpKind {
    Create {
        user: String,
        device: String,
        parent: Option<String>,
    },
    Check {
        session: String,
    },
    /// A parent and its children in one batch (answered by one user actor at one moment).
    CheckFamily {
        sessions: Vec<String>,
    },
    RevokeSession {
        session: String,
    },
    RevokeDevice {
        user: String,
        device: String,
    },
    RevokeUser {
        user: String,
    },
    /// A user watermark at the leader's "now": every session of the user created at or before
    /// it is revoked, whoever created it.
    WatermarkUser {
        user: String,
    },
    /// Writes of the availability probe (one per shard and round).
    Probe {
        shard: u16,
        /// The probe's round on this shard; the attempts of one round share it.
        #[serde(default)]
        round: u32,
        user: String,
    },
}

impl OpKind {
    pub fn is_write(&self) -> bool {
        !matches!(self, OpKind::Check { .. } | OpKind::CheckFamily { .. })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum OpResult {
    /// `evicted`: sessions the create pushed out under the per-user session limit.
    Created {
        session: String,
        created_at_ms: u64,
        evicted: Vec<String>,
    },
    Checked {
        seen: Vec<Seen>,
    },
    Revoked {
        sessions: Vec<String>,
        at_ms: u64,
    },
    /// The watermark in force after the request (sessions created at or before it are invalid).
    Watermarked {
        watermark_ms: u64,
    },
    /// Definitely not applied (the node refused it before or instead of proposing).
    Refused {
        code: String,
    },
    /// Outcome unknown (timeout, connection lost, unavailable): a write may or may not have
    /// been applied, so the oracle treats it as both.
    Unknown {
        code: String,
    },
}

/// One client operation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Op {
    pub client: String,
    pub node: u64,
    pub invoke_ms: u64,
    pub complete_ms: u64,
    #[serde(flatten)]
    pub kind: OpKind,
    #[serde(flatten)]
    pub result: OpResult,
}

impl Op {
    pub fn ok(&self) -> bool {
        !matches!(self.result, OpResult::Refused { .. } | OpResult::Unknown { .. })
    }
}

/// A node saw itself as leader of `shard` in `term`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Leadership {
    pub at_ms: u64,
    pub shard: u16,
    pub term: u64,
    pub node: u64,
}

/// What the simulator itself did (faults, heals), for the trace and for RTO.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub what: String,
}

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Op>,
    pub leaders: Vec<Leadership>,
    pub events: Vec<Event>,
    /// After the heal: the answer of a linearizable check of every session any client saw
    /// created, and of every user's session list (`user -> session ids`).
    pub final_checks: BTreeMap<String, Seen>,
    pub final_lists: BTreeMap<String, Vec<String>>,
    /// When every shard had converged after the heal, if it did.
    pub converged_at_ms: Option<u64>,
    /// Why the cluster had not converged at the last look.
    pub not_converged: Option<String>,
    /// Final reads that no node answered, with each node's error.
    pub final_read_errors: Vec<String>,
}

impl History {
    /// (succeeded, failed) operations that completed at or after `from_ms`, for progress lines.
    /// Operations are recorded as they complete, so this reads only the tail of the history.
    pub fn outcomes_since(&self, from_ms: u64) -> (u64, u64) {
        self.ops.iter().rev().take_while(|o| o.complete_ms >= from_ms).fold((0, 0), |(ok, failed), o| {
            if o.ok() {
                (ok + 1, failed)
            } else {
                (ok, failed + 1)
            }
        })
    }
}
