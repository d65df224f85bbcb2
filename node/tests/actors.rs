//! The user-actor cache: bounded in number (P6), passivated when idle, rebuilt from storage with
//! every acknowledged write, and fed updates so a check after an acknowledged revoke sees it.

mod support;

use cascade_protocol::pb;
use std::time::Duration;
use support::*;

fn check(id: &str) -> pb::CheckSessionRequest {
    pb::CheckSessionRequest {
        session_id: id.to_owned(),
        jkt: String::new(),
        required_aal: 0,
        linearizable: false,
    }
}

async fn live_actors(client: &mut Client) -> u64 {
    client.node_status(pb::NodeStatusRequest {}).await.expect("status").into_inner().live_user_actors
}

/// P6: never more live user actors than configured; passivated users answer from storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_actors_are_bounded_and_rebuilt_from_storage() {
    let mut t = TestNode::start_with(|c| {
        c.shards = 1;
        c.user_actors_per_shard_max = 2;
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let resp =
            t.client.create_session(create_req("acme", &format!("u{i}"), "web")).await.expect("create");
        ids.push(resp.into_inner().session_id);
    }
    for _round in 0..2 {
        for id in &ids {
            // The second check in a row activates the user.
            for _ in 0..2 {
                let r = t.client.check_session(check(id)).await.expect("check").into_inner();
                assert_eq!(r.status, pb::CheckStatus::Valid as i32, "{id}");
            }
            assert!(live_actors(&mut t.client).await <= 2, "more live user actors than the bound");
        }
    }
    assert_eq!(live_actors(&mut t.client).await, 2, "u4 and u5 are live");
    // u0's actor was passivated long ago; its revoke must still be seen by the next check.
    let revoke = pb::RevokeUserRequest { tenant: "acme".into(), user_id: "u0".into(), revocation: None };
    t.client.revoke_user(revoke).await.expect("revoke");
    let r = t.client.check_session(check(&ids[0])).await.expect("check").into_inner();
    assert_eq!(r.status, pb::CheckStatus::Revoked as i32);
    // u5's actor is live right now; a revoke reaches it through the update path.
    let revoke = pb::RevokeSessionRequest { session_id: ids[5].clone(), revocation: None };
    t.client.revoke_session(revoke).await.expect("revoke");
    let r = t.client.check_session(check(&ids[5])).await.expect("check").into_inner();
    assert_eq!(r.status, pb::CheckStatus::Revoked as i32);
    t.node.stop().await;
}

/// Idle user actors are passivated by the shard's sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_user_actors_are_passivated() {
    let mut t = TestNode::start_with(|c| {
        c.shards = 1;
        c.user_idle_ms = 100;
    })
    .await;
    let id = t
        .client
        .create_session(create_req("acme", "idle", "web"))
        .await
        .expect("create")
        .into_inner()
        .session_id;
    t.client.check_session(check(&id)).await.expect("check");
    t.client.check_session(check(&id)).await.expect("check");
    assert_eq!(live_actors(&mut t.client).await, 1, "a second check activates the user");
    poll_until("user actors passivated", Duration::from_secs(10), || {
        let mut c = t.client.clone();
        async move { (live_actors(&mut c).await == 0).then_some(()) }
    })
    .await;
    let r = t.client.check_session(check(&id)).await.expect("check").into_inner();
    assert_eq!(r.status, pb::CheckStatus::Valid as i32);
    t.node.stop().await;
}

/// A user checked once is answered from storage and not activated; a second check soon after
/// activates it, and from then on its actor sees every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_activated_on_its_second_check() {
    let mut t = TestNode::start_with(|c| c.shards = 1).await;
    let mut ids = Vec::new();
    for user in ["once", "twice", "revoked-first"] {
        let resp = t.client.create_session(create_req("acme", user, "web")).await.expect("create");
        ids.push(resp.into_inner().session_id);
    }
    let r = t.client.check_session(check(&ids[0])).await.expect("check").into_inner();
    assert_eq!(r.status, pb::CheckStatus::Valid as i32);
    assert_eq!(live_actors(&mut t.client).await, 0, "one check activated the user");
    for _ in 0..2 {
        let r = t.client.check_session(check(&ids[1])).await.expect("check").into_inner();
        assert_eq!(r.status, pb::CheckStatus::Valid as i32);
    }
    assert_eq!(live_actors(&mut t.client).await, 1, "a second check did not activate the user");
    // Both paths see an acknowledged revoke: from storage (a user never checked), and through
    // the live actor.
    for id in [&ids[2], &ids[1]] {
        let revoke = pb::RevokeSessionRequest { session_id: id.clone(), revocation: None };
        t.client.revoke_session(revoke).await.expect("revoke");
        let r = t.client.check_session(check(id)).await.expect("check").into_inner();
        assert_eq!(r.status, pb::CheckStatus::Revoked as i32, "{id}");
    }
    t.node.stop().await;
}
