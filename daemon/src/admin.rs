//! The admin HTTP server and the daemon's readiness.
//!
//! Endpoints (plain HTTP/1.1, default `0.0.0.0:15020`):
//! - `GET /metrics`: Prometheus text exposition.
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /ready`: 200 `ready` once credentials, tunnel, CNI socket and the
//!   first discovery sync are in place and the daemon is not draining nor
//!   handing over (`handover: successor starting (pid N)`); otherwise 503
//!   with one reason per line.
//! - `GET /config_dump`: JSON of the node, its registered pods (each with
//!   its open outbound connections), its tunnels (each pooled connection:
//!   peer, who dialled it, state, open streams), its hand-over state
//!   (`handover`: `pid`, `cid_tag`, `phase`, `peer_pid`) and its admission
//!   limits with their use now (`limits`).
//!
//! Owns [`Readiness`], the flags those conditions are read from.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::handover;
use crate::registry::Registry;
use crate::tunnel::{TunnelInfo, Tunnels};

/// What the daemon still lacks before it is ready.
#[derive(Debug, Default)]
pub struct Readiness {
    tunnel: AtomicBool,
    cni: AtomicBool,
    discovery: AtomicBool,
    draining: AtomicBool,
    discovery_error: Mutex<Option<String>>,
    credentials_error: Mutex<Option<String>>,
    handover: Mutex<Option<String>>,
    synced: tokio::sync::Notify,
}

impl Readiness {
    /// The tunnel endpoint is bound.
    pub fn mark_tunnel(&self) {
        self.tunnel.store(true, Ordering::SeqCst);
    }
    /// The CNI socket is listening and registrations were restored.
    pub fn mark_cni(&self) {
        self.cni.store(true, Ordering::SeqCst);
    }
    /// Discovery applied a first good model.
    pub fn mark_discovery_synced(&self) {
        self.discovery.store(true, Ordering::SeqCst);
        self.synced.notify_waiters();
    }
    /// Resolves once discovery has synced once.
    pub async fn discovery_synced_wait(&self) {
        loop {
            let notified = self.synced.notified();
            if self.discovery_synced() {
                return;
            }
            notified.await;
        }
    }
    /// A hand-over makes this daemon unfit to be reported ready: a successor
    /// is starting (its readiness probes land here too), or this daemon has
    /// handed over. `None` clears it.
    pub fn set_handover(&self, reason: Option<String>) {
        if let Ok(mut g) = self.handover.lock() {
            *g = reason;
        }
    }
    /// Whether discovery has synced once.
    pub fn discovery_synced(&self) -> bool {
        self.discovery.load(Ordering::SeqCst)
    }
    /// The last discovery error, if any (reported while not yet synced).
    pub fn set_discovery_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.discovery_error.lock() {
            *g = e;
        }
    }
    /// A credentials problem that makes the daemon unfit to serve.
    pub fn set_credentials_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.credentials_error.lock() {
            *g = e;
        }
    }
    /// Shutdown has begun.
    pub fn mark_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Empty when ready; else why not, one reason each.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut r = Vec::new();
        if self.draining.load(Ordering::SeqCst) {
            r.push("draining: the daemon is shutting down".to_owned());
        }
        if let Ok(g) = self.handover.lock() {
            if let Some(reason) = g.as_ref() {
                r.push(format!("handover: {reason}"));
            }
        }
        if let Ok(g) = self.credentials_error.lock() {
            if let Some(e) = g.as_ref() {
                r.push(format!("credentials: {e}"));
            }
        }
        if !self.tunnel.load(Ordering::SeqCst) {
            r.push("tunnel: endpoint not bound yet".to_owned());
        }
        if !self.cni.load(Ordering::SeqCst) {
            r.push("cni: registration socket not listening yet".to_owned());
        }
        if !self.discovery.load(Ordering::SeqCst) {
            let detail = self
                .discovery_error
                .lock()
                .ok()
                .and_then(|g| g.clone())
                .unwrap_or_else(|| "no model loaded yet".to_owned());
            r.push(format!("discovery: {detail}"));
        }
        r
    }
}

/// What the admin server reads.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Metrics.
    pub metrics: PrometheusHandle,
    /// Readiness.
    pub ready: Arc<Readiness>,
    /// Registry, for `/config_dump`.
    pub registry: Arc<Registry>,
    /// Tunnel pool, for `/config_dump`.
    pub tunnels: Arc<Tunnels>,
    /// Hand-over state, for `/config_dump`.
    pub handover: Arc<handover::Status>,
    /// Admission limits, for `/config_dump`.
    pub limits: Arc<crate::limits::Limits>,
}

/// Serves the admin endpoints on `listener` until `shutdown`, or until
/// `hand_off`: then new connections are steered to the successor's admin
/// listener, this one lingers and closes (see `reuseport::hand_off`).
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
    hand_off: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hand_off.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => serve_connection(stream, peer, state.clone()),
            Err(e) => warn!(error = %e, "admin accept failed"),
        }
    }
    crate::reuseport::hand_off(listener, handover::LISTENER_LINGER, |stream, peer| {
        serve_connection(stream, peer, state.clone())
    })
    .await;
    tracing::info!("admin listener handed over and closed");
}

fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, state: AdminState) {
    let from_node = from_this_node(peer, stream.local_addr().ok());
    tokio::spawn(async move {
        let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
            let state = state.clone();
            async move {
                let resp = if req.method() == Method::POST && req.uri().path() == "/log_level" {
                    set_log_level(req, from_node).await
                } else {
                    route(&state, req)
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        if let Err(e) = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await
        {
            debug!(%peer, error = %e, "admin connection error");
        }
    });
}

/// Whether a client at `peer` runs on this node: loopback, or the address
/// it connected to (with `hostNetwork`, the node's own address). Pods, even
/// on this node, connect from their own addresses.
fn from_this_node(peer: SocketAddr, local: Option<SocketAddr>) -> bool {
    peer.ip().is_loopback() || local.is_some_and(|l| l.ip() == peer.ip())
}

/// `POST /log_level`: the body is the new log filter (`log_control`).
/// Accepted only from the node itself ([`from_this_node`]): the admin port
/// is reachable from the pod network, and a `trace` filter is a flood.
async fn set_log_level<B>(req: Request<B>, from_node: bool) -> Response<Full<Bytes>>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    const PLAIN: &str = "text/plain; charset=utf-8";
    if !from_node {
        return text(
            StatusCode::FORBIDDEN,
            "the log filter is changed only from the node itself (loopback or the node's own \
             address): kubectl exec into the daemon's pod and run `nodemesh log-level <filter>`\n",
            PLAIN,
        );
    }
    let limited = http_body_util::Limited::new(req.into_body(), crate::log_control::MAX_FILTER_LEN);
    let body = match limited.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "cannot read the filter (at most {} bytes): {e}\n",
                    crate::log_control::MAX_FILTER_LEN
                ),
                PLAIN,
            )
        }
    };
    let Ok(filter) = std::str::from_utf8(&body) else {
        return text(StatusCode::BAD_REQUEST, "the filter is not UTF-8\n", PLAIN);
    };
    match crate::log_control::set(filter) {
        Ok(previous) => text(
            StatusCode::OK,
            format!("log filter: {} (was: {previous})\n", filter.trim()),
            PLAIN,
        ),
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n"), PLAIN),
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn route<B>(state: &AdminState, req: Request<B>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET, and POST /log_level\n",
            PLAIN,
        );
    }
    match req.uri().path() {
        "/metrics" => {
            state.tunnels.export_path_stats();
            crate::relay::export_buffer_metrics();
            let mut page = state.metrics.render();
            crate::process_metrics::render_host(&mut page);
            text(StatusCode::OK, page, "text/plain; version=0.0.4")
        }
        "/healthz" => text(StatusCode::OK, "ok\n", PLAIN),
        "/ready" => {
            let reasons = state.ready.not_ready_reasons();
            if reasons.is_empty() {
                text(StatusCode::OK, "ready\n", PLAIN)
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    reasons.join("\n") + "\n",
                    PLAIN,
                )
            }
        }
        "/config_dump" => text(StatusCode::OK, config_dump(state), "application/json"),
        "/debug/tunnels" => text(
            StatusCode::OK,
            tunnels_json(&state.tunnels.snapshot()).to_string(),
            "application/json",
        ),
        "/log_level" => text(
            StatusCode::OK,
            crate::log_control::current().unwrap_or_default() + "\n",
            PLAIN,
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; endpoints: /metrics /healthz /ready /config_dump /debug/tunnels \
             /log_level (GET; POST from the node to change it)\n",
            PLAIN,
        ),
    }
}

fn config_dump(state: &AdminState) -> String {
    let (registry, limits) = (&state.registry, &state.limits);
    let snap = registry.snapshot();
    let (nodes, pod_ips) = snap.counts();
    let pods: Vec<serde_json::Value> = registry
        .locals()
        .iter()
        .map(|p| {
            serde_json::json!({
                "container_id": p.container_id,
                "namespace": p.namespace,
                "name": p.name,
                "ips": p.ips,
                "netns": p.netns.path(),
                "client_address": p.client_address,
                "open_connections": p.conns.open(),
            })
        })
        .collect();
    serde_json::json!({
        "node": registry.node_name(),
        "discovery": {"generation": snap.generation, "nodes": nodes, "pod_ips": pod_ips},
        "local_pods": pods,
        "tunnels": tunnels_json(&state.tunnels.snapshot()),
        "handover": state.handover.to_json(),
        "limits": limits_json(limits),
    })
    .to_string()
}

/// The admission limits and the relay buffer budget, with their use now.
fn limits_json(limits: &crate::limits::Limits) -> serde_json::Value {
    let (lent, budget) = crate::relay::buffer_use();
    serde_json::json!({
        "max_connections_per_pod": limits.per_pod(),
        "max_connections": limits.total(),
        "open_connections": limits.open(),
        "relay_buffer_bytes": lent,
        "relay_buffer_budget_bytes": budget,
    })
}

fn tunnels_json(tunnels: &[TunnelInfo]) -> serde_json::Value {
    tunnels
        .iter()
        .map(|t| {
            serde_json::json!({
                "peer": t.peer,
                "id": t.id,
                "direction": t.direction.as_str(),
                "dialled_by": t.dialled_by,
                "remote_addr": t.remote_addr.to_string(),
                "shared": t.shared,
                "state": t.state,
                "open_streams": t.open_streams,
                "path": {
                    "rtt_us": t.path.rtt.as_micros(),
                    "congestion_window": t.path.cwnd,
                    "mtu": t.path.mtu,
                    "packets_sent": t.path.totals.sent_packets,
                    "packets_lost": t.path.totals.lost_packets,
                    "congestion_events": t.path.totals.congestion_events,
                    "udp_datagrams_sent": t.path.totals.tx_datagrams,
                    "udp_send_calls": t.path.totals.tx_ios,
                    "udp_datagrams_received": t.path.totals.rx_datagrams,
                },
            })
        })
        .collect()
}

/// Binds the admin listener, with `SO_REUSEPORT` so that a successor daemon
/// can bind beside this one during a hand-over.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::reuseport::tcp_listener(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_node_itself_may_change_the_log_filter() {
        let node: SocketAddr = "10.77.0.1:15020".parse().expect("addr");
        let at = |peer: &str| from_this_node(peer.parse().expect("addr"), Some(node));
        assert!(at("127.0.0.1:40000"));
        assert!(at("[::1]:40000"));
        assert!(at("10.77.0.1:40000"), "the node's own address");
        assert!(!at("10.78.1.2:40000"), "a pod");
        assert!(!at("10.77.0.2:40000"), "another node");
        assert!(!from_this_node("10.77.0.1:1".parse().expect("addr"), None));
    }

    #[tokio::test]
    async fn a_log_level_post_from_elsewhere_is_forbidden_and_a_bad_filter_refused() {
        let req = |body: &'static str| {
            Request::post("/log_level")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("request")
        };
        let r = set_log_level(req("debug"), false).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = set_log_level(req("info,=x="), true).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = set_log_level(req(&*"a".repeat(2000).leak()), true).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn readiness_lists_what_is_missing() {
        let r = Readiness::default();
        assert_eq!(r.not_ready_reasons().len(), 3);
        r.mark_tunnel();
        r.mark_cni();
        r.set_discovery_error(Some("discovery file x: bad".into()));
        assert_eq!(
            r.not_ready_reasons(),
            vec!["discovery: discovery file x: bad".to_owned()]
        );
        r.mark_discovery_synced();
        assert!(r.not_ready_reasons().is_empty());
        r.mark_draining();
        assert_eq!(r.not_ready_reasons().len(), 1);
    }

    #[test]
    fn tunnels_list_who_dialled_each_connection_and_its_streams() {
        let t = TunnelInfo {
            peer: "n2".into(),
            id: 7,
            direction: crate::tunnel::Direction::Accepted,
            dialled_by: "n2".into(),
            remote_addr: SocketAddr::from(([10, 77, 0, 2], 15008)),
            shared: true,
            open_streams: 3,
            state: "in_use",
            path: crate::tunnel::PathInfo {
                rtt: std::time::Duration::from_micros(250),
                cwnd: 1 << 20,
                mtu: 1452,
                totals: crate::tunnel::Totals {
                    sent_packets: 100,
                    lost_packets: 1,
                    congestion_events: 1,
                    tx_datagrams: 100,
                    tx_ios: 5,
                    rx_datagrams: 40,
                },
            },
        };
        assert_eq!(
            tunnels_json(&[t]),
            serde_json::json!([{
                "peer": "n2", "id": 7, "direction": "accepted", "dialled_by": "n2",
                "remote_addr": "10.77.0.2:15008", "shared": true, "state": "in_use",
                "open_streams": 3,
                "path": {
                    "rtt_us": 250, "congestion_window": 1048576, "mtu": 1452,
                    "packets_sent": 100, "packets_lost": 1, "congestion_events": 1,
                    "udp_datagrams_sent": 100, "udp_send_calls": 5,
                    "udp_datagrams_received": 40,
                },
            }])
        );
    }
}
