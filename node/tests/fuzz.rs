//! Fuzz targets for every decoder that reads untrusted bytes, driven by proptest: random bytes
//! and mutations (overwrite, insert, delete, truncate) of valid encodings. A target fails if
//! anything panics, or (for the live node) if a request gets an internal error or a 5xx instead
//! of a precise refusal.
//!
//! | target | decoder |
//! |---|---|
//! | `protobuf_requests` | prost decoding of every public request, then the id parsers |
//! | `raft_payloads` | prost `RaftMessage`, then bincode append-entries, vote, snapshot chunks and log entries from peers |
//! | `snapshot_bodies` | a snapshot's body as installed from a peer |
//! | `dpop_proofs` | DPoP proof (JWS) parsing and verification |
//! | `http_requests` | the HTTP form parser and forward-auth headers, on a live node |
//! | `grpc_requests` | request validation, on a live node |
//!
//! Bounded: `CASCADE_FUZZ_CASES` cases per target (default: 10,000 to 200,000, a few seconds each);
//! `CASCADE_FUZZ_SEED` picks another deterministic input sequence. Each target prints its count
//! (`cargo test --test fuzz -- --nocapture`).

mod support;

use cascade_protocol::command::{Command, Envelope, Reason, Revocation};
use cascade_protocol::ids::{RefreshToken, SessionId, UserKey};
use cascade_protocol::{codec, pb, raft_pb};
use cascade_raft::sm::SnapshotBody;
use cascade_raft::typ::{CascadeNode, TypeConfig};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, SnapshotMeta, StoredMembership, Vote};
use proptest::prelude::*;
use proptest::strategy::BoxedStrategy;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost::Message;
use std::time::Instant;
use support::dpop::DeviceKey;

fn cases(default: u32) -> u32 {
    std::env::var("CASCADE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runner(cases: u32) -> TestRunner {
    let seed: u64 = std::env::var("CASCADE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 2_000, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

/// Random bytes, or one of `corpus` with a few edits.
fn mutated(corpus: Vec<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    let random = prop::collection::vec(any::<u8>(), 0..512);
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8);
    let mutate = (prop::sample::select(corpus), edits).prop_map(|(mut b, edits)| {
        for (i, byte, op) in edits {
            let n = b.len();
            match op {
                0 if n > 0 => {
                    let j = i.index(n);
                    b[j] = byte;
                }
                1 => b.insert(i.index(n + 1), byte),
                2 if n > 0 => {
                    b.remove(i.index(n));
                }
                3 if n > 0 => b.truncate(i.index(n)),
                _ => {}
            }
        }
        b
    });
    prop_oneof![1 => random, 3 => mutate].boxed()
}

/// Run `target` on `cases` inputs from `strategy`; panics (with the shrunk input) on failure.
fn fuzz<T: std::fmt::Debug>(name: &str, cases: u32, strategy: BoxedStrategy<T>, target: impl Fn(T)) {
    let start = Instant::now();
    runner(cases)
        .run(&strategy, |input| {
            target(input);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("fuzz target {name} failed: {e}"));
    println!("fuzz target {name}: {cases} executions in {:.1?}", start.elapsed());
}

fn sample_requests() -> Vec<Vec<u8>> {
    let sid = SessionId { shard: 3, nonce: 0x1234_5678_9abc_def0 }.to_string();
    vec![
        pb::CheckSessionRequest {
            session_id: sid.clone(),
            jkt: "a".repeat(43),
            required_aal: 2,
            linearizable: true,
        }
        .encode_to_vec(),
        pb::CheckSessionBatchRequest {
            checks: vec![pb::CheckSessionRequest { session_id: sid.clone(), ..Default::default() }; 3],
        }
        .encode_to_vec(),
        support::create_req("acme", "alice", "web").encode_to_vec(),
        pb::RevokeSessionRequest {
            session_id: sid.clone(),
            revocation: Some(pb::Revocation { reason: 3, text: "t".into(), actor: "a".into() }),
        }
        .encode_to_vec(),
        pb::WatchRevocationsRequest {
            cursors: vec![pb::ShardCursor { shard: 1, index: 9 }],
            shards: vec![0, 1, 2],
        }
        .encode_to_vec(),
        pb::SetWatermarkRequest { tenant: "acme".into(), scope: 1, ..Default::default() }.encode_to_vec(),
        pb::StartRevokeJobRequest { dry_run: true, ..Default::default() }.encode_to_vec(),
        pb::RotateRefreshTokenRequest {
            refresh_token: format!("rt_0003{:032x}_00000001_{:032x}", 1u128, 2u128),
        }
        .encode_to_vec(),
    ]
}

#[test]
fn protobuf_requests() {
    fuzz("protobuf_requests", cases(200_000), mutated(sample_requests()), |bytes| {
        if let Ok(r) = pb::CheckSessionRequest::decode(bytes.as_slice()) {
            let _ = r.session_id.parse::<SessionId>();
            let _ = r.session_id.parse::<RefreshToken>();
        }
        let _ = pb::CheckSessionBatchRequest::decode(bytes.as_slice());
        let _ = pb::CreateSessionRequest::decode(bytes.as_slice());
        let _ = pb::RevokeSessionRequest::decode(bytes.as_slice());
        let _ = pb::WatchRevocationsRequest::decode(bytes.as_slice());
        let _ = pb::SetWatermarkRequest::decode(bytes.as_slice());
        let _ = pb::StartRevokeJobRequest::decode(bytes.as_slice());
        let _ = pb::RevokeListRequest::decode(bytes.as_slice());
        if let Ok(r) = pb::RotateRefreshTokenRequest::decode(bytes.as_slice()) {
            let _ = r.refresh_token.parse::<RefreshToken>();
        }
    });
}

fn envelope() -> Envelope {
    let revocation = Revocation { reason: Reason::Admin, text: "fuzz".into(), actor: "fuzz".into() };
    Envelope::new(1_767_225_600_000, Command::RevokeUser { user: UserKey::new("acme", "alice"), revocation })
}

fn raft_samples() -> Vec<Vec<u8>> {
    let log_id = LogId::new(CommittedLeaderId::new(3, 1), 7);
    let entry = Entry::<TypeConfig> { log_id, payload: EntryPayload::Normal(envelope()) };
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 6)),
        entries: vec![entry.clone(), entry],
        leader_commit: Some(log_id),
    };
    let vote = VoteRequest::new(Vote::new(4, 2), Some(log_id));
    let snapshot = InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(3, 1),
        meta: SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: StoredMembership::default(),
            snapshot_id: "3-1-7".into(),
        },
        offset: 0,
        data: vec![1, 2, 3, 4],
        done: true,
    };
    let header = (snapshot.vote, snapshot.meta.clone());
    let encode = |v: &dyn erased::Encode| v.bytes();
    vec![encode(&append), encode(&vote), encode(&snapshot), encode(&header), encode(&envelope())]
}

/// Object-safe encoding of the samples' different types.
mod erased {
    pub trait Encode {
        fn bytes(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn bytes(&self) -> Vec<u8> {
            cascade_protocol::codec::encode(self).expect("encode sample")
        }
    }
}

#[test]
fn raft_payloads() {
    let mut corpus = raft_samples();
    let framed: Vec<Vec<u8>> = corpus
        .iter()
        .map(|p| raft_pb::RaftMessage { shard: 1, payload: p.clone() }.encode_to_vec())
        .collect();
    let batch = raft_pb::RaftBatch {
        messages: corpus.iter().map(|p| raft_pb::RaftMessage { shard: 2, payload: p.clone() }).collect(),
    };
    corpus.extend(framed);
    corpus.push(batch.encode_to_vec());
    fuzz("raft_payloads", cases(200_000), mutated(corpus), |bytes| {
        if let Ok(m) = raft_pb::RaftMessage::decode(bytes.as_slice()) {
            let _ = codec::decode::<AppendEntriesRequest<TypeConfig>>(&m.payload);
        }
        if let Ok(b) = raft_pb::RaftBatch::decode(bytes.as_slice()) {
            for m in &b.messages {
                let _ = codec::decode::<AppendEntriesRequest<TypeConfig>>(&m.payload);
            }
        }
        let _ = codec::decode::<AppendEntriesRequest<TypeConfig>>(&bytes);
        let _ = codec::decode::<VoteRequest<u64>>(&bytes);
        let _ = codec::decode::<InstallSnapshotRequest<TypeConfig>>(&bytes);
        let _ = codec::decode::<(Vote<u64>, SnapshotMeta<u64, CascadeNode>)>(&bytes);
        let _ = codec::decode_envelope(&bytes);
    });
}

#[test]
fn snapshot_bodies() {
    let mut user = cascade_core::model::UserState::new(UserKey::new("acme", "alice"));
    user.watermark_ms = 5;
    let body = (
        cascade_core::model::ShardMeta::default(),
        vec![user],
        Vec::<cascade_protocol::job::Job>::new(),
        Vec::<(u64, u32, cascade_protocol::job::AuditRecord)>::new(),
    );
    let sample = codec::encode(&body).expect("encode");
    assert_eq!(SnapshotBody::decode(&sample).expect("a valid body decodes").users(), 1);
    fuzz("snapshot_bodies", cases(200_000), mutated(vec![sample]), |bytes| {
        let _ = SnapshotBody::decode(&bytes);
    });
}

#[test]
fn dpop_proofs() {
    let key = DeviceKey::new(9);
    let token = SessionId { shard: 1, nonce: 77 }.to_string();
    let url = "https://app.example/orders";
    let now_s = 1_767_225_600;
    let proof = key.proof("GET", url, &token, now_s, "j1");
    let request = cascade_dpop::Request { method: "GET", url, access_token: Some(&token) };
    let policy = cascade_dpop::Policy::default();
    assert!(cascade_dpop::verify(&proof, &request, now_s * 1000, &policy).is_ok(), "the sample is valid");
    fuzz("dpop_proofs", cases(100_000), mutated(vec![proof.clone().into_bytes()]), |bytes| {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(v) = cascade_dpop::verify(&text, &request, now_s * 1000, &policy) {
            // Only the untouched proof may verify (base64url has one encoding per value).
            assert_eq!(text, proof, "a changed proof verified as {v:?}");
        }
    });
}

/// Printable ASCII (and spaces): what an HTTP header value may hold.
fn header_value() -> BoxedStrategy<String> {
    prop_oneof![
        "[ -~]{0,80}",
        Just("Bearer cs_0001000000000000000000000000000000aa".to_owned()),
        Just("DPoP cs_0001000000000000000000000000000000aa".to_owned()),
    ]
    .boxed()
}

#[test]
fn http_requests() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let node = rt.block_on(support::TestNode::start_with(|c| {
        c.http_listen = Some("127.0.0.1:0".parse().expect("addr"))
    }));
    let http = node.node.config.http_listen.expect("HTTP address");
    let paths = prop::sample::select(vec!["/oauth2/introspect", "/oauth2/revoke", "/forward-auth"]);
    let content_types =
        prop::sample::select(vec!["application/x-www-form-urlencoded", "application/json", ""]);
    let strategy =
        (paths, content_types, "\\PC{0,200}", header_value(), header_value(), "[ -~]{0,6}").boxed();
    fuzz("http_requests", cases(10_000), strategy, |(path, content_type, body, authorization, dpop, aal)| {
        let mut headers = vec![("Authorization", authorization.as_str()), ("DPoP", dpop.as_str())];
        headers.push(("X-Cascade-Required-Aal", aal.as_str()));
        headers.push(("X-Forwarded-Method", "GET"));
        headers.push(("X-Forwarded-Proto", "https"));
        headers.push(("X-Forwarded-Host", "app.example"));
        headers.push(("X-Forwarded-Uri", "/orders"));
        if !content_type.is_empty() {
            headers.push(("Content-Type", content_type));
        }
        let a = rt.block_on(support::http::request(http, "POST", path, &headers, &body));
        assert!(a.status < 500, "{path} answered {} to body {body:?} headers {headers:?}: {a:?}", a.status);
    });
    let a = rt.block_on(support::http::request(http, "GET", "/healthz", &[], ""));
    assert_eq!(a.status, 200, "the node still serves");
    drop(node);
}

#[test]
fn grpc_requests() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let node = rt.block_on(support::TestNode::start());
    let client = node.client.clone();
    let text = || prop_oneof!["\\PC{0,40}", "[a-z0-9_]{1,12}", Just(String::new())].boxed();
    let strategy = (text(), text(), text(), text(), text(), 0u32..6, any::<u64>(), 0u8..3).boxed();
    fuzz("grpc_requests", cases(10_000), strategy, |(a, b, c, d, e, n, ms, which)| {
        let mut client = client.clone();
        let status = rt.block_on(async {
            match which {
                0 => client
                    .check_session(pb::CheckSessionRequest {
                        session_id: a,
                        jkt: b,
                        required_aal: n,
                        linearizable: false,
                    })
                    .await
                    .map(|_| ()),
                1 => client
                    .create_session(pb::CreateSessionRequest {
                        tenant: a,
                        user_id: b,
                        client_id: c,
                        device_id: d,
                        jkt: e,
                        aal: n,
                        ttl_ms: ms,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
                _ => client
                    .start_revoke_job(pb::StartRevokeJobRequest {
                        dry_run: true,
                        selector: Some(pb::SessionSelector {
                            tenant: a,
                            client_id: b,
                            user_id: c,
                            device_id: d,
                            ip_prefix: e,
                            region: String::new(),
                            aal_below: n,
                            created_before_ms: ms,
                        }),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            }
        });
        if let Err(s) = status {
            assert!(
                !matches!(s.code(), tonic::Code::Internal | tonic::Code::Unknown),
                "request {which} got {:?}: {}",
                s.code(),
                s.message()
            );
        }
    });
    drop(node);
}
