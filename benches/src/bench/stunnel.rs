//! The classic sidecar-style baseline: a stunnel mTLS proxy pair.
//!
//! Client pod → stunnel client (in the client pod's namespace, on
//! 127.0.0.1) → TLS 1.3 with client certificates → stunnel server (in the
//! server pod's namespace) → the server app on 127.0.0.1. Certificates come
//! from `nodemesh certs` (same CA format as the mesh, ECDSA P-256). One
//! service per forwarded port. [`StunnelPair`] stops both processes on drop.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;
use crate::daemon;

/// The Debian stunnel binary.
pub const STUNNEL_BIN: &str = "stunnel4";
/// TLS ports are the app port plus this.
pub const TLS_PORT_OFFSET: u16 = 1000;
/// Client-side (plaintext, in the client pod) ports are the app port plus this.
pub const CLIENT_PORT_OFFSET: u16 = 2000;

/// A running stunnel client + server pair.
#[derive(Debug)]
pub struct StunnelPair {
    children: Vec<Child>,
    /// Pid of the client-side stunnel.
    pub client_pid: u32,
    /// Pid of the server-side stunnel.
    pub server_pid: u32,
}

impl Drop for StunnelPair {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where the client app connects to reach app port `port` on the server.
pub fn client_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port + CLIENT_PORT_OFFSET)
}

fn section(out: &mut String, name: &str, tls: &Path, role: &str) {
    let _ = writeln!(out, "[{name}]");
    let _ = writeln!(out, "cert = {}", tls.join(format!("{role}.pem")).display());
    let _ = writeln!(
        out,
        "key = {}",
        tls.join(format!("{role}-key.pem")).display()
    );
    let _ = writeln!(out, "CAfile = {}", tls.join("ca.pem").display());
    let _ = writeln!(out, "verifyChain = yes");
    let _ = writeln!(out, "sslVersionMin = TLSv1.3");
    let _ = writeln!(out, "socket = l:TCP_NODELAY=1");
    let _ = writeln!(out, "socket = r:TCP_NODELAY=1");
}

/// The config text of one side; `server_ip` is `Some` on the client side.
pub fn config(dir: &Path, role: &str, ports: &[u16], server_ip: Option<Ipv4Addr>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "foreground = yes\npid =\nsyslog = no\ndebug = 3");
    let _ = writeln!(
        out,
        "output = {}",
        dir.join(format!("{role}.log")).display()
    );
    for port in ports {
        section(&mut out, &format!("p{port}"), dir, role);
        match server_ip {
            Some(ip) => {
                let _ = writeln!(out, "client = yes");
                let _ = writeln!(out, "accept = 127.0.0.1:{}", port + CLIENT_PORT_OFFSET);
                let _ = writeln!(out, "connect = {ip}:{}", port + TLS_PORT_OFFSET);
            }
            None => {
                let _ = writeln!(out, "requireCert = yes");
                let _ = writeln!(out, "accept = 0.0.0.0:{}", port + TLS_PORT_OFFSET);
                let _ = writeln!(out, "connect = 127.0.0.1:{port}");
            }
        }
    }
    out
}

/// Whether `name` is an executable file in a directory of `PATH`.
fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| {
            std::fs::metadata(d.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

fn spawn(netns: &str, conf: &Path) -> Result<Child, BenchError> {
    Command::new("ip")
        .args(["netns", "exec", netns, STUNNEL_BIN])
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| BenchError::Io {
            what: format!("starting {STUNNEL_BIN} in {netns}"),
            source,
        })
}

/// Starts the pair for app `ports`: certificates and configs in `dir`
/// (made with `nodemesh` binary `nodemesh`), waits until the client side
/// accepts on every port.
pub fn start(
    nodemesh: &Path,
    dir: &Path,
    client_netns: &str,
    server_netns: &str,
    server_ip: Ipv4Addr,
    ports: &[u16],
) -> Result<StunnelPair, BenchError> {
    // `ip netns exec` would start and then fail to find it, which would
    // look like a pair that never accepts.
    if !on_path(STUNNEL_BIN) {
        return Err(BenchError::BaselineMissing {
            program: STUNNEL_BIN,
            package: "stunnel4",
            path: "stunnel",
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    daemon::init_ca(nodemesh, dir)?;
    daemon::node_cert(nodemesh, dir, "client")?;
    daemon::node_cert(nodemesh, dir, "server")?;
    let write = |name: &str, text: String| -> Result<PathBuf, BenchError> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| BenchError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
        Ok(path)
    };
    let server_conf = write("server.conf", config(dir, "server", ports, None))?;
    let client_conf = write("client.conf", config(dir, "client", ports, Some(server_ip)))?;
    let server = spawn(server_netns, &server_conf)?;
    let mut pair = StunnelPair {
        server_pid: server.id(),
        client_pid: 0,
        children: vec![server],
    };
    let client = spawn(client_netns, &client_conf)?;
    pair.client_pid = client.id();
    pair.children.push(client);
    // Ready when every client port accepts (polled with a deadline).
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in ports {
        let addr = client_addr(*port);
        loop {
            if crate::netns::tcp_connect(client_netns, addr, Duration::from_secs(1)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Measure {
                    what: "stunnel".into(),
                    problem: format!(
                        "client side not accepting on {addr} after 10 s; see {}",
                        dir.join("client.log").display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Also wait for the server side's port, from the server pod.
    for port in ports {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port + TLS_PORT_OFFSET);
        loop {
            if crate::netns::tcp_connect(server_netns, addr, Duration::from_secs(1)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Measure {
                    what: "stunnel".into(),
                    problem: format!("server side not accepting on {addr}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_path_finds_sh_and_not_a_made_up_name() {
        assert!(on_path("sh"));
        assert!(!on_path("nodemesh-no-such-program-4b1d"));
    }

    #[test]
    fn client_and_server_configs() {
        let dir = Path::new("/x");
        let c = config(dir, "client", &[9000], Some(Ipv4Addr::new(10, 78, 2, 2)));
        assert!(c.contains("[p9000]\ncert = /x/client.pem\nkey = /x/client-key.pem"));
        assert!(c.contains("client = yes\naccept = 127.0.0.1:11000\nconnect = 10.78.2.2:10000"));
        let s = config(dir, "server", &[9000, 9001], None);
        assert!(s.contains("requireCert = yes\naccept = 0.0.0.0:10001\nconnect = 127.0.0.1:9001"));
        assert_eq!(s.matches("verifyChain = yes").count(), 2);
    }
}
