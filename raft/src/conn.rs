//! The connection seam: how a node accepts and opens byte streams. Production uses TCP; the
//! simulator passes its simulated TCP here, so the same tonic services and clients run on it.

use futures::future::BoxFuture;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream of any kind.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A boxed byte stream that tonic can serve on and connect through.
pub struct Conn(Box<dyn Stream>);

impl Conn {
    pub fn new(stream: impl Stream) -> Conn {
        Conn(Box::new(stream))
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// Opens a stream to `host:port`.
pub type Dialer = Arc<dyn Fn(String) -> BoxFuture<'static, io::Result<Conn>> + Send + Sync>;

/// A tonic channel to `addr` (`host:port`) through `dial`, connected lazily; tonic reconnects
/// with backoff.
pub fn lazy_channel(
    endpoint: tonic::transport::Endpoint,
    addr: &str,
    dial: Dialer,
) -> tonic::transport::Channel {
    let addr = addr.to_owned();
    // h2 forgets a reset stream after an interval of the host's clock (1 s), and answers late
    // frames of a forgotten one with a RST_STREAM: whether that extra frame is sent would
    // depend on how fast the machine ran a simulation. Remember them for good instead (late
    // frames are then always dropped, as a fast run does); simulated runs are finite.
    let endpoint = endpoint
        .http2_reset_stream_duration(std::time::Duration::from_secs(365 * 86_400))
        .http2_max_concurrent_reset_streams(usize::MAX);
    endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
        let dial = Arc::clone(&dial);
        let addr = addr.clone();
        async move { dial(addr).await.map(hyper_util::rt::TokioIo::new) }
    }))
}
