//! Deterministic, hashed TCP transfers for end-to-end checks.
//!
//! The server reads everything a client sends until EOF (hashing it with
//! SHA-256), then answers with `reply_len` bytes of a deterministic
//! pseudo-random stream followed by the 32-byte SHA-256 of what it received,
//! and closes. The client sends `send_len` bytes of the stream, shuts its
//! write side (half-close), reads the reply to EOF and reports hashes, so a
//! test can assert both directions arrived byte-identical.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use ring::digest::{Context, SHA256};

use crate::error::LabError;

/// Seed of the stream clients send.
pub const CLIENT_SEED: u64 = 0x6e6d_6c61_6231;
/// Seed of the stream servers reply with.
pub const SERVER_SEED: u64 = 0x6e6d_6c61_6232;
/// Length of the hash trailer.
pub const HASH_LEN: usize = 32;
/// Longest wait for a peer to accept, send or receive before giving up, so a
/// broken data path fails a test instead of hanging it.
pub const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
const CHUNK: usize = 64 * 1024;

/// A SHA-256 digest.
pub type Hash = [u8; HASH_LEN];

/// [`Read::read`] that tries again when a signal interrupts it.
///
/// On a socket with `SO_RCVTIMEO`, Linux fails a blocking `recv` with `EINTR`
/// whenever a signal arrives, even for `SA_RESTART` handlers and even after
/// a mere stop and continue of the process (signal(7)); `Read::read` passes
/// that up, unlike `read_exact` and `write_all`, which retry it. A test must
/// not fail because its process was stopped for a moment.
pub fn read_retrying(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Expects `s` to be reset by its peer, already or within `timeout`: writes a
/// few bytes, then reads. An RST already received is reported once, by
/// whichever call comes first. `Err` says what happened instead (a clean
/// close, data, another error, or nothing before the timeout).
pub fn expect_reset(s: &mut TcpStream, timeout: Duration) -> Result<(), String> {
    let is_reset = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    };
    s.set_read_timeout(Some(timeout))
        .map_err(|e| format!("setting the read timeout failed: {e}"))?;
    match s.write_all(b"hello?") {
        Err(e) if is_reset(&e) => return Ok(()),
        Err(e) => return Err(format!("the write failed with {e}")),
        Ok(()) => {}
    }
    match read_retrying(s, &mut [0u8; 16]) {
        Err(e) if is_reset(&e) => Ok(()),
        Err(e) => Err(format!("the read failed with {e}")),
        Ok(0) => Err("it was closed cleanly".into()),
        Ok(n) => Err(format!("{n} bytes arrived")),
    }
}

/// [`TcpListener::accept`] that tries again on `EINTR` (see [`read_retrying`]).
pub fn accept_retrying(listener: &TcpListener) -> std::io::Result<TcpStream> {
    loop {
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other.map(|(s, _)| s),
        }
    }
}

/// A deterministic pseudo-random byte stream (splitmix64).
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
}

impl Pattern {
    /// The stream of `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Fills `buf` with the next bytes (`buf.len()` a multiple of 8 keeps
    /// streams identical however they are chunked).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let bytes = z.to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
    }
}

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// SHA-256 of the first `len` bytes of the stream of `seed`.
pub fn pattern_hash(seed: u64, len: u64) -> Hash {
    // The same stream as `send_pattern`, written nowhere: `io::sink` cannot fail.
    send_pattern(&mut std::io::sink(), seed, len).expect("io::sink never fails")
}

/// Writes `len` bytes of the stream of `seed` to `w`; returns their hash.
pub fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> std::io::Result<Hash> {
    let mut pattern = Pattern::new(seed);
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        pattern.fill(&mut buf[..n]);
        ctx.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(finish(ctx))
}

/// Writes the stream of `seed` to `w` until `stop` is set (checked between
/// 64 KiB writes, so a write blocked by a reader that holds back ends once
/// that reader reads); returns the bytes written and their hash. For tests
/// that need the mesh's buffers full however large they are.
pub fn send_pattern_until(
    w: &mut impl Write,
    seed: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<(u64, Hash)> {
    let mut pattern = Pattern::new(seed);
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        pattern.fill(&mut buf);
        ctx.update(&buf);
        w.write_all(&buf)?;
        sent += CHUNK as u64;
    }
    Ok((sent, finish(ctx)))
}

/// Reads `stream` to EOF; returns the bytes read and their hash. Gives up
/// after [`IO_TIMEOUT`] without data.
pub fn read_hashed(stream: &mut TcpStream) -> std::io::Result<(u64, Hash)> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = read_retrying(stream, &mut buf)?;
        if n == 0 {
            return Ok((received, finish(ctx)));
        }
        ctx.update(&buf[..n]);
        received += n as u64;
    }
}

/// What the server saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReport {
    /// Bytes received before EOF.
    pub received_bytes: u64,
    /// Their SHA-256.
    pub received_hash: Hash,
    /// Reply bytes sent (without the trailer).
    pub sent_bytes: u64,
}

/// Serves one connection: read to EOF, reply `reply_len` bytes + hash, close.
pub fn serve_connection(mut stream: TcpStream, reply_len: u64) -> std::io::Result<ServerReport> {
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let (received, hash) = read_hashed(&mut stream)?;
    send_pattern(&mut stream, SERVER_SEED, reply_len)?;
    stream.write_all(&hash)?;
    stream.shutdown(Shutdown::Write)?;
    Ok(ServerReport {
        received_bytes: received,
        received_hash: hash,
        sent_bytes: reply_len,
    })
}

/// Accepts exactly `connections` connections on `listener`, serving each on
/// its own thread; the handle yields one report per connection (accept order).
/// Each accept gives up after [`IO_TIMEOUT`] (Linux honours `SO_RCVTIMEO` on accept).
pub fn serve(
    listener: TcpListener,
    connections: usize,
    reply_len: u64,
) -> JoinHandle<std::io::Result<Vec<ServerReport>>> {
    std::thread::spawn(move || {
        socket2::SockRef::from(&listener).set_read_timeout(Some(IO_TIMEOUT))?;
        let mut workers = Vec::with_capacity(connections);
        for _ in 0..connections {
            let stream = accept_retrying(&listener)?;
            workers.push(std::thread::spawn(move || {
                serve_connection(stream, reply_len)
            }));
        }
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("server worker panicked")))
            })
            .collect()
    })
}

/// What the client saw on one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeReport {
    /// Bytes sent.
    pub sent_bytes: u64,
    /// SHA-256 of what was sent.
    pub sent_hash: Hash,
    /// Reply bytes received (without the trailer).
    pub received_bytes: u64,
    /// SHA-256 of the reply.
    pub received_hash: Hash,
    /// The trailer: SHA-256 of what the server received.
    pub server_hash: Hash,
}

impl ExchangeReport {
    /// Checks both directions: the server received exactly what was sent, and
    /// the reply is the `reply_len` bytes of the server's stream.
    pub fn verify(&self, what: &str, reply_len: u64) -> Result<(), LabError> {
        let fail = |problem: String| LabError::Transfer {
            what: what.to_owned(),
            problem,
        };
        if self.server_hash != self.sent_hash {
            return Err(fail(format!(
                "server received other bytes than the {} sent (hash differs)",
                self.sent_bytes
            )));
        }
        if self.received_bytes != reply_len {
            return Err(fail(format!(
                "reply has {} bytes, expected {reply_len}",
                self.received_bytes
            )));
        }
        if self.received_hash != pattern_hash(SERVER_SEED, reply_len) {
            return Err(fail("reply bytes differ from the server's stream".into()));
        }
        Ok(())
    }
}

/// Sends `send_len` bytes, shuts the write side, reads the reply to EOF.
pub fn exchange(mut stream: TcpStream, send_len: u64) -> std::io::Result<ExchangeReport> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let sent_hash = send_pattern(&mut stream, CLIENT_SEED, send_len)?;
    stream.shutdown(Shutdown::Write)?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    // The last HASH_LEN bytes are the trailer: hold them back until EOF.
    let mut tail: Vec<u8> = Vec::with_capacity(CHUNK + HASH_LEN);
    let mut payload = 0u64;
    loop {
        let n = read_retrying(&mut stream, &mut buf)?;
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > HASH_LEN {
            let spill = tail.len() - HASH_LEN;
            ctx.update(&tail[..spill]);
            payload += spill as u64;
            tail.drain(..spill);
        }
    }
    if tail.len() != HASH_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "reply ended after {} bytes, before its hash trailer",
                payload + tail.len() as u64
            ),
        ));
    }
    let mut server_hash = [0u8; HASH_LEN];
    server_hash.copy_from_slice(&tail);
    Ok(ExchangeReport {
        sent_bytes: send_len,
        sent_hash,
        received_bytes: payload,
        received_hash: finish(ctx),
        server_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails with `EINTR` `interrupts` times, then reads from `data`.
    struct Interrupting<'a> {
        interrupts: usize,
        data: &'a [u8],
    }

    impl Read for Interrupting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.interrupts > 0 {
                self.interrupts -= 1;
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            self.data.read(buf)
        }
    }

    #[test]
    fn read_retrying_rides_over_interrupts_and_passes_other_errors() {
        let mut r = Interrupting {
            interrupts: 3,
            data: b"abc",
        };
        let mut buf = [0u8; 8];
        assert_eq!(read_retrying(&mut r, &mut buf).expect("read"), 3);
        assert_eq!(&buf[..3], b"abc");
        assert_eq!(read_retrying(&mut r, &mut buf).expect("eof"), 0);

        struct Reset;
        impl Read for Reset {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::ConnectionReset.into())
            }
        }
        let e = read_retrying(&mut Reset, &mut buf).expect_err("reset");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn pattern_is_deterministic_and_chunking_independent() {
        let mut a = Pattern::new(7);
        let mut whole = vec![0u8; 64];
        a.fill(&mut whole);
        let mut b = Pattern::new(7);
        let mut parts = vec![0u8; 64];
        b.fill(&mut parts[..16]);
        b.fill(&mut parts[16..]);
        assert_eq!(whole, parts);
        assert_ne!(pattern_hash(1, 100), pattern_hash(2, 100));
        let mut sink = Vec::new();
        assert_eq!(
            send_pattern(&mut sink, 3, 100_003).expect("vec"),
            pattern_hash(3, 100_003)
        );
        assert_eq!(sink.len(), 100_003);
    }

    #[test]
    fn loopback_exchange_verifies() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = serve(listener, 1, 300_000);
        let report = exchange(TcpStream::connect(addr).expect("connect"), 200_000).expect("x");
        report.verify("loopback", 300_000).expect("verified");
        let seen = server.join().expect("join").expect("serve");
        assert_eq!(seen[0].received_bytes, 200_000);
        assert_eq!(seen[0].received_hash, report.sent_hash);
        assert!(report.verify("loopback", 299_999).is_err());
    }

    /// A loopback pair: (client, the accepted server side).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (c, s)
    }

    #[test]
    fn expect_reset_tells_a_reset_from_a_clean_close_and_from_data() {
        let timeout = Duration::from_secs(10);
        let (mut c, s) = pair();
        // Linger 0: close sends an RST.
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(s);
        assert_eq!(expect_reset(&mut c, timeout), Ok(()));

        let (mut c, s) = pair();
        s.shutdown(Shutdown::Write).expect("shutdown");
        assert_eq!(
            expect_reset(&mut c, timeout),
            Err("it was closed cleanly".into())
        );
        drop(s);

        let (mut c, mut s) = pair();
        s.write_all(b"hi").expect("write");
        assert_eq!(expect_reset(&mut c, timeout), Err("2 bytes arrived".into()));
    }
}
