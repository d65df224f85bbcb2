//! The CI smoke scenario on real processes: kill -9 a shard leader, partition a region, pause a
//! leader, with the shared workload running; every promise must hold and every fault must be
//! recovered from. Needs the `cascade` binary, which `cargo test --workspace` builds (the node
//! crate's integration tests use it); `CASCADE_BIN` points elsewhere.

use cascade_chaos::nemesis;
use cascade_chaos::run::{run, RunOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_scenario_keeps_every_promise_and_recovers_from_every_fault() {
    let out = tempfile::tempdir().expect("temp dir");
    let opts = RunOptions {
        scenario: nemesis::scenario("smoke").expect("smoke scenario"),
        bin: cascade_chaos::default_bin(),
        out: out.path().to_owned(),
        seed: 1,
        progress: true,
        planted_bugs: Vec::new(),
    };
    let report = run(&opts).await.expect("the harness runs");
    println!("{}", report.markdown());
    assert!(report.passed(), "violations: {:#?}", report.violations);
    assert_eq!(report.rpo_lost, 0);
    assert_eq!(report.faults.len(), 3, "{:?}", report.faults);
    for f in &report.faults {
        assert!(f.rto_ms.is_some(), "fault {} on {} not recovered before the next phase", f.kind, f.target);
    }
    assert!(report.ops.ok > 100, "the workload barely ran: {:?}", report.ops);
    for name in ["report.json", "report.md", "report.html", "history.json"] {
        assert!(out.path().join(name).is_file(), "{name} missing");
    }
}
