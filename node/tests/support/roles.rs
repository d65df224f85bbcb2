//! What the authentication tests share: four API keys (one per role), the cluster key, a
//! 3-node cluster with them, and the role matrix (which key may make which call).

use super::cluster::{Member, TestCluster};
use super::{
    check_req, create_req, free_loopback_addr, poll_until, unknown_session_id, Client, READY_DEADLINE,
};
use cascade_node::auth::{key_hash, ApiKeyConfig, AuthConfig, Role};
use cascade_node::config::{ClusterNode, NodeConfig};
use cascade_protocol::pb;
use tonic::Code;

/// A client of `m`, over TLS when `m` serves TLS (with the test CA the node was given).
pub async fn connect_to(m: &Member) -> Client {
    match &m.config.tls {
        None => m.client().await,
        Some(tls) if tls.require_client_cert => {
            // The test PKI's client certificate sits next to its CA.
            let dir = tls.ca.parent().expect("PKI dir");
            let identity = (dir.join("client.pem"), dir.join("client.key"));
            super::tls::connect(m.addr, &tls.ca, Some((&identity.0, &identity.1))).await
        }
        Some(tls) => super::tls::connect(m.addr, &tls.ca, None).await,
    }
}

/// Which of the four keys (gateway, idp, responder, admin) may make each call of [`matrix`].
pub fn expected_matrix() -> Vec<(&'static str, [bool; 4])> {
    vec![
        //                      gateway idp    responder admin
        ("CheckSession", [true, true, true, false]),
        ("WatchRevocations", [true, false, false, false]),
        ("CreateSession", [false, true, false, false]),
        ("ListUserSessions", [false, true, true, false]),
        ("RevokeSession", [false, true, true, false]),
        ("RevokeUser", [false, false, true, false]),
        ("QueryAudit", [false, false, true, false]),
        ("TransferLeader", [false, false, false, true]),
        ("NodeStatus", [true, true, true, true]),
    ]
}

pub const GATEWAY: &str = "ck_test_gateway_key";
pub const IDP: &str = "ck_test_idp_key";
pub const RESPONDER: &str = "ck_test_responder_key";
pub const ADMIN: &str = "ck_test_admin_key";
pub const CLUSTER_KEY: &str = "test-cluster-key-0123456789";

pub fn auth_config() -> AuthConfig {
    let key = |name: &str, key: &str, role: Role| ApiKeyConfig {
        name: name.to_owned(),
        sha256: key_hash(key),
        roles: vec![role],
    };
    AuthConfig {
        api_keys: vec![
            key("gw", GATEWAY, Role::Gateway),
            key("idp", IDP, Role::Idp),
            key("resp", RESPONDER, Role::Responder),
            key("ops", ADMIN, Role::Admin),
        ],
        cluster_key: Some(CLUSTER_KEY.to_owned()),
        ..AuthConfig::default()
    }
}

/// `message` with `authorization: Bearer <key>` when a key is given.
pub fn keyed<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(k) = key {
        r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().expect("ascii key"));
    }
    r
}

/// Three nodes with auth on and HTTP, started and ready (polled with the admin key).
pub async fn cluster() -> Vec<Member> {
    cluster_with(|_| {}).await
}

pub async fn cluster_with(adjust: impl Fn(&mut NodeConfig)) -> Vec<Member> {
    let mut members: Vec<Member> = (0..3).map(|i| TestCluster::member(i, 4)).collect();
    let nodes: Vec<ClusterNode> = members
        .iter()
        .map(|m| ClusterNode { id: m.id, addr: m.addr.to_string(), region: m.region.clone() })
        .collect();
    for m in &mut members {
        m.config.cluster.nodes = nodes.clone();
        m.config.auth = auth_config();
        m.config.http_listen = Some(free_loopback_addr());
        adjust(&mut m.config);
    }
    for m in &mut members {
        m.start().await;
    }
    for m in &members {
        let client = connect_to(m).await;
        poll_until("every shard led and fresh on every node", READY_DEADLINE, || {
            let mut client = client.clone();
            async move {
                let s =
                    client.node_status(keyed(pb::NodeStatusRequest {}, Some(ADMIN))).await.ok()?.into_inner();
                s.shards.iter().all(|s| s.leader != 0 && s.fresh).then_some(())
            }
        })
        .await;
    }
    members
}

/// Whether a call's result means the caller got past authentication.
pub fn allowed<T: std::fmt::Debug>(r: &Result<T, tonic::Status>) -> bool {
    !matches!(r, Err(s) if s.code() == Code::Unauthenticated || s.code() == Code::PermissionDenied)
}

/// Which of the four keys (gateway, idp, responder, admin) may make each call.
pub async fn matrix(client: &Client, existing_user: &str) -> Vec<(&'static str, [bool; 4])> {
    let keys = [GATEWAY, IDP, RESPONDER, ADMIN];
    let mut rows = Vec::new();
    macro_rules! row {
        ($name:expr, |$c:ident, $k:ident| $call:expr) => {{
            let mut cells = [false; 4];
            for (i, key) in keys.iter().enumerate() {
                let mut $c = client.clone();
                let $k = Some(*key);
                let r = $call.await;
                cells[i] = allowed(&r);
            }
            rows.push(($name, cells));
        }};
    }
    row!("CheckSession", |c, k| c.check_session(keyed(check_req(&unknown_session_id(0), "", 0), k)));
    row!("WatchRevocations", |c, k| c.watch_revocations(keyed(pb::WatchRevocationsRequest::default(), k)));
    row!("CreateSession", |c, k| c.create_session(keyed(create_req("acme", "matrix", "web"), k)));
    row!("ListUserSessions", |c, k| c.list_user_sessions(keyed(
        pb::ListUserSessionsRequest { tenant: "acme".into(), user_id: existing_user.into() },
        k
    )));
    row!("RevokeSession", |c, k| c.revoke_session(keyed(
        pb::RevokeSessionRequest { session_id: unknown_session_id(1), revocation: None },
        k
    )));
    row!("RevokeUser", |c, k| c.revoke_user(keyed(
        pb::RevokeUserRequest { tenant: "acme".into(), user_id: "nobody".into(), revocation: None },
        k
    )));
    row!("QueryAudit", |c, k| c.query_audit(keyed(pb::QueryAuditRequest::default(), k)));
    row!("TransferLeader", |c, k| c
        .transfer_leader(keyed(pb::TransferLeaderRequest { shard: 999, to_node: 0 }, k)));
    row!("NodeStatus", |c, k| c.node_status(keyed(pb::NodeStatusRequest {}, k)));
    rows
}
