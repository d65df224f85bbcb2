//! Incident response from the command line: `cascade revoke where|list`, `cascade jobs`,
//! `cascade audit` and `cascade watch`.
//!
//! A mass revocation asks for confirmation on a terminal (after a dry run that says how many
//! sessions it would take), needs `--yes` otherwise, and shows a progress bar while its job
//! runs. Bulk lists are read from a file and streamed in chunks; a broken stream is resumed
//! with `--resume <job id>` (chunks the cluster already applied are skipped there).

use crate::cli::api::Api;
use crate::cli::duration::parse_ms;
use crate::cli::exit::{self, Usage};
use crate::cli::render::{self, reason_name, Output, Record, Val};
use anyhow::Context as _;
use cascade_protocol::pb;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

/// Targets per streamed chunk (the server's limit).
const LIST_CHUNK: usize = 1000;
/// How often a running job's progress is asked for.
const JOB_POLL: Duration = Duration::from_millis(200);
/// Chunks read ahead of the stream.
const CHUNKS_AHEAD: usize = 4;

/// `cascade revoke where`: the selector (every flag given must match).
#[derive(Debug, Args)]
pub struct WhereArgs {
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long)]
    pub client: Option<String>,
    /// One user (needs --tenant).
    #[arg(long)]
    pub user: Option<String>,
    /// One device of --user.
    #[arg(long)]
    pub device: Option<String>,
    /// Sessions created at or before this time (ms since the Unix epoch).
    #[arg(long)]
    pub created_before_ms: Option<u64>,
    /// Sessions created more than this long ago (e.g. 2h): created before now minus it.
    #[arg(long, value_parser = parse_ms, conflicts_with = "created_before_ms")]
    pub older_than: Option<u64>,
    /// Sessions whose assurance level is below this (2 or 3).
    #[arg(long)]
    pub aal_below: Option<u32>,
    /// CIDR prefix of the IP sessions were created from, e.g. 203.0.113.0/24.
    #[arg(long)]
    pub ip: Option<String>,
    /// Region recorded with the sessions.
    #[arg(long)]
    pub region: Option<String>,
    #[command(flatten)]
    pub confirm: ConfirmArgs,
    #[command(flatten)]
    pub revocation: super::commands::RevocationArgs,
}

/// Dry run and confirmation, shared by bulk revocations.
#[derive(Debug, Args)]
pub struct ConfirmArgs {
    /// Count what would be revoked; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation (required when not on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `cascade revoke list`: users or devices from a file.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// File with one target per line: `tenant/user_id` or `tenant/user_id/device_id` (or just
    /// `user_id` with --tenant). Blank lines and lines starting with # are skipped. `-` reads
    /// standard input.
    #[arg(long)]
    pub from_file: String,
    /// Tenant of lines that name only a user id.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Continue this list job (after a broken stream): the file is sent again from its start
    /// and the cluster skips the chunks it already applied.
    #[arg(long)]
    pub resume: Option<String>,
    #[command(flatten)]
    pub confirm: ConfirmArgs,
    #[command(flatten)]
    pub revocation: super::commands::RevocationArgs,
}

/// `cascade jobs …`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Every job the cluster keeps, newest first.
    List,
    /// One job, with its progress per shard.
    Show { job_id: String },
    /// Stop a running job where it has not finished; what it revoked stays revoked.
    Cancel {
        job_id: String,
        /// Who is cancelling; defaults to $USER.
        #[arg(long, env = "USER", default_value = "cli")]
        actor: String,
    },
}

/// `cascade audit`: the revocation audit trail, oldest first.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only entries from this long ago onwards (e.g. 24h).
    #[arg(long, value_parser = parse_ms)]
    pub since: Option<u64>,
    /// Only entries at or after this time (ms since the Unix epoch).
    #[arg(long, conflicts_with = "since")]
    pub from_ms: Option<u64>,
    /// Only entries at or before this time (ms since the Unix epoch).
    #[arg(long)]
    pub until_ms: Option<u64>,
    #[arg(long)]
    pub actor: Option<String>,
    #[arg(long)]
    pub tenant: Option<String>,
    /// Needs --tenant.
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub job: Option<String>,
    /// At most this many entries (up to 10,000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

/// `cascade watch`: tail revocation events from the node.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Skip the initial snapshot of what is already revoked.
    #[arg(long)]
    pub no_snapshot: bool,
    /// Stop after this many events (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn job_record(j: &pb::RevokeJobInfo) -> Record {
    let shards: Vec<Record> = j
        .shards
        .iter()
        .map(|s| {
            Record::new()
                .with("shard", s.shard)
                .with("state", s.state.clone())
                .with("users_scanned", s.users_scanned)
                .with("sessions", s.sessions)
                .with("error", s.error.clone())
        })
        .collect();
    Record::new()
        .with("job_id", j.job_id.clone())
        .with("state", j.state.clone())
        .with("mode", j.mode.clone())
        .with("dry_run", j.dry_run)
        .with("selector", j.selector.clone())
        .with("sessions", j.sessions)
        .with("users_scanned", j.users_scanned)
        .with("shards_done", format!("{}/{}", j.shards_done, j.shards_total))
        .with("actor", j.actor.clone())
        .with("reason", Val::Enum(reason_name(j.reason)))
        .with("started_at", Val::TimeMs(j.started_ms))
        .with("finished_at", Val::TimeMs(j.finished_ms))
        .with("shards", Val::Rows(shards))
}

fn bar(total: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let template = format!("{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {unit} {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

/// Poll a job until it is no longer running, drawing shards done and sessions so far.
async fn follow(api: &Api, job: pb::RevokeJobInfo) -> anyhow::Result<pb::RevokeJobInfo> {
    let progress = bar(u64::from(job.shards_total), "shards");
    let mut info = job;
    loop {
        progress.set_position(u64::from(info.shards_done));
        progress.set_message(format!("{} sessions", info.sessions));
        if info.state != "running" && info.state != "unknown" {
            break;
        }
        tokio::time::sleep(JOB_POLL).await;
        let req = pb::GetRevokeJobRequest { job_id: info.job_id.clone(), shards: vec![] };
        info = api.get_revoke_job(req).await?;
    }
    progress.finish_and_clear();
    Ok(info)
}

/// On a terminal: ask. Elsewhere: only with --yes.
fn confirm(what: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(Usage(format!(
            "{what}: pass --yes to confirm when not on a terminal (or --dry-run to count)"
        ))
        .into());
    }
    eprint!("{what}. Proceed? [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).context("reading the confirmation")?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

pub async fn revoke_where(api: &Api, out: Output, a: WhereArgs) -> anyhow::Result<u8> {
    let created_before_ms = match (a.created_before_ms, a.older_than) {
        (Some(t), _) => t,
        (None, Some(age)) => now_ms().saturating_sub(age),
        (None, None) => 0,
    };
    let selector = pb::SessionSelector {
        tenant: a.tenant.unwrap_or_default(),
        client_id: a.client.unwrap_or_default(),
        user_id: a.user.unwrap_or_default(),
        device_id: a.device.unwrap_or_default(),
        created_before_ms,
        aal_below: a.aal_below.unwrap_or(0),
        ip_prefix: a.ip.unwrap_or_default(),
        region: a.region.unwrap_or_default(),
    };
    let start = |dry_run: bool| pb::StartRevokeJobRequest {
        selector: Some(selector.clone()),
        revocation: Some(a.revocation.to_pb()),
        dry_run,
        job_id: String::new(),
    };
    if !a.confirm.dry_run && !a.confirm.yes && std::io::stdin().is_terminal() {
        let counted = follow(api, api.start_revoke_job(start(true)).await?).await?;
        if !confirm(&format!("This revokes {} sessions now", counted.sessions), false)? {
            eprintln!("nothing revoked");
            return Ok(exit::SUCCESS);
        }
    } else if !a.confirm.dry_run {
        confirm("a mass revocation", a.confirm.yes)?;
    }
    let info = follow(api, api.start_revoke_job(start(a.confirm.dry_run)).await?).await?;
    render::emit(out, &job_record(&info));
    Ok(exit::SUCCESS)
}

/// One line of a list file as a target.
fn parse_target(line: &str, tenant: Option<&str>) -> Result<pb::ListTarget, String> {
    let parts: Vec<&str> = line.split('/').collect();
    let (tenant, user_id, device_id) = match (parts.as_slice(), tenant) {
        ([user], Some(t)) => (t, *user, ""),
        ([t, user], _) => (*t, *user, ""),
        ([t, user, device], _) => (*t, *user, *device),
        ([_], None) => return Err("a bare user id needs --tenant".to_owned()),
        _ => return Err("expected tenant/user_id or tenant/user_id/device_id".to_owned()),
    };
    Ok(pb::ListTarget {
        tenant: tenant.to_owned(),
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
    })
}

/// Reads the file into chunks on a blocking thread, sending them as stream messages.
fn chunk_reader(
    path: String,
    tenant: Option<String>,
    first: pb::RevokeListRequest,
    tx: tokio::sync::mpsc::Sender<pb::RevokeListRequest>,
    lines_read: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let reader: Box<dyn BufRead> = if path == "-" {
            Box::new(std::io::BufReader::new(std::io::stdin()))
        } else {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            Box::new(std::io::BufReader::new(file))
        };
        let mut chunk = 0u64;
        let mut pending: Vec<pb::ListTarget> = Vec::with_capacity(LIST_CHUNK);
        let mut first = Some(first);
        let mut send = |targets: Vec<pb::ListTarget>, chunk: u64, last: bool| -> anyhow::Result<()> {
            let mut msg = first.take().unwrap_or_default();
            msg.chunk = chunk;
            msg.targets = targets;
            msg.last = last;
            tx.blocking_send(msg).map_err(|_| anyhow::anyhow!("the stream to the server closed"))
        };
        for (n, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading {path}"))?;
            let line = line.trim();
            lines_read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let target = parse_target(line, tenant.as_deref())
                .map_err(|e| Usage(format!("{path}:{}: {e}: {line:?}", n + 1)))?;
            pending.push(target);
            if pending.len() == LIST_CHUNK {
                chunk += 1;
                send(std::mem::take(&mut pending), chunk, false)?;
            }
        }
        let has_rest = !pending.is_empty();
        if has_rest {
            chunk += 1;
        }
        send(pending, if has_rest { chunk } else { 0 }, true)?;
        Ok(chunk)
    })
}

pub async fn revoke_list(api: &Api, out: Output, a: ListArgs) -> anyhow::Result<u8> {
    if !a.confirm.dry_run {
        confirm(&format!("Revoke every user and device listed in {}", a.from_file), a.confirm.yes)?;
    }
    let first = pb::RevokeListRequest {
        job_id: a.resume.clone().unwrap_or_default(),
        revocation: Some(a.revocation.to_pb()),
        dry_run: a.confirm.dry_run,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_AHEAD);
    let lines = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = chunk_reader(a.from_file.clone(), a.tenant.clone(), first, tx, lines.clone());
    let mut stream = api.revoke_list(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
    let progress = bar(0, "chunks");
    let mut last = None;
    let mut job_id = String::new();
    let outcome = loop {
        match stream.message().await {
            Ok(Some(info)) => {
                job_id.clone_from(&info.job_id);
                progress
                    .set_length(lines.load(std::sync::atomic::Ordering::Relaxed).div_ceil(LIST_CHUNK as u64));
                progress.set_position(info.chunks_acked);
                progress.set_message(format!("{} sessions ({})", info.sessions, info.job_id));
                last = Some(info);
            }
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    progress.finish_and_clear();
    // A bad line stops the reader, which ends the stream: its error is the one to report.
    let read = reader.await.context("the file reader stopped")?;
    let chunks = read?;
    if let Err(status) = outcome {
        let acked = last.as_ref().map_or(0, |l| l.chunks_acked);
        let resume =
            if job_id.is_empty() { String::new() } else { format!("; resume with --resume {job_id}") };
        return Err(exit::RpcError {
            rpc: "RevokeList",
            code: status.code(),
            message: format!("{} (after {acked} of {chunks} chunks applied{resume})", status.message()),
        }
        .into());
    }
    let info = last.context("the server sent no progress")?;
    render::emit(out, &job_record(&info));
    Ok(exit::SUCCESS)
}

pub async fn jobs(api: &Api, out: Output, command: JobsCommand) -> anyhow::Result<u8> {
    match command {
        JobsCommand::List => {
            let jobs = api.list_revoke_jobs(pb::ListRevokeJobsRequest::default()).await?.jobs;
            let rows: Vec<Record> = jobs
                .iter()
                .map(|j| {
                    Record::new()
                        .with("job_id", j.job_id.clone())
                        .with("state", j.state.clone())
                        .with("mode", j.mode.clone())
                        .with("sessions", j.sessions)
                        .with("shards_done", format!("{}/{}", j.shards_done, j.shards_total))
                        .with("actor", j.actor.clone())
                        .with("started_at", Val::TimeMs(j.started_ms))
                        .with("selector", j.selector.clone())
                })
                .collect();
            render::emit_rows(out, "jobs", &rows);
        }
        JobsCommand::Show { job_id } => {
            let info = api.get_revoke_job(pb::GetRevokeJobRequest { job_id, shards: vec![] }).await?;
            render::emit(out, &job_record(&info));
        }
        JobsCommand::Cancel { job_id, actor } => {
            let info = api.cancel_revoke_job(pb::CancelRevokeJobRequest { job_id, actor }).await?;
            render::emit(out, &job_record(&info));
        }
    }
    Ok(exit::SUCCESS)
}

pub async fn audit(api: &Api, out: Output, a: AuditArgs) -> anyhow::Result<u8> {
    let from_ms = match (a.from_ms, a.since) {
        (Some(t), _) => t,
        (None, Some(age)) => now_ms().saturating_sub(age),
        (None, None) => 0,
    };
    let req = pb::QueryAuditRequest {
        from_ms,
        until_ms: a.until_ms.unwrap_or(0),
        actor: a.actor.unwrap_or_default(),
        tenant: a.tenant.unwrap_or_default(),
        user_id: a.user.unwrap_or_default(),
        job_id: a.job.unwrap_or_default(),
        limit: a.limit,
        shards: vec![],
    };
    let r = api.query_audit(req).await?;
    let rows: Vec<Record> = r
        .entries
        .iter()
        .map(|e| {
            Record::new()
                .with("at", Val::TimeMs(e.at_ms))
                .with("actor", e.actor.clone())
                .with("reason", Val::Enum(reason_name(e.reason)))
                .with("action", e.action.clone())
                .with("sessions", e.sessions)
                .with("tenant", e.tenant.clone())
                .with("user", e.user_id.clone())
                .with("detail", e.detail.clone())
                .with("job_id", e.job_id.clone())
                .with("shard", e.shard)
                .with("text", e.text.clone())
        })
        .collect();
    render::emit_rows(out, "audit", &rows);
    if r.truncated {
        eprintln!("(more entries match; narrow the query or raise --limit)");
    }
    Ok(exit::SUCCESS)
}

pub async fn watch(api: &Api, out: Output, a: WatchArgs) -> anyhow::Result<u8> {
    let mut stream = api.watch_revocations(pb::WatchRevocationsRequest::default()).await?;
    let mut seen = 0u64;
    loop {
        let msg = match stream.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(exit::SUCCESS),
            Err(status) => {
                return Err(exit::RpcError {
                    rpc: "WatchRevocations",
                    code: status.code(),
                    message: status.message().to_owned(),
                }
                .into())
            }
        };
        for e in msg.events {
            if a.no_snapshot && e.index == 0 {
                continue;
            }
            let what = match e.what {
                Some(pb::revocation_event::What::Session(s)) => {
                    format!("session {} of {}/{}", s.session_id, s.tenant, s.user_id)
                }
                Some(pb::revocation_event::What::Watermark(w)) => {
                    format!(
                        "watermark {} {} {} {} at {}",
                        w.scope().as_str_name(),
                        w.tenant,
                        w.client_id,
                        w.user_id,
                        w.watermark_ms
                    )
                }
                None => continue,
            };
            let rec = Record::new()
                .with("shard", e.shard)
                .with("index", e.index)
                .with("at", Val::TimeMs(e.at_ms))
                .with("reason", Val::Enum(reason_name(e.reason)))
                .with("actor", e.actor.clone())
                .with("what", what.clone());
            match out {
                Output::Json => render::emit(out, &rec),
                Output::Table => println!(
                    "{}  shard {:<3} index {:<8} {:<18} {:<16} {what}",
                    render::format_time_ms(e.at_ms),
                    e.shard,
                    e.index,
                    reason_name(e.reason),
                    e.actor
                ),
            }
            seen += 1;
            if a.count.is_some_and(|c| seen >= c) {
                return Ok(exit::SUCCESS);
            }
        }
    }
}
