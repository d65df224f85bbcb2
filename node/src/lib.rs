//! The Cascade server: configuration, the actor tree (node supervisor → shard actors → user
//! actors), the gRPC services and how a node starts. Business rules live in `cascade_core`;
//! replication and storage in `cascade_raft`. This crate only carries messages and performs
//! effects.

pub mod actors;
pub mod api;
pub mod auth;
pub mod config;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod seams;
pub mod tls;

pub use node::run;
