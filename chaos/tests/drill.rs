//! `cascade drill` against a real cluster (the harness's processes, no fault proxy faults): it
//! refuses unless the nodes allow fault injection and the operator confirms, and a drill that
//! runs injects its fault, undoes it, and reports the promises as kept.

use cascade_chaos::cluster::{Cluster, ClusterSpec};
use cascade_check::report::Report;
use cascade_protocol::pb;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

async fn cluster(fault_injection: bool, root: &std::path::Path) -> Cluster {
    let mut spec = ClusterSpec::three_regions(3, 2, 1);
    spec.fault_injection = fault_injection;
    let cluster = Cluster::start(spec, &cascade_chaos::default_bin(), root).await.expect("cluster");
    // Every shard led before the drill looks for leaders.
    for shard in 0..2 {
        let mut led = false;
        for _ in 0..120 {
            if cluster.leader_of(shard).await.is_some() {
                led = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(led, "shard {shard} never got a leader");
    }
    cluster
}

/// Runs `cascade --addr <n1> drill ...` with stdin closed; (exit code, stdout, stderr).
fn drill(cluster: &Cluster, args: &[&str]) -> (i32, String, String) {
    drill_at(&cluster.node(1).expect("n1").addr.to_string(), args)
}

fn drill_at(addr: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cascade_chaos::default_bin())
        .args(["--addr", addr, "drill"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run cascade drill");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_refuses_a_cluster_without_fault_injection() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = cluster(false, dir.path()).await;
    let (code, _, stderr) = drill(&cluster, &["isolate-region", "eu", "--yes"]);
    assert_eq!(code, 3, "refused: {stderr}");
    assert!(stderr.contains("drills are disabled on n1, n2, n3"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_isolates_a_leader_then_heals_and_reports() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = cluster(true, dir.path()).await;

    // Without --yes and without a terminal, nothing happens.
    let (code, _, stderr) = drill(&cluster, &["isolate-leader", "--shard", "0"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("pass --yes"), "{stderr}");
    let (code, _, stderr) = drill(&cluster, &["isolate-region", "mars", "--yes"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("regions: ap, eu, us"), "{stderr}");

    let out = dir.path().join("drill");
    let out_s = out.display().to_string();
    let args = [
        "isolate-leader",
        "--shard",
        "0",
        "--yes",
        "--duration-s",
        "4",
        "--baseline-s",
        "1",
        "--recovery-s",
        "6",
        "--out",
        &out_s,
    ];
    let (code, stdout, stderr) = drill(&cluster, &args);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report: Report =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("report");
    assert!(report.passed(), "{:?}", report.violations);
    assert_eq!(report.faults.len(), 1);
    assert!(report.faults[0].target.contains("leader of shard 0"), "{:?}", report.faults[0]);
    assert!(report.faults[0].rto_ms.is_some(), "recovered: {:?}", report.faults[0]);
    assert!(report.ops.ok > 50, "{:?}", report.ops);
    assert!(out.join("report.html").is_file());

    // Every link is healed afterwards.
    for id in cluster.ids() {
        let cut = cluster
            .client(id)
            .expect("client")
            .cut_links(pb::CutLinksRequest { addrs: Vec::new(), heal: false })
            .await
            .expect("cut links")
            .into_inner();
        assert!(cut.cut.is_empty(), "n{id} still cuts {:?}", cut.cut);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_kills_a_leader_that_its_supervisor_restarts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = cluster(true, dir.path()).await;
    let addr = cluster.node(1).expect("n1").addr.to_string();
    let leader = cluster.leader_of(1).await.expect("shard 1 has a leader");
    // The harness plays the supervisor: a node that exits is started again.
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let supervisor = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut restarted = Vec::new();
            loop {
                {
                    let mut c = cluster.lock().await;
                    for (id, _) in c.exited() {
                        c.start_node(id).expect("restart");
                        restarted.push(id);
                    }
                }
                if !restarted.is_empty() {
                    return restarted;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let out = dir.path().join("kill");
    let out_s = out.display().to_string();
    let args = [
        "kill-leader",
        "--shard",
        "1",
        "--yes",
        "--duration-s",
        "20",
        "--baseline-s",
        "1",
        "--recovery-s",
        "6",
        "--out",
        &out_s,
    ];
    let owned: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        drill_at(&addr, &refs)
    })
    .await
    .expect("drill");
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let restarted = tokio::time::timeout(Duration::from_secs(5), supervisor)
        .await
        .expect("a node exited")
        .expect("supervisor");
    assert_eq!(restarted, vec![leader], "the drill made exactly the leader of shard 1 exit");
    let report: Report =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("report");
    assert!(report.passed(), "{:?}", report.violations);
    assert!(
        report.faults[0].target.contains(&format!("n{leader} (leader of shard 1)")),
        "{:?}",
        report.faults
    );
    assert!(report.faults[0].rto_ms.is_some(), "recovered: {:?}", report.faults[0]);
}
