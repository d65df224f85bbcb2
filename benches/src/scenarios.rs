//! The incident-response scenarios: a watermark mass revocation over a large tenant, a
//! list-based job over many users, and push latency to many watch subscribers.

use crate::cluster::{connect, BenchCluster};
use crate::load::{create_sessions, histogram, micros, percentiles, revocation, table_header};
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The nodes' revocation bound (P2, their default).
const BOUND: Duration = Duration::from_millis(500);
/// Past the bound: every replica answers what was acknowledged before.
const PAST_BOUND: Duration = Duration::from_millis(600);
/// Longest wait for a revocation to show anywhere (a violation of P2 long before).
const SHOW_DEADLINE: Duration = Duration::from_secs(30);
/// Longest wait for a job to finish.
const JOB_DEADLINE: Duration = Duration::from_secs(600);
/// List targets per RevokeList chunk (the protocol's maximum).
const LIST_CHUNK: usize = 1_000;
/// Chunks sent ahead of their acknowledgement.
const CHUNKS_AHEAD: usize = 8;

/// HTTP/2 connections per node for the loaders (one connection with a few hundred streams in
/// flight stalled for minutes in a run; see the note on issue 6).
const CONNECTIONS_PER_NODE: usize = 4;

/// One client per node (node order), for checks and single calls.
pub(crate) async fn clients(cluster: &BenchCluster) -> anyhow::Result<Vec<CascadeClient<Channel>>> {
    let mut out = Vec::new();
    for i in 0..cluster.addrs.len() {
        out.push(cluster.client(i).await?);
    }
    Ok(out)
}

/// `CONNECTIONS_PER_NODE` clients per node, for loading.
pub(crate) async fn loaders(cluster: &BenchCluster) -> anyhow::Result<Vec<CascadeClient<Channel>>> {
    let mut out = Vec::new();
    for _ in 0..CONNECTIONS_PER_NODE {
        out.extend(clients(cluster).await?);
    }
    Ok(out)
}

/// Checks `ids` on `client` in batches of 256; the statuses in order.
async fn check_all(client: &CascadeClient<Channel>, ids: &[String]) -> anyhow::Result<Vec<pb::CheckStatus>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(256) {
        let checks = chunk
            .iter()
            .map(|id| pb::CheckSessionRequest { session_id: id.clone(), ..Default::default() })
            .collect();
        let r = client.clone().check_session_batch(pb::CheckSessionBatchRequest { checks }).await?;
        out.extend(r.into_inner().results.iter().map(|r| r.status()));
    }
    Ok(out)
}

/// What polling the replicas after a revocation found.
pub(crate) struct Rejections {
    /// Per (id, node): from the ack to the arrival of the first answer that said REVOKED (an
    /// upper bound: the answer may have turned up to one poll round earlier).
    pub every: hdrhistogram::Histogram<u64>,
    /// Per id: the same, for the last node to say so.
    pub last: hdrhistogram::Histogram<u64>,
    /// VALID answers to checks sent after ack + bound (P2 violations).
    pub late_valid: u64,
    /// Longest poll round (the resolution of the numbers above).
    pub round_max: std::time::Duration,
}

/// Polls every node, all of `ids` at once in concurrent batches of 256 per round, until each
/// node answers REVOKED for every id.
pub(crate) async fn until_revoked_everywhere(
    clients: &[CascadeClient<Channel>],
    ids: &[String],
    acked: Instant,
    bound: Duration,
) -> anyhow::Result<Rejections> {
    let per_node = clients.iter().map(|client| async move {
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut late_valid = 0u64;
        let mut round_max = Duration::ZERO;
        while seen.len() < ids.len() {
            anyhow::ensure!(
                acked.elapsed() < SHOW_DEADLINE,
                "not revoked everywhere after {SHOW_DEADLINE:?}"
            );
            let pending: Vec<String> = ids.iter().filter(|id| !seen.contains_key(*id)).cloned().collect();
            let sent = Instant::now();
            let rounds = pending.chunks(256).map(|chunk| async move {
                let statuses = check_all(client, chunk).await?;
                Ok::<_, anyhow::Error>((chunk, statuses, Instant::now()))
            });
            for (chunk, statuses, at) in futures::future::try_join_all(rounds).await? {
                for (id, s) in chunk.iter().zip(statuses) {
                    match s {
                        pb::CheckStatus::Revoked => {
                            seen.insert(id.clone(), micros(at.duration_since(acked)));
                        }
                        pb::CheckStatus::Valid if sent.duration_since(acked) > bound => late_valid += 1,
                        _ => {}
                    }
                }
            }
            round_max = round_max.max(sent.elapsed());
        }
        Ok::<_, anyhow::Error>((seen, late_valid, round_max))
    });
    let per_node = futures::future::try_join_all(per_node).await?;
    let mut r =
        Rejections { every: histogram(), last: histogram(), late_valid: 0, round_max: Duration::ZERO };
    for (_, late, round) in &per_node {
        r.late_valid += late;
        r.round_max = r.round_max.max(*round);
    }
    for id in ids {
        let times: Vec<u64> = per_node.iter().map(|(seen, _, _)| seen[id]).collect();
        for t in &times {
            r.every.record(*t)?;
        }
        r.last.record(times.into_iter().max().unwrap_or(1))?;
    }
    Ok(r)
}

async fn wait_job_done(client: &CascadeClient<Channel>, job_id: &str) -> anyhow::Result<pb::RevokeJobInfo> {
    let started = Instant::now();
    loop {
        let info = client
            .clone()
            .get_revoke_job(pb::GetRevokeJobRequest { job_id: job_id.to_owned(), shards: vec![] })
            .await?
            .into_inner();
        if info.state == "done" {
            return Ok(info);
        }
        anyhow::ensure!(info.state == "running", "job {job_id} ended {}", info.state);
        anyhow::ensure!(started.elapsed() < JOB_DEADLINE, "job {job_id} not done after {JOB_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A tenant of `sessions` sessions revoked by one `StartRevokeJob` (a watermark: one command
/// per shard); `sample` of them polled on every node until each answers REVOKED.
pub async fn mass_revoke(
    cluster: &BenchCluster,
    sessions: u64,
    sample: u64,
) -> anyhow::Result<serde_json::Value> {
    let per_user = 4;
    eprintln!("mass-revoke: loading {sessions} sessions into tenant \"mass\"");
    let loaded = Instant::now();
    let ids: Vec<String> = create_sessions(
        &loaders(cluster).await?,
        "mass",
        "m",
        sessions / per_user,
        per_user,
        256,
        (sessions / sample).max(1),
    )
    .await?
    .into_iter()
    .map(|(_, id)| id)
    .collect();
    let load_s = loaded.elapsed().as_secs_f64();
    let mut result = revoke_tenant(cluster, "mass", &ids, sessions).await?;
    result["load_seconds"] = json!(load_s);
    Ok(result)
}

/// What a watch stream passes on: the item `pick` made of an event, and the arrival of the
/// message that carried it.
type Arrival<T> = (T, Instant);

/// Follows one `WatchRevocations` stream of `client`: adds a permit to `ready` once it has
/// delivered the snapshot of every one of `n_shards` shards, and sends what `pick` makes of
/// each event to `tx`. Ends with the stream, or when `tx`'s receiver is gone.
async fn follow_watch<T>(
    mut client: CascadeClient<Channel>,
    n_shards: usize,
    ready: Arc<tokio::sync::Semaphore>,
    tx: tokio::sync::mpsc::Sender<Arrival<T>>,
    pick: impl Fn(&pb::RevocationEvent) -> Option<T>,
) -> anyhow::Result<()> {
    let mut stream = client.watch_revocations(pb::WatchRevocationsRequest::default()).await?.into_inner();
    let mut done = HashSet::new();
    while let Some(m) = stream.message().await? {
        let now = Instant::now();
        if done.len() < n_shards {
            done.extend(m.snapshot_done.iter().copied());
            if done.len() == n_shards {
                ready.add_permits(1);
            }
        }
        for item in m.events.iter().filter_map(&pick) {
            if tx.send((item, now)).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One `WatchRevocations` stream per node, each reporting `(node, shard, arrival)` for every
/// tenant watermark of `tenant` it delivers. A node publishes an event once it has applied the
/// entry, and from then on its checks read the watermark: the arrival is an upper bound, by the
/// push alone, of when that node started rejecting the tenant's sessions on that shard.
/// Returns once every stream has its snapshot of every shard.
async fn watch_tenant_watermarks(
    clients: &[CascadeClient<Channel>],
    n_shards: usize,
    tenant: &str,
) -> anyhow::Result<(tokio::sync::mpsc::Receiver<Arrival<(usize, u32)>>, Vec<tokio::task::AbortHandle>)> {
    // Room for a watermark of every shard replica, a few times over.
    let (tx, rx) = tokio::sync::mpsc::channel((4 * clients.len() * n_shards).max(1));
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    let mut tasks = Vec::new();
    for (node, client) in clients.iter().enumerate() {
        let tenant = tenant.to_owned();
        let pick = move |e: &pb::RevocationEvent| match &e.what {
            Some(pb::revocation_event::What::Watermark(w))
                if w.scope() == pb::WatermarkScope::Tenant && w.tenant == tenant =>
            {
                Some((node, e.shard))
            }
            _ => None,
        };
        let task = tokio::spawn(follow_watch(client.clone(), n_shards, ready.clone(), tx.clone(), pick));
        tasks.push(task.abort_handle());
    }
    let ready = tokio::time::timeout(SHOW_DEADLINE, ready.acquire_many(clients.len() as u32)).await;
    if !matches!(ready, Ok(Ok(_))) {
        tasks.iter().for_each(tokio::task::AbortHandle::abort);
        anyhow::bail!("the watch streams had no snapshot of every shard after {SHOW_DEADLINE:?}");
    }
    Ok((rx, tasks))
}

/// When every node had applied the tenant watermark on every shard, from the watch streams.
struct Applied {
    /// Per (node, shard): ack → the watermark event's arrival (0 if it came before the ack).
    per_replica: hdrhistogram::Histogram<u64>,
    /// ack → the last (node, shard) to have it: every replica rejects every session of the tenant.
    every_replica: Duration,
}

async fn watermark_applied_everywhere(
    rx: &mut tokio::sync::mpsc::Receiver<Arrival<(usize, u32)>>,
    nodes: usize,
    n_shards: usize,
    acked: Instant,
) -> anyhow::Result<Applied> {
    let mut seen: HashMap<(usize, u32), Instant> = HashMap::new();
    while seen.len() < nodes * n_shards {
        let left = SHOW_DEADLINE.saturating_sub(acked.elapsed());
        let Ok(Some(((node, shard), at))) = tokio::time::timeout(left, rx.recv()).await else {
            anyhow::bail!(
                "{} of {} shard replicas reported the tenant watermark within {SHOW_DEADLINE:?}",
                seen.len(),
                nodes * n_shards
            );
        };
        seen.entry((node, shard)).or_insert(at);
    }
    let mut per_replica = histogram();
    let mut every_replica = Duration::ZERO;
    for at in seen.values() {
        let after = at.saturating_duration_since(acked);
        per_replica.record(micros(after))?;
        every_replica = every_replica.max(after);
    }
    Ok(Applied { per_replica, every_replica })
}

/// Tenant `tenant`, holding at least `sessions` sessions, revoked by one `StartRevokeJob` (a
/// watermark: one command per shard). When every replica rejects them is measured twice: by a
/// watch stream on every node (when each shard replica applied the watermark, to the push), and
/// by polling `ids` (valid sessions of it) on every node until each answers REVOKED (to a poll
/// round, and proof that they do).
pub async fn revoke_tenant(
    cluster: &BenchCluster,
    tenant: &str,
    ids: &[String],
    sessions: u64,
) -> anyhow::Result<serde_json::Value> {
    let clients = clients(cluster).await?;
    let n_shards = usize::from(cluster.n_shards);
    let (mut watermarks, watchers) = watch_tenant_watermarks(&clients, n_shards, tenant).await?;
    tokio::time::sleep(PAST_BOUND).await;
    for c in &clients {
        let statuses = check_all(c, ids).await?;
        anyhow::ensure!(
            statuses.iter().all(|s| *s == pb::CheckStatus::Valid),
            "a sampled session is not valid before"
        );
    }
    let started = Instant::now();
    let selector = pb::SessionSelector { tenant: tenant.into(), ..Default::default() };
    let req = pb::StartRevokeJobRequest {
        selector: Some(selector),
        revocation: revocation("benches: mass-revoke"),
        dry_run: false,
        job_id: String::new(),
    };
    let job = clients[0].clone().start_revoke_job(req).await?.into_inner();
    let acked = Instant::now();
    let ack = acked.duration_since(started);
    let r = until_revoked_everywhere(&clients, ids, acked, BOUND).await;
    let applied = watermark_applied_everywhere(&mut watermarks, clients.len(), n_shards, acked).await;
    watchers.iter().for_each(tokio::task::AbortHandle::abort);
    let (r, applied) = (r?, applied?);
    let info = wait_job_done(&clients[0], &job.job_id).await?;
    let counted = acked.elapsed();
    // A create retried after an unknown outcome may have made one more session: at least
    // `sessions` are there, and the job counts every one.
    anyhow::ensure!(info.sessions >= sessions, "the job counted {} sessions of {sessions}", info.sessions);
    println!("\n### mass-revoke: watermark over {} sessions, {} nodes\n", info.sessions, clients.len());
    println!(
        "StartRevokeJob acknowledged in {:.2} ms; job counted {} sessions {:.0} ms after the ack. \
         Poll rounds took up to {:.1} ms (the resolution); VALID answers to checks sent past the \
         500 ms bound: {}.\n",
        ack.as_secs_f64() * 1e3,
        info.sessions,
        counted.as_secs_f64() * 1e3,
        r.round_max.as_secs_f64() * 1e3,
        r.late_valid
    );
    println!(
        "Watch streams: every shard replica on every node had applied the watermark {}.\n",
        since_ack(applied.every_replica.as_secs_f64() * 1e3)
    );
    table_header();
    let applied_json =
        percentiles("ack → a shard replica applied the watermark (watch)", &applied.per_replica);
    let every_json = percentiles("ack → a replica rejects a sampled session (poll)", &r.every);
    let last_json = percentiles("ack → every replica rejects it (poll)", &r.last);
    Ok(json!({
        "scenario": "mass-revoke",
        "sessions": sessions,
        "sessions_counted": info.sessions,
        "sampled": ids.len(),
        "ack_ms": ack.as_secs_f64() * 1e3,
        "job_counted_ms": counted.as_secs_f64() * 1e3,
        "applied_per_shard_replica": applied_json,
        "applied_every_replica_ms": applied.every_replica.as_secs_f64() * 1e3,
        "reject_per_replica": every_json,
        "reject_every_replica": last_json,
        "poll_round_max_ms": r.round_max.as_secs_f64() * 1e3,
        "valid_after_bound": r.late_valid,
    }))
}

/// `users` users (one session each) revoked by one `RevokeList` job streamed in chunks of
/// 1,000: throughput from the first chunk sent to the last acknowledged, per-chunk ack latency.
pub async fn list_job(cluster: &BenchCluster, users: u64) -> anyhow::Result<serde_json::Value> {
    let clients = clients(cluster).await?;
    eprintln!("list-job: loading {users} users into tenant \"list\"");
    let sample: Vec<(String, String)> =
        create_sessions(&loaders(cluster).await?, "list", "l", users, 1, 256, (users / 1000).max(1)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::RevokeListRequest>(CHUNKS_AHEAD);
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sent2 = sent.clone();
    let n_chunks = users.div_ceil(LIST_CHUNK as u64);
    let feeder = tokio::spawn(async move {
        for c in 0..n_chunks {
            let targets = (c * LIST_CHUNK as u64..((c + 1) * LIST_CHUNK as u64).min(users))
                .map(|u| pb::ListTarget {
                    tenant: "list".into(),
                    user_id: format!("l-{u}"),
                    device_id: String::new(),
                })
                .collect();
            let msg = pb::RevokeListRequest {
                revocation: if c == 0 { revocation("benches: list-job") } else { None },
                chunk: c + 1,
                targets,
                last: c + 1 == n_chunks,
                ..Default::default()
            };
            sent2.lock().expect("sent times").push(Instant::now());
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut stream =
        clients[0].clone().revoke_list(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let mut acks = histogram();
    let mut acked_chunks = 0u64;
    let mut last_info = None;
    while let Some(info) = stream.message().await? {
        let now = Instant::now();
        while acked_chunks < info.chunks_acked {
            let at = sent.lock().expect("sent times")[acked_chunks as usize];
            acks.record(micros(now.duration_since(at)))?;
            acked_chunks += 1;
        }
        last_info = Some(info);
    }
    feeder.await?;
    let streamed = started.elapsed();
    let info = last_info.ok_or_else(|| anyhow::anyhow!("no acknowledgement"))?;
    let info = wait_job_done(&clients[0], &info.job_id).await?;
    let done = started.elapsed();
    anyhow::ensure!(info.sessions >= users, "the job revoked {} sessions of {users}", info.sessions);
    tokio::time::sleep(PAST_BOUND).await;
    let ids: Vec<String> = sample.into_iter().map(|(_, id)| id).collect();
    for c in &clients {
        let statuses = check_all(c, &ids).await?;
        anyhow::ensure!(
            statuses.iter().all(|s| *s == pb::CheckStatus::Revoked),
            "a listed user's session is not revoked"
        );
    }
    let rate = users as f64 / done.as_secs_f64();
    println!("\n### list-job: {users} users in {n_chunks} chunks of {LIST_CHUNK}\n");
    println!(
        "Streamed and acknowledged in {:.2} s; job done in {:.2} s: {rate:.0} users/s.\n",
        streamed.as_secs_f64(),
        done.as_secs_f64()
    );
    table_header();
    let acks_json = percentiles("chunk sent → applied on every shard it touches", &acks);
    Ok(json!({
        "scenario": "list-job",
        "users": users,
        "sessions_revoked": info.sessions,
        "chunks": n_chunks,
        "streamed_seconds": streamed.as_secs_f64(),
        "done_seconds": done.as_secs_f64(),
        "users_per_second": rate,
        "chunk_ack": acks_json,
    }))
}

/// `subscribers` WatchRevocations streams spread over the nodes (each its own connection
/// group); for each of `samples` revocations, the time from its ack until the median and the
/// last subscriber received it.
pub async fn watch_fanout(
    cluster: &BenchCluster,
    subscribers: usize,
    samples: usize,
) -> anyhow::Result<serde_json::Value> {
    let clients = clients(cluster).await?;
    // Subscribers per HTTP/2 connection (a gateway has its own; a few share one here).
    const PER_CONNECTION: usize = 50;
    let wanted: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Arrival<usize>>(subscribers * 4);
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    let mut tasks = Vec::new();
    let mut channel = None;
    for s in 0..subscribers {
        if s % PER_CONNECTION == 0 || channel.is_none() {
            let node = (s / PER_CONNECTION) % cluster.addrs.len();
            channel = Some(connect(cluster.addrs[node]).await?);
        }
        let client = channel.clone().expect("connected above");
        let wanted = wanted.clone();
        let pick = move |e: &pb::RevocationEvent| match &e.what {
            Some(pb::revocation_event::What::Session(s)) => {
                wanted.lock().expect("wanted").get(&s.session_id).copied()
            }
            _ => None,
        };
        let n_shards = usize::from(cluster.n_shards);
        tasks.push(tokio::spawn(follow_watch(client, n_shards, ready.clone(), tx.clone(), pick)));
    }
    let subscribed = Instant::now();
    let Ok(all) = tokio::time::timeout(SHOW_DEADLINE, ready.acquire_many(subscribers as u32)).await else {
        let ended = tasks.iter().filter(|t| t.is_finished()).count();
        let mut first = String::new();
        for t in tasks.into_iter().filter(|t| t.is_finished()) {
            if let Ok(Err(e)) = t.await {
                first = format!("{e:#}");
                break;
            }
        }
        anyhow::bail!(
            "{} of {subscribers} subscribers had no snapshot after {SHOW_DEADLINE:?}; {ended} streams ended{}",
            subscribers - ready.available_permits(),
            if first.is_empty() { String::new() } else { format!(", the first with: {first}") }
        );
    };
    let _all = all?;
    eprintln!(
        "watch-fanout: {subscribers} subscribers streaming after {} ms",
        subscribed.elapsed().as_millis()
    );
    let mut median = histogram();
    let mut last = histogram();
    let mut writer = clients[0].clone();
    for k in 0..samples {
        let created = writer
            .create_session(pb::CreateSessionRequest {
                tenant: "fanout".into(),
                user_id: format!("f-{k}"),
                client_id: "bench".into(),
                aal: 1,
                ttl_ms: 3_600_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        wanted.lock().expect("wanted").insert(created.session_id.clone(), k);
        let req = pb::RevokeSessionRequest {
            session_id: created.session_id,
            revocation: revocation("benches: fanout"),
        };
        writer.revoke_session(req).await?;
        let acked = Instant::now();
        let mut times = Vec::with_capacity(subscribers);
        while times.len() < subscribers {
            let left = SHOW_DEADLINE.saturating_sub(acked.elapsed());
            let (sample, at) = tokio::time::timeout(left, rx.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("sample {k}: {} of {subscribers} subscribers got it", times.len())
                })?
                .ok_or_else(|| anyhow::anyhow!("every subscriber ended"))?;
            if sample == k {
                times.push(micros(at.saturating_duration_since(acked)));
            }
        }
        times.sort_unstable();
        median.record(times[times.len() / 2])?;
        last.record(*times.last().expect("at least one subscriber"))?;
    }
    for t in &tasks {
        t.abort();
    }
    println!(
        "\n### watch-fanout: {subscribers} subscribers over {} nodes, {samples} revocations\n",
        clients.len()
    );
    table_header();
    let median_json = percentiles("ack → the median subscriber has it", &median);
    let last_json = percentiles("ack → the last subscriber has it", &last);
    Ok(json!({
        "scenario": "watch-fanout",
        "subscribers": subscribers,
        "samples": samples,
        "median_subscriber": median_json,
        "last_subscriber": last_json,
    }))
}

/// `ms` after an ack, in words. Times are clamped at 0: a replica seen applying a command before
/// its ack reached the client has it "before the ack", not "0.00 ms after" it.
pub fn since_ack(ms: f64) -> String {
    if ms <= 0.0 {
        "before the ack reached the client".to_owned()
    } else {
        format!("{ms:.2} ms after the ack")
    }
}
