//! End-to-end certificate tests (issue 5, lab tests 4 and 5) with real
//! daemons, the real CNI chain and real QUIC tunnels in network namespaces.
//! Privileged: run as root after `cargo build --workspace --bins`.
//!
//! 4. Rotating both nodes' certificates while a connection streams 64 MiB
//!    across nodes: the connection completes intact on the tunnel it started
//!    on, and new tunnels present the new certificates.
//! 5. An expired node certificate: the daemon runs not ready and says why,
//!    its peer refuses it, and it becomes ready once valid files appear.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use nodemesh_lab::certs::{self, UnmanagedDaemon};
use nodemesh_lab::lab::{self, Lab, LabOptions};
use nodemesh_lab::metrics::Sample;
use nodemesh_lab::traffic::{self, Pattern, CLIENT_SEED, HASH_LEN};

const MIB: u64 = 1 << 20;
const CHUNK: usize = 64 * 1024;
/// Above the default `tls.reload_interval_ms` (5 s) with room for a loaded machine.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
const EXPIRY: &str = "nodemesh_cert_expiry_timestamp_seconds";
const RELOADS: &str = "nodemesh_cert_reloads_total";
const PEER_EXPIRY: &str = "nodemesh_tunnel_peer_cert_expiry_timestamp_seconds";
const HANDSHAKES: &str = "nodemesh_tunnel_handshakes_total";
const REFUSED: &str = "nodemesh_tunnel_peer_refused_total";

fn node_id(node: usize) -> String {
    format!("spiffe://cluster.local/nodemesh/node/n{node}")
}

fn node_expiry(samples: &[Sample], node: usize) -> f64 {
    certs::value(
        samples,
        EXPIRY,
        &[("kind", "node"), ("subject", &node_id(node))],
    )
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after epoch")
        .as_secs_f64()
}

fn assert_clean(prefix: &str) {
    let left = lab::wait_clean(prefix, Duration::from_secs(10)).expect("leftovers");
    assert!(left.is_clean(), "lab {prefix} left {left:?}");
}

/// Streams `total` bytes of the client pattern: the first `half` at once,
/// then one chunk per `rate` tick until `go` arrives (so data is in flight
/// while certificates rotate), then the rest. Returns (sent hash, server's hash).
fn slow_stream(
    mut stream: TcpStream,
    total: u64,
    half: u64,
    halfway: mpsc::Sender<()>,
    go: mpsc::Receiver<()>,
) -> std::io::Result<([u8; HASH_LEN], [u8; HASH_LEN])> {
    stream.set_read_timeout(Some(traffic::IO_TIMEOUT))?;
    stream.set_write_timeout(Some(traffic::IO_TIMEOUT))?;
    let mut pattern = Pattern::new(CLIENT_SEED);
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    let mut released = false;
    while sent < total {
        if sent >= half && !released {
            if sent == half {
                let _ = halfway.send(());
            }
            // Pace: one chunk per 50 ms while waiting; block once only a
            // chunk is left, so the end is always sent after the rotation.
            let wait: std::io::Result<()> = if total - sent <= CHUNK as u64 {
                go.recv().map_err(|_| ErrorKind::BrokenPipe.into())
            } else {
                match go.recv_timeout(Duration::from_millis(50)) {
                    Ok(()) => Ok(()),
                    Err(mpsc::RecvTimeoutError::Timeout) => Err(ErrorKind::WouldBlock.into()),
                    Err(mpsc::RecvTimeoutError::Disconnected) => Err(ErrorKind::BrokenPipe.into()),
                }
            };
            match wait {
                Ok(()) => released = true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let n = usize::try_from(total - sent).map_or(CHUNK, |left| left.min(CHUNK));
        pattern.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        stream.write_all(&buf[..n])?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    let mut server = [0u8; HASH_LEN];
    if reply.len() != HASH_LEN {
        return Err(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            format!("reply of {} bytes, expected the hash trailer", reply.len()),
        ));
    }
    server.copy_from_slice(&reply);
    let mut ours = [0u8; HASH_LEN];
    ours.copy_from_slice(hash.finish().as_ref());
    Ok((ours, server))
}

#[test]
fn rotating_node_certificates_keeps_a_streaming_connection_and_new_tunnels_present_the_new_ones() {
    let mut lab = Lab::up(LabOptions::for_test(2, 1)).expect("lab up");
    let prefix = lab.prefix().to_owned();
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));

    let before: Vec<f64> = [1, 2]
        .iter()
        .map(|&n| node_expiry(&lab.metrics(n).expect("metrics"), n))
        .collect();
    for (i, e) in before.iter().enumerate() {
        assert!(
            *e > now_secs() + 300.0 * 86_400.0,
            "n{}: the lab's certificate should last a year, gauge says {e}",
            i + 1
        );
    }

    // A connection n1-p1 -> n2-p1 that is half sent when the rotation begins.
    let listener = server.listen(8080).expect("listen");
    let served = traffic::serve(listener, 1, 0);
    let stream = client.connect(server.addr(8080)).expect("connect");
    let (halfway_tx, halfway) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let streaming =
        std::thread::spawn(move || slow_stream(stream, 64 * MIB, 32 * MIB, halfway_tx, go_rx));
    halfway
        .recv_timeout(traffic::IO_TIMEOUT)
        .expect("first half sent");
    let handshakes_before = certs::value(
        &lab.metrics(1).expect("metrics"),
        HANDSHAKES,
        &[("peer", "n2"), ("side", "client"), ("result", "ok")],
    );
    assert!(handshakes_before >= 1.0, "n1 dialled n2 for the stream");

    // Rotate both nodes: new certificates from the same CA, 30 days.
    for n in [1, 2] {
        certs::reissue(&lab, n, 30, 0).expect("reissue");
    }
    let mut after = Vec::new();
    for n in [1usize, 2] {
        let samples =
            certs::wait_metrics(&lab, n, "the rotated certificate", RELOAD_TIMEOUT, |s| {
                certs::value(s, RELOADS, &[("result", "ok")]) >= 1.0
                    && node_expiry(s, n) < before[n - 1] - 300.0 * 86_400.0
            })
            .unwrap_or_else(|e| {
                let log = lab.daemon_log(n).expect("log");
                panic!("{e}\n{}", nodemesh_lab::daemon::log_tail(&log, 30))
            });
        assert_eq!(certs::value(&samples, RELOADS, &[("result", "error")]), 0.0);
        let expiry = node_expiry(&samples, n);
        assert!(
            (expiry - (now_secs() + 30.0 * 86_400.0)).abs() < 3_600.0,
            "n{n}: new expiry {expiry}"
        );
        after.push(expiry);
        let ready = lab.admin_get(n, "/ready").expect("ready");
        assert_eq!(ready.status, 200, "n{n} stays ready: {}", ready.body);
    }

    // The stream finishes intact, on the tunnel it started on.
    go.send(()).expect("release the stream");
    let (sent_hash, server_hash) = streaming
        .join()
        .expect("stream thread")
        .expect("the connection survives the rotation");
    assert_eq!(sent_hash, server_hash, "bytes arrived intact");
    let reports = served.join().expect("server thread").expect("served");
    assert_eq!(reports[0].received_bytes, 64 * MIB);
    let n1 = lab.metrics(1).expect("metrics");
    assert_eq!(
        certs::value(
            &n1,
            HANDSHAKES,
            &[("peer", "n2"), ("side", "client"), ("result", "ok")]
        ),
        handshakes_before,
        "no new tunnel was needed: the rotation kept the open one"
    );
    assert_eq!(
        certs::value(&n1, PEER_EXPIRY, &[("side", "client"), ("peer", "n2")]),
        before[1],
        "the open tunnel was made with n2's old certificate"
    );

    // New tunnels: restart n1 only. n2 keeps running on its reloaded files,
    // so what it presents comes from the configs the reload installed: its
    // client config (it dials n1) and its server config (n1 dials it). One
    // connection per node pair carries both directions, so each needs a
    // fresh tunnel dialled by the side under test: after a restart of n1,
    // first n2 -> n1 (n2 dials), then, after another restart, n1 -> n2.
    lab.restart_daemon(1).expect("restart n1");
    lab.transfer(&server, &client, 8082, MIB)
        .expect("n2 -> n1 on a tunnel n2 dials");
    let n1 = lab.metrics(1).expect("metrics");
    assert_eq!(
        certs::value(&n1, PEER_EXPIRY, &[("side", "server"), ("peer", "n2")]),
        after[1],
        "n2 presents its new certificate on a tunnel it dials"
    );
    assert_eq!(
        certs::value(&n1, HANDSHAKES, &[("side", "client")]),
        0.0,
        "n1 answered on n2's tunnel without dialling"
    );
    let n2 = lab.metrics(2).expect("metrics");
    assert!(
        certs::value(
            &n2,
            HANDSHAKES,
            &[("peer", "n1"), ("side", "client"), ("result", "ok")]
        ) >= 1.0
    );
    assert_eq!(
        certs::value(&n2, PEER_EXPIRY, &[("side", "client"), ("peer", "n1")]),
        after[0],
        "n1 presents its new certificate to n2's new tunnel"
    );

    lab.restart_daemon(1).expect("restart n1 again");
    lab.transfer(&client, &server, 8081, MIB)
        .expect("n1 -> n2 on a tunnel n1 dials");
    let n1 = lab.metrics(1).expect("metrics");
    assert_eq!(
        certs::value(&n1, PEER_EXPIRY, &[("side", "client"), ("peer", "n2")]),
        after[1],
        "n2 presents its new certificate to a new inbound tunnel"
    );
    let n2 = lab.metrics(2).expect("metrics");
    assert_eq!(
        certs::value(&n2, PEER_EXPIRY, &[("side", "server"), ("peer", "n1")]),
        after[0],
        "n1 presents its new certificate on a tunnel it dials"
    );

    let problems = lab.down();
    assert!(problems.is_empty(), "{problems:?}");
    assert_clean(&prefix);
}

#[test]
fn an_expired_node_certificate_makes_the_daemon_not_ready_and_its_peer_refuses_it() {
    let mut lab = Lab::up(LabOptions::for_test(2, 1)).expect("lab up");
    let prefix = lab.prefix().to_owned();
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    let refused_before = certs::value(
        &lab.metrics(2).expect("metrics"),
        REFUSED,
        &[("side", "server"), ("reason", "expired")],
    );

    // n1 restarts with an expired certificate: it runs, not ready.
    lab.stop_daemon(1).expect("stop n1");
    certs::reissue(&lab, 1, 1, 2).expect("expired certificate");
    let n1 = UnmanagedDaemon::start(&lab, 1, Duration::from_secs(30)).expect("n1 starts");
    let ready = lab.admin_get(1, "/ready").expect("ready");
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("credentials:"), "{}", ready.body);
    assert!(
        ready.body.contains("n1.pem expired at unix time"),
        "{}",
        ready.body
    );
    assert!(ready.body.contains("nodemesh certs node"), "{}", ready.body);
    let log = std::fs::read_to_string(lab.daemon_log(1).expect("log")).expect("read log");
    assert!(log.contains("node certificate expired"), "{log}");
    let samples = lab.metrics(1).expect("metrics");
    assert!(node_expiry(&samples, 1) < now_secs());

    // A pod connection n1 -> n2: n2 refuses n1's certificate, the connection is reset.
    let listener = server.listen(8080).expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    client
        .connect_expect_reset(server.addr(8080), traffic::IO_TIMEOUT)
        .expect("reset");
    certs::wait_metrics(
        &lab,
        2,
        "an expired-certificate refusal",
        RELOAD_TIMEOUT,
        |s| certs::value(s, REFUSED, &[("side", "server"), ("reason", "expired")]) > refused_before,
    )
    .expect("n2 refuses n1");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "nothing reached the server pod"
    );

    // Valid files appear: n1 becomes ready without a restart, and serves.
    certs::reissue(&lab, 1, 30, 0).expect("valid certificate");
    certs::wait_admin(&lab, 1, "/ready", RELOAD_TIMEOUT, |r| r.status == 200).expect("ready again");
    let samples = lab.metrics(1).expect("metrics");
    assert!(certs::value(&samples, RELOADS, &[("result", "ok")]) >= 1.0);
    drop(listener);
    lab.transfer(&client, &server, 8081, MIB)
        .expect("n1 -> n2 with the new certificate");

    drop(n1);
    let problems = lab.down();
    assert!(problems.is_empty(), "{problems:?}");
    assert_clean(&prefix);
}
