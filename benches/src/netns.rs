//! Sockets and commands inside a named network namespace (`/run/netns/<name>`).
//!
//! A socket is created by a short-lived thread that `setns`es into the
//! namespace, creates the socket, and exits: the socket keeps its namespace
//! for its whole life and can then be used from any thread (or handed to
//! tokio with `set_nonblocking(true)` and `from_std`). Commands run through
//! `ip netns exec`. Nothing here touches the caller's own namespace.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::error::LabError;
use crate::exec::{Cmd, Output};

/// Directory where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Path of a named namespace.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Runs `f` on a fresh thread that has entered namespace `netns`.
///
/// `what` names the operation in errors.
pub fn in_netns<T, F>(netns: &str, what: &str, f: F) -> Result<T, LabError>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    let path = netns_path(netns);
    let err = |source: std::io::Error| LabError::Netns {
        netns: netns.to_owned(),
        what: what.to_owned(),
        source,
    };
    let handle = std::thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || -> std::io::Result<T> {
            let file = File::open(&path)?;
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .map_err(err)?;
    match handle.join() {
        Ok(result) => result.map_err(err),
        Err(_) => Err(err(std::io::Error::other("thread panicked"))),
    }
}

/// A TCP listener bound to `addr` inside `netns` (backlog 1024, SO_REUSEADDR).
pub fn tcp_listen(netns: &str, addr: SocketAddr) -> Result<TcpListener, LabError> {
    in_netns(netns, &format!("listen on {addr}"), move || {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&SockAddr::from(addr))?;
        socket.listen(1024)?;
        Ok(socket.into())
    })
}

/// A TCP connection to `addr` made from inside `netns`, within `timeout`.
pub fn tcp_connect(
    netns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, LabError> {
    in_netns(netns, &format!("connect to {addr}"), move || {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_tcp_nodelay(true)?;
        socket.connect_timeout(&SockAddr::from(addr), timeout)?;
        Ok(socket.into())
    })
}

/// A UDP socket bound to `addr` inside `netns` (e.g. for a test QUIC
/// endpoint: `quinn::Endpoint::new(.., socket, ..)` after `set_nonblocking`).
pub fn udp_bind(netns: &str, addr: SocketAddr) -> Result<UdpSocket, LabError> {
    in_netns(netns, &format!("bind UDP {addr}"), move || {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        socket.bind(&SockAddr::from(addr))?;
        Ok(socket.into())
    })
}

/// Writes a `/proc/sys` setting inside `netns` (e.g. `net/ipv4/ip_forward`).
///
/// `/proc/sys/net` shows the namespace of the thread that opens it.
pub fn write_sysctl(netns: &str, key: &str, value: &str) -> Result<(), LabError> {
    let path = PathBuf::from("/proc/sys").join(key);
    let value = value.to_owned();
    in_netns(netns, &format!("write {}", path.display()), move || {
        std::fs::write(&path, value)
    })
}

/// Runs `ip <args>` (in the caller's namespace; use `-n <netns>` to target one).
pub fn ip<I, S>(args: I) -> Result<Output, LabError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    Cmd::new("ip").args(args).run()
}

/// Runs `program args` inside `netns` (`ip netns exec`) and fails unless it exits 0.
pub fn exec_in<I, S>(netns: &str, program: &str, args: I) -> Result<Output, LabError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    Cmd::in_netns(netns, program).args(args).run()
}

/// Names of all namespaces under `/run/netns`.
pub fn list_netns() -> Result<Vec<String>, LabError> {
    let out = ip(["netns", "list"])?;
    Ok(parse_netns_list(&out.stdout_text()))
}

/// Parses `ip netns list` output: `name` or `name (id: N)` per line.
pub fn parse_netns_list(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Creates a named namespace with `lo` up.
pub fn add_netns(name: &str) -> Result<(), LabError> {
    ip(["netns", "add", name])?;
    ip(["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a named namespace; a missing one is not an error.
pub fn del_netns(name: &str) -> Result<(), LabError> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip(["netns", "del", name]).map(|_| ())
}

/// Process ids whose network namespace is `netns`.
pub fn netns_pids(name: &str) -> Result<Vec<i32>, LabError> {
    if !netns_path(name).exists() {
        return Ok(Vec::new());
    }
    let out = ip(["netns", "pids", name])?;
    Ok(out
        .stdout_text()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_list_formats() {
        assert_eq!(
            parse_netns_list("a-n1 (id: 3)\nb\n\n"),
            vec!["a-n1".to_owned(), "b".to_owned()]
        );
    }
}
