//! TLS on a 3-node cluster: clients connect over TLS (plaintext is refused), nodes talk to each
//! other over mutual TLS (replication and forwarded writes work), every role is allowed exactly
//! its operations with TLS on, the SDK and the CLI connect with the CA; a node requiring client
//! certificates refuses clients without one.

mod support;

use cascade_protocol::pb;
use support::roles::*;
use support::tls::{client_tls, connect, try_connect, Pki};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_over_tls_and_mutual_tls_between_nodes() {
    let pki = Pki::new();
    let tls = pki.node_config(false);
    let members = cluster_with(|c| c.tls = Some(tls.clone())).await;

    // Writes through every node: followers forward to leaders over mutual TLS.
    for (i, m) in members.iter().enumerate() {
        let mut c = connect_to(m).await;
        for j in 0..3 {
            c.create_session(keyed(create_req("acme", &format!("t{i}-{j}"), "web"), Some(IDP)))
                .await
                .unwrap_or_else(|s| panic!("create through node {} over TLS: {s:?}", m.id));
        }
    }
    let client = connect_to(&members[1]).await;
    assert_eq!(matrix(&client, "t0-0").await, expected_matrix(), "allowed per key over TLS");

    // Plaintext is refused on a TLS port.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", members[0].addr))
        .expect("uri")
        .connect_timeout(RPC_TIMEOUT)
        .timeout(RPC_TIMEOUT)
        .connect()
        .await;
    if let Ok(channel) = plain {
        let r = pb::cascade_client::CascadeClient::new(channel)
            .node_status(keyed(pb::NodeStatusRequest {}, Some(ADMIN)))
            .await;
        assert!(r.is_err(), "a plaintext call to a TLS port succeeded: {r:?}");
    }
    // A server certificate from another CA is refused by the client.
    let other = Pki::new();
    assert!(try_connect(members[0].addr, client_tls(&other.ca, None)).await.is_err());

    // The HTTP port serves HTTPS with the same certificate; plaintext HTTP gets nothing.
    let http = members[0].config.http_listen.expect("HTTP address");
    let answer = support::tls::https_exchange(
        http,
        &pki.ca,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("HTTPS /healthz");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let plain = support::http::try_request(http, "GET", "/healthz", &[], "").await;
    assert!(
        plain.is_err() || plain.as_ref().is_ok_and(|a| a.status != 200),
        "plaintext HTTP on the TLS port: {plain:?}"
    );

    // The SDK over TLS.
    let mut config = cascade_client::ClientConfig::new(members.iter().map(|m| m.addr.to_string()));
    config.api_key = Some(GATEWAY.to_owned());
    config.tls = Some(client_tls(&pki.ca, None));
    let sdk = cascade_client::Client::connect(config).await.expect("SDK over TLS");
    let r = sdk.check(check_req(&unknown_session_id(0), "", 0)).await.expect("SDK check over TLS");
    assert_eq!(r.status, pb::CheckStatus::Unknown as i32);

    // The CLI over TLS.
    let ca = pki.ca.display().to_string();
    let addr = members[2].addr.to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["--addr", &addr, "--tls-ca", &ca, "--api-key", ADMIN, "status"])
        .output()
        .expect("run cascade status");
    assert!(out.status.success(), "cascade status over TLS: {}", String::from_utf8_lossy(&out.stderr));
    drop(members);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates() {
    let pki = Pki::new();
    let tls = pki.node_config(true);
    let members = cluster_with(|c| c.tls = Some(tls.clone())).await;
    let addr = members[0].addr;
    // Without a client certificate: the handshake or the first call fails.
    let refused = match try_connect(addr, client_tls(&pki.ca, None)).await {
        Err(_) => true,
        Ok(mut c) => c.node_status(keyed(pb::NodeStatusRequest {}, Some(ADMIN))).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    let mut c = connect(addr, &pki.ca, Some(pki.client_identity())).await;
    c.node_status(keyed(pb::NodeStatusRequest {}, Some(ADMIN))).await.expect("with a client certificate");
    drop(members);
}
