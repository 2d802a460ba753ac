//! Load generators and the servers they talk to, on blocking sockets.
//!
//! Servers take a listener already made inside the destination pod's
//! namespace; clients run on a thread that entered the source pod's
//! namespace ([`crate::netns::in_netns`]), so connection set-up is measured
//! without per-connection thread or `setns` costs.
//!
//! - [`sink`] + [`bulk`]: one-way bulk throughput over N parallel streams.
//! - [`Echo`] + [`open_loop`]: fixed-size request/response at a fixed rate,
//!   open loop; latency runs from each request's *intended* send time, so a
//!   stall delays (and is charged to) every request scheduled behind it
//!   (no coordinated omission).
//! - [`Echo`] (sequential) + [`new_connections`]: connect, one exchange, close.
//! - [`Holder`] + [`open_idle`]: N idle connections kept open.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::BenchError;
use crate::netns::in_netns;
use crate::traffic;

/// Longest any single socket operation may block before the run fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CHUNK: usize = 256 * 1024;
/// Longest a server's blocking `accept` waits before checking its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// Makes `accept` on `listener` block at most [`ACCEPT_POLL`] (Linux honours
/// `SO_RCVTIMEO` on a listening socket), so a server notices its stop flag
/// yet accepts a connection the moment it arrives.
fn poll_accepts(listener: &TcpListener) -> Result<(), BenchError> {
    socket2::SockRef::from(listener)
        .set_read_timeout(Some(ACCEPT_POLL))
        .map_err(io_err("listener accept timeout"))
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        what: what.to_owned(),
        source,
    }
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits; the bounds are constants.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

fn accept(listener: &TcpListener) -> std::io::Result<TcpStream> {
    let s = traffic::accept_retrying(listener)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

fn client_socket(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Accepts `conns` connections and reads each to EOF; returns the bytes read.
pub fn sink(listener: TcpListener, conns: usize) -> JoinHandle<std::io::Result<u64>> {
    std::thread::spawn(move || {
        let mut readers = Vec::with_capacity(conns);
        for _ in 0..conns {
            let mut s = accept(&listener)?;
            readers.push(std::thread::spawn(move || -> std::io::Result<u64> {
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                loop {
                    match traffic::read_retrying(&mut s, &mut buf)? {
                        0 => break,
                        n => total += n as u64,
                    }
                }
                s.shutdown(Shutdown::Write)?;
                Ok(total)
            }));
        }
        let mut total = 0;
        for r in readers {
            total += r
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("sink thread panicked")))?;
        }
        Ok(total)
    })
}

/// Sends `bytes` on each of `streams` parallel connections from `netns` to
/// `addr` (a [`sink`]), each half-closed and waited for the sink's EOF;
/// returns the time from the first byte to the last EOF.
pub fn bulk(
    netns: &str,
    addr: SocketAddr,
    streams: usize,
    bytes: u64,
) -> Result<Duration, BenchError> {
    let socks = in_netns(netns, "bulk connect", move || {
        (0..streams)
            .map(|_| client_socket(addr))
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    let start = Instant::now();
    let workers: Vec<_> = socks
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let buf = vec![0x5au8; CHUNK];
                let mut left = bytes;
                while left > 0 {
                    let n = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
                    s.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                s.shutdown(Shutdown::Write)?;
                let mut rest = [0u8; 64];
                while traffic::read_retrying(&mut s, &mut rest)? > 0 {}
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .unwrap_or_else(|_| Err(std::io::Error::other("bulk thread panicked")))
            .map_err(io_err("bulk send"))?;
    }
    Ok(start.elapsed())
}

/// An echo server of fixed-size messages. Stops (and joins) on drop.
#[derive(Debug)]
pub struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    /// Serves `listener`: each connection echoes `msg_len`-byte messages
    /// until EOF. `sequential`: connections are served one at a time on the
    /// accept thread (one exchange, then close), so a new connection's
    /// latency includes no thread start.
    pub fn start(
        listener: TcpListener,
        msg_len: usize,
        sequential: bool,
    ) -> Result<Self, BenchError> {
        poll_accepts(&listener)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut workers = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let s = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                };
                let setup = s
                    .set_nodelay(true)
                    .and_then(|()| s.set_read_timeout(Some(IO_TIMEOUT)));
                if setup.is_err() {
                    continue;
                }
                if sequential {
                    let _ = echo_once(s, msg_len);
                } else {
                    workers.push(std::thread::spawn(move || echo_loop(s, msg_len)));
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo_once(mut s: TcpStream, msg_len: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; msg_len];
    s.read_exact(&mut buf)?;
    s.write_all(&buf)
}

fn echo_loop(mut s: TcpStream, msg_len: usize) {
    let mut buf = vec![0u8; msg_len];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            break;
        }
    }
}

/// Waits until `at`: sleeps to within 100 µs, then yields (timer slack
/// would otherwise add tens of µs to every send).
fn wait_until(at: Instant) {
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        let left = at - now;
        if left > Duration::from_micros(150) {
            std::thread::sleep(left - Duration::from_micros(100));
        } else {
            std::thread::yield_now();
        }
    }
}

/// Open-loop request/response from `netns` to an [`Echo`] at `addr`:
/// `rate` requests/s of `msg_len` bytes for `duration` on one connection.
/// Returns the latency histogram (ns), measured from intended send times.
pub fn open_loop(
    netns: &str,
    addr: SocketAddr,
    rate: u32,
    duration: Duration,
    msg_len: usize,
) -> Result<Histogram<u64>, BenchError> {
    let mut sock = in_netns(netns, "open-loop connect", move || client_socket(addr))?;
    let mut reader = sock.try_clone().map_err(io_err("clone socket"))?;
    let count = (f64::from(rate) * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    // One warm-up exchange, not recorded.
    let mut buf = vec![0u8; msg_len];
    sock.write_all(&buf).map_err(io_err("warm-up send"))?;
    reader
        .read_exact(&mut buf)
        .map_err(io_err("warm-up receive"))?;
    let start = Instant::now() + Duration::from_millis(5);
    let intended = move |i: u64| start + period.mul_f64(i as f64);
    let receiver = std::thread::spawn(move || -> std::io::Result<Histogram<u64>> {
        let mut h = histogram();
        let mut buf = vec![0u8; msg_len];
        for i in 0..count {
            reader.read_exact(&mut buf)?;
            let lat = Instant::now().saturating_duration_since(intended(i));
            let ns = u64::try_from(lat.as_nanos()).unwrap_or(u64::MAX).max(1);
            h.saturating_record(ns);
        }
        Ok(h)
    });
    let msg = vec![0x42u8; msg_len];
    for i in 0..count {
        wait_until(intended(i));
        sock.write_all(&msg).map_err(io_err("open-loop send"))?;
    }
    let h = receiver
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("receiver panicked")))
        .map_err(io_err("open-loop receive"))?;
    let _ = sock.shutdown(Shutdown::Both);
    Ok(h)
}

/// `count` times from `netns`: connect to a sequential [`Echo`] at `addr`,
/// send and receive one `msg_len` message, close. Histogram of each (ns).
pub fn new_connections(
    netns: &str,
    addr: SocketAddr,
    count: usize,
    msg_len: usize,
) -> Result<Histogram<u64>, BenchError> {
    in_netns(netns, "new connections", move || {
        let mut h = histogram();
        let msg = vec![0x42u8; msg_len];
        let mut buf = vec![0u8; msg_len];
        for _ in 0..count {
            let t0 = Instant::now();
            let mut s = client_socket(addr)?;
            s.write_all(&msg)?;
            s.read_exact(&mut buf)?;
            drop(s);
            let ns = u64::try_from(t0.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1);
            h.saturating_record(ns);
        }
        Ok(h)
    })
    .map_err(BenchError::from)
}

/// Accepts connections and keeps them open until dropped.
#[derive(Debug)]
pub struct Holder {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Holder {
    /// Starts holding what `listener` accepts.
    pub fn start(listener: TcpListener) -> Result<Self, BenchError> {
        poll_accepts(&listener)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop2, accepted2) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        held.push(s);
                        accepted2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => continue,
                }
            }
        });
        Ok(Self {
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Waits (polling, bounded by `timeout`) until `n` were accepted.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Result<(), BenchError> {
        let deadline = Instant::now() + timeout;
        while self.accepted() < n {
            if Instant::now() >= deadline {
                return Err(BenchError::Measure {
                    what: "idle connections".into(),
                    problem: format!("only {} of {n} arrived within {timeout:?}", self.accepted()),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens `n` connections from `netns` to `addr` and returns them, idle.
pub fn open_idle(netns: &str, addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>, BenchError> {
    in_netns(netns, "open idle connections", move || {
        (0..n)
            .map(|_| client_socket(addr))
            .collect::<std::io::Result<Vec<_>>>()
    })
    .map_err(BenchError::from)
}

/// p50, p99, p99.9 of `h`, in µs.
pub fn percentiles_us(h: &Histogram<u64>) -> [f64; 3] {
    [50.0, 99.0, 99.9].map(|q| h.value_at_quantile(q / 100.0) as f64 / 1000.0)
}
