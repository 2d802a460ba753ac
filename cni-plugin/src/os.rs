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
        let mut stream = UnixStream::connect(path).map_err(|source| DaemonError::Connect {
            path: path.clone(),
            source,
        })?;
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
