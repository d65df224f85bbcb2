//! Incident response: mass revocation jobs and the audit trail.
//!
//! A job is a record in every shard it concerns (cascade_core::jobs); this module starts it on
//! each shard, streams list chunks into it, cancels it, and reads its progress and the audit
//! trail back from the shards. Reads come from this node's replica of a shard when it has one
//! (progress may trail the leader by the replication lag), otherwise from the shard's leader.
//! The scan steps themselves are proposed by the shard leader's actor (actors/shard_actor.rs).

use crate::actors::shard_actor::ShardMsg;
use crate::api::cascade::{reason_to_pb, revocation};
use crate::api::ctx::NodeCtx;
use crate::api::status::ApiError;
use crate::auth::Caller;
use cascade_protocol::command::{Command, Envelope, Revocation, WatermarkScope};
use cascade_protocol::ids::{ShardId, UserKey};
use cascade_protocol::job::{
    job_id_to_string, parse_job_id, AuditAction, AuditRecord, IpPrefix, Job, JobId, JobMode, JobSelector,
    JobSpec, SessionFilter, Target,
};
use cascade_protocol::limits::{self as lim, FieldError};
use cascade_protocol::outcome::Outcome;
use cascade_protocol::pb;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// Targets in one `RevokeList` chunk at most.
pub const LIST_CHUNK_TARGETS_MAX: usize = 1000;
/// Progress messages queued per `RevokeList` stream.
const LIST_PROGRESS_QUEUE: usize = 4;
/// Audit entries one query returns by default and at most.
pub const AUDIT_LIMIT_DEFAULT: usize = 100;
pub const AUDIT_LIMIT_MAX: usize = 10_000;

pub type RevokeListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::RevokeJobInfo, Status>> + Send>>;

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The filter of a selector, validated.
pub fn filter_from_pb(s: pb::SessionSelector) -> Result<SessionFilter, ApiError> {
    let check = |field: &'static str, v: &str, max: usize| -> Result<(), ApiError> {
        if v.is_empty() {
            return Ok(());
        }
        lim::check_id(field, v, max).map_err(ApiError::from)
    };
    check("selector.tenant", &s.tenant, lim::TENANT_LEN_MAX)?;
    check("selector.client_id", &s.client_id, lim::ID_LEN_MAX)?;
    check("selector.user_id", &s.user_id, lim::ID_LEN_MAX)?;
    check("selector.device_id", &s.device_id, lim::ID_LEN_MAX)?;
    check("selector.region", &s.region, lim::REGION_LEN_MAX)?;
    if !s.user_id.is_empty() && s.tenant.is_empty() {
        return Err(FieldError::new("selector.user_id", "needs selector.tenant").into());
    }
    if !s.device_id.is_empty() && s.user_id.is_empty() {
        return Err(FieldError::new("selector.device_id", "needs selector.user_id").into());
    }
    let aal_below = match s.aal_below {
        0 => None,
        a @ 2..=3 => Some(a as u8),
        a => {
            let e =
                FieldError::new("selector.aal_below", format!("must be 2 or 3 (sessions below it), got {a}"));
            return Err(e.into());
        }
    };
    let ip_prefix = if s.ip_prefix.is_empty() {
        None
    } else {
        Some(s.ip_prefix.parse::<IpPrefix>().map_err(|e| FieldError::new("selector.ip_prefix", e))?)
    };
    let filter = SessionFilter {
        tenant: opt(s.tenant),
        client_id: opt(s.client_id),
        user_id: opt(s.user_id),
        device_id: opt(s.device_id),
        created_before_ms: (s.created_before_ms != 0).then_some(s.created_before_ms),
        aal_below,
        ip_prefix,
        region: opt(s.region),
    };
    if filter.is_empty() {
        return Err(FieldError::new(
            "selector",
            "must set at least one field (an empty selector matches every session)",
        )
        .into());
    }
    Ok(filter)
}

fn job_id_field(field: &'static str, s: &str) -> Result<JobId, ApiError> {
    parse_job_id(s).ok_or_else(|| {
        FieldError::new(field, format!("{s:?} is not a job id (job_ followed by 16 hex digits)")).into()
    })
}

fn mode_name(mode: &JobMode) -> &'static str {
    match mode {
        JobMode::Revoke => "revoke",
        JobMode::DryRun => "dry_run",
        JobMode::Tally { .. } => "watermark",
        JobMode::List => "list",
    }
}

fn selector_text(selector: &JobSelector) -> String {
    match selector {
        JobSelector::Filter(f) => format!("filter {f}"),
        JobSelector::List => "list".to_owned(),
    }
}

/// One shard's view of a job, as a partial `RevokeJobInfo` (merged by [`merge`]).
fn part(shard: ShardId, job: &Job) -> pb::RevokeJobInfo {
    pb::RevokeJobInfo {
        job_id: job_id_to_string(job.id),
        state: job.state.as_str().to_owned(),
        dry_run: job.spec.dry_run,
        selector: selector_text(&job.spec.selector),
        mode: mode_name(&job.mode).to_owned(),
        sessions: job.sessions,
        users_scanned: job.users_scanned,
        shards: vec![pb::ShardJobProgress {
            shard: u32::from(shard),
            state: job.state.as_str().to_owned(),
            users_scanned: job.users_scanned,
            sessions: job.sessions,
            last_chunk: job.last_chunk,
            error: String::new(),
        }],
        started_ms: job.started_ms,
        finished_ms: job.finished_ms,
        actor: job.spec.revocation.actor.clone(),
        reason: reason_to_pb(job.spec.revocation.reason) as i32,
        text: job.spec.revocation.text.clone(),
        ..Default::default()
    }
}

fn missing_part(shard: ShardId, state: &str, error: String) -> pb::RevokeJobInfo {
    pb::RevokeJobInfo {
        shards: vec![pb::ShardJobProgress {
            shard: u32::from(shard),
            state: state.to_owned(),
            error,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One job's parts from several shards, summed into the cluster-wide view.
fn merge(job_id: JobId, parts: Vec<pb::RevokeJobInfo>) -> pb::RevokeJobInfo {
    let mut out = pb::RevokeJobInfo { job_id: job_id_to_string(job_id), ..Default::default() };
    let mut shards: Vec<pb::ShardJobProgress> = Vec::new();
    let mut header = false;
    for p in parts {
        let known = p.shards.iter().any(|s| matches!(s.state.as_str(), "running" | "done" | "cancelled"));
        if known && !header {
            header = true;
            out.dry_run = p.dry_run;
            out.selector = p.selector.clone();
            out.mode = p.mode.clone();
            out.started_ms = p.started_ms;
            out.actor = p.actor.clone();
            out.reason = p.reason;
            out.text = p.text.clone();
        }
        out.finished_ms = out.finished_ms.max(p.finished_ms);
        shards.extend(p.shards);
    }
    shards.sort_by_key(|s| s.shard);
    let mut chunks_acked = u64::MAX;
    for s in &shards {
        match s.state.as_str() {
            "running" | "done" | "cancelled" => {
                out.shards_total += 1;
                out.sessions += s.sessions;
                out.users_scanned += s.users_scanned;
                chunks_acked = chunks_acked.min(s.last_chunk);
                if s.state != "running" {
                    out.shards_done += 1;
                }
            }
            _ => {}
        }
    }
    let any = |state: &str| shards.iter().any(|s| s.state == state);
    out.state = if out.shards_total == 0 {
        "unknown"
    } else if any("running") || any("unreachable") {
        "running"
    } else if any("cancelled") {
        "cancelled"
    } else {
        "done"
    }
    .to_owned();
    if out.state == "running" {
        out.finished_ms = 0;
    }
    out.chunks_acked = if chunks_acked == u64::MAX { 0 } else { chunks_acked };
    out.shards = shards;
    out
}

fn shards_of(ctx: &NodeCtx, requested: &[u32]) -> Result<Vec<ShardId>, ApiError> {
    if requested.is_empty() {
        return Ok((0..ctx.n_shards).collect());
    }
    requested
        .iter()
        .map(|s| match u16::try_from(*s) {
            Ok(s) if s < ctx.n_shards => Ok(s),
            _ => {
                Err(FieldError::new("shards", format!("shard {s} does not exist ({} shards)", ctx.n_shards))
                    .into())
            }
        })
        .collect()
}

/// Ask `shard` through this node's replica, or through its leader (`remote`, which forwards
/// with `NodeCtx::forward`) when this node has none.
async fn per_shard<T, Fut, L, R>(ctx: &NodeCtx, shard: ShardId, local: L, remote: R) -> Result<T, ApiError>
where
    L: FnOnce(&cascade_raft::sm::ShardReader) -> std::io::Result<T>,
    R: FnOnce(Vec<u32>) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    if ctx.is_replica(shard) {
        if let Some(reader) = ctx.host.reader(shard) {
            return local(reader).map_err(|e| ApiError::Internal(format!("shard {shard}: {e}")));
        }
    }
    remote(vec![u32::from(shard)]).await
}

/// Every shard's part of job `id`.
async fn job_parts(ctx: &NodeCtx, id: JobId, shards: &[ShardId]) -> Vec<pb::RevokeJobInfo> {
    let asks = shards.iter().map(|&shard| async move {
        let got = per_shard(
            ctx,
            shard,
            |r| Ok(r.job(id)?.map(|j| part(shard, &j))),
            |shards| async move {
                let req = pb::GetRevokeJobRequest { job_id: job_id_to_string(id), shards };
                let info =
                    ctx.forward(shard, req, |mut c, req| async move { c.get_revoke_job(req).await }).await?;
                Ok((info.shards_total > 0).then_some(info))
            },
        )
        .await;
        match got {
            Ok(Some(p)) => p,
            Ok(None) => missing_part(shard, "absent", String::new()),
            Err(e) => missing_part(shard, "unreachable", e.to_string()),
        }
    });
    futures::future::join_all(asks).await
}

fn kick_local(ctx: &NodeCtx, shards: &[ShardId]) {
    for &shard in shards {
        if ctx.leads(shard) {
            if let Some(actor) = ctx.directory.get(shard) {
                let _ = actor.send_message(ShardMsg::JobTick);
            }
        }
    }
}

/// Propose one envelope to each shard; the outcomes by shard.
async fn to_shards(
    ctx: &NodeCtx,
    shards: &[ShardId],
    command: Command,
) -> Vec<(ShardId, Result<Outcome, ApiError>)> {
    let envelope = Envelope::new(ctx.clock.now_ms(), command);
    let writes = shards.iter().map(|&s| {
        let envelope = envelope.clone();
        async move { (s, ctx.write_envelope(s, envelope).await.map(|a| a.outcome)) }
    });
    futures::future::join_all(writes).await
}

/// Start `spec` as job `id` on `shards`; every shard's record, or why some failed.
async fn start_on(
    ctx: &NodeCtx,
    id: JobId,
    spec: JobSpec,
    shards: &[ShardId],
) -> Result<Vec<pb::RevokeJobInfo>, ApiError> {
    let results = to_shards(ctx, shards, Command::StartJob { job: id, spec: Box::new(spec) }).await;
    let total = results.len();
    let mut parts = Vec::new();
    let mut failure = None;
    for (shard, result) in results {
        match result {
            Ok(Outcome::Job(job)) => parts.push(part(shard, &job)),
            Ok(Outcome::Refused(r)) => failure = Some(ApiError::Refused(r)),
            Ok(other) => failure = Some(ApiError::Internal(format!("unexpected outcome {other:?}"))),
            Err(e) => failure = Some(e),
        }
    }
    kick_local(ctx, shards);
    match failure {
        None => Ok(parts),
        Some(e) if parts.is_empty() => Err(e),
        Some(e) => Err(ApiError::PartialJob {
            job_id: job_id_to_string(id),
            applied: parts.len(),
            total,
            reason: e.to_string(),
        }),
    }
}

fn new_or_given_id(ctx: &NodeCtx, given: &str) -> Result<JobId, ApiError> {
    if given.is_empty() {
        // Never 0, so a printed id is never all zeros by accident.
        Ok((ctx.entropy.u128() as u64).max(1))
    } else {
        job_id_field("job_id", given)
    }
}

pub async fn start(
    ctx: &NodeCtx,
    r: pb::StartRevokeJobRequest,
    caller: Option<&Caller>,
) -> Result<pb::RevokeJobInfo, ApiError> {
    let filter = filter_from_pb(r.selector.unwrap_or_default())?;
    let revocation = revocation(r.revocation, caller)?;
    let id = new_or_given_id(ctx, &r.job_id)?;
    let shards: Vec<ShardId> = match filter.single_user() {
        Some(user) => vec![user.shard(ctx.n_shards)],
        None => (0..ctx.n_shards).collect(),
    };
    let spec = JobSpec { selector: JobSelector::Filter(filter), revocation, dry_run: r.dry_run };
    let parts = start_on(ctx, id, spec, &shards).await?;
    Ok(merge(id, parts))
}

pub async fn get(ctx: &NodeCtx, r: pb::GetRevokeJobRequest) -> Result<pb::RevokeJobInfo, ApiError> {
    let id = job_id_field("job_id", &r.job_id)?;
    let shards = shards_of(ctx, &r.shards)?;
    let info = merge(id, job_parts(ctx, id, &shards).await);
    if r.shards.is_empty() && info.shards_total == 0 {
        if let Some(bad) = info.shards.iter().find(|s| s.state == "unreachable") {
            return Err(ApiError::Internal(format!(
                "job {} not found on reachable shards; shard {}: {}",
                r.job_id, bad.shard, bad.error
            )));
        }
        return Err(ApiError::Refused(cascade_protocol::outcome::Refusal::JobNotFound));
    }
    Ok(info)
}

pub async fn list(
    ctx: &NodeCtx,
    r: pb::ListRevokeJobsRequest,
) -> Result<pb::ListRevokeJobsResponse, ApiError> {
    let shards = shards_of(ctx, &r.shards)?;
    let asks = shards.iter().map(|&shard| {
        per_shard(
            ctx,
            shard,
            move |reader| Ok(reader.jobs()?.iter().map(|j| part(shard, j)).collect::<Vec<_>>()),
            move |shards| async move {
                let req = pb::ListRevokeJobsRequest { shards };
                let resp = ctx
                    .forward(shard, req, |mut c, req| async move { c.list_revoke_jobs(req).await })
                    .await?;
                Ok(resp.jobs)
            },
        )
    });
    let mut by_job: BTreeMap<JobId, Vec<pb::RevokeJobInfo>> = BTreeMap::new();
    for result in futures::future::join_all(asks).await {
        for p in result? {
            if let Some(id) = parse_job_id(&p.job_id) {
                by_job.entry(id).or_default().push(p);
            }
        }
    }
    let mut jobs: Vec<pb::RevokeJobInfo> = by_job.into_iter().map(|(id, parts)| merge(id, parts)).collect();
    jobs.sort_by(|a, b| b.started_ms.cmp(&a.started_ms).then(a.job_id.cmp(&b.job_id)));
    Ok(pb::ListRevokeJobsResponse { jobs })
}

pub async fn cancel(ctx: &NodeCtx, r: pb::CancelRevokeJobRequest) -> Result<pb::RevokeJobInfo, ApiError> {
    let id = job_id_field("job_id", &r.job_id)?;
    lim::check_text("actor", &r.actor, lim::ACTOR_LEN_MAX)?;
    let actor = if r.actor.is_empty() { "unauthenticated".to_owned() } else { r.actor };
    let shards: Vec<ShardId> = (0..ctx.n_shards).collect();
    let mut parts = Vec::new();
    let mut failure = None;
    for (shard, result) in to_shards(ctx, &shards, Command::CancelJob { job: id, actor }).await {
        match result {
            Ok(Outcome::Job(job)) => parts.push(part(shard, &job)),
            Ok(Outcome::Refused(cascade_protocol::outcome::Refusal::JobNotFound)) => {
                parts.push(missing_part(shard, "absent", String::new()))
            }
            Ok(other) => failure = Some(ApiError::Internal(format!("unexpected outcome {other:?}"))),
            Err(e) => failure = Some(e),
        }
    }
    if let Some(e) = failure {
        return Err(ApiError::Internal(format!(
            "cancel reached only some shards ({e}); it is idempotent, retry it"
        )));
    }
    let info = merge(id, parts);
    if info.shards_total == 0 {
        return Err(ApiError::Refused(cascade_protocol::outcome::Refusal::JobNotFound));
    }
    Ok(info)
}

fn target_from_pb(t: pb::ListTarget) -> Result<Target, ApiError> {
    lim::check_id("targets.tenant", &t.tenant, lim::TENANT_LEN_MAX)?;
    lim::check_id("targets.user_id", &t.user_id, lim::ID_LEN_MAX)?;
    let user = UserKey::new(t.tenant, t.user_id);
    if t.device_id.is_empty() {
        return Ok(Target::User(user));
    }
    lim::check_id("targets.device_id", &t.device_id, lim::ID_LEN_MAX)?;
    Ok(Target::Device { user, device_id: t.device_id })
}

/// `RevokeList`: runs the inbound stream on its own task, answering through a bounded queue.
pub fn revoke_list(
    ctx: Arc<NodeCtx>,
    inbound: Streaming<pb::RevokeListRequest>,
    caller: Option<Caller>,
) -> RevokeListStream {
    let (tx, rx) = mpsc::channel(LIST_PROGRESS_QUEUE);
    tokio::spawn(async move {
        if let Err(e) = run_list(&ctx, inbound, &tx, caller.as_ref()).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

async fn run_list(
    ctx: &NodeCtx,
    mut inbound: Streaming<pb::RevokeListRequest>,
    tx: &mpsc::Sender<Result<pb::RevokeJobInfo, Status>>,
    caller: Option<&Caller>,
) -> Result<(), Status> {
    let Some(first) = inbound.message().await? else {
        return Err(Status::invalid_argument("RevokeList: the stream ended before its first message"));
    };
    let id = new_or_given_id(ctx, &first.job_id)?;
    let revocation: Revocation = revocation(first.revocation.clone(), caller)?;
    let all: Vec<ShardId> = (0..ctx.n_shards).collect();
    let spec = JobSpec { selector: JobSelector::List, revocation, dry_run: first.dry_run };
    let parts = start_on(ctx, id, spec, &all).await?;
    if let Some(p) = parts.iter().find(|p| p.mode != "list") {
        return Err(Status::failed_precondition(format!(
            "{} is not a list job (it is a {} job)",
            p.job_id, p.mode
        )));
    }
    let mut latest: BTreeMap<ShardId, pb::RevokeJobInfo> =
        parts.into_iter().filter_map(|p| Some((p.shards.first()?.shard as ShardId, p))).collect();
    tx.send(Ok(merge(id, latest.values().cloned().collect())))
        .await
        .map_err(|_| Status::cancelled("caller left"))?;
    let mut previous_chunk = 0;
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        if !msg.targets.is_empty() {
            if msg.chunk <= previous_chunk {
                return Err(Status::invalid_argument(format!(
                    "chunk: must increase within a stream, got {} after {previous_chunk}",
                    msg.chunk
                )));
            }
            if msg.targets.len() > LIST_CHUNK_TARGETS_MAX {
                return Err(Status::invalid_argument(format!(
                    "targets: at most {LIST_CHUNK_TARGETS_MAX} per chunk, got {}",
                    msg.targets.len()
                )));
            }
            let mut by_shard: BTreeMap<ShardId, Vec<Target>> = BTreeMap::new();
            for t in msg.targets {
                let target = target_from_pb(t)?;
                by_shard.entry(target.user().shard(ctx.n_shards)).or_default().push(target);
            }
            let writes = by_shard.into_iter().map(|(shard, targets)| async move {
                let command = Command::JobChunk { job: id, chunk: msg.chunk, targets };
                (shard, ctx.write(shard, command).await.map(|a| a.outcome))
            });
            for (shard, result) in futures::future::join_all(writes).await {
                match result.map_err(Status::from)? {
                    Outcome::Job(job) => {
                        latest.insert(shard, part(shard, &job));
                    }
                    Outcome::Refused(r) => return Err(ApiError::Refused(r).into()),
                    other => return Err(Status::internal(format!("unexpected outcome {other:?}"))),
                }
            }
            previous_chunk = msg.chunk;
            let mut info = merge(id, latest.values().cloned().collect());
            info.chunks_acked = msg.chunk;
            tx.send(Ok(info)).await.map_err(|_| Status::cancelled("caller left"))?;
        }
        if msg.last {
            for (shard, result) in to_shards(ctx, &all, Command::FinishJob { job: id }).await {
                match result.map_err(Status::from)? {
                    Outcome::Job(job) => {
                        latest.insert(shard, part(shard, &job));
                    }
                    Outcome::Refused(r) => return Err(ApiError::Refused(r).into()),
                    other => return Err(Status::internal(format!("unexpected outcome {other:?}"))),
                }
            }
            let mut info = merge(id, latest.values().cloned().collect());
            info.chunks_acked = previous_chunk;
            let _ = tx.send(Ok(info)).await;
            return Ok(());
        }
        next = inbound.message().await?;
    }
    // The caller closed its side without `last`: the job stays running, to be resumed.
    Ok(())
}

fn audit_entry(shard: ShardId, r: AuditRecord) -> pb::AuditEntry {
    let (action, detail, job_id) = match &r.action {
        AuditAction::RevokeSession { session_id } => {
            ("revoke_session", session_id.to_string(), String::new())
        }
        AuditAction::RevokeFamily { session_id } => ("revoke_family", session_id.to_string(), String::new()),
        AuditAction::RevokeDevice { device_id } => {
            ("revoke_device", format!("device {device_id}"), String::new())
        }
        AuditAction::RevokeUser => ("revoke_user", String::new(), String::new()),
        AuditAction::Watermark { scope, watermark_ms } => {
            let scope = match scope {
                WatermarkScope::Tenant { tenant } => format!("tenant {tenant}"),
                WatermarkScope::Client { tenant, client_id } => format!("client {tenant}/{client_id}"),
                WatermarkScope::User { user } => format!("user {user}"),
                WatermarkScope::Device { user, device_id } => format!("device {user}/{device_id}"),
            };
            ("watermark", format!("{scope} not before {watermark_ms}"), String::new())
        }
        AuditAction::RefreshReuse { session_id } => ("refresh_reuse", session_id.to_string(), String::new()),
        AuditAction::SessionLimit => ("session_limit", String::new(), String::new()),
        AuditAction::Job { job, selector, state } => {
            ("job", format!("{} ({})", selector_text(selector), state.as_str()), job_id_to_string(*job))
        }
    };
    let (tenant, user_id) = r.user.map(|u| (u.tenant, u.user_id)).unwrap_or_default();
    pb::AuditEntry {
        at_ms: r.at_ms,
        actor: r.actor,
        reason: reason_to_pb(r.reason) as i32,
        text: r.text,
        tenant,
        user_id,
        action: action.to_owned(),
        detail,
        sessions: r.sessions,
        job_id,
        shard: u32::from(shard),
    }
}

pub async fn audit(ctx: &NodeCtx, r: pb::QueryAuditRequest) -> Result<pb::QueryAuditResponse, ApiError> {
    let limit = match r.limit as usize {
        0 => AUDIT_LIMIT_DEFAULT,
        n if n <= AUDIT_LIMIT_MAX => n,
        n => return Err(FieldError::new("limit", format!("at most {AUDIT_LIMIT_MAX}, got {n}")).into()),
    };
    let until_ms = if r.until_ms == 0 { u64::MAX } else { r.until_ms };
    if until_ms < r.from_ms {
        return Err(FieldError::new("until_ms", "must not be before from_ms").into());
    }
    let job = if r.job_id.is_empty() { None } else { Some(job_id_field("job_id", &r.job_id)?) };
    if !r.user_id.is_empty() && r.tenant.is_empty() {
        return Err(FieldError::new("user_id", "needs tenant").into());
    }
    let shards = shards_of(ctx, &r.shards)?;
    let query = Arc::new(r);
    let asks = shards.iter().map(|&shard| {
        let q = query.clone();
        let keep = move |rec: &AuditRecord| {
            (q.actor.is_empty() || rec.actor == q.actor)
                && (q.tenant.is_empty() || rec.user.as_ref().is_some_and(|u| u.tenant == q.tenant))
                && (q.user_id.is_empty() || rec.user.as_ref().is_some_and(|u| u.user_id == q.user_id))
                && job.is_none_or(|j| matches!(rec.action, AuditAction::Job { job, .. } if job == j))
        };
        let (q2, from_ms) = (query.clone(), query.from_ms);
        per_shard(
            ctx,
            shard,
            move |reader| {
                let (records, more) = reader.audit(from_ms, until_ms, limit, keep)?;
                Ok((records.into_iter().map(|rec| audit_entry(shard, rec)).collect::<Vec<_>>(), more))
            },
            move |shards| async move {
                let req = pb::QueryAuditRequest { shards, limit: limit as u32, ..(*q2).clone() };
                let resp =
                    ctx.forward(shard, req, |mut c, req| async move { c.query_audit(req).await }).await?;
                Ok((resp.entries, resp.truncated))
            },
        )
    });
    let mut entries = Vec::new();
    let mut truncated = false;
    for result in futures::future::join_all(asks).await {
        let (mut got, more) = result?;
        truncated |= more;
        entries.append(&mut got);
    }
    entries.sort_by_key(|e| (e.at_ms, e.shard));
    let mut entries = merge_job_entries(entries);
    if entries.len() > limit {
        entries.truncate(limit);
        truncated = true;
    }
    Ok(pb::QueryAuditResponse { entries, truncated })
}

/// A job leaves one audit record per shard; the caller sees one entry per job and outcome,
/// with the sessions of every shard summed, at the time the last shard finished (`shard` is
/// the first shard's).
fn merge_job_entries(entries: Vec<pb::AuditEntry>) -> Vec<pb::AuditEntry> {
    let mut out: Vec<pb::AuditEntry> = Vec::with_capacity(entries.len());
    let mut first_of: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in entries {
        if e.action != "job" {
            out.push(e);
            continue;
        }
        match first_of.get(&(e.job_id.clone(), e.detail.clone())) {
            Some(&i) => {
                out[i].sessions += e.sessions;
                out[i].at_ms = out[i].at_ms.max(e.at_ms);
            }
            None => {
                first_of.insert((e.job_id.clone(), e.detail.clone()), out.len());
                out.push(e);
            }
        }
    }
    out
}
