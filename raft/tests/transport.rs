//! The tonic Raft transport round-trips real openraft messages over loopback: a vote request
//! reaches the shard it names and its answer comes back; an unknown shard is an error, not a hang.
//! A streamed snapshot of many chunks reaches the shard; malformed streams are refused.
//! Concurrent append-entries of several shards share batch calls.

use cascade_core::limits::Limits;
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::raft_transport_server::RaftTransportServer;
use cascade_protocol::raft_pb::SnapshotChunk;
use cascade_raft::host::{HostConfig, RaftHost, Storage};
use cascade_raft::network::{NetworkFactory, Peers, TransportServer, SNAPSHOT_CHUNK_BYTES};
use cascade_raft::typ::Vote;
use cascade_raft::typ::{CascadeNode, TypeConfig};
use openraft::error::ReplicationClosed;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};
use openraft::{CommittedLeaderId, LogId, Snapshot, SnapshotMeta, StoredMembership};
use std::io::Cursor;
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
            elections: host.elections.clone(),
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

    // A snapshot from a stale leader, streamed in several chunks, arrives whole and is refused by
    // vote: the answer carries the shard's vote and nothing is installed.
    let stale = Snapshot {
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(0, 7), 100)),
            last_membership: StoredMembership::default(),
            snapshot_id: "0-7-100".to_owned(),
        },
        snapshot: Box::new(Cursor::new(vec![7u8; 2 * SNAPSHOT_CHUNK_BYTES + 5])),
    };
    let never = futures::future::pending::<ReplicationClosed>();
    let resp =
        shard0.full_snapshot(Vote::new_committed(0, 7), stale, never, option.clone()).await.expect("stream");
    assert!(resp.vote.leader_id().term >= 1, "{:?}", resp.vote);
    assert_eq!(raft.metrics().borrow().snapshot, None, "a refused snapshot was installed");

    // Malformed streams: empty, a chunk of another shard, a header that does not decode.
    let mut client = RaftTransportClient::new(peers.channel(&addr).expect("channel"));
    let chunk = |shard, header: Vec<u8>| SnapshotChunk { shard, header, data: vec![1, 2, 3] };
    let header = cascade_protocol::codec::encode(&(
        Vote::new_committed(0, 7),
        SnapshotMeta::<u64, CascadeNode>::default(),
    ))
    .expect("encode header");
    let cases: [(Vec<SnapshotChunk>, &str); 3] = [
        (vec![], "empty snapshot stream"),
        (vec![chunk(0, header.clone()), chunk(1, Vec::new())], "in the stream of shard 0"),
        (vec![chunk(0, vec![0xff; 3])], "snapshot header"),
    ];
    for (chunks, reason) in cases {
        let status = client.stream_snapshot(futures::stream::iter(chunks)).await.expect_err(reason);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(reason), "{status:?}");
    }

    // 32 append-entries of two shards at once (from a stale leader: refused, but answered) leave
    // in fewer calls than messages, and each gets its own shard's answer.
    let (calls_before, messages_before) = peers.appends.stats();
    let mut conns = Vec::new();
    for shard in [0u16, 1].repeat(16) {
        conns
            .push(NetworkFactory { shard, peers: peers.clone(), elections: None }.new_client(1, &node).await);
    }
    let appends = conns.iter_mut().map(|c| {
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(0, 7),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        c.append_entries(req, option.clone())
    });
    for resp in futures::future::join_all(appends).await {
        match resp.expect("append-entries answered") {
            AppendEntriesResponse::HigherVote(v) => assert!(v.leader_id().term >= 1, "{v:?}"),
            other => panic!("a stale leader's append-entries was not refused: {other:?}"),
        }
    }
    let (calls, messages) = peers.appends.stats();
    let (calls, messages) = (calls - calls_before, messages - messages_before);
    assert_eq!(messages, 32);
    assert!(calls < 8, "32 concurrent append-entries took {calls} calls");

    let mut shard9 = NetworkFactory { shard: 9, peers, elections: None }.new_client(1, &node).await;
    let err = shard9.vote(VoteRequest::new(Vote::new(0, 7), None), option).await.expect_err("no shard 9");
    assert!(err.to_string().contains("shard 9"), "{err}");

    served.abort();
    host.shutdown().await.expect("shutdown");
}
