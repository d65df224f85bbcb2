//! The HTTP endpoints on a node: RFC 7662 introspection, RFC 7009 revocation, forward-auth with
//! bearer tokens, trusted thumbprints and DPoP proofs, metrics and health.

mod support;

use support::dpop::DeviceKey;
use support::http::{post_form, request};
use support::*;

/// A node serving HTTP, with `adjust` applied to its configuration.
async fn http_node(
    adjust: impl FnOnce(&mut cascade_node::config::NodeConfig),
) -> (TestNode, std::net::SocketAddr) {
    let node = TestNode::start_with(|c| {
        c.http_listen = Some("127.0.0.1:0".parse().expect("address"));
        adjust(c);
    })
    .await;
    let addr = node.node.config.http_listen.expect("HTTP address");
    (node, addr)
}

#[tokio::test]
async fn introspection_answers_rfc_7662() {
    let (mut node, http) = http_node(|_| {}).await;
    let key = DeviceKey::new(7);
    let bound =
        create(&mut node.client, bound(create_req("acme", "alice", "web"), "laptop", &key.jkt())).await;
    let plain = create(&mut node.client, create_req("acme", "bob", "mobile")).await;

    let a = post_form(
        http,
        "/oauth2/introspect",
        &format!("token={}&token_type_hint=access_token", plain.session_id),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("cache-control"), Some("no-store"));
    let j = a.json();
    assert_eq!(j["active"], true);
    assert_eq!(j["sub"], "bob");
    assert_eq!(j["client_id"], "mobile");
    assert_eq!(j["sid"], plain.session_id.as_str());
    assert_eq!(j["acr"], "aal1");
    let (iat, exp) = (j["iat"].as_u64().expect("iat"), j["exp"].as_u64().expect("exp"));
    assert!(iat > 1_600_000_000 && (iat + 3_599..=iat + 3_601).contains(&exp), "{j}");
    assert!(j.get("cnf").is_none(), "an unbound session has no cnf: {j}");

    // A device-bound session is active for introspection, with the key the presenter must prove.
    let j = post_form(http, "/oauth2/introspect", &format!("token={}", bound.session_id)).await.json();
    assert_eq!(j["active"], true, "{j}");
    assert_eq!(j["cnf"]["jkt"], key.jkt().as_str());

    // Unknown, malformed and revoked tokens: exactly {"active":false}.
    let inactive = serde_json::json!({ "active": false });
    for token in [unknown_session_id(0), "not-a-token".to_owned(), "x".repeat(5000)] {
        let a = post_form(http, "/oauth2/introspect", &format!("token={token}")).await;
        assert_eq!((a.status, a.json()), (200, inactive.clone()), "token {:.40}", token);
    }
    node.client
        .revoke_user(cascade_protocol::pb::RevokeUserRequest {
            tenant: "acme".into(),
            user_id: "bob".into(),
            revocation: revocation(cascade_protocol::pb::ReasonCode::Compromised),
        })
        .await
        .expect("revoke user");
    let a = post_form(http, "/oauth2/introspect", &format!("token={}", plain.session_id)).await;
    assert_eq!(a.body, r#"{"active":false}"#);

    // Bad requests: invalid_request, never a panic or a 500.
    for (body, content_type) in [
        ("", "application/x-www-form-urlencoded"),
        ("token=", "application/x-www-form-urlencoded"),
        ("{}", "application/json"),
        ("token=a&token=b", "application/x-www-form-urlencoded"),
    ] {
        let a = request(http, "POST", "/oauth2/introspect", &[("Content-Type", content_type)], body).await;
        assert_eq!(a.status, 400, "{body:?} as {content_type}: {a:?}");
        assert_eq!(a.json()["error"], "invalid_request", "{a:?}");
    }
    let a = post_form(http, "/oauth2/introspect", &format!("token={}", "a".repeat(20_000))).await;
    assert_eq!(a.status, 413, "an oversized body is refused: {a:?}");
    assert_eq!(request(http, "GET", "/oauth2/introspect", &[], "").await.status, 405);
}

#[tokio::test]
async fn revocation_endpoint_follows_rfc_7009() {
    let (mut node, http) = http_node(|_| {}).await;
    let s = create(&mut node.client, create_req("acme", "carol", "web")).await;
    let family = create(&mut node.client, with_refresh(create_req("acme", "dave", "web"))).await;
    assert_valid(&check(&mut node.client, &s.session_id).await, "before revocation");

    let a =
        post_form(http, "/oauth2/revoke", &format!("token={}&token_type_hint=access_token", s.session_id))
            .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_revoked(
        &check(&mut node.client, &s.session_id).await,
        cascade_protocol::pb::ReasonCode::Logout,
        "after RFC 7009 revoke",
    );

    // A refresh token revokes its family and session.
    let a = post_form(
        http,
        "/oauth2/revoke",
        &format!("token={}&token_type_hint=refresh_token", family.refresh_token),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let r = check(&mut node.client, &family.session_id).await;
    assert_eq!(r.status, cascade_protocol::pb::CheckStatus::Revoked as i32, "{r:?}");

    // Unknown and malformed tokens: 200 all the same (RFC 7009 §2.2). A missing one: 400.
    for token in [unknown_session_id(1), "garbage".to_owned(), s.session_id.clone()] {
        assert_eq!(post_form(http, "/oauth2/revoke", &format!("token={token}")).await.status, 200);
    }
    let a = post_form(http, "/oauth2/revoke", "token_type_hint=access_token").await;
    assert_eq!((a.status, a.json()["error"].as_str()), (400, Some("invalid_request")));
}

/// The forward-auth request a gateway sends for `GET https://app.example/orders?id=1`.
fn gateway_headers<'a>(authorization: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        ("Authorization", authorization),
        ("X-Forwarded-Method", "GET"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "app.example"),
        ("X-Forwarded-Uri", "/orders?id=1"),
    ];
    h.extend_from_slice(extra);
    h
}

#[tokio::test]
async fn forward_auth_answers_200_401_403() {
    let (mut node, http) = http_node(|_| {}).await;
    let key = DeviceKey::new(1);
    let plain = create(&mut node.client, create_req("acme", "erin", "web")).await;
    let mut aal2 = create_req("acme", "erin", "admin");
    aal2.aal = 2;
    let aal2 = create(&mut node.client, aal2).await;
    let bound =
        create(&mut node.client, bound(create_req("acme", "frank", "web"), "phone", &key.jkt())).await;

    let bearer = format!("Bearer {}", plain.session_id);
    let a = request(http, "GET", "/forward-auth", &gateway_headers(&bearer, &[]), "").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-cascade-user"), Some("erin"));
    assert_eq!(a.header("x-cascade-tenant"), Some("acme"));
    assert_eq!(a.header("x-cascade-client"), Some("web"));
    assert_eq!(a.header("x-cascade-session"), Some(plain.session_id.as_str()));

    // Missing, malformed, unknown: 401 with a Bearer challenge.
    let a = request(http, "GET", "/forward-auth", &[], "").await;
    assert_eq!(a.status, 401);
    assert!(a.header("www-authenticate").is_some_and(|c| c.starts_with("Bearer")), "{a:?}");
    for auth in [
        "Bearer nope".to_owned(),
        format!("Bearer {}", unknown_session_id(2)),
        format!("Basic {}", plain.session_id),
    ] {
        let a = request(http, "GET", "/forward-auth", &gateway_headers(&auth, &[]), "").await;
        assert_eq!(a.status, 401, "{auth}: {a:?}");
        assert_eq!(a.header("www-authenticate"), Some(r#"Bearer error="invalid_token""#), "{auth}");
    }

    // Step-up: 403 when the route needs more than the session has, 200 when it has it.
    let a = request(
        http,
        "GET",
        "/forward-auth",
        &gateway_headers(&bearer, &[("X-Cascade-Required-Aal", "2")]),
        "",
    )
    .await;
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.header("www-authenticate").is_some_and(|c| c.contains("insufficient_user_authentication")));
    let bearer2 = format!("Bearer {}", aal2.session_id);
    let a = request(
        http,
        "GET",
        "/forward-auth",
        &gateway_headers(&bearer2, &[("X-Cascade-Required-Aal", "2")]),
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = request(
        http,
        "GET",
        "/forward-auth",
        &gateway_headers(&bearer2, &[("X-Cascade-Required-Aal", "7")]),
        "",
    )
    .await;
    assert_eq!(a.status, 400, "a gateway misconfiguration is an error, never a pass: {a:?}");

    // A device-bound session: as a bearer token (no proof) it is refused with 403.
    let bound_bearer = format!("Bearer {}", bound.session_id);
    let a = request(http, "GET", "/forward-auth", &gateway_headers(&bound_bearer, &[]), "").await;
    assert_eq!(a.status, 403, "{a:?}");
    // X-Cascade-Jkt is ignored unless the node is told to trust it.
    let jkt = key.jkt();
    let a = request(
        http,
        "GET",
        "/forward-auth",
        &gateway_headers(&bound_bearer, &[("X-Cascade-Jkt", &jkt)]),
        "",
    )
    .await;
    assert_eq!(a.status, 403, "an untrusted thumbprint header must not unlock a bound session: {a:?}");

    // DPoP: a fresh proof with the bound key passes, once.
    let dpop = format!("DPoP {}", bound.session_id);
    let now_s = now_ms() / 1000;
    let url = "https://app.example/orders";
    let proof = key.proof("GET", url, &bound.session_id, now_s, "proof-1");
    let a = request(http, "GET", "/forward-auth", &gateway_headers(&dpop, &[("DPoP", &proof)]), "").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-cascade-device"), Some("phone"));
    let a = request(http, "GET", "/forward-auth", &gateway_headers(&dpop, &[("DPoP", &proof)]), "").await;
    assert_eq!(a.status, 401, "a replayed proof is refused: {a:?}");
    assert!(a.header("www-authenticate").is_some_and(|c| c.contains("invalid_dpop_proof")), "{a:?}");

    // A valid proof by another key: the session is not this device's.
    let other = DeviceKey::new(2).proof("GET", url, &bound.session_id, now_s, "proof-2");
    let a = request(http, "GET", "/forward-auth", &gateway_headers(&dpop, &[("DPoP", &other)]), "").await;
    assert_eq!(a.status, 403, "{a:?}");
    // A proof for another URL, method, token or time: 401.
    let wrong = [
        key.proof("POST", url, &bound.session_id, now_s, "p3"),
        key.proof("GET", "https://evil.example/orders", &bound.session_id, now_s, "p4"),
        key.proof("GET", url, &plain.session_id, now_s, "p5"),
        key.proof("GET", url, &bound.session_id, now_s - 600, "p6"),
    ];
    for proof in &wrong {
        let a = request(http, "GET", "/forward-auth", &gateway_headers(&dpop, &[("DPoP", proof)]), "").await;
        assert_eq!(a.status, 401, "{a:?}");
    }
    // DPoP without a proof, or without the forwarded request line.
    let a = request(http, "GET", "/forward-auth", &gateway_headers(&dpop, &[]), "").await;
    assert_eq!(a.status, 401, "{a:?}");
    let proof = key.proof("GET", url, &bound.session_id, now_s, "proof-7");
    let a = request(
        http,
        "GET",
        "/forward-auth",
        &[("Authorization", dpop.as_str()), ("DPoP", proof.as_str())],
        "",
    )
    .await;
    assert_eq!(a.status, 400, "{a:?}");

    // Revoked: 401.
    node.client
        .revoke_session(cascade_protocol::pb::RevokeSessionRequest {
            session_id: plain.session_id.clone(),
            revocation: revocation(cascade_protocol::pb::ReasonCode::Admin),
        })
        .await
        .expect("revoke");
    let a = request(http, "GET", "/forward-auth", &gateway_headers(&bearer, &[]), "").await;
    assert_eq!(a.status, 401, "{a:?}");

    // Every answer is counted.
    let m = request(http, "GET", "/metrics", &[], "").await;
    assert_eq!(m.status, 200);
    for needle in [
        "cascade_forward_auth_total{outcome=\"allowed\"} 3",
        "cascade_forward_auth_total{outcome=\"device_mismatch\"} 3",
        "cascade_forward_auth_total{outcome=\"step_up_required\"} 1",
        "cascade_requests_total{api=\"grpc\",method=\"Cascade/CreateSession\",code=\"OK\"} 3",
        "cascade_requests_total{api=\"http\",method=\"/forward-auth\",code=\"200\"} 3",
        "cascade_shard_fresh{shard=\"0\"} 1",
        "cascade_revocation_apply_lag_seconds_count 1\n",
        "cascade_shard_role{shard=\"0\",role=\"leader\"} 1",
    ] {
        assert!(m.body.contains(needle), "/metrics lacks {needle}:\n{}", m.body);
    }
}

#[tokio::test]
async fn trusted_thumbprint_header_when_configured() {
    let (mut node, http) = http_node(|c| c.dpop.trust_jkt_header = true).await;
    let key = DeviceKey::new(3);
    let bound =
        create(&mut node.client, bound(create_req("acme", "gina", "web"), "tablet", &key.jkt())).await;
    let auth = format!("Bearer {}", bound.session_id);
    let jkt = key.jkt();
    let other = DeviceKey::new(4).jkt();
    let a =
        request(http, "GET", "/forward-auth", &gateway_headers(&auth, &[("X-Cascade-Jkt", &jkt)]), "").await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = request(http, "GET", "/forward-auth", &gateway_headers(&auth, &[("X-Cascade-Jkt", &other)]), "")
        .await;
    assert_eq!(a.status, 403, "{a:?}");
    let a = request(http, "GET", "/forward-auth", &gateway_headers(&auth, &[("X-Cascade-Jkt", "short")]), "")
        .await;
    assert_eq!(a.status, 400, "{a:?}");
}

#[tokio::test]
async fn health_and_readiness() {
    let (mut node, http) = http_node(|_| {}).await;
    // A job shows in /metrics with its progress.
    let job = node
        .client
        .start_revoke_job(cascade_protocol::pb::StartRevokeJobRequest {
            selector: Some(cascade_protocol::pb::SessionSelector {
                tenant: "acme".into(),
                aal_below: 2,
                ..Default::default()
            }),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("dry-run job")
        .into_inner();
    let m = request(http, "GET", "/metrics", &[], "").await;
    let needle = format!("cascade_job_shards{{job=\"{}\"", job.job_id);
    assert!(m.body.contains(&needle), "/metrics lacks {needle}:\n{}", m.body);
    let a = request(http, "GET", "/healthz", &[], "").await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok\n"));
    let a = request(http, "GET", "/readyz", &[], "").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(request(http, "GET", "/nope", &[], "").await.status, 404);
    node.node.stop().await;
    assert!(
        support::http::try_request(http, "GET", "/healthz", &[], "").await.is_err(),
        "a stopped node no longer serves HTTP"
    );
}
