//! The QUIC mTLS tunnel between nodes.
pub mod header;
