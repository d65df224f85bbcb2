//! The CLI's gRPC client: one connection to `--addr`, a deadline on every call (sent to the server
//! as `grpc-timeout` and enforced locally), and failures turned into [`RpcError`] or
//! [`Unreachable`] so they print as one line and map to a documented exit code.
//!
//! This file must not print anything or interpret answers; commands do that.

use crate::cli::exit::{RpcError, Unreachable, Usage};
use cascade_protocol::pb;
use cascade_protocol::pb::cascade_client::CascadeClient;
use std::future::Future;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

/// Grace on top of the deadline for the local safety-net timer: the channel's own deadline
/// normally fires first and is reported the same way.
const LOCAL_DEADLINE_GRACE: Duration = Duration::from_millis(250);

/// TLS for every connection of this process (`--tls-ca`), set once at start.
static TLS: std::sync::OnceLock<tonic::transport::ClientTlsConfig> = std::sync::OnceLock::new();

/// Connect over TLS, checking servers against the CA in `ca` (PEM) and presenting the client
/// certificate `identity` (PEM cert and key) if given.
pub fn use_tls(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<()> {
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| Usage(format!("read {}: {e}", p.display())));
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
    }
    let _ = TLS.set(tls);
    Ok(())
}

/// `authorization: Bearer <key>` for every call of this process (`--api-key`), set once at start.
static API_KEY: std::sync::OnceLock<tonic::metadata::AsciiMetadataValue> = std::sync::OnceLock::new();

/// Present `key` on every call this process makes.
pub fn use_api_key(key: &str) -> Result<(), Usage> {
    let value =
        format!("Bearer {key}").parse().map_err(|_| Usage("--api-key must be printable ASCII".to_owned()))?;
    let _ = API_KEY.set(value);
    Ok(())
}

/// A connected client with a per-call deadline. Cheap to clone (the channel is shared).
#[derive(Clone)]
pub struct Api {
    client: CascadeClient<Channel>,
    /// Deadline of every call.
    timeout: Duration,
}

/// `host:port` is accepted for `http://host:port` (`https://` with `--tls-ca`).
pub fn normalize_addr(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else if TLS.get().is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

impl Api {
    /// Opens one HTTP/2 connection to `addr`, waiting at most `timeout` for it.
    pub async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<Api> {
        let addr = normalize_addr(addr);
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| Usage(format!("--addr {addr:?} is not a valid URL: {e}")))?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        if let Some(tls) = TLS.get() {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| Usage(format!("TLS: {}", chain(&e))))?;
        }
        let channel =
            endpoint.connect().await.map_err(|e| Unreachable { addr: addr.clone(), detail: chain(&e) })?;
        Ok(Api { client: CascadeClient::new(channel), timeout })
    }

    /// The same connection with another per-call deadline (for calls that take long, such as
    /// membership changes).
    pub fn with_timeout(&self, timeout: Duration) -> Api {
        Api { client: self.client.clone(), timeout }
    }

    /// Deadline of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(key) = API_KEY.get() {
            request.metadata_mut().insert("authorization", key.clone());
        }
        request
    }

    async fn unary<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, RpcError> {
        match tokio::time::timeout(self.timeout + LOCAL_DEADLINE_GRACE, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.rpc_error(rpc, &status)),
            Err(_elapsed) => Err(self.deadline_error(rpc)),
        }
    }

    fn deadline_error(&self, rpc: &'static str) -> RpcError {
        RpcError {
            rpc,
            code: Code::DeadlineExceeded,
            message: format!("no answer within {} ms (raise --timeout-ms?)", self.timeout.as_millis()),
        }
    }

    fn rpc_error(&self, rpc: &'static str, status: &Status) -> RpcError {
        // tonic reports its own client-side deadline as CANCELLED "Timeout expired"; that is our
        // deadline running out, so report it as such.
        if status.code() == Code::Cancelled && status.message() == "Timeout expired" {
            return self.deadline_error(rpc);
        }
        let mut message = status.message().to_owned();
        if message.is_empty() {
            if let Some(source) = std::error::Error::source(status) {
                message = chain(source);
            }
        }
        RpcError { rpc, code: status.code(), message }
    }

    /// StartRevokeJob.
    pub async fn start_revoke_job(
        &self,
        m: pb::StartRevokeJobRequest,
    ) -> Result<pb::RevokeJobInfo, RpcError> {
        let mut c = self.client.clone();
        self.unary("StartRevokeJob", c.start_revoke_job(self.request(m))).await
    }

    /// GetRevokeJob.
    pub async fn get_revoke_job(&self, m: pb::GetRevokeJobRequest) -> Result<pb::RevokeJobInfo, RpcError> {
        let mut c = self.client.clone();
        self.unary("GetRevokeJob", c.get_revoke_job(self.request(m))).await
    }

    /// ListRevokeJobs.
    pub async fn list_revoke_jobs(
        &self,
        m: pb::ListRevokeJobsRequest,
    ) -> Result<pb::ListRevokeJobsResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("ListRevokeJobs", c.list_revoke_jobs(self.request(m))).await
    }

    /// CancelRevokeJob.
    pub async fn cancel_revoke_job(
        &self,
        m: pb::CancelRevokeJobRequest,
    ) -> Result<pb::RevokeJobInfo, RpcError> {
        let mut c = self.client.clone();
        self.unary("CancelRevokeJob", c.cancel_revoke_job(self.request(m))).await
    }

    /// QueryAudit.
    pub async fn query_audit(&self, m: pb::QueryAuditRequest) -> Result<pb::QueryAuditResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("QueryAudit", c.query_audit(self.request(m))).await
    }

    /// RevokeList: a stream of chunks in, progress out. No deadline: it lasts as long as the
    /// file; each chunk is bounded on the server.
    pub async fn revoke_list(
        &self,
        chunks: impl tokio_stream::Stream<Item = pb::RevokeListRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<pb::RevokeJobInfo>, RpcError> {
        let mut c = self.client.clone();
        c.revoke_list(chunks).await.map(Response::into_inner).map_err(|s| self.rpc_error("RevokeList", &s))
    }

    /// WatchRevocations, without a deadline (it runs until the caller stops it).
    pub async fn watch_revocations(
        &self,
        m: pb::WatchRevocationsRequest,
    ) -> Result<tonic::Streaming<pb::WatchRevocationsMessage>, RpcError> {
        let mut c = self.client.clone();
        c.watch_revocations(m)
            .await
            .map(Response::into_inner)
            .map_err(|s| self.rpc_error("WatchRevocations", &s))
    }

    /// CheckSession.
    pub async fn check_session(
        &self,
        m: pb::CheckSessionRequest,
    ) -> Result<pb::CheckSessionResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("CheckSession", c.check_session(self.request(m))).await
    }

    /// CheckSessionBatch.
    pub async fn check_session_batch(
        &self,
        m: pb::CheckSessionBatchRequest,
    ) -> Result<pb::CheckSessionBatchResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("CheckSessionBatch", c.check_session_batch(self.request(m))).await
    }

    /// CreateSession.
    pub async fn create_session(
        &self,
        m: pb::CreateSessionRequest,
    ) -> Result<pb::CreateSessionResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("CreateSession", c.create_session(self.request(m))).await
    }

    /// TouchSession.
    pub async fn touch_session(
        &self,
        m: pb::TouchSessionRequest,
    ) -> Result<pb::TouchSessionResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("TouchSession", c.touch_session(self.request(m))).await
    }

    /// StepUpSession.
    pub async fn step_up_session(
        &self,
        m: pb::StepUpSessionRequest,
    ) -> Result<pb::StepUpSessionResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("StepUpSession", c.step_up_session(self.request(m))).await
    }

    /// RotateRefreshToken.
    pub async fn rotate_refresh_token(
        &self,
        m: pb::RotateRefreshTokenRequest,
    ) -> Result<pb::RotateRefreshTokenResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("RotateRefreshToken", c.rotate_refresh_token(self.request(m))).await
    }

    /// ListUserSessions.
    pub async fn list_user_sessions(
        &self,
        m: pb::ListUserSessionsRequest,
    ) -> Result<pb::ListUserSessionsResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("ListUserSessions", c.list_user_sessions(self.request(m))).await
    }

    /// RevokeSession.
    pub async fn revoke_session(&self, m: pb::RevokeSessionRequest) -> Result<pb::RevokeResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("RevokeSession", c.revoke_session(self.request(m))).await
    }

    /// RevokeFamily.
    pub async fn revoke_family(&self, m: pb::RevokeFamilyRequest) -> Result<pb::RevokeResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("RevokeFamily", c.revoke_family(self.request(m))).await
    }

    /// RevokeDevice.
    pub async fn revoke_device(&self, m: pb::RevokeDeviceRequest) -> Result<pb::RevokeResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("RevokeDevice", c.revoke_device(self.request(m))).await
    }

    /// RevokeUser.
    pub async fn revoke_user(&self, m: pb::RevokeUserRequest) -> Result<pb::RevokeResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("RevokeUser", c.revoke_user(self.request(m))).await
    }

    /// SetWatermark.
    pub async fn set_watermark(
        &self,
        m: pb::SetWatermarkRequest,
    ) -> Result<pb::SetWatermarkResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("SetWatermark", c.set_watermark(self.request(m))).await
    }

    /// NodeStatus.
    pub async fn node_status(&self) -> Result<pb::NodeStatusResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("NodeStatus", c.node_status(self.request(pb::NodeStatusRequest {}))).await
    }

    /// TransferLeader.
    pub async fn transfer_leader(
        &self,
        m: pb::TransferLeaderRequest,
    ) -> Result<pb::TransferLeaderResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("TransferLeader", c.transfer_leader(self.request(m))).await
    }

    /// AddNode.
    pub async fn add_node(&self, m: pb::AddNodeRequest) -> Result<pb::MembershipChangeResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("AddNode", c.add_node(self.request(m))).await
    }

    /// RemoveNode.
    pub async fn remove_node(
        &self,
        m: pb::RemoveNodeRequest,
    ) -> Result<pb::MembershipChangeResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("RemoveNode", c.remove_node(self.request(m))).await
    }

    /// CutLinks (fault injection).
    pub async fn cut_links(&self, m: pb::CutLinksRequest) -> Result<pb::CutLinksResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("CutLinks", c.cut_links(self.request(m))).await
    }

    /// Crash (fault injection): the node exits right after answering.
    pub async fn crash(&self) -> Result<pb::CrashResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("Crash", c.crash(self.request(pb::CrashRequest {}))).await
    }

    /// SetClockOffset (fault injection).
    pub async fn set_clock_offset(
        &self,
        m: pb::SetClockOffsetRequest,
    ) -> Result<pb::SetClockOffsetResponse, RpcError> {
        let mut c = self.client.clone();
        self.unary("SetClockOffset", c.set_clock_offset(self.request(m))).await
    }
}

/// An error and its causes on one line, without repeating a cause already in the message.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}
