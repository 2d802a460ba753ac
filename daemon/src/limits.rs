//! Admission limits of the shared proxy (DESIGN §8): one noisy pod cannot
//! starve its neighbours, and the daemon's connections are bounded.
//!
//! Owns two counts and the decision made against them when a connection
//! arrives:
//!
//! - **per local pod**: the connections a pod has open through its outbound
//!   listener (L1), at most `limits.max_connections_per_pod`. A pod that opens
//!   connections without closing them reaches its own limit and gets resets,
//!   while the other pods of the node keep connecting, and it can never take
//!   all of a tunnel's streams to a peer (`tunnel.max_streams`);
//! - **per daemon**: every connection the daemon proxies (outbound, plaintext
//!   inbound, tunnel streams from peers), at most `limits.max_connections`, so
//!   what connections cost in memory and file descriptors has a ceiling.
//!
//! [`Limits::admit`] counts a connection in and returns a [`Permit`] that
//! counts it out when dropped; a refusal is a [`LimitExceeded`] naming the
//! limit. Pure counting, no IO: the callers reset the connection (or answer
//! the stream `unavailable`) and [`Refusal::report`] it (counted in
//! `nodemesh_connections_limited_total`, logged at WARN for the first of a
//! burst).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Default of `limits.max_connections_per_pod`.
pub const DEFAULT_MAX_PER_POD: usize = 4_096;
/// Default of `limits.max_connections`.
pub const DEFAULT_MAX_TOTAL: usize = 65_536;

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    /// The source pod has `limit` connections open through the daemon.
    #[error(
        "the pod already has {limit} connections open through the daemon \
         (limits.max_connections_per_pod); close some, or raise the limit"
    )]
    Pod {
        /// The limit.
        limit: usize,
    },
    /// The daemon has `limit` connections open in all.
    #[error(
        "the daemon already has {limit} connections open (limits.max_connections); \
         raise the limit if the node has memory for more"
    )]
    Daemon {
        /// The limit.
        limit: usize,
    },
}

impl LimitExceeded {
    /// `limit` label of `nodemesh_connections_limited_total`, and the reason
    /// of the `unavailable` status a refused tunnel stream is answered with.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pod { .. } => "pod",
            Self::Daemon { .. } => "daemon",
        }
    }
}

/// The connections of one local pod through its outbound listener.
#[derive(Debug, Default)]
pub struct PodConns {
    open: AtomicUsize,
    /// Set by a refusal, cleared by the next admission: one warning per burst.
    refusing: AtomicBool,
}

impl PodConns {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// The daemon's limits and its count of open connections.
#[derive(Debug)]
pub struct Limits {
    per_pod: usize,
    total: usize,
    open: AtomicUsize,
    refusing: AtomicBool,
}

/// A refusal, and whether it starts a burst of refusals by the same limit
/// (logged at WARN; the rest at DEBUG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The limit reached.
    pub limit: LimitExceeded,
    /// First refusal since the last admission under this limit.
    pub first: bool,
}

impl Refusal {
    /// Counts the refusal in `nodemesh_connections_limited_total` for
    /// `listener` and the local pod `namespace`/`workload`, and logs it: at
    /// WARN for the first of a burst, at DEBUG for the rest (a pod stuck at
    /// its limit would otherwise fill the log). The caller's span names the
    /// connection.
    pub fn report(&self, listener: &'static str, namespace: String, workload: String) {
        metrics::counter!(
            crate::metrics::CONNECTIONS_LIMITED,
            "limit" => self.limit.label(),
            "listener" => listener,
            "namespace" => namespace,
            "workload" => workload,
        )
        .increment(1);
        if self.first {
            tracing::warn!(
                listener,
                error = %self.limit,
                "connection refused by an admission limit; further refusals are logged at debug \
                 until one is admitted"
            );
        } else {
            tracing::debug!(listener, error = %self.limit, "connection refused by an admission limit");
        }
    }
}

impl Limits {
    /// Limits of `per_pod` connections per local pod and `total` per daemon
    /// (both at least 1; `config` validates them).
    pub fn new(per_pod: usize, total: usize) -> Self {
        Self {
            per_pod: per_pod.max(1),
            total: total.max(1),
            open: AtomicUsize::new(0),
            refusing: AtomicBool::new(false),
        }
    }

    /// The per-pod limit (`limits.max_connections_per_pod`).
    pub fn per_pod(&self) -> usize {
        self.per_pod
    }

    /// The daemon's limit (`limits.max_connections`).
    pub fn total(&self) -> usize {
        self.total
    }

    /// Connections open through the daemon now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a connection in: against `pod`'s limit when it comes from a
    /// local pod's outbound listener, and always against the daemon's.
    pub fn admit(self: &Arc<Self>, pod: Option<&Arc<PodConns>>) -> Result<Permit, Refusal> {
        if let Some(p) = pod {
            if !take(&p.open, self.per_pod) {
                let first = !p.refusing.swap(true, Ordering::Relaxed);
                return Err(Refusal {
                    limit: LimitExceeded::Pod {
                        limit: self.per_pod,
                    },
                    first,
                });
            }
        }
        if !take(&self.open, self.total) {
            if let Some(p) = pod {
                p.open.fetch_sub(1, Ordering::Relaxed);
            }
            let first = !self.refusing.swap(true, Ordering::Relaxed);
            return Err(Refusal {
                limit: LimitExceeded::Daemon { limit: self.total },
                first,
            });
        }
        if let Some(p) = pod {
            p.refusing.store(false, Ordering::Relaxed);
        }
        self.refusing.store(false, Ordering::Relaxed);
        Ok(Permit {
            limits: self.clone(),
            pod: pod.cloned(),
        })
    }
}

/// Adds one to `count` unless it is at `limit`.
fn take(count: &AtomicUsize, limit: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

/// One admitted connection; counted out when dropped.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    pod: Option<Arc<PodConns>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(p) = &self.pod {
            p.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_at_its_limit_is_refused_while_its_neighbour_is_admitted() {
        let limits = Arc::new(Limits::new(2, 10));
        let (noisy, quiet) = (Arc::new(PodConns::default()), Arc::new(PodConns::default()));
        let held: Vec<Permit> = (0..2)
            .map(|_| limits.admit(Some(&noisy)).expect("under the limit"))
            .collect();
        let refused = limits.admit(Some(&noisy)).expect_err("at the limit");
        assert_eq!(refused.limit, LimitExceeded::Pod { limit: 2 });
        assert!(refused.first, "the first refusal of a burst");
        let again = limits.admit(Some(&noisy)).expect_err("still at the limit");
        assert!(!again.first, "the rest of the burst is not first");
        let _q = limits
            .admit(Some(&quiet))
            .expect("the neighbour is admitted");
        assert_eq!((noisy.open(), quiet.open(), limits.open()), (2, 1, 3));
        drop(held);
        assert_eq!((noisy.open(), limits.open()), (0, 1));
        let _n = limits
            .admit(Some(&noisy))
            .expect("admitted once under the limit");
        let next = limits.admit(Some(&noisy));
        let _n2 = next.expect("two fit");
        let third = limits.admit(Some(&noisy)).expect_err("at the limit again");
        assert!(third.first, "a new burst after an admission warns again");
    }

    #[test]
    fn the_daemon_limit_counts_every_connection_and_gives_back_the_pods_count() {
        let limits = Arc::new(Limits::new(5, 3));
        let pod = Arc::new(PodConns::default());
        let a = limits.admit(Some(&pod)).expect("1");
        let _b = limits.admit(None).expect("2: no pod (a tunnel stream)");
        let _c = limits.admit(Some(&pod)).expect("3");
        let refused = limits.admit(Some(&pod)).expect_err("the daemon is full");
        assert_eq!(refused.limit, LimitExceeded::Daemon { limit: 3 });
        assert_eq!(refused.limit.label(), "daemon");
        assert_eq!(
            pod.open(),
            2,
            "a refused connection is not counted on its pod"
        );
        drop(a);
        let _d = limits.admit(None).expect("room again");
        assert_eq!(limits.open(), 3);
    }

    #[test]
    fn refusals_name_the_setting_to_change() {
        let pod = LimitExceeded::Pod { limit: 7 }.to_string();
        assert!(pod.contains("7 connections") && pod.contains("limits.max_connections_per_pod"));
        let daemon = LimitExceeded::Daemon { limit: 9 }.to_string();
        assert!(daemon.contains("limits.max_connections") && daemon.contains("raise"));
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_limit() {
        let limits = Arc::new(Limits::new(1_000, 50));
        let pod = Arc::new(PodConns::default());
        let held = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Ok(p) = limits.admit(Some(&pod)) {
                            held.lock().expect("lock").push(p);
                        }
                    }
                });
            }
        });
        assert_eq!(held.lock().expect("lock").len(), 50);
        assert_eq!((limits.open(), pod.open()), (50, 50));
    }
}
