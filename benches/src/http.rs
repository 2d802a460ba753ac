//! A minimal HTTP/1.1 GET, from a socket made inside a network namespace,
//! for the daemons' admin endpoints (`/ready`, `/metrics`): the daemon
//! library's client ([`nodemesh::admin_client`]) over a lab socket.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::LabError;
use crate::netns::tcp_connect;

pub use nodemesh::admin_client::{Response, MAX_RESPONSE_BYTES};

/// `GET path` on `addr`, connecting from inside `netns`, within `timeout`.
pub fn get(
    netns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Response, LabError> {
    let stream = tcp_connect(netns, addr, timeout)?;
    nodemesh::admin_client::get_over(stream, addr, path, timeout).map_err(|problem| {
        LabError::Http {
            netns: netns.to_owned(),
            addr,
            path: path.to_owned(),
            problem,
        }
    })
}
