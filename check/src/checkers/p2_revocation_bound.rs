//! P2 revocation bound: once a revocation is acknowledged at t, no check that starts after
//! t + bound (simulated time, the clients' one clock) answers VALID for a session it revoked.

use super::model::Model;
use super::Violation;
use crate::history::{History, OpResult};

pub const NAME: &str = "P2 revocation bound";

pub fn check(model: &Model, history: &History, bound_ms: u64) -> Vec<Violation> {
    let mut v = Vec::new();
    for (i, op) in history.ops.iter().enumerate() {
        let OpResult::Checked { seen } = &op.result else { continue };
        for s in seen.iter().filter(|s| s.status == "VALID") {
            let Some(&r) = model.revoked_by.get(&s.session) else { continue };
            let r = &model.revocations[r];
            if op.invoke_ms > r.ack_ms + bound_ms {
                v.push(Violation::new(
                    NAME,
                    format!(
                        "op #{i}: node n{} answered VALID for {} at {} ms; op #{} revoked it, acknowledged at {} ms (+{} ms)",
                        op.node,
                        s.session,
                        op.invoke_ms,
                        r.op,
                        r.ack_ms,
                        op.invoke_ms - r.ack_ms
                    ),
                ));
            }
        }
    }
    v
}
