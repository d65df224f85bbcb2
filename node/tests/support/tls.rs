//! Test certificates: a CA, a certificate for the nodes (127.0.0.1 and localhost) and one for a
//! client, written as PEM files to a temp dir; and TLS clients.

use super::{poll_until, Client, RPC_TIMEOUT};
use cascade_node::tls::TlsConfig;
use cascade_protocol::pb::cascade_client::CascadeClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// PEM files under one temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issue = |names: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let cert =
                CertificateParams::new(names).expect("params").signed_by(&key, &ca, &ca_key).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (node_cert, node_key) = issue(vec!["127.0.0.1".into(), "localhost".into()]);
        let (client_cert, client_key) = issue(vec!["gateway.test".into()]);
        let write = |name: &str, pem: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write PEM");
            path
        };
        Pki {
            ca: write("ca.pem", &ca.pem()),
            node_cert: write("node.pem", &node_cert),
            node_key: write("node.key", &node_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            dir,
        }
    }

    /// A node's `[tls]` section.
    pub fn node_config(&self, require_client_cert: bool) -> TlsConfig {
        TlsConfig {
            cert: self.node_cert.clone(),
            key: self.node_key.clone(),
            ca: self.ca.clone(),
            require_client_cert,
        }
    }

    /// The client certificate and key.
    pub fn client_identity(&self) -> (&Path, &Path) {
        (&self.client_cert, &self.client_key)
    }
}

/// TLS settings of a client trusting `ca`, presenting `identity` if given.
pub fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTlsConfig {
    let read = |p: &Path| std::fs::read(p).expect("read PEM");
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    tls
}

/// One attempt to connect over TLS.
pub async fn try_connect(addr: SocketAddr, tls: ClientTlsConfig) -> Result<Client, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint uri")
        .tls_config(tls)?
        .connect_timeout(RPC_TIMEOUT)
        .timeout(RPC_TIMEOUT)
        .connect()
        .await?;
    Ok(CascadeClient::new(channel))
}

/// A TLS client of `addr`, retrying until the port accepts.
pub async fn connect(addr: SocketAddr, ca: &Path, identity: Option<(&Path, &Path)>) -> Client {
    let tls = client_tls(ca, identity);
    poll_until(&format!("a TLS connection to {addr}"), super::STATE_DEADLINE, || {
        let tls = tls.clone();
        async move { try_connect(addr, tls).await.ok() }
    })
    .await
}

/// One HTTP/1.1 exchange over TLS with `addr` (checked against `ca`): the raw answer.
pub async fn https_exchange(addr: SocketAddr, ca: &Path, request: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&std::fs::read(ca)?) {
        roots.add(c.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::try_from("127.0.0.1").map_err(|e| bad(e.to_string()))?;
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(request.as_bytes()).await?;
        let mut out = Vec::new();
        // A server may close without close_notify: keep what arrived.
        let _ = tls.read_to_end(&mut out).await;
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(RPC_TIMEOUT, exchange).await.unwrap_or_else(|_| {
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTPS exchange timed out"))
    })
}
