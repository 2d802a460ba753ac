//! Lab helpers for certificate tests: re-issuing a node's certificate in
//! place (as a rotation does), polling a daemon's metrics or readiness until
//! a condition holds, and running a daemon that is not expected to become
//! ready (an expired certificate), stopped when its guard drops.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::daemon::{self, DaemonProcess, TRUST_DOMAIN};
use crate::error::LabError;
use crate::exec::Cmd;
use crate::http::Response;
use crate::lab::Lab;
use crate::metrics::{self, Sample};

const POLL: Duration = Duration::from_millis(50);

/// `nodemesh certs node NAME --force`: replaces node `name`'s certificate
/// and key in `cert_dir` with new ones from the lab CA, valid `days` days
/// starting `backdate_days` days ago (`--days 1 --backdate-days 2`: expired).
pub fn reissue_node_cert(
    nodemesh: &Path,
    cert_dir: &Path,
    name: &str,
    days: u32,
    backdate_days: u32,
) -> Result<(), LabError> {
    Cmd::new(nodemesh.display().to_string())
        .args(["certs", "node", name, "--force", "--dir"])
        .arg(cert_dir.display().to_string())
        .args(["--trust-domain", TRUST_DOMAIN])
        .args(["--days".to_owned(), days.to_string()])
        .args(["--backdate-days".to_owned(), backdate_days.to_string()])
        .run()
        .map(|_| ())
}

/// [`reissue_node_cert`] for lab node `node` (from 1).
pub fn reissue(lab: &Lab, node: usize, days: u32, backdate_days: u32) -> Result<(), LabError> {
    let name = lab.node(node)?.name.clone();
    let bin = lab
        .nodemesh_bin()
        .ok_or(LabError::NoDaemon { node: name.clone() })?;
    reissue_node_cert(bin, &lab.cert_dir(), &name, days, backdate_days)
}

/// Polls node `node`'s metrics until `done` holds for them (returning them),
/// or fails after `timeout` naming `what`.
pub fn wait_metrics(
    lab: &Lab,
    node: usize,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Sample]) -> bool,
) -> Result<Vec<Sample>, LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = lab.metrics(node);
        if let Ok(samples) = &last {
            if done(samples) {
                return Ok(samples.clone());
            }
        }
        if Instant::now() >= deadline {
            return Err(LabError::Transfer {
                what: format!("waiting for {what} on node {node}"),
                problem: match last {
                    Ok(_) => format!("not seen within {timeout:?}"),
                    Err(e) => format!("metrics unavailable: {e}"),
                },
            });
        }
        std::thread::sleep(POLL);
    }
}

/// The value of the single sample `name` with labels `filter` (0 if absent).
pub fn value(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    metrics::sum(samples, name, filter)
}

/// Polls node `node`'s `GET path` until `done` holds for the response.
pub fn wait_admin(
    lab: &Lab,
    node: usize,
    path: &str,
    timeout: Duration,
    mut done: impl FnMut(&Response) -> bool,
) -> Result<Response, LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = lab.admin_get(node, path);
        if let Ok(r) = &last {
            if done(r) {
                return last;
            }
        }
        if Instant::now() >= deadline {
            return Err(LabError::Transfer {
                what: format!("waiting for GET {path} on node {node}"),
                problem: match last {
                    Ok(r) => format!("last answer {} {:?}", r.status, r.body),
                    Err(e) => e.to_string(),
                },
            });
        }
        std::thread::sleep(POLL);
    }
}

/// A daemon started outside [`Lab`]'s bookkeeping, for a node whose own
/// daemon was stopped with [`Lab::stop_daemon`]: it is not waited on to
/// become ready. Stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct UnmanagedDaemon {
    process: Option<DaemonProcess>,
}

impl UnmanagedDaemon {
    /// Starts node `node`'s daemon with its current config and waits until
    /// its admin server answers `/healthz` (ready or not).
    pub fn start(lab: &Lab, node: usize, timeout: Duration) -> Result<Self, LabError> {
        let n = lab.node(node)?;
        let no_daemon = || LabError::NoDaemon {
            node: n.name.clone(),
        };
        let bin = lab.nodemesh_bin().ok_or_else(no_daemon)?;
        let paths = n.daemon.as_ref().ok_or_else(no_daemon)?;
        let mut guard = Self {
            process: Some(DaemonProcess::spawn(bin, &n.name, &n.netns, paths)?),
        };
        wait_admin(lab, node, "/healthz", timeout, |r| r.status == 200).map_err(|e| {
            if let Some(p) = guard.process.as_mut() {
                if !p.is_running() {
                    return LabError::DaemonDied {
                        node: n.name.clone(),
                        status: "exited".into(),
                        log: paths.log.clone(),
                        tail: daemon::log_tail(&paths.log, 20),
                    };
                }
            }
            e
        })?;
        Ok(guard)
    }

    /// Its pid.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(DaemonProcess::pid)
    }
}

impl Drop for UnmanagedDaemon {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            let _ = p.stop(daemon::STOP_TIMEOUT);
        }
    }
}
