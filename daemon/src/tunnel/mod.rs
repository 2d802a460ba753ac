//! The QUIC mTLS tunnel between nodes.
//!
//! Owns the quinn endpoint (UDP socket, transport tuning) and the pool of
//! connections to peers: **one connection per node pair**, carrying streams
//! in both directions whichever side dialled it. [`Tunnels::connection`]
//! returns the live connection to a peer and dials only when there is none;
//! concurrent first uses share one handshake (a per-peer async lock held
//! across the dial). A connection the endpoint accepts is registered for its
//! peer by the node identity the peer's certificate proves
//! ([`Tunnels::accept`]), never by its source address. Streams the peer opens
//! are served on every connection, dialled or accepted
//! ([`Tunnel::accept_bi`]; [`Tunnels::dialled`] hands dialled connections to
//! the inbound path).
//!
//! Simultaneous dials (A dials B while B dials A) converge on one connection:
//! both sides prefer the one dialled by the node whose name sorts lower (then
//! the newest). The other gets no new stream and is closed by the node that
//! dialled it, with application code [`DUPLICATE_CLOSE_CODE`], once its open
//! streams ([`StreamGuard`]) are done and what it sent on them is
//! acknowledged; counted in `nodemesh_tunnel_duplicates_closed_total`.
//!
//! A peer whose dial failed is not dialled again at that address before a
//! back-off (1 s, doubling to 30 s while dials keep failing; `pool::Redial`):
//! meanwhile [`Tunnels::connection`] fails at once with
//! [`TunnelError::BackingOff`], and callers queued on the per-peer lock
//! behind the failing dial fail with it instead of dialling in turn (each
//! would wait for the handshake timeout). A dial that succeeds, or a
//! connection the peer dials, ends the back-off.
//!
//! A pooled connection is used whatever address discovery gives for its peer
//! now: it is authenticated to the node, not to an address. The address is
//! only where to dial; a peer that moved is dialled at its new address once
//! its old connection is gone (closed by the peer, or by the idle timeout when
//! the old path is dead).
//!
//! Connections negotiated with the older ALPN `nodemesh/1` (a peer not yet
//! upgraded) carry streams one way only: this node uses one it dialled, never
//! one it accepted (`docs/protocol.md` §1).
//!
//! The pieces of the pool (per-peer connection sets, the preference rule,
//! stream guards) live in `pool`; the stream header codec in [`header`].
//!
//! The UDP socket is bound with `SO_REUSEPORT`, and every connection ID
//! this endpoint issues starts with its tag ([`cid`]): during a hand-over the
//! successor binds beside its predecessor and attaches a steering program
//! (`reuseport::tunnel_program`) so each datagram reaches the process that
//! owns its connection; new connections reach the predecessor until the
//! successor is ready ([`Tunnels::steer_new_connections_here`]). A peer answering `unavailable`/`draining` on a
//! pooled connection gets it retired ([`Tunnels::retire`]): streams in
//! flight finish there, new ones go on a new connection.
//!
//! TLS configurations are swappable (certificate rotation, see
//! `identity::reload`): [`Tunnels::set_tls`] installs new ones for new
//! handshakes on both sides; open connections keep theirs.

pub mod cid;
pub mod header;
mod path_stats;
mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    congestion, Connection, Endpoint, EndpointConfig, IdleTimeout, MtuDiscoveryConfig,
    TransportConfig, VarInt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::cid::{Tag, TaggedCids};
use crate::config::{Congestion, TunnelConfig};
use crate::identity::{is_shared, peer_node};
use crate::metrics as m;
pub use path_stats::{PathInfo, Totals};
pub use pool::{
    BackingOff, Direction, Lease, PoolStats, StreamGuard, Tunnel, TunnelInfo, ACK_WAIT,
    DUPLICATE_CLOSE_CODE, DUPLICATE_CLOSE_REASON, REDIAL_BASE, REDIAL_MAX,
};
use pool::{Entry, PeerPool};

/// Tunnel failures.
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
    /// The peer's address is of the other IP family than the address this
    /// node's tunnel endpoint is bound to, so no packet could reach it.
    #[error(
        "cannot dial peer {peer} at {addr}: this node's tunnel endpoint is bound to {local}, \
         the other IP family; give every daemon a node_address of one family (on a dual-stack \
         cluster, the Kubernetes source picks each peer's address of this node's family)"
    )]
    AddressFamily {
        /// Peer node.
        peer: String,
        /// Its address.
        addr: SocketAddr,
        /// This node's endpoint address.
        local: SocketAddr,
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
    /// The connection just dialled closed before a stream could use it.
    #[error("tunnel to peer {peer} at {addr} closed as soon as it was established")]
    ClosedAtOnce {
        /// Peer node.
        peer: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// Dials of the peer failed lately: it is not dialled again yet
    /// (`pool::Redial`), so connections to it fail at once instead of each
    /// waiting for a handshake that is likely to fail too.
    #[error(
        "peer {peer} at {addr} is not dialled again for {:?} after {} failed dial(s) in a row \
         (last: {})",
        .backing_off.retry_in, .backing_off.failures, .backing_off.last_error
    )]
    BackingOff {
        /// Peer node.
        peer: String,
        /// Its address.
        addr: SocketAddr,
        /// The back-off in force.
        backing_off: BackingOff,
    },
    /// An incoming handshake failed (including certificate refusal).
    #[error("handshake from {remote} failed: {source}")]
    AcceptHandshake {
        /// The peer's source address.
        remote: SocketAddr,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// An accepted peer's certificate names no node of the trust domain.
    #[error("tunnel from {remote} has no node identity")]
    NoNodeIdentity {
        /// The peer's source address.
        remote: SocketAddr,
    },
}

/// An incoming handshake in flight: listed in [`Tunnels::handshaking`]
/// until dropped, then its token is cancelled.
struct HandshakeGuard<'a> {
    tunnels: &'a Tunnels,
    token: CancellationToken,
}

impl Drop for HandshakeGuard<'_> {
    fn drop(&mut self) {
        self.tunnels
            .handshaking
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(_, t)| *t != self.token);
        self.token.cancel();
    }
}

/// The endpoint and the pool of tunnel connections, one per peer node.
#[derive(Debug)]
pub struct Tunnels {
    endpoint: Endpoint,
    transport: Arc<TransportConfig>,
    /// Used by every new dial; replaced by [`Tunnels::set_tls`].
    client: RwLock<quinn::ClientConfig>,
    local_node: String,
    peers: DashMap<String, Arc<PeerPool>>,
    handshake_timeout: Duration,
    seq: AtomicU64,
    dialled_count: AtomicU64,
    accepted_count: AtomicU64,
    dialled_tx: mpsc::UnboundedSender<Tunnel>,
    dialled_rx: Mutex<Option<mpsc::UnboundedReceiver<Tunnel>>>,
    /// Woken whenever a connection is registered or has closed, and when an
    /// incoming handshake starts.
    changed: Arc<Notify>,
    /// Incoming handshakes in flight, by source address; each token is
    /// cancelled when its handshake has ended (registered or failed).
    handshaking: Mutex<Vec<(SocketAddr, CancellationToken)>>,
    /// Bound beside a predecessor: a handle on the UDP socket and the
    /// predecessor's tag, until [`Tunnels::steer_new_connections_here`].
    pending_steering: std::sync::Mutex<Option<(std::net::UdpSocket, Tag)>>,
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
        .enable_segmentation_offload(cfg.segmentation_offload)
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
    if let Some(n) = cfg.ack_eliciting_threshold {
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(n));
        t.ack_frequency_config(Some(ack));
    }
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

/// Which connection IDs this endpoint issues, and whom the UDP port is shared with.
#[derive(Debug, Clone, Copy)]
pub struct Steering {
    /// This endpoint's CID tag.
    pub tag: Tag,
    /// The predecessor's tag when binding beside it during a hand-over:
    /// then the steering program is attached to the port's group.
    pub predecessor: Option<Tag>,
}

impl Tunnels {
    /// Binds the endpoint on `addr` with the given TLS configurations, for
    /// node `local_node` (its name decides which of two simultaneously
    /// dialled connections stays).
    pub fn bind(
        addr: SocketAddr,
        local_node: &str,
        cfg: &TunnelConfig,
        server_tls: rustls::ServerConfig,
        client_tls: rustls::ClientConfig,
        steering: Steering,
    ) -> Result<Self, TunnelError> {
        let transport = Arc::new(transport_config(cfg)?);
        let (server, client) = quic_configs(&transport, server_tls, client_tls)?;

        let socket = udp_socket(addr, cfg.udp_buffer)
            .map_err(|source| TunnelError::Bind { addr, source })?;
        let pending_steering = match steering.predecessor {
            Some(predecessor) => {
                // While this daemon starts, only answers to its own dials
                // reach it; the predecessor keeps everything else, new
                // connections included. Until this call (a few microseconds
                // after bind) the kernel hashed: a predecessor datagram that
                // landed here meanwhile is dropped (its CID is unknown here,
                // and a stateless reset from this endpoint would not carry the
                // predecessor's token) and retransmitted by the peer.
                let joining = crate::reuseport::tunnel_program(
                    steering.tag.get(),
                    crate::reuseport::SUCCESSOR,
                    crate::reuseport::PREDECESSOR,
                );
                crate::reuseport::attach(&socket, &joining)
                    .map_err(|source| TunnelError::Bind { addr, source })?;
                // A handle on the socket for the switch at the take-over.
                let handle = socket
                    .try_clone()
                    .map_err(|source| TunnelError::Bind { addr, source })?;
                Some((handle, predecessor))
            }
            None => None,
        };
        let runtime = quinn::default_runtime().ok_or_else(|| TunnelError::Bind {
            addr,
            source: std::io::Error::other("no async runtime"),
        })?;
        let mut endpoint_config = endpoint_config(cfg)?;
        let tag = steering.tag;
        endpoint_config.cid_generator(move || Box::new(TaggedCids::new(tag)));
        let endpoint = Endpoint::new(endpoint_config, Some(server), socket, runtime)
            .map_err(|source| TunnelError::Bind { addr, source })?;
        let (dialled_tx, dialled_rx) = mpsc::unbounded_channel();
        Ok(Self {
            endpoint,
            transport,
            client: RwLock::new(client),
            local_node: local_node.to_owned(),
            peers: DashMap::new(),
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
            seq: AtomicU64::new(0),
            dialled_count: AtomicU64::new(0),
            accepted_count: AtomicU64::new(0),
            dialled_tx,
            dialled_rx: Mutex::new(Some(dialled_rx)),
            changed: Arc::new(Notify::new()),
            handshaking: Mutex::new(Vec::new()),
            pending_steering: std::sync::Mutex::new(pending_steering),
        })
    }

    /// When this endpoint was bound beside a predecessor: from now on new
    /// connections come here, and only the predecessor's own packets (its
    /// CID tag) go to it. Call once ready, right before the take-over (or
    /// when the predecessor is gone). Does nothing otherwise, or twice.
    pub fn steer_new_connections_here(&self) -> std::io::Result<()> {
        let pending = match self.pending_steering.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some((socket, predecessor)) = pending else {
            return Ok(());
        };
        let program = crate::reuseport::tunnel_program(
            predecessor.get(),
            crate::reuseport::PREDECESSOR,
            crate::reuseport::SUCCESSOR,
        );
        // `socket` (a second handle on the endpoint's socket) closes here.
        crate::reuseport::attach(&socket, &program)
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

    /// Connections this node dials, as they are established, so that the
    /// streams their peers open on them are served. `None` after the first
    /// call: there is one taker, the inbound path.
    pub fn dialled(&self) -> Option<mpsc::UnboundedReceiver<Tunnel>> {
        self.dialled_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn pool(&self, peer: &str) -> Arc<PeerPool> {
        self.peers
            .entry(peer.to_owned())
            .or_insert_with(|| {
                Arc::new(PeerPool {
                    peer: peer.into(),
                    local_is_lower: self.local_node.as_str() < peer,
                    dial: tokio::sync::Mutex::new(()),
                    conns: Mutex::new(Vec::new()),
                    duplicates_closed: AtomicU64::new(0),
                    gauged: [AtomicBool::new(false), AtomicBool::new(false)],
                    redial: Mutex::default(),
                })
            })
            .clone()
    }

    /// The connection to use for a new stream to `peer`: the live one,
    /// whichever side dialled it, or one dialled to `addr` now if there is
    /// none.
    ///
    /// A handshake from `addr` already in flight is waited for instead of
    /// dialling (it is the peer dialling us). When this node sorts higher, a
    /// handshake from `addr` that arrived while it dialled is waited for too:
    /// the peer's connection is the preferred one, and waiting for it keeps
    /// new streams off the duplicate, so the duplicate closes at once.
    pub async fn connection(&self, peer: &str, addr: SocketAddr) -> Result<Lease, TunnelError> {
        let pool = self.pool(peer);
        let _dialling = pool.dial.lock().await;
        if let Some(lease) = Self::lease(&pool) {
            return Ok(lease);
        }
        if self.incoming_from(addr).await {
            if let Some(lease) = Self::lease(&pool) {
                return Ok(lease);
            }
        }
        // After failed dials, wait before the next (connections queued on
        // the lock behind a failed dial fail here at once, too).
        if let Some(backing_off) = pool.redial().at(tokio::time::Instant::now(), addr) {
            return Err(TunnelError::BackingOff {
                peer: peer.to_owned(),
                addr,
                backing_off,
            });
        }
        let conn = match self.dial(peer, addr).await {
            Ok(c) => c,
            Err(e) => {
                // The wait runs from the failure, not from the dial's start.
                let wait = pool
                    .redial()
                    .failed(tokio::time::Instant::now(), addr, e.to_string());
                debug!(peer, %addr, ?wait, "dial failed; not dialled again before the wait");
                return Err(e);
            }
        };
        pool.redial().reset();
        let tunnel = self.register(&pool, conn, Direction::Dialled);
        // The inbound path serves the peer's streams on it; gone only at shutdown.
        let _ = self.dialled_tx.send(tunnel);
        if !pool.local_is_lower {
            self.incoming_from(addr).await;
        }
        // The connection just dialled, or one the peer dialled meanwhile
        // that is preferred to it.
        Self::lease(&pool).ok_or_else(|| TunnelError::ClosedAtOnce {
            peer: peer.to_owned(),
            addr,
        })
    }

    /// Waits (at most the handshake timeout) for the incoming handshakes
    /// from `addr` in flight now to end; whether there were any.
    async fn incoming_from(&self, addr: SocketAddr) -> bool {
        let tokens: Vec<CancellationToken> = self
            .handshaking
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(from, _)| *from == addr)
            .map(|(_, t)| t.clone())
            .collect();
        if tokens.is_empty() {
            return false;
        }
        debug!(%addr, "waiting for the peer's handshake in flight");
        let all = async {
            for t in &tokens {
                t.cancelled().await;
            }
        };
        let _ = tokio::time::timeout(self.handshake_timeout, all).await;
        true
    }

    /// Notes an incoming handshake from `remote` until the guard drops.
    fn handshaking(&self, remote: SocketAddr) -> HandshakeGuard<'_> {
        let token = CancellationToken::new();
        self.handshaking
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((remote, token.clone()));
        self.changed.notify_waiters();
        HandshakeGuard {
            tunnels: self,
            token,
        }
    }

    fn lease(pool: &Arc<PeerPool>) -> Option<Lease> {
        let mut conns = pool.lock();
        let entry = pool.settle(&mut conns)?;
        let guard = pool.guard(&entry);
        Some(Lease {
            tunnel: Tunnel {
                entry,
                pool: pool.clone(),
            },
            guard,
        })
    }

    async fn dial(&self, peer: &str, addr: SocketAddr) -> Result<Connection, TunnelError> {
        debug!(peer, %addr, "dialling tunnel");
        let handshakes = |result: &'static str| {
            metrics::counter!(m::TUNNEL_HANDSHAKES, "peer" => peer.to_owned(), "side" => "client", "result" => result)
                .increment(1)
        };
        if let Ok(local) = self.endpoint.local_addr() {
            if !can_reach(local, addr) {
                handshakes("error");
                let e = TunnelError::AddressFamily {
                    peer: peer.to_owned(),
                    addr,
                    local,
                };
                warn!(peer, %addr, %local, error = %e, "tunnel cannot be dialled");
                return Err(e);
            }
        }
        let connecting = self
            .endpoint
            .connect_with(self.client_config(), addr, peer)
            .map_err(|source| TunnelError::Connect {
                peer: peer.to_owned(),
                addr,
                source,
            })?;
        let result = tokio::time::timeout(self.handshake_timeout, connecting).await;
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
        self.dialled_count.fetch_add(1, Ordering::Relaxed);
        info!(peer, %addr, shared = is_shared(&conn), "tunnel established");
        Ok(conn)
    }

    /// Completes an incoming handshake and registers the connection for the
    /// peer node its certificate names (in `trust_domain`): from then on it
    /// carries this node's streams to that peer too, unless a connection
    /// this node dialled is preferred.
    pub async fn accept(
        &self,
        incoming: quinn::Incoming,
        trust_domain: &str,
    ) -> Result<Tunnel, TunnelError> {
        let remote = incoming.remote_address();
        let _handshaking = self.handshaking(remote);
        let conn = match incoming.await {
            Ok(c) => c,
            Err(source) => {
                metrics::counter!(m::TUNNEL_HANDSHAKES, "peer" => m::UNKNOWN, "side" => "server", "result" => "error")
                    .increment(1);
                return Err(TunnelError::AcceptHandshake { remote, source });
            }
        };
        let Some(peer) = peer_node(&conn, trust_domain) else {
            // The verifier already requires a node identity; this is belt and braces.
            conn.close(reset_code(header::StatusCode::Denied), b"no node identity");
            return Err(TunnelError::NoNodeIdentity { remote });
        };
        metrics::counter!(m::TUNNEL_HANDSHAKES, "peer" => peer.clone(), "side" => "server", "result" => "ok")
            .increment(1);
        self.accepted_count.fetch_add(1, Ordering::Relaxed);
        info!(peer, remote.addr = %remote, shared = is_shared(&conn), "tunnel accepted");
        let pool = self.pool(&peer);
        // The peer is reachable: dial it again at once when needed.
        pool.redial().reset();
        Ok(self.register(&pool, conn, Direction::Accepted))
    }

    /// Adds `conn` to `pool`, counts it open until it closes, and settles
    /// which connection the peer's new streams use.
    fn register(&self, pool: &Arc<PeerPool>, conn: Connection, direction: Direction) -> Tunnel {
        let entry = Arc::new(Entry {
            shared: is_shared(&conn),
            conn,
            direction,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            streams: AtomicUsize::new(0),
            superseded: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            exported: Default::default(),
        });
        {
            let mut conns = pool.lock();
            conns.push(entry.clone());
            pool.settle(&mut conns);
        }
        let gauge = metrics::gauge!(m::TUNNELS_OPEN, "peer" => pool.peer.to_string(), "direction" => direction.as_str());
        gauge.increment(1.0);
        self.changed.notify_waiters();
        let (closed_entry, closed_pool) = (entry.clone(), pool.clone());
        let changed = self.changed.clone();
        tokio::spawn(async move {
            let reason = closed_entry.conn.closed().await;
            gauge.decrement(1.0);
            // What it did since the last scrape: closed connections are
            // not exported again (their gauges are reset at the next scrape).
            let path = closed_entry
                .exported
                .export(&closed_pool.peer, &closed_entry.conn.stats());
            info!(
                peer.node = %closed_pool.peer,
                direction = direction.as_str(),
                tunnel.id = closed_entry.conn.stable_id(),
                reason = %reason,
                packets.sent = path.totals.sent_packets,
                packets.lost = path.totals.lost_packets,
                "tunnel closed"
            );
            closed_pool.resettle();
            changed.notify_waiters();
        });
        Tunnel {
            entry,
            pool: pool.clone(),
        }
    }

    /// Stops using `conn` for new streams to `peer`: the peer said it is
    /// draining (shutting down, or handed over to a successor). Streams open
    /// on it carry on, and it is left for the peer to close; the next stream
    /// to `peer` uses another connection, dialling one if there is none.
    pub fn retire(&self, peer: &str, conn: &Connection) {
        let Some(pool) = self.peers.get(peer).map(|p| p.value().clone()) else {
            return;
        };
        let mut conns = pool.lock();
        let id = conn.stable_id();
        if let Some(e) = conns.iter().find(|e| e.conn.stable_id() == id) {
            if !e.retired.swap(true, Ordering::SeqCst) {
                metrics::counter!(m::TUNNELS_RETIRED, "peer" => peer.to_owned()).increment(1);
                info!(peer, tunnel.id = id, remote.addr = %conn.remote_address(), "peer is draining this tunnel; new streams go on another one");
            }
        }
        pool.settle(&mut conns);
    }

    /// Number of live pooled connections, both directions.
    pub fn open_count(&self) -> usize {
        self.peers
            .iter()
            .map(|p| p.value().lock().iter().filter(|e| e.live()).count())
            .sum()
    }

    /// Waits until `done` holds, checking it whenever a connection has been
    /// registered or has closed, or an incoming handshake has started.
    pub async fn until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(self) {
                return;
            }
            changed.await;
        }
    }

    /// Totals since start.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            dialled: self.dialled_count.load(Ordering::Relaxed),
            accepted: self.accepted_count.load(Ordering::Relaxed),
            duplicates_closed: self
                .peers
                .iter()
                .map(|p| p.value().duplicates_closed.load(Ordering::Relaxed))
                .sum(),
        }
    }

    /// Brings the tunnels' path metrics up to date (before a scrape): the
    /// counters by what each open connection did since the last export, the
    /// gauges to the newest open connection of each peer and direction, or
    /// to 0 where none is left.
    pub fn export_path_stats(&self) {
        for p in self.peers.iter() {
            let pool = p.value();
            let conns: Vec<Arc<Entry>> = pool.lock().clone();
            for (i, direction) in Direction::ALL.into_iter().enumerate() {
                let mut newest: Option<(u64, PathInfo)> = None;
                for e in conns.iter().filter(|e| e.direction == direction) {
                    if e.conn.close_reason().is_some() {
                        continue;
                    }
                    let path = e.exported.export(&pool.peer, &e.conn.stats());
                    if newest.is_none_or(|(seq, _)| e.seq > seq) {
                        newest = Some((e.seq, path));
                    }
                }
                match newest {
                    Some((_, path)) => {
                        pool.gauged[i].store(true, Ordering::Relaxed);
                        path_stats::set_gauges(&pool.peer, direction, Some(&path));
                    }
                    None if pool.gauged[i].load(Ordering::Relaxed) => {
                        path_stats::set_gauges(&pool.peer, direction, None);
                    }
                    None => {}
                }
            }
        }
    }

    /// Every pooled connection (closed ones are left out), by peer.
    pub fn snapshot(&self) -> Vec<TunnelInfo> {
        let mut out = Vec::new();
        for p in self.peers.iter() {
            let pool = p.value();
            for e in pool.lock().iter() {
                if e.conn.close_reason().is_some() {
                    continue;
                }
                let state = if e.closing.load(Ordering::SeqCst) {
                    "closing"
                } else if e.retired.load(Ordering::SeqCst) {
                    "retired"
                } else if !e.usable() {
                    "peer_only"
                } else if e.superseded.load(Ordering::SeqCst) {
                    "draining"
                } else {
                    "in_use"
                };
                out.push(TunnelInfo {
                    peer: pool.peer.to_string(),
                    id: e.conn.stable_id(),
                    direction: e.direction,
                    dialled_by: match e.direction {
                        Direction::Dialled => self.local_node.clone(),
                        Direction::Accepted => pool.peer.to_string(),
                    },
                    remote_addr: e.conn.remote_address(),
                    shared: e.shared,
                    open_streams: e.streams.load(Ordering::SeqCst),
                    state,
                    path: PathInfo::from(&e.conn.stats()),
                });
            }
        }
        out.sort_by(|a, b| (&a.peer, a.id).cmp(&(&b.peer, b.id)));
        out
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
    // Never a tag: a new connection's Initials are told apart from the
    // packets of connections a daemon owns (see `cid`).
    client.initial_dst_cid_provider(cid::initial_dcid_provider());
    Ok((server, client))
}

/// Whether an endpoint bound to `local` can send to `remote`: same family,
/// or `local` is IPv6's unspecified address, whose socket also reaches IPv4
/// through mapped addresses.
fn can_reach(local: SocketAddr, remote: SocketAddr) -> bool {
    local.is_ipv4() == remote.is_ipv4() || (local.is_ipv6() && local.ip().is_unspecified())
}

/// Status codes double as QUIC stream reset and stop codes.
pub fn reset_code(code: header::StatusCode) -> VarInt {
    VarInt::from_u32(code as u32)
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // A successor daemon binds beside this one during a hand-over.
    sock.set_reuse_port(true)?;
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
    use quinn::ConnectionError;

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

    fn bind(c: &Credentials, node: &str) -> Tunnels {
        let (server, client) = tls(c);
        let cfg = TunnelConfig {
            udp_buffer: 1 << 20,
            ..TunnelConfig::default()
        };
        bind_with(node, &cfg, server, client)
    }

    /// A loopback endpoint for `node` with `cfg` and these TLS configs.
    fn bind_with(
        node: &str,
        cfg: &TunnelConfig,
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
    ) -> Tunnels {
        let steering = Steering {
            tag: Tag::random_except(None),
            predecessor: None,
        };
        Tunnels::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            node,
            cfg,
            server,
            client,
            steering,
        )
        .expect("bind")
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
        let (n1, n2) = (bind(&old1, "n1"), bind(&old2, "n2"));
        let addr2 = n2.endpoint().local_addr().expect("addr");
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(echo_server(n2.endpoint().clone(), seen_tx));

        let run = async {
            let old = n1.connection("n2", addr2).await.expect("dial");
            let old = old.connection().clone();
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
            assert_eq!(pooled.connection().stable_id(), old.stable_id());
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
        let (n1, n2) = (node_with(&ca, "n1", &cfg), node_with(&ca, "n2", &cfg));
        n1.serve();
        n2.serve();
        let run = async {
            let lease = n1.tunnels.connection("n2", n2.addr).await.expect("dial");
            let conn = lease.connection().clone();
            drop(lease);
            let mut mtu = conn.stats().path.current_mtu;
            for _ in 0..200 {
                let lease = n1.tunnels.connection("n2", n2.addr).await.expect("pooled");
                echo_on(lease, &[7u8; 16 * 1024]).await;
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

    /// A node of the pool tests: its pool, and its address.
    struct Node {
        tunnels: Arc<Tunnels>,
        addr: SocketAddr,
    }

    fn node(ca: &GeneratedCa, name: &str) -> Node {
        let tunnels = Arc::new(bind(&creds(ca, name, 30), name));
        let addr = tunnels.endpoint().local_addr().expect("addr");
        Node { tunnels, addr }
    }

    /// A node with the transport settings of `cfg`.
    fn node_with(ca: &GeneratedCa, name: &str, cfg: &TunnelConfig) -> Node {
        let (server, client) = tls(&creds(ca, name, 30));
        let tunnels = Arc::new(bind_with(name, cfg, server, client));
        let addr = tunnels.endpoint().local_addr().expect("addr");
        Node { tunnels, addr }
    }

    /// A node that speaks only the older ALPN `nodemesh/1`.
    fn legacy_node(ca: &GeneratedCa, name: &str) -> Node {
        let (mut server, mut client) = tls(&creds(ca, name, 30));
        server.alpn_protocols = vec![crate::identity::ALPN_V1.to_vec()];
        client.alpn_protocols = vec![crate::identity::ALPN_V1.to_vec()];
        let cfg = TunnelConfig {
            udp_buffer: 1 << 20,
            ..TunnelConfig::default()
        };
        let tunnels = Arc::new(bind_with(name, &cfg, server, client));
        let addr = tunnels.endpoint().local_addr().expect("addr");
        Node { tunnels, addr }
    }

    impl Node {
        /// Serves like the daemon: accepted tunnels are registered and, like
        /// the ones this node dials, have every stream the peer opens echoed.
        fn serve(&self) {
            self.serve_accepted();
            let mut dialled = self.tunnels.dialled().expect("first taker");
            tokio::spawn(async move {
                while let Some(t) = dialled.recv().await {
                    tokio::spawn(serve_echo(t));
                }
            });
        }

        fn serve_accepted(&self) {
            let tunnels = self.tunnels.clone();
            tokio::spawn(async move {
                while let Some(incoming) = tunnels.endpoint().accept().await {
                    let tunnels = tunnels.clone();
                    tokio::spawn(async move {
                        if let Ok(t) = tunnels.accept(incoming, TD).await {
                            serve_echo(t).await;
                        }
                    });
                }
            });
        }

        /// The live pooled connections, as `(direction, state)`.
        fn tunnels(&self) -> Vec<(Direction, &'static str)> {
            self.tunnels
                .snapshot()
                .iter()
                .map(|t| (t.direction, t.state))
                .collect()
        }

        /// The pooled connections of `direction`, open or not yet forgotten.
        fn pooled(&self, peer: &str, direction: Direction) -> Vec<Connection> {
            self.tunnels
                .pool(peer)
                .lock()
                .iter()
                .filter(|e| e.direction == direction)
                .map(|e| e.conn.clone())
                .collect()
        }
    }

    async fn serve_echo(tunnel: Tunnel) {
        while let Ok((mut send, mut recv, guard)) = tunnel.accept_bi().await {
            tokio::spawn(async move {
                let _guard = guard;
                if let Ok(data) = recv.read_to_end(1 << 16).await {
                    let _ = send.write_all(&data).await;
                    let _ = send.finish();
                }
            });
        }
    }

    async fn echo_on(lease: Lease, msg: &[u8]) {
        let (mut send, mut recv, _guard) = lease.open_bi().await.expect("open stream");
        send.write_all(msg).await.expect("write");
        send.finish().expect("finish");
        assert_eq!(recv.read_to_end(1 << 16).await.expect("read"), msg);
    }

    /// `n` echoes from `from` to `peer` at once, each on a new stream.
    async fn echoes(from: &Arc<Tunnels>, peer: &'static str, addr: SocketAddr, n: usize) {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let from = from.clone();
            set.spawn(async move {
                let lease = from.connection(peer, addr).await.expect("connection");
                echo_on(lease, format!("{peer} #{i}").as_bytes()).await;
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("echo task");
        }
    }

    const BOUND: Duration = Duration::from_secs(20);

    // Paused time: a dial of a silent peer takes exactly the handshake
    // timeout, and "at once" means no time passes.
    #[tokio::test(start_paused = true)]
    async fn a_peer_whose_dials_fail_is_not_dialled_again_before_its_back_off() {
        let ca = generate_ca(TD, 30).expect("ca");
        let n1 = node(&ca, "n1");
        // A UDP socket that never answers: every handshake times out.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let dead = silent.local_addr().expect("addr");
        let timeout = Duration::from_millis(TunnelConfig::default().handshake_timeout_ms);
        let attempt = || async {
            let start = tokio::time::Instant::now();
            let err = n1
                .tunnels
                .connection("n2", dead)
                .await
                .map(|_| ())
                .expect_err("nothing answers");
            (err, start.elapsed())
        };
        // 1. Concurrent first uses: one dial; the others, queued behind
        //    it, fail when it does instead of each dialling in turn.
        let (a, b, c) = tokio::join!(attempt(), attempt(), attempt());
        let mut timed_out = 0;
        for (err, took) in [a, b, c] {
            assert!(
                took <= timeout + Duration::from_millis(50),
                "{took:?}: {err}"
            );
            match err {
                TunnelError::HandshakeTimeout { .. } => timed_out += 1,
                TunnelError::BackingOff {
                    ref backing_off, ..
                } => {
                    assert_eq!(backing_off.failures, 1);
                    assert!(backing_off.last_error.contains("timed out"), "{err}");
                }
                other => panic!("{other}"),
            }
        }
        assert_eq!(timed_out, 1, "one dial for three connections");
        // 2. Within the first back-off (1 s): refused at once, saying why.
        let (err, took) = attempt().await;
        assert_eq!(took, Duration::ZERO);
        let text = err.to_string();
        assert!(
            matches!(err, TunnelError::BackingOff { .. })
                && text.contains("n2")
                && text.contains("1 failed dial"),
            "{text}"
        );
        // 3. After it, dialled again; that failure doubles the wait (2 s).
        tokio::time::advance(REDIAL_BASE).await;
        let (err, took) = attempt().await;
        assert!(matches!(err, TunnelError::HandshakeTimeout { .. }), "{err}");
        assert!(took >= timeout, "{took:?}");
        tokio::time::advance(Duration::from_millis(1_500)).await;
        let (err, _) = attempt().await;
        match err {
            TunnelError::BackingOff { backing_off, .. } => {
                assert_eq!(backing_off.failures, 2);
                assert_eq!(backing_off.retry_in, Duration::from_millis(500));
            }
            other => panic!("{other}"),
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        let (err, _) = attempt().await;
        assert!(matches!(err, TunnelError::HandshakeTimeout { .. }), "{err}");
        drop(silent);
    }

    #[test]
    fn the_redial_back_off_doubles_up_to_its_ceiling_and_resets() {
        let mut r = pool::Redial::default();
        let t0 = tokio::time::Instant::now();
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.77.0.2:15008".parse().expect("a"),
            "10.77.0.9:15008".parse().expect("b"),
        );
        let waits: Vec<Duration> = (0..8).map(|_| r.failed(t0, a, "x".into())).collect();
        assert_eq!(
            waits,
            [1, 2, 4, 8, 16, 30, 30, 30]
                .map(Duration::from_secs)
                .to_vec()
        );
        assert!(r.at(t0, a).is_some());
        assert!(
            r.at(t0, b).is_none(),
            "a peer that moved is dialled at once"
        );
        assert!(r.at(t0 + REDIAL_MAX, a).is_none());
        assert_eq!(r.failed(t0, b, "z".into()), REDIAL_BASE, "counted afresh");
        r.reset();
        assert!(r.at(t0, b).is_none());
        assert_eq!(r.failed(t0, a, "y".into()), REDIAL_BASE);
    }

    // Paused time: "at once" means before any timer could fire.
    #[tokio::test(start_paused = true)]
    async fn a_peer_of_the_other_ip_family_is_refused_at_once_with_the_reason() {
        let ca = generate_ca(TD, 30).expect("ca");
        let (server, client) = tls(&creds(&ca, "n1", 30));
        let steering = Steering {
            tag: Tag::random_except(None),
            predecessor: None,
        };
        let v6 = match Tunnels::bind(
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
            "n1",
            &TunnelConfig {
                udp_buffer: 1 << 20,
                ..TunnelConfig::default()
            },
            server,
            client,
            steering,
        ) {
            Ok(t) => t,
            // A machine without IPv6 on loopback has nothing to test.
            Err(TunnelError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrNotAvailable =>
            {
                return;
            }
            Err(e) => panic!("bind [::1]: {e}"),
        };
        let peer = SocketAddr::from(([127, 0, 0, 1], 15008));
        // No handshake is attempted: the error is immediate (not a
        // handshake timeout) and says what to change.
        let err = tokio::time::timeout(Duration::from_secs(1), v6.connection("n2", peer))
            .await
            .expect("refused at once")
            .map(|_| ())
            .expect_err("an IPv4 peer from an IPv6 endpoint");
        assert!(matches!(err, TunnelError::AddressFamily { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("127.0.0.1:15008")
                && text.contains("[::1]:")
                && text.contains("node_address"),
            "{text}"
        );
        assert!(
            can_reach("[::]:1".parse().expect("a"), peer),
            "a [::] socket reaches IPv4"
        );
        assert!(!can_reach(
            "0.0.0.0:1".parse().expect("a"),
            "[::1]:1".parse().expect("a")
        ));
    }

    #[tokio::test]
    async fn a_tunnel_either_side_dialled_carries_streams_both_ways_with_one_handshake() {
        let ca = generate_ca(TD, 30).expect("ca");
        let (a, b) = (node(&ca, "n1"), node(&ca, "n2"));
        a.serve();
        b.serve();
        let run = async {
            // n2 dials n1 (n2 sorts higher: the dialling side does not matter).
            let first = b.tunnels.connection("n1", a.addr).await.expect("dial");
            assert_eq!(first.direction(), Direction::Dialled);
            echo_on(first, b"hello n1").await;
            // n1 registered the connection when it accepted it (before
            // serving the stream just echoed): its streams to n2 use it.
            let back = a.tunnels.connection("n2", b.addr).await.expect("pooled");
            assert_eq!(back.direction(), Direction::Accepted);
            echo_on(back, b"hello n2").await;
            // Concurrent streams both ways on the one connection.
            tokio::join!(
                echoes(&a.tunnels, "n2", b.addr, 50),
                echoes(&b.tunnels, "n1", a.addr, 50),
            );

            for (n, dialled, accepted) in [(&a, 0, 1), (&b, 1, 0)] {
                let stats = n.tunnels.stats();
                assert_eq!((stats.dialled, stats.accepted), (dialled, accepted));
                assert_eq!(stats.duplicates_closed, 0);
                assert_eq!(n.tunnels.open_count(), 1);
                assert_eq!(n.tunnels.endpoint().open_connections(), 1);
            }
            assert_eq!(a.tunnels(), vec![(Direction::Accepted, "in_use")]);
            assert_eq!(b.tunnels(), vec![(Direction::Dialled, "in_use")]);
            let dump = a.tunnels.snapshot();
            assert_eq!(dump[0].dialled_by, "n2");
            assert!(dump[0].shared);
            let held = a.tunnels.connection("n2", b.addr).await.expect("pooled");
            assert!(a.tunnels.snapshot()[0].open_streams >= 1, "a lease counts");
            drop(held);
        };
        tokio::time::timeout(BOUND, run)
            .await
            .expect("bounded test");
    }

    #[tokio::test]
    async fn a_duplicate_from_a_dial_race_keeps_its_open_stream_then_closes() {
        let ca = generate_ca(TD, 30).expect("ca");
        let (a, b) = (node(&ca, "n1"), node(&ca, "n2"));
        a.serve();
        b.serve();
        let run = async {
            // n2 (higher) dials n1 and streams on it, unfinished.
            let lease = b.tunnels.connection("n1", a.addr).await.expect("dial");
            let dup = lease.connection().clone();
            let (mut send, mut recv, guard) = lease.open_bi().await.expect("open");
            send.write_all(b"opened during the race, ")
                .await
                .expect("write");

            // n1's own dial, started before n2's connection reached it.
            let pool = a.tunnels.pool("n2");
            let dialling = pool.dial.lock().await;
            let conn = a.tunnels.dial("n2", b.addr).await.expect("n1 dials");
            let t = a.tunnels.register(&pool, conn, Direction::Dialled);
            a.tunnels.dialled_tx.send(t).expect("served");
            drop(dialling);

            // n1 prefers the connection it dialled (n1 < n2) ...
            let preferred = a.tunnels.connection("n2", b.addr).await.expect("pooled");
            assert_eq!(preferred.direction(), Direction::Dialled);
            // ... and n2 does too, once it has accepted it (it has: the
            // stream was served).
            echo_on(preferred, b"n1 -> n2").await;
            let now = b.tunnels.connection("n1", a.addr).await.expect("pooled");
            assert_eq!(now.direction(), Direction::Accepted);
            echo_on(now, b"n2 -> n1").await;

            // The duplicate is no longer used, but the stream on it goes on.
            assert!(dup.close_reason().is_none(), "closed under an open stream");
            let draining: Vec<_> = b
                .tunnels
                .snapshot()
                .into_iter()
                .filter(|t| t.direction == Direction::Dialled)
                .collect();
            assert_eq!(draining.len(), 1);
            assert_eq!(
                (draining[0].state, draining[0].open_streams),
                ("draining", 1)
            );
            send.write_all(b"finished after it").await.expect("write");
            send.finish().expect("finish");
            assert_eq!(
                recv.read_to_end(1 << 16).await.expect("read"),
                b"opened during the race, finished after it"
            );
            // n1 served that stream on the connection it accepted from n2.
            let at_n1 = a.pooled("n2", Direction::Accepted);
            assert_eq!(at_n1.len(), 1);
            drop(guard);

            // Then n2 closes it, with the duplicate code.
            assert!(matches!(dup.closed().await, ConnectionError::LocallyClosed));
            for conn in at_n1 {
                match conn.closed().await {
                    ConnectionError::ApplicationClosed(close) => {
                        assert_eq!(close.error_code, DUPLICATE_CLOSE_CODE);
                        assert_eq!(&close.reason[..], DUPLICATE_CLOSE_REASON);
                    }
                    other => panic!("n1 saw {other:?}"),
                }
            }
            a.tunnels.until(|t| t.open_count() == 1).await;
            b.tunnels.until(|t| t.open_count() == 1).await;
            assert_eq!(a.tunnels(), vec![(Direction::Dialled, "in_use")]);
            assert_eq!(b.tunnels(), vec![(Direction::Accepted, "in_use")]);
            assert_eq!(b.tunnels.stats().duplicates_closed, 1);
            assert_eq!(a.tunnels.stats().duplicates_closed, 0);
        };
        tokio::time::timeout(BOUND, run)
            .await
            .expect("bounded test");
    }

    #[tokio::test]
    async fn simultaneous_first_use_from_both_sides_converges_on_one_connection() {
        let ca = generate_ca(TD, 30).expect("ca");
        let (a, b) = (node(&ca, "n1"), node(&ca, "n2"));
        a.serve();
        b.serve();
        let run = async {
            // Both futures start their dial before either handshake can finish.
            let (la, lb) = tokio::join!(
                a.tunnels.connection("n2", b.addr),
                b.tunnels.connection("n1", a.addr)
            );
            let (la, lb) = (la.expect("n1 -> n2"), lb.expect("n2 -> n1"));
            assert_eq!(a.tunnels.stats().dialled, 1);
            assert_eq!(b.tunnels.stats().dialled, 1);
            // Streams opened during the race all complete, plus more at once.
            tokio::join!(
                echo_on(la, b"raced from n1"),
                echo_on(lb, b"raced from n2"),
                echoes(&a.tunnels, "n2", b.addr, 20),
                echoes(&b.tunnels, "n1", a.addr, 20),
            );
            // One connection is left: the one n1 (lower) dialled.
            a.tunnels.until(|t| t.open_count() == 1).await;
            b.tunnels.until(|t| t.open_count() == 1).await;
            assert_eq!(a.tunnels(), vec![(Direction::Dialled, "in_use")]);
            assert_eq!(b.tunnels(), vec![(Direction::Accepted, "in_use")]);
            assert_eq!(b.tunnels.stats().duplicates_closed, 1);
            assert_eq!(a.tunnels.stats().duplicates_closed, 0);
            echoes(&b.tunnels, "n1", a.addr, 5).await;
            assert_eq!(b.tunnels.stats().dialled, 1, "no new dial after converging");
        };
        tokio::time::timeout(BOUND, run)
            .await
            .expect("bounded test");
    }

    #[tokio::test]
    async fn a_node_whose_peer_is_already_dialling_it_waits_instead_of_dialling() {
        let ca = generate_ca(TD, 30).expect("ca");
        let (a, b) = (node(&ca, "n1"), node(&ca, "n2"));
        a.serve();
        b.serve();
        let run = async {
            let dialling = tokio::spawn({
                let (tunnels, addr) = (b.tunnels.clone(), a.addr);
                async move {
                    let lease = tunnels.connection("n1", addr).await.expect("n2 dials");
                    echo_on(lease, b"n2 -> n1").await;
                }
            });
            // n2's handshake has reached n1 (or is done already).
            a.tunnels
                .until(|t| t.open_count() > 0 || !t.handshaking.lock().expect("lock").is_empty())
                .await;
            let lease = a.tunnels.connection("n2", b.addr).await.expect("pooled");
            assert_eq!(lease.direction(), Direction::Accepted);
            echo_on(lease, b"n1 -> n2").await;
            dialling.await.expect("n2 task");
            assert_eq!(a.tunnels.stats().dialled, 0, "n1 did not dial");
            assert_eq!(b.tunnels.stats().dialled, 1);
            assert_eq!(b.tunnels.stats().duplicates_closed, 0);
            assert_eq!(a.tunnels(), vec![(Direction::Accepted, "in_use")]);
        };
        tokio::time::timeout(BOUND, run)
            .await
            .expect("bounded test");
    }

    #[tokio::test]
    async fn a_peer_on_the_older_alpn_keeps_one_connection_per_direction() {
        let ca = generate_ca(TD, 30).expect("ca");
        let (old, new) = (legacy_node(&ca, "n1"), node(&ca, "n2"));
        old.serve_accepted();
        new.serve();
        let run = async {
            let lease = old.tunnels.connection("n2", new.addr).await.expect("dial");
            echo_on(lease, b"from the old node").await;
            // n2 may not open streams on a `nodemesh/1` connection it accepted.
            assert_eq!(new.tunnels(), vec![(Direction::Accepted, "peer_only")]);
            let own = new.tunnels.connection("n1", old.addr).await.expect("dial");
            assert_eq!(own.direction(), Direction::Dialled);
            echo_on(own, b"from the new node").await;
            assert_eq!(new.tunnels.stats().dialled, 1);
            let mut states = new.tunnels();
            states.sort_by_key(|(d, _)| d.as_str());
            assert_eq!(
                states,
                vec![
                    (Direction::Accepted, "peer_only"),
                    (Direction::Dialled, "in_use")
                ]
            );
        };
        tokio::time::timeout(BOUND, run)
            .await
            .expect("bounded test");
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

    #[tokio::test]
    async fn both_sides_with_ack_frequency_on_and_gso_off_carry_streams() {
        let ca = generate_ca(TD, 30).expect("ca");
        let cfg = TunnelConfig {
            udp_buffer: 1 << 20,
            ack_eliciting_threshold: Some(10),
            segmentation_offload: false,
            ..TunnelConfig::default()
        };
        let (a, b) = (node_with(&ca, "n1", &cfg), node_with(&ca, "n2", &cfg));
        a.serve();
        b.serve();
        let run = async {
            // More than the threshold's worth of packets each way.
            let big = vec![7u8; 60_000];
            let lease = a.tunnels.connection("n2", b.addr).await.expect("dial");
            echo_on(lease, &big).await;
            echoes(&b.tunnels, "n1", a.addr, 10).await;
        };
        tokio::time::timeout(BOUND, run)
            .await
            .expect("bounded test");
    }

    /// The value of the series `series` (name and labels, as rendered) in a
    /// Prometheus text page.
    fn sample(page: &str, series: &str) -> Option<f64> {
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[tokio::test]
    async fn path_metrics_count_what_a_tunnel_sent_and_read_zero_once_it_closed() {
        let ca = generate_ca(TD, 30).expect("ca");
        let cfg = TunnelConfig {
            udp_buffer: 1 << 20,
            ..TunnelConfig::default()
        };
        let (a, b) = (node_with(&ca, "n1", &cfg), node_with(&ca, "n2", &cfg));
        a.serve();
        b.serve();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let scrape = |n: &Node| {
            metrics::with_local_recorder(&recorder, || n.tunnels.export_path_stats());
            handle.render()
        };
        let run = async {
            // 180 kB each way, in three echoes (the echo server reads at most 64 KiB).
            for _ in 0..3 {
                let lease = b.tunnels.connection("n1", a.addr).await.expect("dial");
                echo_on(lease, &[7u8; 60_000]).await;
            }
            let page = scrape(&b);
            let get = |series: &str| {
                sample(&page, series).unwrap_or_else(|| panic!("{series} in:\n{page}"))
            };
            // 180 kB out in packets of at most 1,452 bytes: at least 124.
            let sent = get(r#"nodemesh_tunnel_packets_sent_total{peer="n1"}"#);
            assert!(sent >= 124.0, "{sent}");
            let datagrams = get(r#"nodemesh_tunnel_udp_datagrams_sent_total{peer="n1"}"#);
            let calls = get(r#"nodemesh_tunnel_udp_send_calls_total{peer="n1"}"#);
            assert!(
                datagrams >= 124.0 && calls >= 1.0 && calls <= datagrams,
                "{datagrams} in {calls}"
            );
            assert!(get(r#"nodemesh_tunnel_udp_datagrams_received_total{peer="n1"}"#) >= 124.0);
            let gauge = |name: &str| format!(r#"{name}{{peer="n1",direction="dialled"}}"#);
            assert!(get(&gauge("nodemesh_tunnel_rtt_seconds")) > 0.0);
            assert!(get(&gauge("nodemesh_tunnel_congestion_window_bytes")) > 0.0);
            let mtu = get(&gauge("nodemesh_tunnel_path_mtu_bytes"));
            assert!((1200.0..=1452.0).contains(&mtu), "{mtu}");
            // A second scrape adds only what was sent in between (at most an ACK or two).
            let again = scrape(&b);
            let sent2 = sample(&again, r#"nodemesh_tunnel_packets_sent_total{peer="n1"}"#);
            assert!(
                sent2.is_some_and(|s| s >= sent && s <= sent + 5.0),
                "{sent2:?} after {sent}"
            );

            for conn in b.pooled("n1", Direction::Dialled) {
                conn.close(VarInt::from_u32(0), b"test");
            }
            b.tunnels.until(|t| t.open_count() == 0).await;
            let closed = scrape(&b);
            for name in [
                "nodemesh_tunnel_rtt_seconds",
                "nodemesh_tunnel_congestion_window_bytes",
                "nodemesh_tunnel_path_mtu_bytes",
            ] {
                assert_eq!(
                    sample(&closed, &gauge(name)),
                    Some(0.0),
                    "{name} in:\n{closed}"
                );
            }
            let sent3 = sample(&closed, r#"nodemesh_tunnel_packets_sent_total{peer="n1"}"#);
            assert!(sent3 >= sent2, "counters never go back: {sent3:?}");
            // No gauge for a direction that never had a connection.
            assert_eq!(
                sample(
                    &closed,
                    r#"nodemesh_tunnel_rtt_seconds{peer="n1",direction="accepted"}"#
                ),
                None
            );
        };
        tokio::time::timeout(BOUND, run)
            .await
            .expect("bounded test");
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
