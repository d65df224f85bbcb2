//! What clients did and saw (a [`history::History`]), and the checkers of Cascade's promises
//! over it. The deterministic simulator (`sim/`) and the chaos harness on real processes
//! (`chaos/`) record the same history and run the same checkers, so a property means the same
//! thing in virtual time and on a real clock.

pub mod checkers;
pub mod history;
pub mod rto;
