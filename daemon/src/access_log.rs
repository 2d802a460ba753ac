//! Access logs: one line per proxied connection, when `access_log` is on.
//!
//! Owns the switch and the line's shape. Each daemon that handles a
//! connection writes one line when it ends — the source node's daemon
//! (`reporter="source"`, L1) and the destination node's
//! (`reporter="destination"`, L2) — at INFO on the tracing target
//! `nodemesh::access`, so the log filter and `log_format` apply to it as to
//! every other line (`json`: one JSON object per line). The fields are the
//! connection's workload labels (as in the metrics), its `result` (`ok`,
//! `error`, `reset`, or `failed` with the `reason` it failed before relaying,
//! `connection_limit` for one an admission limit refused at accept),
//! its duration and its bytes each way; the line is written inside the
//! connection's span, so the client and server addresses, the peer node and
//! the verified source identity come with it.
//!
//! Off by default: writing a line is a system call per connection on the
//! data path (see docs/operations.md, "Access logs").

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::info;

use crate::metrics::Edge;

/// The tracing target of access log lines.
pub const TARGET: &str = "nodemesh::access";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns access logs on or off (config `access_log`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether access logs are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How a connection ended, for its access log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Relayed, then closed with `result` after `duration`; bytes each way
    /// when the relay finished cleanly.
    Closed {
        /// `ok`, `error` or `reset`.
        result: &'static str,
        /// From the start of the relay.
        duration: Duration,
        /// Bytes source → destination and back.
        bytes: Option<(u64, u64)>,
    },
    /// Failed before relaying.
    Failed {
        /// The `reason` label of `nodemesh_connections_failed_total`.
        reason: &'static str,
    },
}

/// Writes `edge`'s access log line, if access logs are on.
pub fn record(edge: &Edge, outcome: Outcome) {
    if !enabled() {
        return;
    }
    let (result, reason, duration_ms, bytes) = match outcome {
        Outcome::Closed {
            result,
            duration,
            bytes,
        } => (result, "", duration.as_secs_f64() * 1e3, bytes),
        Outcome::Failed { reason } => ("failed", reason, 0.0, None),
    };
    let (up, down) = bytes.unwrap_or_default();
    info!(
        target: TARGET,
        reporter = edge.reporter.as_str(),
        src_namespace = %edge.src_namespace,
        src_workload = %edge.src_workload,
        dst_namespace = %edge.dst_namespace,
        dst_workload = %edge.dst_workload,
        tls = edge.tls,
        route = edge.route.as_str(),
        result,
        reason,
        duration_ms,
        bytes_src_to_dst = up,
        bytes_dst_to_src = down,
        "connection"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Reporter, Route};

    fn edge() -> Edge {
        Edge {
            reporter: Reporter::Destination,
            src_namespace: "shop".into(),
            src_workload: "web".into(),
            dst_namespace: "shop".into(),
            dst_workload: "db".into(),
            tls: true,
            route: Route::Tunnel,
        }
    }

    /// The JSON lines `f` writes with access logs `on`.
    fn lines(on: bool, f: impl FnOnce()) -> Vec<serde_json::Value> {
        let (out, subscriber) = crate::test_log::Captured::json();
        set_enabled(on);
        tracing::subscriber::with_default(subscriber, f);
        set_enabled(false);
        let text = out.output();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    // One test, so that no other test of this module sees the switch on.
    #[test]
    fn one_json_line_per_connection_with_its_labels_result_and_bytes_only_when_on() {
        let closed = Outcome::Closed {
            result: "ok",
            duration: Duration::from_millis(1500),
            bytes: Some((10, 20)),
        };
        assert!(lines(false, || record(&edge(), closed)).is_empty());
        let got = lines(true, || {
            record(&edge(), closed);
            record(
                &edge(),
                Outcome::Failed {
                    reason: "policy_denied",
                },
            );
        });
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["target"], TARGET);
        assert_eq!(got[0]["level"], "INFO");
        let f = &got[0]["fields"];
        assert_eq!(f["message"], "connection");
        assert_eq!(f["reporter"], "destination");
        assert_eq!(f["src_workload"], "web");
        assert_eq!(f["dst_workload"], "db");
        assert_eq!(f["tls"], true);
        assert_eq!(f["route"], "tunnel");
        assert_eq!(f["result"], "ok");
        assert_eq!(f["duration_ms"], 1500.0);
        assert_eq!(f["bytes_src_to_dst"], 10);
        assert_eq!(f["bytes_dst_to_src"], 20);
        let f = &got[1]["fields"];
        assert_eq!(f["result"], "failed");
        assert_eq!(f["reason"], "policy_denied");
    }
}
