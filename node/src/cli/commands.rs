//! The client subcommands (`create`, `check`, `revoke …`, `status`, …): their flags, the request
//! each one sends, and how its answer is printed.
//!
//! Each command is one RPC. This file must not retry, validate what the server validates (the
//! server is the authority and its message is printed), or hold any session logic.

use crate::cli::api::Api;
use crate::cli::duration::parse_ms;
use crate::cli::exit;
use crate::cli::render::{self, check_status_name, reason_name, Output, Record, Val};
use cascade_protocol::pb;
use clap::{Args, Subcommand, ValueEnum};

/// `cascade create`: a new session.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Tenant the user belongs to.
    #[arg(long)]
    pub tenant: String,
    /// User id within the tenant.
    #[arg(long)]
    pub user: String,
    /// OAuth client (relying party) the session is for.
    #[arg(long)]
    pub client: String,
    /// Device to bind the session to (requires --jkt).
    #[arg(long, requires = "jkt")]
    pub device: Option<String>,
    /// RFC 7638 thumbprint (43 base64url chars) of the device's key (requires --device).
    #[arg(long, requires = "device")]
    pub jkt: Option<String>,
    /// Authenticator assurance level reached at login, 1..3.
    #[arg(long, default_value_t = 1)]
    pub aal: u32,
    /// Authentication methods used, comma separated (e.g. pwd,otp).
    #[arg(long, value_delimiter = ',')]
    pub amr: Vec<String>,
    /// Absolute lifetime: 8h, 30m, 1h30m, 90s, 1500ms or bare milliseconds.
    #[arg(long, default_value = "8h", value_parser = parse_ms)]
    pub ttl: u64,
    /// Idle timeout (same syntax as --ttl); omit for none.
    #[arg(long, value_parser = parse_ms)]
    pub idle: Option<u64>,
    /// SSO parent session (same user): revoking it revokes this one.
    #[arg(long)]
    pub parent: Option<String>,
    /// Also issue a refresh token bound to the session.
    #[arg(long)]
    pub refresh: bool,
}

/// Why a revocation is made (the proto `ReasonCode`s a caller may choose).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Reason {
    /// The user signed out.
    Logout,
    /// An administrator decided.
    Admin,
    /// Credentials or device are believed compromised.
    Compromised,
    /// A policy (e.g. a password change) requires it.
    Policy,
}

impl Reason {
    fn code(self) -> pb::ReasonCode {
        match self {
            Reason::Logout => pb::ReasonCode::Logout,
            Reason::Admin => pb::ReasonCode::Admin,
            Reason::Compromised => pb::ReasonCode::Compromised,
            Reason::Policy => pb::ReasonCode::Policy,
        }
    }
}

/// Audit fields sent with every revocation.
#[derive(Debug, Args)]
pub struct RevocationArgs {
    /// Reason code recorded in the audit trail.
    #[arg(long, value_enum, default_value_t = Reason::Admin)]
    pub reason: Reason,
    /// Free text for the audit trail (at most 256 bytes).
    #[arg(long, default_value = "")]
    pub text: String,
    /// Who is asking (at most 128 bytes); defaults to $USER.
    #[arg(long, env = "USER", default_value = "cli")]
    pub actor: String,
}

impl RevocationArgs {
    pub(crate) fn to_pb(&self) -> pb::Revocation {
        pb::Revocation {
            reason: self.reason.code() as i32,
            text: self.text.clone(),
            actor: self.actor.clone(),
        }
    }
}

/// `cascade revoke …`: what to revoke.
#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// Revoke one session and its SSO descendants.
    Session {
        /// Session id (cs_…).
        session_id: String,
        #[command(flatten)]
        revocation: RevocationArgs,
    },
    /// Revoke a session's refresh-token family (and the session).
    Family {
        /// Session id (cs_…) that owns the family.
        session_id: String,
        #[command(flatten)]
        revocation: RevocationArgs,
    },
    /// Revoke every session bound to one device of a user.
    Device {
        /// Tenant the user belongs to.
        #[arg(long)]
        tenant: String,
        /// User id within the tenant.
        #[arg(long)]
        user: String,
        /// Device id whose sessions are revoked.
        #[arg(long)]
        device: String,
        #[command(flatten)]
        revocation: RevocationArgs,
    },
    /// Revoke (or count, with --dry-run) every session matching a selector, cluster-wide, as
    /// a job: a tenant, client, user or device (optionally created before a time) is one
    /// watermark per shard; aal, ip prefix and region are scanned shard by shard.
    Where(super::respond::WhereArgs),
    /// Revoke every user or device listed in a file, streamed in chunks of 1,000.
    List(super::respond::ListArgs),
    /// Revoke every session of a user.
    User {
        /// Tenant the user belongs to.
        #[arg(long)]
        tenant: String,
        /// User id within the tenant.
        #[arg(long)]
        user: String,
        #[command(flatten)]
        revocation: RevocationArgs,
    },
}

/// Scope of a "not before" watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scope {
    /// Every session of the tenant.
    Tenant,
    /// Every session of one client (--client).
    Client,
    /// Every session of one user (--user).
    User,
    /// Every session of one device of a user (--user, --device).
    Device,
}

/// `cascade watermark`: invalidate every session created at or before a time, in one command.
#[derive(Debug, Args)]
pub struct WatermarkArgs {
    /// What the watermark applies to.
    #[arg(long, value_enum)]
    pub scope: Scope,
    /// Tenant the watermark applies in.
    #[arg(long)]
    pub tenant: String,
    /// Required for --scope client.
    #[arg(long)]
    pub client: Option<String>,
    /// Required for --scope user and device.
    #[arg(long)]
    pub user: Option<String>,
    /// Required for --scope device.
    #[arg(long)]
    pub device: Option<String>,
    /// Sessions created at or before this time (ms since epoch) become invalid; default now.
    #[arg(long, default_value_t = 0)]
    pub not_before_ms: u64,
    #[command(flatten)]
    pub revocation: RevocationArgs,
}

/// `cascade create`.
pub async fn create(api: &Api, out: Output, a: CreateArgs) -> anyhow::Result<u8> {
    let request = pb::CreateSessionRequest {
        tenant: a.tenant,
        user_id: a.user,
        client_id: a.client,
        device_id: a.device.unwrap_or_default(),
        jkt: a.jkt.unwrap_or_default(),
        aal: a.aal,
        amr: a.amr,
        ttl_ms: a.ttl,
        idle_timeout_ms: a.idle.unwrap_or(0),
        parent_session_id: a.parent.unwrap_or_default(),
        with_refresh_token: a.refresh,
        metadata: None,
    };
    let r = api.create_session(request).await?;
    let mut rec = Record::new()
        .with("session_id", r.session_id)
        .with("created_at_ms", Val::TimeMs(r.created_at_ms))
        .with("expires_at_ms", Val::TimeMs(r.expires_at_ms));
    if a.refresh {
        rec = rec.with("refresh_token", r.refresh_token);
    }
    rec = rec.with("evicted_session_ids", r.evicted_session_ids);
    render::emit(out, &rec);
    Ok(exit::SUCCESS)
}

/// One check answer as a record.
pub fn check_record(session_id: &str, r: &pb::CheckSessionResponse) -> Record {
    Record::new()
        .with("session_id", session_id)
        .with("status", Val::Enum(check_status_name(r.status)))
        .with("reason", Val::Enum(reason_name(r.reason)))
        .with("tenant", r.tenant.as_str())
        .with("user_id", r.user_id.as_str())
        .with("client_id", r.client_id.as_str())
        .with("aal", r.aal)
        .with("expires_at_ms", Val::TimeMs(r.expires_at_ms))
        .with("freshness", render::freshness(r.freshness.as_ref()))
}

/// `cascade check`: exit 5 when the session is not VALID.
pub async fn check(
    api: &Api,
    out: Output,
    session_id: String,
    jkt: Option<String>,
    aal: u32,
    linearizable: bool,
) -> anyhow::Result<u8> {
    let request = pb::CheckSessionRequest {
        session_id: session_id.clone(),
        jkt: jkt.unwrap_or_default(),
        required_aal: aal,
        linearizable,
    };
    let r = api.check_session(request).await?;
    render::emit(out, &check_record(&session_id, &r));
    Ok(if r.status == pb::CheckStatus::Valid as i32 { exit::SUCCESS } else { exit::NOT_VALID })
}

/// `cascade check-batch`: one line per session, in the order given.
pub async fn check_batch(
    api: &Api,
    out: Output,
    session_ids: Vec<String>,
    jkt: Option<String>,
    aal: u32,
) -> anyhow::Result<u8> {
    let jkt = jkt.unwrap_or_default();
    let checks = session_ids
        .iter()
        .map(|id| pb::CheckSessionRequest {
            session_id: id.clone(),
            jkt: jkt.clone(),
            required_aal: aal,
            linearizable: false,
        })
        .collect();
    let r = api.check_session_batch(pb::CheckSessionBatchRequest { checks }).await?;
    if r.results.len() != session_ids.len() {
        anyhow::bail!("server answered {} results for {} checks", r.results.len(), session_ids.len());
    }
    let rows: Vec<Record> = session_ids
        .iter()
        .zip(&r.results)
        .map(|(id, res)| {
            Record::new()
                .with("session_id", id.as_str())
                .with("status", Val::Enum(check_status_name(res.status)))
                .with("reason", Val::Enum(reason_name(res.reason)))
                .with("user_id", res.user_id.as_str())
                .with("aal", res.aal)
                .with("expires_at_ms", Val::TimeMs(res.expires_at_ms))
                .with("applied_index", res.freshness.as_ref().map_or(0, |f| f.applied_index))
        })
        .collect();
    render::emit_rows(out, "results", &rows);
    Ok(exit::SUCCESS)
}

/// `cascade touch`.
pub async fn touch(api: &Api, out: Output, session_id: String) -> anyhow::Result<u8> {
    let r = api.touch_session(pb::TouchSessionRequest { session_id: session_id.clone() }).await?;
    let rec = Record::new()
        .with("session_id", session_id)
        .with("idle_expires_at_ms", Val::TimeMs(r.idle_expires_at_ms))
        .with("written", r.written);
    render::emit(out, &rec);
    Ok(exit::SUCCESS)
}

/// `cascade step-up`.
pub async fn step_up(
    api: &Api,
    out: Output,
    session_id: String,
    aal: u32,
    amr: Vec<String>,
) -> anyhow::Result<u8> {
    let r =
        api.step_up_session(pb::StepUpSessionRequest { session_id: session_id.clone(), aal, amr }).await?;
    render::emit(out, &Record::new().with("session_id", session_id).with("aal", r.aal));
    Ok(exit::SUCCESS)
}

/// `cascade rotate`.
pub async fn rotate(api: &Api, out: Output, refresh_token: String) -> anyhow::Result<u8> {
    let r = api.rotate_refresh_token(pb::RotateRefreshTokenRequest { refresh_token }).await?;
    if r.reuse_detected {
        // A domain answer, not a refusal (exit 0), but no new token was issued: say so loudly.
        eprintln!("warning: refresh-token reuse detected: the family and its session are now revoked");
    }
    let rec = Record::new()
        .with("refresh_token", r.refresh_token)
        .with("generation", r.generation)
        .with("reuse_detected", r.reuse_detected)
        .with("revoked_session_ids", r.revoked_session_ids);
    render::emit(out, &rec);
    Ok(exit::SUCCESS)
}

/// A listed session as a record (also used by the demo).
pub fn session_record(s: &pb::SessionInfo) -> Record {
    Record::new()
        .with("session_id", s.session_id.as_str())
        .with("status", Val::Enum(check_status_name(s.status)))
        .with("reason", Val::Enum(reason_name(s.reason)))
        .with("client_id", s.client_id.as_str())
        .with("device_id", s.device_id.as_str())
        .with("aal", s.aal)
        .with("parent_session_id", s.parent_session_id.as_str())
        .with("refresh_generation", s.refresh_generation)
        .with("created_at_ms", Val::TimeMs(s.created_at_ms))
        .with("expires_at_ms", Val::TimeMs(s.expires_at_ms))
        .with("last_seen_ms", Val::TimeMs(s.last_seen_ms))
}

/// `cascade list`.
pub async fn list(api: &Api, out: Output, tenant: String, user: String) -> anyhow::Result<u8> {
    let r = api
        .list_user_sessions(pb::ListUserSessionsRequest { tenant: tenant.clone(), user_id: user.clone() })
        .await?;
    let devices: Vec<Record> = r
        .devices
        .iter()
        .map(|d| {
            Record::new()
                .with("device_id", d.device_id.as_str())
                .with("jkt", d.jkt.as_str())
                .with("first_seen_ms", Val::TimeMs(d.first_seen_ms))
                .with("watermark_ms", Val::TimeMs(d.watermark_ms))
        })
        .collect();
    let rec = Record::new()
        .with("tenant", tenant)
        .with("user_id", user)
        .with("user_watermark_ms", Val::TimeMs(r.user_watermark_ms))
        .with("sessions", r.sessions.iter().map(session_record).collect::<Vec<_>>())
        .with("devices", devices);
    render::emit(out, &rec);
    Ok(exit::SUCCESS)
}

/// `cascade revoke …`.
pub async fn revoke(api: &Api, out: Output, command: RevokeCommand) -> anyhow::Result<u8> {
    let r = match command {
        RevokeCommand::Where(args) => return super::respond::revoke_where(api, out, args).await,
        RevokeCommand::List(args) => return super::respond::revoke_list(api, out, args).await,
        RevokeCommand::Session { session_id, revocation } => {
            let revocation = Some(revocation.to_pb());
            api.revoke_session(pb::RevokeSessionRequest { session_id, revocation }).await?
        }
        RevokeCommand::Family { session_id, revocation } => {
            let revocation = Some(revocation.to_pb());
            api.revoke_family(pb::RevokeFamilyRequest { session_id, revocation }).await?
        }
        RevokeCommand::Device { tenant, user, device, revocation } => {
            let revocation = Some(revocation.to_pb());
            api.revoke_device(pb::RevokeDeviceRequest {
                tenant,
                user_id: user,
                device_id: device,
                revocation,
            })
            .await?
        }
        RevokeCommand::User { tenant, user, revocation } => {
            let revocation = Some(revocation.to_pb());
            api.revoke_user(pb::RevokeUserRequest { tenant, user_id: user, revocation }).await?
        }
    };
    let rec = Record::new()
        .with("revoked", r.revoked_session_ids.len() as u64)
        .with("revoked_at_ms", Val::TimeMs(r.revoked_at_ms))
        .with("revoked_session_ids", r.revoked_session_ids);
    render::emit(out, &rec);
    Ok(exit::SUCCESS)
}

/// `cascade watermark`.
pub async fn watermark(api: &Api, out: Output, a: WatermarkArgs) -> anyhow::Result<u8> {
    let scope = match a.scope {
        Scope::Tenant => pb::WatermarkScope::Tenant,
        Scope::Client => pb::WatermarkScope::Client,
        Scope::User => pb::WatermarkScope::User,
        Scope::Device => pb::WatermarkScope::Device,
    };
    let request = pb::SetWatermarkRequest {
        scope: scope as i32,
        tenant: a.tenant,
        client_id: a.client.unwrap_or_default(),
        user_id: a.user.unwrap_or_default(),
        device_id: a.device.unwrap_or_default(),
        not_before_ms: a.not_before_ms,
        revocation: Some(a.revocation.to_pb()),
    };
    let r = api.set_watermark(request).await?;
    let rec = Record::new()
        .with("scope", Val::Enum(scope.as_str_name().to_owned()))
        .with("watermark_ms", Val::TimeMs(r.watermark_ms))
        .with("shards", r.shards);
    render::emit(out, &rec);
    Ok(exit::SUCCESS)
}

/// A shard's status as a record (also used by the demo).
pub fn shard_record(s: &pb::ShardStatus) -> Record {
    Record::new()
        .with("shard", s.shard)
        .with("leader", s.leader)
        .with("role", s.role.as_str())
        .with("term", s.term)
        .with("last_log_index", s.last_log_index)
        .with("applied_index", s.applied_index)
        .with("snapshot_index", s.snapshot_index)
        .with("live_user_actors", s.live_user_actors)
}

/// Totals over every shard of a node status.
pub fn status_totals(r: &pb::NodeStatusResponse) -> Record {
    let sum = |f: fn(&pb::ShardStatus) -> u64| r.shards.iter().map(f).fold(0u64, u64::saturating_add);
    let led_here = r.shards.iter().filter(|s| s.leader != 0 && s.leader == r.node_id).count();
    let without_leader = r.shards.iter().filter(|s| s.leader == 0).count();
    Record::new()
        .with("shards", r.shards.len() as u64)
        .with("led_here", led_here as u64)
        .with("without_leader", without_leader as u64)
        .with("last_log_index", sum(|s| s.last_log_index))
        .with("applied_index", sum(|s| s.applied_index))
        .with("snapshot_index", sum(|s| s.snapshot_index))
}

/// `cascade status`: the node, its shards, and totals.
pub async fn status(api: &Api, out: Output) -> anyhow::Result<u8> {
    let r = api.node_status().await?;
    let rec = Record::new()
        .with("node_id", r.node_id)
        .with("region", r.region.as_str())
        .with("n_shards", r.n_shards)
        .with("live_user_actors", r.live_user_actors)
        .with("totals", status_totals(&r))
        .with("shards", r.shards.iter().map(shard_record).collect::<Vec<_>>());
    render::emit(out, &rec);
    Ok(exit::SUCCESS)
}
