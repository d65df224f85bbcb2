//! The production node's connection seams, on turmoil's simulated TCP.

use crate::scenario::NODE_PORT;
use cascade_node::seams::Listener;
use cascade_protocol::pb::cascade_client::CascadeClient;
use cascade_raft::conn::{lazy_channel, Conn, Dialer};
use futures::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How long a simulated connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Opens simulated TCP connections by host name (`n3:7000`).
pub fn dialer() -> Dialer {
    Arc::new(|addr: String| {
        async move { turmoil::net::TcpStream::connect(addr).await.map(Conn::new) }.boxed()
    })
}

/// Accepts simulated TCP connections on the node port.
pub async fn listener() -> std::io::Result<Listener> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", NODE_PORT)).await?;
    let incoming = futures::stream::unfold(listener, |l| async move {
        let accepted = l.accept().await.map(|(stream, _)| Conn::new(stream));
        Some((accepted, l))
    });
    Ok(Listener::Incoming(incoming.boxed()))
}

/// A public-API client of node `host` over the simulated network.
pub fn client(host: &str) -> CascadeClient<Channel> {
    let addr = format!("{host}:{NODE_PORT}");
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("simulated host names are valid URIs")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(cascade_raft::network::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(cascade_raft::network::KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    CascadeClient::new(lazy_channel(endpoint, &addr, dialer()))
}
