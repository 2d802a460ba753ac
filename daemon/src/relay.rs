//! Byte relay between two connection ends with half-close and reset preserved.
//!
//! STUB: the API below is the contract; bodies are filled in by the owner.

use metrics::Counter;
use tokio::net::TcpStream;

/// Bytes moved by a finished relay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes from the first end (the client side) to the second.
    pub a_to_b: u64,
    /// Bytes from the second end back to the first.
    pub b_to_a: u64,
}

/// How a relay ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Placeholder until implemented.
    #[error("not implemented")]
    Unimplemented,
}

/// Relays a TCP connection over a QUIC bidirectional stream.
pub async fn tcp_quic(
    _tcp: TcpStream,
    _send: quinn::SendStream,
    _recv: quinn::RecvStream,
    _tcp_to_quic: Counter,
    _quic_to_tcp: Counter,
) -> Result<RelayStats, RelayError> {
    Err(RelayError::Unimplemented)
}

/// Relays two TCP connections.
pub async fn tcp_tcp(
    _a: TcpStream,
    _b: TcpStream,
    _a_to_b: Counter,
    _b_to_a: Counter,
) -> Result<RelayStats, RelayError> {
    Err(RelayError::Unimplemented)
}

/// Resets a TCP connection (RST instead of FIN) as it is dropped.
pub fn reset_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
    drop(tcp);
}
