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
use crate::proxy::{Proxy, Workload};
use crate::registry::Route;
use crate::relay::{
    self, reset_tcp, PipelinedError, RelayError, RelayStats, StatusError, StatusRead,
};
use crate::tunnel::header::{read_status, StatusCode, StreamHeader};
use crate::tunnel::reset_code;
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
        return crate::outbound_service::handle(proxy, pod, tcp, client, dst, service).await;
    }
    let src = proxy.workload_of(pod);
    let route = proxy.registry.resolve(dst.ip());
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
    tracing::Span::current().record("server.addr", tracing::field::display(dst));
    match route {
        Route::Local(dst_pod) => {
            edge.route = RouteLabel::Local;
            // This node is L2 too: the same policy applies.
            let live = match inbound::admit_local(proxy, &edge, pod, client, &dst_pod, dst) {
                Ok(l) => l,
                Err(reason) => return fail(&edge, tcp, reason, &"refused by policy"),
            };
            match proxy.connect(&dst_pod.netns, dst).await {
                Ok(server) => inbound::relay_local(&edge, &dst_pod, tcp, server, live).await,
                Err(e) => fail(&edge, tcp, "connect_failed", &e),
            }
        }
        Route::Passthrough => match proxy.connect(&pod.netns, dst).await {
            Ok(server) => relay_tcp(&edge, tcp, server).await,
            Err(e) => fail(&edge, tcp, "connect_failed", &e),
        },
        Route::Remote { node, addr } => {
            edge.route = RouteLabel::Tunnel;
            edge.tls = true;
            tunnel(proxy, &edge, &src, tcp, client, dst, &node, addr)
                .instrument(info_span!("tunnel", peer.node = %node))
                .await
        }
    }
}

/// Tunnels a connection to a pod on another node, pipelined: the header
/// goes out with whatever the client has already sent, the client's bytes
/// keep flowing, and L2's status is read before any byte goes back to the
/// client (a refusal resets the client, as when waiting for it first).
#[allow(clippy::too_many_arguments)]
async fn tunnel(
    proxy: &Proxy,
    edge: &Edge,
    src: &Workload,
    tcp: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    node: &str,
    addr: SocketAddr,
) {
    let (mut send, recv, mut first) = match open(proxy, src, client, dst, node, addr).await {
        Ok(s) => s,
        Err(f) => return fail(edge, tcp, f.reason, &f.error),
    };
    let header_len = first.len();
    // Coalesce the header with the client's first bytes: one stream write,
    // so one packet for a small request rather than two.
    if let Err(e) = read_ready(&tcp, &mut first) {
        let _ = send.reset(reset_code(StatusCode::Internal));
        return fail(edge, tcp, "client_reset", &e);
    }
    if let Err(e) = send.write_all(&first).await {
        return fail(edge, tcp, "tunnel_unavailable", &e);
    }
    let early = (first.len() - header_len) as u64;
    drop(first);
    let counters = edge.counters();
    let started = Instant::now();
    let res = relay::tcp_quic_pipelined(
        tcp,
        send,
        recv,
        early,
        counters.src_to_dst,
        counters.dst_to_src,
        proxy.connect_timeout * 2,
        |status| {
            let code = match &status {
                Ok(s) => reset_code(s.code),
                Err(_) => reset_code(StatusCode::Internal),
            };
            admit(status).map_err(|f| (f, code))?;
            edge.count_opened();
            Ok(())
        },
    )
    .await;
    match res {
        Ok(stats) => finish(edge, started, Ok(stats)),
        Err(PipelinedError::Relay(e)) => finish(edge, started, Err(e)),
        Err(PipelinedError::Refused(f)) => {
            warn!(reason = f.reason, error = %f.error, "connection refused by the peer; client reset");
            edge.failed(f.reason);
        }
    }
}

/// Appends to `buf`, without waiting, what the client has already sent (up
/// to the buffer's spare capacity). EOF and "nothing yet" append nothing:
/// the relay sees them next. Errors are the client's (a reset).
fn read_ready(tcp: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let len = buf.len();
    buf.resize(buf.capacity(), 0);
    let res = tcp.try_read(&mut buf[len..]);
    match res {
        Ok(n) => {
            buf.truncate(len + n);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            buf.truncate(len);
            Ok(())
        }
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

/// Bytes of client data the first stream write may carry after the header.
const FIRST_WRITE: usize = 4096;

/// Opens a tunnel stream to `dst` on peer `node` and encodes its header,
/// not yet written, in a buffer with [`FIRST_WRITE`] spare bytes.
async fn open(
    proxy: &Proxy,
    src: &Workload,
    client: SocketAddr,
    dst: SocketAddr,
    node: &str,
    addr: SocketAddr,
) -> Result<(SendStream, RecvStream, Vec<u8>), Failure> {
    let conn = proxy
        .tunnels
        .connection(node, addr)
        .await
        .map_err(|e| Failure::retryable("tunnel_unavailable", e))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| Failure::retryable("tunnel_unavailable", e))?;
    let header = StreamHeader {
        dst,
        src: client,
        src_identity: src.identity.clone(),
        flags: 0,
        trace_id: None,
    };
    let mut buf = Vec::with_capacity(header.encoded_len() + FIRST_WRITE);
    header
        .encode(&mut buf)
        .map_err(|e| Failure::fatal("bad_header", e))?;
    Ok((send, recv, buf))
}

/// Opens a tunnel stream to `dst` on peer `node`, writes the header and
/// waits for L2's status before returning (the service path, which may
/// retry another endpoint on a refusal, so sends nothing before it).
pub(crate) async fn open_stream(
    proxy: &Proxy,
    src: &Workload,
    client: SocketAddr,
    dst: SocketAddr,
    node: &str,
    addr: SocketAddr,
) -> Result<(SendStream, RecvStream), Failure> {
    let (mut send, mut recv, header) = open(proxy, src, client, dst, node, addr).await?;
    send.write_all(&header)
        .await
        .map_err(|e| Failure::retryable("tunnel_unavailable", e))?;
    let timeout = proxy.connect_timeout * 2;
    let status = match tokio::time::timeout(timeout, read_status(&mut recv)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(StatusError::Malformed(e)),
        Err(_) => Err(StatusError::Timeout(timeout)),
    };
    if let Err(StatusError::Timeout(_)) = status {
        let _ = send.reset(reset_code(StatusCode::Internal));
    }
    admit(status).map(|()| (send, recv))
}

/// L2's answer to a header, as L1 acts on it: OK admits; anything else is
/// the failure to report (a `DENIED` is counted in `nodemesh_denied_total`).
fn admit(status: StatusRead) -> Result<(), Failure> {
    let status = match status {
        Ok(s) => s,
        Err(e @ StatusError::Malformed(_)) => return Err(Failure::fatal("bad_status", e)),
        Err(e @ StatusError::Timeout(_)) => return Err(Failure::retryable("status_timeout", e)),
    };
    if status.code == StatusCode::Denied {
        metrics::counter!(m::DENIED, "reporter" => "source", "reason" => policy::reason_label(&status.reason))
            .increment(1);
    }
    match status.code {
        StatusCode::Ok => Ok(()),
        code @ (StatusCode::ConnectFailed | StatusCode::NoRoute | StatusCode::Unavailable) => {
            Err(Failure::retryable(
                code.as_str(),
                format_args!("peer: {} {}", code.as_str(), status.reason),
            ))
        }
        code => Err(Failure::fatal(
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
            edge.closed("ok", started.elapsed());
        }
        Err(e) => {
            debug!(error = %e, "connection ended abnormally");
            edge.closed("error", started.elapsed());
        }
    }
}

pub(crate) fn fail(edge: &Edge, tcp: TcpStream, reason: &'static str, err: &dyn std::fmt::Display) {
    warn!(reason, error = %err, "connection failed before relaying; resetting client");
    edge.failed(reason);
    reset_tcp(tcp);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size of the future an async fn taking these arguments returns.
    fn future_size<F, R>(_: F) -> usize
    where
        F: FnOnce(&'static Proxy, &'static LocalPod, TcpStream, SocketAddr) -> R,
    {
        std::mem::size_of::<R>()
    }

    fn stream_future_size<F, R>(_: F) -> usize
    where
        F: FnOnce(std::sync::Arc<Proxy>, std::sync::Arc<str>, SendStream, RecvStream) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every open connection keeps its task's future: large arrays or
    /// buffers held across an await show up here (relay buffers are lent
    /// from the heap only while data flows; header and status reads use the
    /// heap briefly). Bounds in bytes, with headroom over the measured
    /// 2472 (L1) / 1752 (L2) / 1544 (plaintext) of a debug build.
    #[test]
    fn connection_futures_stay_small() {
        let l1 = future_size(handle);
        let plaintext = future_size(crate::inbound::plaintext);
        let l2 = stream_future_size(crate::inbound::handle_stream);
        assert!(l1 <= 3072, "outbound::handle future is {l1} bytes");
        assert!(
            plaintext <= 2048,
            "inbound::plaintext future is {plaintext} bytes"
        );
        assert!(l2 <= 2048, "inbound::handle_stream future is {l2} bytes");
    }
}
