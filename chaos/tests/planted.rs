//! The harness must catch a planted bug on real processes: with `stale-leader-read`, a leader
//! cut off from its quorum keeps answering checks from its own state, so once the rest of the
//! cluster has elected a new leader and acknowledged revocations, the old one serves revoked
//! sessions as VALID. P2 must report it.

use cascade_chaos::nemesis;
use cascade_chaos::run::{run, RunOptions};
use cascade_check::checkers::p2_revocation_bound;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_stale_leader_read_is_caught_by_p2() {
    let out = tempfile::tempdir().expect("temp dir");
    let opts = RunOptions {
        scenario: nemesis::scenario("stale-read-bait").expect("scenario"),
        bin: cascade_chaos::default_bin(),
        out: out.path().to_owned(),
        seed: 1,
        progress: true,
        planted_bugs: vec!["stale-leader-read".to_owned()],
    };
    let report = run(&opts).await.expect("the harness runs");
    println!("{}", report.markdown());
    assert!(!report.passed(), "the planted bug went unnoticed");
    assert!(
        report.violations.iter().any(|v| v.checker == p2_revocation_bound::NAME),
        "P2 must catch it: {:#?}",
        report.violations
    );
}
