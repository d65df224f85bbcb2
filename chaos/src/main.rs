//! `cascade-chaos`: run a chaos scenario against real `cascade` processes and report.
//!
//! Exit codes: 0 every promise held; 1 a promise was broken (the report says which);
//! 2 the harness could not run (bad arguments, no binary, the cluster never formed).

use cascade_chaos::nemesis;
use cascade_chaos::run::{run, RunOptions};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "cascade-chaos", about = "Faults on real cascade processes, with RTO/RPO reports")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario and write report.{json,md,html} and history.json.
    Run {
        /// Scenario name (`cascade-chaos list`).
        #[arg(long, default_value = "smoke")]
        scenario: String,
        /// Output directory (default: a new directory under the system temp dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The cascade binary the nodes run (default: $CASCADE_BIN or next to this binary).
        #[arg(long)]
        bin: Option<PathBuf>,
        /// Seed of the workload and of the link jitter.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// No progress lines.
        #[arg(long)]
        quiet: bool,
        /// Make the nodes commit a known bug (ack-before-flush, stale-leader-read,
        /// skip-cascade-child) to see the checkers catch it; repeatable.
        #[arg(long = "bug", value_name = "NAME")]
        bugs: Vec<String>,
    },
    /// List the scenarios.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::List => {
            for s in nemesis::scenarios() {
                let faults: Vec<&str> = s.steps.iter().map(|st| st.nemesis.name()).collect();
                println!(
                    "{:<18} {} nodes, faults: {}\n{:<18} {}",
                    s.name,
                    s.nodes,
                    faults.join(", "),
                    "",
                    s.description
                );
            }
            ExitCode::SUCCESS
        }
        Command::Run { scenario, out, bin, seed, quiet, bugs } => {
            let result = (|| -> anyhow::Result<cascade_check::report::Report> {
                let scenario = nemesis::scenario(&scenario)?;
                let out = match out {
                    Some(o) => o,
                    None => std::env::temp_dir().join(format!(
                        "cascade-chaos-{}-{}",
                        scenario.name,
                        std::process::id()
                    )),
                };
                let opts = RunOptions {
                    scenario,
                    bin: bin.unwrap_or_else(cascade_chaos::default_bin),
                    out,
                    seed,
                    progress: !quiet,
                    planted_bugs: bugs,
                };
                let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
                let report = rt.block_on(run(&opts))?;
                println!("{}", report.markdown());
                println!("reports: {}/report.{{json,md,html}}", opts.out.display());
                Ok(report)
            })();
            match result {
                Ok(r) if r.passed() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("cascade-chaos: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
