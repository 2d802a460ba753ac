//! Node identity and trust: SPIFFE ids, credentials from files, and the rustls
//! configurations that authenticate tunnel peers.
//!
//! A node proves who it is with a certificate whose single URI SAN is
//! `spiffe://<trust-domain>/nodemesh/node/<node>`, chained to the trust
//! bundle. [`Credentials::load`] reads and checks the files once;
//! [`server_config`] and [`client_config`] build TLS 1.3-only rustls configs
//! (ring provider, ALPN `nodemesh/1.1` or `nodemesh/1`) whose verifiers refuse peers with a log
//! line and a count of `nodemesh_tunnel_peer_refused_total{side,reason}`.
//!
//! Reload: configs hold their credentials and bundle by `Arc` and never
//! re-read files; [`reload::Reloader`] polls the files' content, builds new
//! [`Credentials`] ([`Credentials::from_files`]) and configs, and installs
//! them in the tunnel endpoint for new handshakes: open connections keep the
//! config they were made with. It also owns expiry readiness and the
//! certificate metrics.

pub mod certs;
mod leaf;
pub mod reload;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::config::TlsConfig;
use leaf::parse_leaf;
pub use verify::{PeerRefused, RefusalReason, Side, PEER_CERT_EXPIRY_METRIC, PEER_REFUSED_METRIC};

/// ALPN protocol of the tunnel: version 1 framing, one connection per node
/// pair, either side may open streams (`docs/protocol.md` §1).
pub const ALPN: &[u8] = b"nodemesh/1.1";

/// The older ALPN: version 1 framing, one connection per ordered node pair,
/// only the dialling side opens streams. Still spoken, so that a rolling
/// upgrade does not cut nodes of different versions apart.
pub const ALPN_V1: &[u8] = b"nodemesh/1";

/// Every ALPN offered and accepted, most preferred first (a server picks the
/// first of its own list that the client offers).
pub fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![ALPN.to_vec(), ALPN_V1.to_vec()]
}

/// Whether the negotiated ALPN of `conn` lets both sides open streams on it.
pub fn is_shared(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN)
}

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

const FIX_UNREADABLE: &str =
    "check the path in the `tls` config section and the file's permissions";
const FIX_PEM: &str =
    "the file must be PEM (`-----BEGIN ...-----`); `nodemesh certs node NAME` writes valid ones";
const FIX_NO_CERT: &str =
    "the certificate file must hold the node certificate (leaf first, then intermediates)";
const FIX_NO_KEY: &str = "the key file must hold the leaf's PKCS#8, SEC1 or PKCS#1 private key";
const FIX_KEY_MISMATCH: &str =
    "the key does not belong to the certificate: use the key file written together with it";
const FIX_UNSUPPORTED_KEY: &str =
    "use an ECDSA P-256/P-384, Ed25519 or RSA key (`nodemesh certs node` makes P-256)";
const FIX_EMPTY_BUNDLE: &str =
    "the bundle must hold at least one CA certificate (e.g. `ca.pem` from `nodemesh certs init`)";
const FIX_BAD_BUNDLE: &str = "every certificate in the bundle must be a valid CA certificate";
const FIX_WRONG_IDENTITY: &str =
    "issue a certificate for this node and trust domain: `nodemesh certs node <node> --trust-domain <td>`";
const FIX_EXPIRED: &str = "issue a new certificate: `nodemesh certs node <node>`";
const FIX_BAD_CERT: &str =
    "the certificate is not valid X.509 DER inside its PEM block; re-issue it";
const FIX_NOT_SIGNED: &str =
    "the certificate does not chain to the bundle: issue it from the CA in the bundle";
const FIX_TLS: &str =
    "the credentials cannot be used by rustls; re-issue them with `nodemesh certs`";

/// Credentials that cannot be used, naming the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}; {}", FIX_UNREADABLE)]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("{path} is not valid PEM: {reason}; {}", FIX_PEM)]
    BadPem {
        /// The file.
        path: PathBuf,
        /// The PEM parser's complaint.
        reason: String,
    },
    /// The certificate file holds no certificate.
    #[error("{path} holds no certificate; {}", FIX_NO_CERT)]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no private key.
    #[error("{path} holds no private key; {}", FIX_NO_KEY)]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is not the leaf's.
    #[error(
        "the key in {key} does not match the certificate in {cert}; {}",
        FIX_KEY_MISMATCH
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The key's type is not supported by the crypto provider.
    #[error("the key in {path} cannot be used: {reason}; {}", FIX_UNSUPPORTED_KEY)]
    UnsupportedKey {
        /// The key file.
        path: PathBuf,
        /// rustls' complaint.
        reason: String,
    },
    /// The trust bundle holds no certificate.
    #[error("trust bundle {path} holds no CA certificate; {}", FIX_EMPTY_BUNDLE)]
    EmptyBundle {
        /// The bundle file.
        path: PathBuf,
    },
    /// A bundle certificate cannot be a trust anchor.
    #[error(
        "trust bundle {path} has an unusable certificate: {reason}; {}",
        FIX_BAD_BUNDLE
    )]
    BadBundle {
        /// The bundle file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The leaf does not name this node in this trust domain.
    #[error(
        "{path} certifies {found}, expected URI SAN {expected}; {}",
        FIX_WRONG_IDENTITY
    )]
    WrongIdentity {
        /// The certificate file.
        path: PathBuf,
        /// The node id required.
        expected: String,
        /// The URI SANs found (`<none>` if none).
        found: String,
    },
    /// The leaf is expired.
    #[error("{path} expired at unix time {}; {}", leaf::unix_secs(*.not_after), FIX_EXPIRED)]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// Its expiry.
        not_after: SystemTime,
    },
    /// A certificate cannot be parsed.
    #[error("{path} has an invalid certificate: {reason}; {}", FIX_BAD_CERT)]
    BadCertificate {
        /// The certificate file.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    /// The chain does not verify against the bundle.
    #[error(
        "{cert} does not chain to the trust bundle {bundle}: {reason}; {}",
        FIX_NOT_SIGNED
    )]
    NotSignedByBundle {
        /// The certificate file.
        cert: PathBuf,
        /// The bundle file.
        bundle: PathBuf,
        /// webpki's complaint.
        reason: String,
    },
    /// rustls refused to build a configuration from the credentials.
    #[error(
        "cannot build the TLS {what} configuration for node {node}: {reason}; {}",
        FIX_TLS
    )]
    TlsSetup {
        /// `server` or `client`.
        what: &'static str,
        /// This node.
        node: String,
        /// rustls' complaint.
        reason: String,
    },
}

impl IdentityError {
    /// What the operator should do about it.
    pub fn fix(&self) -> &'static str {
        match self {
            IdentityError::Unreadable { .. } => FIX_UNREADABLE,
            IdentityError::BadPem { .. } => FIX_PEM,
            IdentityError::NoCertificate { .. } => FIX_NO_CERT,
            IdentityError::NoPrivateKey { .. } => FIX_NO_KEY,
            IdentityError::KeyMismatch { .. } => FIX_KEY_MISMATCH,
            IdentityError::UnsupportedKey { .. } => FIX_UNSUPPORTED_KEY,
            IdentityError::EmptyBundle { .. } => FIX_EMPTY_BUNDLE,
            IdentityError::BadBundle { .. } => FIX_BAD_BUNDLE,
            IdentityError::WrongIdentity { .. } => FIX_WRONG_IDENTITY,
            IdentityError::Expired { .. } => FIX_EXPIRED,
            IdentityError::BadCertificate { .. } => FIX_BAD_CERT,
            IdentityError::NotSignedByBundle { .. } => FIX_NOT_SIGNED,
            IdentityError::TlsSetup { .. } => FIX_TLS,
        }
    }
}

/// The crypto provider of every nodemesh TLS config: ring, with AES-128-GCM
/// preferred over AES-256-GCM (rustls' default order). Every tunnel packet is
/// sealed and opened with the negotiated AEAD, and AES-128 runs 10 rounds per
/// block against AES-256's 14 (docs/benchmarks.md, "Tuning decisions"); both
/// are TLS 1.3 suites with 128-bit security or more. ChaCha20-Poly1305 stays
/// last, for peers without AES instructions.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let aes128 = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    p.cipher_suites
        .sort_by_key(|s| u8::from(s.suite() != aes128));
    Arc::new(p)
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Unreadable {
        path: path.to_owned(),
        source,
    })
}

fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// The raw contents of the three TLS files, read once: what a reload
/// compares (content, not inode or mtime) and what credentials are built from.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `tls.cert`.
    pub cert: Vec<u8>,
    /// `tls.key`.
    pub key: Vec<u8>,
    /// `tls.bundle`.
    pub bundle: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsFiles")
            .field("cert", &self.cert.len())
            .field("key", &"<redacted>")
            .field("bundle", &self.bundle.len())
            .finish()
    }
}

impl TlsFiles {
    /// Reads the three files named by `tls`.
    pub fn read(tls: &TlsConfig) -> Result<Self, IdentityError> {
        Ok(Self {
            cert: read(&tls.cert)?,
            key: read(&tls.key)?,
            bundle: read(&tls.bundle)?,
        })
    }
}

/// A CA certificate of the trust bundle, for the expiry metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleCa {
    /// Its subject distinguished name, e.g. `O=nodemesh, CN=...`.
    pub subject: String,
    /// Its expiry.
    pub not_after: SystemTime,
}

/// The CA certificates of a bundle file's contents that parse, in file order
/// (the bundle was already checked by [`Credentials::from_files`]).
pub fn bundle_cas(bundle_pem: &[u8]) -> Vec<BundleCa> {
    CertificateDer::pem_slice_iter(bundle_pem)
        .filter_map(Result::ok)
        .filter_map(|der| parse_leaf(&der).ok())
        .map(|info| BundleCa {
            subject: info.subject,
            not_after: info.not_after,
        })
        .collect()
}

impl Credentials {
    /// Loads and checks the files: the leaf must name `node` in `trust_domain`.
    pub fn load(tls: &TlsConfig, trust_domain: &str, node: &str) -> Result<Self, IdentityError> {
        let creds = Self::load_allow_expired(tls, trust_domain, node)?;
        creds.check_not_expired(&tls.cert, SystemTime::now())?;
        Ok(creds)
    }

    /// Like [`Credentials::load`] but accepts an expired leaf, so that a
    /// daemon can still start, report itself not ready, and be refused by its
    /// peers. Every other check applies.
    pub fn load_allow_expired(
        tls: &TlsConfig,
        trust_domain: &str,
        node: &str,
    ) -> Result<Self, IdentityError> {
        Self::from_files(tls, &TlsFiles::read(tls)?, trust_domain, node)
    }

    /// Builds credentials from file contents already read (paths in `tls`
    /// are only named in errors). Accepts an expired leaf, as
    /// [`Credentials::load_allow_expired`]; every other check applies.
    pub fn from_files(
        tls: &TlsConfig,
        files: &TlsFiles,
        trust_domain: &str,
        node: &str,
    ) -> Result<Self, IdentityError> {
        let chain = parse_certs(&tls.cert, &files.cert)?;
        let Some(leaf_der) = chain.first() else {
            return Err(IdentityError::NoCertificate {
                path: tls.cert.clone(),
            });
        };
        let leaf = parse_leaf(leaf_der).map_err(|reason| IdentityError::BadCertificate {
            path: tls.cert.clone(),
            reason,
        })?;
        for (i, der) in chain.iter().enumerate().skip(1) {
            parse_leaf(der).map_err(|reason| IdentityError::BadCertificate {
                path: tls.cert.clone(),
                reason: format!("certificate #{} of the chain: {reason}", i + 1),
            })?;
        }

        let key = match PrivateKeyDer::from_pem_slice(&files.key) {
            Ok(key) => key,
            Err(rustls::pki_types::pem::Error::NoItemsFound) => {
                return Err(IdentityError::NoPrivateKey {
                    path: tls.key.clone(),
                })
            }
            Err(e) => {
                return Err(IdentityError::BadPem {
                    path: tls.key.clone(),
                    reason: e.to_string(),
                })
            }
        };
        let provider = provider();
        match CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(IdentityError::KeyMismatch {
                    cert: tls.cert.clone(),
                    key: tls.key.clone(),
                })
            }
            Err(e) => {
                return Err(IdentityError::UnsupportedKey {
                    path: tls.key.clone(),
                    reason: e.to_string(),
                })
            }
        }

        let bundle = parse_certs(&tls.bundle, &files.bundle)?;
        if bundle.is_empty() {
            return Err(IdentityError::EmptyBundle {
                path: tls.bundle.clone(),
            });
        }
        let mut roots = rustls::RootCertStore::empty();
        for (i, der) in bundle.into_iter().enumerate() {
            roots.add(der).map_err(|e| IdentityError::BadBundle {
                path: tls.bundle.clone(),
                reason: format!("certificate #{}: {e}", i + 1),
            })?;
        }

        let expected = node_spiffe_id(trust_domain, node);
        if leaf.single_uri() != Some(expected.as_str()) {
            return Err(IdentityError::WrongIdentity {
                path: tls.cert.clone(),
                expected,
                found: leaf.describe(),
            });
        }

        // Our own chain must verify against the bundle (peers sharing it
        // would refuse us otherwise). Checked at a time inside the leaf's
        // validity, so that expiry is reported as such and not here.
        let now = SystemTime::now();
        let at = now.clamp(leaf.not_before, leaf.not_after.max(leaf.not_before));
        let at = UnixTime::since_unix_epoch(
            at.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let parsed = rustls::server::ParsedCertificate::try_from(leaf_der).map_err(|e| {
            IdentityError::BadCertificate {
                path: tls.cert.clone(),
                reason: e.to_string(),
            }
        })?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            at,
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| IdentityError::NotSignedByBundle {
            cert: tls.cert.clone(),
            bundle: tls.bundle.clone(),
            reason: e.to_string(),
        })?;

        Ok(Self {
            chain,
            key,
            roots: Arc::new(roots),
            node: node.to_owned(),
            not_after: leaf.not_after,
        })
    }

    /// Whether the leaf is expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now > self.not_after
    }

    /// [`IdentityError::Expired`] naming `cert` if the leaf is expired at `now`.
    pub fn check_not_expired(&self, cert: &Path, now: SystemTime) -> Result<(), IdentityError> {
        if self.is_expired(now) {
            Err(IdentityError::Expired {
                path: cert.to_owned(),
                not_after: self.not_after,
            })
        } else {
            Ok(())
        }
    }

    fn certified_key(
        &self,
        provider: &CryptoProvider,
        what: &'static str,
    ) -> Result<Arc<CertifiedKey>, IdentityError> {
        CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), provider)
            .map(Arc::new)
            .map_err(|e| self.tls_setup(what, e.to_string()))
    }

    fn tls_setup(&self, what: &'static str, reason: String) -> IdentityError {
        IdentityError::TlsSetup {
            what,
            node: self.node.clone(),
            reason,
        }
    }
}

/// Server side of the tunnel: TLS 1.3 only, ALPN ([`alpn_protocols`]), client
/// certificate required, chained to the bundle, naming a known node.
pub fn server_config(
    creds: &Credentials,
    trust_domain: &str,
    known: Arc<dyn KnownNodes>,
) -> Result<rustls::ServerConfig, IdentityError> {
    let provider = provider();
    let verifier =
        verify::NodeClientVerifier::new(trust_domain, known, creds.roots.clone(), provider.clone())
            .map_err(|e| creds.tls_setup("server", e.to_string()))?;
    let certified = creds.certified_key(&provider, "server")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| creds.tls_setup("server", e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = alpn_protocols();
    Ok(config)
}

/// Client side: the server name given to `connect` is the peer's node name;
/// its certificate must chain to the bundle and name exactly that node.
pub fn client_config(
    creds: &Credentials,
    trust_domain: &str,
) -> Result<rustls::ClientConfig, IdentityError> {
    let provider = provider();
    let verifier =
        verify::NodeServerVerifier::new(trust_domain, creds.roots.clone(), provider.clone());
    let certified = creds.certified_key(&provider, "client")?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| creds.tls_setup("client", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = alpn_protocols();
    Ok(config)
}

/// The expiry of a DER certificate, if it parses.
pub fn leaf_not_after(der: &CertificateDer<'_>) -> Option<SystemTime> {
    parse_leaf(der).ok().map(|leaf| leaf.not_after)
}

/// The authenticated peer node of an established tunnel connection.
pub fn peer_node(conn: &quinn::Connection, trust_domain: &str) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = parse_leaf(chain.first()?).ok()?;
    node_from_spiffe_id(trust_domain, leaf.single_uri()?).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::certs::{generate_ca, issue_node, GeneratedCa};
    use super::*;

    const TD: &str = "cluster.local";

    #[test]
    fn provider_prefers_aes_128_gcm_and_keeps_every_tls13_suite() {
        use rustls::CipherSuite as C;
        let p = provider();
        let order: Vec<C> = p.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(order.first(), Some(&C::TLS13_AES_128_GCM_SHA256));
        for suite in [
            C::TLS13_AES_256_GCM_SHA384,
            C::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            assert!(order.contains(&suite), "{suite:?} missing from {order:?}");
        }
        assert_eq!(
            order.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
    }

    /// A temporary directory with a CA and files for node `n1`.
    struct Fixture {
        dir: tempfile::TempDir,
        ca: GeneratedCa,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let ca = generate_ca(TD, 30).expect("ca");
            let f = Self { dir, ca };
            f.write("ca.pem", &f.ca.cert_pem.clone());
            let (cert, key) = issue_node(&f.ca, TD, "n1", 30, 0).expect("issue");
            f.write("n1.pem", &cert);
            f.write("n1-key.pem", &key);
            f
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, contents: &str) {
            std::fs::write(self.path(name), contents).expect("write");
        }

        fn tls(&self) -> TlsConfig {
            TlsConfig {
                cert: self.path("n1.pem"),
                key: self.path("n1-key.pem"),
                bundle: self.path("ca.pem"),
                ..TlsConfig::default()
            }
        }

        fn load(&self) -> Result<Credentials, IdentityError> {
            Credentials::load(&self.tls(), TD, "n1")
        }
    }

    #[test]
    fn loads_a_valid_node_identity() {
        let f = Fixture::new();
        let creds = f.load().expect("valid credentials load");
        assert_eq!(creds.node, "n1");
        assert_eq!(creds.chain.len(), 1);
        assert_eq!(creds.roots.len(), 1);
        assert!(
            creds.not_after > SystemTime::now() + std::time::Duration::from_secs(29 * 24 * 3600)
        );
        assert!(!creds.is_expired(SystemTime::now()));
        server_config(&creds, TD, Arc::new(NoNodes)).expect("server config");
        client_config(&creds, TD).expect("client config");
    }

    #[derive(Debug)]
    struct NoNodes;
    impl KnownNodes for NoNodes {
        fn is_known(&self, _: &str) -> bool {
            false
        }
    }

    #[test]
    fn missing_file_is_unreadable() {
        let f = Fixture::new();
        let mut tls = f.tls();
        tls.key = f.path("absent-key.pem");
        let err = Credentials::load(&tls, TD, "n1").expect_err("missing key");
        assert!(
            matches!(&err, IdentityError::Unreadable { path, .. } if *path == tls.key),
            "{err}"
        );
        assert!(err.to_string().contains("absent-key.pem"), "{err}");
    }

    #[test]
    fn empty_certificate_file_has_no_certificate() {
        let f = Fixture::new();
        f.write("n1.pem", "");
        let err = f.load().expect_err("empty cert");
        assert!(
            matches!(&err, IdentityError::NoCertificate { path } if *path == f.path("n1.pem")),
            "{err}"
        );
    }

    #[test]
    fn certificate_file_holding_a_key_has_no_certificate() {
        let f = Fixture::new();
        let key = std::fs::read_to_string(f.path("n1-key.pem")).expect("read");
        f.write("n1.pem", &key);
        assert!(matches!(f.load(), Err(IdentityError::NoCertificate { .. })));
    }

    #[test]
    fn key_file_without_a_key_has_no_private_key() {
        let f = Fixture::new();
        f.write("n1-key.pem", &f.ca.cert_pem.clone());
        let err = f.load().expect_err("no key");
        assert!(
            matches!(&err, IdentityError::NoPrivateKey { path } if *path == f.path("n1-key.pem")),
            "{err}"
        );
        assert_eq!(err.fix(), FIX_NO_KEY);
    }

    #[test]
    fn key_of_another_certificate_is_a_mismatch() {
        let f = Fixture::new();
        let (_, other_key) = issue_node(&f.ca, TD, "n1", 30, 0).expect("issue");
        f.write("n1-key.pem", &other_key);
        let err = f.load().expect_err("mismatch");
        assert!(
            matches!(&err, IdentityError::KeyMismatch { cert, key } if *cert == f.path("n1.pem") && *key == f.path("n1-key.pem")),
            "{err}"
        );
    }

    #[test]
    fn empty_bundle_is_refused() {
        let f = Fixture::new();
        f.write("ca.pem", "\n");
        let err = f.load().expect_err("empty bundle");
        assert!(
            matches!(&err, IdentityError::EmptyBundle { path } if *path == f.path("ca.pem")),
            "{err}"
        );
    }

    #[test]
    fn certificate_for_another_node_is_the_wrong_identity() {
        let f = Fixture::new();
        let err = Credentials::load(&f.tls(), TD, "n2").expect_err("wrong node");
        match &err {
            IdentityError::WrongIdentity {
                path,
                expected,
                found,
            } => {
                assert_eq!(*path, f.path("n1.pem"));
                assert_eq!(expected, "spiffe://cluster.local/nodemesh/node/n2");
                assert_eq!(found, "spiffe://cluster.local/nodemesh/node/n1");
            }
            other => panic!("expected WrongIdentity, got {other}"),
        }
    }

    #[test]
    fn certificate_for_another_trust_domain_is_the_wrong_identity() {
        let f = Fixture::new();
        let err = Credentials::load(&f.tls(), "other.td", "n1").expect_err("wrong td");
        assert!(matches!(err, IdentityError::WrongIdentity { .. }), "{err}");
    }

    #[test]
    fn expired_certificate_is_refused_unless_allowed() {
        let f = Fixture::new();
        let (cert, key) = issue_node(&f.ca, TD, "n1", 1, 2).expect("issue");
        f.write("n1.pem", &cert);
        f.write("n1-key.pem", &key);
        let err = f.load().expect_err("expired");
        match &err {
            IdentityError::Expired { path, not_after } => {
                assert_eq!(*path, f.path("n1.pem"));
                assert!(*not_after < SystemTime::now());
            }
            other => panic!("expected Expired, got {other}"),
        }
        let creds = Credentials::load_allow_expired(&f.tls(), TD, "n1").expect("allowed");
        assert!(creds.is_expired(SystemTime::now()));
    }

    #[test]
    fn garbage_in_a_certificate_block_is_a_bad_certificate() {
        let f = Fixture::new();
        f.write(
            "n1.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let err = f.load().expect_err("garbage");
        assert!(
            matches!(&err, IdentityError::BadCertificate { path, .. } if *path == f.path("n1.pem")),
            "{err}"
        );
    }

    #[test]
    fn certificate_from_another_ca_is_not_signed_by_the_bundle() {
        let f = Fixture::new();
        let other = generate_ca(TD, 30).expect("ca");
        f.write("ca.pem", &other.cert_pem);
        let err = f.load().expect_err("other CA");
        assert!(
            matches!(err, IdentityError::NotSignedByBundle { .. }),
            "{err}"
        );
    }

    #[test]
    fn node_ids_round_trip() {
        let id = node_spiffe_id(TD, "n1");
        assert_eq!(node_from_spiffe_id(TD, &id), Some("n1"));
        assert_eq!(node_from_spiffe_id("other", &id), None);
        assert_eq!(
            node_from_spiffe_id(TD, "spiffe://cluster.local/nodemesh/node/"),
            None
        );
        assert_eq!(
            node_from_spiffe_id(TD, "spiffe://cluster.local/nodemesh/node/a/b"),
            None
        );
    }
}
