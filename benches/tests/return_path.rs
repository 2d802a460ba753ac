//! The return path of `client_address`, against the kernel, for IPv4 and
//! IPv6: in a scratch network namespace standing for a pod (an address of
//! each family on a veth interface), the daemon's netns worker installs
//! the rule, the route and the sysctls (`tcp_fwmark_accept`,
//! `fwmark_reflect`); a connection made there with `netns::connect_in` from
//! a foreign client address reaches a server that sees that address, and
//! the server's reply comes back; a connection to a closed port is refused
//! at once (the kernel's RST comes back to the daemon's socket too). The mesh e2e
//! test covers IPv4 through real daemons; the lab has no IPv6 pods, so this
//! is where IPv6 is checked. Privileged: run as root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use nodemesh::netns::{connect_in, return_path_sysctls, Netns, NetnsWorker, Origin, SocketFactory};
use nodemesh::rtnl::ReturnPath;
use nodemesh_lab::{lab, netns};

const MARK: u32 = 0x4e4e;
const TABLE: u32 = 20046;
const PRIORITY: u32 = 32000;

/// A scratch namespace, deleted on drop (also when the test fails).
struct Scratch(String);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = netns::del_netns(&self.0);
    }
}

fn scratch_pod() -> Scratch {
    // A name under a test prefix: the lab's cleanup by prefix owns it too.
    let ns = Scratch(format!("{}-rp", lab::test_prefix()));
    netns::add_netns(&ns.0).expect("add netns");
    for args in [
        vec![
            "-n", &ns.0, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ],
        vec!["-n", &ns.0, "link", "set", "eth1", "up"],
        vec!["-n", &ns.0, "link", "set", "eth0", "up"],
        vec!["-n", &ns.0, "addr", "add", "10.99.0.2/24", "dev", "eth0"],
        vec![
            "-n",
            &ns.0,
            "addr",
            "add",
            "fd99::2/64",
            "dev",
            "eth0",
            "nodad",
        ],
    ] {
        netns::ip(args).expect("ip");
    }
    ns
}

/// Installs `path` in `ns` as the daemon does at registration: the rule
/// and route, then the sysctls it needs (`netns::return_path_sysctls`).
async fn install(worker: &NetnsWorker, ns: &Netns, path: ReturnPath) {
    assert!(worker
        .install_return_path(ns, path)
        .await
        .expect("install the return path"));
    for sysctl in return_path_sysctls(&path) {
        worker
            .set_sysctl(ns, sysctl)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", sysctl.name));
    }
}

/// Connects from `client` to a server on `server` (any port) inside `ns`
/// as L2 does, sends a request, and returns the peer the server saw and the
/// reply that came back.
async fn exchange(
    worker: &NetnsWorker,
    ns: &Netns,
    name: &str,
    client: IpAddr,
    server: IpAddr,
) -> (IpAddr, Vec<u8>) {
    let listener = netns::tcp_listen(name, SocketAddr::new(server, 0)).expect("listen in the pod");
    let server = listener.local_addr().expect("server address");
    let accept = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        let mut req = [0u8; 4];
        s.read_exact(&mut req).expect("read request");
        s.write_all(b"pong").expect("reply");
        peer.ip()
    });
    let origin = Origin::Client {
        addr: client,
        mark: MARK,
    };
    let mut tcp = tokio::time::timeout(
        Duration::from_secs(20),
        connect_in(worker, ns, server, origin, Duration::from_secs(10)),
    )
    .await
    .expect("connect in time")
    .expect("connect from the client's address")
    .into_std()
    .expect("std stream");
    tcp.set_nonblocking(false).expect("blocking");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    tcp.write_all(b"ping").expect("send request");
    let mut reply = Vec::new();
    tcp.take(4).read_to_end(&mut reply).expect("read the reply");
    (accept.join().expect("server thread"), reply)
}

#[tokio::test]
async fn replies_to_a_foreign_client_address_return_to_the_daemons_socket_ipv4_and_ipv6() {
    let pod = scratch_pod();
    let ns = Netns::open(&netns::netns_path(&pod.0)).expect("open netns");
    let worker = NetnsWorker::start().expect("worker");
    let path = ReturnPath::for_ips(
        MARK,
        TABLE,
        PRIORITY,
        &[
            "10.99.0.2".parse().expect("v4"),
            "fd99::2".parse().expect("v6"),
        ],
    );
    // Twice: installing is idempotent (one rule per family, not two).
    for _ in 0..2 {
        install(&worker, &ns, path).await;
    }

    for (family, flag) in [("IPv4", "-4"), ("IPv6", "-6")] {
        let rules = netns::ip(["-n", &pod.0, flag, "rule"])
            .expect("ip rule")
            .stdout_text();
        let ours = format!("{PRIORITY}:\tfrom all fwmark {MARK:#x} lookup {TABLE}");
        assert_eq!(
            rules.lines().filter(|l| l.trim() == ours).count(),
            1,
            "{family} rules:\n{rules}"
        );
        let table = TABLE.to_string();
        let routes = netns::ip(["-n", &pod.0, flag, "route", "show", "table", &table])
            .expect("ip route")
            .stdout_text();
        assert!(
            routes.contains("local default dev lo"),
            "{family} table {TABLE}:\n{routes}"
        );
    }

    for (client, server) in [("10.77.5.9", "10.99.0.2"), ("fd77::5:9", "fd99::2")] {
        let client: IpAddr = client.parse().expect("client");
        let server: IpAddr = server.parse().expect("server");
        let (seen, reply) = exchange(&worker, &ns, &pod.0, client, server).await;
        assert_eq!(seen, client, "the server sees the client's address");
        assert_eq!(reply, b"pong", "the reply came back to the daemon's socket");
    }
}

/// A connect from a client's address to a closed port in the pod is refused
/// at once: the RST the pod's kernel answers the marked SYN with carries the
/// mark (`fwmark_reflect`), so the return path brings it to the daemon's
/// socket. Without it the RST left the pod towards the client's address and
/// the connect ran into its timeout (here 10 s, so `TimedOut`).
#[tokio::test]
async fn a_connect_from_a_client_address_to_a_closed_port_is_refused_ipv4_and_ipv6() {
    let pod = scratch_pod();
    let ns = Netns::open(&netns::netns_path(&pod.0)).expect("open netns");
    let worker = NetnsWorker::start().expect("worker");
    let v4: IpAddr = "10.99.0.2".parse().expect("v4");
    let v6: IpAddr = "fd99::2".parse().expect("v6");
    let path = ReturnPath::for_ips(MARK, TABLE, PRIORITY, &[v4, v6]);
    install(&worker, &ns, path).await;
    for (server, client) in [
        (v4, "10.99.7.7".parse().expect("v4 client")),
        (v6, "fd99::77".parse().expect("v6 client")),
    ] {
        // A port nothing listens on: held bound, never listening, until
        // the connect is over. (A listener bound then closed could be
        // reused for another test's listener, or still be open in a child
        // process forked by another test thread before its exec: CI once
        // saw this connect succeed.)
        let bound = netns::in_netns(&pod.0, "bind a TCP port", move || {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(SocketAddr::new(server, 0)),
                socket2::Type::STREAM,
                None,
            )?;
            s.bind(&SocketAddr::new(server, 0).into())?;
            Ok(s)
        })
        .expect("bind");
        let closed = bound
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("addr");
        let origin = Origin::Client {
            addr: client,
            mark: MARK,
        };
        let err = connect_in(&worker, &ns, closed, origin, Duration::from_secs(10))
            .await
            .expect_err("nothing listens there");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{closed} from {client}: {err}"
        );
        drop(bound);
    }
}
