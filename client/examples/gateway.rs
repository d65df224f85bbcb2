//! A gateway using the SDK, against a running cluster:
//!
//! ```sh
//! cargo run -p cascade-node -- demo --keep            # prints the nodes' addresses
//! cargo run -p cascade-client --example gateway -- --addr 127.0.0.1:<port>
//! ```
//!
//! It plays both sides. As the identity provider it creates sessions (in a real deployment
//! they arrive inside signed tokens). As the gateway it:
//! 1. starts a local cache and waits until every shard is fresh;
//! 2. answers a burst of requests from the cache, in-process, and prints the time per check;
//! 3. has a responder revoke one user, and shows how soon the cache refuses that user's
//!    requests while the others still pass;
//! 4. checks the same sessions remotely, in one batch, as a gateway without a cache would.
//!
//! Exits non-zero if any answer is wrong.

use cascade_client::pb::cascade_client::CascadeClient;
use cascade_client::{pb, Claims, Client, ClientConfig, LocalConfig, Verdict};
use clap::Parser;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
struct Args {
    /// A node of the cluster (the others are discovered).
    #[arg(long, env = "CASCADE_ADDR", default_value = "127.0.0.1:7400")]
    addr: String,
    /// Users (one session each).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Local checks in the burst.
    #[arg(long, default_value_t = 1_000_000)]
    checks: usize,
}

/// What the gateway knows of a session from its verified token.
struct Token {
    session_id: String,
    user_id: String,
    created_at_ms: u64,
    expires_at_ms: u64,
}

const TENANT: &str = "example";

impl Token {
    fn claims(&self) -> Claims<'_> {
        Claims {
            session_id: &self.session_id,
            tenant: TENANT,
            user_id: &self.user_id,
            client_id: "gateway-example",
            device_id: None,
            jkt: None,
            aal: 1,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.users >= 2, "--users: at least 2");
    let client = Client::connect(ClientConfig::new([args.addr.clone()])).await?;
    let t = client.topology();
    println!(
        "cluster: {} nodes, {} shards, revocation bound {} ms",
        t.nodes.len(),
        t.n_shards,
        t.revocation_bound_ms
    );

    // The identity provider's side: sessions for a fresh set of users.
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let mut idp =
        CascadeClient::connect(format!("http://{}", args.addr.trim_start_matches("http://"))).await?;
    let mut tokens = Vec::with_capacity(args.users);
    for i in 0..args.users {
        let user_id = format!("user-{run}-{i}");
        let r = idp
            .create_session(pb::CreateSessionRequest {
                tenant: TENANT.into(),
                user_id: user_id.clone(),
                client_id: "gateway-example".into(),
                aal: 1,
                ttl_ms: 3_600_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        tokens.push(Token {
            session_id: r.session_id,
            user_id,
            created_at_ms: r.created_at_ms,
            expires_at_ms: r.expires_at_ms,
        });
    }
    println!("created {} sessions", tokens.len());

    // 1. The local cache.
    let cache = client.local_cache(LocalConfig::default());
    let started = Instant::now();
    cache.wait_fresh(Duration::from_secs(10)).await?;
    println!("local cache fresh on every shard after {} ms", started.elapsed().as_millis());

    // 2. A burst of requests answered in-process.
    let started = Instant::now();
    let mut valid = 0usize;
    for i in 0..args.checks {
        let token = &tokens[i % tokens.len()];
        if cache.check_local(&token.claims(), None, 0)?.verdict.is_valid() {
            valid += 1;
        }
    }
    let took = started.elapsed();
    anyhow::ensure!(valid == args.checks, "{} of {} checks were not valid", args.checks - valid, args.checks);
    println!(
        "{} local checks in {} ms: {:.0} ns per check on one core",
        args.checks,
        took.as_millis(),
        took.as_nanos() as f64 / args.checks as f64
    );

    // 3. A responder revokes the first user; the cache refuses it within the bound.
    let victim = &tokens[0];
    idp.revoke_user(pb::RevokeUserRequest {
        tenant: TENANT.into(),
        user_id: victim.user_id.clone(),
        revocation: Some(pb::Revocation {
            reason: pb::ReasonCode::Compromised as i32,
            text: "gateway example".into(),
            actor: "example-responder".into(),
        }),
    })
    .await?;
    let acked = Instant::now();
    loop {
        match cache.check_local(&victim.claims(), None, 0) {
            Ok(a) if matches!(a.verdict, Verdict::Revoked(_)) => break,
            Ok(_) | Err(cascade_client::Error::Stale { .. }) => {
                anyhow::ensure!(
                    acked.elapsed() < Duration::from_secs(5),
                    "the cache did not see the revocation"
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!(
        "user {} revoked: refused by the local cache {} µs after the ack",
        victim.user_id,
        acked.elapsed().as_micros()
    );
    let other = cache.check(&tokens[1].claims(), None, 0).await?;
    anyhow::ensure!(other.verdict.is_valid(), "another user's session turned {:?}", other.verdict);
    println!("another user's session: {:?} ({:?})", other.verdict, other.source);

    // 4. The same sessions checked remotely, in batches grouped by node.
    let started = Instant::now();
    let checks = tokens
        .iter()
        .map(|t| pb::CheckSessionRequest { session_id: t.session_id.clone(), ..Default::default() })
        .collect();
    let answers = client.check_batch(checks).await?;
    let revoked = answers.iter().filter(|a| a.status() == pb::CheckStatus::Revoked).count();
    println!(
        "remote batch of {} checks in {} ms: {} revoked (the victim), {} valid",
        answers.len(),
        started.elapsed().as_millis(),
        revoked,
        answers.len() - revoked
    );
    anyhow::ensure!(revoked == 1, "expected exactly the victim revoked remotely, got {revoked}");
    Ok(())
}
