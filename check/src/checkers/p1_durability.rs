//! P1 durability: after the heal, every acknowledged create is still there, and every session an
//! acknowledged revocation revoked is still revoked. (RPO = the number of these violations.)

use super::model::Model;
use super::Violation;
use crate::history::History;

pub const NAME: &str = "P1 durability";

pub fn check(model: &Model, history: &History) -> Vec<Violation> {
    let mut v = Vec::new();
    for (id, created) in &model.created {
        let Some(seen) = history.final_checks.get(id) else { continue }; // liveness reports it
        if seen.status == "UNKNOWN" {
            v.push(Violation::new(
                NAME,
                format!(
                    "session {id} of {} acknowledged at {} ms is gone after the heal",
                    created.user, created.ack_ms
                ),
            ));
        }
    }
    for r in &model.revocations {
        for id in &r.sessions {
            let Some(seen) = history.final_checks.get(id) else { continue };
            if seen.status == "VALID" {
                v.push(Violation::new(
                    NAME,
                    format!(
                        "session {id} revoked by op #{} (acknowledged at {} ms) is VALID again after the heal",
                        r.op, r.ack_ms
                    ),
                ));
            }
        }
    }
    v
}
