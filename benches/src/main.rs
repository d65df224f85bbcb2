//! `benches`: scenario benchmarks against a local 3-node cluster it starts itself (in-process
//! nodes, each on its own runtime, loopback, temp dirs). Prints Markdown tables of hdrhistogram
//! percentiles and writes the results as JSON with a description of the machine.
//!
//! ```sh
//! cargo run --release -p benches -- all --quick        # Cascade vs Redis and etcd, about 2 minutes
//! cargo run --release -p benches -- all                # the reference run (1,000,000 sessions)
//! cargo run --release -p benches -- incident            # all incident-response scenarios
//! cargo run --release -p benches -- incident --quick    # smaller sizes, about a minute
//! cargo run --release -p benches -- mass-revoke --sessions 1000000
//! ```

mod cluster;
mod compare;
mod load;
mod peers;
mod scenarios;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The nodes run in this process: the same allocator as the `cascade` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Cascade scenario benchmarks on a local 3-node cluster")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Shards of the cluster.
    #[arg(long, global = true, default_value_t = 16)]
    shards: u16,
    /// Where to write the JSON results.
    #[arg(long, global = true, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Smaller sizes (a quick look, not a reference run).
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Subcommand)]
enum Scenario {
    /// Watermark revocation of a tenant: time from ack until every replica rejects its sessions.
    MassRevoke {
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1_000..=10_000_000))]
        sessions: u64,
        /// Sessions polled on every node after the ack (fewer: finer time resolution).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        sample: u64,
    },
    /// A RevokeList job over many users: throughput and chunk acknowledgement latency.
    ListJob {
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        users: u64,
    },
    /// Push latency from a revocation's ack to the median and the last of many watch subscribers.
    WatchFanout {
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        subscribers: u64,
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        samples: u64,
    },
    /// mass-revoke, list-job and watch-fanout with their default sizes, one cluster each.
    Incident,
    /// Every scenario beside Redis (denylist) and etcd, started by `benches/peers.sh`, in one
    /// run: check, check-batch, check-local, revoke, propagation, mass-revoke, footprint.
    All {
        /// Cascade alone (no Redis, no etcd; the ratios are then not available).
        #[arg(long)]
        no_peers: bool,
        /// Sessions to load (default 1,000,000; 20,000 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1_000..=10_000_000))]
        sessions: Option<u64>,
        /// Measured seconds per load step (default 10; 3 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
        step_s: Option<u64>,
        /// Run only these scenarios (comma-separated: check, check-batch, check-local,
        /// propagation, revoke, restart, mass-revoke); the load and the footprint always run.
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(compare::SCENARIOS))]
        only: Vec<String>,
    },
}

fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// The nodes run in this process: the memory settings the `cascade` binary makes.
fn same_memory_settings_as_a_node() -> anyhow::Result<()> {
    use anyhow::Context as _;
    cascade_node::memory::disable_transparent_huge_pages().context("turn transparent huge pages off")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with --release for numbers worth quoting");
    }
    let q = |full: u64, quick: u64| if args.quick { quick } else { full };
    if let Scenario::All { no_peers, sessions, step_s, only } = args.scenario {
        let mut sizes = if args.quick { compare::Sizes::quick() } else { compare::Sizes::full() };
        if let Some(s) = sessions {
            // Users get PER_USER sessions each: any other count would load fewer than it says.
            if !s.is_multiple_of(compare::PER_USER) {
                anyhow::bail!(
                    "--sessions must be a multiple of {} (sessions per user), got {s}",
                    compare::PER_USER
                );
            }
            sizes.sessions = s;
        }
        if !only.is_empty() {
            sizes.only = only;
        }
        if let Some(s) = step_s {
            sizes.step = std::time::Duration::from_secs(s);
        }
        let peers = if no_peers { None } else { Some(peers::Peers::start()?) };
        // After the peers started (a child process inherits the setting): they run as the
        // machine is set up.
        same_memory_settings_as_a_node()?;
        let mut cluster = cluster::BenchCluster::start(3, args.shards).await?;
        // Interrupted, the cluster and the peers are still stopped (by their drops).
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let result = tokio::select! {
            result = compare::all(&mut cluster, peers.as_ref(), &sizes) => result?,
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; peers and cluster stopped"),
            _ = term.recv() => anyhow::bail!("terminated; peers and cluster stopped"),
        };
        drop(cluster);
        drop(peers);
        return write_json(&args.json, args.shards, vec![result]);
    }
    let runs: Vec<Scenario> = match args.scenario {
        Scenario::Incident => vec![
            Scenario::MassRevoke { sessions: q(1_000_000, 50_000), sample: 200 },
            Scenario::ListJob { users: q(100_000, 10_000) },
            Scenario::WatchFanout { subscribers: 1_000, samples: q(200, 50) },
        ],
        one => vec![one],
    };
    let mut results = Vec::new();
    for run in runs {
        same_memory_settings_as_a_node()?;
        let cluster = cluster::BenchCluster::start(3, args.shards).await?;
        let result = match run {
            Scenario::MassRevoke { sessions, sample } => {
                scenarios::mass_revoke(&cluster, sessions, sample).await?
            }
            Scenario::ListJob { users } => scenarios::list_job(&cluster, users).await?,
            Scenario::WatchFanout { subscribers, samples } => {
                scenarios::watch_fanout(&cluster, subscribers as usize, samples as usize).await?
            }
            Scenario::Incident | Scenario::All { .. } => unreachable!("expanded above"),
        };
        results.push(result);
        drop(cluster);
    }
    write_json(&args.json, args.shards, results)
}

fn write_json(path: &std::path::Path, shards: u16, results: Vec<serde_json::Value>) -> anyhow::Result<()> {
    let out = serde_json::json!({ "machine": machine(), "shards": shards, "results": results });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    println!("\nresults written to {}", path.display());
    Ok(())
}
