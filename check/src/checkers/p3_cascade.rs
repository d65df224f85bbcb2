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
            let revoked_before =
                model.revoked_by.get(&child).is_some_and(|&e| model.revocations[e].op < r.op);
            if revoked_before || maybe_revoked_before(model, history, &child, r.op) {
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

/// Whether an operation with an unknown outcome, before op `before`, may have revoked `session`
/// (directly, through an ancestor, its device, its user, or an eviction by a create).
fn maybe_revoked_before(model: &Model, history: &History, session: &str, before: usize) -> bool {
    let Some(c) = model.created.get(session) else { return true };
    let mut ancestors = vec![session.to_owned()];
    let mut p = c.parent.clone();
    while let Some(id) = p {
        p = model.created.get(&id).and_then(|x| x.parent.clone());
        ancestors.push(id);
    }
    history.ops[..before].iter().any(|op| {
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
