//! Cascade's gateway SDK.
//!
//! Two ways to ask "is this session still valid, for this device?":
//!
//! - **Remote** ([`Client::check`], [`Client::check_batch`]): one gRPC call to a node holding a
//!   replica of the session's shard (the shard is in the session id, so no lookup), with a
//!   deadline per attempt, retries with backoff on another replica when a node is down or cannot
//!   prove it is fresh, and batches of up to 256 checks per call grouped by node.
//! - **Local** ([`LocalCache`], DESIGN §5): the cache subscribes to `WatchRevocations` for every
//!   shard, keeps the watermarks and the revoked sessions not yet expired in memory, and answers
//!   from the claims of a token the gateway has already verified, in-process. It knows how
//!   stale it is: a shard whose last fresh heartbeat is older than the revocation bound is not
//!   trusted, and the check fails closed ([`OnStale::FailClosed`], the default) or asks the
//!   cluster ([`OnStale::Remote`]).
//!
//! ```no_run
//! # async fn gateway() -> Result<(), cascade_client::Error> {
//! use cascade_client::{Claims, Client, ClientConfig, LocalConfig};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7400"])).await?;
//! let cache = client.local_cache(LocalConfig::default());
//! cache.wait_fresh(std::time::Duration::from_secs(5)).await?;
//! # let claims: Claims<'_> = unimplemented!();
//! let answer = cache.check(&claims, Some("presented key thumbprint"), 0).await?;
//! if !answer.verdict.is_valid() { /* refuse the request */ }
//! # Ok(()) }
//! ```
//!
//! `examples/gateway.rs` is a runnable gateway loop against a local cluster.

mod cache;
mod config;
mod error;
mod local;
mod remote;
mod topology;

pub use cache::{Claims, LocalAnswer, ShardCacheStatus, Verdict};
pub use cascade_protocol::pb;
pub use config::{ClientConfig, LocalConfig, OnStale};
pub use error::Error;
pub use local::{Answer, LocalCache, Source};
pub use remote::Client;
pub use topology::{NodeInfo, ShardInfo, Topology};
