//! `cascade-sim`: run one seed, or sweep many.

use cascade_core::planted::Bug;
use cascade_sim::report;
use cascade_sim::run::{run, Options};
use cascade_sim::sweep::{rto_table, sweep, SweepOptions};
use clap::{Parser, Subcommand};
use std::ops::Range;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cascade-sim",
    about = "Deterministic simulation of a Cascade cluster, reproducible from a seed"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Derive a scenario from the seed, run it, check it, print the verdict.
    Run {
        #[arg(long)]
        seed: u64,
        /// Plant a known bug: ack-before-flush, stale-leader-read, skip-cascade-child.
        #[arg(long = "bug")]
        bugs: Vec<String>,
        /// Print only a one-line JSON summary (what `sweep` reads).
        #[arg(long)]
        summary_json: bool,
        /// Write the full history as JSON to this file.
        #[arg(long)]
        history: Option<std::path::PathBuf>,
        /// Node logs on stderr (`RUST_LOG` filter, default info).
        #[arg(long)]
        verbose: bool,
    },
    /// Run many seeds, a few processes at a time.
    Sweep {
        /// Seeds `A..B` (B excluded).
        #[arg(long, value_parser = parse_range)]
        seeds: Range<u64>,
        /// Processes at once.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Run every k-th seed twice and compare trace hashes (0: never; 1: every seed).
        #[arg(long, default_value_t = 0)]
        check_determinism: u64,
        #[arg(long = "bug")]
        bugs: Vec<String>,
        /// Succeed as soon as a seed violates this checker (proof that it catches a planted bug);
        /// fail if no seed in the range does.
        #[arg(long)]
        expect: Option<String>,
    },
}

fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let (a, b) = s.split_once("..").ok_or_else(|| format!("expected A..B, got {s:?}"))?;
    let a: u64 = a.parse().map_err(|e| format!("bad start {a:?}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("bad end {b:?}: {e}"))?;
    if b <= a {
        return Err(format!("empty range {s:?}"));
    }
    Ok(a..b)
}

fn parse_bugs(names: &[String]) -> Result<Vec<Bug>, String> {
    names
        .iter()
        .map(|n| {
            Bug::from_name(n).ok_or_else(|| {
                let known: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
                format!("unknown bug {n:?}; known: {}", known.join(", "))
            })
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run { seed, bugs, summary_json, history, verbose } => {
            let bugs = match parse_bugs(&bugs) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if verbose {
                let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr)
                    .without_time()
                    .init();
            }
            let names: Vec<&str> = bugs.iter().map(|b| b.name()).collect();
            if !summary_json {
                println!("{}", cascade_sim::scenario::Scenario::from_seed(seed));
                println!("running...");
            }
            let outcome = match run(seed, &Options { bugs: bugs.clone() }) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("error: seed {seed}: {e:#}");
                    return ExitCode::from(2);
                }
            };
            if let Some(path) = history {
                match serde_json::to_vec_pretty(&outcome.history) {
                    Ok(json) => {
                        if let Err(e) = std::fs::write(&path, json) {
                            eprintln!("error: write {}: {e}", path.display());
                            return ExitCode::from(2);
                        }
                    }
                    Err(e) => eprintln!("error: history to JSON: {e}"),
                }
            }
            if summary_json {
                println!("{}", serde_json::to_string(&report::summary(&outcome)).unwrap_or_default());
            } else {
                let text = report::text(&outcome, &names.join(", "));
                // Skip the scenario already printed.
                println!(
                    "{}",
                    text.lines().skip_while(|l| !l.starts_with("ran ")).collect::<Vec<_>>().join("\n")
                );
                if !outcome.passed() {
                    let bug_args: String = names.iter().map(|b| format!(" --bug {b}")).collect();
                    println!("reproduce: cargo run --release -p cascade-sim -- run --seed {seed}{bug_args}");
                }
            }
            if outcome.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Cmd::Sweep { seeds, jobs, check_determinism, bugs, expect } => {
            if let Err(e) = parse_bugs(&bugs) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            let options = SweepOptions {
                seeds: seeds.clone(),
                jobs,
                determinism_every: check_determinism,
                bugs,
                expect,
            };
            let result = match sweep(&options) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let n = result.runs.len();
            let failed: Vec<_> = result.runs.iter().filter(|r| !r.passed).collect();
            println!(
                "swept {n} seeds in {:.1} s ({:.2} seeds/s, {} jobs): {} passed, {} failed, {} crashed",
                result.wall_s,
                n as f64 / result.wall_s.max(0.001),
                jobs,
                n - failed.len(),
                failed.len(),
                result.crashed.len()
            );
            let bug_args: String = options.bugs.iter().map(|b| format!(" --bug {b}")).collect();
            for r in &failed {
                println!(
                    "FAIL seed {} [{}]: {}",
                    r.seed,
                    r.failed_checkers.join(", "),
                    r.violations.first().map_or("", String::as_str)
                );
                println!(
                    "  reproduce: cargo run --release -p cascade-sim -- run --seed {}{bug_args}",
                    r.seed
                );
            }
            for (seed, e) in &result.crashed {
                println!("CRASH seed {seed}: {e}");
            }
            if check_determinism > 0 {
                let checked =
                    result.runs.iter().filter(|r| (r.seed - seeds.start) % check_determinism == 0).count();
                println!("determinism: {checked} seeds replayed, {} differed", result.nondeterministic.len());
                for (seed, a, b) in &result.nondeterministic {
                    println!("NONDETERMINISTIC seed {seed}: {a} then {b}");
                }
            }
            let lost: usize = result.runs.iter().map(|r| r.rpo_lost).sum();
            println!("RPO: {lost} acknowledged writes lost over all seeds");
            println!("{}", rto_table(&result.runs));
            if let Some(expect) = &options.expect {
                return match result.found_expected {
                    Some(seed) => {
                        println!("found: seed {seed} violates {expect:?} (after {n} seeds)");
                        ExitCode::SUCCESS
                    }
                    None => {
                        println!("NOT FOUND: no seed in {seeds:?} violates {expect:?}");
                        ExitCode::from(1)
                    }
                };
            }
            if failed.is_empty() && result.crashed.is_empty() && result.nondeterministic.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
