//! The HTTP API, served next to gRPC on its own port (`http_listen`) for gateways that expect
//! standard endpoints (DESIGN §3):
//!
//! - `POST /oauth2/introspect` (RFC 7662) and `POST /oauth2/revoke` (RFC 7009), for session ids;
//! - `/forward-auth`, for nginx `auth_request`, Traefik `forwardAuth` and Caddy `forward_auth`:
//!   exactly 200 (with identity headers), 401 or 403, or 503 when the cluster cannot answer
//!   within the revocation bound (the gateway then fails closed);
//! - `/metrics` (Prometheus text), `/healthz` (the process serves), `/readyz` (every local replica
//!   can answer checks within the revocation bound).
//!
//! Every handler goes through the same code as gRPC ([`CascadeService`]): validation, P2
//! freshness, forwarding to leaders. Nothing here decides whether a session is valid.

pub mod forward_auth;
pub mod oauth;
pub mod tls;

use crate::api::cascade::CascadeService;
use crate::api::ctx::NodeCtx;
use crate::auth::{self, Caller, Need, Policy};
use crate::config::DpopConfig;
use crate::metrics::{escape, Api, Metrics, MetricsLayer};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;

/// Largest request body accepted (the OAuth forms are a token and a hint).
pub const BODY_BYTES_MAX: usize = 8 << 10;
/// Longest token looked at; longer ones are not session ids and are answered as unknown.
pub const TOKEN_LEN_MAX: usize = 512;

/// What the HTTP handlers share.
pub struct HttpState {
    pub svc: CascadeService,
    pub metrics: Arc<Metrics>,
    pub dpop: DpopConfig,
    pub replay: cascade_dpop::ReplayCache,
    /// `None`: authentication is off.
    pub auth: Option<Arc<Policy>>,
}

impl HttpState {
    pub fn new(
        ctx: Arc<NodeCtx>,
        metrics: Arc<Metrics>,
        dpop: DpopConfig,
        auth: Option<Arc<Policy>>,
    ) -> HttpState {
        let replay = cascade_dpop::ReplayCache::new(dpop.replay_cache_max, dpop.iat_window_ms);
        HttpState { svc: CascadeService { ctx }, metrics, dpop, replay, auth }
    }

    fn ctx(&self) -> &NodeCtx {
        &self.svc.ctx
    }

    /// The caller of a request to `what`, which needs `need`. The key comes in
    /// `X-Cascade-Api-Key`, or (where `Authorization` is not the user's) `Authorization: Bearer`.
    fn caller(
        &self,
        headers: &HeaderMap,
        need: Need,
        what: &str,
        bearer_is_caller: bool,
    ) -> Result<Option<Caller>, auth::Refusal> {
        let Some(policy) = &self.auth else { return Ok(None) };
        let key = headers.get(auth::API_KEY_HEADER).and_then(|v| v.to_str().ok()).or_else(|| {
            if bearer_is_caller {
                auth::bearer(headers)
            } else {
                None
            }
        });
        policy.authorize("http", need, what, key, None)
    }
}

/// The name metrics give a request path: a route, or `other`.
pub fn route_name(path: &str) -> &'static str {
    match path {
        "/oauth2/introspect" => "/oauth2/introspect",
        "/oauth2/revoke" => "/oauth2/revoke",
        "/forward-auth" => "/forward-auth",
        "/metrics" => "/metrics",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        _ => "other",
    }
}

pub fn router(state: Arc<HttpState>) -> Router {
    let metrics = MetricsLayer { metrics: state.metrics.clone(), api: Api::Http(route_name) };
    Router::new()
        .route("/oauth2/introspect", post(oauth::introspect))
        .route("/oauth2/revoke", post(oauth::revoke))
        .route("/forward-auth", any(forward_auth::forward_auth))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(metrics)
        .with_state(state)
}

/// Serve HTTP (HTTPS with `tls`) on `listener` until `shutdown` resolves, then finish the
/// requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<HttpState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await,
        Some(acceptor) => {
            let listener = tls::TlsListener::new(listener, acceptor)?;
            axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
        }
    }
}

/// `/readyz`: 200 when every shard this node holds a replica of can answer checks here within
/// the revocation bound; 503 naming the shards that cannot.
async fn ready(State(state): State<Arc<HttpState>>) -> Response {
    let ctx = state.ctx();
    let not_ready: Vec<u16> =
        (0..ctx.n_shards).filter(|s| ctx.is_replica(*s) && ctx.staleness_ms(*s).is_none()).collect();
    if not_ready.is_empty() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let body = format!(
        "not ready: {} of {} shards cannot prove freshness within {} ms here: {:?}\n",
        not_ready.len(),
        ctx.n_shards,
        ctx.host.freshness.bound_ms,
        not_ready
    );
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

/// `/metrics`: request metrics, then the state of every shard replica on this node.
async fn metrics_text(State(state): State<Arc<HttpState>>) -> Response {
    let mut out = String::with_capacity(16 << 10);
    state.metrics.render(&mut out);
    let ctx = state.ctx();
    let _ = writeln!(out, "# HELP cascade_watch_subscribers WatchRevocations streams this node serves.");
    let _ = writeln!(out, "# TYPE cascade_watch_subscribers gauge");
    let _ = writeln!(out, "cascade_watch_subscribers {}", ctx.watch.subscribers());
    let (calls, messages) = ctx.host.peers.appends.stats();
    let _ = writeln!(out, "# HELP cascade_raft_append_batches_total AppendEntriesBatch calls sent to peers.");
    let _ = writeln!(out, "# TYPE cascade_raft_append_batches_total counter");
    let _ = writeln!(out, "cascade_raft_append_batches_total {calls}");
    let _ = writeln!(
        out,
        "# HELP cascade_raft_append_batched_total Append-entries sent to peers in those calls."
    );
    let _ = writeln!(out, "# TYPE cascade_raft_append_batched_total counter");
    let _ = writeln!(out, "cascade_raft_append_batched_total {messages}");
    match ctx.local_status().await {
        Ok(status) => render_shards(&status, &mut out),
        Err(e) => {
            let _ = writeln!(out, "# shard state unavailable: {}", escape(&e.to_string()));
        }
    }
    let local: Vec<u32> = (0..ctx.n_shards).filter(|s| ctx.is_replica(*s)).map(u32::from).collect();
    if !local.is_empty() {
        match crate::api::jobs::list(ctx, cascade_protocol::pb::ListRevokeJobsRequest { shards: local }).await
        {
            Ok(jobs) => render_jobs(&jobs.jobs, &mut out),
            Err(e) => {
                let _ = writeln!(out, "# jobs unavailable: {}", escape(&e.to_string()));
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

/// Mass revocation jobs as this node's replicas know them (each node reports its shards' parts).
fn render_jobs(jobs: &[cascade_protocol::pb::RevokeJobInfo], out: &mut String) {
    type JobGauge = (&'static str, &'static str, fn(&cascade_protocol::pb::RevokeJobInfo) -> u64);
    let gauges: [JobGauge; 4] = [
        (
            "cascade_job_sessions",
            "Sessions a job revoked (counted, for a dry run) on this node's shards.",
            |j| j.sessions,
        ),
        ("cascade_job_users_scanned", "Users a job scanned on this node's shards.", |j| j.users_scanned),
        ("cascade_job_shards_done", "This node's shards on which the job is done.", |j| {
            u64::from(j.shards_done)
        }),
        ("cascade_job_shards", "This node's shards the job runs on.", |j| u64::from(j.shards_total)),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for j in jobs {
            let _ = writeln!(
                out,
                "{name}{{job=\"{}\",state=\"{}\"}} {}",
                escape(&j.job_id),
                escape(&j.state),
                value(j)
            );
        }
    }
}

/// A per-shard gauge: name, help text, and its value for one replica.
type Gauge = (&'static str, &'static str, fn(&cascade_protocol::pb::ShardStatus) -> f64);

fn render_shards(status: &cascade_protocol::pb::NodeStatusResponse, out: &mut String) {
    let gauges: [Gauge; 7] = [
        ("cascade_shard_leader", "Node id of the shard's leader as this replica knows it (0: none).", |s| {
            s.leader as f64
        }),
        ("cascade_shard_term", "Raft term of this replica.", |s| s.term as f64),
        ("cascade_shard_last_log_index", "Last Raft log index on this replica.", |s| s.last_log_index as f64),
        ("cascade_shard_applied_index", "Last log index applied to this replica's state machine.", |s| {
            s.applied_index as f64
        }),
        ("cascade_shard_fresh", "1 if this replica can answer checks within the revocation bound.", |s| {
            f64::from(u8::from(s.fresh))
        }),
        (
            "cascade_shard_staleness_seconds",
            "How stale this replica's answers could be (meaningful when fresh).",
            |s| s.staleness_ms as f64 / 1000.0,
        ),
        ("cascade_shard_live_user_actors", "User actors in memory for the shard.", |s| {
            s.live_user_actors as f64
        }),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for s in &status.shards {
            let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", s.shard, value(s));
        }
    }
    let _ = writeln!(out, "# HELP cascade_shard_role 1 for this replica's Raft role.");
    let _ = writeln!(out, "# TYPE cascade_shard_role gauge");
    for s in &status.shards {
        let _ = writeln!(
            out,
            "cascade_shard_role{{shard=\"{}\",role=\"{}\"}} 1",
            s.shard,
            escape(&s.role.to_lowercase())
        );
    }
    let _ = writeln!(
        out,
        "# HELP cascade_shard_replication_lag_entries Leader only: log entries each replica is behind."
    );
    let _ = writeln!(out, "# TYPE cascade_shard_replication_lag_entries gauge");
    for s in &status.shards {
        for r in &s.replication {
            let _ = writeln!(
                out,
                "cascade_shard_replication_lag_entries{{shard=\"{}\",replica=\"{}\"}} {}",
                s.shard, r.node_id, r.lag
            );
        }
    }
}

/// A JSON body with the headers every OAuth answer carries (RFC 6749 §5.1: no caching).
fn oauth_json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store"), (header::PRAGMA, "no-cache")], axum::Json(body))
        .into_response()
}

/// The answer to a caller the OAuth endpoints refuse: 401 `invalid_client` (RFC 6749 §5.2) or
/// 403 `insufficient_scope` (RFC 6750 §3.1).
fn oauth_refusal(refusal: &auth::Refusal) -> Response {
    match refusal {
        auth::Refusal::Unauthenticated(m) => {
            let mut r = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", m.clone());
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            r
        }
        auth::Refusal::Denied(m) => oauth_error(StatusCode::FORBIDDEN, "insufficient_scope", m.clone()),
        auth::Refusal::RateLimited(m) => {
            let mut r = oauth_error(StatusCode::TOO_MANY_REQUESTS, "slow_down", m.clone());
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
    }
}

/// An OAuth error answer (RFC 6749 §5.2 shape).
fn oauth_error(status: StatusCode, error: &str, description: impl Into<String>) -> Response {
    let mut r =
        oauth_json(status, serde_json::json!({ "error": error, "error_description": description.into() }));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

/// Whether a gRPC status means "the cluster could not answer now" (retry later; fail closed),
/// as opposed to a definite answer about the token.
fn unavailable(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    )
}
