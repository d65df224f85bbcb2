//! Mass revocation jobs through `apply`: every selector kind, dry runs that count exactly what a
//! real run revokes, steps and chunks applied twice counted once, cancellation, and the audit
//! trail they leave.

mod support;

use cascade_core::view::MemShard;
use cascade_protocol::command::{Command, CreateSession, Reason, Revocation, SessionMetadata};
use cascade_protocol::ids::UserKey;
use cascade_protocol::job::{
    AuditAction, Job, JobMode, JobSelector, JobSpec, JobState, SessionFilter, Target,
};
use cascade_protocol::outcome::{Applied, Outcome, Verdict};
use support::*;

const T0: u64 = 1_700_000_000_000;

fn rev() -> Revocation {
    Revocation::new(Reason::Compromised, "responder@acme", "ato wave")
}

/// A shard with 3 tenants × 6 users, each with 2 sessions of varying client, aal, ip and region.
/// Session nonces: user u (0..18) has 2u+1 and 2u+2; created at T0 + nonce.
fn populated() -> MemShard {
    let mut s = MemShard::default();
    for u in 0..18u128 {
        let tenant = ["acme", "globex", "initech"][(u % 3) as usize];
        for k in 1..=2u128 {
            let n = 2 * u + k;
            let cmd = Command::CreateSession(Box::new(CreateSession {
                session_id: sid(n),
                user: UserKey::new(tenant, format!("u{u:02}")),
                client_id: if k == 1 { "web".into() } else { "mobile".into() },
                device: None,
                aal: if n % 3 == 0 { 2 } else { 1 },
                amr: vec![],
                ttl_ms: 8 * HOUR_MS,
                idle_timeout_ms: 0,
                parent: None,
                refresh_secret_sha256: None,
                metadata: SessionMetadata {
                    ip: format!("10.{}.0.{}", n % 4, n),
                    user_agent: String::new(),
                    region: if n % 2 == 0 { "eu".into() } else { "us".into() },
                },
            }));
            let a = run(&mut s, T0 + n as u64, cmd);
            assert!(matches!(a.outcome, Outcome::Created { .. }), "{a:?}");
        }
    }
    s
}

fn job_of(a: &Applied) -> Job {
    match &a.outcome {
        Outcome::Job(j) => (**j).clone(),
        other => panic!("expected a job, got {other:?}"),
    }
}

/// Start a filter job and step it to the end, 4 users per step. Returns the final record and
/// every audit record written.
fn run_job(s: &mut MemShard, id: u64, filter: &SessionFilter, dry_run: bool, now: u64) -> (Job, usize) {
    let spec = JobSpec { selector: JobSelector::Filter(filter.clone()), revocation: rev(), dry_run };
    let started = run(s, now, Command::StartJob { job: id, spec: Box::new(spec) });
    let mut job = job_of(&started);
    let mut audits = started.audit.len();
    let mut steps = 0;
    while job.state == JobState::Running {
        let a = run(s, now, Command::JobStep { job: id, after: job.cursor.clone(), max_users: 4 });
        audits += a.audit.len();
        job = job_of(&a);
        steps += 1;
        assert!(steps < 100, "job never finished: {job:?}");
    }
    (job, audits)
}

/// Which session nonces a filter must select.
type Expected = Box<dyn Fn(u128) -> bool>;

fn valid(s: &MemShard, n: u128, now: u64) -> bool {
    check(s, sid(n), now) == Verdict::Valid
}

/// Every selector kind: the dry run on one copy counts exactly what the real run on another
/// revokes, the real run revokes exactly the sessions the filter names, and others stay valid.
#[test]
fn every_selector_dry_run_count_equals_revoked() {
    let now = T0 + 1000;
    let filters: Vec<(&str, SessionFilter, Expected)> = vec![
        (
            "tenant",
            SessionFilter { tenant: Some("globex".into()), ..Default::default() },
            Box::new(|n| ((n - 1) / 2) % 3 == 1),
        ),
        (
            "client",
            SessionFilter {
                tenant: Some("acme".into()),
                client_id: Some("mobile".into()),
                ..Default::default()
            },
            Box::new(|n| ((n - 1) / 2) % 3 == 0 && n % 2 == 0),
        ),
        (
            "user",
            SessionFilter { tenant: Some("acme".into()), user_id: Some("u03".into()), ..Default::default() },
            Box::new(|n| n == 7 || n == 8),
        ),
        (
            "created-before (tenant)",
            SessionFilter {
                tenant: Some("initech".into()),
                created_before_ms: Some(T0 + 18),
                ..Default::default()
            },
            Box::new(|n| ((n - 1) / 2) % 3 == 2 && n <= 18),
        ),
        (
            "created-before (all tenants)",
            SessionFilter { created_before_ms: Some(T0 + 10), ..Default::default() },
            Box::new(|n| n <= 10),
        ),
        ("aal below 2", SessionFilter { aal_below: Some(2), ..Default::default() }, Box::new(|n| n % 3 != 0)),
        (
            "ip prefix",
            SessionFilter { ip_prefix: Some("10.1.0.0/16".parse().unwrap()), ..Default::default() },
            Box::new(|n| n % 4 == 1),
        ),
        (
            "region",
            SessionFilter { region: Some("eu".into()), ..Default::default() },
            Box::new(|n| n % 2 == 0),
        ),
        (
            "combination",
            SessionFilter {
                tenant: Some("acme".into()),
                region: Some("us".into()),
                aal_below: Some(2),
                ..Default::default()
            },
            Box::new(|n| ((n - 1) / 2) % 3 == 0 && n % 2 == 1 && n % 3 != 0),
        ),
    ];
    for (name, filter, expected) in filters {
        let expected_count = (1..=36u128).filter(|n| expected(*n)).count() as u64;
        assert!(expected_count > 0, "{name}: the fixture must select something");

        let mut dry = populated();
        let (dry_job, dry_audits) = run_job(&mut dry, 1, &filter, true, now);
        assert_eq!(dry_job.mode, JobMode::DryRun, "{name}");
        assert_eq!(dry_job.sessions, expected_count, "{name}: dry-run count");
        assert_eq!(dry_audits, 0, "{name}: a dry run is not a revocation");
        assert!((1..=36).all(|n| valid(&dry, n, now)), "{name}: a dry run changed something");

        let mut real = populated();
        let (job, audits) = run_job(&mut real, 1, &filter, false, now);
        assert_eq!(job.state, JobState::Done, "{name}");
        assert_eq!(job.sessions, dry_job.sessions, "{name}: real count equals dry-run count");
        assert_eq!(audits, 1, "{name}: one audit record when the job finishes here");
        let watermark = filter.watermark().is_some();
        assert_eq!(matches!(job.mode, JobMode::Tally { .. }), watermark, "{name}: {:?}", job.mode);
        for n in 1..=36u128 {
            assert_eq!(valid(&real, n, now + 1), !expected(n), "{name}: session {n}");
        }
    }
}

/// A watermark job revokes at start, in one command, before any scan step.
#[test]
fn watermark_job_revokes_at_start() {
    let mut s = populated();
    let filter = SessionFilter { tenant: Some("acme".into()), ..Default::default() };
    let spec = JobSpec { selector: JobSelector::Filter(filter), revocation: rev(), dry_run: false };
    let a = run(&mut s, T0 + 100, Command::StartJob { job: 9, spec: Box::new(spec) });
    assert_eq!(job_of(&a).sessions, 0, "not yet counted");
    assert!(a
        .events
        .iter()
        .any(|e| matches!(e, cascade_protocol::outcome::RevocationEvent::Watermark { .. })));
    assert!(!valid(&s, 1, T0 + 101), "acme's sessions are revoked by the start alone");
    assert!(valid(&s, 3, T0 + 101), "globex's are not");
}

/// A step proposed twice (same cursor) counts once; a stale cursor changes nothing.
#[test]
fn repeated_step_counts_once() {
    let mut s = populated();
    let filter = SessionFilter { region: Some("eu".into()), ..Default::default() };
    let spec = JobSpec { selector: JobSelector::Filter(filter), revocation: rev(), dry_run: false };
    run(&mut s, T0 + 100, Command::StartJob { job: 5, spec: Box::new(spec.clone()) });
    let first = job_of(&run(&mut s, T0 + 100, Command::JobStep { job: 5, after: None, max_users: 4 }));
    assert_eq!(first.users_scanned, 4);
    let again = job_of(&run(&mut s, T0 + 101, Command::JobStep { job: 5, after: None, max_users: 4 }));
    assert_eq!(again, first, "the same step again is a no-op");
    // Starting the same job again changes nothing either.
    let restarted = job_of(&run(&mut s, T0 + 102, Command::StartJob { job: 5, spec: Box::new(spec) }));
    assert_eq!(restarted, first);
}

/// Cancel stops a job where it is; what it revoked stays revoked; later steps do nothing.
#[test]
fn cancel_stops_a_job() {
    let mut s = populated();
    let filter = SessionFilter { region: Some("eu".into()), ..Default::default() };
    let spec = JobSpec { selector: JobSelector::Filter(filter), revocation: rev(), dry_run: false };
    run(&mut s, T0 + 100, Command::StartJob { job: 5, spec: Box::new(spec) });
    let step = job_of(&run(&mut s, T0 + 100, Command::JobStep { job: 5, after: None, max_users: 4 }));
    let cancelled = run(&mut s, T0 + 101, Command::CancelJob { job: 5, actor: "lead@acme".into() });
    let job = job_of(&cancelled);
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.sessions, step.sessions);
    assert_eq!(cancelled.audit.len(), 1);
    assert_eq!(cancelled.audit[0].actor, "lead@acme");
    let after = job_of(&run(&mut s, T0 + 102, Command::JobStep { job: 5, after: step.cursor, max_users: 4 }));
    assert_eq!(after, job, "a cancelled job takes no more steps");
    // Sessions past the cursor were never touched.
    let untouched = (1..=36u128).filter(|n| n % 2 == 0 && valid(&s, *n, T0 + 103)).count();
    assert!(untouched > 0);
}

/// List jobs: chunks revoke users and devices; a chunk resent counts once; dry runs count
/// exactly what a real run revokes.
#[test]
fn list_job_chunks_apply_once() {
    let targets = vec![
        Target::User(UserKey::new("acme", "u00")),
        Target::User(UserKey::new("acme", "nobody")),
        Target::User(UserKey::new("globex", "u01")),
    ];
    let mut counts = Vec::new();
    for dry_run in [true, false] {
        let mut s = populated();
        let spec = JobSpec { selector: JobSelector::List, revocation: rev(), dry_run };
        run(&mut s, T0 + 100, Command::StartJob { job: 7, spec: Box::new(spec) });
        let one =
            job_of(&run(&mut s, T0 + 100, Command::JobChunk { job: 7, chunk: 1, targets: targets.clone() }));
        let again =
            job_of(&run(&mut s, T0 + 101, Command::JobChunk { job: 7, chunk: 1, targets: targets.clone() }));
        assert_eq!(one, again);
        let done = run(&mut s, T0 + 102, Command::FinishJob { job: 7 });
        assert_eq!(job_of(&done).state, JobState::Done);
        assert_eq!(done.audit.len(), usize::from(!dry_run));
        assert_eq!(valid(&s, 1, T0 + 103), dry_run);
        assert_eq!(valid(&s, 4, T0 + 103), dry_run);
        assert!(valid(&s, 5, T0 + 103));
        counts.push(job_of(&done).sessions);
    }
    assert_eq!(counts, vec![4, 4]);
}

/// Every single revocation leaves who, why, what and how many.
#[test]
fn single_revocations_are_audited() {
    let mut s = populated();
    let a =
        run(&mut s, T0 + 100, Command::RevokeUser { user: UserKey::new("acme", "u00"), revocation: rev() });
    assert_eq!(a.audit.len(), 1);
    let r = &a.audit[0];
    assert_eq!((r.actor.as_str(), r.reason, r.sessions), ("responder@acme", Reason::Compromised, 2));
    assert_eq!(r.action, AuditAction::RevokeUser);
    assert_eq!(r.at_ms, T0 + 100);
    let a = run(&mut s, T0 + 101, Command::RevokeSession { session_id: sid(3), revocation: rev() });
    assert_eq!(a.audit[0].user, Some(UserKey::new("globex", "u01")));
    let touch = run(&mut s, T0 + 102, Command::Touch { session_id: sid(5) });
    assert!(touch.audit.is_empty(), "not a revocation");
}
