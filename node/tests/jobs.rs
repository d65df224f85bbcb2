//! Mass revocation jobs and the audit trail on a real 3-node cluster on loopback: every
//! selector kind with dry-run counts equal to the real counts, list jobs streamed in chunks and
//! resent without double counting, cancellation, a job whose shard leader is stopped mid-scan
//! (finished once by the next leader, and seen the same by the restarted node), and the audit
//! records they leave.

mod support;

use cascade_protocol::pb;
use std::collections::BTreeMap;
use support::cluster::TestCluster;
use support::*;

const N_SHARDS: u16 = 4;
/// The nodes' revocation bound (the default).
const REVOCATION_BOUND_MS: u64 = 500;

fn selector() -> pb::SessionSelector {
    pb::SessionSelector::default()
}

fn start_req(selector: pb::SessionSelector, dry_run: bool) -> pb::StartRevokeJobRequest {
    pb::StartRevokeJobRequest {
        selector: Some(selector),
        revocation: revocation(pb::ReasonCode::Compromised),
        dry_run,
        job_id: String::new(),
    }
}

/// Wait until the job is done or cancelled on every shard, as `client`'s node sees it.
async fn finished(client: &Client, job_id: &str) -> pb::RevokeJobInfo {
    poll_until(&format!("job {job_id} finished"), STATE_DEADLINE, || {
        let mut client = client.clone();
        let job_id = job_id.to_owned();
        async move {
            let info =
                client.get_revoke_job(pb::GetRevokeJobRequest { job_id, shards: vec![] }).await.ok()?;
            let info = info.into_inner();
            (info.state == "done" || info.state == "cancelled").then_some(info)
        }
    })
    .await
}

async fn run_job(client: &Client, selector: pb::SessionSelector, dry_run: bool) -> pb::RevokeJobInfo {
    let started =
        client.clone().start_revoke_job(start_req(selector, dry_run)).await.expect("start").into_inner();
    finished(client, &started.job_id).await
}

/// Sessions created for the test, by a label saying what they are.
struct Fixture {
    sessions: BTreeMap<String, Vec<String>>,
}

impl Fixture {
    async fn create(
        client: &mut Client,
        label: &str,
        tenant: &str,
        users: usize,
        tweak: impl Fn(usize, &mut pb::CreateSessionRequest),
    ) -> Vec<String> {
        let mut ids = Vec::new();
        for u in 0..users {
            let mut req = create_req(tenant, &format!("{label}-{u}"), "web");
            tweak(u, &mut req);
            ids.push(create(client, req).await.session_id);
        }
        ids
    }
}

/// Every node's answer for every session, asked once the revocation bound (P2: 500 ms by
/// default) has passed since the caller's last acknowledged write: a replica may answer from
/// its own state until then.
async fn all_status(clients: &[Client], ids: &[String]) -> Vec<i32> {
    after_ms(now_ms() + REVOCATION_BOUND_MS + 100).await;
    let mut out = Vec::new();
    for client in clients {
        for id in ids {
            out.push(check(&mut client.clone(), id).await.status);
        }
    }
    out
}

fn all(statuses: &[i32], status: pb::CheckStatus) -> bool {
    statuses.iter().all(|s| *s == status as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_revocation_selectors_dry_runs_lists_cancel_and_audit() {
    let cluster = TestCluster::start(3, N_SHARDS).await;
    let mut clients = Vec::new();
    for m in &cluster.members {
        clients.push(m.client().await);
    }
    let mut c0 = clients[0].clone();
    let mut fx = Fixture { sessions: BTreeMap::new() };
    // aal 1 and aal 2 sessions of tenant "acme"; other tenants' sessions are bystanders.
    let low = Fixture::create(&mut c0, "low", "acme", 12, |_, _| {}).await;
    let high = Fixture::create(&mut c0, "high", "acme", 6, |_, r| r.aal = 2).await;
    let beta = Fixture::create(&mut c0, "b", "beta", 10, |_, _| {}).await;
    let net = Fixture::create(&mut c0, "n", "gamma", 8, |u, r| {
        let m = r.metadata.as_mut().expect("metadata");
        m.ip = format!("198.51.{}.7", u % 2);
        m.region = if u < 4 { "eu".into() } else { "us".into() };
    })
    .await;
    let listed = Fixture::create(&mut c0, "l", "delta", 9, |_, _| {}).await;
    fx.sessions.insert("bystanders".into(), Fixture::create(&mut c0, "x", "omega", 6, |_, _| {}).await);

    // Scan job: aal below 2 in acme. The dry run counts exactly what the real run revokes.
    let acme_low = pb::SessionSelector { tenant: "acme".into(), aal_below: 2, ..selector() };
    let dry = run_job(&clients[1], acme_low.clone(), true).await;
    assert_eq!((dry.state.as_str(), dry.mode.as_str(), dry.sessions), ("done", "dry_run", 12), "{dry:?}");
    assert!(all(&all_status(&clients, &low).await, pb::CheckStatus::Valid), "a dry run revoked something");
    let real = run_job(&clients[2], acme_low, false).await;
    assert_eq!(
        (real.state.as_str(), real.mode.as_str(), real.sessions),
        ("done", "revoke", dry.sessions),
        "{real:?}"
    );
    assert_eq!(real.shards_done, u32::from(N_SHARDS));
    assert!(all(&all_status(&clients, &low).await, pb::CheckStatus::Revoked), "every node rejects them");
    assert!(all(&all_status(&clients, &high).await, pb::CheckStatus::Valid), "aal 2 sessions untouched");

    // Watermark job: a whole tenant, revoked at start, counted by the scan.
    let tenant = pb::SessionSelector { tenant: "beta".into(), ..selector() };
    let dry = run_job(&clients[0], tenant.clone(), true).await;
    let real = run_job(&clients[0], tenant, false).await;
    assert_eq!((real.mode.as_str(), real.sessions, dry.sessions), ("watermark", 10, 10), "{real:?}");
    assert!(all(&all_status(&clients, &beta).await, pb::CheckStatus::Revoked));

    // IP prefix and region, combined.
    let both = pb::SessionSelector {
        tenant: "gamma".into(),
        ip_prefix: "198.51.1.0/24".into(),
        region: "eu".into(),
        ..selector()
    };
    let dry = run_job(&clients[1], both.clone(), true).await;
    let real = run_job(&clients[1], both, false).await;
    assert_eq!((real.sessions, dry.sessions), (2, 2), "users 1 and 3 are in eu with 198.51.1.x");
    let statuses = all_status(&clients[..1], &net).await;
    let revoked: Vec<usize> = (0..8).filter(|u| statuses[*u] == pb::CheckStatus::Revoked as i32).collect();
    assert_eq!(revoked, vec![1, 3]);

    // A list job in two chunks; chunk 1 resent on a second stream counts once; then cancelled.
    let target = |u: usize| pb::ListTarget {
        tenant: "delta".into(),
        user_id: format!("l-{u}"),
        device_id: String::new(),
    };
    let chunk = |n: u64, users: std::ops::Range<usize>, job_id: &str, last: bool| pb::RevokeListRequest {
        job_id: job_id.to_owned(),
        revocation: revocation(pb::ReasonCode::Compromised),
        dry_run: false,
        chunk: n,
        targets: users.map(target).collect(),
        last,
    };
    let first = vec![chunk(1, 0..3, "", false), chunk(2, 3..6, "", false)];
    let mut progress =
        clients[2].clone().revoke_list(tokio_stream::iter(first)).await.expect("revoke list").into_inner();
    let mut acked = Vec::new();
    while let Some(info) = progress.message().await.expect("progress") {
        acked.push(info);
    }
    let job_id = acked[0].job_id.clone();
    let last = acked.last().expect("progress");
    assert_eq!((last.chunks_acked, last.sessions, last.state.as_str()), (2, 6, "running"), "{last:?}");
    assert!(all(&all_status(&clients, &listed[..6]).await, pb::CheckStatus::Revoked));
    let resend = vec![chunk(1, 0..3, &job_id, false)];
    let mut progress =
        clients[0].clone().revoke_list(tokio_stream::iter(resend)).await.expect("resume").into_inner();
    let mut again = None;
    while let Some(info) = progress.message().await.expect("progress") {
        again = Some(info);
    }
    assert_eq!(again.expect("progress").sessions, 6, "a resent chunk is not counted twice");
    let cancel = pb::CancelRevokeJobRequest { job_id: job_id.clone(), actor: "lead@acme".into() };
    let cancelled = clients[1].clone().cancel_revoke_job(cancel).await.expect("cancel").into_inner();
    assert_eq!(cancelled.state, "cancelled");
    let late = vec![chunk(3, 6..9, &job_id, true)];
    let mut progress =
        clients[1].clone().revoke_list(tokio_stream::iter(late)).await.expect("late").into_inner();
    while progress.message().await.expect("progress").is_some() {}
    assert!(
        all(&all_status(&clients, &listed[6..]).await, pb::CheckStatus::Valid),
        "no chunk applies after cancel"
    );
    let info = finished(&clients[0], &job_id).await;
    assert_eq!((info.state.as_str(), info.sessions), ("cancelled", 6));

    assert!(all(&all_status(&clients, &fx.sessions["bystanders"]).await, pb::CheckStatus::Valid));

    // Audit: the real acme job left one record per shard summing to its count, and the list
    // job's cancellation names who cancelled.
    let audit = |job_id: String, actor: &str| pb::QueryAuditRequest {
        job_id,
        actor: actor.into(),
        ..Default::default()
    };
    let entries = clients[1]
        .clone()
        .query_audit(audit(real.job_id.clone(), ""))
        .await
        .expect("audit")
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1, "one entry per job, its shards' records merged: {entries:?}");
    assert!(entries.iter().all(|e| e.action == "job" && e.job_id == real.job_id));
    assert_eq!(entries[0].sessions, real.sessions);
    let by_lead =
        clients[2].clone().query_audit(audit(String::new(), "lead@acme")).await.expect("audit").into_inner();
    assert!(!by_lead.entries.is_empty() && by_lead.entries.iter().all(|e| e.job_id == job_id), "{by_lead:?}");
    let jobs = clients[0]
        .clone()
        .list_revoke_jobs(pb::ListRevokeJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(jobs.jobs.len() >= 7, "every job is listed: {}", jobs.jobs.len());

    // Bad input is refused with the field named.
    let empty = clients[0].clone().start_revoke_job(start_req(selector(), false)).await;
    let msg = expect_code(empty, tonic::Code::InvalidArgument, "empty selector");
    assert!(msg.contains("selector"), "{msg}");
    let bad_ip = pb::SessionSelector { ip_prefix: "10.0.0.0/40".into(), ..selector() };
    expect_code(
        clients[0].clone().start_revoke_job(start_req(bad_ip, false)).await,
        tonic::Code::InvalidArgument,
        "bad prefix",
    );
}

/// A scan job whose shard leader is stopped mid-scan is finished by the next leader exactly
/// once, and the restarted node's replica agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_its_leader_stopping_and_counts_once() {
    // One user per step, 10 ms apart: the scan of a shard takes long enough to be caught midway.
    let mut cluster = TestCluster::start_with(3, N_SHARDS, |c| {
        c.job_step_users = 1;
        c.job_step_pause_ms = 10;
    })
    .await;
    let mut c0 = cluster.members[0].client().await;
    let users = 120;
    let mut ids = Vec::new();
    for u in 0..users {
        let mut req = create_req("wave", &format!("u{u}"), "web");
        req.metadata.as_mut().expect("metadata").region = "compromised".into();
        ids.push(create(&mut c0, req).await.session_id);
    }
    let sel = pb::SessionSelector { region: "compromised".into(), ..selector() };
    let started = c0.start_revoke_job(start_req(sel, false)).await.expect("start").into_inner();
    // Stop the leader of the busiest shard once its scan is under way.
    let shard0_leader = cluster.leader_of(0).await;
    let observer =
        cluster.members.iter().find(|m| m.id != shard0_leader).expect("another node").client().await;
    let midway = poll_until("the scan under way on shard 0", STATE_DEADLINE, || {
        let mut c = observer.clone();
        let job_id = started.job_id.clone();
        async move {
            let info = c
                .get_revoke_job(pb::GetRevokeJobRequest { job_id, shards: vec![0] })
                .await
                .ok()?
                .into_inner();
            let s = info.shards.first()?;
            (s.users_scanned > 0).then_some(s.clone())
        }
    })
    .await;
    assert_eq!(midway.state, "running", "caught after the scan of shard 0 ended: {midway:?}");
    println!(
        "stopping node {shard0_leader}, leader of shard 0, after {} users scanned there",
        midway.users_scanned
    );
    cluster.by_id(shard0_leader).stop().await;
    let info = finished(&observer, &started.job_id).await;
    assert_eq!(info.state, "done");
    assert_eq!(info.sessions, users as u64, "every session counted exactly once: {info:?}");
    let clients = vec![observer.clone()];
    assert!(all(&all_status(&clients, &ids).await, pb::CheckStatus::Revoked));

    // The stopped node restarts from its data dir and its replicas catch up to the same record.
    cluster.by_id(shard0_leader).start().await;
    cluster.wait_ready().await;
    let back = cluster.by_id(shard0_leader).client().await;
    // Its replicas catch up (until then they may not know the job is done).
    let seen = finished(&back, &started.job_id).await;
    assert_eq!((seen.state.as_str(), seen.sessions), ("done", users as u64));
}
