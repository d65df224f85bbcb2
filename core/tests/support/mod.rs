//! Helpers shared by the core test files: building commands and checking sessions.
#![allow(dead_code)]

use cascade_core::limits::Limits;
use cascade_core::validity::evaluate;
use cascade_core::view::MemShard;
use cascade_protocol::command::{Command, CreateSession, DeviceBinding, Envelope, SessionMetadata};
use cascade_protocol::ids::{SessionId, UserKey};
use cascade_protocol::outcome::{Applied, Verdict};

pub const HOUR_MS: u64 = 3600 * 1000;

pub fn jkt(n: u8) -> String {
    format!("{}{}", "k".repeat(42), (b'A' + n) as char)
}

pub fn sid(n: u128) -> SessionId {
    SessionId { shard: 0, nonce: n }
}

pub fn user(name: &str) -> UserKey {
    UserKey::new("acme", name)
}

pub fn create(id: u128, u: &str, device: Option<u8>, parent: Option<u128>) -> Command {
    Command::CreateSession(Box::new(CreateSession {
        session_id: sid(id),
        user: user(u),
        client_id: "web".into(),
        device: device.map(|d| DeviceBinding { device_id: format!("dev{d}"), jkt: jkt(d) }),
        aal: 1,
        amr: vec!["pwd".into()],
        ttl_ms: 8 * HOUR_MS,
        idle_timeout_ms: HOUR_MS,
        parent: parent.map(sid),
        refresh_secret_sha256: Some([id as u8; 32]),
        metadata: SessionMetadata::default(),
    }))
}

pub fn run(shard: &mut MemShard, now_ms: u64, cmd: Command) -> Applied {
    cascade_core::apply(shard, &Limits::default(), &Envelope::new(now_ms, cmd))
}

pub fn run_with(shard: &mut MemShard, limits: &Limits, now_ms: u64, cmd: Command) -> Applied {
    cascade_core::apply(shard, limits, &Envelope::new(now_ms, cmd))
}

/// Check a session presenting the key it is bound to (if any), with no AAL requirement.
pub fn check(shard: &MemShard, id: SessionId, now_ms: u64) -> Verdict {
    let u = shard.user_of(&id);
    let bound = u.and_then(|u| u.sessions.get(&id)).and_then(|s| s.jkt.clone());
    evaluate(&shard.meta, u, &id, bound.as_deref(), 0, now_ms)
}
