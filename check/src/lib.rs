//! The clients of a test run, what they did and saw (a [`history::History`]), and the checkers
//! of Cascade's promises over it. The deterministic simulator (`sim/`) and the chaos harness on
//! real processes (`chaos/`) run the same clients, record the same history and run the same
//! checkers, so a property means the same thing in virtual time and on a real clock.

pub mod checkers;
pub mod clients;
pub mod history;
pub mod html;
pub mod report;
pub mod rto;
pub mod workload;
