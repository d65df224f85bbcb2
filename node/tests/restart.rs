//! Durability across restarts (P1): every acknowledged write — create, rotate, step-up, revoke,
//! watermark — is there after `kill -9` of the `cascade serve` process and a restart on the same
//! data dir, and after a graceful in-process restart.

mod support;

use cascade_protocol::pb;
use std::sync::{Arc, Mutex};
use support::*;

const TENANT: &str = "acme";

/// What a check of a session must answer after a restart.
#[derive(Clone, Debug)]
struct Expected {
    session_id: String,
    /// Key to present (bound sessions).
    jkt: String,
    status: pb::CheckStatus,
    reason: pb::ReasonCode,
    aal: u32,
}

impl Expected {
    fn valid(session_id: &str) -> Expected {
        Expected {
            session_id: session_id.to_owned(),
            jkt: String::new(),
            status: pb::CheckStatus::Valid,
            reason: pb::ReasonCode::ReasonUnspecified,
            aal: 1,
        }
    }

    fn revoked(session_id: &str, reason: pb::ReasonCode) -> Expected {
        Expected { status: pb::CheckStatus::Revoked, reason, ..Expected::valid(session_id) }
    }

    fn with_jkt(mut self, jkt: &str) -> Expected {
        self.jkt = jkt.to_owned();
        self
    }

    fn with_aal(mut self, aal: u32) -> Expected {
        self.aal = aal;
        self
    }
}

/// A refresh family whose rotations were acknowledged: every token issued, oldest first.
#[derive(Clone, Debug)]
struct Family {
    session_id: String,
    user_id: String,
    tokens: Vec<String>,
}

/// Everything acknowledged so far, to check after a restart.
#[derive(Default)]
struct Ledger {
    sessions: Vec<Expected>,
    families: Vec<Family>,
}

/// Acknowledged writes of one round, on users prefixed `round`: each kind of write the node offers.
async fn write_round(client: &mut Client, round: &str, ledger: &mut Ledger) {
    // Plain, bound and stepped-up sessions on users spread over the shards.
    for i in 0..8 {
        let user = format!("{round}-user{i}");
        let plain = create(client, create_req(TENANT, &user, "web")).await.session_id;
        ledger.sessions.push(Expected::valid(&plain));
        let key = jkt(&format!("{user} phone"));
        let phone = create(client, bound(create_req(TENANT, &user, "app"), "phone", &key)).await.session_id;
        ledger.sessions.push(Expected::valid(&phone).with_jkt(&key));
        let stepped = create(client, create_req(TENANT, &user, "admin")).await.session_id;
        let resp = client
            .step_up_session(pb::StepUpSessionRequest {
                session_id: stepped.clone(),
                aal: 3,
                amr: vec!["hwk".into()],
            })
            .await
            .expect("step up")
            .into_inner();
        assert_eq!(resp.aal, 3);
        ledger.sessions.push(Expected::valid(&stepped).with_aal(3));
    }

    // Refresh families rotated twice.
    for i in 0..4 {
        let user = format!("{round}-refresh{i}");
        let created = create(client, with_refresh(create_req(TENANT, &user, "web"))).await;
        let mut tokens = vec![created.refresh_token];
        for generation in 2..=3 {
            let rotated = client
                .rotate_refresh_token(pb::RotateRefreshTokenRequest {
                    refresh_token: tokens.last().cloned().expect("token"),
                })
                .await
                .expect("rotate")
                .into_inner();
            assert_eq!(rotated.generation, generation);
            tokens.push(rotated.refresh_token);
        }
        ledger.sessions.push(Expected::valid(&created.session_id));
        ledger.families.push(Family { session_id: created.session_id, user_id: user, tokens });
    }

    // A family revoked by reuse detection.
    let user = format!("{round}-replayed");
    let created = create(client, with_refresh(create_req(TENANT, &user, "web"))).await;
    client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: created.refresh_token.clone() })
        .await
        .expect("rotate");
    let reuse = client
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: created.refresh_token })
        .await
        .expect("reuse")
        .into_inner();
    assert!(reuse.reuse_detected);
    ledger.sessions.push(Expected::revoked(&created.session_id, pb::ReasonCode::RefreshTokenReuse));

    // SSO cascades.
    for i in 0..4 {
        let user = format!("{round}-sso{i}");
        let root = create(client, create_req(TENANT, &user, "web")).await.session_id;
        let child = create(client, child_of(create_req(TENANT, &user, "mail"), &root)).await.session_id;
        let keep = create(client, create_req(TENANT, &user, "web")).await.session_id;
        let revoked = client
            .revoke_session(pb::RevokeSessionRequest {
                session_id: root.clone(),
                revocation: revocation(pb::ReasonCode::Logout),
            })
            .await
            .expect("revoke")
            .into_inner();
        assert_eq!(sorted(&revoked.revoked_session_ids), sorted_ids(&[&root, &child]));
        ledger.sessions.push(Expected::revoked(&root, pb::ReasonCode::Logout));
        ledger.sessions.push(Expected::revoked(&child, pb::ReasonCode::ParentRevoked));
        ledger.sessions.push(Expected::valid(&keep));
    }

    // Family, device and user revocations.
    let user = format!("{round}-family");
    let fam = create(client, with_refresh(create_req(TENANT, &user, "web"))).await.session_id;
    client
        .revoke_family(pb::RevokeFamilyRequest {
            session_id: fam.clone(),
            revocation: revocation(pb::ReasonCode::Compromised),
        })
        .await
        .expect("revoke family");
    ledger.sessions.push(Expected::revoked(&fam, pb::ReasonCode::Compromised));

    let user = format!("{round}-lost-phone");
    let key = jkt(&user);
    let on_phone = create(client, bound(create_req(TENANT, &user, "app"), "phone", &key)).await.session_id;
    let elsewhere = create(client, create_req(TENANT, &user, "web")).await.session_id;
    client
        .revoke_device(pb::RevokeDeviceRequest {
            tenant: TENANT.into(),
            user_id: user.clone(),
            device_id: "phone".into(),
            revocation: revocation(pb::ReasonCode::Compromised),
        })
        .await
        .expect("revoke device");
    ledger.sessions.push(Expected::revoked(&on_phone, pb::ReasonCode::DeviceRevoked).with_jkt(&key));
    ledger.sessions.push(Expected::valid(&elsewhere));

    let user = format!("{round}-fired");
    let a = create(client, create_req(TENANT, &user, "web")).await.session_id;
    let b = create(client, create_req(TENANT, &user, "mail")).await.session_id;
    client
        .revoke_user(pb::RevokeUserRequest {
            tenant: TENANT.into(),
            user_id: user,
            revocation: revocation(pb::ReasonCode::Admin),
        })
        .await
        .expect("revoke user");
    ledger.sessions.push(Expected::revoked(&a, pb::ReasonCode::UserRevoked));
    ledger.sessions.push(Expected::revoked(&b, pb::ReasonCode::UserRevoked));

    // A tenant watermark (every shard) over sessions of a tenant of its own.
    let tenant = format!("{round}-tenant");
    let mut doomed = Vec::new();
    for i in 0..4 {
        doomed.push(create(client, create_req(&tenant, &format!("u{i}"), "web")).await.session_id);
    }
    client
        .set_watermark(pb::SetWatermarkRequest {
            scope: pb::WatermarkScope::Tenant as i32,
            tenant,
            not_before_ms: 0,
            revocation: revocation(pb::ReasonCode::Policy),
            ..Default::default()
        })
        .await
        .expect("tenant watermark");
    for sid in &doomed {
        ledger.sessions.push(Expected::revoked(sid, pb::ReasonCode::Watermark));
    }
}

/// Every session in the ledger answers as expected, and every family is at its last generation.
async fn verify(client: &mut Client, ledger: &Ledger, after: &str) {
    for chunk in ledger.sessions.chunks(100) {
        let checks: Vec<_> = chunk.iter().map(|e| check_req(&e.session_id, &e.jkt, 0)).collect();
        let results = retry_unavailable(|| {
            let (mut client, checks) = (client.clone(), checks.clone());
            async move { client.check_session_batch(pb::CheckSessionBatchRequest { checks }).await }
        })
        .await
        .unwrap_or_else(|s| panic!("{after}: batch check: {s:?}"))
        .into_inner()
        .results;
        assert_eq!(results.len(), chunk.len(), "{after}");
        for (expected, resp) in chunk.iter().zip(&results) {
            assert_eq!(resp.status(), expected.status, "{after}: {expected:?} answered {resp:?}");
            if expected.status == pb::CheckStatus::Revoked {
                assert_eq!(resp.reason(), expected.reason, "{after}: {expected:?} answered {resp:?}");
            }
            if expected.status == pb::CheckStatus::Valid {
                assert_eq!(resp.aal, expected.aal, "{after}: {expected:?} answered {resp:?}");
            }
        }
    }
    for family in &ledger.families {
        let list = retry_unavailable(|| {
            let mut client = client.clone();
            let request =
                pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: family.user_id.clone() };
            async move { client.list_user_sessions(request).await }
        })
        .await
        .unwrap_or_else(|s| panic!("{after}: list {}: {s:?}", family.user_id))
        .into_inner();
        let listed =
            list.sessions.iter().find(|s| s.session_id == family.session_id).expect("family session listed");
        assert_eq!(
            listed.refresh_generation as usize,
            family.tokens.len(),
            "{after}: rotated refresh generation kept: {listed:?}"
        );
    }
}

/// Rotate every family once more with its newest token (the stored secret hash survived), then
/// replay its previous token (the superseded hashes survived): reuse detected, family revoked.
async fn rotate_and_replay(client: &mut Client, ledger: &mut Ledger, after: &str) {
    for family in &mut ledger.families {
        let newest = family.tokens.last().cloned().expect("token");
        let rotated = client
            .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: newest.clone() })
            .await
            .unwrap_or_else(|s| panic!("{after}: rotate the newest token of {}: {s:?}", family.session_id))
            .into_inner();
        assert!(!rotated.reuse_detected, "{after}: {rotated:?}");
        assert_eq!(rotated.generation as usize, family.tokens.len() + 1, "{after}");
        let replay = client
            .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: newest })
            .await
            .unwrap_or_else(|s| panic!("{after}: replay of {}: {s:?}", family.session_id))
            .into_inner();
        assert!(replay.reuse_detected, "{after}: replay after restart: {replay:?}");
        assert_eq!(replay.revoked_session_ids, vec![family.session_id.clone()], "{after}");
        family.tokens.push(rotated.refresh_token);
    }
    for expected in &mut ledger.sessions {
        if ledger.families.iter().any(|f| f.session_id == expected.session_id) {
            *expected = Expected::revoked(&expected.session_id, pb::ReasonCode::RefreshTokenReuse);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_every_acknowledged_write() {
    // Protects P1 durability: an acknowledged write survives kill -9 of the only node (RPO = 0).
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let log = dir.path().join("cascade.log");
    let addr = free_loopback_addr();
    let mut ledger = Ledger::default();

    let mut server = ServerProcess::spawn(addr, &data_dir, &log);
    let mut client = server.client().await;
    write_round(&mut client, "r1", &mut ledger).await;
    verify(&mut client, &ledger, "before the first kill").await;
    drop(client);
    server.kill_9();

    // Same data dir, same port.
    let mut server = ServerProcess::spawn(addr, &data_dir, &log);
    let mut client = server.client().await;
    verify(&mut client, &ledger, "after the first kill -9").await;
    // Writes after recovery go on the recovered log, and survive a second kill.
    write_round(&mut client, "r2", &mut ledger).await;
    drop(client);
    server.kill_9();

    let mut server = ServerProcess::spawn(addr, &data_dir, &log);
    let mut client = server.client().await;
    verify(&mut client, &ledger, "after the second kill -9").await;
    rotate_and_replay(&mut client, &mut ledger, "after the second kill -9").await;
    drop(client);
    server.kill_9();

    // On a new port this time: nothing durable may depend on the address.
    let mut server = ServerProcess::spawn(free_loopback_addr(), &data_dir, &log);
    let mut client = server.client().await;
    verify(&mut client, &ledger, "after the third kill -9, on a new port").await;
}

/// Wait until every shard has taken a snapshot, so a restart recovers from snapshot + log tail.
async fn wait_for_snapshots(client: &mut Client) {
    poll_until("a snapshot on every shard", STATE_DEADLINE, || {
        let mut client = client.clone();
        async move {
            let status = client.node_status(pb::NodeStatusRequest {}).await.ok()?.into_inner();
            status.shards.iter().all(|s| s.snapshot_index > 0).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_snapshots_keeps_every_acknowledged_write() {
    // Protects P1 when recovery starts from a snapshot plus the log after it (kill -9, RPO = 0).
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let log = dir.path().join("cascade.log");
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "snapshot_every_n_logs = 8\n").expect("write config");
    let addr = free_loopback_addr();
    let mut ledger = Ledger::default();

    let mut server = ServerProcess::spawn_with_config(addr, &data_dir, &log, Some(&config));
    let mut client = server.client().await;
    write_round(&mut client, "s1", &mut ledger).await;
    wait_for_snapshots(&mut client).await;
    // Writes after the snapshots live only in the log tail.
    write_round(&mut client, "s2", &mut ledger).await;
    drop(client);
    server.kill_9();

    let mut server = ServerProcess::spawn_with_config(addr, &data_dir, &log, Some(&config));
    let mut client = server.client().await;
    verify(&mut client, &ledger, "after kill -9 with snapshots").await;
    rotate_and_replay(&mut client, &mut ledger, "after kill -9 with snapshots").await;
    drop(client);
    server.kill_9();

    let mut server = ServerProcess::spawn_with_config(addr, &data_dir, &log, Some(&config));
    let mut client = server.client().await;
    verify(&mut client, &ledger, "after a second kill -9 with snapshots").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_concurrent_writes_loses_no_acknowledged_create() {
    // Protects P1 under load: creates acknowledged right up to the kill -9 are all there afterwards.
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let log = dir.path().join("cascade.log");
    let addr = free_loopback_addr();

    let mut server = ServerProcess::spawn(addr, &data_dir, &log);
    let client = server.client().await;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut client = client.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            // Bounded: stops at the first failure (the kill) or after 20 000 creates.
            for i in 0..20_000 {
                let req = create_req(TENANT, &format!("writer{w}-user{}", i % 50), "web");
                match client.create_session(req).await {
                    Ok(resp) => acked.lock().expect("ledger lock").push(resp.into_inner().session_id),
                    Err(_) => break,
                }
            }
        }));
    }
    poll_until("1000 acknowledged creates", STATE_DEADLINE, || {
        let acked = acked.clone();
        async move { (acked.lock().expect("ledger lock").len() >= 1000).then_some(()) }
    })
    .await;
    server.kill_9();
    for writer in writers {
        tokio::time::timeout(STATE_DEADLINE, writer)
            .await
            .expect("writer stops after the kill")
            .expect("writer");
    }
    drop(client);
    let acked = acked.lock().expect("ledger lock").clone();
    assert!(acked.len() >= 1000);

    let mut server = ServerProcess::spawn(addr, &data_dir, &log);
    let client = server.client().await;
    // Each writer has at most 50 users and the default limit is 100 sessions per user, so no
    // acknowledged session was evicted as long as no user got more than 100 sessions.
    let per_user_max = acked.len() / 4 / 50 + 1;
    assert!(per_user_max <= 100, "test sizing: {} creates would trigger evictions", acked.len());
    for chunk in acked.chunks(256) {
        let checks: Vec<_> = chunk.iter().map(|sid| check_req(sid, "", 0)).collect();
        let results = retry_unavailable(|| {
            let (mut client, checks) = (client.clone(), checks.clone());
            async move { client.check_session_batch(pb::CheckSessionBatchRequest { checks }).await }
        })
        .await
        .expect("batch check after restart")
        .into_inner()
        .results;
        for (sid, resp) in chunk.iter().zip(&results) {
            assert_eq!(resp.status(), pb::CheckStatus::Valid, "acknowledged {sid} after kill -9: {resp:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_in_process_keeps_state() {
    // Protects P1 across a graceful restart, with snapshots taken often so recovery uses snapshot + log.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = test_config(dir.path());
    config.snapshot_every_n_logs = 8;
    let mut ledger = Ledger::default();

    let node = InProcessNode::start(config.clone()).await;
    let mut client = node.client().await;
    write_round(&mut client, "g1", &mut ledger).await;
    verify(&mut client, &ledger, "before the graceful restart").await;
    wait_for_snapshots(&mut client).await;
    drop(client);
    node.stop().await;

    let node = InProcessNode::start(config.clone()).await;
    let mut client = node.client().await;
    verify(&mut client, &ledger, "after the graceful restart").await;
    write_round(&mut client, "g2", &mut ledger).await;
    rotate_and_replay(&mut client, &mut ledger, "after the graceful restart").await;
    drop(client);
    node.stop().await;

    let node = InProcessNode::start(config).await;
    let mut client = node.client().await;
    verify(&mut client, &ledger, "after the second graceful restart").await;
    node.stop().await;
}
