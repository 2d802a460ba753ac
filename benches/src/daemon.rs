//! The `nodemesh` daemons of a lab: binaries, certificates, config files,
//! the shared discovery file, and the daemon processes themselves.
//!
//! A daemon runs as `ip netns exec <node-ns> nodemesh run --config <file>`
//! (iproute2 `exec`s, so the child's pid is the daemon's), in its own process
//! group (the terminal's Ctrl-C reaches the lab, which then stops it in
//! order), with stdout and stderr appended to the node's `daemon.log`.

use std::fs::OpenOptions;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nodemesh::config::{Config, DiscoveryConfig, DiscoverySource, TlsConfig};
use nodemesh::discovery::model::ClusterModel;

use crate::error::LabError;
use crate::exec::Cmd;
use crate::http;

/// Environment variable naming the directory of the `nodemesh` and
/// `nodemesh-cni` binaries (default: next to the running executable, or its parent).
pub const BIN_DIR_ENV: &str = "NODEMESH_BIN_DIR";
/// Daemon binary name.
pub const DAEMON_BIN: &str = "nodemesh";
/// CNI plugin binary name.
pub const CNI_BIN: &str = "nodemesh-cni";
/// Admin port of every lab daemon, on the node address.
pub const ADMIN_PORT: u16 = 15020;
/// Trust domain of lab identities.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// How long a daemon may take to answer `/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after SIGTERM before SIGKILL
/// (above the lab's drain timeout).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Drain timeout written in lab configs, in ms: short, the lab is interactive.
pub const LAB_DRAIN_TIMEOUT_MS: u64 = 3_000;
/// Discovery poll interval written in lab configs, in ms.
pub const LAB_DISCOVERY_POLL_MS: u64 = 200;
/// How long the lab lets daemons pick up a discovery change (3 polls).
pub const DISCOVERY_SETTLE: Duration = Duration::from_millis(3 * LAB_DISCOVERY_POLL_MS);
const POLL: Duration = Duration::from_millis(50);

/// Directories searched for binaries, in order.
pub fn bin_search_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        if let Some(parent) = dir.parent() {
            let parent = parent.to_path_buf();
            dirs.push(dir);
            dirs.push(parent);
        } else {
            dirs.push(dir);
        }
    }
    dirs
}

/// Finds binary `name` in `dir` if given, else in [`bin_search_dirs`].
pub fn find_binary(name: &str, dir: Option<&Path>) -> Result<PathBuf, LabError> {
    let searched = dir.map_or_else(bin_search_dirs, |d| vec![d.to_path_buf()]);
    searched
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| LabError::BinaryMissing {
            name: name.to_owned(),
            searched,
        })
}

/// `nodemesh certs init`: a CA in `dir` (`ca.pem`, `ca-key.pem`).
pub fn init_ca(nodemesh: &Path, dir: &Path) -> Result<(), LabError> {
    Cmd::new(nodemesh.display().to_string())
        .args(["certs", "init", "--dir"])
        .arg(dir.display().to_string())
        .args(["--trust-domain", TRUST_DOMAIN])
        .run()
        .map(|_| ())
}

/// `nodemesh certs node NAME`: `dir/NAME.pem`, `dir/NAME-key.pem`.
pub fn node_cert(nodemesh: &Path, dir: &Path, node: &str) -> Result<(), LabError> {
    Cmd::new(nodemesh.display().to_string())
        .args(["certs", "node", node, "--dir"])
        .arg(dir.display().to_string())
        .args(["--trust-domain", TRUST_DOMAIN])
        .run()
        .map(|_| ())
}

/// Files and addresses of one node's daemon.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DaemonPaths {
    /// Config file.
    pub config: PathBuf,
    /// Log file (stdout and stderr).
    pub log: PathBuf,
    /// CNI registration socket.
    pub cni_socket: PathBuf,
    /// Persisted registrations.
    pub state_dir: PathBuf,
    /// Admin address (in the node namespace).
    pub admin: SocketAddr,
}

/// The config of node `name` at `address`, with certificates in `cert_dir`.
pub fn node_config(
    name: &str,
    address: IpAddr,
    cert_dir: &Path,
    paths: &DaemonPaths,
    discovery_file: &Path,
    log_level: &str,
) -> Config {
    Config {
        node_name: name.to_owned(),
        node_address: Some(address),
        trust_domain: TRUST_DOMAIN.to_owned(),
        tls: TlsConfig {
            cert: cert_dir.join(format!("{name}.pem")),
            key: cert_dir.join(format!("{name}-key.pem")),
            bundle: cert_dir.join("ca.pem"),
            ..TlsConfig::default()
        },
        admin_addr: paths.admin,
        cni_socket: paths.cni_socket.clone(),
        state_dir: paths.state_dir.clone(),
        // The node's CNI `state_dir` is `<node dir>/cni` (beside `pods`): the
        // daemon drains the unregisters the plugin queued there.
        cni_queue_dir: paths.state_dir.with_file_name("cni").join("queue"),
        discovery: DiscoveryConfig {
            source: DiscoverySource::File,
            file: discovery_file.to_owned(),
            poll_interval_ms: LAB_DISCOVERY_POLL_MS,
        },
        drain_timeout_ms: LAB_DRAIN_TIMEOUT_MS,
        log_level: log_level.to_owned(),
        ..Config::default()
    }
}

/// Writes `contents` to `path` atomically (temporary file, then rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), LabError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(|e| LabError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| LabError::io(path, e))
}

fn to_yaml<T: serde::Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, LabError> {
    serde_yaml::to_string(value)
        .map(String::into_bytes)
        .map_err(|e| LabError::io(path, std::io::Error::other(e)))
}

/// Writes a daemon config file.
pub fn write_config(path: &Path, config: &Config) -> Result<(), LabError> {
    write_atomic(path, &to_yaml(config, path)?)
}

/// Writes the discovery file atomically, so daemons never read half of it.
pub fn write_discovery(path: &Path, model: &ClusterModel) -> Result<(), LabError> {
    write_atomic(path, &to_yaml(model, path)?)
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running daemon this process started.
#[derive(Debug)]
pub struct DaemonProcess {
    node: String,
    netns: String,
    paths: DaemonPaths,
    child: Child,
}

impl DaemonProcess {
    /// Starts `nodemesh run --config` inside `netns`.
    pub fn spawn(
        nodemesh: &Path,
        node: &str,
        netns: &str,
        paths: &DaemonPaths,
    ) -> Result<Self, LabError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .map_err(|e| LabError::io(&paths.log, e))?;
        let log2 = log.try_clone().map_err(|e| LabError::io(&paths.log, e))?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(nodemesh)
            .arg("run")
            .arg("--config")
            .arg(&paths.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|source| LabError::Spawn {
                program: nodemesh.display().to_string(),
                source,
            })?;
        tracing::info!(node, netns, pid = child.id(), "daemon started");
        Ok(Self {
            node: node.to_owned(),
            netns: netns.to_owned(),
            paths: paths.clone(),
            child,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/ready` answers 200; fails with the log's tail if the
    /// daemon exits or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), LabError> {
        self.wait_for("/ready", timeout, |r| r.status == 200)
    }

    /// Waits until this very process answers the node's admin address as
    /// the daemon serving alone: `/config_dump` reports its pid with
    /// hand-over phase `serving` (after a start beside a predecessor: once
    /// it has taken over). Fails like [`DaemonProcess::wait_ready`].
    pub fn wait_serving(&mut self, timeout: Duration) -> Result<(), LabError> {
        let pid = self.pid();
        self.wait_for("/config_dump", timeout, move |r| {
            r.status == 200
                && serde_json::from_str::<serde_json::Value>(&r.body).is_ok_and(|v| {
                    v["handover"]["pid"] == pid && v["handover"]["phase"] == "serving"
                })
        })
    }

    /// Polls `path` on the admin address until `done` accepts an answer.
    fn wait_for(
        &mut self,
        path: &str,
        timeout: Duration,
        done: impl Fn(&http::Response) -> bool,
    ) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| LabError::io(&self.paths.log, e))?
            {
                return Err(LabError::DaemonDied {
                    node: self.node.clone(),
                    status: status.to_string(),
                    log: self.paths.log.clone(),
                    tail: log_tail(&self.paths.log, 20),
                });
            }
            if let Ok(r) = http::get(&self.netns, self.paths.admin, path, Duration::from_secs(1)) {
                if done(&r) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(LabError::DaemonNotReady {
                    node: self.node.clone(),
                    timeout,
                    log: self.paths.log.clone(),
                    tail: log_tail(&self.paths.log, 20),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit status.
    pub fn stop(mut self, timeout: Duration) -> Result<ExitStatus, LabError> {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    tracing::info!(node = %self.node, %status, "daemon stopped");
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                Ok(None) => {
                    tracing::warn!(node = %self.node, "daemon did not exit after SIGTERM; killing it");
                    let _ = self.child.kill();
                    return self
                        .child
                        .wait()
                        .map_err(|e| LabError::io(&self.paths.log, e));
                }
                Err(e) => return Err(LabError::io(&self.paths.log, e)),
            }
        }
    }

    /// Leaves the process running and forgets it (for `nodemesh-lab up`).
    pub fn detach(self) -> u32 {
        self.child.id()
    }
}

/// Stops a process this process did not start: SIGTERM, wait for it to
/// disappear up to `timeout`, then SIGKILL. A missing process is not an error.
pub fn stop_pid(pid: i32, timeout: Duration) {
    let pid = Pid::from_raw(pid);
    if kill(pid, Signal::SIGTERM) == Err(Errno::ESRCH) {
        return;
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if kill(pid, None) == Err(Errno::ESRCH) || is_zombie(pid.as_raw()) {
            return;
        }
        std::thread::sleep(POLL);
    }
    let _ = kill(pid, Signal::SIGKILL);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Pids of processes whose command line mentions `needle` (e.g. a lab directory).
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| u32::try_from(pid).ok() != Some(me))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    c.split(|&b| b == 0)
                        .any(|arg| String::from_utf8_lossy(arg).contains(needle))
                })
                .unwrap_or(false)
        })
        .filter(|&pid| !is_zombie(pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_validates() {
        let paths = DaemonPaths {
            config: "/run/l/n1/config.yaml".into(),
            log: "/run/l/n1/daemon.log".into(),
            cni_socket: "/run/l/n1/cni.sock".into(),
            state_dir: "/run/l/n1/pods".into(),
            admin: "10.77.0.1:15020".parse().expect("addr"),
        };
        let c = node_config(
            "n1",
            "10.77.0.1".parse().expect("ip"),
            Path::new("/run/l/certs"),
            &paths,
            Path::new("/run/l/discovery.yaml"),
            "info",
        );
        c.validate().expect("valid");
        assert_eq!(c.tls.cert, Path::new("/run/l/certs/n1.pem"));
        assert_eq!(c.tls.key, Path::new("/run/l/certs/n1-key.pem"));
        let text = serde_yaml::to_string(&c).expect("yaml");
        let back = Config::from_yaml(&text, Path::new("x")).expect("parse");
        assert_eq!(back, c);
    }

    #[test]
    fn atomic_write_and_tail() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("f.log");
        write_atomic(&p, b"a\nb\nc\n").expect("write");
        assert_eq!(log_tail(&p, 2), "b\nc");
        assert!(!p.with_extension("tmp").exists());
        assert_eq!(log_tail(&dir.path().join("none"), 2), "");
    }
}
