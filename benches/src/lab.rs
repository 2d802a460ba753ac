//! A whole lab: bringing it up, using it from tests, and removing all of it.
//!
//! [`Lab::up`] builds the topology, starts the daemons (unless `mesh` is off),
//! creates pods through the CNI chain and writes the discovery file; every
//! step is recorded in `/run/nodemesh-lab/<prefix>/state.json`. Dropping a
//! [`Lab`] (or [`Lab::down`]) removes everything it made; [`teardown_prefix`]
//! removes a lab from its recorded state *and* anything left matching its
//! prefix (namespaces, processes), so it also works when the state is missing
//! or partial. [`leftovers`] lists what remains, for tests asserting cleanup.
//! [`Lab::start_successor`] / [`Lab::stop_predecessor`] upgrade a node's
//! daemon the way a DaemonSet rolling update does (a second process takes
//! over, the first drains); teardown stops both.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nodemesh::discovery::model::{ClusterModel, Endpoint, Node, Pod, Service, ServicePort};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cni::{self, Invocation, Runtime};
use crate::daemon::{self, DaemonPaths, DaemonProcess};
use crate::error::LabError;
use crate::exec::Output;
use crate::http::{self, Response};
use crate::metrics::{self, Sample};
use crate::netns;
use crate::topology;
use crate::traffic::{self, ExchangeReport};

/// Root of every lab's directory.
pub const RUN_ROOT: &str = "/run/nodemesh-lab";
/// Name of the state file in a lab directory.
pub const STATE_FILE: &str = "state.json";
/// Kubernetes namespace of lab pods.
pub const POD_NAMESPACE: &str = "lab";
/// Interface name inside pods.
pub const POD_IFNAME: &str = "eth0";
/// Default connect timeout of pod sockets.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout of an admin request.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Lab::set_discovery_extra`] waits for every daemon to apply it.
pub const DISCOVERY_APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stray processes get after SIGTERM during teardown.
const STRAY_STOP_TIMEOUT: Duration = Duration::from_secs(3);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static TEST_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Asks every lab of this process being brought up to stop at its next step
/// (called from a signal handler thread); the half-built lab is then dropped
/// and removed.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether [`interrupt`] was called.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupt() -> Result<(), LabError> {
    if interrupted() {
        Err(LabError::Interrupted)
    } else {
        Ok(())
    }
}

/// A prefix unique to this process and call: `nmt<pid % 10000><counter>`.
pub fn test_prefix() -> String {
    let n = TEST_COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("nmt{}{}", std::process::id() % 10_000, n)
}

/// Directory of the lab with `prefix`.
pub fn lab_dir(prefix: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(prefix)
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabOptions {
    /// Prefix of every namespace name (1..=10 lowercase letters/digits).
    pub prefix: String,
    /// Number of nodes (1..=200).
    pub nodes: usize,
    /// Pods created on each node by `up` (0..=200).
    pub pods_per_node: usize,
    /// Run a daemon per node and chain `nodemesh-cni` after `bridge`.
    /// Off: the "direct, no mesh" baseline (bridge + host-local only).
    pub mesh: bool,
    /// Daemons' log filter.
    pub log_level: String,
    /// Directory of the `nodemesh` and `nodemesh-cni` binaries; `None`:
    /// `NODEMESH_BIN_DIR`, else next to the running executable or its parent.
    pub bin_dir: Option<PathBuf>,
    /// MTU of every link (underlay bridge, node uplinks, pod veths and the
    /// pods' bridge), as jumbo frames in a datacenter; the daemons' tunnel
    /// `max_udp_payload` follows (MTU - 28). `None`: the kernel default (1500).
    pub underlay_mtu: Option<u32>,
    /// Dual-stack pods: an IPv6 address beside the IPv4 one, from the node's
    /// `fd00:78:<node>::/64` (see [`topology`]). The tunnels stay on IPv4
    /// unless [`LabOptions::ipv6_underlay`].
    pub dual_stack: bool,
    /// The daemons' node addresses (their tunnel endpoints) are the nodes'
    /// IPv6 underlay addresses `fd00:77::<node>`, so every tunnel runs over
    /// IPv6. Needs `dual_stack`, which gives the nodes those addresses.
    pub ipv6_underlay: bool,
}

impl LabOptions {
    /// `nodes` x `pods_per_node`, meshed, with `prefix`.
    pub fn new(prefix: impl Into<String>, nodes: usize, pods_per_node: usize) -> Self {
        Self {
            prefix: prefix.into(),
            nodes,
            pods_per_node,
            mesh: true,
            log_level: "info".into(),
            bin_dir: None,
            underlay_mtu: None,
            dual_stack: false,
            ipv6_underlay: false,
        }
    }

    /// Gives every pod an IPv6 address too ([`LabOptions::dual_stack`]).
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// Runs the tunnels over the nodes' IPv6 underlay addresses
    /// ([`LabOptions::ipv6_underlay`]); makes the lab dual-stack.
    pub fn ipv6_underlay(mut self) -> Self {
        self.dual_stack = true;
        self.ipv6_underlay = true;
        self
    }

    /// Like [`LabOptions::new`] with a fresh [`test_prefix`].
    pub fn for_test(nodes: usize, pods_per_node: usize) -> Self {
        Self::new(test_prefix(), nodes, pods_per_node)
    }

    /// Turns the mesh off (no daemons, no `nodemesh-cni`).
    pub fn no_mesh(mut self) -> Self {
        self.mesh = false;
        self
    }

    fn validate(&self) -> Result<(), LabError> {
        topology::validate_prefix(&self.prefix)?;
        if self.nodes == 0 || self.nodes > topology::MAX_NODES {
            return Err(LabError::BadOption {
                option: "nodes",
                problem: format!("{} is not in 1..={}", self.nodes, topology::MAX_NODES),
            });
        }
        if self.pods_per_node > topology::MAX_PODS_PER_NODE {
            return Err(LabError::BadOption {
                option: "pods_per_node",
                problem: format!(
                    "{} is over {}",
                    self.pods_per_node,
                    topology::MAX_PODS_PER_NODE
                ),
            });
        }
        if self.ipv6_underlay && !self.dual_stack {
            return Err(LabError::BadOption {
                option: "ipv6_underlay",
                problem: "the nodes have IPv6 underlay addresses only in a dual-stack lab: \
                          add --dual-stack"
                    .into(),
            });
        }
        Ok(())
    }
}

/// A node as recorded in the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// Index, from 1.
    pub index: usize,
    /// Name (`n1`).
    pub name: String,
    /// Namespace.
    pub netns: String,
    /// Underlay address.
    pub address: Ipv4Addr,
    /// Pod CIDR.
    pub pod_cidr: String,
    /// The CNI conflist used for its pods.
    pub conflist: Value,
    /// Daemon files and admin address (meshed labs).
    pub daemon: Option<DaemonPaths>,
    /// Pid of its running daemon, if any.
    pub daemon_pid: Option<u32>,
}

/// A pod as recorded in the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodState {
    /// Node index.
    pub node: usize,
    /// Index on its node, from 1.
    pub index: usize,
    /// The runtime parameters of its CNI calls.
    pub invocation: Invocation,
    /// Final CNI ADD result, once ADD succeeded.
    pub result: Option<Value>,
    /// Its IPv4 address, once known.
    pub ip: Option<Ipv4Addr>,
    /// Its IPv6 address, once known (dual-stack labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// The CNI conflist of its calls when it is not its node's (an unmeshed
    /// pod: bridge only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflist: Option<Value>,
    /// Labels published in discovery besides `app: <pod name>` (see
    /// [`Lab::set_pod_labels`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Everything a lab made, as recorded in `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    /// Prefix.
    pub prefix: String,
    /// Lab directory.
    pub dir: PathBuf,
    /// Meshed or not.
    pub mesh: bool,
    /// `CNI_PATH` used for pods.
    pub cni_path: Vec<PathBuf>,
    /// Nodes.
    pub nodes: Vec<NodeState>,
    /// Pods.
    pub pods: Vec<PodState>,
    /// Services published in discovery (see [`Lab::set_services`]).
    #[serde(default)]
    pub services: Vec<Service>,
    /// Link MTU ([`LabOptions::underlay_mtu`]).
    #[serde(default)]
    pub underlay_mtu: Option<u32>,
    /// Dual-stack pods ([`LabOptions::dual_stack`]).
    #[serde(default)]
    pub dual_stack: bool,
    /// Tunnels over IPv6 ([`LabOptions::ipv6_underlay`]).
    #[serde(default)]
    pub ipv6_underlay: bool,
}

impl LabState {
    /// Path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads the state of lab `prefix`; `Ok(None)` if there is none.
    pub fn load(prefix: &str) -> Result<Option<Self>, LabError> {
        let path = lab_dir(prefix).join(STATE_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LabError::io(path, e)),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| LabError::State {
                path,
                problem: e.to_string(),
            })
    }

    fn save(&self) -> Result<(), LabError> {
        let path = self.path();
        let text = serde_json::to_vec_pretty(self).map_err(|e| LabError::State {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        daemon::write_atomic(&path, &text)
    }

    /// The cluster model of this state: nodes, and pods whose IP is known.
    pub fn cluster_model(&self) -> ClusterModel {
        ClusterModel {
            nodes: self
                .nodes
                .iter()
                .map(|n| Node {
                    name: n.name.clone(),
                    address: self.tunnel_address(n),
                    pod_cidrs: std::iter::once(n.pod_cidr.clone())
                        .chain(self.dual_stack.then(|| topology::pod_cidr6(n.index)))
                        .filter_map(|c| c.parse().ok())
                        .collect(),
                })
                .collect(),
            pods: self
                .pods
                .iter()
                .filter_map(|p| {
                    let ip = p.ip?;
                    Some(Pod {
                        namespace: p.invocation.pod_namespace.clone(),
                        name: p.invocation.pod_name.clone(),
                        service_account: "default".into(),
                        node: topology::node_name(p.node),
                        ips: std::iter::once(IpAddr::V4(ip))
                            .chain(p.ip6.map(IpAddr::V6))
                            .collect(),
                        labels: std::iter::once(("app".to_owned(), p.invocation.pod_name.clone()))
                            .chain(p.labels.clone())
                            .collect(),
                        annotations: BTreeMap::new(),
                    })
                })
                .collect(),
            services: self.services.clone(),
            ..ClusterModel::default()
        }
    }

    /// Node `n`'s daemon address, its tunnel endpoint: the IPv4 underlay
    /// address, or the IPv6 one with [`LabOptions::ipv6_underlay`].
    pub fn tunnel_address(&self, n: &NodeState) -> IpAddr {
        topology::tunnel_address(n.index, self.ipv6_underlay)
    }

    /// Path of the shared discovery file.
    pub fn discovery_file(&self) -> PathBuf {
        self.dir.join("discovery.yaml")
    }
}

/// A pod of a lab, for tests: its namespace, address, and socket helpers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodHandle {
    /// Node index.
    pub node: usize,
    /// Index on its node.
    pub index: usize,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes name (`n1-p2`).
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// IPv6 address (dual-stack labs).
    pub ip6: Option<Ipv6Addr>,
}

/// An address family of a pod's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (every pod).
    V4,
    /// IPv6 (pods of a dual-stack lab).
    V6,
}

impl PodHandle {
    /// `ip:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    /// This pod's `ip:port` in `family`; an error for IPv6 when the pod has
    /// no IPv6 address (a lab not built dual-stack).
    pub fn addr_in(&self, family: Family, port: u16) -> Result<SocketAddr, LabError> {
        match family {
            Family::V4 => Ok(self.addr(port)),
            Family::V6 => self
                .ip6
                .map(|ip| SocketAddr::new(IpAddr::V6(ip), port))
                .ok_or_else(|| LabError::BadOption {
                    option: "dual_stack",
                    problem: format!(
                        "pod {} has no IPv6 address: build the lab dual-stack (--dual-stack)",
                        self.name
                    ),
                }),
        }
    }

    /// A listener on `0.0.0.0:port` inside the pod (port 0: any free port).
    pub fn listen(&self, port: u16) -> Result<TcpListener, LabError> {
        netns::tcp_listen(&self.netns, SocketAddr::from(([0, 0, 0, 0], port)))
    }

    /// A listener on the wildcard address of `family` inside the pod.
    pub fn listen_in(&self, family: Family, port: u16) -> Result<TcpListener, LabError> {
        match family {
            Family::V4 => self.listen(port),
            Family::V6 => netns::tcp_listen(
                &self.netns,
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            ),
        }
    }

    /// A connection from inside the pod to `addr`.
    pub fn connect(&self, addr: SocketAddr) -> Result<TcpStream, LabError> {
        netns::tcp_connect(&self.netns, addr, CONNECT_TIMEOUT)
    }

    /// Connects from inside the pod to `addr` and expects the mesh to reset
    /// the connection: at once (the RST can beat `connect` returning) or at
    /// the first write or read, within `timeout`.
    pub fn connect_expect_reset(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<(), LabError> {
        let mut s = match self.connect(addr) {
            Ok(s) => s,
            Err(LabError::Netns { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        traffic::expect_reset(&mut s, timeout).map_err(|got| LabError::NotReset {
            what: format!("{} to {addr}", self.name),
            got,
        })
    }

    /// Runs `program args` inside the pod's namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, LabError> {
        netns::exec_in(&self.netns, program, args.iter().copied())
    }
}

/// A TCP service `lab/<name>` on `cluster_ip:port` whose ready endpoints are
/// `pods` on `target_port`, as an EndpointSlice would list them.
pub fn service(
    name: &str,
    cluster_ip: IpAddr,
    port: u16,
    target_port: u16,
    pods: &[PodHandle],
) -> Service {
    Service {
        namespace: POD_NAMESPACE.into(),
        name: name.into(),
        cluster_ips: vec![cluster_ip],
        ports: vec![ServicePort {
            name: None,
            port,
            target_port,
            protocol: Default::default(),
        }],
        endpoints: pods
            .iter()
            .map(|p| Endpoint {
                ip: IpAddr::V4(p.ip),
                node: Some(topology::node_name(p.node)),
                ready: true,
                target_ref: Some(p.name.clone()),
            })
            .collect(),
        split: None,
    }
}

/// A running lab. Dropping it removes everything it made.
#[derive(Debug)]
pub struct Lab {
    state: LabState,
    daemons: BTreeMap<usize, DaemonProcess>,
    /// Daemons a successor took over from (see [`Lab::start_successor`]),
    /// still draining until [`Lab::stop_predecessor`].
    predecessors: BTreeMap<usize, DaemonProcess>,
    nodemesh: Option<PathBuf>,
    detached: bool,
    /// Appended to the generated discovery model (extra nodes and pods,
    /// namespaces, policies); see [`Lab::set_discovery_extra`].
    discovery_extra: ClusterModel,
}

/// Called with (step, total, description) as `up` progresses.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

impl Lab {
    /// Builds a lab, logging progress with `tracing`.
    pub fn up(opts: LabOptions) -> Result<Self, LabError> {
        Self::up_with_progress(opts, &mut |step, total, what| {
            tracing::info!(step, total, "{what}");
        })
    }

    /// Builds a lab, reporting each step to `progress`. On error (or
    /// [`interrupt`]) everything made so far is removed before returning.
    pub fn up_with_progress(opts: LabOptions, progress: Progress<'_>) -> Result<Self, LabError> {
        opts.validate()?;
        let prefix = opts.prefix.clone();
        let dir = lab_dir(&prefix);
        if dir.exists() {
            return Err(LabError::LabExists {
                prefix,
                what: format!("directory {}", dir.display()),
            });
        }
        if let Some(ns) = netns::list_netns()?
            .into_iter()
            .find(|n| topology::is_lab_netns(&prefix, n))
        {
            return Err(LabError::LabExists {
                prefix,
                what: format!("network namespace {ns}"),
            });
        }
        // Binaries first: fail before building anything.
        let (nodemesh, cni_bin) = if opts.mesh {
            (
                Some(daemon::find_binary(
                    daemon::DAEMON_BIN,
                    opts.bin_dir.as_deref(),
                )?),
                Some(daemon::find_binary(
                    daemon::CNI_BIN,
                    opts.bin_dir.as_deref(),
                )?),
            )
        } else {
            (None, None)
        };
        let mut cni_path = vec![PathBuf::from(cni::SYSTEM_PLUGIN_DIR)];
        if let Some(dir) = cni_bin.as_ref().and_then(|b| b.parent()) {
            cni_path.push(dir.to_path_buf());
        }
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        let mut lab = Lab {
            state: LabState {
                prefix: prefix.clone(),
                dir: dir.clone(),
                mesh: opts.mesh,
                cni_path,
                nodes: Vec::new(),
                pods: Vec::new(),
                services: Vec::new(),
                underlay_mtu: opts.underlay_mtu,
                dual_stack: opts.dual_stack,
                ipv6_underlay: opts.ipv6_underlay,
            },
            daemons: BTreeMap::new(),
            predecessors: BTreeMap::new(),
            nodemesh,
            detached: false,
            discovery_extra: ClusterModel::default(),
        };
        lab.state.save()?;
        // From here on, an early return drops `lab`, which tears down.
        let n = opts.nodes;
        let mesh_steps = if opts.mesh { 2 + n } else { 0 };
        let total = 1 + n + mesh_steps + n * opts.pods_per_node;
        let mut step = 0;
        let mut tick = |what: String| {
            step += 1;
            progress(step, total, &what);
        };

        tick(format!(
            "creating underlay {}",
            topology::underlay_netns(&prefix)
        ));
        check_interrupt()?;
        topology::create_underlay(&prefix)?;
        for i in 1..=n {
            tick(format!(
                "creating node {} (netns {}, {})",
                topology::node_name(i),
                topology::node_netns(&prefix, i),
                topology::tunnel_address(i, opts.ipv6_underlay)
            ));
            check_interrupt()?;
            lab.add_node_state(i)?;
            topology::create_node(&prefix, i, n, opts.dual_stack)?;
            if let Some(mtu) = opts.underlay_mtu {
                topology::set_node_mtu(&prefix, i, mtu)?;
            }
        }
        if let Some(nodemesh) = lab.nodemesh.clone() {
            tick("writing certificates and discovery".into());
            check_interrupt()?;
            let certs = dir.join("certs");
            std::fs::create_dir_all(&certs).map_err(|e| LabError::io(&certs, e))?;
            daemon::init_ca(&nodemesh, &certs)?;
            for node in &lab.state.nodes {
                daemon::node_cert(&nodemesh, &certs, &node.name)?;
            }
            lab.write_discovery()?;
            for i in 1..=n {
                tick(format!(
                    "starting daemon of node {}",
                    topology::node_name(i)
                ));
                check_interrupt()?;
                lab.spawn_daemon(i, Some(&opts.log_level))?;
            }
            tick("waiting for daemons to be ready".into());
            for i in 1..=n {
                check_interrupt()?;
                lab.wait_daemon_ready(i)?;
            }
        }
        for i in 1..=n {
            for k in 1..=opts.pods_per_node {
                tick(format!(
                    "creating pod {} on node {}",
                    topology::pod_name(i, k),
                    topology::node_name(i)
                ));
                check_interrupt()?;
                lab.create_pod(i, k)?;
            }
        }
        if opts.mesh {
            lab.publish_discovery()?;
        }
        Ok(lab)
    }

    fn add_node_state(&mut self, i: usize) -> Result<(), LabError> {
        let prefix = &self.state.prefix;
        let node_dir = self.state.dir.join(topology::node_name(i));
        std::fs::create_dir_all(&node_dir).map_err(|e| LabError::io(&node_dir, e))?;
        let mut plugins = vec![cni::with_mtu(
            self.bridge_plugin(i, &node_dir),
            self.state.underlay_mtu,
        )];
        let daemon = if self.state.mesh {
            let paths = DaemonPaths {
                config: node_dir.join("config.yaml"),
                log: node_dir.join("daemon.log"),
                cni_socket: node_dir.join("cni.sock"),
                state_dir: node_dir.join("pods"),
                admin: SocketAddr::new(IpAddr::V4(topology::node_address(i)), daemon::ADMIN_PORT),
            };
            let cni_state = node_dir.join("cni");
            std::fs::create_dir_all(&cni_state).map_err(|e| LabError::io(&cni_state, e))?;
            plugins.push(cni::nodemesh_plugin(
                &paths.cni_socket,
                &node_dir.join("cni.log"),
                &cni_state,
            ));
            Some(paths)
        } else {
            None
        };
        self.state.nodes.push(NodeState {
            index: i,
            name: topology::node_name(i),
            netns: topology::node_netns(prefix, i),
            address: topology::node_address(i),
            pod_cidr: topology::pod_cidr(i),
            conflist: cni::conflist(plugins),
            daemon,
            daemon_pid: None,
        });
        self.state.save()
    }

    fn write_discovery(&self) -> Result<(), LabError> {
        let mut model = self.state.cluster_model();
        let extra = self.discovery_extra.clone();
        model.nodes.extend(extra.nodes);
        model.pods.extend(extra.pods);
        model.namespaces.extend(extra.namespaces);
        model.policies.extend(extra.policies);
        daemon::write_discovery(&self.state.discovery_file(), &model)
    }

    /// Replaces what is appended to the lab's own discovery model (extra
    /// nodes, pods, namespaces with their mode, authorization policies),
    /// writes the file, and waits until every running daemon has applied it
    /// (its `nodemesh_discovery_reloads_total{result="ok"}` rose), up to
    /// [`DISCOVERY_APPLY_TIMEOUT`]. A model a daemon refuses is an error.
    pub fn set_discovery_extra(&mut self, extra: ClusterModel) -> Result<(), LabError> {
        self.discovery_extra = extra;
        self.publish_discovery_and_wait()
    }

    /// Writes discovery and waits until every running daemon has applied it
    /// (its `nodemesh_discovery_reloads_total{result="ok"}` rose), up to
    /// [`DISCOVERY_APPLY_TIMEOUT`]; at once if the file's content did not
    /// change (the daemons do not reload an unchanged file). A model a
    /// daemon refuses is an error.
    fn publish_discovery_and_wait(&mut self) -> Result<(), LabError> {
        let path = self.state.discovery_file();
        let previous = std::fs::read(&path).ok();
        // (ok, error) reloads of node `node`'s daemon, from one scrape.
        let reloads = |lab: &Self, node: usize| -> Result<(f64, f64), LabError> {
            let samples = lab.metrics(node)?;
            let count = |result| {
                metrics::sum(
                    &samples,
                    "nodemesh_discovery_reloads_total",
                    &[("result", result)],
                )
            };
            Ok((count("ok"), count("error")))
        };
        let mut before = Vec::with_capacity(self.daemons.len());
        for &n in self.daemons.keys() {
            let (ok, err) = reloads(self, n)?;
            before.push((n, ok, err));
        }
        self.write_discovery()?;
        if std::fs::read(&path).ok() == previous {
            return Ok(());
        }
        let deadline = Instant::now() + DISCOVERY_APPLY_TIMEOUT;
        for (n, ok, err) in before {
            loop {
                let (now_ok, now_err) = reloads(self, n)?;
                if now_ok > ok {
                    break;
                }
                if now_err > err {
                    return Err(LabError::State {
                        path: self.state.discovery_file(),
                        problem: format!(
                            "the daemon of node {n} refused the discovery file; see {}",
                            self.daemon_log(n)?.display()
                        ),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(LabError::State {
                        path: self.state.discovery_file(),
                        problem: format!(
                            "the daemon of node {n} did not apply it within {DISCOVERY_APPLY_TIMEOUT:?}"
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// What [`Lab::set_discovery_extra`] last set.
    pub fn discovery_extra(&self) -> &ClusterModel {
        &self.discovery_extra
    }

    /// Writes discovery, then gives the daemons time to poll it: a wait of
    /// [`daemon::DISCOVERY_SETTLE`] (a few poll intervals), not the reload
    /// check of [`Lab::publish_discovery_and_wait`], because the lab's
    /// lifecycle tests run it against a stand-in daemon that counts no
    /// reloads.
    fn publish_discovery(&self) -> Result<(), LabError> {
        self.write_discovery()?;
        std::thread::sleep(daemon::DISCOVERY_SETTLE);
        Ok(())
    }

    fn node_index(&self, node: usize) -> Result<usize, LabError> {
        self.state
            .nodes
            .iter()
            .position(|n| n.index == node)
            .ok_or(LabError::UnknownNode { index: node })
    }

    /// Recorded state of node `node` (from 1).
    pub fn node(&self, node: usize) -> Result<&NodeState, LabError> {
        Ok(&self.state.nodes[self.node_index(node)?])
    }

    /// Starts node `node`'s daemon; with `log_level`, (re)writes its config first.
    fn spawn_daemon(&mut self, node: usize, log_level: Option<&str>) -> Result<(), LabError> {
        let idx = self.node_index(node)?;
        let n = &self.state.nodes[idx];
        let (Some(nodemesh), Some(paths)) = (self.nodemesh.clone(), n.daemon.clone()) else {
            return Err(LabError::NoDaemon {
                node: n.name.clone(),
            });
        };
        if let Some(log_level) = log_level {
            std::fs::create_dir_all(&paths.state_dir)
                .map_err(|e| LabError::io(&paths.state_dir, e))?;
            let address = self.state.tunnel_address(n);
            let mut config = daemon::node_config(
                &n.name,
                address,
                &self.cert_dir(),
                &paths,
                &self.state.discovery_file(),
                log_level,
            );
            if let Some(mtu) = self.state.underlay_mtu {
                // 8 bytes of UDP header and 20 of IPv4 or 40 of IPv6.
                let headers = if address.is_ipv4() { 28 } else { 48 };
                config.tunnel.max_udp_payload = u16::try_from(mtu.saturating_sub(headers))
                    .unwrap_or(u16::MAX)
                    .min(65527);
            }
            daemon::write_config(&paths.config, &config)?;
        }
        let process = DaemonProcess::spawn(&nodemesh, &n.name, &n.netns, &paths)?;
        self.state.nodes[idx].daemon_pid = Some(process.pid());
        self.daemons.insert(node, process);
        self.state.save()
    }

    fn wait_daemon_ready(&mut self, node: usize) -> Result<(), LabError> {
        let name = self.node(node)?.name.clone();
        let process = self
            .daemons
            .get_mut(&node)
            .ok_or(LabError::NoDaemon { node: name })?;
        process.wait_ready(daemon::READY_TIMEOUT)
    }

    fn runtime(&self, node: usize) -> Result<Runtime, LabError> {
        let n = self.node(node)?;
        Ok(Runtime {
            conflist: n.conflist.clone(),
            cni_path: self.state.cni_path.clone(),
            exec_netns: n.netns.clone(),
        })
    }

    /// The `bridge` entry of node `node`'s pods (dual-stack when the lab is).
    fn bridge_plugin(&self, node: usize, node_dir: &Path) -> Value {
        let v6 = self.state.dual_stack.then(|| topology::pod_cidr6(node));
        cni::with_ipv6(
            cni::bridge_plugin(&topology::pod_cidr(node), &node_dir.join("ipam")),
            v6.as_deref(),
        )
    }

    fn create_pod(&mut self, node: usize, k: usize) -> Result<PodHandle, LabError> {
        self.create_pod_with(node, k, None)
    }

    /// Creates pod `k` of `node` with `conflist` (`None`: the node's).
    fn create_pod_with(
        &mut self,
        node: usize,
        k: usize,
        conflist: Option<Value>,
    ) -> Result<PodHandle, LabError> {
        let prefix = self.state.prefix.clone();
        let name = topology::pod_name(node, k);
        let ns = topology::pod_netns(&prefix, node, k);
        let digest = ring::digest::digest(&ring::digest::SHA256, ns.as_bytes());
        let container_id: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let invocation = Invocation {
            container_id: container_id.clone(),
            netns: ns.clone(),
            ifname: POD_IFNAME.into(),
            pod_namespace: POD_NAMESPACE.into(),
            pod_name: name.clone(),
            pod_uid: format!("{}-{}", &container_id[..8], name),
        };
        let mut runtime = self.runtime(node)?;
        if let Some(c) = &conflist {
            runtime.conflist = c.clone();
        }
        self.state.pods.push(PodState {
            node,
            index: k,
            invocation: invocation.clone(),
            result: None,
            ip: None,
            ip6: None,
            conflist,
            labels: BTreeMap::new(),
        });
        let pod_idx = self.state.pods.len() - 1;
        self.state.save()?;
        netns::add_netns(&ns)?;
        if self.state.dual_stack {
            topology::disable_dad(&ns)?;
        }
        let result = match runtime.add(&invocation) {
            Ok(r) => r,
            Err(e) => {
                // As a runtime would: DEL after a failed ADD, then report.
                let _ = runtime.del(&invocation, None);
                return Err(e);
            }
        };
        let ip = cni::result_ipv4(&result).ok_or_else(|| LabError::CniFormat {
            what: format!("ADD result of pod {name}"),
            problem: format!("no IPv4 address in {result}"),
        })?;
        let ip6 = if self.state.dual_stack {
            Some(
                cni::result_ipv6(&result).ok_or_else(|| LabError::CniFormat {
                    what: format!("ADD result of pod {name}"),
                    problem: format!("no IPv6 address in {result} (the lab is dual-stack)"),
                })?,
            )
        } else {
            None
        };
        let pod = &mut self.state.pods[pod_idx];
        pod.result = Some(result);
        pod.ip = Some(ip);
        pod.ip6 = ip6;
        self.state.save()?;
        Ok(PodHandle {
            node,
            index: k,
            namespace: POD_NAMESPACE.into(),
            name,
            netns: ns,
            ip,
            ip6,
        })
    }

    /// Adds one more pod to node `node` (through the CNI chain) and publishes
    /// it in discovery.
    pub fn add_pod(&mut self, node: usize) -> Result<PodHandle, LabError> {
        let k = self
            .state
            .pods
            .iter()
            .filter(|p| p.node == node)
            .map(|p| p.index)
            .max()
            .unwrap_or(0)
            + 1;
        self.node_index(node)?;
        let pod = self.create_pod(node, k)?;
        if self.state.mesh {
            self.publish_discovery()?;
        }
        Ok(pod)
    }

    /// Adds an **unmeshed** pod to node `node`: created through the bridge
    /// plugin only (no `nodemesh-cni`, so no capture and no registration with
    /// the daemon), like a pod of an excluded namespace. It is published in
    /// discovery like any pod (discovery knows unmeshed pods too).
    pub fn add_unmeshed_pod(&mut self, node: usize) -> Result<PodHandle, LabError> {
        let k = self
            .state
            .pods
            .iter()
            .filter(|p| p.node == node)
            .map(|p| p.index)
            .max()
            .unwrap_or(0)
            + 1;
        self.node_index(node)?;
        let node_dir = self.state.dir.join(topology::node_name(node));
        let conflist = cni::conflist(vec![cni::with_mtu(
            self.bridge_plugin(node, &node_dir),
            self.state.underlay_mtu,
        )]);
        let pod = self.create_pod_with(node, k, Some(conflist))?;
        if self.state.mesh {
            self.publish_discovery()?;
        }
        Ok(pod)
    }

    /// Creates a bare node namespace `<prefix>-n<index>` on the underlay
    /// (address `10.77.0.<index>/24`, routes to the lab's pod CIDRs) with no
    /// daemon and no pods, e.g. to play a rogue node in tests; returns its
    /// namespace name. It is not part of the lab's discovery model (add it
    /// with [`Lab::set_discovery_extra`] if wanted) and is removed with the lab.
    pub fn add_bare_node(&mut self, index: usize) -> Result<String, LabError> {
        if index == 0
            || index > topology::MAX_NODES
            || self.state.nodes.iter().any(|n| n.index == index)
        {
            return Err(LabError::BadOption {
                option: "bare node index",
                problem: format!(
                    "{index} is not in 1..={} or is a lab node",
                    topology::MAX_NODES
                ),
            });
        }
        topology::create_node(
            &self.state.prefix,
            index,
            self.state.nodes.len(),
            self.state.dual_stack,
        )?;
        Ok(topology::node_netns(&self.state.prefix, index))
    }

    /// Replaces the services in discovery, publishes them to the daemons and
    /// waits until every running daemon has applied them (as
    /// [`Lab::set_discovery_extra`] does).
    pub fn set_services(&mut self, services: Vec<Service>) -> Result<(), LabError> {
        self.state.services = services;
        self.state.save()?;
        if self.state.mesh {
            self.publish_discovery_and_wait()?;
        }
        Ok(())
    }

    /// Sets the labels pod `pod` carries in discovery besides
    /// `app: <pod name>` (e.g. `track: canary` for a traffic split), then
    /// publishes and waits as [`Lab::set_services`] does.
    pub fn set_pod_labels(
        &mut self,
        pod: &PodHandle,
        labels: BTreeMap<String, String>,
    ) -> Result<(), LabError> {
        let state = self
            .state
            .pods
            .iter_mut()
            .find(|p| p.node == pod.node && p.index == pod.index)
            .ok_or_else(|| LabError::BadOption {
                option: "pod",
                problem: format!("{} is not a pod of this lab", pod.name),
            })?;
        state.labels = labels;
        self.state.save()?;
        if self.state.mesh {
            self.publish_discovery_and_wait()?;
        }
        Ok(())
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.state.prefix
    }

    /// The lab directory.
    pub fn dir(&self) -> &Path {
        &self.state.dir
    }

    /// The recorded state.
    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// Nodes.
    pub fn nodes(&self) -> &[NodeState] {
        &self.state.nodes
    }

    /// Every pod with a known address, node by node.
    pub fn pods(&self) -> Vec<PodHandle> {
        self.state
            .pods
            .iter()
            .filter_map(|p| {
                Some(PodHandle {
                    node: p.node,
                    index: p.index,
                    namespace: p.invocation.pod_namespace.clone(),
                    name: p.invocation.pod_name.clone(),
                    netns: p.invocation.netns.clone(),
                    ip: p.ip?,
                    ip6: p.ip6,
                })
            })
            .collect()
    }

    /// Pod `k` of node `node` (both from 1).
    pub fn pod(&self, node: usize, k: usize) -> Result<PodHandle, LabError> {
        self.pods()
            .into_iter()
            .find(|p| p.node == node && p.index == k)
            .ok_or(LabError::UnknownPod { node, pod: k })
    }

    /// Runs `program args` inside namespace `netns` (a node's or a pod's).
    pub fn exec_in(&self, netns: &str, program: &str, args: &[&str]) -> Result<Output, LabError> {
        netns::exec_in(netns, program, args.iter().copied())
    }

    /// The `nodemesh` binary the lab runs (meshed labs).
    pub fn nodemesh_bin(&self) -> Option<&Path> {
        self.nodemesh.as_deref()
    }

    /// Directory of the lab's CA and node certificates (`ca.pem`,
    /// `<node>.pem`, `<node>-key.pem`), made with `nodemesh certs`.
    pub fn cert_dir(&self) -> PathBuf {
        self.state.dir.join("certs")
    }

    /// Pid of node `node`'s daemon, if this lab runs one.
    pub fn daemon_pid(&self, node: usize) -> Option<u32> {
        self.daemons.get(&node).map(DaemonProcess::pid)
    }

    /// The daemon log file of node `node`.
    pub fn daemon_log(&self, node: usize) -> Result<PathBuf, LabError> {
        let n = self.node(node)?;
        n.daemon
            .as_ref()
            .map(|d| d.log.clone())
            .ok_or(LabError::NoDaemon {
                node: n.name.clone(),
            })
    }

    /// Waits up to `timeout` until node `node`'s daemon log has a line
    /// containing every one of `needles`, and returns that line.
    pub fn wait_log_line(
        &self,
        node: usize,
        needles: &[&str],
        timeout: Duration,
    ) -> Result<String, LabError> {
        let path = self.daemon_log(node)?;
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&path).map_err(|e| LabError::io(&path, e))?;
            if let Some(l) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return Ok(l.to_owned());
            }
            if Instant::now() >= deadline {
                return Err(LabError::LogLineMissing {
                    log: path.clone(),
                    needles: needles.iter().map(|n| (*n).to_owned()).collect(),
                    timeout,
                    tail: daemon::log_tail(&path, 30),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts node `node`'s daemon (again) and waits until it is ready.
    pub fn start_daemon(&mut self, node: usize) -> Result<(), LabError> {
        if self.daemons.contains_key(&node) {
            return Ok(());
        }
        // Same config as before: a restart must not change anything.
        self.spawn_daemon(node, None)?;
        self.wait_daemon_ready(node)
    }

    /// Stops node `node`'s daemon with SIGTERM (SIGKILL after
    /// [`daemon::STOP_TIMEOUT`]) and returns its exit status.
    pub fn stop_daemon(&mut self, node: usize) -> Result<ExitStatus, LabError> {
        let idx = self.node_index(node)?;
        let process = self
            .daemons
            .remove(&node)
            .ok_or_else(|| LabError::NoDaemon {
                node: self.state.nodes[idx].name.clone(),
            })?;
        let status = process.stop(daemon::STOP_TIMEOUT)?;
        self.state.nodes[idx].daemon_pid = None;
        self.state.save()?;
        Ok(status)
    }

    /// Upgrades node `node`'s daemon the way a DaemonSet rolling update
    /// does: starts a second daemon process with the same config beside the
    /// running one, and waits until it has taken over (it answers the
    /// node's admin address as the daemon serving). The old process keeps
    /// draining its open connections until [`Lab::stop_predecessor`];
    /// returns its pid.
    pub fn start_successor(&mut self, node: usize) -> Result<u32, LabError> {
        let idx = self.node_index(node)?;
        let n = &self.state.nodes[idx];
        let (Some(nodemesh), Some(paths)) = (self.nodemesh.clone(), n.daemon.clone()) else {
            return Err(LabError::NoDaemon {
                node: n.name.clone(),
            });
        };
        if !self.daemons.contains_key(&node) || self.predecessors.contains_key(&node) {
            return Err(LabError::BadOption {
                option: "successor",
                problem: format!(
                    "node {} needs exactly one running daemon to take over from",
                    n.name
                ),
            });
        }
        let mut successor = DaemonProcess::spawn(&nodemesh, &n.name, &n.netns, &paths)?;
        if let Err(e) = successor.wait_serving(daemon::READY_TIMEOUT) {
            let _ = successor.stop(daemon::STOP_TIMEOUT);
            return Err(e);
        }
        let pid = successor.pid();
        let old = self
            .daemons
            .insert(node, successor)
            .ok_or_else(|| LabError::NoDaemon {
                node: self.state.nodes[idx].name.clone(),
            })?;
        let old_pid = old.pid();
        self.predecessors.insert(node, old);
        self.state.nodes[idx].daemon_pid = Some(pid);
        self.state.save()?;
        Ok(old_pid)
    }

    /// Stops (SIGTERM, SIGKILL after `timeout`) the daemon node `node`'s
    /// successor took over from, and returns its exit status.
    pub fn stop_predecessor(
        &mut self,
        node: usize,
        timeout: Duration,
    ) -> Result<ExitStatus, LabError> {
        let idx = self.node_index(node)?;
        let process = self
            .predecessors
            .remove(&node)
            .ok_or_else(|| LabError::NoDaemon {
                node: format!("{} (predecessor)", self.state.nodes[idx].name),
            })?;
        process.stop(timeout)
    }

    /// Rewrites node `node`'s daemon config through `edit` (takes effect at
    /// the next [`Lab::start_daemon`] / [`Lab::restart_daemon`]), e.g. to
    /// point it at certificates from another CA.
    pub fn update_config(
        &self,
        node: usize,
        edit: impl FnOnce(&mut nodemesh::config::Config),
    ) -> Result<(), LabError> {
        let n = self.node(node)?;
        let paths = n.daemon.as_ref().ok_or(LabError::NoDaemon {
            node: n.name.clone(),
        })?;
        let mut config =
            nodemesh::config::Config::from_file(&paths.config).map_err(|e| LabError::State {
                path: paths.config.clone(),
                problem: e.to_string(),
            })?;
        edit(&mut config);
        daemon::write_config(&paths.config, &config)
    }

    /// Stops then starts node `node`'s daemon; returns the stop's exit status.
    pub fn restart_daemon(&mut self, node: usize) -> Result<ExitStatus, LabError> {
        let status = self.stop_daemon(node)?;
        self.start_daemon(node)?;
        Ok(status)
    }

    /// `GET path` on node `node`'s admin address, from the node's namespace.
    pub fn admin_get(&self, node: usize, path: &str) -> Result<Response, LabError> {
        let n = self.node(node)?;
        let paths = n.daemon.as_ref().ok_or(LabError::NoDaemon {
            node: n.name.clone(),
        })?;
        http::get(&n.netns, paths.admin, path, ADMIN_TIMEOUT)
    }

    /// Node `node`'s `/metrics`, parsed.
    pub fn metrics(&self, node: usize) -> Result<Vec<Sample>, LabError> {
        let n = self.node(node)?;
        let r = self.admin_get(node, "/metrics")?;
        if r.status != 200 {
            return Err(LabError::Http {
                netns: n.netns.clone(),
                addr: n
                    .daemon
                    .as_ref()
                    .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |d| d.admin),
                path: "/metrics".into(),
                problem: format!("status {}", r.status),
            });
        }
        Ok(metrics::parse(&r.body)?)
    }

    /// Moves `bytes` each way between a client in `src` and a hashing server
    /// listening on `port` in `dst`, and checks both directions arrived intact.
    pub fn transfer(
        &self,
        src: &PodHandle,
        dst: &PodHandle,
        port: u16,
        bytes: u64,
    ) -> Result<ExchangeReport, LabError> {
        transfer(src, dst, port, bytes)
    }

    /// [`Lab::transfer`] to `dst`'s address of `family` (IPv6: dual-stack labs).
    pub fn transfer_over(
        &self,
        src: &PodHandle,
        dst: &PodHandle,
        family: Family,
        port: u16,
        bytes: u64,
    ) -> Result<ExchangeReport, LabError> {
        transfer_over(src, dst, family, port, bytes)
    }

    /// Runs `connections` concurrent [`Lab::transfer`]-style exchanges of
    /// `bytes` each way from `src` to one server on `port` in `dst`; fails
    /// unless every one arrived intact. Returns the client reports.
    pub fn transfer_many(
        &self,
        src: &PodHandle,
        dst: &PodHandle,
        port: u16,
        connections: usize,
        bytes: u64,
    ) -> Result<Vec<ExchangeReport>, LabError> {
        transfer_many(src, dst, port, connections, bytes)
    }

    /// Leaves the lab running (for `nodemesh-lab up`) and returns its state;
    /// `nodemesh-lab down` or [`teardown_prefix`] removes it later.
    pub fn detach(mut self) -> LabState {
        self.detached = true;
        for (_, process) in std::mem::take(&mut self.daemons) {
            process.detach();
        }
        for (_, process) in std::mem::take(&mut self.predecessors) {
            process.detach();
        }
        self.state.clone()
    }

    /// Removes everything; returns the problems met (also logged).
    pub fn down(mut self) -> Vec<String> {
        self.teardown()
    }

    fn teardown(&mut self) -> Vec<String> {
        if self.detached {
            return Vec::new();
        }
        self.detached = true;
        let mut daemons: Vec<DaemonProcess> =
            std::mem::take(&mut self.daemons).into_values().collect();
        daemons.extend(std::mem::take(&mut self.predecessors).into_values());
        teardown(&self.state.prefix, Some(&self.state), daemons)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let problems = self.teardown();
        for p in problems {
            tracing::warn!(problem = %p, "lab teardown");
        }
    }
}

/// Moves `bytes` each way between a client in `src` and a hashing server on
/// `port` in `dst`; fails unless both directions arrived byte-identical.
pub fn transfer(
    src: &PodHandle,
    dst: &PodHandle,
    port: u16,
    bytes: u64,
) -> Result<ExchangeReport, LabError> {
    transfer_over(src, dst, Family::V4, port, bytes)
}

/// [`transfer`] to `dst`'s address of `family`.
pub fn transfer_over(
    src: &PodHandle,
    dst: &PodHandle,
    family: Family,
    port: u16,
    bytes: u64,
) -> Result<ExchangeReport, LabError> {
    let listener = dst.listen_in(family, port)?;
    let port = listener
        .local_addr()
        .map_err(|e| LabError::Netns {
            netns: dst.netns.clone(),
            what: "local_addr".into(),
            source: e,
        })?
        .port();
    // Before the server thread starts: an error here leaves nothing waiting.
    let to = dst.addr_in(family, port)?;
    let what = format!("{} -> {} ({to})", src.name, dst.name);
    let server = traffic::serve(listener, 1, bytes);
    let stream = src.connect(to)?;
    let io_err = |e: std::io::Error| LabError::Transfer {
        what: what.clone(),
        problem: e.to_string(),
    };
    let report = traffic::exchange(stream, bytes).map_err(io_err)?;
    report.verify(&what, bytes)?;
    match server.join() {
        Ok(Ok(_)) => Ok(report),
        Ok(Err(e)) => Err(io_err(e)),
        Err(_) => Err(io_err(std::io::Error::other("server thread panicked"))),
    }
}

/// Concurrent transfers; see [`Lab::transfer_many`].
pub fn transfer_many(
    src: &PodHandle,
    dst: &PodHandle,
    port: u16,
    connections: usize,
    bytes: u64,
) -> Result<Vec<ExchangeReport>, LabError> {
    let what = format!("{} -> {}:{port} x{connections}", src.name, dst.name);
    let io_err = |e: std::io::Error| LabError::Transfer {
        what: what.clone(),
        problem: e.to_string(),
    };
    let listener = dst.listen(port)?;
    let port = listener.local_addr().map_err(io_err)?.port();
    let server = traffic::serve(listener, connections, bytes);
    // Connect all first (each from the source pod), then exchange all at once.
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(src.connect(dst.addr(port))?);
    }
    let clients: Vec<_> = streams
        .into_iter()
        .map(|s| std::thread::spawn(move || traffic::exchange(s, bytes)))
        .collect();
    let mut reports = Vec::with_capacity(connections);
    for (i, c) in clients.into_iter().enumerate() {
        let report = c
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("client thread panicked")))
            .map_err(io_err)?;
        report.verify(&format!("{what} #{i}"), bytes)?;
        reports.push(report);
    }
    match server.join() {
        Ok(Ok(_)) => Ok(reports),
        Ok(Err(e)) => Err(io_err(e)),
        Err(_) => Err(io_err(std::io::Error::other("server thread panicked"))),
    }
}

/// Removes lab `prefix`: CNI DEL of its recorded pods, its daemons stopped,
/// then every process and namespace matching the prefix, then its directory.
/// Works with missing or partial state. Returns the problems met.
pub fn teardown_prefix(prefix: &str) -> Vec<String> {
    if let Err(e) = topology::validate_prefix(prefix) {
        return vec![e.to_string()];
    }
    match LabState::load(prefix) {
        Ok(state) => teardown(prefix, state.as_ref(), Vec::new()),
        Err(e) => {
            let mut problems = vec![e.to_string()];
            problems.extend(teardown(prefix, None, Vec::new()));
            problems
        }
    }
}

fn teardown(prefix: &str, state: Option<&LabState>, daemons: Vec<DaemonProcess>) -> Vec<String> {
    let mut problems = Vec::new();
    let dir = lab_dir(prefix);
    let dir_text = format!("{}/", dir.display());
    // 1. CNI DEL, newest pod first, while the daemons can still unregister.
    if let Some(state) = state {
        for pod in state.pods.iter().rev() {
            let Some(node) = state.nodes.iter().find(|n| n.index == pod.node) else {
                continue;
            };
            if !netns::netns_path(&node.netns).exists() {
                continue;
            }
            let runtime = Runtime {
                conflist: pod
                    .conflist
                    .clone()
                    .unwrap_or_else(|| node.conflist.clone()),
                cni_path: state.cni_path.clone(),
                exec_netns: node.netns.clone(),
            };
            if let Err(e) = runtime.del(&pod.invocation, pod.result.as_ref()) {
                problems.push(e.to_string());
            }
        }
    }
    // 2. Daemons: ours as children, others by recorded pid.
    for process in daemons {
        if let Err(e) = process.stop(daemon::STOP_TIMEOUT) {
            problems.push(e.to_string());
        }
    }
    if let Some(state) = state {
        let ours = daemon::pids_mentioning(&dir_text);
        for pid in state.nodes.iter().filter_map(|n| n.daemon_pid) {
            if let Ok(pid) = i32::try_from(pid) {
                // Only if it still is our daemon (pids get reused).
                if ours.contains(&pid) {
                    daemon::stop_pid(pid, daemon::STOP_TIMEOUT);
                }
            }
        }
    }
    // 3. Anything else: processes naming the lab directory, or inside its namespaces.
    let lab_netns: Vec<String> = match netns::list_netns() {
        Ok(all) => all
            .into_iter()
            .filter(|n| topology::is_lab_netns(prefix, n))
            .collect(),
        Err(e) => {
            problems.push(e.to_string());
            Vec::new()
        }
    };
    let mut strays = daemon::pids_mentioning(&dir_text);
    for ns in &lab_netns {
        match netns::netns_pids(ns) {
            Ok(pids) => strays.extend(pids),
            Err(e) => problems.push(e.to_string()),
        }
    }
    strays.sort_unstable();
    strays.dedup();
    for pid in strays {
        tracing::info!(pid, prefix, "stopping stray lab process");
        daemon::stop_pid(pid, STRAY_STOP_TIMEOUT);
    }
    // 4. Namespaces: pods, then nodes, then the underlay (removing a
    //    namespace removes its links, routes and nftables tables).
    let mut ordered = lab_netns;
    ordered.sort_by_key(|n| {
        (
            std::cmp::Reverse(n.matches('-').count()),
            n.ends_with("-ul"),
        )
    });
    for ns in ordered {
        if let Err(e) = netns::del_netns(&ns) {
            problems.push(e.to_string());
        }
    }
    // 5. The directory.
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            problems.push(LabError::io(&dir, e).to_string());
        }
    }
    problems
}

/// What remains of lab `prefix`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Namespaces matching the prefix.
    pub netns: Vec<String>,
    /// Processes naming the lab directory or inside its namespaces.
    pub pids: Vec<i32>,
    /// The lab directory, if it exists.
    pub dir: Option<PathBuf>,
}

impl Leftovers {
    /// Nothing remains.
    pub fn is_clean(&self) -> bool {
        self.netns.is_empty() && self.pids.is_empty() && self.dir.is_none()
    }
}

/// Lists what remains of lab `prefix`.
pub fn leftovers(prefix: &str) -> Result<Leftovers, LabError> {
    let dir = lab_dir(prefix);
    let netns: Vec<String> = netns::list_netns()?
        .into_iter()
        .filter(|n| topology::is_lab_netns(prefix, n))
        .collect();
    let mut pids = daemon::pids_mentioning(&format!("{}/", dir.display()));
    for ns in &netns {
        pids.extend(netns::netns_pids(ns)?);
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(Leftovers {
        netns,
        pids,
        dir: dir.exists().then_some(dir),
    })
}

/// Waits until `prefix` has no leftovers, up to `timeout` (processes may
/// take a moment to be reaped); returns the last observation.
pub fn wait_clean(prefix: &str, timeout: Duration) -> Result<Leftovers, LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let l = leftovers(prefix)?;
        if l.is_clean() || Instant::now() >= deadline {
            return Ok(l);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
