//! Authentication and roles on a 3-node cluster: every role is allowed exactly its operations,
//! over gRPC and HTTP; unauthenticated and wrong-role callers are refused and counted; nodes
//! reach each other with the cluster key (replication and forwarding work); revocations record
//! the authenticated caller.

mod support;

use cascade_node::auth::key_hash;
use cascade_protocol::pb;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use support::http::{post_form, request};
use support::roles::*;
use support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_over_grpc_and_http() {
    let members = cluster().await;
    let client = members[1].client().await;

    // Writes through every node: those not leading the shard forward with the cluster key.
    let mut sessions = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let mut c = m.client().await;
        for j in 0..4 {
            let r = c
                .create_session(keyed(create_req("acme", &format!("u{i}-{j}"), "web"), Some(IDP)))
                .await
                .unwrap_or_else(|s| panic!("create through node {}: {s:?}", m.id));
            sessions.push(r.into_inner().session_id);
        }
    }

    let rows = matrix(&client, "u0-0").await;
    let expected = expected_matrix();
    assert_eq!(rows, expected, "allowed per key (gateway, idp, responder, admin)");

    // No key, an unknown key: UNAUTHENTICATED. Health is open.
    let mut c = client.clone();
    let s = c.check_session(keyed(check_req(&sessions[0], "", 0), None)).await.expect_err("no key");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s =
        c.check_session(keyed(check_req(&sessions[0], "", 0), Some("ck_nope"))).await.expect_err("bad key");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", members[1].addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health.check(tonic_health::pb::HealthCheckRequest::default()).await.expect("health is open");
    // The Raft transport takes the cluster key only, not an API key.
    let mut raft = RaftTransportClient::new(channel);
    let s = raft
        .read_index(keyed(cascade_protocol::raft_pb::ReadIndexRequest::default(), Some(ADMIN)))
        .await
        .expect_err("an API key on the Raft transport");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");

    // A revocation records who made it.
    c.revoke_session(keyed(
        pb::RevokeSessionRequest {
            session_id: sessions[0].clone(),
            revocation: Some(pb::Revocation {
                reason: pb::ReasonCode::Compromised as i32,
                text: "t".into(),
                actor: "alice".into(),
            }),
        },
        Some(RESPONDER),
    ))
    .await
    .expect("revoke as responder");
    // Audit is read from this node's replicas: poll until the entry has reached them.
    poll_until("the revocation in the audit trail, with its actor", STATE_DEADLINE, || {
        let mut c = c.clone();
        async move {
            let audit = c.query_audit(keyed(pb::QueryAuditRequest::default(), Some(RESPONDER))).await.ok()?;
            audit.into_inner().entries.iter().any(|e| e.actor == "resp (alice)").then_some(())
        }
    })
    .await;

    // HTTP: introspection needs a gateway key; revocation an idp or responder key.
    let http = members[1].config.http_listen.expect("HTTP address");
    let form = format!("token={}", sessions[1]);
    let a = post_form(http, "/oauth2/introspect", &form).await;
    assert_eq!((a.status, a.json()["error"].as_str()), (401, Some("invalid_client")), "{a:?}");
    let with_key = |key: &'static str| {
        vec![("Content-Type", "application/x-www-form-urlencoded"), ("X-Cascade-Api-Key", key)]
    };
    let a = request(http, "POST", "/oauth2/introspect", &with_key(IDP), &form).await;
    assert_eq!(a.status, 403, "{a:?}");
    let a = request(http, "POST", "/oauth2/introspect", &with_key(GATEWAY), &form).await;
    assert_eq!((a.status, a.json()["active"].as_bool()), (200, Some(true)), "{a:?}");
    let bearer = format!("Bearer {GATEWAY}");
    let a = request(
        http,
        "POST",
        "/oauth2/introspect",
        &[("Content-Type", "application/x-www-form-urlencoded"), ("Authorization", &bearer)],
        &form,
    )
    .await;
    assert_eq!(a.status, 200, "a caller may authenticate with Authorization: Bearer: {a:?}");
    let a = request(http, "POST", "/oauth2/revoke", &with_key(GATEWAY), &form).await;
    assert_eq!(a.status, 403, "{a:?}");
    let a = request(http, "POST", "/oauth2/revoke", &with_key(IDP), &form).await;
    assert_eq!(a.status, 200, "{a:?}");
    // Linearizable: a follower may answer VALID up to the revocation bound after the ack (P2).
    let linearizable = pb::CheckSessionRequest { linearizable: true, ..check_req(&sessions[1], "", 0) };
    let r = c.check_session(keyed(linearizable, Some(GATEWAY))).await.expect("check").into_inner();
    assert_eq!(r.status, pb::CheckStatus::Revoked as i32, "{r:?}");

    // Forward-auth: the gateway's key in X-Cascade-Api-Key, the user's token in Authorization.
    let user = format!("Bearer {}", sessions[2]);
    let a = request(http, "GET", "/forward-auth", &[("Authorization", user.as_str())], "").await;
    assert_eq!(a.status, 401, "{a:?}");
    let a = request(
        http,
        "GET",
        "/forward-auth",
        &[("Authorization", user.as_str()), ("X-Cascade-Api-Key", RESPONDER)],
        "",
    )
    .await;
    assert_eq!(a.status, 403, "{a:?}");
    let a = request(
        http,
        "GET",
        "/forward-auth",
        &[("Authorization", user.as_str()), ("X-Cascade-Api-Key", GATEWAY)],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");

    // Refusals are counted.
    let m = request(http, "GET", "/metrics", &[], "").await;
    for needle in [
        "cascade_auth_refused_total{api=\"grpc\",reason=\"unauthenticated\"}",
        "cascade_auth_refused_total{api=\"grpc\",reason=\"permission_denied\"}",
        "cascade_auth_refused_total{api=\"http\",reason=\"unauthenticated\"} 2",
        "cascade_auth_refused_total{api=\"http\",reason=\"permission_denied\"} 3",
    ] {
        assert!(m.body.contains(needle), "/metrics lacks {needle}:\n{}", m.body);
    }

    // The SDK presents its key on discovery and checks; without one it cannot even discover.
    let seeds: Vec<String> = members.iter().map(|m| m.addr.to_string()).collect();
    let mut config = cascade_client::ClientConfig::new(seeds.clone());
    config.api_key = Some(GATEWAY.to_owned());
    let sdk = cascade_client::Client::connect(config).await.expect("SDK with a gateway key");
    let r = sdk.check(check_req(&sessions[3], "", 0)).await.expect("SDK check");
    assert_eq!(r.status, pb::CheckStatus::Valid as i32, "{r:?}");
    let mut config = cascade_client::ClientConfig::new(seeds);
    config.attempts = 1;
    assert!(cascade_client::Client::connect(config).await.is_err(), "an SDK without a key is refused");

    // The CLI: `auth new-key` makes a key and its config entry; `--api-key` is presented.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cascade")).args(args).output().expect("run cascade")
    };
    let out = cli(&["-o", "json", "auth", "new-key", "--name", "gw-2", "--role", "gateway", "--role", "idp"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let key = made["key"].as_str().expect("key");
    assert_eq!(made["sha256"].as_str(), Some(key_hash(key).as_str()));
    assert_eq!(made["roles"], "gateway,idp");
    let out = cli(&["auth", "new-key", "--name", "x", "--role", "root"]);
    assert_eq!(out.status.code(), Some(2), "an unknown role is a usage error");
    let addr = format!("http://{}", members[2].addr);
    let revoke = ["--addr", addr.as_str(), "revoke", "user", "--tenant", "acme", "--user", "u2-1"];
    let out = cli(&revoke);
    assert_eq!(out.status.code(), Some(3), "no key: refused (exit 3)");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UNAUTHENTICATED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[&["--api-key", IDP][..], &revoke[..]].concat());
    assert_eq!(out.status.code(), Some(3), "idp may not revoke a user");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[&["--api-key", RESPONDER][..], &revoke[..]].concat());
    assert!(out.status.success(), "responder revokes a user: {}", String::from_utf8_lossy(&out.stderr));
    drop(members);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_rate_and_watch_limits() {
    let members = cluster_with(|c| {
        c.auth.requests_per_s_per_key = 20;
        c.auth.watch_streams_per_key_max = 2;
    })
    .await;
    let client = members[0].client().await;

    // Two watch streams per key on a node; the third is refused until one closes.
    let watch = |key: &'static str| {
        let mut c = client.clone();
        async move { c.watch_revocations(keyed(pb::WatchRevocationsRequest::default(), Some(key))).await }
    };
    let first = watch(GATEWAY).await.expect("first stream");
    let _second = watch(GATEWAY).await.expect("second stream");
    let s = watch(GATEWAY).await.expect_err("third stream");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    drop(first);
    poll_until("a stream slot after one closed", STATE_DEADLINE, || async { watch(GATEWAY).await.ok() })
        .await;

    // 20 requests/s per key: a burst of 100 is mostly refused; another key is not affected.
    let mut refused = 0;
    for _ in 0..100 {
        let mut c = client.clone();
        match c.check_session(keyed(check_req(&unknown_session_id(0), "", 0), Some(GATEWAY))).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert!(refused >= 50, "only {refused} of 100 refused at 20/s");
    let mut c = client.clone();
    c.check_session(keyed(check_req(&unknown_session_id(0), "", 0), Some(IDP))).await.expect("another key");
    // Over HTTP: 429, not 401/403 (forward-auth must not call the user's token bad).
    let http = members[0].config.http_listen.expect("HTTP address");
    let mut statuses = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let a = request(http, "GET", "/forward-auth", &[("X-Cascade-Api-Key", GATEWAY)], "").await;
        statuses.insert(a.status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let m = request(http, "GET", "/metrics", &[], "").await;
    assert!(m.body.contains("reason=\"rate_limited\""), "{}", m.body);
    drop(members);
}
