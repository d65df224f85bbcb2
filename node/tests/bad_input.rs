//! Hostile and careless input for every RPC: empty, oversized (limit + 1) and malformed fields must
//! give INVALID_ARGUMENT with a message naming the field, never a panic or a different code, and
//! the node must keep answering afterwards.

mod support;

use cascade_protocol::limits::{
    ACTOR_LEN_MAX, AMR_LEN_MAX, AMR_VALUES_MAX, CHECK_BATCH_LEN_MAX, ID_LEN_MAX, IP_LEN_MAX, REGION_LEN_MAX,
    TENANT_LEN_MAX, TEXT_LEN_MAX, TTL_MS_MAX, USER_AGENT_LEN_MAX,
};
use cascade_protocol::pb;
use support::*;

const TENANT: &str = "acme";

/// Malformed session ids, each with what is wrong with it.
fn bad_session_ids() -> Vec<(&'static str, String)> {
    let hex36 = "0".repeat(36);
    vec![
        ("empty", String::new()),
        ("prefix only", "cs_".to_owned()),
        ("35 hex digits", format!("cs_{}", "0".repeat(35))),
        ("37 hex digits (oversized)", format!("cs_{}", "0".repeat(37))),
        ("uppercase hex", format!("cs_{}", "A".repeat(36))),
        ("non-hex digit", format!("cs_{}g", "0".repeat(35))),
        ("wrong prefix", format!("xx_{hex36}")),
        ("no prefix", hex36.clone()),
        ("refresh token instead", format!("rt_{hex36}_00000001_{}", "0".repeat(32))),
        ("trailing space", format!("cs_{hex36} ")),
        ("one megabyte", format!("cs_{}", "0".repeat(1 << 20))),
        ("non-ASCII", format!("cs_{}é", "0".repeat(34))),
    ]
}

/// Malformed refresh tokens, each with what is wrong with it.
fn bad_refresh_tokens() -> Vec<(&'static str, String)> {
    let (sid, generation, secret) = ("0".repeat(36), "00000001", "0".repeat(32));
    vec![
        ("empty", String::new()),
        ("prefix only", "rt_".to_owned()),
        ("missing secret", format!("rt_{sid}_{generation}")),
        ("extra part", format!("rt_{sid}_{generation}_{secret}_00")),
        ("short session part", format!("rt_{}_{generation}_{secret}", "0".repeat(35))),
        ("7-digit generation", format!("rt_{sid}_0000001_{secret}")),
        ("31-digit secret", format!("rt_{sid}_{generation}_{}", "0".repeat(31))),
        ("33-digit secret (oversized)", format!("rt_{sid}_{generation}_{}", "0".repeat(33))),
        ("uppercase secret", format!("rt_{sid}_{generation}_{}", "A".repeat(32))),
        ("session id instead", format!("cs_{sid}")),
        ("wrong prefix", format!("xx_{sid}_{generation}_{secret}")),
        ("one megabyte", format!("rt_{sid}_{generation}_{}", "0".repeat(1 << 20))),
        ("multi-byte characters in the generation", format!("rt_{sid}_0éé000_{secret}")),
    ]
}

/// A session id of the right length (36 bytes after `cs_`) whose byte 4 falls inside a UTF-8
/// character, so code that slices the shard digits by byte index panics instead of refusing it.
fn straddling_session_id() -> String {
    let id = format!("cs_0éé{}", "0".repeat(31));
    assert_eq!(id.len(), 3 + 36);
    id
}

/// The same trap inside a refresh token's session part.
fn straddling_refresh_token() -> String {
    format!("rt_0éé{}_00000001_{}", "0".repeat(31), "0".repeat(32))
}

/// Malformed key thumbprints (an empty one means "no key" where a jkt is optional).
fn bad_jkts() -> Vec<(&'static str, String)> {
    vec![
        ("42 characters", "A".repeat(42)),
        ("44 characters (oversized)", "A".repeat(44)),
        ("padding", format!("{}=", "A".repeat(42))),
        ("standard base64 '+'", format!("{}+", "A".repeat(42))),
        ("standard base64 '/'", format!("{}/", "A".repeat(42))),
        ("space", format!("{} ", "A".repeat(42))),
        ("non-ASCII", format!("{}é", "A".repeat(41))),
    ]
}

/// Identifiers that break `check_id` for a limit of `max` bytes.
fn bad_ids(max: usize) -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("limit + 1", "a".repeat(max + 1)),
        ("space", "a b".to_owned()),
        ("slash", "a/b".to_owned()),
        ("control character", "a\nb".to_owned()),
        ("non-ASCII", "é".to_owned()),
    ]
}

/// The node still serves reads and writes after the abuse.
async fn assert_still_serving(client: &mut Client) {
    let status = client.node_status(pb::NodeStatusRequest {}).await.expect("node status after bad input");
    assert_eq!(status.into_inner().n_shards, u32::from(SHARDS));
    let created = create(client, create_req(TENANT, "survivor", "web")).await;
    assert_valid(&check(client, &created.session_id).await, "session created after bad input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_session_refuses_every_bad_field() {
    // Protects the INVALID_ARGUMENT contract of CreateSession (protocol limits) and that nothing panics.
    let mut t = TestNode::start().await;
    let base = || create_req(TENANT, "alice", "web");
    let key = jkt("alice key");
    let mut cases: Vec<(String, pb::CreateSessionRequest, &str)> = Vec::new();

    for (what, v) in bad_ids(TENANT_LEN_MAX) {
        let mut r = base();
        r.tenant = v;
        cases.push((format!("tenant {what}"), r, "tenant"));
    }
    for (what, v) in bad_ids(ID_LEN_MAX) {
        let mut r = base();
        r.user_id = v.clone();
        cases.push((format!("user_id {what}"), r, "user_id"));
        let mut r = base();
        r.client_id = v.clone();
        cases.push((format!("client_id {what}"), r, "client_id"));
        if !v.is_empty() {
            // An empty device id with a key is covered below.
            cases.push((format!("device_id {what}"), bound(base(), &v, &key), "device_id"));
        }
    }
    for (what, v) in bad_jkts() {
        cases.push((format!("jkt {what}"), bound(base(), "phone", &v), "jkt"));
    }
    cases.push(("device_id without jkt".into(), bound(base(), "phone", ""), "jkt"));
    cases.push(("jkt without device_id".into(), bound(base(), "", &key), "device_id"));
    for aal in [0, 4, 256 + 1] {
        let mut r = base();
        r.aal = aal;
        cases.push((format!("aal {aal}"), r, "aal"));
    }
    let mut r = base();
    r.amr = (0..=AMR_VALUES_MAX).map(|i| format!("m{i}")).collect();
    cases.push((format!("{} amr values", AMR_VALUES_MAX + 1), r, "amr"));
    let mut r = base();
    r.amr = vec!["a".repeat(AMR_LEN_MAX + 1)];
    cases.push(("amr value of limit + 1 bytes".into(), r, "amr"));
    let mut r = base();
    r.ttl_ms = 0;
    cases.push(("ttl 0".into(), r, "ttl_ms"));
    let mut r = base();
    r.ttl_ms = TTL_MS_MAX + 1;
    cases.push(("ttl over a year".into(), r, "ttl_ms"));
    let mut r = base();
    r.ttl_ms = u64::MAX;
    cases.push(("ttl u64::MAX".into(), r, "ttl_ms"));
    for (what, v) in bad_session_ids() {
        if v.is_empty() {
            continue; // an empty parent means a root session
        }
        cases.push((format!("parent_session_id {what}"), child_of(base(), &v), "parent_session_id"));
    }
    let metadata = |ip: usize, ua: usize, region: usize| {
        Some(pb::SessionMetadata {
            ip: "1".repeat(ip),
            user_agent: "u".repeat(ua),
            region: "r".repeat(region),
        })
    };
    let mut r = base();
    r.metadata = metadata(IP_LEN_MAX + 1, 1, 1);
    cases.push(("ip of limit + 1 bytes".into(), r, "ip"));
    let mut r = base();
    r.metadata = metadata(1, USER_AGENT_LEN_MAX + 1, 1);
    cases.push(("user_agent of limit + 1 bytes".into(), r, "user_agent"));
    let mut r = base();
    r.metadata = metadata(1, 1, REGION_LEN_MAX + 1);
    cases.push(("region of limit + 1 bytes".into(), r, "region"));

    for (what, req, field) in cases {
        expect_invalid(t.client.create_session(req).await, field, &format!("CreateSession, {what}"));
    }

    // The limits themselves are accepted: the boundary is exact.
    let mut r = create_req(&"t".repeat(TENANT_LEN_MAX), &"u".repeat(ID_LEN_MAX), &"c".repeat(ID_LEN_MAX));
    r.device_id = "d".repeat(ID_LEN_MAX);
    r.jkt = key.clone();
    r.aal = 3;
    r.amr = (0..AMR_VALUES_MAX).map(|i| format!("{i}{}", "m".repeat(AMR_LEN_MAX - 1))).collect();
    r.ttl_ms = TTL_MS_MAX;
    r.metadata = Some(pb::SessionMetadata {
        ip: "2001:db8::1".into(),
        user_agent: "u".repeat(USER_AGENT_LEN_MAX),
        region: "r".repeat(REGION_LEN_MAX),
    });
    let created = create(&mut t.client, r).await;
    assert_valid(&check_with(&mut t.client, &created.session_id, &key, 3).await, "session at every limit");

    assert_still_serving(&mut t.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_session_refuses_malformed_input() {
    // Protects the gateway path: malformed ids, keys and aal are INVALID_ARGUMENT, never UNKNOWN or a panic.
    let mut t = TestNode::start().await;
    let created = create(&mut t.client, create_req(TENANT, "bob", "web")).await;
    for (what, sid) in bad_session_ids() {
        expect_invalid(
            t.client.check_session(check_req(&sid, "", 0)).await,
            "session_id",
            &format!("CheckSession, session_id {what}"),
        );
    }
    for (what, key) in bad_jkts() {
        expect_invalid(
            t.client.check_session(check_req(&created.session_id, &key, 0)).await,
            "jkt",
            &format!("CheckSession, jkt {what}"),
        );
    }
    for aal in [4, 256 + 1, u32::MAX] {
        expect_invalid(
            t.client.check_session(check_req(&created.session_id, "", aal)).await,
            "required_aal",
            &format!("CheckSession, required_aal {aal}"),
        );
    }
    assert_still_serving(&mut t.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_batch_refuses_oversized_and_malformed_batches() {
    // Protects P6 (CHECK_BATCH_LEN_MAX) and the per-element validation of CheckSessionBatch.
    let mut t = TestNode::start().await;
    let created = create(&mut t.client, create_req(TENANT, "carol", "web")).await;
    let good = check_req(&created.session_id, "", 0);

    let over = vec![good.clone(); CHECK_BATCH_LEN_MAX + 1];
    expect_invalid(
        t.client.check_session_batch(pb::CheckSessionBatchRequest { checks: over }).await,
        "checks",
        "CheckSessionBatch of 257",
    );
    // Well under the 4 MiB gRPC message limit, so the node's own bound must refuse it.
    let huge = vec![good.clone(); 10_000];
    expect_invalid(
        t.client.check_session_batch(pb::CheckSessionBatchRequest { checks: huge }).await,
        "checks",
        "CheckSessionBatch of 10000",
    );
    for (what, sid) in bad_session_ids().into_iter().filter(|(_, s)| s.len() < 1 << 16) {
        let checks = vec![good.clone(), check_req(&sid, "", 0), good.clone()];
        expect_invalid(
            t.client.check_session_batch(pb::CheckSessionBatchRequest { checks }).await,
            "session_id",
            &format!("CheckSessionBatch, element session_id {what}"),
        );
    }
    for (what, key) in bad_jkts() {
        let checks = vec![good.clone(), check_req(&created.session_id, &key, 0)];
        expect_invalid(
            t.client.check_session_batch(pb::CheckSessionBatchRequest { checks }).await,
            "jkt",
            &format!("CheckSessionBatch, element jkt {what}"),
        );
    }
    let checks = vec![check_req(&created.session_id, "", 4), good.clone()];
    expect_invalid(
        t.client.check_session_batch(pb::CheckSessionBatchRequest { checks }).await,
        "required_aal",
        "CheckSessionBatch, element required_aal 4",
    );
    assert_still_serving(&mut t.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_step_up_and_rotate_refuse_malformed_input() {
    // Protects the write path of TouchSession, StepUpSession and RotateRefreshToken against bad input.
    let mut t = TestNode::start().await;
    let created = create(&mut t.client, with_refresh(create_req(TENANT, "dave", "web"))).await;
    let sid = created.session_id.clone();

    for (what, bad) in bad_session_ids() {
        expect_invalid(
            t.client.touch_session(pb::TouchSessionRequest { session_id: bad.clone() }).await,
            "session_id",
            &format!("TouchSession, session_id {what}"),
        );
        expect_invalid(
            t.client
                .step_up_session(pb::StepUpSessionRequest {
                    session_id: bad,
                    aal: 2,
                    amr: vec!["otp".into()],
                })
                .await,
            "session_id",
            &format!("StepUpSession, session_id {what}"),
        );
    }
    for aal in [0, 4, u32::MAX] {
        expect_invalid(
            t.client
                .step_up_session(pb::StepUpSessionRequest {
                    session_id: sid.clone(),
                    aal,
                    amr: vec!["otp".into()],
                })
                .await,
            "aal",
            &format!("StepUpSession, aal {aal}"),
        );
    }
    let too_many: Vec<String> = (0..=AMR_VALUES_MAX).map(|i| format!("m{i}")).collect();
    expect_invalid(
        t.client
            .step_up_session(pb::StepUpSessionRequest { session_id: sid.clone(), aal: 2, amr: too_many })
            .await,
        "amr",
        "StepUpSession, 9 amr values",
    );
    expect_invalid(
        t.client
            .step_up_session(pb::StepUpSessionRequest {
                session_id: sid.clone(),
                aal: 2,
                amr: vec!["a".repeat(AMR_LEN_MAX + 1)],
            })
            .await,
        "amr",
        "StepUpSession, amr value of limit + 1 bytes",
    );

    for (what, token) in bad_refresh_tokens() {
        expect_invalid(
            t.client.rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: token }).await,
            "refresh_token",
            &format!("RotateRefreshToken, {what}"),
        );
    }

    // None of that touched the session or its refresh family.
    let resp = check(&mut t.client, &sid).await;
    assert_valid(&resp, "session after bad input");
    assert_eq!(resp.aal, 1);
    let rotated = t
        .client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: created.refresh_token })
        .await
        .expect("the real token still rotates")
        .into_inner();
    assert_eq!(rotated.generation, 2);
    assert!(!rotated.reuse_detected);
    assert_still_serving(&mut t.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_revoke_by_user_refuse_bad_identifiers() {
    // Protects ListUserSessions, RevokeDevice and RevokeUser against empty, oversized and malformed ids.
    let mut t = TestNode::start().await;
    let key = jkt("erin phone");
    let sid = create(&mut t.client, bound(create_req(TENANT, "erin", "web"), "phone", &key)).await.session_id;
    let list = |tenant: &str, user_id: &str| pb::ListUserSessionsRequest {
        tenant: tenant.into(),
        user_id: user_id.into(),
    };
    let device = |tenant: &str, user_id: &str, device_id: &str| pb::RevokeDeviceRequest {
        tenant: tenant.into(),
        user_id: user_id.into(),
        device_id: device_id.into(),
        revocation: revocation(pb::ReasonCode::Admin),
    };
    let user = |tenant: &str, user_id: &str| pb::RevokeUserRequest {
        tenant: tenant.into(),
        user_id: user_id.into(),
        revocation: revocation(pb::ReasonCode::Admin),
    };

    for (what, v) in bad_ids(TENANT_LEN_MAX) {
        let ctx = format!("tenant {what}");
        expect_invalid(
            t.client.list_user_sessions(list(&v, "erin")).await,
            "tenant",
            &format!("List, {ctx}"),
        );
        expect_invalid(
            t.client.revoke_device(device(&v, "erin", "phone")).await,
            "tenant",
            &format!("RevokeDevice, {ctx}"),
        );
        expect_invalid(t.client.revoke_user(user(&v, "erin")).await, "tenant", &format!("RevokeUser, {ctx}"));
    }
    for (what, v) in bad_ids(ID_LEN_MAX) {
        let ctx = format!("user_id {what}");
        expect_invalid(
            t.client.list_user_sessions(list(TENANT, &v)).await,
            "user_id",
            &format!("List, {ctx}"),
        );
        expect_invalid(
            t.client.revoke_device(device(TENANT, &v, "phone")).await,
            "user_id",
            &format!("RevokeDevice, {ctx}"),
        );
        expect_invalid(
            t.client.revoke_user(user(TENANT, &v)).await,
            "user_id",
            &format!("RevokeUser, {ctx}"),
        );
        expect_invalid(
            t.client.revoke_device(device(TENANT, "erin", &v)).await,
            "device_id",
            &format!("RevokeDevice, device_id {what}"),
        );
    }
    assert_valid(&check_with(&mut t.client, &sid, &key, 0).await, "nothing was revoked by bad input");
    assert_still_serving(&mut t.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_refuse_bad_ids_and_bad_revocation_records() {
    // Protects RevokeSession, RevokeFamily and the audit record limits (TEXT_LEN_MAX, ACTOR_LEN_MAX).
    let mut t = TestNode::start().await;
    let created = create(&mut t.client, with_refresh(create_req(TENANT, "frank", "web"))).await;
    let sid = created.session_id.clone();

    for (what, bad) in bad_session_ids() {
        expect_invalid(
            t.client
                .revoke_session(pb::RevokeSessionRequest {
                    session_id: bad.clone(),
                    revocation: revocation(pb::ReasonCode::Logout),
                })
                .await,
            "session_id",
            &format!("RevokeSession, session_id {what}"),
        );
        expect_invalid(
            t.client
                .revoke_family(pb::RevokeFamilyRequest {
                    session_id: bad,
                    revocation: revocation(pb::ReasonCode::Logout),
                })
                .await,
            "session_id",
            &format!("RevokeFamily, session_id {what}"),
        );
    }

    let record = |reason: i32, text: String, actor: String| Some(pb::Revocation { reason, text, actor });
    let bad_records = vec![
        (
            "text of limit + 1 bytes",
            record(pb::ReasonCode::Logout as i32, "x".repeat(TEXT_LEN_MAX + 1), "a".into()),
            "text",
        ),
        (
            "text with a control character",
            record(pb::ReasonCode::Logout as i32, "a\u{0}b".into(), "a".into()),
            "text",
        ),
        (
            "actor of limit + 1 bytes",
            record(pb::ReasonCode::Logout as i32, "t".into(), "a".repeat(ACTOR_LEN_MAX + 1)),
            "actor",
        ),
        (
            "actor with a control character",
            record(pb::ReasonCode::Logout as i32, "t".into(), "a\nb".into()),
            "actor",
        ),
        ("reason out of range", record(99, "t".into(), "a".into()), "reason"),
        ("negative reason", record(-1, "t".into(), "a".into()), "reason"),
    ];
    for (what, rec, field) in &bad_records {
        expect_invalid(
            t.client
                .revoke_session(pb::RevokeSessionRequest { session_id: sid.clone(), revocation: rec.clone() })
                .await,
            field,
            &format!("RevokeSession, {what}"),
        );
        expect_invalid(
            t.client
                .revoke_family(pb::RevokeFamilyRequest { session_id: sid.clone(), revocation: rec.clone() })
                .await,
            field,
            &format!("RevokeFamily, {what}"),
        );
        expect_invalid(
            t.client
                .revoke_user(pb::RevokeUserRequest {
                    tenant: TENANT.into(),
                    user_id: "frank".into(),
                    revocation: rec.clone(),
                })
                .await,
            field,
            &format!("RevokeUser, {what}"),
        );
        expect_invalid(
            t.client
                .set_watermark(pb::SetWatermarkRequest {
                    scope: pb::WatermarkScope::Tenant as i32,
                    tenant: TENANT.into(),
                    revocation: rec.clone(),
                    ..Default::default()
                })
                .await,
            field,
            &format!("SetWatermark, {what}"),
        );
    }

    // The records at their limits are accepted.
    let at_limit = record(pb::ReasonCode::Admin as i32, "x".repeat(TEXT_LEN_MAX), "a".repeat(ACTOR_LEN_MAX));
    let revoked = t
        .client
        .revoke_session(pb::RevokeSessionRequest { session_id: sid.clone(), revocation: at_limit })
        .await
        .expect("revocation record at the limits")
        .into_inner();
    assert_eq!(revoked.revoked_session_ids, vec![sid.clone()]);
    assert_revoked(&check(&mut t.client, &sid).await, pb::ReasonCode::Admin, "revoked at the limits");
    assert_still_serving(&mut t.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_watermark_refuses_bad_scopes_and_ids() {
    // Protects SetWatermark: a mass revocation with a bad selector must be refused, never widened.
    let mut t = TestNode::start().await;
    let key = jkt("gina phone");
    let sid = create(&mut t.client, bound(create_req(TENANT, "gina", "app"), "phone", &key)).await.session_id;
    let req =
        |scope: i32, tenant: &str, client_id: &str, user_id: &str, device_id: &str| pb::SetWatermarkRequest {
            scope,
            tenant: tenant.into(),
            client_id: client_id.into(),
            user_id: user_id.into(),
            device_id: device_id.into(),
            not_before_ms: 0,
            revocation: revocation(pb::ReasonCode::Policy),
        };
    let (tenant, client, user, device) = (
        pb::WatermarkScope::Tenant as i32,
        pb::WatermarkScope::Client as i32,
        pb::WatermarkScope::User as i32,
        pb::WatermarkScope::Device as i32,
    );

    for scope in [pb::WatermarkScope::Unspecified as i32, 5, 99, -1] {
        expect_invalid(
            t.client.set_watermark(req(scope, TENANT, "app", "gina", "phone")).await,
            "scope",
            &format!("SetWatermark, scope {scope}"),
        );
    }
    for (what, v) in bad_ids(TENANT_LEN_MAX) {
        for scope in [tenant, client, user, device] {
            expect_invalid(
                t.client.set_watermark(req(scope, &v, "app", "gina", "phone")).await,
                "tenant",
                &format!("SetWatermark scope {scope}, tenant {what}"),
            );
        }
    }
    for (what, v) in bad_ids(ID_LEN_MAX) {
        expect_invalid(
            t.client.set_watermark(req(client, TENANT, &v, "", "")).await,
            "client_id",
            &format!("SetWatermark CLIENT, client_id {what}"),
        );
        expect_invalid(
            t.client.set_watermark(req(user, TENANT, "", &v, "")).await,
            "user_id",
            &format!("SetWatermark USER, user_id {what}"),
        );
        expect_invalid(
            t.client.set_watermark(req(device, TENANT, "", &v, "phone")).await,
            "user_id",
            &format!("SetWatermark DEVICE, user_id {what}"),
        );
        expect_invalid(
            t.client.set_watermark(req(device, TENANT, "", "gina", &v)).await,
            "device_id",
            &format!("SetWatermark DEVICE, device_id {what}"),
        );
    }
    assert_valid(&check_with(&mut t.client, &sid, &key, 0).await, "no watermark moved");
    assert_still_serving(&mut t.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_multi_byte_characters_are_refused_without_a_panic() {
    // Protects "never a panic" on hostile ids: a multi-byte character where the shard digits are sliced.
    let mut t = TestNode::start().await;
    let sid = straddling_session_id();
    let revocation = || revocation(pb::ReasonCode::Logout);
    let mut failures = Vec::new();
    let mut record = |rpc: &str, field: &str, result: Result<(), tonic::Status>| match result {
        Err(s) if s.code() == tonic::Code::InvalidArgument && s.message().contains(field) => {}
        Err(s) => failures.push(format!("{rpc}: {:?} {:?}", s.code(), s.message())),
        Ok(()) => failures.push(format!("{rpc}: OK")),
    };
    let r = t.client.check_session(check_req(&sid, "", 0)).await;
    record("CheckSession", "session_id", r.map(drop));
    let r = t
        .client
        .check_session_batch(pb::CheckSessionBatchRequest { checks: vec![check_req(&sid, "", 0)] })
        .await;
    record("CheckSessionBatch", "session_id", r.map(drop));
    let r = t.client.create_session(child_of(create_req(TENANT, "hugo", "web"), &sid)).await;
    record("CreateSession parent", "parent_session_id", r.map(drop));
    let r = t.client.touch_session(pb::TouchSessionRequest { session_id: sid.clone() }).await;
    record("TouchSession", "session_id", r.map(drop));
    let r = t
        .client
        .step_up_session(pb::StepUpSessionRequest { session_id: sid.clone(), aal: 2, amr: vec![] })
        .await;
    record("StepUpSession", "session_id", r.map(drop));
    let r = t
        .client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: straddling_refresh_token() })
        .await;
    record("RotateRefreshToken", "refresh_token", r.map(drop));
    let r = t
        .client
        .revoke_session(pb::RevokeSessionRequest { session_id: sid.clone(), revocation: revocation() })
        .await;
    record("RevokeSession", "session_id", r.map(drop));
    let r = t
        .client
        .revoke_family(pb::RevokeFamilyRequest { session_id: sid.clone(), revocation: revocation() })
        .await;
    record("RevokeFamily", "session_id", r.map(drop));

    // The node must still serve, whatever happened above; then every refusal must have been clean.
    assert_still_serving(&mut t.client).await;
    assert!(
        failures.is_empty(),
        "not refused with INVALID_ARGUMENT naming the field:\n{}",
        failures.join("\n")
    );
}
