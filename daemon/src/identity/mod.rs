//! Node identity and trust: SPIFFE ids, credentials from files, and the rustls
//! configurations that authenticate tunnel peers.
//!
//! STUB: the API below is the contract; bodies are filled in by the owner.

pub mod certs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// ALPN protocol of the tunnel.
pub const ALPN: &[u8] = b"nodemesh/1";

/// `spiffe://<td>/nodemesh/node/<node>`.
pub fn node_spiffe_id(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/nodemesh/node/{node}")
}

/// The node name in a node SPIFFE id of `trust_domain`, if it is one.
pub fn node_from_spiffe_id<'a>(trust_domain: &str, uri: &'a str) -> Option<&'a str> {
    uri.strip_prefix("spiffe://")?
        .strip_prefix(trust_domain)?
        .strip_prefix("/nodemesh/node/")
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn workload_spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Which node names the cluster knows (from discovery).
pub trait KnownNodes: Send + Sync + std::fmt::Debug + 'static {
    /// Whether `node` is a known node.
    fn is_known(&self, node: &str) -> bool;
}

/// This node's loaded certificate chain, key and trust bundle.
#[derive(Debug)]
pub struct Credentials {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The trust bundle.
    pub roots: Arc<rustls::RootCertStore>,
    /// The node name the leaf certifies.
    pub node: String,
    /// The leaf's expiry.
    pub not_after: SystemTime,
}

/// Credentials that cannot be used, naming the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Placeholder until implemented.
    #[error("not implemented: {0}")]
    Unimplemented(PathBuf),
}

impl Credentials {
    /// Loads and checks the files: the leaf must name `node` in `trust_domain`.
    pub fn load(tls: &TlsConfig, _trust_domain: &str, _node: &str) -> Result<Self, IdentityError> {
        Err(IdentityError::Unimplemented(tls.cert.clone()))
    }
}

/// Server side of the tunnel: TLS 1.3 only, ALPN `nodemesh/1`, client
/// certificate required, chained to the bundle, naming a known node.
pub fn server_config(
    creds: &Credentials,
    _trust_domain: &str,
    _known: Arc<dyn KnownNodes>,
) -> Result<rustls::ServerConfig, IdentityError> {
    Err(IdentityError::Unimplemented(PathBuf::from(&creds.node)))
}

/// Client side: the server name given to `connect` is the peer's node name;
/// its certificate must chain to the bundle and name exactly that node.
pub fn client_config(
    creds: &Credentials,
    _trust_domain: &str,
) -> Result<rustls::ClientConfig, IdentityError> {
    Err(IdentityError::Unimplemented(PathBuf::from(&creds.node)))
}

/// The authenticated peer node of an established tunnel connection.
pub fn peer_node(_conn: &quinn::Connection, _trust_domain: &str) -> Option<String> {
    None
}
