//! No phantom sessions: every session a user has after the heal was created by some client —
//! acknowledged, or one of that user's creates whose outcome is unknown.

use super::model::Model;
use super::Violation;
use crate::history::History;

pub const NAME: &str = "no phantom sessions";

pub fn check(model: &Model, history: &History) -> Vec<Violation> {
    let mut v = Vec::new();
    for (user, listed) in &history.final_lists {
        let strangers: Vec<&String> = listed.iter().filter(|id| !model.created.contains_key(*id)).collect();
        let allowed = model.unknown_creates.get(user).copied().unwrap_or(0);
        if strangers.len() > allowed {
            v.push(Violation::new(
                NAME,
                format!(
                    "user {user} has {} sessions no client created (only {allowed} creates had unknown outcomes): {:?}",
                    strangers.len(),
                    strangers
                ),
            ));
        }
    }
    v
}
