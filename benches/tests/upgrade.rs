//! Zero-downtime upgrade of the daemon (issue 4, DESIGN §8), end to end: a
//! second daemon process starts beside the running one on a node, takes over
//! (`nodemesh::handover`), and the old one drains and exits on SIGTERM, as a
//! DaemonSet rolling update with `maxSurge: 1` does it. Privileged (root);
//! needs `cargo build --workspace --bins` first.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nodemesh_lab::lab::{Lab, LabOptions, PodHandle};
use nodemesh_lab::metrics::{sum, Sample};
use nodemesh_lab::traffic::Pattern;

const MIB: u64 = 1 << 20;
/// Drain deadline of the daemons in these tests: long enough for the
/// long-lived connections to finish after their daemon's SIGTERM.
const DRAIN_MS: u64 = 30_000;
/// How long a test waits for anything to happen before failing.
const PATIENCE: Duration = Duration::from_secs(30);

fn mesh_lab(nodes: usize, pods: usize) -> Lab {
    Lab::up(LabOptions::for_test(nodes, pods))
        .expect("lab up (run `cargo build --workspace --bins` first)")
}

fn metrics(lab: &Lab, node: usize) -> Vec<Sample> {
    lab.metrics(node).expect("scrape metrics")
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after [`PATIENCE`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An echo server in a pod: every connection gets back what it sent, then
/// EOF. Runs until `stop`.
fn echo_server(pod: &PodHandle, stop: Arc<AtomicBool>) -> (SocketAddr, JoinHandle<()>) {
    let listener = pod.listen(0).expect("listen");
    let addr = pod.addr(listener.local_addr().expect("addr").port());
    listener.set_nonblocking(true).expect("nonblocking");
    let handle = std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((s, _)) => {
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(PATIENCE));
                        let (mut r, mut w) = (&s, &s);
                        if std::io::copy(&mut r, &mut w).is_ok() {
                            let _ = s.shutdown(Shutdown::Write);
                        }
                    });
                }
                // Server loop idling between clients, not synchronisation.
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    (addr, handle)
}

/// Counts of one client loop.
#[derive(Debug, Default)]
struct Stats {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// One short connection: 4 KiB there, the same 4 KiB back, both closed.
fn exchange(src: &PodHandle, dst: SocketAddr, seed: u64) -> Result<(), String> {
    let mut s = src.connect(dst).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(PATIENCE))
        .map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; 4096];
    Pattern::new(seed).fill(&mut payload);
    s.write_all(&payload).map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("half-close: {e}"))?;
    let mut back = Vec::with_capacity(payload.len());
    s.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != payload {
        return Err(format!("echo differs: {} bytes back", back.len()));
    }
    Ok(())
}

/// Opens new connections from `src` to `dst` back to back until `stop`.
fn client_loop(
    name: &'static str,
    src: PodHandle,
    dst: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut seed = 0u64;
        while !stop.load(Ordering::SeqCst) {
            seed += 1;
            match exchange(&src, dst, seed) {
                Ok(()) => {
                    stats.ok.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut errors) = stats.errors.lock() {
                        errors.push(format!("{name} #{seed}: {e}"));
                    }
                }
            }
        }
    })
}

/// A connection that streams until told to stop, and checks the echo.
struct LongLived {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    writer: JoinHandle<std::io::Result<u64>>,
    reader: JoinHandle<std::io::Result<(u64, bool)>>,
}

const CHUNK: usize = 16 * 1024;

impl LongLived {
    fn open(src: &PodHandle, dst: SocketAddr, seed: u64) -> Self {
        let stream = src.connect(dst).expect("long-lived connect");
        stream
            .set_read_timeout(Some(PATIENCE))
            .expect("read timeout");
        let (stop, sent, echoed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let mut w = stream.try_clone().expect("clone");
        let writer = std::thread::spawn({
            let (stop, sent) = (stop.clone(), sent.clone());
            move || -> std::io::Result<u64> {
                let mut pattern = Pattern::new(seed);
                let mut buf = vec![0u8; CHUNK];
                while !stop.load(Ordering::SeqCst) {
                    pattern.fill(&mut buf);
                    w.write_all(&buf)?;
                    sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
                    // Paced: ~3 MiB/s, a long stream that stays open.
                    std::thread::sleep(Duration::from_millis(5));
                }
                w.shutdown(Shutdown::Write)?;
                Ok(sent.load(Ordering::SeqCst))
            }
        });
        let mut r: TcpStream = stream;
        let reader = std::thread::spawn({
            let echoed = echoed.clone();
            move || -> std::io::Result<(u64, bool)> {
                let mut pattern = Pattern::new(seed);
                let mut expect = vec![0u8; CHUNK];
                let mut got = vec![0u8; CHUNK];
                let mut same = true;
                loop {
                    // Whole chunks: the pattern is compared chunk by chunk.
                    match r.read_exact(&mut got) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                        Err(e) => return Err(e),
                    }
                    pattern.fill(&mut expect);
                    same &= got == expect;
                    echoed.fetch_add(CHUNK as u64, Ordering::SeqCst);
                }
                Ok((echoed.load(Ordering::SeqCst), same))
            }
        });
        Self {
            stop,
            sent,
            echoed,
            writer,
            reader,
        }
    }

    /// Waits until `bytes` more were echoed back than now.
    fn wait_progress(&self, what: &str, bytes: u64) {
        let start = self.echoed.load(Ordering::SeqCst);
        wait_until(what, || self.echoed.load(Ordering::SeqCst) >= start + bytes);
    }

    /// Stops sending; returns the bytes sent once everything came back intact.
    fn finish(self, what: &str) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self
            .writer
            .join()
            .expect("writer thread")
            .unwrap_or_else(|e| panic!("{what}: sending failed: {e}"));
        let (echoed, same) = self
            .reader
            .join()
            .expect("reader thread")
            .unwrap_or_else(|e| panic!("{what}: receiving failed: {e}"));
        assert_eq!(echoed, sent, "{what}: every byte came back");
        assert!(same, "{what}: the echo is byte-identical");
        assert_eq!(self.sent.load(Ordering::SeqCst), sent);
        sent
    }
}

fn log_of(lab: &Lab, node: usize) -> String {
    std::fs::read_to_string(lab.daemon_log(node).expect("log path")).unwrap_or_default()
}

/// Upgrades `node`'s daemon while `long` streams through the old one: the
/// successor takes over, the old daemon gets SIGTERM, drains until `long`
/// is done (it keeps streaming during the drain), and exits 0.
fn upgrade(lab: &mut Lab, node: usize, long: Vec<LongLived>) {
    for l in &long {
        l.wait_progress("the long-lived connection to stream", MIB);
    }
    let old = lab.start_successor(node).expect("successor takes over");
    let new = lab.daemon_pid(node).expect("successor pid");
    assert_ne!(old, new);
    let log = lab.daemon_log(node).expect("log path");
    let before = std::fs::read_to_string(&log).unwrap_or_default().len();
    std::thread::scope(|s| {
        let stopper =
            s.spawn(|| lab.stop_predecessor(node, Duration::from_millis(DRAIN_MS + 20_000)));
        // The old daemon is draining (its log says so) while the long-lived
        // connections still stream through it.
        wait_until("the old daemon to drain", || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .get(before..)
                .is_some_and(|t| t.contains("draining connections"))
        });
        for l in &long {
            l.wait_progress("streaming during the drain", MIB);
        }
        for (i, l) in long.into_iter().enumerate() {
            let sent = l.finish(&format!("n{node} long-lived #{i}"));
            assert!(sent >= 2 * MIB, "streamed {sent} bytes");
        }
        let status = stopper.join().expect("stopper").expect("stop");
        assert!(status.success(), "old daemon of n{node} exited {status:?}");
    });
}

/// Rolling upgrade of both daemons of a 2-node lab while clients keep
/// opening connections (cross-node both ways, same-node on both nodes) and
/// long-lived connections stream through the old daemons: no client
/// connection fails, the long ones complete intact, the old daemons exit 0
/// after draining, the new ones carry the traffic, and no tunnel is reset.
#[test]
fn rolling_upgrade_of_both_daemons_loses_no_connection() {
    let mut lab = mesh_lab(2, 2);
    for node in [1, 2] {
        lab.update_config(node, |c| c.drain_timeout_ms = DRAIN_MS)
            .expect("config");
        let status = lab
            .restart_daemon(node)
            .expect("restart with the long drain");
        assert!(status.success());
    }
    let pod = |n, k| lab.pod(n, k).expect("pod");
    let (n1p1, n1p2, n2p1, n2p2) = (pod(1, 1), pod(1, 2), pod(2, 1), pod(2, 2));
    let stop_servers = Arc::new(AtomicBool::new(false));
    let mut servers = Vec::new();
    let mut addr = std::collections::HashMap::new();
    for p in [&n1p1, &n1p2, &n2p1, &n2p2] {
        let (a, h) = echo_server(p, stop_servers.clone());
        addr.insert(p.name.clone(), a);
        servers.push(h);
    }
    let stop_clients = Arc::new(AtomicBool::new(false));
    let loops: Vec<(&str, PodHandle, SocketAddr)> = vec![
        ("n1->n2", n1p1.clone(), addr[&n2p1.name]),
        ("n2->n1", n2p2.clone(), addr[&n1p2.name]),
        ("n1 local", n1p2.clone(), addr[&n1p1.name]),
        ("n2 local", n2p1.clone(), addr[&n2p2.name]),
    ];
    let mut stats = Vec::new();
    let mut clients = Vec::new();
    for (name, src, dst) in loops {
        let st = Arc::new(Stats::default());
        clients.push(client_loop(
            name,
            src,
            dst,
            stop_clients.clone(),
            st.clone(),
        ));
        stats.push((name, st));
    }
    let oks = |stats: &[(&str, Arc<Stats>)]| -> Vec<u64> {
        stats
            .iter()
            .map(|(_, s)| s.ok.load(Ordering::SeqCst))
            .collect()
    };
    let every_loop_advanced = |stats: &[(&str, Arc<Stats>)], since: &[u64], by: u64| {
        let now = oks(stats);
        now.iter().zip(since).all(|(n, s)| *n >= s + by)
    };
    let start = oks(&stats);
    wait_until("every client loop to run", || {
        every_loop_advanced(&stats, &start, 5)
    });

    // Node 1: a long-lived connection through the old n1 daemon (L1).
    let long1 = LongLived::open(&n1p2, addr[&n2p2.name], 11);
    let before1 = oks(&stats);
    upgrade(&mut lab, 1, vec![long1]);
    let after1 = oks(&stats);

    // Node 2: long-lived connections through the old n2 daemon, as L2 on the
    // tunnel the new n1 dialled to it (the QUIC steering on the receiving
    // side) and as L1 towards the new n1.
    let long2 = LongLived::open(&n1p2, addr[&n2p2.name], 21);
    let long3 = LongLived::open(&n2p1, addr[&n1p1.name], 31);
    upgrade(&mut lab, 2, vec![long2, long3]);
    let after2 = oks(&stats);
    wait_until("every client loop to run after the upgrades", || {
        every_loop_advanced(&stats, &after2, 5)
    });

    stop_clients.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("client loop");
    }
    stop_servers.store(true, Ordering::SeqCst);
    for s in servers {
        s.join().expect("server");
    }
    // What the daemons (old and new, one log per node) said, for a failure.
    let warnings = |lab: &Lab| -> String {
        [1, 2]
            .iter()
            .flat_map(|n| {
                log_of(lab, *n)
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(|l| format!("n{n}: {l}"))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut total = 0;
    for (name, st) in &stats {
        let errors = st.errors.lock().expect("errors").clone();
        if st.failed.load(Ordering::SeqCst) > 0 {
            panic!(
                "{name}: failed connections: {errors:#?}\ndaemon warnings:\n{}",
                warnings(&lab)
            );
        }
        total += st.ok.load(Ordering::SeqCst);
    }
    eprintln!(
        "connections: {total} ok, 0 failed; per loop before/after n1/after n2: {before1:?} {after1:?} {after2:?}"
    );
    // Connections were opened while each upgrade ran, on every loop.
    assert!(
        after1.iter().zip(&before1).all(|(a, b)| a > b),
        "every loop ran during the n1 upgrade: {before1:?} -> {after1:?}"
    );
    assert!(
        after2.iter().zip(&after1).all(|(a, b)| a > b),
        "every loop ran during the n2 upgrade: {after1:?} -> {after2:?}"
    );

    for node in [1, 2] {
        let m = metrics(&lab, node);
        let v = |name, filter: &[(&str, &str)]| sum(&m, name, filter);
        assert_eq!(
            v(
                "nodemesh_handover_total",
                &[("role", "successor"), ("result", "ok")]
            ),
            1.0,
            "n{node} took over once"
        );
        // The new daemons carry traffic: through tunnels and locally, as L1 and L2.
        for (reporter, route) in [
            ("source", "tunnel"),
            ("destination", "tunnel"),
            ("source", "local"),
        ] {
            assert!(
                v(
                    "nodemesh_connections_opened_total",
                    &[("reporter", reporter), ("route", route)]
                ) > 0.0,
                "new n{node} daemon carried {reporter}/{route} connections"
            );
        }
        assert_eq!(
            v(
                "nodemesh_connections_failed_total",
                &[("reporter", "source")]
            ),
            0.0,
            "no connection failed at the new n{node} daemon"
        );
        for result in ["error", "timeout"] {
            assert_eq!(
                v("nodemesh_tunnel_handshakes_total", &[("result", result)]),
                0.0,
                "no tunnel handshake {result} at n{node}"
            );
        }
        if node == 1 {
            // Streams the new n1 opened towards n2 after the old n2 handed
            // over were answered `draining` and moved to a new tunnel
            // (`retired`), or found the old tunnel already closed and
            // dialled anew; which one depends on timing (with one tunnel
            // per node pair, the old n2 may also have dialled n1). Either
            // way no client connection failed (asserted above); report it.
            eprintln!(
                "n1: tunnels to n2 retired after `draining`: {}",
                v("nodemesh_tunnels_retired_total", &[("peer", "n2")])
            );
        }
        let log = log_of(&lab, node);
        for line in log.lines().filter(|l| {
            l.contains("hand-over")
                || l.contains("draining this tunnel")
                || l.contains("tunnel closed")
        }) {
            eprintln!("n{node}: {line}");
        }
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| {
                (l.contains("tunnel closed") || l.contains("tunnel handshake"))
                    && (l.contains("reset") || l.contains("timed out") || l.contains("failed"))
            })
            .collect();
        assert!(
            bad.is_empty(),
            "n{node}: tunnels reset or timed out:\n{}",
            bad.join("\n")
        );
        assert!(
            log.contains("hand-over: complete"),
            "n{node}: the successor logged the take-over"
        );
        assert!(
            log.contains("hand-over: done; draining until SIGTERM"),
            "n{node}: the predecessor logged the hand-over"
        );
    }
}

/// A successor that goes away in the middle of the hand-over (here: after
/// it took the CNI socket) leaves the old daemon serving and ready: it binds
/// the CNI socket again, registers new pods, and carries traffic.
#[test]
fn a_successor_that_dies_mid_hand_over_leaves_the_old_daemon_serving_and_ready() {
    let mut lab = mesh_lab(2, 1);
    let paths = lab.node(1).expect("n1").daemon.clone().expect("meshed");
    let socket = nodemesh::handover::socket_path(&paths.cni_socket);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // The successor says hello: the daemon reports not ready.
        let mut link = nodemesh::handover::join(&socket)
            .await
            .expect("hello")
            .expect("the n1 daemon answers on its hand-over socket");
        let r = lab.admin_get(1, "/ready").expect("ready");
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.body.contains("successor starting"), "{}", r.body);
        // It takes the CNI socket path, and the old daemon stops serving it.
        let (_successor_cni, _file) =
            nodemesh::handover::bind_replacing(&paths.cni_socket).expect("successor cni socket");
        link.stop_cni().await.expect("stop_cni");
        let dump = lab.admin_get(1, "/config_dump").expect("config dump");
        assert!(
            dump.body.contains("\"phase\":\"cni_handed_over\""),
            "{}",
            dump.body
        );
        // Then it crashes: its connection and its socket go away.
    });
    drop(rt);
    wait_until("the old daemon to be ready again", || {
        lab.admin_get(1, "/ready").is_ok_and(|r| r.status == 200)
    });
    let dump = lab.admin_get(1, "/config_dump").expect("config dump");
    assert!(dump.body.contains("\"phase\":\"serving\""), "{}", dump.body);
    // The CNI socket is the old daemon's again: a new pod registers there.
    let fresh = lab
        .add_pod(1)
        .expect("a new pod is registered by the old daemon");
    let remote = lab.pod(2, 1).expect("n2-p1");
    lab.transfer(&fresh, &remote, 8080, MIB)
        .expect("new pod -> n2");
    lab.transfer(&remote, &fresh, 8081, MIB)
        .expect("n2 -> new pod");
    let old = lab.pod(1, 1).expect("n1-p1");
    lab.transfer(&old, &remote, 8082, MIB)
        .expect("existing pod -> n2");

    // A second successor dies right after renaming its socket over cni.sock,
    // before it could ask the old daemon to stop: the path is dead, and the
    // old daemon binds it again all the same.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let _link = nodemesh::handover::join(&socket)
            .await
            .expect("hello")
            .expect("the n1 daemon answers again");
        let _successor_cni =
            nodemesh::handover::bind_replacing(&paths.cni_socket).expect("successor cni socket");
    });
    drop(rt);
    wait_until("the old daemon to be ready again", || {
        lab.admin_get(1, "/ready").is_ok_and(|r| r.status == 200)
    });
    let another = lab.add_pod(1).expect("registered by the old daemon again");
    lab.transfer(&another, &remote, 8083, MIB)
        .expect("second new pod -> n2");

    let m = metrics(&lab, 1);
    assert_eq!(
        sum(
            &m,
            "nodemesh_handover_total",
            &[("role", "predecessor"), ("result", "successor_lost")]
        ),
        2.0
    );
    assert_eq!(
        log_of(&lab, 1)
            .matches("hand-over reverted: serving the CNI socket again")
            .count(),
        2
    );
}
