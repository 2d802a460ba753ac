//! The floor baseline: a plain-TCP relay pair, placed as the stunnel pair is.
//!
//! Client pod → relay (in the client pod's namespace, on 127.0.0.1) → plain
//! TCP across the nodes → relay (in the server pod's namespace) → the server
//! app on 127.0.0.1. Both relays are the daemon's own copy relay
//! ([`crate::relay_engine`], `nodemesh-lab relay-engine --engine copy`:
//! tokio with one worker, epoll readiness, read/write through a 64 KiB
//! buffer, `TCP_NODELAY` on every leg), one process per side serving every
//! forwarded port. No encryption, no multiplexing, no per-connection work
//! beyond accept and connect.
//!
//! What it measures: the cost of the process hand-offs themselves. A
//! request through any proxy pair, nodemesh's L1/L2 daemons included, wakes
//! two more processes twice each than the direct path does; this path does
//! that and nothing else, so what it adds over the direct path is the least
//! any design with two user-space proxies can add on this machine.
//! [`RelayPair`] stops both processes on drop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::relays::EngineProcess;
use super::BenchError;
use crate::relay_engine::Engine;

/// Server-side relay ports are the app port plus this (stunnel's use 1000 and 2000).
pub const SERVER_PORT_OFFSET: u16 = 3000;
/// Client-side (in the client pod) ports are the app port plus this.
pub const CLIENT_PORT_OFFSET: u16 = 4000;
/// The engine both relays run: the one the daemon's TCP ↔ QUIC legs share
/// their I/O model with (epoll readiness, a read and a write per chunk).
pub const ENGINE: Engine = Engine::Copy;

// Both pairs run in the same plain lab: no port of one may be the other's.
const _: () = assert!(
    SERVER_PORT_OFFSET != super::stunnel::TLS_PORT_OFFSET
        && SERVER_PORT_OFFSET != super::stunnel::CLIENT_PORT_OFFSET
        && CLIENT_PORT_OFFSET != super::stunnel::TLS_PORT_OFFSET
        && CLIENT_PORT_OFFSET != super::stunnel::CLIENT_PORT_OFFSET
);

/// A running relay pair.
#[derive(Debug)]
pub struct RelayPair {
    client: EngineProcess,
    server: EngineProcess,
}

impl RelayPair {
    /// Pid of the client-side relay.
    pub fn client_pid(&self) -> u32 {
        self.client.pid()
    }

    /// Pid of the server-side relay.
    pub fn server_pid(&self) -> u32 {
        self.server.pid()
    }
}

/// Where the client app connects to reach app port `port` on the server.
pub fn client_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port + CLIENT_PORT_OFFSET)
}

/// What one relay forwards: `(listen, to)` for each port.
pub type Forwards = Vec<(SocketAddr, SocketAddr)>;

/// What each side forwards for app `ports`: (client side, server side).
pub fn pairs(ports: &[u16], server_ip: Ipv4Addr) -> (Forwards, Forwards) {
    let client = ports
        .iter()
        .map(|p| {
            (
                client_addr(*p),
                SocketAddr::from((server_ip, p + SERVER_PORT_OFFSET)),
            )
        })
        .collect();
    let server = ports
        .iter()
        .map(|p| {
            (
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, p + SERVER_PORT_OFFSET)),
                SocketAddr::from((Ipv4Addr::LOCALHOST, *p)),
            )
        })
        .collect();
    (client, server)
}

/// Starts the pair for app `ports`; returns once both sides listen on every
/// port (each relay prints its listeners' addresses once they are bound).
pub fn start(
    client_netns: &str,
    server_netns: &str,
    server_ip: Ipv4Addr,
    ports: &[u16],
) -> Result<RelayPair, BenchError> {
    let (client, server) = pairs(ports, server_ip);
    let server = EngineProcess::start_pairs(ENGINE, server_netns, &server)?;
    let client = EngineProcess::start_pairs(ENGINE, client_netns, &client)?;
    Ok(RelayPair { client, server })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_side_forwards_to_the_server_side_which_forwards_to_the_app() {
        let ip = Ipv4Addr::new(10, 0, 2, 2);
        let (client, server) = pairs(&[9000, 9001], ip);
        assert_eq!(
            client,
            [
                (client_addr(9000), SocketAddr::from((ip, 12000))),
                (client_addr(9001), SocketAddr::from((ip, 12001))),
            ]
        );
        assert_eq!(
            server,
            [
                (
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 12000)),
                    SocketAddr::from((Ipv4Addr::LOCALHOST, 9000))
                ),
                (
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 12001)),
                    SocketAddr::from((Ipv4Addr::LOCALHOST, 9001))
                ),
            ]
        );
        // Every client-side listener is one the client pod alone can reach.
        assert!(client.iter().all(|(l, _)| l.ip().is_loopback()));
    }
}
