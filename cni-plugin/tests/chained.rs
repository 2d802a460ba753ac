//! A real chained run: Debian's `bridge` + `host-local` plugins (run inside a
//! "host" netns this test creates, so the machine's network is never
//! touched) give a real prevResult, then `nodemesh-cni` installs the capture
//! rules, and real TCP connections prove the redirects. Needs root.

mod support;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};
use serde_json::{json, Value};
use support::{run_binary, run_plugin, FakeDaemon, Mode, Netns};

const MARK: u32 = 0x4e4d;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the reference bridge plugin (ADD) for a pod netns, inside `host`.
fn bridge_add(host: &Netns, pod: &Netns, id: &str, bridge: &str, data_dir: &Path) -> Value {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "helper-cni-net",
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "subnet": "10.99.0.0/24",
            "dataDir": data_dir,
            "routes": [{"dst": "0.0.0.0/0"}]
        }
    });
    let netns = pod.path();
    let out = run_binary(
        Path::new("/usr/lib/cni/bridge"),
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns.to_str().expect("utf8")),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ],
        &conf.to_string(),
        Some(host),
    );
    out.expect_ok();
    out.json()
}

fn first_ip(prev: &Value, key: &str) -> Ipv4Addr {
    let s = prev["ips"][0][key].as_str().expect("ip in prevResult");
    s.split('/').next().expect("addr").parse().expect("ipv4")
}

/// A listener made inside `ns`; `accept` blocks at most [`CONNECT_TIMEOUT`]
/// (`SO_RCVTIMEO` bounds `accept` on Linux), so no test can hang.
fn listen(ns: &Netns, addr: SocketAddr) -> TcpListener {
    ns.run(move || {
        let l = TcpListener::bind(addr).expect("bind");
        socket2::SockRef::from(&l)
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .expect("SO_RCVTIMEO");
        l
    })
}

/// Accepts one connection, waiting at most [`CONNECT_TIMEOUT`].
fn accept_within(l: &TcpListener) -> Option<TcpStream> {
    l.accept().ok().map(|(s, _)| s)
}

/// Whether no connection is queued on `l` right now. Called only after the
/// connection under test was accepted elsewhere: its handshake is complete,
/// so had it been sent here it would already be queued.
fn nothing_pending(l: &TcpListener) -> bool {
    l.set_nonblocking(true).expect("nonblocking");
    let pending = l.accept();
    l.set_nonblocking(false).expect("blocking");
    matches!(pending, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

/// Connects from inside `ns`, optionally with `SO_MARK`; returns the
/// client's local address.
fn connect_from(ns: &Netns, to: SocketAddr, mark: Option<u32>) -> (TcpStream, SocketAddr) {
    ns.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        if let Some(m) = mark {
            s.set_mark(m).expect("SO_MARK");
        }
        s.connect_timeout(&to.into(), CONNECT_TIMEOUT)
            .expect("connect");
        let stream: TcpStream = s.into();
        let local = stream.local_addr().expect("local addr");
        (stream, local)
    })
}

#[test]
fn bridge_then_nodemesh_redirects_real_connections() {
    let host = Netns::new("host");
    let pod = Netns::new("pod");
    let peer = Netns::new("peer");
    let data_dir = tempfile::tempdir().expect("tmp");
    let state = tempfile::tempdir().expect("tmp");
    let bridge = format!("hcni{}", std::process::id() % 100_000);
    let pod_id = format!("pod-{}", support::unique());

    let prev = bridge_add(&host, &pod, &pod_id, &bridge, data_dir.path());
    let peer_prev = bridge_add(
        &host,
        &peer,
        &format!("peer-{}", support::unique()),
        &bridge,
        data_dir.path(),
    );
    let pod_ip = first_ip(&prev, "address");
    let gateway = first_ip(&prev, "gateway");

    // The "daemon's" listeners in the pod, on ports it then reports.
    let outbound = listen(&pod, "127.0.0.1:0".parse().expect("addr"));
    let inbound = listen(&pod, "0.0.0.0:0".parse().expect("addr"));
    let app = listen(&pod, "0.0.0.0:0".parse().expect("addr"));
    let port = |l: &TcpListener| l.local_addr().expect("addr").port();
    let daemon = FakeDaemon::start(Mode::Up {
        outbound_port: port(&outbound),
        inbound_port: port(&inbound),
        mark: MARK,
    });

    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "helper-cni-net",
        "type": "nodemesh-cni",
        "daemon_socket": daemon.path,
        "state_dir": state.path(),
        "prevResult": prev,
    })
    .to_string();
    let netns = pod.path();
    let env = |cmd| {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", pod_id.as_str()),
            ("CNI_NETNS", netns.to_str().expect("utf8")),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            ),
        ]
    };
    let add = run_plugin(&env("ADD"), &conf);
    add.expect_ok();
    assert_eq!(
        add.json(),
        prev,
        "prevResult of the bridge plugin passed through unchanged"
    );
    run_plugin(&env("CHECK"), &conf).expect_ok();

    // Outbound: the pod connects to a node-side server; the SYN is
    // redirected to the outbound listener, which sees the original target.
    let server = listen(&host, SocketAddr::new(gateway.into(), 0));
    let target = server.local_addr().expect("addr");
    let (_client, client_addr) = connect_from(&pod, target, None);
    let captured = accept_within(&outbound).expect("outbound listener accepted");
    assert_eq!(captured.peer_addr().expect("peer"), client_addr);
    let orig = getsockopt(&captured, OriginalDst).expect("SO_ORIGINAL_DST");
    let orig = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(orig.sin_addr.s_addr)),
        u16::from_be(orig.sin_port),
    );
    assert_eq!(
        SocketAddr::V4(orig),
        target,
        "original destination preserved"
    );
    assert!(
        nothing_pending(&server),
        "the unmarked connection must not reach the server"
    );

    // The daemon's own (marked) sockets are not redirected.
    let (_marked, marked_addr) = connect_from(&pod, target, Some(MARK));
    let direct = accept_within(&server).expect("server accepted marked connection");
    assert_eq!(direct.peer_addr().expect("peer"), marked_addr);
    assert!(nothing_pending(&outbound));

    // Inbound from another pod: redirected to the inbound listener.
    let app_addr = SocketAddr::new(pod_ip.into(), port(&app));
    let (_in_client, in_addr) = connect_from(&peer, app_addr, None);
    let inb = accept_within(&inbound).expect("inbound listener accepted");
    assert_eq!(inb.peer_addr().expect("peer"), in_addr);
    assert_eq!(in_addr.ip(), first_ip(&peer_prev, "address"));
    assert!(nothing_pending(&app));

    // Kubelet probes from the node (the gateway) reach the app directly.
    let (_probe, probe_addr) = connect_from(&host, app_addr, None);
    let probed = accept_within(&app).expect("app accepted probe");
    assert_eq!(probed.peer_addr().expect("peer"), probe_addr);
    assert!(nothing_pending(&inbound));

    // DEL removes the table.
    run_plugin(&env("DEL"), &conf).expect_ok();
    assert!(pod.nodemesh_table().is_none());
}
