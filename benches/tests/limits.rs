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
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nodemesh_lab::bench::load::Echo;
use nodemesh_lab::dashboard;
use nodemesh_lab::lab::{Lab, LabOptions, PodHandle};
use nodemesh_lab::metrics::{sum, Sample};
use nodemesh_lab::traffic::{accept_retrying, read_hashed, send_pattern_until, Hash, IO_TIMEOUT};

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
/// and 20 connections across nodes plus 20 within n1 (the copy relay, which
/// borrows buffers; splice does not) whose clients write without pause to
/// servers that hold back reading. Each direction blocked mid-write holds
/// its buffer, so each daemon soon has more of them than buffers: it lends
/// all 16 and counts the rest as fallbacks. Then the servers read: every
/// byte arrives intact, and once the connections are done no buffer stays
/// lent.
#[test]
fn a_spent_relay_buffer_budget_slows_busy_connections_but_loses_no_byte() {
    const BUDGET_BYTES: f64 = (1u64 << 20) as f64;
    const EACH: usize = 20;
    let mut lab = Lab::up(LabOptions::for_test(2, 2)).expect("lab up");
    for node in [1, 2] {
        lab.update_config(node, |c| {
            c.limits.relay_buffer_memory_mib = 1;
            c.tcp_relay = nodemesh::relay_splice::TcpRelay::Copy;
            // 20 streams x 64 KiB fit the 8 MiB connection window, so every
            // stream gets data (with 2 MiB each, four streams fill it and
            // the others wait without a buffer).
            c.tunnel.stream_window = 64 << 10;
        })
        .expect("config");
        lab.restart_daemon(node).expect("restart");
    }
    let (a1, a2) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(1, 2).expect("n1-p2"));
    let b1 = lab.pod(2, 1).expect("n2-p1");
    let stop = AtomicBool::new(false);
    let budget = |node: usize| {
        let m = metrics(&lab, node);
        (
            sum(&m, "nodemesh_relay_buffer_bytes", &[]),
            sum(&m, "nodemesh_relay_buffer_fallbacks_total", &[]),
        )
    };
    std::thread::scope(|s| {
        // Inside the scope, so a failing check drops the servers first and
        // the blocked clients see their connections close.
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for (src, dst) in [(&a1, &b1), (&a2, &a1)] {
            let listener = dst.listen(0).expect("listen");
            let port = listener.local_addr().expect("port").port();
            socket2::SockRef::from(&listener)
                .set_read_timeout(Some(IO_TIMEOUT))
                .expect("accept timeout");
            for _ in 0..EACH {
                clients.push(src.connect(dst.addr(port)).expect("connect"));
                servers.push(accept_retrying(&listener).expect("accept"));
            }
        }
        // To unblock the writers if the check below fails.
        let shutters: Vec<TcpStream> = clients
            .iter()
            .map(|c| c.try_clone().expect("clone"))
            .collect();
        let writers: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(seed, mut c)| {
                let stop = &stop;
                s.spawn(move || {
                    c.set_write_timeout(Some(IO_TIMEOUT))?;
                    let sent = send_pattern_until(&mut c, seed as u64, stop)?;
                    c.shutdown(Shutdown::Write)?;
                    Ok::<_, std::io::Error>(sent)
                })
            })
            .collect();
        // Synchronise on what the daemons report, not on time.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (n1, n2) = (budget(1), budget(2));
            if [n1, n2]
                .iter()
                .all(|&(lent, fallbacks)| lent == BUDGET_BYTES && fallbacks > 0.0)
            {
                eprintln!("blocked: n1 {n1:?}, n2 {n2:?} (lent bytes, fallbacks)");
                break;
            }
            if Instant::now() >= deadline {
                for c in &shutters {
                    let _ = c.shutdown(Shutdown::Both);
                }
                panic!(
                    "40 blocked connections never spent a budget of 16 buffers: \
                     (lent bytes, fallbacks) n1 {n1:?}, n2 {n2:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Release);
        let readers: Vec<_> = servers
            .into_iter()
            .map(|mut srv| s.spawn(move || read_hashed(&mut srv)))
            .collect();
        let collect = |handles: Vec<std::thread::ScopedJoinHandle<'_, std::io::Result<_>>>| {
            let mut all: Vec<(u64, Hash)> = handles
                .into_iter()
                .map(|h| h.join().expect("thread").expect("transfer"))
                .collect();
            all.sort();
            all
        };
        let (sent, received) = (collect(writers), collect(readers));
        assert_eq!(
            received, sent,
            "the servers received other bytes than the clients sent"
        );
        let total: u64 = sent.iter().map(|(n, _)| n).sum();
        eprintln!("{} connections, {} MiB in all", sent.len(), total >> 20);
    });
    for node in [1, 2] {
        wait_active(&lab, node, 0.0);
        assert_eq!(
            budget(node).0,
            0.0,
            "n{node}: buffers still lent with no connection open"
        );
    }
}
