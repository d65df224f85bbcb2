//! Sans-IO session logic. [`apply()`] turns a stamped command into an outcome plus the revocation
//! events it produced; [`validity::evaluate`] answers a check from state and a time.
//!
//! Nothing here reads a clock, draws randomness or does I/O: "now" arrives inside the command (the
//! leader stamped it), and storage is reached through the [`view::ShardView`] trait, so every
//! replica computes the same result from the same log (P5).

pub mod apply;
pub mod jobs;
pub mod limits;
pub mod model;
pub mod planted;
pub mod validity;
pub mod view;

pub use apply::apply;
