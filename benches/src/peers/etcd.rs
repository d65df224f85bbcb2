//! etcd's KV API (the subset in `proto/etcd.proto`) over tonic: one client per connection.

use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

pub type Kv = pb::kv_client::KvClient<Channel>;

/// Puts per transaction when loading (etcd's default `--max-txn-ops` is 128).
pub const TXN_OPS_MAX: usize = 128;

pub async fn connect(addr: SocketAddr) -> anyhow::Result<Kv> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect to etcd at {addr}"))?;
    Ok(pb::kv_client::KvClient::new(channel))
}

pub fn put(key: Vec<u8>, value: Vec<u8>) -> pb::PutRequest {
    pb::PutRequest { key, value, lease: 0 }
}

/// One unconditional transaction putting every pair.
pub fn txn(puts: impl IntoIterator<Item = pb::PutRequest>) -> pb::TxnRequest {
    let success = puts
        .into_iter()
        .map(|p| pb::RequestOp { request: Some(pb::request_op::Request::RequestPut(p)) })
        .collect();
    pb::TxnRequest { success, failure: Vec::new() }
}
