//! Daemon configuration: every setting, its default and its validation.
//!
//! Owns the typed [`Config`], loaded from a YAML file and overridden by
//! command-line flags / environment (see `cli`). Nothing else in the daemon
//! reads the environment. Every field is documented with its unit and default;
//! [`Config::validate`] rejects bad values with a [`ConfigError`] naming the
//! field and the fix, and `main` exits 64 on it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default trust domain of SPIFFE identities.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default UDP port of the QUIC tunnel.
pub const DEFAULT_TUNNEL_PORT: u16 = 15008;
/// Default admin (metrics, health) port, on all addresses.
pub const DEFAULT_ADMIN_PORT: u16 = 15020;
/// Default interval of the TLS files' reload check, in ms.
pub const DEFAULT_TLS_RELOAD_INTERVAL_MS: u64 = 5_000;
/// Default directory where pod registrations are persisted across restarts.
/// Under `/run`: pods' network namespaces do not survive a reboot either.
pub const DEFAULT_STATE_DIR: &str = "/run/nodemesh/pods";

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name, as Kubernetes knows it. Required (no default).
    /// Env `NODEMESH_NODE_NAME`.
    pub node_name: String,
    /// This node's address, where peers reach its tunnel. Required. IPv4 or
    /// IPv6: the tunnel endpoint binds it, so the tunnels run in its family.
    pub node_address: Option<IpAddr>,
    /// SPIFFE trust domain. Default `cluster.local`.
    pub trust_domain: String,
    /// Node certificate files.
    pub tls: TlsConfig,
    /// Ports and addresses.
    pub ports: PortsConfig,
    /// Admin server address (`/metrics`, `/healthz`, `/ready`). Default `0.0.0.0:15020`.
    pub admin_addr: SocketAddr,
    /// Unix socket the CNI plugin registers pods on. Default `/run/nodemesh/cni.sock`.
    pub cni_socket: PathBuf,
    /// Directory for persisted registrations. Default `/run/nodemesh/pods`.
    pub state_dir: PathBuf,
    /// Where the CNI plugin queues unregisters it could not deliver (its
    /// `state_dir` + `/queue`); drained at start. Default `/var/lib/nodemesh-cni/queue`.
    pub cni_queue_dir: PathBuf,
    /// `SO_MARK` set on the daemon's sockets inside pods so their capture
    /// rules let them through. Default `0x4e4d`.
    pub socket_mark: u32,
    /// Where the cluster model comes from.
    pub discovery: DiscoveryConfig,
    /// Tunnel transport settings.
    pub tunnel: TunnelConfig,
    /// How long SIGTERM waits for open connections to finish, in ms. Default 10000.
    pub drain_timeout_ms: u64,
    /// Timeout for a TCP connect to a destination, in ms. Default 5000.
    pub connect_timeout_ms: u64,
    /// Set `net.ipv4.tcp_tw_reuse = 1` in every registered pod's network
    /// namespace. Default true: L2 connects into a pod from inside it, so
    /// the TIME_WAITs of the mesh's connections from one client (from every
    /// client with `client_address.preserve: false`) to one pod port fill
    /// one 4-tuple space in the pod, at ~470 connections/s (see
    /// `netns::TCP_TW_REUSE`, docs/operations.md).
    pub pod_tcp_tw_reuse: bool,
    /// Whether the mesh delivers connections into pods from the client's
    /// address, and the marks and routes that takes.
    pub client_address: ClientAddressConfig,
    /// Log filter (tracing `EnvFilter` syntax). Default `info`.
    pub log_level: String,
    /// Log format: `text` or `json`. Default `text`.
    pub log_format: LogFormat,
    /// How plain TCP ↔ TCP legs (same-node delivery, passthrough) are
    /// relayed: `copy` (read/write through a 64 KiB buffer) or `splice`
    /// (splice(2) through a pipe, no user-space copy; two pipes per
    /// connection once it carries data). Default `splice`: about half the
    /// CPU per byte of `copy` (docs/benchmarks.md, "Plain-TCP relay engines").
    pub tcp_relay: crate::relay_splice::TcpRelay,
    /// Worker threads of the async runtime; 0 = one per CPU (tokio's
    /// default). Default 1: in the lab on 2 CPUs one worker moved 40-60 %
    /// more per tunnel stream at less CPU per byte than one per CPU (QUIC
    /// endpoint driver and relay tasks on one thread: no cross-thread
    /// wake-ups); raise it where one daemon must carry more than a core's
    /// worth of traffic. See docs/benchmarks.md (tuning).
    pub worker_threads: usize,
    /// Admission limits of the shared proxy.
    pub limits: LimitsConfig,
    /// Access logs: one line per proxied connection on each daemon that
    /// handled it (target `nodemesh::access`, at INFO, in `log_format`).
    /// Default false: a line is a write to stderr per connection.
    pub access_log: bool,
}

/// Admission limits (`limits`): a connection over a limit is reset at once
/// (a tunnel stream is answered `unavailable`), counted in
/// `nodemesh_connections_limited_total` and logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections one local pod may have open through its outbound
    /// listener at once, whatever their destination. Default 4096: one pod
    /// that opens connections without closing them is refused at its own
    /// limit while its neighbours keep connecting, and cannot take all of a
    /// tunnel's streams to a peer (`tunnel.max_streams`, 10000).
    pub max_connections_per_pod: usize,
    /// Connections the daemon proxies at once in all (outbound, plaintext
    /// inbound, tunnel streams from peers). Default 65536: about 250 MiB of
    /// daemon memory at the ~4 KiB an idle connection costs (two file
    /// descriptors at most each), more while connections move data. At
    /// start, 4 KiB per connection plus `relay_buffer_memory_mib` must fit
    /// in half of the container's memory limit ([`crate::memory_limit`]).
    pub max_connections: usize,
    /// Memory, in MiB, of the 64 KiB relay buffers lent at once to
    /// connections that are moving data (an idle connection holds none).
    /// When it is spent, a connection with data to move uses a 4 KiB buffer
    /// instead: slower, never waiting for another connection, counted in
    /// `nodemesh_relay_buffer_fallbacks_total`. Default 256 (4096 buffers):
    /// a quarter of the DaemonSet's 1Gi memory limit, where without a budget
    /// `max_connections` busy connections could ask for 8 GiB.
    pub relay_buffer_memory_mib: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_pod: crate::limits::DEFAULT_MAX_PER_POD,
            max_connections: crate::limits::DEFAULT_MAX_TOTAL,
            relay_buffer_memory_mib: crate::relay::DEFAULT_BUFFER_BUDGET_MIB,
        }
    }
}

/// Node certificate files (PEM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chain, leaf first. Default `/etc/nodemesh/tls/node.pem`.
    pub cert: PathBuf,
    /// Private key of the leaf (PKCS#8). Default `/etc/nodemesh/tls/node-key.pem`.
    pub key: PathBuf,
    /// Trust bundle: CA certificates peers must chain to. Default `/etc/nodemesh/tls/ca.pem`.
    pub bundle: PathBuf,
    /// How often the three files are re-read and compared by content (not
    /// inode: Kubernetes Secret volumes swap symlinks), in ms; changed valid
    /// files are installed for new tunnels. Also how often the certificate's
    /// expiry is re-checked. Default 5000.
    pub reload_interval_ms: u64,
}

/// Listener ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PortsConfig {
    /// Outbound capture listener on 127.0.0.1 in each pod. Default 15001.
    pub outbound: u16,
    /// Inbound plaintext capture listener in each pod. Default 15006.
    pub inbound: u16,
    /// UDP port of the QUIC tunnel on the node address. Default 15008.
    pub tunnel: u16,
}

/// Where discovery reads the cluster model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Source kind: `file` (default) or `kubernetes`.
    pub source: DiscoverySource,
    /// The YAML file for the `file` source. Default `/etc/nodemesh/discovery.yaml`.
    pub file: PathBuf,
    /// How often the file is checked for changes, in ms. Default 1000.
    pub poll_interval_ms: u64,
}

/// Discovery source kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoverySource {
    /// A YAML file (standalone, lab, tests).
    File,
    /// Watches of the Kubernetes API server (in-cluster service account, or
    /// the kubeconfig named by `KUBECONFIG`).
    Kubernetes,
}

/// Connecting into a destination pod from the client's address
/// (`IP_TRANSPARENT`), so the application sees who called it: the client
/// pod's address as the stream header carries it (verified at L2), or the
/// peer of a plaintext connection. Replies come back to the daemon through a
/// return path in the pod's namespace (a policy-routing rule for `mark`, a
/// `local default dev lo` route in `table`, `net.ipv4.tcp_fwmark_accept`),
/// installed by the daemon when it registers the pod. Where that fails the
/// pod is meshed all the same and reached from its own address
/// (`nodemesh_pod_return_path_failures_total`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientAddressConfig {
    /// Connect from the client's address. Default true. False: from the
    /// pod's own address (the application sees itself as the client), and
    /// nothing is installed in pods.
    pub preserve: bool,
    /// `SO_MARK` of those connections, which the return path matches; must
    /// differ from `socket_mark` and be unused by other software in pods.
    /// Default `0x4e4e`.
    pub mark: u32,
    /// Routing table of the return path, in each pod's namespace. Default
    /// 20046 (`0x4e4e`, the mark's number).
    pub table: u32,
    /// Priority of the return path's rule (before the main table's 32766).
    /// Default 32000.
    pub rule_priority: u32,
}

impl Default for ClientAddressConfig {
    fn default() -> Self {
        Self {
            preserve: true,
            mark: 0x4e4e,
            table: 0x4e4e,
            rule_priority: 32000,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// QUIC tunnel transport settings. Defaults follow DESIGN §10: quinn's own
/// defaults are sized for 100 Mbit/s x 100 ms and drop packets on a fast path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// Idle timeout of a tunnel, in ms. Default 30000.
    pub idle_timeout_ms: u64,
    /// Keep-alive interval, in ms (must be below the idle timeout). Default 10000.
    pub keep_alive_ms: u64,
    /// TLS + QUIC handshake timeout when dialling a peer, in ms. Default 5000.
    pub handshake_timeout_ms: u64,
    /// Per-stream receive window, bytes: at most this much of one stream is
    /// in flight per round trip (2 MiB: 16.8 Gbit/s at 1 ms). Default 2 MiB.
    pub stream_window: u64,
    /// Per-connection receive window, and send window, bytes: what one
    /// node pair's tunnel holds in flight and buffers, all streams together.
    /// Default 8 MiB (docs/benchmarks.md, notes: larger windows measured
    /// slower with many streams).
    pub connection_window: u64,
    /// UDP socket send and receive buffer, bytes. Default 8 MiB.
    pub udp_buffer: usize,
    /// Maximum concurrent bidirectional streams a peer may open. Default 10000.
    pub max_streams: u32,
    /// Largest UDP payload the tunnel sends or accepts, bytes: the ceiling
    /// of QUIC path-MTU discovery and the endpoint's `max_udp_payload_size`.
    /// Set it to the underlay MTU minus 28 (IPv4) or 48 (IPv6): 8972 on a
    /// 9000-byte jumbo-frame network. Larger packets mean fewer per-packet
    /// costs (AEAD set-up, syscalls, ACKs). Default 1452 (quinn's ceiling,
    /// safe for 1500-byte Ethernet with IPv4 or IPv6). 1200..=65527.
    pub max_udp_payload: u16,
    /// UDP payload the tunnel starts with before path-MTU discovery raises
    /// it, bytes. Default 1200 (QUIC's minimum, always safe); raise it only
    /// where every path is known to carry it.
    pub initial_mtu: u16,
    /// Congestion controller: `cubic` (default, quinn's default),
    /// `new_reno` or `bbr` (quinn's BBR is experimental).
    pub congestion: Congestion,
    /// ACK frequency (draft-ietf-quic-ack-frequency): how many
    /// ack-eliciting packets the peer may receive before it must send an
    /// ACK. Unset (the default) leaves the extension off: an ACK every
    /// second packet, as RFC 9000 says.
    pub ack_eliciting_threshold: Option<u32>,
    /// UDP generic segmentation offload: quinn hands the kernel one buffer of
    /// up to 64 KiB of same-sized packets per `sendmsg`. Default true. Turn
    /// it off only where a driver or a packet inspection tool mishandles UDP
    /// GSO (quinn also turns it off by itself when the kernel refuses it, at
    /// the cost of some packet loss at start); without it every packet is its
    /// own system call.
    pub segmentation_offload: bool,
}

/// QUIC congestion controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Congestion {
    /// CUBIC (RFC 9438).
    Cubic,
    /// NewReno (RFC 9002).
    NewReno,
    /// BBR (v1, experimental in quinn).
    Bbr,
}

/// A configuration that cannot be used, naming the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid YAML of the expected shape.
    #[error("config file {path}: {message} (see `nodemesh run --help` for the fields)")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the parser said, with its location.
        message: String,
    },
    /// A field has a value that cannot work.
    #[error("config field `{field}`: {problem}; {fix}")]
    Invalid {
        /// Dotted field name, as in the file.
        field: &'static str,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: &'static str,
    },
    /// The relay buffer budget plus the state of `limits.max_connections`
    /// connections is above half of the container's memory limit
    /// ([`crate::memory_limit`]).
    #[error(
        "config fields `limits.relay_buffer_memory_mib` ({budget_mib} MiB) and \
         `limits.max_connections` ({connections}, about {connections_mib} MiB of connection \
         state at {} KiB each) let the daemon hold {} MiB, more than half of the container's \
         memory limit ({limit_mib} MiB, {}): with every connection open and every relay buffer \
         lent the daemon would be killed for memory before its limits protect it; {fix}, or \
         raise the container's memory limit \
         (resources.limits.memory of the nodemesh DaemonSet)",
        crate::memory_limit::CONNECTION_STATE_BYTES >> 10,
        budget_mib + connections_mib,
        file.display()
    )]
    MemoryLimitsOverContainerLimit {
        /// The configured relay buffer budget.
        budget_mib: u64,
        /// The configured connection limit.
        connections: u64,
        /// Its state at [`crate::memory_limit::CONNECTION_STATE_BYTES`] each.
        connections_mib: u64,
        /// The container's memory limit.
        limit_mib: u64,
        /// The cgroup file that set it.
        file: PathBuf,
        /// What to change.
        fix: String,
    },
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            node_address: None,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            tls: TlsConfig::default(),
            ports: PortsConfig::default(),
            admin_addr: SocketAddr::from(([0, 0, 0, 0], DEFAULT_ADMIN_PORT)),
            cni_socket: PathBuf::from(nodemesh_cni::proto::DEFAULT_SOCKET_PATH),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            cni_queue_dir: PathBuf::from("/var/lib/nodemesh-cni/queue"),
            socket_mark: nodemesh_cni::proto::DEFAULT_SOCKET_MARK,
            discovery: DiscoveryConfig::default(),
            tunnel: TunnelConfig::default(),
            drain_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            pod_tcp_tw_reuse: true,
            client_address: ClientAddressConfig::default(),
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            tcp_relay: crate::relay_splice::TcpRelay::Splice,
            worker_threads: 1,
            limits: LimitsConfig::default(),
            access_log: false,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: PathBuf::from("/etc/nodemesh/tls/node.pem"),
            key: PathBuf::from("/etc/nodemesh/tls/node-key.pem"),
            bundle: PathBuf::from("/etc/nodemesh/tls/ca.pem"),
            reload_interval_ms: DEFAULT_TLS_RELOAD_INTERVAL_MS,
        }
    }
}

impl Default for PortsConfig {
    fn default() -> Self {
        Self {
            outbound: nodemesh_cni::proto::DEFAULT_OUTBOUND_PORT,
            inbound: nodemesh_cni::proto::DEFAULT_INBOUND_PORT,
            tunnel: DEFAULT_TUNNEL_PORT,
        }
    }
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            source: DiscoverySource::File,
            file: PathBuf::from("/etc/nodemesh/discovery.yaml"),
            poll_interval_ms: 1_000,
        }
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 30_000,
            keep_alive_ms: 10_000,
            handshake_timeout_ms: 5_000,
            stream_window: 2 << 20,
            connection_window: 8 << 20,
            udp_buffer: 8 << 20,
            max_streams: 10_000,
            max_udp_payload: 1452,
            initial_mtu: 1200,
            congestion: Congestion::Cubic,
            ack_eliciting_threshold: None,
            segmentation_offload: true,
        }
    }
}

impl Config {
    /// Reads a YAML config file. Missing fields take their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Parses YAML text; `path` is only used in messages.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text).map_err(|e| ConfigError::Malformed {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            return Err(invalid(
                "node_name",
                "is empty",
                "set it in the file, with --node-name, or NODEMESH_NODE_NAME",
            ));
        }
        if !is_dns_subdomain(&self.node_name) {
            return Err(invalid(
                "node_name",
                format!("{:?} is not a DNS subdomain name", self.node_name),
                "use lowercase letters, digits, '-' and '.', at most 253 characters, as Kubernetes node names",
            ));
        }
        if self.node_address.is_none() {
            return Err(invalid(
                "node_address",
                "is not set",
                "set the node's IP address (where peers reach the tunnel), or pass --node-address",
            ));
        }
        if !is_dns_subdomain(&self.trust_domain) {
            return Err(invalid(
                "trust_domain",
                format!("{:?} is not a valid SPIFFE trust domain", self.trust_domain),
                "use lowercase letters, digits, '-' and '.', such as cluster.local",
            ));
        }
        let p = &self.ports;
        for (field, port) in [
            ("ports.outbound", p.outbound),
            ("ports.inbound", p.inbound),
            ("ports.tunnel", p.tunnel),
        ] {
            if port == 0 {
                return Err(invalid(
                    field,
                    "is 0",
                    "choose a fixed port from 1 to 65535",
                ));
            }
        }
        if p.outbound == p.inbound {
            return Err(invalid(
                "ports.inbound",
                format!("equals ports.outbound ({})", p.outbound),
                "use two different ports (defaults 15001 and 15006)",
            ));
        }
        if self.socket_mark == 0 {
            return Err(invalid(
                "socket_mark",
                "is 0, which every unmarked socket has",
                "choose a non-zero mark unused by other software on the node (default 0x4e4d)",
            ));
        }
        let c = &self.client_address;
        if c.mark == 0 || c.mark == self.socket_mark {
            return Err(invalid(
                "client_address.mark",
                format!("is {:#x} (socket_mark {:#x})", c.mark, self.socket_mark),
                "choose a non-zero mark different from socket_mark and unused in pods (default 0x4e4e)",
            ));
        }
        if matches!(c.table, 0 | 253..=255) {
            return Err(invalid(
                "client_address.table",
                format!("is {}, a table the kernel reserves", c.table),
                "choose a table id other than 0, 253 (default), 254 (main) and 255 (local), such as 20046",
            ));
        }
        if !(1..32766).contains(&c.rule_priority) {
            return Err(invalid(
                "client_address.rule_priority",
                format!("is {}", c.rule_priority),
                "choose a priority from 1 to 32765, so the rule comes before the main table's (default 32000)",
            ));
        }
        let t = &self.tunnel;
        if t.idle_timeout_ms == 0 || t.keep_alive_ms == 0 || t.keep_alive_ms >= t.idle_timeout_ms {
            return Err(invalid(
                "tunnel.keep_alive_ms",
                format!(
                    "keep-alive {} ms must be non-zero and below tunnel.idle_timeout_ms {} ms",
                    t.keep_alive_ms, t.idle_timeout_ms
                ),
                "keep the keep-alive at about a third of the idle timeout",
            ));
        }
        if t.handshake_timeout_ms == 0 {
            return Err(invalid(
                "tunnel.handshake_timeout_ms",
                "is 0",
                "use a few seconds, such as 5000",
            ));
        }
        if t.stream_window < 64 * 1024 || t.connection_window < t.stream_window {
            return Err(invalid(
                "tunnel.connection_window",
                format!(
                    "windows stream={} connection={} bytes",
                    t.stream_window, t.connection_window
                ),
                "use a stream window of at least 64 KiB and a connection window at least as large",
            ));
        }
        if t.max_streams == 0 {
            return Err(invalid(
                "tunnel.max_streams",
                "is 0",
                "allow at least 1 stream (default 10000)",
            ));
        }
        if !(1200..=65527).contains(&t.max_udp_payload) {
            return Err(invalid(
                "tunnel.max_udp_payload",
                format!("is {}", t.max_udp_payload),
                "use the underlay MTU minus 28 (IPv4) or 48 (IPv6), between 1200 and 65527",
            ));
        }
        if t.initial_mtu < 1200 || t.initial_mtu > t.max_udp_payload {
            return Err(invalid(
                "tunnel.initial_mtu",
                format!(
                    "is {} (max_udp_payload {})",
                    t.initial_mtu, t.max_udp_payload
                ),
                "use 1200 (the default) or a size every path carries, at most max_udp_payload",
            ));
        }
        if self.drain_timeout_ms == 0 {
            return Err(invalid(
                "drain_timeout_ms",
                "is 0",
                "give draining some time, such as 10000",
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(invalid(
                "connect_timeout_ms",
                "is 0",
                "use a few seconds, such as 5000",
            ));
        }
        let l = &self.limits;
        if l.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections",
                "is 0, which would refuse every connection",
                "allow at least 1 (default 65536)",
            ));
        }
        if l.max_connections_per_pod == 0 || l.max_connections_per_pod > l.max_connections {
            return Err(invalid(
                "limits.max_connections_per_pod",
                format!(
                    "is {} (limits.max_connections {})",
                    l.max_connections_per_pod, l.max_connections
                ),
                "allow at least 1 and at most limits.max_connections (default 4096)",
            ));
        }
        if l.relay_buffer_memory_mib == 0 {
            return Err(invalid(
                "limits.relay_buffer_memory_mib",
                "is 0",
                "allow at least 1 MiB (default 256); busy connections beyond it use small buffers",
            ));
        }
        if self.discovery.poll_interval_ms == 0 {
            return Err(invalid(
                "discovery.poll_interval_ms",
                "is 0",
                "check the file at most every few hundred ms (default 1000)",
            ));
        }
        if self.tls.reload_interval_ms == 0 {
            return Err(invalid(
                "tls.reload_interval_ms",
                "is 0",
                "check the certificate files every few seconds (default 5000)",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(invalid(
                "log_level",
                format!("{:?} is not a log filter", self.log_level),
                "use a level (error, warn, info, debug, trace) or a filter such as nodemesh=debug",
            ));
        }
        Ok(())
    }

    /// The node address; only valid after [`Config::validate`].
    pub fn node_ip(&self) -> IpAddr {
        self.node_address.unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    /// The hand-over socket (zero-downtime upgrade, `handover`):
    /// `handover.sock` in the directory of `cni_socket`. Not a setting of its
    /// own: both daemons of a hand-over must agree on it, and they share the
    /// run directory anyway.
    pub fn handover_socket(&self) -> PathBuf {
        crate::handover::socket_path(&self.cni_socket)
    }

    /// Drain deadline.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// Connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

fn invalid(field: &'static str, problem: impl Into<String>, fix: &'static str) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
        fix,
    }
}

/// RFC 1123 subdomain, as Kubernetes uses for node names.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            node_name: "node-1".into(),
            node_address: Some("10.0.0.1".parse().expect("ip")),
            ..Config::default()
        }
    }

    #[test]
    fn defaults_with_name_and_address_validate() {
        valid().validate().expect("valid");
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(
            Config::from_yaml("", Path::new("x")).expect("parse"),
            Config::default()
        );
    }

    #[test]
    fn unknown_field_names_the_field_and_line() {
        let err = Config::from_yaml(
            "node_name: a\nnode_adress: 1.2.3.4\n",
            Path::new("/etc/x.yaml"),
        )
        .expect_err("unknown field");
        let msg = err.to_string();
        assert!(msg.contains("/etc/x.yaml"), "{msg}");
        assert!(msg.contains("node_adress"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn invalid_fields_are_named_with_a_fix() {
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.node_name.clear()), "node_name"),
            (Box::new(|c| c.node_name = "Node_1".into()), "node_name"),
            (Box::new(|c| c.node_address = None), "node_address"),
            (Box::new(|c| c.trust_domain = "a b".into()), "trust_domain"),
            (Box::new(|c| c.ports.tunnel = 0), "ports.tunnel"),
            (
                Box::new(|c| c.ports.inbound = c.ports.outbound),
                "ports.inbound",
            ),
            (Box::new(|c| c.socket_mark = 0), "socket_mark"),
            (
                Box::new(|c| c.client_address.mark = 0),
                "client_address.mark",
            ),
            (
                Box::new(|c| c.client_address.mark = c.socket_mark),
                "client_address.mark",
            ),
            (
                Box::new(|c| c.client_address.table = 254),
                "client_address.table",
            ),
            (
                Box::new(|c| c.client_address.rule_priority = 32766),
                "client_address.rule_priority",
            ),
            (
                Box::new(|c| c.client_address.rule_priority = 0),
                "client_address.rule_priority",
            ),
            (
                Box::new(|c| c.tunnel.keep_alive_ms = 40_000),
                "tunnel.keep_alive_ms",
            ),
            (
                Box::new(|c| c.tunnel.stream_window = 10),
                "tunnel.connection_window",
            ),
            (
                Box::new(|c| c.tunnel.max_udp_payload = 1000),
                "tunnel.max_udp_payload",
            ),
            (
                Box::new(|c| c.tunnel.initial_mtu = 1500),
                "tunnel.initial_mtu",
            ),
            (Box::new(|c| c.drain_timeout_ms = 0), "drain_timeout_ms"),
            (
                Box::new(|c| c.limits.max_connections = 0),
                "limits.max_connections",
            ),
            (
                Box::new(|c| c.limits.max_connections_per_pod = 0),
                "limits.max_connections_per_pod",
            ),
            (
                Box::new(|c| c.limits.max_connections_per_pod = c.limits.max_connections + 1),
                "limits.max_connections_per_pod",
            ),
            (
                Box::new(|c| c.limits.relay_buffer_memory_mib = 0),
                "limits.relay_buffer_memory_mib",
            ),
            (
                Box::new(|c| c.tls.reload_interval_ms = 0),
                "tls.reload_interval_ms",
            ),
            (Box::new(|c| c.log_level = "info,=x=".into()), "log_level"),
        ];
        for (mutate, field) in cases {
            let mut c = valid();
            mutate(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected {field} invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn dns_subdomain_rules() {
        assert!(is_dns_subdomain("a.b-c.d1"));
        for bad in ["", "A", "-a", "a-", "a..b", "a_b", &"a".repeat(64)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }
}
