//! The `cascade` command line: `serve` runs a node; the client commands each make one call to a
//! running node; `demo` and `load` exercise a node (optionally one started in-process).
//!
//! This module parses flags and dispatches. It must not hold session logic (that lives in
//! `cascade-core`) or server wiring (that lives in the `cascade_node` library, reached only
//! through `cascade_node::run`).

mod api;
mod auth_cmd;
mod cluster;
mod commands;
mod demo;
mod drill;
mod duration;
mod exit;
mod load;
mod local;
mod propagation;
mod render;
mod respond;
mod serve;

use api::Api;
use clap::{Parser, Subcommand};
use commands::{CreateArgs, RevokeCommand, WatermarkArgs};
use render::Output;
use std::process::ExitCode;
use std::time::Duration;

/// How long the runtime waits for stray background tasks once a command is done.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Cascade: a session and revocation cluster.
#[derive(Debug, Parser)]
#[command(name = "cascade", version, after_help = exit::HELP, propagate_version = true)]
pub struct Cli {
    /// Address of the node to talk to (client commands and `load`).
    #[arg(long, global = true, env = "CASCADE_ADDR", default_value = "http://127.0.0.1:7400")]
    addr: String,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// CA certificate (PEM) to check the server against; connects over TLS (`https://`).
    #[arg(long, global = true, env = "CASCADE_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) to present, for nodes with `tls.require_client_cert`.
    #[arg(long, global = true, env = "CASCADE_TLS_CERT", value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, global = true, env = "CASCADE_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// API key presented on every call (`cascade auth new-key` makes one).
    #[arg(long, global = true, env = "CASCADE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Deadline of each call to the server, in milliseconds.
    #[arg(long, global = true, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node until SIGINT or SIGTERM.
    #[command(after_help = exit::HELP)]
    Serve(serve::ServeArgs),
    /// API keys: make one (prints the key once, and the line for the nodes' [auth] config).
    Auth {
        #[command(subcommand)]
        what: auth_cmd::AuthCommand,
    },
    /// Create a session.
    #[command(after_help = exit::HELP)]
    Create(CreateArgs),
    /// Check one session (exit 5 when it is not VALID).
    #[command(after_help = exit::HELP)]
    Check {
        /// Session id (cs_…).
        session_id: String,
        /// Thumbprint of the key the caller proved possession of.
        #[arg(long)]
        jkt: Option<String>,
        /// Required assurance level, 1..3 (0 = none).
        #[arg(long, default_value_t = 0)]
        aal: u32,
        /// Confirm with the shard's quorum that the answer is current (slower), instead of
        /// accepting any answer within the revocation bound.
        #[arg(long)]
        linearizable: bool,
    },
    /// Check up to 256 sessions in one call; one result per session, in order.
    #[command(after_help = exit::HELP)]
    CheckBatch {
        /// Session ids (cs_…).
        #[arg(required = true, num_args = 1..)]
        session_ids: Vec<String>,
        /// Thumbprint sent with every check.
        #[arg(long)]
        jkt: Option<String>,
        /// Required assurance level sent with every check (0 = none).
        #[arg(long, default_value_t = 0)]
        aal: u32,
    },
    /// Record activity on a session (extends its idle timeout).
    #[command(after_help = exit::HELP)]
    Touch {
        /// Session id (cs_…).
        session_id: String,
    },
    /// Raise a session's assurance level after a stronger authentication.
    #[command(after_help = exit::HELP)]
    StepUp {
        /// Session id (cs_…).
        session_id: String,
        /// New assurance level, 1..3.
        #[arg(long)]
        aal: u32,
        /// Authentication methods used, comma separated.
        #[arg(long, value_delimiter = ',')]
        amr: Vec<String>,
    },
    /// Rotate a refresh token; presenting an old one revokes its family and session.
    #[command(after_help = exit::HELP)]
    Rotate {
        /// Refresh token (rt_…).
        refresh_token: String,
    },
    /// List a user's sessions and devices.
    #[command(after_help = exit::HELP)]
    List {
        /// Tenant the user belongs to.
        #[arg(long)]
        tenant: String,
        /// User id within the tenant.
        #[arg(long)]
        user: String,
    },
    /// Revoke a session, a refresh-token family, a device or a user.
    #[command(after_help = exit::HELP)]
    Revoke {
        #[command(subcommand)]
        what: RevokeCommand,
    },
    /// Mass revocation jobs: list them, show one's progress per shard, cancel one.
    Jobs {
        #[command(subcommand)]
        what: respond::JobsCommand,
    },
    /// The audit trail of revocations (who, why, when, what, how many), oldest first.
    Audit(respond::AuditArgs),
    /// Tail revocation events as the node applies them (after a snapshot of what is revoked).
    Watch(respond::WatchArgs),
    /// Set a "not before" watermark: sessions created at or before it become invalid.
    #[command(after_help = exit::HELP)]
    Watermark(WatermarkArgs),
    /// Show the node's shards (leader, role, term, indexes) and totals.
    #[command(after_help = exit::HELP)]
    Status,
    /// Operate the whole cluster: status of every node and shard, leadership transfer, adding
    /// and removing nodes, and cutting links for drills.
    #[command(after_help = exit::HELP)]
    Cluster {
        #[command(subcommand)]
        what: cluster::ClusterCommand,
    },
    /// Start 3 nodes in 3 regions, walk through what Cascade promises, kill a shard leader.
    #[command(after_help = exit::HELP)]
    Demo(demo::DemoArgs),
    /// Create sessions, then measure CheckSession throughput and latency.
    #[command(after_help = exit::HELP)]
    Load(load::LoadArgs),
    /// Measure how long an acknowledged revocation takes to be visible on every node of a
    /// running cluster (p50/p99 in ms); exit 1 if any exceeded the revocation bound.
    Propagation(propagation::PropagationArgs),
    /// Failover drill against a running cluster started with --enable-fault-injection: inject
    /// a fault with a canary workload running, undo it, report RTO/RPO (exit 5 if a promise
    /// was broken).
    #[command(after_help = exit::HELP)]
    Drill {
        #[command(subcommand)]
        fault: drill::DrillCommand,
    },
}

/// Parses the command line, runs the command, and turns its outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = cascade_node::memory::disable_transparent_huge_pages() {
        // Slower checks, not wrong ones: say so and go on.
        eprintln!("warning: cannot turn transparent huge pages off for this process: {err}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let result = runtime.block_on(run(cli));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit::error_exit(&err))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let out = cli.output;
    let timeout = Duration::from_millis(cli.timeout_ms);
    if let Some(key) = &cli.api_key {
        api::use_api_key(key)?;
    }
    if let Some(ca) = &cli.tls_ca {
        api::use_tls(ca, cli.tls_cert.as_deref().zip(cli.tls_key.as_deref()))?;
    }
    let command = match cli.command {
        Command::Auth { what } => return auth_cmd::run(out, what),
        Command::Serve(args) => return serve::serve(args).await,
        Command::Demo(args) => return demo::demo(args, timeout).await,
        Command::Load(args) => return load::load(args, &cli.addr, out, timeout).await,
        Command::Propagation(args) => {
            return propagation::propagation(args, &cli.addr, out, timeout).await;
        }
        Command::Drill { fault } => return drill::drill(fault, &cli.addr, out, timeout).await,
        other => other,
    };
    let api = Api::connect(&cli.addr, timeout).await?;
    match command {
        Command::Create(args) => commands::create(&api, out, args).await,
        Command::Check { session_id, jkt, aal, linearizable } => {
            commands::check(&api, out, session_id, jkt, aal, linearizable).await
        }
        Command::CheckBatch { session_ids, jkt, aal } => {
            commands::check_batch(&api, out, session_ids, jkt, aal).await
        }
        Command::Touch { session_id } => commands::touch(&api, out, session_id).await,
        Command::StepUp { session_id, aal, amr } => commands::step_up(&api, out, session_id, aal, amr).await,
        Command::Rotate { refresh_token } => commands::rotate(&api, out, refresh_token).await,
        Command::List { tenant, user } => commands::list(&api, out, tenant, user).await,
        Command::Revoke { what } => commands::revoke(&api, out, what).await,
        Command::Watermark(args) => commands::watermark(&api, out, args).await,
        Command::Jobs { what } => respond::jobs(&api, out, what).await,
        Command::Audit(args) => respond::audit(&api, out, args).await,
        Command::Watch(args) => respond::watch(&api, out, args).await,
        Command::Status => commands::status(&api, out).await,
        Command::Cluster { what } => cluster::run(&api, &cli.addr, out, what).await,
        Command::Serve(_)
        | Command::Auth { .. }
        | Command::Demo(_)
        | Command::Load(_)
        | Command::Propagation(_)
        | Command::Drill { .. } => Ok(exit::INTERNAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The flag tree is consistent (clap's own checks: no duplicate or conflicting flags).
    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    /// Examples from the documentation parse as documented.
    #[test]
    fn documented_examples_parse() {
        for line in [
            "cascade serve --config node.toml --listen 127.0.0.1:7401 --data-dir /tmp/x --node-id 2 --shards 8",
            "cascade create --tenant acme --user alice --client web --device laptop --jkt K --aal 2 --amr pwd,otp --ttl 8h --idle 30m --refresh",
            "cascade -o json check cs_x --jkt K --aal 2",
            "cascade check-batch cs_a cs_b cs_c --timeout-ms 100",
            "cascade revoke session cs_x --reason logout --text bye --actor me",
            "cascade revoke device --tenant acme --user alice --device laptop",
            "cascade revoke user --tenant acme --user alice --reason compromised",
            "cascade watermark --scope client --tenant acme --client web --not-before-ms 5",
            "cascade status -o json --addr 127.0.0.1:7400",
            "cascade load --local --sessions 100 --concurrency 4 --duration-s 1",
            "cascade demo --keep",
            "cascade --addr 127.0.0.1:7401 cluster status",
            "cascade cluster status -o json --timeout-ms 500",
            "cascade cluster transfer-leader --shard 3 --to 2",
            "cascade cluster add-node --id 4 --node-addr 127.0.0.1:7404 --region eu",
            "cascade cluster remove-node --id 4",
            "cascade cluster cut --peer 127.0.0.1:7402 --peer 127.0.0.1:7403",
            "cascade cluster cut --heal",
        ] {
            let args: Vec<&str> = line.split_whitespace().collect();
            if let Err(err) = Cli::try_parse_from(&args) {
                panic!("{line}: {err}");
            }
        }
    }

    #[test]
    fn usage_errors_are_refused() {
        for line in [
            "cascade create --tenant acme --user alice --client web --device laptop",
            "cascade check-batch",
            "cascade revoke session cs_x --reason nope",
            "cascade create --tenant a --user b --client c --ttl 8x",
            "cascade serve --shards 0",
            "cascade cluster transfer-leader --shard 1",
            "cascade cluster transfer-leader --shard 1 --to 0",
            "cascade cluster add-node --id 4 --node-addr 127.0.0.1:7404",
            "cascade cluster remove-node",
        ] {
            let args: Vec<&str> = line.split_whitespace().collect();
            assert!(Cli::try_parse_from(&args).is_err(), "{line}");
        }
    }
}
