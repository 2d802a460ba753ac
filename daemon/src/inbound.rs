//! L2: the inbound path into local pods.
//!
//! Owns the tunnel accept loop (handshake, then one task per stream), the
//! handling of each tunnel stream (read and check the header, connect into the
//! destination pod from a marked socket made in its netns, answer the status,
//! relay), and the in-pod plaintext listener (`:15006`) for traffic that
//! reaches a meshed pod from outside the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info_span, warn, Instrument};

use crate::identity::peer_node;
use crate::metrics::{self as m, Edge, Reporter, Route as RouteLabel, UNKNOWN};
use crate::netns::{connect_in, original_dst, set_nodelay};
use crate::outbound::finish;
use crate::pods::LocalPod;
use crate::proxy::Proxy;
use crate::relay::{self, reset_tcp};
use crate::tunnel::header::{read_header, Status, StatusCode};
use crate::tunnel::{reset_code, track_open};

/// How long a peer has to send a complete header on a new stream.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts tunnel connections until shutdown.
pub async fn serve_tunnels(proxy: Arc<Proxy>) {
    let endpoint = proxy.tunnels.endpoint().clone();
    loop {
        let incoming = tokio::select! {
            _ = proxy.shutdown.cancelled() => break,
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else { break };
        let proxy = proxy.clone();
        let remote = incoming.remote_address();
        tokio::spawn(
            async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        metrics::counter!(m::TUNNEL_HANDSHAKES, "peer" => UNKNOWN, "side" => "server", "result" => "error")
                            .increment(1);
                        warn!(error = %e, "tunnel handshake from peer failed");
                        return;
                    }
                };
                let Some(peer) = peer_node(&conn, &proxy.trust_domain) else {
                    // The verifier already requires a node identity; this is belt and braces.
                    warn!("tunnel peer has no node identity; closing");
                    conn.close(reset_code(StatusCode::Denied), b"no node identity");
                    return;
                };
                metrics::counter!(m::TUNNEL_HANDSHAKES, "peer" => peer.clone(), "side" => "server", "result" => "ok")
                    .increment(1);
                tracing::info!(peer, "tunnel accepted");
                track_open(&conn, &peer, "inbound");
                let peer: Arc<str> = peer.into();
                loop {
                    match conn.accept_bi().await {
                        Ok((send, recv)) => {
                            let span = info_span!(
                                "inbound",
                                peer.node = %peer,
                                stream = %send.id(),
                                src.identity = tracing::field::Empty,
                                server.addr = tracing::field::Empty,
                            );
                            tokio::spawn(handle_stream(proxy.clone(), peer.clone(), send, recv).instrument(span));
                        }
                        Err(e) => {
                            debug!(error = %e, "tunnel connection ended");
                            break;
                        }
                    }
                }
            }
            .instrument(info_span!("tunnel_accept", remote.addr = %remote)),
        );
    }
}

/// Handles one tunnel stream: header, checks, connect, status, relay.
pub async fn handle_stream(
    proxy: Arc<Proxy>,
    peer: Arc<str>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let _guard = proxy.tracker.track();
    let header = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut recv)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let code = e.status_code();
            warn!(error = %e, status = code.as_str(), "malformed stream header; resetting stream");
            reject(&peer, code);
            let _ = send.reset(reset_code(code));
            let _ = recv.stop(reset_code(code));
            return;
        }
        Err(_) => {
            warn!("no complete stream header in time; resetting stream");
            reject(&peer, StatusCode::BadHeader);
            let _ = send.reset(reset_code(StatusCode::BadHeader));
            let _ = recv.stop(reset_code(StatusCode::BadHeader));
            return;
        }
    };
    let span = tracing::Span::current();
    span.record(
        "src.identity",
        tracing::field::display(&header.src_identity),
    );
    let (src_namespace, src_workload) = proxy.describe_ip(header.src.ip());
    let mut edge = Edge {
        reporter: Reporter::Destination,
        src_namespace,
        src_workload,
        dst_namespace: UNKNOWN.to_owned(),
        dst_workload: UNKNOWN.to_owned(),
        tls: true,
        route: RouteLabel::Tunnel,
    };
    if proxy.shutdown.is_cancelled() {
        return answer(
            &peer,
            &edge,
            send,
            recv,
            StatusCode::Unavailable,
            "draining",
        )
        .await;
    }
    let Some(pod) = proxy.registry.local_by_ip(header.dst.ip()) else {
        debug!(server.addr = %header.dst, "destination is not a meshed pod on this node");
        return answer(
            &peer,
            &edge,
            send,
            recv,
            StatusCode::NoRoute,
            "destination_not_meshed_here",
        )
        .await;
    };
    let dst_w = proxy.workload_of(&pod);
    edge.dst_namespace = dst_w.namespace;
    edge.dst_workload = dst_w.workload;
    let tcp = match connect_in(
        proxy.sockets.as_ref(),
        &pod.netns,
        header.dst,
        proxy.mark,
        proxy.connect_timeout,
    )
    .await
    {
        Ok(t) => t,
        Err(e) => {
            debug!(server.addr = %header.dst, error = %e, "connect to destination failed");
            let reason = if e.kind() == std::io::ErrorKind::TimedOut {
                "connect_timeout"
            } else {
                "connect_refused"
            };
            return answer(&peer, &edge, send, recv, StatusCode::ConnectFailed, reason).await;
        }
    };
    let mut buf = Vec::with_capacity(8);
    Status {
        code: StatusCode::Ok,
        reason: String::new(),
    }
    .encode(&mut buf);
    if let Err(e) = send.write_all(&buf).await {
        debug!(error = %e, "peer went away before the status");
        reset_tcp(tcp);
        return;
    }
    let counters = edge.opened();
    let started = Instant::now();
    let cancel = pod.cancel.clone();
    tokio::select! {
        _ = cancel.cancelled() => debug!("destination pod unregistered; connection closed"),
        res = relay::tcp_quic(tcp, send, recv, counters.dst_to_src, counters.src_to_dst) => finish(&edge, started, res),
    }
}

fn reject(peer: &str, code: StatusCode) {
    metrics::counter!(m::STREAMS_REJECTED, "peer" => peer.to_owned(), "status" => code.as_str())
        .increment(1);
}

async fn answer(
    peer: &str,
    edge: &Edge,
    mut send: SendStream,
    mut recv: RecvStream,
    code: StatusCode,
    reason: &'static str,
) {
    reject(peer, code);
    edge.failed(reason);
    let mut buf = Vec::with_capacity(8 + reason.len());
    Status {
        code,
        reason: reason.to_owned(),
    }
    .encode(&mut buf);
    let _ = recv.stop(reset_code(code));
    if send.write_all(&buf).await.is_ok() {
        let _ = send.finish();
        // Let the status reach the peer before the stream is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
    }
}

/// Accepts on a pod's inbound plaintext listener (`:15006`): connections that
/// reach a meshed pod from outside the mesh.
pub async fn serve_plaintext(proxy: Arc<Proxy>, pod: Arc<LocalPod>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = pod.cancel.cancelled() => break,
            _ = proxy.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, client)) => {
                let span = info_span!("inbound_plaintext", pod = %format_args!("{}/{}", pod.namespace, pod.name), client.addr = %client);
                let (proxy, pod) = (proxy.clone(), pod.clone());
                tokio::spawn(
                    async move {
                        let cancel = pod.cancel.clone();
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = plaintext(&proxy, &pod, tcp, client) => {}
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                warn!(pod = %pod.name, error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn plaintext(proxy: &Proxy, pod: &LocalPod, tcp: TcpStream, client: SocketAddr) {
    let _guard = proxy.tracker.track();
    set_nodelay(&tcp);
    let dst = match original_dst(&tcp) {
        Ok(d) if pod.ips.contains(&d.ip()) => d,
        Ok(d) => {
            warn!(server.addr = %d, "plaintext inbound for an address that is not the pod's; resetting");
            reset_tcp(tcp);
            return;
        }
        Err(e) => {
            warn!(error = %e, "no original destination; resetting");
            reset_tcp(tcp);
            return;
        }
    };
    let (src_namespace, src_workload) = proxy.describe_ip(client.ip());
    let dst_w = proxy.workload_of(pod);
    let edge = Edge {
        reporter: Reporter::Destination,
        src_namespace,
        src_workload,
        dst_namespace: dst_w.namespace,
        dst_workload: dst_w.workload,
        tls: false,
        route: RouteLabel::Plaintext,
    };
    match connect_in(
        proxy.sockets.as_ref(),
        &pod.netns,
        dst,
        proxy.mark,
        proxy.connect_timeout,
    )
    .await
    {
        Ok(server) => {
            let counters = edge.opened();
            let started = Instant::now();
            let res = relay::tcp_tcp(tcp, server, counters.src_to_dst, counters.dst_to_src).await;
            finish(&edge, started, res);
        }
        Err(e) => {
            warn!(server.addr = %dst, error = %e, "connect to the pod failed; resetting client");
            edge.failed("connect_failed");
            reset_tcp(tcp);
        }
    }
}
