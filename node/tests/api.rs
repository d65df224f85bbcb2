//! Every operation of the public gRPC API, through a real client against an in-process node on
//! loopback: the answers, the documented status codes, and the semantics of `cascade_core` (SSO
//! cascade, refresh rotation and reuse detection, watermarks, per-user limits) as seen by callers.

mod support;

use cascade_protocol::pb;
use support::*;
use tonic::Code;

const TENANT: &str = "acme";
const WEB: &str = "web";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_unbound_session_then_check_is_valid() {
    // Protects the basic contract: a created session is immediately VALID, with its attributes.
    let mut t = TestNode::start().await;
    let before = now_ms();
    let created = create(&mut t.client, create_req(TENANT, "alice", WEB)).await;
    let after = now_ms();
    assert!(is_session_id(&created.session_id), "session id shape: {}", created.session_id);
    assert!(created.refresh_token.is_empty(), "no refresh token was asked for: {created:?}");
    assert!(created.evicted_session_ids.is_empty(), "{created:?}");
    assert!(
        (before.saturating_sub(1_000)..=after + 1_000).contains(&created.created_at_ms),
        "created_at_ms {} outside [{before}, {after}]",
        created.created_at_ms
    );
    assert_eq!(created.expires_at_ms, created.created_at_ms + HOUR_MS, "absolute expiry = creation + ttl");

    let resp = check(&mut t.client, &created.session_id).await;
    assert_valid(&resp, "fresh session");
    assert_eq!(resp.reason(), pb::ReasonCode::ReasonUnspecified);
    assert_eq!(resp.user_id, "alice");
    assert_eq!(resp.tenant, TENANT);
    assert_eq!(resp.client_id, WEB);
    assert_eq!(resp.aal, 1);
    assert_eq!(resp.expires_at_ms, created.expires_at_ms);
    let freshness = resp.freshness.expect("a check carries its freshness");
    assert_eq!(freshness.node_id, t.node.config.node_id);
    assert!(freshness.applied_index > 0, "the create was applied before the check: {freshness:?}");

    // An unbound session ignores a presented key: binding is what makes the key matter.
    let resp = check_with(&mut t.client, &created.session_id, &jkt("any key"), 1).await;
    assert_valid(&resp, "unbound session with a key presented");

    // Two sessions never share an id.
    let second = create(&mut t.client, create_req(TENANT, "alice", WEB)).await;
    assert_ne!(second.session_id, created.session_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_of_unknown_session_is_unknown_not_an_error() {
    // Protects the documented answer for a well-formed id nobody issued: status UNKNOWN, never an error.
    let mut t = TestNode::start().await;
    for shard in [0u16, 1, 3, 0xffff] {
        let resp = check(&mut t.client, &unknown_session_id(shard)).await;
        assert_eq!(resp.status(), pb::CheckStatus::Unknown, "shard {shard}: {resp:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_session_is_valid_only_with_its_device_key() {
    // Protects device binding (DPoP-style, RFC 9449 jkt): a bound session needs its own key.
    let mut t = TestNode::start().await;
    let key = jkt("laptop key");
    let created = create(&mut t.client, bound(create_req(TENANT, "bob", WEB), "laptop", &key)).await;

    assert_valid(&check_with(&mut t.client, &created.session_id, &key, 0).await, "own key");
    let other = check_with(&mut t.client, &created.session_id, &jkt("stolen key"), 0).await;
    assert_eq!(other.status(), pb::CheckStatus::DeviceMismatch, "{other:?}");
    let none = check_with(&mut t.client, &created.session_id, "", 0).await;
    assert_eq!(none.status(), pb::CheckStatus::DeviceMismatch, "no key presented: {none:?}");

    // The device is listed with its key.
    let list = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "bob".into() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.devices.len(), 1, "{list:?}");
    assert_eq!(list.devices[0].device_id, "laptop");
    assert_eq!(list.devices[0].jkt, key);

    // While the device has a live session, binding it to another key is a conflict.
    let err = t.client.create_session(bound(create_req(TENANT, "bob", WEB), "laptop", &jkt("new key"))).await;
    expect_code(err, Code::FailedPrecondition, "device key mismatch");
    // The same key binds a second session to the device.
    let second = create(&mut t.client, bound(create_req(TENANT, "bob", "mobile"), "laptop", &key)).await;
    assert_valid(&check_with(&mut t.client, &second.session_id, &key, 0).await, "second session, same key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_up_raises_aal_and_refuses_lower_or_equal() {
    // Protects NIST SP 800-63B assurance: STEP_UP_REQUIRED until the session is stepped up, never down.
    let mut t = TestNode::start().await;
    let created = create(&mut t.client, create_req(TENANT, "carol", WEB)).await;
    let sid = created.session_id;

    let resp = check_with(&mut t.client, &sid, "", 2).await;
    assert_eq!(resp.status(), pb::CheckStatus::StepUpRequired, "{resp:?}");
    assert_valid(&check_with(&mut t.client, &sid, "", 1).await, "aal 1 suffices for aal 1");

    let stepped = t
        .client
        .step_up_session(pb::StepUpSessionRequest {
            session_id: sid.clone(),
            aal: 2,
            amr: vec!["pwd".into(), "otp".into()],
        })
        .await
        .expect("step up to 2")
        .into_inner();
    assert_eq!(stepped.aal, 2);
    let resp = check_with(&mut t.client, &sid, "", 2).await;
    assert_valid(&resp, "after step-up");
    assert_eq!(resp.aal, 2);
    assert_eq!(check_with(&mut t.client, &sid, "", 3).await.status(), pb::CheckStatus::StepUpRequired);

    for aal in [1, 2] {
        let err = t
            .client
            .step_up_session(pb::StepUpSessionRequest {
                session_id: sid.clone(),
                aal,
                amr: vec!["pwd".into()],
            })
            .await;
        expect_code(err, Code::FailedPrecondition, &format!("step up from 2 to {aal}"));
    }
    assert_eq!(check(&mut t.client, &sid).await.aal, 2, "a refused step-up leaves the aal alone");

    let err = t
        .client
        .step_up_session(pb::StepUpSessionRequest { session_id: unknown_session_id(1), aal: 3, amr: vec![] })
        .await;
    expect_code(err, Code::NotFound, "step up of an unknown session");

    t.client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: sid.clone(),
            revocation: revocation(pb::ReasonCode::Logout),
        })
        .await
        .expect("revoke");
    let err =
        t.client.step_up_session(pb::StepUpSessionRequest { session_id: sid, aal: 3, amr: vec![] }).await;
    expect_code(err, Code::FailedPrecondition, "step up of a revoked session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expires_at_its_absolute_ttl() {
    // Protects absolute expiry: after ttl_ms a session answers EXPIRED and refuses touches.
    let mut t = TestNode::start().await;
    let mut req = create_req(TENANT, "dave", WEB);
    req.ttl_ms = 3_000;
    let created = create(&mut t.client, req).await;
    assert_eq!(created.expires_at_ms, created.created_at_ms + 3_000);
    assert_valid(&check(&mut t.client, &created.session_id).await, "before expiry");

    let sid = created.session_id.clone();
    let expired = poll_until("the session to expire", STATE_DEADLINE, || {
        let mut client = t.client.clone();
        let sid = sid.clone();
        async move {
            let resp = check(&mut client, &sid).await;
            match resp.status() {
                pb::CheckStatus::Valid => None,
                _ => Some((resp, now_ms())),
            }
        }
    })
    .await;
    assert_eq!(expired.0.status(), pb::CheckStatus::Expired, "{:?}", expired.0);
    assert!(
        expired.1 >= created.expires_at_ms,
        "EXPIRED at {} before expires_at_ms {}",
        expired.1,
        created.expires_at_ms
    );

    let err = t.client.touch_session(pb::TouchSessionRequest { session_id: sid.clone() }).await;
    expect_code(err, Code::FailedPrecondition, "touch of an expired session");
    let err =
        t.client.step_up_session(pb::StepUpSessionRequest { session_id: sid, aal: 2, amr: vec![] }).await;
    expect_code(err, Code::FailedPrecondition, "step up of an expired session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_expires_and_touch_reports_idle_deadline() {
    // Protects idle timeout and touch: touching reports the new idle deadline; an idle session expires.
    let mut t = TestNode::start_with(|c| c.touch_coalesce_ms = 0).await;
    let mut req = create_req(TENANT, "erin", WEB);
    req.idle_timeout_ms = 3_000;
    let created = create(&mut t.client, req).await;
    let sid = created.session_id.clone();

    let before = now_ms();
    let touched = t
        .client
        .touch_session(pb::TouchSessionRequest { session_id: sid.clone() })
        .await
        .expect("touch")
        .into_inner();
    assert!(touched.written, "coalescing is off, so every touch writes: {touched:?}");
    let after = now_ms();
    assert!(
        (before + 3_000..=after + 3_000).contains(&touched.idle_expires_at_ms),
        "idle deadline {} is not the touch time + 3000 ms (touched within [{before}, {after}])",
        touched.idle_expires_at_ms
    );

    let resp = poll_until("the idle session to expire", STATE_DEADLINE, || {
        let mut client = t.client.clone();
        let sid = sid.clone();
        async move {
            let resp = check(&mut client, &sid).await;
            (resp.status() != pb::CheckStatus::Valid).then_some(resp)
        }
    })
    .await;
    assert_eq!(resp.status(), pb::CheckStatus::Expired, "{resp:?}");
    assert!(now_ms() >= touched.idle_expires_at_ms, "expired before its idle deadline");
    let err = t.client.touch_session(pb::TouchSessionRequest { session_id: sid }).await;
    expect_code(err, Code::FailedPrecondition, "touch of an idle-expired session");

    // A session without an idle timeout has no idle deadline.
    let plain = create(&mut t.client, create_req(TENANT, "erin", WEB)).await;
    let touched = t
        .client
        .touch_session(pb::TouchSessionRequest { session_id: plain.session_id })
        .await
        .expect("touch")
        .into_inner();
    assert_eq!(touched.idle_expires_at_ms, 0, "{touched:?}");

    let err = t.client.touch_session(pb::TouchSessionRequest { session_id: unknown_session_id(2) }).await;
    expect_code(err, Code::NotFound, "touch of an unknown session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touches_within_the_coalescing_window_do_not_write() {
    // Protects the design rule "touch is coalesced, not one write per call" (P6 write load).
    let mut t = TestNode::start_with(|c| c.touch_coalesce_ms = 600_000).await;
    let mut req = create_req(TENANT, "frank", WEB);
    req.idle_timeout_ms = HOUR_MS;
    let created = create(&mut t.client, req).await;
    let first = t
        .client
        .touch_session(pb::TouchSessionRequest { session_id: created.session_id.clone() })
        .await
        .expect("first touch")
        .into_inner();
    let second = t
        .client
        .touch_session(pb::TouchSessionRequest { session_id: created.session_id.clone() })
        .await
        .expect("second touch")
        .into_inner();
    assert!(!second.written, "a touch right after another is coalesced: first {first:?}, second {second:?}");
    assert!(second.idle_expires_at_ms > 0, "a coalesced touch still reports the idle deadline: {second:?}");
    assert_valid(&check(&mut t.client, &created.session_id).await, "touched session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_session_cascades_to_sso_descendants() {
    // Protects P3: revoking a session revokes every SSO descendant in the same step, and nothing else.
    let mut t = TestNode::start().await;
    let root = create(&mut t.client, create_req(TENANT, "gina", WEB)).await.session_id;
    let child = create(&mut t.client, child_of(create_req(TENANT, "gina", "mail"), &root)).await.session_id;
    let grandchild =
        create(&mut t.client, child_of(create_req(TENANT, "gina", "docs"), &child)).await.session_id;
    let sibling = create(&mut t.client, create_req(TENANT, "gina", WEB)).await.session_id;
    let other_user = create(&mut t.client, create_req(TENANT, "hank", WEB)).await.session_id;

    let revoked = t
        .client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: root.clone(),
            revocation: revocation(pb::ReasonCode::Logout),
        })
        .await
        .expect("revoke root")
        .into_inner();
    assert_eq!(sorted(&revoked.revoked_session_ids), sorted_ids(&[&root, &child, &grandchild]));
    assert!(revoked.revoked_at_ms > 0);

    assert_revoked(&check(&mut t.client, &root).await, pb::ReasonCode::Logout, "root");
    assert_revoked(&check(&mut t.client, &child).await, pb::ReasonCode::ParentRevoked, "child");
    assert_revoked(&check(&mut t.client, &grandchild).await, pb::ReasonCode::ParentRevoked, "grandchild");
    assert_valid(&check(&mut t.client, &sibling).await, "sibling of the root");
    assert_valid(&check(&mut t.client, &other_user).await, "another user's session");

    // Revoking again is OK and revokes nothing new.
    let again = t
        .client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: root.clone(),
            revocation: revocation(pb::ReasonCode::Admin),
        })
        .await
        .expect("revoke an already revoked session")
        .into_inner();
    assert!(again.revoked_session_ids.is_empty(), "{again:?}");
    assert_revoked(&check(&mut t.client, &root).await, pb::ReasonCode::Logout, "first reason stays");

    // Revoking a descendant of a revoked session is also a no-op.
    let again = t
        .client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: grandchild.clone(),
            revocation: revocation(pb::ReasonCode::Admin),
        })
        .await
        .expect("revoke a revoked child")
        .into_inner();
    assert!(again.revoked_session_ids.is_empty(), "{again:?}");

    let err = t
        .client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: unknown_session_id(0),
            revocation: revocation(pb::ReasonCode::Logout),
        })
        .await;
    expect_code(err, Code::NotFound, "revoke of an unknown session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_child_needs_an_active_parent_of_the_same_user() {
    // Protects the SSO tree: a child hangs off an active parent of its own user and never outlives it.
    let mut t = TestNode::start().await;
    let mut parent_req = create_req(TENANT, "ivan", WEB);
    parent_req.ttl_ms = 10 * 60_000;
    let parent = create(&mut t.client, parent_req).await;
    let child = create(&mut t.client, child_of(create_req(TENANT, "ivan", "mail"), &parent.session_id)).await;
    assert_eq!(child.expires_at_ms, parent.expires_at_ms, "a child never outlives its parent");

    let list = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "ivan".into() })
        .await
        .expect("list")
        .into_inner();
    let listed = list.sessions.iter().find(|s| s.session_id == child.session_id).expect("child listed");
    assert_eq!(listed.parent_session_id, parent.session_id);

    let err =
        t.client.create_session(child_of(create_req(TENANT, "ivan", WEB), &unknown_session_id(0))).await;
    expect_code(err, Code::NotFound, "parent that does not exist");
    let err = t.client.create_session(child_of(create_req(TENANT, "judy", WEB), &parent.session_id)).await;
    expect_code(err, Code::NotFound, "parent of another user");

    t.client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: parent.session_id.clone(),
            revocation: revocation(pb::ReasonCode::Logout),
        })
        .await
        .expect("revoke parent");
    let err = t.client.create_session(child_of(create_req(TENANT, "ivan", WEB), &parent.session_id)).await;
    expect_code(err, Code::FailedPrecondition, "parent not active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotation_and_reuse_detection() {
    // Protects RFC 9700 §4.14.2: rotation issues a new generation; replaying an old one revokes the family.
    let mut t = TestNode::start().await;
    let created = create(&mut t.client, with_refresh(create_req(TENANT, "kate", WEB))).await;
    let sid = created.session_id.clone();
    let gen1 = created.refresh_token.clone();
    assert_eq!(refresh_generation(&gen1), 1, "{gen1}");
    assert_eq!(refresh_session_id(&gen1), sid, "the token names its session");
    let child = create(&mut t.client, child_of(create_req(TENANT, "kate", "mail"), &sid)).await.session_id;

    let r2 = t
        .client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: gen1.clone() })
        .await
        .expect("rotate gen 1")
        .into_inner();
    assert!(!r2.reuse_detected, "{r2:?}");
    assert!(r2.revoked_session_ids.is_empty(), "{r2:?}");
    assert_eq!(r2.generation, 2);
    assert_eq!(refresh_generation(&r2.refresh_token), 2);
    assert_eq!(refresh_session_id(&r2.refresh_token), sid);
    assert_ne!(r2.refresh_token, gen1);

    let r3 = t
        .client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: r2.refresh_token.clone() })
        .await
        .expect("rotate gen 2")
        .into_inner();
    assert_eq!(r3.generation, 3);
    assert!(!r3.reuse_detected);
    assert_valid(&check(&mut t.client, &sid).await, "after rotation");

    // A token of the current generation with the wrong secret is refused, and revokes nothing.
    let forged = format!("{}{}", &r3.refresh_token[..r3.refresh_token.len() - 32], "0".repeat(32));
    assert_ne!(forged, r3.refresh_token);
    let err = t.client.rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: forged }).await;
    expect_code(err, Code::FailedPrecondition, "wrong secret");
    assert_valid(&check(&mut t.client, &sid).await, "after a forged token");

    let list = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "kate".into() })
        .await
        .expect("list")
        .into_inner();
    let listed = list.sessions.iter().find(|s| s.session_id == sid).expect("session listed");
    assert_eq!(listed.refresh_generation, 3, "{listed:?}");

    // Replay of generation 1: reuse, the session and its descendants are revoked.
    let reuse = t
        .client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: gen1 })
        .await
        .expect("reuse is an answer, not an error")
        .into_inner();
    assert!(reuse.reuse_detected, "{reuse:?}");
    assert!(reuse.refresh_token.is_empty(), "no token is issued on reuse: {reuse:?}");
    assert_eq!(sorted(&reuse.revoked_session_ids), sorted_ids(&[&sid, &child]));
    assert_revoked(&check(&mut t.client, &sid).await, pb::ReasonCode::RefreshTokenReuse, "family session");
    assert_revoked(&check(&mut t.client, &child).await, pb::ReasonCode::ParentRevoked, "child of the family");

    // The current token is dead too.
    let err = t
        .client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: r3.refresh_token })
        .await;
    expect_code(err, Code::FailedPrecondition, "rotate on a revoked family");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_refuses_unknown_sessions_and_sessions_without_a_family() {
    // Protects RFC 9700 rotation input handling: tokens for no session or no family are refused.
    let mut t = TestNode::start().await;
    let plain = create(&mut t.client, create_req(TENANT, "liam", WEB)).await.session_id;
    let token_of = |sid: &str| format!("rt_{}_00000001_{}", &sid[3..], "ab".repeat(16));

    let err = t
        .client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: token_of(&plain) })
        .await;
    expect_code(err, Code::FailedPrecondition, "session without a refresh family");
    assert_valid(&check(&mut t.client, &plain).await, "a refused rotation revokes nothing");

    let err = t
        .client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest {
            refresh_token: token_of(&unknown_session_id(1)),
        })
        .await;
    expect_code(err, Code::NotFound, "token of an unknown session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_family_revokes_the_session_and_its_descendants() {
    // Protects P3 for refresh families: revoking the family revokes its session and SSO descendants.
    let mut t = TestNode::start().await;
    let created = create(&mut t.client, with_refresh(create_req(TENANT, "mia", WEB))).await;
    let sid = created.session_id;
    let child = create(&mut t.client, child_of(create_req(TENANT, "mia", "mail"), &sid)).await.session_id;
    let plain = create(&mut t.client, create_req(TENANT, "mia", WEB)).await.session_id;

    let revoked = t
        .client
        .revoke_family(pb::RevokeFamilyRequest {
            session_id: sid.clone(),
            revocation: revocation(pb::ReasonCode::Compromised),
        })
        .await
        .expect("revoke family")
        .into_inner();
    assert_eq!(sorted(&revoked.revoked_session_ids), sorted_ids(&[&sid, &child]));
    assert_revoked(&check(&mut t.client, &sid).await, pb::ReasonCode::Compromised, "family session");
    assert_revoked(&check(&mut t.client, &child).await, pb::ReasonCode::ParentRevoked, "child");
    assert_valid(&check(&mut t.client, &plain).await, "unrelated session");

    let err = t
        .client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: created.refresh_token })
        .await;
    expect_code(err, Code::FailedPrecondition, "rotate on a revoked family");

    let err = t
        .client
        .revoke_family(pb::RevokeFamilyRequest {
            session_id: plain.clone(),
            revocation: revocation(pb::ReasonCode::Compromised),
        })
        .await;
    expect_code(err, Code::FailedPrecondition, "session without a refresh family");
    assert_valid(&check(&mut t.client, &plain).await, "a refused family revocation revokes nothing");

    let err = t
        .client
        .revoke_family(pb::RevokeFamilyRequest {
            session_id: unknown_session_id(3),
            revocation: revocation(pb::ReasonCode::Compromised),
        })
        .await;
    expect_code(err, Code::NotFound, "unknown session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_device_revokes_its_sessions_only() {
    // Protects P3 for devices: one command revokes every session bound to the device, and moves its watermark.
    let mut t = TestNode::start().await;
    let (k1, k2) = (jkt("phone"), jkt("tablet"));
    let p1 = create(&mut t.client, bound(create_req(TENANT, "nora", WEB), "phone", &k1)).await.session_id;
    let p2 = create(&mut t.client, bound(create_req(TENANT, "nora", "mail"), "phone", &k1)).await.session_id;
    // An unbound SSO child of a phone session goes with it.
    let p1_child = create(&mut t.client, child_of(create_req(TENANT, "nora", "docs"), &p1)).await.session_id;
    let tab = create(&mut t.client, bound(create_req(TENANT, "nora", WEB), "tablet", &k2)).await.session_id;
    let unbound = create(&mut t.client, create_req(TENANT, "nora", WEB)).await.session_id;

    let revoked = t
        .client
        .revoke_device(pb::RevokeDeviceRequest {
            tenant: TENANT.into(),
            user_id: "nora".into(),
            device_id: "phone".into(),
            revocation: revocation(pb::ReasonCode::Compromised),
        })
        .await
        .expect("revoke device")
        .into_inner();
    assert_eq!(sorted(&revoked.revoked_session_ids), sorted_ids(&[&p1, &p2, &p1_child]));
    assert_revoked(
        &check_with(&mut t.client, &p1, &k1, 0).await,
        pb::ReasonCode::DeviceRevoked,
        "phone session 1",
    );
    assert_revoked(
        &check_with(&mut t.client, &p2, &k1, 0).await,
        pb::ReasonCode::DeviceRevoked,
        "phone session 2",
    );
    assert_revoked(
        &check(&mut t.client, &p1_child).await,
        pb::ReasonCode::ParentRevoked,
        "child of a phone session",
    );
    assert_valid(&check_with(&mut t.client, &tab, &k2, 0).await, "tablet session");
    assert_valid(&check(&mut t.client, &unbound).await, "unbound session");

    let list = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "nora".into() })
        .await
        .expect("list")
        .into_inner();
    let phone = list.devices.iter().find(|d| d.device_id == "phone").expect("phone listed");
    assert!(phone.watermark_ms >= revoked.revoked_at_ms, "device watermark moved: {phone:?}");
    let tablet = list.devices.iter().find(|d| d.device_id == "tablet").expect("tablet listed");
    assert_eq!(tablet.watermark_ms, 0, "{tablet:?}");

    // The device can log in again afterwards, even with a new key (it has no live session).
    let k3 = jkt("phone, new key");
    let again = create(&mut t.client, bound(create_req(TENANT, "nora", WEB), "phone", &k3)).await.session_id;
    assert_valid(&check_with(&mut t.client, &again, &k3, 0).await, "new session on the revoked device");

    let err = t
        .client
        .revoke_device(pb::RevokeDeviceRequest {
            tenant: TENANT.into(),
            user_id: "nora".into(),
            device_id: "toaster".into(),
            revocation: revocation(pb::ReasonCode::Admin),
        })
        .await;
    expect_code(err, Code::NotFound, "unknown device");
    let err = t
        .client
        .revoke_device(pb::RevokeDeviceRequest {
            tenant: TENANT.into(),
            user_id: "nobody".into(),
            device_id: "phone".into(),
            revocation: revocation(pb::ReasonCode::Admin),
        })
        .await;
    expect_code(err, Code::NotFound, "unknown user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_user_revokes_every_session_of_the_user() {
    // Protects P3 for users: one command revokes all of a user's sessions and sets the user watermark.
    let mut t = TestNode::start().await;
    let a = create(&mut t.client, create_req(TENANT, "olga", WEB)).await.session_id;
    let b = create(&mut t.client, bound(create_req(TENANT, "olga", "mail"), "phone", &jkt("olga")))
        .await
        .session_id;
    let c = create(&mut t.client, child_of(create_req(TENANT, "olga", "docs"), &a)).await.session_id;
    let other = create(&mut t.client, create_req(TENANT, "pete", WEB)).await.session_id;
    let other_tenant = create(&mut t.client, create_req("globex", "olga", WEB)).await.session_id;

    let revoked = t
        .client
        .revoke_user(pb::RevokeUserRequest {
            tenant: TENANT.into(),
            user_id: "olga".into(),
            revocation: revocation(pb::ReasonCode::Compromised),
        })
        .await
        .expect("revoke user")
        .into_inner();
    assert_eq!(sorted(&revoked.revoked_session_ids), sorted_ids(&[&a, &b, &c]));
    for sid in [&a, &b, &c] {
        let resp = check_with(&mut t.client, sid, &jkt("olga"), 0).await;
        assert_eq!(resp.status(), pb::CheckStatus::Revoked, "{sid}: {resp:?}");
        assert!(
            [pb::ReasonCode::UserRevoked, pb::ReasonCode::ParentRevoked].contains(&resp.reason()),
            "{sid}: {resp:?}"
        );
    }
    assert_revoked(&check(&mut t.client, &a).await, pb::ReasonCode::UserRevoked, "root session");
    assert_valid(&check(&mut t.client, &other).await, "another user");
    assert_valid(&check(&mut t.client, &other_tenant).await, "same user id in another tenant");

    let list = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "olga".into() })
        .await
        .expect("list")
        .into_inner();
    assert!(list.user_watermark_ms >= revoked.revoked_at_ms, "{list:?}");
    assert!(list.sessions.iter().all(|s| s.status() == pb::CheckStatus::Revoked), "{list:?}");

    // Logging in again afterwards works.
    let fresh = create(&mut t.client, create_req(TENANT, "olga", WEB)).await.session_id;
    assert_valid(&check(&mut t.client, &fresh).await, "session created after the user revocation");

    let err = t
        .client
        .revoke_user(pb::RevokeUserRequest {
            tenant: TENANT.into(),
            user_id: "nobody".into(),
            revocation: revocation(pb::ReasonCode::Admin),
        })
        .await;
    expect_code(err, Code::NotFound, "unknown user");
}

/// A SetWatermark request of `scope` at `not_before_ms`.
fn watermark_req(
    scope: pb::WatermarkScope,
    tenant: &str,
    client_id: &str,
    user_id: &str,
    device_id: &str,
    not_before_ms: u64,
) -> pb::SetWatermarkRequest {
    pb::SetWatermarkRequest {
        scope: scope as i32,
        tenant: tenant.into(),
        client_id: client_id.into(),
        user_id: user_id.into(),
        device_id: device_id.into(),
        not_before_ms,
        revocation: revocation(pb::ReasonCode::Policy),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_watermark_revokes_the_tenant_on_every_shard() {
    // Protects mass revocation by tenant watermark (one command per shard) and its scope.
    let mut t = TestNode::start().await;
    // Enough users that several shards hold some.
    let mut doomed = Vec::new();
    for i in 0..12 {
        doomed.push(create(&mut t.client, create_req(TENANT, &format!("user{i}"), WEB)).await.session_id);
    }
    let spared = create(&mut t.client, create_req("globex", "user0", WEB)).await.session_id;

    let set = t
        .client
        .set_watermark(watermark_req(pb::WatermarkScope::Tenant, TENANT, "", "", "", 0))
        .await
        .expect("tenant watermark")
        .into_inner();
    assert_eq!(set.shards, u32::from(SHARDS), "a tenant watermark goes to every shard");
    assert!(set.watermark_ms > 0);
    for sid in &doomed {
        assert_revoked(&check(&mut t.client, sid).await, pb::ReasonCode::Watermark, sid);
    }
    assert_valid(&check(&mut t.client, &spared).await, "another tenant");

    let fresh = create(&mut t.client, create_req(TENANT, "user0", WEB)).await.session_id;
    assert_valid(&check(&mut t.client, &fresh).await, "session created after the watermark");

    // Watermarks never move back.
    let back = t
        .client
        .set_watermark(watermark_req(
            pb::WatermarkScope::Tenant,
            TENANT,
            "",
            "",
            "",
            set.watermark_ms - 1_000,
        ))
        .await
        .expect("an older watermark is accepted and ignored")
        .into_inner();
    assert_eq!(back.watermark_ms, set.watermark_ms);
    assert_valid(&check(&mut t.client, &fresh).await, "an older watermark changes nothing");

    let err = t
        .client
        .set_watermark(watermark_req(pb::WatermarkScope::Tenant, TENANT, "", "", "", now_ms() + HOUR_MS))
        .await;
    expect_code(err, Code::FailedPrecondition, "watermark in the future");
    assert_valid(&check(&mut t.client, &fresh).await, "a refused watermark changes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_watermark_revokes_one_client_only() {
    // Protects client-scoped mass revocation: one client's sessions go, the tenant's others stay.
    let mut t = TestNode::start().await;
    let mut doomed = Vec::new();
    let mut spared = Vec::new();
    for i in 0..8 {
        doomed
            .push(create(&mut t.client, create_req(TENANT, &format!("u{i}"), "legacy-app")).await.session_id);
        spared.push(create(&mut t.client, create_req(TENANT, &format!("u{i}"), WEB)).await.session_id);
    }
    spared.push(create(&mut t.client, create_req("globex", "u0", "legacy-app")).await.session_id);

    let set = t
        .client
        .set_watermark(watermark_req(pb::WatermarkScope::Client, TENANT, "legacy-app", "", "", 0))
        .await
        .expect("client watermark")
        .into_inner();
    assert_eq!(set.shards, u32::from(SHARDS), "a client watermark goes to every shard");
    for sid in &doomed {
        assert_revoked(&check(&mut t.client, sid).await, pb::ReasonCode::Watermark, sid);
    }
    for sid in &spared {
        assert_valid(&check(&mut t.client, sid).await, sid);
    }
    let err = t
        .client
        .set_watermark(watermark_req(
            pb::WatermarkScope::Client,
            TENANT,
            "legacy-app",
            "",
            "",
            now_ms() + HOUR_MS,
        ))
        .await;
    expect_code(err, Code::FailedPrecondition, "client watermark in the future");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_device_watermarks_revoke_their_scope() {
    // Protects user- and device-scoped watermarks: sessions created at or before them are REVOKED.
    let mut t = TestNode::start().await;
    let key = jkt("quinn phone");
    let phone =
        create(&mut t.client, bound(create_req(TENANT, "quinn", WEB), "phone", &key)).await.session_id;
    let laptop_key = jkt("quinn laptop");
    let laptop = create(&mut t.client, bound(create_req(TENANT, "quinn", WEB), "laptop", &laptop_key))
        .await
        .session_id;
    let other = create(&mut t.client, create_req(TENANT, "rita", WEB)).await.session_id;

    let set = t
        .client
        .set_watermark(watermark_req(pb::WatermarkScope::Device, TENANT, "", "quinn", "phone", 0))
        .await
        .expect("device watermark")
        .into_inner();
    assert_eq!(set.shards, 1, "a device watermark goes to the user's shard only");
    assert_revoked(&check_with(&mut t.client, &phone, &key, 0).await, pb::ReasonCode::Watermark, "phone");
    assert_valid(&check_with(&mut t.client, &laptop, &laptop_key, 0).await, "laptop");
    let list = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "quinn".into() })
        .await
        .expect("list")
        .into_inner();
    let device = list.devices.iter().find(|d| d.device_id == "phone").expect("phone listed");
    assert_eq!(device.watermark_ms, set.watermark_ms);

    let set = t
        .client
        .set_watermark(watermark_req(pb::WatermarkScope::User, TENANT, "", "quinn", "", 0))
        .await
        .expect("user watermark")
        .into_inner();
    assert_eq!(set.shards, 1, "a user watermark goes to the user's shard only");
    assert_revoked(
        &check_with(&mut t.client, &laptop, &laptop_key, 0).await,
        pb::ReasonCode::Watermark,
        "laptop",
    );
    assert_valid(&check(&mut t.client, &other).await, "another user");
    let list = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "quinn".into() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.user_watermark_ms, set.watermark_ms);

    let err = t
        .client
        .set_watermark(watermark_req(pb::WatermarkScope::User, TENANT, "", "quinn", "", now_ms() + HOUR_MS))
        .await;
    expect_code(err, Code::FailedPrecondition, "user watermark in the future");
    let err = t
        .client
        .set_watermark(watermark_req(
            pb::WatermarkScope::Device,
            TENANT,
            "",
            "quinn",
            "phone",
            now_ms() + HOUR_MS,
        ))
        .await;
    expect_code(err, Code::FailedPrecondition, "device watermark in the future");
    let err =
        t.client.set_watermark(watermark_req(pb::WatermarkScope::User, TENANT, "", "nobody", "", 0)).await;
    expect_code(err, Code::NotFound, "user watermark of an unknown user");
    let err = t
        .client
        .set_watermark(watermark_req(pb::WatermarkScope::Device, TENANT, "", "quinn", "toaster", 0))
        .await;
    expect_code(err, Code::NotFound, "device watermark of an unknown device");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_user_sessions_and_devices() {
    // Protects the identity provider's view of a user: every session with its state, every device.
    let mut t = TestNode::start().await;
    let key = jkt("sam phone");
    let root = create(&mut t.client, bound(create_req(TENANT, "sam", WEB), "phone", &key)).await;
    let child = create(&mut t.client, child_of(create_req(TENANT, "sam", "mail"), &root.session_id)).await;
    let mut req = with_refresh(create_req(TENANT, "sam", "cli"));
    req.aal = 2;
    let cli = create(&mut t.client, req).await;
    t.client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: child.session_id.clone(),
            revocation: revocation(pb::ReasonCode::Logout),
        })
        .await
        .expect("revoke child");
    create(&mut t.client, create_req(TENANT, "tom", WEB)).await;

    let list = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "sam".into() })
        .await
        .expect("list")
        .into_inner();
    let mut ids: Vec<String> = list.sessions.iter().map(|s| s.session_id.clone()).collect();
    ids.sort();
    assert_eq!(
        ids,
        sorted_ids(&[&root.session_id, &child.session_id, &cli.session_id]),
        "only sam's sessions"
    );

    let by_id = |id: &str| list.sessions.iter().find(|s| s.session_id == id).expect("listed").clone();
    let r = by_id(&root.session_id);
    assert_eq!((r.client_id.as_str(), r.device_id.as_str(), r.aal), (WEB, "phone", 1));
    assert_eq!((r.created_at_ms, r.expires_at_ms), (root.created_at_ms, root.expires_at_ms));
    assert!(r.last_seen_ms >= r.created_at_ms);
    assert_eq!(r.status(), pb::CheckStatus::Valid);
    assert_eq!(r.parent_session_id, "");
    assert_eq!(r.refresh_generation, 0, "no refresh family");
    let c = by_id(&child.session_id);
    assert_eq!(c.parent_session_id, root.session_id);
    assert_eq!(c.status(), pb::CheckStatus::Revoked);
    assert_eq!(c.reason(), pb::ReasonCode::Logout);
    assert_eq!(c.device_id, "");
    let k = by_id(&cli.session_id);
    assert_eq!((k.client_id.as_str(), k.aal, k.refresh_generation), ("cli", 2, 1));
    assert_eq!(k.status(), pb::CheckStatus::Valid);

    assert_eq!(list.devices.len(), 1, "{list:?}");
    let d = &list.devices[0];
    assert_eq!((d.device_id.as_str(), d.jkt.as_str()), ("phone", key.as_str()));
    assert_eq!(d.first_seen_ms, root.created_at_ms);
    assert_eq!(d.watermark_ms, 0);
    assert_eq!(list.user_watermark_ms, 0);

    let err = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "nobody".into() })
        .await;
    expect_code(err, Code::NotFound, "list of an unknown user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_batch_answers_in_request_order() {
    // Protects the batch contract: up to 256 checks, answers in request order across shards.
    let mut t = TestNode::start().await;
    let key = jkt("uma phone");
    let mut valid = Vec::new();
    for i in 0..6 {
        valid.push(create(&mut t.client, create_req(TENANT, &format!("batch{i}"), WEB)).await.session_id);
    }
    let bound_sid =
        create(&mut t.client, bound(create_req(TENANT, "uma", WEB), "phone", &key)).await.session_id;
    let revoked_sid = create(&mut t.client, create_req(TENANT, "vic", WEB)).await.session_id;
    t.client
        .revoke_session(pb::RevokeSessionRequest {
            session_id: revoked_sid.clone(),
            revocation: revocation(pb::ReasonCode::Admin),
        })
        .await
        .expect("revoke");

    let mut checks = Vec::new();
    let mut expected = Vec::new();
    for (i, sid) in valid.iter().enumerate() {
        checks.push(check_req(&unknown_session_id(i as u16), "", 0));
        expected.push((pb::CheckStatus::Unknown, String::new()));
        checks.push(check_req(sid, "", 0));
        expected.push((pb::CheckStatus::Valid, format!("batch{i}")));
    }
    let revoked_idx = checks.len();
    checks.push(check_req(&revoked_sid, "", 0));
    expected.push((pb::CheckStatus::Revoked, "vic".to_owned()));
    checks.push(check_req(&bound_sid, &jkt("wrong"), 0));
    expected.push((pb::CheckStatus::DeviceMismatch, "uma".to_owned()));
    checks.push(check_req(&bound_sid, &key, 3));
    expected.push((pb::CheckStatus::StepUpRequired, "uma".to_owned()));
    checks.push(check_req(&bound_sid, &key, 1));
    expected.push((pb::CheckStatus::Valid, "uma".to_owned()));
    checks.push(check_req(&valid[0], "", 0));
    expected.push((pb::CheckStatus::Valid, "batch0".to_owned()));

    let results = t
        .client
        .check_session_batch(pb::CheckSessionBatchRequest { checks })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(results.len(), expected.len());
    for (i, (resp, (status, user))) in results.iter().zip(&expected).enumerate() {
        assert_eq!(resp.status(), *status, "answer {i}: {resp:?}");
        if *status != pb::CheckStatus::Unknown {
            assert_eq!(&resp.user_id, user, "answer {i}: {resp:?}");
        }
    }
    let revoked_answer = &results[revoked_idx];
    assert_eq!(revoked_answer.reason(), pb::ReasonCode::Admin);

    // Exactly the limit is accepted; one more is INVALID_ARGUMENT.
    let full: Vec<_> = (0..256).map(|i| check_req(&valid[i % valid.len()], "", 0)).collect();
    let results = t
        .client
        .check_session_batch(pb::CheckSessionBatchRequest { checks: full })
        .await
        .expect("batch of 256")
        .into_inner()
        .results;
    assert_eq!(results.len(), 256);
    assert!(results.iter().all(|r| r.status() == pb::CheckStatus::Valid));
    let over: Vec<_> = (0..257).map(|i| check_req(&valid[i % valid.len()], "", 0)).collect();
    expect_invalid(
        t.client.check_session_batch(pb::CheckSessionBatchRequest { checks: over }).await,
        "checks",
        "batch of 257",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_status_reports_every_shard_with_a_leader() {
    // Protects the operator's view: n_shards, one entry per shard, each led (single node: by itself).
    let mut t = TestNode::start().await;
    let status = t.client.node_status(pb::NodeStatusRequest {}).await.expect("node status").into_inner();
    let node_id = t.node.config.node_id;
    assert_eq!(status.node_id, node_id);
    assert_eq!(status.region, "test-region");
    assert_eq!(status.n_shards, u32::from(SHARDS));
    let mut shards: Vec<u32> = status.shards.iter().map(|s| s.shard).collect();
    shards.sort_unstable();
    assert_eq!(shards, (0..u32::from(SHARDS)).collect::<Vec<_>>(), "{status:?}");
    for s in &status.shards {
        assert_eq!(s.leader, node_id, "shard {} is led by this node: {s:?}", s.shard);
        assert!(s.term >= 1, "{s:?}");
        assert!(s.applied_index <= s.last_log_index, "{s:?}");
    }

    // A write shows up as applied progress on its shard.
    let applied_before: u64 = status.shards.iter().map(|s| s.applied_index).sum();
    create(&mut t.client, create_req(TENANT, "wendy", WEB)).await;
    let after = t.client.node_status(pb::NodeStatusRequest {}).await.expect("node status").into_inner();
    let applied_after: u64 = after.shards.iter().map(|s| s.applied_index).sum();
    assert!(applied_after > applied_before, "before {status:?}, after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limit_evicts_the_oldest_session() {
    // Protects P6 per-user bounds with the default policy evict-oldest: the oldest goes, reason SESSION_LIMIT.
    let mut t = TestNode::start_with(|c| c.limits.sessions_per_user_max = 3).await;
    let mut sids = Vec::new();
    let mut last_ms = 0;
    for _ in 0..3 {
        // Distinct creation times make "oldest" unambiguous.
        after_ms(last_ms).await;
        let created = create(&mut t.client, create_req(TENANT, "xena", WEB)).await;
        assert!(created.evicted_session_ids.is_empty(), "{created:?}");
        last_ms = created.created_at_ms;
        sids.push(created.session_id);
    }
    after_ms(last_ms).await;
    let fourth = create(&mut t.client, create_req(TENANT, "xena", WEB)).await;
    assert_eq!(fourth.evicted_session_ids, vec![sids[0].clone()]);
    assert_revoked(&check(&mut t.client, &sids[0]).await, pb::ReasonCode::SessionLimit, "oldest session");
    for sid in [&sids[1], &sids[2], &fourth.session_id] {
        assert_valid(&check(&mut t.client, sid).await, sid);
    }

    // An SSO child never evicts its own parent chain: the next oldest unrelated one goes.
    let child = create(&mut t.client, child_of(create_req(TENANT, "xena", "mail"), &sids[1])).await;
    assert_eq!(child.evicted_session_ids, vec![sids[2].clone()], "the parent {} is protected", sids[1]);
    assert_valid(&check(&mut t.client, &sids[1]).await, "parent of the new child");

    // Another user is not affected by xena's limit.
    let other = create(&mut t.client, create_req(TENANT, "yuri", WEB)).await;
    assert!(other.evicted_session_ids.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_limit_refuses_one_device_too_many() {
    // Protects P6 per-user bounds for devices: the device limit refuses (RESOURCE_EXHAUSTED), never evicts.
    let mut t = TestNode::start_with(|c| c.limits.devices_per_user_max = 2).await;
    let a = create(&mut t.client, bound(create_req(TENANT, "zoe", WEB), "d1", &jkt("d1"))).await.session_id;
    let b = create(&mut t.client, bound(create_req(TENANT, "zoe", WEB), "d2", &jkt("d2"))).await.session_id;
    let err = t.client.create_session(bound(create_req(TENANT, "zoe", WEB), "d3", &jkt("d3"))).await;
    expect_code(err, Code::ResourceExhausted, "third device");
    assert_valid(&check_with(&mut t.client, &a, &jkt("d1"), 0).await, "first device kept");
    assert_valid(&check_with(&mut t.client, &b, &jkt("d2"), 0).await, "second device kept");
    // An existing device and unbound sessions are still fine.
    create(&mut t.client, bound(create_req(TENANT, "zoe", "mail"), "d1", &jkt("d1"))).await;
    create(&mut t.client, create_req(TENANT, "zoe", "mail")).await;

    // Revoking a device frees its slot.
    t.client
        .revoke_device(pb::RevokeDeviceRequest {
            tenant: TENANT.into(),
            user_id: "zoe".into(),
            device_id: "d2".into(),
            revocation: revocation(pb::ReasonCode::Admin),
        })
        .await
        .expect("revoke d2");
    let c = create(&mut t.client, bound(create_req(TENANT, "zoe", WEB), "d3", &jkt("d3"))).await.session_id;
    assert_valid(&check_with(&mut t.client, &c, &jkt("d3"), 0).await, "third device after freeing a slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limit_with_reject_policy_is_resource_exhausted() {
    // Protects P6 under the reject policy: one session too many is RESOURCE_EXHAUSTED and evicts nothing.
    let mut t = TestNode::start_with(|c| {
        c.limits.sessions_per_user_max = 2;
        c.limits.on_session_limit = "reject".to_owned();
    })
    .await;
    let a = create(&mut t.client, create_req(TENANT, "amy", WEB)).await.session_id;
    let b = create(&mut t.client, create_req(TENANT, "amy", WEB)).await.session_id;
    let err = t.client.create_session(create_req(TENANT, "amy", WEB)).await;
    expect_code(err, Code::ResourceExhausted, "third session under reject");
    assert_valid(&check(&mut t.client, &a).await, "first session kept");
    assert_valid(&check(&mut t.client, &b).await, "second session kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_expiry_boundary_is_exact() {
    // Protects absolute expiry to the millisecond (valid until created + ttl, expired from then on).
    let clock = ManualClock::new();
    let mut t = TestNode::start_with_clock(|_| {}, Some(clock.clone())).await;
    let mut req = create_req(TENANT, "abe", WEB);
    req.ttl_ms = 10_000;
    let created = create(&mut t.client, req).await;
    assert_eq!(created.created_at_ms, clock.now(), "stamped with the node's clock");
    assert_eq!(created.expires_at_ms, created.created_at_ms + 10_000);
    // A child asks for more than its parent has left: it is clipped to the parent's expiry.
    clock.advance(4_000);
    let mut child_req = child_of(create_req(TENANT, "abe", "mail"), &created.session_id);
    child_req.ttl_ms = HOUR_MS;
    let child = create(&mut t.client, child_req).await;
    assert_eq!(child.expires_at_ms, created.expires_at_ms);

    clock.advance(10_000 - 4_000 - 1);
    assert_valid(&check(&mut t.client, &created.session_id).await, "1 ms before expiry");
    assert_valid(&check(&mut t.client, &child.session_id).await, "child, 1 ms before expiry");
    clock.advance(1);
    let resp = check(&mut t.client, &created.session_id).await;
    assert_eq!(resp.status(), pb::CheckStatus::Expired, "at expires_at_ms: {resp:?}");
    let resp = check(&mut t.client, &child.session_id).await;
    assert_eq!(resp.status(), pb::CheckStatus::Expired, "child at its parent's expiry: {resp:?}");
    let list = t
        .client
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: "abe".into() })
        .await
        .expect("list")
        .into_inner();
    assert!(list.sessions.iter().all(|s| s.status() == pb::CheckStatus::Expired), "{list:?}");
    // An expired session cannot parent a new one.
    let err = t.client.create_session(child_of(create_req(TENANT, "abe", WEB), &created.session_id)).await;
    expect_code(err, Code::FailedPrecondition, "parent expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_extends_the_idle_window_and_is_coalesced() {
    // Protects idle timeout semantics: a written touch moves the idle deadline; a coalesced one does not write.
    let clock = ManualClock::new();
    // Coalescing window: min(touch_coalesce_ms, idle_timeout / 4) = min(60 s, 1 s) = 1 s.
    let mut t = TestNode::start_with_clock(|c| c.touch_coalesce_ms = 60_000, Some(clock.clone())).await;
    let mut req = create_req(TENANT, "bea", WEB);
    req.idle_timeout_ms = 4_000;
    let created = create(&mut t.client, req).await;
    let t0 = created.created_at_ms;
    let touch = |client: &mut Client| {
        let mut client = client.clone();
        let sid = created.session_id.clone();
        async move {
            client
                .touch_session(pb::TouchSessionRequest { session_id: sid })
                .await
                .expect("touch")
                .into_inner()
        }
    };

    clock.advance(500);
    let coalesced = touch(&mut t.client).await;
    assert!(!coalesced.written, "a touch 500 ms after creation is inside the 1 s window: {coalesced:?}");
    assert_eq!(coalesced.idle_expires_at_ms, t0 + 4_000, "a coalesced touch does not move the deadline");

    clock.advance(1_500);
    let written = touch(&mut t.client).await;
    assert!(written.written, "a touch 2 s after the last write is written: {written:?}");
    assert_eq!(written.idle_expires_at_ms, t0 + 2_000 + 4_000);

    clock.advance(2_500); // t0 + 4500: past the deadline the session had before the touch.
    assert_valid(&check(&mut t.client, &created.session_id).await, "after the original idle deadline");
    clock.advance(1_499); // t0 + 5999
    assert_valid(&check(&mut t.client, &created.session_id).await, "1 ms before the new idle deadline");
    clock.advance(1); // t0 + 6000
    let resp = check(&mut t.client, &created.session_id).await;
    assert_eq!(resp.status(), pb::CheckStatus::Expired, "at the idle deadline: {resp:?}");
    let err =
        t.client.touch_session(pb::TouchSessionRequest { session_id: created.session_id.clone() }).await;
    expect_code(err, Code::FailedPrecondition, "touch of an idle-expired session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermark_not_before_is_exact_and_never_in_the_future() {
    // Protects watermark semantics: sessions created at or before not_before_ms are revoked, later ones not.
    let clock = ManualClock::new();
    let mut t = TestNode::start_with_clock(|_| {}, Some(clock.clone())).await;
    let first = create(&mut t.client, create_req(TENANT, "cleo", WEB)).await;
    clock.advance(1_000);
    let second = create(&mut t.client, create_req(TENANT, "cleo", WEB)).await;
    assert_eq!(second.created_at_ms, first.created_at_ms + 1_000);
    clock.advance(1_000);

    let user_watermark = |not_before_ms: u64| pb::SetWatermarkRequest {
        scope: pb::WatermarkScope::User as i32,
        tenant: TENANT.into(),
        user_id: "cleo".into(),
        not_before_ms,
        revocation: revocation(pb::ReasonCode::Policy),
        ..Default::default()
    };
    let err = t.client.set_watermark(user_watermark(clock.now() + 1)).await;
    expect_code(err, Code::FailedPrecondition, "1 ms in the future");
    assert_valid(&check(&mut t.client, &first.session_id).await, "a refused watermark revokes nothing");

    // Exactly the first session's creation time: "at or before" includes it.
    let set =
        t.client.set_watermark(user_watermark(first.created_at_ms)).await.expect("watermark").into_inner();
    assert_eq!(set.watermark_ms, first.created_at_ms);
    assert_revoked(
        &check(&mut t.client, &first.session_id).await,
        pb::ReasonCode::Watermark,
        "created at it",
    );
    assert_valid(&check(&mut t.client, &second.session_id).await, "created 1 s after it");

    // Exactly now is allowed, and catches the second session.
    let set =
        t.client.set_watermark(user_watermark(clock.now())).await.expect("watermark at now").into_inner();
    assert_eq!(set.watermark_ms, clock.now());
    assert_revoked(&check(&mut t.client, &second.session_id).await, pb::ReasonCode::Watermark, "second");

    // A session created in the same millisecond as the watermark, after it, is valid.
    let third = create(&mut t.client, create_req(TENANT, "cleo", WEB)).await;
    assert!(third.created_at_ms > set.watermark_ms, "{third:?} vs {set:?}");
    assert_valid(&check(&mut t.client, &third.session_id).await, "created after the watermark");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_offset_is_a_fault_injection_hook_that_moves_this_nodes_clock_only() {
    // Without fault injection the hook is refused.
    let mut plain = TestNode::start().await;
    let refused = plain
        .client
        .set_clock_offset(pb::SetClockOffsetRequest { offset_ms: 1_000 })
        .await
        .expect_err("no fault injection");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    let mut t = TestNode::start_with(|c| c.fault_injection = true).await;
    let too_far = t
        .client
        .set_clock_offset(pb::SetClockOffsetRequest { offset_ms: -2 * 86_400_000 })
        .await
        .expect_err("beyond one day");
    assert_eq!(too_far.code(), Code::InvalidArgument, "{too_far:?}");
    assert!(too_far.message().contains("offset_ms"), "{too_far:?}");

    let created = create(&mut t.client, create_req(TENANT, "alice", WEB)).await;
    assert_valid(&check(&mut t.client, &created.session_id).await, "before the skew");
    // Two hours ahead: the one-hour session is judged expired by this node's clock.
    let skewed = t
        .client
        .set_clock_offset(pb::SetClockOffsetRequest { offset_ms: 2 * HOUR_MS as i64 })
        .await
        .expect("set offset")
        .into_inner();
    assert!(skewed.now_ms >= now_ms() + 2 * HOUR_MS - 60_000, "{skewed:?} vs host {}", now_ms());
    let r = check(&mut t.client, &created.session_id).await;
    assert_eq!(r.status(), pb::CheckStatus::Expired, "{r:?}");
    // Back to the host's clock.
    t.client.set_clock_offset(pb::SetClockOffsetRequest { offset_ms: 0 }).await.expect("reset");
    assert_valid(&check(&mut t.client, &created.session_id).await, "after the reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermark_at_now_covers_sessions_stamped_by_a_clock_that_ran_ahead() {
    // Found by the simulator: "now" was this node's clock, so sessions a leader had stamped with
    // a clock running ahead survived a "revoke everything now" watermark (and a revoked SSO
    // parent left its children valid). The shard's own clock decides "now".
    let mut t = TestNode::start_with(|c| c.fault_injection = true).await;
    t.client.set_clock_offset(pb::SetClockOffsetRequest { offset_ms: 60_000 }).await.expect("skew ahead");
    let ahead = create(&mut t.client, create_req(TENANT, "rita", WEB)).await;
    t.client.set_clock_offset(pb::SetClockOffsetRequest { offset_ms: 0 }).await.expect("back");
    assert!(ahead.created_at_ms > now_ms() + 30_000, "stamped ahead: {ahead:?}");
    for scope in [pb::WatermarkScope::User, pb::WatermarkScope::Tenant] {
        let set = t
            .client
            .set_watermark(watermark_req(scope, TENANT, "", "rita", "", 0))
            .await
            .expect("watermark now")
            .into_inner();
        assert!(set.watermark_ms >= ahead.created_at_ms, "{scope:?}: {set:?} vs {ahead:?}");
    }
    let r = check(&mut t.client, &ahead.session_id).await;
    assert_eq!(r.status(), pb::CheckStatus::Revoked, "{r:?}");
}
