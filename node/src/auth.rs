//! Who may call what (DESIGN §3). Callers present an API key (`authorization: Bearer <key>` in
//! gRPC metadata; `X-Cascade-Api-Key` or `Authorization: Bearer` over HTTP). The node keeps only
//! each key's SHA-256, with a name and roles:
//!
//! | role | may call |
//! |---|---|
//! | `gateway` | checks, `WatchRevocations`, HTTP introspection and forward-auth |
//! | `idp` | checks, session writes (create, touch, step-up, rotate), list, revoke a session or family, HTTP revocation |
//! | `responder` | checks, list, every revocation, watermarks, jobs, audit, HTTP revocation |
//! | `admin` | cluster changes and drills (transfer leader, add/remove node, fault injection) |
//!
//! Any authenticated caller may read `NodeStatus` and reflection; health is open to all.
//! Nodes call each other with the cluster key (`x-cascade-cluster-key`), which may call
//! anything, the Raft transport included. With no key configured at all, authentication is off
//! (a warning is logged at start).
//!
//! Refusals: UNAUTHENTICATED (no key, an unknown key) or PERMISSION_DENIED (the key's roles do
//! not include the operation), counted in `/metrics` as `cascade_auth_refused_total`.

use crate::metrics::Metrics;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

pub use cascade_raft::network::CLUSTER_KEY_HEADER;
/// HTTP header carrying a caller's API key where `Authorization` carries a user's token.
pub const API_KEY_HEADER: &str = "x-cascade-api-key";
/// Printed form of a generated key: this prefix and 32 hex digits (128 random bits).
pub const KEY_PREFIX: &str = "ck_";

/// A caller's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Gateway,
    Idp,
    Responder,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Idp => "idp",
            Role::Responder => "responder",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "gateway" => Ok(Role::Gateway),
            "idp" => Ok(Role::Idp),
            "responder" => Ok(Role::Responder),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}: gateway, idp, responder or admin")),
        }
    }
}

/// One API key as configured: its name, the hex SHA-256 of the key, its roles.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    pub sha256: String,
    pub roles: Vec<Role>,
}

/// The `[auth]` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub api_keys: Vec<ApiKeyConfig>,
    /// The secret every node of the cluster presents to the others (same on every node).
    pub cluster_key: Option<String>,
    /// Requests per second each API key may make to this node (a token bucket holding one
    /// second's worth); beyond it, RESOURCE_EXHAUSTED (HTTP 429). 0: unlimited.
    pub requests_per_s_per_key: u32,
    /// `WatchRevocations` streams each API key may hold open on this node.
    pub watch_streams_per_key_max: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_keys: Vec::new(),
            cluster_key: None,
            requests_per_s_per_key: 0,
            watch_streams_per_key_max: 64,
        }
    }
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || self.cluster_key.is_some()
    }

    /// Refuse settings that cannot work, naming the setting.
    pub fn validate(&self, multi_node: bool) -> anyhow::Result<()> {
        let mut names = std::collections::BTreeSet::new();
        for k in &self.api_keys {
            anyhow::ensure!(
                !k.name.is_empty() && k.name.len() <= 64 && k.name.bytes().all(|b| b.is_ascii_graphic()),
                "auth.api_keys: name {:?} must be 1-64 printable ASCII characters",
                k.name
            );
            anyhow::ensure!(
                names.insert(k.name.as_str()),
                "auth.api_keys: name {:?} is listed twice",
                k.name
            );
            anyhow::ensure!(
                k.sha256.len() == 64 && k.sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                "auth.api_keys[{}].sha256 must be 64 hex digits (`cascade auth new-key` prints it)",
                k.name
            );
            anyhow::ensure!(!k.roles.is_empty(), "auth.api_keys[{}].roles must not be empty", k.name);
        }
        if let Some(c) = &self.cluster_key {
            anyhow::ensure!(c.len() >= 16, "auth.cluster_key must be at least 16 characters");
            anyhow::ensure!(
                c.bytes().all(|b| b.is_ascii_graphic()),
                "auth.cluster_key must be printable ASCII without spaces"
            );
        }
        anyhow::ensure!(
            (1..=100_000).contains(&self.watch_streams_per_key_max),
            "auth.watch_streams_per_key_max must be between 1 and 100000, got {}",
            self.watch_streams_per_key_max
        );
        anyhow::ensure!(
            !(multi_node && !self.api_keys.is_empty() && self.cluster_key.is_none()),
            "auth.cluster_key must be set when auth.api_keys are, on a cluster of several nodes (nodes forward requests to each other)"
        );
        Ok(())
    }
}

/// An authenticated caller, put in the request's extensions for handlers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The key's name, or `node` for the cluster key.
    pub name: String,
    pub roles: Vec<Role>,
    pub node: bool,
}

/// What an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Anyone, unauthenticated too.
    Open,
    /// Any authenticated caller.
    Authenticated,
    /// One of these roles (or a node).
    Any(&'static [Role]),
    /// Nodes only.
    Node,
}

const CHECKERS: &[Role] = &[Role::Gateway, Role::Idp, Role::Responder];
const SESSION_WRITERS: &[Role] = &[Role::Idp];
const READERS: &[Role] = &[Role::Idp, Role::Responder];
const REVOKERS: &[Role] = &[Role::Idp, Role::Responder];
const RESPONDERS: &[Role] = &[Role::Responder];
const GATEWAYS: &[Role] = &[Role::Gateway];
const ADMINS: &[Role] = &[Role::Admin];

/// What the gRPC method at `path` needs.
pub fn grpc_need(path: &str) -> Need {
    if path.starts_with("/grpc.health.v1.") {
        return Need::Open;
    }
    if path.starts_with("/cascade.raft.v1.") {
        return Need::Node;
    }
    let Some(method) = path.strip_prefix("/cascade.v1.Cascade/") else { return Need::Authenticated };
    match method {
        "CheckSession" | "CheckSessionBatch" => Need::Any(CHECKERS),
        "WatchRevocations" => Need::Any(GATEWAYS),
        "CreateSession" | "TouchSession" | "StepUpSession" | "RotateRefreshToken" => {
            Need::Any(SESSION_WRITERS)
        }
        "ListUserSessions" => Need::Any(READERS),
        "RevokeSession" | "RevokeFamily" => Need::Any(REVOKERS),
        "RevokeDevice" | "RevokeUser" | "SetWatermark" | "StartRevokeJob" | "RevokeList" | "GetRevokeJob"
        | "ListRevokeJobs" | "CancelRevokeJob" | "QueryAudit" => Need::Any(RESPONDERS),
        "TransferLeader" | "AddNode" | "RemoveNode" | "CutLinks" | "SetClockOffset" | "Crash" => {
            Need::Any(ADMINS)
        }
        _ => Need::Authenticated,
    }
}

/// Why a caller was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No key, or a key nobody configured.
    Unauthenticated(String),
    /// A known key without a role the operation needs.
    Denied(String),
    /// A known key over its request rate.
    RateLimited(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::Denied(_) => "permission_denied",
            Refusal::RateLimited(_) => "rate_limited",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::Unauthenticated(m) | Refusal::Denied(m) | Refusal::RateLimited(m) => m,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        match self {
            Refusal::Unauthenticated(m) => tonic::Status::unauthenticated(m.clone()),
            Refusal::Denied(m) => tonic::Status::permission_denied(m.clone()),
            Refusal::RateLimited(m) => tonic::Status::resource_exhausted(m.clone()),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The hex SHA-256 a key is configured by.
pub fn key_hash(key: &str) -> String {
    sha256_hex(key.as_bytes())
}

/// A new random API key.
pub fn new_key() -> String {
    format!("{KEY_PREFIX}{:032x}", rand::random::<u128>())
}

/// Equality that takes the same time wherever the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A token bucket: `rate` tokens a second, at most `rate` held.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The configured keys, by hash.
pub struct Policy {
    keys: BTreeMap<String, (String, Vec<Role>)>,
    cluster_key_hash: Option<String>,
    pub metrics: Arc<Metrics>,
    /// Requests per second per key (0: unlimited), and each key's bucket (one per configured
    /// key, so bounded by the configuration).
    rate: u32,
    buckets: Mutex<BTreeMap<String, Bucket>>,
}

impl Policy {
    /// `None` when authentication is off.
    pub fn new(config: &AuthConfig, metrics: Arc<Metrics>) -> Option<Arc<Policy>> {
        if !config.enabled() {
            return None;
        }
        let keys = config
            .api_keys
            .iter()
            .map(|k| (k.sha256.to_ascii_lowercase(), (k.name.clone(), k.roles.clone())))
            .collect();
        Some(Arc::new(Policy {
            keys,
            cluster_key_hash: config.cluster_key.as_deref().map(key_hash),
            metrics,
            rate: config.requests_per_s_per_key,
            buckets: Mutex::default(),
        }))
    }

    /// Take one request from `caller`'s bucket.
    fn admit(&self, caller: &Caller) -> Result<(), Refusal> {
        if self.rate == 0 || caller.node {
            return Ok(());
        }
        let rate = f64::from(self.rate);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(caller.name.clone()).or_insert(Bucket { tokens: rate, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        if b.tokens < 1.0 {
            return Err(Refusal::RateLimited(format!(
                "key {:?} exceeds {} requests/s on this node (auth.requests_per_s_per_key); retry with backoff",
                caller.name, self.rate
            )));
        }
        b.tokens -= 1.0;
        Ok(())
    }

    /// Who presents `api_key` and/or `cluster_key` (either may be absent).
    pub fn identify(&self, api_key: Option<&str>, cluster_key: Option<&str>) -> Result<Caller, Refusal> {
        if let (Some(presented), Some(expected)) = (cluster_key, &self.cluster_key_hash) {
            if same(key_hash(presented).as_bytes(), expected.as_bytes()) {
                return Ok(Caller { name: "node".to_owned(), roles: Vec::new(), node: true });
            }
            return Err(Refusal::Unauthenticated("the cluster key is wrong".to_owned()));
        }
        let Some(key) = api_key else {
            return Err(Refusal::Unauthenticated(
                "an API key is required (authorization: Bearer <key>)".to_owned(),
            ));
        };
        let hash = key_hash(key);
        // Walk every key, so the time taken does not depend on which one matched.
        let mut found = None;
        for (h, v) in &self.keys {
            if same(h.as_bytes(), hash.as_bytes()) {
                found = Some(v);
            }
        }
        match found {
            Some((name, roles)) => Ok(Caller { name: name.clone(), roles: roles.clone(), node: false }),
            None => Err(Refusal::Unauthenticated("unknown API key".to_owned())),
        }
    }

    /// Whether `caller` may do what needs `need`, described as `what`.
    pub fn permit(caller: &Caller, need: Need, what: &str) -> Result<(), Refusal> {
        let ok = match need {
            Need::Open | Need::Authenticated => true,
            Need::Node => caller.node,
            Need::Any(roles) => caller.node || caller.roles.iter().any(|r| roles.contains(r)),
        };
        if ok {
            return Ok(());
        }
        let wanted = match need {
            Need::Any(roles) => roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(" or "),
            _ => "node".to_owned(),
        };
        let has = caller.roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ");
        Err(Refusal::Denied(format!("{what} needs role {wanted}; key {:?} has {has}", caller.name)))
    }

    /// Identify and permit; counts refusals.
    pub fn authorize(
        &self,
        api: &'static str,
        need: Need,
        what: &str,
        api_key: Option<&str>,
        cluster_key: Option<&str>,
    ) -> Result<Option<Caller>, Refusal> {
        if need == Need::Open && api_key.is_none() && cluster_key.is_none() {
            return Ok(None);
        }
        let result = self
            .identify(api_key, cluster_key)
            .and_then(|c| Policy::permit(&c, need, what).map(|()| c))
            .and_then(|c| self.admit(&c).map(|()| c));
        match result {
            Ok(c) => Ok(Some(c)),
            Err(_) if need == Need::Open => Ok(None),
            Err(e) => {
                self.metrics.auth_refused(api, e.reason());
                Err(e)
            }
        }
    }
}

/// The key in `authorization: Bearer <key>`, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn header<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name)?.to_str().ok()
}

/// The tower layer in front of the gRPC services: refuses before any handler runs, and gives
/// handlers the [`Caller`] in the request's extensions.
#[derive(Clone)]
pub struct AuthLayer(pub Option<Arc<Policy>>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, policy: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    policy: Option<Arc<Policy>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(policy) = &self.policy {
            let path = request.uri().path();
            let need = grpc_need(path);
            let headers = request.headers();
            let decided =
                policy.authorize("grpc", need, path, bearer(headers), header(headers, CLUSTER_KEY_HEADER));
            match decided {
                Ok(Some(caller)) => {
                    request.extensions_mut().insert(caller);
                }
                Ok(None) => {}
                Err(refusal) => {
                    let response = refusal.to_status().into_http::<R>();
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        Box::pin(self.inner.call(request))
    }
}

/// The name revocations record as their actor: the authenticated caller, with what the caller
/// said about itself in parentheses; what the caller said alone when authentication is off.
pub fn actor(caller: Option<&Caller>, supplied: &str) -> String {
    match (caller, supplied.is_empty()) {
        (Some(c), true) => c.name.clone(),
        (Some(c), false) => format!("{} ({supplied})", c.name),
        (None, true) => "unauthenticated".to_owned(),
        (None, false) => supplied.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Arc<Policy> {
        let config = AuthConfig {
            api_keys: vec![
                ApiKeyConfig { name: "gw".into(), sha256: key_hash("ck_gw"), roles: vec![Role::Gateway] },
                ApiKeyConfig {
                    name: "ops".into(),
                    sha256: key_hash("ck_ops"),
                    roles: vec![Role::Responder, Role::Admin],
                },
            ],
            cluster_key: Some("cluster-secret-0123".into()),
            ..AuthConfig::default()
        };
        Policy::new(&config, Arc::default()).expect("enabled")
    }

    #[test]
    fn keys_map_to_roles_and_roles_to_methods() {
        let p = policy();
        let check = grpc_need("/cascade.v1.Cascade/CheckSession");
        let create = grpc_need("/cascade.v1.Cascade/CreateSession");
        let raft = grpc_need("/cascade.raft.v1.RaftTransport/AppendEntries");
        assert!(p.authorize("grpc", check, "check", Some("ck_gw"), None).is_ok());
        assert!(matches!(
            p.authorize("grpc", create, "create", Some("ck_gw"), None),
            Err(Refusal::Denied(_))
        ));
        assert!(matches!(p.authorize("grpc", raft, "raft", Some("ck_ops"), None), Err(Refusal::Denied(_))));
        assert!(p.authorize("grpc", raft, "raft", None, Some("cluster-secret-0123")).is_ok());
        assert!(matches!(
            p.authorize("grpc", raft, "raft", None, Some("cluster-secret-wrong")),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(p.authorize("grpc", check, "check", None, None), Err(Refusal::Unauthenticated(_))));
        assert!(matches!(
            p.authorize("grpc", check, "check", Some("ck_x"), None),
            Err(Refusal::Unauthenticated(_))
        ));
        let health = grpc_need("/grpc.health.v1.Health/Check");
        assert_eq!(p.authorize("grpc", health, "health", None, None), Ok(None));
        let mut out = String::new();
        p.metrics.render(&mut out);
        assert!(
            out.contains("cascade_auth_refused_total{api=\"grpc\",reason=\"unauthenticated\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("cascade_auth_refused_total{api=\"grpc\",reason=\"permission_denied\"} 2"),
            "{out}"
        );
    }

    #[test]
    fn config_is_validated() {
        let mut c = AuthConfig::default();
        assert!(!c.enabled());
        c.api_keys.push(ApiKeyConfig { name: "a".into(), sha256: "00".into(), roles: vec![Role::Idp] });
        assert!(c.validate(false).is_err());
        c.api_keys[0].sha256 = key_hash("k");
        assert!(c.validate(false).is_ok());
        assert!(c.validate(true).is_err(), "several nodes need a cluster key");
        c.cluster_key = Some("short".into());
        assert!(c.validate(true).is_err());
        c.cluster_key = Some("long-enough-secret".into());
        assert!(c.validate(true).is_ok());
    }

    #[test]
    fn generated_keys_are_distinct_and_hash_to_hex() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 32);
        assert_eq!(key_hash(&a).len(), 64);
    }
}
