//! Byte relay between two connection ends with half-close and reset preserved.
//!
//! Owns the data phase of every proxied connection, after the stream header
//! and status: [`tcp_quic`] (a pod's TCP connection ↔ a tunnel stream, at L1
//! and at L2) and [`tcp_tcp`] (same-node delivery and passthrough). Both move
//! bytes each way until both directions are done, with:
//!
//! - half-close preserved: TCP EOF → `finish()` of the QUIC send side (or
//!   `shutdown(Write)` of the other TCP socket), QUIC stream finished → TCP
//!   `shutdown(Write)`; the opposite direction keeps flowing;
//! - resets propagated: a TCP RST (or any other TCP error) → QUIC
//!   `RESET_STREAM` + `STOP_SENDING` with [`TCP_RESET_CODE`] (or
//!   [`StatusCode::Internal`](crate::tunnel::header::StatusCode::Internal)),
//!   or an RST on the other TCP socket; a QUIC reset, stop or lost connection →
//!   RST on the TCP socket ([`reset_tcp`]);
//! - a [`RELAY_BUFFER_SIZE`] buffer per direction only while that direction
//!   has data to move: each direction awaits readiness (TCP) or the first
//!   received chunk (QUIC) without a buffer, then takes one — from a small
//!   pool for stream → TCP and TCP → TCP; a fresh allocation for TCP →
//!   stream, whose large reads quinn takes over without a copy — moves
//!   everything that is ready, and lets it go when its source would block.
//!   An idle connection holds no buffer; a busy one moves up to 64 KiB per
//!   syscall;
//! - a daemon-wide budget of those buffers ([`set_buffer_budget`], config
//!   `limits.relay_buffer_memory_mib`): a direction that finds it spent moves
//!   its data through a [`FALLBACK_BUFFER_SIZE`] buffer instead, slower but
//!   never waiting for another connection (so no connection can stall
//!   another's progress), and counted;
//! - byte counters incremented as the bytes are written.
//!
//! A reset or stop from the QUIC peer is seen at the next read or write of the
//! stream: while the stream→TCP direction is still open that is at once; once
//! it has finished, a `STOP_SENDING` is noticed when the TCP side next has
//! data to send (as a TCP RST is noticed at the next write).
//!
//! Setting `TCP_NODELAY` is the caller's job.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::BytesMut;
use metrics::Counter;
use quinn::VarInt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;

use crate::relay_splice::TcpRelay;
use crate::tunnel::header::StatusCode;

/// Bytes of the buffer a relay direction borrows while it has data to move
/// (64 KiB: one TCP receive-window's worth of reads per syscall on a
/// datacenter path). Idle connections hold none.
pub const RELAY_BUFFER_SIZE: usize = 64 * 1024;

/// QUIC stream error code (in `RESET_STREAM` and `STOP_SENDING`) meaning "the
/// TCP connection at the other end was reset". Outside the status-code range
/// so it cannot be mistaken for an L2 refusal.
pub const TCP_RESET_CODE: u32 = 0x10;

/// Bytes moved by a finished relay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes from the first end (the client side) to the second.
    pub a_to_b: u64,
    /// Bytes from the second end back to the first.
    pub b_to_a: u64,
}

impl RelayStats {
    /// The same counts seen from the other end (`a_to_b` and `b_to_a`
    /// exchanged): at L2 the relay's first end is the destination pod.
    pub fn swapped(self) -> Self {
        Self {
            a_to_b: self.b_to_a,
            b_to_a: self.a_to_b,
        }
    }
}

/// An end of a relay: in [`tcp_quic`] `A` is the TCP connection and `B` the
/// QUIC stream; in [`tcp_tcp`] `A` is the first argument and `B` the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The first end.
    A,
    /// The second end.
    B,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::A => "a",
            Side::B => "b",
        })
    }
}

/// How a relay ended abnormally. Whatever the cause, both ends have been
/// reset when it is returned.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A TCP end was reset or aborted by its peer (ECONNRESET, EPIPE,
    /// ECONNABORTED, ENOTCONN): an ordinary application close.
    #[error("TCP connection on side {side} was reset")]
    TcpReset {
        /// Which end.
        side: Side,
    },
    /// The QUIC peer reset its sending side (`RESET_STREAM`).
    #[error("tunnel stream reset by peer with code {code}")]
    PeerReset {
        /// The peer's error code ([`TCP_RESET_CODE`] for a TCP reset at its end).
        code: u64,
    },
    /// The QUIC peer stopped reading (`STOP_SENDING`).
    #[error("tunnel stream stopped by peer with code {code}")]
    PeerStopped {
        /// The peer's error code.
        code: u64,
    },
    /// The tunnel connection carrying the stream was lost.
    #[error("tunnel connection lost: {0}")]
    TunnelLost(#[source] quinn::ConnectionError),
    /// Reading the stream failed otherwise (already closed, 0-RTT rejected, ...).
    #[error("tunnel stream read failed: {0}")]
    StreamRead(#[source] quinn::ReadError),
    /// Writing the stream failed otherwise (already closed, 0-RTT rejected, ...).
    #[error("tunnel stream write failed: {0}")]
    StreamWrite(#[source] quinn::WriteError),
    /// Any other I/O error on a TCP end.
    #[error("I/O error on side {side}: {source}")]
    Io {
        /// Which end.
        side: Side,
        /// The error.
        source: io::Error,
    },
}

impl RelayError {
    /// Whether this is an ordinary close by an application at either end
    /// (a TCP reset here or relayed by the peer), to be logged quietly.
    pub fn is_expected(&self) -> bool {
        let tcp_reset = u64::from(TCP_RESET_CODE);
        match self {
            Self::TcpReset { .. } => true,
            Self::PeerReset { code } | Self::PeerStopped { code } => *code == tcp_reset,
            _ => false,
        }
    }

    /// The code this side resets and stops its QUIC stream with.
    fn stream_code(&self) -> VarInt {
        match self {
            Self::TcpReset { .. } => VarInt::from_u32(TCP_RESET_CODE),
            Self::PeerReset { code } | Self::PeerStopped { code } => {
                VarInt::from_u64(*code).unwrap_or(VarInt::from_u32(StatusCode::Internal as u32))
            }
            _ => VarInt::from_u32(StatusCode::Internal as u32),
        }
    }
}

pub(crate) fn tcp_error(side: Side, source: io::Error) -> RelayError {
    use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, NotConnected};
    match source.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            RelayError::TcpReset { side }
        }
        _ => RelayError::Io { side, source },
    }
}

fn read_error(e: quinn::ReadError) -> RelayError {
    match e {
        quinn::ReadError::Reset(code) => RelayError::PeerReset {
            code: code.into_inner(),
        },
        quinn::ReadError::ConnectionLost(e) => RelayError::TunnelLost(e),
        other => RelayError::StreamRead(other),
    }
}

fn write_error(e: quinn::WriteError) -> RelayError {
    match e {
        quinn::WriteError::Stopped(code) => RelayError::PeerStopped {
            code: code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(e) => RelayError::TunnelLost(e),
        other => RelayError::StreamWrite(other),
    }
}

/// Counts one direction's bytes as they are written to the other side.
#[derive(Debug)]
struct Tally<'a> {
    counter: &'a Counter,
}

impl<'a> Tally<'a> {
    fn open(counter: &'a Counter) -> Self {
        Self { counter }
    }

    fn add(&self, n: u64) {
        self.counter.increment(n);
    }
}

/// Bytes of the buffer a direction uses when the relay buffer budget is
/// spent: a system call per 4 KiB instead of per 64 KiB (docs/benchmarks.md,
/// "Relay buffer size": 0.5–0.8× the throughput at 1.3–2.7× the CPU per
/// byte).
pub const FALLBACK_BUFFER_SIZE: usize = 4 * 1024;

/// Default of `limits.relay_buffer_memory_mib`: 4096 buffers of 64 KiB.
pub const DEFAULT_BUFFER_BUDGET_MIB: usize = 256;

/// The daemon's relay buffer budget (config `limits.relay_buffer_memory_mib`).
static BUDGET: BufferBudget = BufferBudget::new(DEFAULT_BUFFER_BUDGET_MIB * BUFFERS_PER_MIB);

const BUFFERS_PER_MIB: usize = (1 << 20) / RELAY_BUFFER_SIZE;

/// How many [`RELAY_BUFFER_SIZE`] buffers may be lent at once, how many are,
/// and how often a direction found none left.
#[derive(Debug)]
struct BufferBudget {
    buffers: AtomicUsize,
    lent: AtomicUsize,
    fallbacks: AtomicU64,
}

impl BufferBudget {
    const fn new(buffers: usize) -> Self {
        Self {
            buffers: AtomicUsize::new(buffers),
            lent: AtomicUsize::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    /// Counts one buffer out; `false` (and a fallback counted) when all are
    /// lent.
    fn reserve(&self) -> bool {
        let buffers = self.buffers.load(Ordering::Relaxed);
        let reserved = self
            .lent
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |lent| {
                (lent < buffers).then_some(lent + 1)
            })
            .is_ok();
        if !reserved {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        reserved
    }

    /// Gives back a buffer [`BufferBudget::reserve`] counted.
    fn release(&self) {
        self.lent.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sets the relay buffer budget to `mib` MiB (at least one buffer).
pub fn set_buffer_budget(mib: usize) {
    BUDGET.buffers.store(
        mib.saturating_mul(BUFFERS_PER_MIB).max(1),
        Ordering::Relaxed,
    );
}

/// Bytes of relay buffers lent now, and the budget.
pub fn buffer_use() -> (usize, usize) {
    (
        BUDGET.lent.load(Ordering::Relaxed) * RELAY_BUFFER_SIZE,
        BUDGET.buffers.load(Ordering::Relaxed) * RELAY_BUFFER_SIZE,
    )
}

/// Publishes the relay buffer gauge and fallback counter (at each scrape).
pub fn export_buffer_metrics() {
    metrics::gauge!(crate::metrics::RELAY_BUFFER_BYTES).set(buffer_use().0 as f64);
    metrics::counter!(crate::metrics::RELAY_BUFFER_FALLBACKS)
        .absolute(BUDGET.fallbacks.load(Ordering::Relaxed));
}

/// A reservation of one full-size buffer in the budget, or none when the
/// budget is spent; released on drop. The TCP → stream direction holds one
/// for the `BytesMut` it hands on to quinn, [`Lent`] one for its buffer.
struct Reserved(bool);

impl Reserved {
    fn take() -> Self {
        Self(BUDGET.reserve())
    }

    /// The size of buffer this reservation allows.
    fn size(&self) -> usize {
        if self.0 {
            RELAY_BUFFER_SIZE
        } else {
            FALLBACK_BUFFER_SIZE
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.0 {
            BUDGET.release();
        }
    }
}

/// Free relay buffers kept for reuse (at most [`POOLED_BUFFERS`]), so a
/// direction that wakes up with data does not zero a fresh 64 KiB.
static POOL: std::sync::Mutex<Vec<Box<[u8]>>> = std::sync::Mutex::new(Vec::new());

/// Free relay buffers kept at most: 8 x 64 KiB = 512 KiB, enough for a few
/// busy connections at once; beyond that buffers go back to the allocator.
pub const POOLED_BUFFERS: usize = 8;

/// A relay buffer lent to one direction while it has data to move: a full
/// one within the budget, back to the pool when dropped, or a small one when
/// the budget is spent.
struct Lent {
    buf: Box<[u8]>,
    reserved: Reserved,
}

impl Lent {
    fn take() -> Self {
        let reserved = Reserved::take();
        let pooled = if reserved.0 {
            match POOL.lock() {
                Ok(mut p) => p.pop(),
                Err(p) => p.into_inner().pop(),
            }
        } else {
            None
        };
        let buf = pooled.unwrap_or_else(|| vec![0u8; reserved.size()].into_boxed_slice());
        Self { buf, reserved }
    }

    fn buf(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if !self.reserved.0 {
            return;
        }
        let mut pool = match POOL.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        if pool.len() < POOLED_BUFFERS {
            pool.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Relays a TCP connection over a QUIC bidirectional stream.
///
/// `tcp_to_quic` and `quic_to_tcp` count bytes as they are written to the
/// other side. Returns when both directions have finished; on error, the TCP
/// connection has been reset and the stream reset and stopped.
///
/// Not an `async fn`: the future of one keeps its arguments twice, as
/// captured and again as locals (rust-lang/rust#62958), 128 bytes more per
/// relayed connection for the connection's whole life. The `async move`
/// block below keeps them once.
#[allow(clippy::manual_async_fn)] // on purpose: see the doc
pub fn tcp_quic(
    mut tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    tcp_to_quic: Counter,
    quic_to_tcp: Counter,
) -> impl Future<Output = Result<RelayStats, RelayError>> + Send {
    async move {
        let tally = Tally::open(&tcp_to_quic);
        let result = {
            let (tcp_r, mut tcp_w) = tcp.split();
            tokio::try_join!(
                tcp_to_stream(&tcp_r, &mut send, &tally),
                stream_to_tcp(&mut recv, &mut tcp_w, &quic_to_tcp),
            )
        };
        match result {
            Ok((a_to_b, b_to_a)) => Ok(RelayStats { a_to_b, b_to_a }),
            Err(e) => {
                let code = e.stream_code();
                // ClosedStream here only means that side was already finished
                // or reset, which is fine.
                let _ = send.reset(code);
                let _ = recv.stop(code);
                reset_tcp(tcp);
                tracing::debug!(error = %e, code = code.into_inner(), "relay reset");
                Err(e)
            }
        }
    }
}

/// Reads this large or larger go to the stream as they are (quinn keeps the
/// chunk until it is acknowledged: no copy into its send buffer); smaller
/// ones are copied, so that a small request does not pin a whole
/// [`RELAY_BUFFER_SIZE`] allocation until its ACK.
const ZERO_COPY_MIN: usize = 16 * 1024;

/// TCP → stream until TCP EOF, then finish the stream. Holds a buffer only
/// while the socket has data: a fresh [`RELAY_BUFFER_SIZE`] allocation each
/// time the socket becomes readable, its large reads handed to quinn without
/// a copy ([`ZERO_COPY_MIN`]).
async fn tcp_to_stream(
    tcp: &ReadHalf<'_>,
    send: &mut quinn::SendStream,
    tally: &Tally<'_>,
) -> Result<u64, RelayError> {
    let mut total = 0u64;
    'idle: loop {
        tcp.readable().await.map_err(|e| tcp_error(Side::A, e))?;
        // Allocated at the first read below, and again whenever what is
        // left of it is too small; full size within the budget.
        let reserved = Reserved::take();
        let mut buf = BytesMut::new();
        loop {
            if buf.capacity() < ZERO_COPY_MIN.min(reserved.size()) {
                buf = BytesMut::with_capacity(reserved.size());
            }
            let n = match tcp.try_read_buf(&mut buf) {
                Ok(0) => break 'idle,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue 'idle,
                Err(e) => return Err(tcp_error(Side::A, e)),
            };
            if n >= ZERO_COPY_MIN {
                send.write_chunk(buf.split().freeze()).await
            } else {
                let r = send.write_all(&buf).await;
                buf.clear();
                r
            }
            .map_err(write_error)?;
            tally.add(n as u64);
            total += n as u64;
        }
    }
    // Fails only if already finished or reset: nothing left to do then.
    let _ = send.finish();
    tracing::trace!(bytes = total, "tcp eof: stream finished");
    Ok(total)
}

/// Stream → TCP until the stream is finished, then shut down TCP writes.
/// Waits for data without a buffer (quinn's `read_chunk`), then fills a
/// lent relay buffer with what is already received, so each TCP write
/// carries many QUIC frames.
async fn stream_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut quinn::RecvStream,
    tcp: &mut W,
    counter: &Counter,
) -> Result<u64, RelayError> {
    use futures::FutureExt;
    let mut total = 0u64;
    'idle: while let Some(chunk) = recv
        .read_chunk(RELAY_BUFFER_SIZE, true)
        .await
        .map_err(read_error)?
    {
        let mut lent = Lent::take();
        let buf = lent.buf();
        let mut len = chunk.bytes.len().min(buf.len());
        buf[..len].copy_from_slice(&chunk.bytes[..len]);
        drop(chunk);
        loop {
            // Whatever is already here, without waiting (a pending read
            // consumes nothing; the next `read_chunk` registers the waker).
            let mut finished = false;
            while len < buf.len() {
                match recv.read(&mut buf[len..]).now_or_never() {
                    Some(Ok(Some(n))) => len += n,
                    Some(Ok(None)) => {
                        finished = true;
                        break;
                    }
                    Some(Err(e)) => return Err(read_error(e)),
                    None => break,
                }
            }
            tcp.write_all(&buf[..len])
                .await
                .map_err(|e| tcp_error(Side::A, e))?;
            counter.increment(len as u64);
            total += len as u64;
            if finished {
                break 'idle;
            }
            if len < buf.len() {
                continue 'idle;
            }
            len = 0;
        }
    }
    tcp.shutdown().await.map_err(|e| tcp_error(Side::A, e))?;
    tracing::trace!(bytes = total, "stream finished: tcp write shut down");
    Ok(total)
}

/// Relays two TCP connections with the process's TCP ↔ TCP engine
/// ([`crate::relay_splice::mode`]: the copy loop below, or splice(2)).
///
/// `a_to_b` and `b_to_a` count bytes as they are written to the other side.
/// Returns when both directions have finished; on error, both connections
/// have been reset.
pub async fn tcp_tcp(
    a: TcpStream,
    b: TcpStream,
    a_to_b: Counter,
    b_to_a: Counter,
) -> Result<RelayStats, RelayError> {
    tcp_tcp_on(crate::relay_splice::mode(), a, b, a_to_b, b_to_a).await
}

/// [`tcp_tcp`] on `engine`, whatever the process-wide choice.
pub(crate) async fn tcp_tcp_on(
    engine: TcpRelay,
    mut a: TcpStream,
    mut b: TcpStream,
    a_to_b: Counter,
    b_to_a: Counter,
) -> Result<RelayStats, RelayError> {
    match both_ways(engine, &mut a, &mut b, &a_to_b, &b_to_a).await {
        Ok(stats) => Ok(stats),
        Err(e) => {
            reset_tcp(a);
            reset_tcp(b);
            tracing::debug!(error = %e, "relay reset");
            Err(e)
        }
    }
}

/// Both directions of a TCP ↔ TCP relay on `engine`, until each has seen
/// EOF; the caller resets the connections on error.
async fn both_ways(
    engine: TcpRelay,
    a: &mut TcpStream,
    b: &mut TcpStream,
    a_to_b: &Counter,
    b_to_a: &Counter,
) -> Result<RelayStats, RelayError> {
    if engine == TcpRelay::Splice {
        return crate::relay_splice::both_ways(a, b, a_to_b, b_to_a).await;
    }
    let (a_r, mut a_w) = a.split();
    let (b_r, mut b_w) = b.split();
    let (a_to_b, b_to_a) = tokio::try_join!(
        tcp_to_tcp(&a_r, Side::A, &mut b_w, Side::B, a_to_b),
        tcp_to_tcp(&b_r, Side::B, &mut a_w, Side::A, b_to_a),
    )?;
    Ok(RelayStats { a_to_b, b_to_a })
}

/// One direction of a TCP ↔ TCP relay: copy until EOF, then shut down
/// writes. Holds a relay buffer only while `from` has data ([`Lent`]).
async fn tcp_to_tcp<W: AsyncWrite + Unpin>(
    from: &ReadHalf<'_>,
    from_side: Side,
    to: &mut W,
    to_side: Side,
    counter: &Counter,
) -> Result<u64, RelayError> {
    let mut total = 0u64;
    'idle: loop {
        from.readable().await.map_err(|e| tcp_error(from_side, e))?;
        let mut lent = Lent::take();
        let buf = lent.buf();
        loop {
            let n = match from.try_read(buf) {
                Ok(0) => break 'idle,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue 'idle,
                Err(e) => return Err(tcp_error(from_side, e)),
            };
            to.write_all(buf.get(..n).unwrap_or_default())
                .await
                .map_err(|e| tcp_error(to_side, e))?;
            counter.increment(n as u64);
            total += n as u64;
        }
    }
    to.shutdown().await.map_err(|e| tcp_error(to_side, e))?;
    tracing::trace!(from = %from_side, bytes = total, "eof: write side shut down");
    Ok(total)
}

/// [`tcp_quic`] that stops when `cancel` fires: then the TCP connection is
/// reset and the stream reset and stopped with `code`, and `None` returned.
/// Not an `async fn`, for the reason given at [`tcp_quic`].
#[allow(clippy::manual_async_fn)] // on purpose: see the doc
pub fn tcp_quic_cancellable(
    mut tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    tcp_to_quic: Counter,
    quic_to_tcp: Counter,
    cancel: &tokio_util::sync::CancellationToken,
    code: VarInt,
) -> impl Future<Output = Option<Result<RelayStats, RelayError>>> + Send + '_ {
    async move {
        let tally = Tally::open(&tcp_to_quic);
        let result = {
            let (tcp_r, mut tcp_w) = tcp.split();
            tokio::select! {
                _ = cancel.cancelled() => None,
                r = async {
                    tokio::try_join!(
                        tcp_to_stream(&tcp_r, &mut send, &tally),
                        stream_to_tcp(&mut recv, &mut tcp_w, &quic_to_tcp),
                    )
                } => Some(r),
            }
        };
        match result {
            None => {
                let _ = send.reset(code);
                let _ = recv.stop(code);
                reset_tcp(tcp);
                None
            }
            Some(Ok((a_to_b, b_to_a))) => Some(Ok(RelayStats { a_to_b, b_to_a })),
            Some(Err(e)) => {
                let code = e.stream_code();
                let _ = send.reset(code);
                let _ = recv.stop(code);
                reset_tcp(tcp);
                tracing::debug!(error = %e, code = code.into_inner(), "relay reset");
                Some(Err(e))
            }
        }
    }
}

/// [`tcp_tcp`] that stops when `cancel` fires: then both connections are
/// reset and `None` returned. Same engine as [`tcp_tcp`].
pub async fn tcp_tcp_cancellable(
    a: TcpStream,
    b: TcpStream,
    a_to_b: Counter,
    b_to_a: Counter,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<Result<RelayStats, RelayError>> {
    let engine = crate::relay_splice::mode();
    tcp_tcp_cancellable_on(engine, a, b, a_to_b, b_to_a, cancel).await
}

async fn tcp_tcp_cancellable_on(
    engine: TcpRelay,
    mut a: TcpStream,
    mut b: TcpStream,
    a_to_b: Counter,
    b_to_a: Counter,
    cancel: &tokio_util::sync::CancellationToken,
) -> Option<Result<RelayStats, RelayError>> {
    let result = tokio::select! {
        _ = cancel.cancelled() => None,
        r = both_ways(engine, &mut a, &mut b, &a_to_b, &b_to_a) => Some(r),
    };
    match result {
        None => {
            reset_tcp(a);
            reset_tcp(b);
            None
        }
        Some(Ok(stats)) => Some(Ok(stats)),
        Some(Err(e)) => {
            reset_tcp(a);
            reset_tcp(b);
            tracing::debug!(error = %e, "relay reset");
            Some(Err(e))
        }
    }
}

/// Resets a TCP connection (RST instead of FIN) as it is dropped.
pub fn reset_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
    drop(tcp);
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use metrics::CounterFn;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::tunnel::header::{
        read_header, read_status, write_header, write_status, Status, StreamHeader,
    };

    /// Bounds every test, so a relay bug fails instead of hanging CI.
    const TEST_DEADLINE: Duration = Duration::from_secs(60);

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(TEST_DEADLINE, f)
            .await
            .expect("test deadline")
    }

    #[derive(Debug, Default)]
    struct TestCounter(AtomicU64);

    impl CounterFn for TestCounter {
        fn increment(&self, value: u64) {
            self.0.fetch_add(value, Ordering::Relaxed);
        }
        fn absolute(&self, value: u64) {
            self.0.fetch_max(value, Ordering::Relaxed);
        }
    }

    fn counter() -> (Counter, Arc<TestCounter>) {
        let c = Arc::new(TestCounter::default());
        (Counter::from_arc(c.clone()), c)
    }

    fn value(c: &TestCounter) -> u64 {
        c.0.load(Ordering::Relaxed)
    }

    /// A connected quinn client/server pair on loopback, self-signed cert.
    struct QuicPair {
        client: quinn::Connection,
        server: quinn::Connection,
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
    }

    async fn quic_pair() -> QuicPair {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let server_config =
            quinn::ServerConfig::with_single_cert(vec![cert.clone()], key).expect("server config");
        let server_ep = quinn::Endpoint::server(server_config, loopback()).expect("server bind");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client_config =
            quinn::ClientConfig::with_root_certificates(Arc::new(roots)).expect("client config");
        let mut client_ep = quinn::Endpoint::client(loopback()).expect("client bind");
        client_ep.set_default_client_config(client_config);
        let server_addr = server_ep.local_addr().expect("server addr");
        let (client, server) = tokio::join!(
            async {
                client_ep
                    .connect(server_addr, "localhost")
                    .expect("connect")
                    .await
                    .expect("client handshake")
            },
            async {
                server_ep
                    .accept()
                    .await
                    .expect("incoming")
                    .await
                    .expect("server handshake")
            },
        );
        QuicPair {
            client,
            server,
            _endpoints: (client_ep, server_ep),
        }
    }

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// A TCP connection on loopback: (the connecting end, the accepted end).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind(loopback()).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    type Relay = JoinHandle<Result<RelayStats, RelayError>>;

    /// client app ─TCP─ L1 relay ═QUIC stream═ L2 relay ─TCP─ server pod,
    /// opened the way the daemons do it: header, then status, then relay.
    struct Mesh {
        client: TcpStream,
        server: TcpStream,
        l1: Relay,
        l2: Relay,
        /// L1's tcp→quic and quic→tcp counters.
        l1_counters: (Arc<TestCounter>, Arc<TestCounter>),
        _quic: QuicPair,
    }

    async fn mesh() -> Mesh {
        let quic = quic_pair().await;
        let (client, l1_tcp) = tcp_pair().await;
        let pod = TcpListener::bind(loopback()).await.expect("bind pod");

        let (mut l1_send, mut l1_recv) = quic.client.open_bi().await.expect("open stream");
        let header = StreamHeader {
            dst: pod.local_addr().expect("pod addr"),
            src: client.local_addr().expect("client addr"),
            src_identity: "spiffe://cluster.local/ns/default/sa/client".to_owned(),
            flags: 0,
            trace_id: None,
        };
        write_header(&mut l1_send, &header)
            .await
            .expect("write header");

        let (mut l2_send, mut l2_recv) = quic.server.accept_bi().await.expect("accept stream");
        let got = read_header(&mut l2_recv).await.expect("read header");
        assert_eq!(got, header);
        let (l2_tcp, server) = tokio::join!(TcpStream::connect(got.dst), pod.accept());
        let (l2_tcp, server) = (l2_tcp.expect("connect pod"), server.expect("accept pod").0);
        write_status(&mut l2_send, &Status::new(StatusCode::Ok))
            .await
            .expect("write status");
        assert_eq!(
            read_status(&mut l1_recv).await.expect("read status").code,
            StatusCode::Ok
        );

        let (c1, v1) = counter();
        let (c2, v2) = counter();
        let l1 = tokio::spawn(tcp_quic(l1_tcp, l1_send, l1_recv, c1, c2));
        let l2 = tokio::spawn(tcp_quic(
            l2_tcp,
            l2_send,
            l2_recv,
            Counter::noop(),
            Counter::noop(),
        ));
        Mesh {
            client,
            server,
            l1,
            l2,
            l1_counters: (v1, v2),
            _quic: quic,
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Sends `out` then shuts down writes, while reading everything the other
    /// end sends until EOF.
    async fn exchange(stream: TcpStream, out: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = stream.into_split();
        let writer = tokio::spawn(async move {
            w.write_all(&out).await.expect("write");
            w.shutdown().await.expect("shutdown");
            w
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read to end");
        let _w = writer.await.expect("writer task");
        got
    }

    /// `up` from `client` and `down` from `server` at once, each side then
    /// shutting down its writes; returns what the server and the client
    /// received.
    async fn exchange_both(
        client: TcpStream,
        server: TcpStream,
        up: &[u8],
        down: &[u8],
    ) -> (Vec<u8>, Vec<u8>) {
        tokio::join!(
            exchange(server, down.to_vec()),
            exchange(client, up.to_vec())
        )
    }

    /// Reads until the connection fails; a clean EOF is a test failure.
    async fn read_until_error(stream: &mut TcpStream) -> io::Error {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => panic!("clean EOF where a reset was expected"),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }

    /// Writes until the connection fails.
    async fn write_until_error(stream: &mut TcpStream) -> io::Error {
        let chunk = [7u8; 16 * 1024];
        loop {
            if let Err(e) = stream.write_all(&chunk).await {
                return e;
            }
        }
    }

    fn assert_reset(e: &io::Error) {
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "expected a reset, got {e:?}"
        );
    }

    async fn result(relay: Relay) -> Result<RelayStats, RelayError> {
        relay.await.expect("relay task")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_quic_carries_megabytes_both_ways_byte_identical() {
        within(async {
            let m = mesh().await;
            let up = pattern(1, 4 << 20);
            let down = pattern(2, 3 << 20);
            let (at_server, at_client) = exchange_both(m.client, m.server, &up, &down).await;
            assert!(at_server == up, "client → server bytes differ");
            assert!(at_client == down, "server → client bytes differ");

            let l1 = result(m.l1).await.expect("l1 relay");
            let l2 = result(m.l2).await.expect("l2 relay");
            assert_eq!(
                l1,
                RelayStats {
                    a_to_b: 4 << 20,
                    b_to_a: 3 << 20
                }
            );
            assert_eq!(
                l2,
                RelayStats {
                    a_to_b: 3 << 20,
                    b_to_a: 4 << 20
                }
            );
            assert_eq!(value(&m.l1_counters.0), 4 << 20);
            assert_eq!(value(&m.l1_counters.1), 3 << 20);
        })
        .await;
    }

    #[test]
    fn the_buffer_budget_lends_up_to_its_size_then_counts_fallbacks() {
        let b = BufferBudget::new(2);
        assert!(b.reserve());
        assert!(b.reserve());
        assert!(!b.reserve(), "a third buffer is over the budget");
        assert_eq!(b.fallbacks.load(Ordering::Relaxed), 1);
        assert_eq!(b.lent.load(Ordering::Relaxed), 2);
        b.release();
        assert!(b.reserve(), "a released buffer can be lent again");
        assert_eq!(b.lent.load(Ordering::Relaxed), 2);
        assert_eq!(b.fallbacks.load(Ordering::Relaxed), 1);
    }

    /// With the daemon's budget down to one buffer, the four directions of
    /// an L1 + L2 relay pair mostly run on fallback buffers: the bytes still
    /// arrive intact and the fallbacks are counted. (Other tests running
    /// meanwhile may fall back too; that changes only their speed.)
    #[tokio::test]
    async fn a_spent_buffer_budget_slows_relays_down_but_loses_nothing() {
        let before = BUDGET.fallbacks.load(Ordering::Relaxed);
        set_buffer_budget(0);
        assert_eq!(BUDGET.buffers.load(Ordering::Relaxed), 1);
        let outcome = within(async {
            let m = mesh().await;
            let up = pattern(3, 2 << 20);
            let down = pattern(4, 2 << 20);
            let (at_server, at_client) = exchange_both(m.client, m.server, &up, &down).await;
            let stats = (result(m.l1).await, result(m.l2).await);
            (at_server == up, at_client == down, stats)
        })
        .await;
        set_buffer_budget(DEFAULT_BUFFER_BUDGET_MIB);
        let (up_ok, down_ok, (l1, l2)) = outcome;
        assert!(up_ok && down_ok, "bytes differ through fallback buffers");
        assert_eq!(l1.expect("l1").a_to_b, 2 << 20);
        assert_eq!(l2.expect("l2").a_to_b, 2 << 20);
        assert!(
            BUDGET.fallbacks.load(Ordering::Relaxed) > before,
            "four busy directions on a budget of one buffer fell back"
        );
    }

    #[tokio::test]
    async fn tcp_quic_half_close_lets_the_reply_flow_after_client_fin() {
        within(async {
            let mut m = mesh().await;
            m.client.write_all(b"request").await.expect("write");
            m.client
                .shutdown()
                .await
                .expect("client shuts its write side");

            // The FIN crossed the tunnel: the server reads the request then EOF.
            let mut request = Vec::new();
            m.server
                .read_to_end(&mut request)
                .await
                .expect("server read");
            assert_eq!(request, b"request");

            // The other direction still flows, all of it, then FIN.
            let reply = pattern(3, 1 << 20);
            m.server.write_all(&reply).await.expect("server write");
            m.server.shutdown().await.expect("server shutdown");
            let mut got = Vec::new();
            m.client.read_to_end(&mut got).await.expect("client read");
            assert!(got == reply, "reply differs");

            let l1 = result(m.l1).await.expect("l1 relay");
            assert_eq!(
                l1,
                RelayStats {
                    a_to_b: 7,
                    b_to_a: 1 << 20
                }
            );
            assert_eq!(value(&m.l1_counters.0), 7);
            assert_eq!(value(&m.l1_counters.1), 1 << 20);
            result(m.l2).await.expect("l2 relay");
        })
        .await;
    }

    #[tokio::test]
    async fn client_reset_reaches_the_server_as_rst() {
        within(async {
            let mut m = mesh().await;
            m.client.write_all(b"hi").await.expect("write");
            let mut buf = [0u8; 2];
            m.server.read_exact(&mut buf).await.expect("relay is up");
            reset_tcp(m.client);

            assert_reset(&read_until_error(&mut m.server).await);
            let l1 = result(m.l1).await.expect_err("l1 sees the reset");
            assert!(
                matches!(l1, RelayError::TcpReset { side: Side::A }),
                "{l1:?}"
            );
            assert!(l1.is_expected());
            let l2 = result(m.l2).await.expect_err("l2 sees the stream reset");
            assert!(
                matches!(
                    l2,
                    RelayError::PeerReset { code: 0x10 } | RelayError::PeerStopped { code: 0x10 }
                ),
                "{l2:?}"
            );
            assert!(l2.is_expected());
        })
        .await;
    }

    #[tokio::test]
    async fn server_reset_reaches_the_client_as_rst() {
        within(async {
            let mut m = mesh().await;
            m.server.write_all(b"hi").await.expect("write");
            let mut buf = [0u8; 2];
            m.client.read_exact(&mut buf).await.expect("relay is up");
            reset_tcp(m.server);

            assert_reset(&read_until_error(&mut m.client).await);
            let l2 = result(m.l2).await.expect_err("l2 sees the reset");
            assert!(
                matches!(l2, RelayError::TcpReset { side: Side::A }),
                "{l2:?}"
            );
            let l1 = result(m.l1).await.expect_err("l1 sees the stream reset");
            assert!(
                matches!(
                    l1,
                    RelayError::PeerReset { code: 0x10 } | RelayError::PeerStopped { code: 0x10 }
                ),
                "{l1:?}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn reset_after_half_close_still_propagates() {
        within(async {
            let mut m = mesh().await;
            // Server finishes its side; the client keeps sending, then resets.
            m.server.shutdown().await.expect("server fin");
            let mut buf = [0u8; 1];
            assert_eq!(m.client.read(&mut buf).await.expect("client sees fin"), 0);
            m.client.write_all(b"more").await.expect("write");
            let mut got = [0u8; 4];
            m.server.read_exact(&mut got).await.expect("still flowing");
            reset_tcp(m.client);
            assert_reset(&read_until_error(&mut m.server).await);
            assert!(matches!(
                result(m.l1).await,
                Err(RelayError::TcpReset { side: Side::A })
            ));
        })
        .await;
    }

    /// L1 relay with the test holding the raw L2 end of the stream.
    struct RawPeer {
        client: TcpStream,
        l1: Relay,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        quic: QuicPair,
    }

    async fn raw_peer() -> RawPeer {
        let quic = quic_pair().await;
        let (mut client, l1_tcp) = tcp_pair().await;
        let (send, recv) = quic.client.open_bi().await.expect("open stream");
        let l1 = tokio::spawn(tcp_quic(
            l1_tcp,
            send,
            recv,
            Counter::noop(),
            Counter::noop(),
        ));
        // The stream reaches the server with the first bytes.
        client.write_all(b"x").await.expect("write");
        let (send, mut recv) = quic.server.accept_bi().await.expect("accept stream");
        let mut first = [0u8; 1];
        recv.read_exact(&mut first).await.expect("first byte");
        RawPeer {
            client,
            l1,
            send,
            recv,
            quic,
        }
    }

    #[tokio::test]
    async fn peer_stream_reset_resets_the_tcp_connection() {
        within(async {
            let mut p = raw_peer().await;
            p.send.reset(VarInt::from_u32(9)).expect("reset");
            assert_reset(&read_until_error(&mut p.client).await);
            let e = result(p.l1).await.expect_err("peer reset");
            assert!(matches!(e, RelayError::PeerReset { code: 9 }), "{e:?}");
            assert!(!e.is_expected());
            // L1 reset its send side with the peer's code. (Its STOP_SENDING
            // is moot: this side is already reset.)
            let mut buf = [0u8; 16];
            assert_eq!(
                p.recv.read(&mut buf).await,
                Err(quinn::ReadError::Reset(VarInt::from_u32(9)))
            );
        })
        .await;
    }

    #[tokio::test]
    async fn peer_stop_resets_the_tcp_connection_at_the_next_write() {
        within(async {
            let mut p = raw_peer().await;
            p.recv.stop(VarInt::from_u32(5)).expect("stop");
            // The client keeps sending until the RST arrives.
            assert_reset(&write_until_error(&mut p.client).await);
            let e = result(p.l1).await.expect_err("peer stopped");
            assert!(matches!(e, RelayError::PeerStopped { code: 5 }), "{e:?}");
            assert_eq!(
                p.send.stopped().await.expect("stopped"),
                Some(VarInt::from_u32(5))
            );
        })
        .await;
    }

    #[tokio::test]
    async fn peer_finish_before_any_reply_half_closes_the_client() {
        within(async {
            let mut p = raw_peer().await;
            p.send.write_all(b"bye").await.expect("write");
            p.send.finish().expect("finish");
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            loop {
                let n = p.client.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, b"bye");
            // Still open the other way.
            p.client.write_all(b"yz").await.expect("write after fin");
            p.client.shutdown().await.expect("client fin");
            let rest = p.recv.read_to_end(1024).await.expect("read to end");
            assert_eq!(rest, b"yz");
            assert_eq!(
                result(p.l1).await.expect("relay"),
                RelayStats {
                    a_to_b: 3,
                    b_to_a: 3
                }
            );
        })
        .await;
    }

    #[tokio::test]
    async fn tunnel_loss_resets_the_tcp_connection() {
        within(async {
            let mut p = raw_peer().await;
            p.quic.server.close(VarInt::from_u32(1), b"going away");
            assert_reset(&read_until_error(&mut p.client).await);
            let e = result(p.l1).await.expect_err("tunnel lost");
            assert!(matches!(e, RelayError::TunnelLost(_)), "{e:?}");
        })
        .await;
    }

    /// client ─TCP─ tcp_tcp relay ─TCP─ server.
    struct Direct {
        client: TcpStream,
        server: TcpStream,
        relay: Relay,
        counters: (Arc<TestCounter>, Arc<TestCounter>),
    }

    async fn direct() -> Direct {
        let (client, a) = tcp_pair().await;
        let (b, server) = tcp_pair().await;
        let (c1, v1) = counter();
        let (c2, v2) = counter();
        Direct {
            client,
            server,
            relay: tokio::spawn(tcp_tcp(a, b, c1, c2)),
            counters: (v1, v2),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_tcp_carries_megabytes_both_ways_byte_identical() {
        within(async {
            let d = direct().await;
            let up = pattern(4, 5 << 20);
            let down = pattern(5, 3 << 20);
            let (at_server, at_client) = exchange_both(d.client, d.server, &up, &down).await;
            assert!(at_server == up, "client → server bytes differ");
            assert!(at_client == down, "server → client bytes differ");
            let stats = result(d.relay).await.expect("relay");
            assert_eq!(
                stats,
                RelayStats {
                    a_to_b: 5 << 20,
                    b_to_a: 3 << 20
                }
            );
            assert_eq!(value(&d.counters.0), 5 << 20);
            assert_eq!(value(&d.counters.1), 3 << 20);
        })
        .await;
    }

    #[tokio::test]
    async fn tcp_tcp_half_close_lets_the_reply_flow_after_client_fin() {
        within(async {
            let mut d = direct().await;
            d.client.write_all(b"request").await.expect("write");
            d.client.shutdown().await.expect("client fin");
            let mut request = Vec::new();
            d.server
                .read_to_end(&mut request)
                .await
                .expect("server read");
            assert_eq!(request, b"request");
            let reply = pattern(6, 1 << 20);
            d.server.write_all(&reply).await.expect("server write");
            d.server.shutdown().await.expect("server fin");
            let mut got = Vec::new();
            d.client.read_to_end(&mut got).await.expect("client read");
            assert!(got == reply, "reply differs");
            let stats = result(d.relay).await.expect("relay");
            assert_eq!(
                stats,
                RelayStats {
                    a_to_b: 7,
                    b_to_a: 1 << 20
                }
            );
        })
        .await;
    }

    /// client ─TCP─ cancellable relay on `engine` ─TCP─ server, as
    /// same-node delivery runs it.
    async fn cancellable(
        engine: TcpRelay,
    ) -> (
        TcpStream,
        TcpStream,
        tokio_util::sync::CancellationToken,
        JoinHandle<Option<Result<RelayStats, RelayError>>>,
    ) {
        let (client, a) = tcp_pair().await;
        let (b, server) = tcp_pair().await;
        let cancel = tokio_util::sync::CancellationToken::new();
        let token = cancel.clone();
        let relay = tokio::spawn(async move {
            tcp_tcp_cancellable_on(engine, a, b, Counter::noop(), Counter::noop(), &token).await
        });
        (client, server, cancel, relay)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_node_relay_carries_data_on_either_engine_and_a_revocation_resets_both_ends() {
        within(async {
            for engine in [TcpRelay::Copy, TcpRelay::Splice] {
                let (client, server, _cancel, relay) = cancellable(engine).await;
                let up = pattern(6, 2 << 20);
                let down = pattern(7, 1 << 20);
                let (at_server, at_client) =
                    tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()));
                assert!(at_server == up, "{engine:?}: client to server differs");
                assert!(at_client == down, "{engine:?}: server to client differs");
                let stats = tokio::time::timeout(Duration::from_secs(30), relay)
                    .await
                    .expect("relay ends")
                    .expect("join")
                    .expect("not cancelled")
                    .expect("clean relay");
                assert_eq!(
                    stats,
                    RelayStats {
                        a_to_b: 2 << 20,
                        b_to_a: 1 << 20
                    },
                    "{engine:?}"
                );

                let (mut client, mut server, cancel, relay) = cancellable(engine).await;
                client.write_all(b"hi").await.expect("write");
                let mut buf = [0u8; 2];
                server.read_exact(&mut buf).await.expect("relay is up");
                cancel.cancel();
                assert_reset(&read_until_error(&mut server).await);
                assert_reset(&read_until_error(&mut client).await);
                let ended = tokio::time::timeout(Duration::from_secs(30), relay)
                    .await
                    .expect("relay ends")
                    .expect("join");
                assert!(ended.is_none(), "{engine:?}: revoked, not finished");
            }
        })
        .await;
    }

    #[tokio::test]
    async fn tcp_tcp_reset_propagates_both_ways() {
        within(async {
            let mut d = direct().await;
            d.client.write_all(b"hi").await.expect("write");
            let mut buf = [0u8; 2];
            d.server.read_exact(&mut buf).await.expect("relay is up");
            reset_tcp(d.client);
            assert_reset(&read_until_error(&mut d.server).await);
            let e = result(d.relay).await.expect_err("reset");
            assert!(matches!(e, RelayError::TcpReset { side: Side::A }), "{e:?}");

            let mut d = direct().await;
            d.server.write_all(b"hi").await.expect("write");
            d.client.read_exact(&mut buf).await.expect("relay is up");
            reset_tcp(d.server);
            assert_reset(&read_until_error(&mut d.client).await);
            let e = result(d.relay).await.expect_err("reset");
            assert!(matches!(e, RelayError::TcpReset { side: Side::B }), "{e:?}");
            assert!(e.is_expected());
        })
        .await;
    }
}
