//! RFC 7662 token introspection and RFC 7009 token revocation, for session ids (the opaque
//! tokens Cascade issues). Refresh tokens are revocable here (their whole family goes); they are
//! not introspectable (their secret is checked only by rotation), and answer `active: false`.

use super::{oauth_error, oauth_json, oauth_refusal, unavailable, HttpState, TOKEN_LEN_MAX};
use crate::auth::{Caller, Need, Role};
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cascade_protocol::ids::{RefreshToken, SessionId};
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_server::Cascade;
use serde::Deserialize;
use std::sync::Arc;

/// The form both endpoints take.
#[derive(Deserialize)]
pub struct TokenForm {
    token: Option<String>,
    /// `access_token` or `refresh_token`; a hint only (RFC 7009 §2.1), both kinds are tried.
    #[allow(dead_code)]
    token_type_hint: Option<String>,
}

/// The token of a well-formed form, or the error answer (RFC 6749 §5.2 `invalid_request`).
fn token(form: Result<Form<TokenForm>, FormRejection>) -> Result<String, Box<Response>> {
    let Form(form) = form.map_err(|e| {
        // Too large stays 413; anything else is the client's malformed request.
        let status =
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE { e.status() } else { StatusCode::BAD_REQUEST };
        Box::new(oauth_error(status, "invalid_request", format!("bad form body: {}", e.body_text())))
    })?;
    match form.token {
        Some(t) if !t.is_empty() => Ok(t),
        _ => Err(Box::new(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "form field token is missing or empty",
        ))),
    }
}

/// `message` as a request made by `caller` (for the actor of a revocation).
fn as_caller<T>(caller: Option<&Caller>, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(c) = caller {
        r.extensions_mut().insert(c.clone());
    }
    r
}

fn inactive() -> Response {
    oauth_json(StatusCode::OK, serde_json::json!({ "active": false }))
}

/// The RFC 7662 answer for a check of session `sid`.
fn introspection(sid: &str, r: &pb::CheckSessionResponse) -> Response {
    let mut body = serde_json::json!({
        "active": true,
        "token_type": "session",
        "sid": sid,
        "sub": r.user_id,
        "tenant": r.tenant,
        "client_id": r.client_id,
        "iat": r.created_at_ms / 1000,
        "exp": r.expires_at_ms / 1000,
        "acr": format!("aal{}", r.aal),
        "aal": r.aal,
    });
    if !r.jkt.is_empty() {
        body["cnf"] = serde_json::json!({ "jkt": r.jkt });
        body["device_id"] = serde_json::Value::String(r.device_id.clone());
    }
    oauth_json(StatusCode::OK, body)
}

/// `POST /oauth2/introspect`: `{"active": false}` and nothing else unless the session is live.
/// A device-bound session is active here (no proof is presented to introspection): `cnf.jkt`
/// tells the caller which key the presenter must prove (RFC 9449 §6.2).
pub async fn introspect(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    if let Err(refusal) = state.caller(&headers, Need::Any(&[Role::Gateway]), "introspection", true) {
        return oauth_refusal(&refusal);
    }
    let token = match token(form) {
        Ok(t) => t,
        Err(answer) => return *answer,
    };
    if token.len() > TOKEN_LEN_MAX || token.parse::<SessionId>().is_err() {
        return inactive();
    }
    let request = pb::CheckSessionRequest { session_id: token.clone(), ..Default::default() };
    match state.svc.check_session(tonic::Request::new(request)).await {
        Ok(r) => {
            let r = r.into_inner();
            match pb::CheckStatus::try_from(r.status) {
                Ok(pb::CheckStatus::Valid | pb::CheckStatus::DeviceMismatch) => introspection(&token, &r),
                _ => inactive(),
            }
        }
        Err(status) if unavailable(&status) => {
            oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", status.message())
        }
        Err(_) => inactive(),
    }
}

/// `POST /oauth2/revoke`: revokes a session (and its descendants) given its id, or a refresh
/// token's family and session. 200 for unknown and malformed tokens too (RFC 7009 §2.2); 503
/// when the revocation could not be made durable (the caller must retry: the token may live).
pub async fn revoke(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    let caller = match state.caller(&headers, Need::Any(&[Role::Idp, Role::Responder]), "revocation", true) {
        Ok(c) => c,
        Err(refusal) => return oauth_refusal(&refusal),
    };
    let token = match token(form) {
        Ok(t) => t,
        Err(answer) => return *answer,
    };
    let revocation = Some(pb::Revocation {
        reason: pb::ReasonCode::Logout as i32,
        text: "RFC 7009 revocation request".to_owned(),
        actor: "oauth2/revoke".to_owned(),
    });
    let outcome = if token.len() > TOKEN_LEN_MAX {
        return StatusCode::OK.into_response();
    } else if token.parse::<SessionId>().is_ok() {
        let r = pb::RevokeSessionRequest { session_id: token, revocation };
        state.svc.revoke_session(as_caller(caller.as_ref(), r)).await
    } else if let Ok(rt) = token.parse::<RefreshToken>() {
        let r = pb::RevokeFamilyRequest { session_id: rt.session_id.to_string(), revocation };
        state.svc.revoke_family(as_caller(caller.as_ref(), r)).await
    } else {
        return StatusCode::OK.into_response();
    };
    match outcome {
        Err(status) if unavailable(&status) => {
            oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", status.message())
        }
        // Revoked now, revoked before, or never known: the same answer.
        _ => StatusCode::OK.into_response(),
    }
}
