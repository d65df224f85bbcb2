//! `cascade propagation`: measures how long an acknowledged revocation takes to be visible on
//! every node of a running cluster (P2 says: within `revocation_bound`). For each sample it
//! creates a session through `--addr`, waits until every node answers VALID, revokes it through
//! `--addr`, and then polls every node concurrently until each answers REVOKED, recording the
//! time from the acknowledgement to the last node (and per node). Reports hdrhistogram
//! percentiles in microseconds.
//!
//! Bounded: `--samples` ≤ 10,000, each poll loop has a deadline, nothing is retried silently
//! (a sample whose revocation never shows up is reported as a violation).

use crate::cli::api::Api;
use crate::cli::render::{self, Output, Record};
use anyhow::Context;
use cascade_protocol::pb;
use clap::Args;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Flags of `cascade propagation`.
#[derive(Debug, Args)]
pub struct PropagationArgs {
    /// Revocations to measure.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub samples: u64,
    /// Give up on one sample after this long (counted as a violation of the bound).
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub sample_timeout_ms: u64,
}

/// Pause between two polls of one node while waiting for a revocation to show.
const POLL_PAUSE: Duration = Duration::from_micros(200);
const LATENCY_US_MAX: u64 = 60_000_000;

/// `cascade propagation`.
pub async fn propagation(
    args: PropagationArgs,
    addr: &str,
    out: Output,
    timeout: Duration,
) -> anyhow::Result<u8> {
    let api = Api::connect(addr, timeout).await?;
    let status = api.node_status().await?;
    let bound_ms = status.revocation_bound_ms;
    let mut nodes = Vec::new();
    for n in &status.nodes {
        let client =
            Api::connect(&n.addr, timeout).await.with_context(|| format!("connect to node {}", n.node_id))?;
        nodes.push((n.node_id, n.region.clone(), client));
    }
    anyhow::ensure!(!nodes.is_empty(), "the cluster reported no nodes");
    eprintln!("measuring {} revocations over {} nodes (bound {bound_ms} ms)…", args.samples, nodes.len());
    let mut all = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
    let mut per_node: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    let mut violations = 0u64;
    let sample_timeout = Duration::from_millis(args.sample_timeout_ms);
    for i in 0..args.samples {
        let created = api
            .create_session(pb::CreateSessionRequest {
                tenant: "propagation".to_owned(),
                user_id: format!("user-{}", i % 1_000),
                client_id: "probe".to_owned(),
                aal: 1,
                ttl_ms: 600_000,
                ..Default::default()
            })
            .await?;
        let id = created.session_id;
        // Every node must first answer VALID, so the measurement starts from a known state.
        for (node, _, client) in &nodes {
            wait_for(client, &id, pb::CheckStatus::Valid, sample_timeout)
                .await
                .with_context(|| format!("node {node} never saw session {id} as VALID"))?;
        }
        api.revoke_session(pb::RevokeSessionRequest { session_id: id.clone(), revocation: None }).await?;
        let acked = Instant::now();
        let waits = nodes.iter().map(|(node, _, client)| {
            let id = id.clone();
            async move { (*node, wait_for(client, &id, pb::CheckStatus::Revoked, sample_timeout).await) }
        });
        let mut last_us = 0;
        for (node, seen) in futures::future::join_all(waits).await {
            match seen {
                Ok(at) => {
                    let us = u64::try_from(at.duration_since(acked).as_micros()).unwrap_or(u64::MAX).max(1);
                    last_us = last_us.max(us);
                    per_node
                        .entry(node)
                        .or_insert_with(|| Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("bounds"))
                        .saturating_record(us);
                }
                Err(_) => violations += 1,
            }
        }
        all.saturating_record(last_us.max(1));
        if last_us > bound_ms * 1_000 {
            violations += 1;
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut record = Record::new()
        .with("samples", args.samples)
        .with("nodes", nodes.len() as u64)
        .with("revocation_bound_ms", bound_ms)
        .with("to_all_p50_ms", ms(&all, 0.5))
        .with("to_all_p99_ms", ms(&all, 0.99))
        .with("to_all_max_ms", all.max() as f64 / 1000.0)
        .with("violations", violations);
    for (node, h) in &per_node {
        record = record
            .with(format!("node_{node}_p50_ms"), ms(h, 0.5))
            .with(format!("node_{node}_p99_ms"), ms(h, 0.99));
    }
    render::emit(out, &record);
    Ok(if violations == 0 { crate::cli::exit::SUCCESS } else { crate::cli::exit::INTERNAL })
}

/// Poll `client` until it answers `want` for `id` (errors such as UNAVAILABLE are polled
/// through), returning when it first did.
async fn wait_for(client: &Api, id: &str, want: pb::CheckStatus, limit: Duration) -> anyhow::Result<Instant> {
    let start = Instant::now();
    loop {
        let req = pb::CheckSessionRequest { session_id: id.to_owned(), ..Default::default() };
        if let Ok(r) = client.check_session(req).await {
            if r.status == want as i32 {
                return Ok(Instant::now());
            }
        }
        anyhow::ensure!(start.elapsed() < limit, "no {want:?} within {limit:?}");
        tokio::time::sleep(POLL_PAUSE).await;
    }
}
