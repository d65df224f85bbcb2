//! The run's history as the simulated hosts share it (they all run on one thread), and the
//! simulation's one clock.

use cascade_check::history::History;
use std::cell::RefCell;
use std::rc::Rc;

/// The history, shared by every simulated host.
pub type Shared = Rc<RefCell<History>>;

/// Simulated milliseconds since the start of the run.
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
