//! The pool's pieces: one [`Tunnel`] per connection to a peer node, the
//! per-peer set of them with the rule that picks the one new streams use
//! (and closes a drained duplicate), and the guards that count open
//! streams. [`super::Tunnels`] owns the pools, dials and accepts.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use tokio::time::Instant;
use tracing::info;

use super::path_stats::{Exported, PathInfo};
use crate::metrics as m;

/// Application close code of a duplicate connection (simultaneous dial),
/// sent by its dialler once it is drained. Distinct from 0 (`shutdown`).
pub const DUPLICATE_CLOSE_CODE: VarInt = VarInt::from_u32(0x20);

/// Application close reason sent with [`DUPLICATE_CLOSE_CODE`].
pub const DUPLICATE_CLOSE_REASON: &[u8] = b"duplicate tunnel";

/// How long a finished stream on a connection that may be closed as a
/// duplicate keeps it open, waiting for the peer to acknowledge what was sent
/// on it. Bounded so that a stream whose acknowledgement never comes (reset,
/// lost peer) cannot keep a duplicate open for good.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// Who opened a pooled connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This node dialled it.
    Dialled,
    /// The peer dialled it; this node accepted it.
    Accepted,
}

impl Direction {
    /// Both, in the order of [`PeerPool::gauged`].
    pub(super) const ALL: [Direction; 2] = [Direction::Dialled, Direction::Accepted];

    /// The `direction` label of `nodemesh_tunnels_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dialled => "dialled",
            Self::Accepted => "accepted",
        }
    }
}

/// One pooled connection.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) conn: Connection,
    pub(super) direction: Direction,
    /// Negotiated `nodemesh/1.1`: both sides may open streams.
    pub(super) shared: bool,
    /// Registration order; newer wins among equals.
    pub(super) seq: u64,
    /// Streams open on it (both directions), plus leases not yet turned
    /// into streams.
    pub(super) streams: AtomicUsize,
    /// Another connection to the peer is preferred: no new streams here.
    pub(super) superseded: AtomicBool,
    /// Closed (or being closed) as a duplicate.
    pub(super) closing: AtomicBool,
    /// The peer answered a stream with `unavailable`/`draining` on it: no new
    /// streams here; the peer closes it when its streams are done.
    pub(super) retired: AtomicBool,
    /// Its path statistics already added to the metrics.
    pub(super) exported: Exported,
}

impl Entry {
    pub(super) fn live(&self) -> bool {
        self.conn.close_reason().is_none() && !self.closing.load(Ordering::SeqCst)
    }

    /// Whether this node may open streams on it.
    pub(super) fn usable(&self) -> bool {
        self.live()
            && !self.retired.load(Ordering::SeqCst)
            && (self.direction == Direction::Dialled || self.shared)
    }
}

/// The connections to one peer node.
#[derive(Debug)]
pub(super) struct PeerPool {
    pub(super) peer: Arc<str>,
    /// This node's name sorts before the peer's: the connection it dials is
    /// the preferred one.
    pub(super) local_is_lower: bool,
    /// Held across a dial (and every choice of a connection), so concurrent
    /// first uses share one handshake.
    pub(super) dial: tokio::sync::Mutex<()>,
    pub(super) conns: Mutex<Vec<Arc<Entry>>>,
    pub(super) duplicates_closed: AtomicU64,
    /// The path gauges of each direction (dialled, accepted) have been set:
    /// they are set to 0, not left stale, once its connections are gone.
    pub(super) gauged: [AtomicBool; 2],
    /// Failed dials in a row, and until when the peer is not dialled again.
    pub(super) redial: Mutex<Redial>,
}

/// First wait before dialling a peer again after a failed dial.
pub const REDIAL_BASE: Duration = Duration::from_secs(1);
/// Longest wait between dials of a peer that keeps failing.
pub const REDIAL_MAX: Duration = Duration::from_secs(30);

/// The redial back-off of one peer: after `n` failed dials in a row, none
/// for [`REDIAL_BASE`] × 2^(n-1), at most [`REDIAL_MAX`]; a dial that
/// succeeds (or a connection the peer dials) ends it, and it holds only for
/// the address that failed (a peer that moved is dialled at its new one).
#[derive(Debug, Default)]
pub(super) struct Redial {
    failures: u32,
    until: Option<Instant>,
    addr: Option<SocketAddr>,
    last_error: String,
}

/// A peer not dialled now: how long until it is, after how many failures,
/// and why the last one failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingOff {
    /// Time left.
    pub retry_in: Duration,
    /// Failed dials in a row.
    pub failures: u32,
    /// The last dial's error.
    pub last_error: String,
}

impl Redial {
    /// The back-off in force at `now` for dialling `addr`, if any.
    pub(super) fn at(&self, now: Instant, addr: SocketAddr) -> Option<BackingOff> {
        let until = self.until?;
        (until > now && self.addr == Some(addr)).then(|| BackingOff {
            retry_in: until - now,
            failures: self.failures,
            last_error: self.last_error.clone(),
        })
    }

    /// A dial of `addr` failed at `now` with `error`: the next waits longer
    /// (a first failure if the last was at another address).
    pub(super) fn failed(&mut self, now: Instant, addr: SocketAddr, error: String) -> Duration {
        if self.addr != Some(addr) {
            self.failures = 0;
        }
        self.addr = Some(addr);
        self.failures = self.failures.saturating_add(1);
        let wait = REDIAL_BASE
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(REDIAL_MAX);
        self.until = Some(now + wait);
        self.last_error = error;
        wait
    }

    /// A connection to the peer is up: no back-off.
    pub(super) fn reset(&mut self) {
        *self = Self::default();
    }
}

impl PeerPool {
    pub(super) fn lock(&self) -> MutexGuard<'_, Vec<Arc<Entry>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn redial(&self) -> MutexGuard<'_, Redial> {
        self.redial.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `e` is in the preferred class: dialled by the lower-named node.
    fn preferred(&self, e: &Entry) -> bool {
        (e.direction == Direction::Dialled) == self.local_is_lower
    }

    /// A connection this node dialled while the peer's preferred one may
    /// appear: it may have to be closed as a duplicate.
    fn may_be_duplicate(&self, e: &Entry) -> bool {
        e.direction == Direction::Dialled && !self.local_is_lower
    }

    /// Forgets closed connections, marks the ones not to use for new streams,
    /// closes this node's drained duplicates; returns the connection to use.
    pub(super) fn settle(&self, conns: &mut Vec<Arc<Entry>>) -> Option<Arc<Entry>> {
        conns.retain(|e| e.conn.close_reason().is_none());
        let best = conns
            .iter()
            .filter(|e| e.usable())
            .max_by_key(|e| (self.preferred(e), e.seq))
            .cloned();
        for e in conns.iter() {
            let superseded = e.usable() && best.as_ref().is_some_and(|b| !Arc::ptr_eq(b, e));
            e.superseded.store(superseded, Ordering::SeqCst);
            if superseded
                && e.direction == Direction::Dialled
                && e.streams.load(Ordering::SeqCst) == 0
            {
                self.close_duplicate(e);
            }
        }
        best
    }

    pub(super) fn resettle(&self) {
        let mut conns = self.lock();
        self.settle(&mut conns);
    }

    fn close_duplicate(&self, e: &Entry) {
        if e.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        e.conn.close(DUPLICATE_CLOSE_CODE, DUPLICATE_CLOSE_REASON);
        self.duplicates_closed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::TUNNEL_DUPLICATES_CLOSED, "peer" => self.peer.to_string())
            .increment(1);
        info!(
            peer.node = %self.peer,
            tunnel.id = e.conn.stable_id(),
            "duplicate tunnel drained; closed"
        );
    }

    pub(super) fn guard(self: &Arc<Self>, entry: &Arc<Entry>) -> StreamGuard {
        entry.streams.fetch_add(1, Ordering::SeqCst);
        StreamGuard {
            entry: entry.clone(),
            pool: self.clone(),
            acked: None,
        }
    }
}

/// Counts one open stream on a pooled connection until dropped, so that a
/// duplicate connection is closed only once nothing uses it. Where the
/// connection may be closed as a duplicate, the count lasts until the peer
/// has acknowledged what was sent on the stream (at most [`ACK_WAIT`]).
pub struct StreamGuard {
    entry: Arc<Entry>,
    pool: Arc<PeerPool>,
    acked: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGuard")
            .field("peer", &self.pool.peer)
            .field("tunnel", &self.entry.conn.stable_id())
            .finish()
    }
}

impl StreamGuard {
    /// Keeps the count until `send`'s data is acknowledged, where needed.
    fn watch(&mut self, send: &SendStream) {
        if self.pool.may_be_duplicate(&self.entry) {
            let stopped = send.stopped();
            self.acked = Some(Box::pin(async move {
                let _ = stopped.await;
            }));
        }
    }

    fn release(entry: &Entry, pool: &PeerPool) {
        if entry.streams.fetch_sub(1, Ordering::SeqCst) == 1
            && entry.superseded.load(Ordering::SeqCst)
        {
            pool.resettle();
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let acked = self.acked.take();
        match (acked, tokio::runtime::Handle::try_current()) {
            (Some(acked), Ok(rt)) => {
                let entry = self.entry.clone();
                let pool = self.pool.clone();
                rt.spawn(async move {
                    let _ = tokio::time::timeout(ACK_WAIT, acked).await;
                    Self::release(&entry, &pool);
                });
            }
            _ => Self::release(&self.entry, &self.pool),
        }
    }
}

/// A pooled connection to a peer node, as the inbound path serves it.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub(super) entry: Arc<Entry>,
    pub(super) pool: Arc<PeerPool>,
}

impl Tunnel {
    /// The authenticated peer node.
    pub fn peer(&self) -> &Arc<str> {
        &self.pool.peer
    }

    /// The QUIC connection.
    pub fn connection(&self) -> &Connection {
        &self.entry.conn
    }

    /// Who dialled it.
    pub fn direction(&self) -> Direction {
        self.entry.direction
    }

    /// Waits for the next stream the peer opens; the guard counts it open.
    pub async fn accept_bi(
        &self,
    ) -> Result<(SendStream, RecvStream, StreamGuard), ConnectionError> {
        let (send, recv) = self.entry.conn.accept_bi().await?;
        let mut guard = self.pool.guard(&self.entry);
        guard.watch(&send);
        Ok((send, recv, guard))
    }
}

/// The connection chosen for one new stream. It counts as an open stream
/// from the choice on, so the connection cannot be closed as a duplicate
/// before the stream is opened.
#[derive(Debug)]
pub struct Lease {
    pub(super) tunnel: Tunnel,
    pub(super) guard: StreamGuard,
}

impl Lease {
    /// The connection.
    pub fn connection(&self) -> &Connection {
        self.tunnel.connection()
    }

    /// Who dialled it.
    pub fn direction(&self) -> Direction {
        self.tunnel.direction()
    }

    /// Opens the stream; the guard counts it open until dropped.
    pub async fn open_bi(self) -> Result<(SendStream, RecvStream, StreamGuard), ConnectionError> {
        let Self { tunnel, mut guard } = self;
        let (send, recv) = tunnel.entry.conn.open_bi().await?;
        guard.watch(&send);
        Ok((send, recv, guard))
    }
}

/// One pooled connection, for `/config_dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelInfo {
    /// Peer node.
    pub peer: String,
    /// Local id of the connection (quinn's stable id).
    pub id: usize,
    /// Who dialled it.
    pub direction: Direction,
    /// The node that dialled it.
    pub dialled_by: String,
    /// The peer's UDP address.
    pub remote_addr: SocketAddr,
    /// Both sides may open streams on it (`nodemesh/1.1`).
    pub shared: bool,
    /// Streams open on it.
    pub open_streams: usize,
    /// Its path now: RTT, congestion window, MTU, totals.
    pub path: PathInfo,
    /// `in_use` (new streams go here), `draining` (a duplicate: no new
    /// streams, closed when drained), `closing`, `retired` (the peer is
    /// draining it: no new streams, the peer closes it), or `peer_only` (a
    /// `nodemesh/1` connection the peer dialled: it carries only the peer's
    /// streams).
    pub state: &'static str,
}

/// Totals since start, for tests and debugging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections this node dialled (successful handshakes).
    pub dialled: u64,
    /// Connections this node accepted (successful handshakes).
    pub accepted: u64,
    /// Duplicates this node closed.
    pub duplicates_closed: u64,
}
