//! L1 for connections to a Service's `ClusterIP:port`.
//!
//! Owns connecting a client to one of the service's endpoints: the balancer
//! (`balancer`) picks an endpoint, the endpoint's pod IP is routed like any
//! destination (local / tunnel / passthrough), and a connect failure (refused,
//! timed out, tunnel unavailable, L2 `CONNECT_FAILED`/`NO_ROUTE`/`UNAVAILABLE`)
//! ejects that endpoint and is retried **once** on another endpoint before the
//! client's connection is reset. Metrics label the destination workload by the
//! endpoint's pod; retries are counted in `nodemesh_service_retries_total`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tracing::{debug, info_span, warn, Instrument};

use crate::balancer::ServiceTarget;
use crate::metrics::{self as m, Edge, Reporter, Route as RouteLabel};
use crate::outbound::{fail, finish, relay_tcp};
use crate::outbound::{open_stream, Failure};
use crate::pods::LocalPod;
use crate::proxy::{Proxy, Workload};
use crate::registry::Route;
use crate::relay::{self, reset_tcp};
use crate::tunnel::StreamGuard;

/// Endpoints tried per client connection: the first pick and one retry.
pub const MAX_ATTEMPTS: usize = 2;

/// A connection to the chosen endpoint.
enum Connected {
    Tcp(TcpStream),
    /// The guard counts the stream open on its tunnel.
    Stream(SendStream, RecvStream, StreamGuard),
}

/// Serves one client connection whose original destination `dst` is the
/// service port `service`.
pub async fn handle(
    proxy: &Proxy,
    pod: &LocalPod,
    tcp: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    service: Arc<ServiceTarget>,
) {
    let src = proxy.workload_of(pod);
    let span = tracing::Span::current();
    span.record("server.addr", tracing::field::display(dst));
    let mut edge = edge_to(&src, &service);
    let balancer = proxy.registry.services();
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(MAX_ATTEMPTS);
    let mut last: Option<Failure> = None;
    for attempt in 0..MAX_ATTEMPTS {
        let Some(lease) = balancer.pick(&service, &tried) else {
            break;
        };
        if attempt > 0 {
            metrics::counter!(m::SERVICE_RETRIES, "service" => service.service.to_string())
                .increment(1);
        }
        let endpoint = lease.backend().addr;
        let (dst_namespace, dst_workload) = proxy.describe_ip(endpoint.ip());
        match (&lease.backend().pod, dst_workload == m::UNKNOWN) {
            // Not a pod discovery knows: name it by the endpoint's targetRef.
            (Some(pod), true) => {
                edge.dst_namespace = service.namespace.clone();
                edge.dst_workload = pod.clone();
            }
            _ => {
                edge.dst_namespace = dst_namespace;
                edge.dst_workload = dst_workload;
            }
        }
        let attempt_span =
            info_span!("endpoint", service = %service.service, endpoint = %endpoint, attempt);
        match connect(proxy, pod, &src, client, endpoint, &mut edge)
            .instrument(attempt_span)
            .await
        {
            Ok(conn) => {
                lease.succeeded();
                let started = Instant::now();
                match conn {
                    Connected::Tcp(server) => relay_tcp(&edge, tcp, server).await,
                    Connected::Stream(send, recv, _stream) => {
                        let counters = edge.opened();
                        let res = relay::tcp_quic(
                            tcp,
                            send,
                            recv,
                            counters.src_to_dst,
                            counters.dst_to_src,
                        )
                        .await;
                        finish(&edge, started, res);
                    }
                }
                // The lease (in flight) ends with the relay.
                drop(lease);
                return;
            }
            Err(f) if f.retryable => {
                debug!(service = %service.service, endpoint = %endpoint, reason = f.reason, error = %f.error, "endpoint connect failed");
                lease.failed();
                tried.push(endpoint);
                last = Some(f);
            }
            Err(f) => return fail(&edge, tcp, f.reason, &f.error),
        }
    }
    match last {
        Some(f) => fail(&edge, tcp, f.reason, &f.error),
        None => {
            warn!(service = %service.service, "no ready endpoint; resetting client");
            edge.failed("no_endpoints");
            reset_tcp(tcp);
        }
    }
}

/// The labels of a connection from the local workload `src` to `service`
/// before an endpoint is picked (its workload `unknown`, its route not known
/// yet).
pub(crate) fn edge_to(src: &Workload, service: &ServiceTarget) -> Edge {
    Edge {
        reporter: Reporter::Source,
        src_namespace: src.namespace.clone(),
        src_workload: src.workload.clone(),
        dst_namespace: service.namespace.clone(),
        dst_workload: m::UNKNOWN.to_owned(),
        tls: false,
        route: RouteLabel::Passthrough,
    }
}

/// Connects to `endpoint` along its route; sets `edge.route`/`edge.tls`.
async fn connect(
    proxy: &Proxy,
    pod: &LocalPod,
    src: &Workload,
    client: SocketAddr,
    endpoint: SocketAddr,
    edge: &mut Edge,
) -> Result<Connected, Failure> {
    let route = proxy.registry.resolve(endpoint.ip());
    edge.set_route(&route);
    let connected = match route {
        Route::Local(dst_pod) => proxy.connect_into(&dst_pod, client.ip(), endpoint).await,
        Route::Passthrough => proxy.connect(&pod.netns, endpoint).await,
        Route::Remote { node, addr } => {
            return open_stream(proxy, src, client, endpoint, &node, addr)
                .instrument(info_span!("tunnel", peer.node = %node))
                .await
                .map(|(s, r, g)| Connected::Stream(s, r, g));
        }
    };
    connected
        .map(Connected::Tcp)
        .map_err(|e| Failure::retryable("connect_failed", e))
}
