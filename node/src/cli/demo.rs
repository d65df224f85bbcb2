//! `cascade demo`: starts one node in-process and walks through Cascade's promises, printing each
//! step (what was done, what came back) and PASS or FAIL against what is promised. Exits 1 if any
//! step did not behave as promised, listing which.
//!
//! This file only drives the public gRPC API, like any client would; it must not reach into the
//! node's internals, and it must not hide a failed step (every step is judged and reported).

use crate::cli::api::Api;
use crate::cli::commands::{shard_record, status_totals};
use crate::cli::exit;
use crate::cli::local::{LocalNode, LOCAL_NODE_ID};
use crate::cli::render::{check_status_name, reason_name, rows_table, Record, Val};
use crate::cli::serve::{init_logging, shutdown_signal};
use cascade_protocol::ids::{RefreshToken, SessionId};
use cascade_protocol::pb::{self, CheckStatus, ReasonCode};
use clap::Args;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Flags of `cascade demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the node running after the walk-through (until Ctrl-C) and print how to use it.
    #[arg(long)]
    pub keep: bool,
}

const TENANT: &str = "acme";
const USER: &str = "alice";
const CLIENT: &str = "demo-web";
const DEVICE: &str = "laptop";
/// Lifetime of demo sessions.
const TTL_MS: u64 = 8 * 3600 * 1000;

/// RFC 4648 §5 base64url without padding.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let symbols = chunk.len() + 1;
        for i in 0..symbols {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

/// An RFC 7638-shaped thumbprint: SHA-256 of a (made-up) canonical JWK, base64url, 43 chars.
fn thumbprint(jwk: &str) -> String {
    base64url(&Sha256::digest(jwk.as_bytes()))
}

/// Shortens long tokens for display.
fn short(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() > 28 {
        let head: String = chars[..20].iter().collect();
        let tail: String = chars[chars.len() - 6..].iter().collect();
        format!("{head}…{tail}")
    } else {
        text.to_owned()
    }
}

/// Prints the walk-through and keeps score.
struct Walk {
    api: Api,
    step: usize,
    failed: Vec<String>,
    title: String,
}

impl Walk {
    fn step(&mut self, title: &str) {
        self.step += 1;
        self.title = title.to_owned();
        println!();
        println!("[{:>2}] {title}", self.step);
    }

    fn did(&self, text: &str) {
        println!("     did   {text}");
    }

    fn got(&self, text: &str) {
        println!("     got   {text}");
    }

    fn judge(&mut self, promise: &str, ok: bool) -> bool {
        if ok {
            println!("     PASS  {promise}");
        } else {
            println!("     FAIL  {promise}");
            self.failed.push(format!("step {} ({}): {promise}", self.step, self.title));
        }
        ok
    }

    fn error(&mut self, promise: &str, err: impl std::fmt::Display) {
        self.got(&format!("error: {err}"));
        self.judge(promise, false);
    }

    fn skip(&mut self, why: &str) {
        println!("     FAIL  skipped: {why}");
        self.failed.push(format!("step {} ({}): skipped, {why}", self.step, self.title));
    }

    /// One check, printed and judged against the expected status (and reason, if given).
    async fn check(
        &mut self,
        session_id: &str,
        jkt: &str,
        required_aal: u32,
        expect: CheckStatus,
        expect_reason: Option<ReasonCode>,
        promise: &str,
    ) -> bool {
        let jkt_text = if jkt.is_empty() { "none".to_owned() } else { short(jkt) };
        self.did(&format!("CheckSession {session_id} jkt={jkt_text} required_aal={required_aal}"));
        let request = pb::CheckSessionRequest {
            session_id: session_id.to_owned(),
            jkt: jkt.to_owned(),
            required_aal,
            linearizable: false,
        };
        match self.api.check_session(request).await {
            Ok(r) => {
                let applied = r.freshness.as_ref().map_or(0, |f| f.applied_index);
                self.got(&format!(
                    "status={} reason={} aal={} applied_index={applied}",
                    check_status_name(r.status),
                    reason_name(r.reason),
                    r.aal
                ));
                let ok =
                    r.status == expect as i32 && expect_reason.is_none_or(|reason| r.reason == reason as i32);
                self.judge(promise, ok)
            }
            Err(err) => {
                self.error(promise, err);
                false
            }
        }
    }

    async fn create(&mut self, request: pb::CreateSessionRequest) -> Option<pb::CreateSessionResponse> {
        match self.api.create_session(request).await {
            Ok(r) => Some(r),
            Err(err) => {
                self.error("the session is created", err);
                None
            }
        }
    }
}

/// `cascade demo`.
pub async fn demo(args: DemoArgs, timeout: Duration) -> anyhow::Result<u8> {
    init_logging("warn");
    // Installed first, so Ctrl-C at any point stops the node cleanly and removes its data dir.
    let mut shutdown = Box::pin(shutdown_signal()?);
    println!("Starting one Cascade node in-process (temporary data dir, 127.0.0.1:0)…");
    let node = LocalNode::start(LOCAL_NODE_ID, timeout).await?;
    println!("Node up at {} with {} shards, data in {}", node.url(), node.shards, node.path().display());
    let api = Api::connect(&node.url(), timeout).await?;
    let mut walk = Walk { api, step: 0, failed: Vec::new(), title: String::new() };
    let interrupted = tokio::select! {
        () = walk_through(&mut walk) => false,
        () = &mut shutdown => true,
    };
    if interrupted {
        println!();
        println!("Interrupted after step {}; stopping the node…", walk.step);
        node.stop().await?;
        println!("Node stopped cleanly.");
        return Ok(exit::INTERNAL);
    }

    println!();
    if walk.failed.is_empty() {
        println!("All {} steps behaved as promised.", walk.step);
    } else {
        println!("{} of {} steps did NOT behave as promised:", walk.failed.len(), walk.step);
        for failure in &walk.failed {
            println!("  - {failure}");
        }
    }

    if args.keep {
        let url = node.url();
        println!();
        println!("The node keeps running (Ctrl-C to stop; its data dir is removed then).");
        println!("  address   {url}");
        println!("  data dir  {}", node.path().display());
        println!();
        println!("  export CASCADE_ADDR={url}");
        println!("  cascade status");
        println!("  cascade list --tenant {TENANT} --user {USER}");
        println!("  cascade create --tenant {TENANT} --user bob --client {CLIENT} --refresh --ttl 1h");
        println!("  cascade check <SESSION_ID>; echo \"exit $?\"");
        println!("  cascade revoke session <SESSION_ID> --reason logout");
        println!("  cascade -o json check-batch <SESSION_ID>...");
        println!("  cascade load --sessions 2000 --duration-s 5");
        shutdown.await;
        println!("Stopping…");
    }
    node.stop().await?;
    println!("Node stopped cleanly.");
    if walk.failed.is_empty() {
        Ok(exit::SUCCESS)
    } else {
        Ok(exit::INTERNAL)
    }
}

async fn walk_through(walk: &mut Walk) {
    let jkt = thumbprint(r#"{"crv":"P-256","kty":"EC","x":"alice-laptop-demo-x","y":"alice-laptop-demo-y"}"#);
    let other_jkt = thumbprint(r#"{"crv":"P-256","kty":"EC","x":"mallory-x","y":"mallory-y"}"#);

    // 1. A device-bound session with a refresh token.
    walk.step("Create a device-bound session for acme/alice on her laptop, with a refresh token");
    walk.did(&format!(
        "CreateSession tenant={TENANT} user={USER} client={CLIENT} device={DEVICE} jkt={jkt} aal=1 amr=pwd ttl=8h refresh"
    ));
    let created = walk
        .create(pb::CreateSessionRequest {
            tenant: TENANT.into(),
            user_id: USER.into(),
            client_id: CLIENT.into(),
            device_id: DEVICE.into(),
            jkt: jkt.clone(),
            aal: 1,
            amr: vec!["pwd".into()],
            ttl_ms: TTL_MS,
            idle_timeout_ms: 0,
            parent_session_id: String::new(),
            with_refresh_token: true,
            metadata: Some(pb::SessionMetadata {
                ip: "192.0.2.10".into(),
                user_agent: "cascade-demo".into(),
                region: "local".into(),
            }),
        })
        .await;
    let Some(created) = created else {
        walk.skip("nothing else can run without the first session");
        return;
    };
    walk.got(&format!("session_id={} refresh_token={}", created.session_id, short(&created.refresh_token)));
    let refresh_ok = created.refresh_token.parse::<RefreshToken>().is_ok_and(|t| t.generation == 1);
    walk.judge(
        "an opaque session id (cs_ + 36 hex) and a generation-1 refresh token (rt_…)",
        created.session_id.parse::<SessionId>().is_ok() && refresh_ok,
    );
    let sid = created.session_id.clone();

    // 2-4. Checks: right key, wrong key, higher assurance required.
    walk.step("Check it, presenting the laptop's key");
    walk.check(&sid, &jkt, 0, CheckStatus::Valid, None, "VALID for the bound key").await;

    walk.step("Check it, presenting another key (a stolen cookie replayed elsewhere)");
    walk.check(&sid, &other_jkt, 0, CheckStatus::DeviceMismatch, None, "DEVICE_MISMATCH for a different key")
        .await;

    walk.step("Check it for an action that needs assurance level 2");
    walk.check(
        &sid,
        &jkt,
        2,
        CheckStatus::StepUpRequired,
        None,
        "STEP_UP_REQUIRED while the session is at aal 1",
    )
    .await;

    // 5-6. Step up, then the same check passes.
    walk.step("Step the session up to aal 2 (alice completed a second factor)");
    walk.did(&format!("StepUpSession {sid} aal=2 amr=pwd,otp"));
    let request =
        pb::StepUpSessionRequest { session_id: sid.clone(), aal: 2, amr: vec!["pwd".into(), "otp".into()] };
    match walk.api.step_up_session(request).await {
        Ok(r) => {
            walk.got(&format!("aal={}", r.aal));
            walk.judge("the session is now at aal 2", r.aal == 2);
        }
        Err(err) => walk.error("the session is now at aal 2", err),
    }

    walk.step("Check again, requiring aal 2");
    walk.check(&sid, &jkt, 2, CheckStatus::Valid, None, "VALID at aal 2").await;

    // 7-8. Refresh-token rotation and reuse detection (RFC 9700).
    walk.step("Rotate the refresh token");
    walk.did(&format!("RotateRefreshToken {}", short(&created.refresh_token)));
    let request = pb::RotateRefreshTokenRequest { refresh_token: created.refresh_token.clone() };
    match walk.api.rotate_refresh_token(request).await {
        Ok(r) => {
            walk.got(&format!(
                "refresh_token={} generation={} reuse_detected={}",
                short(&r.refresh_token),
                r.generation,
                r.reuse_detected
            ));
            walk.judge(
                "a new refresh token at generation 2, no reuse",
                r.generation == 2 && !r.reuse_detected && !r.refresh_token.is_empty(),
            );
        }
        Err(err) => walk.error("a new refresh token at generation 2", err),
    }

    walk.step("Present the OLD refresh token again (an attacker replaying a stolen token)");
    walk.did(&format!("RotateRefreshToken {}", short(&created.refresh_token)));
    let request = pb::RotateRefreshTokenRequest { refresh_token: created.refresh_token.clone() };
    match walk.api.rotate_refresh_token(request).await {
        Ok(r) => {
            walk.got(&format!(
                "refresh_token={} reuse_detected={} revoked_session_ids=[{}]",
                if r.refresh_token.is_empty() { "(none)".to_owned() } else { short(&r.refresh_token) },
                r.reuse_detected,
                r.revoked_session_ids.join(",")
            ));
            walk.judge(
                "reuse detected: no new token, the family's session is revoked",
                r.reuse_detected && r.refresh_token.is_empty() && r.revoked_session_ids.contains(&sid),
            );
        }
        Err(err) => walk.error("reuse detected, the session revoked", err),
    }
    walk.check(
        &sid,
        &jkt,
        0,
        CheckStatus::Revoked,
        Some(ReasonCode::RefreshTokenReuse),
        "REVOKED, REFRESH_TOKEN_REUSE",
    )
    .await;

    // 9. Two more sessions, one an SSO child of the other.
    walk.step("Create two more sessions for alice: an SSO parent and its child");
    let mut more: Vec<String> = Vec::new();
    for client in ["demo-portal", "demo-mail"] {
        // The second session is an SSO child of the first.
        let parent = more.first().cloned().unwrap_or_default();
        let parent_text = if parent.is_empty() { "none".to_owned() } else { parent.clone() };
        walk.did(&format!(
            "CreateSession tenant={TENANT} user={USER} client={client} aal=1 parent={parent_text}"
        ));
        let request = pb::CreateSessionRequest {
            tenant: TENANT.into(),
            user_id: USER.into(),
            client_id: client.into(),
            aal: 1,
            amr: vec!["pwd".into()],
            ttl_ms: TTL_MS,
            parent_session_id: parent,
            ..Default::default()
        };
        if let Some(r) = walk.create(request).await {
            walk.got(&format!("session_id={}", r.session_id));
            more.push(r.session_id);
        }
    }
    walk.judge("both sessions are created", more.len() == 2);
    for id in &more {
        walk.check(id, "", 0, CheckStatus::Valid, None, "VALID").await;
    }

    // 10. Revoke the user.
    walk.step("Revoke user acme/alice (reason ADMIN)");
    walk.did("RevokeUser tenant=acme user=alice reason=ADMIN actor=cascade-demo");
    let request = pb::RevokeUserRequest {
        tenant: TENANT.into(),
        user_id: USER.into(),
        revocation: Some(pb::Revocation {
            reason: ReasonCode::Admin as i32,
            text: "demo: account takeover drill".into(),
            actor: "cascade-demo".into(),
        }),
    };
    match walk.api.revoke_user(request).await {
        Ok(r) => {
            walk.got(&format!("revoked_session_ids=[{}]", r.revoked_session_ids.join(",")));
            walk.judge(
                "both live sessions are revoked in one command",
                more.iter().all(|id| r.revoked_session_ids.contains(id)),
            );
        }
        Err(err) => walk.error("both live sessions are revoked", err),
    }

    // 11. Every one of her sessions is revoked.
    walk.step("Check every one of alice's sessions");
    let mut ids = vec![sid.clone()];
    ids.extend(more.iter().cloned());
    walk.did(&format!("ListUserSessions tenant={TENANT} user={USER}"));
    match walk
        .api
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: TENANT.into(), user_id: USER.into() })
        .await
    {
        Ok(r) => {
            let rows: Vec<Record> = r
                .sessions
                .iter()
                .map(|s| {
                    Record::new()
                        .with("session_id", s.session_id.as_str())
                        .with("client_id", s.client_id.as_str())
                        .with("device_id", s.device_id.as_str())
                        .with("parent_session_id", s.parent_session_id.as_str())
                        .with("status", Val::Enum(check_status_name(s.status)))
                        .with("reason", Val::Enum(reason_name(s.reason)))
                })
                .collect();
            walk.got(&format!("{} sessions, {} device(s):", r.sessions.len(), r.devices.len()));
            print!("{}", indent(&rows_table(&rows)));
            for s in &r.sessions {
                if !ids.contains(&s.session_id) {
                    ids.push(s.session_id.clone());
                }
            }
            walk.judge("all 3 sessions are listed", r.sessions.len() >= 3);
        }
        Err(err) => walk.error("alice's sessions are listed", err),
    }
    walk.did(&format!("CheckSessionBatch of {} sessions", ids.len()));
    let checks = ids
        .iter()
        .map(|id| pb::CheckSessionRequest { session_id: id.clone(), ..Default::default() })
        .collect();
    match walk.api.check_session_batch(pb::CheckSessionBatchRequest { checks }).await {
        Ok(r) => {
            for (id, res) in ids.iter().zip(&r.results) {
                walk.got(&format!("{id}  {} {}", check_status_name(res.status), reason_name(res.reason)));
            }
            let all_revoked = r.results.len() == ids.len()
                && r.results.iter().all(|res| res.status == CheckStatus::Revoked as i32);
            walk.judge("every one of her sessions checks REVOKED", all_revoked);
        }
        Err(err) => walk.error("every one of her sessions checks REVOKED", err),
    }

    // 12. Node status.
    walk.step("Node status");
    walk.did("NodeStatus");
    match walk.api.node_status().await {
        Ok(r) => {
            walk.got(&format!(
                "node {} region {} with {} shards, {} live user actors",
                r.node_id, r.region, r.n_shards, r.live_user_actors
            ));
            let home = sid.parse::<SessionId>().map(|id| u32::from(id.shard)).ok();
            let home_rows: Vec<Record> =
                r.shards.iter().filter(|s| Some(s.shard) == home).map(shard_record).collect();
            println!("     alice's shard (`cascade status` lists all {}):", r.shards.len());
            print!("{}", indent(&rows_table(&home_rows)));
            println!("     totals over all shards:");
            print!("{}", indent(&rows_table(&[status_totals(&r)])));
            let all_led = !r.shards.is_empty()
                && r.shards.len() == r.n_shards as usize
                && r.shards.iter().all(|s| s.leader != 0);
            walk.judge("every shard reports a leader", all_led);
            // Every acknowledged write above (3 creates, a step-up, 2 rotations, a user
            // revocation) is at least one applied log entry on alice's shard.
            let applied = r.shards.iter().find(|s| Some(s.shard) == home).map_or(0, |s| s.applied_index);
            walk.judge("alice's shard has applied at least the 7 writes made above", applied >= 7);
        }
        Err(err) => walk.error("the node reports its shards", err),
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("     {line}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4648 §10 test vectors, in the URL-safe alphabet without padding.
    #[test]
    fn base64url_matches_rfc4648_vectors() {
        for (input, output) in
            [("", ""), ("f", "Zg"), ("fo", "Zm8"), ("foo", "Zm9v"), ("foob", "Zm9vYg"), ("fooba", "Zm9vYmE")]
        {
            assert_eq!(base64url(input.as_bytes()), output);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    /// The demo's promises hold on a fresh node (device binding, step-up, refresh-token reuse
    /// detection per RFC 9700, SSO cascade and user revocation: P3).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_demo_step_passes_on_a_fresh_node() {
        let timeout = Duration::from_secs(5);
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let node = LocalNode::start(901, timeout).await.expect("local node starts");
                let api = Api::connect(&node.url(), timeout).await.expect("connect to local node");
                let mut walk = Walk { api, step: 0, failed: Vec::new(), title: String::new() };
                walk_through(&mut walk).await;
                node.stop().await.expect("local node stops cleanly");
                assert!(walk.failed.is_empty(), "failed steps: {:#?}", walk.failed);
                assert_eq!(walk.step, 12);
            })
            .await;
    }

    /// A thumbprint must satisfy the server's jkt rule (43 base64url chars).
    #[test]
    fn thumbprint_is_a_valid_jkt() {
        let jkt = thumbprint("{}");
        assert!(cascade_protocol::limits::check_jkt("jkt", &jkt).is_ok(), "{jkt}");
    }
}
