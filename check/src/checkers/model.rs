//! What the clients know for certain, derived from the history: which sessions were created
//! (acknowledged), their parents, and which acknowledged operation revoked what.

use crate::history::{History, OpKind, OpResult};
use std::collections::{BTreeMap, BTreeSet};

/// A session whose create was acknowledged.
#[derive(Clone, Debug)]
pub struct Created {
    pub user: String,
    pub device: Option<String>,
    pub parent: Option<String>,
    pub ack_ms: u64,
    /// The leader's creation stamp (what watermarks compare with).
    pub created_at_ms: u64,
}

/// An acknowledged operation that revoked sessions (the ids come from the node's answer).
#[derive(Clone, Debug)]
pub struct Revocation {
    /// Index of the op in the history.
    pub op: usize,
    pub invoke_ms: u64,
    pub ack_ms: u64,
    pub sessions: Vec<String>,
}

#[derive(Default)]
pub struct Model {
    pub created: BTreeMap<String, Created>,
    pub revocations: Vec<Revocation>,
    /// Session → the revocation that listed it with the earliest acknowledgement.
    pub revoked_by: BTreeMap<String, usize>,
    /// Per user: creates whose outcome is unknown (each may have made one session the clients
    /// never heard of).
    pub unknown_creates: BTreeMap<String, usize>,
}

impl Model {
    pub fn build(history: &History) -> Model {
        let mut m = Model::default();
        for (i, op) in history.ops.iter().enumerate() {
            let user = match &op.kind {
                OpKind::Create { user, .. } | OpKind::Probe { user, .. } => Some(user),
                _ => None,
            };
            match (&op.kind, &op.result) {
                (_, OpResult::Created { session, evicted, created_at_ms }) => {
                    let (device, parent) = match &op.kind {
                        OpKind::Create { device, parent, .. } => (Some(device.clone()), parent.clone()),
                        _ => (None, None),
                    };
                    m.created.insert(
                        session.clone(),
                        Created {
                            user: user.cloned().unwrap_or_default(),
                            device,
                            parent,
                            ack_ms: op.complete_ms,
                            created_at_ms: *created_at_ms,
                        },
                    );
                    if !evicted.is_empty() {
                        m.push_revocation(i, op.invoke_ms, op.complete_ms, evicted.clone());
                    }
                }
                (_, OpResult::Revoked { sessions, .. }) => {
                    m.push_revocation(i, op.invoke_ms, op.complete_ms, sessions.clone());
                }
                (OpKind::Create { user, .. } | OpKind::Probe { user, .. }, OpResult::Unknown { .. }) => {
                    *m.unknown_creates.entry(user.clone()).or_default() += 1;
                }
                _ => {}
            }
        }
        // A watermark revokes every session of its user created at or before it, including
        // ones whose create was acknowledged later (the leader's stamps decide, not the order
        // in which clients heard back).
        for (i, op) in history.ops.iter().enumerate() {
            if let (OpKind::WatermarkUser { user }, OpResult::Watermarked { watermark_ms }) =
                (&op.kind, &op.result)
            {
                let sessions: Vec<String> = m
                    .created
                    .iter()
                    .filter(|(_, c)| &c.user == user && c.created_at_ms <= *watermark_ms)
                    .map(|(id, _)| id.clone())
                    .collect();
                m.push_revocation(i, op.invoke_ms, op.complete_ms, sessions);
            }
        }
        m
    }

    fn push_revocation(&mut self, op: usize, invoke_ms: u64, ack_ms: u64, sessions: Vec<String>) {
        let index = self.revocations.len();
        for s in &sessions {
            // The earliest acknowledged revocation decides (watermarks are added last).
            let earlier = self.revoked_by.get(s).is_some_and(|&j| self.revocations[j].ack_ms <= ack_ms);
            if !earlier {
                self.revoked_by.insert(s.clone(), index);
            }
        }
        self.revocations.push(Revocation { op, invoke_ms, ack_ms, sessions });
    }

    /// Every known descendant of `root` (acknowledged creates only), not including it.
    pub fn descendants(&self, root: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut frontier = vec![root.to_owned()];
        while let Some(p) = frontier.pop() {
            for (id, c) in &self.created {
                if c.parent.as_deref() == Some(p.as_str()) && out.insert(id.clone()) {
                    frontier.push(id.clone());
                }
            }
        }
        out
    }
}
