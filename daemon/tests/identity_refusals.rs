//! Real quinn handshakes on 127.0.0.1 between node identities: the accepted
//! case, and every refusal asserted on both the handshake outcome and the
//! `nodemesh_tunnel_peer_refused_total{side,reason}` counter.
//!
//! This binary installs a global Prometheus recorder (handshakes run on tokio
//! tasks, out of reach of a thread-local recorder); tests run in parallel, so
//! each asserts that its own (side, reason) series grew.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use nodemesh::identity::certs::{generate_ca, issue_node, GeneratedCa};
use nodemesh::identity::{self, Credentials, KnownNodes};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const TD: &str = "cluster.local";
/// Bound on a whole handshake exchange; loopback handshakes take milliseconds.
const DEADLINE: Duration = Duration::from_secs(20);

fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("install recorder")
    })
}

/// Current value of the refusal counter for (side, reason).
fn refused(side: &str, reason: &str) -> f64 {
    let text = metrics().render();
    text.lines()
        .filter(|l| l.starts_with(identity::PEER_REFUSED_METRIC))
        .filter(|l| {
            l.contains(&format!("side=\"{side}\"")) && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[derive(Debug)]
struct Known(Vec<&'static str>);

impl KnownNodes for Known {
    fn is_known(&self, node: &str) -> bool {
        self.0.contains(&node)
    }
}

/// Credentials straight from PEM, without `load`'s checks (so tests can build
/// identities `load` would refuse).
fn creds(cert_pem: &str, key_pem: &str, bundle: &[&GeneratedCa], node: &str) -> Credentials {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("cert pem");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key pem");
    let mut roots = rustls::RootCertStore::empty();
    for ca in bundle {
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("ca pem"))
            .expect("root");
    }
    Credentials {
        chain,
        key,
        roots: Arc::new(roots),
        node: node.to_owned(),
        not_after: SystemTime::now(),
    }
}

/// A node of `ca`'s PKI, trusting `bundle`.
fn node(
    ca: &GeneratedCa,
    bundle: &[&GeneratedCa],
    td: &str,
    name: &str,
    backdate_days: u32,
) -> Credentials {
    let days = if backdate_days > 0 { 1 } else { 30 };
    let (cert, key) = issue_node(ca, td, name, days, backdate_days).expect("issue");
    creds(&cert, &key, bundle, name)
}

struct Outcome {
    server: Result<quinn::Connection, quinn::ConnectionError>,
    client: Result<quinn::Connection, quinn::ConnectionError>,
    // Kept alive until the outcome is inspected.
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

/// `client` dials `server` on loopback naming `dial`; the server knows `known`.
/// The server validates with trust domain TD; the client with `client_td`.
async fn handshake(
    server: &Credentials,
    client: &Credentials,
    client_td: &str,
    known: &[&'static str],
    dial: &str,
) -> Outcome {
    let _ = metrics();
    let server_tls = identity::server_config(server, TD, Arc::new(Known(known.to_vec())))
        .expect("server config");
    let client_tls = identity::client_config(client, client_td).expect("client config");
    let server_cfg = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_tls).expect("quic server"),
    ));
    let client_cfg = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).expect("quic client"),
    ));
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server_ep = quinn::Endpoint::server(server_cfg, loopback).expect("server endpoint");
    let client_ep = quinn::Endpoint::client(loopback).expect("client endpoint");
    let addr = server_ep.local_addr().expect("server addr");

    let accept = async {
        let incoming = server_ep.accept().await.expect("an incoming connection");
        incoming.await
    };
    let connect = async {
        client_ep
            .connect_with(client_cfg, addr, dial)
            .expect("connect")
            .await
    };
    let (server, client) = tokio::time::timeout(DEADLINE, async { tokio::join!(accept, connect) })
        .await
        .expect("handshake finished within the deadline");
    Outcome {
        server,
        client,
        _endpoints: (server_ep, client_ep),
    }
}

/// The client's view of a refusal by the server: the handshake fails, or the
/// connection the client thought complete is closed by the server.
async fn client_sees_refusal(client: Result<quinn::Connection, quinn::ConnectionError>) {
    if let Ok(conn) = client {
        let reason = tokio::time::timeout(DEADLINE, conn.closed())
            .await
            .expect("closed within the deadline");
        assert!(
            matches!(
                reason,
                quinn::ConnectionError::ConnectionClosed(_)
                    | quinn::ConnectionError::TransportError(_)
            ),
            "{reason:?}"
        );
    }
}

#[tokio::test]
async fn nodes_of_one_ca_open_a_tunnel_and_learn_each_other() {
    let ca = generate_ca(TD, 30).expect("ca");
    let n1 = node(&ca, &[&ca], TD, "n1", 0);
    let n2 = node(&ca, &[&ca], TD, "n2", 0);
    let out = handshake(&n2, &n1, TD, &["n1", "n2"], "n2").await;
    let server = out.server.expect("server accepts n1");
    let client = out.client.expect("client accepts n2");
    assert_eq!(identity::peer_node(&server, TD).as_deref(), Some("n1"));
    assert_eq!(identity::peer_node(&client, TD).as_deref(), Some("n2"));
    assert_eq!(identity::peer_node(&server, "other.td"), None);
    assert_eq!(
        server
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol),
        Some(identity::ALPN.to_vec())
    );
    // A stream works both ways over the authenticated connection.
    let (mut send, mut recv) = client.open_bi().await.expect("open");
    send.write_all(b"ping").await.expect("write");
    send.finish().expect("finish");
    let (mut s_send, mut s_recv) = server.accept_bi().await.expect("accept");
    assert_eq!(s_recv.read_to_end(16).await.expect("read"), b"ping");
    s_send.write_all(b"pong").await.expect("write");
    s_send.finish().expect("finish");
    assert_eq!(recv.read_to_end(16).await.expect("read"), b"pong");
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused_as_untrusted_chain() {
    let ca = generate_ca(TD, 30).expect("ca");
    let rogue = generate_ca(TD, 30).expect("rogue ca");
    let server = node(&ca, &[&ca], TD, "n2", 0);
    // The rogue trusts the real CA too, so only the server can refuse.
    let client = node(&rogue, &[&ca, &rogue], TD, "n1", 0);
    let before = refused("server", "untrusted_chain");
    let out = handshake(&server, &client, TD, &["n1", "n2"], "n2").await;
    assert!(
        out.server.is_err(),
        "server must refuse a client from another CA"
    );
    client_sees_refusal(out.client).await;
    assert!(refused("server", "untrusted_chain") > before);
}

#[tokio::test]
async fn server_cert_from_another_ca_is_refused_by_the_client() {
    let ca = generate_ca(TD, 30).expect("ca");
    let rogue = generate_ca(TD, 30).expect("rogue ca");
    let server = node(&rogue, &[&ca, &rogue], TD, "n2", 0);
    let client = node(&ca, &[&ca], TD, "n1", 0);
    let before = refused("client", "untrusted_chain");
    let out = handshake(&server, &client, TD, &["n1", "n2"], "n2").await;
    assert!(out.client.is_err());
    assert!(out.server.is_err());
    assert!(refused("client", "untrusted_chain") > before);
}

#[tokio::test]
async fn client_naming_an_unknown_node_is_refused() {
    let ca = generate_ca(TD, 30).expect("ca");
    let server = node(&ca, &[&ca], TD, "n2", 0);
    let client = node(&ca, &[&ca], TD, "n3", 0);
    let before = refused("server", "unknown_node");
    let out = handshake(&server, &client, TD, &["n1", "n2"], "n2").await;
    assert!(
        out.server.is_err(),
        "server must refuse a node discovery does not know"
    );
    client_sees_refusal(out.client).await;
    assert!(refused("server", "unknown_node") > before);
}

#[tokio::test]
async fn client_of_another_trust_domain_is_refused() {
    let ca = generate_ca(TD, 30).expect("ca");
    let server = node(&ca, &[&ca], TD, "n2", 0);
    let client = node(&ca, &[&ca], "other.td", "n1", 0);
    let before = refused("server", "wrong_trust_domain");
    let out = handshake(&server, &client, TD, &["n1", "n2"], "n2").await;
    assert!(out.server.is_err());
    client_sees_refusal(out.client).await;
    assert!(refused("server", "wrong_trust_domain") > before);
}

#[tokio::test]
async fn client_without_a_node_identity_is_refused() {
    let ca = generate_ca(TD, 30).expect("ca");
    let server = node(&ca, &[&ca], TD, "n2", 0);
    // A workload identity, signed by the right CA, is not a node identity.
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity::workload_spiffe_id(TD, "default", "web")
            .try_into()
            .expect("uri"),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &ca.cert_pem,
        rcgen::KeyPair::from_pem(&ca.key_pem).expect("ca key"),
    )
    .expect("issuer");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let client = creds(&cert.pem(), &key.serialize_pem(), &[&ca], "web");
    let before = refused("server", "no_node_identity");
    let out = handshake(&server, &client, TD, &["n1", "n2"], "n2").await;
    assert!(out.server.is_err());
    client_sees_refusal(out.client).await;
    assert!(refused("server", "no_node_identity") > before);
}

#[tokio::test]
async fn server_presenting_another_node_is_refused_as_wrong_node() {
    let ca = generate_ca(TD, 30).expect("ca");
    let impostor = node(&ca, &[&ca], TD, "n3", 0);
    let client = node(&ca, &[&ca], TD, "n1", 0);
    let before = refused("client", "wrong_node");
    let out = handshake(&impostor, &client, TD, &["n1", "n2", "n3"], "n2").await;
    let err = out
        .client
        .expect_err("client must refuse a server that is not the node dialled");
    assert!(out.server.is_err());
    assert!(format!("{err:?}").contains("WrongNode"), "{err:?}");
    assert!(refused("client", "wrong_node") > before);
}

#[tokio::test]
async fn expired_server_cert_is_refused_by_the_client() {
    let ca = generate_ca(TD, 30).expect("ca");
    let server = node(&ca, &[&ca], TD, "n2", 2);
    let client = node(&ca, &[&ca], TD, "n1", 0);
    let before = refused("client", "expired");
    let out = handshake(&server, &client, TD, &["n1", "n2"], "n2").await;
    assert!(out.client.is_err());
    assert!(out.server.is_err());
    assert!(refused("client", "expired") > before);
}

#[tokio::test]
async fn expired_client_cert_is_refused_by_the_server() {
    let ca = generate_ca(TD, 30).expect("ca");
    let server = node(&ca, &[&ca], TD, "n2", 0);
    let client = node(&ca, &[&ca], TD, "n1", 2);
    let before = refused("server", "expired");
    let out = handshake(&server, &client, TD, &["n1", "n2"], "n2").await;
    assert!(out.server.is_err());
    client_sees_refusal(out.client).await;
    assert!(refused("server", "expired") > before);
}
