//! Acceptance tests of the mesh, end to end: real daemons in node network
//! namespaces, pods created through the real CNI chain (bridge + host-local +
//! nodemesh-cni), real nftables capture, real QUIC + mTLS tunnels.
//! Privileged (root); needs `cargo build --workspace --bins` first (the
//! `scripts/test` command does it).
//!
//! One test per acceptance point of issue 2, plus passthrough and a refused
//! destination. Every lab is an RAII guard: it is removed even when a test fails.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodemesh::config::TlsConfig;
use nodemesh::identity::{self, certs, Credentials};
use nodemesh_lab::lab::{self, Family, Lab, LabOptions};
use nodemesh_lab::metrics::{sum, Sample};
use nodemesh_lab::{dashboard, netns, traffic};

const MIB: u64 = 1 << 20;
const TD: &str = "cluster.local";

fn mesh_lab(nodes: usize, pods: usize) -> Lab {
    Lab::up(LabOptions::for_test(nodes, pods))
        .expect("lab up (run `cargo build --workspace --bins` first)")
}

fn metrics(lab: &Lab, node: usize) -> Vec<Sample> {
    lab.metrics(node).expect("scrape metrics")
}

fn value(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    sum(samples, name, filter)
}

fn assert_clean(prefix: &str) {
    let left = lab::wait_clean(prefix, Duration::from_secs(10)).expect("leftovers");
    assert!(left.is_clean(), "lab {prefix} left {left:?}");
}

/// Acceptance 1: Cross-node: 64 MiB each way arrive byte-identical through both daemons.
#[test]
fn cross_node_64_mib_each_way_is_byte_identical_through_both_daemons() {
    let lab = mesh_lab(2, 1);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    let report = lab
        .transfer(&client, &server, 8080, 64 * MIB)
        .expect("64 MiB each way");
    assert_eq!(report.sent_bytes, 64 * MIB);
    assert_eq!(report.received_bytes, 64 * MIB);
    assert_eq!(
        report.server_hash, report.sent_hash,
        "server received what was sent"
    );

    let edge = |reporter| {
        vec![
            ("reporter", reporter),
            ("route", "tunnel"),
            ("tls", "true"),
            ("src_workload", client.name.as_str()),
            ("dst_workload", server.name.as_str()),
        ]
    };
    let (n1, n2) = (metrics(&lab, 1), metrics(&lab, 2));
    for (samples, reporter) in [(&n1, "source"), (&n2, "destination")] {
        let mut f = edge(reporter);
        f.push(("direction", "src_to_dst"));
        assert!(
            value(samples, "nodemesh_tcp_bytes_total", &f) >= (64 * MIB) as f64,
            "{reporter} daemon counted the client's 64 MiB"
        );
        f.pop();
        f.push(("direction", "dst_to_src"));
        assert!(
            value(samples, "nodemesh_tcp_bytes_total", &f) >= (64 * MIB) as f64,
            "{reporter} daemon counted the server's 64 MiB"
        );
        assert_eq!(
            value(
                samples,
                "nodemesh_connections_opened_total",
                &edge(reporter)
            ),
            1.0
        );
    }

    // The tunnel's path statistics, as the admin endpoint exports them:
    // 64 MiB went each way in packets of at most 1,452 bytes, sent in GSO
    // batches (more than one datagram per send call), with an RTT measured.
    let packets = (64 * MIB / 1452) as f64;
    for (samples, peer) in [(&n1, "n2"), (&n2, "n1")] {
        let sent = value(
            samples,
            "nodemesh_tunnel_packets_sent_total",
            &[("peer", peer)],
        );
        assert!(sent >= packets, "{sent} packets sent to {peer}");
        let datagrams = value(
            samples,
            "nodemesh_tunnel_udp_datagrams_sent_total",
            &[("peer", peer)],
        );
        let calls = value(
            samples,
            "nodemesh_tunnel_udp_send_calls_total",
            &[("peer", peer)],
        );
        assert!(
            calls >= 1.0 && datagrams / calls >= 2.0,
            "GSO batches to {peer}: {datagrams} datagrams in {calls} calls"
        );
        assert!(value(samples, "nodemesh_tunnel_rtt_seconds", &[("peer", peer)]) > 0.0);
        let mtu = value(samples, "nodemesh_tunnel_path_mtu_bytes", &[("peer", peer)]);
        assert!((1200.0..=1452.0).contains(&mtu), "path MTU {mtu}");
    }

    // The shipped Grafana dashboard queries these daemons' real series.
    let text = std::fs::read_to_string(dashboard::path()).expect("read the dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let declared = dashboard::declared_metric_names().expect("daemon sources");
    let scraped: Vec<Sample> = n1.iter().chain(&n2).cloned().collect();
    let problems = dashboard::problems(&dash, &scraped, &declared);
    assert!(problems.is_empty(), "dashboard problems: {problems:#?}");
    for metric in [
        "nodemesh_connections_opened_total",
        "nodemesh_tcp_bytes_total",
        "nodemesh_tunnels_open",
        "nodemesh_pods_registered",
        "nodemesh_tunnel_rtt_seconds",
        "nodemesh_tunnel_packets_lost_total",
        "nodemesh_tunnel_udp_send_calls_total",
    ] {
        assert!(
            scraped.iter().any(|s| s.name == metric),
            "{metric} scraped, so the dashboard's labels on it were checked"
        );
    }
}

/// `nodemesh stat`, run as an operator would on a node against both daemons,
/// shows the cross-node edge carried with mTLS while traffic flows.
#[test]
fn nodemesh_stat_shows_the_cross_node_edge_with_mtls_while_traffic_flows() {
    use std::io::BufRead;
    let lab = mesh_lab(2, 1);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    let admin = |n: usize| {
        lab.node(n)
            .expect("node")
            .daemon
            .as_ref()
            .expect("daemon")
            .admin
            .to_string()
    };
    let (a1, a2) = (admin(1), admin(2));
    let netns = lab.node(1).expect("n1").netns.clone();
    let bin = lab.nodemesh_bin().expect("nodemesh binary").to_owned();
    let mut stat = std::process::Command::new("ip")
        .args(["netns", "exec", &netns])
        .arg(&bin)
        .args(["stat", "--admin", &a1, "--admin", &a2, "--interval", "3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nodemesh stat");
    // The window starts once both daemons were read the first time.
    let mut stderr = std::io::BufReader::new(stat.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("stat's first line");
    assert!(line.contains("read 2 daemon(s)"), "stat said: {line}");
    lab.transfer(&client, &server, 8080, 8 * MIB)
        .expect("8 MiB each way");
    let out = stat.wait_with_output().expect("stat ends after its window");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "stat failed: {text}");
    let (src, dst) = (
        format!("{}/{}", client.namespace, client.name),
        format!("{}/{}", server.namespace, server.name),
    );
    let row = text
        .lines()
        .find(|l| l.starts_with(&src) && l.contains(&dst))
        .unwrap_or_else(|| panic!("no {src} -> {dst} row in:\n{text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    // SOURCE DESTINATION MTLS ROUTE CONN/S SUCCESS OUT(value unit) IN(value unit) P50 P99
    assert_eq!(cols[2..4], ["yes", "tunnel"][..], "{row}");
    let conn_per_s: f64 = cols[4].parse().expect("CONN/S");
    assert!(conn_per_s > 0.0, "{row}");
    assert_eq!(cols[5], "100.0%", "{row}");
    // 8 MiB each way within a window of about 3 s.
    assert_eq!((cols[7], cols[9]), ("MiB/s", "MiB/s"), "{row}");
    for a in [&a1, &a2] {
        let daemon = text
            .lines()
            .find(|l| l.starts_with(a.as_str()))
            .unwrap_or_else(|| panic!("no row for daemon {a} in:\n{text}"));
        let cols: Vec<&str> = daemon.split_whitespace().collect();
        // DAEMON CPU RSS(value unit) PODS ACTIVE TUNNELS ...
        let cpu: f64 = cols[1]
            .strip_suffix('%')
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("CPU column: {daemon}"));
        assert!(
            cpu > 0.0,
            "16 MiB through it in the window took no CPU: {daemon}"
        );
        assert_eq!(cols[3], "MiB", "a daemon's RSS is MiB: {daemon}");
        assert_eq!(cols[4], "1", "one pod on each node: {daemon}");
        assert_eq!(cols[6], "1", "one tunnel on each node: {daemon}");
    }
}

/// Each daemon reports its own CPU, memory, threads and descriptors with
/// the standard process metric names, and they are the kernel's figures
/// for its process, read by the test from `/proc/<pid>`.
#[test]
fn daemons_report_their_cpu_memory_and_descriptors_as_the_standard_process_metrics() {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let lab = mesh_lab(2, 1);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    lab.transfer(&client, &server, 8080, 8 * MIB)
        .expect("8 MiB each way");
    let version = std::process::Command::new(lab.nodemesh_bin().expect("binary"))
        .arg("--version")
        .output()
        .expect("nodemesh --version");
    let version = String::from_utf8_lossy(&version.stdout);
    for node in [1, 2] {
        let pid = lab.daemon_pid(node).expect("daemon pid");
        let m = metrics(&lab, node);
        let proc_file =
            |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).expect("read /proc");
        let value = |name: &str| {
            assert!(m.iter().any(|s| s.name == name), "n{node}: no {name}");
            sum(&m, name, &[])
        };
        // Memory: VmRSS now, within what a few allocations between the two
        // readings can move it.
        let rss_kib: f64 = proc_file("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        let reported = value("process_resident_memory_bytes") / 1024.0;
        assert!(
            (reported - rss_kib).abs() <= rss_kib * 0.2,
            "n{node}: reports {reported} KiB resident, the kernel says {rss_kib}"
        );
        // CPU: it moved 8 MiB each way through a tunnel, and cannot have
        // used more than the kernel counts for it now (utime + stime).
        let stat = proc_file("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 =
            fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
        let cpu = value("process_cpu_seconds_total");
        assert!(
            cpu > 0.0 && cpu <= ticks / 100.0,
            "n{node}: reports {cpu} CPU-s, the kernel {} s now",
            ticks / 100.0
        );
        let threads: f64 = fields[17].parse().expect("threads");
        assert!(
            (value("process_threads") - threads).abs() <= 2.0,
            "n{node}: threads"
        );
        // Descriptors: the listeners, sockets and pipes it holds.
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .count() as f64;
        let open = value("process_open_fds");
        assert!(
            open > 3.0 && (open - fds).abs() <= 4.0,
            "n{node}: reports {open} open descriptors, /proc/{pid}/fd has {fds}"
        );
        let soft: f64 = proc_file("limits")
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("Max open files");
        assert_eq!(value("process_max_fds"), soft, "n{node}");
        let start = value("process_start_time_seconds");
        assert!(
            start >= started - 2.0 && start <= started + 120.0,
            "n{node}: started at {start}, the test at {started}"
        );
        assert!(
            m.iter().any(|s| s.name == "nodemesh_build_info"
                && s.value == 1.0
                && s.labels
                    .get("version")
                    .is_some_and(|v| !v.is_empty() && version.contains(v.as_str()))),
            "n{node}: nodemesh_build_info with the version of `{}`",
            version.trim()
        );
    }
}

/// Acceptance 2: Same-node: the same between two pods on one node, and no tunnel is opened.
#[test]
fn same_node_64_mib_each_way_opens_no_tunnel() {
    let lab = mesh_lab(2, 2);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(1, 2).expect("n1-p2"));
    let report = lab
        .transfer(&client, &server, 8080, 64 * MIB)
        .expect("64 MiB each way");
    assert_eq!(report.server_hash, report.sent_hash);
    assert_eq!(report.received_bytes, 64 * MIB);

    let n1 = metrics(&lab, 1);
    let local = [
        ("route", "local"),
        ("reporter", "source"),
        ("direction", "src_to_dst"),
    ];
    assert!(value(&n1, "nodemesh_tcp_bytes_total", &local) >= (64 * MIB) as f64);
    for node in [1, 2] {
        let m = metrics(&lab, node);
        assert_eq!(
            value(&m, "nodemesh_tunnel_handshakes_total", &[]),
            0.0,
            "node {node} handshook"
        );
        assert_eq!(
            value(&m, "nodemesh_tunnels_open", &[]),
            0.0,
            "node {node} has a tunnel"
        );
        assert_eq!(
            value(
                &m,
                "nodemesh_connections_opened_total",
                &[("route", "tunnel")]
            ),
            0.0
        );
    }
}

/// Pipes a process holds open (each pipe is two descriptors).
fn pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the daemon's descriptors")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// Same-node delivery runs the relay `tcp_relay` names, splice(2) by
/// default: once both directions have carried bytes, the daemon holds the
/// connection's two pipes (4 descriptors), and gives them back at its close.
/// (Same-node delivery once ignored the setting and always copied.)
#[test]
fn same_node_delivery_splices_by_default_and_releases_the_pipes() {
    let lab = mesh_lab(1, 2);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(1, 2).expect("n1-p2"));
    let daemon = lab.daemon_pid(1).expect("daemon of n1");
    let before = pipe_fds(daemon);
    let listener = server.listen(0).expect("listen");
    let addr = server.addr(listener.local_addr().expect("addr").port());
    let mut c = client.connect(addr).expect("connect through the daemon");
    c.write_all(b"ping").expect("write");
    let mut s = traffic::accept_retrying(&listener).expect("accept");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).expect("request through the relay");
    s.write_all(b"pong").expect("reply");
    c.read_exact(&mut buf).expect("reply through the relay");
    assert_eq!(&buf, b"pong");
    assert_eq!(
        pipe_fds(daemon),
        before + 4,
        "a spliced connection holds one pipe per direction"
    );
    drop(c);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pipe_fds(daemon) != before {
        assert!(
            Instant::now() < deadline,
            "the daemon still holds {} pipe descriptors after the close (had {before})",
            pipe_fds(daemon)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Node `node`'s `/config_dump`.
fn config_dump(lab: &Lab, node: usize) -> serde_json::Value {
    let r = lab.admin_get(node, "/config_dump").expect("config_dump");
    assert_eq!(r.status, 200, "config_dump of node {node}: {}", r.body);
    serde_json::from_str(&r.body).expect("config_dump json")
}

/// The tunnels node `node` lists in `/config_dump`.
fn dumped_tunnels(lab: &Lab, node: usize) -> Vec<serde_json::Value> {
    config_dump(lab, node)["tunnels"]
        .as_array()
        .expect("tunnels list")
        .clone()
}

/// Successful handshakes on `side` (`client` = dialled, `server` = accepted), summed over nodes.
fn handshakes(lab: &Lab, side: &str) -> f64 {
    [1, 2]
        .iter()
        .map(|&n| {
            value(
                &metrics(lab, n),
                "nodemesh_tunnel_handshakes_total",
                &[("side", side), ("result", "ok")],
            )
        })
        .sum()
}

/// Acceptance 3 (issue 6: tunnels equal node pairs): 200 concurrent connections each way between
/// two nodes complete over one QUIC connection for the node pair: exactly one successful
/// handshake in total, its streams going both ways at once.
#[test]
fn two_hundred_concurrent_connections_each_way_share_one_tunnel_per_node_pair() {
    let lab = mesh_lab(2, 2);
    let (a1, a2) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(1, 2).expect("n1-p2"));
    let (b1, b2) = (lab.pod(2, 1).expect("n2-p1"), lab.pod(2, 2).expect("n2-p2"));
    // n1 brings the tunnel up; then traffic both ways at once.
    lab.transfer(&a1, &b1, 0, 1024).expect("first connection");
    std::thread::scope(|s| {
        let forward = s.spawn(|| lab::transfer_many(&a1, &b1, 0, 200, 64 * 1024));
        let backward = s.spawn(|| lab::transfer_many(&b2, &a2, 0, 200, 64 * 1024));
        let f = forward.join().expect("join").expect("n1 -> n2 x200");
        let b = backward.join().expect("join").expect("n2 -> n1 x200");
        assert_eq!(f.len(), 200);
        assert_eq!(b.len(), 200);
    });
    assert_eq!(handshakes(&lab, "client"), 1.0, "one dial for the pair");
    assert_eq!(handshakes(&lab, "server"), 1.0, "one accept for the pair");
    for (node, peer, direction, dialled, source, destination) in [
        (1, "n2", "dialled", 1.0, 201.0, 200.0),
        (2, "n1", "accepted", 0.0, 200.0, 201.0),
    ] {
        let m = metrics(&lab, node);
        assert_eq!(
            value(
                &m,
                "nodemesh_tunnel_handshakes_total",
                &[("side", "client"), ("peer", peer)]
            ),
            dialled,
            "node {node} dialled {peer} {dialled} times"
        );
        assert_eq!(
            value(&m, "nodemesh_tunnels_open", &[]),
            1.0,
            "node {node} holds one tunnel"
        );
        assert_eq!(
            value(
                &m,
                "nodemesh_tunnels_open",
                &[("peer", peer), ("direction", direction)]
            ),
            1.0,
            "node {node}'s tunnel to {peer} is {direction}"
        );
        assert_eq!(
            value(&m, "nodemesh_tunnel_duplicates_closed_total", &[]),
            0.0
        );
        assert_eq!(
            value(
                &m,
                "nodemesh_connections_opened_total",
                &[("reporter", "source"), ("route", "tunnel")]
            ),
            source
        );
        assert_eq!(
            value(
                &m,
                "nodemesh_connections_opened_total",
                &[("reporter", "destination")]
            ),
            destination
        );
        let tunnels = dumped_tunnels(&lab, node);
        assert_eq!(tunnels.len(), 1, "node {node}: {tunnels:?}");
        assert_eq!(tunnels[0]["peer"], peer);
        assert_eq!(tunnels[0]["dialled_by"], "n1");
        assert_eq!(tunnels[0]["state"], "in_use");
        assert_eq!(tunnels[0]["shared"], true);
    }
}

/// Both nodes start sending to each other at the same moment, with no tunnel up: whatever the
/// dials race to, every connection completes, and the nodes converge on one tunnel. When both
/// dialled, it is the one n1 (the lower name) dialled, and n2 closes its own and counts it.
#[test]
fn simultaneous_first_use_from_both_nodes_converges_on_one_tunnel() {
    let lab = mesh_lab(2, 2);
    let (a1, a2) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(1, 2).expect("n1-p2"));
    let (b1, b2) = (lab.pod(2, 1).expect("n2-p1"), lab.pod(2, 2).expect("n2-p2"));
    std::thread::scope(|s| {
        let forward = s.spawn(|| lab::transfer_many(&a1, &b1, 0, 50, 64 * 1024));
        let backward = s.spawn(|| lab::transfer_many(&b2, &a2, 0, 50, 64 * 1024));
        forward.join().expect("join").expect("n1 -> n2 x50");
        backward.join().expect("join").expect("n2 -> n1 x50");
    });
    for node in [1, 2] {
        nodemesh_lab::certs::wait_metrics(
            &lab,
            node,
            "one tunnel left",
            Duration::from_secs(20),
            |m| value(m, "nodemesh_tunnels_open", &[]) == 1.0,
        )
        .expect("converged");
    }
    let (n1, n2) = (metrics(&lab, 1), metrics(&lab, 2));
    let open =
        |m: &[Sample], direction| value(m, "nodemesh_tunnels_open", &[("direction", direction)]);
    let left = (open(&n1, "dialled"), open(&n2, "accepted"));
    let dials = handshakes(&lab, "client");
    eprintln!("dials for the pair: {dials}; left: n1 dialled/n2 accepted {left:?}");
    match dials {
        // Both dialled: n1's (the lower name) stays, n2 closed its own.
        2.0 => assert_eq!(left, (1.0, 1.0), "n1's connection stays"),
        // One side waited for the other's handshake in flight instead of dialling.
        1.0 => assert_eq!(
            left.0 + open(&n2, "dialled"),
            1.0,
            "the one connection is what both sides use"
        ),
        other => panic!("{other} dials for one node pair"),
    }
    for m in [&n1, &n2] {
        assert!(
            value(
                m,
                "nodemesh_tunnel_handshakes_total",
                &[("side", "client"), ("result", "ok")]
            ) <= 1.0,
            "a node dials its peer at most once"
        );
    }
    assert_eq!(
        value(&n2, "nodemesh_tunnel_duplicates_closed_total", &[]),
        dials - 1.0,
        "n2 closed its dial, if both dialled"
    );
    assert_eq!(
        value(&n1, "nodemesh_tunnel_duplicates_closed_total", &[]),
        0.0
    );
    for (node, peer) in [(1, "n2"), (2, "n1")] {
        let m = metrics(&lab, node);
        assert_eq!(
            value(
                &m,
                "nodemesh_connections_opened_total",
                &[("reporter", "source"), ("route", "tunnel")]
            ),
            50.0,
            "node {node} to {peer}"
        );
        assert_eq!(
            value(&m, "nodemesh_connections_failed_total", &[]),
            0.0,
            "node {node}: no connection failed during the race"
        );
    }
}

/// Acceptance 4: Half-close: a client that shuts its write side still receives the
/// server's whole reply (which the server only starts after the client's FIN).
#[test]
fn half_closed_client_receives_the_whole_reply() {
    let lab = mesh_lab(2, 1);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    let listener = server.listen(0).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    // The server reads to EOF, and only then sends 16 MiB.
    let srv = traffic::serve(listener, 1, 16 * MIB);
    let stream = client.connect(server.addr(port)).expect("connect");
    let report = traffic::exchange(stream, 1024).expect("exchange");
    report
        .verify("half-close", 16 * MIB)
        .expect("whole reply after half-close");
    assert_eq!(report.received_bytes, 16 * MIB);
    srv.join().expect("join").expect("server");
}

/// A destination that refuses: the client's connection is reset (not closed
/// cleanly) and the failure is counted with its reason.
#[test]
fn refused_destination_resets_the_client() {
    let lab = mesh_lab(2, 1);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    // Nothing listens on 9 in the server pod; the client's connection is
    // accepted by the daemon on its node, then reset (so fast, at times,
    // that `connect` itself reports it).
    client
        .connect_expect_reset(server.addr(9), Duration::from_secs(20))
        .expect("reset");
    let n1 = metrics(&lab, 1);
    assert_eq!(
        value(
            &n1,
            "nodemesh_connections_failed_total",
            &[("reason", "connect_failed")]
        ),
        1.0
    );
    let n2 = metrics(&lab, 2);
    assert_eq!(
        value(
            &n2,
            "nodemesh_streams_rejected_total",
            &[("status", "connect_failed")]
        ),
        1.0
    );
    // Refused by the pod's kernel at once, not given up on after
    // connect_timeout_ms: the RST found its way back to L2's socket, which
    // connected from the client's address (`fwmark_reflect`).
    assert_eq!(
        value(
            &n2,
            "nodemesh_connections_failed_total",
            &[("reason", "connect_refused")]
        ),
        1.0
    );
}

/// A destination outside the mesh is reached by passthrough from the source pod.
#[test]
fn unmeshed_destination_is_passed_through() {
    let lab = mesh_lab(2, 1);
    let client = lab.pod(1, 1).expect("n1-p1");
    let node2 = lab.node(2).expect("n2").clone();
    let addr: SocketAddr = format!("{}:9090", node2.address).parse().expect("addr");
    let listener = netns::tcp_listen(&node2.netns, addr).expect("listen in node n2");
    let srv = traffic::serve(listener, 1, MIB);
    let report = traffic::exchange(client.connect(addr).expect("connect"), MIB).expect("exchange");
    report.verify("passthrough", MIB).expect("bytes intact");
    srv.join().expect("join").expect("server");
    let n1 = metrics(&lab, 1);
    assert_eq!(
        value(
            &n1,
            "nodemesh_connections_opened_total",
            &[("route", "passthrough")]
        ),
        1.0
    );
    assert_eq!(value(&n1, "nodemesh_tunnels_open", &[]), 0.0);
}

/// The address the server sees for one connection made by `connect`: the
/// peer of the next connection `listener` accepts, within 20 s (the
/// client's own connect completes at its daemon, before L2 connects).
fn peer_seen(
    listener: &std::net::TcpListener,
    connect: impl FnOnce() -> std::net::TcpStream,
) -> IpAddr {
    let listener = listener.try_clone().expect("clone listener");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept().map(|(s, peer)| (s, peer.ip())));
    });
    let mut client = connect();
    client.write_all(b"who am i").expect("write");
    let (mut server, peer) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the server accepted within 20 s")
        .expect("accept");
    let mut buf = [0u8; 8];
    server.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"who am i");
    peer
}

/// The destination pod sees the client's address, not its own: across nodes
/// (the address the stream header carries), within a node, and for a
/// plaintext client outside the mesh. The daemon installed the return path
/// in the pod; with `client_address.preserve: false` the pod sees itself.
#[test]
fn pods_see_the_clients_address_across_nodes_within_a_node_and_from_outside() {
    let mut lab = mesh_lab(2, 2);
    let server = lab.pod(2, 1).expect("n2-p1");
    let (far, near) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 2).expect("n2-p2"));
    let outside = lab.node(1).expect("n1").clone();
    let listener = server.listen(0).expect("listen");
    let dst = server.addr(listener.local_addr().expect("addr").port());

    let seen = peer_seen(&listener, || far.connect(dst).expect("connect"));
    assert_eq!(seen, IpAddr::V4(far.ip), "across nodes");
    let seen = peer_seen(&listener, || near.connect(dst).expect("connect"));
    assert_eq!(seen, IpAddr::V4(near.ip), "within the node");
    let seen = peer_seen(&listener, || {
        netns::tcp_connect(&outside.netns, dst, Duration::from_secs(5)).expect("connect")
    });
    assert_eq!(seen, IpAddr::V4(outside.address), "plaintext from node n1");

    let run = |args: &[&str]| {
        lab.exec_in(&server.netns, args[0], &args[1..])
            .expect("run in the server pod")
            .stdout_text()
    };
    assert!(
        run(&["ip", "rule"]).contains("32000:\tfrom all fwmark 0x4e4e lookup 20046"),
        "{}",
        run(&["ip", "rule"])
    );
    assert_eq!(
        run(&["ip", "route", "show", "table", "20046"]).trim(),
        "local default dev lo scope host"
    );
    assert_eq!(
        run(&["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]).trim(),
        "1"
    );
    assert_eq!(
        value(
            &metrics(&lab, 2),
            "nodemesh_pod_return_path_failures_total",
            &[]
        ),
        0.0
    );
    assert_eq!(client_address_shown(&lab, &server.name), Some(true));

    lab.update_config(2, |c| c.client_address.preserve = false)
        .expect("config");
    let status = lab.restart_daemon(2).expect("restart");
    assert!(status.success(), "n2 exited {status:?} on SIGTERM");
    let seen = peer_seen(&listener, || far.connect(dst).expect("connect"));
    assert_eq!(
        seen,
        IpAddr::V4(server.ip),
        "preserve off: from the pod itself"
    );
    assert_eq!(client_address_shown(&lab, &server.name), Some(false));
}

/// Dual-stack pods are meshed over IPv6 as over IPv4: their IPv6 TCP is
/// captured (to the daemon's `[::1]` listener), carried across nodes in a
/// stream whose header holds IPv6 addresses (verified by L2 against
/// discovery) and delivered within a node, byte-identical; the destination
/// pod sees the client's IPv6 address through the IPv6 return path. The
/// nodes route IPv6 pod CIDRs to each other, so a connection that escaped
/// capture would still arrive: the daemons' byte counters are what show the
/// mesh carried it.
#[test]
fn dual_stack_pods_are_meshed_over_ipv6_across_nodes_and_within_a_node() {
    let lab = Lab::up(LabOptions::for_test(2, 2).dual_stack())
        .expect("lab up (run `cargo build --workspace --bins` first)");
    let (client, far, near) = (
        lab.pod(1, 1).expect("n1-p1"),
        lab.pod(2, 1).expect("n2-p1"),
        lab.pod(1, 2).expect("n1-p2"),
    );
    let client6 = client.ip6.expect("n1-p1 has an IPv6 address");
    assert!(far.ip6.is_some() && near.ip6.is_some(), "{far:?} {near:?}");

    for (dst, what) in [(&far, "across nodes"), (&near, "within a node")] {
        let report = lab
            .transfer_over(&client, dst, Family::V6, 0, 4 * MIB)
            .unwrap_or_else(|e| panic!("{what} over IPv6: {e}"));
        assert_eq!(report.server_hash, report.sent_hash, "{what}");
        assert_eq!(report.received_bytes, 4 * MIB, "{what}");
    }
    // Only IPv6 traffic so far: these bytes are it, counted by the mesh.
    let edge = |reporter, route, dst: &'static str| -> [(&str, &str); 5] {
        [
            ("reporter", reporter),
            ("route", route),
            ("src_workload", "n1-p1"),
            ("dst_workload", dst),
            ("direction", "src_to_dst"),
        ]
    };
    let (n1, n2) = (metrics(&lab, 1), metrics(&lab, 2));
    for (samples, filter, what) in [
        (
            &n1,
            edge("source", "tunnel", "n2-p1"),
            "L1 sent it through the tunnel",
        ),
        (
            &n2,
            edge("destination", "tunnel", "n2-p1"),
            "L2 delivered it",
        ),
        (
            &n1,
            edge("source", "local", "n1-p2"),
            "delivered within the node",
        ),
    ] {
        assert!(
            value(samples, "nodemesh_tcp_bytes_total", &filter) >= (4 * MIB) as f64,
            "{what}: {filter:?}"
        );
    }

    for (server, what) in [(&far, "across nodes"), (&near, "within a node")] {
        let listener = server.listen_in(Family::V6, 0).expect("listen on [::]");
        let port = listener.local_addr().expect("addr").port();
        let dst = server.addr_in(Family::V6, port).expect("IPv6 address");
        let seen = peer_seen(&listener, || client.connect(dst).expect("connect"));
        assert_eq!(seen, IpAddr::V6(client6), "{what}");
    }
    let run = |args: &[&str]| {
        lab.exec_in(&far.netns, args[0], &args[1..])
            .expect("run in the server pod")
            .stdout_text()
    };
    assert!(
        run(&["ip", "-6", "rule"]).contains("32000:\tfrom all fwmark 0x4e4e lookup 20046"),
        "{}",
        run(&["ip", "-6", "rule"])
    );
    assert_eq!(
        value(&n2, "nodemesh_pod_return_path_failures_total", &[]),
        0.0
    );

    // IPv4 between the same pods still works, beside IPv6.
    let report = lab
        .transfer(&client, &far, 0, MIB)
        .expect("across nodes over IPv4");
    assert_eq!(report.server_hash, report.sent_hash);
}

/// Nodes whose addresses are IPv6 (an IPv6-only or IPv6-first underlay):
/// each daemon binds its QUIC endpoint on its node's `fd00:77::<node>`, and
/// the tunnel between the two nodes runs over IPv6 while it carries the
/// pods' IPv4 and IPv6 connections alike. The daemons report the tunnel's
/// IPv6 remote address, and its path statistics count the datagrams.
#[test]
fn tunnels_run_over_an_ipv6_underlay() {
    let lab = Lab::up(LabOptions::for_test(2, 1).ipv6_underlay())
        .expect("lab up (run `cargo build --workspace --bins` first)");
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    for family in [Family::V4, Family::V6] {
        let report = lab
            .transfer_over(&client, &server, family, 0, 2 * MIB)
            .unwrap_or_else(|e| panic!("{family:?} pods over an IPv6 underlay: {e}"));
        report
            .verify(&format!("{family:?} pods over an IPv6 underlay"), 2 * MIB)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    let tunnels = dumped_tunnels(&lab, 1);
    assert_eq!(tunnels.len(), 1, "one tunnel n1 -> n2: {tunnels:?}");
    assert_eq!(
        tunnels[0]["remote_addr"], "[fd00:77::2]:15008",
        "the tunnel runs between the nodes' IPv6 addresses: {tunnels:?}"
    );
    let n1 = metrics(&lab, 1);
    let peer = [("peer", "n2")];
    assert!(value(&n1, "nodemesh_tunnel_udp_datagrams_sent_total", &peer) > 0.0);
    assert!(
        value(
            &n1,
            "nodemesh_tcp_bytes_total",
            &[("route", "tunnel"), ("direction", "src_to_dst")]
        ) >= (4 * MIB) as f64,
        "both transfers went through the tunnel"
    );
    let prefix = lab.prefix().to_owned();
    drop(lab);
    assert_clean(&prefix);
}

/// `client_address` of pod `name` in node 2's `/config_dump`.
fn client_address_shown(lab: &Lab, name: &str) -> Option<bool> {
    config_dump(lab, 2)["local_pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?["client_address"]
        .as_bool()
}

/// A peer outside the mesh, attached to the lab's underlay at 10.77.0.99.
struct Rogue {
    netns: String,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Rogue {
    fn attach(lab: &Lab) -> Self {
        // `<prefix>-n99`: a name the lab's teardown owns, so it is removed with the lab.
        let ns = format!("{}-n99", lab.prefix());
        let ul = format!("{}-ul", lab.prefix());
        netns::add_netns(&ns).expect("rogue netns");
        for args in [
            vec![
                "-n", &ul, "link", "add", "rogue0", "type", "veth", "peer", "name", "ul0", "netns",
                &ns,
            ],
            vec!["-n", &ul, "link", "set", "rogue0", "master", "br0", "up"],
            vec!["-n", &ns, "addr", "add", "10.77.0.99/24", "dev", "ul0"],
            vec!["-n", &ns, "link", "set", "ul0", "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
        ] {
            netns::ip(args).expect("ip");
        }
        Self {
            netns: ns,
            addr: "10.77.0.99:0".parse().expect("addr"),
            dir: tempfile::tempdir().expect("tmp"),
        }
    }

    /// Credentials for `node`, signed by `ca`, trusting the bundle PEMs given.
    fn credentials(&self, ca: &certs::GeneratedCa, node: &str, trust: &[&str]) -> Credentials {
        let (cert, key) = certs::issue_node(ca, TD, node, 1, 0).expect("issue");
        let p = |f: &str| -> PathBuf { self.dir.path().join(f) };
        std::fs::write(p("cert.pem"), cert).expect("write");
        std::fs::write(p("key.pem"), key).expect("write");
        std::fs::write(p("bundle.pem"), trust.concat()).expect("write");
        let tls = TlsConfig {
            cert: p("cert.pem"),
            key: p("key.pem"),
            bundle: p("bundle.pem"),
            ..TlsConfig::default()
        };
        Credentials::load(&tls, TD, node).expect("rogue credentials")
    }

    fn endpoint(&self, creds: &Credentials) -> quinn::Endpoint {
        let udp = netns::udp_bind(&self.netns, self.addr).expect("udp in rogue netns");
        let mut ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            udp,
            quinn::default_runtime().expect("runtime"),
        )
        .expect("endpoint");
        let tls = identity::client_config(creds, TD).expect("client tls");
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        ep
    }
}

fn lab_ca(lab: &Lab) -> certs::GeneratedCa {
    certs::read_ca(&lab.cert_dir()).expect("lab CA")
}

fn tunnel_addr(lab: &Lab, node: usize) -> SocketAddr {
    format!("{}:15008", lab.node(node).expect("node").address)
        .parse()
        .expect("addr")
}

fn log_of(lab: &Lab, node: usize) -> String {
    std::fs::read_to_string(lab.daemon_log(node).expect("log path")).expect("read log")
}

/// Acceptance 5: A peer presenting a certificate from another CA, or one naming a node
/// the mesh does not know, cannot open a tunnel; the refusal is logged and counted.
#[test]
fn rogue_peers_cannot_open_a_tunnel_and_are_logged_and_counted() {
    let lab = mesh_lab(2, 1);
    let rogue = Rogue::attach(&lab);
    let real_ca = lab_ca(&lab);
    let other_ca = certs::generate_ca(TD, 1).expect("other CA");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let target = tunnel_addr(&lab, 2);

    // (a) Claims to be n1 (a real node) with a certificate from another CA. It
    // trusts the real CA, so it is the server (n2) that has to refuse it.
    let forged = rogue.credentials(&other_ca, "n1", &[&real_ca.cert_pem, &other_ca.cert_pem]);
    // (b) A real-CA certificate for n9, which discovery does not list.
    let unknown = rogue.credentials(&real_ca, "n9", &[&real_ca.cert_pem]);
    for (creds, reason) in [(&forged, "untrusted_chain"), (&unknown, "unknown_node")] {
        let outcome = rt.block_on(async {
            let ep = rogue.endpoint(creds);
            let res = match ep.connect(target, "n2") {
                Ok(c) => match tokio::time::timeout(Duration::from_secs(10), c).await {
                    Ok(Ok(conn)) => {
                        // TLS 1.3: the client may finish before the server
                        // has checked its certificate; the server then closes.
                        let closed =
                            tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
                        Err(format!("closed by server: {closed:?}"))
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Ok("handshake hung"),
                },
                Err(e) => Err(e.to_string()),
            };
            ep.close(0u32.into(), b"");
            res
        });
        assert!(
            outcome.is_err(),
            "{reason}: rogue got a tunnel: {outcome:?}"
        );
        let n2 = metrics(&lab, 2);
        assert_eq!(
            value(
                &n2,
                "nodemesh_tunnel_peer_refused_total",
                &[("side", "server"), ("reason", reason)]
            ),
            1.0,
            "n2 counted the {reason} refusal"
        );
        let log = log_of(&lab, 2);
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(reason)),
            "n2 logged the {reason} refusal:\n{log}"
        );
    }
    // The real peers are unaffected.
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    lab.transfer(&client, &server, 8080, MIB)
        .expect("real traffic still flows");
}

/// Acceptance 6: A malformed or oversized stream header from an authenticated peer gets
/// its stream reset with the right status; the daemon keeps serving.
#[test]
fn malformed_headers_reset_the_stream_with_the_right_status_and_the_daemon_keeps_serving() {
    let mut lab = mesh_lab(2, 1);
    let rogue = Rogue::attach(&lab);
    // Make the rogue a known node n3 (authenticated), by adding it to discovery.
    let mut model = lab.state().cluster_model();
    model.nodes.push(nodemesh::discovery::model::Node {
        name: "n3".into(),
        address: "10.77.0.99".parse().expect("ip"),
        pod_cidrs: vec![],
    });
    nodemesh_lab::daemon::write_discovery(&lab.state().discovery_file(), &model)
        .expect("discovery");
    let creds = rogue.credentials(&lab_ca(&lab), "n3", &[&lab_ca(&lab).cert_pem]);
    let target = tunnel_addr(&lab, 2);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let ep = rogue.endpoint(&creds);
        // The daemons poll discovery: retry the handshake until n3 is known.
        let deadline = Instant::now() + Duration::from_secs(15);
        let conn = loop {
            let attempt = async { ep.connect(target, "n2").ok()?.await.ok() };
            if let Some(c) = tokio::time::timeout(Duration::from_secs(5), attempt)
                .await
                .ok()
                .flatten()
            {
                // Survives the server's certificate check?
                if tokio::time::timeout(Duration::from_millis(300), c.closed())
                    .await
                    .is_err()
                {
                    break c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "n2 never accepted the known node n3"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let cases: [(&[u8], u64, &str); 3] = [
            (&[1, 0xff, 0xff], 4, "oversized (body length 65535)"),
            (&[9, 0, 4, 1, 2, 3, 4], 5, "unsupported version 9"),
            (&[1, 0, 4, 0x7f, 1, 0, 0], 4, "unknown critical field"),
        ];
        for (bytes, code, what) in cases {
            let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
            send.write_all(bytes).await.expect("write");
            let _ = send.finish();
            let mut buf = [0u8; 64];
            let res = tokio::time::timeout(Duration::from_secs(15), recv.read(&mut buf))
                .await
                .expect("answer in time");
            match res {
                Err(quinn::ReadError::Reset(c)) => assert_eq!(c.into_inner(), code, "{what}"),
                other => panic!("{what}: expected a reset with code {code}, got {other:?}"),
            }
        }
        assert!(conn.close_reason().is_none(), "the tunnel itself stays up");
        conn.close(0u32.into(), b"");
        ep.close(0u32.into(), b"");
    });
    let n2 = metrics(&lab, 2);
    assert_eq!(
        value(
            &n2,
            "nodemesh_streams_rejected_total",
            &[("peer", "n3"), ("status", "bad_header")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &n2,
            "nodemesh_streams_rejected_total",
            &[("peer", "n3"), ("status", "unsupported_version")]
        ),
        1.0
    );
    // The daemon keeps serving real streams.
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    lab.transfer(&client, &server, 8080, MIB)
        .expect("real traffic after malformed headers");
    lab.restart_daemon(2)
        .expect("daemon n2 still exits cleanly on SIGTERM");
}

/// `net.ipv4.tcp_tw_reuse` inside `netns`.
fn tw_reuse(lab: &Lab, netns: &str) -> String {
    lab.exec_in(netns, "cat", &["/proc/sys/net/ipv4/tcp_tw_reuse"])
        .expect("read tcp_tw_reuse")
        .stdout_text()
        .trim()
        .to_owned()
}

/// Acceptance 7: After SIGTERM and restart of a daemon, new connections from existing
/// pods work again without calling the CNI.
#[test]
fn restarted_daemons_serve_existing_pods_without_the_cni() {
    let mut lab = mesh_lab(2, 1);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    lab.transfer(&client, &server, 8080, MIB)
        .expect("before restart");
    let cni_logs: Vec<String> = [1, 2]
        .iter()
        .map(|n| {
            std::fs::read_to_string(lab.dir().join(format!("n{n}/cni.log"))).unwrap_or_default()
        })
        .collect();
    // The daemons set tcp_tw_reuse in their pods; put the kernel default
    // back in one, so the restore is seen to set it again.
    assert_eq!(tw_reuse(&lab, &server.netns), "1");
    lab.exec_in(&server.netns, "sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=2"])
        .expect("sysctl");
    for node in [1, 2] {
        let status = lab.restart_daemon(node).expect("restart");
        assert!(status.success(), "node {node} exited {status:?} on SIGTERM");
    }
    lab.transfer(&client, &server, 8080, 4 * MIB)
        .expect("after restart of both daemons");
    assert_eq!(tw_reuse(&lab, &server.netns), "1", "set again on restore");
    for (i, node) in [1, 2].into_iter().enumerate() {
        let after =
            std::fs::read_to_string(lab.dir().join(format!("n{node}/cni.log"))).unwrap_or_default();
        assert_eq!(
            after, cni_logs[i],
            "the CNI plugin was not called again on node {node}"
        );
        let log = log_of(&lab, node);
        assert!(
            log.contains("restored=1"),
            "node {node} restored its pod:\n{log}"
        );
    }
}

/// Acceptance 8: After `down`, and after a failing test, nothing the lab made remains.
#[test]
fn nothing_remains_after_down_or_after_a_failing_test() {
    let lab = mesh_lab(2, 1);
    let prefix = lab.prefix().to_owned();
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    lab.transfer(&client, &server, 8080, MIB).expect("traffic");
    let problems = lab.down();
    assert!(problems.is_empty(), "{problems:?}");
    assert_clean(&prefix);

    let mut failed_prefix = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = mesh_lab(2, 1);
        failed_prefix = lab.prefix().to_owned();
        let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
        // Leave a connection open through both daemons, then fail.
        let l = server.listen(7070).expect("listen");
        let mut c = client.connect(server.addr(7070)).expect("connect");
        let (_s, _) = l.accept().expect("accept");
        c.write_all(b"hello").expect("write");
        let _ = c.shutdown(Shutdown::Write);
        panic!("deliberate failure with a lab up and a connection open");
    }));
    assert!(result.is_err(), "the body failed");
    assert!(!failed_prefix.is_empty());
    assert_clean(&failed_prefix);
    // No nodemesh table was ever added to this (the host's) namespace.
    let out = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("nodemesh"),
        "host netns has a nodemesh table"
    );
}

/// SIGTERM drains: a connection open through the daemon completes, new
/// connections are refused while draining, and the daemon exits 0.
#[test]
fn sigterm_drains_open_connections_then_exits_zero() {
    let mut lab = mesh_lab(2, 1);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    let listener = server.listen(0).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let srv = traffic::serve(listener, 1, MIB);
    let mut stream = client.connect(server.addr(port)).expect("connect");
    // Half of the request now, the rest during the drain.
    let payload = vec![7u8; MIB as usize];
    stream
        .write_all(&payload[..MIB as usize / 2])
        .expect("first half");
    // The connection must be in the daemon's hands (accepted and relaying),
    // not still in its listen backlog, before SIGTERM: wait (bounded) for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&metrics(&lab, 1), "nodemesh_connections_active", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "n1 never took the connection");
        std::thread::sleep(Duration::from_millis(20));
    }
    let node = lab.node(1).expect("n1").clone();
    let admin = node.daemon.as_ref().expect("meshed").admin;
    std::thread::scope(|s| {
        let stopper = s.spawn(|| lab.stop_daemon(1));
        // Wait (bounded) until the daemon reports draining.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match nodemesh_lab::http::get(&node.netns, admin, "/ready", Duration::from_secs(2)) {
                Ok(r) if r.status == 503 && r.body.contains("draining") => break,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "daemon n1 never reported draining"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Draining stops accepting: the pod's capture listener closes (the
        // accept tasks see the shutdown right after /ready turns), and new
        // connections from the pod are then refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ss = netns::exec_in(&client.netns, "ss", ["-ltnH"]).expect("ss");
            if !ss.stdout_text().contains("127.0.0.1:15001") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the outbound listener stayed open while draining"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let refused = client.connect(server.addr(port));
        assert!(
            refused.is_err(),
            "a new connection was accepted while draining"
        );
        // The open one completes.
        stream
            .write_all(&payload[MIB as usize / 2..])
            .expect("second half during drain");
        stream.shutdown(Shutdown::Write).expect("half-close");
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).expect("reply during drain");
        assert_eq!(
            reply.len() as u64,
            MIB + 32,
            "1 MiB reply plus the server's SHA-256"
        );
        let status = stopper.join().expect("join").expect("stop");
        assert!(status.success(), "exit status {status:?}");
    });
    srv.join().expect("join").expect("server");
}

/// Unregistering a pod (CNI DEL) closes its listeners and its open connections.
#[test]
fn unregister_closes_the_pods_listeners_and_connections() {
    let lab = mesh_lab(2, 1);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    let listener = server.listen(7070).expect("listen");
    let mut c = client.connect(server.addr(7070)).expect("connect");
    let (_accepted, _) = listener.accept().expect("accept");
    c.write_all(b"ping").expect("write");

    let pod = lab
        .state()
        .pods
        .iter()
        .find(|p| p.node == 1 && p.index == 1)
        .expect("state")
        .clone();
    let socket = lab
        .node(1)
        .expect("n1")
        .daemon
        .as_ref()
        .expect("meshed")
        .cni_socket
        .clone();
    let line = nodemesh_cni::proto::encode_line(&nodemesh_cni::proto::Request::Unregister {
        container_id: pod.invocation.container_id.clone(),
    })
    .expect("encode");
    let mut unix = std::os::unix::net::UnixStream::connect(&socket).expect("cni socket");
    unix.write_all(&line).expect("send");
    let mut answer = String::new();
    unix.read_to_string(&mut answer).expect("answer");
    assert!(answer.contains("unregistered"), "{answer}");

    // The open connection is closed by the daemon ...
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    match c.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("connection still open, read {n} bytes"),
    }
    // ... and the pod's capture listener is gone (its rules stay until CNI DEL
    // removes them, so a new connection is refused rather than leaking out).
    let out = lab.exec_in(&client.netns, "ss", &["-ltnH"]).expect("ss");
    assert!(
        !out.stdout_text().contains(":15001"),
        "listener still there:\n{}",
        out.stdout_text()
    );
    let m = metrics(&lab, 1);
    assert_eq!(value(&m, "nodemesh_pods_registered", &[]), 0.0);
}

/// Issue 3: a pod annotated `nodemesh.io/inject: disabled` (known to the
/// daemon through discovery before its CNI ADD, as in Kubernetes) is passed
/// through untouched: ADD succeeds, no capture table, no registration, and its
/// traffic does not go through the daemon.
#[test]
fn pods_annotated_inject_disabled_are_passed_through_untouched() {
    use nodemesh::discovery::model::{ClusterModel, Pod, INJECT_ANNOTATION};
    let mut lab = mesh_lab(2, 1);
    let opted_out = Pod {
        namespace: "lab".into(),
        name: "n1-p2".into(), // the next pod add_pod(1) creates
        service_account: "default".into(),
        node: "n1".into(),
        ips: vec![], // pending: no address before ADD
        labels: Default::default(),
        annotations: [(INJECT_ANNOTATION.to_owned(), "disabled".to_owned())].into(),
    };
    lab.set_discovery_extra(ClusterModel {
        pods: vec![opted_out],
        ..ClusterModel::default()
    })
    .expect("publish the annotated pod");
    let pod = lab
        .add_pod(1)
        .expect("CNI ADD succeeds for an opted-out pod");
    assert_eq!(pod.name, "n1-p2");
    let tables = lab
        .exec_in(&pod.netns, "nft", &["list", "tables"])
        .expect("nft");
    assert!(
        !tables.stdout_text().contains("nodemesh"),
        "capture rules installed:\n{}",
        tables.stdout_text()
    );
    let listeners = lab.exec_in(&pod.netns, "ss", &["-ltnH"]).expect("ss");
    assert!(
        !listeners.stdout_text().contains(":15001"),
        "{}",
        listeners.stdout_text()
    );
    // Its namespace is untouched, while the meshed pod's is tuned.
    let meshed = lab.pod(1, 1).expect("n1-p1");
    assert_eq!(tw_reuse(&lab, &pod.netns), "2", "kernel default kept");
    assert_eq!(tw_reuse(&lab, &meshed.netns), "1", "set at registration");
    let m = metrics(&lab, 1);
    assert_eq!(
        value(
            &m,
            "nodemesh_cni_requests_total",
            &[("op", "register"), ("result", "skipped")]
        ),
        1.0
    );
    assert_eq!(
        value(&m, "nodemesh_pods_registered", &[]),
        1.0,
        "only n1-p1 is meshed"
    );
    // Its traffic goes straight to the server: nothing is counted by n1.
    let server = lab.pod(2, 1).expect("n2-p1");
    let before = value(&m, "nodemesh_connections_opened_total", &[]);
    lab.transfer(&pod, &server, 8080, MIB)
        .expect("direct traffic");
    let after = value(&metrics(&lab, 1), "nodemesh_connections_opened_total", &[]);
    assert_eq!(
        before, after,
        "the opted-out pod's connection went through the daemon"
    );
}

/// A pod deleted while its node's daemon is down: CNI DEL removes the rules
/// and queues the unregister; the daemon delivers it when it starts, so the
/// pod is not restored.
#[test]
fn unregister_queued_while_the_daemon_is_down_is_delivered_at_start() {
    let mut lab = mesh_lab(1, 2);
    let pod = lab
        .state()
        .pods
        .iter()
        .find(|p| p.node == 1 && p.index == 2)
        .expect("n1-p2")
        .clone();
    let node = lab.node(1).expect("n1").clone();
    lab.stop_daemon(1).expect("stop n1");
    let runtime = nodemesh_lab::cni::Runtime {
        conflist: node.conflist.clone(),
        cni_path: lab.state().cni_path.clone(),
        exec_netns: node.netns.clone(),
    };
    runtime
        .del(&pod.invocation, pod.result.as_ref())
        .expect("CNI DEL succeeds with the daemon down");
    let queued = lab
        .dir()
        .join("n1/cni/queue")
        .join(format!("{}.json", pod.invocation.container_id));
    assert!(queued.exists(), "unregister queued at {}", queued.display());
    lab.start_daemon(1).expect("start n1");
    assert!(!queued.exists(), "the daemon consumed the queue entry");
    let log = log_of(&lab, 1);
    assert!(log.contains("dequeued=1"), "{log}");
    assert!(log.contains("restored=1"), "only n1-p1 comes back:\n{log}");
    assert_eq!(
        value(&metrics(&lab, 1), "nodemesh_pods_registered", &[]),
        1.0
    );
}

/// The access log lines (target `nodemesh::access`) in node `node`'s daemon
/// log, parsed (JSON lines only: the log format is switched on restart).
fn access_lines(lab: &Lab, node: usize) -> Vec<serde_json::Value> {
    log_of(lab, node)
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "nodemesh::access")
        .collect()
}

/// Waits until node `node`'s daemon has written `n` access log lines.
fn wait_access_lines(lab: &Lab, node: usize, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = access_lines(lab, node);
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "n{node}: {} access log lines, expected {n}:\n{lines:#?}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `access_log: true` makes each daemon that handled a connection write one
/// JSON line for it when it ends: the workload labels, result, duration and
/// bytes, inside the connection's span (client and server addresses); a
/// connection that failed before relaying gets a line with its reason. Off
/// (the default), nothing is written.
#[test]
fn access_logs_write_one_json_line_per_connection_on_each_daemon_when_enabled() {
    let mut lab = mesh_lab(2, 1);
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    lab.transfer(&client, &server, 7100, 64 * 1024)
        .expect("transfer")
        .verify("with access logs off", 64 * 1024)
        .expect("bytes intact");
    for n in [1, 2] {
        assert!(
            !log_of(&lab, n).contains("nodemesh::access"),
            "n{n} wrote access lines with access_log off"
        );
        lab.update_config(n, |c| {
            c.access_log = true;
            c.log_format = nodemesh::config::LogFormat::Json;
        })
        .expect("config");
        lab.restart_daemon(n).expect("restart");
    }
    // 256 KiB up, 1 MiB back: the line must tell the directions apart.
    const UP: u64 = 256 * 1024;
    let srv = traffic::serve(server.listen(7100).expect("listen"), 1, MIB);
    let report = traffic::exchange(client.connect(server.addr(7100)).expect("connect"), UP)
        .expect("exchange");
    report
        .verify("with access logs on", MIB)
        .expect("reply intact");
    let served = srv.join().expect("join").expect("server");
    assert_eq!(served.len(), 1);
    // Nothing listens on 9: L2's connect fails, L1 resets the client.
    client
        .connect_expect_reset(server.addr(9), Duration::from_secs(20))
        .expect("reset");

    let server_addr = server.addr(7100).to_string();
    for (node, reporter, failed_reason) in [
        (1, "source", "connect_failed"),
        (2, "destination", "connect_refused"),
    ] {
        let lines = wait_access_lines(&lab, node, 2);
        assert_eq!(lines.len(), 2, "n{node}: {lines:#?}");
        let ok = &lines[0];
        let f = &ok["fields"];
        assert_eq!(ok["level"], "INFO");
        assert_eq!(f["reporter"], reporter, "{ok}");
        assert_eq!(f["result"], "ok", "{ok}");
        assert_eq!(f["route"], "tunnel");
        assert_eq!(f["tls"], true);
        assert_eq!(f["src_workload"], client.name.as_str());
        assert_eq!(f["dst_workload"], server.name.as_str());
        assert_eq!(f["bytes_src_to_dst"], UP, "{ok}");
        // The reply and the server's hash trailer.
        assert_eq!(
            f["bytes_dst_to_src"],
            MIB + traffic::HASH_LEN as u64,
            "{ok}"
        );
        assert!(f["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{ok}");
        let spans = ok["spans"].as_array().expect("spans");
        assert!(
            spans
                .iter()
                .any(|s| s["server.addr"] == server_addr.as_str()),
            "n{node}: the line carries the connection's span: {ok}"
        );
        let failed = &lines[1]["fields"];
        assert_eq!(failed["result"], "failed", "{}", lines[1]);
        assert_eq!(failed["reason"], failed_reason, "{}", lines[1]);
    }
}

/// `nodemesh log-level`, run on the node as an operator would (in the
/// daemon's network namespace), shows the daemon's log filter and changes it
/// at once; a filter that does not parse is refused and the old one stays;
/// from a pod the change is refused (403), even through the mesh.
#[test]
fn the_log_filter_changes_at_run_time_from_the_node_only() {
    let lab = mesh_lab(2, 1);
    let bin = lab
        .nodemesh_bin()
        .expect("meshed lab")
        .to_string_lossy()
        .into_owned();
    let node = lab.node(1).expect("n1").clone();
    let admin = format!("{}:15020", node.address);
    let cli = |netns: &str, args: &[&str]| {
        let mut all = vec!["log-level", "--admin", &admin];
        all.extend_from_slice(args);
        netns::exec_in(netns, &bin, all)
    };
    let text = |o: nodemesh_lab::exec::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(text(cli(&node.netns, &[]).expect("show")), "info\n");
    assert_eq!(
        text(cli(&node.netns, &["info,nodemesh=debug"]).expect("set")),
        "log filter: info,nodemesh=debug (was: info)\n"
    );
    assert_eq!(
        text(cli(&node.netns, &[]).expect("show")),
        "info,nodemesh=debug\n"
    );
    // In force at once: a connection's close is logged at debug now.
    let (client, server) = (lab.pod(1, 1).expect("n1-p1"), lab.pod(2, 1).expect("n2-p1"));
    lab.transfer(&client, &server, 7200, 1024)
        .expect("transfer")
        .verify("after the change", 1024)
        .expect("bytes intact");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log_of(&lab, 1).contains("connection closed") {
        assert!(
            Instant::now() < deadline,
            "no debug line:\n{}",
            log_of(&lab, 1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A bad filter is refused, naming the problem; the old one stays.
    match cli(&node.netns, &["info,=x="]) {
        Err(e) => assert!(e.to_string().contains("is not valid"), "{e}"),
        Ok(o) => panic!("accepted: {}", text(o)),
    }
    // From a pod (captured, then passed through from the pod's address).
    match cli(&client.netns, &["trace"]) {
        Err(e) => assert!(e.to_string().contains("403"), "{e}"),
        Ok(o) => panic!("a pod changed the filter: {}", text(o)),
    }
    assert_eq!(
        text(cli(&node.netns, &[]).expect("show")),
        "info,nodemesh=debug\n"
    );
}
