//! Loading sessions and reporting: bulk creates with bounded concurrency and progress, and
//! hdrhistogram percentiles printed and kept for the JSON results.

use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Deadline of one create: an answer that never comes is retried, not waited for forever.
const CREATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates that got no answer within `CREATE_TIMEOUT` (then retried).
pub static TIMED_OUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Creates `users × per_user` sessions in `tenant` (users `{prefix}-{i}`), at most
/// `concurrency` calls in flight, round-robin over `clients`. Returns every `sample_every`-th
/// session as (user, session id, created_at_ms), and prints progress every 5 s.
pub async fn create_sessions(
    clients: &[CascadeClient<Channel>],
    tenant: &str,
    prefix: &str,
    users: u64,
    per_user: u64,
    concurrency: usize,
    sample_every: u64,
) -> anyhow::Result<Vec<(String, String)>> {
    let total = users * per_user;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let calls = futures::stream::iter(0..total).map(|n| {
        let mut client = clients[(n as usize) % clients.len()].clone();
        let user = format!("{prefix}-{}", n / per_user);
        let req = pb::CreateSessionRequest {
            tenant: tenant.to_owned(),
            user_id: user.clone(),
            client_id: "bench".to_owned(),
            aal: 1,
            ttl_ms: 24 * 3_600_000,
            ..Default::default()
        };
        async move {
            let mut tries = 0;
            loop {
                let mut request = tonic::Request::new(req.clone());
                request.set_timeout(CREATE_TIMEOUT);
                let answer = tokio::time::timeout(
                    CREATE_TIMEOUT + Duration::from_secs(1),
                    client.create_session(request),
                )
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer (local deadline)")));
                match answer {
                    Ok(r) => return Ok::<_, anyhow::Error>((n, user, r.into_inner().session_id)),
                    // Overload and leader changes: bounded retries (about a minute), then fail the
                    // run. A retried create whose first outcome was unknown may leave one more
                    // session for the user (well within the per-user limit).
                    // tonic reports its own deadline as CANCELLED "Timeout expired".
                    Err(s)
                        if tries < 60
                            && matches!(s.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) =>
                    {
                        TIMED_OUT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tries += 1;
                    }
                    Err(s)
                        if tries < 60
                            && matches!(
                                s.code(),
                                tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                            ) =>
                    {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis((50 * tries).min(1_000))).await;
                    }
                    Err(s) => anyhow::bail!("create {tenant}/{user}: {:?} {}", s.code(), s.message()),
                }
            }
        }
    });
    let mut results = calls.buffer_unordered(concurrency);
    let mut done = 0u64;
    let mut sample = Vec::new();
    while let Some(r) = results.next().await {
        let (n, user, session_id) = r?;
        done += 1;
        if n % sample_every == 0 {
            sample.push((user, session_id));
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let rate = done as f64 / started.elapsed().as_secs_f64();
            eprintln!("  loaded {done}/{total} sessions ({rate:.0}/s)");
        }
    }
    eprintln!(
        "  loaded {total} sessions in {:.1} s ({:.0}/s); creates without an answer in {} s, retried: {}",
        started.elapsed().as_secs_f64(),
        total as f64 / started.elapsed().as_secs_f64(),
        CREATE_TIMEOUT.as_secs(),
        TIMED_OUT.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(sample)
}

/// A latency histogram in microseconds, up to 60 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of `h` (µs) as JSON, and one printed line.
pub fn percentiles(name: &str, h: &Histogram<u64>) -> serde_json::Value {
    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        h.len(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    );
    serde_json::json!({
        "samples": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

pub fn table_header() {
    println!("| measure | samples | p50 ms | p99 ms | p99.9 ms | max ms |");
    println!("|---|---|---|---|---|---|");
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

pub fn revocation(text: &str) -> Option<pb::Revocation> {
    Some(pb::Revocation {
        reason: pb::ReasonCode::Compromised as i32,
        text: text.into(),
        actor: "benches".into(),
    })
}
