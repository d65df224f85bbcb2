//! TLS on the gRPC port and between nodes (rustls through tonic). A node presents `cert` (with
//! `key`) to clients and to the peers it calls, and checks peers — and clients that present a
//! certificate — against `ca`. With `require_client_cert`, every client must present one signed
//! by `ca` (mutual TLS for all); otherwise clients authenticate with API keys and only nodes
//! must present certificates to each other.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The `[tls]` section: PEM files.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This node's certificate chain; it must name the host of the node's advertised address
    /// (an IP address SAN for an IP).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed every node's certificate (and client certificates, if any).
    pub ca: PathBuf,
    /// Refuse clients that present no certificate signed by `ca`.
    #[serde(default)]
    pub require_client_cert: bool,
}

fn read(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read tls.{what} {}", path.display()))
}

/// The server and peer-client TLS settings of a node.
pub fn load(config: &TlsConfig) -> anyhow::Result<(ServerTlsConfig, ClientTlsConfig)> {
    let identity = Identity::from_pem(read("cert", &config.cert)?, read("key", &config.key)?);
    let ca = Certificate::from_pem(read("ca", &config.ca)?);
    let server = ServerTlsConfig::new()
        .identity(identity.clone())
        .client_ca_root(ca.clone())
        .client_auth_optional(!config.require_client_cert);
    let client = ClientTlsConfig::new().ca_certificate(ca).identity(identity);
    Ok((server, client))
}
