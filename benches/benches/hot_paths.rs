//! Micro-benchmarks of the hot paths (divan): a check's validity evaluation, `apply` of each
//! command kind on an in-memory shard (the replicated state machine's logic, without sled),
//! the log entry codec, and routing (session id parsing, the user → shard hash).
//!
//! ```sh
//! cargo bench -p benches --bench hot_paths
//! ```

use cascade_core::limits::Limits;
use cascade_core::validity::evaluate;
use cascade_core::view::MemShard;
use cascade_protocol::codec;
use cascade_protocol::command::{
    Command, CreateSession, DeviceBinding, Envelope, Reason, Revocation, SessionMetadata, WatermarkScope,
};
use cascade_protocol::ids::{shard_of_user, SessionId, UserKey};
use cascade_protocol::outcome::{Outcome, Verdict};
use divan::{black_box, Bencher};

fn main() {
    divan::main();
}

const NOW_MS: u64 = 1_700_000_000_000;
const HOUR_MS: u64 = 3_600_000;
/// Users of the benchmark shard, and sessions of each.
const USERS: u128 = 200;
const PER_USER: u128 = 4;

fn sid(n: u128) -> SessionId {
    SessionId { shard: 0, nonce: n }
}

fn user(n: u128) -> UserKey {
    UserKey::new("acme", format!("user-{}", n / PER_USER))
}

fn create(n: u128) -> Command {
    Command::CreateSession(Box::new(CreateSession {
        session_id: sid(n),
        user: user(n),
        client_id: "web".into(),
        device: Some(DeviceBinding { device_id: format!("phone-{n}"), jkt: format!("{:043}", n) }),
        aal: 1,
        amr: vec!["pwd".into()],
        ttl_ms: 8 * HOUR_MS,
        idle_timeout_ms: HOUR_MS,
        parent: None,
        refresh_secret_sha256: Some([n as u8; 32]),
        metadata: SessionMetadata {
            ip: "192.0.2.1".into(),
            user_agent: "bench".into(),
            region: "eu-west".into(),
        },
    }))
}

fn revocation() -> Revocation {
    Revocation::new(Reason::Compromised, "bench", "micro-benchmark")
}

/// A shard holding `USERS × PER_USER` sessions.
fn shard() -> MemShard {
    let mut shard = MemShard::default();
    for n in 0..USERS * PER_USER {
        cascade_core::apply(&mut shard, &Limits::default(), &Envelope::new(NOW_MS, create(n)));
    }
    shard
}

#[divan::bench]
fn validity_evaluate(bencher: Bencher) {
    let shard = shard();
    let ids: Vec<(SessionId, String)> =
        (0..USERS * PER_USER).map(|n| (sid(n), format!("{:043}", n))).collect();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 7) % ids.len();
        let (id, jkt) = &ids[i];
        let verdict = evaluate(&shard.meta, shard.user_of(id), id, Some(jkt), 0, NOW_MS + 1);
        debug_assert_eq!(verdict, Verdict::Valid);
        black_box(verdict)
    });
}

/// One command of each kind, on an existing session or user of [`shard`].
fn command(kind: &str) -> Command {
    let s = sid(41);
    match kind {
        "create_session" => create(USERS * PER_USER + 1),
        "touch" => Command::Touch { session_id: s },
        "step_up" => Command::StepUp { session_id: s, aal: 2, amr: vec!["pwd".into(), "otp".into()] },
        "rotate_refresh" => Command::RotateRefresh {
            session_id: s,
            generation: 1,
            secret_sha256: [41; 32],
            new_secret_sha256: [42; 32],
        },
        "revoke_session" => Command::RevokeSession { session_id: s, revocation: revocation() },
        "revoke_device" => {
            Command::RevokeDevice { user: user(41), device_id: "phone-41".into(), revocation: revocation() }
        }
        "revoke_user" => Command::RevokeUser { user: user(41), revocation: revocation() },
        "set_watermark" => Command::SetWatermark {
            scope: WatermarkScope::Tenant { tenant: "acme".into() },
            not_before_ms: NOW_MS,
            revocation: revocation(),
        },
        other => panic!("no such command kind in the benchmark: {other}"),
    }
}

const KINDS: &[&str] = &[
    "create_session",
    "touch",
    "step_up",
    "rotate_refresh",
    "revoke_session",
    "revoke_device",
    "revoke_user",
    "set_watermark",
];

#[divan::bench(args = KINDS)]
fn apply(bencher: Bencher, kind: &str) {
    let base = shard();
    let limits = Limits::default();
    let envelope = Envelope::new(NOW_MS + 1_000, command(kind));
    // The command must do its work, not be refused (a refusal is a different, cheaper path).
    let outcome = cascade_core::apply(&mut base.clone(), &limits, &envelope).outcome;
    assert!(!matches!(outcome, Outcome::Refused(_) | Outcome::Nothing), "{kind}: {outcome:?}");
    // By reference: the shard's copy is made and dropped outside the timed region.
    bencher
        .with_inputs(|| base.clone())
        .bench_local_refs(|shard| black_box(cascade_core::apply(shard, &limits, &envelope)));
}

#[divan::bench(args = ["create_session", "revoke_session"])]
fn codec_encode(bencher: Bencher, kind: &str) {
    let envelope = Envelope::new(NOW_MS, command(kind));
    bencher.bench_local(|| black_box(codec::encode(&envelope).expect("encode")));
}

#[divan::bench(args = ["create_session", "revoke_session"])]
fn codec_decode(bencher: Bencher, kind: &str) {
    let bytes = codec::encode(&Envelope::new(NOW_MS, command(kind))).expect("encode");
    bencher.bench_local(|| black_box(codec::decode_envelope(&bytes).expect("decode")));
}

#[divan::bench]
fn routing_shard_of_user(bencher: Bencher) {
    let users: Vec<String> = (0..1024).map(|n| format!("user-{n}")).collect();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % users.len();
        black_box(shard_of_user("acme", &users[i], 16))
    });
}

#[divan::bench]
fn routing_parse_session_id(bencher: Bencher) {
    let ids: Vec<String> =
        (0..1024u128).map(|n| SessionId { shard: (n % 16) as u16, nonce: n * 7919 }.to_string()).collect();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % ids.len();
        black_box(ids[i].parse::<SessionId>().expect("valid id"))
    });
}
