//! A stand-alone plain-TCP relay, one engine per process, for the
//! benchmark's relay-engine comparison (`nodemesh-lab relay-engine`, run by
//! [`crate::bench::relays`]).
//!
//! Owns the three ways a TCP ↔ TCP leg can be relayed that the comparison
//! measures side by side:
//! - [`Engine::Copy`]: the daemon's copy relay (`nodemesh::relay::tcp_tcp`
//!   with `tcp_relay: copy`: epoll readiness, read/write through a 64 KiB
//!   buffer), on the daemon's runtime shape (tokio, one worker thread);
//! - [`Engine::Splice`]: the daemon's splice(2) relay
//!   (`nodemesh::relay_splice`, its default), same runtime;
//! - [`Engine::Uring`]: tokio-uring (io_uring submissions for every read and
//!   write, owned 64 KiB buffers, one thread), written here because the
//!   daemon has no io_uring relay: it would be added only if it measured
//!   faster (DESIGN §10, docs/benchmarks.md).
//!
//! Every engine accepts on each `listen` address, connects each accepted
//! connection to the `to` address paired with it, sets `TCP_NODELAY` on both
//! legs and relays both directions until each has seen EOF, forwarding the
//! half-close. Stdout has one line `listening <addr>` per listener, in the
//! order given; the process runs until it is killed. The relay-engine
//! comparison uses one pair per process; the plain relay pair path of the
//! data-path figures ([`crate::bench::relay_pair`]) one per forwarded port. The uring engine
//! closes both connections on an error instead of resetting them (the
//! daemon's relays reset): nothing in the benchmark depends on that.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;

use clap::ValueEnum;
use metrics::Counter;
use nodemesh::relay_splice::{self, TcpRelay};

/// Size of each direction's buffer in the uring engine: the daemon's relay
/// buffer size, so the engines differ only in how they do I/O.
pub const URING_BUF: usize = 64 * 1024;

/// How a TCP ↔ TCP leg is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// The daemon's read/write relay on epoll (`tcp_relay: copy`).
    Copy,
    /// The daemon's splice(2) relay (`tcp_relay: splice`, its default).
    Splice,
    /// tokio-uring: io_uring reads and writes through owned buffers.
    Uring,
}

impl Engine {
    /// The name used on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Splice => "splice",
            Self::Uring => "tokio-uring",
        }
    }
}

fn announce(addr: SocketAddr) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "listening {addr}")?;
    out.flush()
}

/// Runs `engine` on every `(listen, to)` pair until killed (or until
/// accepting fails on one of them).
pub fn run(engine: Engine, pairs: Vec<(SocketAddr, SocketAddr)>) -> io::Result<()> {
    if pairs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no address to listen on: give --listen and --to at least once",
        ));
    }
    match engine {
        Engine::Copy | Engine::Splice => {
            relay_splice::set_mode(if engine == Engine::Splice {
                TcpRelay::Splice
            } else {
                TcpRelay::Copy
            });
            run_tokio(pairs)
        }
        Engine::Uring => tokio_uring::start(run_uring(pairs)),
    }
}

fn run_tokio(pairs: Vec<(SocketAddr, SocketAddr)>) -> io::Result<()> {
    // The daemon's runtime: multi-thread with one worker (its default
    // `worker_threads`), the accept loop and the relays on that worker.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut accepting = tokio::task::JoinSet::new();
        for (listen, to) in pairs {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            announce(listener.local_addr()?)?;
            accepting.spawn(tokio_accept(listener, to));
        }
        first_to_end(accepting).await
    })
}

/// Waits for the first accept loop to end (only an error ends one) and
/// returns its result: that ends the process.
async fn first_to_end(mut loops: tokio::task::JoinSet<io::Result<()>>) -> io::Result<()> {
    match loops.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(io::Error::other(e.to_string())),
        None => Ok(()),
    }
}

async fn tokio_accept(listener: tokio::net::TcpListener, to: SocketAddr) -> io::Result<()> {
    loop {
        let (a, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = tokio_pair(a, to).await {
                eprintln!("relay-engine: {e}");
            }
        });
    }
}

async fn tokio_pair(a: tokio::net::TcpStream, to: SocketAddr) -> io::Result<()> {
    a.set_nodelay(true)?;
    let b = tokio::net::TcpStream::connect(to).await?;
    b.set_nodelay(true)?;
    nodemesh::relay::tcp_tcp(a, b, Counter::noop(), Counter::noop())
        .await
        .map(|_| ())
        .map_err(|e| io::Error::other(e.to_string()))
}

async fn run_uring(pairs: Vec<(SocketAddr, SocketAddr)>) -> io::Result<()> {
    // tokio-uring runs its tasks on a local set, hence `spawn_local`.
    let mut accepting = tokio::task::JoinSet::new();
    for (listen, to) in pairs {
        let listener = tokio_uring::net::TcpListener::bind(listen)?;
        announce(listener.local_addr()?)?;
        accepting.spawn_local(uring_accept(listener, to));
    }
    first_to_end(accepting).await
}

async fn uring_accept(listener: tokio_uring::net::TcpListener, to: SocketAddr) -> io::Result<()> {
    loop {
        let (a, _) = listener.accept().await?;
        tokio_uring::spawn(async move {
            if let Err(e) = uring_pair(a, to).await {
                eprintln!("relay-engine: {e}");
            }
        });
    }
}

async fn uring_pair(a: tokio_uring::net::TcpStream, to: SocketAddr) -> io::Result<()> {
    a.set_nodelay(true)?;
    let b = tokio_uring::net::TcpStream::connect(to).await?;
    b.set_nodelay(true)?;
    let (a, b) = (Rc::new(a), Rc::new(b));
    let (ab, ba) = tokio::join!(
        uring_one_way(Rc::clone(&a), Rc::clone(&b)),
        uring_one_way(b, a)
    );
    ab.and(ba).map(|_| ())
}

/// Copies `from` → `to` until EOF, then shuts down `to`'s write side.
async fn uring_one_way(
    from: Rc<tokio_uring::net::TcpStream>,
    to: Rc<tokio_uring::net::TcpStream>,
) -> io::Result<u64> {
    use tokio_uring::buf::BoundedBuf;
    let mut buf = vec![0u8; URING_BUF];
    let mut total = 0u64;
    loop {
        let (read, b) = from.read(buf).await;
        buf = b;
        let n = read?;
        if n == 0 {
            to.shutdown(Shutdown::Write)?;
            return Ok(total);
        }
        let (written, slice) = to.write_all(buf.slice(..n)).await;
        buf = slice.into_inner();
        written?;
        total += n as u64;
    }
}
