//! TLS on the HTTP port: a listener that accepts TCP connections, completes their TLS handshakes
//! on their own tasks (at most [`HANDSHAKES_MAX`] at once, each within [`HANDSHAKE_TIMEOUT`]), and
//! hands axum the streams that finished. Same certificate, CA and client-certificate policy as
//! the gRPC port.

use crate::tls::TlsConfig;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Handshakes in progress at most; further connections wait to be handshaken.
pub const HANDSHAKES_MAX: usize = 256;
/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Finished handshakes waiting for axum to take them.
const READY_MAX: usize = 64;

/// The rustls server settings for `config`.
pub fn acceptor(config: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).with_context(|| format!("read tls.{what} {}", p.display()))
    };
    let certs = CertificateDer::pem_slice_iter(&read("cert", &config.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .context("parse tls.cert")?;
    let key = PrivateKeyDer::from_pem_slice(&read("key", &config.key)?).context("parse tls.key")?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read("ca", &config.ca)?) {
        roots.add(ca.context("parse tls.ca")?).context("add tls.ca")?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let verifier = if config.require_client_cert { verifier } else { verifier.allow_unauthenticated() };
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier.build().context("client certificate verifier")?)
        .with_single_cert(certs, key)
        .context("tls.cert and tls.key")?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// A listener of TLS streams for `axum::serve`; its accept task stops when it is dropped.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_MAX);
        let slots = Arc::new(Semaphore::new(HANDSHAKES_MAX));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTP TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "HTTP TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local, task })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept task ended: nothing will ever come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
