//! Mass revocation jobs on one shard: start, scan steps, list chunks, finish, cancel.
//!
//! A job's progress (cursor, last chunk, counts) lives in the replicated job record, so whoever
//! leads the shard next resumes where the log says, and a step or chunk proposed twice is
//! recognised by its cursor or chunk number and counted once.

use crate::apply::{revoke_cascade, revoke_device, revoke_user, set_watermark};
use crate::limits::JOBS_KEPT_MAX;
use crate::model::{Session, ShardMeta, UserState};
use crate::validity::{liveness, Liveness};
use crate::view::ShardView;
use cascade_protocol::command::WatermarkScope;
use cascade_protocol::ids::{SessionId, UserKey};
use cascade_protocol::job::{
    AuditAction, AuditRecord, Job, JobId, JobMode, JobSelector, JobSpec, JobState, SessionFacts,
    SessionFilter, Target,
};
use cascade_protocol::outcome::{Outcome, Refusal, RevocationEvent};

fn facts<'a>(user: &'a UserState, s: &'a Session) -> SessionFacts<'a> {
    SessionFacts {
        user: &user.key,
        client_id: &s.client_id,
        device_id: s.device_id.as_deref(),
        created_at_ms: s.created_at_ms,
        aal: s.aal,
        ip: &s.metadata.ip,
        region: &s.metadata.region,
    }
}

/// The audit record of a job that finished or was cancelled here (none for dry runs).
fn job_audit(job: &Job, now: u64, audit: &mut Vec<AuditRecord>) {
    if job.spec.dry_run {
        return;
    }
    let user = match &job.spec.selector {
        JobSelector::Filter(f) => f.single_user(),
        JobSelector::List => None,
    };
    let (actor, reason, text) = if job.state == JobState::Cancelled {
        (
            job.cancelled_by.clone(),
            job.spec.revocation.reason,
            format!("cancelled: {}", job.spec.revocation.text),
        )
    } else {
        (job.spec.revocation.actor.clone(), job.spec.revocation.reason, job.spec.revocation.text.clone())
    };
    audit.push(AuditRecord {
        at_ms: now,
        actor,
        reason,
        text,
        user,
        action: AuditAction::Job { job: job.id, selector: job.spec.selector.clone(), state: job.state },
        sessions: job.sessions,
    });
}

fn finish(
    view: &mut impl ShardView,
    mut job: Job,
    state: JobState,
    now: u64,
    audit: &mut Vec<AuditRecord>,
) -> Job {
    job.state = state;
    job.finished_ms = now;
    job_audit(&job, now, audit);
    view.put_job(job.clone());
    job
}

/// Make room for one more job: drop the one that finished first, or refuse if all run.
fn make_room(view: &mut impl ShardView) -> Result<(), Refusal> {
    let jobs = view.jobs();
    if jobs.len() < JOBS_KEPT_MAX {
        return Ok(());
    }
    let oldest = jobs.iter().filter(|j| j.state != JobState::Running).min_by_key(|j| (j.finished_ms, j.id));
    match oldest {
        Some(j) => {
            view.remove_job(j.id);
            Ok(())
        }
        None => Err(Refusal::TooManyJobs { max: JOBS_KEPT_MAX as u32 }),
    }
}

/// The current value of one watermark (0 when its user or device is unknown).
fn scope_watermark(view: &mut impl ShardView, scope: &WatermarkScope) -> u64 {
    match scope {
        WatermarkScope::Tenant { tenant } => view.meta().tenants.get(tenant).copied().unwrap_or(0),
        WatermarkScope::Client { tenant, client_id } => {
            view.meta().clients.get(tenant).and_then(|m| m.get(client_id)).copied().unwrap_or(0)
        }
        WatermarkScope::User { user } => view.get_user(user).map_or(0, |u| u.watermark_ms),
        WatermarkScope::Device { user, device_id } => {
            view.get_user(user).and_then(|u| u.devices.get(device_id).map(|d| d.watermark_ms)).unwrap_or(0)
        }
    }
}

/// The latest watermark applying to `s` from every scope other than `scope`'s kind.
fn other_watermarks(meta: &ShardMeta, user: &UserState, s: &Session, scope: &WatermarkScope) -> u64 {
    let tenant = meta.tenants.get(&user.key.tenant).copied().unwrap_or(0);
    let client = meta.clients.get(&user.key.tenant).and_then(|m| m.get(&s.client_id)).copied().unwrap_or(0);
    let device = s.device_id.as_ref().and_then(|d| user.devices.get(d)).map_or(0, |d| d.watermark_ms);
    let parts = match scope {
        WatermarkScope::Tenant { .. } => [client, user.watermark_ms, device],
        WatermarkScope::Client { .. } => [tenant, user.watermark_ms, device],
        WatermarkScope::User { .. } => [tenant, client, device],
        WatermarkScope::Device { .. } => [tenant, client, user.watermark_ms],
    };
    parts.into_iter().max().unwrap_or(0)
}

pub(crate) fn start(
    view: &mut impl ShardView,
    id: JobId,
    spec: &JobSpec,
    now: u64,
    events: &mut Vec<RevocationEvent>,
    audit: &mut Vec<AuditRecord>,
) -> Outcome {
    if let Some(existing) = view.job(id) {
        return Outcome::Job(Box::new(existing));
    }
    if let Err(r) = make_room(view) {
        return Outcome::Refused(r);
    }
    let mut job = Job {
        id,
        spec: spec.clone(),
        mode: JobMode::Revoke,
        state: JobState::Running,
        started_ms: now,
        finished_ms: 0,
        cursor: None,
        last_chunk: 0,
        users_scanned: 0,
        sessions: 0,
        cancelled_by: String::new(),
    };
    job.mode = match (&spec.selector, spec.dry_run) {
        (JobSelector::List, _) => JobMode::List,
        (JobSelector::Filter(_), true) => JobMode::DryRun,
        (JobSelector::Filter(filter), false) => match filter.watermark() {
            None => JobMode::Revoke,
            Some((scope, not_before_ms)) => {
                let previous_ms = scope_watermark(view, &scope);
                match set_watermark(view, &scope, not_before_ms, &spec.revocation, now, events) {
                    Outcome::WatermarkSet { watermark_ms } => {
                        JobMode::Tally { scope, previous_ms, watermark_ms, at_ms: now }
                    }
                    // Nothing of that user or device here: nothing to revoke.
                    Outcome::Refused(Refusal::UserNotFound | Refusal::DeviceNotFound) => {
                        job.mode = JobMode::Revoke;
                        let job = finish(view, job, JobState::Done, now, audit);
                        return Outcome::Job(Box::new(job));
                    }
                    Outcome::Refused(r) => return Outcome::Refused(r),
                    other => {
                        debug_assert!(false, "set_watermark gave {other:?}");
                        return Outcome::Refused(Refusal::WrongJobKind);
                    }
                }
            }
        },
    };
    view.put_job(job.clone());
    Outcome::Job(Box::new(job))
}

/// The users a scan step visits: after the cursor, in key order, starting at the filter's
/// tenant (user keys sort by tenant first) and stopping after it.
fn step_users(
    view: &mut impl ShardView,
    filter: &SessionFilter,
    after: Option<&UserKey>,
    max: usize,
) -> (Vec<UserKey>, bool) {
    if let Some(user) = filter.single_user() {
        return (if after.is_none() { vec![user] } else { Vec::new() }, true);
    }
    let tenant_start;
    let from = match (after, &filter.tenant) {
        (None, Some(t)) => {
            // No user id is empty, so this sorts before every user of the tenant.
            tenant_start = UserKey::new(t.clone(), "");
            Some(&tenant_start)
        }
        (after, _) => after,
    };
    let mut keys = view.users_after(from, max);
    let mut exhausted = keys.len() < max;
    if let Some(t) = &filter.tenant {
        if let Some(pos) = keys.iter().position(|k| k.tenant != *t) {
            keys.truncate(pos);
            exhausted = true;
        }
    }
    (keys, exhausted)
}

pub(crate) fn step(
    view: &mut impl ShardView,
    id: JobId,
    after: Option<&UserKey>,
    max_users: u32,
    now: u64,
    events: &mut Vec<RevocationEvent>,
    audit: &mut Vec<AuditRecord>,
) -> Outcome {
    let Some(mut job) = view.job(id) else { return Outcome::Refused(Refusal::JobNotFound) };
    let JobSelector::Filter(filter) = job.spec.selector.clone() else {
        return Outcome::Refused(Refusal::WrongJobKind);
    };
    if job.state != JobState::Running || job.cursor.as_ref() != after {
        // Finished, cancelled, or a step proposed twice: nothing to do.
        return Outcome::Job(Box::new(job));
    }
    let (keys, exhausted) = step_users(view, &filter, after, max_users.max(1) as usize);
    let meta = view.meta().clone();
    let revocation = job.spec.revocation.clone();
    for key in keys {
        job.users_scanned += 1;
        job.cursor = Some(key.clone());
        if !filter.may_match_user(&key) {
            continue;
        }
        let Some(user) = view.get_user(&key) else { continue };
        let selected = |s: &Session| filter.matches(&facts(&user, s));
        match &job.mode {
            JobMode::Tally { scope, previous_ms, watermark_ms, at_ms } => {
                let newly_covered = |s: &&Session| {
                    selected(s)
                        && s.created_at_ms > *previous_ms
                        && s.created_at_ms <= *watermark_ms
                        && s.created_at_ms > other_watermarks(&meta, &user, s, scope)
                        && s.time_expiry_ms() > *at_ms
                        && s.revoked.as_ref().is_none_or(|r| r.at_ms >= *at_ms)
                };
                job.sessions += user.sessions.values().filter(newly_covered).count() as u64;
            }
            JobMode::Revoke | JobMode::DryRun => {
                let roots: Vec<SessionId> = user
                    .sessions
                    .values()
                    .filter(|s| selected(s) && liveness(&meta, &user, s, now) == Liveness::Active)
                    .map(|s| s.id)
                    .collect();
                if roots.is_empty() {
                    continue;
                }
                let mut changed = user.clone();
                let revoked = if job.mode == JobMode::DryRun {
                    // The same cascade on a copy that is thrown away: the count is exactly what
                    // a real run would revoke now.
                    revoke_cascade(&mut changed, &roots, &revocation, revocation.reason, now, &mut Vec::new())
                } else {
                    let revoked =
                        revoke_cascade(&mut changed, &roots, &revocation, revocation.reason, now, events);
                    view.take_user(&key);
                    view.put_user(changed);
                    revoked
                };
                job.sessions += active_among(&meta, &user, &revoked, now);
            }
            JobMode::List => return Outcome::Refused(Refusal::WrongJobKind),
        }
    }
    if exhausted {
        job = finish(view, job, JobState::Done, now, audit);
    } else {
        view.put_job(job.clone());
    }
    Outcome::Job(Box::new(job))
}

/// How many of `ids` were active in `before`: what a revocation really took away (revoking an
/// expired or already-covered session changes nothing a gateway sees).
fn active_among(meta: &ShardMeta, before: &UserState, ids: &[SessionId], now: u64) -> u64 {
    ids.iter()
        .filter(|id| {
            before.sessions.get(id).is_some_and(|s| liveness(meta, before, s, now) == Liveness::Active)
        })
        .count() as u64
}

/// Revoke one list target (dry run: on a copy) and count the active sessions it took.
fn revoke_target(
    view: &mut impl ShardView,
    target: &Target,
    revocation: &cascade_protocol::command::Revocation,
    dry_run: bool,
    now: u64,
    events: &mut Vec<RevocationEvent>,
) -> u64 {
    let meta = view.meta().clone();
    let Some(before) = view.get_user(target.user()) else { return 0 };
    let revoked = match (target, dry_run) {
        (Target::User(_), true) => {
            let roots: Vec<SessionId> = before.sessions.keys().copied().collect();
            revoke_cascade(&mut before.clone(), &roots, revocation, revocation.reason, now, &mut Vec::new())
        }
        (Target::Device { device_id, .. }, true) => {
            if !before.devices.contains_key(device_id) {
                return 0;
            }
            let roots: Vec<SessionId> = before
                .sessions
                .values()
                .filter(|s| s.device_id.as_deref() == Some(device_id.as_str()))
                .map(|s| s.id)
                .collect();
            revoke_cascade(&mut before.clone(), &roots, revocation, revocation.reason, now, &mut Vec::new())
        }
        (Target::User(user), false) => match revoke_user(view, user, revocation, now, events) {
            Outcome::Revoked { revoked, .. } => revoked,
            _ => Vec::new(),
        },
        (Target::Device { user, device_id }, false) => {
            match revoke_device(view, user, device_id, revocation, now, events) {
                Outcome::Revoked { revoked, .. } => revoked,
                _ => Vec::new(),
            }
        }
    };
    active_among(&meta, &before, &revoked, now)
}

pub(crate) fn chunk(
    view: &mut impl ShardView,
    id: JobId,
    chunk: u64,
    targets: &[Target],
    now: u64,
    events: &mut Vec<RevocationEvent>,
) -> Outcome {
    let Some(mut job) = view.job(id) else { return Outcome::Refused(Refusal::JobNotFound) };
    if job.mode != JobMode::List {
        return Outcome::Refused(Refusal::WrongJobKind);
    }
    if job.state != JobState::Running || chunk <= job.last_chunk {
        return Outcome::Job(Box::new(job));
    }
    let revocation = job.spec.revocation.clone();
    for target in targets {
        job.users_scanned += 1;
        job.sessions += revoke_target(view, target, &revocation, job.spec.dry_run, now, events);
    }
    job.last_chunk = chunk;
    view.put_job(job.clone());
    Outcome::Job(Box::new(job))
}

pub(crate) fn finish_list(
    view: &mut impl ShardView,
    id: JobId,
    now: u64,
    audit: &mut Vec<AuditRecord>,
) -> Outcome {
    let Some(job) = view.job(id) else { return Outcome::Refused(Refusal::JobNotFound) };
    if job.mode != JobMode::List {
        return Outcome::Refused(Refusal::WrongJobKind);
    }
    if job.state != JobState::Running {
        return Outcome::Job(Box::new(job));
    }
    Outcome::Job(Box::new(finish(view, job, JobState::Done, now, audit)))
}

pub(crate) fn cancel(
    view: &mut impl ShardView,
    id: JobId,
    actor: &str,
    now: u64,
    audit: &mut Vec<AuditRecord>,
) -> Outcome {
    let Some(mut job) = view.job(id) else { return Outcome::Refused(Refusal::JobNotFound) };
    if job.state != JobState::Running {
        return Outcome::Job(Box::new(job));
    }
    job.cancelled_by = actor.to_owned();
    Outcome::Job(Box::new(finish(view, job, JobState::Cancelled, now, audit)))
}
