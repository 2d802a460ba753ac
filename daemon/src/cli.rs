//! The command line: `nodemesh run`, `nodemesh certs`, `nodemesh stat` and
//! `nodemesh top`.
//!
//! Owns argument parsing and the merge of flags (and their environment
//! variables) over the config file; the result is a validated [`Config`].

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, LogFormat};
use crate::identity::certs::CertsCommand;

/// nodemesh: one proxy per node instead of one sidecar per pod.
///
/// The daemon takes the TCP traffic of the meshed pods on its node (captured
/// by the nodemesh-cni plugin), and carries it to the daemon on the
/// destination node over one multiplexed QUIC mTLS tunnel per node pair.
#[derive(Debug, Parser)]
#[command(
    name = "nodemesh",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon in the foreground until SIGTERM/SIGINT.
    ///
    /// Settings come from the config file (YAML; every field and its default
    /// is documented in docs/operations.md), then from these flags or their
    /// environment variables, which win. A bad setting exits with status 64
    /// and a message naming the field and the fix.
    ///
    /// Example:
    ///   nodemesh run --config /etc/nodemesh/config.yaml --node-name "$NODE_NAME"
    Run(Box<RunArgs>),
    /// Make a development CA and node certificates (lab and standalone use).
    ///
    /// Example:
    ///   nodemesh certs init --dir /etc/nodemesh/tls
    ///   nodemesh certs node node-1 --dir /etc/nodemesh/tls
    #[command(subcommand)]
    Certs(CertsCommand),
    #[command(verbatim_doc_comment)]
    /// Golden signals per workload edge, from the metrics of one or many
    /// daemons, over one window.
    ///
    /// Scrapes each daemon's admin address twice, --interval apart, and
    /// prints for every source -> destination workload with connections in
    /// the window: connections per second, the share that was relayed
    /// (SUCCESS; the rest failed before relaying, e.g. no route, denied,
    /// connect failed), bytes per second each way, p50/p99 of the duration
    /// of connections that closed (histogram bucket bounds), whether they
    /// were carried with mTLS and by which route. Then each daemon: pods,
    /// active connections, tunnels, when its first certificate expires.
    ///
    /// Example, the daemons of two nodes:
    ///   nodemesh stat --admin 10.0.0.1:15020 --admin 10.0.0.2:15020
    Stat(StatArgs),
    #[command(verbatim_doc_comment)]
    /// The same as stat, again every --interval until interrupted (Ctrl-C).
    ///
    /// Example:
    ///   nodemesh top --admin 127.0.0.1:15020 --interval 2
    Top(StatArgs),
    #[command(verbatim_doc_comment)]
    /// Show or change a running daemon's log filter, without a restart.
    ///
    /// Without FILTER, prints the filter in force. With it, the daemon
    /// applies it at once (a filter that does not parse is refused, the old
    /// one stays) and prints the new and the previous one. The daemon takes
    /// a change only from its own node (loopback or the node's address), so
    /// run it in the daemon's pod; the next restart goes back to
    /// `log_level`.
    ///
    /// Examples:
    ///   kubectl exec -n nodemesh-system ds/nodemesh -c nodemesh -- nodemesh log-level
    ///   nodemesh log-level info,nodemesh::inbound=debug
    ///   nodemesh log-level info
    LogLevel(LogLevelArgs),
}

/// `nodemesh log-level` arguments.
#[derive(Debug, Args)]
pub struct LogLevelArgs {
    /// The new filter (tracing `EnvFilter` syntax, as `log_level`); omit to
    /// print the one in force.
    pub filter: Option<String>,
    /// Admin address of the daemon.
    #[arg(long = "admin", value_name = "ADDR", default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
}

/// `nodemesh stat` / `top` flags.
#[derive(Debug, Args)]
pub struct StatArgs {
    /// Admin address of a daemon (its `admin_addr`); repeat for several.
    #[arg(long = "admin", value_name = "ADDR", default_value = "127.0.0.1:15020")]
    pub admin: Vec<SocketAddr>,
    /// Seconds between the two scrapes of a window (0.1 to 3600).
    #[arg(long, default_value_t = 5.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Count each connection as its source node's daemon reports it, or as
    /// the destination node's does (also sees unmeshed clients and its own
    /// denials).
    #[arg(long, value_enum, default_value = "source")]
    pub reporter: crate::stat::Side,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if (0.1..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} s is out of range: use 0.1 to 3600"))
    }
}

/// `nodemesh run` flags; each overrides the config file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (YAML). Without it, defaults plus flags.
    #[arg(long, short = 'c', env = "NODEMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's name (Kubernetes node name).
    #[arg(long, env = "NODEMESH_NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's IP address, where peers reach its tunnel (IPv4 or IPv6:
    /// the tunnels run in its family).
    #[arg(long, env = "NODEMESH_NODE_ADDRESS")]
    pub node_address: Option<IpAddr>,
    /// SPIFFE trust domain [default: cluster.local].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Admin server address [default: 0.0.0.0:15020].
    #[arg(long)]
    pub admin_addr: Option<SocketAddr>,
    /// CNI registration socket [default: /run/nodemesh/cni.sock].
    #[arg(long)]
    pub cni_socket: Option<PathBuf>,
    /// Directory for persisted registrations [default: /run/nodemesh/pods].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Discovery file (YAML) [default: /etc/nodemesh/discovery.yaml].
    #[arg(long)]
    pub discovery_file: Option<PathBuf>,
    /// Node certificate chain (PEM).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Node private key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Trust bundle (PEM).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Log filter, such as `info` or `nodemesh=debug` [default: info].
    #[arg(long, env = "NODEMESH_LOG")]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Check the settings and exit without starting: 0 and a summary when
    /// they would start, 64 and the message when one would not. Checks the
    /// file, the flags, and that `limits.relay_buffer_memory_mib` plus 4 KiB
    /// per `limits.max_connections` fits in half of the container's memory
    /// limit; reads no certificate and contacts nothing.
    #[arg(long)]
    pub check: bool,
}

impl RunArgs {
    /// The file's config with these flags applied, validated.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($field:expr, $v:expr) => {
                if let Some(v) = $v {
                    $field = v;
                }
            };
        }
        set!(c.node_name, self.node_name);
        if self.node_address.is_some() {
            c.node_address = self.node_address;
        }
        set!(c.trust_domain, self.trust_domain);
        set!(c.admin_addr, self.admin_addr);
        set!(c.cni_socket, self.cni_socket);
        set!(c.state_dir, self.state_dir);
        set!(c.discovery.file, self.discovery_file);
        set!(c.tls.cert, self.cert);
        set!(c.tls.key, self.key);
        set!(c.tls.bundle, self.bundle);
        set!(c.log_level, self.log_level);
        set!(c.log_format, self.log_format);
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "node_name: from-file\nnode_address: 10.0.0.1\n").expect("write");
        let cli = Cli::try_parse_from([
            "nodemesh",
            "run",
            "-c",
            file.to_str().expect("utf8"),
            "--node-name",
            "from-flag",
        ])
        .expect("parse");
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        let c = args.into_config().expect("valid");
        assert_eq!(c.node_name, "from-flag");
        assert_eq!(c.node_address, Some("10.0.0.1".parse().expect("ip")));
    }
}
