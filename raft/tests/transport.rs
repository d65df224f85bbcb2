//! The tonic Raft transport round-trips real openraft messages over loopback: a vote request
//! reaches the shard it names and its answer comes back; an unknown shard is an error, not a hang.

use cascade_core::limits::Limits;
use cascade_protocol::raft_pb::raft_transport_server::RaftTransportServer;
use cascade_raft::host::{HostConfig, RaftHost, Storage};
use cascade_raft::network::{NetworkFactory, Peers, TransportServer};
use cascade_raft::typ::CascadeNode;
use cascade_raft::typ::Vote;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vote_round_trips_and_unknown_shard_fails() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = HostConfig::single(1, &addr, 2, Limits::default(), 1_000);
    let host = RaftHost::open(config, Storage::Dir(dir.path().to_owned()), Peers::default(), None)
        .await
        .expect("open");
    let raft = host.raft(0).expect("shard 0");
    raft.wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_term >= 1, "elected")
        .await
        .expect("elected");
    let server = tonic::transport::Server::builder()
        .add_service(RaftTransportServer::new(TransportServer {
            shards: host.shards.clone(),
            freshness: host.freshness.clone(),
            votes_from: host.votes_from,
            peers: host.peers.clone(),
        }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let served = tokio::spawn(server);

    let peers = Peers::default();
    let node = CascadeNode { addr: addr.clone(), region: "local".to_owned() };
    let option = RPCOption::new(Duration::from_secs(2));
    // The host started on empty storage: it grants no vote until its quarantine is over.
    tokio::time::sleep_until(host.votes_from).await;
    // A stale candidate (term 0) is refused, and the answer carries the shard's current vote.
    let mut shard0 =
        NetworkFactory { shard: 0, peers: peers.clone(), elections: None }.new_client(1, &node).await;
    let resp = shard0.vote(VoteRequest::new(Vote::new(0, 7), None), option.clone()).await.expect("vote rpc");
    assert!(!resp.vote_granted);
    assert!(resp.vote.leader_id().term >= 1, "{:?}", resp.vote);

    let mut shard9 = NetworkFactory { shard: 9, peers, elections: None }.new_client(1, &node).await;
    let err = shard9.vote(VoteRequest::new(Vote::new(0, 7), None), option).await.expect_err("no shard 9");
    assert!(err.to_string().contains("shard 9"), "{err}");

    served.abort();
    host.shutdown().await.expect("shutdown");
}
