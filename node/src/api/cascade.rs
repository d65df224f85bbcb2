//! The public `cascade.v1.Cascade` gRPC service: input validation, command construction and the
//! mapping of outcomes to responses. No business rule is decided here: `cascade_core` decides.

use super::ctx::{NodeCtx, FORWARDED_HEADER};
use super::status::ApiError;
use crate::actors::{CheckAnswer, CheckQuery};
use crate::auth::Caller;
use crate::config::StaleReads;
use cascade_core::validity::verdict;
use cascade_protocol::command::{
    Command, CreateSession, DeviceBinding, Reason, Revocation, SessionMetadata, WatermarkScope,
};
use cascade_protocol::ids::{RefreshToken, SessionId, UserKey};
use cascade_protocol::limits::{self as lim, FieldError};
use cascade_protocol::outcome::{Outcome, Refusal, Verdict};
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_server::Cascade;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct CascadeService {
    pub ctx: Arc<NodeCtx>,
}

type Reply<T> = Result<Response<T>, Status>;

fn session_id(field: &'static str, s: &str) -> Result<SessionId, ApiError> {
    if s.is_empty() {
        return Err(FieldError::new(field, "must not be empty").into());
    }
    s.parse().map_err(|e: cascade_protocol::ids::IdError| FieldError::new(field, e.to_string()).into())
}

fn user_key(tenant: &str, user_id: &str) -> Result<UserKey, ApiError> {
    lim::check_id("tenant", tenant, lim::TENANT_LEN_MAX)?;
    lim::check_id("user_id", user_id, lim::ID_LEN_MAX)?;
    Ok(UserKey::new(tenant, user_id))
}

fn optional_jkt(jkt: &str) -> Result<Option<String>, ApiError> {
    if jkt.is_empty() {
        return Ok(None);
    }
    lim::check_jkt("jkt", jkt)?;
    Ok(Some(jkt.to_owned()))
}

fn amr(values: &[String]) -> Result<Vec<String>, ApiError> {
    if values.len() > lim::AMR_VALUES_MAX {
        return Err(FieldError::new(
            "amr",
            format!("at most {} values, got {}", lim::AMR_VALUES_MAX, values.len()),
        )
        .into());
    }
    for v in values {
        lim::check_id("amr", v, lim::AMR_LEN_MAX)?;
    }
    Ok(values.to_vec())
}

fn reason_from_pb(code: i32) -> Result<Reason, ApiError> {
    use pb::ReasonCode as R;
    let code = R::try_from(code)
        .map_err(|_| FieldError::new("revocation.reason", format!("unknown reason code {code}")))?;
    Ok(match code {
        R::ReasonUnspecified => Reason::Unspecified,
        R::Logout => Reason::Logout,
        R::Admin => Reason::Admin,
        R::Compromised => Reason::Compromised,
        R::RefreshTokenReuse => Reason::RefreshTokenReuse,
        R::SessionLimit => Reason::SessionLimit,
        R::Policy => Reason::Policy,
        R::ParentRevoked => Reason::ParentRevoked,
        R::DeviceRevoked => Reason::DeviceRevoked,
        R::UserRevoked => Reason::UserRevoked,
        R::Watermark => Reason::Watermark,
    })
}

pub(crate) fn reason_to_pb(r: Reason) -> pb::ReasonCode {
    use pb::ReasonCode as R;
    match r {
        Reason::Unspecified => R::ReasonUnspecified,
        Reason::Logout => R::Logout,
        Reason::Admin => R::Admin,
        Reason::Compromised => R::Compromised,
        Reason::RefreshTokenReuse => R::RefreshTokenReuse,
        Reason::SessionLimit => R::SessionLimit,
        Reason::Policy => R::Policy,
        Reason::ParentRevoked => R::ParentRevoked,
        Reason::DeviceRevoked => R::DeviceRevoked,
        Reason::UserRevoked => R::UserRevoked,
        Reason::Watermark => R::Watermark,
    }
}

fn verdict_to_pb(v: Verdict) -> (pb::CheckStatus, pb::ReasonCode) {
    match v {
        Verdict::Valid => (pb::CheckStatus::Valid, pb::ReasonCode::ReasonUnspecified),
        Verdict::Revoked(r) => (pb::CheckStatus::Revoked, reason_to_pb(r)),
        Verdict::Expired => (pb::CheckStatus::Expired, pb::ReasonCode::ReasonUnspecified),
        Verdict::Unknown => (pb::CheckStatus::Unknown, pb::ReasonCode::ReasonUnspecified),
        Verdict::DeviceMismatch => (pb::CheckStatus::DeviceMismatch, pb::ReasonCode::ReasonUnspecified),
        Verdict::StepUpRequired => (pb::CheckStatus::StepUpRequired, pb::ReasonCode::ReasonUnspecified),
    }
}

/// A revocation's reason and text, with the authenticated caller as its actor (see
/// [`crate::auth::actor`]).
pub(crate) fn revocation(r: Option<pb::Revocation>, caller: Option<&Caller>) -> Result<Revocation, ApiError> {
    let r = r.unwrap_or_default();
    lim::check_text("revocation.text", &r.text, lim::TEXT_LEN_MAX)?;
    lim::check_text("revocation.actor", &r.actor, lim::ACTOR_LEN_MAX)?;
    let actor = crate::auth::actor(caller, &r.actor);
    Ok(Revocation { reason: reason_from_pb(r.reason)?, text: r.text, actor })
}

/// The authenticated caller of a request (none when authentication is off).
pub(crate) fn caller_of<T>(request: &Request<T>) -> Option<Caller> {
    request.extensions().get::<Caller>().cloned()
}

fn sha256(secret: u128) -> [u8; 32] {
    Sha256::digest(secret.to_be_bytes()).into()
}

/// Whether another node forwarded this request (it must then be answered here or refused).
fn forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().get(FORWARDED_HEADER).is_some()
}

fn ids(v: &[SessionId]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

/// Turn an outcome that is not the expected one into an error.
fn unexpected(outcome: Outcome) -> ApiError {
    match outcome {
        Outcome::Refused(r) => ApiError::Refused(r),
        other => ApiError::Internal(format!("unexpected outcome {other:?}")),
    }
}

impl CascadeService {
    fn check_response(&self, q: &CheckQuery, a: CheckAnswer, staleness_ms: u64) -> pb::CheckSessionResponse {
        let (status, reason) = verdict_to_pb(a.verdict);
        let mut resp = pb::CheckSessionResponse {
            status: status as i32,
            reason: reason as i32,
            freshness: Some(pb::Freshness {
                applied_index: a.applied_index,
                staleness_bound_ms: staleness_ms,
                node_id: self.ctx.node_id,
            }),
            ..Default::default()
        };
        if let Some(u) = &a.user {
            if let Some(s) = u.sessions.get(&q.session_id) {
                resp.user_id = u.key.user_id.clone();
                resp.tenant = u.key.tenant.clone();
                resp.client_id = s.client_id.clone();
                resp.aal = u32::from(s.aal);
                resp.expires_at_ms = s.expires_at_ms;
                resp.created_at_ms = s.created_at_ms;
                resp.device_id = s.device_id.clone().unwrap_or_default();
                resp.jkt = s.jkt.clone().unwrap_or_default();
            }
        }
        resp
    }

    fn query(&self, r: &pb::CheckSessionRequest) -> Result<CheckQuery, ApiError> {
        let session_id = session_id("session_id", &r.session_id)?;
        let jkt = optional_jkt(&r.jkt)?;
        let required_aal =
            if r.required_aal == 0 { 0 } else { lim::check_aal("required_aal", r.required_aal)? };
        Ok(CheckQuery { session_id, jkt, required_aal })
    }

    /// How a read of `shard` may be served: `Some(staleness)` here, `None` at the leader.
    /// Fails when neither is allowed (P2: never a stale answer).
    async fn read_here(
        &self,
        shard: u16,
        linearizable: bool,
        forwarded: bool,
    ) -> Result<Option<u64>, ApiError> {
        if linearizable && self.ctx.leads(shard) {
            self.ctx.linearize(shard).await?;
            return Ok(Some(0));
        }
        let here = if linearizable { None } else { self.ctx.staleness_ms(shard) };
        match here {
            Some(staleness) => Ok(Some(staleness)),
            None if forwarded || self.ctx.stale_reads == StaleReads::Unavailable => {
                Err(self.ctx.stale(shard))
            }
            None => Ok(None),
        }
    }

    async fn check_one(
        &self,
        r: &pb::CheckSessionRequest,
        forwarded: bool,
    ) -> Result<pb::CheckSessionResponse, ApiError> {
        let q = self.query(r)?;
        let shard = q.session_id.shard;
        if shard >= self.ctx.n_shards {
            // Well-formed but from no shard of this cluster: it cannot exist here.
            let a = CheckAnswer { verdict: Verdict::Unknown, user: None, applied_index: 0 };
            return Ok(self.check_response(&q, a, 0));
        }
        match self.read_here(shard, r.linearizable, forwarded).await? {
            Some(staleness) => {
                let a = self.ctx.check(q.clone()).await?;
                Ok(self.check_response(&q, a, staleness))
            }
            None => {
                self.ctx
                    .forward(shard, r.clone(), |mut c, req| async move { c.check_session(req).await })
                    .await
            }
        }
    }

    /// Propose a revocation to `shard` and report what it revoked.
    async fn revoke(&self, shard: u16, command: Command) -> Result<pb::RevokeResponse, ApiError> {
        match self.ctx.write(shard, command).await?.outcome {
            Outcome::Revoked { revoked, at_ms } => {
                Ok(pb::RevokeResponse { revoked_session_ids: ids(&revoked), revoked_at_ms: at_ms })
            }
            other => Err(unexpected(other)),
        }
    }

    fn owned_shard(&self, id: SessionId) -> Result<SessionId, ApiError> {
        if id.shard >= self.ctx.n_shards {
            return Err(Refusal::SessionNotFound.into());
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl Cascade for CascadeService {
    type WatchRevocationsStream = crate::api::watch::WatchStream;
    type RevokeListStream = crate::api::jobs::RevokeListStream;

    async fn start_revoke_job(
        &self,
        request: Request<pb::StartRevokeJobRequest>,
    ) -> Reply<pb::RevokeJobInfo> {
        let caller = caller_of(&request);
        Ok(Response::new(crate::api::jobs::start(&self.ctx, request.into_inner(), caller.as_ref()).await?))
    }

    async fn revoke_list(
        &self,
        request: Request<tonic::Streaming<pb::RevokeListRequest>>,
    ) -> Reply<Self::RevokeListStream> {
        let caller = caller_of(&request);
        Ok(Response::new(crate::api::jobs::revoke_list(self.ctx.clone(), request.into_inner(), caller)))
    }

    async fn get_revoke_job(&self, request: Request<pb::GetRevokeJobRequest>) -> Reply<pb::RevokeJobInfo> {
        Ok(Response::new(crate::api::jobs::get(&self.ctx, request.into_inner()).await?))
    }

    async fn list_revoke_jobs(
        &self,
        request: Request<pb::ListRevokeJobsRequest>,
    ) -> Reply<pb::ListRevokeJobsResponse> {
        Ok(Response::new(crate::api::jobs::list(&self.ctx, request.into_inner()).await?))
    }

    async fn cancel_revoke_job(
        &self,
        request: Request<pb::CancelRevokeJobRequest>,
    ) -> Reply<pb::RevokeJobInfo> {
        Ok(Response::new(crate::api::jobs::cancel(&self.ctx, request.into_inner()).await?))
    }

    async fn query_audit(&self, request: Request<pb::QueryAuditRequest>) -> Reply<pb::QueryAuditResponse> {
        Ok(Response::new(crate::api::jobs::audit(&self.ctx, request.into_inner()).await?))
    }

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Reply<Self::WatchRevocationsStream> {
        let forwarded = forwarded(&request);
        let slot = match caller_of(&request) {
            Some(c) if !c.node => Some(crate::api::watch::WatchHub::caller_slot(&self.ctx.watch, &c.name)?),
            _ => None,
        };
        crate::api::watch::watch(self.ctx.clone(), request.into_inner(), forwarded, slot).map(Response::new)
    }

    async fn check_session(
        &self,
        request: Request<pb::CheckSessionRequest>,
    ) -> Reply<pb::CheckSessionResponse> {
        let forwarded = forwarded(&request);
        Ok(Response::new(self.check_one(request.get_ref(), forwarded).await?))
    }

    async fn check_session_batch(
        &self,
        request: Request<pb::CheckSessionBatchRequest>,
    ) -> Reply<pb::CheckSessionBatchResponse> {
        let forwarded = forwarded(&request);
        let checks = &request.get_ref().checks;
        if checks.len() > lim::CHECK_BATCH_LEN_MAX {
            let e = FieldError::new(
                "checks",
                format!("at most {} per batch, got {}", lim::CHECK_BATCH_LEN_MAX, checks.len()),
            );
            return Err(ApiError::from(e).into());
        }
        // Validate everything before doing anything, so a bad entry fails the batch cleanly.
        for (i, c) in checks.iter().enumerate() {
            self.query(c).map_err(|e| match e {
                ApiError::Field(f) => Status::invalid_argument(format!("checks[{i}].{f}")),
                other => other.into(),
            })?;
        }
        let results = futures::future::join_all(checks.iter().map(|c| self.check_one(c, forwarded))).await;
        let results = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::CheckSessionBatchResponse { results }))
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Reply<pb::CreateSessionResponse> {
        let r = request.into_inner();
        let user = user_key(&r.tenant, &r.user_id)?;
        lim::check_id("client_id", &r.client_id, lim::ID_LEN_MAX).map_err(ApiError::from)?;
        let device = match (r.device_id.is_empty(), r.jkt.is_empty()) {
            (true, true) => None,
            (false, false) => {
                lim::check_id("device_id", &r.device_id, lim::ID_LEN_MAX).map_err(ApiError::from)?;
                lim::check_jkt("jkt", &r.jkt).map_err(ApiError::from)?;
                Some(DeviceBinding { device_id: r.device_id.clone(), jkt: r.jkt.clone() })
            }
            _ => {
                return Err(ApiError::from(FieldError::new(
                    "device_id",
                    "device_id and jkt must be given together",
                ))
                .into())
            }
        };
        let aal = lim::check_aal("aal", r.aal).map_err(ApiError::from)?;
        let amr = amr(&r.amr)?;
        if r.ttl_ms == 0 || r.ttl_ms > lim::TTL_MS_MAX {
            let e = FieldError::new(
                "ttl_ms",
                format!("must be between 1 and {} ms, got {}", lim::TTL_MS_MAX, r.ttl_ms),
            );
            return Err(ApiError::from(e).into());
        }
        if r.idle_timeout_ms > lim::TTL_MS_MAX {
            let e = FieldError::new("idle_timeout_ms", format!("must be at most {} ms", lim::TTL_MS_MAX));
            return Err(ApiError::from(e).into());
        }
        let shard = user.shard(self.ctx.n_shards);
        let parent = if r.parent_session_id.is_empty() {
            None
        } else {
            let p = session_id("parent_session_id", &r.parent_session_id)?;
            if p.shard != shard {
                // The parent must belong to the same user, hence to the same shard.
                return Err(ApiError::from(Refusal::ParentNotFound).into());
            }
            Some(p)
        };
        let metadata = r.metadata.unwrap_or_default();
        lim::check_text("metadata.ip", &metadata.ip, lim::IP_LEN_MAX).map_err(ApiError::from)?;
        lim::check_text("metadata.user_agent", &metadata.user_agent, lim::USER_AGENT_LEN_MAX)
            .map_err(ApiError::from)?;
        lim::check_text("metadata.region", &metadata.region, lim::REGION_LEN_MAX).map_err(ApiError::from)?;

        // Ids and secrets are drawn here, never inside the state machine.
        let session_id = SessionId { shard, nonce: self.ctx.entropy.u128() };
        let refresh = r.with_refresh_token.then(|| RefreshToken {
            session_id,
            generation: 1,
            secret: self.ctx.entropy.u128(),
        });
        let command = Command::CreateSession(Box::new(CreateSession {
            session_id,
            user,
            client_id: r.client_id,
            device,
            aal,
            amr,
            ttl_ms: r.ttl_ms,
            idle_timeout_ms: r.idle_timeout_ms,
            parent,
            refresh_secret_sha256: refresh.map(|t| sha256(t.secret)),
            metadata: SessionMetadata {
                ip: metadata.ip,
                user_agent: metadata.user_agent,
                region: metadata.region,
            },
        }));
        match self.ctx.write(shard, command).await?.outcome {
            Outcome::Created { session_id, created_at_ms, expires_at_ms, evicted } => {
                Ok(Response::new(pb::CreateSessionResponse {
                    session_id: session_id.to_string(),
                    refresh_token: refresh.map(|t| t.to_string()).unwrap_or_default(),
                    created_at_ms,
                    expires_at_ms,
                    evicted_session_ids: ids(&evicted),
                }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn touch_session(
        &self,
        request: Request<pb::TouchSessionRequest>,
    ) -> Reply<pb::TouchSessionResponse> {
        let id = self.owned_shard(session_id("session_id", &request.get_ref().session_id)?)?;
        if self.read_here(id.shard, false, forwarded(&request)).await?.is_none() {
            let r = request.into_inner();
            return Ok(Response::new(
                self.ctx.forward(id.shard, r, |mut c, req| async move { c.touch_session(req).await }).await?,
            ));
        }
        let q = CheckQuery { session_id: id, jkt: None, required_aal: 0 };
        let answer = self.ctx.check(q).await?;
        let session = answer.user.as_ref().and_then(|u| u.sessions.get(&id));
        let Some(session) = session else { return Err(ApiError::from(Refusal::SessionNotFound).into()) };
        if matches!(answer.verdict, Verdict::Revoked(_) | Verdict::Expired) {
            return Err(ApiError::from(Refusal::SessionNotActive).into());
        }
        // Coalesce: skip the write if the last touch is recent. The window is capped at a quarter
        // of the idle timeout so an active session can never idle out between written touches.
        let window = self.ctx.touch_coalesce_ms.min(session.idle_timeout_ms / 4);
        let now = self.ctx.clock.now_ms();
        if session.idle_timeout_ms == 0 || now < session.last_seen_ms.saturating_add(window) {
            let idle_expires_at_ms = if session.idle_timeout_ms == 0 {
                0
            } else {
                session.last_seen_ms.saturating_add(session.idle_timeout_ms)
            };
            return Ok(Response::new(pb::TouchSessionResponse { idle_expires_at_ms, written: false }));
        }
        match self.ctx.write(id.shard, Command::Touch { session_id: id }).await?.outcome {
            Outcome::Touched { idle_expires_at_ms } => {
                Ok(Response::new(pb::TouchSessionResponse { idle_expires_at_ms, written: true }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn step_up_session(
        &self,
        request: Request<pb::StepUpSessionRequest>,
    ) -> Reply<pb::StepUpSessionResponse> {
        let r = request.into_inner();
        let id = self.owned_shard(session_id("session_id", &r.session_id)?)?;
        let aal = lim::check_aal("aal", r.aal).map_err(ApiError::from)?;
        let amr = amr(&r.amr)?;
        match self.ctx.write(id.shard, Command::StepUp { session_id: id, aal, amr }).await?.outcome {
            Outcome::SteppedUp { aal } => {
                Ok(Response::new(pb::StepUpSessionResponse { aal: u32::from(aal) }))
            }
            other => Err(unexpected(other).into()),
        }
    }

    async fn rotate_refresh_token(
        &self,
        request: Request<pb::RotateRefreshTokenRequest>,
    ) -> Reply<pb::RotateRefreshTokenResponse> {
        let raw = &request.get_ref().refresh_token;
        if raw.is_empty() {
            return Err(ApiError::from(FieldError::new("refresh_token", "must not be empty")).into());
        }
        let token: RefreshToken = raw.parse().map_err(|e: cascade_protocol::ids::IdError| {
            ApiError::from(FieldError::new("refresh_token", e.to_string()))
        })?;
        let id = self.owned_shard(token.session_id)?;
        let next = RefreshToken {
            session_id: id,
            generation: token.generation.wrapping_add(1),
            secret: self.ctx.entropy.u128(),
        };
        let command = Command::RotateRefresh {
            session_id: id,
            generation: token.generation,
            secret_sha256: sha256(token.secret),
            new_secret_sha256: sha256(next.secret),
        };
        match self.ctx.write(id.shard, command).await?.outcome {
            Outcome::Rotated { generation } => Ok(Response::new(pb::RotateRefreshTokenResponse {
                refresh_token: RefreshToken { generation, ..next }.to_string(),
                generation,
                reuse_detected: false,
                revoked_session_ids: vec![],
            })),
            Outcome::ReuseDetected { revoked } => Ok(Response::new(pb::RotateRefreshTokenResponse {
                refresh_token: String::new(),
                generation: 0,
                reuse_detected: true,
                revoked_session_ids: ids(&revoked),
            })),
            other => Err(unexpected(other).into()),
        }
    }

    async fn list_user_sessions(
        &self,
        request: Request<pb::ListUserSessionsRequest>,
    ) -> Reply<pb::ListUserSessionsResponse> {
        let key = user_key(&request.get_ref().tenant, &request.get_ref().user_id)?;
        let shard = key.shard(self.ctx.n_shards);
        if self.read_here(shard, false, forwarded(&request)).await?.is_none() {
            let r = request.into_inner();
            return Ok(Response::new(
                self.ctx
                    .forward(shard, r, |mut c, req| async move { c.list_user_sessions(req).await })
                    .await?,
            ));
        }
        let Some(user) = self.ctx.user(&key).await? else {
            return Err(ApiError::from(Refusal::UserNotFound).into());
        };
        let meta = self.ctx.meta(shard);
        let now = self.ctx.clock.now_ms().max(meta.clock_ms);
        let sessions = user
            .sessions
            .values()
            .map(|s| {
                let (status, reason) = verdict_to_pb(verdict(&meta, &user, s, s.jkt.as_deref(), 0, now));
                pb::SessionInfo {
                    session_id: s.id.to_string(),
                    client_id: s.client_id.clone(),
                    device_id: s.device_id.clone().unwrap_or_default(),
                    aal: u32::from(s.aal),
                    created_at_ms: s.created_at_ms,
                    expires_at_ms: s.expires_at_ms,
                    last_seen_ms: s.last_seen_ms,
                    parent_session_id: s.parent.map(|p| p.to_string()).unwrap_or_default(),
                    status: status as i32,
                    reason: reason as i32,
                    refresh_generation: s.refresh.as_ref().map_or(0, |f| f.generation),
                }
            })
            .collect();
        let devices = user
            .devices
            .values()
            .map(|d| pb::DeviceInfo {
                device_id: d.device_id.clone(),
                jkt: d.jkt.clone(),
                first_seen_ms: d.first_seen_ms,
                watermark_ms: d.watermark_ms,
            })
            .collect();
        Ok(Response::new(pb::ListUserSessionsResponse {
            sessions,
            devices,
            user_watermark_ms: user.watermark_ms,
        }))
    }

    async fn revoke_session(&self, request: Request<pb::RevokeSessionRequest>) -> Reply<pb::RevokeResponse> {
        let caller = caller_of(&request);
        let r = request.into_inner();
        let id = self.owned_shard(session_id("session_id", &r.session_id)?)?;
        let revocation = revocation(r.revocation, caller.as_ref())?;
        Ok(Response::new(self.revoke(id.shard, Command::RevokeSession { session_id: id, revocation }).await?))
    }

    async fn revoke_family(&self, request: Request<pb::RevokeFamilyRequest>) -> Reply<pb::RevokeResponse> {
        let caller = caller_of(&request);
        let r = request.into_inner();
        let id = self.owned_shard(session_id("session_id", &r.session_id)?)?;
        let revocation = revocation(r.revocation, caller.as_ref())?;
        Ok(Response::new(self.revoke(id.shard, Command::RevokeFamily { session_id: id, revocation }).await?))
    }

    async fn revoke_device(&self, request: Request<pb::RevokeDeviceRequest>) -> Reply<pb::RevokeResponse> {
        let caller = caller_of(&request);
        let r = request.into_inner();
        let user = user_key(&r.tenant, &r.user_id)?;
        lim::check_id("device_id", &r.device_id, lim::ID_LEN_MAX).map_err(ApiError::from)?;
        let revocation = revocation(r.revocation, caller.as_ref())?;
        let shard = user.shard(self.ctx.n_shards);
        let command = Command::RevokeDevice { user, device_id: r.device_id, revocation };
        Ok(Response::new(self.revoke(shard, command).await?))
    }

    async fn revoke_user(&self, request: Request<pb::RevokeUserRequest>) -> Reply<pb::RevokeResponse> {
        let caller = caller_of(&request);
        let r = request.into_inner();
        let user = user_key(&r.tenant, &r.user_id)?;
        let revocation = revocation(r.revocation, caller.as_ref())?;
        let shard = user.shard(self.ctx.n_shards);
        Ok(Response::new(self.revoke(shard, Command::RevokeUser { user, revocation }).await?))
    }

    async fn set_watermark(
        &self,
        request: Request<pb::SetWatermarkRequest>,
    ) -> Reply<pb::SetWatermarkResponse> {
        let caller = caller_of(&request);
        let r = request.into_inner();
        let revocation = revocation(r.revocation, caller.as_ref())?;
        lim::check_id("tenant", &r.tenant, lim::TENANT_LEN_MAX).map_err(ApiError::from)?;
        let scope = match pb::WatermarkScope::try_from(r.scope) {
            Ok(pb::WatermarkScope::Tenant) => WatermarkScope::Tenant { tenant: r.tenant },
            Ok(pb::WatermarkScope::Client) => {
                lim::check_id("client_id", &r.client_id, lim::ID_LEN_MAX).map_err(ApiError::from)?;
                WatermarkScope::Client { tenant: r.tenant, client_id: r.client_id }
            }
            Ok(pb::WatermarkScope::User) => WatermarkScope::User { user: user_key(&r.tenant, &r.user_id)? },
            Ok(pb::WatermarkScope::Device) => {
                lim::check_id("device_id", &r.device_id, lim::ID_LEN_MAX).map_err(ApiError::from)?;
                WatermarkScope::Device { user: user_key(&r.tenant, &r.user_id)?, device_id: r.device_id }
            }
            _ => {
                let e = FieldError::new("scope", "must be TENANT, CLIENT, USER or DEVICE");
                return Err(ApiError::from(e).into());
            }
        };
        // "Now" (0) is resolved by each shard's state machine at apply time, as the later of the
        // stamp and the shard's clock: every session the shard created before the watermark is
        // covered even when it was stamped by a leader whose clock ran ahead of this node's
        // (found by the simulator: a user watermark resolved by the receiving node's clock left
        // the user's recent sessions valid).
        let now = self.ctx.clock.now_ms();
        let command =
            Command::SetWatermark { scope: scope.clone(), not_before_ms: r.not_before_ms, revocation };
        let shards: Vec<u16> = match &scope {
            WatermarkScope::User { user } | WatermarkScope::Device { user, .. } => {
                vec![user.shard(self.ctx.n_shards)]
            }
            // Tenant and client watermarks apply to users on every shard: one O(1) command each.
            WatermarkScope::Tenant { .. } | WatermarkScope::Client { .. } => (0..self.ctx.n_shards).collect(),
        };
        let envelope = cascade_protocol::command::Envelope::new(now, command);
        let results =
            futures::future::join_all(shards.iter().map(|s| self.ctx.write_envelope(*s, envelope.clone())))
                .await;
        let total = results.len();
        let mut watermark_ms = 0;
        let mut applied = 0;
        let mut failure = None;
        for result in results {
            match result.map(|a| a.outcome) {
                Ok(Outcome::WatermarkSet { watermark_ms: w }) => {
                    applied += 1;
                    watermark_ms = watermark_ms.max(w);
                }
                Ok(other) => return Err(unexpected(other).into()),
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            if total == 1 {
                return Err(e.into());
            }
            return Err(ApiError::Partial { applied, total, reason: e.to_string() }.into());
        }
        Ok(Response::new(pb::SetWatermarkResponse { watermark_ms, shards: applied as u32 }))
    }

    async fn node_status(&self, _request: Request<pb::NodeStatusRequest>) -> Reply<pb::NodeStatusResponse> {
        Ok(Response::new(self.ctx.local_status().await?))
    }

    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Reply<pb::MembershipChangeResponse> {
        let r = request.into_inner();
        if r.node_id == 0 {
            return Err(ApiError::from(FieldError::new("node_id", "must not be 0")).into());
        }
        lim::check_id("addr", &r.addr, 256).map_err(ApiError::from)?;
        lim::check_id("region", &r.region, lim::REGION_LEN_MAX).map_err(ApiError::from)?;
        let node = cascade_raft::typ::CascadeNode { addr: r.addr, region: r.region };
        Ok(Response::new(self.ctx.change_nodes(Some((r.node_id, node)), None).await?))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Reply<pb::MembershipChangeResponse> {
        let r = request.into_inner();
        Ok(Response::new(self.ctx.change_nodes(None, Some(r.node_id)).await?))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Reply<pb::TransferLeaderResponse> {
        let r = request.into_inner();
        let shard = u16::try_from(r.shard)
            .ok()
            .filter(|s| *s < self.ctx.n_shards)
            .ok_or_else(|| FieldError::new("shard", format!("must be below {}", self.ctx.n_shards)))
            .map_err(ApiError::from)?;
        let (leader, took_ms) = self.ctx.transfer_leader(shard, r.to_node).await?;
        Ok(Response::new(pb::TransferLeaderResponse { leader, took_ms }))
    }

    async fn cut_links(&self, request: Request<pb::CutLinksRequest>) -> Reply<pb::CutLinksResponse> {
        self.fault_injection_enabled()?;
        let r = request.into_inner();
        if r.addrs.len() > 64 {
            return Err(ApiError::from(FieldError::new("addrs", "at most 64 addresses")).into());
        }
        let peers = &self.ctx.host.peers;
        if r.heal {
            peers.heal();
        }
        for addr in &r.addrs {
            lim::check_id("addrs", addr, 256).map_err(ApiError::from)?;
            peers.cut(addr);
        }
        tracing::warn!(cut = ?peers.cut_links(), "links changed by fault injection");
        Ok(Response::new(pb::CutLinksResponse { cut: peers.cut_links() }))
    }

    async fn set_clock_offset(
        &self,
        request: Request<pb::SetClockOffsetRequest>,
    ) -> Reply<pb::SetClockOffsetResponse> {
        self.fault_injection_enabled()?;
        let offset_ms = request.into_inner().offset_ms;
        if offset_ms.unsigned_abs() > CLOCK_OFFSET_MS_MAX {
            return Err(ApiError::from(FieldError::new(
                "offset_ms",
                format!("at most {CLOCK_OFFSET_MS_MAX} ms either way"),
            ))
            .into());
        }
        self.ctx.clock_offset_ms.store(offset_ms, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(offset_ms, "clock offset changed by fault injection");
        Ok(Response::new(pb::SetClockOffsetResponse { offset_ms, now_ms: self.ctx.clock.now_ms() }))
    }

    async fn crash(&self, _request: Request<pb::CrashRequest>) -> Reply<pb::CrashResponse> {
        self.fault_injection_enabled()?;
        let node_id = self.ctx.node_id;
        tracing::error!(node_id, "exiting now at a drill's request (no clean shutdown)");
        tokio::spawn(async {
            tokio::time::sleep(CRASH_DELAY).await;
            // Like kill -9: no shutdown, no flush beyond what the WAL already synced.
            std::process::exit(CRASH_EXIT_CODE);
        });
        Ok(Response::new(pb::CrashResponse { node_id }))
    }
}

/// How long a node that was asked to crash waits for its answer to leave before it exits.
const CRASH_DELAY: std::time::Duration = std::time::Duration::from_millis(100);
/// The exit code of a drill crash, as a shell reports a SIGKILL.
pub const CRASH_EXIT_CODE: i32 = 137;

/// The largest clock skew `SetClockOffset` accepts: one day.
pub const CLOCK_OFFSET_MS_MAX: u64 = 86_400_000;

impl CascadeService {
    /// Refuse drill hooks unless the node was started with fault injection enabled.
    #[allow(clippy::result_large_err)]
    fn fault_injection_enabled(&self) -> Result<(), Status> {
        if self.ctx.fault_injection {
            Ok(())
        } else {
            Err(Status::failed_precondition(
                "fault injection is disabled on this node; start it with --enable-fault-injection",
            ))
        }
    }
}
