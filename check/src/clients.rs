//! The clients of a run: the workload (identity providers, gateways, responders), the
//! availability probe behind RTO, and the verifier that waits for convergence after the heal and
//! reads the final state. Each records every operation it makes into the run's history. The
//! simulator runs them on virtual time over turmoil, the chaos harness on real time over TCP;
//! both supply a [`Recorder`] (the history and the clock) and a [`Connector`].

use crate::history::{History, Op, OpKind, OpResult, Seen};
use crate::workload::{OpChoice, Workload};
use cascade_protocol::ids::shard_of_user;
use cascade_protocol::pb::cascade_client::CascadeClient;
use cascade_protocol::pb::{self, CheckStatus, ReasonCode};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Operations one workload client makes at most.
pub const OPS_PER_CLIENT_MAX: usize = 600;
/// How often the probe writes to every shard.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Sessions a probe user gets before the probe moves to the next one (far below the per-user
/// session limit, so evictions never muddy the oracle).
const PROBE_SESSIONS_PER_USER: u32 = 20;
/// How often the revocation sentinel revokes a probe session of every shard.
pub const SENTINEL_INTERVAL: Duration = Duration::from_millis(1_500);
/// A probe session this old has reached every replica (the sentinel revokes only those).
const SENTINEL_SESSION_AGE_MS: u64 = 300;
/// The sentinel checks a revoked session at every node this long after the revocation bound
/// passed, and again `SENTINEL_RECHECK` later.
const SENTINEL_MARGIN: Duration = Duration::from_millis(100);
const SENTINEL_RECHECK: Duration = Duration::from_millis(1_000);
/// How often the verifier polls for convergence.
const CONVERGE_POLL: Duration = Duration::from_millis(250);
/// How many recently revoked sessions the workload keeps checking.
const RECENT_REVOKED_MAX: usize = 16;
/// Where operations are recorded, and the one clock they are timed on.
pub trait Recorder: Clone + 'static {
    /// Milliseconds since the start of the run.
    fn now_ms(&self) -> u64;
    fn read<T>(&self, f: impl FnOnce(&History) -> T) -> T;
    fn write<T>(&self, f: impl FnOnce(&mut History) -> T) -> T;
}

/// The history and the one monotonic clock of a run on real time (the chaos harness, drills).
#[derive(Clone)]
pub struct LiveRecorder {
    history: Arc<Mutex<History>>,
    start: std::time::Instant,
}

impl Recorder for LiveRecorder {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn read<T>(&self, f: impl FnOnce(&History) -> T) -> T {
        f(&self.history.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn write<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        f(&mut self.history.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl LiveRecorder {
    /// A recorder whose clock starts now.
    pub fn start() -> LiveRecorder {
        LiveRecorder { history: Arc::default(), start: std::time::Instant::now() }
    }
}

/// A public-API client of the node at `addr` (`host:port`) over TCP: it connects lazily, with
/// a connect deadline and HTTP/2 keepalive, so a dead or partitioned node never hangs a client.
pub fn tcp_client(addr: &str) -> Result<CascadeClient<Channel>, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(500))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true);
    Ok(CascadeClient::new(endpoint.connect_lazy()))
}

/// A public-API client of a node, by node id.
pub type Connector = Arc<dyn Fn(u64) -> CascadeClient<Channel> + Send + Sync>;

/// Final reads in flight at once.
pub const FINAL_READS_IN_FLIGHT: usize = 16;
/// A final read that every node refused is tried again this many times, this far apart: nodes
/// keep balancing leaderships after convergence, and a shard being handed over refuses
/// linearizable reads until its new leader has committed an entry. A shard that stays
/// unavailable still fails liveness.
const FINAL_READ_ROUNDS: usize = 3;
const FINAL_READ_PAUSE: Duration = Duration::from_millis(1_000);
/// Tenant of every simulated user (drills use their own, see [`Workload::tenant`]).
pub const TENANT: &str = "t";
const TTL_MS: u64 = 3_600_000;

pub fn user_name(k: u32) -> String {
    format!("u{k}")
}

fn device_of(rng: &mut StdRng) -> String {
    format!("d{}", rng.gen_range(0..3))
}

/// A valid RFC 7638 thumbprint shape for a device name (43 base64url characters).
fn jkt_of(device: &str) -> String {
    format!("{device:A<43}").replace(|c: char| !c.is_ascii_alphanumeric(), "A")
}

fn revocation(text: &str) -> Option<pb::Revocation> {
    Some(pb::Revocation {
        reason: ReasonCode::Admin as i32,
        text: text.to_owned(),
        actor: "workload".to_owned(),
    })
}

/// Runs `call` with the deadline; a timeout is reported as DEADLINE_EXCEEDED.
async fn timed<T, F>(timeout: Duration, call: F) -> Result<T, Status>
where
    F: Future<Output = Result<tonic::Response<T>, Status>>,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded("client deadline")),
    }
}

fn request<T>(message: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(message);
    r.set_timeout(timeout);
    r
}

/// A failed write: refused (certainly not applied) or unknown.
fn write_failure(status: &Status) -> OpResult {
    let code = format!("{:?}", status.code());
    match status.code() {
        Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::OutOfRange => {
            OpResult::Refused { code }
        }
        _ => OpResult::Unknown { code },
    }
}

fn seen(session: &str, r: &pb::CheckSessionResponse) -> Seen {
    Seen {
        session: session.to_owned(),
        status: CheckStatus::try_from(r.status)
            .map_or_else(|_| r.status.to_string(), |s| s.as_str_name().to_owned()),
        reason: ReasonCode::try_from(r.reason)
            .map_or_else(|_| r.reason.to_string(), |s| s.as_str_name().to_owned()),
    }
}

/// A check presenting the session's device key (device-bound sessions answer DEVICE_MISMATCH
/// to anything else, which would hide whether they are valid); `""` for unbound sessions.
fn check_request(session: &str, jkt: &str, linearizable: bool) -> pb::CheckSessionRequest {
    pb::CheckSessionRequest {
        session_id: session.to_owned(),
        jkt: jkt.to_owned(),
        required_aal: 0,
        linearizable,
    }
}

/// Connections from one client to every node.
struct Nodes {
    ids: Vec<u64>,
    clients: BTreeMap<u64, CascadeClient<Channel>>,
    connect: Connector,
}

impl Nodes {
    fn new(w: &Workload, connect: &Connector) -> Nodes {
        let ids = w.node_ids.clone();
        let clients = ids.iter().map(|&id| (id, connect(id))).collect();
        Nodes { ids, clients, connect: connect.clone() }
    }

    fn get(&self, id: u64) -> CascadeClient<Channel> {
        self.clients.get(&id).cloned().unwrap_or_else(|| (self.connect)(id))
    }
}

/// A session some client saw created, for picking targets.
#[derive(Clone)]
struct Known {
    id: String,
    user: String,
    device: String,
}

/// The device key a session was bound to (`""`: unbound or not known to the clients).
fn key_of(known: &[Known], session: &str) -> String {
    known.iter().find(|k| k.id == session).map_or_else(String::new, |k| jkt_of(&k.device))
}

/// Sessions named by the latest acknowledged revocations (gateways keep seeing the tokens of
/// sessions that were just revoked: exactly where P2 matters).
fn recently_revoked(history: &impl Recorder) -> Vec<String> {
    history.read(|h| {
        let mut out = Vec::new();
        for op in h.ops.iter().rev() {
            if let OpResult::Revoked { sessions, .. } = &op.result {
                out.extend(sessions.iter().cloned());
                if out.len() >= RECENT_REVOKED_MAX {
                    break;
                }
            }
        }
        out
    })
}

fn known_sessions(history: &impl Recorder) -> Vec<Known> {
    history.read(|h| {
        h.ops
            .iter()
            .filter_map(|op| match (&op.kind, &op.result) {
                (OpKind::Create { user, device, .. }, OpResult::Created { session, .. }) => {
                    Some(Known { id: session.clone(), user: user.clone(), device: device.clone() })
                }
                _ => None,
            })
            .collect()
    })
}

/// Children (by acknowledged creates) of `parent`.
fn children_of(history: &impl Recorder, parent: &str) -> Vec<String> {
    history.read(|h| {
        h.ops
            .iter()
            .filter_map(|op| match (&op.kind, &op.result) {
                (OpKind::Create { parent: Some(p), .. }, OpResult::Created { session, .. })
                    if p == parent =>
                {
                    Some(session.clone())
                }
                _ => None,
            })
            .collect()
    })
}

/// One workload client: random operations against random nodes from the end of the warm-up
/// until the heal.
/// Starts at `warmup_ms` on the recorder's clock (the clock starts with the run).
pub async fn workload(w: Workload, index: usize, connect: Connector, history: impl Recorder) {
    let mut rng = StdRng::seed_from_u64(w.seed.wrapping_mul(31).wrapping_add(index as u64 + 1));
    let name = format!("c{index}");
    let nodes = Nodes::new(&w, &connect);
    sleep_until_ms(&history, w.warmup_ms).await;
    for _ in 0..OPS_PER_CLIENT_MAX {
        if history.now_ms() >= w.stop_at_ms {
            break;
        }
        let node = *nodes.ids.choose(&mut rng).unwrap_or(&1);
        let client = nodes.get(node);
        let choice = w.mix.draw(&mut rng);
        let known = known_sessions(&history);
        let invoke_ms = history.now_ms();
        let Some((kind, result)) = one_op(&w, choice, client, &known, &history, &mut rng).await else {
            continue;
        };
        let complete_ms = history.now_ms();
        history.write(|h| {
            h.ops.push(Op { client: name.clone(), node, invoke_ms, complete_ms, kind, result });
        });
        tokio::time::sleep(Duration::from_millis(w.think_ms)).await;
    }
}

/// Sleeps until the recorder's clock reads `at_ms`.
async fn sleep_until_ms(history: &impl Recorder, at_ms: u64) {
    tokio::time::sleep(Duration::from_millis(at_ms.saturating_sub(history.now_ms()))).await;
}

/// Performs one operation; `None` when it has no target yet (nothing created so far).
async fn one_op(
    w: &Workload,
    choice: OpChoice,
    mut client: CascadeClient<Channel>,
    known: &[Known],
    history: &impl Recorder,
    rng: &mut StdRng,
) -> Option<(OpKind, OpResult)> {
    let timeout = w.op_timeout();
    let target = known.choose(rng).cloned();
    Some(match choice {
        OpChoice::Create | OpChoice::CreateChild => {
            let (user, device, parent) = match (choice, &target) {
                (OpChoice::CreateChild, Some(t)) => (t.user.clone(), t.device.clone(), Some(t.id.clone())),
                _ => (user_name(rng.gen_range(0..w.users)), device_of(rng), None),
            };
            let req = pb::CreateSessionRequest {
                tenant: w.tenant.clone(),
                user_id: user.clone(),
                client_id: "app".to_owned(),
                device_id: device.clone(),
                jkt: jkt_of(&device),
                aal: 1,
                amr: vec!["pwd".to_owned()],
                ttl_ms: TTL_MS,
                idle_timeout_ms: 0,
                parent_session_id: parent.clone().unwrap_or_default(),
                with_refresh_token: false,
                ..Default::default()
            };
            let result = match timed(timeout, client.create_session(request(req, timeout))).await {
                Ok(r) => created(r),
                Err(s) => write_failure(&s),
            };
            (OpKind::Create { user, device, parent }, result)
        }
        OpChoice::Check => {
            let recent = recently_revoked(history);
            let session = match recent.choose(rng) {
                Some(s) if rng.gen_bool(0.5) => s.clone(),
                _ => target?.id,
            };
            let req = check_request(&session, &key_of(known, &session), false);
            let result = match timed(timeout, client.check_session(request(req, timeout))).await {
                Ok(r) => OpResult::Checked { seen: vec![seen(&session, &r)] },
                Err(s) => OpResult::Refused { code: format!("{:?}", s.code()) },
            };
            (OpKind::Check { session }, result)
        }
        OpChoice::CheckFamily => {
            let parent = target?.id;
            let mut sessions = vec![parent.clone()];
            sessions.extend(children_of(history, &parent));
            sessions.truncate(cascade_protocol::limits::CHECK_BATCH_LEN_MAX);
            let req = pb::CheckSessionBatchRequest {
                checks: sessions.iter().map(|s| check_request(s, &key_of(known, s), false)).collect(),
            };
            let result = match timed(timeout, client.check_session_batch(request(req, timeout))).await {
                Ok(r) => OpResult::Checked {
                    seen: sessions.iter().zip(&r.results).map(|(s, r)| seen(s, r)).collect(),
                },
                Err(s) => OpResult::Refused { code: format!("{:?}", s.code()) },
            };
            (OpKind::CheckFamily { sessions }, result)
        }
        OpChoice::RevokeSession => {
            let session = target?.id;
            let req = pb::RevokeSessionRequest {
                session_id: session.clone(),
                revocation: revocation("workload session"),
            };
            let result = revoked(timed(timeout, client.revoke_session(request(req, timeout))).await);
            (OpKind::RevokeSession { session }, result)
        }
        OpChoice::RevokeDevice => {
            let t = target?;
            let req = pb::RevokeDeviceRequest {
                tenant: w.tenant.clone(),
                user_id: t.user.clone(),
                device_id: t.device.clone(),
                revocation: revocation("workload device"),
            };
            let result = revoked(timed(timeout, client.revoke_device(request(req, timeout))).await);
            (OpKind::RevokeDevice { user: t.user, device: t.device }, result)
        }
        OpChoice::RevokeUser => {
            let user = target?.user;
            let req = pb::RevokeUserRequest {
                tenant: w.tenant.clone(),
                user_id: user.clone(),
                revocation: revocation("workload user"),
            };
            let result = revoked(timed(timeout, client.revoke_user(request(req, timeout))).await);
            (OpKind::RevokeUser { user }, result)
        }
        OpChoice::WatermarkUser => {
            let user = target?.user;
            let req = pb::SetWatermarkRequest {
                scope: pb::WatermarkScope::User as i32,
                tenant: w.tenant.clone(),
                user_id: user.clone(),
                not_before_ms: 0,
                revocation: revocation("workload watermark"),
                ..Default::default()
            };
            let result = match timed(timeout, client.set_watermark(request(req, timeout))).await {
                Ok(r) => OpResult::Watermarked { watermark_ms: r.watermark_ms },
                Err(s) => write_failure(&s),
            };
            (OpKind::WatermarkUser { user }, result)
        }
    })
}

fn created(r: pb::CreateSessionResponse) -> OpResult {
    OpResult::Created {
        session: r.session_id,
        created_at_ms: r.created_at_ms,
        evicted: r.evicted_session_ids,
    }
}

fn revoked(r: Result<pb::RevokeResponse, Status>) -> OpResult {
    match r {
        Ok(r) => OpResult::Revoked { sessions: r.revoked_session_ids, at_ms: r.revoked_at_ms },
        Err(s) => write_failure(&s),
    }
}

/// The probe user for `shard`, round `k`: the first name of the form `p{k}-{i}` that hashes to it.
pub fn probe_user(tenant: &str, shard: u16, n_shards: u16, k: u32) -> String {
    (0u32..)
        .map(|i| format!("p{k}-{i}"))
        .find(|u| shard_of_user(tenant, u, n_shards) == shard)
        .unwrap_or_default()
}

/// Writes a session to every shard every `PROBE_INTERVAL`, like a client SDK would: trying the
/// nodes in turn until one accepts, within the workload's operation timeout. Every shard is
/// probed on its own schedule, so a shard that is down does not delay the probes of the others.
/// Every attempt is recorded (a timed-out attempt is an unknown write like any other).
pub async fn probe(w: Workload, connect: Connector, history: impl Recorder) {
    let nodes = Nodes::new(&w, &connect);
    sleep_until_ms(&history, w.warmup_ms).await;
    let shards = (0..w.shards).map(|shard| probe_shard(&w, &nodes, &history, shard));
    futures::future::join_all(shards).await;
}

async fn probe_shard(w: &Workload, nodes: &Nodes, history: &impl Recorder, shard: u16) {
    let mut rng = StdRng::seed_from_u64(w.seed ^ 0x9e37_79b9_7f4a_7c15 ^ u64::from(shard));
    let mut round: u32 = 0;
    while history.now_ms() < w.stop_at_ms {
        let started = tokio::time::Instant::now();
        let user = probe_user(&w.tenant, shard, w.shards, round / PROBE_SESSIONS_PER_USER);
        let mut order = nodes.ids.clone();
        order.shuffle(&mut rng);
        let deadline = started + w.op_timeout();
        for node in order {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let timeout = left.min(Duration::from_millis(w.probe_attempt_ms));
            let req = pb::CreateSessionRequest {
                tenant: w.tenant.clone(),
                user_id: user.clone(),
                client_id: "probe".to_owned(),
                aal: 1,
                ttl_ms: TTL_MS,
                ..Default::default()
            };
            let invoke_ms = history.now_ms();
            let result = match timed(timeout, nodes.get(node).create_session(request(req, timeout))).await {
                Ok(r) => created(r),
                Err(s) => write_failure(&s),
            };
            let ok = matches!(result, OpResult::Created { .. });
            let complete_ms = history.now_ms();
            let kind = OpKind::Probe { shard, round, user: user.clone() };
            history.write(|h| {
                h.ops.push(Op { client: "probe".to_owned(), node, invoke_ms, complete_ms, kind, result });
            });
            if ok {
                break;
            }
        }
        round += 1;
        tokio::time::sleep_until(started + PROBE_INTERVAL).await;
    }
}

/// The revocation sentinel: on every shard, every `SENTINEL_INTERVAL`, revokes the latest probe
/// session (trying the nodes in turn), and once the revocation is acknowledged and `bound` has
/// passed, checks it at every node, twice. A node cut off from its shard's quorum that still
/// answers VALID is then caught by P2 whatever the workload happened to check.
pub async fn sentinel(w: Workload, bound: Duration, connect: Connector, history: impl Recorder) {
    let nodes = Nodes::new(&w, &connect);
    sleep_until_ms(&history, w.warmup_ms).await;
    let shards = (0..w.shards).map(|shard| sentinel_shard(&w, bound, &nodes, &history, shard));
    futures::future::join_all(shards).await;
}

async fn sentinel_shard(w: &Workload, bound: Duration, nodes: &Nodes, history: &impl Recorder, shard: u16) {
    let mut rng = StdRng::seed_from_u64(w.seed ^ 0x5e47_1e1d_0c0f_fee5 ^ u64::from(shard));
    let mut revoked_last = None;
    while history.now_ms() < w.stop_at_ms {
        let started = tokio::time::Instant::now();
        let target = latest_probe_session(history, shard).filter(|s| revoked_last.as_ref() != Some(s));
        if let Some(session) = target {
            revoked_last = Some(session.clone());
            if revoke_anywhere(w, nodes, history, &session, &mut rng).await {
                tokio::time::sleep(bound + SENTINEL_MARGIN).await;
                check_everywhere(w, nodes, history, &session).await;
                tokio::time::sleep(SENTINEL_RECHECK).await;
                check_everywhere(w, nodes, history, &session).await;
            }
        }
        tokio::time::sleep_until(started + SENTINEL_INTERVAL).await;
    }
}

/// The latest probe session of `shard` created at least `SENTINEL_SESSION_AGE_MS` ago.
fn latest_probe_session(history: &impl Recorder, shard: u16) -> Option<String> {
    let now = history.now_ms();
    history.read(|h| {
        h.ops.iter().rev().find_map(|op| match (&op.kind, &op.result) {
            (OpKind::Probe { shard: s, .. }, OpResult::Created { session, .. })
                if *s == shard && op.complete_ms + SENTINEL_SESSION_AGE_MS <= now =>
            {
                Some(session.clone())
            }
            _ => None,
        })
    })
}

/// Revokes `session` through the nodes in turn until one acknowledges, within the operation
/// timeout; records every attempt. Whether it was acknowledged.
async fn revoke_anywhere(
    w: &Workload,
    nodes: &Nodes,
    history: &impl Recorder,
    session: &str,
    rng: &mut StdRng,
) -> bool {
    let mut order = nodes.ids.clone();
    order.shuffle(rng);
    let deadline = tokio::time::Instant::now() + w.op_timeout();
    for node in order {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = left.min(Duration::from_millis(w.probe_attempt_ms));
        let req =
            pb::RevokeSessionRequest { session_id: session.to_owned(), revocation: revocation("sentinel") };
        let invoke_ms = history.now_ms();
        let result = revoked(timed(timeout, nodes.get(node).revoke_session(request(req, timeout))).await);
        let ok = matches!(result, OpResult::Revoked { .. });
        let complete_ms = history.now_ms();
        let kind = OpKind::RevokeSession { session: session.to_owned() };
        history.write(|h| {
            h.ops.push(Op { client: "sentinel".to_owned(), node, invoke_ms, complete_ms, kind, result });
        });
        if ok {
            return true;
        }
    }
    false
}

/// Checks `session` at every node (not linearizable: each answers from its replica if it can
/// prove it fresh), one after another; records every answer.
async fn check_everywhere(w: &Workload, nodes: &Nodes, history: &impl Recorder, session: &str) {
    let timeout = Duration::from_millis(w.probe_attempt_ms);
    for &node in &nodes.ids {
        let req = check_request(session, "", false);
        let invoke_ms = history.now_ms();
        let result = match timed(timeout, nodes.get(node).check_session(request(req, timeout))).await {
            Ok(r) => OpResult::Checked { seen: vec![seen(session, &r)] },
            Err(s) => OpResult::Refused { code: format!("{:?}", s.code()) },
        };
        let complete_ms = history.now_ms();
        let kind = OpKind::Check { session: session.to_owned() };
        history.write(|h| {
            h.ops.push(Op { client: "sentinel".to_owned(), node, invoke_ms, complete_ms, kind, result });
        });
    }
}

/// After the heal: waits until every shard has one leader that all nodes agree on and every
/// voter has applied its log, then reads the final state of everything any client saw created.
pub async fn verifier(w: Workload, connect: Connector, history: impl Recorder) {
    let nodes = Nodes::new(&w, &connect);
    // Operations started before the heal finish within their deadline; let them land first.
    sleep_until_ms(&history, w.stop_at_ms + 2 * w.op_timeout_ms).await;
    let limit = w.stop_at_ms + w.converge_limit_ms;
    while history.now_ms() < limit {
        match converged(&w, &nodes).await {
            Ok(()) => {
                let now = history.now_ms();
                history.write(|h| h.converged_at_ms = Some(now));
                break;
            }
            Err(why) => history.write(|h| h.not_converged = Some(why)),
        }
        tokio::time::sleep(CONVERGE_POLL).await;
    }
    if history.read(|h| h.converged_at_ms.is_none()) {
        return;
    }
    final_reads(&w, &nodes, &history).await;
}

/// Whether the cluster has converged now: every shard has one leader that all its voters
/// follow, and every voter has applied the leader's log. `Err` says what is not converged yet.
pub async fn converged_now(w: &Workload, connect: &Connector) -> Result<(), String> {
    converged(w, &Nodes::new(w, connect)).await
}

/// `Err` says what is not converged yet.
async fn converged(w: &Workload, nodes: &Nodes) -> Result<(), String> {
    let mut statuses = BTreeMap::new();
    for &id in &nodes.ids {
        let status = timed(
            w.op_timeout(),
            nodes.get(id).node_status(request(pb::NodeStatusRequest {}, w.op_timeout())),
        )
        .await
        .map_err(|e| format!("n{id} status: {:?} {}", e.code(), e.message()))?;
        statuses.insert(id, status);
    }
    for shard in 0..u32::from(w.shards) {
        let shard_of = |id: u64| statuses.get(&id).and_then(|s| s.shards.iter().find(|x| x.shard == shard));
        // The leader as its own replica sees it; nodes without a replica know no leader.
        let at_leader = nodes
            .ids
            .iter()
            .filter_map(|&id| {
                shard_of(id).filter(|s| s.role.eq_ignore_ascii_case("leader") && s.leader == id)
            })
            .max_by_key(|s| s.term)
            .ok_or_else(|| format!("shard {shard}: no leader"))?;
        let leader = at_leader.leader;
        if !at_leader.fresh {
            let views: Vec<String> = nodes
                .ids
                .iter()
                .filter_map(|&id| {
                    shard_of(id).map(|s| {
                        format!(
                            "n{id}:{}/t{}/l{}/a{}/fresh={}",
                            s.role, s.term, s.leader, s.applied_index, s.fresh
                        )
                    })
                })
                .collect();
            return Err(format!(
                "shard {shard}: leader n{leader} cannot prove freshness [{}]",
                views.join(" ")
            ));
        }
        if at_leader.applied_index != at_leader.last_log_index {
            return Err(format!(
                "shard {shard}: leader n{leader} applied {} of {}",
                at_leader.applied_index, at_leader.last_log_index
            ));
        }
        // Every voter follows it and has applied everything it has.
        for v in &at_leader.voters {
            let s = shard_of(*v).ok_or_else(|| format!("shard {shard}: voter n{v} has no status"))?;
            if s.leader != leader || s.applied_index != at_leader.applied_index {
                return Err(format!(
                    "shard {shard}: voter n{v} follows n{} at applied {}, leader n{leader} (term {}) at {}",
                    s.leader, s.applied_index, at_leader.term, at_leader.applied_index
                ));
            }
        }
    }
    Ok(())
}

async fn final_reads(w: &Workload, nodes: &Nodes, history: &impl Recorder) {
    let (sessions, users) = history.read(|h| {
        let mut sessions = Vec::new();
        let mut users: Vec<String> = (0..w.users).map(user_name).collect();
        for op in &h.ops {
            if let OpResult::Created { session, .. } = &op.result {
                let key = match &op.kind {
                    OpKind::Create { device, .. } => jkt_of(device),
                    _ => String::new(),
                };
                sessions.push((session.clone(), key));
            }
            if let OpKind::Probe { user, .. } = &op.kind {
                users.push(user.clone());
            }
        }
        users.sort();
        users.dedup();
        (sessions, users)
    });
    let reads = sessions.into_iter().map(|(session, key)| async move {
        let mut errors = Vec::new();
        for round in 0..FINAL_READ_ROUNDS {
            if round > 0 {
                tokio::time::sleep(FINAL_READ_PAUSE).await;
            }
            errors.clear();
            for &id in &nodes.ids {
                let req = check_request(&session, &key, true);
                match timed(w.op_timeout(), nodes.get(id).check_session(request(req, w.op_timeout()))).await {
                    Ok(r) => {
                        history.write(|h| h.final_checks.insert(session.clone(), seen(&session, &r)));
                        return;
                    }
                    Err(e) => errors.push(format!("n{id}: {:?} {}", e.code(), e.message())),
                }
            }
        }
        history.write(|h| h.final_read_errors.push(format!("{session}: {}", errors.join("; "))));
    });
    // A linearizable read costs a round trip to a quorum: across regions, one at a time would
    // take minutes for a few thousand sessions.
    futures::stream::iter(reads).buffer_unordered(FINAL_READS_IN_FLIGHT).collect::<Vec<()>>().await;
    for user in users {
        for &id in &nodes.ids {
            let req = pb::ListUserSessionsRequest { tenant: w.tenant.clone(), user_id: user.clone() };
            if let Ok(r) =
                timed(w.op_timeout(), nodes.get(id).list_user_sessions(request(req, w.op_timeout()))).await
            {
                let ids = r.sessions.into_iter().map(|s| s.session_id).collect();
                history.write(|h| h.final_lists.insert(user.clone(), ids));
                break;
            }
        }
    }
}
