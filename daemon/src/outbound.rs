//! L1: the outbound path of a local pod.
//!
//! Owns the accept loop of a pod's outbound listener (`127.0.0.1:15001` in the
//! pod) and what happens to each accepted connection: read the original
//! destination, resolve it, then deliver locally, tunnel to the peer node, or
//! pass through from a socket made in the source pod. The source pod is known
//! from the listener that accepted, never from an address. A failure before
//! relaying resets the client's connection, so the app sees an error.

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Instant;

use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tracing::{debug, info_span, warn, Instrument};

use crate::metrics::{self as m, Edge, Reporter, Route as RouteLabel};
use crate::netns::{original_dst, set_nodelay};
use crate::pods::LocalPod;
use crate::proxy::{Proxy, Workload, REASON_DRAINING};
use crate::registry::Route;
use crate::relay::{self, reset_tcp, RelayError, RelayStats};
use crate::tunnel::header::{read_status, StatusCode, StreamHeader};
use crate::tunnel::{reset_code, Lease, StreamGuard};
use crate::{inbound, policy};

/// Serves one connection accepted on a pod's outbound listener.
pub(crate) async fn handle(proxy: &Proxy, pod: &LocalPod, tcp: TcpStream, client: SocketAddr) {
    let _guard = proxy.tracker.track();
    set_nodelay(&tcp);
    let dst = match original_dst(&tcp) {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "no original destination; resetting");
            reset_tcp(tcp);
            return;
        }
    };
    if dst.ip().is_loopback() && dst.port() == proxy.outbound_port {
        warn!(server.addr = %dst, "connection made straight to the outbound listener; resetting");
        reset_tcp(tcp);
        return;
    }
    if let Some(service) = proxy.registry.services().lookup(dst) {
        // A ClusterIP: balanced across the service's endpoints, with a retry.
        return Box::pin(crate::outbound_service::handle(
            proxy, pod, tcp, client, dst, service,
        ))
        .await;
    }
    let src = proxy.workload_of(pod);
    let route = proxy.registry.resolve(dst.ip());
    let edge = edge_to(proxy, &src, dst, &route);
    tracing::Span::current().record("server.addr", tracing::field::display(dst));
    // Each route's future is boxed: the connection's task then holds only
    // the state of the route it took (sized exactly), not the largest of all
    // of them for the whole life of the connection.
    match route {
        Route::Local(dst_pod) => {
            // This node is L2 too: the same policy applies.
            let live = match inbound::admit_local(proxy, &edge, pod, client, &dst_pod, dst) {
                Ok(l) => l,
                Err(reason) => return fail(&edge, tcp, reason, &"refused by policy"),
            };
            Box::pin(async {
                match proxy.connect_into(&dst_pod, client.ip(), dst).await {
                    Ok(server) => inbound::relay_local(&edge, &dst_pod, tcp, server, live).await,
                    Err(e) => fail(&edge, tcp, "connect_failed", &e),
                }
            })
            .await
        }
        Route::Passthrough => {
            Box::pin(async {
                match proxy.connect(&pod.netns, dst).await {
                    Ok(server) => relay_tcp(&edge, tcp, server).await,
                    Err(e) => fail(&edge, tcp, "connect_failed", &e),
                }
            })
            .await
        }
        Route::Remote { node, addr } => {
            Box::pin(
                tunnel(proxy, &edge, &src, tcp, client, dst, &node, addr)
                    .instrument(info_span!("tunnel", peer.node = %node)),
            )
            .await
        }
    }
}

/// The labels of a connection from the local workload `src` to `dst` (not a
/// Service) along `route`.
pub(crate) fn edge_to(proxy: &Proxy, src: &Workload, dst: SocketAddr, route: &Route) -> Edge {
    let (dst_namespace, dst_workload) = proxy.describe_ip(dst.ip());
    let mut edge = Edge {
        reporter: Reporter::Source,
        src_namespace: src.namespace.clone(),
        src_workload: src.workload.clone(),
        dst_namespace,
        dst_workload,
        tls: false,
        route: RouteLabel::Passthrough,
    };
    edge.set_route(route);
    edge
}

/// Tunnels a connection to a pod on another node. The header goes out in
/// one stream write with whatever the client has already sent (at most
/// [`FIRST_WRITE`] bytes, typically its whole request), so a small request
/// reaches L2 in the header's packet: no round trip is spent on the status
/// before it. Further client bytes wait for L2's `ok`, so the first write is
/// all there is to replay when the stream is retried on a new tunnel.
///
/// Not an `async fn`, so that the connection's task keeps its arguments once
/// (see [`relay::tcp_quic`]).
#[allow(clippy::too_many_arguments)]
#[allow(clippy::manual_async_fn)] // on purpose: see the doc
fn tunnel<'a>(
    proxy: &'a Proxy,
    edge: &'a Edge,
    src: &'a Workload,
    tcp: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    node: &'a str,
    addr: SocketAddr,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    async move {
        let opened = open_stream_with(proxy, src, client, dst, node, addr, Some(&tcp)).await;
        let (send, recv, _stream, early) = match opened {
            Ok(s) => s,
            Err(f) => return fail(edge, tcp, f.reason, &f.error),
        };
        let counters = edge.opened();
        counters.src_to_dst.increment(early);
        let started = Instant::now();
        let res = relay::tcp_quic(tcp, send, recv, counters.src_to_dst, counters.dst_to_src)
            .await
            .map(|mut stats| {
                // The client's first bytes went out with the header.
                stats.a_to_b += early;
                stats
            });
        finish(edge, started, res);
    }
}

/// Appends to `buf`, without waiting, what the client has already sent (up
/// to [`FIRST_WRITE`] bytes). EOF and "nothing yet" append nothing: the
/// relay sees them next. Errors are the client's (a reset).
///
/// The bytes are read into a scratch array on the thread's stack and `buf`
/// grows by exactly what arrived: `buf` lives until L2's status (it is what
/// a retry replays), and with many connections opening at once a
/// fixed-capacity buffer per connection would be that many pages touched
/// for clients that have sent nothing yet.
fn read_ready(tcp: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut scratch = [0u8; FIRST_WRITE];
    match tcp.try_read(&mut scratch) {
        Ok(n) => {
            buf.reserve_exact(n);
            buf.extend_from_slice(&scratch[..n]);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why connecting to an endpoint failed.
pub(crate) struct Failure {
    /// `reason` label of `nodemesh_connections_failed_total`.
    pub(crate) reason: &'static str,
    /// Whether another endpoint may do better.
    pub(crate) retryable: bool,
    pub(crate) error: String,
}

impl Failure {
    pub(crate) fn retryable(reason: &'static str, error: impl Display) -> Self {
        Self {
            reason,
            retryable: true,
            error: error.to_string(),
        }
    }

    pub(crate) fn fatal(reason: &'static str, error: impl Display) -> Self {
        Self {
            reason,
            retryable: false,
            error: error.to_string(),
        }
    }
}

/// Opens a tunnel stream to `dst` on peer `node` and waits for L2's status.
///
/// When the pooled tunnel connection turns out to be going away — L2
/// answers `unavailable` with reason `draining` (its daemon is shutting down
/// or has handed over to a successor), or the connection is closed under
/// the stream — that connection is retired and the stream is retried once on
/// a new connection. Of the client's bytes only the first write went out
/// before the status (see [`open_stream_with`]); the retry sends it again, so
/// it is invisible to the client.
///
/// The guard counts the stream open on its tunnel: hold it until the relay ends.
pub(crate) async fn open_stream(
    proxy: &Proxy,
    src: &Workload,
    client: SocketAddr,
    dst: SocketAddr,
    node: &str,
    addr: SocketAddr,
) -> Result<(SendStream, RecvStream, StreamGuard), Failure> {
    open_stream_with(proxy, src, client, dst, node, addr, None)
        .await
        .map(|(send, recv, guard, _)| (send, recv, guard))
}

/// Bytes of client data the first stream write may carry after the header.
const FIRST_WRITE: usize = 4096;

/// [`open_stream`], with the header's write also carrying what `first_from`
/// (the client) has already sent, up to [`FIRST_WRITE`] bytes; returns how
/// many client bytes went out that way (sent again on a retry).
#[allow(clippy::too_many_arguments)]
async fn open_stream_with(
    proxy: &Proxy,
    src: &Workload,
    client: SocketAddr,
    dst: SocketAddr,
    node: &str,
    addr: SocketAddr,
    first_from: Option<&TcpStream>,
) -> Result<(SendStream, RecvStream, StreamGuard, u64), Failure> {
    let header = StreamHeader {
        dst,
        src: client,
        src_identity: src.identity.clone(),
        flags: 0,
        trace_id: None,
    };
    let mut buf = Vec::with_capacity(header.encoded_len());
    header
        .encode(&mut buf)
        .map_err(|e| Failure::fatal("bad_header", e))?;
    let header_len = buf.len();
    let mut retried = false;
    loop {
        let lease = proxy
            .tunnels
            .connection(node, addr)
            .await
            .map_err(|e| Failure::retryable("tunnel_unavailable", e))?;
        let conn = lease.connection().clone();
        // A retry replays what the first try read; it reads no more.
        let client = if retried { None } else { first_from };
        match attempt(proxy, lease, &mut buf, client).await {
            Attempt::Open(send, recv, guard) => {
                return Ok((send, recv, guard, (buf.len() - header_len) as u64))
            }
            Attempt::GoingAway(why) if !retried => {
                debug!(why, "tunnel going away; retrying the stream on a new one");
                proxy.tunnels.retire(node, &conn);
                retried = true;
            }
            Attempt::GoingAway(why) => {
                return Err(Failure::retryable(
                    "tunnel_unavailable",
                    format_args!("{why}, twice"),
                ))
            }
            Attempt::Failed(f) => return Err(f),
        }
    }
}

/// How one try at opening a stream went.
enum Attempt {
    /// L2 answered `ok`.
    Open(SendStream, RecvStream, StreamGuard),
    /// The connection takes no new streams; another one may.
    GoingAway(&'static str),
    /// Anything else.
    Failed(Failure),
}

/// One try: open a stream on `lease`, write `first` (the header, then what
/// the client has sent by now), read the status.
async fn attempt(
    proxy: &Proxy,
    lease: Lease,
    first: &mut Vec<u8>,
    client: Option<&TcpStream>,
) -> Attempt {
    // Opening waits for stream credit when the peer's `tunnel.max_streams`
    // are all in use: bounded, like a connect.
    let (mut send, mut recv, guard) =
        match tokio::time::timeout(proxy.connect_timeout, lease.open_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return Attempt::GoingAway("tunnel connection closed"),
            Err(_) => {
                return Attempt::Failed(Failure::retryable(
                    "tunnel_streams_exhausted",
                    "every stream the peer allows on the tunnel (its tunnel.max_streams) stayed in use for connect_timeout_ms",
                ))
            }
        };
    if let Some(tcp) = client {
        if let Err(e) = read_ready(tcp, first) {
            let _ = send.reset(reset_code(StatusCode::Internal));
            return Attempt::Failed(Failure::fatal("client_reset", e));
        }
    }
    match send.write_all(first).await {
        Ok(()) => {}
        Err(quinn::WriteError::ConnectionLost(_)) => {
            return Attempt::GoingAway("tunnel connection closed")
        }
        Err(e) => return Attempt::Failed(Failure::retryable("tunnel_unavailable", e)),
    }
    let status = match tokio::time::timeout(proxy.connect_timeout * 2, read_status(&mut recv)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Attempt::Failed(Failure::fatal("bad_status", e)),
        Err(_) => {
            let _ = send.reset(reset_code(StatusCode::Internal));
            return Attempt::Failed(Failure::retryable(
                "status_timeout",
                "no status from the peer in time",
            ));
        }
    };
    if status.code == StatusCode::Denied {
        metrics::counter!(m::DENIED, "reporter" => "source", "reason" => policy::reason_label(&status.reason))
            .increment(1);
    }
    match status.code {
        StatusCode::Ok => Attempt::Open(send, recv, guard),
        StatusCode::Unavailable if status.reason == REASON_DRAINING => {
            Attempt::GoingAway("peer is draining the tunnel")
        }
        code @ (StatusCode::ConnectFailed | StatusCode::NoRoute | StatusCode::Unavailable) => {
            Attempt::Failed(Failure::retryable(
                code.as_str(),
                format_args!("peer: {} {}", code.as_str(), status.reason),
            ))
        }
        code => Attempt::Failed(Failure::fatal(
            code.as_str(),
            format_args!("peer: {} {}", code.as_str(), status.reason),
        )),
    }
}

pub(crate) async fn relay_tcp(edge: &Edge, client: TcpStream, server: TcpStream) {
    let counters = edge.opened();
    let started = Instant::now();
    let res = relay::tcp_tcp(client, server, counters.src_to_dst, counters.dst_to_src).await;
    finish(edge, started, res);
}

/// Records the end of a relayed connection.
pub fn finish(edge: &Edge, started: Instant, res: Result<RelayStats, RelayError>) {
    match res {
        Ok(stats) => {
            debug!(
                bytes.src_to_dst = stats.a_to_b,
                bytes.dst_to_src = stats.b_to_a,
                "connection closed"
            );
            edge.closed("ok", started.elapsed(), Some((stats.a_to_b, stats.b_to_a)));
        }
        Err(e) => {
            debug!(error = %e, "connection ended abnormally");
            edge.closed("error", started.elapsed(), None);
        }
    }
}

pub(crate) fn fail(edge: &Edge, tcp: TcpStream, reason: &'static str, err: &dyn std::fmt::Display) {
    warn!(reason, error = %err, "connection failed before relaying; resetting client");
    edge.failed(reason);
    reset_tcp(tcp);
}
