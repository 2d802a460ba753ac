//! The QUIC mTLS tunnel between nodes.
//!
//! Owns the quinn endpoint (UDP socket, transport tuning) and the pool of
//! connections to peers: one connection per peer node, dialled on first use
//! and reused; concurrent first uses share one handshake (a per-peer async
//! lock held across the dial); a closed connection is replaced on next use.
//! The stream header codec lives in [`header`].
//!
//! TLS configurations are swappable (certificate rotation, see
//! `identity::reload`): [`Tunnels::set_tls`] installs new ones for new
//! handshakes on both sides; open connections keep theirs.

pub mod header;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    congestion, Connection, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig,
    TransportConfig, VarInt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::config::{Congestion, TunnelConfig};
use crate::metrics as m;

/// Tunnel failures on the dialling side.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The UDP socket could not be set up.
    #[error("cannot bind the tunnel UDP socket on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A setting cannot be expressed in QUIC.
    #[error("tunnel setting {field}: {problem}")]
    Setting {
        /// Config field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The TLS configuration is not usable for QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Tls(String),
    /// Dialling could not start.
    #[error("cannot dial peer {peer} at {addr}: {source}")]
    Connect {
        /// Peer node.
        peer: String,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The handshake failed (including certificate refusal).
    #[error("handshake with peer {peer} at {addr} failed: {source}")]
    Handshake {
        /// Peer node.
        peer: String,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// The handshake did not finish in time.
    #[error("handshake with peer {peer} at {addr} timed out after {timeout:?}")]
    HandshakeTimeout {
        /// Peer node.
        peer: String,
        /// Its address.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
}

type Slot = Arc<Mutex<Option<Connection>>>;

/// The endpoint and the pool of outbound tunnel connections.
#[derive(Debug)]
pub struct Tunnels {
    endpoint: Endpoint,
    transport: Arc<TransportConfig>,
    /// Used by every new dial; replaced by [`Tunnels::set_tls`].
    client: RwLock<quinn::ClientConfig>,
    peers: DashMap<String, Slot>,
    handshake_timeout: Duration,
}

/// The transport settings both sides use (DESIGN §10).
pub fn transport_config(cfg: &TunnelConfig) -> Result<TransportConfig, TunnelError> {
    let var = |field, v: u64| {
        VarInt::from_u64(v).map_err(|_| TunnelError::Setting {
            field,
            problem: format!("{v} is too large"),
        })
    };
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(var("tunnel.stream_window", cfg.stream_window)?)
        .receive_window(var("tunnel.connection_window", cfg.connection_window)?)
        .send_window(cfg.connection_window)
        .keep_alive_interval(Some(Duration::from_millis(cfg.keep_alive_ms)))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(Duration::from_millis(cfg.idle_timeout_ms)).map_err(|e| {
                TunnelError::Setting {
                    field: "tunnel.idle_timeout_ms",
                    problem: e.to_string(),
                }
            })?,
        ))
        .enable_segmentation_offload(true)
        .initial_mtu(cfg.initial_mtu);
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    let factory: Arc<dyn congestion::ControllerFactory + Send + Sync> = match cfg.congestion {
        Congestion::Cubic => Arc::new(congestion::CubicConfig::default()),
        Congestion::NewReno => Arc::new(congestion::NewRenoConfig::default()),
        Congestion::Bbr => Arc::new(congestion::BbrConfig::default()),
    };
    t.congestion_controller_factory(factory);
    Ok(t)
}

/// The endpoint settings (DESIGN §10: a larger MTU needs
/// `max_udp_payload_size` raised too).
pub fn endpoint_config(cfg: &TunnelConfig) -> Result<EndpointConfig, TunnelError> {
    let mut e = EndpointConfig::default();
    e.max_udp_payload_size(cfg.max_udp_payload)
        .map_err(|err| TunnelError::Setting {
            field: "tunnel.max_udp_payload",
            problem: err.to_string(),
        })?;
    Ok(e)
}

impl Tunnels {
    /// Binds the endpoint on `addr` with the given TLS configurations.
    pub fn bind(
        addr: SocketAddr,
        cfg: &TunnelConfig,
        server_tls: rustls::ServerConfig,
        client_tls: rustls::ClientConfig,
    ) -> Result<Self, TunnelError> {
        let transport = Arc::new(transport_config(cfg)?);
        let (server, client) = quic_configs(&transport, server_tls, client_tls)?;

        let socket = udp_socket(addr, cfg.udp_buffer)
            .map_err(|source| TunnelError::Bind { addr, source })?;
        let runtime = quinn::default_runtime().ok_or_else(|| TunnelError::Bind {
            addr,
            source: std::io::Error::other("no async runtime"),
        })?;
        let endpoint = Endpoint::new(endpoint_config(cfg)?, Some(server), socket, runtime)
            .map_err(|source| TunnelError::Bind { addr, source })?;
        Ok(Self {
            endpoint,
            transport,
            client: RwLock::new(client),
            peers: DashMap::new(),
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
        })
    }

    /// Installs new TLS configurations: `server_tls` for handshakes the
    /// endpoint accepts from now on, `client_tls` for tunnels dialled from
    /// now on. Open connections are untouched.
    pub fn set_tls(
        &self,
        server_tls: rustls::ServerConfig,
        client_tls: rustls::ClientConfig,
    ) -> Result<(), TunnelError> {
        let (server, client) = quic_configs(&self.transport, server_tls, client_tls)?;
        self.endpoint.set_server_config(Some(server));
        match self.client.write() {
            Ok(mut guard) => *guard = client,
            Err(poisoned) => *poisoned.into_inner() = client,
        }
        Ok(())
    }

    fn client_config(&self) -> quinn::ClientConfig {
        match self.client.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The endpoint (for the accept loop and shutdown).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The live connection to `peer`, dialling it if there is none.
    pub async fn connection(
        &self,
        peer: &str,
        addr: SocketAddr,
    ) -> Result<Connection, TunnelError> {
        let slot = self.peers.entry(peer.to_owned()).or_default().clone();
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.close_reason().is_none() && conn.remote_address() == addr {
                return Ok(conn.clone());
            }
        }
        let conn = self.dial(peer, addr).await?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn dial(&self, peer: &str, addr: SocketAddr) -> Result<Connection, TunnelError> {
        debug!(peer, %addr, "dialling tunnel");
        let connecting = self
            .endpoint
            .connect_with(self.client_config(), addr, peer)
            .map_err(|source| TunnelError::Connect {
                peer: peer.to_owned(),
                addr,
                source,
            })?;
        let result = tokio::time::timeout(self.handshake_timeout, connecting).await;
        let handshakes = |result: &'static str| {
            metrics::counter!(m::TUNNEL_HANDSHAKES, "peer" => peer.to_owned(), "side" => "client", "result" => result)
                .increment(1)
        };
        let conn = match result {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                handshakes("error");
                warn!(peer, %addr, error = %source, "tunnel handshake failed");
                return Err(TunnelError::Handshake {
                    peer: peer.to_owned(),
                    addr,
                    source,
                });
            }
            Err(_) => {
                handshakes("timeout");
                warn!(peer, %addr, timeout = ?self.handshake_timeout, "tunnel handshake timed out");
                return Err(TunnelError::HandshakeTimeout {
                    peer: peer.to_owned(),
                    addr,
                    timeout: self.handshake_timeout,
                });
            }
        };
        handshakes("ok");
        info!(peer, %addr, "tunnel established");
        track_open(&conn, peer, "outbound");
        Ok(conn)
    }

    /// Number of live outbound connections.
    pub fn open_count(&self) -> usize {
        self.peers
            .iter()
            .filter(|e| {
                e.value()
                    .try_lock()
                    .map(|g| g.as_ref().is_some_and(|c| c.close_reason().is_none()))
                    .unwrap_or(true)
            })
            .count()
    }
}

impl crate::identity::reload::TlsInstaller for Tunnels {
    fn install_tls(
        &self,
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
    ) -> Result<(), String> {
        self.set_tls(server, client).map_err(|e| e.to_string())
    }
}

/// The quinn server and client configs over `transport` for the given TLS configs.
fn quic_configs(
    transport: &Arc<TransportConfig>,
    server_tls: rustls::ServerConfig,
    client_tls: rustls::ClientConfig,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TunnelError> {
    let server_crypto =
        QuicServerConfig::try_from(server_tls).map_err(|e| TunnelError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());
    let client_crypto =
        QuicClientConfig::try_from(client_tls).map_err(|e| TunnelError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport.clone());
    Ok((server, client))
}

/// Status codes double as QUIC stream reset and stop codes.
pub fn reset_code(code: header::StatusCode) -> VarInt {
    VarInt::from_u32(code as u32)
}

/// Counts `conn` in the open-tunnels gauge until it closes.
pub fn track_open(conn: &Connection, peer: &str, direction: &'static str) {
    let gauge =
        metrics::gauge!(m::TUNNELS_OPEN, "peer" => peer.to_owned(), "direction" => direction);
    gauge.increment(1.0);
    let conn = conn.clone();
    let peer = peer.to_owned();
    tokio::spawn(async move {
        let reason = conn.closed().await;
        gauge.decrement(1.0);
        info!(peer, direction, reason = %reason, "tunnel closed");
    });
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Raise buffers past net.core.{r,w}mem_max when privileged (DESIGN §10:
    // quinn drops thousands of packets per second on small buffers).
    let fd = std::os::fd::AsFd::as_fd(&sock);
    if nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBufForce, &buffer).is_err() {
        let _ = sock.set_recv_buffer_size(buffer);
    }
    if nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBufForce, &buffer).is_err() {
        let _ = sock.set_send_buffer_size(buffer);
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::config::TlsConfig;
    use crate::identity::certs::{generate_ca, issue_node, GeneratedCa};
    use crate::identity::{client_config, server_config, Credentials, KnownNodes, TlsFiles};

    const TD: &str = "cluster.local";

    #[derive(Debug)]
    struct AllNodes;
    impl KnownNodes for AllNodes {
        fn is_known(&self, _: &str) -> bool {
            true
        }
    }

    fn creds(ca: &GeneratedCa, node: &str, days: u32) -> Credentials {
        let (cert, key) = issue_node(ca, TD, node, days, 0).expect("issue");
        let files = TlsFiles {
            cert: cert.into_bytes(),
            key: key.into_bytes(),
            bundle: ca.cert_pem.clone().into_bytes(),
        };
        Credentials::from_files(&TlsConfig::default(), &files, TD, node).expect("credentials")
    }

    fn tls(c: &Credentials) -> (rustls::ServerConfig, rustls::ClientConfig) {
        (
            server_config(c, TD, Arc::new(AllNodes)).expect("server config"),
            client_config(c, TD).expect("client config"),
        )
    }

    fn bind(c: &Credentials) -> Tunnels {
        let (server, client) = tls(c);
        let cfg = TunnelConfig {
            udp_buffer: 1 << 20,
            ..TunnelConfig::default()
        };
        Tunnels::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &cfg, server, client).expect("bind")
    }

    /// The expiry of the certificate the peer of `conn` presented, in Unix seconds.
    fn peer_not_after(conn: &Connection) -> u64 {
        let chain = conn
            .peer_identity()
            .expect("peer identity")
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .expect("certificate chain");
        let leaf = crate::identity::leaf_not_after(chain.first().expect("leaf")).expect("parse");
        unix(leaf)
    }

    fn unix(t: SystemTime) -> u64 {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs()
    }

    /// Accepts tunnels on `endpoint`: reports each one's client certificate
    /// expiry on `seen`, and echoes every stream.
    async fn echo_server(endpoint: Endpoint, seen: tokio::sync::mpsc::UnboundedSender<u64>) {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let _ = seen.send(peer_not_after(&conn));
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let data = recv.read_to_end(1 << 16).await.expect("read");
                    send.write_all(&data).await.expect("write");
                    send.finish().expect("finish");
                }
            });
        }
    }

    async fn echo(conn: &Connection, msg: &[u8]) {
        let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
        send.write_all(msg).await.expect("write");
        send.finish().expect("finish");
        assert_eq!(recv.read_to_end(1 << 16).await.expect("read"), msg);
    }

    #[tokio::test]
    async fn set_tls_keeps_open_tunnels_and_new_tunnels_present_the_new_certificates() {
        let deadline = Duration::from_secs(20);
        let ca = generate_ca(TD, 30).expect("ca");
        let (old1, old2) = (creds(&ca, "n1", 30), creds(&ca, "n2", 30));
        let (new1, new2) = (creds(&ca, "n1", 10), creds(&ca, "n2", 10));
        let (n1, n2) = (bind(&old1), bind(&old2));
        let addr2 = n2.endpoint().local_addr().expect("addr");
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(echo_server(n2.endpoint().clone(), seen_tx));

        let run = async {
            let old = n1.connection("n2", addr2).await.expect("dial");
            echo(&old, b"before").await;
            assert_eq!(peer_not_after(&old), unix(old2.not_after));
            assert_eq!(seen.recv().await, Some(unix(old1.not_after)));

            let (server, client) = tls(&new2);
            n2.set_tls(server, client).expect("install on n2");
            let (server, client) = tls(&new1);
            n1.set_tls(server, client).expect("install on n1");

            // The open tunnel carries on, and is still the pooled one.
            echo(&old, b"after").await;
            let pooled = n1.connection("n2", addr2).await.expect("pooled");
            assert_eq!(pooled.stable_id(), old.stable_id());
            assert_eq!(n1.open_count(), 1);

            // A new tunnel: each side presents its new certificate.
            let fresh = n1.dial("n2", addr2).await.expect("new dial");
            echo(&fresh, b"fresh").await;
            assert_eq!(peer_not_after(&fresh), unix(new2.not_after));
            assert_eq!(seen.recv().await, Some(unix(new1.not_after)));
            assert_ne!(unix(new1.not_after), unix(old1.not_after));
            echo(&old, b"still").await;
        };
        tokio::time::timeout(deadline, run)
            .await
            .expect("bounded test");
    }

    #[tokio::test]
    async fn mtu_discovery_climbs_to_max_udp_payload_on_a_jumbo_path() {
        // Loopback's MTU (65536) carries any datagram: the path MTU must
        // climb from initial_mtu to the configured ceiling.
        let ca = generate_ca(TD, 30).expect("ca");
        let cfg = TunnelConfig {
            udp_buffer: 1 << 20,
            max_udp_payload: 8972,
            ..TunnelConfig::default()
        };
        let mk = |c: &Credentials| {
            let (server, client) = tls(c);
            Tunnels::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &cfg, server, client)
                .expect("bind")
        };
        let (n1, n2) = (mk(&creds(&ca, "n1", 30)), mk(&creds(&ca, "n2", 30)));
        let addr2 = n2.endpoint().local_addr().expect("addr");
        let (seen_tx, _seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(echo_server(n2.endpoint().clone(), seen_tx));
        let run = async {
            let conn = n1.connection("n2", addr2).await.expect("dial");
            let mut mtu = conn.stats().path.current_mtu;
            for _ in 0..200 {
                echo(&conn, &[7u8; 16 * 1024]).await;
                mtu = conn.stats().path.current_mtu;
                if mtu >= 8972 {
                    break;
                }
            }
            mtu
        };
        let mtu = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("bounded test");
        assert_eq!(mtu, 8972, "path MTU after discovery");
    }

    #[test]
    fn jumbo_payload_reaches_the_endpoint_and_every_congestion_controller_builds() {
        use crate::config::Congestion;
        let jumbo = TunnelConfig {
            max_udp_payload: 8972,
            ..TunnelConfig::default()
        };
        let e = endpoint_config(&jumbo).expect("endpoint config");
        assert_eq!(e.get_max_udp_payload_size(), 8972);
        for congestion in [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr] {
            transport_config(&TunnelConfig {
                congestion,
                ..jumbo.clone()
            })
            .expect("transport config");
        }
    }

    #[test]
    fn default_transport_config_is_valid() {
        transport_config(&TunnelConfig::default()).expect("valid");
        let huge = TunnelConfig {
            stream_window: u64::MAX,
            ..TunnelConfig::default()
        };
        assert!(matches!(
            transport_config(&huge),
            Err(TunnelError::Setting {
                field: "tunnel.stream_window",
                ..
            })
        ));
    }
}
