//! Zero-downtime upgrade: the hand-over from a running daemon (the
//! **predecessor**, O) to a new one starting on the same node (the
//! **successor**, N), over `<run dir>/handover.sock` (beside `cni.sock`).
//!
//! ```text
//!  N (new)                                    O (running)
//!  ── connect handover.sock ────────────────► (nothing there: N starts alone)
//!  ── hello{pid} ───────────────────────────►  /ready = 503 "successor starting"
//!  ◄─────────────────── welcome{pid,cid_tag}
//!  bind UDP tunnel (SO_REUSEPORT), attach the
//!  steering program (N's tag → N, rest → O);
//!  wait for discovery; listeners in every
//!  pod (SO_REUSEPORT, beside O's)
//!  bind tmp socket, rename(2) over cni.sock
//!  ── stop_cni ─────────────────────────────►  stop accepting on cni.sock, serve
//!  ◄───────────────────────────── cni_stopped  what is queued, finish requests
//!  re-read state_dir (pods O registered
//!  meanwhile); wait until ready; bind admin;
//!  switch the program (O's tag → O, rest → N)
//!  ── take_over ────────────────────────────►  streams on O's tunnels: `unavailable`
//!                                              `draining` (peers retry on a new
//!                                              tunnel → N); in-pod and admin
//!                                              listeners steered to N, closed
//!  ◄──────────────────────────────────── done
//!  bind tmp socket, rename over handover.sock
//!  (for the next upgrade)                       … SIGTERM: drain, exit 0
//! ```
//!
//! If the connection drops before `done` (N crashed), O reverts: it is ready
//! again, and if it had stopped serving CNI it binds `cni.sock` again and
//! re-reads `state_dir`. If O vanishes, N carries on alone.
//!
//! Owns the protocol ([`proto`]), the successor's side ([`join`],
//! [`PredecessorLink`]), the predecessor's server ([`serve`], driving a
//! [`Predecessor`]), the hand-over [`Status`] shown in `/config_dump`, and the
//! atomic replacement of a Unix socket path ([`bind_replacing`]).

pub mod proto;

use std::future::Future;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::proto::{Message, ProtoError, VERSION};
use crate::metrics as m;
use crate::tunnel::cid::Tag;

/// File name of the hand-over socket, in the directory of `cni.sock`.
pub const SOCKET_NAME: &str = "handover.sock";
/// How long the successor waits for each answer of the predecessor. Each
/// step is local work (closing sockets, finishing CNI requests, which the
/// plugin bounds to its own timeout); past this the predecessor is taken as
/// hung and the successor carries on alone.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the predecessor waits for `hello` after a connection opens.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a listener handed to the successor keeps accepting after the
/// kernel was told to send new connections to the successor: handshakes
/// that had already reached it (SYN received, ACK not yet) complete within a
/// round trip on the node; a lost SYN-ACK is retransmitted after 1 s, which
/// such a connection survives by its retry reaching the successor.
pub const LISTENER_LINGER: Duration = Duration::from_millis(500);

/// The hand-over socket beside `cni_socket`.
pub fn socket_path(cni_socket: &Path) -> PathBuf {
    cni_socket.with_file_name(SOCKET_NAME)
}

/// Where a daemon is in the hand-over (`/config_dump`: `handover.phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Serving alone (after a start without predecessor or a completed take-over).
    Serving,
    /// Successor: said hello, starting up beside the predecessor.
    Joining,
    /// Successor: ready, asked the predecessor to step back.
    TakingOver,
    /// Predecessor: a successor said hello.
    SuccessorStarting,
    /// Predecessor: stopped serving CNI for the successor.
    CniHandedOver,
    /// Predecessor: closed its listeners; draining what is open.
    HandedOver,
}

/// This daemon's hand-over state, for `/config_dump` and logs.
#[derive(Debug)]
pub struct Status {
    pid: u32,
    tag: Tag,
    inner: Mutex<(Phase, Option<u32>)>,
}

impl Status {
    /// A daemon of process `pid` issuing CIDs with `tag`, serving alone.
    pub fn new(pid: u32, tag: Tag) -> Self {
        Self {
            pid,
            tag,
            inner: Mutex::new((Phase::Serving, None)),
        }
    }

    /// Enters `phase`; `peer` is the other daemon's pid, if any.
    pub fn set(&self, phase: Phase, peer: Option<u32>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *g = (phase, peer);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// This daemon's CID tag.
    pub fn tag(&self) -> Tag {
        self.tag
    }

    /// `{"pid", "cid_tag", "phase", "peer_pid"}`.
    pub fn to_json(&self) -> serde_json::Value {
        let (phase, peer) = *self.inner.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "pid": self.pid,
            "cid_tag": self.tag.get(),
            "phase": phase,
            "peer_pid": peer,
        })
    }
}

fn count(role: &'static str, result: &'static str) {
    metrics::counter!(m::HANDOVER, "role" => role, "result" => result).increment(1);
}

/// Counts a hand-over outcome of the successor: `ok`, `refused`,
/// `predecessor_lost`.
pub fn count_successor(result: &'static str) {
    count("successor", result);
}

// ---------------------------------------------------------------------------
// Unix socket paths replaced atomically.

/// Identity (device, inode) of a socket file this daemon bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` still names the socket this daemon bound (a successor
    /// may have renamed its own over it).
    pub fn is_still_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|md| md.dev() == self.dev && md.ino() == self.ino)
    }

    /// Removes the path if it still is ours; a successor's is left alone.
    pub fn remove_if_still_ours(&self) {
        if self.is_still_ours() {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!(path = %self.path.display(), error = %e, "cannot remove socket file");
            }
        }
    }
}

/// Binds a Unix listener on a temporary name beside `path`, owner-only, and
/// renames it over `path` (atomic: a client connecting meanwhile reaches
/// either the old socket or the new one, never nothing).
pub fn bind_replacing(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::symlink_metadata(&tmp))
        .and_then(|md| std::fs::rename(&tmp, path).map(|()| md));
    match placed {
        Ok(md) => Ok((
            listener,
            SocketFile {
                path: path.to_owned(),
                dev: md.dev(),
                ino: md.ino(),
            },
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------
// The successor's side.

/// The successor's connection to its predecessor.
#[derive(Debug)]
pub struct PredecessorLink {
    conn: BufReader<UnixStream>,
    /// The predecessor's pid.
    pub pid: u32,
    /// The predecessor's CID tag.
    pub tag: Tag,
}

/// Says hello to the daemon serving `path`, if there is one. `Ok(None)`: no
/// daemon listens there (no file, or a stale one): this daemon is alone.
pub async fn join(path: &Path) -> Result<Option<PredecessorLink>, ProtoError> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    let mut conn = BufReader::new(stream);
    let hello = Message::Hello {
        version: VERSION,
        pid: std::process::id(),
    };
    let answer = exchange(&mut conn, &hello).await?;
    match answer {
        Message::Welcome {
            version,
            pid,
            cid_tag,
        } => {
            if version != VERSION {
                return Err(ProtoError::Version { got: version });
            }
            let tag = Tag::new(cid_tag).ok_or_else(|| {
                ProtoError::Malformed(format!("cid_tag {cid_tag} is reserved, not a tag"))
            })?;
            Ok(Some(PredecessorLink { conn, pid, tag }))
        }
        other => Err(unexpected("welcome", other)),
    }
}

fn unexpected(expected: &'static str, got: Message) -> ProtoError {
    match got {
        Message::Error { message } => ProtoError::Refused(message),
        other => ProtoError::Unexpected {
            expected,
            got: other.kind(),
        },
    }
}

async fn exchange(conn: &mut BufReader<UnixStream>, msg: &Message) -> Result<Message, ProtoError> {
    proto::write(conn.get_mut(), msg).await?;
    match tokio::time::timeout(STEP_TIMEOUT, proto::read(conn)).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(ProtoError::Truncated),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProtoError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from the predecessor within {STEP_TIMEOUT:?}"),
        ))),
    }
}

impl PredecessorLink {
    /// Asks the predecessor to stop serving CNI (this daemon now owns
    /// `cni.sock`) and waits until its requests are finished.
    pub async fn stop_cni(&mut self) -> Result<(), ProtoError> {
        match exchange(&mut self.conn, &Message::StopCni).await? {
            Message::CniStopped => Ok(()),
            other => Err(unexpected("cni_stopped", other)),
        }
    }

    /// Asks the predecessor to close its listeners; returns once it has.
    pub async fn take_over(mut self) -> Result<(), ProtoError> {
        match exchange(&mut self.conn, &Message::TakeOver).await? {
            Message::Done => Ok(()),
            other => Err(unexpected("done", other)),
        }
    }
}

// ---------------------------------------------------------------------------
// The predecessor's side.

/// What the predecessor does at each step; implemented by the daemon (`app`).
pub trait Predecessor: Send + Sync + 'static {
    /// A successor (`pid`) said hello: report not ready.
    fn successor_starting(&self, pid: u32) -> impl Future<Output = ()> + Send;
    /// Stop accepting on the CNI socket, serve what is queued, finish every
    /// request.
    fn stop_cni(&self) -> impl Future<Output = ()> + Send;
    /// Steer and close the in-pod and admin listeners, stop the CNI server,
    /// answer new tunnel streams `unavailable`/`draining`.
    fn take_over(&self, successor: u32) -> impl Future<Output = ()> + Send;
    /// The successor vanished before `take_over`: serve as before (bind the
    /// CNI socket again if `cni_stopped` or the path is no longer ours, and
    /// pick up the successor's registrations).
    fn revert(&self, cni_stopped: bool) -> impl Future<Output = ()> + Send;
}

/// How a session with one successor ended.
enum Outcome {
    /// Handed over: stop listening for successors.
    HandedOver,
    /// Reverted or refused: keep listening.
    Continue,
}

/// Serves successors on `listener` until one takes over or `stop`. One
/// successor at a time: another one connecting meanwhile is refused.
pub async fn serve<P: Predecessor>(
    listener: UnixListener,
    node: Arc<P>,
    status: Arc<Status>,
    stop: CancellationToken,
) {
    let busy = Arc::new(tokio::sync::Mutex::new(()));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            _ = done_rx.recv() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "hand-over socket accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(guard) = busy.clone().try_lock_owned() else {
            tokio::spawn(async move {
                let mut s = stream;
                let refusal = Message::Error {
                    message: "another hand-over is in progress".into(),
                };
                let _ = proto::write(&mut s, &refusal).await;
            });
            count("predecessor", "refused");
            continue;
        };
        let (node, status, done_tx) = (node.clone(), status.clone(), done_tx.clone());
        tokio::spawn(async move {
            let outcome = session(stream, node.as_ref(), &status).await;
            drop(guard);
            if matches!(outcome, Outcome::HandedOver) {
                let _ = done_tx.send(()).await;
            }
        });
    }
}

async fn session<P: Predecessor>(stream: UnixStream, node: &P, status: &Status) -> Outcome {
    let mut conn = BufReader::new(stream);
    let successor = match tokio::time::timeout(HELLO_TIMEOUT, proto::read(&mut conn)).await {
        Ok(Ok(Some(Message::Hello { version, pid }))) if version == VERSION => pid,
        Ok(Ok(Some(Message::Hello { version, .. }))) => {
            let e = ProtoError::Version { got: version };
            return refuse(&mut conn, &e.to_string()).await;
        }
        Ok(Ok(None)) => return Outcome::Continue,
        Ok(Ok(Some(other))) => {
            let e = unexpected("hello", other);
            return refuse(&mut conn, &e.to_string()).await;
        }
        Ok(Err(e)) => return refuse(&mut conn, &e.to_string()).await,
        Err(_) => return refuse(&mut conn, "no hello in time").await,
    };
    info!(
        successor.pid = successor,
        cid_tag = status.tag().get(),
        "hand-over: successor starting; reporting not ready"
    );
    node.successor_starting(successor).await;
    status.set(Phase::SuccessorStarting, Some(successor));
    let welcome = Message::Welcome {
        version: VERSION,
        pid: std::process::id(),
        cid_tag: status.tag().get(),
    };
    let mut cni_stopped = false;
    let mut reply = Some(welcome);
    loop {
        if let Some(r) = reply.take() {
            if let Err(e) = proto::write(conn.get_mut(), &r).await {
                warn!(successor.pid = successor, error = %e, "hand-over: cannot answer the successor");
                break;
            }
            if matches!(r, Message::Done) {
                status.set(Phase::HandedOver, Some(successor));
                count("predecessor", "ok");
                info!(
                    successor.pid = successor,
                    "hand-over: done; draining until SIGTERM"
                );
                return Outcome::HandedOver;
            }
        }
        // No deadline: the successor may legitimately wait long for its
        // first discovery sync before it is ready to take over.
        match proto::read(&mut conn).await {
            Ok(Some(Message::StopCni)) => {
                info!(
                    successor.pid = successor,
                    "hand-over: successor owns cni.sock; stopping the CNI server"
                );
                node.stop_cni().await;
                cni_stopped = true;
                status.set(Phase::CniHandedOver, Some(successor));
                reply = Some(Message::CniStopped);
            }
            Ok(Some(Message::TakeOver)) => {
                info!(
                    successor.pid = successor,
                    "hand-over: successor ready; closing listeners"
                );
                node.take_over(successor).await;
                reply = Some(Message::Done);
            }
            Ok(Some(other)) => {
                let e = unexpected("stop_cni or take_over", other);
                warn!(successor.pid = successor, error = %e, "hand-over: protocol error");
                let _ = proto::write(
                    conn.get_mut(),
                    &Message::Error {
                        message: e.to_string(),
                    },
                )
                .await;
                break;
            }
            Ok(None) => break,
            Err(e) => {
                warn!(successor.pid = successor, error = %e, "hand-over: connection to the successor failed");
                break;
            }
        }
    }
    warn!(
        successor.pid = successor,
        cni_stopped, "hand-over: successor gone before taking over; serving as before"
    );
    node.revert(cni_stopped).await;
    status.set(Phase::Serving, None);
    count("predecessor", "successor_lost");
    Outcome::Continue
}

async fn refuse(conn: &mut BufReader<UnixStream>, why: &str) -> Outcome {
    warn!(error = why, "hand-over: refusing a successor");
    let _ = proto::write(
        conn.get_mut(),
        &Message::Error {
            message: why.to_owned(),
        },
    )
    .await;
    count("predecessor", "refused");
    Outcome::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    struct Fake {
        starting: AtomicUsize,
        stop_cni: AtomicUsize,
        take_over: AtomicUsize,
        revert: Mutex<Vec<bool>>,
    }

    impl Predecessor for Fake {
        async fn successor_starting(&self, _pid: u32) {
            self.starting.fetch_add(1, Ordering::SeqCst);
        }
        async fn stop_cni(&self) {
            self.stop_cni.fetch_add(1, Ordering::SeqCst);
        }
        async fn take_over(&self, _successor: u32) {
            self.take_over.fetch_add(1, Ordering::SeqCst);
        }
        async fn revert(&self, cni_stopped: bool) {
            self.revert.lock().expect("lock").push(cni_stopped);
        }
    }

    fn tag(v: u8) -> Tag {
        Tag::new(v).expect("tag")
    }

    struct Server {
        _dir: tempfile::TempDir,
        path: PathBuf,
        fake: Arc<Fake>,
        status: Arc<Status>,
        task: tokio::task::JoinHandle<()>,
    }

    fn server() -> Server {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(SOCKET_NAME);
        let (listener, _) = bind_replacing(&path).expect("bind");
        let fake = Arc::new(Fake::default());
        let status = Arc::new(Status::new(1, tag(0x33)));
        let task = tokio::spawn(serve(
            listener,
            fake.clone(),
            status.clone(),
            CancellationToken::new(),
        ));
        Server {
            _dir: dir,
            path,
            fake,
            status,
            task,
        }
    }

    #[tokio::test]
    async fn nothing_listening_means_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(SOCKET_NAME);
        assert!(join(&path).await.expect("no file").is_none());
        // A stale socket file (its daemon died): refused, also alone.
        let (l, _) = bind_replacing(&path).expect("bind");
        drop(l);
        assert!(join(&path).await.expect("stale").is_none());
    }

    #[tokio::test]
    async fn a_full_hand_over_runs_every_step_once() {
        let s = server();
        let mut link = join(&s.path).await.expect("join").expect("predecessor");
        assert_eq!(link.tag, tag(0x33));
        assert_eq!(s.fake.starting.load(Ordering::SeqCst), 1);
        assert_eq!(s.status.phase(), Phase::SuccessorStarting);
        link.stop_cni().await.expect("stop cni");
        assert_eq!(s.fake.stop_cni.load(Ordering::SeqCst), 1);
        assert_eq!(s.status.phase(), Phase::CniHandedOver);
        link.take_over().await.expect("take over");
        assert_eq!(s.fake.take_over.load(Ordering::SeqCst), 1);
        assert_eq!(s.status.phase(), Phase::HandedOver);
        assert!(s.fake.revert.lock().expect("lock").is_empty());
        // The server stops listening for successors once handed over.
        tokio::time::timeout(Duration::from_secs(5), s.task)
            .await
            .expect("server ends")
            .expect("join");
    }

    #[tokio::test]
    async fn a_successor_that_dies_mid_way_makes_the_predecessor_revert() {
        let s = server();
        let mut link = join(&s.path).await.expect("join").expect("predecessor");
        link.stop_cni().await.expect("stop cni");
        drop(link);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while s.fake.revert.lock().expect("lock").is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "no revert");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*s.fake.revert.lock().expect("lock"), vec![true]);
        assert_eq!(s.status.phase(), Phase::Serving);
        // And the next successor is welcome.
        let link = join(&s.path).await.expect("join").expect("again");
        link.take_over().await.expect("take over");
        assert_eq!(s.fake.take_over.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn garbage_and_a_second_successor_are_refused() {
        use tokio::io::AsyncWriteExt;
        let s = server();
        // Garbage instead of hello: an error line, no state change.
        let mut raw = UnixStream::connect(&s.path).await.expect("connect");
        raw.write_all(b"GET / HTTP/1.1\r\n\n").await.expect("write");
        let mut r = BufReader::new(raw);
        let answer = proto::read(&mut r).await.expect("read").expect("answer");
        assert!(matches!(answer, Message::Error { .. }), "{answer:?}");
        assert_eq!(s.fake.starting.load(Ordering::SeqCst), 0);
        // One successor in progress: a second one is refused.
        let first = join(&s.path).await.expect("join").expect("first");
        let second = join(&s.path).await;
        assert!(matches!(second, Err(ProtoError::Refused(_))), "{second:?}");
        first.take_over().await.expect("first takes over");
    }

    #[test]
    fn replacing_a_socket_path_is_atomic_and_remembers_its_identity() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("cni.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let (_old, old_id) = bind_replacing(&path).expect("old");
            assert!(old_id.is_still_ours());
            let mode = std::fs::metadata(&path).expect("md").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let (_new, new_id) = bind_replacing(&path).expect("new");
            assert!(!old_id.is_still_ours());
            assert!(new_id.is_still_ours());
            // The old daemon exiting leaves the successor's socket in place.
            old_id.remove_if_still_ours();
            assert!(path.exists());
            new_id.remove_if_still_ours();
            assert!(!path.exists());
            // No temporary file is left behind.
            assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
        });
    }
}
