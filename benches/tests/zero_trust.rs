//! End-to-end tests of zero trust at L2 (issue 5, lab tests 1–3): real
//! daemons, the real CNI chain, real QUIC tunnels, in network namespaces.
//!
//! 1. A DENY policy resets the caller (across nodes and on the same node), is
//!    counted with its reason on both nodes and logged with both identities;
//!    switching it to ALLOW lets the same clients through; switching back
//!    closes their open connections (both sides reset).
//! 2. A rogue node with a valid certificate (for a node discovery knows)
//!    forging stream headers is refused: `source_not_on_peer`,
//!    `unknown_source`, `identity_mismatch`; only its own pod, as itself,
//!    gets through.
//! 3. Plaintext from an unmeshed pod: admitted and labelled `tls="false"` in
//!    a permissive namespace; refused (and the open one closed) once the
//!    namespace is strict.
//!
//! Privileged: run as root. `cargo build --workspace --bins` first.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use nodemesh::config::{TlsConfig, DEFAULT_TUNNEL_PORT};
use nodemesh::discovery::model::{
    Action, AuthorizationPolicy, ClusterModel, Mode, Namespace, Node, Pod, Rule, Selector, Source,
};
use nodemesh::identity::{client_config, Credentials};
use nodemesh::tunnel::header::{read_status, StatusCode, StreamHeader};
use nodemesh_lab::lab::{Lab, LabOptions, PodHandle};
use nodemesh_lab::{daemon, metrics, netns, traffic};

const TD: &str = "cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/lab/sa/default";
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn node_id(node: &str) -> String {
    format!("spiffe://{TD}/nodemesh/node/{node}")
}

/// A policy on pod `target` (by its `app` label) in namespace `lab`.
fn policy(action: Action, target: &PodHandle, from: Source) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: format!("{}-{}", action.as_str().to_lowercase(), target.name),
        namespace: "lab".into(),
        selector: Selector {
            match_labels: BTreeMap::from([("app".to_owned(), target.name.clone())]),
        },
        action,
        rules: vec![Rule {
            from: vec![from],
            to: vec![],
        }],
    }
}

fn with_policies(policies: Vec<AuthorizationPolicy>) -> ClusterModel {
    ClusterModel {
        policies,
        ..ClusterModel::default()
    }
}

/// An echo server on `listener`, one connection at a time, until the test ends.
fn echo(listener: TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match traffic::read_retrying(&mut c, &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}

fn echo_server(pod: &PodHandle) -> u16 {
    let l = pod.listen(0).expect("listen");
    let port = l.local_addr().expect("addr").port();
    echo(l);
    port
}

/// Sends `msg` and expects it back.
fn ping(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, msg);
    Ok(())
}

/// The open connection `s` is reset (not cleanly closed, not left hanging).
fn assert_reset(s: &mut TcpStream, what: &str) {
    if let Err(got) = traffic::expect_reset(s, IO_TIMEOUT) {
        panic!("{what}: expected a reset, but {got}");
    }
}

/// A new connection from `pod` to `addr` is reset.
fn connect_expect_reset(pod: &PodHandle, addr: SocketAddr, what: &str) {
    if let Err(e) = pod.connect_expect_reset(addr, IO_TIMEOUT) {
        panic!("{what}: {e}");
    }
}

fn denied(lab: &Lab, node: usize, reporter: &str, reason: &str) -> f64 {
    metrics::sum(
        &lab.metrics(node).expect("metrics"),
        "nodemesh_denied_total",
        &[("reporter", reporter), ("reason", reason)],
    )
}

/// Waits until node `node`'s daemon log has a line containing all of `needles`.
fn wait_log_line(lab: &Lab, node: usize, needles: &[&str]) {
    if let Err(e) = lab.wait_log_line(node, needles, IO_TIMEOUT) {
        panic!("{e}");
    }
}

#[test]
fn deny_policy_resets_the_caller_then_allow_admits_it_and_deny_again_closes_it() {
    let mut lab = Lab::up(LabOptions::for_test(2, 2)).expect("lab up");
    let client = lab.pod(1, 1).expect("n1-p1");
    let server = lab.pod(2, 1).expect("n2-p1");
    // Same identity as `client`, on the server's node: delivered locally by
    // n2, which is L1 and L2 at once and applies the same policy.
    let neighbour = lab.pod(2, 2).expect("n2-p2");
    let port = echo_server(&server);
    let deny = || {
        with_policies(vec![policy(
            Action::Deny,
            &server,
            Source {
                principals: vec![CLIENT_ID.into()],
                ..Source::default()
            },
        )])
    };

    // Without policy the client gets through.
    let mut c = client.connect(server.addr(port)).expect("connect");
    ping(&mut c, b"before any policy").expect("no policy: allowed");
    drop(c);

    lab.set_discovery_extra(deny()).expect("publish DENY");
    let (dst_before, src_before) = (
        denied(&lab, 2, "destination", "policy_denied"),
        denied(&lab, 1, "source", "policy_denied"),
    );
    connect_expect_reset(&client, server.addr(port), "denied by policy");
    connect_expect_reset(&neighbour, server.addr(port), "same node, denied by policy");
    assert!(denied(&lab, 2, "destination", "policy_denied") > dst_before);
    assert!(denied(&lab, 1, "source", "policy_denied") > src_before);
    wait_log_line(
        &lab,
        2,
        &["policy_denied", "lab/deny-n2-p1", &node_id("n1"), CLIENT_ID],
    );

    // The same policy, now ALLOW: the same client connects.
    let mut allow = deny();
    allow.policies[0].action = Action::Allow;
    lab.set_discovery_extra(allow).expect("publish ALLOW");
    let mut c = client.connect(server.addr(port)).expect("connect");
    ping(&mut c, b"allowed now").expect("ALLOW: allowed");
    let mut local = neighbour.connect(server.addr(port)).expect("connect");
    ping(&mut local, b"same node, allowed now").expect("ALLOW: allowed locally");
    lab.transfer(&client, &server, 0, 256 * 1024)
        .expect("transfer under ALLOW");

    // Back to DENY: the open connection is closed, both sides reset.
    lab.set_discovery_extra(deny()).expect("publish DENY again");
    assert_reset(&mut c, "open connection after DENY");
    assert_reset(&mut local, "open same-node connection after DENY");
    assert!(denied(&lab, 2, "destination", "policy_revoked") >= 2.0);
    wait_log_line(&lab, 2, &["policy_revoked", CLIENT_ID]);

    let problems = lab.down();
    assert!(problems.is_empty(), "{problems:?}");
}

/// A QUIC tunnel client in its own namespace, with node credentials.
struct Rogue {
    rt: tokio::runtime::Runtime,
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Rogue {
    fn connect(
        lab: &Lab,
        netns_name: &str,
        node: &str,
        addr: Ipv4Addr,
        to: &str,
        to_addr: Ipv4Addr,
    ) -> Self {
        let dir = lab.cert_dir();
        let tls = TlsConfig {
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}-key.pem")),
            bundle: dir.join("ca.pem"),
            ..TlsConfig::default()
        };
        let creds = Credentials::load(&tls, TD, node).expect("rogue credentials");
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(
            client_config(&creds, TD).expect("client config"),
        )
        .expect("quic client config");
        let socket = netns::udp_bind(netns_name, SocketAddr::new(IpAddr::V4(addr), 0))
            .expect("udp socket in the rogue netns");
        socket.set_nonblocking(true).expect("nonblocking");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (endpoint, conn) = rt.block_on(async {
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .expect("endpoint");
            let conn = tokio::time::timeout(
                IO_TIMEOUT,
                endpoint
                    .connect_with(
                        quinn::ClientConfig::new(Arc::new(crypto)),
                        SocketAddr::new(IpAddr::V4(to_addr), DEFAULT_TUNNEL_PORT),
                        to,
                    )
                    .expect("connect"),
            )
            .await
            .expect("handshake in time")
            .expect("handshake: the rogue holds a valid node certificate");
            (endpoint, conn)
        });
        Self {
            rt,
            conn,
            _endpoint: endpoint,
        }
    }

    /// Opens a stream with a forged header; returns L2's status.
    fn claim(&self, dst: SocketAddr, src: SocketAddr, identity: &str) -> (StatusCode, String) {
        let header = StreamHeader {
            dst,
            src,
            src_identity: identity.to_owned(),
            flags: 0,
            trace_id: None,
        };
        let mut buf = Vec::new();
        header.encode(&mut buf).expect("encode");
        self.rt.block_on(async {
            let (mut send, mut recv) = self.conn.open_bi().await.expect("stream");
            send.write_all(&buf).await.expect("send header");
            let status = tokio::time::timeout(IO_TIMEOUT, read_status(&mut recv))
                .await
                .expect("status in time")
                .expect("status");
            (status.code, status.reason)
        })
    }
}

#[test]
fn a_rogue_node_cannot_speak_for_pods_of_another_node() {
    let mut lab = Lab::up(LabOptions::for_test(2, 1)).expect("lab up");
    let victim_src = lab.pod(1, 1).expect("n1-p1");
    let server = lab.pod(2, 1).expect("n2-p1");
    let port = echo_server(&server);
    let dst = server.addr(port);

    // Node n99: a real, valid node certificate, known to discovery, with one
    // pod of its own (`lab/rogue-pod`, service account `rogue`).
    let nodemesh_bin = lab.nodemesh_bin().expect("meshed lab").to_owned();
    daemon::node_cert(&nodemesh_bin, &lab.cert_dir(), "n99").expect("n99 certificate");
    let rogue_ns = lab.add_bare_node(99).expect("rogue netns");
    let rogue_addr = Ipv4Addr::new(10, 77, 0, 99);
    let own_pod_ip = IpAddr::V4(Ipv4Addr::new(10, 78, 99, 2));
    lab.set_discovery_extra(ClusterModel {
        nodes: vec![Node {
            name: "n99".into(),
            address: IpAddr::V4(rogue_addr),
            pod_cidrs: vec!["10.78.99.0/24".parse().expect("cidr")],
        }],
        pods: vec![Pod {
            namespace: "lab".into(),
            name: "rogue-pod".into(),
            service_account: "rogue".into(),
            node: "n99".into(),
            ips: vec![own_pod_ip],
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }],
        ..ClusterModel::default()
    })
    .expect("publish n99");
    let rogue = Rogue::connect(
        &lab,
        &rogue_ns,
        "n99",
        rogue_addr,
        "n2",
        lab.node(2).expect("n2").address,
    );

    let before = denied(&lab, 2, "destination", "source_not_on_peer");
    // A pod scheduled on n1, with its true identity: not n99's to claim.
    let (code, reason) = rogue.claim(dst, victim_src.addr(40000), CLIENT_ID);
    assert_eq!(
        (code, reason.as_str()),
        (StatusCode::Denied, "source_not_on_peer")
    );
    assert!(denied(&lab, 2, "destination", "source_not_on_peer") > before);
    wait_log_line(&lab, 2, &["source_not_on_peer", &node_id("n99"), CLIENT_ID]);

    // An address no pod has.
    let (code, reason) = rogue.claim(dst, "10.78.99.77:40000".parse().expect("addr"), CLIENT_ID);
    assert_eq!(
        (code, reason.as_str()),
        (StatusCode::Denied, "unknown_source")
    );

    // Its own pod, claiming another service account.
    let own = SocketAddr::new(own_pod_ip, 40000);
    let (code, reason) = rogue.claim(dst, own, CLIENT_ID);
    assert_eq!(
        (code, reason.as_str()),
        (StatusCode::Denied, "identity_mismatch")
    );

    // Its own pod as itself: verified, so admitted (no policy here).
    let (code, reason) = rogue.claim(dst, own, "spiffe://cluster.local/ns/lab/sa/rogue");
    assert_eq!(code, StatusCode::Ok, "{reason}");

    drop(rogue);
    let problems = lab.down();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn plaintext_from_an_unmeshed_pod_is_admitted_when_permissive_and_refused_when_strict() {
    let mut lab = Lab::up(LabOptions::for_test(2, 1)).expect("lab up");
    let server = lab.pod(2, 1).expect("n2-p1");
    let unmeshed = lab.add_unmeshed_pod(1).expect("unmeshed pod");
    let port = echo_server(&server);
    let opened_plain = |lab: &Lab| {
        metrics::sum(
            &lab.metrics(2).expect("metrics"),
            "nodemesh_connections_opened_total",
            &[
                ("tls", "false"),
                ("route", "plaintext"),
                ("reporter", "destination"),
            ],
        )
    };

    // Permissive (the default): admitted, labelled tls="false".
    let mut c = unmeshed.connect(server.addr(port)).expect("connect");
    ping(&mut c, b"plaintext, permissive").expect("permissive admits plaintext");
    assert!(opened_plain(&lab) >= 1.0);

    // Strict: the open plaintext connection is closed, a new one refused.
    lab.set_discovery_extra(ClusterModel {
        namespaces: vec![Namespace {
            name: "lab".into(),
            mode: Mode::Strict,
        }],
        ..ClusterModel::default()
    })
    .expect("publish strict");
    assert_reset(&mut c, "open plaintext connection after strict");
    let refused_before = denied(&lab, 2, "destination", "plaintext_refused");
    connect_expect_reset(
        &unmeshed,
        server.addr(port),
        "plaintext into a strict namespace",
    );
    assert!(denied(&lab, 2, "destination", "plaintext_refused") > refused_before);
    let failed = metrics::sum(
        &lab.metrics(2).expect("metrics"),
        "nodemesh_connections_failed_total",
        &[("reason", "plaintext_refused"), ("tls", "false")],
    );
    assert!(failed >= 1.0);

    // Meshed clients are unaffected by strict mode.
    let meshed = lab.pod(1, 1).expect("n1-p1");
    let mut c = meshed.connect(server.addr(port)).expect("connect");
    ping(&mut c, b"mTLS, strict").expect("strict admits mTLS");

    // Back to permissive: plaintext admitted again.
    lab.set_discovery_extra(ClusterModel::default())
        .expect("publish permissive");
    let mut c = unmeshed.connect(server.addr(port)).expect("connect");
    ping(&mut c, b"permissive again").expect("permissive admits plaintext");

    let problems = lab.down();
    assert!(problems.is_empty(), "{problems:?}");
}
