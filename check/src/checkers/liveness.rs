//! Liveness: after every fault is healed, the cluster converges (one agreed leader per shard,
//! every voter caught up) within the run's limit, and the final reads succeed.

use super::{RunLimits, Violation};
use crate::history::History;

pub const NAME: &str = "liveness";

pub fn check(limits: RunLimits, history: &History) -> Vec<Violation> {
    match history.converged_at_ms {
        None => vec![Violation::new(
            NAME,
            format!(
                "no convergence within {} ms of the heal at {} ms: {}",
                limits.converge_limit_ms,
                limits.heal_at_ms,
                history.not_converged.as_deref().unwrap_or("no status")
            ),
        )],
        Some(_) => {
            let missing = history
                .ops
                .iter()
                .filter_map(|op| match &op.result {
                    crate::history::OpResult::Created { session, .. } => Some(session),
                    _ => None,
                })
                .filter(|s| !history.final_checks.contains_key(*s))
                .count();
            if missing > 0 {
                let first = history.final_read_errors.first().map_or("", String::as_str);
                vec![Violation::new(
                    NAME,
                    format!("{missing} final reads failed after convergence, e.g. {first}"),
                )]
            } else {
                Vec::new()
            }
        }
    }
}
