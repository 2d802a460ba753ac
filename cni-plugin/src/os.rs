//! The OS edge behind two small traits, so the command logic is testable
//! without root: [`NetnsOps`] (inspect a netns path, run `nft` inside it) and
//! [`DaemonClient`] (one request/response exchange on the daemon's socket).
//! [`SystemNetns`] and [`UnixDaemon`] are the production implementations.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

use crate::proto::{decode_line, encode_line, FrameError, Request, Response, MAX_MESSAGE_BYTES};

/// What a `CNI_NETNS` path refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetnsKind {
    /// The plugin's own netns: a host-network pod.
    Host,
    /// Another network namespace: a pod netns.
    Pod,
    /// Nothing there (deleted, or a stale bind-mount point).
    Missing,
}

/// Failures at the netns / nft edge.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `stat`/`statfs` of the netns path failed other than "not found".
    #[error("cannot inspect netns {path}: {source}")]
    Inspect {
        /// The netns path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Opening or entering the netns failed.
    #[error("cannot enter netns {path}: {source}")]
    Enter {
        /// The netns path.
        path: PathBuf,
        /// The OS error.
        source: nix::Error,
    },
    /// Returning to the plugin's own netns failed.
    #[error("cannot return to the plugin's own netns: {0}")]
    Restore(nix::Error),
    /// `nft` could not be started or fed.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The nft binary.
        program: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `nft` exited non-zero.
    #[error("nft failed in netns {path} (exit {status}): {stderr}")]
    Nft {
        /// The netns path.
        path: PathBuf,
        /// Exit status as text.
        status: String,
        /// What nft printed on stderr.
        stderr: String,
    },
}

/// Operations on pod network namespaces.
pub trait NetnsOps {
    /// Classifies a `CNI_NETNS` path.
    fn classify(&self, netns: &Path) -> Result<NetnsKind, NetnsError>;
    /// Runs `nft -f -` with `script` inside the netns.
    fn nft_apply(&self, netns: &Path, script: &str) -> Result<(), NetnsError>;
    /// `nft list table inet nodemesh` inside the netns; `None` if absent.
    fn list_table(&self, netns: &Path) -> Result<Option<String>, NetnsError>;
}

/// Failures talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Nobody listens on the socket (or it does not exist).
    #[error("cannot connect to the nodemesh daemon at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// No complete answer within the timeout.
    #[error("the nodemesh daemon at {path} did not answer within {after:?}")]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The timeout that expired.
        after: Duration,
    },
    /// Reading or writing the socket failed.
    #[error("I/O error talking to the nodemesh daemon at {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The answer was not a valid message.
    #[error("bad answer from the nodemesh daemon at {path}: {source}")]
    Frame {
        /// The socket path.
        path: PathBuf,
        /// The framing error.
        source: FrameError,
    },
}

/// One request/response exchange with the daemon.
pub trait DaemonClient {
    /// Sends `req` to the daemon listening on `socket` and waits at most
    /// `timeout` for the whole answer.
    fn call(
        &self,
        socket: &Path,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, DaemonError>;
}

/// The daemon's Unix socket, one connection per request (see `proto`).
#[derive(Debug, Clone, Copy, Default)]
pub struct UnixDaemon;

impl DaemonClient for UnixDaemon {
    fn call(
        &self,
        socket: &Path,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, DaemonError> {
        let path = &socket.to_path_buf();
        let deadline = Instant::now() + timeout;
        let timed_out = || DaemonError::Timeout {
            path: path.clone(),
            after: timeout,
        };
        let io = |source: std::io::Error| {
            if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                timed_out()
            } else {
                DaemonError::Io {
                    path: path.clone(),
                    source,
                }
            }
        };
        let line = encode_line(req).map_err(|source| DaemonError::Frame {
            path: path.clone(),
            source,
        })?;
        let mut stream = connect_within(path, timeout)?;
        let remaining = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
        };
        stream.set_write_timeout(remaining()).map_err(io)?;
        stream.write_all(&line).map_err(io)?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 4096];
        loop {
            let left = remaining().ok_or_else(timed_out)?;
            stream.set_read_timeout(Some(left)).map_err(io)?;
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            };
            let frame = |source: FrameError| DaemonError::Frame {
                path: path.clone(),
                source,
            };
            if n == 0 {
                return Err(frame(FrameError::Truncated));
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                return decode_line(buf.get(..=end).unwrap_or_default()).map_err(frame);
            }
            if buf.len() > MAX_MESSAGE_BYTES {
                return Err(frame(FrameError::TooLong));
            }
        }
    }
}

/// Connects to a Unix socket within `timeout`. A Unix `connect` blocks
/// while the listener's backlog is full (a wedged daemon), so it runs on a
/// helper thread; on timeout the thread is abandoned and dies with the
/// short-lived plugin process. Threads do not affect the `setns` in
/// [`SystemNetns`]: a netns switch is per thread.
fn connect_within(path: &Path, timeout: Duration) -> Result<UnixStream, DaemonError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let target = path.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send(UnixStream::connect(&target));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(DaemonError::Connect {
            path: path.to_owned(),
            source,
        }),
        Err(_) => Err(DaemonError::Timeout {
            path: path.to_owned(),
            after: timeout,
        }),
    }
}

/// Production netns operations: `stat`/`statfs`, `setns` and `nft`.
#[derive(Debug, Clone, Default)]
pub struct SystemNetns;

/// The plugin's own network namespace.
const SELF_NETNS: &str = "/proc/self/ns/net";

/// Where `nft` lives: the first existing of the usual paths, else `PATH`.
fn nft_program() -> PathBuf {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft", "/bin/nft"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nft"))
}

/// Output of a command run inside a netns.
struct Output {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

impl SystemNetns {
    /// Runs `nft <args>` inside `netns`, feeding `stdin`. The plugin is
    /// single-threaded: it enters the netns, spawns nft (which inherits the
    /// netns), and returns to its own netns before anything else happens.
    fn run_nft(&self, netns: &Path, args: &[&str], stdin: &str) -> Result<Output, NetnsError> {
        let enter = |source: nix::Error| NetnsError::Enter {
            path: netns.to_owned(),
            source,
        };
        let own = File::open(SELF_NETNS).map_err(|e| enter(io_to_nix(&e)))?;
        let target = File::open(netns).map_err(|e| enter(io_to_nix(&e)))?;
        setns(&target, CloneFlags::CLONE_NEWNET).map_err(enter)?;
        let program = nft_program();
        let spawned = Command::new(&program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        // Back home before anything else, whatever the spawn did.
        setns(&own, CloneFlags::CLONE_NEWNET).map_err(NetnsError::Restore)?;
        let spawn_err = |source: std::io::Error| NetnsError::Spawn {
            program: program.clone(),
            source,
        };
        let mut child = spawned.map_err(spawn_err)?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        Ok(Output {
            success: out.status.success(),
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn io_to_nix(e: &std::io::Error) -> nix::Error {
    e.raw_os_error()
        .map_or(nix::Error::EIO, nix::Error::from_raw)
}

impl NetnsOps for SystemNetns {
    fn classify(&self, netns: &Path) -> Result<NetnsKind, NetnsError> {
        let inspect = |source: std::io::Error| NetnsError::Inspect {
            path: netns.to_owned(),
            source,
        };
        let meta = match std::fs::metadata(netns) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(NetnsKind::Missing),
            Err(e) => return Err(inspect(e)),
        };
        let own = std::fs::metadata(SELF_NETNS).map_err(inspect)?;
        if meta.dev() == own.dev() && meta.ino() == own.ino() {
            return Ok(NetnsKind::Host);
        }
        // A netns is a file on nsfs; anything else (a bind-mount point left
        // after the namespace was unmounted) means the namespace is gone.
        let fs = nix::sys::statfs::statfs(netns).map_err(|e| inspect(e.into()))?;
        if fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC
            || fs.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC
        {
            Ok(NetnsKind::Pod)
        } else {
            Ok(NetnsKind::Missing)
        }
    }

    fn nft_apply(&self, netns: &Path, script: &str) -> Result<(), NetnsError> {
        let out = self.run_nft(netns, &["-f", "-"], script)?;
        if out.success {
            Ok(())
        } else {
            Err(NetnsError::Nft {
                path: netns.to_owned(),
                status: out.status,
                stderr: out.stderr,
            })
        }
    }

    fn list_table(&self, netns: &Path) -> Result<Option<String>, NetnsError> {
        let out = self.run_nft(netns, &["list", "table", "inet", "nodemesh"], "")?;
        if out.success {
            Ok(Some(out.stdout))
        } else if out.stderr.contains("No such file or directory") {
            Ok(None)
        } else {
            Err(NetnsError::Nft {
                path: netns.to_owned(),
                status: out.status,
                stderr: out.stderr,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A one-shot server that reads one line and writes `answer`.
    fn serve_once(
        answer: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("d.sock");
        let l = UnixListener::bind(&path).expect("bind");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).expect("read") == 1 && b[0] != b'\n' {
                got.push(b[0]);
            }
            s.write_all(answer).expect("write");
            got
        });
        (dir, path, t)
    }

    #[test]
    fn exchanges_one_json_line() {
        let (_d, path, t) = serve_once(b"{\"result\":\"unregistered\"}\n");
        let req = Request::Unregister {
            container_id: "c9".into(),
        };
        let resp = UnixDaemon
            .call(&path, &req, Duration::from_secs(5))
            .expect("call");
        assert_eq!(resp, Response::Unregistered);
        assert_eq!(
            t.join().expect("join"),
            b"{\"op\":\"unregister\",\"container_id\":\"c9\"}"
        );
    }

    #[test]
    fn truncated_and_malformed_answers_are_errors() {
        let (_d, path, t) = serve_once(b"{\"result\":");
        let err = UnixDaemon
            .call(&path, &Request::Status, Duration::from_secs(5))
            .expect_err("truncated");
        assert!(
            matches!(
                err,
                DaemonError::Frame {
                    source: FrameError::Truncated,
                    ..
                }
            ),
            "{err}"
        );
        t.join().expect("join");
        let (_d, path, t) = serve_once(b"{\"result\":\"explode\"}\n");
        let err = UnixDaemon
            .call(&path, &Request::Status, Duration::from_secs(5))
            .expect_err("malformed");
        assert!(
            matches!(
                err,
                DaemonError::Frame {
                    source: FrameError::Malformed(_),
                    ..
                }
            ),
            "{err}"
        );
        t.join().expect("join");
    }

    #[test]
    fn missing_socket_is_connect_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let err = UnixDaemon
            .call(
                &dir.path().join("none.sock"),
                &Request::Status,
                Duration::from_secs(1),
            )
            .expect_err("no socket");
        assert!(matches!(err, DaemonError::Connect { .. }), "{err}");
    }

    #[test]
    fn classify_own_and_missing_netns() {
        let ops = SystemNetns;
        assert_eq!(
            ops.classify(Path::new(SELF_NETNS)).expect("own"),
            NetnsKind::Host
        );
        assert_eq!(
            ops.classify(Path::new("/run/netns/helper-cni-does-not-exist"))
                .expect("missing"),
            NetnsKind::Missing
        );
        let dir = tempfile::tempdir().expect("tmp");
        let plain = dir.path().join("not-a-netns");
        std::fs::write(&plain, b"").expect("write");
        assert_eq!(
            ops.classify(&plain).expect("plain file"),
            NetnsKind::Missing
        );
    }
}
