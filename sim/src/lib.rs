//! Deterministic simulator for Cascade (DESIGN §6): several real nodes — the same openraft
//! groups, state machine, actors and tonic services as production — in one process on turmoil's
//! simulated network and clock, with in-memory storage that loses unsynced writes on a crash.
//! A run is derived from its seed. Most seeds replay byte for byte; some do not yet (see
//! ARCHITECTURE.md, "Not yet").

pub mod net;
pub mod report;
pub mod run;
pub mod scenario;
pub mod shared;
pub mod sweep;

pub use cascade_check::{checkers, clients, history, rto};
