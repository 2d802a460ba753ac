//! The rustls certificate verifiers of the tunnel, both sides, and the
//! accounting of every refused peer (one `warn!` line and one count of
//! `nodemesh_tunnel_peer_refused_total{side,reason}` per refusal).
//!
//! Chains are verified by webpki against the trust bundle; nodemesh then
//! requires the leaf's single URI SAN to be a node SPIFFE id: on the server
//! side a node of this trust domain that discovery knows, on the client side
//! exactly the node that was dialled (the `server_name` given to quinn).
//!
//! An accepted peer certificate sets
//! `nodemesh_tunnel_peer_cert_expiry_timestamp_seconds{side,peer}` to its
//! expiry and is logged at debug with its serial: after a rotation, this shows
//! which certificate a peer presented on a new tunnel.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::leaf::{parse_leaf, LeafInfo};
use super::{node_from_spiffe_id, node_spiffe_id, KnownNodes};

/// Name of the refusal counter.
pub const PEER_REFUSED_METRIC: &str = "nodemesh_tunnel_peer_refused_total";

/// Name of the gauge of the last accepted certificate's expiry, per peer.
pub const PEER_CERT_EXPIRY_METRIC: &str = "nodemesh_tunnel_peer_cert_expiry_timestamp_seconds";

/// Which end of the tunnel refused the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepting node refused a dialling peer's client certificate.
    Server,
    /// The dialling node refused the server certificate of the node it dialled.
    Client,
}

impl Side {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// Why a peer was refused; the `reason` label of the refusal metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The chain does not verify against the trust bundle (unknown CA,
    /// self-signed, bad signature, wrong key usage, unparsable).
    UntrustedChain,
    /// The peer's certificate (or one in its chain) is expired or not yet valid.
    Expired,
    /// The leaf carries no single URI SAN that is a nodemesh node id.
    NoNodeIdentity,
    /// The leaf names a SPIFFE id of another trust domain (server side).
    WrongTrustDomain,
    /// The leaf names a node discovery does not know (server side).
    UnknownNode,
    /// The leaf names another node than the one dialled (client side).
    WrongNode,
}

impl RefusalReason {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::UntrustedChain => "untrusted_chain",
            RefusalReason::Expired => "expired",
            RefusalReason::NoNodeIdentity => "no_node_identity",
            RefusalReason::WrongTrustDomain => "wrong_trust_domain",
            RefusalReason::UnknownNode => "unknown_node",
            RefusalReason::WrongNode => "wrong_node",
        }
    }
}

/// The error handed to rustls (and so surfaced by quinn) for an identity refusal.
#[derive(Debug, thiserror::Error)]
#[error("{side} refused peer {peer}: {reason} ({detail})", side = .side.as_str(), reason = .reason.as_str())]
pub struct PeerRefused {
    /// Which side refused.
    pub side: Side,
    /// Why.
    pub reason: RefusalReason,
    /// The peer's URI SANs as found.
    pub peer: String,
    /// What was expected instead.
    pub detail: String,
}

/// Logs and counts one refusal.
fn record(side: Side, reason: RefusalReason, peer: &str, detail: &str) {
    tracing::warn!(
        side = side.as_str(),
        reason = reason.as_str(),
        peer.identity = peer,
        detail,
        "tunnel peer refused"
    );
    metrics::counter!(PEER_REFUSED_METRIC, "side" => side.as_str(), "reason" => reason.as_str())
        .increment(1);
}

/// Records the certificate of an accepted peer `node`.
fn accepted(side: Side, node: &str, leaf: &LeafInfo) {
    let not_after = super::leaf::unix_secs(leaf.not_after);
    tracing::debug!(
        side = side.as_str(),
        peer = node,
        serial = %leaf.serial,
        not_after,
        "tunnel peer certificate accepted"
    );
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!(PEER_CERT_EXPIRY_METRIC, "side" => side.as_str(), "peer" => node.to_owned())
        .set(not_after as f64);
}

/// Records an identity refusal and builds the rustls error for it.
fn refuse(side: Side, reason: RefusalReason, peer: String, detail: String) -> Error {
    record(side, reason, &peer, &detail);
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(PeerRefused {
        side,
        reason,
        peer,
        detail,
    }))))
}

/// Records a chain verification failure, returning rustls' own error (so the
/// right TLS alert is sent).
fn refuse_chain(side: Side, err: Error, leaf: &CertificateDer<'_>) -> Error {
    let reason = match &err {
        Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => RefusalReason::Expired,
        _ => RefusalReason::UntrustedChain,
    };
    let peer = parse_leaf(leaf)
        .map(|l| l.describe())
        .unwrap_or_else(|_| "<unparsable>".to_owned());
    record(side, reason, &peer, &err.to_string());
    err
}

/// Whether `uri` looks like a nodemesh node id of any trust domain.
fn is_any_node_id(uri: &str) -> bool {
    uri.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, path)| path.starts_with("nodemesh/node/"))
}

/// Server side: requires a client certificate chaining to the bundle and
/// naming a known node of the trust domain.
#[derive(Debug)]
pub(crate) struct NodeClientVerifier {
    trust_domain: String,
    known: Arc<dyn KnownNodes>,
    chain: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
}

impl NodeClientVerifier {
    /// Builds the verifier over `roots`.
    pub(crate) fn new(
        trust_domain: &str,
        known: Arc<dyn KnownNodes>,
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let chain =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            known,
            chain,
            provider,
        })
    }

    /// The identity check after the chain verified.
    fn check_identity(&self, leaf: &LeafInfo) -> Result<(), (RefusalReason, String)> {
        let td = self.trust_domain.as_str();
        let Some(uri) = leaf.single_uri() else {
            return Err((
                RefusalReason::NoNodeIdentity,
                format!("expected one URI SAN spiffe://{td}/nodemesh/node/<node>"),
            ));
        };
        if let Some(node) = node_from_spiffe_id(td, uri) {
            return if self.known.is_known(node) {
                accepted(Side::Server, node, leaf);
                Ok(())
            } else {
                Err((
                    RefusalReason::UnknownNode,
                    format!("node {node:?} is not in discovery"),
                ))
            };
        }
        let peer_td = uri
            .strip_prefix("spiffe://")
            .map(|rest| rest.split('/').next().unwrap_or(""));
        match peer_td {
            Some(peer_td) if peer_td != td => Err((
                RefusalReason::WrongTrustDomain,
                format!("expected trust domain {td:?}, found {peer_td:?}"),
            )),
            _ => Err((
                RefusalReason::NoNodeIdentity,
                format!("expected spiffe://{td}/nodemesh/node/<node>"),
            )),
        }
    }
}

impl ClientCertVerifier for NodeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| refuse_chain(Side::Server, e, end_entity))?;
        let leaf = parse_leaf(end_entity).map_err(|reason| {
            refuse(
                Side::Server,
                RefusalReason::NoNodeIdentity,
                "<unparsable>".to_owned(),
                reason,
            )
        })?;
        self.check_identity(&leaf)
            .map_err(|(reason, detail)| refuse(Side::Server, reason, leaf.describe(), detail))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client side: the server certificate must chain to the bundle and name
/// exactly the node that was dialled.
pub(crate) struct NodeServerVerifier {
    trust_domain: String,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for NodeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeServerVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl NodeServerVerifier {
    /// Builds the verifier over `roots`.
    pub(crate) fn new(
        trust_domain: &str,
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            roots,
            provider,
        }
    }
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)
            .map_err(|e| refuse_chain(Side::Client, e, end_entity))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| refuse_chain(Side::Client, e, end_entity))?;

        let leaf = parse_leaf(end_entity).map_err(|reason| {
            refuse(
                Side::Client,
                RefusalReason::NoNodeIdentity,
                "<unparsable>".to_owned(),
                reason,
            )
        })?;
        let expected = match server_name {
            ServerName::DnsName(name) => node_spiffe_id(&self.trust_domain, name.as_ref()),
            other => {
                return Err(refuse(
                    Side::Client,
                    RefusalReason::WrongNode,
                    leaf.describe(),
                    format!("dialled {other:?}, which is not a node name"),
                ))
            }
        };
        match leaf.single_uri() {
            Some(uri) if uri == expected => {
                if let Some(node) = node_from_spiffe_id(&self.trust_domain, uri) {
                    accepted(Side::Client, node, &leaf);
                }
                Ok(ServerCertVerified::assertion())
            }
            Some(uri) if is_any_node_id(uri) => Err(refuse(
                Side::Client,
                RefusalReason::WrongNode,
                leaf.describe(),
                format!("expected {expected}"),
            )),
            _ => Err(refuse(
                Side::Client,
                RefusalReason::NoNodeIdentity,
                leaf.describe(),
                format!("expected {expected}"),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_of_any_trust_domain_are_recognised() {
        assert!(is_any_node_id("spiffe://other.td/nodemesh/node/n1"));
        assert!(is_any_node_id("spiffe://cluster.local/nodemesh/node/n1"));
        assert!(!is_any_node_id("spiffe://cluster.local/ns/default/sa/x"));
        assert!(!is_any_node_id("https://cluster.local/nodemesh/node/n1"));
    }

    #[test]
    fn labels_are_the_documented_ones() {
        let all = [
            RefusalReason::UntrustedChain,
            RefusalReason::Expired,
            RefusalReason::NoNodeIdentity,
            RefusalReason::WrongTrustDomain,
            RefusalReason::UnknownNode,
            RefusalReason::WrongNode,
        ];
        let labels: Vec<_> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "untrusted_chain",
                "expired",
                "no_node_identity",
                "wrong_trust_domain",
                "unknown_node",
                "wrong_node"
            ]
        );
        assert_eq!(Side::Server.as_str(), "server");
        assert_eq!(Side::Client.as_str(), "client");
    }
}
