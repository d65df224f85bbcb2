//! P3 cascade atomicity: revoking a session revokes all its descendants in the same entry.
//!
//! Two views: (1) the node's own answer to an acknowledged session revocation must list every
//! descendant the clients know of that was not revoked before (unless an operation with an
//! unknown outcome may have revoked it); (2) no batch check of a family ever sees the parent
//! revoked while a child is still valid.

use super::model::Model;
use super::Violation;
use crate::history::{History, OpKind, OpResult};

pub const NAME: &str = "P3 cascade atomicity";

pub fn check(model: &Model, history: &History) -> Vec<Violation> {
    let mut v = Vec::new();
    for r in &model.revocations {
        let op = &history.ops[r.op];
        let OpKind::RevokeSession { session: root } = &op.kind else { continue };
        if !r.sessions.contains(root) {
            continue; // the root was already revoked: its cascade ran then
        }
        for child in model.descendants(root) {
            let created = &model.created[&child];
            if created.ack_ms > r.invoke_ms || r.sessions.contains(&child) {
                continue;
            }
            // Another revocation that listed the child and started before this one was
            // acknowledged may have been applied first (history order is not apply order: two
            // concurrent revocations of a parent and its child each list only their own).
            let revoked_before = model
                .revocations
                .iter()
                .any(|x| x.op != r.op && x.invoke_ms <= r.ack_ms && x.sessions.contains(&child));
            if revoked_before || maybe_revoked_before(model, history, &child, r.ack_ms) {
                continue;
            }
            v.push(Violation::new(
                NAME,
                format!("op #{}: revoking {root} left its descendant {child} valid", r.op),
            ));
        }
    }
    for (i, op) in history.ops.iter().enumerate() {
        let (OpKind::CheckFamily { sessions }, OpResult::Checked { seen }) = (&op.kind, &op.result) else {
            continue;
        };
        let Some(parent) = seen.first() else { continue };
        if parent.status != "REVOKED" {
            continue;
        }
        for s in seen.iter().skip(1).filter(|s| s.status == "VALID") {
            v.push(Violation::new(
                NAME,
                format!(
                    "op #{i}: node n{} saw parent {} REVOKED ({}) but child {} VALID (family {:?})",
                    op.node, parent.session, parent.reason, s.session, sessions
                ),
            ));
        }
    }
    v
}

/// Whether an operation with an unknown outcome, started by `until_ms`, may have revoked
/// `session` (directly, through an ancestor, its device, its user, or an eviction by a create).
fn maybe_revoked_before(model: &Model, history: &History, session: &str, until_ms: u64) -> bool {
    let Some(c) = model.created.get(session) else { return true };
    let mut ancestors = vec![session.to_owned()];
    let mut p = c.parent.clone();
    while let Some(id) = p {
        p = model.created.get(&id).and_then(|x| x.parent.clone());
        ancestors.push(id);
    }
    history.ops.iter().filter(|op| op.invoke_ms <= until_ms).any(|op| {
        matches!(op.result, OpResult::Unknown { .. })
            && match &op.kind {
                OpKind::RevokeSession { session } => ancestors.contains(session),
                OpKind::RevokeDevice { user, device } => {
                    *user == c.user && c.device.as_deref() == Some(device.as_str())
                }
                OpKind::RevokeUser { user } | OpKind::WatermarkUser { user } => *user == c.user,
                OpKind::Create { user, .. } => *user == c.user,
                _ => false,
            }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "cs_0000ba6d1ec4661f682e21143adf9654bb9d";
    const B: &str = "cs_0000ab3e68dab638a810fbc4202d4f33ab12";

    /// A parent A, its child B, then revocations of A and B, each listing only what it revoked,
    /// with B's revocation started at `b_invoke_ms` (A's runs from 5426 to 5608).
    fn history(b_invoke_ms: u64) -> History {
        let op = |client: &str, invoke: u64, complete: u64, rest: serde_json::Value| {
            let mut o = serde_json::json!({ "client": client, "node": 3, "invoke_ms": invoke, "complete_ms": complete });
            o.as_object_mut().unwrap().extend(rest.as_object().unwrap().clone());
            o
        };
        let ops = serde_json::json!([
            op(
                "c2",
                5000,
                5223,
                serde_json::json!({"op": "create", "user": "u4", "device": "d2", "parent": null,
                "result": "created", "session": A, "created_at_ms": 1, "evicted": []})
            ),
            op(
                "c2",
                5237,
                5368,
                serde_json::json!({"op": "create", "user": "u4", "device": "d2", "parent": A,
                "result": "created", "session": B, "created_at_ms": 2, "evicted": []})
            ),
            op(
                "c0",
                5426,
                5608,
                serde_json::json!({"op": "revoke-session", "session": A,
                "result": "revoked", "sessions": [A], "at_ms": 5429})
            ),
            op(
                "c2",
                b_invoke_ms,
                b_invoke_ms + 210,
                serde_json::json!({"op": "revoke-session", "session": B,
                "result": "revoked", "sessions": [B], "at_ms": b_invoke_ms + 18})
            ),
        ]);
        let h = serde_json::json!({ "ops": ops, "leaders": [], "events": [], "final_checks": {},
            "final_lists": {}, "converged_at_ms": 0, "not_converged": null, "final_read_errors": [] });
        serde_json::from_value(h).expect("history")
    }

    /// Seed 156 (found by the simulator): the child's revocation ran concurrently with the
    /// parent's and was applied first, so the parent's listed only the parent. Not a violation.
    #[test]
    fn concurrent_child_revocation_is_not_a_violation() {
        let h = history(5398);
        assert!(check(&Model::build(&h), &h).is_empty());
    }

    /// The same answers when the child's revocation started only after the parent's was
    /// acknowledged: the parent's cascade left the child valid.
    #[test]
    fn child_revoked_only_later_is_a_violation() {
        let h = history(5700);
        let v = check(&Model::build(&h), &h);
        assert_eq!(v.len(), 1, "{v:?}");
    }
}
