//! The gateway SDK (`cascade-client`) against a real 3-node cluster on loopback: remote checks
//! routed, batched and retried past a stopped node; a local cache that turns sessions invalid
//! within the revocation bound for every kind of revocation, falls back to remote checks when
//! told to, fails closed when its stream is cut, and resumes without a gap when it heals.

mod support;

use cascade_client::{
    Claims, Client as Sdk, ClientConfig, Error, LocalCache, LocalConfig, OnStale, Source, Verdict,
};
use cascade_protocol::pb;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::cluster::TestCluster;
use support::*;
use tokio::task::AbortHandle;

const N_SHARDS: u16 = 4;
/// The nodes' revocation bound (the default).
const BOUND: Duration = Duration::from_millis(500);

/// A session as a gateway knows it from its token.
struct Token {
    session_id: String,
    tenant: String,
    user_id: String,
    client_id: String,
    device_id: Option<String>,
    jkt: Option<String>,
    created_at_ms: u64,
    expires_at_ms: u64,
}

impl Token {
    fn claims(&self) -> Claims<'_> {
        Claims {
            session_id: &self.session_id,
            tenant: &self.tenant,
            user_id: &self.user_id,
            client_id: &self.client_id,
            device_id: self.device_id.as_deref(),
            jkt: self.jkt.as_deref(),
            aal: 1,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

async fn session(client: &Client, tenant: &str, user: &str, device: Option<&str>) -> Token {
    let mut req = create_req(tenant, user, "web");
    req.with_refresh_token = true;
    if let Some(d) = device {
        req.device_id = d.to_owned();
        req.jkt = jkt(d);
    }
    let r = create(&mut client.clone(), req.clone()).await;
    Token {
        session_id: r.session_id,
        tenant: tenant.to_owned(),
        user_id: user.to_owned(),
        client_id: "web".to_owned(),
        device_id: device.map(str::to_owned),
        jkt: device.map(jkt),
        created_at_ms: r.created_at_ms,
        expires_at_ms: r.expires_at_ms,
    }
}

fn sdk_config(seeds: &[SocketAddr]) -> ClientConfig {
    let mut config = ClientConfig::new(seeds.iter().map(ToString::to_string));
    // Enough attempts to ride out an election after a node stops.
    config.attempts = 8;
    config.backoff = Duration::from_millis(50);
    config.timeout = Duration::from_secs(2);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_checks_are_routed_batched_and_retried_past_a_stopped_node() {
    let mut cluster = TestCluster::start(3, N_SHARDS).await;
    let raw = cluster.members[0].client().await;
    let mut sessions = Vec::new();
    for i in 0..24 {
        sessions.push(session(&raw, "acme", &format!("remote-{i}"), None).await.session_id);
    }
    for id in sessions.iter().step_by(3) {
        let req = pb::RevokeSessionRequest {
            session_id: id.clone(),
            revocation: revocation(pb::ReasonCode::Admin),
        };
        raw.clone().revoke_session(req).await.expect("revoke");
    }
    let expected =
        |i: usize| if i.is_multiple_of(3) { pb::CheckStatus::Revoked } else { pb::CheckStatus::Valid };
    // P2: a check that starts a bound after the acks sees them on every replica.
    after_ms(now_ms() + BOUND.as_millis() as u64 + 100).await;

    // One seed; the rest is discovered. Replicas in the third node's region come first.
    let mut config = sdk_config(&[cluster.members[1].addr]);
    config.region = Some(cluster.members[2].region.clone());
    let client = Sdk::connect(config).await.expect("connect");
    let t = client.topology();
    assert_eq!((t.n_shards, t.nodes.len(), t.revocation_bound_ms), (N_SHARDS, 3, 500));
    for (shard, info) in t.shards.iter().enumerate() {
        assert_eq!(info.replicas.len(), 3, "shard {shard}: {info:?}");
        assert_eq!(t.candidates(shard as u16, client.config().region.as_deref())[0], cluster.members[2].id);
    }

    let check_all = |client: Sdk, sessions: Vec<String>| async move {
        for (i, id) in sessions.iter().enumerate() {
            let r = client.check(check_req(id, "", 0)).await.unwrap_or_else(|e| panic!("check {id}: {e}"));
            assert_eq!(r.status(), expected(i), "{id}");
            assert!(r.freshness.is_some_and(|f| f.staleness_bound_ms <= 500), "{r:?}");
        }
        // More than one call's worth (256), answered in request order.
        let batch: Vec<pb::CheckSessionRequest> =
            (0..300).map(|i| check_req(&sessions[i % sessions.len()], "", 0)).collect();
        let answers = client.check_batch(batch).await.expect("batch");
        assert_eq!(answers.len(), 300);
        for (i, a) in answers.iter().enumerate() {
            assert_eq!(a.status(), expected(i % sessions.len()), "batch answer {i}");
        }
    };
    check_all(client.clone(), sessions.clone()).await;

    // Malformed ids are refused before anything is sent, naming the culprit.
    match client.check(check_req("cs_nope", "", 0)).await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("cs_nope"), "{m}"),
        other => panic!("a malformed id must be refused: {other:?}"),
    }
    let batch = vec![check_req(&sessions[0], "", 0), check_req("bad", "", 0)];
    match client.check_batch(batch).await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("checks[1]"), "{m}"),
        other => panic!("a malformed id in a batch must be refused: {other:?}"),
    }

    // The preferred node stops: every check still answers, from the other replicas.
    let stopped = cluster.members[2].id;
    cluster.members[2].stop().await;
    let started = Instant::now();
    check_all(client.clone(), sessions.clone()).await;
    println!("checks after node {stopped} stopped answered in {} ms", started.elapsed().as_millis());
}

/// Polls `cache` for `token` until it says revoked, failing if it still says valid a bound
/// after `acked`. Returns how long after `acked` the cache turned.
async fn revoked_within_bound(cache: &LocalCache, token: &Token, acked: Instant, what: &str) -> Duration {
    let deadline = acked + Duration::from_secs(10);
    loop {
        let checked_at = Instant::now();
        match cache.check_local(&token.claims(), token.jkt.as_deref(), 0) {
            Ok(a) if matches!(a.verdict, Verdict::Revoked(_)) => return checked_at.duration_since(acked),
            Ok(a) if a.verdict == Verdict::Valid => {
                assert!(
                    checked_at.duration_since(acked) <= BOUND,
                    "{what}: still valid in the cache {} ms after the ack",
                    checked_at.duration_since(acked).as_millis()
                );
            }
            Ok(a) => panic!("{what}: unexpected verdict {a:?}"),
            // Failing closed is always allowed.
            Err(Error::Stale { .. }) => {}
            Err(e) => panic!("{what}: {e}"),
        }
        assert!(Instant::now() < deadline, "{what}: not revoked in the cache after 10 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cache_turns_sessions_invalid_within_the_bound_for_every_kind_of_revocation() {
    let cluster = TestCluster::start(3, N_SHARDS).await;
    let raw = cluster.members[0].client().await;
    let addrs: Vec<SocketAddr> = cluster.members.iter().map(|m| m.addr).collect();
    let client = Sdk::connect(sdk_config(&addrs)).await.expect("connect");
    // Revoked before the cache starts: it must come with the snapshot.
    let early = session(&raw, "acme", "early", None).await;
    let req = pb::RevokeSessionRequest {
        session_id: early.session_id.clone(),
        revocation: revocation(pb::ReasonCode::Compromised),
    };
    raw.clone().revoke_session(req).await.expect("revoke");

    let cache = client.local_cache(LocalConfig::default());
    assert_eq!(cache.bound(), BOUND, "the cluster's bound");
    cache.wait_fresh(Duration::from_secs(20)).await.expect("fresh");
    let early_answer = cache.check_local(&early.claims(), None, 0).expect("fresh");
    assert_eq!(early_answer.verdict, Verdict::Revoked(pb::ReasonCode::Compromised));

    let one = session(&raw, "acme", "alice", None).await;
    let family = session(&raw, "acme", "bob", None).await;
    let user = session(&raw, "acme", "carol", None).await;
    let device = session(&raw, "acme", "dave", Some("laptop")).await;
    let other_device = session(&raw, "acme", "dave", Some("phone")).await;
    let tenant = session(&raw, "initech", "erin", None).await;
    let client_mark = session(&raw, "globex", "frank", None).await;
    for t in [&one, &family, &user, &device, &other_device, &tenant, &client_mark] {
        let a = cache.check_local(&t.claims(), t.jkt.as_deref(), 0).expect("fresh");
        assert_eq!(a.verdict, Verdict::Valid, "{}", t.session_id);
        assert!(a.staleness <= BOUND);
    }
    // Device binding and assurance are judged from the claims.
    let a = cache.check_local(&device.claims(), Some(&jkt("someone else")), 0).expect("fresh");
    assert_eq!(a.verdict, Verdict::DeviceMismatch);
    let a = cache.check_local(&one.claims(), None, 2).expect("fresh");
    assert_eq!(a.verdict, Verdict::StepUpRequired);

    let r = || revocation(pb::ReasonCode::Compromised);
    let mut took = Vec::new();
    let kinds: Vec<(&str, &Token)> = vec![
        ("session", &one),
        ("family", &family),
        ("user", &user),
        ("device", &device),
        ("tenant watermark", &tenant),
        ("client watermark", &client_mark),
    ];
    for (what, token) in kinds {
        let mut c = raw.clone();
        let sid = token.session_id.clone();
        let (tenant_id, user_id) = (token.tenant.clone(), token.user_id.clone());
        let watermark = |scope: pb::WatermarkScope, client_id: &str| pb::SetWatermarkRequest {
            scope: scope as i32,
            tenant: token.tenant.clone(),
            client_id: client_id.to_owned(),
            revocation: r(),
            ..Default::default()
        };
        let done = match what {
            "session" => c
                .revoke_session(pb::RevokeSessionRequest { session_id: sid, revocation: r() })
                .await
                .map(drop),
            "family" => {
                c.revoke_family(pb::RevokeFamilyRequest { session_id: sid, revocation: r() }).await.map(drop)
            }
            "user" => c
                .revoke_user(pb::RevokeUserRequest { tenant: tenant_id, user_id, revocation: r() })
                .await
                .map(drop),
            "device" => {
                let req = pb::RevokeDeviceRequest {
                    tenant: tenant_id,
                    user_id,
                    device_id: "laptop".into(),
                    revocation: r(),
                };
                c.revoke_device(req).await.map(drop)
            }
            "tenant watermark" => c.set_watermark(watermark(pb::WatermarkScope::Tenant, "")).await.map(drop),
            _ => c.set_watermark(watermark(pb::WatermarkScope::Client, "web")).await.map(drop),
        };
        done.unwrap_or_else(|s| panic!("{what}: {s:?}"));
        let acked = Instant::now();
        took.push((what, revoked_within_bound(&cache, token, acked, what).await));
    }
    for (what, d) in &took {
        println!("local cache: {what} revocation seen {} ms after its ack", d.as_millis());
    }
    // The other device of the user whose laptop was revoked is still valid.
    let a = cache.check_local(&other_device.claims(), other_device.jkt.as_deref(), 0).expect("fresh");
    assert_eq!(a.verdict, Verdict::Valid);

    // A cache that is never fresh enough (1 ms bound) asks the cluster instead, when told to.
    let remote = client.local_cache(LocalConfig {
        bound: Some(Duration::from_millis(1)),
        on_stale: OnStale::Remote,
        ..LocalConfig::default()
    });
    let a = remote.check(&one.claims(), None, 0).await.expect("remote fallback");
    assert_eq!(
        a,
        cascade_client::Answer {
            verdict: Verdict::Revoked(pb::ReasonCode::Compromised),
            source: Source::Remote
        }
    );
    let a = remote.check(&other_device.claims(), other_device.jkt.as_deref(), 0).await.expect("remote");
    assert_eq!(a.verdict, Verdict::Valid);
}

/// A TCP proxy on loopback whose links can be cut (open connections reset, new ones refused)
/// and healed: the network between a gateway and the cluster.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (cut2, links2) = (cut.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                links2.lock().unwrap().push(link.abort_handle());
            }
        })
        .abort_handle();
        Proxy { addr, cut, links, accept }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.links.lock().unwrap().drain(..).for_each(|l| l.abort());
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cache_fails_closed_when_its_stream_is_cut_and_resumes_without_a_gap() {
    let cluster = TestCluster::start(3, N_SHARDS).await;
    let raw = cluster.members[1].client().await;
    let proxy = Proxy::start(cluster.members[0].addr).await;
    // The gateway reaches the cluster only through the proxy.
    let mut config = sdk_config(&[proxy.addr]);
    config.discover = false;
    config.attempts = 1;
    config.timeout = Duration::from_millis(300);
    let client = Sdk::connect(config).await.expect("connect through the proxy");
    assert_eq!(client.topology().nodes.len(), 1);
    let closed = client.local_cache(LocalConfig::default());
    let fallback = client.local_cache(LocalConfig { on_stale: OnStale::Remote, ..LocalConfig::default() });
    closed.wait_fresh(Duration::from_secs(20)).await.expect("fresh");
    fallback.wait_fresh(Duration::from_secs(20)).await.expect("fresh");
    let token = session(&raw, "acme", "grace", None).await;
    assert_eq!(closed.check_local(&token.claims(), None, 0).expect("fresh").verdict, Verdict::Valid);

    proxy.cut();
    let cut_at = Instant::now();
    let stale_after = loop {
        match closed.check(&token.claims(), None, 0).await {
            Ok(a) => {
                assert_eq!(a.verdict, Verdict::Valid);
                assert!(
                    cut_at.elapsed() <= BOUND,
                    "still trusted {} ms after the cut",
                    cut_at.elapsed().as_millis()
                );
            }
            Err(Error::Stale { .. }) => break cut_at.elapsed(),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    println!("local cache failed closed {} ms after its stream was cut", stale_after.as_millis());
    // The fallback cannot reach the cluster either: once stale it fails, never answering from
    // stale data.
    loop {
        match fallback.check(&token.claims(), None, 0).await {
            Ok(a) => {
                assert!(matches!(a.source, Source::Local { .. }), "the remote is cut off: {a:?}");
                assert!(
                    cut_at.elapsed() <= BOUND,
                    "fallback still trusted {} ms after the cut",
                    cut_at.elapsed().as_millis()
                );
            }
            Err(Error::Rpc { code, message, .. }) => {
                assert!(
                    matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded),
                    "{code:?} {message}"
                );
                break;
            }
            Err(e) => panic!("the fallback must try the cluster, not fail with {e}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    // Revoked while the gateway is cut off; after the heal the stream resumes from its cursor
    // and delivers it.
    let req = pb::RevokeSessionRequest {
        session_id: token.session_id.clone(),
        revocation: revocation(pb::ReasonCode::Admin),
    };
    raw.clone().revoke_session(req).await.expect("revoke");
    proxy.heal();
    let healed = Instant::now();
    let deadline = healed + Duration::from_secs(20);
    loop {
        match closed.check_local(&token.claims(), None, 0) {
            Ok(a) if a.verdict == Verdict::Revoked(pb::ReasonCode::Admin) => break,
            Ok(a) => panic!("valid after the heal: {a:?}"),
            Err(Error::Stale { .. }) => {
                assert!(Instant::now() < deadline, "not fresh again 20 s after the heal")
            }
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("fresh again with the missed revocation {} ms after the heal", healed.elapsed().as_millis());
    assert!(closed.stats().streams_opened.load(Ordering::Relaxed) >= 2, "the stream was opened again");
    assert!(closed.status().iter().all(|s| s.synced && s.cursor.is_some()));
}
