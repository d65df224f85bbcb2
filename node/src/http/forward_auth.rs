//! `/forward-auth`: the answer a gateway asks for before letting a request through (nginx
//! `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth`).
//!
//! The request to check is described by the headers the gateway passes on:
//! - `Authorization: Bearer <session id>` or `Authorization: DPoP <session id>` with a `DPoP`
//!   proof (RFC 9449), checked against `X-Forwarded-Method`, `X-Forwarded-Proto`,
//!   `X-Forwarded-Host` and `X-Forwarded-Uri` (the names Traefik and Caddy use; nginx sets them
//!   with `proxy_set_header`);
//! - `X-Cascade-Jkt`: a key thumbprint the gateway verified itself, read only when
//!   `dpop.trust_jkt_header` is set (the gateway must then overwrite it on every request);
//! - `X-Cascade-Required-Aal`: 1-3, the assurance level the route needs.
//!
//! Answers: 200 with `X-Cascade-User`, `-Tenant`, `-Client`, `-Session`, `-Aal` (and `-Device`
//! when bound); 401 with `WWW-Authenticate` for a missing, unknown, revoked or expired session
//! or a bad proof; 403 for a device mismatch or a step-up; 503 when the cluster cannot answer
//! within the revocation bound (a gateway turns it into an error: it fails closed). Every
//! refusal names its reason in `X-Cascade-Error`.

use super::{unavailable, HttpState, TOKEN_LEN_MAX};
use crate::auth::{self, Need, Role};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cascade_protocol::ids::SessionId;
use cascade_protocol::limits as lim;
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_server::Cascade;
use std::sync::Arc;

/// A refusal, before or after asking the cluster.
struct Refusal {
    status: StatusCode,
    /// Metrics label.
    outcome: &'static str,
    /// `WWW-Authenticate` value, for 401 and step-up answers.
    challenge: Option<String>,
    reason: String,
}

impl Refusal {
    fn invalid_token(dpop: bool, reason: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            outcome: "invalid_token",
            challenge: Some(challenge(dpop, "invalid_token")),
            reason: reason.into(),
        }
    }

    fn invalid_proof(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            outcome: "invalid_dpop_proof",
            challenge: Some(challenge(true, "invalid_dpop_proof")),
            reason: reason.into(),
        }
    }

    fn bad_gateway_request(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            outcome: "bad_request",
            challenge: None,
            reason: reason.into(),
        }
    }

    fn into_response(self) -> Response {
        let mut r = self.status.into_response();
        let h = r.headers_mut();
        if let Some(c) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            h.insert(axum::http::header::WWW_AUTHENTICATE, c);
        }
        let reason: String =
            self.reason.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(256).collect();
        if let Ok(v) = HeaderValue::from_str(&reason) {
            h.insert(HeaderName::from_static("x-cascade-error"), v);
        }
        r
    }
}

fn challenge(dpop: bool, error: &str) -> String {
    if dpop {
        format!("DPoP error=\"{error}\", algs=\"EdDSA ES256\"")
    } else {
        format!("Bearer error=\"{error}\"")
    }
}

/// One header's value as text; `Ok(None)` when absent, an error when repeated or not text.
fn single<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, String> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(format!("more than one {name} header"));
    }
    first.to_str().map(Some).map_err(|_| format!("{name} header is not visible ASCII"))
}

/// The session id and whether it came with the DPoP scheme.
fn presented_token(headers: &HeaderMap) -> Result<(String, bool), Refusal> {
    let auth =
        single(headers, "authorization").map_err(|e| Refusal::invalid_token(false, e))?.ok_or_else(|| {
            Refusal {
                status: StatusCode::UNAUTHORIZED,
                outcome: "missing_token",
                challenge: Some("Bearer realm=\"cascade\"".to_owned()),
                reason: "no Authorization header".to_owned(),
            }
        })?;
    let (scheme, token) = auth.split_once(' ').unwrap_or((auth, ""));
    let dpop = if scheme.eq_ignore_ascii_case("bearer") {
        false
    } else if scheme.eq_ignore_ascii_case("dpop") {
        true
    } else {
        return Err(Refusal::invalid_token(false, "Authorization scheme must be Bearer or DPoP"));
    };
    let token = token.trim();
    if token.len() > TOKEN_LEN_MAX || token.parse::<SessionId>().is_err() {
        return Err(Refusal::invalid_token(dpop, "token is not a session id"));
    }
    Ok((token.to_owned(), dpop))
}

/// The URL the gateway's client asked for, from the forwarded headers.
fn forwarded_request(headers: &HeaderMap) -> Result<(String, String), Refusal> {
    let get = |name: &str| -> Result<String, Refusal> {
        match single(headers, name) {
            Ok(Some(v)) if !v.is_empty() => Ok(v.to_owned()),
            Ok(_) => Err(Refusal::bad_gateway_request(format!(
                "DPoP needs the gateway to pass {name} (see docs/gateways.md)"
            ))),
            Err(e) => Err(Refusal::bad_gateway_request(e)),
        }
    };
    let method = get("x-forwarded-method")?;
    let proto = get("x-forwarded-proto")?;
    let host = get("x-forwarded-host")?;
    let uri = get("x-forwarded-uri")?;
    Ok((method, format!("{proto}://{host}{uri}")))
}

/// The key thumbprint the presenter proved, if any.
fn proven_jkt(
    state: &HttpState,
    headers: &HeaderMap,
    token: &str,
    dpop: bool,
) -> Result<Option<String>, Refusal> {
    if dpop {
        let proof = single(headers, "dpop")
            .map_err(Refusal::invalid_proof)?
            .ok_or_else(|| Refusal::invalid_proof("DPoP scheme without a DPoP proof header"))?;
        let (method, url) = forwarded_request(headers)?;
        let policy = cascade_dpop::Policy { iat_window_ms: state.dpop.iat_window_ms, ..Default::default() };
        let request = cascade_dpop::Request { method: &method, url: &url, access_token: Some(token) };
        let now_ms = state.ctx().clock.now_ms();
        let verified = cascade_dpop::verify(proof, &request, now_ms, &policy)
            .map_err(|e| Refusal::invalid_proof(e.to_string()))?;
        state
            .replay
            .check_and_insert(&verified, now_ms)
            .map_err(|e| Refusal::invalid_proof(e.to_string()))?;
        return Ok(Some(verified.jkt));
    }
    if state.dpop.trust_jkt_header {
        if let Some(jkt) = single(headers, "x-cascade-jkt").map_err(Refusal::bad_gateway_request)? {
            lim::check_jkt("X-Cascade-Jkt", jkt).map_err(|e| Refusal::bad_gateway_request(e.to_string()))?;
            return Ok(Some(jkt.to_owned()));
        }
    }
    Ok(None)
}

fn required_aal(headers: &HeaderMap) -> Result<u32, Refusal> {
    match single(headers, "x-cascade-required-aal").map_err(Refusal::bad_gateway_request)? {
        None => Ok(0),
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n @ 1..=3) => Ok(n),
            _ => Err(Refusal::bad_gateway_request(format!(
                "X-Cascade-Required-Aal must be 1, 2 or 3, got {v:?}"
            ))),
        },
    }
}

/// 200 with the session's identity for the upstream.
fn allowed(token: &str, r: &pb::CheckSessionResponse) -> Response {
    let mut response = StatusCode::OK.into_response();
    let h = response.headers_mut();
    let aal = r.aal.to_string();
    let pairs = [
        ("x-cascade-user", r.user_id.as_str()),
        ("x-cascade-tenant", r.tenant.as_str()),
        ("x-cascade-client", r.client_id.as_str()),
        ("x-cascade-session", token),
        ("x-cascade-aal", aal.as_str()),
        ("x-cascade-device", r.device_id.as_str()),
    ];
    for (name, value) in pairs {
        if let (false, Ok(v)) = (value.is_empty(), HeaderValue::from_str(value)) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
    h.insert(axum::http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn decide(state: &HttpState, headers: &HeaderMap) -> Result<Response, Refusal> {
    // The gateway itself first (its key in X-Cascade-Api-Key: Authorization is the user's).
    state.caller(headers, Need::Any(&[Role::Gateway]), "forward-auth", false).map_err(|r| Refusal {
        status: match r {
            auth::Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            auth::Refusal::Denied(_) => StatusCode::FORBIDDEN,
            // Not 401/403: a gateway must not tell its user the token is bad; nginx turns
            // this into 500 (fail closed).
            auth::Refusal::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        },
        outcome: "gateway_refused",
        challenge: None,
        reason: format!("gateway: {}", r.message()),
    })?;
    let (token, dpop) = presented_token(headers)?;
    let jkt = proven_jkt(state, headers, &token, dpop)?;
    let required_aal = required_aal(headers)?;
    let request = pb::CheckSessionRequest {
        session_id: token.clone(),
        jkt: jkt.unwrap_or_default(),
        required_aal,
        linearizable: false,
    };
    let r = match state.svc.check_session(tonic::Request::new(request)).await {
        Ok(r) => r.into_inner(),
        Err(status) if unavailable(&status) => {
            return Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                outcome: "unavailable",
                challenge: None,
                reason: status.message().to_owned(),
            })
        }
        Err(status) => return Err(Refusal::invalid_token(dpop, status.message())),
    };
    let forbidden = |outcome: &'static str, challenge: Option<String>, reason: &str| Refusal {
        status: StatusCode::FORBIDDEN,
        outcome,
        challenge,
        reason: reason.to_owned(),
    };
    match pb::CheckStatus::try_from(r.status) {
        Ok(pb::CheckStatus::Valid) => Ok(allowed(&token, &r)),
        Ok(pb::CheckStatus::DeviceMismatch) => {
            Err(forbidden("device_mismatch", None, "the session is bound to another device key"))
        }
        Ok(pb::CheckStatus::StepUpRequired) => Err(forbidden(
            "step_up_required",
            Some(format!(
                "Bearer error=\"insufficient_user_authentication\", acr_values=\"aal{required_aal}\""
            )),
            "the route needs a higher assurance level",
        )),
        Ok(other) => {
            Err(Refusal::invalid_token(dpop, format!("session is {}", other.as_str_name().to_lowercase())))
        }
        Err(_) => Err(Refusal::invalid_token(dpop, format!("unknown check status {}", r.status))),
    }
}

/// Any method: gateways send the original one.
pub async fn forward_auth(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    match decide(&state, &headers).await {
        Ok(response) => {
            state.metrics.forward_auth("allowed");
            response
        }
        Err(refusal) => {
            state.metrics.forward_auth(refusal.outcome);
            refusal.into_response()
        }
    }
}
