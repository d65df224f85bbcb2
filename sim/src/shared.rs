//! The run's history as the simulated hosts share it (they all run on one thread), on the
//! simulation's one clock.

use cascade_check::clients::Recorder;
use cascade_check::history::History;
use std::cell::RefCell;
use std::rc::Rc;

/// The history, shared by every simulated host.
#[derive(Clone, Default)]
pub struct Shared(pub Rc<RefCell<History>>);

impl Recorder for Shared {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn read<T>(&self, f: impl FnOnce(&History) -> T) -> T {
        f(&self.0.borrow())
    }

    fn write<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        f(&mut self.0.borrow_mut())
    }
}

/// Simulated milliseconds since the start of the run.
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
