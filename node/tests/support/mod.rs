//! Shared helpers of the node integration tests: an in-process node on a temp dir and a loopback
//! port, a `cascade serve` child process that dies with its guard, a client with deadlines, a
//! bounded poll, and builders for the requests every test repeats.
//!
//! Nothing here waits for state by sleeping: waiting is always a poll with a deadline.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

pub mod cluster;
pub mod dpop;
pub mod http;
pub mod roles;
pub mod tls;

use cascade_node::config::NodeConfig;
use cascade_node::seams::{Clock, Seams};
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use sha2::{Digest, Sha256};
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// A connected client of the public API.
pub type Client = CascadeClient<Channel>;

/// Shards per test node: few, so a node starts in well under a second.
pub const SHARDS: u16 = 4;
/// Node id of the `cascade serve` child processes (one process each, so ids cannot clash).
pub const NODE_ID: u64 = 1;

/// Next node id for an in-process node. Ractor's registry is process-wide and actor names carry
/// the node id, so in-process nodes that run at the same time need distinct ids.
static NEXT_NODE_ID: AtomicU64 = AtomicU64::new(1);
/// How long a node may take to answer NodeStatus with a leader on every shard.
pub const READY_DEADLINE: Duration = Duration::from_secs(20);
/// How long any other awaited state (expiry, shutdown) may take.
pub const STATE_DEADLINE: Duration = Duration::from_secs(20);
/// Deadline of one RPC.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two attempts of a poll (a retry interval, not a wait for state).
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How long to keep trying to connect; each attempt is bounded by `RPC_TIMEOUT`.
const CONNECT_DEADLINE: Duration = Duration::from_secs(20);

/// One hour, the lifetime of sessions that must not expire during a test.
pub const HOUR_MS: u64 = 3_600_000;

/// Milliseconds since the Unix epoch on this machine (the node reads the same clock).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

/// Call `attempt` until it returns `Some`, at most until `deadline` has passed; panics naming
/// `what` on timeout. The loop is bounded by the deadline.
pub async fn poll_until<T, F, Fut>(what: &str, deadline: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Call `rpc` until it returns something other than UNAVAILABLE (the answer of a replica that
/// cannot prove freshness, e.g. while a starved machine delays its proofs), at most until
/// `STATE_DEADLINE`; other errors and the last UNAVAILABLE are returned as they are.
pub async fn retry_unavailable<T, F, Fut>(mut rpc: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let start = Instant::now();
    loop {
        match rpc().await {
            Err(s) if s.code() == Code::Unavailable && start.elapsed() < STATE_DEADLINE => {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            result => return result,
        }
    }
}

/// Return once this machine's clock reads later than `ms`, so the next write is stamped strictly
/// after a previous one (order by creation time is then unambiguous). Bounded by a deadline.
pub async fn after_ms(ms: u64) {
    poll_until("the clock to tick", STATE_DEADLINE, || async move { (now_ms() > ms).then_some(()) }).await;
}

/// An RFC 7638 SHA-256 thumbprint shape: the unpadded base64url of SHA-256(`seed`), 43 chars.
pub fn jkt(seed: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let digest = Sha256::digest(seed.as_bytes());
    let mut out = String::with_capacity(43);
    let (mut acc, mut n_bits) = (0u32, 0u32);
    for &byte in digest.iter() {
        acc = (acc << 8) | u32::from(byte);
        n_bits += 8;
        while n_bits >= 6 {
            n_bits -= 6;
            out.push(char::from(ALPHABET[((acc >> n_bits) & 0x3f) as usize]));
        }
    }
    if n_bits > 0 {
        out.push(char::from(ALPHABET[((acc << (6 - n_bits)) & 0x3f) as usize]));
    }
    assert_eq!(out.len(), 43);
    out
}

/// A well-formed session id that no node ever issued (the nonce is fixed, not random).
pub fn unknown_session_id(shard: u16) -> String {
    format!("cs_{shard:04x}{:032x}", 0x0123_4567_89ab_cdef_0123_4567_89ab_cdefu128)
}

/// Whether a printed session id has the documented shape: `cs_` + 36 lowercase hex digits.
pub fn is_session_id(s: &str) -> bool {
    s.strip_prefix("cs_").is_some_and(|hex| {
        hex.len() == 36 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The generation a printed refresh token `rt_<36 hex>_<8 hex>_<32 hex>` carries.
pub fn refresh_generation(token: &str) -> u32 {
    let parts: Vec<&str> = token.split('_').collect();
    assert_eq!(parts.len(), 4, "refresh token shape: {token}");
    assert_eq!(parts[0], "rt", "refresh token prefix: {token}");
    assert_eq!(parts[1].len(), 36, "refresh token session part: {token}");
    assert_eq!(parts[2].len(), 8, "refresh token generation part: {token}");
    assert_eq!(parts[3].len(), 32, "refresh token secret part: {token}");
    u32::from_str_radix(parts[2], 16).expect("hex generation")
}

/// The session a refresh token belongs to.
pub fn refresh_session_id(token: &str) -> String {
    let parts: Vec<&str> = token.split('_').collect();
    format!("cs_{}", parts[1])
}

/// The configuration every test starts from: one node with an id of its own, `SHARDS` shards,
/// loopback, `data_dir`. Restart a node on the same data dir with the same config (same id).
pub fn test_config(data_dir: &Path) -> NodeConfig {
    NodeConfig {
        node_id: NEXT_NODE_ID.fetch_add(1, Ordering::Relaxed),
        listen: "127.0.0.1:0".parse().expect("loopback address"),
        data_dir: data_dir.to_path_buf(),
        shards: SHARDS,
        region: "test-region".to_owned(),
        ..NodeConfig::default()
    }
}

/// A clock that only moves when a test moves it, for exact expiry boundaries without waiting.
/// It starts at the real time, so ids and stamps look ordinary.
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicU64::new(now_ms())))
    }

    /// Move the clock forward by `ms`; returns the new time.
    pub fn advance(&self, ms: u64) -> u64 {
        self.0.fetch_add(ms, Ordering::SeqCst) + ms
    }

    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now()
    }
}

/// A node running inside the test process until `stop` or drop.
pub struct InProcessNode {
    pub addr: SocketAddr,
    pub config: NodeConfig,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// How `run` failed, if it returned an error (kept so a test waiting on the node can say why).
    failed: Arc<std::sync::Mutex<Option<String>>>,
}

impl InProcessNode {
    /// Bind `127.0.0.1:0`, then run a node with `config` (its `listen` set to the bound address)
    /// on production storage in `config.data_dir`.
    pub async fn start(config: NodeConfig) -> InProcessNode {
        Self::start_with_clock(config, None).await
    }

    /// As [`InProcessNode::start`], with `clock` instead of the system clock when given.
    pub async fn start_with_clock(mut config: NodeConfig, clock: Option<Arc<dyn Clock>>) -> InProcessNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        config.listen = addr;
        let mut seams = Seams::production(listener, &config.data_dir, config.node_id);
        if config.http_listen.is_some() {
            let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0 (HTTP)");
            config.http_listen = Some(http.local_addr().expect("bound HTTP address"));
            seams.http_listener = Some(http);
        }
        if let Some(clock) = clock {
            seams.clock = clock;
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let run_config = config.clone();
        let failed = Arc::new(std::sync::Mutex::new(None));
        let failed_in_task = failed.clone();
        let task = tokio::spawn(async move {
            let result = cascade_node::run(run_config, seams, async move {
                // A dropped sender also means "stop".
                let _ = rx.await;
            })
            .await;
            if let Err(e) = &result {
                *failed_in_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
            }
            result
        });
        InProcessNode { addr, config, shutdown: Some(tx), task: Some(task), failed }
    }

    /// A client connected to this node, returned once every shard has a leader. Panics with the
    /// node's error if it stops first.
    pub async fn client(&self) -> Client {
        let ready = async {
            let mut client = connect(self.addr).await;
            wait_ready(&mut client, self.config.shards).await;
            client
        };
        tokio::pin!(ready);
        loop {
            tokio::select! {
                client = &mut ready => return client,
                () = tokio::time::sleep(POLL_INTERVAL) => {
                    if let Some(error) = self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                        panic!("node at {} stopped before it served: {error}", self.addr);
                    }
                }
            }
        }
    }

    /// Graceful shutdown: signal it and wait, within a deadline, for `run` to return `Ok`.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("running node");
        let joined = tokio::time::timeout(STATE_DEADLINE, task)
            .await
            .unwrap_or_else(|_| panic!("node did not stop within {STATE_DEADLINE:?} of its shutdown signal"));
        joined.expect("node task panicked").expect("node run returned an error");
    }
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An in-process node together with the temp dir holding its data; both go on drop.
pub struct TestNode {
    pub node: InProcessNode,
    pub client: Client,
    // Declared last so the node is dropped before its directory.
    pub dir: tempfile::TempDir,
}

impl TestNode {
    /// A node with `test_config`.
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    /// A node with `test_config` changed by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut NodeConfig)) -> TestNode {
        Self::start_with_clock(adjust, None).await
    }

    /// A node with `test_config` changed by `adjust`, on `clock` when given.
    pub async fn start_with_clock(
        adjust: impl FnOnce(&mut NodeConfig),
        clock: Option<Arc<dyn Clock>>,
    ) -> TestNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let node = InProcessNode::start_with_clock(config, clock).await;
        let client = node.client().await;
        TestNode { node, client, dir }
    }
}

/// Connect to `addr` with a per-request deadline, retrying until the port accepts.
pub async fn connect(addr: SocketAddr) -> Client {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint uri")
        .connect_timeout(RPC_TIMEOUT)
        .timeout(RPC_TIMEOUT);
    let channel = poll_until(&format!("a connection to {addr}"), CONNECT_DEADLINE, || {
        let endpoint = endpoint.clone();
        async move { endpoint.connect().await.ok() }
    })
    .await;
    CascadeClient::new(channel)
}

/// Wait until NodeStatus answers with `n_shards` shards, each with a leader.
pub async fn wait_ready(client: &mut Client, n_shards: u16) -> pb::NodeStatusResponse {
    poll_until("NodeStatus with a leader and a fresh replica on every shard", READY_DEADLINE, || {
        let mut client = client.clone();
        async move {
            let status = client.node_status(pb::NodeStatusRequest {}).await.ok()?.into_inner();
            let all_led = status.n_shards == u32::from(n_shards)
                && status.shards.len() == usize::from(n_shards)
                && status.shards.iter().all(|s| s.leader != 0 && s.fresh);
            all_led.then_some(status)
        }
    })
    .await
}

/// The log of a child process, for failure messages.
fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<no log at {}: {e}>", path.display()))
}

/// A `cascade serve` child process, killed (SIGKILL) and reaped on drop.
pub struct ServerProcess {
    pub addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

impl ServerProcess {
    /// Start `cascade serve` on `addr` with `data_dir`; its output goes to `log`.
    pub fn spawn(addr: SocketAddr, data_dir: &Path, log: &Path) -> ServerProcess {
        Self::spawn_with_config(addr, data_dir, log, None)
    }

    /// As [`ServerProcess::spawn`], with a TOML config file that the flags override.
    pub fn spawn_with_config(
        addr: SocketAddr,
        data_dir: &Path,
        log: &Path,
        config: Option<&Path>,
    ) -> ServerProcess {
        let log_file =
            std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open child log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_cascade"));
        command.arg("serve");
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let child = command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--shards")
            .arg(SHARDS.to_string())
            .arg("--node-id")
            .arg(NODE_ID.to_string())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file)
            .spawn()
            .expect("spawn cascade serve");
        ServerProcess { addr, child: Some(child), log: log.to_path_buf() }
    }

    /// A client once the child answers NodeStatus with a leader on every shard; fails with the
    /// child's log if it exited instead.
    pub async fn client(&mut self) -> Client {
        let addr = self.addr;
        let start = Instant::now();
        loop {
            if let Some(exit) = self.child.as_mut().and_then(|c| c.try_wait().expect("poll child")) {
                panic!("cascade serve exited with {exit} before it was ready; log:\n{}", read_log(&self.log));
            }
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint uri")
                .connect_timeout(RPC_TIMEOUT)
                .timeout(RPC_TIMEOUT);
            if let Ok(channel) = endpoint.connect().await {
                let mut client = CascadeClient::new(channel);
                if let Ok(status) = client.node_status(pb::NodeStatusRequest {}).await {
                    let status = status.into_inner();
                    if status.shards.len() == usize::from(SHARDS)
                        && status.shards.iter().all(|s| s.leader != 0)
                    {
                        return client;
                    }
                }
            }
            assert!(
                start.elapsed() < READY_DEADLINE,
                "cascade serve not ready within {READY_DEADLINE:?}; log:\n{}",
                read_log(&self.log)
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGKILL the child (`Child::kill` on Unix) and reap it: no chance to flush anything.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL cascade serve");
            child.wait().expect("reap cascade serve");
        }
    }

    /// The child's output so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback address with a port that was free a moment ago (bound to 127.0.0.1:0, then
/// released), never one handed out before in this process: tests run concurrently, and a node
/// stopped to be restarted on its port must not find another test's node there (the clusters
/// then replicated into each other, and openraft asserted).
pub fn free_loopback_addr() -> SocketAddr {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1_000 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        if HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner()).insert(addr.port()) {
            return addr;
        }
    }
    panic!("no loopback port left that this process has not used")
}

/// Assert that `result` failed with `code`, and return the message.
#[track_caller]
pub fn expect_code<T: Debug>(result: Result<T, Status>, code: Code, context: &str) -> String {
    match result {
        Ok(value) => panic!("{context}: expected {code:?}, got OK {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{context}: wrong code, message {:?}", status.message());
            status.message().to_owned()
        }
    }
}

/// Assert INVALID_ARGUMENT whose message names `field`.
#[track_caller]
pub fn expect_invalid<T: Debug>(result: Result<T, Status>, field: &str, context: &str) {
    let message = expect_code(result, Code::InvalidArgument, context);
    assert!(message.contains(field), "{context}: message {message:?} does not name the field {field:?}");
}

/// A create request for an unbound root session of one hour at aal 1.
pub fn create_req(tenant: &str, user_id: &str, client_id: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        tenant: tenant.to_owned(),
        user_id: user_id.to_owned(),
        client_id: client_id.to_owned(),
        device_id: String::new(),
        jkt: String::new(),
        aal: 1,
        amr: vec!["pwd".to_owned()],
        ttl_ms: HOUR_MS,
        idle_timeout_ms: 0,
        parent_session_id: String::new(),
        with_refresh_token: false,
        metadata: Some(pb::SessionMetadata {
            ip: "192.0.2.1".to_owned(),
            user_agent: "cascade-tests".to_owned(),
            region: "test-region".to_owned(),
        }),
    }
}

/// `req` bound to `device_id` with key thumbprint `jkt`.
pub fn bound(mut req: pb::CreateSessionRequest, device_id: &str, jkt: &str) -> pb::CreateSessionRequest {
    req.device_id = device_id.to_owned();
    req.jkt = jkt.to_owned();
    req
}

/// `req` as an SSO child of `parent`.
pub fn child_of(mut req: pb::CreateSessionRequest, parent: &str) -> pb::CreateSessionRequest {
    req.parent_session_id = parent.to_owned();
    req
}

/// `req` with a refresh-token family.
pub fn with_refresh(mut req: pb::CreateSessionRequest) -> pb::CreateSessionRequest {
    req.with_refresh_token = true;
    req
}

/// Create, expecting success.
pub async fn create(client: &mut Client, req: pb::CreateSessionRequest) -> pb::CreateSessionResponse {
    let what = format!("create {}/{}", req.tenant, req.user_id);
    client.create_session(req).await.unwrap_or_else(|s| panic!("{what}: {s:?}")).into_inner()
}

/// A check request.
pub fn check_req(session_id: &str, jkt: &str, required_aal: u32) -> pb::CheckSessionRequest {
    pb::CheckSessionRequest {
        session_id: session_id.to_owned(),
        jkt: jkt.to_owned(),
        required_aal,
        linearizable: false,
    }
}

/// Check without key or assurance requirement, expecting an answer.
pub async fn check(client: &mut Client, session_id: &str) -> pb::CheckSessionResponse {
    check_with(client, session_id, "", 0).await
}

/// Check with a key thumbprint and an assurance requirement, expecting an answer.
pub async fn check_with(
    client: &mut Client,
    session_id: &str,
    jkt: &str,
    required_aal: u32,
) -> pb::CheckSessionResponse {
    client
        .check_session(check_req(session_id, jkt, required_aal))
        .await
        .unwrap_or_else(|s| panic!("check {session_id}: {s:?}"))
        .into_inner()
}

/// A revocation with `reason`, an actor and a text.
pub fn revocation(reason: pb::ReasonCode) -> Option<pb::Revocation> {
    Some(pb::Revocation {
        reason: reason as i32,
        text: "integration test".to_owned(),
        actor: "tests".to_owned(),
    })
}

/// Assert a check answered REVOKED with `reason`.
#[track_caller]
pub fn assert_revoked(resp: &pb::CheckSessionResponse, reason: pb::ReasonCode, what: &str) {
    assert_eq!(resp.status(), pb::CheckStatus::Revoked, "{what}: {resp:?}");
    assert_eq!(resp.reason(), reason, "{what}: {resp:?}");
}

/// Assert a check answered VALID.
#[track_caller]
pub fn assert_valid(resp: &pb::CheckSessionResponse, what: &str) {
    assert_eq!(resp.status(), pb::CheckStatus::Valid, "{what}: {resp:?}");
}

/// Sorted copy of `ids`, for comparing sets of session ids.
pub fn sorted(ids: &[String]) -> Vec<String> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids
}

/// Sorted owned ids from string slices.
pub fn sorted_ids(ids: &[&str]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    ids.sort();
    ids
}
