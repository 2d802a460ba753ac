//! L2: the inbound path into local pods.
//!
//! Owns the tunnel serve loop (accepted tunnels and the ones this node dials
//! alike: one task per stream the peer opens, [`serve_streams`]), the
//! handling of each tunnel stream (read the header, verify the claimed source
//! against the peer node, check the destination, authorize by policy,
//! connect into the destination pod from a marked socket made in its netns,
//! answer the status, relay until done or revoked), the in-pod plaintext
//! listener (`:15006`) for traffic that reaches a meshed pod from outside the
//! mesh (refused in `strict` namespaces, authorized by policy otherwise), and
//! the admission of same-node connections ([`admit_local`]). The checks and
//! their order are documented in `docs/security.md`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Label;
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tracing::{debug, info_span, warn, Instrument};

use crate::discovery::model::Mode;
use crate::identity::node_spiffe_id;
use crate::metrics::{self as m, Edge, Reporter, Route as RouteLabel, UNKNOWN};
use crate::netns::{original_dst, set_nodelay};
use crate::outbound::finish;
use crate::pods::LocalPod;
use crate::policy::live::OwnedPeer;
use crate::policy::{
    parse_workload_identity, verify_source, Client, Decision, LiveConn, LiveGuard, Peer,
    REASON_PLAINTEXT_REFUSED, REASON_POLICY_DENIED,
};
use crate::proxy::{Proxy, Workload, REASON_DRAINING};
use crate::relay::{self, reset_tcp, RelayStats};
use crate::tunnel::header::{read_header, Status, StatusCode};
use crate::tunnel::{reset_code, StreamGuard, Tunnel};

/// How long a peer has to send a complete header on a new stream.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The reason of the `unavailable` status answered to a stream refused by
/// the daemon's connection limit (`limits.max_connections`).
pub const REASON_CONNECTION_LIMIT: &str = "connection_limit";

/// Serves tunnels until shutdown: accepts incoming ones (registered in the
/// pool for their peer node) and takes the ones this node dials, and serves
/// the streams the peer opens on each with [`serve_streams`].
pub async fn serve_tunnels(proxy: Arc<Proxy>) {
    let endpoint = proxy.tunnels.endpoint().clone();
    let mut dialled = proxy.tunnels.dialled();
    loop {
        let incoming = tokio::select! {
            _ = proxy.shutdown.cancelled() => break,
            Some(tunnel) = async {
                match dialled.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                tokio::spawn(serve_streams(proxy.clone(), tunnel));
                continue;
            }
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else { break };
        let proxy = proxy.clone();
        let remote = incoming.remote_address();
        tokio::spawn(
            async move {
                match proxy.tunnels.accept(incoming, &proxy.trust_domain).await {
                    Ok(tunnel) => serve_streams(proxy, tunnel).await,
                    Err(e) => warn!(error = %e, "tunnel from peer refused"),
                }
            }
            .instrument(info_span!("tunnel_accept", remote.addr = %remote)),
        );
    }
    // Draining: no new tunnels are accepted, but the peers' streams on
    // tunnels dialled from now on are still answered (`unavailable`).
    if let Some(mut rx) = dialled {
        tokio::spawn(async move {
            while let Some(tunnel) = rx.recv().await {
                tokio::spawn(serve_streams(proxy.clone(), tunnel));
            }
        });
    }
}

/// Serves the streams peer `tunnel.peer()` opens on `tunnel`, whichever side
/// dialled it, until the connection ends: one task per stream
/// ([`handle_stream`]), the source verified against that peer node.
pub async fn serve_streams(proxy: Arc<Proxy>, tunnel: Tunnel) {
    let peer = tunnel.peer().clone();
    let direction = tunnel.direction().as_str();
    loop {
        match tunnel.accept_bi().await {
            Ok((send, recv, guard)) => {
                let span = info_span!(
                    "inbound",
                    peer.node = %peer,
                    tunnel.direction = direction,
                    stream = %send.id(),
                    src.identity = tracing::field::Empty,
                    server.addr = tracing::field::Empty,
                );
                tokio::spawn(
                    handle_stream(proxy.clone(), peer.clone(), send, recv, guard).instrument(span),
                );
            }
            Err(e) => {
                debug!(peer.node = %peer, direction, error = %e, "tunnel connection ended");
                break;
            }
        }
    }
}

/// Handles one tunnel stream: header, checks, connect, status, relay.
///
/// `stream` counts the stream open on its tunnel until this returns. Not an
/// `async fn`, so that the task keeps its arguments once (see
/// [`relay::tcp_quic`]).
#[allow(clippy::manual_async_fn)] // on purpose: see the doc
pub fn handle_stream(
    proxy: Arc<Proxy>,
    peer: Arc<str>,
    mut send: SendStream,
    mut recv: RecvStream,
    stream: StreamGuard,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let _guard = proxy.tracker.track();
        let _stream = stream;
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
        span.record("server.addr", tracing::field::display(header.dst));
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
        if proxy.is_draining() {
            // Not a failed connection: L1 retries it on a new tunnel (counted
            // only in `nodemesh_streams_rejected_total{status="unavailable"}`).
            debug!("draining: stream refused, the peer retries on a new tunnel");
            reject(&peer, StatusCode::Unavailable);
            return write_status(send, recv, StatusCode::Unavailable, REASON_DRAINING).await;
        }
        // 1. The peer may speak only for its own pods, as who they run as.
        let snap = proxy.registry.snapshot();
        let src_pod = match verify_source(
            &snap,
            &proxy.trust_domain,
            &peer,
            header.src.ip(),
            &header.src_identity,
        ) {
            Ok(p) => p.clone(),
            Err(refusal) => {
                let reason = refusal.reason();
                warn!(
                    reason,
                    peer.identity = %node_spiffe_id(&proxy.trust_domain, &peer),
                    src.identity = %header.src_identity,
                    client.addr = %header.src,
                    server.addr = %header.dst,
                    error = %refusal,
                    "stream refused: the peer node may not speak for this source"
                );
                count_denied(&edge, reason);
                return answer(&peer, &edge, send, recv, StatusCode::Denied, reason).await;
            }
        };
        drop(snap);
        edge.src_namespace = src_pod.namespace.clone();
        edge.src_workload = src_pod.workload.clone();
        // 2. The destination is a meshed pod here.
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
        // 3. The daemon's connection limit: refused streams are answered
        //    `unavailable`, so L1 resets its client (or tries another endpoint).
        let _permit = match proxy.limits.admit(None) {
            Ok(p) => p,
            Err(refusal) => {
                refusal.report(
                    "tunnel",
                    edge.dst_namespace.clone(),
                    edge.dst_workload.clone(),
                );
                return answer(
                    &peer,
                    &edge,
                    send,
                    recv,
                    StatusCode::Unavailable,
                    REASON_CONNECTION_LIMIT,
                )
                .await;
            }
        };
        // 4. Policy. Registered first, then evaluated on the newest snapshot, so
        //    a policy change is seen either here or by the revocation scan.
        let live = proxy.registry.live().register(LiveConn {
            dst: header.dst,
            dst_namespace: pod.namespace.clone(),
            identity: Some(OwnedPeer {
                principal: header.src_identity.clone(),
                namespace: src_pod.namespace.clone(),
                service_account: src_pod.service_account.clone(),
            }),
            src_ip: header.src.ip(),
            peer_node: Some(peer.clone()),
            cancel: pod.cancel.child_token(),
        });
        let decision = {
            let client = Client {
                identity: Some(Peer {
                    principal: &header.src_identity,
                    namespace: &src_pod.namespace,
                    service_account: &src_pod.service_account,
                }),
                ip: header.src.ip(),
            };
            proxy
                .registry
                .snapshot()
                .authorize(header.dst, &pod.namespace, &client)
        };
        if let Decision::Deny { reason, policy } = decision {
            warn!(
                reason = REASON_POLICY_DENIED,
                decision = reason.as_str(),
                policy = %policy,
                peer.identity = %node_spiffe_id(&proxy.trust_domain, &peer),
                src.identity = %header.src_identity,
                client.addr = %header.src,
                server.addr = %header.dst,
                "stream refused by authorization policy"
            );
            count_denied(&edge, REASON_POLICY_DENIED);
            drop(live);
            return answer(
                &peer,
                &edge,
                send,
                recv,
                StatusCode::Denied,
                REASON_POLICY_DENIED,
            )
            .await;
        }
        // 5. Connect into the pod.
        let tcp = match proxy.connect_into(&pod, header.src.ip(), header.dst).await {
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
        match relay::tcp_quic_cancellable(
            tcp,
            send,
            recv,
            counters.dst_to_src,
            counters.src_to_dst,
            live.token(),
            reset_code(StatusCode::Denied),
        )
        .await
        {
            // The relay's first end is the pod here: its `a_to_b` is the reply.
            Some(res) => finish(&edge, started, res.map(RelayStats::swapped)),
            None => closed_early(&pod, &edge, started),
        }
    }
}

/// Records a connection closed by its cancellation token: the destination
/// pod went away, or policy (or the namespace mode) no longer admits it (the
/// revocation scan has logged which).
fn closed_early(pod: &LocalPod, edge: &Edge, started: Instant) {
    if pod.cancel.is_cancelled() {
        debug!("destination pod unregistered; connection closed");
    } else {
        debug!("connection no longer allowed; both sides reset");
    }
    edge.closed("reset", started.elapsed(), None);
}

fn count_denied(edge: &Edge, reason: &'static str) {
    let mut labels = edge.labels();
    labels.push(Label::new("reason", reason));
    metrics::counter!(m::DENIED, labels.iter()).increment(1);
}

/// Admits a same-node connection from local pod `src` (its own listener
/// accepted it from `client`) to `dst` in local pod `dst_pod`: the
/// destination's namespace mode does not matter (the hop never leaves the
/// daemon), authorization policy does. On refusal returns the reason (logged
/// and counted as `nodemesh_denied_total{reporter="destination"}`).
pub fn admit_local(
    proxy: &Proxy,
    edge: &Edge,
    src: &LocalPod,
    client: SocketAddr,
    dst_pod: &LocalPod,
    dst: SocketAddr,
) -> Result<LiveGuard, &'static str> {
    let w = proxy.workload_of(src);
    let (ns, sa) = parse_workload_identity(&proxy.trust_domain, &w.identity)
        .map_or((w.namespace.as_str(), "default"), |(n, s)| (n, s));
    let live = proxy.registry.live().register(LiveConn {
        dst,
        dst_namespace: dst_pod.namespace.clone(),
        identity: Some(OwnedPeer {
            principal: w.identity.clone(),
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        }),
        src_ip: client.ip(),
        peer_node: None,
        cancel: dst_pod.cancel.child_token(),
    });
    let c = Client {
        identity: Some(Peer {
            principal: &w.identity,
            namespace: ns,
            service_account: sa,
        }),
        ip: client.ip(),
    };
    match proxy
        .registry
        .snapshot()
        .authorize(dst, &dst_pod.namespace, &c)
    {
        Decision::Allow => Ok(live),
        Decision::Deny { reason, policy } => {
            warn!(
                reason = REASON_POLICY_DENIED,
                decision = reason.as_str(),
                policy = %policy,
                src.identity = %w.identity,
                client.addr = %client,
                server.addr = %dst,
                "same-node connection refused by authorization policy"
            );
            let mut at_dst = edge.clone();
            at_dst.reporter = Reporter::Destination;
            count_denied(&at_dst, REASON_POLICY_DENIED);
            Err(REASON_POLICY_DENIED)
        }
    }
}

/// Relays an admitted same-node connection until done or revoked.
pub async fn relay_local(
    edge: &Edge,
    dst_pod: &LocalPod,
    client: TcpStream,
    server: TcpStream,
    live: LiveGuard,
) {
    let counters = edge.opened();
    let started = Instant::now();
    match relay::tcp_tcp_cancellable(
        client,
        server,
        counters.src_to_dst,
        counters.dst_to_src,
        live.token(),
    )
    .await
    {
        Some(res) => finish(edge, started, res),
        None => closed_early(dst_pod, edge, started),
    }
}

fn reject(peer: &str, code: StatusCode) {
    metrics::counter!(m::STREAMS_REJECTED, "peer" => peer.to_owned(), "status" => code.as_str())
        .increment(1);
}

async fn answer(
    peer: &str,
    edge: &Edge,
    send: SendStream,
    recv: RecvStream,
    code: StatusCode,
    reason: &'static str,
) {
    reject(peer, code);
    edge.failed(reason);
    write_status(send, recv, code, reason).await;
}

/// Writes a refusal status, finishes, and stops the peer's side.
async fn write_status(
    mut send: SendStream,
    mut recv: RecvStream,
    code: StatusCode,
    reason: &'static str,
) {
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

/// The labels of a plaintext connection from `client` (outside the mesh)
/// into the local pod of workload `dst`.
pub(crate) fn plaintext_edge(proxy: &Proxy, dst: &Workload, client: SocketAddr) -> Edge {
    let (src_namespace, src_workload) = proxy.describe_ip(client.ip());
    Edge {
        reporter: Reporter::Destination,
        src_namespace,
        src_workload,
        dst_namespace: dst.namespace.clone(),
        dst_workload: dst.workload.clone(),
        tls: false,
        route: RouteLabel::Plaintext,
    }
}

/// Serves one connection accepted on a pod's inbound plaintext listener
/// (`:15006`): traffic that reaches a meshed pod from outside the mesh.
pub(crate) async fn plaintext(proxy: &Proxy, pod: &LocalPod, tcp: TcpStream, client: SocketAddr) {
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
    let edge = plaintext_edge(proxy, &proxy.workload_of(pod), client);
    // Registered first, then checked on the newest snapshot (see handle_stream).
    let live = proxy.registry.live().register(LiveConn {
        dst,
        dst_namespace: pod.namespace.clone(),
        identity: None,
        src_ip: client.ip(),
        peer_node: None,
        cancel: pod.cancel.child_token(),
    });
    let refusal = {
        let snap = proxy.registry.snapshot();
        let ns = snap.namespace_of(dst.ip(), &pod.namespace);
        if snap.mode(ns) == Mode::Strict {
            warn!(
                reason = REASON_PLAINTEXT_REFUSED,
                namespace = ns,
                server.addr = %dst,
                "plaintext inbound refused: the namespace is strict; resetting client"
            );
            Some(REASON_PLAINTEXT_REFUSED)
        } else {
            let c = Client {
                identity: None,
                ip: client.ip(),
            };
            match snap.authorize(dst, &pod.namespace, &c) {
                Decision::Allow => None,
                Decision::Deny { reason, policy } => {
                    warn!(
                        reason = REASON_POLICY_DENIED,
                        decision = reason.as_str(),
                        policy = %policy,
                        src.identity = "none (plaintext)",
                        server.addr = %dst,
                        "plaintext inbound refused by authorization policy; resetting client"
                    );
                    Some(REASON_POLICY_DENIED)
                }
            }
        }
    };
    if let Some(reason) = refusal {
        edge.failed(reason);
        count_denied(&edge, reason);
        drop(live);
        reset_tcp(tcp);
        return;
    }
    match proxy.connect_into(pod, client.ip(), dst).await {
        Ok(server) => relay_local(&edge, pod, tcp, server, live).await,
        Err(e) => {
            warn!(server.addr = %dst, error = %e, "connect to the pod failed; resetting client");
            edge.failed("connect_failed");
            reset_tcp(tcp);
        }
    }
}
