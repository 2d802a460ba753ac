//! End to end with a real container runtime: Debian's podman (CNI network
//! backend, runc, a busybox rootfs, no image pulls) starts a container on lab
//! node n1 whose network is that node's conflist — `bridge` + `host-local`,
//! then `nodemesh-cni`. The container's outbound HTTP request to a pod on
//! node n2 is captured by the rules `nodemesh-cni` installed in the
//! container's netns and carried by both daemons over their tunnel. Stopping
//! the container (CNI DEL) unregisters it and removes its rules; starting it
//! again (CNI ADD, new netns) meshes it again; removing it (CNI DEL) leaves
//! nothing. A container that does not name its Kubernetes namespace is
//! either meshed or refused, never started unmeshed.
//!
//! Podman runs with its own `containers.conf`, storage, state and CNI config
//! directory in a temp dir, and inside node n1's network namespace
//! (`nsenter --net`), so what CNI builds on the host side (bridge port, veth)
//! lands in the lab, never in the machine's network. Privileged: run as root
//! with `podman`, `runc` and `busybox-static` installed (`scripts/test`
//! installs them).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodemesh::discovery::model::Pod;
use nodemesh_lab::cni::{NETWORK_NAME, SYSTEM_PLUGIN_DIR};
use nodemesh_lab::daemon;
use nodemesh_lab::exec::{Cmd, Output};
use nodemesh_lab::lab::{self, Lab, LabOptions, PodHandle};
use nodemesh_lab::{metrics, traffic};
use serde_json::Value;

/// Deadline of one podman command (first use initialises its storage).
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for the daemons to observe a change (registration, discovery,
/// metrics of a finished connection).
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a bounded wait polls.
const POLL: Duration = Duration::from_millis(100);
/// The container's busybox, from Debian's `busybox-static` (statically
/// linked, so a rootfs of this one file runs).
const BUSYBOX: &str = "/bin/busybox";
/// Limits given to the container. Podman's defaults for root raise
/// `RLIMIT_NOFILE`/`RLIMIT_NPROC` to 1048576/4194304, which fails with
/// EPERM where the runtime lacks `CAP_SYS_RESOURCE` (containers, CI
/// sandboxes); lowering is always allowed.
const ULIMITS: [&str; 2] = ["nofile=1024:1024", "nproc=1024:1024"];

/// Polls `f` every [`POLL`] until it returns `Some`, at most `timeout`.
fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Fails the test early, with what to install, if the runtime is missing.
fn require_runtime() {
    for (tool, package) in [
        ("podman", "podman"),
        ("runc", "runc"),
        ("nsenter", "util-linux"),
        ("nft", "nftables"),
    ] {
        let found = Cmd::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "`{tool}` not found: install Debian's `{package}` (scripts/test does)"
        );
    }
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} not found: install Debian's `busybox-static` (scripts/test does)"
    );
}

/// The Kubernetes namespace the test's containers claim. Podman passes only
/// `K8S_POD_NAME` (the container name) to CNI plugins, and appends the
/// `CNI_ARGS` of its own environment: that is how a standalone container says
/// which namespace it belongs to.
const POD_NAMESPACE: &str = "podman";

/// A podman confined to a temp dir and to one lab node's network namespace.
/// Dropping it force-removes every container it made (running their CNI
/// DEL) and then its files.
struct Podman {
    dir: tempfile::TempDir,
    node_netns: String,
}

impl Podman {
    /// Podman for node `node` of `lab`: its conflist (as the lab's pods on
    /// that node have it, sharing their IPAM state) as the only network.
    fn new(lab: &Lab, node: usize) -> Self {
        let n = lab.node(node).expect("node");
        let dir = tempfile::Builder::new()
            .prefix("nodemesh-podman-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        for sub in ["net.d", "rootfs/bin", "root", "runroot", "tmp"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
        }
        std::fs::copy(BUSYBOX, root.join("rootfs/bin/busybox")).expect("copy busybox");
        std::fs::write(
            root.join("net.d").join(format!("{NETWORK_NAME}.conflist")),
            serde_json::to_vec_pretty(&n.conflist).expect("conflist json"),
        )
        .expect("write conflist");
        let plugin_dirs: Vec<String> = lab
            .state()
            .cni_path
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        assert!(
            lab.state()
                .cni_path
                .iter()
                .any(|p| p == Path::new(SYSTEM_PLUGIN_DIR)),
            "the lab's CNI_PATH has the reference plugins"
        );
        let conf = format!(
            "[network]\n\
             network_backend = \"cni\"\n\
             cni_plugin_dirs = [{dirs}]\n\
             network_config_dir = {netd:?}\n\
             default_network = {net:?}\n\
             [engine]\n\
             runtime = \"runc\"\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             events_logfile_path = {events:?}\n\
             tmp_dir = {tmp:?}\n",
            dirs = plugin_dirs.join(", "),
            netd = root.join("net.d").display().to_string(),
            net = NETWORK_NAME,
            events = root.join("events.log").display().to_string(),
            tmp = root.join("tmp").display().to_string(),
        );
        std::fs::write(root.join("containers.conf"), conf).expect("write containers.conf");
        Self {
            dir,
            node_netns: n.netns.clone(),
        }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// `podman <args>` with this instance's config, storage and namespace,
    /// and `CNI_ARGS` naming [`POD_NAMESPACE`].
    fn cmd<S: AsRef<str>>(&self, args: &[S]) -> Cmd {
        self.cmd_with_cni_args(args, &format!("K8S_POD_NAMESPACE={POD_NAMESPACE}"))
    }

    /// `podman <args>` with `CNI_ARGS` (appended by podman to its own).
    fn cmd_with_cni_args<S: AsRef<str>>(&self, args: &[S], cni_args: &str) -> Cmd {
        let root = self.dir.path();
        Cmd::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_netns))
            .arg("podman")
            .arg("--root")
            .arg(root.join("root").display().to_string())
            .arg("--runroot")
            .arg(root.join("runroot").display().to_string())
            .args(["--storage-driver", "vfs"])
            .args(args.iter().map(|a| a.as_ref().to_owned()))
            .env(
                "CONTAINERS_CONF",
                root.join("containers.conf").display().to_string(),
            )
            .env("CNI_ARGS", cni_args)
            .timeout(PODMAN_TIMEOUT)
    }

    /// Runs `podman <args>`, failing the test (with podman's stderr) unless
    /// it exits 0.
    fn run<S: AsRef<str>>(&self, args: &[S]) -> Output {
        let cmd = self.cmd(args);
        let out = cmd.output().expect("spawn podman");
        assert!(
            out.status.success(),
            "{} failed ({}): {}",
            cmd.display(),
            out.status,
            out.stderr.trim()
        );
        out
    }

    /// `podman inspect <name>`, first element.
    fn inspect(&self, name: &str) -> Value {
        let out = self.run(&["inspect", name]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("inspect json");
        v.get(0).cloned().expect("one container inspected")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Stops and removes every container of this instance; podman runs the
        // CNI DEL chain and unmounts the netns it made.
        if let Err(e) = self.cmd(&["rm", "--all", "--force", "--time", "0"]).run() {
            eprintln!("podman cleanup: {e}");
        }
    }
}

/// `podman run` of a busybox container sleeping on the lab network
/// (`--rm`: removed by podman itself if it fails to start).
fn run_args(name: &str, rootfs: &Path, rm: bool) -> Vec<String> {
    let mut v: Vec<String> = vec!["run".into(), "--detach".into()];
    if rm {
        v.push("--rm".into());
    }
    v.extend([
        "--name".into(),
        name.into(),
        "--network".into(),
        NETWORK_NAME.into(),
    ]);
    for u in ULIMITS {
        v.extend(["--ulimit".into(), u.into()]);
    }
    v.extend([
        "--rootfs".into(),
        rootfs.display().to_string(),
        "/bin/busybox".into(),
        "sleep".into(),
        "3600".into(),
    ]);
    v
}

/// A one-shot HTTP/1.0 server in a lab pod: answers one GET with `reply`
/// and closes; returns the peer address the server saw.
fn serve_once(listener: TcpListener, reply: String) -> std::thread::JoinHandle<SocketAddr> {
    listener.set_nonblocking(false).expect("blocking listener");
    socket2::SockRef::from(&listener)
        .set_read_timeout(Some(OBSERVE_TIMEOUT))
        .expect("SO_RCVTIMEO bounds accept");
    std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("the server pod accepted");
        s.set_read_timeout(Some(OBSERVE_TIMEOUT)).expect("timeout");
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = traffic::read_retrying(&mut s, &mut buf).expect("read request");
            assert!(
                n > 0,
                "request ended early: {:?}",
                String::from_utf8_lossy(&req)
            );
            req.extend_from_slice(&buf[..n]);
            assert!(req.len() < 16 * 1024, "request headers too long");
        }
        assert!(
            req.starts_with(b"GET / "),
            "{}",
            String::from_utf8_lossy(&req)
        );
        s.write_all(reply.as_bytes()).expect("write reply");
        peer
    })
}

/// `nft list table inet nodemesh` in the netns held open by `ns`: `Some(ruleset)`
/// if the table exists.
fn nodemesh_table(ns: &File) -> Option<String> {
    let path = format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd());
    let out = Cmd::new("nsenter")
        .arg(format!("--net={path}"))
        .args(["nft", "list", "table", "inet", "nodemesh"])
        .output()
        .expect("spawn nsenter nft");
    out.status.success().then(|| out.stdout_text())
}

/// Node `node`'s `/config_dump`, parsed.
fn config_dump(lab: &Lab, node: usize) -> Value {
    let r = lab.admin_get(node, "/config_dump").expect("config_dump");
    assert_eq!(r.status, 200, "config_dump of node {node}: {}", r.body);
    serde_json::from_str(&r.body).expect("config_dump json")
}

/// The daemon's view of a locally registered container, if registered.
fn local_pod(lab: &Lab, node: usize, container_id: &str) -> Option<Value> {
    config_dump(lab, node)["local_pods"]
        .as_array()?
        .iter()
        .find(|p| p["container_id"] == container_id)
        .cloned()
}

/// Last lines of the daemons' and the plugin's logs, for failure messages.
fn logs(lab: &Lab) -> String {
    let mut s = String::new();
    for n in lab.nodes() {
        if let Some(d) = &n.daemon {
            s += &format!(
                "\n--- {} daemon ---\n{}",
                n.name,
                daemon::log_tail(&d.log, 30)
            );
        }
        let cni_log = lab.dir().join(&n.name).join("cni.log");
        s += &format!(
            "\n--- {} nodemesh-cni ---\n{}",
            n.name,
            daemon::log_tail(&cni_log, 15)
        );
    }
    s
}

/// What the test follows of a running container.
struct Running {
    /// Full container ID (`CNI_CONTAINERID`).
    id: String,
    /// Its netns path (`CNI_NETNS`), made by podman.
    sandbox: PathBuf,
    /// Its address on the lab network.
    ip: IpAddr,
    /// The netns, held open so that after stop/removal the rules can be
    /// checked in the very namespace they were installed in (DEL must
    /// delete them, not just let the namespace go).
    netns: File,
}

/// Inspects running container `name` and checks it is meshed: the nodemesh
/// table in its netns, registered with node `node`'s daemon.
fn running_and_meshed(lab: &Lab, podman: &Podman, node: usize, name: &str) -> Running {
    let info = podman.inspect(name);
    assert_eq!(
        info["State"]["Status"], "running",
        "{name}: {}",
        info["State"]
    );
    let id = info["Id"].as_str().expect("container id").to_owned();
    let sandbox = PathBuf::from(
        info["NetworkSettings"]["SandboxKey"]
            .as_str()
            .expect("sandbox key"),
    );
    let ip: IpAddr = info["NetworkSettings"]["Networks"][NETWORK_NAME]["IPAddress"]
        .as_str()
        .expect("container address on the lab network")
        .parse()
        .expect("ip");
    let cidr: ipnet::IpNet = lab
        .node(node)
        .expect("node")
        .pod_cidr
        .parse()
        .expect("cidr");
    assert!(
        cidr.contains(&ip),
        "{name} got {ip}, outside its node's {cidr}"
    );
    let netns = File::open(&sandbox).expect("open the container's netns");
    let table = nodemesh_table(&netns).unwrap_or_else(|| {
        panic!(
            "no nodemesh table in {name}'s netns {}{}",
            sandbox.display(),
            logs(lab)
        )
    });
    assert!(table.contains("redirect"), "capture rules: {table}");
    let registered = local_pod(lab, node, &id).unwrap_or_else(|| {
        panic!(
            "the daemon of node {node} does not list {name} ({id}){}",
            logs(lab)
        )
    });
    assert_eq!(registered["namespace"], POD_NAMESPACE, "{registered}");
    assert_eq!(registered["name"], name, "{registered}");
    assert_eq!(
        registered["ips"],
        serde_json::json!([ip.to_string()]),
        "{registered}"
    );
    Running {
        id,
        sandbox,
        ip,
        netns,
    }
}

/// Checks that a container's network is gone from the mesh: no nodemesh
/// table left in its (held) netns, no registration with node `node`'s daemon.
fn unmeshed(lab: &Lab, node: usize, name: &str, r: &Running) {
    assert!(
        nodemesh_table(&r.netns).is_none(),
        "the nodemesh table of {name} outlived its network{}",
        logs(lab)
    );
    assert!(
        local_pod(lab, node, &r.id).is_none(),
        "the daemon of node {node} still lists {name}"
    );
    assert!(!r.sandbox.exists(), "podman left {}", r.sandbox.display());
}

/// Publishes the lab's pods plus `extra` in discovery, as the API server
/// would, and waits until every daemon has loaded it (L2 verifies that a
/// source address belongs to a pod of the peer node).
fn publish(lab: &Lab, extra: Pod) {
    let generation = |node: usize| config_dump(lab, node)["discovery"]["generation"].as_u64();
    let nodes: Vec<usize> = lab.nodes().iter().map(|n| n.index).collect();
    let before: Vec<Option<u64>> = nodes.iter().map(|&n| generation(n)).collect();
    let mut model = lab.state().cluster_model();
    model.pods.push(extra);
    daemon::write_discovery(&lab.state().discovery_file(), &model).expect("write discovery");
    for (&node, before) in nodes.iter().zip(before) {
        let seen = wait_for(OBSERVE_TIMEOUT, || {
            (generation(node)? > before.unwrap_or(0)).then_some(())
        });
        assert!(seen.is_some(), "node {node} never loaded the new discovery");
    }
}

/// The container pod as discovery has it.
fn container_pod(name: &str, node: &str, ip: IpAddr) -> Pod {
    Pod {
        namespace: POD_NAMESPACE.into(),
        name: name.into(),
        service_account: "default".into(),
        node: node.into(),
        ips: vec![ip],
        labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
        annotations: BTreeMap::new(),
    }
}

/// Container `name` sends an HTTP/1.0 GET to `server` with busybox `nc`
/// (busybox `wget` crashes in a rootfs without NSS files: static glibc's
/// getservbyname); checks the whole reply arrives. Returns the peer address
/// the server saw.
fn request(podman: &Podman, name: &str, server: &PodHandle) -> SocketAddr {
    let body = format!("hello {name} from {}", server.name);
    let reply = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let listener = server.listen(0).expect("listen in the server pod");
    let port = listener.local_addr().expect("addr").port();
    let served = serve_once(listener, reply.clone());
    // `nc` keeps reading after its stdin ends, until the server closes.
    let script = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 10 {} {port}",
        server.ip
    );
    let got = podman.run(&["exec", name, "/bin/busybox", "sh", "-c", &script]);
    assert_eq!(
        got.stdout_text(),
        reply,
        "{name}'s request to {}:{port}",
        server.ip
    );
    served.join().expect("server thread")
}

/// Waits until node `node` counts at least `n` connections of `reporter`
/// from `src` to `dst` over the tunnel.
fn carried(lab: &Lab, node: usize, reporter: &str, src: &str, dst: &str, n: f64) {
    let count = || {
        let samples = lab.metrics(node).ok()?;
        let c = metrics::sum(
            &samples,
            "nodemesh_connections_opened_total",
            &[
                ("reporter", reporter),
                ("src_workload", src),
                ("dst_workload", dst),
                ("route", "tunnel"),
            ],
        );
        (c >= n).then_some(c)
    };
    assert!(
        wait_for(OBSERVE_TIMEOUT, count).is_some(),
        "node {node} counted fewer than {n} {reporter} connections {src} -> {dst}:\n{}{}",
        lab.admin_get(node, "/metrics")
            .map(|r| r.body)
            .unwrap_or_default(),
        logs(lab)
    );
}

#[test]
fn podman_container_is_meshed_by_the_cni_chain_and_unmeshed_when_stopped_or_removed() {
    require_runtime();
    let lab = Lab::up(LabOptions::for_test(2, 1)).expect("lab up");
    let prefix = lab.prefix().to_owned();
    let server = lab.pod(2, 1).expect("n2-p1");
    // Declared after `lab`: dropped (containers removed, CNI DEL run) while
    // the daemons still run.
    let podman = Podman::new(&lab, 1);
    let rootfs = podman.rootfs();

    // A container that does not say which namespace it is in (podman's
    // default CNI_ARGS) is either meshed or refused: never started unmeshed.
    let anonymous = format!("{prefix}-anon");
    let cmd = podman.cmd_with_cni_args(&run_args(&anonymous, &rootfs, true), "");
    let out = cmd.output().expect("spawn podman");
    if out.status.success() {
        running_and_meshed(&lab, &podman, 1, &anonymous);
        podman.run(&["rm", "--force", "--time", "0", &anonymous]);
    } else {
        assert!(
            out.stderr.contains("nodemesh"),
            "{anonymous} refused, but not by nodemesh-cni: {}",
            out.stderr
        );
        eprintln!(
            "a container without K8S_POD_NAMESPACE is refused: {}",
            out.stderr.trim()
        );
    }
    let locals = config_dump(&lab, 1)["local_pods"].clone();
    assert!(
        locals
            .as_array()
            .is_some_and(|a| a.iter().all(|p| p["name"] != anonymous.as_str())),
        "n1's daemon still lists {anonymous}: {locals}"
    );

    // Start: podman runs the node's CNI chain (bridge, host-local,
    // nodemesh-cni), which registers the container with n1's daemon and
    // installs the capture rules in the container's netns.
    let name = format!("{prefix}-ctr");
    podman.run(&run_args(&name, &rootfs, false));
    let first = running_and_meshed(&lab, &podman, 1, &name);
    publish(&lab, container_pod(&name, "n1", first.ip));

    // Its connection to a pod on n2 is captured and carried by both daemons
    // over one tunnel.
    let peer = request(&podman, &name, &server);
    eprintln!("the server saw {name}'s connection from {peer}");
    carried(&lab, 1, "source", &name, &server.name, 1.0);
    carried(&lab, 2, "destination", &name, &server.name, 1.0);
    let tunnels = metrics::sum(
        &lab.metrics(1).expect("n1 metrics"),
        "nodemesh_tunnels_open",
        &[("peer", "n2"), ("direction", "dialled")],
    );
    assert_eq!(tunnels, 1.0, "one tunnel, dialled by n1, to n2");

    // Stop: podman tears the network down (CNI DEL): unregistered, rules gone.
    podman.run(&["stop", "--time", "0", &name]);
    unmeshed(&lab, 1, &name, &first);
    drop(first);

    // Start again, same container ID, new netns: meshed again.
    podman.run(&["start", &name]);
    let second = running_and_meshed(&lab, &podman, 1, &name);
    publish(&lab, container_pod(&name, "n1", second.ip));
    request(&podman, &name, &server);
    carried(&lab, 1, "source", &name, &server.name, 2.0);
    carried(&lab, 2, "destination", &name, &server.name, 2.0);

    // Removal: CNI DEL again; nothing of the container is left in the mesh.
    podman.run(&["rm", "--force", "--time", "0", &name]);
    unmeshed(&lab, 1, &name, &second);
    drop(second);
    drop(podman);

    let problems = lab.down();
    assert!(problems.is_empty(), "{problems:?}");
    let left = lab::wait_clean(&prefix, Duration::from_secs(10)).expect("leftovers");
    assert!(left.is_clean(), "lab {prefix} left {left:?}");
}
