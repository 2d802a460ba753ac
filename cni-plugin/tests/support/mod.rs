//! Test support for the plugin's integration suites: running the built
//! binary as a runtime does, a fake daemon on a temp Unix socket, network
//! namespaces removed by Drop guards, and running code inside a netns.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::sched::{setns, CloneFlags};
use nodemesh_cni::proto::{decode_line, encode_line, Request, Response};

/// Every netns this suite creates starts with this (our branch name).
pub const NETNS_PREFIX: &str = "helper-cni";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique short suffix for names in this process.
pub fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Self {
        let name = format!("{NETNS_PREFIX}-{role}-{}", unique());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add");
        assert!(
            st.success(),
            "ip netns add {name} failed (are the tests running as root?)"
        );
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a command inside the netns, asserting success; returns stdout.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let out = self.try_exec(cmd);
        assert!(out.0, "{cmd:?} in {} failed: {}", self.name, out.2);
        out.1
    }

    /// Runs a command inside the netns: (success, stdout, stderr).
    pub fn try_exec(&self, cmd: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .expect("ip netns exec");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `nft list table inet nodemesh` in the netns, `None` if absent.
    pub fn nodemesh_table(&self) -> Option<String> {
        let (ok, out, _) = self.try_exec(&["nft", "list", "table", "inet", "nodemesh"]);
        ok.then_some(out)
    }

    /// Runs `f` on a fresh thread that entered this netns; sockets made
    /// there stay in this netns after the thread ends.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let f_ns = std::fs::File::open(&path).expect("open netns");
            setns(&f_ns, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// How the fake daemon answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Registers everything with these values; ready.
    Up {
        outbound_port: u16,
        inbound_port: u16,
        mark: u32,
    },
    /// Answers `register` with `skipped`.
    Skip,
    /// Ready false.
    NotReady,
    /// Reads the request and never answers.
    Silent,
}

/// A daemon stand-in on a temp Unix socket, answering per `proto` and
/// recording every request.
pub struct FakeDaemon {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub seen: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub fn up_mode() -> Mode {
    Mode::Up {
        outbound_port: 15001,
        inbound_port: 15006,
        mark: 0x4e4d,
    }
}

impl FakeDaemon {
    pub fn start(mode: Mode) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("cni.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                serve(conn, &mode, &seen2);
            }
        });
        Self {
            _dir: dir,
            path,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().expect("lock").clone()
    }
}

fn serve(conn: UnixStream, mode: &Mode, seen: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line).is_err() {
        return;
    }
    let Ok(req) = decode_line::<Request>(&line) else {
        return;
    };
    seen.lock().expect("lock").push(req.clone());
    let resp = match (mode, &req) {
        (Mode::Silent, _) => {
            // Wait for the plugin to give up and close.
            let _ = reader.read_to_end(&mut Vec::new());
            return;
        }
        (Mode::Skip, Request::Register(_)) => Response::Skipped {
            reason: "annotated nodemesh.io/inject: disabled".into(),
        },
        (Mode::NotReady, Request::Status) => Response::Ready {
            ready: false,
            reason: Some("discovery not loaded".into()),
        },
        (
            Mode::Up {
                outbound_port,
                inbound_port,
                mark,
            },
            Request::Register(_) | Request::Check { .. },
        ) => Response::Registered {
            outbound_port: *outbound_port,
            inbound_port: *inbound_port,
            mark: *mark,
        },
        (_, Request::Unregister { .. }) => Response::Unregistered,
        (_, Request::Status) => Response::Ready {
            ready: true,
            reason: None,
        },
        (_, Request::Check { .. }) => Response::Error {
            code: nodemesh_cni::proto::ErrorCode::NotRegistered,
            message: "not registered".into(),
        },
        (_, Request::Register(_)) => Response::Error {
            code: nodemesh_cni::proto::ErrorCode::Unavailable,
            message: "not ready".into(),
        },
    };
    let _ = reader
        .get_mut()
        .write_all(&encode_line(&resp).expect("encode"));
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the plugin did.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout not JSON ({e}): {self:?}"))
    }

    /// Asserts a CNI error with `code`; returns the error object.
    pub fn expect_error(&self, code: u64) -> serde_json::Value {
        assert!(!self.success, "expected failure: {self:?}");
        let j = self.json();
        assert_eq!(j["code"].as_u64(), Some(code), "{self:?}");
        assert!(
            j["msg"].is_string() && j["details"].is_string() && j["cniVersion"].is_string(),
            "{j}"
        );
        j
    }

    pub fn expect_ok(&self) -> &Self {
        assert!(self.success, "expected success: {self:?}");
        self
    }
}

/// Runs the plugin binary with exactly `env` (plus PATH) and `stdin`.
pub fn run_plugin(env: &[(&str, &str)], stdin: &str) -> Outcome {
    run_binary(
        Path::new(env!("CARGO_BIN_EXE_nodemesh-cni")),
        env,
        stdin,
        None,
    )
}

/// Runs any CNI binary, optionally inside a named netns (`ip netns exec`).
pub fn run_binary(bin: &Path, env: &[(&str, &str)], stdin: &str, netns: Option<&Netns>) -> Outcome {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait plugin");
    Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
