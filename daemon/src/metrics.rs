//! Metric names, label sets and the Prometheus recorder.
//!
//! Owns every metric name the daemon exports (so dashboards and tests have one
//! place to look) and the [`Edge`] label set. Labels name **workloads, not
//! proxies**: source and destination namespace and workload, `tls`, `route`
//! and `reporter`. Cardinality is bounded by the number of workload pairs, and
//! idle series expire (see [`install`]).

use std::time::Duration;

use metrics::{Counter, Label};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Counter: proxied TCP connections opened.
pub const CONNECTIONS_OPENED: &str = "nodemesh_connections_opened_total";
/// Counter: proxied TCP connections closed (label `result`: ok, reset, error).
pub const CONNECTIONS_CLOSED: &str = "nodemesh_connections_closed_total";
/// Counter: bytes relayed; label `direction` = `src_to_dst` | `dst_to_src`.
pub const TCP_BYTES: &str = "nodemesh_tcp_bytes_total";
/// Histogram: connection duration, seconds.
pub const CONNECTION_DURATION: &str = "nodemesh_connection_duration_seconds";
/// Counter: connections refused before relaying; label `reason`.
pub const CONNECTIONS_FAILED: &str = "nodemesh_connections_failed_total";
/// Counter: connections refused or closed by zero-trust checks; labels
/// `reporter` (`destination`: decided here; `source`: the peer's `DENIED`
/// status as seen by L1) and `reason` (`unknown_source`, `source_not_on_peer`,
/// `identity_mismatch`, `policy_denied`, `policy_revoked`,
/// `plaintext_refused`; `other` for an unknown reason from a peer); at the
/// destination also the workload labels of the connection.
pub const DENIED: &str = "nodemesh_denied_total";
/// Gauge: open tunnel connections; labels `peer`, `direction` (`dialled`:
/// this node dialled it, `accepted`: the peer did). One connection per node
/// pair carries streams both ways, so summing `direction="dialled"` over all
/// nodes counts each connection once.
pub const TUNNELS_OPEN: &str = "nodemesh_tunnels_open";
/// Counter: duplicate tunnel connections (both nodes dialled each other at
/// once) this node dialled and closed once drained; label `peer`.
pub const TUNNEL_DUPLICATES_CLOSED: &str = "nodemesh_tunnel_duplicates_closed_total";
/// Counter: QUIC packets sent on tunnels to `peer` (quinn's path statistics,
/// exported at each scrape and when a connection closes).
pub const TUNNEL_PACKETS_SENT: &str = "nodemesh_tunnel_packets_sent_total";
/// Counter: QUIC packets to `peer` declared lost (the ratio to
/// `nodemesh_tunnel_packets_sent_total` is the tunnel's loss rate).
pub const TUNNEL_PACKETS_LOST: &str = "nodemesh_tunnel_packets_lost_total";
/// Counter: congestion events (window reductions) on tunnels to `peer`.
pub const TUNNEL_CONGESTION_EVENTS: &str = "nodemesh_tunnel_congestion_events_total";
/// Counter: UDP datagrams sent on tunnels to `peer` (with GSO each
/// segment counts).
pub const TUNNEL_UDP_DATAGRAMS_SENT: &str = "nodemesh_tunnel_udp_datagrams_sent_total";
/// Counter: UDP datagrams received on tunnels from `peer`.
pub const TUNNEL_UDP_DATAGRAMS_RECEIVED: &str = "nodemesh_tunnel_udp_datagrams_received_total";
/// Counter: `sendmsg` calls that sent the datagrams of tunnels to `peer`:
/// datagrams sent per call is the GSO batch.
pub const TUNNEL_UDP_SEND_CALLS: &str = "nodemesh_tunnel_udp_send_calls_total";
/// Gauge: smoothed round-trip time of the newest open tunnel to `peer` in
/// `direction`, seconds; 0 while none is open.
pub const TUNNEL_RTT: &str = "nodemesh_tunnel_rtt_seconds";
/// Gauge: its congestion window, bytes; 0 while none is open.
pub const TUNNEL_CWND: &str = "nodemesh_tunnel_congestion_window_bytes";
/// Gauge: its path MTU (largest UDP payload in use), bytes; 0 while none is open.
pub const TUNNEL_PATH_MTU: &str = "nodemesh_tunnel_path_mtu_bytes";
/// Counter: tunnel handshakes; labels `peer`, `side`, `result`.
pub const TUNNEL_HANDSHAKES: &str = "nodemesh_tunnel_handshakes_total";
/// Counter: tunnel peers refused during the handshake; labels `side`, `reason`
/// (emitted by `identity`).
pub const TUNNEL_PEER_REFUSED: &str = "nodemesh_tunnel_peer_refused_total";
/// Counter: tunnel streams rejected by L2 before relaying; labels `peer`, `status`.
pub const STREAMS_REJECTED: &str = "nodemesh_streams_rejected_total";
/// Gauge: pods registered on this node.
pub const PODS_REGISTERED: &str = "nodemesh_pods_registered";
/// Counter: pod registration requests; labels `op`, `result`.
pub const CNI_REQUESTS: &str = "nodemesh_cni_requests_total";
/// Counter: sysctls that could not be set in a pod's namespace at
/// registration (the pod is meshed all the same); label `sysctl`.
pub const POD_SYSCTL_FAILURES: &str = "nodemesh_pod_sysctl_failures_total";
/// Counter: pods whose return path (`client_address`) could not be
/// installed at registration; the mesh connects into them from their own
/// address.
pub const POD_RETURN_PATH_FAILURES: &str = "nodemesh_pod_return_path_failures_total";
/// Counter: discovery reloads; labels `source`, `result`.
pub const DISCOVERY_RELOADS: &str = "nodemesh_discovery_reloads_total";
/// Gauge: connections currently being relayed.
pub const CONNECTIONS_ACTIVE: &str = "nodemesh_connections_active";
/// Counter: service endpoints ejected after a connect failure; label `service`
/// (`namespace/name`).
pub const ENDPOINT_EJECTIONS: &str = "nodemesh_endpoint_ejections_total";
/// Counter: service connections retried on another endpoint after a connect
/// failure; label `service`.
pub const SERVICE_RETRIES: &str = "nodemesh_service_retries_total";
/// Counter: connections refused by an admission limit (`limits`); labels
/// `limit` (`pod`: the source pod's `limits.max_connections_per_pod`;
/// `daemon`: `limits.max_connections`), `listener` (`outbound`, `plaintext`,
/// `tunnel`), `namespace`, `workload` (the local pod: the source pod for
/// `outbound`, the destination pod for `plaintext` and `tunnel`).
pub const CONNECTIONS_LIMITED: &str = "nodemesh_connections_limited_total";
/// Gauge: bytes of relay buffers lent to connections now (at most
/// `limits.relay_buffer_memory_mib`), updated at each scrape.
pub const RELAY_BUFFER_BYTES: &str = "nodemesh_relay_buffer_bytes";
/// Counter: times a relay direction with data to move found the relay buffer
/// budget spent and moved it through a small buffer instead.
pub const RELAY_BUFFER_FALLBACKS: &str = "nodemesh_relay_buffer_fallbacks_total";

/// Counter: daemon hand-overs (zero-downtime upgrades, see `handover`);
/// labels `role` (`successor`: this daemon took over; `predecessor`: this
/// daemon handed over) and `result` (`ok`; `refused`; `successor_lost`: the
/// successor went away before taking over, the predecessor serves on;
/// `predecessor_lost`: the predecessor went away mid-way, the successor
/// serves alone).
pub const HANDOVER: &str = "nodemesh_handover_total";
/// Counter: tunnel connections a peer said are draining (`unavailable` /
/// `draining` status): taken out of the pool and the stream retried on a new
/// connection; label `peer`.
pub const TUNNELS_RETIRED: &str = "nodemesh_tunnels_retired_total";

// --- Traffic split (canary) and discovery objects ignored as invalid. ---

/// Counter: endpoint choices made for connections to a service with a
/// traffic split (`balancer`), by the chosen endpoint's group; labels
/// `service` (`namespace/name`) and `group` (the value of the split's label,
/// or `_unlisted` for an endpoint outside the split, chosen only when no
/// group of the split has a usable endpoint). A retry on another endpoint is
/// a second choice.
pub const SPLIT_PICKS: &str = "nodemesh_traffic_split_picks_total";
/// Counter: parts of Kubernetes objects discovery ignored as invalid while
/// keeping the rest of the object; label `kind` (`traffic_split`: a
/// Service's `nodemesh.io/split-*` annotations, the service is kept without a
/// split). Counted each time such an object version is received.
pub const DISCOVERY_INVALID: &str = "nodemesh_discovery_invalid_total";

/// Placeholder for an unknown namespace or workload.
pub const UNKNOWN: &str = "unknown";

/// Who reported a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The source node's daemon (L1).
    Source,
    /// The destination node's daemon (L2).
    Destination,
}

impl Reporter {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// How a connection was carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Over a tunnel to another node.
    Tunnel,
    /// Delivered on the same node.
    Local,
    /// To an unmeshed or off-cluster destination, unproxied.
    Passthrough,
    /// Plaintext inbound from an unmeshed client.
    Plaintext,
}

impl Route {
    /// The label of the route the registry resolved a destination to.
    pub fn of(route: &crate::registry::Route) -> Self {
        match route {
            crate::registry::Route::Local(_) => Self::Local,
            crate::registry::Route::Remote { .. } => Self::Tunnel,
            crate::registry::Route::Passthrough => Self::Passthrough,
        }
    }

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tunnel => "tunnel",
            Self::Local => "local",
            Self::Passthrough => "passthrough",
            Self::Plaintext => "plaintext",
        }
    }
}

/// The workload-level labels of one proxied connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// Who reports.
    pub reporter: Reporter,
    /// Source namespace.
    pub src_namespace: String,
    /// Source workload.
    pub src_workload: String,
    /// Destination namespace.
    pub dst_namespace: String,
    /// Destination workload.
    pub dst_workload: String,
    /// Whether the hop was mTLS.
    pub tls: bool,
    /// How it was carried.
    pub route: Route,
}

/// The counters of one connection, resolved once when it opens.
#[derive(Debug, Clone)]
pub struct EdgeCounters {
    /// Bytes source → destination.
    pub src_to_dst: Counter,
    /// Bytes destination → source.
    pub dst_to_src: Counter,
}

impl Edge {
    /// The label set.
    pub fn labels(&self) -> Vec<Label> {
        vec![
            Label::new("reporter", self.reporter.as_str()),
            Label::new("src_namespace", self.src_namespace.clone()),
            Label::new("src_workload", self.src_workload.clone()),
            Label::new("dst_namespace", self.dst_namespace.clone()),
            Label::new("dst_workload", self.dst_workload.clone()),
            Label::new("tls", if self.tls { "true" } else { "false" }),
            Label::new("route", self.route.as_str()),
        ]
    }

    /// Labels the connection with the route it takes (`tls` when over the
    /// tunnel).
    pub fn set_route(&mut self, route: &crate::registry::Route) {
        self.route = Route::of(route);
        self.tls = self.route == Route::Tunnel;
    }

    /// Counts the opening and returns the byte counters.
    pub fn opened(&self) -> EdgeCounters {
        self.count_opened();
        self.counters()
    }

    /// Counts the opening only (with [`Edge::counters`], for a connection
    /// whose bytes may flow before it is known to be admitted).
    pub fn count_opened(&self) {
        metrics::counter!(CONNECTIONS_OPENED, self.labels().iter()).increment(1);
    }

    /// The byte counters, without counting an opening.
    pub fn counters(&self) -> EdgeCounters {
        let labels = self.labels();
        let mut l = labels.clone();
        l.push(Label::new("direction", "src_to_dst"));
        let src_to_dst = metrics::counter!(TCP_BYTES, l.iter());
        let mut l = labels;
        l.push(Label::new("direction", "dst_to_src"));
        let dst_to_src = metrics::counter!(TCP_BYTES, l.iter());
        EdgeCounters {
            src_to_dst,
            dst_to_src,
        }
    }

    /// Counts the closing with its result (`ok`, `reset`, `error`) and
    /// duration, and writes its access log line (with `bytes` each way when
    /// known).
    pub fn closed(&self, result: &'static str, duration: Duration, bytes: Option<(u64, u64)>) {
        crate::access_log::record(
            self,
            crate::access_log::Outcome::Closed {
                result,
                duration,
                bytes,
            },
        );
        let labels = self.labels();
        metrics::histogram!(CONNECTION_DURATION, labels.iter()).record(duration.as_secs_f64());
        let mut l = labels;
        l.push(Label::new("result", result));
        metrics::counter!(CONNECTIONS_CLOSED, l.iter()).increment(1);
    }

    /// Counts a connection that failed before relaying, and writes its
    /// access log line.
    pub fn failed(&self, reason: &'static str) {
        crate::access_log::record(self, crate::access_log::Outcome::Failed { reason });
        let mut l = self.labels();
        l.push(Label::new("reason", reason));
        metrics::counter!(CONNECTIONS_FAILED, l.iter()).increment(1);
    }
}

/// Installs the global Prometheus recorder. Counters and histograms not
/// updated for `idle` are dropped, so series of departed workloads expire.
pub fn install(
    idle: Duration,
) -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .idle_timeout(
            MetricKindMask::COUNTER | MetricKindMask::HISTOGRAM,
            Some(idle),
        )
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(CONNECTION_DURATION.to_owned()),
            &[0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0],
        )?
        .install_recorder()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_labels_are_workload_labels() {
        let e = Edge {
            reporter: Reporter::Source,
            src_namespace: "a".into(),
            src_workload: "client".into(),
            dst_namespace: "b".into(),
            dst_workload: "server".into(),
            tls: true,
            route: Route::Tunnel,
        };
        let l: Vec<(String, String)> = e
            .labels()
            .iter()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        assert_eq!(
            l,
            [
                ("reporter", "source"),
                ("src_namespace", "a"),
                ("src_workload", "client"),
                ("dst_namespace", "b"),
                ("dst_workload", "server"),
                ("tls", "true"),
                ("route", "tunnel")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }
}
