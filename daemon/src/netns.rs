//! The OS edge for pod network namespaces: sockets made inside a pod's netns.
//!
//! Owns the [`SocketFactory`] trait and its production implementation,
//! [`NetnsWorker`]: one dedicated OS thread that `setns(2)`s into a pod's
//! network namespace and creates sockets there. A socket belongs to the
//! namespace it was created in for its whole life, so everything after
//! `socket(2)` (bind, listen, connect, IO) happens on ordinary tokio tasks.
//! Tokio worker threads never change namespace.
//!
//! The hop to the worker thread (two cross-thread wake-ups) is off the
//! connect path once a namespace has been used: each [`Netns`] keeps up to
//! [`SPARE_SOCKETS`] spare sockets per address family, made ahead by the
//! worker; taking one asks for a replacement without waiting for it. Spares
//! live as long as the `Netns` handle (the pod), so they never keep a
//! departed pod's namespace alive.
//!
//! The same thread writes the per-namespace sysctls nodemesh sets in a pod
//! ([`NetSysctl`], [`SocketFactory::set_sysctl`]): `/proc/sys/net` shows the
//! namespace of the thread that opens it.
//!
//! Also owns the small socket helpers the data path needs (original
//! destination, marks, `TCP_NODELAY`), so no other module calls socket2.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

use crate::rtnl::ReturnPath;

/// Spare sockets a [`Netns`] keeps per address family (made ahead by the
/// [`NetnsWorker`], so a connect does not wait for the thread hop). Two: a
/// replacement is on its way while the second serves the next connect.
pub const SPARE_SOCKETS: usize = 2;

/// An open handle on a network namespace (an `nsfs` file), with its spare
/// sockets.
#[derive(Debug, Clone)]
pub struct Netns {
    path: PathBuf,
    file: Option<Arc<File>>,
    spares: Arc<Spares>,
}

/// Sockets made ahead in one namespace, by address family.
#[derive(Debug, Default)]
struct Spares {
    v4: std::sync::Mutex<Vec<Socket>>,
    v6: std::sync::Mutex<Vec<Socket>>,
}

impl Spares {
    fn of(&self, domain: Domain) -> &std::sync::Mutex<Vec<Socket>> {
        if domain == Domain::IPV6 {
            &self.v6
        } else {
            &self.v4
        }
    }

    /// A spare socket of `domain` and how many are left, if there is one.
    fn take(&self, domain: Domain) -> (Option<Socket>, usize) {
        let mut v = match self.of(domain).lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let s = v.pop();
        (s, v.len())
    }

    /// Keeps `sock` unless there are enough spares already.
    fn put(&self, domain: Domain, sock: Socket) {
        let mut v = match self.of(domain).lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if v.len() < SPARE_SOCKETS {
            v.push(sock);
        }
    }
}

impl Netns {
    /// Opens the namespace at `path` (such as `/run/netns/x` or `/proc/PID/ns/net`).
    ///
    /// Never blocks: the open is non-blocking (a FIFO at `path` would
    /// otherwise hold the calling thread, an async worker, until a writer
    /// came), and anything but a namespace file (nsfs) is refused with
    /// [`io::ErrorKind::InvalidInput`].
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)?;
        let fs = nix::sys::statfs::fstatfs(&file).map_err(io::Error::from)?;
        if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a namespace file (expected /proc/PID/ns/net or a bind mount of one, such as /run/netns/NAME)",
                    path.display()
                ),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            file: Some(Arc::new(file)),
            spares: Arc::default(),
        })
    }

    /// The namespace the daemon itself runs in (no `setns` needed).
    pub fn current() -> Self {
        Self {
            path: PathBuf::from("/proc/self/ns/net"),
            file: None,
            spares: Arc::default(),
        }
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A per-network-namespace sysctl and the value nodemesh sets in pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSysctl {
    /// Dotted name, `net.` first (as `sysctl(8)` takes it).
    pub name: &'static str,
    /// The value written.
    pub value: &'static str,
}

impl NetSysctl {
    /// Its file under `/proc/sys`.
    pub fn path(&self) -> PathBuf {
        Path::new("/proc/sys").join(self.name.replace('.', "/"))
    }
}

/// `net.ipv4.tcp_tw_reuse = 1` (it also covers IPv6): lets a connect from
/// inside the pod reuse a 4-tuple whose TIME_WAIT is older than a second
/// (TCP timestamps tell the old and new connection apart). L2 connects into
/// a pod from inside it, so every connection the mesh delivers from one
/// client to one pod port (from every client, when they are delivered from
/// the pod's own address) shares one source address and one destination:
/// with the kernel's default (`2`, loopback only) their TIME_WAITs (60 s,
/// left by L2 forwarding the client's close) fill the ~28,000 ephemeral
/// ports at ~470 connections/s: connects slow down, and fail once every
/// port is held.
/// See docs/operations.md ("Connection rate into one pod").
pub const TCP_TW_REUSE: NetSysctl = NetSysctl {
    name: "net.ipv4.tcp_tw_reuse",
    value: "1",
};

/// `net.ipv4.tcp_fwmark_accept = 1` (it also covers IPv6): a connection
/// accepted from a SYN that carries a mark sends everything with that mark.
/// Only the daemon's connects from a client's address carry one, and the
/// pod's [`ReturnPath`] rule routes that mark back to the daemon's socket
/// (module `rtnl`). Set only where the return path is installed.
pub const TCP_FWMARK_ACCEPT: NetSysctl = NetSysctl {
    name: "net.ipv4.tcp_fwmark_accept",
    value: "1",
};

/// `net.ipv4.fwmark_reflect = 1`: replies the kernel sends on no socket's
/// behalf — above all the RST refusing a SYN to a closed port — carry the
/// mark of the packet they answer. The daemon's SYN from a client's address
/// carries the [`ReturnPath`] mark, so the refusal is routed back to the
/// daemon's socket and the connect fails at once with `ECONNREFUSED`;
/// without it the RST left the pod towards the client's address and the
/// daemon's connect waited `connect_timeout_ms`. Unmarked packets get
/// unmarked replies, as before. Set only where the return path is installed
/// for IPv4.
pub const FWMARK_REFLECT_V4: NetSysctl = NetSysctl {
    name: "net.ipv4.fwmark_reflect",
    value: "1",
};

/// [`FWMARK_REFLECT_V4`] for IPv6 (a separate sysctl), where the return
/// path is installed for IPv6.
pub const FWMARK_REFLECT_V6: NetSysctl = NetSysctl {
    name: "net.ipv6.fwmark_reflect",
    value: "1",
};

/// The sysctls the return path `path` needs besides its rule and route:
/// [`TCP_FWMARK_ACCEPT`], and [`FWMARK_REFLECT_V4`] / [`FWMARK_REFLECT_V6`]
/// for its families.
pub fn return_path_sysctls(path: &crate::rtnl::ReturnPath) -> Vec<NetSysctl> {
    let mut sysctls = vec![TCP_FWMARK_ACCEPT];
    if path.v4 {
        sysctls.push(FWMARK_REFLECT_V4);
    }
    if path.v6 {
        sysctls.push(FWMARK_REFLECT_V6);
    }
    sysctls
}

/// Makes TCP sockets inside network namespaces, and sets their sysctls.
pub trait SocketFactory: Send + Sync + fmt::Debug + 'static {
    /// A new non-blocking TCP socket of `addr`'s family inside `ns`.
    fn tcp_socket(&self, ns: &Netns, family: SocketAddr) -> SocketFuture;

    /// Sets `sysctl` inside `ns` (written only if it differs).
    fn set_sysctl(&self, ns: &Netns, sysctl: NetSysctl) -> SysctlFuture;

    /// Installs the policy routing of `path` inside `ns` (idempotent).
    /// `Ok(false)`: not installed because `ns` is the daemon's own namespace
    /// (the node's routing is never changed); connects into it then come
    /// from the pod's own address.
    fn install_return_path(&self, ns: &Netns, path: ReturnPath) -> SysctlFuture;
}

/// The future returned by [`SocketFactory::tcp_socket`].
pub type SocketFuture = Pin<Box<dyn Future<Output = io::Result<Socket>> + Send + 'static>>;

/// The future returned by [`SocketFactory::set_sysctl`] (whether the value
/// was changed; false: it was already set) and by
/// [`SocketFactory::install_return_path`] (whether the return path is in
/// place; false: the daemon's own namespace).
pub type SysctlFuture = Pin<Box<dyn Future<Output = io::Result<bool>> + Send + 'static>>;

struct Job {
    ns: Netns,
    what: What,
}

enum What {
    Socket {
        domain: Domain,
        /// Where the socket goes: to a waiting caller, or to the namespace's spares.
        reply: Reply,
    },
    Sysctl {
        sysctl: NetSysctl,
        reply: oneshot::Sender<io::Result<bool>>,
    },
    ReturnPath {
        path: ReturnPath,
        /// `Ok(true)`: installed.
        reply: oneshot::Sender<io::Result<bool>>,
    },
}

enum Reply {
    Caller(oneshot::Sender<io::Result<Socket>>),
    Spare,
}

/// Writes `sysctl` in the calling thread's network namespace unless it
/// already holds the value; returns whether it wrote.
fn write_sysctl(sysctl: NetSysctl) -> io::Result<bool> {
    let path = sysctl.path();
    let annotate = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let now = std::fs::read_to_string(&path).map_err(annotate)?;
    if now.trim() == sysctl.value {
        return Ok(false);
    }
    std::fs::write(&path, sysctl.value).map_err(annotate)?;
    Ok(true)
}

/// Production [`SocketFactory`]: a dedicated thread that enters namespaces.
#[derive(Clone)]
pub struct NetnsWorker {
    tx: mpsc::Sender<Job>,
}

impl fmt::Debug for NetnsWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NetnsWorker")
    }
}

impl NetnsWorker {
    /// Runs `what` (made around the reply channel) on the worker thread,
    /// inside `ns`. In the daemon's own namespace it answers `Ok(false)`
    /// without asking: the node's sysctls and routing are never changed.
    fn ask(
        &self,
        ns: &Netns,
        what: impl FnOnce(oneshot::Sender<io::Result<bool>>) -> What,
    ) -> SysctlFuture {
        if ns.file.is_none() {
            return Box::pin(std::future::ready(Ok(false)));
        }
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Job {
            ns: ns.clone(),
            what: what(reply),
        });
        Box::pin(async move {
            sent.map_err(|_| io::Error::other("netns worker thread has stopped"))?;
            rx.await
                .map_err(|_| io::Error::other("netns worker thread has stopped"))?
        })
    }

    /// Starts the worker thread.
    pub fn start() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("nodemesh-netns".into())
            .spawn(move || {
                // Which namespace this thread is in now; None = the daemon's own.
                let mut current: Option<PathBuf> = None;
                while let Ok(job) = rx.recv() {
                    let entered = enter(&job.ns, &mut current);
                    match job.what {
                        What::Socket { domain, reply } => {
                            let res = entered.and_then(|()| {
                                Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
                            });
                            match reply {
                                Reply::Caller(tx) => {
                                    let _ = tx.send(res);
                                }
                                Reply::Spare => {
                                    // A failed spare is not an error: the next
                                    // connect asks again and sees it.
                                    if let Ok(sock) = res.and_then(prepare) {
                                        job.ns.spares.put(domain, sock);
                                    }
                                }
                            }
                        }
                        What::Sysctl { sysctl, reply } => {
                            let _ = reply.send(entered.and_then(|()| write_sysctl(sysctl)));
                        }
                        What::ReturnPath { path, reply } => {
                            let res = entered.and_then(|()| crate::rtnl::install(&path));
                            let _ = reply.send(res.map(|()| true));
                        }
                    }
                }
            })?;
        Ok(Self { tx })
    }
}

fn enter(ns: &Netns, current: &mut Option<PathBuf>) -> io::Result<()> {
    let Some(file) = &ns.file else {
        // The daemon's own namespace: this thread only leaves it for pods, and
        // sockets for the daemon's namespace are never requested from here.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "netns worker is for pod namespaces only",
        ));
    };
    if current.as_deref() == Some(ns.path.as_path()) {
        return Ok(());
    }
    // Forget where we are first: if setns fails half-way we must re-enter next time.
    *current = None;
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(io::Error::from)?;
    *current = Some(ns.path.clone());
    Ok(())
}

impl SocketFactory for NetnsWorker {
    fn tcp_socket(&self, ns: &Netns, family: SocketAddr) -> SocketFuture {
        let domain = Domain::for_address(family);
        if ns.file.is_none() {
            return Box::pin(async move { new_socket(domain) });
        }
        let (spare, left) = ns.spares.take(domain);
        let refill = |n: usize| {
            for _ in 0..n {
                let _ = self.tx.send(Job {
                    ns: ns.clone(),
                    what: What::Socket {
                        domain,
                        reply: Reply::Spare,
                    },
                });
            }
        };
        if let Some(sock) = spare {
            // Replace the one taken, in the background.
            refill(usize::from(left < SPARE_SOCKETS));
            return Box::pin(std::future::ready(Ok(sock)));
        }
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Job {
            ns: ns.clone(),
            what: What::Socket {
                domain,
                reply: Reply::Caller(reply),
            },
        });
        // None in stock (first use, or a burst): the full stock, made after
        // the caller's socket (the worker is FIFO); spares beyond the stock
        // are closed on arrival.
        refill(SPARE_SOCKETS);
        Box::pin(async move {
            sent.map_err(|_| io::Error::other("netns worker thread has stopped"))?;
            let sock = rx
                .await
                .map_err(|_| io::Error::other("netns worker thread has stopped"))??;
            prepare(sock)
        })
    }

    fn set_sysctl(&self, ns: &Netns, sysctl: NetSysctl) -> SysctlFuture {
        // In the daemon's own namespace, the node's: never tuned.
        self.ask(ns, |reply| What::Sysctl { sysctl, reply })
    }

    fn install_return_path(&self, ns: &Netns, path: ReturnPath) -> SysctlFuture {
        // In the daemon's own namespace, the node's: its routing is never changed.
        self.ask(ns, |reply| What::ReturnPath { path, reply })
    }
}

/// Non-blocking and close-on-exec, as tokio needs it.
fn prepare(sock: Socket) -> io::Result<Socket> {
    sock.set_nonblocking(true)?;
    sock.set_cloexec(true)?;
    Ok(sock)
}

fn new_socket(domain: Domain) -> io::Result<Socket> {
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// [`SocketFactory`] for tests without root: every socket in the current
/// netns, and no sysctl or route ever written (the current netns is the
/// test machine's own; [`SocketFactory::set_sysctl`] answers "not changed",
/// [`SocketFactory::install_return_path`] "not installed").
#[derive(Debug, Default, Clone, Copy)]
pub struct CurrentNetns;

impl SocketFactory for CurrentNetns {
    fn tcp_socket(&self, _ns: &Netns, family: SocketAddr) -> SocketFuture {
        let domain = Domain::for_address(family);
        Box::pin(async move { new_socket(domain) })
    }

    fn set_sysctl(&self, _ns: &Netns, _sysctl: NetSysctl) -> SysctlFuture {
        Box::pin(std::future::ready(Ok(false)))
    }

    fn install_return_path(&self, _ns: &Netns, _path: ReturnPath) -> SysctlFuture {
        Box::pin(std::future::ready(Ok(false)))
    }
}

/// Binds and listens on `addr` inside `ns`, with `SO_REUSEPORT` so that a
/// successor daemon can listen beside this one during a hand-over (the pod's
/// own processes cannot join the group unless they run as the daemon's user
/// and set `SO_REUSEPORT` themselves).
pub async fn listen_in(
    factory: &dyn SocketFactory,
    ns: &Netns,
    addr: SocketAddr,
) -> io::Result<TcpListener> {
    let sock = factory.tcp_socket(ns, addr).await?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `[::]:p` must not also claim IPv4 `0.0.0.0:p`, which has its own listener.
        sock.set_only_v6(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(StdListener::from(sock))
}

/// Where a connection made inside a pod's namespace comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The pod's own address (as any socket of the pod), marked with the
    /// daemon's capture mark so the pod's capture rules let it through.
    Pod {
        /// `SO_MARK`.
        mark: u32,
    },
    /// The client's address (`IP_TRANSPARENT`), marked so the pod's
    /// [`ReturnPath`] brings the replies back. Only into a pod whose return
    /// path is installed.
    Client {
        /// The client's address (the port is the kernel's choice).
        addr: std::net::IpAddr,
        /// `SO_MARK`: the return path's mark.
        mark: u32,
    },
}

/// Connects to `dst` from a socket made inside `ns`, from `origin`, with
/// `TCP_NODELAY`.
pub async fn connect_in(
    factory: &dyn SocketFactory,
    ns: &Netns,
    dst: SocketAddr,
    origin: Origin,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = factory.tcp_socket(ns, dst).await?;
    match origin {
        Origin::Pod { mark } => {
            if mark != 0 {
                sock.set_mark(mark)?;
            }
        }
        Origin::Client { addr, mark } => {
            sock.set_mark(mark)?;
            if addr.is_ipv6() {
                sock.set_ip_transparent_v6(true)?;
            } else {
                sock.set_ip_transparent_v4(true)?;
            }
            // The port is chosen at connect, unique per 4-tuple (and
            // `tcp_tw_reuse` applies), not at bind, where it would have to
            // be unique per client address.
            nix::sys::socket::setsockopt(
                &sock,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )
            .map_err(io::Error::from)?;
            sock.bind(&SocketAddr::new(addr, 0).into()).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("bind to the client's address {addr}: {e}"),
                )
            })?;
        }
    }
    sock.set_tcp_nodelay(true)?;
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(res) => res,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out after {timeout:?}"),
        )),
    }
}

/// The destination a redirected connection was originally sent to.
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(tcp);
    let local = tcp.local_addr()?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// Sets `TCP_NODELAY` (every leg: DESIGN §10).
pub fn set_nodelay(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn current_netns_factory_listens_and_connects() {
        let f = CurrentNetns;
        let ns = Netns::current();
        let l = listen_in(&f, &ns, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("listen");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(
            connect_in(
                &f,
                &ns,
                addr,
                Origin::Pod { mark: 0 },
                Duration::from_secs(5)
            ),
            l.accept()
        );
        let c = c.expect("connect");
        let (s, peer) = s.expect("accept");
        assert_eq!(c.local_addr().expect("local"), peer);
        assert!(c.nodelay().expect("nodelay"));
        // Not redirected: no original destination recorded by conntrack NAT,
        // the kernel reports the local address or an error; either is fine,
        // but it must not panic.
        let _ = original_dst(&s);
    }

    #[test]
    fn sysctl_names_map_to_their_proc_files() {
        assert_eq!(
            TCP_TW_REUSE.path(),
            Path::new("/proc/sys/net/ipv4/tcp_tw_reuse")
        );
    }

    #[tokio::test]
    async fn no_sysctl_is_written_in_the_daemons_own_namespace() {
        // The daemon's own namespace is the node's (or, in tests, the
        // machine's): neither factory may write there.
        let ns = Netns::current();
        assert!(!CurrentNetns
            .set_sysctl(&ns, TCP_TW_REUSE)
            .await
            .expect("ok"));
        let worker = NetnsWorker::start().expect("worker");
        assert!(!worker.set_sysctl(&ns, TCP_TW_REUSE).await.expect("ok"));
    }

    #[tokio::test]
    async fn worker_refuses_missing_namespace() {
        let err = Netns::open(Path::new("/nonexistent/netns")).expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_path_that_is_not_a_namespace_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A FIFO: a blocking open would wait here for a writer forever.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let file = dir.path().join("file");
        std::fs::write(&file, b"not a netns").expect("write");
        for path in [&fifo, &file] {
            let err = Netns::open(path).expect_err("not a namespace");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
            assert!(err.to_string().contains("is not a namespace file"), "{err}");
        }
        Netns::open(Path::new("/proc/self/ns/net")).expect("this process's netns");
    }
}
