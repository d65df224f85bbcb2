//! Chaos harness (DESIGN §6): real `cascade` node processes on this machine, a fault proxy on
//! every inter-node link, nemeses on a schedule, and the same clients and checkers as the
//! simulator, reporting RTO per fault, RPO and latency per phase. The simulator finds logic
//! bugs in virtual time; this finds what only real processes, sockets, fsyncs and signals show.

pub mod cluster;
pub mod nemesis;
pub mod proxy;
pub mod run;

use std::path::PathBuf;

/// The `cascade` binary to run: `$CASCADE_BIN`, else the one next to this executable (or next
/// to its `deps/` directory, for test binaries), as cargo lays out `target/<profile>/`.
pub fn default_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CASCADE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("cascade")
}
