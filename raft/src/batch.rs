//! Append-entries of every shard bound for one peer share calls. Each peer address has a queue
//! and a task draining it: while [`APPEND_CALLS_IN_FLIGHT`] calls to the peer are outstanding,
//! further append-entries wait in the queue, then leave together in one `AppendEntriesBatch`
//! call (at most [`APPEND_BATCH_MAX`] messages, [`APPEND_BATCH_BYTES_MAX`] bytes). A quiet link
//! sends each at once, so batching adds no latency there; a busy one sends fewer, larger calls.
//! Votes, snapshots and everything else are never batched.
//!
//! Limits: a message's time in the queue counts against its own deadline (openraft's append
//! timeout), so a peer slow to answer one batch, e.g. on a slow fsync, makes the heartbeats of
//! every shard queued behind it time out together. A peer that does not know
//! `AppendEntriesBatch` (UNIMPLEMENTED: a node of an older version, during a rolling upgrade)
//! fails that one batch (openraft retries) and is then sent one call per message, until its queue
//! goes idle.

use crate::network::{Peers, RAFT_MESSAGE_BYTES_MAX};
use cascade_protocol::raft_pb::raft_transport_client::RaftTransportClient;
use cascade_protocol::raft_pb::{RaftBatch, RaftBatchReply, RaftMessage, RaftReply};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Status};

/// Most append-entries in one batch call (also the most a node accepts in one).
pub const APPEND_BATCH_MAX: usize = 64;
/// A batch stops growing once its payloads reach this many bytes (below
/// `RAFT_MESSAGE_BYTES_MAX`, the largest message a peer accepts).
pub const APPEND_BATCH_BYTES_MAX: usize = 8 << 20;
/// Batch calls to one peer outstanding at once; append-entries queue behind them.
pub const APPEND_CALLS_IN_FLIGHT: usize = 2;
/// Append-entries waiting for one peer; past it a call fails at once (openraft retries).
pub const APPEND_QUEUE_MAX: usize = 1_024;
/// A peer's queue task ends after this long without traffic (the next append-entries starts a
/// new one), so a node that stopped leaves no task behind for long.
pub const APPEND_QUEUE_IDLE: Duration = Duration::from_secs(5);

/// Why a call to a peer got no answer.
#[derive(Debug)]
pub enum CallFailure {
    /// Nothing was sent: the peer cannot be reached from here now (see `PeerError`).
    Peer(String),
    /// The call failed, or the peer refused this message.
    Status(Status),
    /// This node gave up on the call without an answer from the peer (its queue stopped, or the
    /// deadline passed): says nothing about whether the peer is reachable.
    Local(Status),
}

struct Pending {
    msg: RaftMessage,
    deadline: tokio::time::Instant,
    reply: oneshot::Sender<Result<RaftMessage, CallFailure>>,
}

/// The append-entries queues of one node, one per peer address.
#[derive(Clone, Default)]
pub struct AppendQueues {
    queues: Arc<Mutex<BTreeMap<String, mpsc::Sender<Pending>>>>,
    stats: Arc<BatchStats>,
}

/// Counts of what left through the queues (tests and metrics).
#[derive(Default)]
pub struct BatchStats {
    pub calls: AtomicU64,
    pub messages: AtomicU64,
}

impl AppendQueues {
    /// Send `msg` (an append-entries) to `addr` in the next batch, and wait for its answer.
    pub async fn call(
        &self,
        peers: &Peers,
        addr: &str,
        msg: RaftMessage,
        timeout: Duration,
    ) -> Result<RaftMessage, CallFailure> {
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending { msg, deadline: tokio::time::Instant::now() + timeout, reply };
        // A queue whose task ended (idle, or its runtime stopped) is replaced once.
        for _ in 0..2 {
            let queue = self.queue(peers, addr);
            match queue.try_send(pending) {
                Ok(()) => {
                    return answer.await.unwrap_or_else(|_| {
                        Err(CallFailure::Local(Status::unavailable(format!(
                            "the append-entries queue to {addr} stopped"
                        ))))
                    });
                }
                Err(TrySendError::Full(_)) => {
                    return Err(CallFailure::Local(Status::resource_exhausted(format!(
                        "{APPEND_QUEUE_MAX} append-entries already wait for {addr} (APPEND_QUEUE_MAX)"
                    ))));
                }
                Err(TrySendError::Closed(p)) => {
                    let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                    if queues.get(addr).is_some_and(|q| q.same_channel(&queue)) {
                        queues.remove(addr);
                    }
                    pending = p;
                }
            }
        }
        Err(CallFailure::Local(Status::unavailable(format!("no append-entries queue to {addr}"))))
    }

    /// Batch calls and the messages they carried so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.stats.calls.load(Ordering::Relaxed), self.stats.messages.load(Ordering::Relaxed))
    }

    fn queue(&self, peers: &Peers, addr: &str) -> mpsc::Sender<Pending> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = queues.get(addr).filter(|q| !q.is_closed()) {
            return q.clone();
        }
        let (tx, rx) = mpsc::channel(APPEND_QUEUE_MAX);
        queues.insert(addr.to_owned(), tx.clone());
        tokio::spawn(drain(peers.clone(), addr.to_owned(), rx, Arc::clone(&self.stats)));
        tx
    }
}

/// The task of one peer's queue: gathers what waits into batches and sends each.
async fn drain(peers: Peers, addr: String, mut rx: mpsc::Receiver<Pending>, stats: Arc<BatchStats>) {
    let calls = Arc::new(Semaphore::new(APPEND_CALLS_IN_FLIGHT));
    let unary = Arc::new(AtomicBool::new(false));
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match tokio::time::timeout(APPEND_QUEUE_IDLE, rx.recv()).await {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(_) => {
                    // Idle: close the queue (senders then start a new one), but first send
                    // what arrived between the timeout and the close.
                    rx.close();
                    match rx.try_recv() {
                        Ok(p) => p,
                        Err(_) => return,
                    }
                }
            },
        };
        let Ok(permit) = Arc::clone(&calls).acquire_owned().await else { return };
        let mut bytes = first.msg.payload.len();
        let mut batch = vec![first];
        while batch.len() < APPEND_BATCH_MAX && bytes < APPEND_BATCH_BYTES_MAX {
            let Ok(p) = rx.try_recv() else { break };
            if bytes + p.msg.payload.len() > APPEND_BATCH_BYTES_MAX {
                carried = Some(p);
                break;
            }
            bytes += p.msg.payload.len();
            batch.push(p);
        }
        // Callers that gave up (openraft's deadline passed) are not sent.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        stats.calls.fetch_add(1, Ordering::Relaxed);
        stats.messages.fetch_add(batch.len() as u64, Ordering::Relaxed);
        tokio::spawn(send(peers.clone(), addr.clone(), batch, Arc::clone(&unary), permit));
    }
}

/// A call's deadline passed with no answer.
fn late(addr: &str, n: usize) -> Status {
    Status::deadline_exceeded(format!("{addr} did not answer {n} append-entries in time"))
}

/// Send one batch; to a peer that does not know batches (`unary`), its messages one by one.
async fn send(
    peers: Peers,
    addr: String,
    batch: Vec<Pending>,
    unary: Arc<AtomicBool>,
    _permit: OwnedSemaphorePermit,
) {
    let deadline = batch.iter().map(|p| p.deadline).max().unwrap_or_else(tokio::time::Instant::now);
    let (messages, replies): (Vec<RaftMessage>, Vec<_>) = batch.into_iter().map(|p| (p.msg, p.reply)).unzip();
    let channel = match peers.channel(&addr) {
        Ok(c) => c,
        Err(e) => {
            let reason = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(CallFailure::Peer(reason.clone())));
            }
            return;
        }
    };
    let mut client = RaftTransportClient::new(channel)
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let n = messages.len();
    if unary.load(Ordering::Relaxed) {
        // An older peer: one call per message.
        for (msg, reply) in messages.into_iter().zip(replies) {
            let mut request = Request::new(msg);
            request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let answer = tokio::time::timeout_at(deadline, client.append_entries(request)).await;
            let _ = reply.send(match answer {
                Ok(a) => a.map(tonic::Response::into_inner).map_err(CallFailure::Status),
                Err(_) => Err(CallFailure::Local(late(&addr, 1))),
            });
        }
        return;
    }
    let mut request = Request::new(RaftBatch { messages });
    request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
    let Ok(answered) = tokio::time::timeout_at(deadline, client.append_entries_batch(request)).await else {
        for reply in replies {
            let _ = reply.send(Err(CallFailure::Local(late(&addr, n))));
        }
        return;
    };
    if answered.as_ref().is_err_and(|s| s.code() == tonic::Code::Unimplemented) {
        unary.store(true, Ordering::Relaxed);
    }
    match answered.map(tonic::Response::into_inner) {
        Ok(RaftBatchReply { replies: answers }) if answers.len() == n => {
            for (answer, reply) in answers.into_iter().zip(replies) {
                let _ = reply.send(answer_of(answer));
            }
        }
        Ok(RaftBatchReply { replies: answers }) => {
            let status =
                Status::internal(format!("{addr} answered {} of {n} batched append-entries", answers.len()));
            for reply in replies {
                let _ = reply.send(Err(CallFailure::Status(status.clone())));
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(CallFailure::Status(status.clone())));
            }
        }
    }
}

/// One message's answer within a batch reply.
fn answer_of(answer: RaftReply) -> Result<RaftMessage, CallFailure> {
    match answer.message {
        Some(m) if answer.code == 0 => Ok(m),
        _ => Err(CallFailure::Status(Status::new(tonic::Code::from(answer.code), answer.error))),
    }
}

/// The batch reply entry for one message's outcome.
pub fn reply_of(outcome: Result<RaftMessage, Status>) -> RaftReply {
    match outcome {
        Ok(m) => RaftReply { message: Some(m), code: 0, error: String::new() },
        Err(s) => RaftReply { message: None, code: i32::from(s.code()), error: s.message().to_owned() },
    }
}
