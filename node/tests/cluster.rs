//! A real 3-node, 3-region cluster on loopback (in one process, real sockets): replication of
//! every write kind, forwarding, leader loss with writes continuing, a minority partition that
//! stops answering VALID within the revocation bound, restart with catch-up, and nodes added and
//! removed while writes run. No acknowledged write may be lost in any of them (P1, P2, P4).

mod support;

use cascade_protocol::pb;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::cluster::{user_on_shard, TestCluster, REGIONS};
use support::*;

const N_SHARDS: u16 = 4;
/// The default revocation bound (P2).
const BOUND: Duration = Duration::from_millis(500);

fn shard_of(session_id: &str) -> u16 {
    session_id.parse::<cascade_protocol::ids::SessionId>().expect("session id").shard
}

/// Check on `client`, retrying UNAVAILABLE (a replica may still be proving freshness) until an answer.
async fn check_eventually(client: &Client, session_id: &str) -> pb::CheckSessionResponse {
    poll_until(&format!("an answer for {session_id}"), STATE_DEADLINE, || {
        let mut client = client.clone();
        async move { client.check_session(check_req(session_id, "", 0)).await.ok().map(|r| r.into_inner()) }
    })
    .await
}

/// P1/P4: every write kind made through one node is applied on every replica, whichever node
/// leads the shard; any node accepts any request (writes forwarded to the leader, reads answered
/// by a fresh local replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_kind_replicates_and_any_node_serves() {
    let cluster = TestCluster::start(3, N_SHARDS).await;
    let mut clients = Vec::new();
    for m in &cluster.members {
        clients.push(m.client().await);
    }
    // Placement: every shard has 3 voters in 3 distinct regions.
    let status = cluster.members[0].status().await;
    assert_eq!(status.nodes.len(), 3, "{status:?}");
    for s in &status.shards {
        assert_eq!(s.voters.len(), 3, "shard {}: {:?}", s.shard, s.voters);
    }

    let tenant = "acme";
    let mut a = clients[0].clone();
    let root =
        create(&mut a, with_refresh(bound(create_req(tenant, "alice", "web"), "laptop", &jkt("k1")))).await;
    let child =
        create(&mut clients[1].clone(), child_of(create_req(tenant, "alice", "mail"), &root.session_id))
            .await;
    let phone =
        create(&mut clients[2].clone(), bound(create_req(tenant, "alice", "app"), "phone", &jkt("k2"))).await;
    let bob = create(&mut a, create_req(tenant, "bob", "web")).await;
    let carol = create(&mut a, create_req(tenant, "carol", "web")).await;
    // A local replica may answer from state up to the bound old (P2): a write is promised on every
    // node once the bound has passed since its acknowledgement, not before.
    tokio::time::sleep(BOUND).await;

    // Every node answers every session, locally once fresh.
    for (i, c) in clients.iter().enumerate() {
        for id in [&child.session_id, &bob.session_id] {
            let r = check_eventually(c, id).await;
            assert_valid(&r, &format!("node {i} session {id}"));
            let f = r.freshness.expect("freshness");
            assert!(f.staleness_bound_ms <= BOUND.as_millis() as u64, "{f:?}");
        }
    }

    // Device-bound sessions answer VALID only for their key.
    for (i, c) in clients.iter().enumerate() {
        for (id, key) in [(&root.session_id, "k1"), (&phone.session_id, "k2")] {
            let r = c.clone().check_session(check_req(id, &jkt(key), 0)).await.expect("check").into_inner();
            assert_valid(&r, &format!("node {i} session {id} with its key"));
            let r =
                c.clone().check_session(check_req(id, &jkt("other"), 0)).await.expect("check").into_inner();
            assert_eq!(r.status(), pb::CheckStatus::DeviceMismatch, "node {i}");
        }
    }

    // Step-up via node 3, rotate via node 2, touch via node 1.
    let stepped = clients[2]
        .clone()
        .step_up_session(pb::StepUpSessionRequest {
            session_id: root.session_id.clone(),
            aal: 2,
            amr: vec!["otp".to_owned()],
        })
        .await
        .expect("step up")
        .into_inner();
    assert_eq!(stepped.aal, 2);
    let rotated = clients[1]
        .clone()
        .rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token: root.refresh_token.clone() })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.generation, 2);
    clients[0]
        .clone()
        .touch_session(pb::TouchSessionRequest { session_id: bob.session_id.clone() })
        .await
        .expect("touch");

    // Revocations via different nodes; each is visible on every node.
    clients[2]
        .clone()
        .revoke_device(pb::RevokeDeviceRequest {
            tenant: tenant.to_owned(),
            user_id: "alice".to_owned(),
            device_id: "phone".to_owned(),
            revocation: revocation(pb::ReasonCode::Compromised),
        })
        .await
        .expect("revoke device");
    clients[1]
        .clone()
        .revoke_family(pb::RevokeFamilyRequest {
            session_id: root.session_id.clone(),
            revocation: revocation(pb::ReasonCode::Admin),
        })
        .await
        .expect("revoke family");
    clients[0]
        .clone()
        .revoke_user(pb::RevokeUserRequest {
            tenant: tenant.to_owned(),
            user_id: "bob".to_owned(),
            revocation: revocation(pb::ReasonCode::Compromised),
        })
        .await
        .expect("revoke user");
    let wm = clients[2]
        .clone()
        .set_watermark(pb::SetWatermarkRequest {
            scope: pb::WatermarkScope::Tenant as i32,
            tenant: tenant.to_owned(),
            not_before_ms: 0,
            revocation: revocation(pb::ReasonCode::Policy),
            ..Default::default()
        })
        .await
        .expect("tenant watermark")
        .into_inner();
    assert_eq!(wm.shards, u32::from(N_SHARDS));
    // P2: every check that starts after the last acknowledgement + the bound sees every revocation.
    tokio::time::sleep(BOUND).await;
    for (i, c) in clients.iter().enumerate() {
        for id in [&root.session_id, &child.session_id, &phone.session_id, &bob.session_id, &carol.session_id]
        {
            let r = check_eventually(c, id).await;
            assert_eq!(r.status(), pb::CheckStatus::Revoked, "node {i} session {id}: {r:?}");
        }
        let list = c
            .clone()
            .list_user_sessions(pb::ListUserSessionsRequest {
                tenant: tenant.to_owned(),
                user_id: "alice".to_owned(),
            })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(list.sessions.len(), 3, "node {i}");
    }
    // A linearizable check works from any node.
    for c in &clients {
        let mut req = check_req(&carol.session_id, "", 0);
        req.linearizable = true;
        let r = c.clone().check_session(req).await.expect("linearizable check").into_inner();
        assert_eq!(r.status(), pb::CheckStatus::Revoked);
    }
}

/// Creates `n` sessions (users `{prefix}0..`) through `client`, one every 20 ms; the ids
/// acknowledged and the number of failed writes.
fn spawn_writer(
    client: Client,
    prefix: &'static str,
    n: usize,
) -> tokio::task::JoinHandle<(Vec<String>, usize)> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut failed = 0;
        for i in 0..n {
            let mut c = client.clone();
            match c.create_session(create_req("acme", &format!("{prefix}{i}"), "web")).await {
                Ok(r) => acked.push(r.into_inner().session_id),
                Err(_) => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (acked, failed)
    })
}

/// `transfer-leader` of `shard` to `to` through the first node. The server may take up to its
/// TRANSFER_TIMEOUT (10 s): the call gets a connection with a longer deadline.
async fn transfer_leader(cluster: &TestCluster, shard: u16, to: u64) -> pb::TransferLeaderResponse {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.members[0].addr))
        .expect("endpoint")
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .expect("connect");
    pb::cascade_client::CascadeClient::new(channel)
        .transfer_leader(pb::TransferLeaderRequest { shard: u32::from(shard), to_node: to })
        .await
        .unwrap_or_else(|s| panic!("transfer to {to}: {s:?}"))
        .into_inner()
}

/// P4/P1: when a shard's leader stops, another replica takes over and writes through the
/// survivors continue; nothing acknowledged before is lost. Leadership can be transferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_elects_a_new_leader_and_loses_nothing() {
    let mut cluster = TestCluster::start(3, N_SHARDS).await;
    let shard = 1;
    let user = user_on_shard("acme", "u", shard, N_SHARDS);

    // Transfer leadership of the shard to a node that does not lead it.
    let mut c0 = cluster.members[0].client().await;
    let before = cluster.leader_of(shard).await;
    let to = cluster.members.iter().map(|m| m.id).find(|id| *id != before).expect("another node");
    let r = transfer_leader(&cluster, shard, to).await;
    assert_eq!(r.leader, to);
    eprintln!("transfer-leader {before} -> {to} took {} ms", r.took_ms);

    let mut acked = Vec::new();
    for _ in 0..10 {
        acked.push(create(&mut c0, create_req("acme", &user, "web")).await.session_id);
    }
    let leader = cluster.leader_of(shard).await;
    cluster.by_id(leader).stop().await;
    let survivor = cluster.members.iter().find(|m| m.is_running()).expect("a survivor");
    let client = survivor.client().await;
    let start = Instant::now();
    let fresh = poll_until("a write on the shard after the leader stopped", STATE_DEADLINE, || {
        let mut client = client.clone();
        let req = create_req("acme", &user, "web");
        async move { client.create_session(req).await.ok().map(|r| r.into_inner().session_id) }
    })
    .await;
    eprintln!("failover: first write {} ms after the leader stopped", start.elapsed().as_millis());
    acked.push(fresh);
    for m in cluster.members.iter().filter(|m| m.is_running()) {
        let c = m.client().await;
        for id in &acked {
            assert_valid(&check_eventually(&c, id).await, &format!("node {} after failover", m.id));
        }
    }
    assert_ne!(cluster.leader_of(shard).await, leader);

    // A transfer to the stopped node gives up once it failed to catch up twice (each attempt
    // holds the shard's writes back), instead of retrying for the whole TRANSFER_TIMEOUT.
    let err = client
        .clone()
        .transfer_leader(pb::TransferLeaderRequest { shard: u32::from(shard), to_node: leader })
        .await
        .expect_err("a transfer to a stopped node");
    assert!(err.message().contains("gave up after 2 attempts"), "{err:?}");
    assert!(err.message().contains("did not catch up"), "{err:?}");
}

/// P2: a leader cut off from its quorum stops answering VALID within the revocation bound; a
/// revocation acknowledged by the majority side is never contradicted by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_stops_answering_valid_within_the_bound() {
    let cluster = TestCluster::start(3, N_SHARDS).await;
    let shard = 2;
    let user = user_on_shard("acme", "p", shard, N_SHARDS);
    let mut c0 = cluster.members[0].client().await;
    let session = create(&mut c0, create_req("acme", &user, "web")).await.session_id;
    assert_eq!(shard_of(&session), shard);
    let leader = cluster.leader_of(shard).await;
    let isolated = cluster.members.iter().find(|m| m.id == leader).expect("leader member");
    let majority: Vec<&support::cluster::Member> =
        cluster.members.iter().filter(|m| m.id != leader).collect();
    let isolated_client = isolated.client().await;
    assert_valid(&check_eventually(&isolated_client, &session).await, "before the partition");

    cluster.isolate(leader);
    // The majority elects a new leader and acknowledges a revocation.
    let majority_client = majority[0].client().await;
    let revoked = poll_until("a revocation on the majority side", STATE_DEADLINE, || {
        let mut client = majority_client.clone();
        let session = session.clone();
        async move {
            client
                .revoke_session(pb::RevokeSessionRequest {
                    session_id: session,
                    revocation: revocation(pb::ReasonCode::Compromised),
                })
                .await
                .ok()
        }
    })
    .await;
    let acked_at = Instant::now();
    assert_eq!(revoked.into_inner().revoked_session_ids, vec![session.clone()]);

    // From ack + bound on, the isolated node must not say VALID (it cannot know about the
    // revocation, so it must refuse). Probe for a while; every answer after the bound counts.
    let mut refusals = 0;
    let probe_until = acked_at + BOUND + Duration::from_secs(2);
    while Instant::now() < probe_until {
        let started = Instant::now();
        let answer = isolated_client.clone().check_session(check_req(&session, "", 0)).await;
        if started >= acked_at + BOUND {
            match answer {
                Ok(r) => assert_ne!(
                    r.get_ref().status(),
                    pb::CheckStatus::Valid,
                    "isolated node answered VALID {} ms after the revocation was acknowledged",
                    started.duration_since(acked_at).as_millis()
                ),
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                    refusals += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refusals > 0, "the isolated node never refused");
    // The majority side answers REVOKED.
    for m in &majority {
        let r = check_eventually(&m.client().await, &session).await;
        assert_eq!(r.status(), pb::CheckStatus::Revoked);
    }
    // After healing, the old leader catches up and answers REVOKED too.
    cluster.heal();
    let r = poll_until("the healed node to answer itself", STATE_DEADLINE, || {
        let mut client = isolated_client.clone();
        let session = session.clone();
        async move {
            let r = client.check_session(check_req(&session, "", 0)).await.ok()?.into_inner();
            (r.freshness.as_ref().map(|f| f.node_id) == Some(leader)).then_some(r)
        }
    })
    .await;
    assert_eq!(r.status(), pb::CheckStatus::Revoked, "{r:?}");
}

/// P1: a stopped node restarts from its data dir and catches up on what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up() {
    let mut cluster = TestCluster::start(3, N_SHARDS).await;
    let third = cluster.members[2].id;
    cluster.by_id(third).stop().await;
    let mut c0 = cluster.members[0].client().await;
    let mut sessions = BTreeMap::new();
    for i in 0..20 {
        let s = create(&mut c0, create_req("acme", &format!("r{i}"), "web")).await.session_id;
        sessions.insert(s, pb::CheckStatus::Valid);
    }
    let revoked = sessions.keys().next().cloned().expect("a session");
    c0.revoke_session(pb::RevokeSessionRequest {
        session_id: revoked.clone(),
        revocation: revocation(pb::ReasonCode::Logout),
    })
    .await
    .expect("revoke");
    sessions.insert(revoked, pb::CheckStatus::Revoked);

    cluster.by_id(third).start().await;
    cluster.wait_ready().await;
    let client = cluster.by_id(third).client().await;
    for (id, expected) in &sessions {
        let r = poll_until(&format!("node {third} to answer {id} itself"), STATE_DEADLINE, || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let r = client.check_session(check_req(&id, "", 0)).await.ok()?.into_inner();
                (r.freshness.as_ref().map(|f| f.node_id) == Some(third)).then_some(r)
            }
        })
        .await;
        assert_eq!(r.status(), *expected, "{id}");
    }
}

/// A node that lost its disk rejoins by snapshot: the survivors have purged the log it would
/// need, so it can only catch up by the leaders streaming their snapshots to it (StreamSnapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_that_lost_its_disk_rejoins_by_snapshot() {
    const EVERY: u64 = 8;
    let mut cluster = TestCluster::start_with(3, N_SHARDS, |c| c.snapshot_every_n_logs = EVERY).await;
    let third = cluster.members[2].id;
    cluster.by_id(third).stop().await;
    let data_dir = cluster.by_id(third).config.data_dir.clone();
    std::fs::remove_dir_all(&data_dir).expect("wipe the data dir");
    std::fs::create_dir_all(&data_dir).expect("recreate the data dir");

    let mut c0 = cluster.members[0].client().await;
    let mut sessions = BTreeMap::new();
    for shard in 0..N_SHARDS {
        let user = user_on_shard("acme", &format!("d{shard}"), shard, N_SHARDS);
        for _ in 0..3 * EVERY {
            let s = create(&mut c0, create_req("acme", &user, "web")).await.session_id;
            sessions.insert(s, pb::CheckStatus::Valid);
        }
    }
    let revoked = sessions.keys().next().cloned().expect("a session");
    c0.revoke_session(pb::RevokeSessionRequest {
        session_id: revoked.clone(),
        revocation: revocation(pb::ReasonCode::Logout),
    })
    .await
    .expect("revoke");
    sessions.insert(revoked, pb::CheckStatus::Revoked);
    // Every survivor snapshotted every shard well past the start of its log, and purged the log
    // up to `max_in_snapshot_log_to_keep` (EVERY / 4) entries before its snapshot.
    for m in cluster.members.iter().filter(|m| m.is_running()) {
        poll_until(&format!("node {} to snapshot every shard", m.id), STATE_DEADLINE, || async {
            let status = m.status().await;
            status.shards.iter().all(|s| s.snapshot_index >= 2 * EVERY).then_some(())
        })
        .await;
    }

    cluster.by_id(third).start().await;
    cluster.wait_ready().await;
    let client = cluster.by_id(third).client().await;
    for (id, expected) in &sessions {
        let r = poll_until(&format!("node {third} to answer {id} itself"), STATE_DEADLINE, || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let r = client.check_session(check_req(&id, "", 0)).await.ok()?.into_inner();
                (r.freshness.as_ref().map(|f| f.node_id) == Some(third)).then_some(r)
            }
        })
        .await;
        assert_eq!(r.status(), *expected, "{id}");
    }
}

/// Leaderships per node, as every running node reports them; `None` while they disagree or a
/// shard has no leader.
async fn leaders_per_node(cluster: &TestCluster) -> Option<BTreeMap<u64, usize>> {
    let mut seen = None;
    for m in cluster.members.iter().filter(|m| m.is_running()) {
        let s = m.client().await.node_status(pb::NodeStatusRequest {}).await.ok()?.into_inner();
        let leaders: Vec<u64> = s.shards.iter().map(|sh| sh.leader).collect();
        if leaders.contains(&0) || seen.as_ref().is_some_and(|l| *l != leaders) {
            return None;
        }
        seen = Some(leaders);
    }
    let mut led: BTreeMap<u64, usize> = cluster.members.iter().map(|m| (m.id, 0)).collect();
    for leader in seen? {
        *led.entry(leader).or_default() += 1;
    }
    Some(led)
}

/// P4: a failover piles leaderships onto the survivors; once the stopped node is back, they
/// spread out again by themselves (two each of six shards), with writes running throughout and
/// none of them lost; then they stay put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaderships_spread_out_again_after_a_failover() {
    const SHARDS: u16 = 6;
    let mut cluster = TestCluster::start_with(3, SHARDS, |c| c.cluster.leader_balance_ms = 300).await;
    let even = |led: &BTreeMap<u64, usize>| led.values().all(|n| *n == 2);
    let initial = poll_until("leaders agreed on", STATE_DEADLINE, || leaders_per_node(&cluster)).await;
    assert!(even(&initial), "placement spreads preferred leaders: {initial:?}");

    let writer = spawn_writer(cluster.members[0].client().await, "b", 300);

    let victim = cluster.members[2].id;
    cluster.by_id(victim).stop().await;
    let piled = poll_until("the survivors lead every shard", STATE_DEADLINE, || async {
        leaders_per_node(&cluster).await.filter(|led| led.get(&victim) == Some(&0))
    })
    .await;
    eprintln!("leaders per node after node {victim} stopped: {piled:?}");
    cluster.by_id(victim).start().await;
    let start = Instant::now();
    let spread = poll_until("leaderships spread out again", STATE_DEADLINE, || async {
        leaders_per_node(&cluster).await.filter(even)
    })
    .await;
    eprintln!("leaders per node {} ms after the restart: {spread:?}", start.elapsed().as_millis());
    // Balanced: nobody hands anything over any more (6 balancing periods).
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    let after = poll_until("leaders agreed on", STATE_DEADLINE, || leaders_per_node(&cluster)).await;
    assert_eq!(after, spread, "leaderships moved once even");

    let (acked, failed) = writer.await.expect("writer");
    eprintln!("writes during failover and balancing: {} acknowledged, {failed} failed", acked.len());
    assert!(acked.len() >= 250, "too few writes succeeded: {} ({failed} failed)", acked.len());
    for m in &cluster.members {
        let client = m.client().await;
        for id in &acked {
            assert_valid(&check_eventually(&client, id).await, &format!("{id} on node {}", m.id));
        }
    }
}

/// P4: with 5 replicas per shard (where the old leader's vote does not elect the target), an
/// operator's transfer-leader moves a leadership, and balancing spreads them out again, with
/// writes running and none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_hand_leadership_over() {
    const SHARDS: u16 = 5;
    let cluster = TestCluster::start_with(5, SHARDS, |c| {
        c.cluster.replicas = 5;
        c.cluster.leader_balance_ms = 300;
    })
    .await;
    let even = |led: &BTreeMap<u64, usize>| led.values().all(|n| *n == 1);
    let initial = poll_until("even leaderships", STATE_DEADLINE, || async {
        leaders_per_node(&cluster).await.filter(even)
    })
    .await;

    let writer = spawn_writer(cluster.members[0].client().await, "f", 150);

    let shard = 0;
    let before = cluster.leader_of(shard).await;
    let to = *initial.keys().find(|id| **id != before).expect("another node");
    let r = transfer_leader(&cluster, shard, to).await;
    assert_eq!(r.leader, to);
    eprintln!("5 replicas: transfer-leader {before} -> {to} took {} ms", r.took_ms);

    // Node `to` now leads two shards and `before` none: balancing hands one over again.
    let start = Instant::now();
    let spread = poll_until("leaderships spread out again", STATE_DEADLINE, || async {
        leaders_per_node(&cluster).await.filter(even)
    })
    .await;
    eprintln!("5 replicas: even again {} ms after the transfer: {spread:?}", start.elapsed().as_millis());

    let (acked, failed) = writer.await.expect("writer");
    eprintln!("5 replicas: writes during the handovers: {} acknowledged, {failed} failed", acked.len());
    assert!(acked.len() >= 100, "too few writes succeeded: {} ({failed} failed)", acked.len());
    for m in &cluster.members {
        let client = m.client().await;
        for id in &acked {
            assert_valid(&check_eventually(&client, id).await, &format!("{id} on node {}", m.id));
        }
    }
}

/// P1/P4: a node joins and another leaves while writes run; replicas move so each shard keeps 3
/// replicas in distinct regions, and every acknowledged write is still there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_added_and_removed_while_writes_run() {
    let mut cluster = TestCluster::start(3, N_SHARDS).await;
    // A fourth node in the third node's region, started to join.
    let mut joiner = TestCluster::member(2, N_SHARDS);
    joiner.config.cluster.join = true;
    joiner.start().await;
    let joiner_id = joiner.id;
    let joiner_addr = joiner.addr.to_string();
    cluster.members.push(joiner);
    let leaving = cluster.members[2].id;

    let writer = spawn_writer(cluster.members[0].client().await, "w", 150);

    let mut admin = cluster.members[1].client().await;
    let added = admin
        .add_node(pb::AddNodeRequest { node_id: joiner_id, addr: joiner_addr, region: REGIONS[2].to_owned() })
        .await
        .expect("add node")
        .into_inner();
    // The new node takes half of its region's replicas, from the node of the same region.
    assert_eq!(added.moves.len(), usize::from(N_SHARDS / 2), "{:?}", added.moves);
    for m in &added.moves {
        assert!(m.voters_before.contains(&leaving) && m.voters_after.contains(&joiner_id), "{m:?}");
    }
    // The replicas moved away from `leaving` are not voters any more: they must not campaign
    // (their term stays put; a removed replica's election timer keeps firing otherwise).
    let moved: Vec<u32> = added.moves.iter().map(|m| m.shard).collect();
    let terms = |s: &pb::NodeStatusResponse| -> Vec<(u32, u64, String)> {
        s.shards
            .iter()
            .filter(|sh| moved.contains(&sh.shard))
            .map(|sh| (sh.shard, sh.term, sh.role.clone()))
            .collect()
    };
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let first = terms(&cluster.by_id(leaving).status().await);
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let later = terms(&cluster.by_id(leaving).status().await);
    eprintln!("moved-away replicas on node {leaving}: {first:?} then {later:?}");
    assert_eq!(first, later, "a replica moved away kept campaigning");
    let removed = admin
        .remove_node(pb::RemoveNodeRequest { node_id: leaving })
        .await
        .expect("remove node")
        .into_inner();
    assert_eq!(removed.moves.len(), usize::from(N_SHARDS / 2), "{:?}", removed.moves);
    for m in &removed.moves {
        assert!(!m.voters_after.contains(&leaving) && m.voters_after.contains(&joiner_id), "{m:?}");
    }
    let (acked, failed) = writer.await.expect("writer");
    eprintln!("writes during membership changes: {} acknowledged, {failed} failed", acked.len());
    assert!(acked.len() >= 100, "too few writes succeeded during the changes: {}", acked.len());

    cluster.by_id(leaving).stop().await;
    let status = cluster.by_id(joiner_id).status().await;
    for s in &status.shards {
        let mut voters = s.voters.clone();
        voters.sort_unstable();
        assert_eq!(voters.len(), 3);
        assert!(voters.contains(&joiner_id) && !voters.contains(&leaving), "shard {}: {voters:?}", s.shard);
    }
    let joiner_client = cluster.by_id(joiner_id).client().await;
    for id in &acked {
        assert_valid(&check_eventually(&joiner_client, id).await, &format!("{id} on the new node"));
    }
}

/// "Any node accepts any request", also where it holds no replica: with 4 nodes and 3 replicas
/// per shard, the node outside a shard finds the leader through its peers and forwards both
/// writes and checks (it answered UNAVAILABLE before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_replica_forwards_writes_and_checks() {
    let cluster = TestCluster::start(4, N_SHARDS).await;
    let status = cluster.members[0].status().await;
    let (shard, outsider) = status
        .shards
        .iter()
        .find_map(|s| {
            let out = cluster.members.iter().find(|m| !s.voters.contains(&m.id))?;
            Some((u16::try_from(s.shard).expect("shard"), out))
        })
        .expect("with 4 nodes and 3 replicas some node is outside some shard");
    let mut c = outsider.client().await;
    let user = user_on_shard("acme", "outside", shard, N_SHARDS);
    let created = create(&mut c, create_req("acme", &user, "web")).await;
    assert_eq!(shard_of(&created.session_id), shard);
    tokio::time::sleep(BOUND).await;
    let r = c.check_session(check_req(&created.session_id, "", 0)).await.expect("check").into_inner();
    assert_valid(&r, "checked through a node without a replica");
    c.revoke_session(pb::RevokeSessionRequest {
        session_id: created.session_id.clone(),
        revocation: revocation(pb::ReasonCode::Compromised),
    })
    .await
    .expect("revoke through a node without a replica");
    tokio::time::sleep(BOUND).await;
    let r = c.check_session(check_req(&created.session_id, "", 0)).await.expect("check").into_inner();
    assert_eq!(r.status(), pb::CheckStatus::Revoked, "{r:?}");
    let list = c
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: "acme".to_owned(), user_id: user.clone() })
        .await
        .expect("list through a node without a replica")
        .into_inner();
    assert_eq!(list.sessions.len(), 1);
}
