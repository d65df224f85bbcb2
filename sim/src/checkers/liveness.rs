//! Liveness: after every fault is healed, the cluster converges (one agreed leader per shard,
//! every voter caught up) within the scenario's limit, and the final reads succeed.

use super::Violation;
use crate::history::History;
use crate::scenario::Scenario;

pub const NAME: &str = "liveness";

pub fn check(scenario: &Scenario, history: &History) -> Vec<Violation> {
    match history.converged_at_ms {
        None => vec![Violation::new(
            NAME,
            format!(
                "no convergence within {} ms of the heal at {} ms: {}",
                scenario.converge_limit_ms,
                scenario.heal_at_ms,
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
