//! The TCP ↔ TCP relay on splice(2): bytes move socket → pipe → socket
//! inside the kernel, never copied to user space.
//!
//! Owns [`both_ways`], the splice engine behind [`crate::relay::tcp_tcp`]
//! with the same semantics as its copy loop (half-close preserved, a reset
//! or error on either end resets both, counters incremented as bytes are
//! written), and the process-wide choice between the two ([`set_mode`],
//! from the `tcp_relay` config field, read by `relay::tcp_tcp` and
//! `relay::tcp_tcp_cancellable`). Only plain-TCP legs can use it: same-node
//! delivery and passthrough; the TCP ↔ QUIC relay must see the bytes.
//!
//! Each direction owns one non-blocking pipe (sized [`PIPE_SIZE`], made
//! when its first bytes arrive) and alternates: splice what the source
//! socket has into the pipe (up to the pipe's size), then splice all of it
//! out to the destination. tokio readiness drives both sockets
//! (`readable`/`writable` + `try_io`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use metrics::Counter;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::relay::{tcp_error, RelayError, RelayStats, Side};

/// Requested size of each direction's pipe (the kernel rounds to pages and
/// may cap it at `fs.pipe-max-size`; the default pipe is 64 KiB).
pub const PIPE_SIZE: usize = 256 * 1024;

/// How plain TCP ↔ TCP legs are relayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpRelay {
    /// read(2)/write(2) through a user-space buffer ([`crate::relay::tcp_tcp`]).
    Copy,
    /// splice(2) through a pipe ([`both_ways`]): the default, measured at
    /// about half the CPU per byte of `Copy` (docs/benchmarks.md, "Plain-TCP
    /// relay engines").
    #[default]
    Splice,
}

static MODE: OnceLock<TcpRelay> = OnceLock::new();

/// Chooses the TCP ↔ TCP relay for the whole process; set once at start
/// (later calls are ignored). Unset: [`TcpRelay::default`].
pub fn set_mode(mode: TcpRelay) {
    let _ = MODE.set(mode);
}

/// The chosen TCP ↔ TCP relay.
pub fn mode() -> TcpRelay {
    MODE.get().copied().unwrap_or_default()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let size = i32::try_from(PIPE_SIZE).unwrap_or(i32::MAX);
    // Best effort: a smaller pipe only means more syscalls.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(size));
    Ok((r, w))
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Both directions until each has seen EOF; the caller resets the
/// connections on error (as [`crate::relay::tcp_tcp`] does).
pub(crate) async fn both_ways(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &Counter,
    b_to_a: &Counter,
) -> Result<RelayStats, RelayError> {
    let (a_to_b, b_to_a) = tokio::try_join!(
        one_way(a, Side::A, b, Side::B, a_to_b),
        one_way(b, Side::B, a, Side::A, b_to_a),
    )?;
    Ok(RelayStats { a_to_b, b_to_a })
}

/// One direction: splice until EOF, then shut down `to`'s write side.
async fn one_way(
    from: &TcpStream,
    from_side: Side,
    to: &TcpStream,
    to_side: Side,
    counter: &Counter,
) -> Result<u64, RelayError> {
    // Made when the first bytes arrive, so a connection that stays idle (or
    // a direction that never carries data) holds no pipe.
    let mut pipe_fds: Option<(OwnedFd, OwnedFd)> = None;
    let mut total = 0u64;
    loop {
        // Fill: the pipe is empty here, so EAGAIN can only mean "no data yet".
        from.readable().await.map_err(|e| tcp_error(from_side, e))?;
        let (pipe_r, pipe_w) = match &pipe_fds {
            Some(p) => p,
            None => pipe_fds.insert(pipe().map_err(|e| tcp_error(from_side, e))?),
        };
        let filled = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe_w.as_fd(), None, PIPE_SIZE, flags())
                .map_err(io::Error::from)
        });
        let n = match filled {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(tcp_error(from_side, e)),
        };
        // Drain all of it to the destination.
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(|e| tcp_error(to_side, e))?;
            let drained = to.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_fd(), None, to.as_fd(), None, left, flags())
                    .map_err(io::Error::from)
            });
            match drained {
                Ok(0) => {
                    return Err(tcp_error(
                        to_side,
                        io::Error::new(io::ErrorKind::WriteZero, "splice wrote nothing"),
                    ))
                }
                Ok(m) => {
                    left -= m;
                    counter.increment(m as u64);
                    total += m as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(tcp_error(to_side, e)),
            }
        }
    }
    socket2::SockRef::from(to)
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| tcp_error(to_side, e))?;
    tracing::trace!(from = %from_side, bytes = total, "eof: write side shut down (splice)");
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::reset_tcp;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// client ─TCP─ splice relay ─TCP─ server, all on loopback (port 0).
    async fn relayed() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Result<RelayStats, RelayError>>,
    ) {
        let l1 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let l2 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(l1.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (a, _) = l1.accept().await.expect("accept");
        let b = TcpStream::connect(l2.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = l2.accept().await.expect("accept");
        let relay = tokio::spawn(crate::relay::tcp_tcp_on(
            TcpRelay::Splice,
            a,
            b,
            Counter::noop(),
            Counter::noop(),
        ));
        (client, server, relay)
    }

    #[tokio::test]
    async fn carries_megabytes_both_ways_with_half_close() {
        let (mut client, mut server, relay) = relayed().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("fin");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, data, "client to server intact, EOF after FIN");
        // Half-close: the reply still flows after the client's FIN.
        server.write_all(b"reply after fin").await.expect("reply");
        server.shutdown().await.expect("fin");
        assert_eq!(writer.await.expect("join"), b"reply after fin");
        let stats = relay.await.expect("join").expect("clean relay");
        assert_eq!(stats.a_to_b, data.len() as u64);
        assert_eq!(stats.b_to_a, 15);
    }

    #[tokio::test]
    async fn a_reset_resets_the_other_end() {
        let (client, mut server, relay) = relayed().await;
        reset_tcp(client);
        let mut buf = [0u8; 16];
        let r = server.read(&mut buf).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset)
                || matches!(r, Ok(0)),
            "server sees the close: {r:?}"
        );
        assert!(
            relay.await.expect("join").is_err(),
            "relay reports the reset"
        );
    }

    #[test]
    fn mode_defaults_to_splice() {
        assert_eq!(TcpRelay::default(), TcpRelay::Splice);
        let m: TcpRelay = serde_yaml::from_str("copy").expect("parses");
        assert_eq!(m, TcpRelay::Copy);
    }
}
