//! Admission limits of the shared proxy, end to end (DESIGN §8, docs/operations.md
//! "Admission limits"): real daemons, pods through the real CNI chain, real
//! QUIC + mTLS tunnels. Privileged (root); needs `cargo build --workspace
//! --bins` first (the `scripts/test` command does it).
//!
//! The limits are set low in the daemons' config files, so a handful of held
//! connections reaches them. Every connection the tests expect to be admitted
//! is checked end to end (one byte echoed by the server pod); every one they
//! expect to be refused must see a reset, and the refusal must be counted by
//! the limit that made it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nodemesh_lab::bench::load::Echo;
use nodemesh_lab::dashboard;
use nodemesh_lab::lab::{Lab, LabOptions, PodHandle};
use nodemesh_lab::metrics::{sum, Sample};

const PORT: u16 = 7300;

fn metrics(lab: &Lab, node: usize) -> Vec<Sample> {
    lab.metrics(node).expect("scrape metrics")
}

/// `nodemesh_connections_limited_total` of one limit, listener and local pod.
fn limited(samples: &[Sample], limit: &str, listener: &str, workload: &str) -> f64 {
    sum(
        samples,
        "nodemesh_connections_limited_total",
        &[
            ("limit", limit),
            ("listener", listener),
            ("workload", workload),
        ],
    )
}

/// Connects from `pod` to `addr` and checks the connection reaches the
/// server: one byte there and back.
fn open(pod: &PodHandle, addr: SocketAddr) -> TcpStream {
    let mut s = pod.connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"x").expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("{} to {addr}: expected the echo, got {e}", pod.name));
    assert_eq!(&b, b"x");
    s
}

/// Connects from `pod` to `addr` and expects the mesh to reset it; on
/// failure shows the source node's daemon log.
fn expect_reset(lab: &Lab, pod: &PodHandle, addr: SocketAddr, what: &str) {
    if let Err(e) = pod.connect_expect_reset(addr, Duration::from_secs(20)) {
        let path = lab.daemon_log(pod.node).expect("log");
        panic!("{what}: {e}\n{}", nodemesh_lab::daemon::log_tail(&path, 40));
    }
}

/// Waits until node `node`'s daemon has exactly `n` connections open
/// (`nodemesh_connections_active`), polling its metrics.
fn wait_active(lab: &Lab, node: usize, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = sum(&metrics(lab, node), "nodemesh_connections_active", &[]);
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node}: {now} connections active, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One pod that holds connections open reaches its own limit and gets
/// resets while its neighbour keeps connecting; the daemon-wide limit
/// refuses both a local pod's connection (reset at accept) and a peer's
/// tunnel stream (`unavailable`, so the peer resets its client); closing
/// connections makes room again.
#[test]
fn a_pod_at_its_limit_is_reset_while_its_neighbour_connects_and_the_daemon_limit_holds() {
    let mut lab = Lab::up(LabOptions::for_test(2, 2)).expect("lab up");
    // n1: 6 per pod, 10 in all. n2: 8 in all.
    lab.update_config(1, |c| {
        c.limits.max_connections_per_pod = 6;
        c.limits.max_connections = 10;
        c.access_log = true;
    })
    .expect("n1 config");
    lab.update_config(2, |c| {
        c.limits.max_connections_per_pod = 8;
        c.limits.max_connections = 8;
        c.access_log = true;
    })
    .expect("n2 config");
    lab.restart_daemon(1).expect("restart n1");
    lab.restart_daemon(2).expect("restart n2");
    let noisy = lab.pod(1, 1).expect("n1-p1");
    let neighbour = lab.pod(1, 2).expect("n1-p2");
    let remote = lab.pod(2, 1).expect("n2-p1");
    let _remote_echo = Echo::start(remote.listen(PORT).expect("listen"), 1, false).expect("echo");
    let _local_echo = Echo::start(noisy.listen(PORT).expect("listen"), 1, false).expect("echo");
    let (remote_addr, local_addr) = (remote.addr(PORT), noisy.addr(PORT));

    // 1. The noisy pod fills its own limit; its next connection is reset.
    let mut noisy_conns: Vec<TcpStream> = (0..6).map(|_| open(&noisy, remote_addr)).collect();
    expect_reset(&lab, &noisy, remote_addr, "the noisy pod's 7th connection");
    let n1 = metrics(&lab, 1);
    let pod_refusals = |samples: &[Sample]| limited(samples, "pod", "outbound", &noisy.name);
    assert_eq!(pod_refusals(&n1), 1.0);
    // `/config_dump` shows the limits and how close the daemon and each pod are.
    let dump: serde_json::Value =
        serde_json::from_str(&lab.admin_get(1, "/config_dump").expect("config_dump").body)
            .expect("config_dump JSON");
    let limits = &dump["limits"];
    assert_eq!(limits["max_connections_per_pod"], 6, "{limits}");
    assert_eq!(limits["max_connections"], 10, "{limits}");
    assert_eq!(limits["open_connections"], 6, "{limits}");
    assert_eq!(limits["relay_buffer_budget_bytes"], 256 << 20, "{limits}");
    let open_of = |p: &PodHandle| {
        dump["local_pods"]
            .as_array()
            .and_then(|pods| pods.iter().find(|d| d["name"] == p.name.as_str()))
            .map(|d| d["open_connections"].clone())
    };
    assert_eq!(open_of(&noisy), Some(6.into()), "{dump}");
    assert_eq!(open_of(&neighbour), Some(0.into()), "{dump}");
    // 2. Its neighbour is not starved.
    let mut neighbour_conns = vec![open(&neighbour, remote_addr)];
    neighbour_conns.push(open(&neighbour, remote_addr));
    // 3. n2 now holds 8 tunnel streams: its daemon limit. The neighbour's
    //    next connection is admitted by n1, refused by n2 with `unavailable`,
    //    and reset by n1.
    expect_reset(
        &lab,
        &neighbour,
        remote_addr,
        "a stream over n2's daemon limit",
    );
    let n2 = metrics(&lab, 2);
    assert_eq!(limited(&n2, "daemon", "tunnel", &remote.name), 1.0);
    let n1 = metrics(&lab, 1);
    assert_eq!(
        sum(
            &n1,
            "nodemesh_connections_failed_total",
            &[("reason", "unavailable")]
        ),
        1.0
    );
    // 4. n1 holds 8; two same-node connections fill its daemon limit of 10,
    //    and the next is reset at accept.
    wait_active(&lab, 1, 8.0);
    neighbour_conns.push(open(&neighbour, local_addr));
    neighbour_conns.push(open(&neighbour, local_addr));
    expect_reset(
        &lab,
        &neighbour,
        local_addr,
        "a connection over n1's daemon limit",
    );
    let n1 = metrics(&lab, 1);
    assert_eq!(limited(&n1, "daemon", "outbound", &neighbour.name), 1.0);
    assert_eq!(
        pod_refusals(&n1),
        1.0,
        "the daemon limit's refusal is not counted against the pod"
    );
    // 5. Closing makes room at once: the noisy pod closes two, then its
    //    connections work again, up to its limit (which it reaches with n1
    //    at its daemon limit too: the pod's limit is checked first).
    noisy_conns.truncate(4);
    wait_active(&lab, 1, 8.0);
    wait_active(&lab, 2, 6.0);
    noisy_conns.push(open(&noisy, remote_addr));
    noisy_conns.push(open(&noisy, remote_addr));
    expect_reset(
        &lab,
        &noisy,
        remote_addr,
        "the noisy pod at its limit again",
    );
    let n1 = metrics(&lab, 1);
    assert_eq!(pod_refusals(&n1), 2.0);
    // The shipped dashboard's panel on refusals queries these real series.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dashboard::path()).expect("read the dashboard"),
    )
    .expect("dashboard JSON");
    let scraped: Vec<Sample> = n1.iter().chain(&metrics(&lab, 2)).cloned().collect();
    let declared = dashboard::declared_metric_names().expect("daemon sources");
    let problems = dashboard::problems(&dash, &scraped, &declared);
    assert!(problems.is_empty(), "dashboard problems: {problems:#?}");
    let log = std::fs::read_to_string(lab.daemon_log(1).expect("log")).expect("read log");
    assert!(
        log.contains("connection refused by an admission limit")
            && log.contains("limits.max_connections_per_pod"),
        "the refusal is logged with the setting to change:\n{log}"
    );
    // Each refusal has its access log line (access logs are on), with the
    // labels known when it was refused.
    let access = |node: usize, needles: &[&str]| {
        let mut all = vec!["nodemesh::access", "result=\"failed\""];
        all.extend_from_slice(needles);
        if let Err(e) = lab.wait_log_line(node, &all, Duration::from_secs(20)) {
            panic!("{e}");
        }
    };
    // Text log: `%`-formatted fields are unquoted, string ones quoted.
    let src = |p: &PodHandle| format!("src_workload={} ", p.name);
    let dst = |p: &PodHandle| format!("dst_workload={} ", p.name);
    let limit = "reason=\"connection_limit\"";
    // 1. and 5.: the noisy pod's own limit, at accept.
    access(
        1,
        &[
            limit,
            "reporter=\"source\"",
            &src(&noisy),
            &dst(&remote),
            "route=\"tunnel\"",
        ],
    );
    // 3.: n2's daemon limit on the tunnel stream; n1 saw `unavailable`.
    access(
        2,
        &[
            limit,
            "reporter=\"destination\"",
            &src(&neighbour),
            &dst(&remote),
        ],
    );
    access(1, &["reason=\"unavailable\"", &src(&neighbour)]);
    // 4.: n1's daemon limit, at accept, for a same-node destination.
    access(
        1,
        &[limit, &src(&neighbour), &dst(&noisy), "route=\"local\""],
    );
    drop((noisy_conns, neighbour_conns));
}

/// When every stream the peer allows on the tunnel is in use, a new
/// connection waits at most `connect_timeout_ms` for one, is then reset and
/// counted (`tunnel_streams_exhausted`); once a stream closes, connections
/// go through again.
#[test]
fn a_tunnel_out_of_streams_resets_new_connections_after_the_connect_timeout() {
    let mut lab = Lab::up(LabOptions::for_test(2, 1)).expect("lab up");
    lab.update_config(1, |c| c.connect_timeout_ms = 1_000)
        .expect("n1 config");
    lab.update_config(2, |c| c.tunnel.max_streams = 3)
        .expect("n2 config");
    lab.restart_daemon(1).expect("restart n1");
    lab.restart_daemon(2).expect("restart n2");
    let client = lab.pod(1, 1).expect("n1-p1");
    let server = lab.pod(2, 1).expect("n2-p1");
    let _echo = Echo::start(server.listen(PORT).expect("listen"), 1, false).expect("echo");
    let addr = server.addr(PORT);
    let mut held: Vec<TcpStream> = (0..3).map(|_| open(&client, addr)).collect();
    let started = Instant::now();
    expect_reset(&lab, &client, addr, "a 4th stream on a tunnel allowing 3");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "the reset came after {waited:?}, before connect_timeout_ms: not a wait for a stream"
    );
    let n1 = metrics(&lab, 1);
    assert_eq!(
        sum(
            &n1,
            "nodemesh_connections_failed_total",
            &[("reason", "tunnel_streams_exhausted")]
        ),
        1.0
    );
    // A stream closes; its credit comes back to n1 and the next connection
    // gets it.
    held.pop();
    wait_active(&lab, 1, 2.0);
    held.push(open(&client, addr));
    drop(held);
}

/// A relay buffer budget of 1 MiB (16 buffers of 64 KiB) on both daemons,
/// and 48 connections moving 1 MiB each way at once, across nodes and within
/// a node (the copy relay, which borrows buffers; splice does not): every
/// byte arrives, the directions that found the budget spent are counted, and
/// once the connections are done no buffer stays lent.
#[test]
fn a_spent_relay_buffer_budget_slows_busy_connections_but_loses_no_byte() {
    let mut lab = Lab::up(LabOptions::for_test(2, 2)).expect("lab up");
    for node in [1, 2] {
        lab.update_config(node, |c| {
            c.limits.relay_buffer_memory_mib = 1;
            c.tcp_relay = nodemesh::relay_splice::TcpRelay::Copy;
        })
        .expect("config");
        lab.restart_daemon(node).expect("restart");
    }
    let (a1, a2) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(1, 2).expect("n1-p2"));
    let b1 = lab.pod(2, 1).expect("n2-p1");
    lab.transfer(&a1, &b1, 0, 1024).expect("tunnel up");
    std::thread::scope(|s| {
        let cross = s.spawn(|| lab.transfer_many(&a1, &b1, 0, 32, 1 << 20));
        let same = s.spawn(|| lab.transfer_many(&a2, &a1, 0, 16, 1 << 20));
        assert_eq!(cross.join().expect("join").expect("cross x32").len(), 32);
        assert_eq!(same.join().expect("join").expect("same x16").len(), 16);
    });
    for node in [1, 2] {
        wait_active(&lab, node, 0.0);
        let m = metrics(&lab, node);
        let fallbacks = sum(&m, "nodemesh_relay_buffer_fallbacks_total", &[]);
        assert!(
            fallbacks > 0.0,
            "n{node}: no direction found the budget spent"
        );
        assert_eq!(
            sum(&m, "nodemesh_relay_buffer_bytes", &[]),
            0.0,
            "n{node}: buffers still lent with no connection open"
        );
        eprintln!("n{node}: {fallbacks} fallbacks");
    }
}
